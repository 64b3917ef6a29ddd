#!/usr/bin/env bash
# The install as a user meets it: the repaired manylinux wheel of cmake/build_wheel.sh (sdist ->
# wheel built from that sdist -> auditwheel repair) installed into a fresh virtual environment
# that has only torch and the core dependencies, and no compiler on PATH; there, from outside the
# checkout, the package imports, every op runs forward and backward once against its reference
# (python -m bench.gpu_smoke --device cpu, from the sdist's bench/) and one op passes
# torch.library.opcheck. Then the unpacked sdist's own test suite runs against that install:
# every test module is collected, and a fast subset (SDIST_TESTS) runs.
#
#   bash cmake/install_check.sh BUILD_PYTHON [OUT_DIR]     # or: make install-check
#
# BUILD_PYTHON: a Python with torch, the build tools, cmake/wheel-requirements.txt and the test
# dependencies (the project's .venv: `make install`); the sdist's tests take pytest and the other
# test dependencies from its environment, behind the fresh environment's own torch and moediffuseq.
# TORCH_SPEC: the torch of the fresh environment, installed with pip (unset: the build's torch
# release); set and empty: the torch already installed, seen through a fresh environment made
# with --system-site-packages (nothing is downloaded; then optional packages installed beside it
# are not reported as having come with the core install). --plan prints the choice and stops.
set -euo pipefail
cd "$(dirname "$0")/.."
PLAN_ONLY=0
if [ "${1:-}" = "--plan" ]; then PLAN_ONLY=1; shift; fi
PY=${1:?usage: install_check.sh [--plan] BUILD_PYTHON [OUT_DIR]}
PY=$(cd "$(dirname "$PY")" && pwd)/$(basename "$PY")  # absolute: the checks below run from other folders
OUT=${2:-build/install-check}
TORCH_SPEC=${TORCH_SPEC-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
if [ -n "$TORCH_SPEC" ]; then
  VENV_FLAGS=() TORCH_PLAN="$TORCH_SPEC (pip, fresh environment)"
else
  VENV_FLAGS=(--system-site-packages) TORCH_PLAN="the installed torch (fresh environment with --system-site-packages)"
fi
echo "install-check: torch: $TORCH_PLAN"
if [ "$PLAN_ONLY" = 1 ]; then exit 0; fi
# the fast subset of the sdist's tests: test files, and a -k expression
SDIST_TESTS=${SDIST_TESTS:-test_packaging.py test_bench_quality.py test_import_cycles.py test_readme.py test_moe_topk_softmax.py}
# (the build-environment tests, which the main suite runs, left out: they build nothing installed)
SDIST_TESTS_K=${SDIST_TESTS_K:-not missing_build_tool and not setup_py_checks and not editable_rebuild and not cuda_torch_without and not cli_names and not build_isolation and not without_cutlass and not cutlass_is}
start=$(date +%s)
step() { echo "install-check: $* ($(( $(date +%s) - start )) s)"; }

rm -rf "$OUT" && mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
WHEEL=$(bash cmake/build_wheel.sh "$PY" "$OUT/dist" | tail -1)
SDIST=$(ls "$OUT"/dist/moediffuseq-*.tar.gz)
case "$(basename "$WHEEL")" in *manylinux*) ;; *) echo "install-check: $WHEEL is not a manylinux wheel"; exit 1 ;; esac
step "repaired wheel $(basename "$WHEEL")"

python3 -m venv ${VENV_FLAGS[@]+"${VENV_FLAGS[@]}"} "$OUT/venv"
if [ -n "$TORCH_SPEC" ]; then
  "$OUT/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
elif ! "$OUT/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install-check: TORCH_SPEC is empty (use the installed torch) but $(command -v python3) has no torch;" \
    "install torch there or set TORCH_SPEC, e.g. TORCH_SPEC=torch==2.13.0" >&2
  exit 1
fi
# Only the fresh environment's bin on PATH: no compiler, no cmake, nothing of the checkout's.
CLEAN=(env -i "HOME=$OUT" "PATH=$OUT/venv/bin" "TMPDIR=${TMPDIR:-/tmp}")
"${CLEAN[@]}" "$OUT/venv/bin/python" -m pip install --quiet --disable-pip-version-check "$WHEEL"
step "fresh environment: $TORCH_PLAN and the wheel (core dependencies only, no compiler on PATH)"
mkdir -p "$OUT/run" "$OUT/sdist" && tar -xzf "$SDIST" -C "$OUT/sdist"
SRC=$(ls -d "$OUT"/sdist/moediffuseq-*)
ln -s "$SRC/bench" "$OUT/run/bench"  # bench/ alone importable there: the smoke runs the installed package
cd "$OUT/run"  # away from the checkout and the sources: the installed package is imported
"${CLEAN[@]}" "ISOLATED=$([ -n "$TORCH_SPEC" ] && echo 1 || echo 0)" "$OUT/venv/bin/python" - <<'PYCODE'
import importlib.util
import os
import shutil
import sys

import torch

import moediffuseq
from moediffuseq.extras import extra_of_module
from moediffuseq.ops import moe_topk_softmax

for compiler in ("cc", "c++", "gcc", "g++", "clang", "nvcc", "cmake"):
    assert shutil.which(compiler) is None, f"{compiler} is on PATH"
assert "site-packages" in moediffuseq.__file__, moediffuseq.__file__
assert extra_of_module(), "the wheel's metadata names no extras"
for optional in extra_of_module():  # (beside a system torch, other packages may be installed too)
    if os.environ["ISOLATED"] == "1":
        assert importlib.util.find_spec(optional) is None, f"{optional} came with the core install"
print("install-check:", moediffuseq.__version__, moediffuseq.build_info())
torch.library.opcheck(torch.ops.moediffuseq.moe_topk_softmax.default, (torch.randn(13, 6), 2))
weights, _ = moe_topk_softmax(torch.randn(5, 4), 2)
assert torch.allclose(weights.sum(-1), torch.ones(5))
print("install-check: opcheck of moe_topk_softmax passed")
PYCODE
"${CLEAN[@]}" "$OUT/venv/bin/python" -m bench.gpu_smoke --device cpu --out "$OUT/smoke"
step "smoke: every op against its reference, from the installed wheel"

# The sdist's tests against the installed wheel. The test dependencies come from the build
# environment, appended behind the fresh one's site-packages (whose torch and moediffuseq win).
# pytest runs from outside the unpacked sdist (rootdir and configuration are still the sdist's),
# so neither it nor the Python processes its tests start find the sdist's moediffuseq/ sources.
SITE=$("$OUT/venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
"$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])' >"$SITE/zz_test_dependencies.pth"
PYTEST=("$OUT/venv/bin/python" -c 'import sys; sys.path[:1] = []; import moediffuseq, pytest
assert moediffuseq.__file__.startswith(sys.prefix), f"not the installed package: {moediffuseq.__file__}"
sys.exit(pytest.main(sys.argv[1:]))')
"${PYTEST[@]}" --collect-only -q -p no:cacheprovider "$SRC/tests" >"$OUT/collect.log" 2>&1 \
  || { tail -30 "$OUT/collect.log"; exit 1; }
step "sdist: $(tail -1 "$OUT/collect.log")"
TESTS=() && for t in $SDIST_TESTS; do TESTS+=("$SRC/tests/$t"); done
"${PYTEST[@]}" -q -p no:cacheprovider -x "${TESTS[@]}" -k "$SDIST_TESTS_K" >"$OUT/tests.log" 2>&1 \
  || { tail -40 "$OUT/tests.log"; exit 1; }
step "sdist tests: $(tail -1 "$OUT/tests.log") ($SDIST_TESTS)"
step "done"
