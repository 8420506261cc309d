"""The real AbstractFlow bundles with LLM, agent and tool nodes, end to end over HTTP, against a fake
OpenAI-compatible model server on loopback (tests/fake_llm.py): no network, no real model."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from datetime import datetime

import pytest

import abstractgateway as gw
from conftest import FIXTURE_BUNDLES, LiveServer, make_config, wait_for
from fake_llm import MODELS, FakeLLM
from processes import run_gateway, spawn_gateway

API = "/api/gateway"


@pytest.fixture
def fake_llm(monkeypatch):
    server = FakeLLM().start()
    for name, value in server.provider_env().items():
        monkeypatch.setenv(name, value)
    yield server
    server.close()


@pytest.fixture
def llm_server(data_dir, fake_llm):
    server = LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES))
    yield server
    server.close()


def _openai_gateway(data_dir, **settings):
    """A live gateway on the fixtures' bundles whose default model is the fake's `openai` gpt-5-mini."""
    return LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES), provider="openai", model="gpt-5-mini", **settings)


def _start(server, bundle_id, prompt="Say hi", expect=200):
    status, _, data = server.post(f"{API}/runs/start", {"bundle_id": bundle_id, "input_data": {"prompt": prompt}})
    assert status == expect, data
    return data["run_id"] if status == 200 else data


def _run(server, run_id):
    return server.get(f"{API}/runs/{run_id}")[2]


def _wait_status(server, run_id, *wanted, timeout=60):
    return wait_for(lambda: (d := _run(server, run_id))["status"] in wanted and d, timeout)


def _tree(server, run_id):
    """`run_id` and its descendants (ids), from the gateway's stores."""
    return server.gateway.run_tree_ids(run_id)


def _ledger(server, run_id):
    return server.get(f"{API}/runs/{run_id}/ledger?limit=2000")[2]["items"]


def _tree_ledger(server, run_id):
    return [r for rid in _tree(server, run_id) for r in _ledger(server, rid)]


def _llm_calls(records):
    return [r for r in records if (r.get("effect") or {}).get("type") == "llm_call" and r["status"] == "completed"]


def _command(server, run_id, kind, payload=None, command_id=None):
    body = {"command_id": command_id or uuid.uuid4().hex, "run_id": run_id, "type": kind, "payload": payload or {}}
    status, _, data = server.post(f"{API}/commands", body)
    assert status == 200, data
    return body["command_id"]


def _outcome(server, command_id):
    return wait_for(lambda: (d := server.get(f"{API}/commands/{command_id}")[2])["status"] != "pending" and d)


def _waiting_child_now(server, run_id):
    """The descendant of `run_id` parked on a tool approval, if any."""
    for rid in _tree(server, run_id):
        run = server.gateway.stores.runs.load(rid)
        if run.waiting is not None and (run.waiting.details or {}).get("mode") == "approval_required":
            return run
    return None


def _waiting_child(server, run_id):
    return wait_for(lambda: _waiting_child_now(server, run_id), 60)


def _executed(run, output="hello\n"):
    return {"mode": "executed", "results": [
        {"call_id": tc["call_id"], "runtime_call_id": tc["runtime_call_id"], "name": tc["name"], "success": True,
         "output": output, "error": None} for tc in run.waiting.details["tool_calls"]]}


# -- the bundles the original runs ---------------------------------------------------------------------


def test_basic_bundles_complete_with_llm_call_records(llm_server, fake_llm):
    runs = {b: _start(llm_server, b) for b in ("basic", "basic-agent", "basic-llm-test", "yoda")}
    for bundle, run_id in runs.items():
        assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed", bundle
    for bundle in ("basic", "basic-agent", "basic-llm-test"):
        calls = _llm_calls(_tree_ledger(llm_server, runs[bundle]))
        assert calls, bundle
        assert all(c["result"]["content"].startswith("Hello from the fake model") for c in calls)
        assert all(c["result"]["model"] in MODELS for c in calls)  # a default filled in where none is pinned
    # yoda's loop compares its prompt (a string) with a number, so it never asks its model: it completes at once,
    # as on the original gateway
    assert _llm_calls(_tree_ledger(llm_server, runs["yoda"])) == []
    assert fake_llm.calls >= 3


def test_basic_followup_waits_for_the_user_and_completes_after_resume(llm_server):
    run_id = _start(llm_server, "basic-followup")
    run = wait_for(lambda: (d := _run(llm_server, run_id))["status"] == "waiting" and d["waiting"]["reason"] == "user"
                   and d, 60)  # after its agent answered
    assert _llm_calls(_tree_ledger(llm_server, run_id))
    cid = _command(llm_server, run_id, "resume",
                   {"wait_key": run["waiting"]["wait_key"], "payload": {"response": "Stop"}})
    assert _outcome(llm_server, cid)["status"] == "applied"
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"


@pytest.mark.parametrize("bundle", ["coder", "test"])
def test_tool_calls_wait_for_approval_and_the_agent_goes_on_with_the_results(llm_server, fake_llm, bundle):
    run_id = _start(llm_server, bundle, prompt="Please use execute_command to run echo hello")
    child = _waiting_child(llm_server, run_id)
    waiting = _run(llm_server, child.run_id)["waiting"]
    assert waiting["reason"] == "event" and waiting["wait_key"].startswith(f"tool_approval:{child.run_id}:act:")
    details = child.waiting.details
    assert details["mode"] == "approval_required"
    [call] = details["tool_calls"]
    assert call["name"] == "execute_command" and call["call_id"] == "call_1" and call["runtime_call_id"]
    assert call["arguments"]["command"] == "echo hello"
    assert _run(llm_server, run_id)["status"] == "waiting"  # the root waits on its agent
    approved = 0
    while _run(llm_server, run_id)["status"] == "waiting":  # coder's second agent is asked to use the tool too
        cid = _command(llm_server, child.run_id, "resume", {"wait_key": child.waiting.wait_key,
                                                            "payload": _executed(child)})
        assert _outcome(llm_server, cid)["status"] == "applied"
        assert _wait_status(llm_server, child.run_id, "completed", "failed")["status"] == "completed"
        approved += 1
        child = wait_for(lambda: _run(llm_server, run_id)["status"] in ("completed", "failed") and "root done"
                         or _waiting_child_now(llm_server, run_id), 60)
        if child == "root done":
            break
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"
    assert approved == {"coder": 2, "test": 1}[bundle]
    # each answered tool-call wait got the runtime's completion record under the wait's own key, once
    answered = 0
    for rid in _tree(llm_server, run_id):
        records = llm_server.gateway.stores.ledger.list(rid)
        waits = {r["idempotency_key"] for r in records
                 if r["status"] == "waiting" and (r.get("effect") or {}).get("type") == "tool_calls"}
        done = [r["idempotency_key"] for r in records if r["status"] == "completed" and r["idempotency_key"] in waits]
        assert sorted(done) == sorted(waits), rid
        answered += len(waits)
    assert answered == approved
    tool_messages = [m for r in fake_llm.requests for m in r["messages"] if m.get("role") == "tool"]
    assert any("hello" in str(m.get("content")) for m in tool_messages)  # the model saw the tool's output


def test_an_answer_sent_again_for_the_step_before_never_approves_the_next_tool_step(llm_server, fake_llm):
    """Each approval waits on a key of its own, as on the original: a retried or double-clicked answer to
    the first tool step does not answer the second."""
    run_id = _start(llm_server, "test", prompt="TWICE use execute_command")
    first = _waiting_child(llm_server, run_id)
    answer = {"wait_key": first.waiting.wait_key, "payload": _executed(first)}
    assert _outcome(llm_server, _command(llm_server, first.run_id, "resume", answer))["status"] == "applied"
    second = wait_for(lambda: (c := llm_server.gateway.stores.runs.load(first.run_id)).waiting
                      and c.waiting.wait_key != first.waiting.wait_key and c, 60)
    assert second.waiting.details["tool_calls"][0]["arguments"]["command"] == "echo hello1"
    outcome = _outcome(llm_server, _command(llm_server, first.run_id, "resume", answer))  # sent again
    assert outcome["status"] == "failed" and "wait_key" in outcome["error"]
    assert _run(llm_server, first.run_id)["waiting"]["wait_key"] == second.waiting.wait_key  # still asked
    cid = _command(llm_server, first.run_id, "resume", {"wait_key": second.waiting.wait_key,
                                                        "payload": _executed(second)})
    assert _outcome(llm_server, cid)["status"] == "applied"
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"


def test_a_second_approval_of_the_same_wait_is_recorded_as_failed_never_applied(llm_server, fake_llm):
    run_id = _start(llm_server, "test", prompt="Please use execute_command to run echo hello")
    child = _waiting_child(llm_server, run_id)
    body = {"wait_key": child.waiting.wait_key, "payload": _executed(child)}
    first = _command(llm_server, child.run_id, "resume", body)
    second = _command(llm_server, child.run_id, "resume", body)  # a new command_id, same answer
    status, _, again = llm_server.post(f"{API}/commands", {"command_id": first, "run_id": child.run_id,
                                                            "type": "resume", "payload": body})
    assert status == 200 and again["duplicate"] is True  # the same command_id is the same command
    assert _outcome(llm_server, first)["status"] == "applied"
    outcome = _outcome(llm_server, second)
    assert outcome["status"] == "failed" and "already answered" in outcome["error"]
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"
    answered = [(r["effect"] or {}).get("type") for r in _ledger(llm_server, child.run_id)
                if r["node_id"] == "act" and r["status"] == "completed"]
    assert sorted(answered) == ["resume", "tool_calls"]  # the tool step was answered once
    assert fake_llm.calls == 2  # the tool call, then the answer after the one result
    # a late answer naming a call the (re-entered) wait does not have is refused too
    late = _command(llm_server, child.run_id, "resume", body)
    assert _outcome(llm_server, late)["status"] == "failed"


def test_local_tool_mode_runs_the_default_tools_without_a_wait(data_dir, fake_llm):
    server = LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES), tool_mode="local")
    try:
        run_id = _start(server, "test", prompt="Please use execute_command to run echo hello")
        assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        tool_steps = [r["status"] for r in _tree_ledger(server, run_id)
                      if (r["effect"] or {}).get("type") == "tool_calls"]
        assert "completed" in tool_steps and "waiting" not in tool_steps
        tool_messages = [m for r in fake_llm.requests for m in r["messages"] if m.get("role") == "tool"]
        assert any("hello" in str(m.get("content")) for m in tool_messages)  # really ran `echo hello`
    finally:
        server.close()


def test_local_tool_mode_is_refused_on_a_network_bind_unless_allowed(data_dir):
    token = "a-long-random-token-0123456789abcdef"
    for host, tool_mode, allow, refused in (("0.0.0.0", "local", "0", True), ("0.0.0.0", "local", "1", False),
                                            ("127.0.0.1", "local", "0", False), ("0.0.0.0", "passthrough", "0", False)):
        config = make_config(data_dir, host=host, tool_mode=tool_mode, allow_local_tools_on_network=allow,
                             auth_token=token)
        policy = gw.SecurityPolicy.from_config(config, None)
        problem = gw.startup_problem(config, policy)
        assert bool(problem and "TOOL_MODE=local" in problem) is refused, (host, tool_mode, allow, problem)


# -- refusals at start ----------------------------------------------------------------------------------


def test_bundles_needing_missing_capabilities_are_refused_at_start(llm_server):
    for bundle, packages in (("features", ("abstractvision", "abstractvoice", "abstractmusic")),
                             ("Untitled-Flow", ("abstractvision", "abstractvoice"))):
        error = _start(llm_server, bundle, expect=422)
        assert error["code"] == "capability_missing" and all(p in error["detail"] for p in packages), error
        view = llm_server.get(f"{API}/bundles/{bundle}")[2]
        assert {f"capability:{p}" for p in packages} <= set(view["needs"])
    assert llm_server.get(f"{API}/runs?limit=10")[2]["items"] == []  # nothing half-started


def test_no_provider_is_refused_naming_both_settings(data_dir, fake_llm, tmp_path):
    flows = tmp_path / "only"
    flows.mkdir()
    (flows / "basic-llm-test@0.0.0.flow").write_bytes((FIXTURE_BUNDLES / "basic-llm-test@0.0.0.flow").read_bytes())
    server = LiveServer(data_dir, flows_dir=str(flows))
    try:
        error = _start(server, "basic-llm-test", expect=422)
        assert error["code"] == "llm_not_configured"
        assert "ABSTRACTGATEWAY_PROVIDER" in error["detail"] and "ABSTRACTGATEWAY_MODEL" in error["detail"]
    finally:
        server.close()
    server = LiveServer(data_dir, flows_dir=str(flows), provider="openai-compatible", model="fake-model")
    try:
        run_id = _start(server, "basic-llm-test")
        assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        [call] = _llm_calls(_ledger(server, run_id))
        assert call["result"]["model"] == "fake-model"  # the settings' default
    finally:
        server.close()


def test_without_the_extra_llm_bundles_are_refused_with_llm_extra_required(data_dir, monkeypatch):
    monkeypatch.setitem(sys.modules, "abstractcore", None)  # `import abstractcore` fails, as without `[llm]`
    server = LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES))
    try:
        assert server.gateway.llm is None
        for bundle in ("basic-llm-test", "coder", "features"):
            error = _start(server, bundle, expect=422)
            assert error["code"] == "llm_extra_required" and "abstractgateway[llm]" in error["detail"]
        status, _, error = server.post(f"{API}/runs/nope/summary", {})
        assert status == 404
        tools = server.get(f"{API}/discovery/tools")[2]
        assert tools["items"] == [] and gw.LLM_EXTRA in tools["error"]
    finally:
        server.close()


# -- concurrency, pause/cancel and crashes during a model call ----------------------------------------------


def test_concurrent_model_calls_are_bounded_by_the_setting(data_dir, fake_llm):
    fake_llm.delay_s = 0.3
    server = _openai_gateway(data_dir, llm_concurrency="2")
    try:
        runs = [_start(server, "basic-llm-test") for _ in range(6)]
        for run_id in runs:
            assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        assert fake_llm.calls == 6 and fake_llm.max_in_flight == 2
    finally:
        server.close()


def test_cancel_during_a_slow_call_records_the_answer_and_does_not_advance(llm_server, fake_llm):
    """The cancel wins at once; the call in flight is waited for (the model server is still busy with it,
    which `llm_concurrency` counts), its answer recorded, and the run goes no further."""
    fake_llm.delay_s = 2.0
    run_id = _start(llm_server, "basic-llm-test")
    fake_llm.wait_for_call(1)
    assert _outcome(llm_server, _command(llm_server, run_id, "cancel"))["status"] == "applied"
    assert _run(llm_server, run_id)["status"] == "cancelled"
    wait_for(lambda: _llm_calls(_ledger(llm_server, run_id)), 10)  # the answer is recorded
    wait_for(lambda: not llm_server.runner._in_flight, 10)  # and that step is over: nothing more comes
    assert _run(llm_server, run_id)["status"] == "cancelled"
    calls = [r["status"] for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert calls == ["started", "completed"]
    assert not [r for r in _ledger(llm_server, run_id) if r["node_id"] == "end"]


def test_a_model_call_s_progress_events_run_on_the_step_s_thread_and_none_once_it_is_let_go():
    """The call runs on a thread of its own, but its progress events (which append ledger records) are
    run by the waiting step, so their writes stay in the step; a call let go past its timeout adds none."""
    import threading

    seen, late_sent, release = [], threading.Event(), threading.Event()
    on_progress = lambda *args, **kwargs: seen.append((threading.get_ident(), args, kwargs))  # noqa: E731

    def answers(**kwargs):
        kwargs["params"]["on_progress"]("started", n=1)
        kwargs["params"]["on_progress"]("half")
        return {"content": "ok"}

    def stalls(**kwargs):
        release.wait(10)
        kwargs["params"]["on_progress"]("late")
        late_sent.set()
        return {"content": "too late"}

    assert gw._answer_within(answers, {"params": {"on_progress": on_progress}}, 5) == {"content": "ok"}
    assert gw._answer_within(lambda **_: "fine", {}, 1e10) == "fine"  # a timeout past what a wait can take
    assert seen == [(threading.get_ident(), ("started",), {"n": 1}), (threading.get_ident(), ("half",), {})]
    seen.clear()
    with pytest.raises(gw.LLMCallAbandoned, match="did not answer within 0.2s"):
        gw._answer_within(stalls, {"params": {"on_progress": on_progress}}, 0.2)
    release.set()
    assert late_sent.wait(10) and seen == []


def test_a_model_call_without_a_thread_to_be_had_is_made_on_the_step_s_own(monkeypatch):
    """Under a process or address-space limit a thread may not start: the call is made anyway, on the
    waiting step's thread (without the deadline), not failed."""
    import threading

    real_start = threading.Thread.start

    def refused(self):
        if self.name == "llm-call":
            raise RuntimeError("can't start new thread")
        return real_start(self)

    monkeypatch.setattr(threading.Thread, "start", refused)
    seen = []
    on_progress = lambda *args, **kwargs: seen.append((threading.get_ident(), args))  # noqa: E731

    def answers(**kwargs):
        kwargs["params"]["on_progress"]("started")
        return {"content": "ok", "thread": threading.get_ident()}

    answer = gw._answer_within(answers, {"params": {"on_progress": on_progress}}, 5)
    assert answer == {"content": "ok", "thread": threading.get_ident()}
    assert seen == [(threading.get_ident(), ("started",))]


def test_a_stop_leaves_steps_waiting_on_a_model_for_its_answer_or_its_slot(data_dir, fake_llm):
    """With one model slot and a model that takes long, one step waits for the answer and another for the
    slot: a stop leaves both behind after its bound, instead of waiting for the model."""
    fake_llm.delay_s = 5.0
    server = _openai_gateway(data_dir, llm_concurrency="1")
    try:
        for _ in range(2):
            _start(server, "basic-llm-test")
        fake_llm.wait_for_call(1)
        wait_for(lambda: server.gateway.llm.waiting == 2)
        assert server.runner.stop(timeout=0.2) == 2
        assert fake_llm.calls == 1 and fake_llm.in_flight == 1  # stopped while the model still worked
    finally:
        server.runner = None  # stopped already
        server.close()


def test_a_schema_pin_reaches_the_model_call_of_a_node_that_pins_no_model(llm_server, fake_llm):
    """basic-llm-test's LLM node names no provider or model (it runs on the gateway's default) and takes
    its structured-output schema from a start pin: the call carries it, as on the original."""
    schema = {"type": "object", "properties": {"answer_field_xyz": {"type": "string"}}}
    status, _, data = llm_server.post(f"{API}/runs/start", {"bundle_id": "basic-llm-test",
                                                           "input_data": {"prompt": "hi", "resp_schema": schema}})
    assert status == 200, data
    run = _wait_status(llm_server, data["run_id"], "completed", "failed")
    assert run["status"] == "completed"
    records = _ledger(llm_server, data["run_id"])
    started = next(r for r in records if r["effect"] and r["effect"]["type"] == "llm_call")
    payload = started["effect"]["payload"]
    assert payload["response_schema"] == schema and payload["response_schema_name"] == "LLM_StructuredOutput"
    assert "provider" not in payload and "model" not in payload  # the default is the gateway's, at call time
    assert "answer_field_xyz" in json.dumps(fake_llm.requests[-1])
    state = llm_server.gateway.stores.runs.load(data["run_id"])
    assert gw._NO_LLM_PINNED not in json.dumps([run, records, state.vars])


def test_a_model_that_does_not_answer_in_time_fails_the_run_saying_why(data_dir, fake_llm):
    fake_llm.delay_s = 30.0
    server = _openai_gateway(data_dir, llm_timeout_s="1", llm_attempts="1")  # (retries: tested below)
    try:
        data = _wait_status(server, _start(server, "basic-llm-test"), "failed", "completed")
        assert data["status"] == "failed" and "did not answer within 1s" in data["error"], data
        assert "ABSTRACTGATEWAY_LLM_TIMEOUT_S" in data["error"]
    finally:
        server.close()


def test_a_model_call_in_flight_shows_its_started_record_and_node(llm_server, fake_llm):
    """As on the original, a client sees which call a run is waiting on (a local model may take minutes)."""
    fake_llm.delay_s = 2.0
    run_id = _start(llm_server, "basic-llm-test")
    fake_llm.wait_for_call(1)
    calls = [r for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert [r["status"] for r in calls] == ["started"]
    run = _run(llm_server, run_id)
    assert run["status"] == "running" and run["current_node"] == calls[0]["node_id"]
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"
    calls = [r["status"] for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert calls == ["started", "completed"]  # once each


def test_a_storage_error_while_showing_a_call_is_not_the_call_s_failure(llm_server, fake_llm, monkeypatch):
    """Showing the call is a commit inside the runtime's effect handler: raised from there, a busy
    database (another writer past the busy timeout) failed the call and with it the run."""
    db = llm_server.gateway.stores.db
    write, refused = db.write, []

    def busy_once(fn, *args, **kwargs):
        if not refused and fn.__qualname__.startswith("Gateway._publish_before_call"):
            refused.append(fn)
            raise gw.DatabaseBusy("The database is busy (another writer holds it); retry shortly.")
        return write(fn, *args, **kwargs)

    monkeypatch.setattr(db, "write", busy_once)
    run_id = _start(llm_server, "basic-llm-test")
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed" and refused
    calls = [r["status"] for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert calls == ["started", "completed"]  # committed with the step instead


def test_a_runner_that_finds_its_lease_lost_before_a_call_does_not_make_it(llm_server, fake_llm, monkeypatch):
    """Another runner holds the run now: the call (a model's cost, or a local tool's side effect) is its."""
    db = llm_server.gateway.stores.db
    write, lost = db.write, []

    def lease_lost_once(fn, *args, **kwargs):
        if not lost and fn.__qualname__.startswith("Gateway._publish_before_call"):
            lost.append(fn)  # another runner took the lease over (for half a second; then this one again)
            write(lambda conn: conn.execute("UPDATE leases SET owner = 'other', epoch = epoch + 1, expires_at = ?",
                                            (time.time() + 0.5,)))
        return write(fn, *args, **kwargs)

    monkeypatch.setattr(db, "write", lease_lost_once)
    run_id = _start(llm_server, "basic-llm-test")
    final = _wait_status(llm_server, run_id, "completed", "failed")
    assert final["status"] == "completed" and lost, (final.get("error"), [
        (r["node_id"], r["status"], r.get("error")) for r in _ledger(llm_server, run_id)])
    assert fake_llm.calls == 1  # only by the runner that held the lease (here, this one again)
    calls = [r["status"] for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert calls == ["started", "completed"]


def test_pause_during_a_slow_call_then_resume_reuses_the_recorded_answer(llm_server, fake_llm):
    fake_llm.delay_s = 2.0
    run_id = _start(llm_server, "basic-llm-test")
    fake_llm.wait_for_call(1)
    assert _outcome(llm_server, _command(llm_server, run_id, "pause"))["status"] == "applied"
    wait_for(lambda: _llm_calls(_ledger(llm_server, run_id)), 10)
    assert _run(llm_server, run_id)["paused"] is True
    fake_llm.delay_s = 0
    assert _outcome(llm_server, _command(llm_server, run_id, "resume"))["status"] == "applied"
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"
    assert fake_llm.calls == 1  # the runtime's idempotency reused the answer recorded during the pause
    calls = [r["status"] for r in _ledger(llm_server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
    assert calls == ["started", "completed"]  # the call's started record too (clients pair them), once


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("stop_signal", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_a_stop_during_a_slow_call_then_restart_asks_again_without_duplicate_records(data_dir, fake_llm,
                                                                                     stop_signal):
    """kill -9, or a clean stop that does not wait for a model that does not answer (it exits 0 once
    its stop bound passes, leaving the step uncommitted): either way the step runs again after restart."""
    fake_llm.delay_s = 60.0
    port = _free_port()
    proc = spawn_gateway(["serve"], env=_serve_env(data_dir, port), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        config = make_config(data_dir)
        wait_for(lambda: _port_open(port), 60)
        run_id = _post_start(port)
        fake_llm.wait_for_call(1, timeout=60)
    finally:
        proc.send_signal(stop_signal)
        code = proc.wait(30)
    assert code == (0 if stop_signal == signal.SIGTERM else -signal.SIGKILL)
    fake_llm.delay_s = 0
    stores = gw.open_stores(config)
    try:
        assert stores.runs.load(run_id).status.value == "running"
        calls = [r for r in stores.ledger.list(run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
        assert [r["status"] for r in calls] == ["started"]  # shown while it ran: run again, it is not repeated
    finally:
        stores.close()
    server = _openai_gateway(data_dir)
    try:
        assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        assert fake_llm.calls == 2  # the step ran again: the model was asked once more
        records = _ledger(server, run_id)
        keys = [(r["idempotency_key"], r["status"]) for r in records]
        assert len(keys) == len(set(keys)), keys  # no record written twice
        assert len(_llm_calls(records)) == 1
    finally:
        server.close()


def _serve_env(data_dir, port):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(data_dir), ABSTRACTGATEWAY_FLOWS_DIR=str(FIXTURE_BUNDLES),
               ABSTRACTGATEWAY_AUTH_TOKEN=LiveServer.TOKEN, ABSTRACTGATEWAY_PORT=str(port),
               ABSTRACTGATEWAY_PROVIDER="openai", ABSTRACTGATEWAY_MODEL="gpt-5-mini",
               ABSTRACTGATEWAY_RUNNER_LEASE_TTL_S="2")  # the restarted runner waits this long for the dead one's lease
    return env


def _llm_attempts(records):
    return [(r["status"], r["attempt"]) for r in records if (r.get("effect") or {}).get("type") == "llm_call"]


# The provider client (abstractcore) sends a request the model server refuses once more itself: each
# attempt the gateway records is two refused requests.
REFUSALS_PER_ATTEMPT = 2


def test_a_failing_model_call_is_made_again_after_1_then_2_s_each_attempt_recorded(data_dir, fake_llm):
    """As on the original (a model server restarting, a local model loading): three attempts."""
    fake_llm.fail_next = 2 * REFUSALS_PER_ATTEMPT
    server = _openai_gateway(data_dir)
    try:
        run_id = _start(server, "basic-llm-test")
        assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        records = [r for r in _ledger(server, run_id) if (r.get("effect") or {}).get("type") == "llm_call"]
        assert _llm_attempts(records) == [("started", 1), ("failed", 1), ("started", 2), ("failed", 2),
                                          ("started", 3), ("completed", 3)]
        at = [datetime.fromisoformat(r["ended_at" if r["status"] == "failed" else "started_at"]) for r in records]
        assert (at[2] - at[1]).total_seconds() >= 1.0 and (at[4] - at[3]).total_seconds() >= 2.0
    finally:
        server.close()


def test_one_attempt_per_model_call_fails_the_run_at_the_first_error(data_dir, fake_llm):
    fake_llm.fail_next = REFUSALS_PER_ATTEMPT
    server = _openai_gateway(data_dir, llm_attempts="1")
    try:
        run_id = _start(server, "basic-llm-test")
        data = _wait_status(server, run_id, "failed", "completed")
        assert data["status"] == "failed" and "after 1 attempts" in data["error"], data
        assert _llm_attempts(_ledger(server, run_id)) == [("started", 1), ("failed", 1)]
    finally:
        server.close()


@pytest.mark.slow
def test_a_kill_during_a_second_attempt_then_restart_writes_no_attempt_twice(data_dir, fake_llm):
    """The first attempt's records and the second's `started` were shown before the kill; the step runs
    again from its first attempt, and none of those records is written again."""
    fake_llm.fail_next, fake_llm.delay_s = REFUSALS_PER_ATTEMPT, 60.0  # the first attempt fails, the second hangs
    port = _free_port()
    proc = spawn_gateway(["serve"], env=_serve_env(data_dir, port), stdout=subprocess.DEVNULL,
                         stderr=subprocess.DEVNULL)
    try:
        wait_for(lambda: _port_open(port), 60)
        run_id = _post_start(port)
        fake_llm.wait_for_call(REFUSALS_PER_ATTEMPT + 1, timeout=60)
        stores = gw.open_stores(make_config(data_dir))
        try:
            shown = wait_for(lambda: len(a := _llm_attempts(stores.ledger.list(run_id))) == 3 and a, 10)
        finally:
            stores.close()
        assert shown == [("started", 1), ("failed", 1), ("started", 2)]
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    fake_llm.delay_s = 0
    server = _openai_gateway(data_dir)
    try:
        assert _wait_status(server, run_id, "completed", "failed")["status"] == "completed"
        records = _ledger(server, run_id)
        attempts = [(r["idempotency_key"], r["status"], r.get("attempt")) for r in records]
        assert len(attempts) == len(set(attempts)), attempts  # no record written twice
        assert _llm_attempts(records) == [("started", 1), ("failed", 1), ("started", 2), ("completed", 1)]
    finally:
        server.close()


def _port_open(port):
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def _post_start(port):
    import http.client
    import json

    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("POST", f"{API}/runs/start", body=json.dumps({"bundle_id": "basic-llm-test",
                                                               "input_data": {"prompt": "hi"}}),
                 headers={"Authorization": f"Bearer {LiveServer.TOKEN}", "Content-Type": "application/json"})
    resp = conn.getresponse()
    data = json.loads(resp.read())
    assert resp.status == 200, data
    return data["run_id"]


# -- discovery and observer routes ---------------------------------------------------------------------


def test_discovery_routes(llm_server, monkeypatch):
    status, _, data = llm_server.get(f"{API}/discovery/providers")
    assert status == 200 and "openai" in {p["name"] for p in data["items"]}
    assert "openai" in data["configured"] and "lmstudio" in data["configured"]
    assert data["default_provider"] and data["default_model"]
    status, _, data = llm_server.get(f"{API}/discovery/providers/lmstudio/models")
    assert status == 200 and set(MODELS) <= set(data["models"]), data  # what the fake server lists
    assert "gpt-5-mini" in llm_server.get(f"{API}/discovery/providers/openai/models")[2]["models"]
    assert "gpt-5-mini" in llm_server.get(f"{API}/discovery/providers/OpenAI/models")[2]["models"]  # any case
    status, _, data = llm_server.get(f"{API}/discovery/providers/no-such-provider/models")
    assert status == 200 and data["models"] == [] and "not known" in data["error"]  # as the original: no models
    monkeypatch.setenv("LMSTUDIO_BASE_URL", "http://127.0.0.1:9/v1")  # a provider that does not answer
    status, _, data = llm_server.get(f"{API}/discovery/providers/lmstudio/models", timeout=60)
    assert status == 200 and data["models"] == [] and data["error"], data
    status, _, data = llm_server.get(f"{API}/discovery/tools")
    assert status == 200 and "execute_command" in {t["name"] for t in data["items"]}
    assert data["tool_mode"] == "passthrough"
    status, _, data = llm_server.get(f"{API}/discovery/capabilities")
    caps = data["capabilities"]
    assert status == 200 and caps["llm"]["installed"] is True and caps["agents"]["installed"] is True
    assert caps["vision"] == {"installed": False, "package": "abstractvision",
                              "install_hint": "pip install abstractvision"}


def test_observer_summary_and_chat(llm_server, fake_llm):
    run_id = _start(llm_server, "basic-llm-test")
    _wait_status(llm_server, run_id, "completed")
    before = len(wait_for(lambda: (items := _ledger(llm_server, run_id))[-1]["idempotency_key"].startswith(
        "system:terminal_status") and items))  # the run's last record is written
    status, _, data = llm_server.post(f"{API}/runs/{run_id}/summary", {})
    assert status == 200 and data["summary"].startswith("Hello from the fake model") and data["provider"]
    records = _ledger(llm_server, run_id)
    assert len(records) == before + 1
    event = records[-1]["effect"]["payload"]
    assert event["name"] == "abstract.summary" and event["payload"]["text"] == data["summary"]
    assert run_id in fake_llm.requests[-1]["messages"][-1]["content"]  # grounded on the run's digest
    question = {"messages": [{"role": "user", "content": "What did the run answer?"}]}
    status, _, data = llm_server.post(f"{API}/runs/{run_id}/chat", question)
    assert status == 200 and "What did the run answer?" in data["answer"]
    assert len(_ledger(llm_server, run_id)) == before + 1  # read-only unless persisted
    status, _, data = llm_server.post(f"{API}/runs/{run_id}/chat", dict(question, persist=True))
    records = _ledger(llm_server, run_id)
    assert status == 200 and records[-1]["effect"]["payload"]["name"] == "abstract.chat"
    assert records[-1]["effect"]["payload"]["payload"]["question"] == "What did the run answer?"
    assert _run(llm_server, run_id)["status"] == "completed"
    # read as the original reads a chat: roles in any case, a history that ends with the answer, other
    # roles and non-text contents dropped, no messages at all: a question about the run itself
    for messages in ([{"role": " User ", "content": "q"}], [{"role": "user", "content": "a"},
                                                            {"role": "assistant", "content": "b"}],
                     [], [{"role": "bogus", "content": "a"}, {"role": "user", "content": 5}]):
        status, _, data = llm_server.post(f"{API}/runs/{run_id}/chat", {"messages": messages})
        assert status == 200 and data["answer"], messages
        sent = [m for m in fake_llm.requests[-1]["messages"] if m["role"] != "system"]
        kept = [m for m in messages
                if m["role"].strip().lower() in ("user", "assistant") and isinstance(m["content"], str)]
        assert "RUN_CONTEXT:" in sent[0]["content"] and len(sent) == 1 + len(kept)
        assert all(s["role"] == m["role"].strip().lower() and s["content"].endswith(m["content"])  # (+ metadata)
                   for s, m in zip(sent[1:], kept, strict=True))
    status, _, error = llm_server.post(f"{API}/runs/{run_id}/chat", {"messages": [{"role": "user", "content": "q"},
                                                                                  "junk"]})
    assert status == 422 and error["code"] == "validation_error"
    status, _, error = llm_server.post(f"{API}/runs/nope/summary", {})
    assert status == 404 and error["code"] == "run_not_found"
    fake_llm.fail_status = 500  # the model server fails: a clear 502, not a 500
    status, _, error = llm_server.post(f"{API}/runs/{run_id}/summary", {}, timeout=120)
    assert status == 502 and error["code"] == "llm_failed", error


def test_doctor_lists_configured_providers_and_never_prints_a_key(tmp_path, fake_llm):
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(tmp_path / "data"), OPENAI_API_KEY="sk-very-secret-value-123",
               HOME=str(tmp_path))
    out = run_gateway(["doctor"], env=env, capture_output=True, text=True, timeout=120)
    text = out.stdout + out.stderr
    assert "sk-very-secret-value-123" not in text
    lines = {line.split()[0]: line for line in out.stdout.splitlines() if line.startswith("  ") and " via " in line}
    assert "answers" in lines["openai"] and "OPENAI_API_KEY" in lines["openai"], out.stdout
    assert "answers" in lines["lmstudio"], out.stdout


def _scheduled_run_with_a_long_context(server):
    """A schedule of basic-followup whose first execution waits for the user, its context grown to 20
    messages (worth compacting); (the scheduled run, that execution)."""
    status, _, data = server.post(f"{API}/runs/schedule", {"bundle_id": "basic-followup", "flow_id": "a8f5b5f8",
                                                           "input_data": {"prompt": "Say hi"}, "interval": "1h"})
    assert status == 200, data
    root = data["run_id"]
    runs = server.gateway.stores.runs
    child = wait_for(lambda: (c := runs.list_children(parent_run_id=root)) and c[0].run_id, 60)
    wait_for(lambda: (d := _run(server, child))["waiting"] and d["waiting"]["reason"] == "user", 60)
    with server.gateway.runs_locked([child]):
        state = runs.load(child)
        state.vars["context"] = {"messages": [{"role": "user", "content": f"m{i}"} for i in range(20)]}
        runs.save(state)
    return root, child


def test_compact_memory_summarises_with_the_default_model(llm_server, fake_llm):
    root, child = _scheduled_run_with_a_long_context(llm_server)
    gateway = llm_server.gateway
    calls = fake_llm.calls
    cid = _command(llm_server, root, "compact_memory", {"preserve_recent": 2})
    assert _outcome(llm_server, cid)["status"] == "applied"
    assert fake_llm.calls > calls  # the summary came from the model
    compacted = gateway.stores.runs.load(child).vars
    assert len(compacted["context"]["messages"]) < 20
    assert "SUMMARY" in compacted["context"]["messages"][0]["content"]
    assert gateway.stores.runs.load(root).vars["_runtime"]["last_compact_memory"]["target_run_id"] == child
    # what an observer of that run sees: the compaction in its ledger, as on the original
    records = [r for r in _ledger(llm_server, child) if r["node_id"] == "compact_memory"]
    assert [(r["status"], r["effect"]["type"]) for r in records] == [("started", "memory_compact"),
                                                                      ("completed", "memory_compact")]


def test_a_slow_compaction_blocks_no_writer(llm_server, fake_llm):
    """The model call of compact_memory runs outside any transaction: other writes go through meanwhile."""
    root, _ = _scheduled_run_with_a_long_context(llm_server)
    gateway = llm_server.gateway
    fake_llm.delay_s = 3.0
    try:
        calls = fake_llm.calls
        cid = _command(llm_server, root, "compact_memory", {"preserve_recent": 2})
        wait_for(lambda: fake_llm.in_flight > 0, 30)  # the model is being asked
        other = _start(llm_server, "basic-followup")  # a write while the model call is in flight
        assert gateway.stores.runs.status_of(other) and gateway.command_status(cid)["status"] == "pending"
        assert _outcome(llm_server, cid)["status"] == "applied" and fake_llm.calls > calls
    finally:
        fake_llm.delay_s = 0.0


def test_attachments_sent_beside_the_inputs_reach_the_model(llm_server):
    """Clients put a session's attachments in `input_data.attachments`; agents read `context.attachments`."""
    from conftest import multipart

    body, content_type = multipart({"session_id": "s1"}, {"file": ("note.txt", b"hello")})
    status, _, uploaded = llm_server.request("POST", f"{API}/attachments/upload", raw=body,
                                             headers={"Content-Type": content_type})
    assert status == 200, uploaded
    attachment = uploaded["attachment"]
    status, _, data = llm_server.post(f"{API}/runs/start", {
        "bundle_id": "basic-agent", "session_id": "s1",
        "input_data": {"prompt": "describe the file", "attachments": [attachment, attachment]}})
    assert status == 200, data
    run_id = data["run_id"]
    assert _wait_status(llm_server, run_id, "completed", "failed")["status"] == "completed"
    inputs = llm_server.get(f"{API}/runs/{run_id}/input_data")[2]["input_data"]
    assert inputs["context"]["attachments"] == [attachment]  # once, where the runtime reads it
    calls = [r for r in _tree_ledger(llm_server, run_id) if (r["effect"] or {}).get("type") == "llm_call"]
    assert calls and all(c["effect"]["payload"].get("media") == [attachment] for c in calls)
