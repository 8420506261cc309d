#!/usr/bin/env bash
# Smoke-test a built gateway: `--version`, then `serve` on a free port with a fresh data dir,
# GET /api/health, the console's files, SIGTERM, exit 0, database created.
#
#   packaging/smoke_test.sh PYTHON COMMAND...      e.g. smoke_test.sh python3 python3 dist/abstractgateway.pyz
#
# PYTHON runs the helper snippets (free port, health probe); COMMAND... is the gateway to test.
set -euo pipefail
PY="$1"; shift
WORK="$(mktemp -d "${TMPDIR:-/tmp}/abstractgateway-smoke.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
DATA="$WORK/data"
"$@" --version
PORT="$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
"$@" serve --port "$PORT" --data-dir "$DATA" >"$WORK/serve.log" 2>&1 &
PID=$!
ok=0
for _ in $(seq 1 300); do
  if "$PY" -c "import urllib.request,sys; r=urllib.request.urlopen('http://127.0.0.1:$PORT/api/health', timeout=1); sys.stdout.write(r.read().decode()+'\n')" 2>/dev/null; then
    ok=1; break
  fi
  kill -0 "$PID" 2>/dev/null || break
  sleep 0.1
done
console=0
if [ "$ok" = 1 ] && "$PY" -c "import urllib.request; [urllib.request.urlopen('http://127.0.0.1:$PORT' + p, timeout=5).read() for p in ('/console', '/console/console.js', '/console/console.css')]"; then
  console=1
fi
kill -TERM "$PID" 2>/dev/null || true
rc=0; wait "$PID" || rc=$?
if [ "$ok" != 1 ] || [ "$console" != 1 ] || [ "$rc" != 0 ] || [ ! -f "$DATA/gateway.sqlite3" ]; then
  echo "smoke test FAILED (healthy=$ok, console=$console, exit=$rc); server output:" >&2
  cat "$WORK/serve.log" >&2
  exit 1
fi
echo "   GET /api/health ok; console files served; SIGTERM -> exit $rc; database created (schema found)"
