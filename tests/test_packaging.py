"""The one-file distribution: the .pyz built from the local wheel runs and serves."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import urllib.request
from pathlib import Path

import pytest

from conftest import wait_for

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_pyz_built_from_the_local_wheel_runs_and_serves(tmp_path):
    out = tmp_path / "abstractgateway.pyz"
    build = subprocess.run(["bash", str(ROOT / "packaging" / "build_pyz.sh"), "--no-verify", "--out", str(out),
                            "--python", sys.executable], capture_output=True, text=True, timeout=900)
    assert build.returncode == 0, build.stdout[-2000:] + build.stderr[-2000:]
    assert out.stat().st_size < 20 * 1024 * 1024
    # run it with a bare interpreter: only the .pyz provides the gateway and its dependencies
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ABSTRACTGATEWAY_", "PYTHONPATH", "VIRTUAL_ENV"))}
    env.update(SHIV_ROOT=str(tmp_path / "shiv"), ABSTRACTGATEWAY_DATA_DIR=str(tmp_path / "data"))
    # the base interpreter with -I -S: no site-packages at all, so everything must come from the .pyz
    python = getattr(sys, "_base_executable", sys.executable)
    version = subprocess.run([python, "-I", "-S", str(out), "--version"], env=env, capture_output=True, text=True,
                             timeout=120)
    assert version.returncode == 0 and version.stdout.startswith("abstractgateway "), version.stderr
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([python, "-I", "-S", str(out), "serve", "--port", str(port)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def healthy():
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/health", timeout=1) as resp:
                    return json.loads(resp.read())["status"] == "healthy"
            except OSError:
                return False

        wait_for(healthy, timeout=60, interval=0.1)
        for path in ("/console", "/console/console.js", "/console/console.css"):  # shipped inside the .pyz
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
                assert resp.status == 200 and resp.headers["Content-Security-Policy"], path
    finally:
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    assert proc.returncode == 0, stderr
    assert (tmp_path / "data" / "gateway.sqlite3").exists()  # the schema was found inside the zip
