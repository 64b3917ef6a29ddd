"""Generation: sources in, text out, with any sampler of ``moediffuseq.diffusion.samplers``
(default DDPM respaced to 10 steps) and optional minimum-Bayes-risk selection over S samples.
``moediffuseq.pipeline.MoEDiffuSeqPipeline`` wraps ``generate`` with a model directory's
defaults; ``moediffuseq.generate_files`` is the CLI's files in, files out.

The source is packed as in training (``moediffuseq.data.packing``: DiffuSeq's layout generates
every position after the source's [SEP], a bounded target span its last T positions), and the
output is the argmax of lm_head(x0_hat) up to the first [SEP], padding removed (METHOD §6).

A model with source isolation and a bounded span samples with a source cache by default: the
source goes through the model once per batch (shared by the MBR samples) and every step runs
only the span's rows (``GenerationConfig.source_cache``).
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch

from moediffuseq.data import TextTokenizer, pack_source
from moediffuseq.data.packing import source_budget
from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SamplerConfig, mbr_select, sample
from moediffuseq.evaluate import sentence_bleu
from moediffuseq.limits import read_text
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.run_log import progress_bar

GENERATION_FILE = "generation.json"  # defaults saved by training next to the model (target_len)

StepCallback = Callable[[int, int, list[str]], None]  # (model call, step t, texts of the batch)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# every name a dtype argument takes: the short names above, torch's names and aliases
DTYPE_NAMES = {**DTYPES, "float32": torch.float32, "float": torch.float32, "bfloat16": torch.bfloat16,
               "float16": torch.float16, "half": torch.float16}
CPU_DTYPES = (torch.float32, torch.bfloat16)  # what the CPU kernels take


def parse_dtype(value: str | torch.dtype | None) -> Optional[torch.dtype]:
    """A dtype argument as a torch dtype: ``torch.bfloat16``, ``"bfloat16"``, ``"torch.bfloat16"`` or
    ``"bf16"`` (likewise float32 / fp32 / float and float16 / fp16 / half); None stays None."""
    if value is None or isinstance(value, torch.dtype) and value in DTYPES.values():
        return value
    name = value.lower().removeprefix("torch.") if isinstance(value, str) else None
    if name not in DTYPE_NAMES:
        raise ValueError(f"dtype must be one of float32, bfloat16 or float16 (a torch dtype or its name: "
                         f"{', '.join(DTYPE_NAMES)}), got {value!r}")
    return DTYPE_NAMES[name]


def generation_dtype(device: torch.device, requested: str | torch.dtype | None) -> torch.dtype:
    """The compute dtype of generation: ``requested`` (see ``parse_dtype``), else bf16 on CUDA
    (the CUDA attention kernels run in bf16/fp16 only) and fp32 on the CPU. float16 on the CPU,
    which its kernels do not take, is refused."""
    dtype = parse_dtype(requested)
    if dtype is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if device.type == "cpu" and dtype not in CPU_DTYPES:
        raise ValueError(f"dtype {str(dtype).removeprefix('torch.')} is not supported on the CPU, whose kernels "
                         "take float32 and bfloat16: use bf16 or fp32 there (float16 runs on CUDA)")
    return dtype


@dataclass
class GenerationConfig:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    mbr: int = 1                       # S samples per source; the MBR choice is the output
    batch_size: int = 16
    target_len: Optional[int] = None   # target budget for source truncation (default: saved by training)
    seed: int = 0
    dtype: str | torch.dtype | None = None  # autocast dtype (parse_dtype); default bf16 on CUDA, fp32 on CPU
    source_cache: Optional[bool] = None  # encode the source once per batch; None: on for the models that allow it

    def __post_init__(self) -> None:
        parse_dtype(self.dtype)
        if self.mbr < 1:
            raise ValueError(f"mbr must be >= 1, got {self.mbr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")
        if self.source_cache not in (None, True, False):
            raise ValueError(f"source_cache must be True, False or None, got {self.source_cache!r}")


def uses_source_cache(model: MoEDiffuSeq, requested: Optional[bool]) -> bool:
    """Whether generation runs with a source cache: ``requested``, or by default whenever the model
    allows one (source isolation and a bounded target span); asking for one that it does not
    allow is an error saying why."""
    cfg = model.config
    allowed = cfg.source_isolation and cfg.target_span is not None
    if requested and not allowed:
        raise ValueError("source_cache needs a model trained with source_isolation and a target_span (its source "
                         f"states must not depend on the target); this one has source_isolation="
                         f"{cfg.source_isolation}, target_span={cfg.target_span}")
    return allowed if requested is None else requested


@dataclass
class Generation:
    hypothesis: str
    candidates: list[str]
    steps: list[str] = field(default_factory=list)  # the first sample's text after every model call


def generation_defaults(config, target_len: int) -> dict:
    """What ``generation.json`` records beside a model: the target budget, the span layout and
    whether the model samples with a source cache by default."""
    return {"target_len": target_len, "target_span": config.target_span,
            "source_cache": bool(config.source_isolation and config.target_span is not None)}


def default_target_len(model_dir: str | os.PathLike | None, seq_len: int, span: Optional[int] = None) -> int:
    """The target budget saved by training in ``generation.json``, else a quarter of L (at most
    ``span - 1`` with a bounded target span)."""
    if model_dir is not None:
        path = Path(model_dir) / GENERATION_FILE
        if path.is_file():
            try:
                value = json.loads(read_text(path, "generation defaults file"))["target_len"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: expected a JSON object with an integer 'target_len' "
                                 f"({type(e).__name__}: {e})") from None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{path}: target_len must be an integer >= 1, got {value!r}")
            return value
    return max(1, seq_len // 4 if span is None else min(seq_len // 4, span - 1))


def _decode(ids: Sequence[int], tokenizer: TextTokenizer) -> str:
    sp = tokenizer.special
    ids = list(ids)
    if sp.sep in ids:
        ids = ids[:ids.index(sp.sep)]
    return tokenizer.decode([i for i in ids if i not in (sp.pad, sp.cls)])


@torch.inference_mode()
def generate(model: MoEDiffuSeq, tokenizer: TextTokenizer, sources: Sequence[str], cfg: GenerationConfig,
             target_len: int, progress: bool = False, callback: Optional[StepCallback] = None,
             record_steps: bool = False, generator: Optional[torch.Generator] = None) -> list[Generation]:
    """Generates one output per source (the MBR choice of ``cfg.mbr`` samples). The model runs
    under autocast in ``generation_dtype(device, cfg.dtype)``; the sampler state stays fp32.

    ``callback(call, t, texts)`` is called after every model call of each batch's first sample
    with the texts read from the current x0 prediction (one per source of the batch);
    ``record_steps`` keeps them in ``Generation.steps``. Neither changes the outputs. The noise is
    drawn from ``generator`` (on the model's device) when given, else from one seeded with
    ``cfg.seed``.

    A source longer than a bounded target span leaves room for is truncated, with one warning
    per call. ``cfg.source_cache`` (default: whenever the model allows it) gives the same text
    as sampling the whole sequence, at a cost that follows the span."""
    model.eval()
    device = next(model.parameters()).device
    dtype = generation_dtype(device, cfg.dtype)
    L, span = model.config.max_len, model.config.target_span
    cached = uses_source_cache(model, cfg.source_cache)
    schedule = NoiseSchedule.create(model.config.schedule, model.config.diffusion_steps)
    if generator is None:
        generator = torch.Generator(device=device).manual_seed(cfg.seed)
    elif not isinstance(generator, torch.Generator) or generator.device.type != device.type:
        raise ValueError(f"generator must be a torch.Generator on the model's device ({device.type}), got "
                         f"{generator.device if isinstance(generator, torch.Generator) else type(generator).__name__}")
    encoded = tokenizer.encode_batch(list(sources), max_tokens=L - 2)  # more never fits
    rows = [pack_source(s, L, target_len, tokenizer.special, span) for s in encoded]
    if span is not None and (cut := sum(len(s) > source_budget(L, span) for s in encoded)):
        warnings.warn(f"{cut} of {len(encoded)} source(s) longer than max_len - target_span - 2 = "
                      f"{source_budget(L, span)} tokens were truncated (the model's max_len {L}, target_span "
                      f"{span})", stacklevel=3)  # the caller of generate, past inference_mode's wrapper
    out: list[Generation] = []
    bar = progress_bar(len(rows), "generate", "seq", enabled=progress)
    for begin in range(0, len(rows), cfg.batch_size):
        chunk = rows[begin:begin + cfg.batch_size]
        ids = torch.tensor([r[0] for r in chunk], dtype=torch.long, device=device)  # (B, L)
        starts = torch.tensor([r[1] for r in chunk], device=device)
        target_mask = torch.arange(L, device=device)[None] >= starts[:, None]  # (B, L)
        budget = torch.full((len(chunk),), target_len, device=device)  # |y| of the global target positions
        cond = model.condition(ids, target_mask, dtype, budget, source_cache=cached)

        def texts_of(x0: torch.Tensor) -> list[str]:
            tokens = model.logits(x0).argmax(-1).tolist()  # (B, L), or (B, T) for the span alone
            first = L - x0.shape[1]  # the position of x0's first row
            return [_decode(tok[start - first:], tokenizer) for tok, start in zip(tokens, starts.tolist())]

        steps: list[list[str]] = []  # per model call, B texts

        def on_step(call: int, t: int, x0: torch.Tensor) -> None:
            texts = texts_of(x0)
            steps.append(texts)
            if callback is not None:
                callback(call, t, texts)

        watch = on_step if callback is not None or record_steps else None
        samples = [texts_of(sample(cond, schedule, cfg.sampler, generator=generator,
                                   callback=watch if s == 0 else None).x0)
                   for s in range(cfg.mbr)]  # S lists of B texts
        for b in range(len(chunk)):
            cands = [s[b] for s in samples]
            best = mbr_select([c.split() for c in cands], sentence_bleu) if len(cands) > 1 else 0
            out.append(Generation(cands[best], cands, [texts[b] for texts in steps] if record_steps else []))
        bar.update(len(chunk))
    bar.close()
    return out
