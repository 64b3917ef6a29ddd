#!/usr/bin/env bash
# GPU check of the CUDA kernels on a Hopper machine (H100/H200) with its own CUDA torch, nvcc,
# cmake, ninja and pybind11 and no network: one run, one deadline (default 540 s, the build
# included), one streamed log. Stages, in order (python3 -m bench.gpu_check --list shows the
# commands):
#   environment         GPU, driver, toolchain, torch; installs the carried wheels (every call)
#   build               MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST=9.0a, all cores, ninja's progress
#                       in the log; not rebuilt when the sources and settings match the last build
#   archs               cmake/check_cuda_archs.py --so moediffuseq/_C*.so --archs 90a
#   smoke               bench.gpu_smoke: every op forward and backward once against its
#                       reference, each op in its own process
#   tests               the CUDA tests, hypothesis profile "gpu", one pytest process per file
#   bench_attention     bench.attention at L = 8192 and 32768, a table line per length
#   bench_moe           bench.moe, asserting the CUTLASS grouped GEMM ran (no cuBLAS in the op)
#   bench_diffusion     bench.diffusion (the three diffusion ops) at 1e7 and 1e8 elements
#   end_to_end          bench.end_to_end, short training and sampling
# Each stage runs for at most min(its limit, time left - 30 s); a stage that overruns is killed
# and the run goes on. Tests and benchmarks run with MOEDIFFUSEQ_STRICT_CUTLASS=1 (a CUTLASS
# grouped GEMM that refuses a bf16/fp16 problem it should take is an error, not a fallback).
#
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
# Wheels: the machine lacks three pure-Python packages, carried as wheel files in $WHEEL_DIR
# (default .whl, kept out of git through .git/info/exclude) and installed by the environment
# stage with pip --target into $SITE_DIR (default build/gpu_check/site), which leads PYTHONPATH:
#   nvidia-cutlass==4.2.0.0   CUTLASS/CuTe headers for the build (cutlass_library)
#   expecttest                torch.library.opcheck in the tests
#   nltk                      sentence BLEU in end_to_end.py's quality run
# (hypothesis, pytest, pybind11, sacrebleu, tokenizers, safetensors, tqdm, pyyaml are there.)
# Fetch them beforehand on a machine with network access:
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux2014_x86_64 -d .whl nvidia-cutlass==4.2.0.0 expecttest nltk
#
# Environment: PYTHON (default python3), DEADLINE, STAGES, FORCE=1 (rerun stages that ended ok),
# RESULTS_DIR, WHEEL_DIR, SITE_DIR, MAX_JOBS (default: all cores), GPU_CHECK_WORK_DIR.
# Dry run without a GPU (as tests/test_gpu_check.py does): GPU_CHECK_FAKE=1 bash bench/gpu_check.sh
set -u
cd "$(dirname "$0")/.."
exec "${PYTHON:-python3}" -m bench.gpu_check "$@"
