"""The training loss of MoE-DiffuSeq (METHOD §5), per example:

    mse(x0_hat, x0) + CE(lm_head(x0), w) + mean((sqrt(abar_T) x0)^2) + m_weight ||m||_2 + MoE aux,

with x0 = Emb(w) + sqrt(1 - abar_0) eps, x_t from the soft absorbing forward process, and the
mse target Emb(w) at t = 0. The mse and the nll are averaged over all positions (METHOD and the
reference code: the nll on source tokens keeps the embeddings of words seen only in sources
apart) or over the target positions only (``config.mse_target_only``, ``config.nll_target_only``).
With ``config.source_isolation`` the source is never noised (x0 = Emb(w) there, as the sampler
anchors it). With ``config.self_conditioning`` each example sees, with probability 1/2 (a coin from the
loss's generator, drawn after the forward noise), the model's own no-grad x0 estimate of the
same x_t as an extra input (Chen et al. 2022); the others see zeros, as the first sampling step.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from moediffuseq.diffusion.schedule import NoiseSchedule
from moediffuseq.ops import soft_absorb_q_sample


@dataclass
class LossTerms:
    """Per-example terms (B,) and the scalar total (importance-weighted mean + global terms)."""

    loss: Tensor        # scalar, what the optimiser minimises
    per_example: Tensor  # (B,) mse + nll + prior, for loss-aware step sampling
    mse: Tensor
    nll: Tensor
    prior: Tensor
    m_norm: Tensor
    aux: Tensor


def _mean_over(values: Tensor, mask: Optional[Tensor]) -> Tensor:
    """(B, L) -> (B,): mean over positions, or over the positions where mask is true."""
    if mask is None:
        return values.mean(-1)
    mask = mask.to(values.dtype)
    return (values * mask).sum(-1) / mask.sum(-1).clamp(min=1)


def diffusion_loss(model, schedule: NoiseSchedule, input_ids: Tensor, target_mask: Tensor, t: Tensor,
                   weights: Optional[Tensor] = None, generator: Optional[torch.Generator] = None) -> LossTerms:
    """Loss of ``model`` (a MoEDiffuSeq) on a batch.

    Args:
        input_ids: (B, L) int64 packed sequences.
        target_mask: (B, L) bool, true on the target span (and its padding).
        t: (B,) int64 steps; weights: (B,) importance weights of the timestep draw (default 1).
    """
    cfg = model.config
    ab = schedule.alphas_cumprod  # (T,) float64 on the CPU
    ab_t, steps = schedule.lookup(t)  # (B,) each, on the device of t
    sqrt_1mab_0, sqrt_ab_end = math.sqrt(1.0 - float(ab[0])), math.sqrt(float(ab[-1]))
    emb = model.embed(input_ids)  # (B, L, d)
    noise0 = torch.randn(emb.shape, generator=generator, device=emb.device).to(emb.dtype)
    if cfg.source_isolation:  # an isolated source is never noised: it is read as it will be sampled
        noise0 = noise0 * target_mask[..., None].to(noise0.dtype)
    x0 = emb + sqrt_1mab_0 * noise0
    gamma = cfg.gamma if cfg.soft_absorbing else 0.0
    x_t = soft_absorb_q_sample(x0, model.m.to(x0.dtype), target_mask, ab_t.sqrt(), (1 - ab_t).sqrt(), gamma=gamma,
                               generator=generator)
    positions = model.positions(input_ids, target_mask)
    x0_self = None
    if cfg.self_conditioning:  # half of the examples see the model's own (no-grad) estimate first
        use = torch.rand(t.shape, generator=generator, device=emb.device) < 0.5  # (B,), drawn every step
        with torch.no_grad():
            x0_self = model(x_t, steps, positions)[0] * use[:, None, None].to(x_t.dtype)
    x0_hat, aux = model(x_t, steps, positions, x0_self)
    mse_mask = target_mask if cfg.mse_target_only else None
    mse = _mean_over((x0_hat - x0).square().mean(-1), mse_mask)
    mse_t0 = _mean_over((x0_hat - emb).square().mean(-1), mse_mask)
    mse = torch.where(t == 0, mse_t0, mse)
    logits = model.logits(x0)  # (B, L, V)
    nll_tokens = F.cross_entropy(logits.transpose(1, 2), input_ids, reduction="none")  # (B, L)
    nll = _mean_over(nll_tokens, target_mask if cfg.nll_target_only else None)
    prior = (sqrt_ab_end * x0).square().mean(dim=(1, 2))
    per_example = mse + nll + prior
    w = torch.ones_like(per_example) if weights is None else weights
    m_norm = model.m.norm() if cfg.soft_absorbing else per_example.new_zeros(())
    loss = (w * per_example).mean() + cfg.m_weight * m_norm + aux
    return LossTerms(loss, per_example.detach(), mse.detach(), nll.detach(), prior.detach(), m_norm.detach(),
                     aux.detach())
