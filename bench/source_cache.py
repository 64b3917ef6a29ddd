"""Sampling a long document with the source cache against the full-sequence path, on the same
source-isolated model with a bounded target span: the cost of one sample and of an MBR choice
over 10, and the peak memory of each path.

Shapes: ``tiny`` (2 x 128, E=4) and the 4 x 256 shape of bench.end_to_end (E=8, k=2, width 512,
window 256), each at L = 8192 with a 256-token span and L = 32768 with a 512-token span, batch 1,
the source filling the rest (a whole document). Randomly initialised weights: the speed does not
depend on them. The default sampler (DDPM respaced to 10 steps), fp32 on the CPU.

The full path runs the model on all L positions at every step. The cached path runs the source
through the model once (timed) and then only the span's T rows at every step, for every sample
of the MBR choice. Each (shape, L, path) runs in a fresh process, so that its peak memory (max
RSS, minus the RSS after the model was built) is its own.

    python -m bench.source_cache
    python -m bench.source_cache --shapes tiny --lengths 8192:256 --mbr 1
    python -m bench.source_cache --global-target-max 16   # fewer target rows read the whole source

Every target position is global by default (``global_target_max`` 512 >= T): each target row
attends to every source key at every step, a cost of T x L that the cache cannot remove (the
queries change at every step); ``--global-target-max`` measures the same with fewer global rows.
"""
from __future__ import annotations

import argparse
import json
import resource
import subprocess
import sys
import time
from pathlib import Path
from typing import Optional

import torch

from bench.common import DEFAULT_OUT_DIR, write_table
from bench.end_to_end import CPU_SHAPE

from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SamplerConfig, sample
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig

SHAPES = {"tiny": ("tiny", {}), "4x256": ("base", CPU_SHAPE)}


def model_config(shape: str, L: int, T: int, global_target_max: Optional[int] = None) -> MoEDiffuSeqConfig:
    preset, fields = SHAPES[shape]
    if global_target_max is not None:
        fields = {**fields, "global_target_max": global_target_max}
    return MoEDiffuSeqConfig.preset(preset, vocab_size=8192, max_len=L, target_span=T, source_isolation=True,
                                    dropout=0.0, **fields)


def rss_gib() -> float:
    """The resident set size of this process now (Linux)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize() / 2**30


def worker(shape: str, L: int, T: int, cached: bool, mbrs: list[int], global_target_max: Optional[int] = None
           ) -> dict:
    """In a fresh process: seconds of one batch's source pass and MBR samples, per MBR size."""
    torch.manual_seed(0)
    cfg = model_config(shape, L, T, global_target_max)
    model = MoEDiffuSeq(cfg).eval()
    schedule = NoiseSchedule.create(cfg.schedule, cfg.diffusion_steps)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(4, cfg.vocab_size, (1, L), generator=g)  # (1, L): a source of L - T - 2 tokens
    ids[:, 0], ids[:, L - T - 1], ids[:, L - T:] = 1, 2, 0
    target = torch.zeros(1, L, dtype=torch.bool)
    target[:, L - T:] = True
    sampler = SamplerConfig()
    base_rss = rss_gib()

    def batch(samples: int) -> float:
        start = time.perf_counter()
        cond = model.condition(ids, target, None, torch.tensor([T - 1]), source_cache=cached)
        for s in range(samples):
            sample(cond, schedule, sampler, generator=torch.Generator().manual_seed(s))
        return time.perf_counter() - start

    result = {}
    with torch.inference_mode():
        batch(1)  # warm-up
        for samples in mbrs:
            result[f"mbr{samples}_s"] = batch(samples)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB -> GiB
    result.update(peak_gib=peak, sampling_peak_gib=peak - base_rss, calls=sampler.steps)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    parser.add_argument("--lengths", nargs="+", default=["8192:256", "32768:512"], help="L:T pairs")
    parser.add_argument("--mbr", type=int, nargs="+", default=[1, 10], help="samples per source")
    parser.add_argument("--global-target-max", type=int, default=None,
                        help="global target positions (default: the preset's 512, every position of the span)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    parser.add_argument("--worker", nargs=4, metavar=("SHAPE", "L", "T", "CACHED"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        shape, L, T, cached = args.worker
        print(json.dumps(worker(shape, int(L), int(T), cached == "1", args.mbr, args.global_target_max)))
        return

    rows = []
    for shape in args.shapes:
        for spec in args.lengths:
            L, T = (int(x) for x in spec.split(":"))
            runs = {}
            for cached in (False, True):
                cmd = [sys.executable, "-m", "bench.source_cache", "--worker", shape, str(L), str(T),
                       "1" if cached else "0", "--mbr", *map(str, args.mbr),
                       *(["--global-target-max", str(args.global_target_max)] if args.global_target_max else [])]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SystemExit(f"{shape} L={L} cached={cached}: the worker failed\n{proc.stderr[-3000:]}")
                runs[cached] = json.loads(proc.stdout.strip().splitlines()[-1])
                print(shape, L, T, "cached" if cached else "full", runs[cached], flush=True)
            full, cache = runs[False], runs[True]
            for samples in args.mbr:
                key = f"mbr{samples}_s"
                rows.append({"shape": shape, "L": L, "T": T, "global T": min(T, model_config(shape, L, T,
                             args.global_target_max).global_target_max), "MBR": samples, "full s": full[key],
                             "cached s": cache[key], "speed-up": full[key] / cache[key],
                             "full peak GiB": full["sampling_peak_gib"], "cached peak GiB": cache["sampling_peak_gib"]})
    name = "source_cache" if args.global_target_max is None else f"source_cache_g{args.global_target_max}"
    write_table(rows, list(rows[0]), name, out_dir=args.out,
                title="Sampling with the source cache vs the full sequence (same model, same sampler)",
                notes=["default sampler (DDPM respaced to 10 steps, 10 model calls a sample), batch 1, fp32; "
                       "time of one batch: its source pass (cached path) and its MBR samples",
                       "peak GiB: the process's max RSS minus its RSS after building the model (fresh process "
                       "per shape, L and path)"])


if __name__ == "__main__":
    main()
