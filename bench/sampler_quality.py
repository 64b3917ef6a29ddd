"""Samplers on one trained model: quality (bootstrap 95% intervals) and sampling time, same run,
same test sources, same seed. Answers whether a few-step sampler keeps the quality of DDPM's
2000 steps on a model that has actually learnt something (``moediffuseq demo`` trains one).

    moediffuseq demo --out runs/demo
    python -m bench.sampler_quality runs/demo/model
    python -m bench.sampler_quality runs/demo/model --samplers dpm++:10 ddpm:10 ddpm:2000 --examples 200 --mbr 10

A sampler is ``method:steps`` (``+clamp`` rounds x0 to the nearest word embedding). By default
one sample per source, so the table compares the samplers and nothing else; ``--mbr S`` scores
the MBR choice of S samples instead, as DiffuSeq decodes. References and outputs
are scored on text decoded from token ids (as DiffuSeq scores). Writes
bench/out/sampler_quality.md and .json.
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_OUT_DIR

from moediffuseq.data import read_jsonl
from moediffuseq.diffusion.samplers import SamplerConfig
from moediffuseq.evaluate import bootstrap_intervals, decoded, evaluate_texts
from moediffuseq.generate import GenerationConfig
from moediffuseq.pipeline import MoEDiffuSeqPipeline

DEFAULT_SAMPLERS = ["dpm++:10", "dpm++:10+clamp", "dpm++:20", "ddim:2000", "ddpm:10", "ddpm:10+clamp", "ddpm:2000"]
METRICS = ("bleu", "rouge2", "rougeL")


def parse_sampler(spec: str) -> SamplerConfig:
    """``method:steps[+clamp]`` -> SamplerConfig (its own checks name a bad method or count)."""
    clamp = spec.endswith("+clamp")
    method, _, steps = spec.removesuffix("+clamp").rpartition(":")
    if not steps.isdigit():
        raise argparse.ArgumentTypeError(f"expected method:steps[+clamp], got {spec!r}")
    return SamplerConfig(method, int(steps), clamp=clamp)


def score(hyps, refs):
    """The example-averaged metrics of METRICS (and the average length) and their bootstrap 95%
    intervals."""
    row = evaluate_texts(hyps, refs)
    return {k: row[k] for k in (*METRICS, "avg_len")}, bootstrap_intervals(hyps, refs)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("model_dir", type=Path, help="a trained model directory (save_pretrained / train's model/)")
    p.add_argument("--data", type=Path, default=None,
                   help="test jsonl (default: the test split of the corpus the model was trained on)")
    p.add_argument("--samplers", nargs="+", default=DEFAULT_SAMPLERS)
    p.add_argument("--examples", type=int, default=200, help="test sources (the first ones)")
    p.add_argument("--mbr", type=int, default=1, help="samples per source; the MBR choice is scored")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = p.parse_args()
    try:
        samplers = {spec: parse_sampler(spec) for spec in args.samplers}
    except (argparse.ArgumentTypeError, ValueError) as e:
        p.error(str(e))
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    pipe = MoEDiffuSeqPipeline.from_pretrained(args.model_dir)
    data = args.data or test_split_of(args.model_dir)
    test = read_jsonl(data).examples[:args.examples]
    sources = [e.src for e in test]
    refs = decoded([e.trg for e in test], pipe.tokenizer)
    rows = []
    for spec, sampler in samplers.items():
        start = time.perf_counter()
        outputs = pipe.generate(sources, GenerationConfig(sampler, mbr=args.mbr, batch_size=50, seed=args.seed))
        seconds = time.perf_counter() - start
        metrics, iv = score([o.hypothesis for o in outputs], refs)
        rows.append(dict(sampler=spec, seconds=seconds, **metrics, iv=iv))
        print(f"{spec}: {seconds:.1f} s, " + ", ".join(f"{k} {metrics[k]:.4f}" for k in METRICS), flush=True)
    base = next((r for r in rows if r["sampler"] == "ddpm:2000"), rows[-1])
    decoding = "one sample each" if args.mbr == 1 else f"the MBR choice of {args.mbr} samples each"
    lines = [f"{len(test)} test sources of {data}, model {args.model_dir}, seed {args.seed}, {decoding}",
             "", f"| sampler | time (x {base['sampler']}) | " + " | ".join(f"{k} [95% CI]" for k in METRICS)
             + f" | within {base['sampler']}'s intervals | length |",
             "|" + " --- |" * (len(METRICS) + 4)]
    for r in rows:
        cells = " | ".join(f"{r[k]:.4f} [{r['iv'][k][0]:.4f}, {r['iv'][k][1]:.4f}]" for k in METRICS)
        within = all(base["iv"][k][0] <= r[k] <= base["iv"][k][1] for k in METRICS)
        lines.append(f"| {r['sampler']} | {r['seconds'] / base['seconds']:.4f} | {cells} | "
                     f"{'yes' if within else 'no'} | {r['avg_len']:.1f} |")
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "sampler_quality.json").write_text(json.dumps(rows, indent=1) + "\n")
    (args.out / "sampler_quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


def test_split_of(model_dir: Path) -> Path:
    """The test split of the corpus the run was trained on (train's run layout: RUN/model next to
    RUN/run_config.json, whose data entry names a built-in corpus or a data directory)."""
    from moediffuseq.data import build_corpus, split_path
    from moediffuseq.run_dir import RUN_FILE

    config = model_dir.parent / RUN_FILE
    try:
        corpus = json.loads(config.read_text(encoding="utf-8"))["data"]["data"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise SystemExit(f"{model_dir}: cannot read the corpus from {config} ({type(e).__name__}: {e}); "
                         "pass --data TEST.jsonl") from None
    return split_path(Path(corpus) if Path(corpus).is_dir() else build_corpus(corpus), "test")


if __name__ == "__main__":
    main()
