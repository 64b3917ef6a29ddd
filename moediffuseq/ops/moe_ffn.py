"""Dropless mixture-of-experts feed-forward with fused routing, dispatch and combine, METHOD §4."""
import torch
from torch import Tensor
from torch.nn import functional as F

from moediffuseq.ops._double_backward import refuse_double_backward

_OP = torch.ops.moediffuseq.moe_ffn
_OP_BACKWARD = torch.ops.moediffuseq.moe_ffn_backward

ACTIVATIONS = ("gelu", "silu", "swiglu")  # the values of ``activation`` (checked by the op)


def moe_ffn(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
            activation: str = "gelu") -> Tensor:
    """y[t] = sum_j weights[t, j] * (act(x[t] @ w1[e]) @ w2[e]),  e = indices[t, j].

    Args:
        x: (T, D) float32 or bfloat16.
        weights: (T, k) float32 routing weights (as from ``moe_topk_softmax``).
        indices: (T, k) int64 experts in [0, E); -1 marks a dropped slot (no contribution).
        w1: (E, D, F), or (E, D, 2F) for "swiglu" (gate half, then up half); dtype of x.
        w2: (E, F, D); dtype of x.
        activation: "gelu" (tanh approximation), "silu", or "swiglu" (silu(gate) * up).

    Returns:
        (T, D) in the dtype of x; the k contributions are summed in float32. Dropless: any
        number of tokens per expert, including none. Differentiable w.r.t. x, weights, w1, w2.

    The arguments go to ``torch.ops.moediffuseq.moe_ffn`` in its schema's order; the C++ host
    entry checks them, each error naming the op and the argument.
    """
    y, _, _ = _OP(x, weights, indices, w1, w2, activation)
    return y


@torch.library.register_fake("moediffuseq::moe_ffn")
def _(x, weights, indices, w1, w2, activation):
    torch._check(x.dim() == 2, lambda: f"moe_ffn: x must be (T, D), got {x.shape}")
    torch._check(indices.dim() == 2, lambda: f"moe_ffn: indices must be (T, k), got {indices.shape}")
    for name, t in (("weights", weights), ("indices", indices), ("w1", w1), ("w2", w2)):
        # a meta argument among real ones dispatches here, not to the host entry that checks devices
        torch._check(t.device == x.device, lambda: f"moe_ffn: {name} must be on the device of x ({x.device}), "
                     f"got {t.device}")
    n = x.shape[0] * indices.shape[1]
    return x.new_empty(x.shape), x.new_empty((n, w1.shape[2])), x.new_empty((n, x.shape[1]))


@torch.library.register_fake("moediffuseq::moe_ffn_backward")
def _(grad_y, x, weights, indices, w1, w2, hidden, expert_out, activation):
    return x.new_empty(x.shape), weights.new_empty(weights.shape), w1.new_empty(w1.shape), w2.new_empty(w2.shape)


def _setup_context(ctx, inputs, output):
    x, weights, indices, w1, w2, activation = inputs
    _, hidden, expert_out = output
    ctx.save_for_backward(x, weights, indices, w1, w2, hidden, expert_out)
    ctx.activation = activation
    ctx.set_materialize_grads(False)  # hidden and expert_out are saved state, never differentiated


def _backward(ctx, grad_y, grad_hidden, grad_expert_out):
    x, weights, indices, w1, w2, hidden, expert_out = ctx.saved_tensors
    if grad_y is None:
        return (None,) * 6
    grad_x, grad_weights, grad_w1, grad_w2 = _OP_BACKWARD(
        grad_y, x, weights, indices, w1, w2, hidden, expert_out, ctx.activation
    )
    return grad_x, grad_weights, None, grad_w1, grad_w2, None


torch.library.register_autograd("moediffuseq::moe_ffn", _backward, setup_context=_setup_context)
refuse_double_backward("moe_ffn_backward", "moe_ffn")


def _activate(h: Tensor, activation: str) -> Tensor:
    if activation == "gelu":
        return F.gelu(h, approximate="tanh")
    if activation == "silu":
        return F.silu(h)
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def moe_ffn_ref(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor,
                activation: str = "gelu", *, upcast: bool = True) -> Tensor:
    """The contract written the HF-Mixtral way: a loop over experts with index selection.

    Takes the arguments of ``moe_ffn``; computes in float64 when ``upcast`` (the test
    reference), else in the dtype of x (the same-dtype baseline of the tolerances).
    """
    dtype = torch.float64 if upcast else x.dtype
    y = torch.zeros(x.shape, dtype=dtype if upcast else torch.float32, device=x.device)
    for e in range(w1.shape[0]):
        token, slot = torch.where(indices == e)  # (n_e,), (n_e,)
        if token.numel() == 0:
            continue
        h = x[token].to(dtype) @ w1[e].to(dtype)  # (n_e, F or 2F)
        out = _activate(h, activation) @ w2[e].to(dtype)  # (n_e, D)
        y.index_add_(0, token, (out * weights[token, slot, None].to(out.dtype)).to(y.dtype))
    return y.to(x.dtype)
