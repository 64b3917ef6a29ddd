"""Modules built on the fused ops."""
from moediffuseq.nn.attention import BlockSparseSelfAttention

__all__ = ["BlockSparseSelfAttention"]
