"""Benchmark ``moediffuseq.ops.block_sparse_attention`` against PyTorch baselines, on the CPU or
a GPU, in one run: every baseline, the machine's matmul rate and copy bandwidth are measured
in the same run as the op.

For every sequence length it times the forward pass and the forward+backward pass of each
method of the device (bench/attention_problem.py): on the CPU the op in float32 and bfloat16,
dense SDPA, SDPA with the allowed pattern as a boolean mask, compiled FlexAttention with the same
pattern and the dense pure-PyTorch reference; on a GPU the op, SDPA on its flash backend (all
L^2 pairs) and compiled FlexAttention, in bfloat16, timed with CUDA events. Throughput is in
useful GFLOP/s: every method is credited only with the FLOPs of the allowed (query, key) pairs,
4 H D per pair forward, 3.5x that forward+backward; "% matmul" divides by the square matmul
rate of the method's dtype on the device. A length's rows are printed as soon as it is done and
the table (``<out>/attention.md`` and ``.csv``, ``attention_cuda`` / ``attention_causal`` on a GPU
/ causal) is rewritten, so a run stopped at a long length keeps the shorter ones. Targets follow.

    python -m bench.attention --quick        # smoke run, L in {1024, 4096}
    python -m bench.attention                # full run, L up to 32768
    python -m bench.attention --lengths 8192 --repeats 3
    python -m bench.attention --device cuda  # GPU run, L in {8k, 32k, 128k}
    python -m bench.attention --device cuda --lengths 8192 32768
    python -m bench.attention --causal --lengths 8192   # causal: SDPA is_causal, the causal band as a
                                                        # bool mask, FlexAttention with q >= kv
"""
from __future__ import annotations

import argparse
import gc
import sys
from pathlib import Path
from typing import Optional, Sequence

import torch

from bench.attention_problem import (BACKWARD_FLOP_FACTOR, CHECK_MAX_LENGTH, FLEX, FWD, FWD_BWD, METHODS, OURS_BF16,
                                     OURS_FP32, PASSES, SDPA_MASK, Built, Config, Method, Problem,
                                     check_against_flex, forward_flops, make_problem, sanity_check)
from bench.common import (DEFAULT_OUT_DIR, Cell, Timing, append_targets, copy_bandwidth, device_description,
                          markdown_row, matmul_rate, timer, write_table)

Key = tuple[int, str, str]  # (L, method, pass)
COLUMNS = ["L", "method", "pass", "median ms", "runs", "useful GFLOP/s", "% matmul", "ours speed-up", "status"]
WIDTHS = [6, 21, 7, 9, 4, 14, 8, 13, 17]  # of the lines printed as each length finishes


def report_progress(length: int, method: str, pass_: str, timing: Timing) -> None:
    """One line per timed cell on stderr, so long runs show where they are."""
    print(f"[L={length}] {method} {pass_}: {timing['median_s'] * 1e3:.1f} ms ({timing['repeats']} runs)",
          file=sys.stderr, flush=True)


def time_pass(method: Method, built: Built, problem: Problem, cfg: Config, pass_: str) -> Timing:
    """Median time of the forward under no_grad, or of forward plus ``out.backward(grad)`` with
    grads reset before each call, on the device of the problem."""
    warmup = 0 if pass_ == FWD and built.first_call_s is not None else 1
    time = timer(cfg.device, warmup=warmup, repeats=cfg.repeats, max_seconds=cfg.cell_seconds,
                 slow_call_seconds=cfg.slow_call_seconds)
    if pass_ == FWD:
        q, k, v = (t.to(method.dtype) for t in (problem.q, problem.k, problem.v))
        with torch.no_grad():
            return time(lambda: built.attend(q, k, v))
    leaves = [t.detach().to(method.dtype).requires_grad_() for t in (problem.q, problem.k, problem.v)]
    grad = problem.grad.to(method.dtype)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        built.attend(*leaves).backward(grad)

    return time(step)


def time_length(problem: Problem, cfg: Config, timings: dict[Key, Timing], statuses: dict[Key, str],
                notes: list[str]) -> None:
    """Times every (method, pass) of the device at one length; setup and compile observations
    go to ``notes``."""
    length = problem.length
    for method in METHODS[cfg.device]:
        if method.max_length is not None and length > method.max_length:
            for pass_ in PASSES:
                statuses[(length, method.name, pass_)] = "skipped (memory)"
            continue
        built = method.build(problem, cfg, method.dtype)
        forward = timings[(length, method.name, FWD)] = time_pass(method, built, problem, cfg, FWD)
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
            timings[key] = time_pass(method, built, problem, cfg, FWD_BWD)
            report_progress(length, method.name, FWD_BWD, timings[key])
        del built
        gc.collect()
        if cfg.device == "cuda":
            torch.cuda.empty_cache()


def length_rows(length: int, cfg: Config, timings: dict[Key, Timing], statuses: dict[Key, str], pairs: int,
                rates: dict[torch.dtype, float]) -> list[dict[str, Cell]]:
    """One row per (method, pass) at one length: time, useful GFLOP/s, % of the matmul rate of its
    dtype, speed-up against the device's first method (the op)."""
    rows: list[dict[str, Cell]] = []
    ours_name = METHODS[cfg.device][0].name
    for method in METHODS[cfg.device]:
        for pass_ in PASSES:
            key = (length, method.name, pass_)
            row: dict[str, Cell] = {"L": length, "method": method.name, "pass": pass_}
            timing = timings.get(key)
            if timing is None:
                row["status"] = statuses.get(key, "not run")
                rows.append(row)
                continue
            flops = forward_flops(cfg, pairs) * (BACKWARD_FLOP_FACTOR if pass_ == FWD_BWD else 1.0)
            seconds = timing["median_s"]
            gflops = flops / seconds / 1e9
            row.update({"median ms": seconds * 1e3, "runs": timing["repeats"], "useful GFLOP/s": gflops,
                        "% matmul": 100.0 * gflops / rates[method.dtype],
                        "status": "ok" if timing["repeats"] > 1 else "ok (1 run)"})
            ours = timings.get((length, ours_name, pass_))
            if ours is not None:
                row["ours speed-up"] = seconds / ours["median_s"]
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


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Config, int]:
    """Command-line flags -> (Config, thread count)."""
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
        lengths = args.lengths or ([8192] if args.quick else [8192, 32768, 131072])
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
        device=args.device,
    )
    return cfg, args.threads


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, threads = parse_args(argv)
    cuda = cfg.device == "cuda"
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    n = 8192 if cuda else 2048
    dtypes = {method.dtype for method in METHODS[cfg.device]}
    rates = {dtype: matmul_rate(dtype, n=n, device=cfg.device) for dtype in sorted(dtypes, key=str)}
    bandwidth = copy_bandwidth(cfg.device)
    notes = [
        f"{device_description(cfg.device)}; B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, window={cfg.window}, "
        f"dilation={cfg.dilation}, {cfg.n_global} global tokens (seeded randperm), no padding"
        f"{', causal' if cfg.causal else ''}; repeats={cfg.repeats}" + (", CUDA events" if cuda else "")
        + f", cell budget {cfg.cell_seconds:g} s"
        + ("" if cuda else f", single call above {cfg.slow_call_seconds:g} s"),
        f"{n}^3 matmul: " + ", ".join(f"{str(t).removeprefix('torch.')} {r:.1f} GFLOP/s" for t, r in rates.items())
        + f"; copy bandwidth {bandwidth:.1f} GB/s",
        "useful FLOPs: forward 4*H*D*(allowed pairs), fwd+bwd 3.5x forward; % matmul is against the matmul rate "
        "of the method's dtype",
        f"ours speed-up = t_method / t_{METHODS[cfg.device][0].name.replace(' ', '_')} for the same L and pass",
    ]
    name = "attention_cuda" if cuda else "attention_causal" if cfg.causal else "attention"
    title = f"block_sparse_attention benchmark on {cfg.device}{' (causal)' if cfg.causal else ''}"
    timings: dict[Key, Timing] = {}
    statuses: dict[Key, str] = {}
    pairs: dict[int, int] = {}
    verdicts: dict[int, str] = {}
    rows: list[dict[str, Cell]] = []
    print(markdown_row(COLUMNS, WIDTHS), flush=True)
    for length in cfg.lengths:
        problem = make_problem(length, cfg)
        pairs[length] = problem.pairs
        if not cuda and length <= CHECK_MAX_LENGTH:
            sanity_check(problem, cfg)
        elif cuda and length == min(cfg.lengths):
            verdicts[length] = check_against_flex(problem, cfg, notes)
        time_length(problem, cfg, timings, statuses, notes)
        del problem
        gc.collect()
        length_rows_now = length_rows(length, cfg, timings, statuses, pairs[length], rates)
        for row in length_rows_now:
            print(markdown_row([row.get(c) for c in COLUMNS], WIDTHS), flush=True)
        rows += length_rows_now
        write_table(rows, COLUMNS, name, out_dir=cfg.out, title=title, notes=notes, echo=False)
    for length, count in pairs.items():
        notes.append(f"L={length}: {count} allowed pairs ({100 * count / (cfg.batch * length**2):.2f}% of B*L^2)")
    out_dir = write_table(rows, COLUMNS, name, out_dir=cfg.out, title=title, notes=notes)
    lines = target_lines(cfg, timings, pairs, rates) if not cuda else [
        f"{'PASS' if v == 'ok' else 'FAIL'} ours vs FlexAttention at L={length}, output and gradients in bfloat16"
        for length, v in verdicts.items()]
    append_targets(out_dir, name, lines)


if __name__ == "__main__":
    main()
