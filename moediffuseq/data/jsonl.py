"""DiffuSeq's data format: ``train.jsonl`` / ``valid.jsonl`` / ``test.jsonl``, one
``{"src": "...", "trg": "..."}`` object per line.

Each line is read with a bound on its length (``moediffuseq.limits.MAX_LINE_BYTES``). A malformed
line (not JSON, not UTF-8, a lone surrogate escape) is never dropped silently: with ``on_error="raise"`` (the default) the first
one stops the load with its file and line number; with ``on_error="skip"`` every bad line is
reported (file:line and why) through ``warnings`` and counted in the result.
"""
from __future__ import annotations

import json
import os
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Optional

from moediffuseq.limits import lines

SPLITS = ("train", "valid", "test")


class DataFormatError(ValueError):
    """A line of a jsonl data file that is not a {"src": str, "trg": str} object."""


@dataclass(frozen=True)
class Example:
    src: str
    trg: Optional[str] = None  # None: a source to generate for, without a reference


@dataclass
class LoadedSplit:
    examples: list[Example]
    path: Path
    skipped: list[str] = field(default_factory=list)  # "file:line: why", one per skipped line


def _parse_line(line: str, require_target: bool) -> Example:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as e:
        raise DataFormatError(f"not valid JSON ({e.msg} at column {e.colno})") from None
    if not isinstance(obj, dict):
        raise DataFormatError(f"expected a JSON object, got {type(obj).__name__}")
    for key in ("src", "trg"):
        if key == "trg" and key not in obj and not require_target:
            continue
        if key not in obj:
            raise DataFormatError(f"missing key {key!r} (keys: {sorted(obj)})")
        if not isinstance(obj[key], str):
            raise DataFormatError(f"{key!r} must be a string, got {type(obj[key]).__name__}")
        try:
            obj[key].encode("utf-8")
        except UnicodeEncodeError as e:  # json reads a lone "\ud800" escape into a str no encoder takes
            raise DataFormatError(f"{key!r} holds a lone surrogate escape ({obj[key][e.start]!r} at character "
                                  f"{e.start}): not text") from None
    if not obj["src"].strip():
        raise DataFormatError("empty 'src'")
    return Example(obj["src"], obj.get("trg"))


def read_jsonl(path: str | os.PathLike, on_error: str = "raise", require_target: bool = True) -> LoadedSplit:
    """Reads one split. Blank lines are allowed (and ignored); every other line must parse. With
    ``require_target=False`` (sources to generate for) a line may omit ``trg``."""
    if on_error not in ("raise", "skip"):
        raise ValueError(f"on_error must be 'raise' or 'skip', got {on_error!r}")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"data file not found: {path}")
    out = LoadedSplit([], path)
    with path.open("rb") as f:
        for number, raw in lines(f, path):  # each line bounded (MAX_LINE_BYTES)
            if number == 1 and raw.startswith(b"\xef\xbb\xbf"):  # a byte-order mark is not text
                raw = raw[3:]
            try:
                try:
                    line = raw.decode("utf-8")
                except UnicodeDecodeError as e:
                    raise DataFormatError(f"not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
                if not line.strip():
                    continue
                out.examples.append(_parse_line(line, require_target))
            except DataFormatError as e:
                where = f"{path}:{number}: {e}"
                if on_error == "raise":
                    raise DataFormatError(f"{where} (pass on_error='skip' / --skip-bad-lines to skip "
                                          "malformed lines)") from None
                out.skipped.append(where)
    if out.skipped:
        shown = "\n  ".join(out.skipped[:10]) + ("\n  ..." if len(out.skipped) > 10 else "")
        warnings.warn(f"{path}: skipped {len(out.skipped)} malformed line(s) of "
                      f"{len(out.skipped) + len(out.examples)}:\n  {shown}", stacklevel=2)
    return out


def write_jsonl(path: str | os.PathLike, examples: Iterable[Example | dict]) -> int:
    """Writes examples (or plain dicts) one per line, atomically (temp file + rename)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with tmp.open("w", encoding="utf-8") as f:
        for ex in examples:
            obj = {"src": ex.src, "trg": ex.trg} if isinstance(ex, Example) else ex
            f.write(json.dumps(obj, ensure_ascii=False) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def split_path(data_dir: str | os.PathLike, split: str) -> Path:
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    return Path(data_dir) / f"{split}.jsonl"
