"""docs/getting-started.md runs as written: every shell block, in order, in one bash session, against a
real `abstractgateway serve` on a loopback port, a temp home (so a temp SQLite file) and the fake model.

What a reader types and what the test runs differ only in these rules, each checked here:
- install lines (`python -m pip install ...`, `pipx install ...`) are not run (this venv has the
  package): the project name, the `.` (this checkout) and each extra they name are checked in
  pyproject.toml instead;
- `abstractgateway serve` (in the foreground for a reader) is started in the background by a shell
  function, which waits until /api/health answers; a later `serve` first stops the one before;
- the gateway listens on a free port instead of 8080, and the model servers the guide names
  (127.0.0.1:1234 and :11434) are the fake model server (tests/fake_llm.py);
- files the guide uploads (`my-flow@1.0.0.flow`, `my-agent@1.0.0.flow`) are in the working dir;
- every `curl` fails on an HTTP error (`--fail-with-body`), and `set -euo pipefail` stops at the first
  failing command or unset variable.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    from pip._vendor import tomli as tomllib

import abstractgateway as gw
from conftest import FIXTURE_BUNDLES, make_config, pack_bundle
from fake_llm import FakeLLM

ROOT = Path(__file__).resolve().parents[1]
GUIDE = ROOT / "docs" / "getting-started.md"
INSTALL = re.compile(r"^(?:python -m pip|pipx) install (\S+)")

PREAMBLE = r"""
set -euo pipefail
curl() { command curl --fail-with-body -sS "$@"; echo; }   # an HTTP error fails the line
abstractgateway() {
  if [ "${1:-}" = serve ]; then _serve "$@"; else command abstractgateway "$@"; fi
}
_stop_serve() {
  if [ -s "$SERVE_PID" ]; then
    local pid; pid=$(cat "$SERVE_PID"); : > "$SERVE_PID"
    kill -TERM "$pid"
    while kill -0 "$pid" 2>/dev/null; do sleep 0.02; done
  fi
}
_serve() {
  _stop_serve
  : > "$SERVE_LOG"
  command abstractgateway "$@" > "$SERVE_LOG" 2>&1 &
  echo $! > "$SERVE_PID"
  disown
  local deadline=$((SECONDS + 60))
  until grep -q "runner   :" "$SERVE_LOG"; do       # the banner's last line: listening, bundles loaded
    if ! kill -0 "$(cat "$SERVE_PID")" 2>/dev/null || [ $SECONDS -gt $deadline ]; then
      cat "$SERVE_LOG" >&2; echo "serve did not start" >&2; return 1
    fi
    sleep 0.02
  done
  GW_PORT=$(sed -n 's|.*listening on http://127.0.0.1:\([0-9]*\).*|\1|p' "$SERVE_LOG")
  export ABSTRACTGATEWAY_PORT=$GW_PORT   # a later serve listens where the reader's URLs point
  command curl -sf "http://127.0.0.1:$GW_PORT/api/health" > /dev/null
}
trap _stop_serve EXIT   # the shell stops (and reaps) the last server when the guide is done
"""

# After the guide: wait until what the reader started has finished (the test's own lines, not the guide's).
EPILOGUE = r"""
_await() {
  local deadline=$((SECONDS + 60))
  until command curl -sf -H "$H" "$GW/$1" | python3 -c "import json, sys; d = json.load(sys.stdin); sys.exit(not ($2))"
  do
    [ $SECONDS -lt $deadline ] || { echo "timed out waiting for $1: $2" >&2; return 1; }
    sleep 0.05
  done
}
_await commands/t-1 'd["status"] != "pending"'
_await "runs/$RUN" 'd["status"] in ("completed", "failed", "cancelled")'
"""


def shell_blocks(text: str) -> list:
    return re.findall(r"^```sh\n(.*?)^```", text, flags=re.S | re.M)


def _repacked(source: Path, out: Path, bundle_id: str, version: str) -> None:
    with zipfile.ZipFile(source) as archive, zipfile.ZipFile(out, "w", zipfile.ZIP_DEFLATED) as copy:
        for info in archive.infolist():
            data = archive.read(info)
            if info.filename == "manifest.json":
                manifest = json.loads(data)
                manifest.update(bundle_id=bundle_id, bundle_version=version)
                data = json.dumps(manifest).encode()
            copy.writestr(info.filename, data)


def _script(blocks: list, fake: FakeLLM) -> tuple:
    """(the bash script, the install specs it left out)."""
    installs, lines = [], []
    for block in blocks:
        for line in block.splitlines():
            found = INSTALL.match(line.strip())
            if found:
                installs.append(found.group(1).strip("'\""))
                continue
            line = line.replace("127.0.0.1:8080", "127.0.0.1:$GW_PORT")
            line = line.replace("http://127.0.0.1:1234/v1", fake.base_url)
            line = line.replace("http://127.0.0.1:11434", fake.base_url.rsplit("/", 1)[0])
            lines.append(line)
    return PREAMBLE + "\n".join(lines) + "\n" + EPILOGUE, installs


def test_the_guide_names_only_what_pyproject_installs():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    _, installs = _script(shell_blocks(GUIDE.read_text()), FakeLLM())
    assert installs, "the guide has no install line"
    for spec in installs:
        target, _, extras = spec.partition("[")
        assert target == ".", spec  # this checkout, whose pyproject.toml is read here
        assert set(filter(None, extras.rstrip("]").split(","))) <= set(project["optional-dependencies"]), spec
    assert project["name"] == "abstractgateway" and project["scripts"]["abstractgateway"] == "abstractgateway:main"


@pytest.mark.slow
def test_every_shell_block_of_getting_started_runs_against_a_live_gateway(tmp_path):
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    home.mkdir()
    pack_bundle(work, "ask", bundle_id="my-flow")  # asks its user a question, as the guide's my-flow does
    _repacked(FIXTURE_BUNDLES / "test@dev.flow", work / "my-agent@1.0.0.flow", "my-agent", "1.0.0")  # an agent
    fake = FakeLLM().start()
    bindir = str(Path(sys.executable).parent)  # this venv's `abstractgateway` and `python3`
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("ABSTRACTGATEWAY_", "XDG_", "OPENAI_", "LMSTUDIO_", "OLLAMA_", "VIRTUAL_ENV"))}
    env.update(HOME=str(home), PATH=f"{bindir}:{env.get('PATH', '/usr/bin:/bin')}", ABSTRACTGATEWAY_PORT="0",
               SERVE_LOG=str(tmp_path / "serve.log"), SERVE_PID=str(tmp_path / "serve.pid"))
    script, _ = _script(shell_blocks(GUIDE.read_text()), fake)
    (tmp_path / "guide.sh").write_text(script)
    try:
        out = subprocess.run(["bash", str(tmp_path / "guide.sh")], cwd=work, env=env, capture_output=True, text=True,
                             timeout=180)
        assert out.returncode == 0, f"{out.stdout[-3000:]}\n--- stderr\n{out.stderr[-3000:]}\n--- serve log\n" + (
            tmp_path / "serve.log").read_text()[-2000:]
        # what the reader saw: the first run's stream ended with the run, the answer and the tool result applied
        assert "event: done" in out.stdout, out.stdout[-3000:]
    finally:
        fake.close()
    stores = gw.open_stores(make_config(home / ".local" / "share" / "abstractgateway"))
    try:
        assert [o["status"] for o in map(stores.outcomes.get, ("c-1", "t-1"))] == ["applied", "applied"]
        roots = {run.workflow_id.split("@")[0]: run for run in stores.runs.list_runs(limit=100)
                 if not run.parent_run_id}
        assert set(roots) == {"my-flow", "my-agent"}
        assert [roots[b].status.value for b in ("my-flow", "my-agent")] == ["completed", "completed"]
        assert roots["my-flow"].output and "yes" in json.dumps(roots["my-flow"].output)  # the reader's answer
    finally:
        stores.close()
    tool_results = [m for r in fake.requests for m in r["messages"] if m.get("role") == "tool"]
    assert any("a.txt" in str(m.get("content")) for m in tool_results)  # the model saw the guide's tool output
