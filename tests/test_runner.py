"""Workflow host and runner: bundles, run start, durable commands, waits, subflows, restarts."""

from __future__ import annotations

import json
import shutil
import signal
import threading
import time
from pathlib import Path

import pytest

import abstractgateway as gw
from conftest import FIXTURE_BUNDLES, FLOWS, make_config, make_gateway, pack_bundle, wait_for
from processes import run_python


def _status(gateway, run_id):
    return gateway.stores.runs.load(run_id).status.value


def _ledger_types(gateway, run_id):
    return [((r.get("effect") or {}).get("type"), r["status"]) for r in gateway.stores.ledger.list(run_id)]


def _outcome(gateway, command_id, timeout=10.0):
    return wait_for(lambda: gateway.stores.outcomes.get(command_id), timeout)


def test_echo_bundle_runs_to_completion(gateway, runner):
    run_id = gateway.start_run(bundle_id="echo", input_data={"message": "hi"})
    assert _status(gateway, run_id) in ("running", "completed")  # durable before start_run returned
    wait_for(lambda: _status(gateway, run_id) == "completed")
    state = gateway.stores.runs.load(run_id)
    assert state.output["result"] == "hi"
    assert state.session_id == run_id and state.actor_id == "gateway"
    assert Path(state.vars["workspace_root"]).parent == Path(gateway.config.data_dir) / "workspaces"
    ledger = gateway.stores.ledger.list(run_id)
    assert any((r.get("result") or {}).get("completed") is True for r in ledger)
    assert ledger[-1]["effect"]["payload"]["name"] == "abstract.status"


def test_ask_user_resume_with_payload_and_wrong_wait_key(gateway, runner):
    run_id = gateway.start_run(bundle_id="ask")
    state = wait_for(lambda: (s := gateway.stores.runs.load(run_id)).status.value == "waiting" and s)
    assert state.waiting.reason.value == "user" and state.waiting.prompt == "Your name?"

    gateway.submit_command(command_id="wrong", run_id=run_id, type="resume",
                           payload={"wait_key": "not-the-key", "payload": {"response": "x"}})
    outcome = _outcome(gateway, "wrong")
    assert outcome["status"] == "failed" and "wait_key mismatch" in outcome["error"]
    assert gateway.command_status("wrong")["status"] == "failed"
    assert _status(gateway, run_id) == "waiting"

    gateway.submit_command(command_id="right", run_id=run_id, type="resume",
                           payload={"wait_key": state.waiting.wait_key, "payload": {"response": "Ada"}})
    assert _outcome(gateway, "right")["status"] == "applied"
    wait_for(lambda: _status(gateway, run_id) == "completed")
    assert gateway.stores.runs.load(run_id).output["answer"] == "Ada"


def test_an_answer_naming_a_tool_call_the_wait_does_not_have_is_refused(gateway, runner):
    """An agent reuses its wait key for its next tool step: results (`runtime_call_id`) and bare approvals
    or denials (`runtime_call_ids`) that name another step's call are refused, not applied to this wait."""
    run_id = gateway.start_run(bundle_id="ask")
    wait_for(lambda: _status(gateway, run_id) == "waiting")
    with gateway.runs_locked([run_id]):  # the wait the runtime's passthrough tool executor writes
        run = gateway.stores.runs.load(run_id)
        run.waiting.details = {"mode": "approval_required", "tool_calls": [
            {"name": "execute_command", "arguments": {}, "call_id": "call_1", "runtime_call_id": "rtcall_2"}]}
        gateway.stores.runs.save(run)
    key = run.waiting.wait_key
    stale = [{"approved": False, "runtime_call_ids": ["rtcall_1"]},
             {"mode": "executed", "results": [{"call_id": "call_1", "runtime_call_id": "rtcall_1", "output": "x"}]}]
    for n, answer in enumerate(stale):
        gateway.submit_command(command_id=f"stale-{n}", run_id=run_id, type="resume",
                               payload={"wait_key": key, "payload": answer})
        outcome = _outcome(gateway, f"stale-{n}")
        assert outcome["status"] == "failed" and "no pending tool call 'rtcall_1'" in outcome["error"]
    assert _status(gateway, run_id) == "waiting"
    gateway.submit_command(command_id="current", run_id=run_id, type="resume",
                           payload={"wait_key": key, "payload": {"approved": False, "runtime_call_ids": ["rtcall_2"]}})
    assert _outcome(gateway, "current")["status"] == "applied"


def test_bad_commands_are_recorded_not_swallowed(gateway, runner):
    gateway.submit_command(command_id="ghost", run_id="no-such-run", type="pause")
    assert "not found" in _outcome(gateway, "ghost")["error"]
    run_id = gateway.start_run(bundle_id="ask")
    wait_for(lambda: _status(gateway, run_id) == "waiting")
    gateway.submit_command(command_id="badpayload", run_id=run_id, type="resume", payload={"payload": "text"})
    assert "must be an object" in _outcome(gateway, "badpayload")["error"]
    gateway.submit_command(command_id="noname", run_id=run_id, type="emit_event", payload={})
    assert "payload.name" in _outcome(gateway, "noname")["error"]
    with pytest.raises(gw.GatewayError, match="type must be one of"):
        gateway.submit_command(command_id="x", run_id=run_id, type="explode")
    assert [o["command_id"] for o in gateway.stores.outcomes.for_run(run_id)] == ["noname", "badpayload"]


def test_a_run_gets_its_own_workspace_path_but_no_directory_until_its_tools_need_one(gateway, runner):
    """Made eagerly, an empty directory per run piled up forever (an inode each), and a start failed
    with a 500 where it could not be made (a full disk, a directory owned by another user)."""
    (Path(gateway.config.data_dir) / "workspaces").write_text("in the way")  # not even makeable
    run_id = gateway.start_run(bundle_id="echo")
    wait_for(lambda: _status(gateway, run_id) == "completed")
    root = Path(gateway.stores.runs.load(run_id).vars["workspace_root"])
    assert root.parent == Path(gateway.config.data_dir) / "workspaces" and not root.exists()


def test_duplicate_command_id_is_applied_once(gateway, runner):
    run_id = gateway.start_run(bundle_id="ask")
    state = wait_for(lambda: (s := gateway.stores.runs.load(run_id)).status.value == "waiting" and s)
    body = {"wait_key": state.waiting.wait_key, "payload": {"response": "once"}}
    first = gateway.submit_command(command_id="dup", run_id=run_id, type="resume", payload=body)
    second = gateway.submit_command(command_id="dup", run_id=run_id, type="resume", payload=body)
    assert (second.accepted, second.duplicate, second.seq) == (False, True, first.seq)
    wait_for(lambda: _status(gateway, run_id) == "completed")
    time.sleep(0.2)
    assert _ledger_types(gateway, run_id).count(("resume", "completed")) == 1


def test_pause_and_resume(gateway, runner):
    run_id = gateway.start_run(bundle_id="wait-key")
    wait_for(lambda: _status(gateway, run_id) == "waiting")
    gateway.submit_command(command_id="p", run_id=run_id, type="pause", payload={"reason": "lunch"})
    _outcome(gateway, "p")
    assert gw._is_paused(gateway.stores.runs.load(run_id))
    # a paused run is not resumed by a payload
    gateway.submit_command(command_id="r1", run_id=run_id, type="resume", payload={"payload": {"v": 1}})
    assert "paused" in _outcome(gateway, "r1")["error"]
    gateway.submit_command(command_id="u", run_id=run_id, type="resume")
    _outcome(gateway, "u")
    assert not gw._is_paused(gateway.stores.runs.load(run_id))
    gateway.submit_command(command_id="r2", run_id=run_id, type="resume",
                           payload={"wait_key": "my-key", "payload": {"value": 7}})
    wait_for(lambda: _status(gateway, run_id) == "completed")
    assert gateway.stores.runs.load(run_id).output["data"] == {"value": 7}


def test_emit_event_reaches_every_waiting_run_of_the_session(gateway, runner):
    a = gateway.start_run(bundle_id="event", session_id="s1")
    b = gateway.start_run(bundle_id="event", session_id="s1")
    c = gateway.start_run(bundle_id="event", session_id="s2")
    for rid in (a, b, c):
        wait_for(lambda rid=rid: _status(gateway, rid) == "waiting")
    gateway.submit_command(command_id="e1", run_id="s1", type="emit_event",
                           payload={"name": "approve", "payload": {"ok": True}})
    assert _outcome(gateway, "e1")["status"] == "applied"
    for rid in (a, b):
        wait_for(lambda rid=rid: _status(gateway, rid) == "completed")
        assert gateway.stores.runs.load(rid).output["payload"] == {"ok": True}
    assert _status(gateway, c) == "waiting"


def _parent_of_ask(tmp_path: Path) -> Path:
    """A parent flow whose subflow waits for a user answer (so the tree stays alive)."""
    src = tmp_path / "flows_src"
    src.mkdir(exist_ok=True)
    parent = json.loads((FLOWS / "parent.json").read_text())
    parent["id"] = "asker"
    for node in parent["nodes"]:
        if node["type"] == "subflow":
            node["data"]["subflowId"] = "ask"
    (src / "asker.json").write_text(json.dumps(parent))
    shutil.copy(FLOWS / "ask.json", src / "ask.json")
    return src


def test_subflow_completes_parent(gateway, runner):
    run_id = gateway.start_run(bundle_id="parent", input_data={"text": "ab"})
    wait_for(lambda: _status(gateway, run_id) == "completed")
    assert gateway.stores.runs.load(run_id).output["child_out"] == "ab ab"
    assert len(gateway.stores.runs.list_children(parent_run_id=run_id)) == 1


def test_a_flow_that_starts_itself_stops_at_the_subflow_depth_limit(gateway, runner):
    """`parent` rewired to start itself as its subflow: one start would nest child runs without end.
    The run `MAX_SUBFLOW_DEPTH` deep fails saying why, and no run is started past it."""
    import io
    import zipfile

    loop = json.loads((FLOWS / "parent.json").read_text())
    loop["id"] = "loop"
    for node in loop["nodes"]:
        if node["type"] == "subflow":
            node["data"]["subflowId"] = "loop"
    manifest = {"bundle_format_version": "1", "bundle_id": "selfrec", "bundle_version": "1.0.0",
                "created_at": "2026-01-01T00:00:00Z", "entrypoints": [{"flow_id": "loop", "name": "loop"}],
                "default_entrypoint": "loop", "flows": {"loop": "flows/loop.json"}}
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as archive:
        archive.writestr("manifest.json", json.dumps(manifest))
        archive.writestr("flows/loop.json", json.dumps(loop))
    gateway.host.install(buf.getvalue())
    gateway.host.reload()
    root = gateway.start_run(bundle_id="selfrec")
    wait_for(lambda: _status(gateway, root) in ("completed", "failed"), timeout=30)
    runs = gateway.stores.runs.list_runs(limit=1000)
    assert len(runs) == gw.MAX_SUBFLOW_DEPTH
    deepest = [r for r in runs if r.status.value == "failed"]
    assert len(deepest) == 1 and "does a flow start itself" in deepest[0].error


def test_a_child_run_and_its_parent_go_on_without_waiting_for_a_poll(data_dir):
    """A tick that starts a child submits it, and the child's last tick submits its resumed parent: with a
    poll interval far longer than the wait, the tree still completes (nothing waits to be found by a scan)."""
    g = make_gateway(data_dir, poll_s="60")
    r = gw.Runner(g).start()
    try:
        run_id = g.start_run(bundle_id="parent", input_data={"text": "ab"})
        wait_for(lambda: _status(g, run_id) == "completed", timeout=20)
        assert g.stores.runs.load(run_id).output["child_out"] == "ab ab"
    finally:
        r.stop()
        g.close()


def test_cancel_cancels_the_whole_tree(data_dir, tmp_path):
    pack_bundle(data_dir / "flows", "asker", flows_dir=_parent_of_ask(tmp_path))
    g = make_gateway(data_dir)
    r = gw.Runner(g).start()
    try:
        run_id = g.start_run(bundle_id="asker")
        child = wait_for(lambda: g.stores.runs.list_children(parent_run_id=run_id))[0]
        wait_for(lambda: _status(g, child.run_id) == "waiting")
        g.submit_command(command_id="c", run_id=run_id, type="cancel", payload={"reason": "stop"})
        _outcome(g, "c")
        assert _status(g, run_id) == "cancelled" and _status(g, child.run_id) == "cancelled"
        assert g.stores.runs.load(run_id).error == "stop"
    finally:
        r.stop()
        g.close()


def test_missing_workflow_fails_the_run_with_a_clear_error(gateway, runner):
    spec = gateway.host.get("echo@1.0.0:echo")
    from abstractruntime import WorkflowSpec

    orphan = WorkflowSpec(workflow_id="gone@1.0.0:main", entry_node=spec.entry_node, nodes=spec.nodes)
    run_id = gateway.runtime.start(workflow=orphan, actor_id="gateway")
    gateway.wake_runner()
    wait_for(lambda: _status(gateway, run_id) == "failed")
    state = gateway.stores.runs.load(run_id)
    assert "not loaded" in state.error
    assert gateway.stores.ledger.list(run_id)[-1]["status"] == "failed"


def test_a_tick_that_raises_fails_the_run(gateway, runner, monkeypatch):
    def boom(**kwargs):
        raise RuntimeError("node exploded")

    monkeypatch.setattr(gateway.runtime, "tick", boom)
    run_id = gateway.start_run(bundle_id="echo")
    wait_for(lambda: _status(gateway, run_id) == "failed")
    assert gateway.stores.runs.load(run_id).error == "RuntimeError: node exploded"
    assert gateway.stores.ledger.list(run_id)[-1]["idempotency_key"] == f"system:tick_exception:{run_id}"


def test_timer_loop_and_restart_mid_run(data_dir):
    g = make_gateway(data_dir)
    r = gw.Runner(g).start()
    run_id = g.start_run(bundle_id="timer-loop", input_data={"n": 3, "delay": 0.4})
    wait_for(lambda: (s := g.stores.runs.load(run_id)).waiting is not None and s.waiting.reason.value == "until")
    r.stop()
    g.close()
    assert _status_in(data_dir, run_id) == "waiting"
    g = make_gateway(data_dir)  # restart: nothing in memory survives
    r = gw.Runner(g).start()
    try:
        wait_for(lambda: _status(g, run_id) == "completed", timeout=15)
        assert g.stores.runs.load(run_id).output["iterations"] == 3
    finally:
        r.stop()
        g.close()


def test_a_wait_until_a_time_fires_at_the_instant_it_names_whatever_its_offset(data_dir):
    """The runtime and the run index compare wait times as text: a wait is stored as its UTC instant."""
    from datetime import datetime, timedelta, timezone

    pack_bundle(data_dir / "flows", "wait_until_time")
    g = make_gateway(data_dir)
    r = gw.Runner(g).start()
    try:
        now = datetime.now(timezone.utc)
        past_east = (now - timedelta(hours=1)).astimezone(timezone(timedelta(hours=5))).isoformat()
        future_west = (now + timedelta(hours=1)).astimezone(timezone(timedelta(hours=-5))).isoformat()
        soon = now + timedelta(seconds=0.6)
        past = g.start_run(bundle_id="wait-until-time", input_data={"at": past_east})
        future = g.start_run(bundle_id="wait-until-time", input_data={"at": future_west})
        zulu = g.start_run(bundle_id="wait-until-time", input_data={"at": soon.isoformat().replace("+00:00", "Z")})
        wait_for(lambda: _status(g, past) == "completed")  # it was due an hour ago (its text sorts later)
        state = wait_for(lambda: (s := g.stores.runs.load(future)).waiting is not None and s)
        assert state.waiting.until == (now + timedelta(hours=1)).isoformat()  # not fired 5 h early
        wait_for(lambda: _status(g, zulu) == "completed")
        assert datetime.now(timezone.utc) >= soon
        assert _status(g, future) == "waiting"
    finally:
        r.stop()
        g.close()


def test_a_parent_goes_on_as_soon_as_its_child_alone_is_cancelled(gateway, runner, monkeypatch):
    """It used to wait for the runner's periodic repair of such parents (every 5 s)."""
    monkeypatch.setattr(gateway, "repair_subworkflow_parents", lambda *a, **kw: 0)  # only the command may do it
    pack_bundle(gateway.config.flows_dir, "parent_of_ask")
    gateway.host.reload()
    run_id = gateway.start_run(bundle_id="parent-of-ask")
    child = wait_for(lambda: next((c for c in gateway.stores.runs.list_children(parent_run_id=run_id)
                                   if c.status.value == "waiting"), None))
    gateway.submit_command(command_id="cancel-child", run_id=child.run_id, type="cancel")
    assert _outcome(gateway, "cancel-child")["status"] == "applied"
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=3)
    assert _status(gateway, child.run_id) == "cancelled"


def test_a_paused_run_whose_wait_falls_due_is_left_alone_until_resumed(gateway, runner, monkeypatch):
    """Its due timer used to resubmit it at once after each tick found it paused: thousands a second."""
    from datetime import datetime, timedelta, timezone

    pack_bundle(gateway.config.flows_dir, "wait_until_time")
    gateway.host.reload()
    at = datetime.now(timezone.utc) + timedelta(seconds=0.3)
    run_id = gateway.start_run(bundle_id="wait-until-time", input_data={"at": at.isoformat()})
    wait_for(lambda: gateway.stores.runs.load(run_id).waiting is not None)
    gateway.submit_command(command_id="pause", run_id=run_id, type="pause")
    assert _outcome(gateway, "pause")["status"] == "applied"
    ticks = []
    tick = gateway.tick
    monkeypatch.setattr(gateway, "tick", lambda *a, **kw: ticks.append(1) or tick(*a, **kw))
    wait_for(lambda: datetime.now(timezone.utc) > at)
    time.sleep(0.5)  # a window past its time: a run the runner spins on is ticked thousands of times
    assert len(ticks) <= 2 and _status(gateway, run_id) == "waiting", len(ticks)
    gateway.submit_command(command_id="resume", run_id=run_id, type="resume")
    wait_for(lambda: _status(gateway, run_id) == "completed")


def _status_in(data_dir, run_id):
    s = gw.open_stores(make_config(data_dir))
    try:
        return s.runs.load(run_id).status.value
    finally:
        s.close()


def test_llm_bundles_are_listed_and_refused_without_crashing(data_dir, monkeypatch):
    monkeypatch.setattr(gw, "llm_integration_available", lambda: False)  # as if the `[llm]` extra were absent
    flows = data_dir / "fixtures"
    shutil.copytree(FIXTURE_BUNDLES, flows)
    (flows / "broken@1.0.0.flow").write_bytes(b"not a zip at all")
    pack_bundle(flows, "echo")
    g = gw.Gateway(make_config(data_dir, flows_dir=str(flows)))
    try:
        bundles = g.host.catalog.bundles
        assert "basic-agent" in bundles and "echo" in bundles
        assert bundles["broken"]["1.0.0"].load_error
        llm = [b for versions in bundles.values() for b in versions.values() if b.needs]
        assert len(llm) >= 5
        before = g.stores.runs.list_run_index(limit=1000)
        for bundle in llm:
            with pytest.raises(gw.Unprocessable) as info:
                g.start_run(bundle_id=bundle.ref)
            assert info.value.code == "llm_extra_required" and gw.LLM_EXTRA in info.value.detail
        with pytest.raises(gw.Unprocessable, match="failed to load"):
            g.start_run(bundle_id="broken")
        assert g.stores.runs.list_run_index(limit=1000) == before  # nothing half-started
        assert g.start_run(bundle_id="echo")  # the good bundle still works
    finally:
        g.close()


def test_uploaded_bundle_lives_in_the_database(data_dir, bundle_builder, tmp_path):
    g = gw.Gateway(make_config(data_dir))
    try:
        g.host.install(bundle_builder("echo", version="3.0.0").read_bytes())
        with pytest.raises(gw.GatewayError, match="already installed"):
            g.host.install(bundle_builder("echo", version="3.0.0").read_bytes())
        g.host.reload()
        assert g.host.latest("echo").origin == "upload"
    finally:
        g.close()
    assert not (data_dir / "flows").exists() or not list((data_dir / "flows").iterdir())
    g = gw.Gateway(make_config(data_dir))  # after a restart it is still there
    try:
        assert g.host.resolve(bundle_id="echo", bundle_version=None, flow_id=None) == "echo@3.0.0:echo"
    finally:
        g.close()


CRASHING_RUNNER = """
import os, signal, sys
import abstractgateway as gw
config = gw.Config.load(environ={"ABSTRACTGATEWAY_DATA_DIR": sys.argv[1]})
g = gw.Gateway(config)
real_record = g.stores.outcomes.record
def record_then_die(command, status, error=None):
    # the effect is written (inside the open transaction) but not yet committed
    os.kill(os.getpid(), signal.SIGKILL)
g.stores.outcomes.record = record_then_die
g.apply_pending_commands()
"""


def test_sigkill_between_append_and_application_applies_exactly_once(data_dir):
    g = make_gateway(data_dir)
    r = gw.Runner(g).start()
    run_id = g.start_run(bundle_id="ask")
    state = wait_for(lambda: (s := g.stores.runs.load(run_id)).status.value == "waiting" and s)
    r.stop()
    g.submit_command(command_id="once", run_id=run_id, type="resume",
                     payload={"wait_key": state.waiting.wait_key, "payload": {"response": "Ada"}})
    g.close()
    proc = run_python(CRASHING_RUNNER, str(data_dir), timeout=60)
    assert proc.returncode == -signal.SIGKILL
    g = make_gateway(data_dir)
    try:
        assert g.stores.runs.load(run_id).status.value == "waiting"  # the crashed application left nothing
        assert g.command_status("once")["status"] == "pending"
        r = gw.Runner(g).start()
        wait_for(lambda: _status(g, run_id) == "completed")
        r.stop()
        assert _ledger_types(g, run_id).count(("resume", "completed")) == 1
        assert g.command_status("once")["status"] == "applied"
        g.apply_pending_commands()  # nothing left to apply
        assert _ledger_types(g, run_id).count(("resume", "completed")) == 1
    finally:
        g.close()


# -- schedules --------------------------------------------------------------------------------------


FAST_SCHEDULES = {"schedule_min_interval_s": "0.01"}  # intervals below the 1 s default keep these tests quick


@pytest.fixture
def fast_gateway(data_dir):
    g = make_gateway(data_dir, **FAST_SCHEDULES)
    r = gw.Runner(g).start()
    yield g
    r.stop()
    g.close()


def _children(gateway, run_id):
    return gateway.stores.runs.list_children(parent_run_id=run_id)


def test_schedule_fires_n_times(fast_gateway):
    gateway = fast_gateway
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", input_data={"message": "tick"},
                                  interval="100ms", repeat_count=3)
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=15)
    children = _children(gateway, run_id)
    assert len(children) == 3 and all(c.status.value == "completed" for c in children)
    assert all(c.output["result"] == "tick" for c in children)
    assert all(c.session_id == run_id for c in children)  # share_context: the parent's session
    state = gateway.stores.runs.load(run_id)
    assert state.output["executions"] == 3
    assert gw.schedule_of(state)["target_workflow_id"] == "echo@1.0.0:echo"


def test_a_schedule_that_keeps_firing_keeps_its_run_small(fast_gateway):
    """Each execution's trace holds the target's input; the wrapper keeps only its latest few, so a
    schedule that fires for months doesn't carry 100 copies of its input in every step."""
    gateway = fast_gateway
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", input_data={"message": "m" * 20_000},
                                  interval="20ms", repeat_count=gw.SCHEDULE_TRACES_KEPT + 10)
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=30)
    state = gateway.stores.runs.load(run_id)
    assert state.output["executions"] == gw.SCHEDULE_TRACES_KEPT + 10
    traces = state.vars["_runtime"]["node_traces"]
    assert 0 < len(traces["run_target"]["steps"]) <= gw.SCHEDULE_TRACES_KEPT
    assert traces["run_target"]["steps"][-1]["effect"]["payload"]["vars"]["_schedule"]["index"] >= 10  # the latest
    # each kept entry holds the input and the child's output (both carry the message), plus the run's own two
    assert len(gateway.stores.runs.load_json(run_id)) < (2 * gw.SCHEDULE_TRACES_KEPT + 3) * 20_000


def test_a_resume_reads_only_its_waits_records_not_the_whole_ledger(fast_gateway, monkeypatch):
    """Each execution of a schedule resumes its parent, and each resume looks for the tool-call wait it
    answers: by the waiting records with its key (an index), not by decoding the parent's whole
    ledger, which grows with every execution."""
    gateway = fast_gateway
    assert gw._resume_search_code() is not None  # this runtime's search is known: else it reads the whole ledger
    whole, by_key = [], []
    real_list, real_waiting = gateway.stores.ledger.list, gateway.stores.ledger.waiting_records
    monkeypatch.setattr(gateway.stores.ledger, "list", lambda rid: whole.append(rid) or real_list(rid))
    monkeypatch.setattr(gateway.stores.ledger, "waiting_records",
                        lambda rid, key: by_key.append((rid, key)) or real_waiting(rid, key))
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", interval="20ms", repeat_count=5)
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=30)
    assert gateway.stores.runs.load(run_id).output["executions"] == 5
    assert whole == [] and len([rid for rid, _ in by_key if rid == run_id]) == 5
    conn = gateway.stores.db.connection()
    plan = " ".join(str(row) for row in conn.execute("EXPLAIN QUERY PLAN " + gw.SqliteLedgerStore._WAITING, ("k", "r")))
    assert "USING INDEX ledger_waiting_by_key" in plan and "SCAN" not in plan


def test_schedule_isolated_sessions_and_validation(fast_gateway):
    gateway = fast_gateway
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", interval="50ms", repeat_count=2,
                                  share_context=False)
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=15)
    assert sorted(c.session_id for c in _children(gateway, run_id)) == [f"{run_id}:0", f"{run_id}:1"]
    bad = [dict(repeat_count=0), dict(repeat_count=2), dict(interval="5 parsecs"),
           dict(repeat_until="2999-01-01T00:00:00Z"),
           dict(interval="1s", repeat_count=2, repeat_until="2999-01-01T00:00:00Z"),
           dict(interval="10ms", repeat_until="2999-01-01T00:00:00Z"), dict(start_at="yesterday"),
           dict(interval="99999999999999999999d"), dict(interval="9" * 400 + "s"), dict(interval="36501d")]  # overflow
    for kwargs in bad:
        with pytest.raises(gw.GatewayError) as info:
            gateway.schedule_run(bundle_id="echo", flow_id="echo", **kwargs)
        assert gw.error_status(info.value) == 400, kwargs
    with pytest.raises(gw.NotFound):
        gateway.schedule_run(bundle_id="echo", flow_id="missing")
    with pytest.raises(gw.GatewayError):
        gateway.schedule_run(bundle_id="echo", flow_id=None)


def test_schedule_survives_restart(data_dir):
    g = make_gateway(data_dir, **FAST_SCHEDULES)
    r = gw.Runner(g).start()
    run_id = g.schedule_run(bundle_id="echo", flow_id="echo", interval="300ms", repeat_count=3)
    wait_for(lambda: len(_children(g, run_id)) >= 1, timeout=10)
    r.stop()
    g.close()
    g = make_gateway(data_dir, **FAST_SCHEDULES)
    r = gw.Runner(g).start()
    try:
        wait_for(lambda: _status(g, run_id) == "completed", timeout=15)
        assert len(_children(g, run_id)) == 3
    finally:
        r.stop()
        g.close()


def _wait_next_slot(gateway, run_id, executions):
    """Wait until the scheduled parent sleeps on `wait_interval` after `executions` runs of its target."""
    def ready():
        state = gateway.stores.runs.load(run_id)
        return (len(_children(gateway, run_id)) == executions and state.status.value == "waiting"
                and state.current_node == "wait_interval" and state.waiting.reason.value == "until")
    wait_for(ready)


@pytest.mark.parametrize("backend", ["sqlite", "file"])
def test_a_tree_command_reaches_every_live_descendant_without_walking_the_finished_ones(data_dir, backend, monkeypatch):
    """A cancel of a run with thousands of finished children (a schedule's history) changes, locks and
    loads only the runs still going, a live grandchild under a finished child included."""
    from abstractruntime.core.models import RunState, RunStatus

    gateway = make_gateway(data_dir, store_backend=backend)
    try:
        runs = gateway.stores.runs

        def run(run_id, status, parent=None):
            runs.save(RunState(run_id=run_id, workflow_id="echo@1.0.0:echo", status=status, current_node="start",
                               parent_run_id=parent))

        run("root", RunStatus.WAITING)
        for i in range(300 if backend == "sqlite" else 30):
            run(f"done-{i:04d}", RunStatus.COMPLETED, "root")
        run("finished-child", RunStatus.COMPLETED, "root")
        run("live-grandchild", RunStatus.WAITING, "finished-child")
        run("live-child", RunStatus.RUNNING, "root")
        run("elsewhere", RunStatus.RUNNING, "other-root")
        monkeypatch.setattr(runs, "child_ids", lambda parent: pytest.fail("walked down the finished children"))
        assert gateway.live_tree_ids("root") == ["root", "live-child", "live-grandchild"]
        assert gateway.live_tree_ids("nope") == []
        before = runs.load_json("done-0007")
        gateway.submit_command(command_id="stop-all", run_id="root", type="cancel")
        assert gateway.apply_pending_commands(None) and gateway.stores.outcomes.get("stop-all")["status"] == "applied"
        assert [runs.status_of(r) for r in ("root", "live-child", "live-grandchild")] == ["cancelled"] * 3
        assert runs.status_of("elsewhere") == "running" and runs.load_json("done-0007") == before
    finally:
        gateway.close()


def test_an_observer_digest_reads_a_bounded_tree_newest_first(gateway):
    """A digest for a model describes the run and its nearest, newest descendants, at most
    OBSERVER_RUNS_MAX of them, however many executions a schedule has had."""
    from abstractruntime.core.models import RunState, RunStatus

    runs = gateway.stores.runs
    runs.save(RunState(run_id="root", workflow_id="echo@1.0.0:echo", status=RunStatus.WAITING, current_node="start"))
    for i in range(200):
        runs.save(RunState(run_id=f"child-{i:03d}", workflow_id="echo@1.0.0:echo", status=RunStatus.COMPLETED,
                           current_node="start", parent_run_id="root", created_at=f"2026-01-01T00:00:{i // 10:02d}."
                           f"{i % 10:06d}+00:00"))
    limit = gateway.OBSERVER_RUNS_MAX
    assert gateway.run_tree_ids("root", limit) == ["root", *(f"child-{i:03d}" for i in range(199, 200 - limit, -1))]
    assert len(gateway.run_tree_ids("root")) == 201  # unbounded, when asked for the whole tree
    assert list(gateway.run_digest("root")["runs"]) == gateway.run_tree_ids("root", limit)


def test_update_schedule_then_cancel_stops_it(fast_gateway):
    gateway = fast_gateway
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", interval="1h")  # forever, hourly
    _wait_next_slot(gateway, run_id, executions=1)
    gateway.submit_command(command_id="faster", run_id=run_id, type="update_schedule", payload={"interval": "100ms"})
    assert _outcome(gateway, "faster")["status"] == "applied"
    wait_for(lambda: len(_children(gateway, run_id)) >= 3, timeout=10)
    assert gateway.stores.runs.load(run_id).vars["_runtime"]["last_schedule_update"]["interval"] == "100ms"
    gateway.submit_command(command_id="stop", run_id=run_id, type="cancel")
    _outcome(gateway, "stop")
    assert _status(gateway, run_id) == "cancelled"
    count = len(_children(gateway, run_id))
    time.sleep(0.4)
    assert len(_children(gateway, run_id)) == count  # nothing fires after the cancel
    gateway.submit_command(command_id="bad", run_id=run_id, type="update_schedule", payload={"interval": "soon"})
    assert "Invalid interval" in _outcome(gateway, "bad")["error"]
    other = gateway.start_run(bundle_id="echo")
    gateway.submit_command(command_id="ns", run_id=other, type="update_schedule", payload={"interval": "1s"})
    assert "not part of a scheduled run" in _outcome(gateway, "ns")["error"]


def test_a_schedule_stored_before_start_at_utc_waits_for_its_start_at():
    """Schedules made before `start_at_utc` existed kept their start, normalised, in `start_at`."""
    from types import SimpleNamespace

    wait_start = gw.schedule_spec("scheduled:old").get_node("wait_start")
    old = SimpleNamespace(vars={"_meta": {"schedule": {"kind": "scheduled_run",
                                                       "start_at": "2030-01-01T00:00:00+00:00"}}})
    assert wait_start(old, None).effect.payload["until"] == "2030-01-01T00:00:00+00:00"
    new = SimpleNamespace(vars={"_meta": {"schedule": {"kind": "scheduled_run", "start_at": "10s",
                                                       "start_at_utc": "2031-01-01T00:00:00+00:00"}}})
    assert wait_start(new, None).effect.payload["until"] == "2031-01-01T00:00:00+00:00"


def test_times_past_the_calendar_s_ends_are_refused_not_a_500(fast_gateway):
    for field in ("start_at", "repeat_until"):
        for value in ("9999-12-31T23:00:00-05:00", "0001-01-01T00:30:00+05:00"):
            extra = {"interval": "1h"} if field == "repeat_until" else {}
            with pytest.raises(gw.GatewayError) as refused:
                fast_gateway.schedule_run(bundle_id="echo", flow_id="echo", **{field: value}, **extra)
            assert refused.value.code == "invalid_schedule" and field in refused.value.detail


def _hold_ticks(gateway, monkeypatch):
    """Make each of `gateway`'s ticks wait for `release`: (a semaphore released as each begins, release)."""
    entered, release, real = threading.Semaphore(0), threading.Event(), gateway.tick

    def held_tick(run_id, lease=None):
        entered.release()
        release.wait(10)
        return real(run_id, lease)

    monkeypatch.setattr(gateway, "tick", held_tick)
    return entered, release


def test_a_stop_keeps_the_lease_while_a_long_tick_finishes_so_it_commits(data_dir, monkeypatch):
    """A tick longer than the lease's TTL (a slow tool) during a stop: the lease is still renewed, so the
    tick commits and no other runner takes over meanwhile."""
    gateway = make_gateway(data_dir, runner_lease_ttl_s="0.3")
    entered, release = _hold_ticks(gateway, monkeypatch)
    runner = gw.Runner(gateway).start()
    try:
        run_id = gateway.start_run(bundle_id="echo", input_data={"message": "slow"})
        assert entered.acquire(timeout=10)
        stopped, stop_began = [], time.time()
        stopper = threading.Thread(target=lambda: stopped.append(runner.stop(timeout=0.1)))
        stopper.start()
        holder = lambda: gateway.stores.leases.holder(gw.RUNNER_LEASE)  # noqa: E731
        epoch = holder()["epoch"]
        wait_for(lambda: holder()["heartbeat_at"] > stop_began + 0.6)  # renewed twice the TTL into the stop
        other = gw.Runner(gateway)
        other._renew_lease()
        assert other.lease is None and holder()["live"]  # no one else may take over while the tick runs
        release.set()
        stopper.join(20)
        assert stopped == [0] and _status(gateway, run_id) == "completed"
        assert holder()["epoch"] == epoch and not holder()["live"]  # then released
    finally:
        release.set()
        gateway.close()


def test_stopping_with_ticks_queued_waits_only_for_the_running_ones(data_dir, monkeypatch):
    """Queued ticks never start once the runner stops, and are not counted as left behind."""
    gateway = make_gateway(data_dir, tick_workers="1", llm_concurrency="1")
    entered, release = _hold_ticks(gateway, monkeypatch)
    runner = gw.Runner(gateway).start()
    try:
        for i in range(6):
            gateway.start_run(bundle_id="echo", input_data={"message": str(i)})
        for _ in range(2):  # both pool threads are in a tick; four more are queued
            assert entered.acquire(timeout=10)
        wait_for(lambda: len(runner._in_flight) == 6)
        stopped = []
        stopper = threading.Thread(target=lambda: stopped.append(runner.stop(timeout=30)))
        stopper.start()
        wait_for(lambda: runner._stop.is_set())
        release.set()
        stopper.join(20)
        assert stopped == [0] and not runner._in_flight
    finally:
        release.set()
        gateway.close()


def test_resuming_a_paused_recurrent_schedule_fires_the_next_execution_at_once(gateway, runner):
    run_id = gateway.schedule_run(bundle_id="echo", flow_id="echo", interval="1h")
    _wait_next_slot(gateway, run_id, executions=1)
    gateway.submit_command(command_id="p", run_id=run_id, type="pause")
    _outcome(gateway, "p")
    gateway.submit_command(command_id="r", run_id=run_id, type="resume")
    _outcome(gateway, "r")
    wait_for(lambda: len(_children(gateway, run_id)) == 2, timeout=5)


def test_compact_memory_applies_when_no_llm_is_needed_and_fails_cleanly_otherwise(data_dir, monkeypatch):
    monkeypatch.setattr(gw, "llm_integration_available", lambda: False)  # as if the `[llm]` extra were absent
    gateway = make_gateway(data_dir)
    runner = gw.Runner(gateway).start()
    try:
        _compact_memory_without_llm(gateway)
    finally:
        runner.stop()
        gateway.close()


def _set_messages(gateway, run_id, n):
    with gateway.runs_locked([run_id]):
        state = gateway.stores.runs.load(run_id)
        state.vars["context"] = {"messages": [{"role": "user", "content": f"m{i}"} for i in range(n)]}
        gateway.stores.runs.save(state)


def _compact_memory_without_llm(gateway):
    # as on the original: a run outside any schedule has no memory compacted, and nothing is written
    plain = gateway.start_run(bundle_id="ask")
    wait_for(lambda: _status(gateway, plain) == "waiting")
    _set_messages(gateway, plain, 20)
    records = gateway.stores.ledger.count(plain)
    gateway.submit_command(command_id="cm0", run_id=plain, type="compact_memory")
    outcome = _outcome(gateway, "cm0")
    assert outcome["status"] == "failed" and "scheduled" in outcome["error"]
    assert gateway.stores.ledger.count(plain) == records

    root = gateway.schedule_run(bundle_id="ask", flow_id="ask", interval="1h")
    wait_for(lambda: [c.status.value for c in _children(gateway, root)] == ["waiting"])
    child = _children(gateway, root)[0].run_id
    gateway.submit_command(command_id="cm1", run_id=root, type="compact_memory")
    outcome = _outcome(gateway, "cm1")
    assert outcome["status"] == "failed" and "No compactable run" in outcome["error"]  # no conversation yet

    _set_messages(gateway, child, 3)  # a short conversation: nothing to summarise, no LLM needed
    gateway.submit_command(command_id="cm2", run_id=root, type="compact_memory")
    assert _outcome(gateway, "cm2")["status"] == "applied"
    # found down the subflow the schedule waits on; the records are in that run's ledger
    started, completed = gateway.stores.ledger.list(child)[-2:]
    assert [(r["node_id"], r["status"], r["effect"]["type"]) for r in (started, completed)] == [
        ("compact_memory", "started", "memory_compact"), ("compact_memory", "completed", "memory_compact")]
    assert completed["idempotency_key"] == "command:compact_memory:cm2"
    assert completed["result"]["results"][0]["output"].startswith("Nothing to compact")
    marker = gateway.stores.runs.load(root).vars["_runtime"]["last_compact_memory"]
    assert marker["command_id"] == "cm2" and marker["target_run_id"] == child
    assert marker["scheduled_root_run_id"] == root == marker["requested_run_id"]
    # a negative or unreadable preserve_recent is read as the original reads it: the runtime's default, 6
    _set_messages(gateway, child, 5)
    for n, preserve in enumerate((-1, "x", None)):
        gateway.submit_command(command_id=f"cm2-{n}", run_id=root, type="compact_memory",
                               payload={"preserve_recent": preserve})
        assert _outcome(gateway, f"cm2-{n}")["status"] == "applied", preserve
        assert "preserve_recent=6" in gateway.stores.ledger.list(child)[-1]["result"]["results"][0]["output"]

    # a long conversation: summarising it needs an LLM this gateway does not have
    _set_messages(gateway, child, 20)
    runs_before, records = len(gateway.stores.runs.list_run_index(limit=1000)), gateway.stores.ledger.count(child)
    gateway.submit_command(command_id="cm3", run_id=child, type="compact_memory", payload={"preserve_recent": 2})
    outcome = _outcome(gateway, "cm3")
    assert outcome["status"] == "failed" and gw.LLM_EXTRA in outcome["error"]
    assert len(gateway.stores.runs.list_run_index(limit=1000)) == runs_before  # the summary's run is not kept
    assert gateway.stores.ledger.count(child) == records
    assert len(gateway.stores.runs.load(child).vars["context"]["messages"]) == 20


def test_compact_memory_finds_the_conversation_in_the_newest_execution(gateway):
    """Without a target, as on the original: not an older execution's conversation, but the newest one's,
    where it sits below a run without messages (a flow's agent)."""
    from abstractruntime.core.models import RunState, RunStatus

    root = gateway.schedule_run(bundle_id="echo", flow_id="echo", interval="1h")

    def run(run_id, parent, created_at, messages=0):
        runs_vars = {"context": {"messages": [{"role": "user", "content": f"m{i}"} for i in range(messages)]}}
        gateway.stores.runs.save(RunState(run_id=run_id, workflow_id="echo@1.0.0:echo", status=RunStatus.COMPLETED,
                                          current_node="end", parent_run_id=parent, created_at=created_at,
                                          vars=runs_vars if messages else {}))

    run("older", root, "2026-01-01T00:00:00+00:00", messages=3)
    run("newer", root, "2026-01-02T00:00:00+00:00")
    run("newer-agent", "newer", "2026-01-02T00:00:01+00:00", messages=3)
    gateway.submit_command(command_id="cm", run_id="older", type="compact_memory")  # any run of the tree
    gateway.apply_pending_commands()
    assert gateway.command_status("cm")["status"] == "applied"
    marker = gateway.stores.runs.load(root).vars["_runtime"]["last_compact_memory"]
    assert (marker["target_run_id"], marker["scheduled_root_run_id"]) == ("newer-agent", root)
    assert [r["node_id"] for r in gateway.stores.ledger.list("newer-agent")] == ["compact_memory"] * 2


def test_commands_lock_children_that_appear_while_waiting_for_locks(gateway, monkeypatch):
    locked = []
    real_lock = gateway.runs_locked

    def recording(run_ids):
        locked.append(sorted(run_ids))
        return real_lock(run_ids)

    monkeypatch.setattr(gateway, "runs_locked", recording)
    monkeypatch.setattr(gateway.inbox, "_command_targets", lambda record: ["parent", "child"])  # a child appeared
    record = gw.CommandRecord(command_id="x", run_id="parent", type="cancel", payload={}, ts="", seq=1)
    with gateway.inbox._targets_locked([record]) as targets:
        assert targets == {1: ["parent", "child"]}
    assert locked == [["parent"], ["child", "parent"]]  # read under the parent's lock, then both locked


def test_a_runner_without_the_lease_applies_nothing_and_outcomes_are_never_doubled(gateway):
    run_id = gateway.start_run(bundle_id="ask")
    gateway.submit_command(command_id="c1", run_id=run_id, type="pause")
    other = gateway.stores.leases.acquire(gw.Runner.LEASE, "someone-else", ttl_s=30)
    assert other is not None
    with pytest.raises(gw.LeaseLost):
        gateway.apply_pending_commands(gw.LeaseToken("me", other.epoch))
    assert gateway.stores.outcomes.get("c1") is None and gateway.stores.cursor.load() == 0
    gateway.stores.leases.release(gw.Runner.LEASE, "someone-else")
    mine = gateway.stores.leases.acquire(gw.Runner.LEASE, "me", ttl_s=30)
    assert mine is not None and mine.epoch == other.epoch + 1
    assert gateway.apply_pending_commands(mine) == 1
    first = gateway.stores.outcomes.get("c1")
    gateway.stores.cursor.save(0)  # a stale cursor (e.g. another runner's late write) must not re-apply
    gateway.apply_pending_commands(mine)
    assert gateway.stores.outcomes.get("c1") == first and gateway.stores.cursor.load() >= 1


def _waiting_runs(gateway, n):
    run_ids = [gateway.start_run(bundle_id="wait-key") for _ in range(n)]
    for run_id in run_ids:
        assert gateway.tick(run_id).status.value == "waiting"
    return run_ids


def _count_transactions(gateway, monkeypatch):
    opened = []
    real = gateway.stores.db.transaction

    def counting():
        opened.append(1)
        return real()

    monkeypatch.setattr(gateway.stores.db, "transaction", counting)
    return opened


def test_a_batch_of_commands_commits_once_and_a_failing_one_undoes_only_its_own_writes(gateway, monkeypatch):
    a, b, c = _waiting_runs(gateway, 3)
    real_cancel = gateway.runtime.cancel_run

    def cancel_then_fail(run_id, reason=None):
        real_cancel(run_id, reason=reason)  # written inside the command's savepoint...
        raise RuntimeError("boom after writing")  # ...then undone with it

    monkeypatch.setattr(gateway.runtime, "cancel_run", cancel_then_fail)
    for command_id, run_id, kind in (("p-a", a, "pause"), ("x-b", b, "cancel"), ("p-c", c, "pause")):
        gateway.submit_command(command_id=command_id, run_id=run_id, type=kind)
    opened = _count_transactions(gateway, monkeypatch)
    assert gateway.apply_pending_commands() == 3
    assert len(opened) == 1  # one transaction, one durable commit, for the whole batch
    assert [gateway.command_status(c)["status"] for c in ("p-a", "x-b", "p-c")] == ["applied", "failed", "applied"]
    assert "boom after writing" in gateway.command_status("x-b")["error"]
    assert gw._is_paused(gateway.stores.runs.load(a)) and gw._is_paused(gateway.stores.runs.load(c))
    assert _status(gateway, b) == "waiting" and not gw._is_paused(gateway.stores.runs.load(b))
    assert gateway.stores.cursor.load() == gateway.stores.commands.get_last_seq()


def _two_pauses_the_second_failing_with_busy(gateway, monkeypatch):
    """Pause two waiting runs; recording the second outcome fails with `database_busy` until `heal()`."""
    a, b = _waiting_runs(gateway, 2)
    gateway.submit_command(command_id="p-a", run_id=a, type="pause")
    gateway.submit_command(command_id="p-b", run_id=b, type="pause")
    real_record = gateway.stores.outcomes.record

    def busy_on_b(command, status, error=None):
        if command.command_id == "p-b":
            raise gw.DatabaseBusy("busy")
        real_record(command, status, error)

    monkeypatch.setattr(gateway.stores.outcomes, "record", busy_on_b)
    return a, lambda: monkeypatch.setattr(gateway.stores.outcomes, "record", real_record)


def test_a_storage_error_mid_batch_leaves_every_command_of_the_batch_pending(gateway, monkeypatch):
    a, heal = _two_pauses_the_second_failing_with_busy(gateway, monkeypatch)
    with pytest.raises(gw.DatabaseBusy):
        gateway.apply_pending_commands()
    assert gateway.stores.cursor.load() == 0 and gateway.stores.outcomes.get("p-a") is None
    assert not gw._is_paused(gateway.stores.runs.load(a))  # rolled back with the batch: nothing half-applied
    heal()
    assert gateway.apply_pending_commands() == 2
    assert [gateway.command_status(c)["status"] for c in ("p-a", "p-b")] == ["applied", "applied"]
    assert gateway.apply_pending_commands() == 0


def test_on_the_file_backend_a_storage_error_leaves_no_earlier_command_half_applied(data_dir, monkeypatch):
    """Run files are written at once, outside the database transaction: the file backend applies commands
    one per transaction, so a storage error never rolls back an outcome whose run file stays written."""
    gateway = make_gateway(data_dir, store_backend="file")
    try:
        a, heal = _two_pauses_the_second_failing_with_busy(gateway, monkeypatch)
        with pytest.raises(gw.DatabaseBusy):
            gateway.apply_pending_commands()
        assert gateway.command_status("p-a")["status"] == "applied"  # its own transaction, committed
        assert gw._is_paused(gateway.stores.runs.load(a))
        heal()
        assert gateway.apply_pending_commands() == 1
        assert [gateway.command_status(c)["status"] for c in ("p-a", "p-b")] == ["applied", "applied"]
    finally:
        gateway.close()


def test_a_compaction_ends_the_batch_and_is_applied_on_its_own(gateway, monkeypatch):
    a = _waiting_runs(gateway, 1)[0]
    b = gateway.schedule_run(bundle_id="wait-key", flow_id="wait_key", interval="1h")
    gateway.submit_command(command_id="p-a", run_id=a, type="pause")
    gateway.submit_command(command_id="cm", run_id=b, type="compact_memory", payload={"target_run_id": b})
    gateway.submit_command(command_id="p-b", run_id=b, type="pause")
    opened = _count_transactions(gateway, monkeypatch)
    assert gateway.apply_pending_commands() == 3
    assert len(opened) == 3  # [pause a] [compaction] [pause b]
    assert [gateway.command_status(c)["status"] for c in ("p-a", "cm", "p-b")] == ["applied"] * 3
    assert gateway.stores.runs.load(b).vars["_runtime"]["last_compact_memory"]["command_id"] == "cm"


def test_a_stale_lease_token_is_fenced_even_when_the_same_owner_holds_again(gateway):
    """An epoch from before a takeover is refused: the owner's old in-flight writes can't land."""
    old = gateway.stores.leases.acquire(gw.Runner.LEASE, "me", ttl_s=0.05)
    assert old is not None
    wait_for(lambda: gateway.stores.leases.acquire(gw.Runner.LEASE, "other", ttl_s=0.05) is not None)
    wait_for(lambda: gateway.stores.leases.acquire(gw.Runner.LEASE, "me", ttl_s=30) is not None)
    new = gateway.stores.leases.acquire(gw.Runner.LEASE, "me", ttl_s=30)
    assert new.epoch > old.epoch
    assert not gateway.stores.leases.holds(gw.Runner.LEASE, old) and gateway.stores.leases.holds(gw.Runner.LEASE, new)
    run_id = gateway.start_run(bundle_id="echo", input_data={"message": "x"})
    with pytest.raises(gw.LeaseLost):
        gateway.tick(run_id, old)
    assert gateway.stores.ledger.count(run_id) == 0 and gateway.stores.runs.status_of(run_id) == "running"
    assert gateway.tick(run_id, new).status.value == "completed"


def test_visualflow_source_runs_json_flows_from_a_directory(data_dir):
    flows = data_dir / "vf"
    flows.mkdir()
    shutil.copy(FLOWS / "echo.json", flows / "echo.json")
    (flows / "broken.json").write_text("{not json")
    g = gw.Gateway(make_config(data_dir, workflow_source="visualflow", flows_dir=str(flows)))
    r = gw.Runner(g).start()
    try:
        assert "echo" in g.host.catalog.specs and any("broken.json" in e for e in g.host.catalog.errors)
        run_id = g.start_run(flow_id="echo", input_data={"message": "vf"})
        wait_for(lambda: _status(g, run_id) == "completed")
        assert g.stores.runs.load(run_id).output["result"] == "vf"
        with pytest.raises(gw.GatewayError, match="not enabled"):
            g.host.require_bundle_source()
    finally:
        r.stop()
        g.close()


def test_parent_whose_child_ended_unwatched_is_repaired(gateway, monkeypatch):
    run_id = gateway.start_run(bundle_id="parent", input_data={"text": "x"})
    parent = gateway.tick(run_id)  # no runner: tick by hand
    assert parent.status.value == "waiting" and parent.waiting.reason.value == "subworkflow"
    child_id = parent.waiting.details["sub_run_id"]
    with monkeypatch.context() as m:  # the process dies between the child's end and its parent's resume
        m.setattr(gateway, "resume_parent_of", lambda *args, **kwargs: None)
        assert gateway.tick(child_id).status.value == "completed"
    assert _status(gateway, run_id) == "waiting"
    assert gateway.repair_subworkflow_parents() == 1  # what the runner does after a restart
    assert gateway.tick(run_id).status.value == "completed"
    assert gateway.stores.runs.load(run_id).output["child_out"] == "x x"


def test_runs_and_commands_on_the_file_backend(data_dir):
    g = make_gateway(data_dir, store_backend="file")
    r = gw.Runner(g).start()
    try:
        run_id = g.start_run(bundle_id="ask")
        state = wait_for(lambda: (s := g.stores.runs.load(run_id)) and s.status.value == "waiting" and s)
        g.submit_command(command_id="f1", run_id=run_id, type="resume",
                         payload={"wait_key": state.waiting.wait_key, "payload": {"response": "file"}})
        wait_for(lambda: _status(g, run_id) == "completed")
        assert g.stores.runs.load(run_id).output["answer"] == "file"
        assert (data_dir / f"run_{run_id}.json").exists() and (data_dir / "commands.jsonl").exists()
        assert g.command_status("f1")["status"] == "applied"
    finally:
        r.stop()
        g.close()


def _slow_effect_gateway(gateway, monkeypatch):
    """A one-effect workflow whose effect blocks until released: a model call, in miniature."""
    import threading

    from abstractruntime import Effect, EffectType, StepPlan, WorkflowSpec
    from abstractruntime.core.runtime import EffectOutcome

    entered, release, calls = threading.Event(), threading.Event(), []

    def slow_call(run, effect, default_next_node):
        calls.append(run.run_id)
        entered.set()
        release.wait(10)
        return EffectOutcome.completed({"answer": 42})

    def ask(run, ctx):
        return StepPlan(node_id="ask", effect=Effect(type=EffectType.LLM_CALL, payload={"prompt": "q"},
                                                     result_key="answer"), next_node="done")

    def done(run, ctx):
        return StepPlan(node_id="done", complete_output={"answer": run.vars.get("answer")})

    spec = WorkflowSpec(workflow_id="test:slow", entry_node="ask", nodes={"ask": ask, "done": done})
    monkeypatch.setitem(gateway.runtime._handlers, EffectType.LLM_CALL, slow_call)
    real_get = gateway.host.get
    monkeypatch.setattr(gateway.host, "get", lambda wid: spec if wid == "test:slow" else real_get(wid))
    return spec, entered, release, calls


@pytest.mark.parametrize("command", ["pause", "cancel"])
def test_a_command_that_lands_mid_step_wins_and_the_paid_for_answer_is_kept(gateway, monkeypatch, command):
    import threading

    spec, entered, release, calls = _slow_effect_gateway(gateway, monkeypatch)
    run_id = gateway._start(spec, {}, None)
    ticking = threading.Thread(target=gateway.tick, args=(run_id,))
    ticking.start()
    assert entered.wait(10)
    gateway.submit_command(command_id="c", run_id=run_id, type=command)
    gateway.apply_pending_commands()  # not blocked by the step in flight: no lock is held while it runs
    assert gateway.command_status("c")["status"] == "applied"
    release.set()
    ticking.join(10)
    state = gateway.stores.runs.load(run_id)
    assert (state.status.value, gw._is_paused(state)) == (("cancelled", False) if command == "cancel" else
                                                          ("waiting", True))
    ledger = gateway.stores.ledger.list(run_id)
    statuses = [r["status"] for r in ledger if (r.get("effect") or {}).get("type") == "llm_call"]
    assert statuses == ["started", "completed"]
    if command == "pause":
        gateway.submit_command(command_id="r", run_id=run_id, type="resume")
        gateway.apply_pending_commands()
        assert gateway.tick(run_id).status.value == "completed"
        assert gateway.stores.runs.load(run_id).output["answer"] == {"answer": 42}
        assert len(calls) == 1  # the recorded answer was reused, not asked for again
        keys = [(r.get("idempotency_key"), r["status"]) for r in gateway.stores.ledger.list(run_id)
                if r.get("idempotency_key")]
        assert len(keys) == len(set(keys))


def test_a_step_is_all_or_nothing_when_its_commit_fails(gateway, monkeypatch):
    """A commit that fails (here: the disk) leaves no record and no checkpoint of the step."""
    run_id = gateway.start_run(bundle_id="echo", input_data={"message": "x"})
    real = gateway.stores.runs.save_row

    def failing(row):
        real(row)
        raise gw.DiskFull("simulated: disk full at the checkpoint")

    monkeypatch.setattr(gateway.stores.runs, "save_row", failing)
    with pytest.raises(gw.DiskFull):
        gateway.tick(run_id)
    assert gateway.stores.ledger.count(run_id) == 0 and _status(gateway, run_id) == "running"
    monkeypatch.undo()
    assert gateway.tick(run_id).status.value == "completed"


def test_zero_length_waits_continue_in_the_same_tick(gateway):
    run_id = gateway.start_run(bundle_id="timer-loop", input_data={"n": 3, "delay": 0})
    assert gateway.tick(run_id).status.value == "completed"
    assert gateway.stores.runs.load(run_id).output["iterations"] == 3


def test_a_timer_wait_wakes_the_runner_at_its_due_time(gateway, runner):
    run_id = gateway.start_run(bundle_id="timer-loop", input_data={"n": 2, "delay": 0.3})
    wait_for(lambda: _status(gateway, run_id) == "completed", timeout=10)
    due = [r for r in gateway.stores.ledger.list(run_id) if (r.get("effect") or {}).get("type") == "wait_until"]
    assert len(due) >= 2 and runner._timers == []


def test_a_ticks_end_costs_no_scan(data_dir, monkeypatch):
    """Only new work wakes the loop to scan (here: each start, once); a tick that ends does not."""
    gateway = make_gateway(data_dir, poll_s="30")
    scans = []
    real = gateway.runnable_run_ids
    monkeypatch.setattr(gateway, "runnable_run_ids", lambda: scans.append(1) or real())
    runner = gw.Runner(gateway).start()
    try:
        wait_for(lambda: scans)  # the scan on taking the lease
        before = len(scans)
        for i in range(3):
            run_id = gateway.start_run(bundle_id="echo", input_data={"message": str(i)})
            wait_for(lambda run_id=run_id: _status(gateway, run_id) == "completed")
        assert len(scans) - before == 3
    finally:
        runner.stop()
        gateway.close()


def test_a_run_asked_for_during_its_tick_is_ticked_again(data_dir, monkeypatch):
    """Work for a run that arrives while its tick runs is not lost until the next poll."""
    gateway = make_gateway(data_dir, poll_s="30")
    entered, release, calls = threading.Event(), threading.Event(), []
    real = gateway.tick

    def tick(run_id, lease=None):
        calls.append(run_id)
        if len(calls) == 1:  # a tick that read the run before the news, and did nothing
            entered.set()
            release.wait(10)
            return None
        return real(run_id, lease)

    monkeypatch.setattr(gateway, "tick", tick)
    runner = gw.Runner(gateway).start()
    try:
        run_id = gateway.start_run(bundle_id="echo", input_data={"message": "x"})
        assert entered.wait(10)
        gateway.wake_runner()  # the loop finds the run RUNNING while its tick is in flight
        wait_for(lambda: run_id in runner._again)  # the loop asked for it again
        release.set()
        wait_for(lambda: _status(gateway, run_id) == "completed", timeout=5)
        assert calls == [run_id, run_id]
    finally:
        release.set()
        runner.stop()
        gateway.close()


def test_only_model_and_tool_results_outlive_a_dropped_step():
    """A step dropped because a command changed its run keeps only results that have no other effect
    (with their started records, which clients pair them with): an emitted event, a started child or
    a memory note live in the dropped writes, so they must redo."""
    def record(kind, status="completed", key="k", run="r"):
        return run, json.dumps({"status": status, "effect": {"type": kind} if kind else None, "idempotency_key": key})

    for kind in ("llm_call", "tool_calls"):
        ledger = [record(kind, "started"), record(kind), record("emit_event", key="e")]
        assert gw._paid_calls("r", ledger) == ledger[:2]
    for kind in ("emit_event", "start_subworkflow", "memory_note", "ask_user", None):
        assert gw._paid_calls("r", [record(kind, "started"), record(kind)]) == []
    assert gw._paid_calls("r", [record("llm_call", "started")]) == []  # no answer yet: nothing was paid for
    assert gw._paid_calls("r", [record("llm_call", key="system:terminal_status:completed")]) == []
    assert gw._paid_calls("r", [record("llm_call", run="other")]) == []  # only the stepped run's


def test_a_rollback_after_a_mid_step_commit_drops_only_what_came_after_it():
    """A step's writes up to a slow call's `started` record may be committed before the call
    (`Gateway._publish_before_call`); a step that then fails rolls back only what followed."""
    writes = gw.StepWrites()
    writes.ledger += [("r", "step 1"), ("r", "step 1 done")]
    mark = writes.mark()
    writes.ledger.append(("r", "call started"))
    writes.published, writes.ledger = writes.published + len(writes.ledger), []  # committed mid-step
    writes.ledger.append(("r", "call completed"))
    writes.rollback(mark)
    assert writes.ledger == [] and writes.published == 3
    mark = writes.mark()
    assert mark[0] == 3
    writes.ledger.append(("r", "next step"))
    writes.rollback(mark)
    assert writes.ledger == []


def test_buffered_run_store_passes_the_runtimes_protocol_check_statically(gateway):
    """Python 3.12+ checks runtime protocols with getattr_static, which ignores __getattr__."""
    import inspect

    from abstractruntime.storage.base import QueryableRunStore

    assert isinstance(gateway.uow.runs, QueryableRunStore)
    for name in ("list_runs", "list_due_wait_until", "list_children", "load", "save"):
        inspect.getattr_static(gateway.uow.runs, name)


def test_a_step_decodes_its_run_once_yet_sees_a_pause_stored_while_its_node_ran(gateway, monkeypatch):
    """The runtime loads a run three times a step: to work on it, then twice in its pause probe (for a
    pause or cancel stored meanwhile). An unchanged run is decoded once; the probes are answered
    without a decode. A pause another thread stored meanwhile is decoded, seen, and wins."""
    from abstractruntime import Runtime, StepPlan, WorkflowSpec

    assert gw._pause_probe_code(Runtime) is not None  # this runtime's probe is known: else every probe decodes
    decodes = []
    real_from_dict = gw.run_from_dict
    monkeypatch.setattr(gw, "run_from_dict", lambda data: decodes.append(threading.get_ident()) or real_from_dict(data))
    paused_meanwhile = []

    def start(run, ctx):
        if run.vars.get("pause_meanwhile"):  # a command, stored by another thread while this node runs
            other = threading.Thread(target=lambda: gateway.runtime.pause_run(run.run_id, reason="operator"))
            other.start()
            other.join()
            paused_meanwhile.append(run.run_id)
        return StepPlan(node_id="start", next_node="done")

    def done(run, ctx):
        return StepPlan(node_id="done", complete_output={"ok": True})

    spec = WorkflowSpec(workflow_id="test:two_nodes", entry_node="start", nodes={"start": start, "done": done})
    probes = []
    real_stored_as_first_loaded = gateway.uow.runs.stored_as_first_loaded
    monkeypatch.setattr(gateway.uow.runs, "stored_as_first_loaded",
                        lambda rid: probes.append(real_stored_as_first_loaded(rid)) or probes[-1])
    for pause_meanwhile in (False, True):
        run_id = gateway.runtime.start(workflow=spec, vars={"pause_meanwhile": pause_meanwhile})
        decodes.clear()
        probes.clear()
        with gateway.uow.collect() as writes:
            writes.mark()
            state = gateway.runtime.tick(workflow=spec, run_id=run_id, max_steps=1)
        mine = [ident for ident in decodes if ident == threading.get_ident()]  # not the pausing thread's
        if not pause_meanwhile:
            assert probes == [True, True] and len(mine) == 1  # both probes answered from the first load
            assert state.current_node == "done" and run_id in writes.runs
        else:
            assert paused_meanwhile == [run_id] and probes[:2] == [True, False]
            assert len(mine) == 2  # the work load, then the probe that found new text
            assert state.vars["_runtime"]["control"]["paused"] is True and state.current_node == "start"
            assert run_id not in writes.runs  # the runtime saw the pause and stopped without saving


def test_a_step_finds_a_reusable_result_without_reading_the_whole_ledger(gateway, monkeypatch):
    """Before each effect the runtime looks for a completed record with the effect's key; the gateway
    answers from the ledger's index, so a long-lived run's steps don't slow down as its ledger grows."""
    run_id = gateway.start_run(bundle_id="timer-loop", input_data={"n": 5, "delay": 0})
    lookups = []
    real_lookup = gw.SqliteLedgerStore.completed_record
    monkeypatch.setattr(gw.SqliteLedgerStore, "completed_record",
                        lambda self, rid, key: lookups.append(key) or real_lookup(self, rid, key))
    monkeypatch.setattr(gw.SqliteLedgerStore, "list", lambda self, rid: pytest.fail("read the whole ledger"))
    for _ in range(50):
        if gateway.tick(run_id).status.value == "completed":
            break
    assert gateway.stores.runs.load(run_id).status.value == "completed"
    assert len(lookups) >= 5  # one per timer at least


def test_a_storage_error_mid_batch_keeps_the_steps_before_it(gateway, monkeypatch):
    """Quick steps share a commit; a busy disk on a later one must not throw the finished ones away."""
    run_id = gateway.start_run(bundle_id="timer-loop", input_data={"n": 3, "delay": 0})
    first_node = gateway.stores.runs.load(run_id).current_node
    real_tick, calls = gateway.runtime.tick, []

    def busy_on_the_third(**kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise gw.DatabaseBusy("simulated: busy")
        return real_tick(**kwargs)

    monkeypatch.setattr(gateway.runtime, "tick", busy_on_the_third)
    with pytest.raises(gw.DatabaseBusy):
        gateway.tick(run_id)
    kept = gateway.stores.runs.load(run_id)  # the two finished steps were committed before the error
    assert kept.current_node != first_node and kept.status.value == "running"
    monkeypatch.undo()
    assert gateway.tick(run_id).status.value == "completed"
    keys = [(r.get("idempotency_key"), r["status"]) for r in gateway.stores.ledger.list(run_id)
            if r.get("idempotency_key")]
    assert len(keys) == len(set(keys))
