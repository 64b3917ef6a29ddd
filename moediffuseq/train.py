"""Training (METHOD §5): AdamW with linear warm-up and decay, EMA of the weights, gradient
clipping and accumulation, bf16 autocast, a uniform or loss-aware timestep draw, periodic validation
(loss and sample BLEU with the EMA weights), atomic checkpoints with exact resume, and
data-parallel training when launched by torchrun (DDP: gloo on CPU, NCCL on GPU).

Output directory layout:
    run_config.json   the resolved configuration, written when the run starts (moediffuseq.run_dir)
    model/            the EMA weights, config.json, tokenizer.json, generation.json (final)
    checkpoint/       the latest training checkpoint (see moediffuseq.checkpoint);
                      checkpoint-<step>/ the earlier ones kept by keep_checkpoints
    best_model/       keep_best: the EMA weights of the best validation so far
    .lock             held while a run writes the directory (moediffuseq.run_lock)
    metrics.csv       train and validation rows; tensorboard/ when tensorboard is installed
    loss.png          the loss curve (when matplotlib is installed)
"""
from __future__ import annotations

import contextlib
import copy
import dataclasses
import json
import math
import os
import time
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist
from torch import Tensor, nn

from moediffuseq.checkpoint import (checkpoint_step, find_checkpoint, read_state, resume_checkpoint, save_checkpoint,
                                    verify_checksums, write_directory, write_state)
from moediffuseq.data import Seq2SeqDataset, TextTokenizer
from moediffuseq.data.dataset import BatchStream
from moediffuseq.diffusion import LossTerms, NoiseSchedule, diffusion_loss, make_timestep_draw
from moediffuseq.distributed import DistributedContext
from moediffuseq.generate import GENERATION_FILE, generation_defaults
from moediffuseq.health import Diverged, check_healthy, is_non_finite_error, weights_finite
from moediffuseq.interrupts import HeldInterrupts, Terminated
from moediffuseq.limits import read_text
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.run_log import PlainProgress, RunLog, progress_bar
from moediffuseq.train_config import TrainConfig, lr_factor
from moediffuseq.validation import validation_bleu, validation_loss


BEST_DIR = "best_model"  # keep_best: the EMA weights of the best validation so far


class DiffusionObjective(nn.Module):
    """The loss as a module, so that DistributedDataParallel can wrap one ``forward``."""

    def __init__(self, model: MoEDiffuSeq, schedule: NoiseSchedule) -> None:
        super().__init__()
        self.model, self.schedule = model, schedule

    def forward(self, input_ids: Tensor, target_mask: Tensor, t: Tensor, weights: Tensor,
                generator: Optional[torch.Generator]) -> LossTerms:
        return diffusion_loss(self.model, self.schedule, input_ids, target_mask, t, weights, generator)


class Trainer:
    """Trains a MoEDiffuSeq on packed datasets; ``fit()`` runs to ``cfg.steps``."""

    def __init__(self, model: MoEDiffuSeq, tokenizer: TextTokenizer, train_set: Seq2SeqDataset,
                 valid_set: Optional[Seq2SeqDataset], cfg: TrainConfig, out_dir: str | os.PathLike,
                 device: str | torch.device = "cpu") -> None:
        if train_set.seq_len != model.config.max_len:
            raise ValueError(f"the training set is packed to {train_set.seq_len} tokens but the model's max_len "
                             f"is {model.config.max_len}")
        self.device = torch.device(device)
        if self.device.type == "cuda" and model.config.attention == "sparse" and not cfg.bf16:
            raise ValueError("the CUDA block-sparse attention kernels run in bf16/fp16: train with bf16 autocast "
                             "(--bf16, or TrainConfig(bf16=True))")
        self.dist = DistributedContext.from_environment(self.device)
        self.cfg, self.tokenizer = cfg, tokenizer
        self.train_set, self.valid_set = train_set, valid_set
        self.out_dir = Path(out_dir)
        self.model = model.to(self.device)
        self.ema = copy.deepcopy(self.model).eval().requires_grad_(False)
        self.schedule = NoiseSchedule.create(model.config.schedule, model.config.diffusion_steps)
        objective = DiffusionObjective(self.model, self.schedule)
        if self.dist.world_size > 1:
            ids = [self.dist.local_rank] if self.device.type == "cuda" else None
            objective = nn.parallel.DistributedDataParallel(objective, device_ids=ids)
        self.objective = objective
        self.optimizer = torch.optim.AdamW(self.model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(self.optimizer, lambda s: lr_factor(s, cfg))
        self.timestep_draw = make_timestep_draw(cfg.timestep_draw, self.schedule.num_steps)
        self.stream = BatchStream(len(train_set), cfg.batch_size, cfg.seed, self.dist.rank, self.dist.world_size)
        self.gen_cpu = torch.Generator().manual_seed(cfg.seed * 7919 + self.dist.rank)  # steps
        self.gen_dev = torch.Generator(device=self.device).manual_seed(cfg.seed * 7919 + 1 + self.dist.rank)  # noise
        torch.manual_seed(cfg.seed + self.dist.rank)  # dropout
        self.step = 0
        self._rng_after_step = self._rng_state()
        self.log: Optional[RunLog] = None
        self._saved_step: Optional[int] = None  # step of the latest checkpoint written or resumed from
        self._in_step = False                   # True while a step is changing the training state
        self._interrupts = HeldInterrupts()

    # ----------------------------------------------------------------------------------- state
    def _rng_state(self) -> dict:
        state = {"cpu": torch.get_rng_state(), "gen_cpu": self.gen_cpu.get_state(),
                 "gen_dev": self.gen_dev.get_state()}
        if self.device.type == "cuda":
            state["cuda"] = torch.cuda.get_rng_state(self.device)
        return state

    def _set_rng_state(self, state: dict) -> None:
        torch.set_rng_state(state["cpu"])
        self.gen_cpu.set_state(state["gen_cpu"])
        self.gen_dev.set_state(state["gen_dev"])
        if "cuda" in state:
            torch.cuda.set_rng_state(state["cuda"], self.device)

    def save(self) -> Optional[Path]:
        """Writes the checkpoint of the last completed step (main process only), once the model
        has passed ``moediffuseq.health.check_healthy``: a diverged state never replaces a good checkpoint."""
        if self._in_step:
            raise RuntimeError("Trainer.save: the state is in the middle of a step")
        if not self.dist.is_main:
            self._saved_step = self.step
            return None
        check_healthy(self.model, self.ema, self.train_set, self.schedule, self.cfg.batch_size, self.device,
                      self._autocast(), self.step)
        state = {"step": self.step, "optimizer": self.optimizer.state_dict(),
                 "lr_schedule": self.lr_schedule.state_dict(), "stream": self.stream.state_dict(),
                 "timestep_draw": self.timestep_draw.state_dict(), "rng": self._rng_after_step}

        def write(tmp: Path) -> None:
            self.model.save_pretrained(tmp / "model")
            self.ema.save_pretrained(tmp / "ema")
            self.tokenizer.save(tmp)
            write_state(tmp, state, dataclasses.asdict(self.cfg))

        with self._interrupts.held():
            path = save_checkpoint(self.out_dir / "checkpoint", write, keep=self.cfg.keep_checkpoints)
        self._saved_step = self.step
        self._set_rng_state(self._rng_after_step)
        return path

    def resume(self, allow_change: bool = False) -> int:
        """Loads ``out_dir/checkpoint``; returns the step it continues from. The checkpoint's model
        config must equal this run's unless ``allow_change`` (the weights must still fit)."""
        directory = resume_checkpoint(self.out_dir / "checkpoint")
        if directory is None:
            raise FileNotFoundError(f"--resume: no checkpoint under {self.out_dir / 'checkpoint'}")
        verify_checksums(directory)
        state = read_state(directory)
        for target, name in ((self.model, "model"), (self.ema, "ema")):
            loaded = MoEDiffuSeq.from_pretrained(directory / name, map_location=str(self.device))
            old, new = dataclasses.asdict(loaded.config), dataclasses.asdict(self.model.config)
            changed = [k for k in new if old.get(k) != new[k]]
            if changed and not allow_change:
                raise ValueError(f"{directory / name}: the checkpoint's model config differs from this run's in "
                                 f"{', '.join(f'{k} ({old.get(k)!r} -> {new[k]!r})' for k in changed)}")
            try:
                target.load_state_dict(loaded.state_dict())
            except RuntimeError as e:
                raise ValueError(f"{directory / name}: the checkpoint's weights do not fit this run's model "
                                 f"config: {str(e).splitlines()[-1].strip()}") from None
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        self.stream.load_state_dict(state["stream"])
        # "step_sampler": its key in checkpoints written before the timestep draw had its name
        self.timestep_draw.load_state_dict(state["timestep_draw" if "timestep_draw" in state else "step_sampler"])
        self.step = int(state["step"])
        self._rng_after_step = state["rng"]
        self._set_rng_state(state["rng"])
        self._saved_step = self.step
        return self.step

    # ---------------------------------------------------------------------------------- health
    def last_good_checkpoint(self) -> str:
        directory = find_checkpoint(self.out_dir / "checkpoint")
        if directory is None:
            return "no checkpoint was written"
        step = checkpoint_step(directory)
        return f"the last good checkpoint is {directory}" + (f" (step {step})" if step is not None else "")

    # -------------------------------------------------------------------------------- training
    def _autocast(self):
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.cfg.bf16)

    def train_step(self) -> dict[str, float]:
        """One optimizer step over ``grad_accum`` micro-batches; returns its metrics. Raises
        ``Diverged`` (the state then is that of a step cut short) when the loss or the gradient
        is non-finite, or the update made the weights non-finite."""
        cfg = self.cfg
        self.model.train()
        self.optimizer.zero_grad(set_to_none=True)
        self._in_step = True
        number = self.step + 1
        sums = {"loss": 0.0, "mse": 0.0, "nll": 0.0, "prior": 0.0, "aux": 0.0}
        for micro in range(cfg.grad_accum):
            batch = self.train_set.batch(self.stream.next()).to(self.device)
            t, weights = self.timestep_draw.draw(batch.input_ids.shape[0], generator=self.gen_cpu)
            sync = micro == cfg.grad_accum - 1 or self.dist.world_size == 1
            try:
                with (contextlib.nullcontext() if sync else self.objective.no_sync()), self._autocast():
                    terms = self.objective(batch.input_ids, batch.target_mask, t.to(self.device),
                                           weights.to(self.device), self.gen_dev)
            except RuntimeError as e:
                if not is_non_finite_error(e):
                    raise
                raise Diverged(f"step {number}: the forward pass failed on non-finite values ({e})") from None
            (terms.loss / cfg.grad_accum).backward()
            self._update_timestep_draw(t, terms.per_example)
            for key in sums:
                value = terms.loss if key == "loss" else getattr(terms, key)
                sums[key] += float(value.detach().float().mean()) / cfg.grad_accum
        if not math.isfinite(sums["loss"]):
            raise Diverged(f"step {number}: the loss is {sums['loss']}; lower the learning rate or turn on "
                           "gradient clipping")
        max_norm = cfg.clip_grad if cfg.clip_grad > 0 else float("inf")
        grad_norm = float(nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        if not math.isfinite(grad_norm):
            raise Diverged(f"step {number}: the gradient norm is {grad_norm}")
        self.optimizer.step()
        self.lr_schedule.step()
        if not weights_finite(self.model):
            raise Diverged(f"step {number}: the update made the weights non-finite; lower the learning rate")
        self._update_ema()
        self.step += 1
        self._rng_after_step = self._rng_state()
        self._in_step = False
        return {**sums, "grad_norm": grad_norm, "lr": self.optimizer.param_groups[0]["lr"]}

    def _update_timestep_draw(self, t: Tensor, losses: Tensor) -> None:
        losses = losses.detach().float()
        if self.dist.world_size > 1:  # every rank keeps the same loss history
            t_all = [torch.empty_like(t) for _ in range(self.dist.world_size)]
            l_all = [torch.empty_like(losses) for _ in range(self.dist.world_size)]
            dist.all_gather(t_all, t.to(losses.device))
            dist.all_gather(l_all, losses)
            t, losses = torch.cat(t_all).cpu(), torch.cat(l_all)
        self.timestep_draw.update(t.cpu(), losses.cpu())

    @torch.no_grad()
    def _update_ema(self) -> None:
        decay = min(self.cfg.ema_decay, (1 + self.step) / (10 + self.step))
        ema_params = list(self.ema.parameters())
        torch._foreach_lerp_(ema_params, [p.detach() for p in self.model.parameters()], 1.0 - decay)
        for b_ema, b in zip(self.ema.buffers(), self.model.buffers()):
            b_ema.copy_(b)

    # ------------------------------------------------------------------------------ validation
    def validation_loss(self) -> Optional[float]:
        """Mean loss of the current weights on the first ``eval_batches`` validation batches
        (``moediffuseq.validation.validation_loss``)."""
        if self.valid_set is None or self.cfg.eval_batches == 0:
            return None
        return validation_loss(self.model, self.schedule, self.valid_set, self.cfg.batch_size, self.cfg.eval_batches,
                               self.device, self._autocast())

    def validation_bleu(self) -> Optional[float]:
        """Sentence BLEU of the EMA model on ``bleu_examples`` validation sources
        (``moediffuseq.validation.validation_bleu``)."""
        if self.valid_set is None or self.cfg.bleu_examples <= 0:
            return None
        return validation_bleu(self.ema, self.tokenizer, self.valid_set, self.cfg.bleu_examples, self.cfg.batch_size,
                               self.cfg.bf16, self.target_len())

    def target_len(self) -> int:
        """The generation-time target budget: the median training target length, so that sources
        are truncated at generation as they typically were in training (with a bounded target
        span it decides only the global target positions, and at most fills the span)."""
        median = self.train_set.target_length_quantile(0.5)
        span = self.model.config.target_span
        return max(1, median if span is None else min(median, span - 1))

    # ------------------------------------------------------------------------------------ loop
    def fit(self, resume: bool = False, allow_change: bool = False) -> Path:
        """Trains to ``cfg.steps``; returns the directory of the final (EMA) model.

        The order at every step boundary is: log, checkpoint (every ``save_every`` steps),
        validation (every ``eval_every``), and at the end: checkpoint, validation, export. On
        Ctrl-C or SIGTERM the checkpoint of the last completed step is written (a Ctrl-C during a step or a
        checkpoint write takes effect when it is complete), so ``resume`` continues exactly, also
        from an interruption in the final validation or export: a validation missing from
        metrics.csv at the resumed step is run again."""
        cfg = self.cfg
        start_step = self.resume(allow_change) if resume else 0
        if self.dist.is_main:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            self.log = RunLog(self.out_dir, resume_step=start_step if resume else None)
        bar = progress_bar(cfg.steps, "train", "step", enabled=cfg.progress and self.dist.is_main, initial=start_step)
        plain = PlainProgress(cfg.steps, start_step, enabled=not cfg.progress and self.dist.is_main)
        tokens_per_step = cfg.batch_size * cfg.grad_accum * self.dist.world_size * self.model.config.max_len
        begin = last = time.perf_counter()
        last_step = self.step
        with self._interrupts:
            try:
                if resume and self._validation_due(self.step):
                    self._evaluate(0.0)
                while self.step < cfg.steps:
                    with self._interrupts.held():  # the step and its metrics row
                        metrics = self.train_step()
                        if self.step % cfg.log_every == 0 or self.step == cfg.steps:
                            now = time.perf_counter()
                            rate = tokens_per_step * (self.step - last_step) / max(now - last, 1e-9)
                            last, last_step = now, self.step
                            if self.log:
                                self.log.log(self.step, "train", tokens_per_s=rate, elapsed_s=now - begin, **metrics)
                            bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{rate:,.0f}", refresh=False)
                            plain.update(self.step, metrics["loss"], rate)
                        bar.update(1)
                    if cfg.save_every and self.step % cfg.save_every == 0 and self.step < cfg.steps:
                        self.save()
                    if self.step < cfg.steps and self._validation_due(self.step):
                        self._evaluate(time.perf_counter() - begin)
                bar.close()
                if self._saved_step != self.step:
                    self.save()
                if self._validation_due(self.step):
                    self._evaluate(time.perf_counter() - begin)
                return self._export()
            except KeyboardInterrupt as e:
                bar.close()
                if self.dist.is_main:
                    what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
                    print(f"\n{self._save_on_interrupt(what)}", flush=True)
                raise
            except Diverged as e:
                bar.close()
                raise Diverged(f"{e}. The run stopped; {self.last_good_checkpoint()}") from None

    def _save_on_interrupt(self, what: str = "interrupted") -> str:
        if self._in_step:
            return (f"{what} twice in the middle of step {self.step + 1}: no checkpoint written; "
                    f"{self.last_good_checkpoint()}; continue with --resume")
        if self._saved_step != self.step:
            try:
                self.save()
            except Diverged as e:
                return f"{what} at step {self.step}: {e}, not saved; {self.last_good_checkpoint()}"
        return f"{what} at step {self.step}: checkpoint saved to {self.out_dir / 'checkpoint'}; continue with --resume"

    def _validation_due(self, step: int) -> bool:
        """A validation belongs to ``step`` (every ``eval_every`` steps and the last) and is not in
        metrics.csv yet (main process; the others never validate)."""
        if not self.dist.is_main or self.log is None:
            return False
        if self.valid_set is None or (self.cfg.eval_batches == 0 and self.cfg.bleu_examples == 0):
            return False
        due = step == self.cfg.steps or (self.cfg.eval_every and step % self.cfg.eval_every == 0)
        return bool(due) and not self.log.has_row(step, "valid")

    def _evaluate(self, elapsed: float) -> None:
        loss = self.validation_loss()
        bleu = self.validation_bleu()
        if self.log and (loss is not None or bleu is not None):
            self.log.log(self.step, "valid", loss=loss, bleu=bleu, elapsed_s=elapsed)
            self.log.plot()
        if self.cfg.keep_best and (loss is not None or bleu is not None):
            self._keep_if_best(bleu if bleu is not None else -loss, "bleu" if bleu is not None else "-loss")
        self._set_rng_state(self._rng_after_step)  # validation leaves the training randomness as it was

    def _keep_if_best(self, value: float, metric: str) -> None:
        """Writes the EMA weights to OUT/best_model when ``value`` beats the best so far (kept in
        OUT/best_model/best.json, so a resumed run compares with it)."""
        directory = self.out_dir / BEST_DIR
        record = directory / "best.json"
        if record.is_file() and json.loads(read_text(record, "best-model record"))["value"] >= value:
            return

        def write(tmp: Path) -> None:
            self.ema.save_pretrained(tmp)
            (tmp / "best.json").write_text(json.dumps({"step": self.step, "metric": metric, "value": value}) + "\n")

        with self._interrupts.held():
            write_directory(directory, write)

    def _export(self) -> Path:
        """The final EMA model with its tokenizer and generation defaults, in ``out_dir/model``
        (written to a temporary directory and renamed into place)."""
        directory = self.out_dir / "model"
        if self.dist.is_main:
            best = self.out_dir / BEST_DIR
            weights = MoEDiffuSeq.from_pretrained(best) if self.cfg.keep_best and best.is_dir() else self.ema

            def write(tmp: Path) -> None:
                weights.save_pretrained(tmp)
                self.tokenizer.save(tmp)
                (tmp / GENERATION_FILE).write_text(json.dumps(generation_defaults(weights.config, self.target_len()))
                                                   + "\n")

            with self._interrupts.held():
                write_directory(directory, write)
            if self.log:
                self.log.plot()
                self.log.close()
        if self.dist.world_size > 1:
            dist.barrier()
        return directory
