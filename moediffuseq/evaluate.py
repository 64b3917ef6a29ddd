"""DiffuSeq's evaluation suite (METHOD §7) on generated text, from maintained libraries:

- sentence BLEU with smoothing method 4 (nltk), averaged over examples, as DiffuSeq reports it;
- corpus BLEU (sacreBLEU, 0-100) for comparison with other work;
- ROUGE-1/2/L F1 (rouge-score, with stemming);
- dist-1: distinct unigrams / unigrams per hypothesis, averaged;
- self-BLEU and div-4 across the candidates of one source (only when generation kept several),
  averaged over sources: lower self-BLEU and higher div-4 mean more diverse samples;
- average hypothesis length in words.

BLEU, dist and div use whitespace tokens, as DiffuSeq's scripts do. Hypotheses and references
must have gone through the same normalisation: DiffuSeq decodes both from token ids, and so do
``generate`` (its files' ``reference`` is the target decoded from its ids, the raw text is kept as
``reference_raw``), the trainer's validation BLEU and the demo, through ``decoded``. Scoring a
decoded hypothesis against raw text understates every score (a WordPiece decoder writes
"( as a string )" where the text has "(as a string)": a perfect output scores ~0.7 BLEU).
"""
from __future__ import annotations

import json
import os
import warnings
from pathlib import Path
from statistics import mean
from typing import Optional, Sequence


class EmptyHypothesesWarning(UserWarning):
    """Every hypothesis is empty: every score is 0."""


METRICS = ("bleu", "sacrebleu", "rouge1", "rouge2", "rougeL", "dist1", "self_bleu", "div4", "avg_len")


def sentence_bleu(hypothesis: Sequence[str], reference: Sequence[str]) -> float:
    """nltk sentence BLEU-4 of token lists with smoothing method 4 (0 when either is empty)."""
    from nltk.translate.bleu_score import SmoothingFunction, sentence_bleu as nltk_bleu

    if not hypothesis or not reference:
        return 0.0
    return float(nltk_bleu([list(reference)], list(hypothesis), smoothing_function=SmoothingFunction().method4))


def decoded(texts: Sequence[str], tokenizer) -> list[str]:
    """``texts`` as the model's outputs are written: encoded to token ids and decoded by
    ``tokenizer`` (a ``TextTokenizer``), the normalisation DiffuSeq applies to references."""
    return [tokenizer.decode(ids) for ids in tokenizer.encode_batch(list(texts))]


def _distinct(tokens_list: Sequence[Sequence[str]], n: int) -> float:
    from nltk.util import ngrams

    grams = [g for tokens in tokens_list for g in ngrams(tokens, n)]
    return len(set(grams)) / len(grams) if grams else 0.0


def evaluate_texts(hypotheses: Sequence[str], references: Sequence[str],
                   candidates: Optional[Sequence[Sequence[str]]] = None) -> dict[str, Optional[float]]:
    """All metrics of one system. ``candidates[i]``: every sample generated for source i."""
    import sacrebleu
    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("nothing to evaluate: no hypotheses")
    if not any(h.strip() for h in hypotheses):
        warnings.warn(EmptyHypothesesWarning(f"all {len(hypotheses)} hypotheses are empty, so every score is 0: "
                                             "the model that wrote them generated nothing (undertrained?)"),
                      stacklevel=2)
    hyp_tok = [h.split() for h in hypotheses]
    ref_tok = [r.split() for r in references]
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    rouge = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    out: dict[str, Optional[float]] = {
        "bleu": mean(sentence_bleu(h, r) for h, r in zip(hyp_tok, ref_tok)),
        "sacrebleu": sacrebleu.corpus_bleu(list(hypotheses), [list(references)]).score,
        "rouge1": mean(s["rouge1"].fmeasure for s in rouge),
        "rouge2": mean(s["rouge2"].fmeasure for s in rouge),
        "rougeL": mean(s["rougeL"].fmeasure for s in rouge),
        "dist1": mean(_distinct([h], 1) for h in hyp_tok),
        "self_bleu": None,
        "div4": None,
        "avg_len": mean(len(h) for h in hyp_tok),
    }
    groups = [[c.split() for c in cands] for cands in (candidates or []) if len(cands) >= 2]
    if groups:
        out["self_bleu"] = mean(mean(sentence_bleu(c, o) for i, c in enumerate(g) for j, o in enumerate(g) if i != j)
                                for g in groups)
        out["div4"] = mean(_distinct(g, 4) for g in groups)
    return out


INTERVAL_METRICS = ("bleu", "rouge1", "rouge2", "rougeL")


def bootstrap_intervals(hypotheses: Sequence[str], references: Sequence[str], samples: int = 1000,
                        seed: int = 0, level: float = 0.95) -> dict[str, tuple[float, float]]:
    """Percentile bootstrap intervals of the example-averaged metrics (sentence BLEU, ROUGE-1/2/L):
    the examples are resampled with replacement ``samples`` times (a seeded generator)."""
    import random

    from rouge_score import rouge_scorer

    if len(hypotheses) != len(references) or not hypotheses:
        raise ValueError(f"{len(hypotheses)} hypotheses and {len(references)} references: need equal, nonzero counts")
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    per = {"bleu": [sentence_bleu(h.split(), r.split()) for h, r in zip(hypotheses, references)]}
    rouge = [scorer.score(r, h) for h, r in zip(hypotheses, references)]
    for key in ("rouge1", "rouge2", "rougeL"):
        per[key] = [s[key].fmeasure for s in rouge]
    rng, n = random.Random(seed), len(hypotheses)
    draws = [[rng.randrange(n) for _ in range(n)] for _ in range(samples)]
    lo_q, hi_q = (1 - level) / 2, 1 - (1 - level) / 2
    out = {}
    for key, values in per.items():
        means = sorted(sum(values[i] for i in d) / n for d in draws)
        out[key] = (means[int(lo_q * (samples - 1))], means[int(round(hi_q * (samples - 1)))])
    return out


def format_intervals(rows: dict[str, dict[str, tuple[float, float]]]) -> str:
    """A Markdown table of the bootstrap 95% intervals, one row per system."""
    lines = ["| system (95% bootstrap interval) | " + " | ".join(INTERVAL_METRICS) + " |",
             "|" + " --- |" * (len(INTERVAL_METRICS) + 1)]
    for name, iv in rows.items():
        lines.append(f"| {name} | " + " | ".join(f"{iv[k][0]:.4f} - {iv[k][1]:.4f}" for k in INTERVAL_METRICS) + " |")
    return "\n".join(lines)


def read_generations(path: str | os.PathLike
                     ) -> tuple[list[str], Optional[list[str]], list[str], list[list[str]]]:
    """(sources, references, hypotheses, candidates) of a file written by ``generate``; the
    references are None when no line has one (generations for unlabeled sources)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"generations file not found: {path}")
    src, ref, hyp, cands = [], [], [], []
    with path.open(encoding="utf-8-sig") as f:
        for number, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                if not isinstance(obj, dict):
                    raise TypeError(f"expected a JSON object, got {type(obj).__name__}")
                for key in ("reference", "hypothesis"):
                    if key == "reference" and key not in obj and not ref:
                        continue
                    if not isinstance(obj[key], str):
                        raise TypeError(f"{key!r} must be a string, got {json.dumps(obj[key])}")
                source = obj.get("source", "")
                if not isinstance(source, str):
                    raise TypeError(f"'source' must be a string, got {json.dumps(source)}")
                candidates = obj.get("candidates", [])
                if not isinstance(candidates, list) or not all(isinstance(c, str) for c in candidates):
                    raise TypeError(f"'candidates' must be a list of strings, got {json.dumps(candidates)[:80]}")
            except (json.JSONDecodeError, KeyError, TypeError) as e:
                raise ValueError(f"{path}:{number}: not a generation record with 'reference' and 'hypothesis' "
                                 f"({type(e).__name__}: {e})") from None
            src.append(source)
            if "reference" in obj:
                ref.append(obj["reference"])
            hyp.append(obj["hypothesis"])
            cands.append(candidates)
    if ref and len(ref) != len(hyp):
        raise ValueError(f"{path}: some lines have a 'reference' and some do not")
    return src, ref or None, hyp, cands


def format_table(rows: dict[str, dict[str, Optional[float]]]) -> str:
    """A Markdown table, one row per system; BLEU/ROUGE as fractions like DiffuSeq's tables."""
    header = "| system | " + " | ".join(METRICS) + " |"
    lines = [header, "|" + " --- |" * (len(METRICS) + 1)]
    for name, metrics in rows.items():
        cells = []
        for key in METRICS:
            v = metrics.get(key)
            cells.append("n/a" if v is None else f"{v:.2f}" if key in ("sacrebleu", "avg_len") else f"{v:.4f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)
