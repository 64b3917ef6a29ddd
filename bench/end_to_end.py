"""End to end: training and sampling throughput of MoE-DiffuSeq against the dense DiffuSeq
preset with equal active parameters, and quality after equal training on one corpus.

Shapes. ``moe-diffuseq``: block-sparse attention (window 256, globals = special tokens + a
target span of at most 512), MoE feed-forward with E=8, k=2, expert width F/2, soft absorbing
state. ``diffuseq``: dense attention, dense feed-forward of width F, no absorbing state. Both
have the same layers, width and heads, so their active parameters per token are equal. On a
GPU both are the ``base`` preset (12 x 768, F=3072); on a 2-core CPU an equal-shape scaled
version (4 x 256, 4 heads, F=1024) keeps the run within minutes.

Training throughput: tokens/s of whole optimizer steps (forward, backward, AdamW) with about
8192 tokens a step (batch = 8192 / L), half source and half target; peak memory of a fresh
process per (model, L). Sampling: DPM-Solver++ with 10 steps for MoE-DiffuSeq against DDPM
over all 2000 steps for DiffuSeq (timed over --ddpm-probe steps and extrapolated).
Quality: both trained for the same number of steps on the pycode corpus (L=64) through the
training entry (moediffuseq.train_run), then wall time, validation loss and sample BLEU of each.

    python -m bench.end_to_end                      # CPU, L = 512, 2048, 8192
    python -m bench.end_to_end --device cuda        # base shapes, bf16 autocast
    python -m bench.end_to_end --quality-steps 0    # throughput only
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_OUT_DIR, write_table

from moediffuseq.diffusion import NoiseSchedule, diffusion_loss
from moediffuseq.diffusion.samplers import SamplerConfig, sample
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig

CPU_SHAPE = dict(n_layers=4, d_model=256, n_heads=4, d_expert=512, d_ff=1024)
TOKENS_PER_STEP = 8192


def model_config(name: str, L: int, device: str, vocab: int = 8192) -> MoEDiffuSeqConfig:
    shape = {} if device.startswith("cuda") else CPU_SHAPE
    preset = "base" if name == "moe-diffuseq" else "diffuseq"
    return MoEDiffuSeqConfig.preset(preset, vocab_size=vocab, max_len=L, dropout=0.0, **shape)


def batch(cfg: MoEDiffuSeqConfig, B: int, device: str, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    L = cfg.max_len
    ids = torch.randint(3, cfg.vocab_size, (B, L), generator=g)
    ids[:, 0], ids[:, L // 2 - 1] = 1, 2
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, L // 2:] = True
    return ids.to(device), target.to(device)


def training_step(name: str, L: int, device: str, bf16: bool):
    """The model of ``name`` at length L, and one optimizer step (loss, backward, AdamW) on a
    fixed batch of TOKENS_PER_STEP tokens: (cfg, model, batch size, step)."""
    torch.manual_seed(0)
    cfg = model_config(name, L, device)
    model = MoEDiffuSeq(cfg).to(device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    schedule = NoiseSchedule.create(cfg.schedule, cfg.diffusion_steps)
    B = max(1, TOKENS_PER_STEP // L)
    ids, target = batch(cfg, B, device)
    g = torch.Generator().manual_seed(1)

    def step():
        t = torch.randint(0, schedule.num_steps, (B,), generator=g).to(device)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = diffusion_loss(model, schedule, ids, target, t).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    return cfg, model, B, step


def train_worker(name: str, L: int, device: str, steps: int, bf16: bool) -> dict:
    """Runs in a fresh process: tokens/s of optimizer steps and the peak memory."""
    _, model, B, step = training_step(name, L, device, bf16)
    step()  # warm-up
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    times.sort()
    median = times[len(times) // 2]
    if device.startswith("cuda"):
        peak = torch.cuda.max_memory_allocated() / 2**30
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    params = sum(p.numel() for p in model.parameters())
    return {"step_s": median, "tokens_per_s": B * L / median, "peak_gib": peak, "batch": B, "params_m": params / 1e6}


def sampling_speed(name: str, L: int, device: str, probe: int, bf16: bool) -> dict:
    torch.manual_seed(0)
    cfg = model_config(name, L, device)
    model = MoEDiffuSeq(cfg).to(device).eval()
    schedule = NoiseSchedule.create(cfg.schedule, cfg.diffusion_steps)
    ids, target = batch(cfg, 1, device)
    cond = model.condition(ids, target, torch.bfloat16 if bf16 else None)

    def run(sched, scfg):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        start = time.perf_counter()
        result = sample(cond, sched, scfg, generator=torch.Generator(device=device).manual_seed(0))
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        return time.perf_counter() - start, result.steps_taken

    with torch.inference_mode():
        run(schedule, SamplerConfig("dpm++", 2))  # warm-up
        if name == "moe-diffuseq":
            seconds, calls = run(schedule, SamplerConfig("dpm++", 10))
            return {"sampler": "dpm++ 10", "seconds": seconds, "calls": calls}
        probe_sched = schedule.respace(list(range(probe)))
        seconds, calls = run(probe_sched, SamplerConfig("ddpm", probe))
        return {"sampler": f"ddpm {schedule.num_steps}", "seconds": seconds / calls * schedule.num_steps,
                "calls": schedule.num_steps}


def quality(steps: int, device: str, out_dir: Path, bf16: bool) -> list[dict]:
    """Both models trained for the same number of steps on pycode (tiny-size shapes, L=64) through
    the training entry, with the same tokenizer; their wall time, validation loss and BLEU."""
    import csv

    from moediffuseq.train import TrainConfig
    from moediffuseq.train_run import TrainingRun, run

    shape = dict(max_len=64, d_emb=64, d_model=128, n_layers=2, n_heads=4, window=32, d_ff=256)
    models = {"moe-diffuseq": MoEDiffuSeqConfig.preset("tiny", **shape, num_experts=8, d_expert=128),
              "diffuseq": MoEDiffuSeqConfig.preset("diffuseq", **shape)}
    rows, tokenizer = [], None
    for name, cfg in models.items():
        tc = TrainConfig(steps=steps, batch_size=32, lr=2e-3, warmup_steps=100, ema_decay=0.999, eval_every=0,
                         save_every=0, bleu_examples=64, bf16=bf16, progress=False)
        out = out_dir / f"quality-{name}"
        run(TrainingRun("pycode", out, cfg, tc, tokenizer=tokenizer, vocab_size=2048, device=device, overwrite=True))
        tokenizer = tokenizer or out / "tokenizer.json"  # the second model reads the first one's tokenizer
        with (out / "metrics.csv").open(newline="") as f:
            valid = [r for r in csv.DictReader(f) if r["split"] == "valid"][-1]
        rows.append({"model": name, "steps": steps, "minutes": float(valid["elapsed_s"]) / 60,
                     "valid loss": float(valid["loss"]), "valid BLEU (EMA)": float(valid["bleu"])})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048, 8192])
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per (model, L)")
    parser.add_argument("--ddpm-probe", type=int, default=10)
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast in training and sampling (default: on for CUDA, off for CPU)")
    parser.add_argument("--quality-steps", type=int, default=1000, help="training steps per model (0: skip)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--worker", nargs=2, metavar=("MODEL", "L"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    bf16 = args.device.startswith("cuda") if args.bf16 is None else args.bf16
    if args.worker:
        print(json.dumps(train_worker(args.worker[0], int(args.worker[1]), args.device, args.steps, bf16)))
        return

    rows = []
    for L in args.lengths:
        result = {}
        for name in ("moe-diffuseq", "diffuseq"):
            cmd = [sys.executable, "-m", "bench.end_to_end", "--device", args.device, "--steps", str(args.steps),
                   "--bf16" if bf16 else "--no-bf16", "--worker", name, str(L)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                print(f"{name} L={L}: training run failed\n{proc.stderr[-2000:]}", flush=True)
                result[name] = None
                continue
            result[name] = json.loads(proc.stdout.strip().splitlines()[-1])
            result[name].update(sampling=sampling_speed(name, L, args.device, args.ddpm_probe, bf16))
            print(name, L, result[name], flush=True)
        moe, dense = result["moe-diffuseq"], result["diffuseq"]
        row = {"L": L, "batch": moe["batch"] if moe else None}
        if moe:
            row.update({"MoE tok/s": moe["tokens_per_s"], "MoE peak GiB": moe["peak_gib"],
                        "MoE dpm++10 s/seq": moe["sampling"]["seconds"]})
        if dense:
            row.update({"dense tok/s": dense["tokens_per_s"], "dense peak GiB": dense["peak_gib"],
                        "dense ddpm2000 s/seq": dense["sampling"]["seconds"]})
        if moe and dense:
            row["train speed-up"] = moe["tokens_per_s"] / dense["tokens_per_s"]
            row["sampling speed-up"] = dense["sampling"]["seconds"] / moe["sampling"]["seconds"]
        rows.append(row)
    shape = "base (12 x 768, 12 heads, F=3072)" if args.device.startswith("cuda") else \
        "4 layers x 256, 4 heads, F=1024 (MoE: E=8, k=2, width 512)"
    columns = ["L", "batch", "MoE tok/s", "dense tok/s", "train speed-up", "MoE peak GiB", "dense peak GiB",
               "MoE dpm++10 s/seq", "dense ddpm2000 s/seq", "sampling speed-up"]
    write_table(rows, columns, f"end_to_end_{args.device.split(':')[0]}",
                out_dir=args.out, title=f"End to end on {args.device}: MoE-DiffuSeq vs dense DiffuSeq",
                notes=[f"shapes: {shape}; equal active parameters per token",
                       f"training: ~{TOKENS_PER_STEP} tokens/step, median of {args.steps} steps, "
                       f"{'bf16 autocast' if bf16 else 'fp32'}; peak memory of a fresh process",
                       f"DDPM time = {args.ddpm_probe} measured steps x (2000 / {args.ddpm_probe}) (extrapolated)"])
    if args.quality_steps > 0:
        q = quality(args.quality_steps, args.device, args.out, bf16)
        write_table(q, list(q[0]), f"end_to_end_quality_{args.device.split(':')[0]}", out_dir=args.out,
                    title="Quality after equal training steps (pycode, L=64, tiny shapes)",
                    notes=["MoE: E=8, k=2, width 128; dense: FFN 256; validation BLEU of the EMA weights on 64 "
                           "sources with DPM-Solver++ 10 steps"])


if __name__ == "__main__":
    main()
