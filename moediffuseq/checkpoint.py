"""Training checkpoints: everything needed to continue a run exactly.

A checkpoint is a directory: ``model/`` and ``ema/`` (safetensors weights + config.json, via
``MoEDiffuSeq.save_pretrained``), ``tokenizer.json``, ``trainer_state.pt`` (optimizer, LR
schedule, step, data position, timestep draw, every RNG state), ``train_config.json`` and
``step.json``. Every directory the trainer writes (checkpoints and the final ``model/``) is
written to a temporary sibling ``.<name>.tmp-<pid>`` and renamed into place, so a crash never
leaves a half-written one: at worst the previous one survives (as ``<name>.old`` for a moment,
which ``find_checkpoint`` also accepts). Temporary directories left by a killed process are
removed by the next write.

With ``keep > 1`` the replaced checkpoints are kept as ``<name>-<step>`` (the newest ``keep - 1``
of them); ``find_checkpoint`` falls back to the newest of these.

A checkpoint ends with ``checksums.json``, the SHA-256 of every other file in it, written last;
``resume_checkpoint`` verifies them, so a file changed or swapped in after the checkpoint was
written is refused by name. A write that fails for want of disk space raises ``OSError``
(``ENOSPC``) saying so and what was kept.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
from pathlib import Path
from typing import Any, Callable, Optional

import torch

STATE_FILE = "trainer_state.pt"
STEP_FILE = "step.json"
CHECKSUM_FILE = "checksums.json"
_NO_SPACE = (errno.ENOSPC, errno.EDQUOT)


def _pid_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OSError):
        return True  # exists, owned by someone else
    return True


def remove_stale_temporaries(directory: Path) -> list[Path]:
    """Removes ``.<name>.tmp-<pid>`` siblings of ``directory`` whose process is gone (or is this one)."""
    removed = []
    pattern = re.compile(rf"^\.{re.escape(directory.name)}\.tmp-(\d+)$")
    if not directory.parent.is_dir():
        return removed
    for entry in directory.parent.iterdir():
        match = pattern.match(entry.name)
        if match and (int(match.group(1)) == os.getpid() or not _pid_alive(int(match.group(1)))):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def history_dirs(directory: Path) -> list[tuple[int, Path]]:
    """The kept older checkpoints ``<name>-<step>`` next to ``directory``, oldest first."""
    pattern = re.compile(rf"^{re.escape(directory.name)}-(\d+)$")
    if not directory.parent.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in directory.parent.iterdir() if (m := pattern.match(p.name))]
    return sorted(found)


def write_directory(directory: str | os.PathLike, write_contents: Callable[[Path], None], keep: int = 1) -> Path:
    """Calls ``write_contents(tmp_dir)`` then swaps ``tmp_dir`` into ``directory``. With ``keep > 1``
    the directory it replaces is kept as ``<name>-<its step>`` and the oldest beyond ``keep - 1``
    such copies are removed."""
    directory = Path(directory)
    remove_stale_temporaries(directory)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}")
    old = directory.with_name(directory.name + ".old")
    tmp.mkdir(parents=True)
    try:
        write_contents(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if no_space(e):
            kept = f"{directory} is kept as it was" if directory.exists() else f"nothing was written to {directory}"
            raise OSError(errno.ENOSPC, f"no space left on the device while writing {directory}: the partial copy "
                                        f"was removed and {kept}; free some space (or move the run) and run again "
                                        "(training: with --resume)") from e
        raise
    if directory.exists():
        previous_step = checkpoint_step(directory) if keep > 1 else None
        if previous_step is not None:
            kept = directory.with_name(f"{directory.name}-{previous_step:08d}")
            shutil.rmtree(kept, ignore_errors=True)
            os.replace(directory, kept)
        else:
            shutil.rmtree(old, ignore_errors=True)
            os.replace(directory, old)
    os.replace(tmp, directory)
    shutil.rmtree(old, ignore_errors=True)
    if keep > 1:
        for _, path in history_dirs(directory)[:-(keep - 1)]:
            shutil.rmtree(path, ignore_errors=True)
    return directory


def no_space(error: BaseException) -> bool:
    """Whether ``error`` (or an error it was raised from) is a write that found no disk space. torch.save
    reports it as a RuntimeError whose context is the OSError of the file object; safetensors in
    its message."""
    seen = set()
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, OSError) and error.errno in _NO_SPACE:
            return True
        text = str(error)
        if "No space left on device" in text or "Disk quota exceeded" in text or "os error 28" in text:
            return True
        error = error.__cause__ or error.__context__
    return False


def save_checkpoint(directory: str | os.PathLike, write_contents: Callable[[Path], None], keep: int = 1) -> Path:
    """A training checkpoint, written atomically (see ``write_directory``), its checksums last."""
    def write(tmp: Path) -> None:
        write_contents(tmp)
        write_checksums(tmp)

    return write_directory(directory, write, keep)


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_checksums(directory: Path) -> None:
    """``checksums.json``: the SHA-256 of every file under ``directory`` (relative paths)."""
    sums = {p.relative_to(directory).as_posix(): _sha256(p) for p in sorted(directory.rglob("*"))
            if p.is_file() and p.name != CHECKSUM_FILE}
    with (directory / CHECKSUM_FILE).open("w") as f:
        f.write(json.dumps(sums, indent=1) + "\n")


def verify_checksums(directory: Path) -> None:
    """Refuses a checkpoint whose files differ from its ``checksums.json`` (naming the file); a
    checkpoint written before checksums were recorded has none and is accepted."""
    from moediffuseq.limits import read_text

    path = directory / CHECKSUM_FILE
    if not path.is_file():
        return
    try:
        sums = json.loads(read_text(path, "checksum file"))
        if not isinstance(sums, dict):
            raise ValueError("not a JSON object")
    except ValueError as e:
        raise ValueError(f"{path} is corrupt ({e}): the checkpoint cannot be verified") from None
    for name, expected in sums.items():
        file = directory / name
        if not file.is_file():
            raise ValueError(f"{file} is missing from the checkpoint (recorded in {CHECKSUM_FILE})")
        if _sha256(file) != expected:
            raise ValueError(f"{file} does not match the checksum recorded when the checkpoint was written: the "
                             "file is corrupt, or was changed or replaced since; restore it, or start the run again")


def resume_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """``find_checkpoint`` for a resume, which refuses a damaged ``directory`` (one without its
    trainer state) rather than silently starting over or falling back to an older one."""
    directory = Path(directory)
    if directory.is_dir() and not (directory / STATE_FILE).is_file():
        raise ValueError(f"{directory} has no {STATE_FILE}: the checkpoint is incomplete or damaged; restore "
                         f"the file, remove {directory} to resume from an older checkpoint, or start again "
                         "with --overwrite")
    return find_checkpoint(directory)


def checkpoint_step(directory: Path) -> Optional[int]:
    """The step recorded in a checkpoint's ``step.json`` (None when absent or unreadable)."""
    try:
        from moediffuseq.limits import read_text

        return int(json.loads(read_text(directory / STEP_FILE, "step record"))["step"])
    except (OSError, ValueError, KeyError, TypeError):
        return None


def find_checkpoint(directory: str | os.PathLike) -> Optional[Path]:
    """The complete checkpoint at ``directory`` (or its ``.old`` twin after an interrupted swap,
    or the newest kept ``<name>-<step>`` copy)."""
    directory = Path(directory)
    candidates = [directory, directory.with_name(directory.name + ".old")]
    candidates += [p for _, p in reversed(history_dirs(directory))]
    for candidate in candidates:
        if (candidate / STATE_FILE).is_file():
            return candidate
    return None


def write_state(directory: Path, state: dict[str, Any], train_config: dict) -> None:
    with (directory / STATE_FILE).open("wb") as f:  # a Python file: a full disk is an OSError in the chain
        torch.save(state, f)
    (directory / "train_config.json").write_text(json.dumps(train_config, indent=2) + "\n")
    (directory / STEP_FILE).write_text(json.dumps({"step": int(state["step"])}) + "\n")


def read_state(directory: Path) -> dict[str, Any]:
    path = directory / STATE_FILE
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except FileNotFoundError:
        raise FileNotFoundError(f"no {STATE_FILE} in {directory}: not a training checkpoint") from None
    except Exception as e:  # pickle / zip errors on truncated or foreign files
        raise ValueError(f"{path} is corrupt or not a moediffuseq trainer state: {e}") from e
