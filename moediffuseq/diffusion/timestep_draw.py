"""The timestep draw of training (METHOD §5): which diffusion steps a training batch sees,
uniform or loss-aware. (The reverse process, which generates, is in ``samplers.py``.)"""
from __future__ import annotations

from typing import Optional

import torch
from torch import Tensor


class UniformTimestepDraw:
    """t ~ U{0, ..., T-1}, importance weights 1."""

    def __init__(self, num_steps: int) -> None:
        if num_steps < 1:
            raise ValueError(f"num_steps must be >= 1, got {num_steps}")
        self.num_steps = num_steps

    def probabilities(self) -> Tensor:
        return torch.full((self.num_steps,), 1.0 / self.num_steps, dtype=torch.float64)

    def draw(self, batch: int, generator: Optional[torch.Generator] = None) -> tuple[Tensor, Tensor]:
        """(t (batch,) int64, weights (batch,) float32): E[w loss(t)] is the uniform mean."""
        p = self.probabilities()
        t = torch.multinomial(p, batch, replacement=True, generator=generator)
        weights = (1.0 / (self.num_steps * p[t])).float()
        return t, weights

    def update(self, t: Tensor, losses: Tensor) -> None:
        """Records per-example losses (ignored by the uniform draw)."""

    def state_dict(self) -> dict:
        return {}

    def load_state_dict(self, state: dict) -> None:
        pass


class LossAwareTimestepDraw(UniformTimestepDraw):
    """Importance sampling by the loss's second moment, as DiffuSeq's LossSecondMomentResampler:
    keep the last ``history`` losses of every step; once every step has them, draw with
    p_t ~ sqrt(E[loss_t^2]) mixed with ``uniform_prob`` of the uniform distribution."""

    def __init__(self, num_steps: int, history: int = 10, uniform_prob: float = 0.001) -> None:
        super().__init__(num_steps)
        self.history, self.uniform_prob = history, uniform_prob
        self.losses = torch.zeros(num_steps, history, dtype=torch.float64)
        self.counts = torch.zeros(num_steps, dtype=torch.int64)

    def warmed_up(self) -> bool:
        return bool((self.counts >= self.history).all())

    def probabilities(self) -> Tensor:
        if not self.warmed_up():
            return super().probabilities()
        p = self.losses.square().mean(-1).sqrt()
        p = p / p.sum()
        return p * (1 - self.uniform_prob) + self.uniform_prob / self.num_steps

    def update(self, t: Tensor, losses: Tensor) -> None:
        for step, loss in zip(t.tolist(), losses.detach().double().tolist()):
            if self.counts[step] == self.history:
                self.losses[step, :-1] = self.losses[step, 1:].clone()
                self.losses[step, -1] = loss
            else:
                self.losses[step, self.counts[step]] = loss
                self.counts[step] += 1

    def state_dict(self) -> dict:
        return {"losses": self.losses.clone(), "counts": self.counts.clone()}

    def load_state_dict(self, state: dict) -> None:
        self.losses.copy_(state["losses"])
        self.counts.copy_(state["counts"])


TIMESTEP_DRAWS = ("uniform", "loss-aware")


def make_timestep_draw(kind: str, num_steps: int) -> UniformTimestepDraw:
    if kind == "uniform":
        return UniformTimestepDraw(num_steps)
    if kind == "loss-aware":
        return LossAwareTimestepDraw(num_steps)
    raise ValueError(f"timestep draw must be 'uniform' or 'loss-aware', got {kind!r}")
