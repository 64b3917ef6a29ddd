"""Top-k softmax routing of a mixture-of-experts layer, METHOD §4."""
import torch
from torch import Tensor

_OP = torch.ops.moediffuseq.moe_topk_softmax


def moe_topk_softmax(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """Picks the k experts of every token and their renormalised softmax weights.

    Args:
        logits: (T, E) router logits, any floating dtype; NaN or +inf is an error.
        k: experts per token, 1 <= k <= E.

    Returns:
        weights: (T, k) float32, the softmax probabilities of the chosen experts renormalised
            to sum to 1 (equal to a softmax over the chosen logits); differentiable w.r.t. logits.
        indices: (T, k) int64, by descending weight; equal logits: the lowest expert index first.

    The C++ host entry checks the arguments, each error naming the op and the argument.
    """
    return _OP(logits, k)


@torch.library.register_fake("moediffuseq::moe_topk_softmax")
def _(logits, k):
    torch._check(logits.dim() == 2, lambda: f"moe_topk_softmax: logits must be (T, E), got {logits.shape}")
    torch._check(1 <= k <= logits.shape[1], lambda: f"moe_topk_softmax: k must be in [1, E], got {k}")
    T = logits.shape[0]
    return logits.new_empty((T, k), dtype=torch.float32), logits.new_empty((T, k), dtype=torch.int64)


def _setup_context(ctx, inputs, output):
    logits, _ = inputs
    weights, indices = output
    ctx.save_for_backward(weights, indices)
    ctx.logits_shape, ctx.logits_dtype = logits.shape, logits.dtype


def _backward(ctx, grad_weights, grad_indices):
    # weights = softmax(logits[indices]): d logits[t, i_j] = w_j (g_j - sum_l w_l g_l)
    weights, indices = ctx.saved_tensors
    if grad_weights is None:
        return None, None
    g = weights * (grad_weights - (weights * grad_weights).sum(-1, keepdim=True))  # (T, k)
    grad_logits = weights.new_zeros(ctx.logits_shape).scatter_(1, indices, g)
    return grad_logits.to(ctx.logits_dtype), None


torch.library.register_autograd("moediffuseq::moe_topk_softmax", _backward, setup_context=_setup_context)


def moe_topk_softmax_ref(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """The contract the plain way: float32 softmax (float64 for float64 logits: the tests'
    reference), stable descending sort, renormalise."""
    dtype = torch.float64 if logits.dtype == torch.float64 else torch.float32
    probs = torch.softmax(logits.to(dtype), dim=-1)  # (T, E)
    # sort by logit (ties keep the lower index first: stable sort), read the probabilities
    order = torch.sort(logits.to(dtype), dim=-1, descending=True, stable=True).indices[:, :k]  # (T, k)
    chosen = probs.gather(1, order)
    return chosen / chosen.sum(-1, keepdim=True), order
