"""Model directories on the Hugging Face Hub: a hub id ("user/name") is downloaded once into the
Hub's cache and then read like any local directory (``resolve_model_dir``, in
``moediffuseq.hub_download``, which the model's loader uses); ``push_to_hub`` uploads a model
directory with a generated model card. Local directories never touch the network, and the
``huggingface_hub`` package (the "hub" extra) is imported only for hub ids and uploads.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Optional

from moediffuseq.hub_download import resolve_model_dir
from moediffuseq.model import MoEDiffuSeqConfig

__all__ = ["MODEL_CARD", "model_card", "push_to_hub", "resolve_model_dir"]

MODEL_CARD = "README.md"


def model_card(directory: str | os.PathLike, repo_id: str) -> str:
    """A model card from what the directory holds: the config, the generation defaults and, for
    a model written by training, the run's data and steps."""
    from moediffuseq import __version__

    directory = Path(directory)
    config = MoEDiffuSeqConfig.load(directory)
    lines = ["---", "library_name: moediffuseq", "tags: [diffusion, text-generation, mixture-of-experts, seq2seq]",
             "---", "", f"# {repo_id}", "",
             "A MoE-DiffuSeq model (sequence-to-sequence text diffusion with block-sparse attention and a "
             f"mixture-of-experts feed-forward), saved by moediffuseq {__version__}.", "",
             "| field | value |", "| --- | --- |"]
    for name in ("max_len", "d_model", "n_layers", "n_heads", "attention", "window", "ffn", "num_experts", "top_k",
                 "d_expert", "soft_absorbing", "target_span", "source_isolation", "schedule", "diffusion_steps",
                 "vocab_size"):
        lines.append(f"| {name} | {getattr(config, name)} |")
    run = directory.parent / "run_config.json"  # OUT/model written by training sits beside it
    if run.is_file():
        try:
            resolved = json.loads(run.read_text())
            data, train = resolved.get("data", {}), resolved.get("train", {})
            lines += ["", f"Trained on `{data.get('data', '?')}` for {train.get('steps', '?')} steps "
                          f"(batch {train.get('batch_size', '?')}, lr {train.get('lr', '?')})."]
        except (ValueError, AttributeError):
            pass
    lines += ["", "```python", "from moediffuseq.pipeline import MoEDiffuSeqPipeline", "",
              f'pipe = MoEDiffuSeqPipeline.from_pretrained("{repo_id}")', 'print(pipe(["your source text"]))',
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
