"""Sampling speed: DPM-Solver++ (10 steps) against DDPM over all 2000 steps, for the `tiny` and
`base` presets at L = 512 and 2048 (randomly initialised weights: speed does not depend on
them). Each sequence is half source, half target.

DDPM's 2000 model calls are timed over ``--ddpm-probe`` steps and extrapolated linearly (every
DDPM step costs the same: one model call and one update); the table says so.

    python -m bench.sampling
    python -m bench.sampling --quick      # tiny preset only
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from bench.common import DEFAULT_OUT_DIR, write_table

from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SamplerConfig, sample
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig


def run(model: MoEDiffuSeq, schedule: NoiseSchedule, batch: int, L: int, cfg: SamplerConfig) -> tuple[float, int]:
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (batch, L), generator=g)
    target = torch.zeros(batch, L, dtype=torch.bool)
    target[:, L // 2:] = True
    cond = model.condition(ids, target)
    start = time.perf_counter()
    result = sample(cond, schedule, cfg, generator=g)
    return time.perf_counter() - start, result.steps_taken


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--presets", nargs="+", default=["tiny", "base"])
    parser.add_argument("--lengths", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--dpm-steps", type=int, default=10)
    parser.add_argument("--ddpm-probe", type=int, default=20, help="DDPM steps actually run, then extrapolated")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    presets = ["tiny"] if args.quick else args.presets
    lengths = [512] if args.quick else args.lengths
    rows = []
    torch.manual_seed(0)
    for preset in presets:
        for L in lengths:
            cfg = MoEDiffuSeqConfig.preset(preset, vocab_size=8192, max_len=L, dropout=0.0)
            model = MoEDiffuSeq(cfg).eval()
            schedule = NoiseSchedule.create(cfg.schedule, cfg.diffusion_steps)
            with torch.inference_mode():
                run(model, schedule, args.batch, L, SamplerConfig("dpm++", 2))  # warm-up
                t_dpm, calls = run(model, schedule, args.batch, L, SamplerConfig("dpm++", args.dpm_steps))
                probe = schedule.respace(list(range(args.ddpm_probe)))  # the first steps of the full chain
                t_probe, probe_calls = run(model, probe, args.batch, L, SamplerConfig("ddpm", args.ddpm_probe))
            t_ddpm = t_probe / probe_calls * schedule.num_steps
            rows.append({"preset": preset, "L": L, "batch": args.batch,
                         "dpm++ steps": args.dpm_steps, "dpm++ model calls": calls, "dpm++ s": t_dpm,
                         "dpm++ seq/s": args.batch / t_dpm,
                         "ddpm steps": schedule.num_steps, "ddpm s (extrapolated)": t_ddpm,
                         "ddpm seq/s": args.batch / t_ddpm, "speed-up": t_ddpm / t_dpm})
            print(rows[-1], flush=True)
    write_table(rows, list(rows[0]), "sampling", out_dir=args.out,
                title="Sampling: DPM-Solver++ vs 2000-step DDPM",
                notes=[f"DDPM time = {args.ddpm_probe} measured steps x (2000 / {args.ddpm_probe}); one model call "
                       "and one fused update per step", "weights randomly initialised; half source, half target"])


if __name__ == "__main__":
    main()
