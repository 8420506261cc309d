#!/usr/bin/env bash
# Build a one-file `abstractgateway` binary with PyInstaller (for the machine it runs on:
# PyInstaller does not cross-compile; build the aarch64 binary on an aarch64 machine).
#
#   packaging/build_binary.sh               # -> dist/abstractgateway, then a smoke test
#   packaging/build_binary.sh --no-verify   # skip the smoke test
#   packaging/build_binary.sh --python python3.12
#
# A throwaway venv (temp dir) gets the project (non-editable, from `pip install .`) and
# PyInstaller; build files go to the temp dir too, only dist/abstractgateway is written.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PYTHON=python3
VERIFY=1
while [ $# -gt 0 ]; do
  case "$1" in
    --python) PYTHON="$2"; shift 2 ;;
    --no-verify) VERIFY=0; shift ;;
    -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
    *) echo "build_binary: unknown argument $1" >&2; exit 2 ;;
  esac
done

WORK="$(mktemp -d "${TMPDIR:-/tmp}/abstractgateway-bin.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

echo "== build venv ($PYTHON): project + pyinstaller"
"$PYTHON" -m venv "$WORK/venv"
BPY="$WORK/venv/bin/python"
"$BPY" -m pip install --quiet --disable-pip-version-check "$ROOT" pyinstaller
"$BPY" -m PyInstaller --version | sed 's/^/   pyinstaller /'

echo "== pyinstaller"
mkdir -p "$ROOT/dist"
(cd "$WORK" && "$BPY" -m PyInstaller --clean --noconfirm --log-level WARN \
  --distpath "$ROOT/dist" --workpath "$WORK/build" "$ROOT/packaging/abstractgateway.spec")
BIN="$ROOT/dist/abstractgateway"
test -x "$BIN"

if [ "$VERIFY" = 1 ]; then
  echo "== verify $BIN"
  DATA="$WORK/data"
  "$BIN" --version
  PORT="$("$BPY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])')"
  "$BIN" serve --port "$PORT" --data-dir "$DATA" >"$WORK/serve.log" 2>&1 &
  PID=$!
  ok=0
  for _ in $(seq 1 300); do
    if "$BPY" -c "import urllib.request,sys; r=urllib.request.urlopen('http://127.0.0.1:$PORT/api/health', timeout=1); sys.stdout.write(r.read().decode()+'\n')" 2>/dev/null; then
      ok=1; break
    fi
    kill -0 "$PID" 2>/dev/null || break
    sleep 0.1
  done
  kill -TERM "$PID" 2>/dev/null || true
  rc=0; wait "$PID" || rc=$?
  if [ "$ok" != 1 ] || [ "$rc" != 0 ]; then
    echo "build_binary: verification FAILED (healthy=$ok, exit=$rc); server output:" >&2
    cat "$WORK/serve.log" >&2
    exit 1
  fi
  echo "   GET /api/health ok; SIGTERM -> exit $rc"
fi

echo "== size"
"$BPY" -c "import os,sys; p=sys.argv[1]; print(f'   {p}  {os.path.getsize(p)/1048576:.2f} MB')" "$BIN"
