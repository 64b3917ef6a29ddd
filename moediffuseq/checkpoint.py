"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory: ``model/`` and ``ema/`` (safetensors weights + config.json, via
``MoEDiffuSeq.save_pretrained``), ``tokenizer.json``, ``trainer_state.pt`` (optimizer, LR
schedule, step, data position, step sampler, every RNG state) and ``train_config.json``.
It is written to a temporary directory and renamed into place, so a crash never leaves a
half-written checkpoint: at worst the previous one survives (as ``<name>.old`` for a moment,
which ``find_checkpoint`` also accepts).
"""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any, Optional

import torch

STATE_FILE = "trainer_state.pt"


def save_checkpoint(directory: str | os.PathLike, write_contents) -> Path:
    """Calls ``write_contents(tmp_dir)`` then swaps ``tmp_dir`` into ``directory``."""
    directory = Path(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(directory.name + ".old")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    write_contents(tmp)
    if directory.exists():
        shutil.rmtree(old, ignore_errors=True)
        os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    return directory


def find_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint at ``directory`` (or its ``.old`` twin after an interrupted swap)."""
    directory = Path(directory)
    for candidate in (directory, directory.with_name(directory.name + ".old")):
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def write_state(directory: Path, state: dict[str, Any], train_config: dict) -> None:
    torch.save(state, directory / STATE_FILE)
    (directory / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {STATE_FILE} in {directory}: not a training checkpoint") from None
    except Exception as e:  # pickle / zip errors on truncated or foreign files
        raise ValueError(f"{path} is corrupt or not a moediffuseq trainer state: {e}") from e
