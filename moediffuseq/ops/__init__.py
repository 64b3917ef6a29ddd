"""Fused ops of moediffuseq: typed wrappers over ``torch.ops.moediffuseq.*`` and references."""
from moediffuseq.ops.block_sparse_attention import (
    block_sparse_allowed_mask,
    block_sparse_attention,
    block_sparse_attention_ref,
)
from moediffuseq.ops.denoise_step import denoise_step, denoise_step_ref
from moediffuseq.ops.moe_ffn import moe_ffn, moe_ffn_ref
from moediffuseq.ops.moe_topk_softmax import moe_topk_softmax, moe_topk_softmax_ref
from moediffuseq.ops.nearest_embedding import nearest_embedding, nearest_embedding_ref
from moediffuseq.ops.soft_absorb_q_sample import soft_absorb_q_sample, soft_absorb_q_sample_ref

__all__ = [
    "block_sparse_allowed_mask",
    "block_sparse_attention",
    "block_sparse_attention_ref",
    "denoise_step",
    "denoise_step_ref",
    "moe_ffn",
    "moe_ffn_ref",
    "moe_topk_softmax",
    "moe_topk_softmax_ref",
    "nearest_embedding",
    "nearest_embedding_ref",
    "soft_absorb_q_sample",
    "soft_absorb_q_sample_ref",
]
