#!/usr/bin/env bash
# GPU check of the CUDA kernels on a fresh Hopper machine (H100/H200) that has a CUDA build of
# torch, nvcc, cmake and ninja but no network: installs the carried wheels, builds the
# extension with MOEDIFFUSEQ_CUDA=ON, runs the CUDA tests and the CUDA benchmarks, and prints
# a summary table last. Budget: about 8 minutes in all.
#
#   bash bench/gpu_check.sh                 # from the repository root
#
# Wheels: the pinned packages the machine lacks (nvidia-cutlass, expecttest) are carried as
# wheel files (both pure Python) in $WHEEL_DIR (default .whl, kept out of git through
# .git/info/exclude), fetched beforehand on a machine with network access:
#   python3 -m pip download --no-deps --only-binary=:all: -d .whl nvidia-cutlass==4.2.0.0 expecttest
# Environment: PYTHON (default python3), WHEEL_DIR, MAX_JOBS (default: all cores),
# RESULTS_DIR (tables and logs; default $OUT when set, else bench/out/gpu).
#
# Adding a step: write a function step_<name> that runs it (return non-zero on failure) and
# add <name> to STEPS below, with its time limit in seconds in LIMITS.
set -uo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
WHEEL_DIR=${WHEEL_DIR:-.whl}
MAX_JOBS=${MAX_JOBS:-$(nproc)}
RESULTS_DIR=${RESULTS_DIR:-${OUT:-bench/out/gpu}}
SITE_DIR=${SITE_DIR:-/tmp/moediffuseq-site}
mkdir -p "$RESULTS_DIR"
# The carried wheels go into $SITE_DIR (the machine's own packages stay as they are).
export PYTHONPATH="$SITE_DIR${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1 PYTHON WHEEL_DIR MAX_JOBS RESULTS_DIR SITE_DIR

# ---------------------------------------------------------------------------------------------
# Steps, run in this order; each one's output goes to $RESULTS_DIR/<name>.log and the console.
STEPS=(environment install_wheels build test_attention bench_attention test_moe_diffusion bench_moe
       bench_denoise_step bench_end_to_end)
declare -A LIMITS=([environment]=30 [install_wheels]=30 [build]=180 [test_attention]=120 [bench_attention]=150
                   [test_moe_diffusion]=150 [bench_moe]=120 [bench_denoise_step]=120 [bench_end_to_end]=150)
# Steps whose failure stops the run (everything after them needs what they make).
REQUIRED=(install_wheels build)

step_environment() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  command -v nvcc && nvcc --version | tail -1
  "$PYTHON" - <<'PY'
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    print("device", torch.cuda.get_device_name(), "capability", torch.cuda.get_device_capability())
PY
}

step_install_wheels() {
  if compgen -G "$WHEEL_DIR/*.whl" >/dev/null; then
    "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE_DIR" "$WHEEL_DIR"/*.whl || return 1
  else
    echo "no wheels in $WHEEL_DIR; using the packages already installed"
  fi
  "$PYTHON" -c "import cutlass_library, os; print('cutlass headers:', os.path.dirname(cutlass_library.__file__))"
}

step_build() {
  rm -rf build moediffuseq/_C*.so
  MOEDIFFUSEQ_CUDA=ON "$PYTHON" -m pip install -q --no-build-isolation --no-deps --no-index -e . || return 1
  "$PYTHON" -c "import moediffuseq; print(moediffuseq.build_info())"
  "$PYTHON" -c "import moediffuseq, sys; sys.exit(0 if moediffuseq.build_info().has_cuda else 1)"
}

step_test_attention() {
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_block_sparse_attention.py -k cuda
}

step_bench_attention() {
  "$PYTHON" bench/attention.py --device cuda --repeats 5 --cell-seconds 3 --out "$RESULTS_DIR"
}

step_test_moe_diffusion() {
  "$PYTHON" -m pytest -q -p no:cacheprovider tests/test_moe_topk_softmax.py tests/test_moe_ffn.py \
    tests/test_soft_absorb_q_sample.py tests/test_denoise_step.py -k cuda
}

step_bench_moe() {
  "$PYTHON" bench/moe.py --device cuda --out "$RESULTS_DIR"
}

step_bench_denoise_step() {
  "$PYTHON" bench/denoise_step.py --device cuda --sizes 1e7 1e8 4e8 --out "$RESULTS_DIR"
}

step_bench_end_to_end() {
  if [ ! -f bench/end_to_end.py ]; then echo "bench/end_to_end.py not present: nothing to run"; return 0; fi
  "$PYTHON" bench/end_to_end.py --device cuda --steps 3 --ddpm-probe 5 --quality-minutes 0.5 --out "$RESULTS_DIR"
}

# ---------------------------------------------------------------------------------------------
for name in "${STEPS[@]}"; do export -f "step_$name"; done
declare -A STATUS SECONDS_TAKEN
stop=""
for name in "${STEPS[@]}"; do
  if [ -n "$stop" ]; then
    STATUS[$name]="skipped ($stop failed)"; SECONDS_TAKEN[$name]=0; continue
  fi
  echo "=== step $name (limit ${LIMITS[$name]} s) ==="
  start=$(date +%s)
  timeout --kill-after=10 "${LIMITS[$name]}" bash -c "step_$name" 2>&1 | tee "$RESULTS_DIR/$name.log"
  rc=${PIPESTATUS[0]}
  [ $rc -eq 124 ] && echo "step $name: time limit of ${LIMITS[$name]} s reached"
  SECONDS_TAKEN[$name]=$(( $(date +%s) - start ))
  if [ $rc -eq 0 ]; then STATUS[$name]="ok"; else STATUS[$name]="FAIL (rc $rc)"; fi
  for required in "${REQUIRED[@]}"; do
    [ "$required" = "$name" ] && [ $rc -ne 0 ] && stop=$name
  done
done

echo
echo "## GPU check summary"
echo
# Each bench step's table, compact: its lines that start with "| L" or "| <number>".
for table in attention_cuda end_to_end_cuda end_to_end_quality_cuda; do
  if [ -f "$RESULTS_DIR/$table.md" ]; then
    echo "$table (full table and notes: $RESULTS_DIR/$table.md):"
    grep -E '^\| *(L |model|[0-9a-z])' "$RESULTS_DIR/$table.md" | head -40
    grep -E 'check at' "$RESULTS_DIR/$table.md" || true
    echo
  fi
done
# MoE and denoising-step tables: their rows and their target lines.
for table in moe_cuda:bench_moe denoise_step_cuda:bench_denoise_step; do
  md="$RESULTS_DIR/${table%%:*}.md" log="$RESULTS_DIR/${table#*:}.log"
  if [ -f "$md" ]; then
    echo "${table%%:*} (full table and notes: $md):"
    grep -E '^\| *(pass|dtype|fwd|float32|bfloat16)' "$md" | head -40
    grep -hE '^- (PASS|FAIL)' "$log" 2>/dev/null || true
    echo
  fi
done
printf '| %-18s | %-34s | %7s |\n' step status seconds
printf '|%s|%s|%s|\n' "--------------------" "------------------------------------" "---------"
failed=0
for name in "${STEPS[@]}"; do
  printf '| %-18s | %-34s | %7s |\n' "$name" "${STATUS[$name]}" "${SECONDS_TAKEN[$name]}"
  [ "${STATUS[$name]}" = ok ] || failed=1
done
exit $failed
