"""The operator console, end to end in a real browser.

Debian's Chromium (`/usr/bin/chromium-headless-shell`, else `/usr/bin/chromium`) driven by Playwright
for Python, against a live gateway on a loopback port over a real SQLite file. The assertions are about
what is on screen; every request the page makes is recorded and must stay on the gateway's own origin.
"""

from __future__ import annotations

import re
import threading
from pathlib import Path
from typing import Iterator, List

import pytest
from playwright.sync_api import Browser, Page, expect, sync_playwright
from playwright.sync_api import TimeoutError as PlaywrightTimeoutError

import abstractgateway as gw
from conftest import LiveServer, make_gateway, pack_bundle, wait_for

API = "/api/gateway"
# Debian's chromium-headless-shell (Chromium's engine without the desktop browser around it: what
# Playwright itself runs headless, at a quarter of the full browser's CPU), else Debian's chromium.
CHROMIUM = next((path for path in ("/usr/bin/chromium-headless-shell", "/usr/bin/chromium")
                 if Path(path).exists()), "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
CONSOLE_FILES = ("/", "/console", "/console/console.js", "/console/console.css")

expect.set_options(timeout=15_000)


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def server(data_dir: Path) -> Iterator[LiveServer]:
    s = LiveServer(data_dir)
    yield s
    s.close()


class Console:
    """One browser tab on the console, recording every request it makes and every script error."""

    def __init__(self, browser: Browser, server: LiveServer, **context_options) -> None:
        self.server = server
        self.context = browser.new_context(accept_downloads=True, **context_options)
        self.page: Page = self.context.new_page()
        self.requests: List[str] = []
        self.errors: List[str] = []
        self.page.on("request", lambda r: self.requests.append(r.url))
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))

    def open(self, path: str = "/") -> Page:
        self.page.goto(self.server.base + path)
        expect(self.page.locator("body")).to_have_attribute("data-ready", "1")
        return self.page

    def sign_in(self, token: str | None = None) -> Page:
        page = self.page
        page.get_by_label("API token").fill(token or self.server.TOKEN)
        page.get_by_role("button", name="Sign in").click()
        return page

    def signed_in(self, path: str = "/") -> Page:
        self.open(path)
        self.sign_in()
        expect(self.page.locator("#nav")).to_be_visible()
        return self.page

    def close(self) -> None:
        self.context.close()
        assert not self.errors, self.errors
        foreign = [u for u in self.requests
                   if not u.startswith(self.server.base + "/") and not u.startswith(("blob:", "data:"))]
        assert not foreign, foreign
        assert not [u for u in self.requests if self.server.TOKEN in u]  # the token never travels in a URL


@pytest.fixture
def console(browser: Browser, server: LiveServer) -> Iterator[Console]:
    c = Console(browser, server)
    yield c
    c.close()


def _start(server: LiveServer, **body) -> str:
    status, _, data = server.post(f"{API}/runs/start", body)
    assert status == 200, data
    return data["run_id"]


def _status(server: LiveServer, run_id: str) -> str:
    return server.get(f"{API}/runs/{run_id}")[2]["status"]


# -- serving ----------------------------------------------------------------------------------------


def test_console_is_served_with_a_strict_csp_and_no_inline_code(server):
    for path in CONSOLE_FILES:
        status, headers, body = server.get(path, token=None)
        assert status == 200, path
        csp = headers["Content-Security-Policy"]
        assert "default-src 'self'" in csp and "frame-ancestors 'none'" in csp and "unsafe-inline" not in csp
        assert headers["X-Frame-Options"] == "DENY" and headers["X-Content-Type-Options"] == "nosniff"
    _, headers, page = server.get("/", token=None)
    assert headers["Content-Type"].startswith("text/html")
    html = page.decode()
    assert '<script src="/console/console.js"' in html and "<script>" not in html and "<style" not in html
    # nothing inline, nothing external
    assert " style=" not in html and "http://" not in html and "https://" not in html
    assert server.get("/console/console.js", token=None)[1]["Content-Type"].startswith("text/javascript")
    assert server.get("/console/console.css", token=None)[1]["Content-Type"].startswith("text/css")
    js = server.get("/console/console.js", token=None)[2].decode()
    assert "http://" not in js and "https://" not in js and "EventSource" not in js.replace("EventSource cannot", "")


def test_console_setting_off_answers_404(data_dir):
    server = LiveServer(data_dir, console="0")
    try:
        for path in CONSOLE_FILES:
            status, _, data = server.get(path, token=None)
            assert status == 404 and data["code"] == "not_found", path
        assert server.get(f"{API}/ping")[0] == 200  # the API itself is untouched
    finally:
        server.close()


# -- sign-in ----------------------------------------------------------------------------------------


def test_sign_in_shows_the_gateway_and_a_bad_token_is_explained(browser, data_dir):
    server = LiveServer(data_dir, lockout_after="2", lockout_base_s="30")
    console = Console(browser, server)
    try:
        page = console.open()
        expect(page.locator("#info-status")).to_have_text("healthy")
        expect(page.locator("#info-version")).to_have_text(gw.__version__)
        expect(page.locator("#info-backend")).to_have_text("sqlite")
        expect(page.locator("#info-runner")).to_contain_text("alive")
        expect(page.locator("#info-db")).to_have_text("shown after sign-in")
        console.sign_in("wrong-token-0123456789")
        expect(page.get_by_role("alert")).to_contain_text("did not accept this token (401 Unauthorized)")
        expect(page.locator("#nav")).to_be_hidden()
        console.sign_in("another-wrong-token-0123")
        alert = page.get_by_role("alert")
        expect(alert).to_contain_text("locks it out for 30 s (Retry-After: 30)")
        expect(alert).to_contain_text("doubles the wait")
        expect(page.locator("#signin-button")).to_be_disabled()
        expect(page.locator("#signin-button")).to_contain_text("wait")
        assert page.evaluate("sessionStorage.length") == 0  # a refused token is not kept
    finally:
        console.close()
        server.close()


def test_sign_in_keeps_the_token_for_the_tab_only(console, server):
    page = console.signed_in()
    expect(page.locator("#info-db")).to_have_text(str(server.gateway.config.db_path))
    assert page.evaluate("Object.values(sessionStorage)") == [server.TOKEN]
    assert page.evaluate("localStorage.length") == 0 and page.evaluate("document.cookie") == ""
    page.reload()  # same tab: still signed in
    expect(page.locator("#nav")).to_be_visible()
    page.get_by_role("button", name="Sign out").click()
    expect(page.get_by_label("API token")).to_be_visible()
    assert page.evaluate("sessionStorage.length") == 0


# -- the main flow: upload, start from the generated form, answer, complete -------------------------


def test_upload_start_answer_and_see_the_ledger(console, server, tmp_path):
    bundle = pack_bundle(tmp_path / "up", "ask", bundle_id="interview", version="2.0.0")
    page = console.signed_in()
    page.get_by_role("link", name="Bundles").click()
    page.get_by_label("Bundle file (.flow)").set_input_files(str(bundle))
    expect(page.locator("#upload-note")).to_contain_text("Uploaded interview@2.0.0 (1 entrypoint)")
    card = page.locator("[data-bundle=interview]")
    expect(card).to_contain_text("uploaded")
    card.get_by_role("link", name="Start").click()
    question = page.get_by_label("question")
    expect(question).to_have_value("Your name?")  # the pin's default
    question.fill("What is your name, operator?")
    page.get_by_role("button", name="Start run").click()
    expect(page.locator("#wait-title")).to_have_text("Question")
    expect(page.locator("#wait-prompt")).to_have_text("What is your name, operator?")
    run_id = page.locator("#run-id").inner_text()
    assert server.gateway.stores.runs.load(run_id).workflow_id == "interview@2.0.0:ask"
    page.get_by_label("Your answer").fill("Ada")
    page.get_by_role("button", name="Send answer").click()
    expect(page.locator("#run-status")).to_have_text("completed")
    expect(page.locator("#run-wait")).to_be_hidden()
    total = server.gateway.stores.ledger.count(run_id)
    expect(page.locator("#ledger-count")).to_have_text(f"{total} records")
    expect(page.locator("#ledger-state")).to_contain_text("complete")
    rows = page.locator("#ledger li")
    expect(rows).to_have_count(total)
    expect(rows.nth(0)).to_contain_text("ask_user")
    rows.nth(2).click()  # the resume record expands to its JSON
    expect(rows.nth(2).locator("pre")).to_contain_text('"response": "Ada"')
    expect(page.locator("#run-commands li")).to_contain_text("resume")
    expect(page.locator("#run-commands li")).to_contain_text("applied")
    assert server.gateway.stores.runs.load(run_id).output["answer"] == "Ada"
    page.get_by_role("link", name="Runs").click()
    row = page.locator(f"tr[data-run='{run_id}']")
    expect(row).to_contain_text("completed")
    expect(row).to_contain_text("interview@2.0.0:ask")


def test_drag_and_drop_upload_then_deprecate_undeprecate_and_remove(console, server, tmp_path):
    bundle = pack_bundle(tmp_path / "up", "echo", bundle_id="dropped", version="1.0.0")
    page = console.signed_in("/#/bundles")
    expect(page.locator("[data-bundle=echo]")).to_be_visible()
    data = list(bundle.read_bytes())
    transfer = page.evaluate_handle(
        "bytes => { const t = new DataTransfer(); "
        "t.items.add(new File([new Uint8Array(bytes)], 'dropped@1.0.0.flow')); return t; }", data)
    page.dispatch_event("#upload-form", "drop", {"dataTransfer": transfer})
    card = page.locator("[data-bundle=dropped]")
    expect(card).to_be_visible()
    card.get_by_role("button", name="Deprecate", exact=True).click()
    page.get_by_label("Reason (optional)").fill("replaced by v2")
    page.get_by_role("dialog").get_by_role("button", name="Deprecate").click()
    expect(card).to_contain_text("deprecated")
    expect(card).to_contain_text("replaced by v2")
    assert server.post(f"{API}/runs/start", {"bundle_id": "dropped"})[0] == 409
    card.get_by_role("button", name="Undeprecate", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Undeprecate").click()
    expect(card.get_by_role("link", name="Start")).to_be_visible()
    card.get_by_role("button", name="Remove").click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel").click()  # a confirmation can be declined
    expect(card).to_be_visible()
    card.get_by_role("button", name="Remove").click()
    page.get_by_role("dialog").get_by_role("button", name="Remove").click()
    expect(page.locator("[data-bundle=dropped]")).to_have_count(0)
    assert server.get(f"{API}/bundles/dropped")[0] == 404


def test_a_start_form_shown_again_takes_no_typing_until_its_inputs_are_loaded(console, server):
    """Back on the start form of an entrypoint shown before, its old fields go at once and the button waits
    for the new ones: text typed meanwhile can't be wiped when they arrive (the run would start without it)."""
    page = console.signed_in()

    def open_start_form():
        page.get_by_role("link", name="Bundles").click()
        page.locator("[data-bundle=ask]").get_by_role("link", name="Start").first.click()

    open_start_form()
    expect(page.get_by_label("question")).to_have_value("Your name?")
    held = []
    details = re.compile(r".*/api/gateway/bundles/ask$")
    page.route(details, lambda route: held.append(route))  # the entrypoint's inputs do not arrive until released
    open_start_form()
    expect(page.locator("#start-inputs")).to_contain_text("Loading the inputs")
    expect(page.get_by_label("question")).to_have_count(0)
    expect(page.get_by_role("button", name="Start run")).to_be_disabled()
    assert len(held) == 1
    held[0].continue_()
    page.unroute(details)
    page.get_by_label("question").fill("Typed after the inputs came?")
    page.get_by_role("button", name="Start run").click()
    expect(page.locator("#wait-prompt")).to_have_text("Typed after the inputs came?")


def test_bundles_show_needs_and_load_errors_and_a_refused_start_says_why(browser, data_dir):
    import shutil

    from conftest import FIXTURE_BUNDLES

    flows = data_dir / "fixtures"
    shutil.copytree(FIXTURE_BUNDLES, flows)
    (flows / "broken@1.0.0.flow").write_bytes(b"not a zip at all")
    server = LiveServer(data_dir, flows_dir=str(flows))
    console = Console(browser, server)
    try:
        page = console.signed_in("/#/bundles")
        expect(page.locator("[data-bundle=broken]")).to_contain_text("Load error:")
        expect(page.locator("[data-bundle=basic-llm-test]")).to_contain_text("Needs: llm:")
        media = page.locator("[data-bundle=features]")  # voice, image and music nodes: nothing here runs them
        expect(media).to_contain_text("Needs:")
        media.get_by_role("link", name="Start").first.click()
        page.get_by_role("button", name="Start run").click()
        expect(page.get_by_role("alert")).to_contain_text("(422 capability_missing")
        expect(page.locator("#view-start")).to_be_visible()  # no run was opened
    finally:
        console.close()
        server.close()


# -- run control ------------------------------------------------------------------------------------


def test_pause_resume_and_cancel_a_waiting_run(console, server):
    run_id = _start(server, bundle_id="wait-key")
    wait_for(lambda: _status(server, run_id) == "waiting")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#run-status")).to_have_text("waiting")
    expect(page.locator("#wait-body")).to_contain_text("my-key")
    expect(page.locator("#run-resume")).to_be_disabled()
    page.get_by_role("button", name="Pause", exact=True).click()
    page.get_by_label("Reason (optional)").fill("lunch")
    page.get_by_role("dialog").get_by_role("button", name="Pause").click()
    expect(page.locator("#run-note")).to_have_text("Pause: applied.")
    expect(page.locator("#run-status")).to_have_text("waiting · paused")
    expect(page.locator("#run-meta")).to_contain_text("lunch")
    expect(page.locator("#wait-body")).to_contain_text("resume it before answering")
    page.get_by_role("button", name="Resume", exact=True).click()
    expect(page.locator("#run-note")).to_have_text("Resume: applied.")
    expect(page.locator("#run-status")).to_have_text("waiting")
    page.get_by_role("button", name="Cancel", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Cancel run").click()
    expect(page.locator("#run-note")).to_have_text("Cancel: applied.")
    expect(page.locator("#run-status")).to_have_text("cancelled")
    for button in ("#run-pause", "#run-resume", "#run-cancel"):
        expect(page.locator(button)).to_be_disabled()
    expect(page.locator("#run-commands li")).to_have_count(3)
    assert _status(server, run_id) == "cancelled"


def test_pausing_a_question_explains_that_it_stays_as_it_is(console, server):
    run_id = _start(server, bundle_id="ask")
    wait_for(lambda: _status(server, run_id) == "waiting")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#wait-prompt")).to_have_text("Your name?")
    page.get_by_role("button", name="Pause", exact=True).click()
    page.get_by_role("dialog").get_by_role("button", name="Pause").click()
    expect(page.locator("#run-note")).to_contain_text("A run waiting for an answer stays as it is")
    expect(page.locator("#wait-prompt")).to_have_text("Your name?")


def test_a_failed_command_shows_its_reason(console, server):
    run_id = _start(server, bundle_id="echo")
    wait_for(lambda: _status(server, run_id) == "completed")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#run-status")).to_have_text("completed")
    page.evaluate("id => sendCommand(id, 'resume', {payload: {response: 'late'}}, 'Late answer')", run_id)
    expect(page.locator("#run-note")).to_contain_text("Late answer failed: Run")
    expect(page.locator("#run-note")).to_contain_text("is not waiting")
    expect(page.locator("#run-commands")).to_contain_text("failed")


def test_event_wait_is_answered_with_the_emit_form(console, server):
    run_id = _start(server, bundle_id="event")
    wait_for(lambda: _status(server, run_id) == "waiting")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#wait-title")).to_have_text("Waiting for an event")
    expect(page.get_by_label("Event name")).to_have_value("approve")
    page.get_by_label("Payload (JSON)").fill('{"ok": true, "by": "console"}')
    page.get_by_role("button", name="Emit event").click()
    expect(page.locator("#run-status")).to_have_text("completed")
    assert server.gateway.stores.runs.load(run_id).output["payload"] == {"ok": True, "by": "console"}


def test_custom_wait_key_is_answered_with_a_resume_payload(console, server):
    run_id = _start(server, bundle_id="wait-key")
    wait_for(lambda: _status(server, run_id) == "waiting")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#wait-body")).to_contain_text("my-key")
    page.get_by_label("Payload to resume with (JSON object)").fill('{"value": 7}')
    page.get_by_role("button", name="Resume with payload").click()
    expect(page.locator("#run-status")).to_have_text("completed")
    assert server.gateway.stores.runs.load(run_id).output["data"] == {"value": 7}


def _as_tool_approval(server: LiveServer, run_id: str) -> str:
    """Turn a run's user wait into a tool-approval wait of the shape the runtime's passthrough tool
    executor writes (`details.mode == "approval_required"`). The ask node resumes with whatever
    payload comes back, so the run completes; the command inbox shows what the page sent."""
    gateway = server.gateway
    with gateway.runs_locked([run_id]):
        run = gateway.stores.runs.load(run_id)
        run.waiting.reason = gw.WaitReason.EVENT
        run.waiting.prompt = None
        run.waiting.details = {"mode": "approval_required", "tool_calls": [
            {"name": "execute_command", "arguments": {"command": "ls -la /tmp"}, "call_id": "call_1",
             "runtime_call_id": "rtcall_1"}]}
        run.updated_at = gw.utc_now_iso()
        gateway.stores.runs.save(run)
    return run.waiting.wait_key


@pytest.mark.parametrize("decision", ["approve", "approve_with_result", "deny"])
def test_tool_approval_shows_the_call_and_sends_the_decision(console, server, decision):
    run_id = _start(server, bundle_id="ask")
    wait_for(lambda: _status(server, run_id) == "waiting")
    wait_key = _as_tool_approval(server, run_id)
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#wait-title")).to_have_text("Tool approval")
    expect(page.locator("#approval")).to_contain_text("execute_command")
    expect(page.locator("#approval pre.args")).to_contain_text('"command": "ls -la /tmp"')
    if decision == "approve":
        page.get_by_role("button", name="Approve").click()
        expected = {"approved": True, "runtime_call_ids": ["rtcall_1"]}
    elif decision == "approve_with_result":
        page.get_by_label("Result to return (optional)").fill("total 0")
        page.get_by_role("button", name="Approve").click()
        expected = {"mode": "executed", "results": [{"call_id": "call_1", "runtime_call_id": "rtcall_1",
                                                      "name": "execute_command", "success": True,
                                                      "output": "total 0", "error": None}]}
    else:
        page.get_by_label("Reason if denied (optional)").fill("not on this machine")
        page.get_by_role("button", name="Deny").click()
        expected = {"approved": False, "reason": "not on this machine", "runtime_call_ids": ["rtcall_1"]}
    expect(page.locator("#run-status")).to_have_text("completed")  # the runtime took the resume
    (command,) = server.gateway.stores.commands.for_run(run_id, limit=10)
    assert command.type == "resume" and command.payload == {"wait_key": wait_key, "payload": expected}


@pytest.fixture
def llm_server(data_dir: Path, monkeypatch) -> Iterator[tuple]:
    """A live gateway on the fixtures' real bundles, its providers pointed at the fake model server."""
    from conftest import FIXTURE_BUNDLES
    from fake_llm import FakeLLM

    fake = FakeLLM().start()
    for name, value in fake.provider_env().items():
        monkeypatch.setenv(name, value)
    server = LiveServer(data_dir, flows_dir=str(FIXTURE_BUNDLES))
    yield server, fake
    server.close()
    fake.close()


def _start_from_the_form(page: Page, bundle: str, prompt: str) -> str:
    page.get_by_role("link", name="Bundles").click()
    page.locator(f"[data-bundle={bundle}]").get_by_role("link", name="Start").first.click()
    expect(page.get_by_label("Entrypoint")).to_have_value(re.compile(f"^{bundle}\\n"))
    page.get_by_label("prompt").fill(prompt)
    page.get_by_role("button", name="Start run").click()
    expect(page).to_have_url(re.compile(r"#/run/[^/]+$"))  # the new run opens
    run_id = page.url.rsplit("/", 1)[1]
    expect(page.locator("#run-id")).to_have_text(run_id)
    return run_id


def _go(page: Page, fragment: str) -> None:
    page.evaluate("h => { location.hash = h; }", fragment)


def _open_the_approval(page: Page, server: LiveServer) -> str:
    """Wait for the tool approval (shown on the root run's page too), then open the run it answers."""
    approval = page.locator("#approval")
    try:
        expect(approval).to_be_visible(timeout=60_000)
    except AssertionError as exc:  # say why: the runs that failed meanwhile, with their errors
        failed = [(r.run_id, r.workflow_id, r.error) for r in server.gateway.stores.runs.list_runs(limit=100)
                  if r.status.value == "failed"]
        raise AssertionError(f"no tool approval appeared; failed runs: {failed}") from exc
    target = approval.get_attribute("data-run")
    if target != page.locator("#run-id").inner_text():
        _go(page, f"#/run/{target}")
        expect(page.locator("#run-id")).to_have_text(target)
    expect(page.locator("#wait-title")).to_have_text("Tool approval")
    return target


def test_a_descendant_s_tool_approval_is_answered_from_the_root_run(browser, llm_server):
    """The agent's tool call parks a child run; the operator who opened the run they started sees the
    approval there (following the chain of subworkflow waits) and the denial goes to the child that asked."""
    server, fake = llm_server
    console = Console(browser, server)
    try:
        page = console.signed_in()
        root = _start_from_the_form(page, "test", "Please use execute_command to run echo hello")
        approval = page.locator("#approval")
        expect(approval).to_be_visible(timeout=60_000)
        expect(page.locator("#run-id")).to_have_text(root)  # still the root's page
        child = approval.get_attribute("data-run")
        assert child and child != root
        expect(page.locator("#wait-body .asking a")).to_have_text(child)
        expect(page.locator("#wait-title")).to_have_text("Tool approval")
        expect(approval.locator("strong")).to_have_text("execute_command")
        page.get_by_label("Reason if denied (optional)").fill("not from the root page")
        page.get_by_role("button", name="Deny").click()
        expect(page.locator("#run-note")).to_have_text("Denial: applied.")  # the form leaves with the wait
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)  # the root went on too
        expect(page.locator("#run-wait")).to_be_hidden()
        (command,) = server.gateway.stores.commands.for_run(child, limit=10)
        payload = command.payload["payload"]
        assert payload["approved"] is False and payload["reason"] == "not from the root page"
        assert len(payload["runtime_call_ids"]) == 1 and payload["runtime_call_ids"][0].startswith("rtcall")
        assert server.gateway.stores.commands.for_run(root, limit=10) == []
    finally:
        console.close()


def test_a_real_tool_call_is_approved_with_a_result_and_another_denied(browser, llm_server):
    """The `test` bundle's agent, on the fake model, asks to run `execute_command`; the gateway (passthrough
    tool mode) parks it on an approval wait. The operator answers from the console: the first run with the
    command's output, the second with a denial; both agents go on and their runs complete."""
    server, fake = llm_server
    console = Console(browser, server)
    try:
        page = console.signed_in()
        root = _start_from_the_form(page, "test", "Please use execute_command to run echo hello")
        child = _open_the_approval(page, server)
        assert child != root
        approval = page.locator("#approval")
        expect(approval).to_contain_text("The run asks to call this tool:")
        expect(approval.locator("strong")).to_have_text("execute_command")
        expect(approval.locator("pre.args")).to_contain_text('"command": "echo hello"')
        expect(page.locator("#run-status")).to_have_text("waiting")
        expect(page.locator("#approval-mode")).to_contain_text("runs no tool itself (passthrough tool mode)")
        page.get_by_label("Result to return (optional)").fill("hello from the operator")
        page.get_by_role("button", name="Approve").click()
        expect(approval.locator(".note")).to_have_text("Approval with results: applied.")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)  # the agent went on
        expect(page.locator("#run-wait")).to_be_hidden()
        expect(page.locator("#run-commands li")).to_contain_text("applied")
        _go(page, f"#/run/{root}")
        expect(page.locator("#run-id")).to_have_text(root)
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        tool_messages = [m for r in fake.requests for m in r["messages"] if m.get("role") == "tool"]
        assert any("hello from the operator" in str(m.get("content")) for m in tool_messages)  # the model saw it
        (command,) = server.gateway.stores.commands.for_run(child, limit=10)
        [result] = command.payload["payload"]["results"]
        assert result["runtime_call_id"]  # names the step's call, so a late duplicate answer is refused

        calls, first = fake.calls, (root, child)
        root = _start_from_the_form(page, "test", "Please use execute_command to run echo again")
        child = _open_the_approval(page, server)
        assert root not in first and child not in first
        expect(page.locator("#approval pre.args")).to_contain_text('"command": "echo hello"')
        page.get_by_label("Reason if denied (optional)").fill("not on this machine")
        page.get_by_role("button", name="Deny").click()
        expect(page.locator("#approval .note")).to_have_text("Denial: applied.")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        resume = page.locator("#ledger li").filter(has_text="resume")  # the denial, as the tool's failed result
        expect(resume).to_have_count(1)
        resume.click()
        expect(resume.locator("pre")).to_contain_text('"error": "not on this machine"')
        expect(resume.locator("pre")).to_contain_text('"success": false')
        _go(page, f"#/run/{root}")
        expect(page.locator("#run-id")).to_have_text(root)
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        assert fake.calls == calls + 2  # the tool call, then an answer after the denial
        denied = [m for m in fake.requests[-1]["messages"] if m.get("role") == "tool"]
        assert denied and "not on this machine" in str(denied[-1].get("content"))
    finally:
        console.close()


def test_approving_without_a_result_in_passthrough_mode_does_what_the_page_says(browser, llm_server):
    """Passthrough mode runs no tool: a bare approval reaches the agent as a failed result, as the box warns."""
    server, fake = llm_server
    console = Console(browser, server)
    try:
        page = console.signed_in()
        root = _start_from_the_form(page, "test", "Please use execute_command to run echo hello")
        _open_the_approval(page, server)
        expect(page.locator("#approval-mode")).to_contain_text("approving without one answers the agent with an error")
        page.get_by_role("button", name="Approve").click()
        expect(page.locator("#approval .note")).to_have_text("Approval: applied.")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        resume = page.locator("#ledger li").filter(has_text="resume")
        resume.click()
        expect(resume.locator("pre")).to_contain_text('"success": false')
        expect(resume.locator("pre")).to_contain_text("ToolExecutor is not configured for approval resumes")
        _go(page, f"#/run/{root}")
        expect(page.locator("#run-status")).to_have_text("completed", timeout=60_000)
        [tool] = [m for m in fake.requests[-1]["messages"] if m.get("role") == "tool"]
        assert "Error: ToolExecutor is not configured" in tool["content"]  # nothing ran the command
    finally:
        console.close()


# -- tree, schedules, artifacts, audit ---------------------------------------------------------------


def test_child_runs_are_shown_as_a_tree(console, server):
    run_id = _start(server, bundle_id="parent", input_data={"text": "xy"})
    wait_for(lambda: _status(server, run_id) == "completed")
    child = next(r for r in server.get(f"{API}/runs")[2]["items"] if r["parent_run_id"] == run_id)
    page = console.signed_in(f"/#/run/{run_id}")
    tree = page.locator("#run-tree")
    expect(tree.locator(".tree > li > ul > li")).to_contain_text("parent@1.0.0:child")
    tree.locator(".tree > li > ul > li a").click()
    expect(page.locator("#run-id")).to_have_text(child["run_id"])
    expect(page.locator("#run-meta")).to_contain_text(run_id)  # the parent link
    expect(page.locator("#run-tree .here")).to_contain_text("parent@1.0.0:child")


def test_create_a_schedule_and_update_its_interval(console, server):
    page = console.signed_in("/#/schedules")
    page.get_by_role("link", name="Create a schedule").click()
    page.get_by_label("Entrypoint").select_option(label="echo (echo@1.0.0:echo)")
    expect(page.get_by_label("message")).to_have_value("hello")
    page.get_by_label("Every (e.g. 30s, 15m, 1h, 1d; empty: once)").fill("1h")
    page.get_by_role("button", name="Create schedule").click()
    box = page.locator("#run-schedule")
    expect(box).to_contain_text("echo@1.0.0:echo")
    expect(box).to_contain_text("1h")
    run_id = page.locator("#run-id").inner_text()
    expect(page.locator("#run-tree .tree ul")).to_contain_text("completed")  # the first execution, a child run
    box.get_by_label("New interval").fill("2h")
    box.get_by_role("button", name="Update schedule").click()
    expect(box).to_contain_text("Schedule update: applied.")
    expect(box.locator("dl")).to_contain_text("2h")
    assert server.get(f"{API}/runs/{run_id}")[2]["schedule"]["interval"] == "2h"
    page.get_by_role("link", name="Schedules").click()
    expect(page.locator("#schedule-list")).to_contain_text("2h")


def test_artifacts_download_with_the_token(console, server):
    run_id = _start(server, bundle_id="echo")
    wait_for(lambda: _status(server, run_id) == "completed")
    meta = server.gateway.stores.artifacts.store(b'{"report": 42}', content_type="application/json", run_id=run_id)
    page = console.signed_in(f"/#/run/{run_id}")
    link = page.locator(f"#run-artifacts a[data-artifact='{meta.artifact_id}']")
    expect(link).to_be_visible()
    answers: List[str] = []
    page.on("response", lambda r: answers.append(f"{r.status} {r.url}") if "/artifacts/" in r.url else None)
    try:
        with page.expect_download(timeout=20_000) as info:
            link.click()
    except PlaywrightTimeoutError:  # say what the page saw instead of a bare timeout
        pytest.fail(f"no download; toast: {page.locator('#toast').inner_text()!r}; artifact answers: {answers}")
    assert Path(info.value.path()).read_bytes() == b'{"report": 42}'


def test_audit_tail_lists_write_requests(console, server):
    _start(server, bundle_id="echo")
    page = console.signed_in("/#/audit")
    expect(page.locator("#audit-body")).to_contain_text("POST /api/gateway/runs/start")


# -- runs list --------------------------------------------------------------------------------------


def test_runs_list_filters_pages_and_updates_live(console, server):
    for _ in range(52):
        server.gateway.start_run(bundle_id="echo")
    wait_for(lambda: server.gateway.stores.runs.list_run_index(status=gw.RunStatus.COMPLETED,
                                                               limit=100).__len__() == 52)
    page = console.signed_in("/#/runs")
    rows = page.locator("#runs-body tr")
    expect(rows).to_have_count(50)
    page.get_by_role("button", name="Load more").click()
    expect(rows).to_have_count(52)
    expect(page.get_by_role("button", name="Load more")).to_be_hidden()
    run_id = _start(server, bundle_id="ask")  # appears on top, live
    row = page.locator(f"tr[data-run='{run_id}']")
    expect(row).to_contain_text("waiting")
    assert rows.first.get_attribute("data-run") == run_id
    page.get_by_label("Status", exact=True).select_option("waiting")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(1)
    wait_key = server.get(f"{API}/runs/{run_id}")[2]["waiting"]["wait_key"]
    server.post(f"{API}/commands", {"command_id": "live-1", "run_id": run_id, "type": "resume",
                                   "payload": {"wait_key": wait_key, "payload": {"response": "x"}}})
    expect(row).to_contain_text("completed")  # the status changes on screen without a reload
    page.get_by_label("Status", exact=True).select_option("")
    page.get_by_label("Bundle", exact=True).select_option("ask@1.0.0:ask")
    page.get_by_role("button", name="Apply").click()
    expect(rows).to_have_count(1)
    page.get_by_label("Bundle", exact=True).select_option("")
    page.get_by_label("Session", exact=True).fill("no-such-session")
    page.get_by_role("button", name="Apply").click()
    expect(page.locator("#runs-empty")).to_be_visible()


# -- the live ledger --------------------------------------------------------------------------------


def _serve_on(data_dir: Path, port: int):
    """A second gateway process-alike on the same database and port (the first one stopped)."""
    gateway = make_gateway(data_dir, port="0", auth_token=LiveServer.TOKEN)
    runner = gw.Runner(gateway).start()
    wsgi, app, _ = gw.build_wsgi(gateway, runner)
    http = gw.HttpServer(wsgi, "127.0.0.1", port, **gw.server_options(gateway))
    threading.Thread(target=http.serve_forever, daemon=True).start()
    return gateway, runner, app, http


def test_ledger_resumes_after_the_gateway_restarts(browser, data_dir):
    server = LiveServer(data_dir)
    console = Console(browser, server)
    second = None
    try:
        run_id = _start(server, bundle_id="ask")
        wait_for(lambda: _status(server, run_id) == "waiting")
        page = console.signed_in(f"/#/run/{run_id}")
        expect(page.locator("#ledger li")).to_have_count(2)
        wait_key = server.get(f"{API}/runs/{run_id}")[2]["waiting"]["wait_key"]
        server.close()  # the stream ends with done/server_stopping, then the page retries
        expect(page.locator("#ledger-state")).to_contain_text("reconnecting")
        second = _serve_on(data_dir, server.port)
        server.post(f"{API}/commands", {"command_id": "after-restart", "run_id": run_id, "type": "resume",
                                       "payload": {"wait_key": wait_key, "payload": {"response": "back"}}})
        expect(page.locator("#run-status")).to_have_text("completed")
        total = second[0].stores.ledger.count(run_id)
        rows = page.locator("#ledger li")
        expect(rows).to_have_count(total)  # resumed from Last-Event-ID: no gap, no duplicate
        cursors = [int(c) for c in page.eval_on_selector_all("#ledger li", "els => els.map(e => e.dataset.cursor)")]
        assert cursors == list(range(1, total + 1))
    finally:
        console.close()
        if second is not None:
            gateway, runner, app, http = second
            app.drain(5.0)
            http.shutdown()
            http.server_close()
            runner.stop()
            gateway.close()


def test_thousands_of_records_render_incrementally(console, server):
    from abstractruntime.core.models import StepRecord, StepStatus

    run_id = _start(server, bundle_id="ask")
    wait_for(lambda: _status(server, run_id) == "waiting")
    page = console.signed_in(f"/#/run/{run_id}")
    expect(page.locator("#ledger li")).to_have_count(2)
    # count how often the list loses children: an incremental renderer never removes one
    page.evaluate("""() => { window.removed = 0;
                      new MutationObserver(ms => ms.forEach(m => window.removed += m.removedNodes.length))
                      .observe(document.getElementById('ledger'), {childList: true, subtree: true}); }""")
    records = [StepRecord(run_id=run_id, step_id=f"s{i}", node_id=f"n{i % 7}", status=StepStatus.COMPLETED)
               for i in range(3000)]
    stores = server.gateway.stores
    for i in range(0, len(records), 500):  # in bursts, while the page is streaming
        with stores.db.transaction():
            for record in records[i:i + 500]:
                stores.ledger.append(record)
            if i == 1000:  # one record as a damaged file or another writer might hold it: shown, not fatal
                stores.ledger.append_json(run_id, '{"status": "odd status", "effect": {"type": 7}, "ended_at": 1}')
    expect(page.locator("#ledger-count")).to_have_text("3003 records")
    expect(page.locator("#ledger li")).to_have_count(3003)
    assert page.evaluate("window.removed") == 0
    last = page.locator("#ledger li").last
    last.focus()
    page.keyboard.press("Enter")  # a record opens from the keyboard too
    expect(last.locator("pre")).to_contain_text('"step_id": "s2999"')
    assert page.locator("#ledger li.st-oddstatus").count() == 1  # its status makes one class, not several
    expect(last).to_have_attribute("aria-expanded", "true")


# -- phone size and keyboard ------------------------------------------------------------------------


def test_phone_sized_screen_and_labelled_controls(browser, server):
    run_id = _start(server, bundle_id="ask")
    wait_for(lambda: _status(server, run_id) == "waiting")
    console = Console(browser, server, viewport={"width": 375, "height": 740}, is_mobile=True, has_touch=True)
    try:
        page = console.open()
        assert page.evaluate("document.activeElement.id") == "signin-token"  # focused, ready to paste
        page.keyboard.press("Tab")
        assert page.evaluate("document.activeElement.id") == "signin-button"
        page.get_by_label("API token").fill(server.TOKEN)
        page.keyboard.press("Enter")
        expect(page.locator("#nav")).to_be_visible()
        for path in ("#/runs", "#/bundles", "#/start", "#/schedules", "#/audit", f"#/run/{run_id}"):
            page.evaluate("h => { location.hash = h; }", path)
            page.wait_for_timeout(50)
            page.wait_for_load_state("networkidle")
            width = page.evaluate("document.documentElement.scrollWidth")
            assert width <= 375, (path, width)
            unlabelled = page.evaluate("""() => [...document.querySelectorAll('input, select, textarea, button')]
                .filter(e => e.offsetParent !== null)
                .filter(e => !(e.labels && e.labels.length) && !e.getAttribute('aria-label') && !e.textContent.trim())
                .map(e => e.outerHTML)""")
            assert unlabelled == [], (path, unlabelled)
        expect(page.locator("#wait-prompt")).to_have_text("Your name?")
        page.get_by_label("Your answer").focus()
        page.keyboard.type("typed on a phone")
        page.keyboard.press("Tab")
        page.keyboard.press("Enter")  # the focused "Send answer" button
        expect(page.locator("#run-status")).to_have_text("completed")
    finally:
        console.close()
