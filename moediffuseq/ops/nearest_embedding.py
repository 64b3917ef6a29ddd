"""Rounding to the vocabulary: the nearest word embedding of every vector (METHOD §6)."""
import torch
from torch import Tensor

_OP = torch.ops.moediffuseq.nearest_embedding


def nearest_embedding(x: Tensor, emb: Tensor) -> Tensor:
    """Index of the nearest row of ``emb`` (V, d) for every vector of ``x`` (..., d).

    Euclidean distance computed in float32 by vocabulary chunks (the (N, V) distance matrix
    never exists at once); ties go to the lowest index; NaN input is an error. Returns int64
    of shape x.shape[:-1]. Not differentiable (an argmin).
    """
    if not isinstance(x, Tensor) or x.dim() == 0:
        return _OP(x, emb)  # the op names what is wrong
    rows = x.unsqueeze(0) if x.dim() == 1 else x.flatten(0, -2)  # (N, d)
    return _OP(rows, emb).reshape(x.shape[:-1])


@torch.library.register_fake("moediffuseq::nearest_embedding")
def _(x, emb):
    return x.new_empty(x.shape[:1], dtype=torch.int64)


def nearest_embedding_ref(x: Tensor, emb: Tensor) -> Tensor:
    """argmin of the full float64 distance matrix (for tests: O(N V) memory)."""
    dist = torch.cdist(x.reshape(-1, x.shape[-1]).double(), emb.double())  # (N, V)
    return dist.argmin(-1).reshape(x.shape[:-1])
