"""What the compiled extension was built with, and the check that the installed torch matches.

CMake writes ``_build_config.json`` beside ``_C`` (the torch version and CUDA version it was
built against, whether the CUDA kernels are in). ``check_torch_matches`` reads it at import,
before ``_C`` is loaded: an extension built for another torch release would otherwise fail with
an undefined symbol.
"""
from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

import torch

BUILD_CONFIG = Path(__file__).with_name("_build_config.json")
REBUILD = ("rebuild moediffuseq against it: pip install --no-build-isolation --force-reinstall --no-deps "
           "moediffuseq (from a checkout: make install, or pip install --no-build-isolation -e .)")


@dataclass(frozen=True)
class BuildInfo:
    torch_version: str     # the torch the extension was built against
    cpu_isa: str           # vector ISA of the C++ CPU kernels: avx512_bf16, avx512, avx2 or default
    has_cuda: bool         # CUDA kernels compiled in
    cuda_archs: tuple      # e.g. ("90a-real",)
    cutlass_version: str   # "" without CUDA

    def as_dict(self) -> dict:
        return asdict(self)


def read_build_config() -> Optional[dict]:
    """The build record beside _C, or None when there is none (an extension built before it)."""
    try:
        return json.loads(BUILD_CONFIG.read_text())
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ImportError(f"moediffuseq: {BUILD_CONFIG} is unreadable ({e}); {REBUILD}") from e


def _release(version: str) -> tuple[int, ...]:
    match = re.match(r"(\d+)\.(\d+)\.(\d+)", version)
    return tuple(int(part) for part in match.groups()) if match else ()


def torch_mismatch(built: dict, torch_version: str, torch_cuda: Optional[str]) -> Optional[str]:
    """Why an extension built as ``built`` cannot load into torch ``torch_version`` (CUDA
    ``torch_cuda``, None for a CPU build), or None when it can. The C++ ABI is that of a torch
    release (major.minor.patch); CUDA kernels also need a CUDA torch of the same CUDA major."""
    built_torch, built_cuda = built["torch"], built.get("torch_cuda") or ""
    if _release(built_torch) != _release(torch_version):
        return f"moediffuseq was built for torch {built_torch} but torch {torch_version} is installed: {REBUILD}"
    if built.get("cuda_kernels"):
        if not torch_cuda:
            return (f"moediffuseq was built with CUDA kernels against torch {built_torch} (CUDA {built_cuda}) but "
                    f"the installed torch {torch_version} is a CPU build: install a CUDA torch, or {REBUILD}")
        if built_cuda.split(".")[0] != torch_cuda.split(".")[0]:
            return (f"moediffuseq's CUDA kernels were built for CUDA {built_cuda} but torch {torch_version} uses "
                    f"CUDA {torch_cuda}: {REBUILD}")
    return None


# the CPU features each ISA level of the CPU kernels is compiled for (cmake/cpu_isa.cmake's flags),
# by their /proc/cpuinfo names
ISA_FEATURES = {
    "avx2": ("avx2", "fma", "f16c"),
    "avx512": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq"),
    "avx512_bf16": ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_bf16"),
}


def cpu_flags() -> Optional[frozenset]:
    """This CPU's feature flags from /proc/cpuinfo (Linux), None where they cannot be read."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return frozenset(line.split(":", 1)[1].split())
    except OSError:
        pass
    return None


def cpu_mismatch(built: dict, flags: Optional[frozenset]) -> Optional[str]:
    """Why CPU kernels built as ``built`` cannot run on a CPU with ``flags`` (an illegal
    instruction at the first op otherwise), or None when they can or nothing is known."""
    isa = built.get("cpu_isa", "")
    lacking = [f for f in ISA_FEATURES.get(isa, ()) if flags is not None and f not in flags]
    if not lacking:
        return None
    return (f"moediffuseq's CPU kernels were built for {isa}, which this CPU lacks ({', '.join(lacking)}): "
            f"install a build for this CPU (MOEDIFFUSEQ_CPU_ISA=auto, the default, builds for the building "
            f"machine; avx2 for a wheel that runs on any x86-64 CPU with AVX2): {REBUILD}")


def check_torch_matches() -> None:
    """Raises ImportError with one clear message when the installed torch is not the build's,
    or this CPU lacks the instructions the CPU kernels were compiled for."""
    built = read_build_config()
    if built is not None:
        problem = torch_mismatch(built, torch.__version__, torch.version.cuda) or cpu_mismatch(built, cpu_flags())
        if problem:
            raise ImportError(problem)


def build_info() -> BuildInfo:
    """Build information of ``moediffuseq._C``."""
    from moediffuseq import _C

    built = read_build_config() or {}
    return BuildInfo(
        torch_version=built.get("torch", torch.__version__),
        cpu_isa=_C.cpu_isa,
        has_cuda=bool(_C.has_cuda),
        cuda_archs=tuple(_C.cuda_archs),
        cutlass_version=_C.cutlass_version,
    )
