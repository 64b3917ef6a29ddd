"""The GPU check's stages as data (bench/gpu_check.py runs them): what each runs, its time limit,
what it needs; ``python -m bench.gpu_check --list`` prints them."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bench.gpu_check_jobs import Job

CUDA_ARCH_LIST = "9.0a"  # TORCH_CUDA_ARCH_LIST of the build: sm_90a code only
CUDA_ARCHS = "90a"  # what cmake/check_cuda_archs.py must find in the .so, and nothing else
MARGIN_S = 30.0  # kept free before the deadline: the summary, the archive, the tool's transfers
DEADLINE_S = 540.0  # one call of the device tool: 9 minutes, the build included
# CUDA tests: one pytest process per file (a crash in one file hides nothing in the others), all
# at once; "-k cuda" keeps the CUDA cases. WHOLE_TEST_FILES are about CUDA as a whole (the build
# info, streams, the test harness) and run with their own selection.
CUDA_TEST_FILES = ("test_kernels_exact_inputs.py", "test_block_sparse_attention_lse_round_trip.py",
                   "test_block_sparse_attention.py", "test_block_sparse_attention_causal_gqa_layout.py",
                   "test_block_sparse_attention_registration.py", "test_block_sparse_attention_bad_inputs.py",
                   "test_moe_topk_softmax.py", "test_moe_ffn.py", "test_soft_absorb_q_sample.py", "test_denoise_step.py",
                   "test_nearest_embedding.py")
# (the host programs of tests/cuda_host/ need no GPU and minutes of nvcc: the build stage and
# `make cuda-check` cover them)
WHOLE_TEST_FILES = {"test_build.py": "", "test_cuda_streams.py": "", "test_cuda_test_harness.py": "not host_program"}
# The stage limits, in seconds, in stage order; they add up to DEADLINE_S - MARGIN_S, so every stage
# gets its whole limit on a fresh machine when the stages before it use theirs
# (tests/test_gpu_check.py asserts the sum). The build: ~32 translation units on 16 cores, so
# its wall time is about that of the slowest one, a CUTLASS grouped GEMM instantiation (~3 minutes
# at one job on a shared 2-core machine, the attention kernels 1-2 minutes, the torch glue ~10 s),
# plus CMake's configure and the link; every later stage needs it, so it gets the slack.
LIMITS_S = {
    "environment": 15, "build": 220, "archs": 5, "smoke": 30, "tests": 60, "bench_attention": 70,
    "bench_moe": 30, "bench_diffusion": 15, "end_to_end": 35, "sanitizer": 30,
}
# compute-sanitizer on the causal split-global-key case of block_sparse_attention's backward.
SANITIZER = ("s=$(command -v compute-sanitizer || ls /usr/local/cuda/bin/compute-sanitizer 2>/dev/null); "
             "[ -n \"$s\" ] || { echo 'compute-sanitizer not found'; exit 1; }; exec \"$s\" \"$@\"")


@dataclass(frozen=True)
class Stage:
    """A named step: its jobs run ``parallel`` at a time within ``limit_s`` seconds; it runs only
    when every stage in ``needs`` ended ok (in this call or an earlier one)."""

    name: str
    limit_s: float
    jobs: tuple[Job, ...]
    needs: tuple[str, ...] = ()
    parallel: int = 1
    always: bool = False  # run in every call, whatever the state says
    doc: str = ""


def pytest_job(label: str, path: str, tables: Path, python: str, threads: int, select: str = "cuda") -> Job:
    """A pytest run of one test file under the ``gpu`` hypothesis profile, a JUnit XML into tables/
    (``threads``: CPU threads of its torch, as several files run at once; ``select``: the -k
    expression, "" for the whole file)."""
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short",
            "-o", "faulthandler_timeout=120", f"--junitxml={tables / f'junit_{label}.xml'}"]
    if select:
        argv += ["-k", select]
    return Job(label, tuple(argv + [path]), {"MOEDIFFUSEQ_HYPOTHESIS_PROFILE": "gpu", "OMP_NUM_THREADS": str(threads)})


def stages(python: str, tables: Path) -> list[Stage]:
    """The stages of a GPU check, in order: what must come back first comes first (the build and a
    smoke of every op, the correctness sweep, then the headline row of every benchmark, then the
    sanitizer)."""
    me, out = ("-m", "bench.gpu_check"), str(tables)

    def job(label: str, *argv: str) -> tuple[Job, ...]:
        return (Job(label, (python, *argv)),)

    def sanitizer(label: str, *tool: str) -> Job:
        return Job(label, ("bash", "-c", SANITIZER, "compute-sanitizer", *tool, "--error-exitcode", "1",
                           python, "-m", "bench.gpu_sanitize_case", "--no-compare"))

    files = [(f, "cuda") for f in CUDA_TEST_FILES] + list(WHOLE_TEST_FILES.items())
    threads = max(1, (os.cpu_count() or 1) // len(files))
    tests = [pytest_job(f.removeprefix("test_").removesuffix(".py"), f"tests/{f}", tables, python, threads,
                        select=select) for f, select in files]
    limit = LIMITS_S
    return [
        Stage("environment", limit["environment"], job("env", *me, "env"), always=True,
              doc="GPU, driver, toolchain, torch; checks and installs the carried wheels; fails without CUDA or CUTLASS"),
        Stage("build", limit["build"], job("build", *me, "build"), needs=("environment",),
              doc=f"MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST}, all cores; skipped when up to date"),
        Stage("archs", limit["archs"], job("archs", *me, "archs"), needs=("build",),
              doc=f"cmake/check_cuda_archs.py: the .so holds sm_{CUDA_ARCHS} code only"),
        Stage("smoke", limit["smoke"], job("smoke", "-m", "bench.gpu_smoke", "--device", "cuda", "--out", out),
              needs=("build",),
              doc="every op forward and backward once against its reference, each op in its own process"),
        Stage("tests", limit["tests"], tuple(tests), needs=("build",), parallel=len(tests),
              doc="the correctness sweep: CUDA kernels against the CPU kernels and the float64 references "
                  "(exact-input bounds, lse round trip, scale 1e9, hypothesis profile gpu), one process per file"),
        Stage("bench_attention", limit["bench_attention"],
              job("attention", "-m", "bench.attention", "--device", "cuda", "--lengths", "8192", "32768",
                  "--repeats", "3", "--cell-seconds", "2", "--out", out), needs=("build",),
              doc="forward and forward+backward at L = 8192 and 32768, FlexAttention and SDPA beside"),
        Stage("bench_moe", limit["bench_moe"],
              job("moe", "-m", "bench.moe", "--device", "cuda", "--repeats", "3", "--profile-steps", "1",
                  "--max-seconds", "4", "--out", out),
              needs=("build",), doc="against grouped_mm and the expert loop; asserts the CUTLASS grouped GEMM ran "
                                    "and no cuBLAS GEMM inside the op"),
        Stage("bench_diffusion", limit["bench_diffusion"],
              job("diffusion", "-m", "bench.diffusion", "--device", "cuda", "--ops", "denoise_step", "--sizes",
                  "1e8", "--repeats", "20", "--out", out), needs=("build",),
              doc="denoise_step at 1e8 elements against the copy bandwidth"),
        Stage("end_to_end", limit["end_to_end"],
              job("end_to_end", "-m", "bench.end_to_end", "--device", "cuda", "--lengths", "1024", "--steps", "3",
                  "--ddpm-probe", "5", "--quality-steps", "0", "--out", out), needs=("build",),
              doc="one training and one sampling row, MoE-DiffuSeq vs DiffuSeq"),
        Stage("sanitizer", limit["sanitizer"],
              (sanitizer("memcheck", "--tool", "memcheck"),
               sanitizer("racecheck", "--tool", "racecheck", "--kernel-name", "kns=block_sparse_attention_bwd"),
               Job("compare", (python, "-m", "bench.gpu_sanitize_case"))),
              needs=("build",), parallel=3,
              doc="compute-sanitizer memcheck and racecheck on the causal L = 8192 case whose split global-key "
                  "tiles have no query (bench/gpu_sanitize_case.py), and that case against the CPU kernels"),
    ]


def stage_budget(limit_s: float, left_s: float, margin_s: float = MARGIN_S) -> float:
    """Seconds a stage may run: its own limit, or the time left before the deadline less the
    margin, whichever is smaller (negative when the margin is already eaten into)."""
    return min(limit_s, left_s - margin_s)
