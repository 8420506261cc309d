"""Shared fixtures: a temp data dir, opened stores, a tiny no-LLM workflow."""

from __future__ import annotations

import json
import os
import signal
import socket
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any, Iterator, List, Optional, Tuple

import pytest

import abstractgateway as gw
from abstractruntime import Effect, EffectType, StepPlan, WorkflowSpec

# Cache bytecode even where the environment says not to (PYTHONDONTWRITEBYTECODE): the suite starts
# about a hundred gateway processes, and without a cached .pyc each one compiles the module's
# 8,000+ lines again (0.2 s of CPU apiece), and each xdist worker re-rewrites every test module.
sys.dont_write_bytecode = False
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)


def pytest_collection_modifyitems(config: pytest.Config, items: List[pytest.Item]) -> None:
    """Run the tests marked `slow` first (keeping the order otherwise): with pytest-xdist (`-n`) they
    then overlap with the many short tests instead of being the last ones left running."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    d = tmp_path / "data"
    d.mkdir()
    return d


def setting_env(key: str) -> str:
    """The env var of a setting given by its name (`busy_timeout_s`) or its env var's suffix
    (`sqlite_busy_timeout_s`); an unknown key is an error, never a value silently ignored."""
    for setting in gw.SETTINGS:
        if key == setting.name or f"ABSTRACTGATEWAY_{key.upper()}" == setting.env:
            return setting.env
    raise KeyError(f"no setting named {key!r}")


def make_config(data_dir: Path, **env: str) -> gw.Config:
    environ = {"ABSTRACTGATEWAY_DATA_DIR": str(data_dir)}
    environ.update({setting_env(k): v for k, v in env.items()})
    return gw.Config.load(environ=environ)


@pytest.fixture
def stores(data_dir: Path) -> Iterator[gw.Stores]:
    s = gw.open_stores(make_config(data_dir))
    yield s
    s.close()


@pytest.fixture
def file_stores(data_dir: Path) -> Iterator[gw.Stores]:
    s = gw.open_stores(make_config(data_dir, store_backend="file"))
    yield s
    s.close()


def ask_then_echo_workflow() -> WorkflowSpec:
    """start -> ask the user (WAITING) -> echo the answer -> complete. No LLM involved."""

    def start(run, ctx):
        run.vars["greeting"] = "hello " + str(run.vars.get("name", "world"))
        return StepPlan(node_id="start", next_node="ask")

    def ask(run, ctx):
        return StepPlan(
            node_id="ask",
            effect=Effect(type=EffectType.ASK_USER, payload={"prompt": "who are you?"}, result_key="answer"),
            next_node="done",
        )

    def done(run, ctx):
        return StepPlan(node_id="done",
                        complete_output={"greeting": run.vars["greeting"], "answer": run.vars.get("answer")})

    return WorkflowSpec(workflow_id="test:ask_echo", entry_node="start",
                        nodes={"start": start, "ask": ask, "done": done})


FLOWS = Path(__file__).parent / "flows"
FIXTURE_BUNDLES = Path(__file__).parent / "fixtures" / "bundles"  # the original project's real .flow files


def pack_bundle(out_dir: Path, root: str, *, bundle_id: str | None = None, version: str = "1.0.0",
                flows_dir: Path = FLOWS) -> Path:
    """Pack `<flows_dir>/<root>.json` (and the subflows it references) into a `.flow` file."""
    from abstractruntime.workflow_bundle import pack_workflow_bundle

    out_dir.mkdir(parents=True, exist_ok=True)
    bid = bundle_id or root.replace("_", "-")
    out = out_dir / f"{bid}@{version}.flow"
    pack_workflow_bundle(root_flow_json=flows_dir / f"{root}.json", out_path=out, bundle_id=bid,
                         bundle_version=version, flows_dir=flows_dir)
    return out


@pytest.fixture
def bundle_builder(tmp_path: Path):
    """Packs small no-LLM test flows: `bundle_builder("echo")` -> path of a `.flow` file."""
    def build(root: str, **kwargs) -> Path:
        return pack_bundle(kwargs.pop("out_dir", tmp_path / "built"), root, **kwargs)
    return build


TEST_BUNDLES = ("echo", "ask", "event", "parent", "timer_loop", "wait_key")


def make_gateway(data_dir: Path, **env: str) -> gw.Gateway:
    flows = data_dir / "flows"
    if not flows.exists():
        for root in TEST_BUNDLES:
            pack_bundle(flows, root)
    return gw.Gateway(make_config(data_dir, **env))


@pytest.fixture
def gateway(data_dir: Path) -> Iterator[gw.Gateway]:
    g = make_gateway(data_dir)
    yield g
    g.close()


@pytest.fixture
def runner(gateway: gw.Gateway) -> Iterator[gw.Runner]:
    r = gw.Runner(gateway).start()
    yield r
    r.stop()


def wait_for(predicate, timeout: float = 10.0, interval: float = 0.01):
    """Poll `predicate` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"condition not met within {timeout}s")
        time.sleep(interval)


class LiveServer:
    """A real gateway (its HttpServer + runner) on a loopback port, over a real SQLite file."""

    TOKEN = "test-token-0123456789abcdef"

    def __init__(self, data_dir: Path, runner: bool = True, **env: str) -> None:
        import threading

        env.setdefault("auth_token", self.TOKEN)
        self.gateway = make_gateway(data_dir, port="0", **env)
        self.runner = gw.Runner(self.gateway).start() if runner else None
        self.wsgi, self.app, self.policy = gw.build_wsgi(self.gateway, self.runner)
        self.server = gw.HttpServer(self.wsgi, "127.0.0.1", 0, **gw.server_options(self.gateway))
        self.port = self.server.server_port
        self.base = f"http://127.0.0.1:{self.port}"
        self._thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self._thread.start()

    def request(self, method: str, path: str, body=None, headers=None, raw: bytes | None = None, timeout: float = 10,
                token: str | None = "default"):
        """(status, headers, parsed JSON or bytes); sends the server's token unless `token` says otherwise."""
        import http.client
        import json as _json

        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        hdrs = dict(headers or {})
        if token is not None:
            hdrs.setdefault("Authorization", f"Bearer {self.TOKEN if token == 'default' else token}")
        data = raw
        if body is not None:
            data = _json.dumps(body).encode()
            hdrs.setdefault("Content-Type", "application/json")
        conn.request(method, path, body=data, headers=hdrs)
        resp = conn.getresponse()
        payload = resp.read()
        conn.close()
        if resp.getheader("Content-Type", "").startswith("application/json"):
            return resp.status, dict(resp.getheaders()), _json.loads(payload)
        return resp.status, dict(resp.getheaders()), payload

    def get(self, path: str, **kw):
        return self.request("GET", path, **kw)

    def post(self, path: str, body=None, **kw):
        return self.request("POST", path, body=body, **kw)

    def close(self) -> None:
        self.app.drain(5.0)
        self.server.shutdown()
        self.server.server_close()
        if self.runner is not None:
            self.runner.stop()
        self.gateway.close()


@pytest.fixture
def live_server(data_dir: Path) -> Iterator[LiveServer]:
    server = LiveServer(data_dir)
    yield server
    server.close()


def multipart(fields: dict, files: dict) -> tuple[bytes, str]:
    """Encode a multipart/form-data body: returns (body, content type)."""
    import uuid

    boundary = uuid.uuid4().hex
    parts = []
    for name, value in fields.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"\r\n\r\n{value}\r\n'.encode())
    for name, (filename, content) in files.items():
        parts.append(f'--{boundary}\r\nContent-Disposition: form-data; name="{name}"; filename="{filename}"\r\n'
                     f"Content-Type: application/octet-stream\r\n\r\n".encode() + content + b"\r\n")
    parts.append(f"--{boundary}--\r\n".encode())
    return b"".join(parts), f"multipart/form-data; boundary={boundary}"


# -- real gateway processes (fault tests, bench/faults.py) ----------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def call_json(method: str, url: str, token: str, body: Any = None, timeout: float = 5.0) -> Tuple[int, Any]:
    """(status, parsed JSON body, or the text if it is not JSON); network errors raise OSError."""
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method=method,
                                 headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return resp.status, json.loads(resp.read() or b"null")
    except urllib.error.HTTPError as exc:
        raw = exc.read()
        try:
            return exc.code, json.loads(raw)
        except ValueError:
            return exc.code, raw.decode(errors="replace")


def gateway_env(data_dir: Path, token: str, **settings: str) -> dict:
    """This process's environment for a gateway process on `data_dir` (settings by name: ttl=...)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("ABSTRACTGATEWAY_")}
    env.update(ABSTRACTGATEWAY_DATA_DIR=str(data_dir), ABSTRACTGATEWAY_AUTH_TOKEN=token,
               ABSTRACTGATEWAY_POLL_S="0.05", **{setting_env(k): v for k, v in settings.items()})
    return env


def _all_threads_stopped(pid: int) -> bool:
    """True when /proc shows every thread of `pid` stopped (state T): a thread still inside a system
    call (an fsync, say) stops only when that call returns."""
    states = []
    for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
        try:
            states.append(stat.read_bytes().rsplit(b")", 1)[1].split()[0])
        except (FileNotFoundError, ProcessLookupError):
            continue  # a thread that just ended
    return bool(states) and all(state in (b"T", b"t") for state in states)


def stop_outside_a_write(pid: int, db_path: Path, tries: int = 20) -> Optional[float]:
    """SIGSTOP `pid` at a moment it holds no SQLite write lock; return when (monotonic), None if it
    was inside a write transaction at every one of `tries` stops.

    SQLite has one writer: a process stopped inside a write transaction blocks every writer, the
    standby's lease takeover included, until it continues (the API answers 503 `database_busy`
    meanwhile; docs/operations.md). Transactions are short, so that is rare, but a measurement must
    not depend on luck: the holder is stopped again when it was caught mid-commit."""
    import apsw

    for _ in range(tries):
        os.kill(pid, signal.SIGSTOP)
        stopped_at = time.monotonic()
        # kill() returns before the process has stopped: on a busy machine it may still open a write
        # after the probe below found none. Probe only once the kernel reports it stopped.
        wait_for(lambda: _all_threads_stopped(pid), timeout=10, interval=0.001)
        probe = apsw.Connection(str(db_path))
        probe.set_busy_timeout(200)
        try:
            probe.execute("BEGIN IMMEDIATE")
            probe.execute("ROLLBACK")
            return stopped_at
        except apsw.BusyError:
            os.kill(pid, signal.SIGCONT)
            time.sleep(0.01)
        finally:
            probe.close()
    return None
