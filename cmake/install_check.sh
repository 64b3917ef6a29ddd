#!/usr/bin/env bash
# The install as a user meets it: from the checkout's files (tracked and new, as in a fresh clone)
# a source distribution, a wheel built from that sdist, and the wheel installed into a fresh
# virtual environment that has only torch and the core dependencies; there, from outside the
# checkout, the package imports, every op runs forward and backward once against its reference
# (python -m bench.gpu_smoke --device cpu) and one op passes torch.library.opcheck.
#
#   bash cmake/install_check.sh BUILD_PYTHON [OUT_DIR]     # or: make install-check
#   bash cmake/install_check.sh --plan BUILD_PYTHON         # print the torch it would use, and stop
#
# BUILD_PYTHON: a Python with torch, the build tools and `build` (the project's .venv).
# TORCH_SPEC: the torch of the fresh environment, installed with pip (unset: the build's torch
# release); set and empty: the torch already installed, seen through a fresh environment made
# with --system-site-packages (nothing is downloaded; then optional packages installed beside it
# are not reported as having come with the core install).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PLAN_ONLY=0
if [ "${1:-}" = "--plan" ]; then PLAN_ONLY=1; shift; fi
PY=${1:?usage: install_check.sh [--plan] BUILD_PYTHON [OUT_DIR]}
OUT=${2:-build/install-check}
TORCH_SPEC=${TORCH_SPEC-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
if [ -n "$TORCH_SPEC" ]; then
  VENV_FLAGS=() TORCH_PLAN="$TORCH_SPEC (pip, fresh environment)"
else
  VENV_FLAGS=(--system-site-packages) TORCH_PLAN="the installed torch (fresh environment with --system-site-packages)"
fi
echo "install-check: torch: $TORCH_PLAN"
if [ "$PLAN_ONLY" = 1 ]; then exit 0; fi
start=$(date +%s)
step() { echo "install-check: $* ($(( $(date +%s) - start )) s)"; }

rm -rf "$OUT" && mkdir -p "$OUT/src" "$OUT/dist"
OUT=$(cd "$OUT" && pwd)
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -f "$f" ]; then mkdir -p "$OUT/src/$(dirname "$f")" && cp -p "$f" "$OUT/src/$f"; fi
done
"$PY" -m build --sdist --no-isolation --outdir "$OUT/dist" "$OUT/src" >"$OUT/sdist.log" 2>&1 \
  || { tail -20 "$OUT/sdist.log"; exit 1; }
SDIST=$(ls "$OUT"/dist/moediffuseq-*.tar.gz)
step "sdist $(basename "$SDIST")"
MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel --quiet --no-build-isolation --no-deps --wheel-dir "$OUT/dist" "$SDIST" \
  >"$OUT/wheel.log" 2>&1 || { tail -30 "$OUT/wheel.log"; exit 1; }
WHEEL=$(ls "$OUT"/dist/moediffuseq-*.whl)
step "wheel $(basename "$WHEEL") built from the sdist"

python3 -m venv ${VENV_FLAGS[@]+"${VENV_FLAGS[@]}"} "$OUT/venv"
if [ -n "$TORCH_SPEC" ]; then
  "$OUT/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
elif ! "$OUT/venv/bin/python" -c "import torch" 2>/dev/null; then
  echo "install-check: TORCH_SPEC is empty (use the installed torch) but $(command -v python3) has no torch;" \
    "install torch there or set TORCH_SPEC, e.g. TORCH_SPEC=torch==2.13.0" >&2
  exit 1
fi
"$OUT/venv/bin/python" -m pip install --quiet "$WHEEL"
step "fresh environment: $TORCH_PLAN and the wheel (core dependencies only)"
cd "$OUT"  # away from the checkout: the installed package, not the sources, is imported
ISOLATED=$([ -n "$TORCH_SPEC" ] && echo 1 || echo 0) venv/bin/python - <<'PYCODE'
import os
import importlib.util
import sys

import torch

import moediffuseq
from moediffuseq.extras import extra_of_module
from moediffuseq.ops import moe_topk_softmax

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
ln -s "$ROOT/bench" bench  # bench/ alone importable here: the smoke module runs on the installed package
venv/bin/python -m bench.gpu_smoke --device cpu --out "$OUT/smoke"
step "done"
