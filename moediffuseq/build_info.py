"""What the compiled extension was built with."""
from dataclasses import asdict, dataclass

import torch

from moediffuseq import _C


@dataclass(frozen=True)
class BuildInfo:
    torch_version: str
    cpu_isa: str           # vector ISA of the C++ CPU kernels: avx512_bf16, avx512, avx2 or default
    has_cuda: bool         # CUDA kernels compiled in
    cuda_archs: tuple      # e.g. ("90a",)
    cutlass_version: str   # "" without CUDA

    def as_dict(self) -> dict:
        return asdict(self)


def build_info() -> BuildInfo:
    """Build information of ``moediffuseq._C``."""
    return BuildInfo(
        torch_version=torch.__version__,
        cpu_isa=_C.cpu_isa,
        has_cuda=bool(_C.has_cuda),
        cuda_archs=tuple(_C.cuda_archs),
        cutlass_version=_C.cutlass_version,
    )
