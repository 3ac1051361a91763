#!/usr/bin/env bash
# Install edge-t2t from this bundle, with no network: ./install.sh TARGET
#
# 1. checks the Python version (the wheels are built for one Python minor version);
# 2. verifies SHA256SUMS over every file of the bundle (nothing is installed if one differs), and
#    SHA256SUMS.optional when the optional archive (fp32 embedder, geo/cluster/web extras) was unpacked
#    into the same directory;
# 3. picks the llama.cpp build: vulkan (the portable CPU build plus llama.cpp's Vulkan backend) when
#    the CPU suits portable and a Vulkan loader shows a device that is not a CPU (a GPU); else from
#    the CPU's flags portable (AVX2/FMA/F16C/BMI2) or compat (only SSE4.2);
#    EDGE_T2T_LLAMA_BUILD=vulkan|portable|compat overrides;
# 4. creates the virtualenv TARGET and installs with pip --no-index from the bundle's wheels;
# 5. copies the models to TARGET/share/edge-t2t/models, where the installed tool looks, and the
#    documentation to TARGET/share/doc/edge-t2t (open README.html, or `edge-t2t serve` -> /docs);
# 6. runs `TARGET/bin/edge-t2t doctor`.
# Environment: PYTHON (interpreter to use), EDGE_T2T_LLAMA_BUILD.
set -euo pipefail

say() { printf 'install.sh: %s\n' "$*" >&2; }
die() { say "error: $*"; exit 2; }

if [[ $# -ne 1 || $1 == -h || $1 == --help ]]; then
    sed -n '2,16p' "$0" | sed 's/^# \{0,1\}//'
    [[ $# -eq 1 ]] && exit 0 || exit 2
fi
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
TARGET=$1
[[ -e $TARGET ]] && die "$TARGET already exists; give a new directory (install.sh never overwrites)"
[[ -f $HERE/bundle.env && -f $HERE/SHA256SUMS ]] || die "$HERE is not an unpacked edge-t2t bundle (no bundle.env/SHA256SUMS)"

# --- 1. Python -------------------------------------------------------------------------------
want=$(sed -n 's/^BUNDLE_PYTHON=//p' "$HERE/bundle.env")
PY=${PYTHON:-}
if [[ -z $PY ]]; then
    for cand in "python$want" python3; do
        if command -v "$cand" >/dev/null 2>&1; then PY=$(command -v "$cand"); break; fi
    done
fi
[[ -n $PY ]] || die "no python$want found; install Python $want (or set PYTHON=/path/to/python$want)"
have=$("$PY" -c 'import sys; print("%d.%d" % sys.version_info[:2])' 2>/dev/null) \
    || die "$PY does not run; set PYTHON=/path/to/python$want"
[[ $have == "$want" ]] || die "$PY is Python $have but this bundle's wheels are for Python $want; set PYTHON=/path/to/python$want or build the bundle with Python $have"
"$PY" -c 'import venv, ensurepip' 2>/dev/null \
    || die "$PY lacks the venv/ensurepip modules; install them (Debian/Ubuntu: apt install python$want-venv)"

# --- 2. checksums (before anything is written) --------------------------------------------------
say "verifying $(wc -l <"$HERE/SHA256SUMS") files against SHA256SUMS"
"$PY" - "$HERE" <<'PYEOF' || exit 2
import hashlib, pathlib, sys
top = pathlib.Path(sys.argv[1])
listed, bad = {}, []
for sums in ("SHA256SUMS", "SHA256SUMS.optional"):
    if sums == "SHA256SUMS" or (top / sums).is_file():
        for line in (top / sums).read_text().splitlines():
            digest, name = line.split("  ", 1)
            listed[name] = digest
for name, digest in listed.items():
    h = hashlib.sha256()
    try:
        with open(top / name, "rb") as fh:
            for block in iter(lambda: fh.read(1 << 20), b""):
                h.update(block)
    except OSError:
        bad.append(f"{name}: missing")
        continue
    if h.hexdigest() != digest:
        bad.append(f"{name}: checksum mismatch")
extra = sorted(p.relative_to(top).as_posix() for p in top.rglob("*") if p.is_file())
bad += [f"{n}: not in SHA256SUMS" for n in extra if not n.startswith("SHA256SUMS") and n not in listed]
for b in bad:
    print(f"install.sh: error: damaged bundle: {b}", file=sys.stderr)
if bad:
    print("install.sh: nothing was installed; copy the bundle again (compare it with the original's sha256)",
          file=sys.stderr)
    sys.exit(2)
PYEOF
# shellcheck source=/dev/null
. "$HERE/bundle.env"

# --- 3. which llama.cpp build ------------------------------------------------------------------
flags=" $(grep -m1 '^flags' /proc/cpuinfo 2>/dev/null | cut -d: -f2) "
build=${EDGE_T2T_LLAMA_BUILD:-}
why="EDGE_T2T_LLAMA_BUILD"
if [[ -z $build ]]; then
    build=portable why="this CPU has AVX2/FMA/F16C/BMI2"
    for f in avx avx2 fma f16c bmi2; do
        [[ $flags == *" $f "* ]] || { build=compat why="this CPU lacks $f"; break; }
    done
    # The GPU: asked of the system's Vulkan loader by edge-t2t's own probe, run from the bundle's wheel
    # (standard library only). A software device (Mesa's llvmpipe) does not count: slower than the CPU.
    if [[ $build == portable && -d $HERE/wheels/llama-vulkan ]]; then
        own=$(ls "$HERE"/wheels/common/edge_t2t-*.whl)
        # The vulkan wheel may ask for a newer glibc than the others (its manylinux tag says which).
        need=$(ls "$HERE"/wheels/llama-vulkan/ | sed -n 's/.*manylinux_\([0-9]*\)_\([0-9]*\)_.*/\1.\2/p')
        libc=$("$PY" -c 'import platform; print(platform.libc_ver()[1] or "0")')
        if ! "$PY" -c 'import sys; a, b = (tuple(map(int, v.split("."))) for v in sys.argv[1:]); sys.exit(a < b)' "$libc" "${need:-0}"; then
            why="$why; the vulkan build needs glibc $need, this system has $libc"
        elif PYTHONPATH=$own timeout 60 "$PY" -m edge_t2t.describe.vulkan_probe --has-gpu 2>/dev/null; then
            build=vulkan why="a Vulkan GPU is present"
        else
            why="$why, and no Vulkan GPU was found"
        fi
    fi
fi
[[ -d $HERE/wheels/llama-$build ]] || die "no llama.cpp build '$build' in this bundle (EDGE_T2T_LLAMA_BUILD: one of $(ls "$HERE/wheels" | sed -n 's/^llama-//p' | paste -sd,))"
[[ $build == compat && $flags != *" sse4_2 "* ]] && say "warning: this CPU reports no SSE4.2; even the compat llama.cpp build may not run"
say "llama.cpp build: $build ($why)"

# --- 4. virtualenv + wheels, nothing from the network -----------------------------------------
export PIP_CONFIG_FILE=/dev/null PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_CACHE_DIR=1
export PIP_NO_INPUT=1
fail() { say "error: $*; removing the half-made $TARGET"; rm -rf "$TARGET"; exit 1; }
trap 'fail "interrupted"' INT TERM
t0=$(date +%s)
"$PY" -m venv "$TARGET" || fail "could not create the virtualenv"
spec="edge-t2t==$EDGE_T2T_VERSION"
links=(--find-links "$HERE/wheels/common" --find-links "$HERE/wheels/llama-$build")
if [[ ${BUNDLE_OPTIONAL:-0} == 1 && ! -f $HERE/SHA256SUMS.optional ]]; then
    say "no optional archive here: installing the int8 embedder only, without the extras ($BUNDLE_EXTRAS);"
    say "  for fp32 and the extras, unpack ${BUNDLE_NAME}-optional.tar.gz in the same place and install again"
else
    if [[ -f $HERE/SHA256SUMS.optional ]]; then
        say "optional archive present: also installing the fp32 embedder and the extras ($BUNDLE_EXTRAS)"
        links+=(--find-links "$HERE/wheels/optional")
    fi
    [[ -n $BUNDLE_EXTRAS ]] && spec="edge-t2t[$BUNDLE_EXTRAS]==$EDGE_T2T_VERSION"
fi
"$TARGET/bin/python" -m pip install -q --no-index --only-binary :all: "${links[@]}" "$spec" \
    || fail "pip could not install from the bundle"

# --- 5. models, and a note of what was installed ----------------------------------------------
share=$TARGET/share/edge-t2t
mkdir -p "$share"
cp -R "$HERE/models" "$share/models" || fail "could not copy the models"
if [[ -d $HERE/doc ]]; then
    mkdir -p "$TARGET/share/doc" && cp -R "$HERE/doc" "$TARGET/share/doc/edge-t2t" || fail "could not copy the documentation"
fi
"$TARGET/bin/python" - "$share/install.json" "$build" "$BUNDLE_NAME" <<'PYEOF'
import json, sys, time
path, build, bundle = sys.argv[1:]
json.dump({"llama_build": build, "bundle": bundle, "installed_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())},
          open(path, "w"), indent=2)
PYEOF
trap - INT TERM
say "installed into $TARGET in $(( $(date +%s) - t0 )) s; models in $share/models, documentation in $TARGET/share/doc/edge-t2t"

# --- 6. doctor ---------------------------------------------------------------------------------
if "$TARGET/bin/edge-t2t" doctor; then
    say "done: run $TARGET/bin/edge-t2t --help (or add $TARGET/bin to PATH)"
else
    say "installed, but doctor reported problems (above); fix them, then run $TARGET/bin/edge-t2t doctor"
    exit 1
fi
