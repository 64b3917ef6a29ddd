#!/usr/bin/env bash
# Builds the whole extension (CUDA kernels and their torch glue) against a CUDA build of torch
# with the local nvcc, on a machine without a GPU, into its own directory (the in-place
# moediffuseq/_C*.so of the project's venv is left alone); then imports it in that Python,
# prints build_info and checks the architectures of the library (cmake/check_cuda_archs.py).
#
#   bash cmake/cuda_torch_build.sh /path/to/cuda-torch/bin/python [build/cuda-torch]   # or: make cuda-build
#
# The Python must have torch (CUDA build), cmake, ninja, pybind11 and nvidia-cutlass. Its nvidia
# wheels provide the library headers a bare nvcc install lacks (cuBLAS, ...): the toolkit
# directory <out>/toolkit merges both (cmake/cuda_toolkit_from_wheels.py). Environment:
# NVCC (default: nvcc on PATH, else /usr/local/cuda/bin/nvcc), MAX_JOBS (default 2),
# MOEDIFFUSEQ_CUDA_ARCHS / TORCH_CUDA_ARCH_LIST (the architectures; default 9.0a).
# Layout: <out>/toolkit, <out>/cmake (the CMake build), <out>/python/moediffuseq (the package:
# links to the sources and the new _C), so PYTHONPATH=<out>/python imports this build.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: cuda_torch_build.sh PYTHON [OUT_DIR]}
OUT=$(mkdir -p "${2:-build/cuda-torch}" && cd "${2:-build/cuda-torch}" && pwd)
NVCC=${NVCC:-$(command -v nvcc || echo /usr/local/cuda/bin/nvcc)}
MAX_JOBS=${MAX_JOBS:-2}
start=$(date +%s)
elapsed() { echo "$(( $(date +%s) - start )) s"; }

# The toolkit root nvcc itself uses (nvcc may be a wrapper script elsewhere on PATH).
ROOT=$("$NVCC" -dryrun -x cu -c /dev/null -o /dev/null 2>&1 | sed -n 's/^#\$ TOP=//p' | head -1)
[ -n "$ROOT" ] || { echo "cuda-build: cannot find the toolkit of $NVCC"; exit 1; }
ROOT=$(cd "$ROOT" && pwd -P)
"$PY" -c "import torch, sys; sys.exit(0 if torch.version.cuda else f'cuda-build: {sys.executable} has a CPU torch')"
TK=$("$PY" cmake/cuda_toolkit_from_wheels.py --cuda "$ROOT" --out "$OUT/toolkit")
echo "cuda-build: toolkit $TK (nvcc of $ROOT + the CUDA wheels of $PY)"

# cmake and ninja of that Python's environment first; cuobjdump beside nvcc for the check.
export PATH="$(dirname "$PY"):$TK/bin:$PATH" CUDA_HOME="$TK" CUDACXX="$TK/bin/nvcc"
PKG="$OUT/python/moediffuseq"
mkdir -p "$PKG" && find "$PKG" -mindepth 1 -maxdepth 1 -type l -delete  # keeps the built _C
cmake -S . -B "$OUT/cmake" -GNinja -DCMAKE_BUILD_TYPE=Release -DPython_EXECUTABLE="$PY" \
  -DMOEDIFFUSEQ_CUDA=ON -DCUDA_TOOLKIT_ROOT_DIR="$TK" -DCMAKE_CUDA_COMPILER="$TK/bin/nvcc" \
  -DMOEDIFFUSEQ_CUDA_ARCHS="${MOEDIFFUSEQ_CUDA_ARCHS:-}" -DTORCH_CUDA_ARCH_LIST="${TORCH_CUDA_ARCH_LIST:-}" \
  -DCMAKE_LIBRARY_OUTPUT_DIRECTORY="$PKG" >"$OUT/configure.log" 2>&1 \
  || { tail -40 "$OUT/configure.log"; exit 1; }
grep "moediffuseq:" "$OUT/configure.log"
cmake --build "$OUT/cmake" --parallel "$MAX_JOBS"
echo "cuda-build: built in $(elapsed)"

# The package: every source entry linked, the new _C beside them.
for entry in moediffuseq/*; do
  case "$(basename "$entry")" in _C*.so | _build_config.json | __pycache__) ;; *) ln -s "$PWD/$entry" "$PKG/" ;; esac
done
SO=$(ls "$PKG"/_C*.so)
# (run from $OUT: the repository's own moediffuseq/ must not shadow the package under test)
(cd "$OUT" && PYTHONPATH="$OUT/python" "$PY" - "$SO") <<'PYCODE'
import sys

import torch

import moediffuseq

so = sys.argv[1]
assert moediffuseq._C.__file__ == so, f"imported {moediffuseq._C.__file__}, expected {so}"
info = moediffuseq.build_info()
print("cuda-build: imported", so)
print("cuda-build:", info)
assert info.has_cuda, "the CUDA kernels are not in the build"
def ours(key):
    return {op for op in torch._C._dispatch_get_registrations_for_dispatch_key(key) if op.startswith("moediffuseq::")}


missing = sorted(ours("CPU") - ours("CUDA"))
assert not missing, f"ops with a CPU kernel but no CUDA kernel: {missing}"
print(f"cuda-build: CUDA kernels registered for all {len(ours('CPU'))} ops; GPU visible: {torch.cuda.is_available()}")
PYCODE
"$PY" cmake/check_cuda_archs.py --so "$SO" --archs "$(cat "$OUT/cmake/moediffuseq_cuda_archs.txt")"
echo "cuda-build: done in $(elapsed) (PYTHONPATH=$OUT/python imports this build)"
