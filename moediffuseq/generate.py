"""Generation: sources in, text out, with any sampler of ``moediffuseq.diffusion.samplers``
(default DPM-Solver++ with 10 steps) and optional minimum-Bayes-risk selection over S samples.

The source is packed as in training, every position after its [SEP] is generated, and the
output is the argmax of lm_head(x0_hat) up to the first [SEP], padding removed (METHOD §6).
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional, Sequence

import torch

from moediffuseq.data import TextTokenizer, pack_source, read_jsonl
from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SamplerConfig, mbr_select, sample
from moediffuseq.evaluate import sentence_bleu
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.run_log import progress_bar

GENERATION_FILE = "generation.json"  # defaults saved by training next to the model (target_len)


DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def generation_dtype(device: torch.device, requested: Optional[str]) -> torch.dtype:
    """The compute dtype of generation: ``requested`` ("fp32", "bf16", "fp16"), else bf16 on CUDA
    (the CUDA attention kernels run in bf16/fp16 only) and fp32 on the CPU."""
    if requested is None:
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if requested not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {requested!r}")
    return DTYPES[requested]


@dataclass
class GenerationConfig:
    sampler: SamplerConfig = field(default_factory=SamplerConfig)
    mbr: int = 1                       # S samples per source; the MBR choice is the output
    batch_size: int = 16
    target_len: Optional[int] = None   # target budget for source truncation (default: saved by training)
    seed: int = 0
    dtype: Optional[str] = None        # "fp32", "bf16" or "fp16" autocast; default bf16 on CUDA, fp32 on CPU

    def __post_init__(self) -> None:
        if self.dtype is not None and self.dtype not in DTYPES:
            raise ValueError(f"dtype must be one of {sorted(DTYPES)}, got {self.dtype!r}")
        if self.mbr < 1:
            raise ValueError(f"mbr must be >= 1, got {self.mbr}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")


@dataclass
class Generation:
    hypothesis: str
    candidates: list[str]


def default_target_len(model_dir: str | os.PathLike | None, seq_len: int) -> int:
    """The target budget saved by training in ``generation.json``, else a quarter of L."""
    if model_dir is not None:
        path = Path(model_dir) / GENERATION_FILE
        if path.is_file():
            try:
                value = json.loads(path.read_text(encoding="utf-8"))["target_len"]
            except (ValueError, KeyError, TypeError) as e:
                raise ValueError(f"{path}: expected a JSON object with an integer 'target_len' "
                                 f"({type(e).__name__}: {e})") from None
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{path}: target_len must be an integer >= 1, got {value!r}")
            return value
    return max(1, seq_len // 4)


def _decode(ids: Sequence[int], tokenizer: TextTokenizer) -> str:
    sp = tokenizer.special
    ids = list(ids)
    if sp.sep in ids:
        ids = ids[:ids.index(sp.sep)]
    return tokenizer.decode([i for i in ids if i not in (sp.pad, sp.cls)])


@torch.inference_mode()
def generate(model: MoEDiffuSeq, tokenizer: TextTokenizer, sources: Sequence[str], cfg: GenerationConfig,
             target_len: int, progress: bool = False) -> list[Generation]:
    """Generates one output per source (the MBR choice of ``cfg.mbr`` samples). The model runs
    under autocast in ``generation_dtype(device, cfg.dtype)``; the sampler state stays fp32."""
    model.eval()
    device = next(model.parameters()).device
    dtype = generation_dtype(device, cfg.dtype)
    autocast = torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32)
    L = model.config.max_len
    schedule = NoiseSchedule.create(model.config.schedule, model.config.diffusion_steps)
    generator = torch.Generator(device=device).manual_seed(cfg.seed)
    rows = [pack_source(s, L, target_len, tokenizer.special)
            for s in tokenizer.encode_batch(list(sources), max_tokens=L - 2)]  # more never fits
    out: list[Generation] = []
    bar = progress_bar(len(rows), "generate", "seq", enabled=progress)
    for begin in range(0, len(rows), cfg.batch_size):
        chunk = rows[begin:begin + cfg.batch_size]
        ids = torch.tensor([r[0] for r in chunk], dtype=torch.long, device=device)  # (B, L)
        starts = torch.tensor([r[1] for r in chunk], device=device)
        target_mask = torch.arange(L, device=device)[None] >= starts[:, None]  # (B, L)
        global_mask = model.global_mask(ids, target_mask)
        anchor = model.embed(ids)  # (B, L, d)

        def denoiser(x, t):
            with autocast:
                return model.denoise(x, t, global_mask)[0]

        samples = []  # S lists of B token lists
        for _ in range(cfg.mbr):
            result = sample(denoiser, schedule, anchor, target_mask, model.m, cfg.sampler, generator=generator,
                            embedding=model.word_embedding.weight, logits_fn=model.logits)
            tokens = model.logits(result.x0).argmax(-1).tolist()  # (B, L)
            samples.append([_decode(tok[start:], tokenizer) for tok, start in zip(tokens, starts.tolist())])
        for b in range(len(chunk)):
            cands = [s[b] for s in samples]
            best = mbr_select([c.split() for c in cands], sentence_bleu) if len(cands) > 1 else 0
            out.append(Generation(cands[best], cands))
        bar.update(len(chunk))
    bar.close()
    return out


def generate_file(model_dir: str | os.PathLike, input_path: str | os.PathLike, output_path: str | os.PathLike,
                  cfg: GenerationConfig, device: str = "cpu", limit: Optional[int] = None,
                  skip_bad_lines: bool = False, progress: bool = True) -> int:
    """Reads a DiffuSeq jsonl file, writes one {source, reference, hypothesis, candidates} line
    per example; returns the number written."""
    output_path = Path(output_path)
    if not Path(input_path).is_file():
        raise FileNotFoundError(f"input file not found: {input_path}")
    if output_path.is_dir():
        raise ValueError(f"output {output_path} is a directory, not a file")
    if output_path.exists() and Path(input_path).exists() and os.path.samefile(output_path, input_path):
        raise ValueError(f"output {output_path} is the input file: it would be overwritten")
    model = MoEDiffuSeq.from_pretrained(model_dir, map_location=device).to(device)
    tokenizer = TextTokenizer.load(model_dir)
    if tokenizer.vocab_size != model.config.vocab_size:
        raise ValueError(f"{model_dir}: tokenizer has {tokenizer.vocab_size} tokens but the model "
                         f"{model.config.vocab_size}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    examples = read_jsonl(input_path, "skip" if skip_bad_lines else "raise").examples[:limit]
    target_len = cfg.target_len or default_target_len(model_dir, model.config.max_len)
    results = generate(model, tokenizer, [e.src for e in examples], cfg, target_len, progress=progress)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for ex, res in zip(examples, results):
                f.write(json.dumps({"source": ex.src, "reference": ex.trg, "hypothesis": res.hypothesis,
                                    "candidates": res.candidates}, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(results)

