"""The output directory of a training run: which files are the run's, when training into it is
allowed, and the run's resolved configuration (``run_config.json``) that ``--resume`` compares.

Errors are ``ValueError`` with a one-line message naming the option (the CLI prints it).
"""
from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any, Optional

from moediffuseq.checkpoint import find_checkpoint
from moediffuseq.limits import read_text

RUN_FILE = "run_config.json"  # the resolved configuration of a run, written when it starts

# every name a run writes (the directories the trainer swaps in: checkpoint, model, best_model,
# with their .old twins and .<name>.tmp-<pid> temporaries)
_RUN_NAMES = {RUN_FILE, RUN_FILE + ".tmp", "tokenizer.json", "tokenizer.json.tmp", "metrics.csv", "metrics.csv.tmp",
              "loss.png", "loss.png.tmp", "tensorboard", "checkpoint", "checkpoint.old", "model", "model.old",
              "best_model", "best_model.old"}
_RUN_PATTERN = re.compile(r"^(checkpoint-\d+|\.(checkpoint|model|best_model)\.tmp-\d+)$")


def run_files(out: Path, keep: Optional[Path] = None) -> list[Path]:
    """The files and directories of a training run in ``out`` (what --overwrite deletes), but
    ``keep`` (a tokenizer the user passed from there)."""
    if not out.is_dir():
        return []
    found = [p for p in sorted(out.iterdir()) if p.name in _RUN_NAMES or _RUN_PATTERN.match(p.name)]
    return [p for p in found if keep is None or p.resolve() != keep.resolve()]


def check_run_dir(out: Path, resume: bool, overwrite: bool, allow_change: bool,
                  tokenizer: Optional[str] = None) -> list[Path]:
    """Refuses to train into a run that --resume or --overwrite does not name; returns the run's files."""
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    if resume and overwrite:
        raise ValueError("--resume and --overwrite exclude each other")
    if allow_change and not resume:
        raise ValueError("--allow-change goes with --resume")
    existing = run_files(out, keep=Path(tokenizer) if tokenizer else None)
    if resume:
        if not (out / RUN_FILE).is_file() and find_checkpoint(out / "checkpoint") is None:
            raise ValueError(f"--resume: {out} holds no run to resume (no {RUN_FILE}, no checkpoint); "
                             "start it without --resume")
    elif existing and not overwrite:
        raise ValueError(f"--out {out} already holds a training run ({', '.join(p.name for p in existing[:4])}); "
                         "pass --resume to continue it or --overwrite to replace it")
    return existing


def config_changes(before: dict, now: dict) -> list[str]:
    """``field (old -> new)`` for every field of the data, model and train sections that differs,
    but the training fields that change no result (the progress bar, checkpoints kept)."""
    from moediffuseq.train_config import NON_RESULT_FIELDS

    out = []
    for section in ("data", "model", "train"):
        old, new = before.get(section) or {}, now[section]
        for key in sorted(set(old) | set(new)):
            if section == "train" and key in NON_RESULT_FIELDS:
                continue
            a, b = old.get(key), new.get(key)
            if (tuple(a) if isinstance(a, list) else a) != (tuple(b) if isinstance(b, list) else b):
                out.append(f"{key} ({a!r} -> {b!r})")
    return out


def previous_config(out: Path) -> dict:
    """The run's resolved configuration: run_config.json, or for a run without one, its checkpoint's;
    training fields under an earlier name are read under the current one."""
    from moediffuseq.train_config import upgrade_fields

    path = out / RUN_FILE
    if path.is_file():
        try:
            resolved = json.loads(read_text(path, "run configuration"))
            if isinstance(resolved, dict) and isinstance(resolved.get("train"), dict):
                resolved["train"] = upgrade_fields(resolved["train"])
            return resolved
        except ValueError as e:
            raise ValueError(f"--resume: {path} is corrupt: {e}") from None
    directory = find_checkpoint(out / "checkpoint")
    try:
        return {"train": upgrade_fields(json.loads(read_text(directory / "train_config.json", "train configuration"))),
                "model": json.loads(read_text(directory / "model" / "config.json", "model config"))}
    except (OSError, ValueError, TypeError) as e:
        raise ValueError(f"--resume: {directory} has no readable configuration: {e}") from None


def write_json(path: Path, obj: Any) -> None:
    """Writes ``obj`` as JSON under a temporary name, then renames it into place."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)
