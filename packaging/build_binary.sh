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
  "$ROOT/packaging/smoke_test.sh" "$BPY" "$BIN"
fi

echo "== size"
"$BPY" -c "import os,sys; p=sys.argv[1]; print(f'   {p}  {os.path.getsize(p)/1048576:.2f} MB')" "$BIN"
