#!/usr/bin/env bash
# GPU check of the CUDA kernels on a Hopper machine (H100/H200) with its own CUDA torch, nvcc,
# cmake, ninja and pybind11 and no network: one run, one deadline (default 540 s, the build
# included), one streamed log.
#
# Stages, in order (python3 -m bench.gpu_check --list shows the commands; the limits are
# bench/gpu_check_stages.py's LIMITS_S, which add up to the deadline less a 30 s margin):
#   environment 15 s    GPU, driver, toolchain, torch; checks .whl/ against the pins and installs it
#   build      220 s    MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0a, all cores, ninja's progress
#                       in the log; not rebuilt when the sources and settings match the last build
#   archs        5 s    cmake/check_cuda_archs.py --so moediffuseq/_C*.so --archs 90a
#   smoke       30 s    bench.gpu_smoke: every op forward and backward once against its
#                       reference, each op in its own process
#   tests       60 s    the correctness sweep: CUDA kernels against the CPU kernels and the float64
#                       references, hypothesis profile "gpu", one pytest process per file
#   bench_attention 70 s  L = 8192 and 32768, forward and forward+backward, FlexAttention and SDPA
#   bench_moe   30 s    against grouped_mm and the loop, asserting the CUTLASS grouped GEMM ran
#   bench_diffusion 15 s  denoise_step at 1e8 elements against the copy bandwidth
#   end_to_end  35 s    one training and one sampling row (no quality run)
#   sanitizer   30 s    compute-sanitizer memcheck and racecheck on bench/gpu_sanitize_case.py
# Each stage runs for at most min(its limit, time left - 30 s); a stage that overruns is killed
# and the run goes on; the summary names every stage that was cut or skipped. Tests and
# benchmarks run with MOEDIFFUSEQ_STRICT_CUTLASS=1 (a CUTLASS grouped GEMM that refuses a
# bf16/fp16 problem it should take is an error, not a fallback).
#
#   make gpu-wheels                                            # beforehand, with network
#   bash bench/gpu_check.sh                                    # from the repository root
#   DEADLINE=200 bash bench/gpu_check.sh                       # a second call: resumes
#   STAGES=smoke,bench_moe bash bench/gpu_check.sh             # just these (rerun even if ok)
#
# Results ($RESULTS_DIR, default $OUT, else bench/out/gpu; 4 files, no folder): gpu_check.log
# (the streamed log), summary.md (key table lines and one row per stage; printed last),
# state.json, tables.tar.gz (every table, refreshed after each stage). The summary is written
# even when a stage hangs or the run is stopped. build/gpu_check/ keeps the CMake tree, the
# tables and the state, so a second call on the same (still warm) machine skips the build and
# the stages that ended ok.
#
# Wheels: the GPU machine has its CUDA torch (with torch's own requirements), nvcc, cmake, ninja
# and pybind11, and no network. Everything else the check imports (nvidia-cutlass's headers,
# pytest, hypothesis, expecttest, nltk, sacrebleu, tokenizers, numpy, ... with their
# requirements) is pinned in bench/gpu_check_wheels.py, fetched by `make gpu-wheels` into $WHEEL_DIR
# (default .whl, git-ignored) for CPython 3.12 on manylinux x86_64, and installed by the environment
# stage with pip --no-index --no-deps --target into $SITE_DIR (default build/gpu_check/site), which
# leads PYTHONPATH. tests/test_gpu_check.py checks that the pins cover what the check imports.
#
# Environment: PYTHON (default python3), DEADLINE, STAGES, FORCE=1 (rerun stages that ended ok),
# RESULTS_DIR, WHEEL_DIR, SITE_DIR, MAX_JOBS (default: all cores), GPU_CHECK_WORK_DIR.
# Dry run without a GPU (as tests/test_gpu_check.py does): GPU_CHECK_FAKE=1 bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
