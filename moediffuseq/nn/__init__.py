"""Modules built on the fused ops."""
from moediffuseq.nn.attention import BlockSparseSelfAttention
from moediffuseq.nn.moe import DenseFeedForward, MoEAux, MoEFeedForward

__all__ = ["BlockSparseSelfAttention", "DenseFeedForward", "MoEAux", "MoEFeedForward"]
