"""Multi-head self-attention over the block-sparse op, with a dense fallback for ablations."""
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moediffuseq.ops import block_sparse_attention

ATTENTION_KINDS = ("sparse", "dense")


class KVCache:
    """The keys and values of one attention layer for the positions [0, length) of a sequence,
    (B, length, H_kv, D) each, filled in place by the calls that use it: a call at ``offset``
    writes its rows [offset, offset + L) and attends to the rows [0, offset + L). The buffers
    take the dtype and device of the first keys written."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.k: Optional[Tensor] = None
        self.v: Optional[Tensor] = None

    def write(self, k: Tensor, v: Tensor, offset: int) -> tuple[Tensor, Tensor]:
        B, L, H_kv, D = k.shape
        if offset < 0 or offset + L > self.length:
            raise ValueError(f"KVCache: rows [{offset}, {offset + L}) do not fit a cache of {self.length} positions")
        if self.k is None:
            self.k = k.new_empty(B, self.length, H_kv, D)  # (B, L_cache, H_kv, D)
            self.v = v.new_empty(B, self.length, H_kv, D)
        elif self.k.shape[0] != B or self.k.dtype != k.dtype:
            raise ValueError(f"KVCache: keys of batch {B} in {k.dtype} written to a cache of batch "
                             f"{self.k.shape[0]} in {self.k.dtype}")
        self.k[:, offset:offset + L].copy_(k)
        self.v[:, offset:offset + L].copy_(v)
        return self.k[:, :offset + L], self.v[:, :offset + L]


class BlockSparseSelfAttention(nn.Module):
    """Self-attention with Longformer-style block-sparse connectivity (METHOD §3).

    Args:
        d_model: model width; must be divisible by ``n_heads``.
        n_heads: number of heads.
        window: one-sided window w (default 256).
        dilation: window dilation d (default 1).
        dropout: dropout on the attention output (the fused kernel has no dropout on the
            probabilities).
        kind: "sparse" (the fused op) or "dense" (full attention over all non-padded keys
            through scaled_dot_product_attention: the DiffuSeq baseline).
        causal: keys at or before the query only (global tokens included).
        n_kv_heads: key/value heads (grouped-query attention); defaults to ``n_heads``.

    forward(x (B, L, d_model), global_mask (B, L) bool, key_padding_mask (B, L) bool)
    -> (B, L, d_model). ``global_mask`` is ignored by "dense", where every token is global.
    ``source_lengths`` (B,) isolates each row's source prefix: its queries see only its keys
    (``moediffuseq.ops.block_sparse_attention``). With ``kv_cache`` (a ``KVCache``) x holds the
    positions [offset, offset + L) of a longer sequence: its keys and values are written to the
    cache and its queries attend to the cached positions [0, offset + L), over which the masks
    are then given ((B, offset + L)).
    """

    def __init__(self, d_model: int, n_heads: int, *, window: int = 256, dilation: int = 1,
                 dropout: float = 0.0, kind: str = "sparse", causal: bool = False,
                 n_kv_heads: Optional[int] = None) -> None:
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"d_model ({d_model}) must be divisible by n_heads ({n_heads})")
        n_kv_heads = n_heads if n_kv_heads is None else n_kv_heads
        if n_kv_heads < 1 or n_heads % n_kv_heads != 0:
            raise ValueError(f"n_heads ({n_heads}) must be a multiple of n_kv_heads ({n_kv_heads})")
        if kind not in ATTENTION_KINDS:
            raise ValueError(f"kind must be one of {ATTENTION_KINDS}, got {kind!r}")
        if window < 0 or dilation < 1:
            raise ValueError(f"need window >= 0 and dilation >= 1, got window={window}, dilation={dilation}")
        self.d_model, self.n_heads, self.n_kv_heads = d_model, n_heads, n_kv_heads
        self.window, self.dilation, self.kind, self.causal = window, dilation, kind, causal
        hd = d_model // n_heads
        self.qkv = nn.Linear(d_model, (n_heads + 2 * n_kv_heads) * hd)  # q heads, then k heads, then v heads
        self.proj = nn.Linear(d_model, d_model)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: Tensor, global_mask: Optional[Tensor] = None,
                key_padding_mask: Optional[Tensor] = None, *, source_lengths: Optional[Tensor] = None,
                kv_cache: Optional[KVCache] = None, offset: int = 0) -> Tensor:
        if x.dim() != 3 or x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (B, L, {self.d_model}), got {tuple(x.shape)}")
        if offset and kv_cache is None:
            raise ValueError("offset needs a kv_cache holding the keys before it")
        B, L, _ = x.shape
        hd, H, Hkv = self.d_model // self.n_heads, self.n_heads, self.n_kv_heads
        qkv = self.qkv(x).view(B, L, H + 2 * Hkv, hd)  # (B, L, H + 2 H_kv, D)
        q, k, v = qkv.split([H, Hkv, Hkv], dim=2)  # (B, L, H, D), (B, L, H_kv, D) x 2: strided views
        if kv_cache is not None:
            k, v = kv_cache.write(k, v, offset)  # (B, offset + L, H_kv, D) each
        if self.kind == "sparse":
            y = block_sparse_attention(q, k, v, window=self.window, dilation=self.dilation,
                                       global_mask=global_mask, key_padding_mask=key_padding_mask,
                                       causal=self.causal, layout="blhd", source_lengths=source_lengths,
                                       query_offset=offset)  # (B, L, H, D), no transpose copy
        else:
            y = _dense_attention(*(t.transpose(1, 2) for t in (q, k, v)), key_padding_mask,
                                 self.causal, source_lengths, offset).transpose(1, 2)  # (B, L, H, D)
        y = y.reshape(B, L, self.d_model)  # (B, L, H*D)
        return self.dropout(self.proj(y))

    def extra_repr(self) -> str:
        kv = f", n_kv_heads={self.n_kv_heads}" if self.n_kv_heads != self.n_heads else ""
        return (f"d_model={self.d_model}, n_heads={self.n_heads}{kv}, kind={self.kind}, "
                f"window={self.window}, dilation={self.dilation}, causal={self.causal}")


def _dense_attention(q: Tensor, k: Tensor, v: Tensor, key_padding_mask: Optional[Tensor],
                     causal: bool = False, source_lengths: Optional[Tensor] = None, offset: int = 0) -> Tensor:
    """q (B, H, Lq, D) at the positions [offset, offset + Lq) of k, v (B, H_kv, Lk, D)."""
    gqa = k.shape[1] != q.shape[1]
    Lq, Lk = q.shape[2], k.shape[2]
    if key_padding_mask is None and source_lengths is None and Lq == Lk:
        return F.scaled_dot_product_attention(q, k, v, is_causal=causal, enable_gqa=gqa)
    i = torch.arange(offset, offset + Lq, device=q.device)[:, None]  # (Lq, 1) query positions
    j = torch.arange(Lk, device=q.device)[None]  # (1, Lk) key positions
    keep = (j <= i) if causal else torch.ones(Lq, Lk, dtype=torch.bool, device=q.device)
    keep = keep[None, None]  # (1, 1, Lq, Lk)
    if key_padding_mask is not None:
        keep = keep & ~key_padding_mask[:, None, None, :]  # (B, 1, Lq, Lk)
    if source_lengths is not None:  # a source query sees source keys only
        s = source_lengths.to(q.device)[:, None, None, None]  # (B, 1, 1, 1)
        keep = keep & ((i >= s) | (j < s))
    y = F.scaled_dot_product_attention(q, k, v, attn_mask=keep, enable_gqa=gqa)
    # a query whose keys are all padded outputs zeros, as in the sparse op
    return y.masked_fill(~keep.any(-1, keepdim=True), 0.0)
