"""Bounds on what untrusted input may make this library read or allocate: the size of the small
files it reads whole (configurations, records, tokenizers), the length of one line of a data or
source file, and the largest vocabulary. A file or line past its bound is refused with a
one-line ``ValueError`` naming it and the bound, before it is read into memory, so a hostile or
broken file (a symlink to /dev/zero, a line without an end) costs at most its bound.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import BinaryIO, Iterator

MAX_SMALL_FILE_BYTES = 1 << 20      # config.json, generation.json, run_config.json, checksums.json, --config
MAX_TOKENIZER_BYTES = 1 << 30       # tokenizer.json (a 1M-token vocabulary with merges is ~100 MB)
MAX_LINE_BYTES = 64 << 20           # one line of a jsonl data file or a text source file
MAX_VOCAB_SIZE = 1 << 20            # tokens of a vocabulary (a trained tokenizer's, the model's)


def _size_mib(n: int) -> str:
    return f"{n / (1 << 20):g} MiB"


def read_bytes(path: str | os.PathLike, what: str, limit: int = MAX_SMALL_FILE_BYTES) -> bytes:
    """The content of ``path``, refused when it is larger than ``limit`` bytes (read at most
    ``limit + 1`` bytes, so a device or a pipe costs no more)."""
    path = Path(path)
    with path.open("rb") as f:
        data = f.read(limit + 1)
    if len(data) > limit:
        raise ValueError(f"{path}: larger than {_size_mib(limit)}, the limit of a {what}; not read")
    return data


def read_text(path: str | os.PathLike, what: str, limit: int = MAX_SMALL_FILE_BYTES) -> str:
    """``read_bytes`` decoded as UTF-8 (a byte-order mark is dropped)."""
    data = read_bytes(path, what, limit)
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise ValueError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None


def check_file_size(path: str | os.PathLike, what: str, limit: int) -> None:
    """Refuses a path that is not a regular file, or one larger than ``limit`` bytes, before a
    reader that takes the whole file (the tokenizers library) opens it."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"{path}: not a regular file (a {what} must be one)")
    size = path.stat().st_size
    if size > limit:
        raise ValueError(f"{path}: {size} bytes, more than {_size_mib(limit)}, the limit of a {what}; not read")


def lines(f: BinaryIO, name: str | os.PathLike, limit: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, bytes) of every line of a binary file, each refused past ``limit`` bytes with
    its file and line named (read at most ``limit + 1`` bytes of it)."""
    number = 0
    while True:
        line = f.readline(limit + 1)
        if not line:
            return
        number += 1
        if len(line) > limit and not (len(line) == limit + 1 and line.endswith(b"\n")):
            raise ValueError(f"{name}:{number}: a line longer than {_size_mib(limit)}, the limit of one line; "
                             "split the text, or remove the line")
        yield number, line
