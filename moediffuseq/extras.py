"""Optional dependencies: which extra of ``pip install "moediffuseq[...]"`` provides a module.

The core (the ops, the modules, the model) needs torch, numpy and safetensors only; the CLI's
commands import the rest when they run and, where one is missing, say which extra to install.
"""
from __future__ import annotations

from typing import Optional

EXTRA_OF_MODULE = {
    "tokenizers": "train",
    "tqdm": "train",
    "yaml": "train",
    "sacrebleu": "eval",
    "rouge_score": "eval",
    "nltk": "eval",
    "aclsum": "data",
    "matplotlib": "plots",
    "tensorboard": "tensorboard",
    "huggingface_hub": "hub",
}


def missing_extra_message(error: ModuleNotFoundError) -> Optional[str]:
    """One line naming the pip command that installs the module ``error`` is about, or None when
    the module is not one of the optional dependencies (then it is a real error)."""
    root = (error.name or "").split(".")[0]
    extra = EXTRA_OF_MODULE.get(root)
    if extra is None:
        return None
    return f"error: this needs the optional package '{root}': pip install \"moediffuseq[{extra}]\""
