"""The training configuration (METHOD §5): ``TrainConfig``, its learning-rate schedule, and
the names of its fields in earlier releases (still read from configuration files, run
directories and checkpoints)."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from typing import Optional

from moediffuseq import fields
from moediffuseq.diffusion.timestep_draw import TIMESTEP_DRAWS


# The largest value of every count: beyond any run, small enough that no loop or table it sizes explodes.
TRAIN_MAXIMA = {"steps": 10**9, "batch_size": 1 << 20, "grad_accum": 1 << 16, "log_every": 10**9,
                "keep_checkpoints": 1000, "warmup_steps": 10**9, "seed": 2**32 - 1, "eval_every": 10**9,
                "eval_batches": 1 << 20, "bleu_examples": 1 << 20, "save_every": 10**9}


@dataclass
class TrainConfig:
    steps: int = 20000             # optimizer steps
    batch_size: int = 32           # sequences per micro-batch and process
    grad_accum: int = 1            # micro-batches per optimizer step
    lr: float = 1e-4
    weight_decay: float = 0.0
    warmup_steps: int = 500
    lr_decay: str = "linear"       # after warm-up: "linear" (to 0), "cosine" or "constant"
    clip_grad: float = 1.0         # max gradient norm; 0 turns clipping off
    ema_decay: float = 0.9999      # with the usual (1 + n) / (10 + n) ramp at the start
    bf16: bool = False             # bf16 autocast of the forward and backward
    timestep_draw: str = "uniform"  # the diffusion steps of a training batch: or "loss-aware"
    seed: int = 0
    log_every: int = 10
    eval_every: int = 500          # validation loss and sample BLEU (0: only at the end)
    eval_batches: int = 4          # validation loss batches (0: no validation loss)
    bleu_examples: int = 32        # validation sources generated for the sample BLEU (0: off)
    save_every: int = 1000         # checkpoint period in steps (0: only at the end and on Ctrl-C)
    keep_checkpoints: int = 1      # checkpoints kept: the latest and the N - 1 before it
    keep_best: bool = False        # export the EMA weights of the best validation (BLEU, else loss), not the last
    progress: bool = True

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "grad_accum", "log_every", "keep_checkpoints"):
            fields.integer(name, getattr(self, name), 1, TRAIN_MAXIMA[name])
        for name in ("warmup_steps", "seed", "eval_every", "eval_batches", "bleu_examples", "save_every"):
            fields.integer(name, getattr(self, name), 0, TRAIN_MAXIMA[name])
        # AdamW's first step is lr / (1 - beta1) = 10 lr: far past 1e6 it overflows float32 (a
        # traceback); below, a rate too high shows as a diverged run, named with its step
        fields.number("lr", self.lr, 0.0, 1e6, above=True)
        fields.number("weight_decay", self.weight_decay, 0.0, 100.0)
        fields.number("clip_grad", self.clip_grad, 0.0)
        fields.number("ema_decay", self.ema_decay, 0.0, 1.0, below=True)
        fields.choice("lr_decay", self.lr_decay, ("linear", "cosine", "constant"))
        fields.choice("timestep_draw", self.timestep_draw, TIMESTEP_DRAWS)
        fields.boolean("bf16", self.bf16)
        fields.boolean("keep_best", self.keep_best)
        fields.boolean("progress", self.progress)


# fields that change neither the numbers of a run nor its outputs: free to change on --resume
NON_RESULT_FIELDS = ("progress", "keep_checkpoints")

# earlier names of fields: old name -> current name
RENAMED_FIELDS = {"timestep_sampler": "timestep_draw"}


def upgrade_fields(values: dict) -> dict:
    """A ``train`` mapping (a config file's section, a run's run_config.json or a checkpoint's
    train_config.json) with the earlier names of fields replaced by the current ones."""
    values = dict(values)
    for old, new in RENAMED_FIELDS.items():
        if old in values:
            if new in values:
                raise ValueError(f"train fields {old!r} and {new!r} are one field ({old!r} is its earlier name): "
                                 f"give {new!r} only")
            values[new] = values.pop(old)
    return values


def fit_warmup(cfg: TrainConfig) -> tuple[TrainConfig, Optional[str]]:
    """A warm-up longer than the run (the learning rate would never reach ``lr``: the default 500
    steps in a short run) is shortened to a tenth of the run; returns the configuration and a
    note saying so, or ``cfg`` and None."""
    if cfg.warmup_steps <= cfg.steps:
        return cfg, None
    warmup = cfg.steps // 10
    return dataclasses.replace(cfg, warmup_steps=warmup), (
        f"note: the warm-up ({cfg.warmup_steps} steps) is longer than the run ({cfg.steps} steps), so the learning "
        f"rate would never reach {cfg.lr}: warm-up shortened to {warmup} steps, a tenth of the run "
        "(--warmup-steps sets it)")


def lr_factor(step: int, cfg: TrainConfig) -> float:
    """Multiplier of the base learning rate at ``step`` (0-based)."""
    if step < cfg.warmup_steps:
        return (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return 1.0
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    if cfg.lr_decay == "linear":
        return max(0.0, 1.0 - progress)
    return 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
