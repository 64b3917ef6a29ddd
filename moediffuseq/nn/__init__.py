"""Modules built on the fused ops."""
from moediffuseq.nn.attention import BlockSparseSelfAttention, KVCache
from moediffuseq.nn.moe import DenseFeedForward, MoEAux, MoEFeedForward

__all__ = ["BlockSparseSelfAttention", "KVCache", "DenseFeedForward", "MoEAux", "MoEFeedForward"]
