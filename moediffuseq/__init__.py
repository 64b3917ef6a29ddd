"""moediffuseq: MoE-DiffuSeq, long-document diffusion text generation with fused kernels.

Importing the package loads the compiled extension, which registers the ops under
``torch.ops.moediffuseq``; ``moediffuseq.ops`` holds their typed Python wrappers.
"""
import torch  # noqa: F401  (first: _C links to torch's libraries, which this loads)

from moediffuseq import _C  # noqa: F401  (registers torch.ops.moediffuseq.*)
from moediffuseq import nn, ops
from moediffuseq.build_info import build_info

__all__ = ["build_info", "nn", "ops"]
__version__ = "0.1.0"
