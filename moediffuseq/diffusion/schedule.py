"""Noise schedules of the diffusion process and their precomputed tables (METHOD §5).

Step i in [0, T) goes from x_i to x_{i+1} with beta_i; abar_i = prod_{j<=i} (1 - beta_j) is the
signal kept at step i (abar_0 ~ 0.985 for "sqrt"). A respaced schedule keeps a subset of the
steps and recomputes its betas from the kept abar values, so that every update jumps from
abar_{t} to the correct abar_{t-gap} (DiffuSeq's own step skipping does not).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Sequence

import torch
from torch import Tensor

SCHEDULES = ("sqrt", "linear", "cosine")


def _betas_from_alpha_bar(num_steps: int, alpha_bar, max_beta: float = 0.999) -> Tensor:
    """beta_i = min(1 - abar((i+1)/T) / abar(i/T), max_beta) for a continuous abar on [0, 1]."""
    betas = [min(1 - alpha_bar((i + 1) / num_steps) / alpha_bar(i / num_steps), max_beta) for i in range(num_steps)]
    return torch.tensor(betas, dtype=torch.float64)


def make_betas(kind: str, num_steps: int) -> Tensor:
    """The betas (T,) float64 of a named schedule: "sqrt" (DiffuSeq), "linear" (DDPM), "cosine"."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if kind == "sqrt":
        return _betas_from_alpha_bar(num_steps, lambda s: 1 - math.sqrt(s + 1e-4))
    if kind == "linear":
        scale = 1000 / num_steps
        return torch.linspace(scale * 1e-4, scale * 0.02, num_steps, dtype=torch.float64).clamp(max=0.999)
    if kind == "cosine":
        return _betas_from_alpha_bar(num_steps, lambda s: math.cos((s + 0.008) / 1.008 * math.pi / 2) ** 2)
    raise ValueError(f"schedule must be one of {SCHEDULES}, got {kind!r}")


@dataclass(frozen=True)
class NoiseSchedule:
    """Tables of one (possibly respaced) schedule, float64, indexed by step i in [0, num_steps).

    ``timesteps[i]`` is the step of the original schedule that step i stands for (what the
    model's time embedding sees).
    """

    betas: Tensor
    timesteps: Tensor  # (num_steps,) int64
    # per device: (abar float32, timesteps), copied once (a copy per training step would be a
    # host-to-device transfer, and on CUDA a synchronisation, every step)
    _on_device: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    @classmethod
    def create(cls, kind: str = "sqrt", num_steps: int = 2000) -> "NoiseSchedule":
        betas = make_betas(kind, num_steps)
        return cls(betas, torch.arange(num_steps))

    def lookup(self, t: Tensor) -> tuple[Tensor, Tensor]:
        """(abar_t float32, the original schedule's step) for steps t (B,), on the device of t."""
        tables = self._on_device.get(t.device)
        if tables is None:
            tables = (self.alphas_cumprod.to(device=t.device, dtype=torch.float32), self.timesteps.to(t.device))
            self._on_device[t.device] = tables
        return tables[0][t], tables[1][t]

    @property
    def num_steps(self) -> int:
        return self.betas.numel()

    @property
    def alphas_cumprod(self) -> Tensor:
        return torch.cumprod(1.0 - self.betas, dim=0)

    @property
    def alphas_cumprod_prev(self) -> Tensor:
        ab = self.alphas_cumprod
        return torch.cat([ab.new_ones(1), ab[:-1]])

    @property
    def posterior_variance(self) -> Tensor:
        """Var of q(x_{i-1} | x_i, x_0): beta_i (1 - abar_{i-1}) / (1 - abar_i)."""
        return self.betas * (1.0 - self.alphas_cumprod_prev) / (1.0 - self.alphas_cumprod)

    @property
    def posterior_mean_coefs(self) -> tuple[Tensor, Tensor]:
        """(coef_x0, coef_xt) of the posterior mean: coef_x0 x_0 + coef_xt x_i."""
        ab, ab_prev = self.alphas_cumprod, self.alphas_cumprod_prev
        coef_x0 = self.betas * ab_prev.sqrt() / (1.0 - ab)
        coef_xt = (1.0 - ab_prev) * (1.0 - self.betas).sqrt() / (1.0 - ab)
        return coef_x0, coef_xt

    def respace(self, steps: int | Sequence[int]) -> "NoiseSchedule":
        """A schedule over a subset of the steps: ``steps`` evenly spaced ones (always
        including the last), or the explicit increasing list of kept steps."""
        if isinstance(steps, int):
            if not 1 <= steps <= self.num_steps:
                raise ValueError(f"steps must be in [1, {self.num_steps}], got {steps}")
            kept = torch.linspace(self.num_steps - 1, 0, steps).round().long().flip(0).unique()
        else:
            kept = torch.as_tensor(list(steps), dtype=torch.long)
            if kept.numel() == 0 or (kept[1:] <= kept[:-1]).any() or kept[0] < 0 or kept[-1] >= self.num_steps:
                raise ValueError(f"steps must be increasing indices in [0, {self.num_steps}), got {list(steps)}")
        ab = self.alphas_cumprod[kept]
        ab_prev = torch.cat([ab.new_ones(1), ab[:-1]])
        return NoiseSchedule(1.0 - ab / ab_prev, self.timesteps[kept])
