"""Block-sparse (sliding + dilated window + global tokens) attention, METHOD §3.

allowed(i, j) = j not padded and (i global or j global or (|i - j| <= window * dilation and
(i - j) mod dilation == 0)), and with ``causal=True`` additionally j <= i: a global token then
attends to the past only (and is attended by every query at or after it), so a causal model never
sees the future through a global token. With ``source_lengths`` (S_b per batch element) also
i >= S_b or j < S_b: a query in the source [0, S_b) sees source keys only, a target query attends
as without it. A query row with no allowed key outputs zeros and gets zero gradients.

Queries at an offset: q may hold L_q <= L rows, row r being position i = query_offset + r of the
key sequence; every mask (band, causal, global, padding, source) is on positions.

Grouped-query attention: k and v may have H_kv heads, H_q a multiple of H_kv; query head h reads
key/value head h // (H_q // H_kv), with no repeated copy of k and v.
"""
import math
from typing import Literal, Optional

import torch
from torch import Tensor

from moediffuseq.ops._double_backward import refuse_double_backward

_OP = torch.ops.moediffuseq.block_sparse_attention
_OP_BACKWARD = torch.ops.moediffuseq.block_sparse_attention_backward

Layout = Literal["bhld", "blhd"]
_LAYOUTS = ("bhld", "blhd")


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
    causal: bool = False,
    layout: Layout = "bhld",
    source_lengths: Optional[Tensor] = None,
    query_offset: int = 0,
) -> Tensor:
    """Fused block-sparse attention.

    Args:
        q: (B, H_q, L_q, D) for ``layout="bhld"``, (B, L_q, H_q, D) for ``layout="blhd"``;
            float32 or bfloat16 on CPU, bfloat16 or float16 on CUDA. L_q <= L; usually L_q = L.
        k, v: (B, H_kv, L, D) (or (B, L, H_kv, D)), the dtype and device of q; H_q must be a
            multiple of H_kv (grouped-query attention; H_kv = H_q is plain multi-head).
        window: one-sided window w >= 0 (neighbours on each side, in dilated steps).
        dilation: d >= 1; the window covers offsets 0, +-d, ..., +-w*d.
        global_mask: optional bool (B, L), True marks a global token (attends to and is
            attended by every position; under ``causal`` only by / to positions on its left).
        key_padding_mask: optional bool (B, L), True marks a padded position (never a key).
        scale: multiplies q . k; defaults to 1 / sqrt(D).
        causal: additionally require j <= i (key at or before the query).
        layout: ``"bhld"`` or ``"blhd"``: the memory layout of q, k, v and of the output. Any
            strides with a contiguous last dimension are read as they are (the q, k, v views of
            a fused QKV projection need no copy).
        source_lengths: optional int64 (B,) on q's device, 0 <= S_b <= L: positions [0, S_b) of
            batch element b are its source, whose queries attend to source keys only (windows,
            dilation, global source keys and padding as before); the target (i >= S_b) attends
            as without it. The kernels skip the source-query x target-key tiles.
        query_offset: q's row r is position query_offset + r of the key sequence
            (0 <= query_offset, query_offset + L_q <= L): a run of query rows against the whole
            key sequence, e.g. the target rows against cached source keys.

    Returns:
        The shape and layout of q, in its dtype. Softmax and accumulation run in float32.
    """
    # The op checks values; a wrong type would reach the dispatcher, whose message prints the value.
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"block_sparse_attention: {name} must be a Tensor, got {type(t).__name__}")
    if scale is None:  # 1 / sqrt(D); a q that is not (.., D) is named by the op's own check
        scale = 1.0 / math.sqrt(q.shape[-1]) if q.dim() > 0 and q.shape[-1] > 0 else 1.0
    out, _ = _OP(q, k, v, window, dilation, global_mask, key_padding_mask, scale, causal, layout, source_lengths,
                 query_offset)
    return out


def _logical(t: Tensor, layout: str) -> Tensor:
    """The (B, H, L, D) view of a tensor in ``layout``."""
    return t.transpose(1, 2) if layout == "blhd" else t


def _check_shapes(q, k, v, window, dilation, global_mask, key_padding_mask, layout, source_lengths, query_offset):
    """The fake kernels' mirror of the host entry's checks on shapes, dtypes, devices and ints
    (the values inside source_lengths are checked by the op itself)."""
    torch._check(layout in _LAYOUTS, lambda: f'block_sparse_attention: layout must be "bhld" or "blhd", got {layout!r}')
    torch._check(q.dim() == 4 and k.dim() == 4 and v.dim() == 4,
                 lambda: f"block_sparse_attention: q, k, v must be 4-d ({layout}), got {q.shape}, {k.shape}, {v.shape}")
    ql, kl = _logical(q, layout), _logical(k, layout)
    B, Lq, L = ql.shape[0], ql.shape[2], kl.shape[2]
    torch._check(kl.shape[0] == B and kl.shape[3] == ql.shape[3] and v.shape == k.shape,
                 lambda: f"block_sparse_attention: k and v must have the B and D of q {q.shape} ({layout})")
    torch._check(Lq <= L, lambda: f"block_sparse_attention: k must have L >= L_q = {Lq}, the query rows of q "
                 f"{q.shape} ({layout}), got {k.shape}")
    torch._check(ql.shape[1] % kl.shape[1] == 0 if kl.shape[1] != 0 else ql.shape[1] == 0,
                 lambda: f"block_sparse_attention: the query heads H = {ql.shape[1]} must be a multiple of the "
                 f"key/value heads H_kv = {kl.shape[1]}")
    for name, t in (("k", k), ("v", v), ("global_mask", global_mask), ("key_padding_mask", key_padding_mask),
                    ("source_lengths", source_lengths)):
        torch._check(t is None or t.device == q.device,
                     lambda: f"block_sparse_attention: {name} must be on the device of q ({q.device}), got {t.device}")
    torch._check(window >= 0, lambda: f"block_sparse_attention: window must be >= 0, got {window}")
    torch._check(dilation >= 1, lambda: f"block_sparse_attention: dilation must be >= 1, got {dilation}")
    torch._check(query_offset >= 0, lambda: f"block_sparse_attention: query_offset must be >= 0, got {query_offset}")
    torch._check(query_offset + Lq <= L, lambda: f"block_sparse_attention: query_offset + L_q must be <= L (the key "
                 f"length), got query_offset = {query_offset}, L_q = {Lq}, L = {L}")
    if source_lengths is not None:
        torch._check(source_lengths.dtype == torch.int64 and source_lengths.dim() == 1
                     and source_lengths.shape[0] == B,
                     lambda: f"block_sparse_attention: source_lengths must be an int64 tensor of shape (B,) = ({B},), "
                     f"got dtype {source_lengths.dtype} and shape {tuple(source_lengths.shape)}")
    return ql


@torch.library.register_fake("moediffuseq::block_sparse_attention")
def _(q, k, v, window, dilation, global_mask, key_padding_mask, scale, causal=False, layout="bhld",
      source_lengths=None, query_offset=0):
    ql = _check_shapes(q, k, v, window, dilation, global_mask, key_padding_mask, layout, source_lengths,
                       query_offset)
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty(ql.shape[:3], dtype=torch.float32)  # (B, H, L_q)
    return out, lse


@torch.library.register_fake("moediffuseq::block_sparse_attention_backward")
def _(grad_out, q, k, v, out, lse, window, dilation, global_mask, key_padding_mask, scale, causal=False,
      layout="bhld", source_lengths=None, query_offset=0):
    _check_shapes(q, k, v, window, dilation, global_mask, key_padding_mask, layout, source_lengths, query_offset)
    return (
        torch.empty_like(q, memory_format=torch.contiguous_format),
        torch.empty_like(k, memory_format=torch.contiguous_format),
        torch.empty_like(v, memory_format=torch.contiguous_format),
    )


def _setup_context(ctx, inputs, output):
    q, k, v, window, dilation, global_mask, key_padding_mask, scale, causal, layout, source_lengths, query_offset = (
        inputs)
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, global_mask, key_padding_mask, source_lengths)
    ctx.window, ctx.dilation, ctx.scale, ctx.causal, ctx.layout = window, dilation, scale, causal, layout
    ctx.query_offset = query_offset


def _backward(ctx, grad_out, grad_lse):
    q, k, v, out, lse, global_mask, key_padding_mask, source_lengths = ctx.saved_tensors
    if grad_out is None:
        return (None,) * 12
    grad_q, grad_k, grad_v = _OP_BACKWARD(
        grad_out, q, k, v, out, lse, ctx.window, ctx.dilation, global_mask, key_padding_mask, ctx.scale,
        ctx.causal, ctx.layout, source_lengths, ctx.query_offset,
    )
    return (grad_q, grad_k, grad_v) + (None,) * 9


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
    causal: bool = False,
    source_lengths: Optional[Tensor] = None,
    query_offset: int = 0,
    query_length: Optional[int] = None,
) -> Tensor:
    """The dense (B, L_q, L) bool matrix of allowed (query row, key j) pairs, METHOD §3.

    Row r is position i = query_offset + r (L_q = ``query_length``, default L - query_offset);
    with ``source_lengths`` (B,) a query i < S_b allows only keys j < S_b.
    """
    Lq = length - query_offset if query_length is None else query_length
    i = torch.arange(query_offset, query_offset + Lq, device=device)  # query positions
    j = torch.arange(length, device=device)
    diff = i[:, None] - j[None, :]  # (L_q, L)
    band = (diff.abs() <= window * dilation) & (diff.remainder(dilation) == 0)  # (L_q, L)
    allowed = band.expand(batch, Lq, length)  # (B, L_q, L)
    if global_mask is not None:
        g = global_mask.to(torch.bool)
        allowed = allowed | g[:, query_offset:query_offset + Lq, None] | g[:, None, :]
    if causal:
        allowed = allowed & (diff >= 0)
    if key_padding_mask is not None:
        allowed = allowed & ~key_padding_mask.to(torch.bool)[:, None, :]
    if source_lengths is not None:
        s = source_lengths.to(device=allowed.device)[:, None, None]  # (B, 1, 1)
        allowed = allowed & ((i[None, :, None] >= s) | (j[None, None, :] < s))
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
    causal: bool = False,
    layout: Layout = "bhld",
    source_lengths: Optional[Tensor] = None,
    query_offset: int = 0,
    upcast: bool = True,
) -> Tensor:
    """The contract, written the plain way: dense scores, the allowed mask, softmax.

    Computes in float64 when ``upcast`` (the reference for tests), else in the input dtype
    (the baseline a same-dtype PyTorch computation would give). Memory is O(B H L_q L). Grouped
    key/value heads are repeated here (the reference may copy; the op does not).
    """
    q, k, v = (_logical(t, layout) for t in (q, k, v))  # (B, H, L_q, D), (B, H_kv, L, D)
    B, H, Lq, D = q.shape
    L = k.shape[2]
    group = H // k.shape[1]
    k, v = (t.repeat_interleave(group, dim=1) for t in (k, v))  # (B, H, L, D)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    dtype = torch.float64 if upcast else q.dtype
    allowed = block_sparse_allowed_mask(
        L, window=window, dilation=dilation, global_mask=global_mask,
        key_padding_mask=key_padding_mask, batch=B, device=q.device, causal=causal,
        source_lengths=source_lengths, query_offset=query_offset, query_length=Lq,
    )[:, None]  # (B, 1, L_q, L)
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, H, L_q, L)
    scores = scores.masked_fill(~allowed, float("-inf"))
    probs = torch.softmax(scores, dim=-1).nan_to_num(0.0)  # rows with no allowed key -> 0
    out = torch.matmul(probs, v.to(dtype)).to(q.dtype)  # (B, H, L_q, D)
    return _logical(out, layout)
