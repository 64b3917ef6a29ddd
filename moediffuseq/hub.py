"""Model directories on the Hugging Face Hub: a hub id ("user/name") is downloaded once into the
Hub's cache and then read like any local directory (``resolve_model_dir``, in
``moediffuseq.hub_download``, which the model's loader uses). ``HubMixin`` is
``huggingface_hub.ModelHubMixin``, the base of ``MoEDiffuSeqPipeline`` (its ``save_pretrained``,
``push_to_hub`` and model card), or without that package a stand-in whose ``push_to_hub`` names
the extra to install; ``push_to_hub`` uploads a model directory as it is, with a generated model
card. Local directories never touch the network, and the ``huggingface_hub`` package (the "hub"
extra) is needed only for hub ids and uploads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from moediffuseq.hub_download import resolve_model_dir
from moediffuseq.model import MoEDiffuSeqConfig

__all__ = ["MODEL_CARD", "HubMixin", "model_card", "push_to_hub", "resolve_model_dir"]

MODEL_CARD = "README.md"


class HubMixinWithoutHub:
    """What ``ModelHubMixin`` gives a class when ``huggingface_hub`` is not installed:
    ``save_pretrained`` (without a model card) and a ``push_to_hub`` that names the extra."""

    def __init_subclass__(cls, **mixin_options) -> None:  # library_name, tags: used by the real mixin only
        super().__init_subclass__()

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs) -> None:
        save_directory = Path(save_directory)
        save_directory.mkdir(parents=True, exist_ok=True)
        self._save_pretrained(save_directory)

    def push_to_hub(self, repo_id: str, **kwargs) -> str:
        raise ModuleNotFoundError("No module named 'huggingface_hub'", name="huggingface_hub")


try:
    from huggingface_hub import ModelHubMixin as HubMixin
except ImportError:  # the "hub" extra is not installed
    HubMixin = HubMixinWithoutHub


def model_card(source: str | os.PathLike | MoEDiffuSeqConfig, repo_id: Optional[str],
               run_config: Optional[str | os.PathLike] = None) -> str:
    """A model card from a model directory (or a config): the config and, for a model written by
    training, the run's data and steps (from ``run_config``, by default the ``run_config.json``
    beside the directory). Without a ``repo_id`` (a local save) it names no repository."""
    from moediffuseq import __version__

    if isinstance(source, MoEDiffuSeqConfig):
        config = source
    else:
        config = MoEDiffuSeqConfig.load(source)
        run_config = Path(source).parent / "run_config.json" if run_config is None else run_config
    lines = ["---", "library_name: moediffuseq", "tags: [diffusion, text-generation, mixture-of-experts, seq2seq]",
             "---", "", f"# {repo_id or 'MoE-DiffuSeq model'}", "",
             "A MoE-DiffuSeq model (sequence-to-sequence text diffusion with block-sparse attention and a "
             f"mixture-of-experts feed-forward), saved by moediffuseq {__version__}.", "",
             "| field | value |", "| --- | --- |"]
    for name in ("max_len", "d_model", "n_layers", "n_heads", "attention", "window", "ffn", "num_experts", "top_k",
                 "d_expert", "soft_absorbing", "target_span", "source_isolation", "schedule", "diffusion_steps",
                 "vocab_size"):
        lines.append(f"| {name} | {getattr(config, name)} |")
    if run_config is not None and Path(run_config).is_file():  # OUT/model written by training sits beside it
        try:
            resolved = json.loads(Path(run_config).read_text())
            data, train = resolved.get("data", {}), resolved.get("train", {})
            lines += ["", f"Trained on `{data.get('data', '?')}` for {train.get('steps', '?')} steps "
                          f"(batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')})."]
        except (ValueError, AttributeError):
            pass
    lines += ["", "```python", "from moediffuseq.pipeline import MoEDiffuSeqPipeline", "",
              f'pipe = MoEDiffuSeqPipeline.from_pretrained("{repo_id or "path/to/this/directory"}")',
              'print(pipe(["your source text"]))',
              "```", ""]
    return "\n".join(lines)


def push_to_hub(directory: str | os.PathLike, repo_id: str, *, private: bool = False,
                commit_message: str = "Upload MoE-DiffuSeq model", token: Optional[str] = None) -> str:
    """Uploads a model directory (config, weights, tokenizer, generation defaults) to the Hub,
    with a model card unless the directory has one; returns the repository's URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    card = directory / MODEL_CARD
    if not card.is_file():
        card.write_text(model_card(directory, repo_id))
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(repo_id=repo_id, folder_path=str(directory), commit_message=commit_message)
    return str(url)
