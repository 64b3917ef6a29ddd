"""Quality against CPU time: MoE-DiffuSeq vs the dense ``diffuseq`` preset at equal wall time,
with and without self-conditioning, the mse over the target or over every position, DiffuSeq's
layout against a bounded target span (with and without source isolation), DPM-Solver++ 10 (with
and without clamping) vs DDPM 2000 on the same trained model, and the copy-the-source, lead
(the source's first words, as many as the median reference) and before-training baselines; all
in one run, on the same data and seeds, scored on text decoded from token ids with bootstrap 95%
intervals (moediffuseq.evaluate).

A task is ``corpus:L`` or ``corpus:L:T``: T is the target span of the span systems (default
L // 8).

Every system trains for the same wall-clock budget (--seconds) with the tiny shape (2 layers,
d_model 128; the MoE's active feed-forward width equals the dense preset's d_ff), the systems of
one task and seed in turns of --slice-seconds so that the load of a shared machine falls on all
of them alike, then generates for the first --examples test sources (the default sampler, DDPM
respaced to 10 steps, no MBR).

    python -m bench.quality                                   # the default tasks and systems
    python -m bench.quality --seconds 60 --examples 50 --seeds 0 --tasks pycode:64 pycode-body:512
    python -m bench.quality --tasks pycode-body:512 --seconds 600 --ddpm-task none \
        --systems moe-diffuseq "moe-diffuseq mse-all" "diffuseq (dense)"
    python -m bench.quality --tasks pycode:512:48 aclsum:2048:192 --seconds 300 --ddpm-task none \
        --systems moe-diffuseq "moe-diffuseq span" "moe-diffuseq span+isolation"

Every system's EMA model is also scored on the same test sources every --probe-seconds of its
training. Writes bench/out/quality.md, quality.json and quality_curves.png (train loss, BLEU and
ROUGE-L against training time).
"""
from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_OUT_DIR
from bench.sampler_quality import parse_sampler, score

from moediffuseq.data import Seq2SeqDataset, TextTokenizer, build_corpus, read_jsonl, split_path
from moediffuseq.diffusion.samplers import SamplerConfig
from moediffuseq.evaluate import decoded, evaluate_texts
from moediffuseq.generate import GenerationConfig, generate
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.train import TrainConfig, Trainer

DENSE_TINY = dict(max_len=128, d_emb=64, d_model=128, n_layers=2, n_heads=4, d_ff=256, dropout=0.0)


def _moe(L: int, V: int, **fields) -> MoEDiffuSeqConfig:
    return MoEDiffuSeqConfig.preset("tiny", max_len=L, vocab_size=V, dropout=0.0, window=min(32, L),
                                    **{"mse_target_only": True, **fields})


# name -> (L, V, T) -> config; T is the task's target span, used by the span systems only
SYSTEMS = {
    "moe-diffuseq": lambda L, V, T: _moe(L, V),
    "moe-diffuseq +self-cond": lambda L, V, T: _moe(L, V, self_conditioning=True),
    "diffuseq (dense)": lambda L, V, T: MoEDiffuSeqConfig.preset("diffuseq", **{**DENSE_TINY, "max_len": L},
                                                                 vocab_size=V, mse_target_only=True),
    # METHOD's and the reference code's mse over every position, against the target-only mse above
    "moe-diffuseq mse-all": lambda L, V, T: _moe(L, V, mse_target_only=False),
    # the bounded target span (the last T positions), without and with source isolation
    "moe-diffuseq span": lambda L, V, T: _moe(L, V, target_span=T),
    "moe-diffuseq span+isolation": lambda L, V, T: _moe(L, V, target_span=T, source_isolation=True),
}
DEFAULT_SYSTEMS = ["moe-diffuseq", "moe-diffuseq +self-cond", "diffuseq (dense)"]
# the first seed's MoE model of --ddpm-task is also sampled with these (the others: the default sampler)
SAMPLER_ROWS = ["dpm++:10", "dpm++:10+clamp", "ddpm:2000"]


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}


def slug(name: str) -> str:
    """A system's name as a directory name: "moe-diffuseq +self-cond" -> "moe-diffuseq-self-cond"."""
    return "-".join("".join(c if c.isalnum() else " " for c in name).split())


def make_trainer(cfg, tok, train_set, seed, out_dir, batch_size=32):
    """A trainer of a fresh model (seeded) and a copy of its initial weights."""
    torch.manual_seed(seed)
    model = MoEDiffuSeq(cfg)
    initial = MoEDiffuSeq(cfg)
    initial.load_state_dict(model.state_dict())
    tcfg = TrainConfig(steps=10 ** 6, batch_size=batch_size, lr=3e-3, warmup_steps=100, lr_decay="constant", ema_decay=0.999,
                       seed=seed, progress=False, eval_batches=0, bleu_examples=0)
    return Trainer(model, tok, train_set, None, tcfg, out_dir), initial


def train_round_robin(trainers, seconds, slice_seconds, probe=None, probe_seconds=0.0, clock=time.perf_counter):
    """Trains every trainer for `seconds` of its own time on `clock` (wall time by default; the
    process's CPU time with `time.process_time`), in turns of `slice_seconds`, so that a load
    that comes and goes on a shared machine falls on all systems alike. Returns each trainer's
    curve of (its training seconds, loss) and, with `probe(trainer) -> metrics`, its quality
    curve of (its training seconds, metrics) every `probe_seconds` of training (the probes' own
    time is not training time)."""
    curves = {name: [] for name in trainers}
    quality = {name: [] for name in trainers}
    spent = dict.fromkeys(trainers, 0.0)
    next_probe = dict.fromkeys(trainers, probe_seconds if probe else float("inf"))
    while any(spent[name] < seconds for name in trainers):
        for name, trainer in trainers.items():
            turn_end = min(seconds, spent[name] + slice_seconds)
            while spent[name] < turn_end:
                start = clock()
                loss = trainer.train_step()["loss"]
                spent[name] += clock() - start
                curves[name].append((spent[name], loss))
                if spent[name] >= next_probe[name]:
                    quality[name].append((spent[name], probe(trainer)))
                    next_probe[name] = (spent[name] // probe_seconds + 1) * probe_seconds  # one probe per mark passed
    return curves, quality


def parse_task(task: str) -> tuple[str, int, int]:
    """"corpus:L" or "corpus:L:T" -> (corpus, L, T), T defaulting to L // 8."""
    parts = task.split(":")
    if len(parts) not in (2, 3):
        raise SystemExit(f"--tasks: {task!r} is not corpus:L or corpus:L:T")
    L = int(parts[1])
    return parts[0], L, int(parts[2]) if len(parts) == 3 else L // 8


def lead(sources: list[str], words: int) -> list[str]:
    """The lead baseline: the first ``words`` words of each source."""
    return [" ".join(s.split()[:words]) for s in sources]


def generate_texts(model, tok, sources, target_len, sampler=None):
    cfg = GenerationConfig(sampler or SamplerConfig(), batch_size=50, seed=0)
    start = time.perf_counter()
    out = generate(model, tok, sources, cfg, target_len)
    return [o.hypothesis for o in out], time.perf_counter() - start


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tasks", nargs="+", default=["pycode:64", "pycode:256", "pycode-body:512"])
    p.add_argument("--seconds", type=float, default=60.0, help="training wall time of every system")
    p.add_argument("--probe-seconds", type=float, default=None,
                   help="score every system's EMA model on the test sources every this many seconds of its "
                        "training (default: --seconds / 6; 0: only at the end)")
    p.add_argument("--clock", choices=["wall", "cpu"], default="wall",
                   help="what --seconds, --probe-seconds and --slice-seconds count: wall time, or the process's "
                        "CPU time (all its threads), which a machine shared with other work does not shrink")
    p.add_argument("--slice-seconds", type=float, default=5.0,
                   help="the systems of a task and seed train in turns of this many seconds each")
    p.add_argument("--examples", type=int, default=50, help="test sources generated per system")
    p.add_argument("--batch-size", type=int, default=32, help="training batch size of every system")
    p.add_argument("--seeds", type=int, nargs="+", default=[0])
    p.add_argument("--ddpm-task", default="pycode:64",
                   help=f"task whose MoE model (of the first seed) is also sampled with {', '.join(SAMPLER_ROWS)}")
    p.add_argument("--systems", nargs="+", default=DEFAULT_SYSTEMS, choices=list(SYSTEMS))
    p.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = p.parse_args()
    torch.set_num_threads(max(1, os.cpu_count() or 1))
    probe_seconds = args.seconds / 6 if args.probe_seconds is None else args.probe_seconds
    rows, curves, probes = [], {}, {}
    for task in args.tasks:
        corpus, L, span = parse_task(task)
        data = build_corpus(corpus)
        train_ex = read_jsonl(split_path(data, "train")).examples
        test_ex = read_jsonl(split_path(data, "test")).examples[:args.examples]
        tok = TextTokenizer.train((t for e in train_ex for t in (e.src, e.trg)), 2048, kind="wordpiece")
        train_sets = {}  # one packing per layout: DiffuSeq's (None) or the span's

        def train_set_of(cfg):
            if cfg.target_span not in train_sets:
                train_sets[cfg.target_span] = Seq2SeqDataset(train_ex, tok, L, cfg.target_span)
            return train_sets[cfg.target_span]

        sources = [e.src for e in test_ex]
        refs = decoded([e.trg for e in test_ex], tok)
        target_len = train_set_of(SYSTEMS["moe-diffuseq"](L, len(tok), span)).target_length_quantile(0.5)
        m, iv = score(decoded(sources, tok), refs)
        rows.append(dict(task=task, system="copy the source", seed="-", train_s=0, steps=0, gen_s=0, **m, iv=iv))
        words = sorted(len(r.split()) for r in refs)[len(refs) // 2]
        m, iv = score(decoded(lead(sources, words), tok), refs)
        rows.append(dict(task=task, system=f"lead ({words} words)", seed="-", train_s=0, steps=0, gen_s=0, **m,
                         iv=iv))
        for seed in args.seeds:
            made = {}
            for name in args.systems:
                cfg = SYSTEMS[name](L, len(tok), span)
                made[name] = make_trainer(cfg, tok, train_set_of(cfg), seed,
                                          args.out / "quality_runs" / f"{corpus}{L}-{slug(name)}-{seed}",
                                          args.batch_size)

            def probe(trainer):
                row = evaluate_texts(generate_texts(trainer.ema, tok, sources, target_len)[0], refs)
                return {k: row[k] for k in ("bleu", "rougeL", "avg_len")}

            task_curves, task_probes = train_round_robin({name: made[name][0] for name in args.systems}, args.seconds,
                                                         args.slice_seconds, probe if probe_seconds > 0 else None,
                                                         probe_seconds, CLOCKS[args.clock])
            for name in args.systems:
                trainer, initial = made[name]
                curve = task_curves[name]
                curves[f"{task} {name} s{seed}"] = curve
                probes[f"{task} {name} s{seed}"] = task_probes[name]
                if name == args.systems[0]:
                    hyps, gen_s = generate_texts(initial, tok, sources, target_len)
                    m, iv = score(hyps, refs)
                    rows.append(dict(task=task, system=f"{name} before training", seed=seed, train_s=0, steps=0,
                                     gen_s=gen_s, **m, iv=iv))
                hyps, gen_s = generate_texts(trainer.ema, tok, sources, target_len)
                m, iv = score(hyps, refs)
                rows.append(dict(task=task, system=name, seed=seed, train_s=round(curve[-1][0], 1),
                                 steps=len(curve), gen_s=gen_s, final_loss=curve[-1][1], **m, iv=iv))
                print(rows[-1], flush=True)
                if task == args.ddpm_task and name == "moe-diffuseq" and seed == args.seeds[0]:
                    for spec in SAMPLER_ROWS:
                        hyps, gen_s = generate_texts(trainer.ema, tok, sources, target_len, parse_sampler(spec))
                        m, iv = score(hyps, refs)
                        rows.append(dict(task=task, system=f"{name}, sampler {spec}", seed=seed,
                                         train_s=round(curve[-1][0], 1), steps=len(curve), gen_s=gen_s, **m, iv=iv))
                        print(rows[-1], flush=True)
    write_outputs(args.out, rows, curves, probes, args.clock)


def write_outputs(out: Path, rows, curves, probes, clock: str = "wall") -> None:
    """quality.json (everything), quality.md (the final scores with intervals, then the quality
    probes during training) and quality_curves.png (train loss, BLEU and ROUGE-L against time)."""
    out.mkdir(parents=True, exist_ok=True)
    (out / "quality.json").write_text(json.dumps({"rows": rows, "curves": curves, "probes": probes, "clock": clock},
                                                 indent=1) + "\n")
    unit = "training wall time (s)" if clock == "wall" else "training CPU time (s, all threads)"
    lines = ["| task | system | seed | train s | steps | generate s | BLEU [95% CI] | ROUGE-2 [95% CI] | "
             "ROUGE-L [95% CI] | length |", "|" + " --- |" * 10]
    for r in rows:
        cell = lambda k: f"{r[k]:.4f} [{r['iv'][k][0]:.4f}, {r['iv'][k][1]:.4f}]"  # noqa: E731
        lines.append(f"| {r['task']} | {r['system']} | {r['seed']} | {r['train_s']} | {r['steps']} | "
                     f"{r['gen_s']:.1f} | {cell('bleu')} | {cell('rouge2')} | {cell('rougeL')} | "
                     f"{r['avg_len']:.1f} |")
    if any(probes.values()):
        lines += ["", "Quality during training (EMA model, the same test sources; BLEU / ROUGE-L / output words at "
                  "training seconds):",
                  "", "| run | probes |", "| --- | --- |"]
        for label, points in probes.items():
            lines.append(f"| {label} | " + ", ".join(f"{t:.0f} s: {m['bleu']:.4f} / {m['rougeL']:.3f} / {m.get('avg_len', 0):.0f} w"
                                                    for t, m in points) + " |")
    (out / "quality.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, (loss_ax, bleu_ax, rouge_ax) = plt.subplots(1, 3, figsize=(15, 4.5))
    for label, curve in curves.items():
        line, = loss_ax.plot([c[0] for c in curve], [c[1] for c in curve], label=label, linewidth=0.8)
        points = probes.get(label, [])
        for ax, key in ((bleu_ax, "bleu"), (rouge_ax, "rougeL")):
            ax.plot([t for t, _ in points], [m[key] for _, m in points], marker="o", color=line.get_color())
    loss_ax.set(xlabel=unit, ylabel="train loss", yscale="log")
    bleu_ax.set(xlabel=unit, ylabel="test sentence BLEU")
    rouge_ax.set(xlabel=unit, ylabel="test ROUGE-L")
    loss_ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(out / "quality_curves.png", dpi=100)
    print(f"plot: {out / 'quality_curves.png'}")


if __name__ == "__main__":
    main()
