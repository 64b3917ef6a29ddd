"""moediffuseq: MoE-DiffuSeq, long-document diffusion text generation with fused kernels.

Importing the package loads the compiled extension, which registers the ops under
``torch.ops.moediffuseq``; ``moediffuseq.ops`` holds their typed Python wrappers.
"""
import torch  # noqa: F401  (first: _C links to torch's libraries, which this loads)

from moediffuseq.build_info import build_info, check_torch_matches

check_torch_matches()  # one clear message for an extension built against another torch

from moediffuseq import _C  # noqa: E402,F401  (registers torch.ops.moediffuseq.*)
from moediffuseq import nn, ops  # noqa: E402

__all__ = ["build_info", "nn", "ops"]
__version__ = "0.1.0"
