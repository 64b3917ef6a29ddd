"""The health of a training run: ``Diverged`` stops a run whose loss, gradient or weights became
non-finite, before a bad state reaches a checkpoint."""
from __future__ import annotations

import math
from typing import ContextManager

import torch
from torch import nn

from moediffuseq.data import Seq2SeqDataset
from moediffuseq.diffusion import NoiseSchedule, diffusion_loss


class Diverged(FloatingPointError):
    """The loss, the gradient or the weights became non-finite: the run stops before a bad
    state reaches a checkpoint."""


def is_non_finite_error(error: RuntimeError) -> bool:
    """The fused ops refuse NaN/inf inputs with a message naming them (e.g. moe_topk_softmax)."""
    return "NaN" in str(error)


def weights_finite(model: nn.Module) -> bool:
    params = [p.detach() for p in model.parameters()]
    return bool(torch.isfinite(torch.stack(torch._foreach_norm(params, ord=math.inf))).all())


@torch.no_grad()
def check_healthy(model: nn.Module, ema: nn.Module, train_set: Seq2SeqDataset, schedule: NoiseSchedule,
                  batch_size: int, device: torch.device, autocast: ContextManager, step: int) -> None:
    """Raises ``Diverged`` unless the weights (and their EMA) are finite and the loss of the
    current weights on a fixed probe batch (the first ``batch_size`` training examples) is
    finite (weights can be finite yet so large that every forward overflows)."""
    for module, what in ((model, "weights"), (ema, "EMA weights")):
        bad = [n for n, p in module.named_parameters() if not bool(torch.isfinite(p).all())]
        if bad:
            raise Diverged(f"step {step}: the {what} hold NaN or inf (in {', '.join(bad[:3])})")
    was_training = model.training
    model.eval()
    n = min(len(train_set), batch_size)
    batch = train_set.batch(torch.arange(n)).to(device)
    t = torch.linspace(0, schedule.num_steps - 1, n).long().to(device)
    try:
        with autocast:
            loss = float(diffusion_loss(model, schedule, batch.input_ids, batch.target_mask, t,
                                        generator=torch.Generator(device=device).manual_seed(0)).loss)
    except RuntimeError as e:
        if not is_non_finite_error(e):
            raise
        raise Diverged(f"step {step}: the model fails on a probe batch ({e})") from None
    finally:
        model.train(was_training)
    if not math.isfinite(loss):
        raise Diverged(f"step {step}: the loss of the weights on a probe batch is {loss}")
