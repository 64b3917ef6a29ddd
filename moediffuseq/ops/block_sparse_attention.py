"""Block-sparse (sliding + dilated window + global tokens) attention, METHOD §3.

allowed(i, j) = j not padded and (i global or j global or (|i - j| <= window * dilation and
(i - j) mod dilation == 0)). A query row with no allowed key outputs zeros and gets zero
gradients.
"""
import math
from typing import Optional

import torch
from torch import Tensor

from moediffuseq.ops._double_backward import refuse_double_backward

_OP = torch.ops.moediffuseq.block_sparse_attention
_OP_BACKWARD = torch.ops.moediffuseq.block_sparse_attention_backward


def block_sparse_attention(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
) -> Tensor:
    """Fused block-sparse attention.

    Args:
        q, k, v: (B, H, L, D), float32 or bfloat16, same dtype and device.
        window: one-sided window w >= 0 (neighbours on each side, in dilated steps).
        dilation: d >= 1; the window covers offsets 0, +-d, ..., +-w*d.
        global_mask: optional bool (B, L), True marks a global token (attends to and is
            attended by every position).
        key_padding_mask: optional bool (B, L), True marks a padded position (never a key).
        scale: multiplies q . k; defaults to 1 / sqrt(D).

    Returns:
        (B, H, L, D) in the dtype of q. Softmax and accumulation run in float32.
    """
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"block_sparse_attention: {name} must be a Tensor, got {type(t).__name__}")
    for name, t in (("k", k), ("v", v), ("global_mask", global_mask), ("key_padding_mask", key_padding_mask)):
        if t is not None and t.device != q.device:
            raise ValueError(
                f"block_sparse_attention: {name} must be on the device of q ({q.device}), got {t.device}"
            )
    if scale is None:
        if q.dim() != 4:
            raise ValueError(f"block_sparse_attention: q must be (B, H, L, D), got shape {tuple(q.shape)}")
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.shape[-1] > 0 else 1.0
    out, _ = _OP(q, k, v, int(window), int(dilation), global_mask, key_padding_mask, float(scale))
    return out


@torch.library.register_fake("moediffuseq::block_sparse_attention")
def _(q, k, v, window, dilation, global_mask, key_padding_mask, scale):
    torch._check(q.dim() == 4, lambda: f"block_sparse_attention: q must be (B, H, L, D), got {q.shape}")
    torch._check(k.shape == q.shape and v.shape == q.shape,
                 lambda: f"block_sparse_attention: k and v must have the shape of q {q.shape}")
    torch._check(window >= 0, lambda: f"block_sparse_attention: window must be >= 0, got {window}")
    torch._check(dilation >= 1, lambda: f"block_sparse_attention: dilation must be >= 1, got {dilation}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(q.shape[:3], dtype=torch.float32)
    return out, lse


@torch.library.register_fake("moediffuseq::block_sparse_attention_backward")
def _(grad_out, q, k, v, out, lse, window, dilation, global_mask, key_padding_mask, scale):
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, window, dilation, global_mask, key_padding_mask, scale = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, global_mask, key_padding_mask)
    ctx.window, ctx.dilation, ctx.scale = window, dilation, scale


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, global_mask, key_padding_mask = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 8
    grad_q, grad_k, grad_v = _OP_BACKWARD(
        grad_out, q, k, v, out, lse, ctx.window, ctx.dilation, global_mask, key_padding_mask, ctx.scale
    )
    return grad_q, grad_k, grad_v, None, None, None, None, None


torch.library.register_autograd(
    "moediffuseq::block_sparse_attention", _backward, setup_context=_setup_context
)
refuse_double_backward("block_sparse_attention_backward", "block_sparse_attention")


def block_sparse_allowed_mask(
    length: int,
    *,
    window: int,
    dilation: int = 1,
    global_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    batch: int = 1,
    device=None,
) -> Tensor:
    """The dense (B, L, L) bool matrix of allowed (query i, key j) pairs, METHOD §3."""
    i = torch.arange(length, device=device)
    diff = i[:, None] - i[None, :]
    band = (diff.abs() <= window * dilation) & (diff.remainder(dilation) == 0)  # (L, L)
    allowed = band.expand(batch, length, length)  # (B, L, L)
    if global_mask is not None:
        g = global_mask.to(torch.bool)
        allowed = allowed | g[:, :, None] | g[:, None, :]
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool)[:, None, :]
    return allowed


def block_sparse_attention_ref(
    q: Tensor,
    k: Tensor,
    v: Tensor,
    *,
    window: int,
    dilation: int = 1,
    global_mask: Optional[Tensor] = None,
    key_padding_mask: Optional[Tensor] = None,
    scale: Optional[float] = None,
    upcast: bool = True,
) -> Tensor:
    """The contract, written the plain way: dense scores, the allowed mask, softmax.

    Computes in float64 when ``upcast`` (the reference for tests), else in the input dtype
    (the baseline a same-dtype PyTorch computation would give). Memory is O(B H L^2).
    """
    B, H, L, D = q.shape
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = torch.float64 if upcast else q.dtype
    allowed = block_sparse_allowed_mask(
        L, window=window, dilation=dilation, global_mask=global_mask,
        key_padding_mask=key_padding_mask, batch=B, device=q.device,
    )[:, None]  # (B, 1, L, L)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, H, L, L)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    return torch.matmul(probs, v.to(dtype)).to(q.dtype)
