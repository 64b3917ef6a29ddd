"""Generation from files for the ``moediffuseq generate`` command: sources read from a jsonl
file, a text file, standard input or a list of texts, generated with a model directory's
pipeline, written as jsonl (source, reference, hypothesis, candidates) or printed."""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path
from typing import Optional, Sequence

from moediffuseq.data import Example, read_jsonl
from moediffuseq.evaluate import decoded
from moediffuseq.generate import GenerationConfig
from moediffuseq.limits import lines
from moediffuseq.pipeline import MoEDiffuSeqPipeline


def read_sources(path: str | os.PathLike, skip_bad_lines: bool = False) -> list[Example]:
    """The sources to generate for: a jsonl file (``{"src": ...}`` lines, ``trg`` optional: it is
    the reference when present), any other file as plain text with one source per line (blank
    lines skipped), or ``-`` for standard input as plain text. Every line is bounded
    (``moediffuseq.limits.MAX_LINE_BYTES``); no source at all is an error."""
    if str(path) == "-":
        examples = _text_sources(sys.stdin.buffer, "standard input")
        if not examples:
            raise ValueError("standard input holds no sources (it is empty or holds only blank lines)")
        return examples
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"input file not found: {path}")
    if path.suffix == ".jsonl":
        examples = read_jsonl(path, "skip" if skip_bad_lines else "raise", require_target=False).examples
    else:
        with path.open("rb") as f:
            examples = _text_sources(f, path)
    if not examples:
        raise ValueError(f"{path} holds no sources (it is empty or holds only blank or skipped lines)")
    return examples


def _text_sources(f, name) -> list[Example]:
    """One source per non-blank line of a binary stream, each line bounded (MAX_LINE_BYTES)."""
    examples = []
    for number, raw in lines(f, name):
        if number == 1 and raw.startswith(b"\xef\xbb\xbf"):
            raw = raw[3:]
        try:
            text = raw.decode("utf-8").strip()
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}:{number}: not UTF-8 text ({e.reason} at byte {e.start} of the line)") from None
        if text:
            examples.append(Example(text))
    return examples


def generate_file(model_dir: str | os.PathLike, input_path: Optional[str | os.PathLike],
                  output_path: Optional[str | os.PathLike], cfg: GenerationConfig, device: str = "cpu",
                  limit: Optional[int] = None, skip_bad_lines: bool = False, progress: bool = True,
                  texts: Optional[Sequence[str]] = None, show_steps: bool = False) -> int:
    """Generates for the sources of ``input_path`` (see ``read_sources``) or for ``texts``.
    With ``output_path``, writes one {source, reference and reference_raw (when the input has
    one), hypothesis, candidates} line per source (``reference``: the target decoded from its
    token ids, the normalisation of the hypotheses, what ``evaluate`` scores; ``reference_raw``:
    the text as given); without, prints the hypotheses, one per line. ``show_steps``
    prints the first source's text after every model call. Returns the number of sources."""
    if output_path is not None:
        output_path = Path(output_path)
        if output_path.is_dir():
            raise ValueError(f"output {output_path} is a directory, not a file")
        if input_path is not None and output_path.exists() and Path(input_path).exists() \
                and os.path.samefile(output_path, input_path):
            raise ValueError(f"output {output_path} is the input file: it would be overwritten")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be >= 1, got {limit}")
    examples = [Example(t) for t in texts] if texts is not None else read_sources(input_path, skip_bad_lines)
    examples = examples[:limit]
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device=device)

    batches = 0

    def print_step(call: int, t: int, batch_texts: list[str]) -> None:  # the first source only
        nonlocal batches
        batches += call == 1
        if batches == 1:
            print(f"step {call:3d} (t={t:4d}): {batch_texts[0]}", file=sys.stderr, flush=True)

    results = pipe.generate([e.src for e in examples], cfg, progress=progress and output_path is not None,
                            callback=print_step if show_steps else None)
    if output_path is None:
        for res in results:
            print(res.hypothesis)
        return len(results)
    labelled = [i for i, ex in enumerate(examples) if ex.trg is not None]
    references = dict(zip(labelled, decoded([examples[i].trg for i in labelled], pipe.tokenizer)))
    output_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = output_path.with_name(output_path.name + ".tmp")
    try:
        with tmp.open("w", encoding="utf-8") as f:
            for i, (ex, res) in enumerate(zip(examples, results)):
                ref = {"reference": references[i], "reference_raw": ex.trg} if ex.trg is not None else {}
                record = {"source": ex.src, **ref,
                          "hypothesis": res.hypothesis, "candidates": res.candidates}
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
        os.replace(tmp, output_path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return len(results)
