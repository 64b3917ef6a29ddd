"""Built-in corpora that need no download, each built once and cached as DiffuSeq jsonl.

- ``pycode``: code summarisation from the Python standard library on this machine: the source
  of a documented function (its docstring removed) -> the docstring's first paragraph.
- ``pycode-body``: code generation from the same functions: signature + docstring -> body.
- ``aclsum``: scientific summarisation from the ``aclsum`` package: a paper's abstract,
  introduction and conclusion -> its challenge, approach and outcome summaries.

The pycode splits are deterministic by file (a hash of the module's path), so no function's
file appears in two splits, and a function whose source also occurs in the training split is
left out of validation and test. The cache lives in ``$MOEDIFFUSEQ_CACHE`` (default
``~/.cache/moediffuseq``) under ``corpora/<name>/`` and is rebuilt when its recipe changes.
"""
from __future__ import annotations

import ast
import hashlib
import json
import os
import re
import sys
import sysconfig
import textwrap
from pathlib import Path
from typing import Callable, Iterator

from moediffuseq.data.jsonl import SPLITS, Example, split_path, write_jsonl

RECIPE_VERSION = 2
MAX_SOURCE_CHARS = 6000   # pycode: longer functions are left out (they would be truncated anyway)
MIN_SUMMARY_WORDS = 3


def cache_root() -> Path:
    return Path(os.environ.get("MOEDIFFUSEQ_CACHE", Path.home() / ".cache" / "moediffuseq"))


# ---------------------------------------------------------------------------------------------
# pycode: the standard library

_SKIP_DIRS = {"test", "tests", "idle_test", "site-packages", "dist-packages", "__pycache__", "lib2to3"}


def stdlib_files(root: Path | None = None) -> list[Path]:
    """Every .py file of the standard library, test packages and third-party packages excluded."""
    root = Path(root or sysconfig.get_paths()["stdlib"])
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        files += [Path(dirpath) / f for f in sorted(filenames) if f.endswith(".py")]
    return files


def _split_of(relpath: str) -> str:
    bucket = int(hashlib.md5(relpath.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "valid" if bucket < 95 else "test"


def _summary(docstring: str) -> str:
    first = re.split(r"\n\s*\n", docstring.strip(), maxsplit=1)[0]
    return " ".join(first.split())


def _functions(path: Path) -> Iterator[tuple[str, str, str, str]]:
    """(signature, docstring, body, code) of every documented function of one file."""
    try:
        source = path.read_text(encoding="utf-8")
        tree = ast.parse(source)
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            continue
        doc = ast.get_docstring(node)
        if not doc or len(node.body) < 2:
            continue
        doc_node, first_stmt = node.body[0], node.body[1]
        signature = "\n".join(lines[node.lineno - 1:doc_node.lineno - 1])
        body = "\n".join(lines[first_stmt.lineno - 1:node.end_lineno])
        yield (textwrap.dedent(signature).rstrip(), doc, textwrap.dedent(body).rstrip(),
               textwrap.dedent(signature + "\n" + body).rstrip())


def _pycode_examples(task: str) -> dict[str, list[Example]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    out: dict[str, list[Example]] = {s: [] for s in SPLITS}
    seen: set[tuple[str, str]] = set()
    for path in stdlib_files(root):
        split = _split_of(path.relative_to(root).as_posix())
        for signature, doc, body, code in _functions(path):
            summary = _summary(doc)
            if len(code) > MAX_SOURCE_CHARS or len(summary.split()) < MIN_SUMMARY_WORDS:
                continue
            if task == "summarise":
                ex = Example(code, summary)
            else:
                ex = Example(signature + '\n    """' + doc.strip() + '"""', body)
            if (ex.src, ex.trg) in seen:
                continue
            seen.add((ex.src, ex.trg))
            out[split].append(ex)
    # boilerplate functions repeated across files (e.g. `return None` bodies) stay in training only
    train_sources = {e.src for e in out["train"]}
    for split in ("valid", "test"):
        out[split] = [e for e in out[split] if e.src not in train_sources]
    return out


# ---------------------------------------------------------------------------------------------
# aclsum: scientific summarisation

def _aclsum_examples() -> dict[str, list[Example]]:
    try:
        import aclsum
    except ImportError as e:
        raise ImportError("the aclsum corpus needs the aclsum package: pip install aclsum") from e
    data_dir = Path(aclsum.__file__).parent / "dataset"
    out: dict[str, list[Example]] = {}
    for split, name in (("train", "train"), ("valid", "val"), ("test", "test")):
        out[split] = []
        with open(data_dir / f"{name}.jsonl", encoding="utf-8") as f:
            for line in f:
                if not line.strip():
                    continue
                doc = json.loads(line)
                sections = doc["sentences"]
                src = " ".join(s for sec in ("abstract", "introduction", "conclusion") for s in sections.get(sec, []))
                trg = " ".join(doc["summary"][a] for a in ("challenge", "approach", "outcome"))
                out[split].append(Example(" ".join(src.split()), " ".join(trg.split())))
    return out


CORPORA: dict[str, tuple[str, Callable[[], dict[str, list[Example]]]]] = {
    "pycode": ("Python standard library: function source -> docstring summary",
               lambda: _pycode_examples("summarise")),
    "pycode-body": ("Python standard library: signature + docstring -> function body",
                    lambda: _pycode_examples("body")),
    "aclsum": ("ACLSum: abstract + introduction + conclusion -> challenge/approach/outcome summary",
               _aclsum_examples),
}


def _fingerprint(name: str) -> dict:
    meta = {"corpus": name, "recipe": RECIPE_VERSION}
    if name.startswith("pycode"):
        meta["python"] = sys.version.split()[0]
        meta["stdlib"] = sysconfig.get_paths()["stdlib"]
    return meta


def build_corpus(name: str, cache_dir: str | os.PathLike | None = None, rebuild: bool = False) -> Path:
    """Builds (or finds in the cache) a built-in corpus; returns its directory of jsonl splits."""
    if name not in CORPORA:
        raise ValueError(f"unknown corpus {name!r}; built-in corpora: {sorted(CORPORA)}")
    directory = Path(cache_dir) if cache_dir else cache_root() / "corpora" / name
    meta_path = directory / "meta.json"
    expected = _fingerprint(name)
    if not rebuild and meta_path.is_file():
        try:
            meta = json.loads(meta_path.read_text())
        except json.JSONDecodeError:
            meta = {}
        if {k: meta.get(k) for k in expected} == expected and all(split_path(directory, s).is_file() for s in SPLITS):
            return directory
    splits = CORPORA[name][1]()
    counts = {split: write_jsonl(split_path(directory, split), splits[split]) for split in SPLITS}
    meta_path.write_text(json.dumps({**expected, "examples": counts}, indent=2) + "\n")
    return directory
