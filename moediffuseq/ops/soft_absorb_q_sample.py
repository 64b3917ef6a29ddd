"""The forward process with the soft absorbing state (DiffuSeq-v2, METHOD §5), fused."""
from typing import Optional

import torch
from torch import Tensor

from moediffuseq.ops._double_backward import refuse_double_backward

_OP = torch.ops.moediffuseq.soft_absorb_q_sample
_OP_BACKWARD = torch.ops.moediffuseq.soft_absorb_q_sample_backward


def soft_absorb_q_sample(x0: Tensor, m: Tensor, target_mask: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor, *,
                         noise: Optional[Tensor] = None, uniform: Optional[Tensor] = None, gamma: float = 0.5,
                         generator: Optional[torch.Generator] = None) -> Tensor:
    """x_t for x0 at the per-example noise levels (sqrt_ab, sqrt_1mab).

    Target positions (target_mask True): with probability gamma * sqrt_1mab the whole vector
    becomes m; otherwise x_t = sqrt_ab (x0 - m) + sqrt_1mab noise + m (noise centred on m).
    Source positions keep x0.

    Args:
        x0: (B, L, d) float32 or bfloat16.
        m: (d,) the learned absorbing vector, dtype of x0.
        target_mask: (B, L) bool.
        sqrt_ab, sqrt_1mab: (B,) sqrt(abar_t) and sqrt(1 - abar_t) of each example.
        noise: (B, L, d) standard normal draws; uniform: (B, L) U[0, 1) draws. Drawn from
            ``generator`` when not given.
        gamma: absorbing strength in [0, 1] (METHOD §5: 0.5).

    Differentiable w.r.t. x0 and m.
    """
    return _OP(*_op_args(x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma, generator))


def _op_args(x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma, generator):
    """The op's arguments in schema order: the draws made when not given, the levels as tensors."""
    if noise is None:
        noise = torch.randn(x0.shape, generator=generator, device=x0.device).to(x0.dtype)
    if uniform is None:
        uniform = torch.rand(x0.shape[:2], generator=generator, device=x0.device)
    sqrt_ab = torch.as_tensor(sqrt_ab, dtype=torch.float32, device=x0.device)
    sqrt_1mab = torch.as_tensor(sqrt_1mab, dtype=torch.float32, device=x0.device)
    return x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, float(gamma)


@torch.library.register_fake("moediffuseq::soft_absorb_q_sample")
def _(x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma):
    torch._check(x0.dim() == 3, lambda: f"soft_absorb_q_sample: x0 must be (B, L, d), got {x0.shape}")
    return torch.empty_like(x0, memory_format=torch.contiguous_format)


@torch.library.register_fake("moediffuseq::soft_absorb_q_sample_backward")
def _(grad, target_mask, sqrt_ab, sqrt_1mab, uniform, gamma):
    return torch.empty_like(grad, memory_format=torch.contiguous_format), grad.new_empty(grad.shape[2:],
                                                                                         dtype=torch.float32)


def _setup_context(ctx, inputs, output):
    x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma = inputs
    ctx.save_for_backward(target_mask, sqrt_ab, sqrt_1mab, uniform)
    ctx.gamma, ctx.m_dtype = gamma, m.dtype


def _backward(ctx, grad):
    target_mask, sqrt_ab, sqrt_1mab, uniform = ctx.saved_tensors
    grad_x0, grad_m = _OP_BACKWARD(grad.contiguous(), target_mask, sqrt_ab, sqrt_1mab, uniform, ctx.gamma)
    return grad_x0, grad_m.to(ctx.m_dtype), None, None, None, None, None, None


torch.library.register_autograd("moediffuseq::soft_absorb_q_sample", _backward, setup_context=_setup_context)
refuse_double_backward("soft_absorb_q_sample_backward", "soft_absorb_q_sample")


def soft_absorb_q_sample_ref(x0: Tensor, m: Tensor, target_mask: Tensor, sqrt_ab: Tensor, sqrt_1mab: Tensor, *,
                             noise: Optional[Tensor] = None, uniform: Optional[Tensor] = None, gamma: float = 0.5,
                             generator: Optional[torch.Generator] = None) -> Tensor:
    """The contract as plain PyTorch ops (float32 math, float64 when x0 is float64: the tests'
    reference; result in the dtype of x0); the same draws as the op for the same generator."""
    x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma = _op_args(
        x0, m, target_mask, sqrt_ab, sqrt_1mab, noise, uniform, gamma, generator)
    dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    a = sqrt_ab[:, None, None].to(dtype)  # (B, 1, 1)
    s = sqrt_1mab[:, None, None].to(dtype)
    mf = m.to(dtype)
    noised = a * (x0.to(dtype) - mf) + s * noise.to(dtype) + mf  # (B, L, d)
    absorbed = target_mask & (uniform < gamma * sqrt_1mab[:, None])  # (B, L)
    out = torch.where(absorbed[..., None], mf.expand_as(noised), noised)
    return torch.where(target_mask[..., None], out, x0.to(dtype)).to(x0.dtype)
