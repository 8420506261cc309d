#!/usr/bin/env bash
# Build AbstractGateway as one PEP 441 zipapp (.pyz) with shiv.
#
#   packaging/build_pyz.sh                    # dist/abstractgateway.pyz for this machine's Python
#   packaging/build_pyz.sh --platform aarch64 # dist/abstractgateway-aarch64.pyz (Linux aarch64, e.g. Raspberry Pi)
#   packaging/build_pyz.sh --no-verify        # skip the smoke test of the host build
#
# Options:
#   --platform host|aarch64   target (default: host)
#   --python-version X.Y      target CPython for --platform aarch64 (default: 3.11, Raspberry Pi OS bookworm)
#   --python PATH             interpreter to build with (default: python3); unless it has shiv and
#                             hatchling already, a throwaway venv of it gets them
#   --out PATH                output file (default: dist/abstractgateway.pyz or dist/abstractgateway-aarch64.pyz)
#   --no-verify               do not run the built host .pyz
#
# How: `pip wheel .` builds the project wheel (which carries abstractgateway.py and
# abstractgateway_schema.sql at the top level of site-packages); shiv packs it with its
# dependencies. The .pyz holds C extensions (apsw, PyYAML, MarkupSafe), so it is tied to one
# CPython minor version and one platform; shiv extracts site-packages to ~/.shiv (or
# $SHIV_ROOT) on first run and re-uses it afterwards.
#
# For aarch64 the wheels are downloaded as binaries for manylinux_2_28 / manylinux2014
# (glibc >= 2.28: Raspberry Pi OS bookworm has 2.36) and installed into a prepared
# site-packages directory with `pip install --target --platform ... --no-deps`; shiv then
# packs that directory (`--site-packages`) without running pip itself. The .pyz is not run
# here (wrong architecture); its content is listed instead.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
PLATFORM=host
PYVER=3.11
PYTHON=python3
OUT=""
VERIFY=1
while [ $# -gt 0 ]; do
  case "$1" in
    --platform) PLATFORM="$2"; shift 2 ;;
    --platform=*) PLATFORM="${1#*=}"; shift ;;
    --python-version) PYVER="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --out) OUT="$2"; shift 2 ;;
    --no-verify) VERIFY=0; shift ;;
    -h|--help) sed -n '2,25p' "$0"; exit 0 ;;
    *) echo "build_pyz: unknown argument $1" >&2; exit 2 ;;
  esac
done
case "$PLATFORM" in
  host) OUT="${OUT:-$ROOT/dist/abstractgateway.pyz}" ;;
  aarch64|arm64) PLATFORM=aarch64; OUT="${OUT:-$ROOT/dist/abstractgateway-aarch64.pyz}" ;;
  *) echo "build_pyz: --platform must be host or aarch64" >&2; exit 2 ;;
esac
mkdir -p "$(dirname "$OUT")"
OUT="$(cd "$(dirname "$OUT")" && pwd)/$(basename "$OUT")"

WORK="$(mktemp -d "${TMPDIR:-/tmp}/abstractgateway-pyz.XXXXXX")"
cleanup() { rm -rf "$WORK"; }
trap cleanup EXIT

if "$PYTHON" -c 'import shiv, hatchling' >/dev/null 2>&1; then
  # The interpreter has the build tools already (the test extra installs them): no throwaway venv.
  echo "== build tools from $PYTHON"
  BPY="$PYTHON"
else
  echo "== build venv ($PYTHON) with shiv and hatchling"
  "$PYTHON" -m venv "$WORK/venv"
  BPY="$WORK/venv/bin/python"
  # hatchling (pyproject's build backend) goes into the build venv too, so the wheel is built there
  # without pip making a second, isolated environment for it.
  "$BPY" -m pip install --quiet --disable-pip-version-check shiv "hatchling>=1.21"
fi

echo "== project wheel"
# Build from a copy so no build/ or egg-info is left in the work tree.
"$BPY" -m pip wheel --quiet --disable-pip-version-check --no-deps --no-build-isolation "$ROOT" -w "$WORK/wheels"
PROJECT_WHEEL="$(ls "$WORK"/wheels/abstractgateway-*.whl)"
echo "   $(basename "$PROJECT_WHEEL")"

# The script shebang of the .pyz; `python3 app.pyz` works whatever it says.
SHEBANG="/usr/bin/env python3"

if [ "$PLATFORM" = host ]; then
  echo "== dependency wheels (host)"
  "$BPY" -m pip wheel --quiet --disable-pip-version-check "$PROJECT_WHEEL" -w "$WORK/wheels"
  ls "$WORK/wheels" | sed 's/^/   /'
  echo "== shiv -> $OUT"
  # --reproducible: fixed timestamps; --compressed: deflate the zip. Arguments that are not
  # shiv's own (--quiet, --no-index, ...) go to shiv's `pip install --target`.
  "$BPY" -m shiv --quiet -e abstractgateway:main -p "$SHEBANG" -o "$OUT" \
    --reproducible --compressed \
    --no-index --find-links "$WORK/wheels" --only-binary=:all: abstractgateway
else
  TAG="${PYVER/./}"
  PLATS=(--platform manylinux_2_28_aarch64 --platform manylinux_2_17_aarch64 --platform manylinux2014_aarch64)
  echo "== dependency wheels (linux aarch64, CPython $PYVER)"
  # The project wheel is pure Python (py3-none-any), so it is found for any platform.
  "$BPY" -m pip download --quiet --disable-pip-version-check "${PLATS[@]}" --only-binary=:all: \
    --python-version "$PYVER" --implementation cp --abi "cp$TAG" \
    --find-links "$WORK/wheels" -d "$WORK/aarch64" "$PROJECT_WHEEL"
  ls "$WORK/aarch64" | sed 's/^/   /'
  echo "== site-packages for aarch64"
  "$BPY" -m pip install --quiet --disable-pip-version-check --no-deps --no-index --no-compile \
    "${PLATS[@]}" --only-binary=:all: --python-version "$PYVER" --implementation cp --abi "cp$TAG" \
    --target "$WORK/site" "$WORK"/aarch64/*.whl
  rm -rf "$WORK/site/bin"  # console scripts with the build venv's shebang: the .pyz has its own entry point
  if ! ls "$WORK"/site/apsw/*aarch64*.so >/dev/null 2>&1; then
    echo "build_pyz: no aarch64 apsw extension in the prepared site-packages" >&2; exit 1
  fi
  echo "== shiv -> $OUT"
  # No pip arguments at all here (not even --quiet): shiv then packs --site-packages as is.
  "$BPY" -m shiv -e abstractgateway:main -p "$SHEBANG" -o "$OUT" \
    --reproducible --compressed --site-packages "$WORK/site"
  echo "== extension modules in the .pyz"
  "$BPY" - "$OUT" <<'EOF'
import sys, zipfile
names = zipfile.ZipFile(sys.argv[1]).namelist()
extras = [n for n in names if "/sqlite_extra_binaries/" in n]
for n in names:
    if n.endswith(".so") and n not in extras:
        print("   " + n)
print(f"   (+ {len(extras)} optional SQLite extension .so files under apsw/sqlite_extra_binaries/)")
assert any(n.endswith("site-packages/abstractgateway_schema.sql") for n in names), "schema missing"
print("   schema: site-packages/abstractgateway_schema.sql present")
for ext in ("html", "js", "css"):
    assert any(n.endswith(f"site-packages/abstractgateway_console.{ext}") for n in names), f"console .{ext} missing"
print("   console: site-packages/abstractgateway_console.{html,js,css} present")
EOF
fi

if [ "$PLATFORM" = host ] && [ "$VERIFY" = 1 ]; then
  echo "== verify $OUT"
  VPY="$("$PYTHON" -c 'import sys; print(sys.executable)')"
  SHIV_ROOT="$WORK/shiv-root" "$ROOT/packaging/smoke_test.sh" "$VPY" "$VPY" "$OUT"  # fresh extraction, not ~/.shiv
fi

echo "== sizes"
"$BPY" - "$ROOT/dist" "$OUT" <<'EOF2'
import os, sys
seen = set()
dist = sys.argv[1]
paths = [os.path.join(dist, n) for n in sorted(os.listdir(dist)) if n.endswith(".pyz")] if os.path.isdir(dist) else []
paths.append(sys.argv[2])
for p in paths:
    p = os.path.abspath(p)
    if p not in seen and os.path.isfile(p):
        seen.add(p)
        print(f"   {p:<60} {os.path.getsize(p) / 1048576:6.2f} MB")
EOF2
