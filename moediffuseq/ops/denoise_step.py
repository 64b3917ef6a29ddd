"""One fused sampler update: target positions updated, source positions re-anchored (METHOD §6)."""
from typing import Optional, Union

import torch
from torch import Tensor

_OP = torch.ops.moediffuseq.denoise_step.default
_OP_OUT = torch.ops.moediffuseq.denoise_step.out

Coef = Union[float, Tensor]


def _per_batch(c: Optional[Coef], B: int, device, name: str) -> Optional[Tensor]:
    """A float or a (B,) tensor as the op's float32 (B,) coefficient (None stays None)."""
    if c is None:
        return None
    t = torch.as_tensor(c, dtype=torch.float32, device=device)
    if t.numel() not in (1, B) or t.dim() > 1:
        raise ValueError(f"denoise_step: {name} must be a float or a (B,) = ({B},) tensor, got shape {tuple(t.shape)}")
    return t.expand(B).contiguous()


def denoise_step(x_t: Tensor, x0_hat: Tensor, anchor: Tensor, target_mask: Tensor, m: Tensor,
                 coef_xt: Coef, coef_x0: Coef, *, x0_prev: Optional[Tensor] = None,
                 coef_x0_prev: Optional[Coef] = None, noise: Optional[Tensor] = None,
                 coef_noise: Optional[Coef] = None, out: Optional[Tensor] = None) -> Tensor:
    """x_next = coef_xt x_t + coef_x0 x0_hat + coef_x0_prev x0_prev + coef_noise noise
    + (1 - coef_xt - coef_x0 - coef_x0_prev) m on target positions, anchor on source positions.
    The affine form in (x - m) covers the DDPM posterior step, the DDIM step and the DPM-Solver++
    first- and second-order updates (diffusion/samplers.py).

    Args:
        x_t, x0_hat, anchor, x0_prev, noise: (B, L, d), one dtype (float32 or bfloat16).
        target_mask: (B, L) bool; m: (d,) the absorbing vector (the centre of the noise).
        coef_*: floats or (B,) tensors. x0_prev and noise are optional, each with its
            coefficient (both or neither).
        out: optional preallocated contiguous result (may be x_t itself, or another (B, L, d)
            input: the update is elementwise), to keep a sampling loop free of allocations. A
            partial overlap with an input is an error; out= does not take part in autograd.

    Differentiable (without ``out``) in every tensor input and coefficient, twice too: the
    backward is written in plain PyTorch ops.
    """
    B = x_t.shape[0]
    args = (x_t, x0_hat, anchor, target_mask, m, _per_batch(coef_xt, B, x_t.device, "coef_xt"),
            _per_batch(coef_x0, B, x_t.device, "coef_x0"), x0_prev,
            _per_batch(coef_x0_prev, B, x_t.device, "coef_x0_prev"), noise,
            _per_batch(coef_noise, B, x_t.device, "coef_noise"))
    if out is None:
        return _OP(*args)
    _check_out(out, x_t=x_t, x0_hat=x0_hat, anchor=anchor, target_mask=target_mask, m=m, x0_prev=x0_prev,
               noise=noise)
    if torch.is_grad_enabled() and any(isinstance(t, Tensor) and t.requires_grad for t in args):
        raise RuntimeError("denoise_step: out= does not take part in autograd; call it without out= to "
                           "differentiate, or under torch.no_grad()")
    _OP_OUT(*args, out=out)
    return out


def _byte_span(t: Tensor) -> tuple[int, int]:
    extent = sum((size - 1) * stride for size, stride in zip(t.shape, t.stride()))
    return t.data_ptr(), t.data_ptr() + (extent + 1) * t.element_size()


def _check_out(out: Tensor, **inputs: Optional[Tensor]) -> None:
    """``out`` may be one of the (B, L, d) inputs exactly (the update is elementwise) but must not
    overlap any input otherwise: a partial overlap would read values already overwritten."""
    elementwise = ("x_t", "x0_hat", "x0_prev", "noise", "anchor")
    for name, t in inputs.items():
        if t is None or t.numel() == 0 or out.numel() == 0 or t.device != out.device:
            continue
        if t.untyped_storage().data_ptr() != out.untyped_storage().data_ptr():
            continue
        same = (name in elementwise and t.data_ptr() == out.data_ptr() and t.shape == out.shape
                and t.stride() == out.stride() and t.dtype == out.dtype)
        if same:
            continue
        (a0, a1), (b0, b1) = _byte_span(t), _byte_span(out)
        if a0 < b1 and b0 < a1:
            raise ValueError(f"denoise_step: out overlaps {name} without being it (a partial overlap gives a "
                             "wrong result); pass a separate tensor or the input itself")


def _setup_context(ctx, inputs, output):
    x_t, x0_hat, anchor, target_mask, m, coef_xt, coef_x0, x0_prev, coef_x0_prev, noise, coef_noise = inputs
    ctx.save_for_backward(x_t, x0_hat, target_mask, m, coef_xt, coef_x0, x0_prev, coef_x0_prev, noise, coef_noise)
    ctx.dtypes = (x_t.dtype, x0_hat.dtype, anchor.dtype, m.dtype, None if x0_prev is None else x0_prev.dtype,
                  None if noise is None else noise.dtype)


def _backward(ctx, grad):
    """The update is affine: gradients in plain PyTorch ops (so they are differentiable again)."""
    x_t, x0_hat, target_mask, m, a, b, x0_prev, c, noise, s = ctx.saved_tensors
    dt_xt, dt_x0, dt_anchor, dt_m, dt_prev, dt_noise = ctx.dtypes
    need = ctx.needs_input_grad
    keep = target_mask[..., None]  # (B, L, 1)
    g = torch.where(keep, grad.float(), 0.0)  # (B, L, d) the target part
    mf = m.float()
    c_or_0 = 0.0 if c is None else c

    def col(coef):
        return coef[:, None, None]  # (B, 1, 1)

    def dot(x):
        return (g * x).sum(dim=(1, 2))  # (B,)

    grads = [
        (col(a) * g).to(dt_xt) if need[0] else None,
        (col(b) * g).to(dt_x0) if need[1] else None,
        torch.where(keep, 0.0, grad.float()).to(dt_anchor) if need[2] else None,
        None,
        (col(1 - a - b - c_or_0) * g).sum(dim=(0, 1)).to(dt_m) if need[4] else None,
        dot(x_t.float() - mf) if need[5] else None,
        dot(x0_hat.float() - mf) if need[6] else None,
        (col(c) * g).to(dt_prev) if need[7] and x0_prev is not None else None,
        dot(x0_prev.float() - mf) if need[8] and x0_prev is not None else None,
        (col(s) * g).to(dt_noise) if need[9] and noise is not None else None,
        dot(noise.float()) if need[10] and noise is not None else None,
    ]
    return tuple(grads)


torch.library.register_autograd("moediffuseq::denoise_step", _backward, setup_context=_setup_context)


@torch.library.register_fake("moediffuseq::denoise_step")
def _(x_t, x0_hat, anchor, target_mask, m, coef_xt, coef_x0, x0_prev=None, coef_x0_prev=None, noise=None,
      coef_noise=None):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.register_fake("moediffuseq::denoise_step.out")
def _(x_t, x0_hat, anchor, target_mask, m, coef_xt, coef_x0, x0_prev=None, coef_x0_prev=None, noise=None,
      coef_noise=None, *, out):
    return None


def denoise_step_ref(x_t: Tensor, x0_hat: Tensor, anchor: Tensor, target_mask: Tensor, m: Tensor,
                     coef_xt: Coef, coef_x0: Coef, *, x0_prev: Optional[Tensor] = None,
                     coef_x0_prev: Optional[Coef] = None, noise: Optional[Tensor] = None,
                     coef_noise: Optional[Coef] = None, out: Optional[Tensor] = None) -> Tensor:
    """The same update as a chain of plain PyTorch ops, computed in float32, or in float64 when
    x_t is float64 (the tests' reference); the float32 coefficients are the op's either way."""
    B = x_t.shape[0]
    dtype = torch.float64 if x_t.dtype == torch.float64 else torch.float32

    def col(c):  # (B, 1, 1)
        return torch.as_tensor(c, dtype=torch.float32, device=x_t.device).to(dtype).expand(B)[:, None, None]

    a, b = col(coef_xt), col(coef_x0)
    c = col(coef_x0_prev) if x0_prev is not None else 0.0
    mf = m.to(dtype)
    result = a * x_t.to(dtype) + b * x0_hat.to(dtype) + (1 - a - b - c) * mf
    if x0_prev is not None:
        result = result + c * x0_prev.to(dtype)
    if noise is not None:
        result = result + col(coef_noise) * noise.to(dtype)
    result = torch.where(target_mask[..., None], result, anchor.to(dtype)).to(x_t.dtype)
    if out is None:
        return result
    return out.copy_(result)
