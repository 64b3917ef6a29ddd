"""One fused sampler update: target positions updated, source positions re-anchored (METHOD §6)."""
from typing import Optional, Union

import torch
from torch import Tensor

_OP = torch.ops.moediffuseq.denoise_step.default
_OP_OUT = torch.ops.moediffuseq.denoise_step.out

Coef = Union[float, Tensor]


def _per_batch(c: Optional[Coef], B: int, device, name: str = "coefficient") -> Tensor:
    if c is None:
        return torch.zeros(B, dtype=torch.float32, device=device)
    t = torch.as_tensor(c, dtype=torch.float32, device=device)
    if t.numel() not in (1, B) or t.dim() > 1:
        raise ValueError(f"denoise_step: {name} must be a float or a (B,) = ({B},) tensor, got shape {tuple(t.shape)}")
    return t.expand(B).contiguous()


def denoise_step(x_t: Tensor, x0_hat: Tensor, anchor: Tensor, target_mask: Tensor, m: Tensor,
                 coef_xt: Coef, coef_x0: Coef, *, x0_prev: Optional[Tensor] = None,
                 coef_x0_prev: Optional[Coef] = None, noise: Optional[Tensor] = None,
                 coef_noise: Optional[Coef] = None, out: Optional[Tensor] = None) -> Tensor:
    """x_next = a x_t + b x0_hat + c x0_prev + s noise + (1 - a - b - c) m on target positions,
    anchor on source positions. The affine form in (x - m) covers the DDPM posterior step, the
    DDIM step and the DPM-Solver++ first- and second-order updates (diffusion/samplers.py).

    Args:
        x_t, x0_hat, anchor, x0_prev, noise: (B, L, d), one dtype (float32 or bfloat16).
        target_mask: (B, L) bool; m: (d,) the absorbing vector (the centre of the noise).
        coef_*: floats or (B,) tensors (a, b, c, s above).
        out: optional preallocated contiguous result (may be x_t itself: the update is
            elementwise), to keep a sampling loop free of allocations.
    """
    B = x_t.shape[0]
    if (x0_prev is None) != (coef_x0_prev is None):
        raise ValueError("denoise_step: x0_prev and coef_x0_prev go together")
    if (noise is None) != (coef_noise is None):
        raise ValueError("denoise_step: noise and coef_noise go together")
    args = (x_t, x0_hat, x0_prev, noise, anchor, target_mask, m,
            _per_batch(coef_xt, B, x_t.device, "coef_xt"), _per_batch(coef_x0, B, x_t.device, "coef_x0"),
            _per_batch(coef_x0_prev, B, x_t.device, "coef_x0_prev"),
            _per_batch(coef_noise, B, x_t.device, "coef_noise"))
    if out is None:
        return _OP(*args)
    _OP_OUT(*args, out=out)
    return out


@torch.library.register_fake("moediffuseq::denoise_step")
def _(x_t, x0_hat, x0_prev, noise, anchor, target_mask, m, coef_xt, coef_x0, coef_x0_prev, coef_noise):
    return torch.empty_like(x_t, memory_format=torch.contiguous_format)


@torch.library.register_fake("moediffuseq::denoise_step.out")
def _(x_t, x0_hat, x0_prev, noise, anchor, target_mask, m, coef_xt, coef_x0, coef_x0_prev, coef_noise, *, out):
    return None


def denoise_step_ref(x_t: Tensor, x0_hat: Tensor, anchor: Tensor, target_mask: Tensor, m: Tensor,
                     coef_xt: Coef, coef_x0: Coef, *, x0_prev: Optional[Tensor] = None,
                     coef_x0_prev: Optional[Coef] = None, noise: Optional[Tensor] = None,
                     coef_noise: Optional[Coef] = None) -> Tensor:
    """The same update as a chain of plain PyTorch ops (float32 math)."""
    B = x_t.shape[0]

    def col(c):
        return _per_batch(c, B, x_t.device)[:, None, None]  # (B, 1, 1)

    a, b = col(coef_xt), col(coef_x0)
    c, s = col(coef_x0_prev), col(coef_noise)
    mf = m.float()
    out = a * x_t.float() + b * x0_hat.float() + (1 - a - b - c) * mf
    if x0_prev is not None:
        out = out + c * x0_prev.float()
    if noise is not None:
        out = out + s * noise.float()
    return torch.where(target_mask[..., None], out, anchor.float()).to(x_t.dtype)
