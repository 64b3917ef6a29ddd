"""Samplers of the reverse process (METHOD §6), independent of the model and of training.

Every sampler works in the space centred on the absorbing vector m (y = x - m), starts the
target positions from N(m, I), re-anchors the source positions after every model call and every
update, and applies each update with the fused ``denoise_step`` op:

- ``ddpm``: the posterior step over every step of the (possibly respaced) schedule;
- ``ddim``: the deterministic DDIM step between consecutive kept steps, with the correct
  abar of the step it lands on;
- ``dpm++``: DPM-Solver++(2M) with x0-prediction over steps uniform in log-SNR
  (``dpm_solver_timesteps``), first order at the first step (and at the last with
  ``lower_order_final``); on Gaussian data its distance to the exact probability-flow ODE
  solution shrinks with every doubling of the steps (tests/test_samplers.py).

The default is ``ddpm`` respaced to 10 steps: the posterior step between kept steps, which is
also the first-order SDE-DPM-Solver++ step. At 10 steps (10 model calls; DPM-Solver++ 10
makes 11) it gave better text than DPM-Solver++ on the trained demo models (bench/RESULTS.md,
"Samplers on a trained model"): the deterministic samplers (DPM-Solver++, DDIM) follow the same
probability-flow ODE, whose end points scored below the stochastic samplers' (measured when
DPM-Solver++ still stepped uniformly in t); ``clamp`` narrows the gap.

A sampler takes one ``Conditioning``: the batch to complete (anchor, target mask), the
absorbing vector m and ``denoise(x_t, t) -> x0_hat`` (``MoEDiffuSeq.condition`` builds it, the
model bound to its global mask; tests build one around an analytic denoiser). ``t`` holds steps
of the original schedule.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from moediffuseq.diffusion.schedule import NoiseSchedule
from moediffuseq.ops import denoise_step, nearest_embedding

SAMPLERS = ("ddpm", "ddim", "dpm++")

Denoiser = Callable[..., Tensor]  # (x_t, t) -> x0_hat; (x_t, t, x0_prev) with self-conditioning
StepCallback = Callable[[int, int, Tensor], None]


@dataclass
class Conditioning:
    """One batch ready to sample: what the sampler needs from the model, and nothing else."""

    denoise: Denoiser       # (x_t (B, L, d), t (B,)) -> x0_hat (B, L, d)
    anchor: Tensor          # (B, L, d) the embedded source (and anything on non-target positions)
    target_mask: Tensor     # (B, L) bool, the positions to generate
    m: Tensor               # (d,) the absorbing vector (zeros without the soft absorbing state)
    embedding: Optional[Tensor] = None  # (V, d) word embeddings, for clamping
    logits: Optional[Callable[[Tensor], Tensor]] = None  # (..., d) -> (..., V), for early stopping
    self_conditioning: bool = False  # denoise(x_t, t, x0_prev) also takes the run's previous x0 prediction
    span: Optional[int] = None  # the target is the last ``span`` rows of every sequence (a bounded target span):
    # noise is drawn for those rows only, so sampling the span alone (a source cache) draws the same numbers


@dataclass
class SampleResult:
    x0: Tensor          # (B, L, d) the final x0 prediction, source re-anchored
    steps_taken: int    # model calls
    stopped_early: bool


@dataclass
class SamplerConfig:
    method: str = "ddpm"          # see the module docstring for why not dpm++
    steps: int = 10               # kept steps (ddim / dpm++) or respacing of ddpm; <= T
    clamp: bool = False           # round x0_hat to the nearest word embedding (DiffuSeq's clamping)
    early_stop_patience: int = 0  # stop when the argmax tokens are unchanged this many steps (0: off)
    lower_order_final: bool = False  # dpm++: first-order last step; the default second order lands
    # >= 5x closer to the exact ODE solution at 10 and 40 steps on "sqrt" (tests/test_samplers.py)

    def __post_init__(self) -> None:
        if self.method not in SAMPLERS:
            raise ValueError(f"sampler must be one of {SAMPLERS}, got {self.method!r}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1, got {self.steps}")


def _batch(value: float, B: int, device) -> Tensor:
    return torch.full((B,), float(value), dtype=torch.float32, device=device)


class _Reverse:
    """The shared state of one sampling run: anchors, m, clamping, early stopping, the callback."""

    def __init__(self, cond: Conditioning, cfg: SamplerConfig, callback: Optional[StepCallback]) -> None:
        if cfg.clamp and cond.embedding is None:
            raise ValueError("clamp=True needs the word embedding matrix")
        if cfg.early_stop_patience and cond.logits is None:
            raise ValueError("early stopping needs the logits head to read the argmax tokens")
        self.cond, self.anchor, self.target_mask = cond, cond.anchor, cond.target_mask
        self.m = cond.m.to(cond.anchor.dtype)
        self.cfg, self.callback = cfg, callback
        self.calls, self.unchanged, self.tokens = 0, 0, None
        self.previous: Optional[Tensor] = None  # the last x0 prediction, for self-conditioning

    def noise(self, generator: Optional[torch.Generator]) -> Tensor:
        """Standard normal noise of the anchor's shape: on every position, or with a bounded span
        drawn for its last rows alone (zeros before them, where the target mask is false)."""
        anchor, span = self.anchor, self.cond.span
        B, L, d = anchor.shape
        rows = L if span is None else span
        z = torch.randn((B, rows, d), generator=generator, device=anchor.device).to(anchor.dtype)
        return z if rows == L else torch.cat([z.new_zeros(B, L - rows, d), z], dim=1)  # (B, L, d)

    def predict(self, x: Tensor, t: int) -> Tensor:
        t_batch = torch.full((x.shape[0],), t, dtype=torch.long, device=x.device)
        if self.cond.self_conditioning:  # every run (every MBR sample) starts from no estimate
            x0 = self.cond.denoise(x, t_batch, self.previous)
        else:
            x0 = self.cond.denoise(x, t_batch)
        x0 = x0.to(x.dtype)  # a denoiser under autocast answers in its dtype
        self.calls += 1
        if self.cfg.clamp:
            embedding = self.cond.embedding
            x0 = embedding[nearest_embedding(x0, embedding)].to(x0.dtype)
        x0 = torch.where(self.target_mask[..., None], x0, self.anchor)
        if self.cond.self_conditioning:
            self.previous = x0
        if self.callback is not None:
            self.callback(self.calls, t, x0)
        return x0

    def converged(self, x0: Tensor) -> bool:
        if not self.cfg.early_stop_patience:
            return False
        tokens = self.cond.logits(x0).argmax(-1)
        same = self.tokens is not None and torch.equal(tokens, self.tokens)
        self.unchanged = self.unchanged + 1 if same else 0
        self.tokens = tokens
        return self.unchanged >= self.cfg.early_stop_patience

    def step(self, x: Tensor, x0: Tensor, a: float, b: float, *, x0_prev: Optional[Tensor] = None,
             c: float = 0.0, noise: Optional[Tensor] = None, s: float = 0.0) -> Tensor:
        """The update, written over x (the loop keeps no other reference to it)."""
        B = x.shape[0]
        return denoise_step(
            x, x0, self.anchor, self.target_mask, self.m, _batch(a, B, x.device), _batch(b, B, x.device),
            x0_prev=x0_prev, coef_x0_prev=None if x0_prev is None else _batch(c, B, x.device),
            noise=noise, coef_noise=None if noise is None else _batch(s, B, x.device), out=x)


def dpm_solver_timesteps(alphas_cumprod: Tensor, steps: int) -> list[int]:
    """steps + 1 distinct integer steps from T-1 down to 0 (steps is capped at T - 1): T-1, then
    steps points uniform in log-SNR lambda = log(alpha / sigma) from step T-1-ceil((T-1)/100)
    down to 0, each the schedule's step nearest in lambda, moved by the least needed to keep
    them distinct.

    Uniform in lambda, not in t: DPM-Solver's error is a power of the lambda step, and on the
    "sqrt" schedule lambda(t) is steep at both ends (abar ~ (1 - t/T) / 2 near T, sigma^2 ~
    sqrt(t/T + 1e-4) near 0), so time-uniform steps keep end steps of the same lambda length
    whatever their number, and the solution stops converging. The first step (first order)
    crosses the last 1% of the schedule in one go: there lambda runs from -7.7 to -2.6 on
    "sqrt" in steps of the table too coarse for a uniform grid (the clipped last beta alone is
    3.5), and the x0 prediction is still close to the data mean; points forced onto those
    steps make uneven multistep ratios whose extrapolation costs more than the step saves.
    """
    ab = alphas_cumprod.to(torch.float64)
    T = ab.numel()
    if T == 1:
        return [0]
    lam = 0.5 * (ab.log() - (1 - ab).log())  # decreasing in t
    n = min(steps, T - 1)
    first = max(T - 1 - math.ceil((T - 1) / 100), n - 1)  # where the uniform grid starts
    wanted = torch.linspace(float(lam[first]), float(lam[0]), n, dtype=torch.float64) if n > 1 else lam[:1]
    right = torch.searchsorted(-lam, -wanted).clamp(1, T - 1)  # first t with lam[t] <= wanted
    left = right - 1
    nearest = torch.where((lam[left] - wanted).abs() <= (wanted - lam[right]).abs(), left, right).tolist()
    times, previous = [T - 1], T - 1
    for k, t in enumerate(nearest, start=1):
        t = min(max(t, n - k), previous - 1)  # room below for the n - k steps still to place
        times.append(t)
        previous = t
    return times


def sample(cond: Conditioning, schedule: NoiseSchedule, cfg: SamplerConfig, *,
           generator: Optional[torch.Generator] = None, callback: Optional[StepCallback] = None) -> SampleResult:
    """Runs one sampler from noise to x0.

    Args:
        cond: the batch and the model (``MoEDiffuSeq.condition``).
        schedule: the training schedule (T steps); respaced here as the method needs.
        callback: ``callback(call, t, x0)`` after every model call (1-based call number, the
            step of the original schedule, the re-anchored x0 prediction (B, L, d)).
    """
    rev = _Reverse(cond, cfg, callback)
    anchor, target_mask = cond.anchor, cond.target_mask
    x = torch.where(target_mask[..., None], rev.noise(generator) + rev.m, anchor).contiguous()  # target ~ N(m, I)
    if cfg.method == "dpm++":
        return _dpm_solver_pp(rev, schedule, x)
    return _ancestral(rev, schedule.respace(cfg.steps), x, cfg.method, generator)


def _ancestral(rev: _Reverse, sched: NoiseSchedule, x: Tensor, method: str,
               generator: Optional[torch.Generator]) -> SampleResult:
    ab, ab_prev = sched.alphas_cumprod, sched.alphas_cumprod_prev
    coef_x0, coef_xt = sched.posterior_mean_coefs
    sigma = sched.posterior_variance.clamp(min=0).sqrt()
    x0 = x
    for i in reversed(range(sched.num_steps)):
        x0 = rev.predict(x, int(sched.timesteps[i]))
        if rev.converged(x0) or i == 0:
            return SampleResult(x0, rev.calls, i > 0)
        if method == "ddpm":
            x = rev.step(x, x0, float(coef_xt[i]), float(coef_x0[i]), noise=rev.noise(generator), s=float(sigma[i]))
        else:  # ddim (eta = 0): y_prev = sqrt(ab_prev) y0 + sqrt(1 - ab_prev) eps(y_t, y0)
            ratio = math.sqrt((1 - ab_prev[i]) / (1 - ab[i]))
            x = rev.step(x, x0, ratio, math.sqrt(ab_prev[i]) - ratio * math.sqrt(ab[i]))
    return SampleResult(x0, rev.calls, False)


def _dpm_solver_pp(rev: _Reverse, schedule: NoiseSchedule, x: Tensor) -> SampleResult:
    ab = schedule.alphas_cumprod
    times = dpm_solver_timesteps(ab, rev.cfg.steps)
    alpha = [math.sqrt(ab[t]) for t in times]
    sigma = [math.sqrt(1 - ab[t]) for t in times]
    lam = [math.log(a / s) for a, s in zip(alpha, sigma)]
    x0_prev: Optional[Tensor] = None
    h_prev = 0.0
    for i in range(1, len(times)):
        x0 = rev.predict(x, int(schedule.timesteps[times[i - 1]]))
        if rev.converged(x0):
            return SampleResult(x0, rev.calls, True)
        h = lam[i] - lam[i - 1]
        a = sigma[i] / sigma[i - 1]
        b = alpha[i] * -math.expm1(-h)  # alpha_i (1 - e^{-h})
        last = i == len(times) - 1
        if x0_prev is None or (last and rev.cfg.lower_order_final):  # first order at the ends
            x_next = rev.step(x, x0, a, b)
        else:
            r = h_prev / h
            x_next = rev.step(x, x0, a, b * (1 + 1 / (2 * r)), x0_prev=x0_prev, c=-b / (2 * r))
        x0_prev, h_prev, x = x0, h, x_next
    x0 = rev.predict(x, int(schedule.timesteps[times[-1]]))
    return SampleResult(x0, rev.calls, False)


def mbr_select(candidates: Sequence[Sequence[int]], similarity: Callable[[Sequence[int], Sequence[int]], float]) -> int:
    """Minimum-Bayes-risk choice: the index of the candidate with the highest summed similarity
    (e.g. sentence BLEU) against all the others; ties: the first."""
    if not candidates:
        raise ValueError("mbr_select: no candidates")
    scores = [sum(similarity(c, o) for j, o in enumerate(candidates) if j != i) for i, c in enumerate(candidates)]
    return max(range(len(candidates)), key=lambda i: (scores[i], -i))
