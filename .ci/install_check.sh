#!/usr/bin/env bash
# Installs loldu the way docs/install.md tells a user with an environment of their own to: a fresh venv
# with a CUDA build of torch (a different torch than .venv's) and the test dependencies, then
# `pip install --no-build-isolation .` (non-editable) from a clean copy of this tree. Checks that the
# CUDA extension was compiled and linked (build flavor, dispatcher kernels, linked CUDA libraries, the
# GPU architectures in the binary), that setup.py's refusals say what is wrong, and runs the op and
# factorization tests against the installed package. Everything lives under one folder in /tmp,
# removed at the end (LOLDU_KEEP_INSTALL_CHECK=1 keeps it).
#
# Environment: PYTHON (default python3), LOLDU_CHECK_TORCH (default torch==2.14.1, must be a CUDA build),
# MAX_JOBS (default 2).
set -euo pipefail
# The whole script is one block: bash reads it completely before running it.
{

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
PYTHON="${PYTHON:-python3}"
TORCH_SPEC="${LOLDU_CHECK_TORCH:-torch==2.14.1}"
export MAX_JOBS="${MAX_JOBS:-2}"
WORK="$(mktemp -d /tmp/loldu-install-check.XXXXXX)"
cd "$WORK"
VENV="$WORK/venv"
PY="$VENV/bin/python"

# Nothing cached outside $WORK: pip, torch extensions, Hugging Face, hypothesis, pytest.
export PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
export TORCH_EXTENSIONS_DIR="$WORK/torch_extensions" HF_HOME="$WORK/hf" XDG_CACHE_HOME="$WORK/cache"
unset TORCH_CUDA_ARCH_LIST CUDA_HOME CUDA_PATH LOLDU_FORCE_CPU LOLDU_FORCE_CUDA LOLDU_NO_EXTENSION LOLDU_BACKEND LOLDU_NO_JIT

cleanup() {
  if [ "${LOLDU_KEEP_INSTALL_CHECK:-0}" = 1 ]; then echo "install check: kept $WORK"; else rm -rf "$WORK"; fi
}
trap cleanup EXIT
trap 'exit 143' TERM INT  # a time limit reached: still clean up

TIMES=()
step_start() { STEP="$1"; STEP_T0=$SECONDS; echo "=== install check: $STEP"; }
step_end() { TIMES+=("$(printf '%-52s %5d s' "$STEP" $((SECONDS - STEP_T0)))"); }
fail() { echo "install check FAILED ($STEP): $*" >&2; exit 1; }
# Runs a logged command with a time limit; on failure shows the log's tail.
logged() {
  local limit="$1" log="$2"; shift 2
  if ! timeout "$limit" "$@" >"$log" 2>&1; then
    tail -n 60 "$log" >&2
    fail "'$*' failed or ran past ${limit} s (log above)"
  fi
}

step_start "venv + $TORCH_SPEC"
"$PYTHON" -m venv "$VENV"
logged 300 "$WORK/pip-upgrade.log" "$PY" -m pip install -q --upgrade pip
logged 1200 "$WORK/torch.log" "$PY" -m pip install -q "$TORCH_SPEC"
TORCH_VERSION="$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)"
TORCH_CUDA="$("$PY" -c 'import torch; print(torch.version.cuda or "")' 2>/dev/null)"
[ -n "$TORCH_CUDA" ] || fail "$TORCH_SPEC installed torch $TORCH_VERSION, a build without CUDA"
echo "torch $TORCH_VERSION (CUDA $TORCH_CUDA)"
step_end

step_start "test dependencies (requirements.txt, torch kept)"
grep -v -E '^torch([<>=!~ ;]|$)' "$ROOT/requirements.txt" >"$WORK/requirements-no-torch.txt"
# The distribution's version (torch.__version__ may carry a local label that the wheel's metadata has not).
echo "torch==$("$PY" -c 'import importlib.metadata as m; print(m.version("torch"))')" >"$WORK/keep-torch.txt"
logged 1200 "$WORK/deps.log" "$PY" -m pip install -q -r "$WORK/requirements-no-torch.txt" -c "$WORK/keep-torch.txt"
[ "$("$PY" -c 'import torch; print(torch.__version__)' 2>/dev/null)" = "$TORCH_VERSION" ] || fail "torch changed"
step_end

step_start "clean copy of the tree"
mkdir "$WORK/src"
if git -C "$ROOT" rev-parse --is-inside-work-tree >/dev/null 2>&1; then
  # Tracked and untracked-but-not-ignored files: no .venv, build/, compiled _C.
  (cd "$ROOT" && git ls-files -z --cached --others --exclude-standard | tar -cf - --null -T -) | tar -xf - -C "$WORK/src"
else
  tar -C "$ROOT" --exclude=./.venv --exclude=./build --exclude='*.so' --exclude=__pycache__ -cf - . | tar -xf - -C "$WORK/src"
fi
step_end

step_start "setup.py's refusals"
# No torch in pip's isolated build environment: setup.py must say to use --no-build-isolation.
if (cd "$WORK/src" && timeout 600 "$PY" -m pip install . >"$WORK/isolated.log" 2>&1); then
  fail "an isolated build (no --no-build-isolation) succeeded: it cannot have compiled against $TORCH_VERSION"
fi
grep -q -- "--no-build-isolation" "$WORK/isolated.log" || { tail -n 30 "$WORK/isolated.log"; fail "no advice in the isolated-build error"; }
"$PY" -c 'import loldu' 2>/dev/null && fail "the failed isolated build left a loldu installed"
# setup.py probes only when it builds (build_ext); the probes below stop a build before it compiles
# anything, so no copy of the tree is built here. A command that builds nothing prints the version alone.
VERSION_LINE="$(cd "$WORK/src" && timeout 600 "$PY" setup.py --version 2>&1)"
[ "$VERSION_LINE" = "$(sed -n 's/^version = "\(.*\)"$/\1/p' "$WORK/src/pyproject.toml")" ] \
  || fail "setup.py --version printed more than the version: $VERSION_LINE"
# A toolkit of another CUDA major version: a CPU build with a notice (shown here ahead of the missing
# compiler's error, which stops the build before it compiles), an error under LOLDU_FORCE_CUDA=1.
FAKE="$WORK/cuda-other-major"
mkdir -p "$FAKE/bin" "$FAKE/include" && touch "$FAKE/include/cuda_runtime.h"
other=$(( ${TORCH_CUDA%%.*} - 1 ))
printf '#!/bin/sh\necho "Cuda compilation tools, release %s.8, V%s.8.0"\n' "$other" "$other" >"$FAKE/bin/nvcc"
chmod +x "$FAKE/bin/nvcc"
if (cd "$WORK/src" && CUDA_HOME="$FAKE" CXX="$WORK/no-such-c++" timeout 600 "$PY" setup.py build_ext >"$WORK/other-major.log" 2>&1); then
  fail "setup.py build_ext with no C++ compiler succeeded"
fi
grep -q "building the CPU extension: CUDA_HOME=$FAKE holds nvcc $other.8" "$WORK/other-major.log" \
  || { cat "$WORK/other-major.log"; fail "a CUDA $other toolkit did not give the CPU-build notice"; }
# No C++ compiler: an error that names the extension-less install.
grep -q "LOLDU_NO_EXTENSION=1 pip install --no-build-isolation ." "$WORK/other-major.log" \
  || { cat "$WORK/other-major.log"; fail "unclear no-compiler error"; }
if (cd "$WORK/src" && CUDA_HOME="$FAKE" LOLDU_FORCE_CUDA=1 timeout 600 "$PY" setup.py build_ext >"$WORK/force.log" 2>&1); then
  fail "LOLDU_FORCE_CUDA=1 with a CUDA $other toolkit did not fail"
fi
grep -q "CUDA major versions must match" "$WORK/force.log" || { cat "$WORK/force.log"; fail "unclear LOLDU_FORCE_CUDA error"; }
# An architecture nvcc cannot compile for (sm_35 left CUDA 12) is refused up front.
if (cd "$WORK/src" && TORCH_CUDA_ARCH_LIST="3.5;9.0" timeout 600 "$PY" setup.py build_ext >"$WORK/arch.log" 2>&1); then
  fail "TORCH_CUDA_ARCH_LIST=3.5;9.0 was accepted"
fi
grep -q "cannot compile for 3.5" "$WORK/arch.log" || { cat "$WORK/arch.log"; fail "unclear TORCH_CUDA_ARCH_LIST error"; }
rm -rf "$WORK/src/build"  # what the refused builds left (nothing compiled): the tree stays pristine
step_end

step_start "LOLDU_NO_EXTENSION=1 install (reference path)"
# From a copy of the pristine tree (the CUDA build below leaves build/ behind), into a folder of its own.
mkdir "$WORK/src-pure" "$WORK/pure" "$WORK/elsewhere"
tar -C "$WORK/src" -cf - . | tar -xf - -C "$WORK/src-pure"
(cd "$WORK/src-pure" && logged 600 "$WORK/pure.log" env LOLDU_NO_EXTENSION=1 "$PY" -m pip install -v --no-build-isolation \
  --no-deps --target "$WORK/pure" .)
if compgen -G "$WORK/pure/loldu/_C*" >/dev/null; then fail "LOLDU_NO_EXTENSION=1 installed an extension"; fi
(cd "$WORK/elsewhere" && PYTHONPATH="$WORK/pure" timeout 600 "$PY" - <<'EOF') || fail "the extension-less install does not work"
import os
import subprocess
import sys
import warnings

with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    import loldu
import torch

info = loldu.build_info()
assert loldu.__file__.startswith(os.environ["PYTHONPATH"]) and info["backend"] == "pytorch", (loldu.__file__, info)
notes = [str(w.message) for w in caught if "loldu" in str(w.message)]
assert len(notes) == 1 and "pure-PyTorch" in notes[0], notes
# The reference factorization against torch.linalg.lu in float64 (pivots equal, U rows scaled by D).
W = torch.randn(60, 40, dtype=torch.float64)
res = loldu.ops.ldu(W, 8)
P, L, U = torch.linalg.lu(W)
assert torch.equal(res.pivots, P.argmax(0)[:8])
torch.testing.assert_close(res.U, U[:8] / U.diagonal()[:8, None], rtol=0, atol=1e-12)
# LOLDU_BACKEND=pytorch: the same path on purpose, without the warning.
quiet = subprocess.run([sys.executable, "-W", "error::RuntimeWarning", "-c",
                        "import loldu; print(loldu.build_info()['backend'])"],
                       env=dict(os.environ, LOLDU_BACKEND="pytorch"), capture_output=True, text=True, timeout=300)
assert quiet.returncode == 0 and quiet.stdout.strip() == "pytorch", quiet.stderr[-2000:]
print("extension-less install OK:", info["reason"])
EOF
step_end

step_start "pip install --no-build-isolation . (CUDA build)"
# LOLDU_FORCE_CUDA=1: a CPU build here would be a failure, not a fallback.
(cd "$WORK/src" && logged 2400 "$WORK/build.log" env LOLDU_FORCE_CUDA=1 "$PY" -m pip install -v --no-build-isolation .)
grep "loldu setup:" "$WORK/build.log" | sort -u
grep -q "loldu setup: building the CUDA extension" "$WORK/build.log" || fail "setup.py did not build the CUDA extension"
step_end

step_start "the installed package and its CUDA build"
(cd "$WORK/elsewhere" && timeout 600 "$PY" - "$TORCH_VERSION" <<'EOF') || fail "checks of the installed package failed"
import json
import re
import struct
import subprocess
import sys
import sysconfig
from pathlib import Path

import torch

import loldu
import loldu.export  # noqa: F401  (the second package of the distribution)
from loldu import _C

site = Path(sysconfig.get_paths()["purelib"]).resolve()
pkg = Path(loldu.__file__).resolve().parent
so = Path(_C.__file__).resolve()
info = loldu.build_info()
print(json.dumps(info, indent=1))
assert pkg == site / "loldu", f"loldu imported from {pkg}, not from {site}"
assert so.parent == pkg, f"the extension is {so}, outside the package"
assert info["backend"] == "compiled-cuda" and info["reason"] is None, info
assert info["torch"] == sys.argv[1] and _C.build_flavor() == "cuda", (info, _C.build_flavor())

# Layout: exactly the two packages, their metadata and the console script.
dist = next(site.glob("loldu-*.dist-info"))
files = [line.split(",")[0] for line in (dist / "RECORD").read_text().splitlines()]
tops = {f.split("/")[0] for f in files if not f.startswith("..")}
assert tops == {"loldu", dist.name}, f"unexpected top-level entries {sorted(tops)}"
assert any(f.startswith("loldu/export/") for f in files), "loldu.export not installed"
script = Path(sys.executable).parent / "loldu"
help_out = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=300)
assert help_out.returncode == 0 and "export" in help_out.stdout, help_out.stderr[-2000:]

# The ops have CPU and CUDA kernels in the dispatcher (registered by the build's glue, ops.cpp).
for op in ("ldu", "ldu_from_pivots", "adapter_linear_forward", "adapter_linear_backward"):
    for key in ("CPU", "CUDA"):
        assert torch._C._dispatch_has_kernel_for_dispatch_key(f"loldu::{op}", key), (op, key)
assert torch._C._dispatch_has_kernel_for_dispatch_key("loldu::adapter_linear_forward", "AutocastCUDA")

# Linked: the CUDA runtime and torch's CUDA library are dependencies, the kernels' host launchers
# (namespace loldu::cuda, only compiled from cpp/cuda/*.cu) are defined in the binary.
needed = subprocess.run(["readelf", "-d", str(so)], capture_output=True, text=True, check=True).stdout
assert re.search(r"\[libcudart\.so", needed) and "[libc10_cuda.so]" in needed, needed
syms = subprocess.run(["nm", "-C", "-D", "--defined-only", str(so)], capture_output=True, text=True, check=True).stdout
launchers = sorted({m.group(1) for m in re.finditer(r" (loldu::cuda::\w+)", syms)})
assert launchers, "no loldu::cuda:: symbols defined in the extension"
print("CUDA launchers:", ", ".join(launchers))

# The device code: the .nv_fatbin section holds one fat binary per translation unit, each a 16-byte
# header (magic 0xBA55ED50, version, header size, payload size) followed by entries whose header
# starts with kind (1 PTX, 2 cubin), header size and payload size, the SM version at byte 28.
subprocess.run(["objcopy", "-O", "binary", "--only-section=.nv_fatbin", str(so), "nv_fatbin.bin"], check=True)
fatbin = Path("nv_fatbin.bin").read_bytes()
cubins, ptx, off = set(), set(), 0
while off + 16 <= len(fatbin):
    magic, _, hsize, fsize = struct.unpack_from("<IHHQ", fatbin, off)
    if magic != 0xBA55ED50:
        off += 8  # section padding between fat binaries
        continue
    p, end = off + hsize, off + hsize + fsize
    while p < end:
        kind, _, ehsize, psize = struct.unpack_from("<HHIQ", fatbin, p)
        (sm,) = struct.unpack_from("<I", fatbin, p + 28)
        (cubins if kind == 2 else ptx).add(sm)
        p += ehsize + psize
    off = end
print("cubins for sm", sorted(cubins), "| PTX for compute", sorted(ptx))
if torch.cuda.is_available():
    want = {a * 10 + b for a, b in (torch.cuda.get_device_capability(i) for i in range(torch.cuda.device_count()))}
else:
    # setup.py's default with no GPU visible: the architectures torch was built for that nvcc compiles.
    nvcc_codes = subprocess.run(["nvcc", "--list-gpu-code"], capture_output=True, text=True).stdout
    built = {int(a[3:]) for a in torch.cuda.get_arch_list() if re.fullmatch(r"sm_\d+", a)}
    want = {sm for sm in built if f"sm_{sm}" in nvcc_codes} if nvcc_codes else built
    assert ptx == {max(want)}, f"expected PTX for compute_{max(want)} only, found {sorted(ptx)}"
assert want and want <= cubins, f"cubins for sm {sorted(cubins)}; expected at least {sorted(want)}"
print("installed package OK:", so)
EOF
step_end

step_start "op and factorization tests on the installed build"
# The tests run from a folder holding only tests/ and pyproject.toml (pytest's configuration): the
# package they import is the installed one. The JIT test builds cpp/ from a checkout, which an
# installed package has not got.
mkdir "$WORK/run"
cp -r "$WORK/src/tests" "$WORK/src/pyproject.toml" "$WORK/run/"
(cd "$WORK/run" && logged 1800 "$WORK/pytest.log" env LOLDU_SKIP_JIT_TEST=1 "$PY" -m pytest -q -p no:cacheprovider \
  tests/test_ops.py tests/test_ldu.py tests/test_adapter_op.py tests/test_forms.py tests/test_backends.py)
tail -n 3 "$WORK/pytest.log"
step_end

echo "=== install check passed (torch $TORCH_VERSION, CUDA $TORCH_CUDA, MAX_JOBS=$MAX_JOBS):"
printf '  %s\n' "${TIMES[@]}"
echo "  total $SECONDS s"
exit 0
}
