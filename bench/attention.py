"""Benchmark ``moediffuseq.ops.block_sparse_attention`` against PyTorch baselines (CPU or CUDA).

For every sequence length it times the forward pass and the forward+backward pass of the op
(float32 and bfloat16), dense SDPA, SDPA with the allowed pattern as a boolean mask, compiled
FlexAttention with the same pattern, and the dense pure-PyTorch reference. Throughput is in
useful GFLOP/s: every method is credited only with the FLOPs of the allowed (query, key) pairs.
The table goes to ``<out>/attention.md`` and ``<out>/attention.csv``; a Targets section follows.
The problem, its pair count and the methods are in bench/attention_problem.py, the CUDA mode
(bfloat16, CUDA events) in bench/attention_cuda.py.

    python -m bench.attention --quick        # smoke run, L in {1024, 4096}
    python -m bench.attention                # full run, L up to 32768
    python -m bench.attention --device cuda  # GPU run (see run_cuda), L in {8k, 32k, 128k}
    python -m bench.attention --device cuda --lengths 8192 32768   # a table line per L as it finishes
    python -m bench.attention --causal --lengths 8192   # causal: SDPA is_causal, the causal band as a
                                                        # bool mask, FlexAttention with q >= kv
"""
from __future__ import annotations

import argparse
import gc
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.attention_cuda import CUDA_LENGTHS, run_cuda
from bench.attention_problem import (BACKWARD_FLOP_FACTOR, CHECK_MAX_LENGTH, FLEX, FWD, FWD_BWD, OURS_BF16, OURS_FP32,
                                     PASSES, REFERENCE, SDPA_DENSE, SDPA_MASK, Attention, Built, Config, Key, Method,
                                     Problem, build_flex, build_ours, build_reference, build_sdpa_dense,
                                     build_sdpa_mask, forward_flops, make_problem, report_progress, sanity_check)
from bench.common import DEFAULT_OUT_DIR, Cell, Timing, copy_bandwidth, matmul_rate, measure, write_table

METHODS = (
    Method(OURS_FP32, torch.float32, build_ours),
    Method(OURS_BF16, torch.bfloat16, build_ours),
    Method(SDPA_DENSE, torch.float32, build_sdpa_dense, max_length=16384),
    Method(SDPA_MASK, torch.float32, build_sdpa_mask, max_length=8192),
    Method(FLEX, torch.float32, build_flex),
    Method(REFERENCE, torch.float32, build_reference, max_length=8192),
)


def time_forward(method: Method, built: Built, problem: Problem, cfg: Config) -> Timing:
    """Median forward time under no_grad."""
    q, k, v = (t.to(method.dtype) for t in (problem.q, problem.k, problem.v))
    with torch.no_grad():
        return measure(
            lambda: built.attend(q, k, v),
            warmup=0 if built.first_call_s is not None else 1,
            repeats=cfg.repeats,
            max_seconds=cfg.cell_seconds,
            slow_call_seconds=cfg.slow_call_seconds,
        )


def time_forward_backward(method: Method, attend: Attention, problem: Problem, cfg: Config) -> Timing:
    """Median time of forward plus ``out.backward(grad)``, with grads reset before each call."""
    leaves = [t.detach().to(method.dtype).requires_grad_() for t in (problem.q, problem.k, problem.v)]
    grad = problem.grad.to(method.dtype)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        attend(*leaves).backward(grad)

    return measure(
        step, warmup=1, repeats=cfg.repeats,
        max_seconds=cfg.cell_seconds, slow_call_seconds=cfg.slow_call_seconds,
    )


def run(cfg: Config, notes: list[str]) -> tuple[dict[Key, Timing], dict[Key, str], dict[int, int]]:
    """Time every (L, method, pass); returns timings, statuses of untimed cells and the
    allowed-pair count per L. Appends setup and compile observations to ``notes``."""
    timings: dict[Key, Timing] = {}
    statuses: dict[Key, str] = {}
    pairs: dict[int, int] = {}
    for length in cfg.lengths:
        problem = make_problem(length, cfg)
        pairs[length] = problem.pairs
        if length <= CHECK_MAX_LENGTH:
            sanity_check(problem, cfg)
        for method in METHODS:
            if method.max_length is not None and length > method.max_length:
                for pass_ in PASSES:
                    statuses[(length, method.name, pass_)] = "skipped (memory)"
                continue
            built = method.build(problem, cfg)
            forward = timings[(length, method.name, FWD)] = time_forward(method, built, problem, cfg)
            report_progress(length, method.name, FWD, forward)
            observations = [built.setup_note] if built.setup_note else []
            if built.first_call_s is not None:
                observations.insert(0, f"first call {built.first_call_s:.1f} s, "
                                       f"so compile ~ {built.first_call_s - forward['median_s']:.1f} s")
            if observations:
                notes.append(f"{method.name} at L={length}: " + "; ".join(observations))
            key = (length, method.name, FWD_BWD)
            if built.no_backward is not None:
                statuses[key] = "n/a (no backward)"
                note = f"{method.name} backward: {built.no_backward}"
                if note not in notes:
                    notes.append(note)
            else:
                timings[key] = time_forward_backward(method, built.attend, problem, cfg)
                report_progress(length, method.name, FWD_BWD, timings[key])
            del built
            gc.collect()
        del problem
        gc.collect()
    return timings, statuses, pairs


def table_rows(
    cfg: Config,
    timings: dict[Key, Timing],
    statuses: dict[Key, str],
    pairs: dict[int, int],
    rates: dict[torch.dtype, float],
) -> list[dict[str, Cell]]:
    """One row per (L, method, pass) with time, useful GFLOP/s, % of matmul rate, speed-up."""
    rows: list[dict[str, Cell]] = []
    for length in cfg.lengths:
        for method in METHODS:
            for pass_ in PASSES:
                key = (length, method.name, pass_)
                row: dict[str, Cell] = {"L": length, "method": method.name, "pass": pass_}
                timing = timings.get(key)
                if timing is None:
                    row["status"] = statuses.get(key, "not run")
                    rows.append(row)
                    continue
                flops = forward_flops(cfg, pairs[length]) * (BACKWARD_FLOP_FACTOR if pass_ == FWD_BWD else 1.0)
                seconds = timing["median_s"]
                gflops = flops / seconds / 1e9
                row.update({
                    "median ms": seconds * 1e3,
                    "runs": timing["repeats"],
                    "useful GFLOP/s": gflops,
                    "% matmul": 100.0 * gflops / rates[method.dtype],
                    "status": "ok" if timing["repeats"] > 1 else "ok (1 run)",
                })
                ours = timings.get((length, OURS_FP32, pass_))
                if ours is not None:
                    row["ours fp32 speed-up"] = seconds / ours["median_s"]
                rows.append(row)
    return rows


def target_lines(
    cfg: Config, timings: dict[Key, Timing], pairs: dict[int, int], rates: dict[torch.dtype, float]
) -> list[str]:
    """PASS/FAIL lines for the performance targets, from this run's timings."""

    def seconds(length: int, method: str, pass_: str) -> Optional[float]:
        timing = timings.get((length, method, pass_))
        return None if timing is None else timing["median_s"]

    def verdict(label: str, value: Optional[float], threshold: float, higher_is_better: bool, unit: str) -> str:
        if value is None:
            return f"{label}: not run"
        ok = value >= threshold if higher_is_better else value <= threshold
        sign = ">=" if higher_is_better else "<="
        return f"{label}: {'PASS' if ok else 'FAIL'} (measured {value:.2f}{unit}, target {sign} {threshold:g}{unit})"

    def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
        return None if num is None or den is None else num / den

    ours_fwd = seconds(8192, OURS_FP32, FWD)
    matmul_pct = None
    if ours_fwd is not None:
        matmul_pct = 100.0 * forward_flops(cfg, pairs[8192]) / ours_fwd / 1e9 / rates[torch.float32]
    return [
        verdict("fp32 forward vs compiled FlexAttention at L=8192 (t_flex / t_ours)",
                ratio(seconds(8192, FLEX, FWD), ours_fwd), 5.0, True, "x"),
        verdict("fp32 forward useful GFLOP/s vs fp32 matmul rate at L=8192",
                matmul_pct, 50.0, True, "%"),
        verdict("fp32 fwd+bwd vs SDPA with bool mask at L=8192 (t_sdpa / t_ours)",
                ratio(seconds(8192, SDPA_MASK, FWD_BWD), seconds(8192, OURS_FP32, FWD_BWD)), 5.0, True, "x"),
        verdict("linearity, fp32 forward t(32768) / t(8192)",
                ratio(seconds(32768, OURS_FP32, FWD), ours_fwd), 4.5, False, "x"),
        verdict("linearity, fp32 fwd+bwd t(32768) / t(8192)",
                ratio(seconds(32768, OURS_FP32, FWD_BWD), seconds(8192, OURS_FP32, FWD_BWD)), 4.5, False, "x"),
        verdict("bf16 forward vs fp32 forward at L=8192 (t_fp32 / t_bf16)",
                ratio(ours_fwd, seconds(8192, OURS_BF16, FWD)), 2.0, True, "x"),
    ]


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Config, int, str]:
    """Command-line flags -> (Config, thread count, device)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--heads", type=int, help="default 8 (cpu), 16 (cuda)")
    parser.add_argument("--dim", type=int, help="default 64 (cpu), 128 (cuda)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--globals", type=int, default=64, dest="n_global", help="number of global tokens")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="default 1024 4096 8192 16384 32768 (cpu), 8192 32768 131072 (cuda)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, help="timed calls per cell (default 5, 2 with --quick)")
    parser.add_argument("--cell-seconds", type=float, default=15.0,
                        help="stop repeating a cell once its timed calls reach this many seconds")
    parser.add_argument("--slow-call-seconds", type=float, default=20.0,
                        help="a cell whose first call takes longer is recorded from that one call")
    parser.add_argument("--quick", action="store_true", help="L in {1024, 4096} and fewer repeats")
    parser.add_argument("--causal", action="store_true", help="causal attention (key j <= query i) for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda:
        lengths = args.lengths or ([8192] if args.quick else list(CUDA_LENGTHS))
        repeats = args.repeats or (3 if args.quick else 10)
    else:
        lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 8192, 16384, 32768])
        repeats = args.repeats or (2 if args.quick else 5)
    heads = args.heads or (16 if cuda else 8)
    dim = args.dim or (128 if cuda else 64)
    cfg = Config(
        batch=args.batch, heads=heads, dim=dim, window=args.window, dilation=args.dilation,
        n_global=args.n_global, lengths=tuple(lengths), repeats=repeats, cell_seconds=args.cell_seconds,
        slow_call_seconds=args.slow_call_seconds, seed=args.seed, out=args.out, causal=args.causal,
    )
    return cfg, args.threads, args.device


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, threads, device = parse_args(argv)
    if device == "cuda":
        run_cuda(cfg)
        return
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    rates = {dtype: matmul_rate(dtype) for dtype in (torch.float32, torch.bfloat16)}
    bandwidth = copy_bandwidth()
    notes = [
        f"B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, window={cfg.window}, dilation={cfg.dilation}, "
        f"{cfg.n_global} global tokens (seeded randperm), no padding{', causal' if cfg.causal else ''}; "
        f"repeats={cfg.repeats}, "
        f"cell budget {cfg.cell_seconds:g} s, single call above {cfg.slow_call_seconds:g} s",
        f"2048^3 matmul: fp32 {rates[torch.float32]:.1f} GFLOP/s, bf16 {rates[torch.bfloat16]:.1f} GFLOP/s; "
        f"copy bandwidth {bandwidth:.1f} GB/s",
        "useful FLOPs: forward 4*H*D*(allowed pairs), fwd+bwd 3.5x forward; "
        "% matmul is against the fp32 rate for fp32 rows, bf16 rate for bf16 rows",
        "ours fp32 speed-up = t_method / t_ours_fp32 for the same L and pass",
    ]
    timings, statuses, pairs = run(cfg, notes)
    for length, count in pairs.items():
        notes.append(f"L={length}: {count} allowed pairs ({100 * count / (cfg.batch * length**2):.2f}% of B*L^2)")
    columns = ["L", "method", "pass", "median ms", "runs", "useful GFLOP/s", "% matmul",
               "ours fp32 speed-up", "status"]
    rows = table_rows(cfg, timings, statuses, pairs, rates)
    write_table(rows, columns, "attention_causal" if cfg.causal else "attention", out_dir=cfg.out,
                title=f"block_sparse_attention CPU benchmark{' (causal)' if cfg.causal else ''}", notes=notes)
    print("\n## Targets\n")
    for line in target_lines(cfg, timings, pairs, rates):
        print(f"- {line}")


if __name__ == "__main__":
    main()
