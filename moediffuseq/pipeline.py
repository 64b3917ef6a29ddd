"""``MoEDiffuSeqPipeline``: a trained model, its tokenizer and its generation defaults in one
object; called with source texts, it returns the generated texts.

    pipe = MoEDiffuSeqPipeline.from_pretrained("runs/pycode/model")
    pipe(["def add(a, b): return a + b"], num_inference_steps=10, mbr=4, generator=0)   # -> ["Return the sum ..."]

It handles the device (``device="auto"``: the GPU when there is one), the dtype (bf16 autocast
on CUDA, fp32 on the CPU, unless ``dtype`` says otherwise) and batching. The arguments are
named as diffusers' pipelines name them where they mean the same thing (``num_inference_steps``,
``generator``); every call is reproducible from its ``generator`` (a seed or a
``torch.Generator``; the noise is drawn per batch, so outputs depend on ``batch_size`` too).

With ``huggingface_hub`` installed (``moediffuseq[hub]``) the pipeline is one of its
``ModelHubMixin`` classes: ``save_pretrained`` also writes a model card, ``push_to_hub`` uploads
``save_pretrained``'s directory, and ``from_pretrained`` reads a local directory or a Hub id.
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from typing import Optional, Sequence, Union

import torch

from moediffuseq.data import TextTokenizer
from moediffuseq.diffusion.samplers import SamplerConfig
from moediffuseq.extras import optional_dependencies
from moediffuseq.generate import (GENERATION_FILE, Generation, GenerationConfig, StepCallback, default_target_len,
                                  generate, generation_defaults)
from moediffuseq.hub import HubMixin, model_card
from moediffuseq.hub_download import resolve_model_dir
from moediffuseq.model import MoEDiffuSeq, check_device


class EmptyOutputWarning(UserWarning):
    """Every generated text is empty: the model ends the text ([SEP]) at once."""


def resolve_device(device: Optional[str | torch.device]) -> torch.device:
    """``None`` or ``"auto"``: the current CUDA device when there is one, else the CPU; a CUDA
    device on a machine without one is refused (``check_device``)."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return check_device(device)


def why_empty(model_dir: Optional[str | os.PathLike]) -> str:
    """Why a model generates nothing and what to do, from its training run when the model
    directory is a run's ``OUT/model`` (its ``run_config.json`` is beside it)."""
    train = {}
    if model_dir is not None and (Path(model_dir).parent / "run_config.json").is_file():
        try:
            train = json.loads((Path(model_dir).parent / "run_config.json").read_text()).get("train", {}) or {}
        except (ValueError, AttributeError):
            train = {}
    steps, warmup, lr = train.get("steps"), train.get("warmup_steps"), train.get("lr")
    if isinstance(steps, int) and isinstance(warmup, int) and warmup >= steps:
        return (f"it was trained for {steps} steps with a {warmup}-step warm-up, so its learning rate never "
                f"reached {lr}: train longer than the warm-up, or with a shorter --warmup-steps")
    if isinstance(steps, int):
        return (f"it was trained for only {steps} steps and ends every text at once: train it longer (--steps) and "
                "check that the loss in metrics.csv went down")
    return ("the model ends every text at once, as an untrained or undertrained model does: train it longer, "
            "or check its training loss")


class MoEDiffuSeqPipeline(HubMixin, library_name="moediffuseq",
                          tags=["diffusion", "text-generation", "mixture-of-experts", "seq2seq"]):
    """Source texts in, generated texts out (see the module docstring)."""

    def __init__(self, model: MoEDiffuSeq, tokenizer: TextTokenizer, target_len: Optional[int] = None) -> None:
        if len(tokenizer) != model.config.vocab_size:
            raise ValueError(f"the tokenizer has {len(tokenizer)} tokens but the model {model.config.vocab_size}")
        self.model, self.tokenizer = model, tokenizer
        self.target_len = target_len or default_target_len(None, model.config.max_len, model.config.target_span)
        self.model_dir: Optional[Path] = None  # the directory it was loaded from, if any

    @classmethod
    @optional_dependencies()
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *,
                        device: Optional[str | torch.device] = "auto", revision: Optional[str] = None,
                        **hub_kwargs) -> "MoEDiffuSeqPipeline":
        """Loads a model directory written by training or ``save_pretrained`` (or a Hugging Face
        Hub id "user/name" holding one, at ``revision``): the weights, the tokenizer and the
        target length saved with them (``generation.json``). A local directory never touches the
        network."""
        path = resolve_model_dir(pretrained_model_name_or_path, revision, **hub_kwargs)
        device = resolve_device(device)
        model = MoEDiffuSeq.from_pretrained(path, map_location=str(device)).to(device)
        pipe = cls(model, TextTokenizer.load(path),
                   default_target_len(path, model.config.max_len, model.config.target_span))
        pipe.model_dir = Path(path)
        return pipe

    @classmethod
    def _from_pretrained(cls, *, model_id: str, revision: Optional[str] = None, **kwargs) -> "MoEDiffuSeqPipeline":
        """The Hub mixin's loading hook: ``from_pretrained``."""
        hub = {k: kwargs.pop(k) for k in ("cache_dir", "force_download", "local_files_only", "token") if k in kwargs}
        kwargs.pop("config", None)
        return cls.from_pretrained(model_id, revision=revision, **hub, **kwargs)

    def _save_pretrained(self, save_directory: Path) -> None:
        """The model, the tokenizer and ``generation.json``: a directory ``from_pretrained`` reads."""
        save_directory = Path(save_directory)
        self.model.save_pretrained(save_directory)
        self.tokenizer.save(save_directory)
        (save_directory / GENERATION_FILE).write_text(
            json.dumps(generation_defaults(self.model.config, self.target_len)) + "\n")

    def generate_model_card(self, *args, repo_id: Optional[str] = None, **kwargs):
        """The model card ``save_pretrained`` writes (README.md): the config, the generation
        defaults and, for a model written by training, the run's data and steps."""
        from huggingface_hub import ModelCard

        return ModelCard(model_card(self.model.config, repo_id,
                                    self.model_dir.parent / "run_config.json" if self.model_dir else None))

    @optional_dependencies()
    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        """Uploads ``save_pretrained``'s directory and the model card to the Hugging Face Hub
        (``huggingface_hub.ModelHubMixin.push_to_hub``: ``private``, ``token``, ``branch``,
        ``create_pr``, ...); returns the commit's URL. Needs ``moediffuseq[hub]``."""
        card = {**(kwargs.pop("model_card_kwargs", None) or {}), "repo_id": repo_id}
        return super().push_to_hub(repo_id, model_card_kwargs=card, **kwargs)

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    def to(self, device: str | torch.device) -> "MoEDiffuSeqPipeline":
        self.model.to(resolve_device(device))
        return self

    @optional_dependencies()
    def generate(self, sources: Sequence[str], cfg: GenerationConfig, progress: bool = False,
                 callback: Optional[StepCallback] = None, record_steps: bool = False,
                 generator: Optional[torch.Generator] = None) -> list[Generation]:
        """``generate`` with this pipeline's model, tokenizer and target length (unless
        ``cfg.target_len`` is set). When every output is empty, an ``EmptyOutputWarning`` says why
        and what to do."""
        outputs = generate(self.model, self.tokenizer, sources, cfg, cfg.target_len or self.target_len, progress,
                           callback, record_steps, generator)
        if outputs and not any(o.hypothesis for o in outputs):
            warnings.warn(EmptyOutputWarning(f"all {len(outputs)} generated texts are empty: "
                                             f"{why_empty(self.model_dir)}"), stacklevel=2)
        return outputs

    def __call__(self, sources: Union[str, Sequence[str]], *, sampler: str = SamplerConfig.method,
                 num_inference_steps: Optional[int] = None, mbr: int = 1, target_len: Optional[int] = None,
                 generator: Union[int, torch.Generator, None] = None, batch_size: int = 16,
                 clamp: bool = SamplerConfig.clamp, early_stop: int = 0, dtype: Union[str, torch.dtype, None] = None,
                 progress: bool = False, callback: Optional[StepCallback] = None, return_candidates: bool = False,
                 return_steps: bool = False, source_cache: Optional[bool] = None, steps: Optional[int] = None,
                 seed: Optional[int] = None) -> Union[str, list[str], Generation, list[Generation]]:
        """Generates for one source text or a list of them.

        Args:
            sampler, num_inference_steps: ``ddpm`` (default, respaced to 10 steps), ``ddim``, ``dpm++``.
            mbr: samples per source; the output is their minimum-Bayes-risk choice.
            target_len: target token budget (default: the one saved by training).
            generator: the noise: a seed (default 0) or a ``torch.Generator`` on the model's
                device (sources sampled together, ``batch_size`` of them, share a draw).
            clamp, early_stop: round x0 to the nearest embedding; stop when the tokens are
                unchanged this many steps.
            dtype: the autocast dtype, a torch dtype or its name (``torch.bfloat16``,
                "bfloat16", "bf16", ...; default: bf16 on CUDA, fp32 on the CPU).
            progress: a progress bar over the sources.
            callback: ``callback(step, t, texts)`` after every model call of each batch's first
                sample: the texts read from the current prediction, one per source of the batch.
            return_candidates, return_steps: return ``Generation`` objects (hypothesis, the MBR
                candidates, the first sample's text after every step) instead of texts.
            source_cache: run the source through the model once per batch and only the target
                span at every step (default: on for models with source isolation and a bounded
                span, the only ones it applies to; the text is the same either way).
            steps, seed: earlier names of ``num_inference_steps`` and of an integer ``generator``.
        Returns:
            the generated text(s), one per source; a single text for a single string.
        """
        num_inference_steps = _one_of("num_inference_steps", num_inference_steps, "steps", steps, SamplerConfig.steps)
        generator = _one_of("generator", generator, "seed", seed, 0)
        seed_value = generator if not isinstance(generator, torch.Generator) else 0
        if isinstance(seed_value, bool) or not isinstance(seed_value, int):
            raise TypeError(f"generator must be an int seed or a torch.Generator, got {type(generator).__name__}")
        single = isinstance(sources, str)
        cfg = GenerationConfig(SamplerConfig(sampler, num_inference_steps, clamp, early_stop), mbr, batch_size,
                               target_len, seed_value, dtype, source_cache)
        outputs = self.generate([sources] if single else list(sources), cfg, progress, callback, return_steps,
                                generator if isinstance(generator, torch.Generator) else None)
        results = outputs if return_candidates or return_steps else [o.hypothesis for o in outputs]
        return results[0] if single else results


def _one_of(name: str, value, alias: str, alias_value, default):
    """An argument given by its name or by its earlier name (not both), else its default."""
    if value is not None and alias_value is not None:
        raise TypeError(f"give {name} or {alias} (its earlier name), not both")
    return value if value is not None else alias_value if alias_value is not None else default
