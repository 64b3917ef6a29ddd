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
# CUDA tests: one pytest process per file (a crash in one file hides nothing in the others), all
# at once; "-k cuda" keeps the CUDA cases. test_build.py runs whole (it checks the build info).
CUDA_TEST_FILES = ("test_block_sparse_attention.py", "test_block_sparse_attention_causal_gqa_layout.py",
                   "test_block_sparse_attention_registration.py", "test_block_sparse_attention_bad_inputs.py",
                   "test_moe_topk_softmax.py", "test_moe_ffn.py", "test_soft_absorb_q_sample.py", "test_denoise_step.py",
                   "test_nearest_embedding.py")


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


def pytest_job(label: str, path: str, tables: Path, python: str, threads: int, select_cuda: bool = True) -> Job:
    """A pytest run of one test file under the ``gpu`` hypothesis profile, a JUnit XML into tables/
    (``threads``: CPU threads of its torch, as several files run at once)."""
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short",
            "-o", "faulthandler_timeout=120", f"--junitxml={tables / f'junit_{label}.xml'}"]
    if select_cuda:
        argv += ["-k", "cuda"]
    return Job(label, tuple(argv + [path]), {"MOEDIFFUSEQ_HYPOTHESIS_PROFILE": "gpu", "OMP_NUM_THREADS": str(threads)})


def stages(python: str, tables: Path) -> list[Stage]:
    """The stages of a GPU check, in order."""
    me, out = ("-m", "bench.gpu_check"), str(tables)

    def job(label: str, *argv: str) -> tuple[Job, ...]:
        return (Job(label, (python, *argv)),)

    threads = max(1, (os.cpu_count() or 1) // (len(CUDA_TEST_FILES) + 1))
    tests = [pytest_job(f.removeprefix("test_").removesuffix(".py"), f"tests/{f}", tables, python, threads)
             for f in CUDA_TEST_FILES]
    tests.append(pytest_job("build_info", "tests/test_build.py", tables, python, threads, select_cuda=False))
    return [
        Stage("environment", 60, job("env", *me, "env"), always=True,
              doc="GPU, driver, toolchain, torch; installs the carried wheels; fails without CUDA or CUTLASS"),
        Stage("build", 300, job("build", *me, "build"), needs=("environment",),
              doc=f"MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST}, all cores; skipped when up to date"),
        Stage("archs", 30, job("archs", *me, "archs"), needs=("build",),
              doc=f"cmake/check_cuda_archs.py: the .so holds sm_{CUDA_ARCHS} code only"),
        Stage("smoke", 150, job("smoke", "-m", "bench.gpu_smoke", "--device", "cuda", "--out", out),
              needs=("build",),
              doc="every op forward and backward once against its reference, each op in its own process"),
        Stage("tests", 180, tuple(tests), needs=("build",), parallel=len(tests),
              doc="CUDA tests, hypothesis profile gpu, one process per file"),
        Stage("bench_attention", 180,
              job("attention", "-m", "bench.attention", "--device", "cuda", "--lengths", "8192", "32768",
                  "--repeats", "5", "--cell-seconds", "3", "--out", out), needs=("build",),
              doc="L = 8192 and 32768, a table line per length"),
        Stage("bench_moe", 150,
              job("moe", "-m", "bench.moe", "--device", "cuda", "--repeats", "5", "--profile-steps", "2",
                  "--out", out),
              needs=("build",), doc="asserts the CUTLASS grouped GEMM kernels ran and no cuBLAS GEMM inside the op"),
        Stage("bench_diffusion", 150,
              job("diffusion", "-m", "bench.diffusion", "--device", "cuda", "--sizes", "1e7", "1e8",
                  "--repeats", "20", "--out", out), needs=("build",),
              doc="denoise_step, soft_absorb_q_sample, nearest_embedding at 1e7 and 1e8 elements"),
        Stage("end_to_end", 180,
              job("end_to_end", "-m", "bench.end_to_end", "--device", "cuda", "--lengths", "1024", "--steps", "3",
                  "--ddpm-probe", "5", "--quality-minutes", "0.25", "--out", out), needs=("build",),
              doc="short training and sampling, MoE-DiffuSeq vs DiffuSeq"),
    ]


def stage_budget(limit_s: float, left_s: float, margin_s: float = MARGIN_S) -> float:
    """Seconds a stage may run: its own limit, or the time left before the deadline less the
    margin, whichever is smaller (negative when the margin is already eaten into)."""
    return min(limit_s, left_s - margin_s)
