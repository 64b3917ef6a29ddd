"""Fused ops of moediffuseq: typed wrappers over ``torch.ops.moediffuseq.*`` and references."""
from moediffuseq.ops.block_sparse_attention import (
    block_sparse_attention,
    block_sparse_attention_ref,
    block_sparse_allowed_mask,
)

__all__ = ["block_sparse_attention", "block_sparse_attention_ref", "block_sparse_allowed_mask"]
