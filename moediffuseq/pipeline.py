"""``MoEDiffuSeqPipeline``: a trained model, its tokenizer and its generation defaults in one
object; called with source texts, it returns the generated texts.

    pipe = MoEDiffuSeqPipeline.from_pretrained("runs/pycode/model")
    pipe(["def add(a, b): return a + b"], steps=10, mbr=4, seed=0)   # -> ["Return the sum ..."]

It handles the device (``device="auto"``: the GPU when there is one), the dtype (bf16 autocast
on CUDA, fp32 on the CPU, unless ``dtype`` says otherwise) and batching; every call is
reproducible from its ``seed`` (the noise is drawn per batch, so outputs depend on
``batch_size`` too).
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from moediffuseq.data import TextTokenizer
from moediffuseq.diffusion.samplers import SamplerConfig
from moediffuseq.generate import (GENERATION_FILE, Generation, GenerationConfig, StepCallback, default_target_len,
                                  generate, generation_defaults)
from moediffuseq.hub import push_to_hub
from moediffuseq.hub_download import resolve_model_dir
from moediffuseq.model import MoEDiffuSeq


def resolve_device(device: Optional[str | torch.device]) -> torch.device:
    """``None`` or ``"auto"``: the current CUDA device when there is one, else the CPU."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class MoEDiffuSeqPipeline:
    """Source texts in, generated texts out (see the module docstring)."""

    def __init__(self, model: MoEDiffuSeq, tokenizer: TextTokenizer, target_len: Optional[int] = None) -> None:
        if len(tokenizer) != model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model {model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.target_len = target_len or default_target_len(None, model.config.max_len, model.config.target_span)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, device: Optional[str | torch.device] = "auto",
                        revision: Optional[str] = None) -> "MoEDiffuSeqPipeline":
        """Loads a model directory written by training or ``save_pretrained`` (or a Hugging Face
        Hub id "user/name" holding one): the weights, the tokenizer and the target length saved
        with them (``generation.json``)."""
        path = resolve_model_dir(path, revision)
        device = resolve_device(device)
        model = MoEDiffuSeq.from_pretrained(path, map_location=str(device)).to(device)
        return cls(model, TextTokenizer.load(path),
                   default_target_len(path, model.config.max_len, model.config.target_span))

    def save_pretrained(self, path: str | os.PathLike) -> Path:
        """The model, the tokenizer and ``generation.json``: a directory ``from_pretrained`` reads."""
        import json

        path = Path(path)
        self.model.save_pretrained(path)
        self.tokenizer.save(path)
        (path / GENERATION_FILE).write_text(json.dumps(generation_defaults(self.model.config, self.target_len))
                                            + "\n")
        return path

    def push_to_hub(self, repo_id: str, *, private: bool = False, token: Optional[str] = None) -> str:
        """Uploads this pipeline (``save_pretrained``'s directory and a generated model card) to
        the Hugging Face Hub; returns the repository's URL. Needs ``moediffuseq[hub]``."""
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            return push_to_hub(self.save_pretrained(Path(tmp) / "model"), repo_id, private=private, token=token)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "MoEDiffuSeqPipeline":
        self.model.to(resolve_device(device))
        return self

    def generate(self, sources: Sequence[str], cfg: GenerationConfig, progress: bool = False,
                 callback: Optional[StepCallback] = None, record_steps: bool = False) -> list[Generation]:
        """``generate`` with this pipeline's model, tokenizer and target length (unless
        ``cfg.target_len`` is set)."""
        return generate(self.model, self.tokenizer, sources, cfg, cfg.target_len or self.target_len, progress,
                        callback, record_steps)

    def __call__(self, sources: Union[str, Sequence[str]], *, sampler: str = SamplerConfig.method,
                 steps: int = SamplerConfig.steps, mbr: int = 1, target_len: Optional[int] = None, seed: int = 0,
                 batch_size: int = 16, clamp: bool = SamplerConfig.clamp,
                 early_stop: int = 0, dtype: Optional[str] = None, progress: bool = False,
                 callback: Optional[StepCallback] = None, return_candidates: bool = False,
                 return_steps: bool = False, source_cache: Optional[bool] = None) -> Union[str, list[str], Generation, list[Generation]]:
        """Generates for one source text or a list of them.

        Args:
            sampler, steps: ``ddpm`` (default, respaced to 10 steps), ``ddim``, ``dpm++``.
            mbr: samples per source; the output is their minimum-Bayes-risk choice.
            target_len: target token budget (default: the one saved by training).
            seed: the noise (with ``batch_size``: sources sampled together share a draw).
            clamp, early_stop: round x0 to the nearest embedding; stop when the tokens are
                unchanged this many steps.
            dtype: "fp32", "bf16" or "fp16" autocast (default: bf16 on CUDA, fp32 on the CPU).
            progress: a progress bar over the sources.
            callback: ``callback(step, t, texts)`` after every model call of each batch's first
                sample: the texts read from the current prediction, one per source of the batch.
            return_candidates, return_steps: return ``Generation`` objects (hypothesis, the MBR
                candidates, the first sample's text after every step) instead of texts.
            source_cache: run the source through the model once per batch and only the target
                span at every step (default: on for models with source isolation and a bounded
                span, the only ones it applies to; the text is the same either way).
        Returns:
            the generated text(s), one per source; a single text for a single string.
        """
        single = isinstance(sources, str)
        cfg = GenerationConfig(SamplerConfig(sampler, steps, clamp, early_stop), mbr, batch_size, target_len, seed,
                               dtype, source_cache)
        outputs = self.generate([sources] if single else list(sources), cfg, progress, callback, return_steps)
        results = outputs if return_candidates or return_steps else [o.hypothesis for o in outputs]
        return results[0] if single else results
