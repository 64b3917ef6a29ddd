#!/usr/bin/env bash
# The install as a user meets it: from the checkout's files (tracked and new, as in a fresh clone)
# a source distribution, a wheel built from that sdist, and the wheel installed into a fresh
# virtual environment that has only torch and the core dependencies; there, from outside the
# checkout, the package imports, every op runs forward and backward once against its reference
# (python -m bench.gpu_smoke --device cpu) and one op passes torch.library.opcheck.
#
#   bash cmake/install_check.sh BUILD_PYTHON [OUT_DIR]     # or: make install-check
#
# BUILD_PYTHON: a Python with torch, the build tools and `build` (the project's .venv).
# TORCH_SPEC: the torch of the fresh environment (default: the build's torch release).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
PY=${1:?usage: install_check.sh BUILD_PYTHON [OUT_DIR]}
OUT=${2:-build/install-check}
TORCH_SPEC=${TORCH_SPEC:-torch==$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')}
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

python3 -m venv "$OUT/venv"
"$OUT/venv/bin/python" -m pip install --quiet "$TORCH_SPEC"
"$OUT/venv/bin/python" -m pip install --quiet "$WHEEL"
step "fresh environment: $TORCH_SPEC and the wheel (core dependencies only)"
cd "$OUT"  # away from the checkout: the installed package, not the sources, is imported
venv/bin/python - <<'PYCODE'
import importlib.util
import sys

import torch

import moediffuseq
from moediffuseq.extras import extra_of_module
from moediffuseq.ops import moe_topk_softmax

assert "site-packages" in moediffuseq.__file__, moediffuseq.__file__
assert extra_of_module(), "the wheel's metadata names no extras"
for optional in extra_of_module():
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
