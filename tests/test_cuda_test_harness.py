"""The CUDA test machinery itself: a GPU machine whose build lacks the CUDA kernels fails loudly
instead of skipping every CUDA test; the hypothesis draws of the MoE ops reach the expert counts
and the CUTLASS shapes the CUDA kernels have; the host programs of tests/cuda_host/ (the tile
schedule replay, CuTe layouts, architecture rules, the grouped GEMM's argument plumbing) are
compiled with nvcc and run wherever nvcc is found."""
import os
import shutil
import subprocess
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hypothesis import given, settings

import utils
from test_moe_ffn import cutlass_eligible, moe_problems
from test_moe_topk_softmax import routing_problems
from utils import ROOT


def test_a_gpu_with_a_build_without_cuda_kernels_fails_loudly(monkeypatch):
    import moediffuseq

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(moediffuseq, "build_info", lambda: SimpleNamespace(has_cuda=False))
    monkeypatch.delenv("MOEDIFFUSEQ_TESTS_CPU_BUILD_OK", raising=False)
    with pytest.raises(pytest.fail.Exception, match="built without its CUDA kernels"):
        utils.cuda_ready.__wrapped__()
    monkeypatch.setenv("MOEDIFFUSEQ_TESTS_CPU_BUILD_OK", "1")
    assert utils.cuda_ready.__wrapped__() is False
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.delenv("MOEDIFFUSEQ_TESTS_CPU_BUILD_OK")
    assert utils.cuda_ready.__wrapped__() is False  # no GPU: the CUDA tests skip


def draws(strategy, profile):
    seen = []

    @settings(settings.get_profile(profile), database=None)
    @given(strategy)
    def collect(p):
        seen.append(p)

    collect()
    return seen


def test_the_gpu_profile_draws_cutlass_shapes_and_many_experts():
    """The short "gpu" profile (10 examples) of moe_ffn: most draws take the CUTLASS grouped GEMMs,
    and the expert counts go past 32 (several logits per lane); the CI profile reaches ~1024."""
    gpu = draws(moe_problems("cuda"), "gpu")
    assert len(gpu) == 10
    assert sum(map(cutlass_eligible, gpu)) >= 6, [(p["D"], p["F"], p["dtype"]) for p in gpu]
    assert max(p["E"] for p in gpu) > 32
    ci = draws(moe_problems("cpu"), "ci") + draws(routing_problems(), "ci")
    assert max(p["E"] for p in ci) >= 512
    assert max(p["E"] for p in draws(routing_problems(), "gpu")) > 32


def nvcc_path():
    found = shutil.which("nvcc") or ("/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc")
                                     else None)
    return found


HOST_PROGRAMS = sorted(p.name for p in (ROOT / "tests" / "cuda_host").glob("*.cu"))


@pytest.mark.parametrize("program", HOST_PROGRAMS)
def test_cuda_host_program(program, tmp_path):
    """tests/cuda_host/<program> compiled as cmake/cuda_compile_check does (sm_90a, C++17, -O1,
    CUTLASS/CuTe from the nvidia-cutlass wheel) and run: no GPU needed, nothing launched."""
    nvcc = nvcc_path()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA host programs are not compiled here")
    try:
        import cutlass_library
    except ImportError:
        pytest.skip("the nvidia-cutlass wheel (cutlass_library) is not installed: no CUTLASS headers")
    cutlass = Path(cutlass_library.__file__).parent / "source" / "include"
    exe = tmp_path / Path(program).stem
    archs = os.environ.get("MOEDIFFUSEQ_CUDA_ARCHS", "90a").split(";")[0]
    cmd = [nvcc, "-std=c++17", "-O1", "--expt-relaxed-constexpr", f"-arch=sm_{archs}", "-I", str(ROOT / "csrc"),
           "-I", str(cutlass), str(ROOT / "tests" / "cuda_host" / program), "-o", str(exe)]
    built = subprocess.run(cmd, capture_output=True, text=True)
    assert built.returncode == 0, f"{' '.join(cmd)}\n{built.stdout[-4000:]}{built.stderr[-4000:]}"
    ran = subprocess.run([str(exe)], capture_output=True, text=True, timeout=300)
    assert ran.returncode == 0, f"{program} failed:\n{ran.stdout[-4000:]}{ran.stderr[-4000:]}"
