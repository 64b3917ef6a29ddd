"""Mixture-of-experts layer: ours vs the HF-Mixtral loop vs torch._grouped_mm vs a dense FFN.

    python -m bench.moe                 # CPU (T=8192, D=1024, E=8, k=2, F=2048; float32 and bfloat16)
    python -m bench.moe --device cuda   # GPU (T=32768, D=2048, E=8, k=2, F=4096; bfloat16)

The same run on either device: CPU wall clock or CUDA events (bench.common.timer), the matmul
rate of the same device and dtype, the layer and its methods in bench/moe_layer.py.

The layer (every method but "dense"): logits = x @ w_gate (w_gate (D, E) in the dtype of x), top-k
softmax routing in float32, expert FFN gelu_tanh(x @ w1[e]) @ w2[e], combine
y[t] = sum_j weight[t, j] * expert_{indices[t, j]}(x[t]).

Methods:
  ours        moediffuseq's moe_topk_softmax + moe_ffn.
  hf_loop     softmax (float32) + topk + renormalise, then a Python loop over the experts with index
              selection and an out-of-place index_add, as HF Mixtral's sparse MoE block is written
              (routing weights cast to the dtype of x, accumulation in the dtype of x).
  grouped_mm  the same routing, then the T*k slots sorted by expert (stable argsort), rows gathered,
              torch._grouped_mm with w1 (offsets: int32 cumulative counts), gelu, torch._grouped_mm
              with w2, scaled by the routing weights and scattered back with index_add.
  dense       x @ W1 (D, k*F) -> gelu -> @ W2 (k*F, D): the expert GEMM FLOPs as one dense FFN; the
              router is NOT included.

Passes: "fwd" runs under torch.no_grad (inference); "fwd+bwd" runs the layer and torch.autograd.grad
of x and every weight (w_gate, w1, w2; W1, W2 for dense) against a fixed random grad_y.

Useful FLOPs: fwd = 2*T*D*E (router) + 2 * (2*T*k*D*F) (two expert GEMMs), fwd+bwd = 3 * fwd; for
dense only its GEMMs, 2 * (2*T*D*k*F) (fwd). "% matmul" divides by the GFLOP/s of a square n x n
matmul of the same dtype measured in this run (``--matmul-n``), before and after that dtype's
measurements; the higher of the two is used, so a burst of load on the machine cannot inflate "% matmul".

Share of ours outside the expert GEMMs (routing + permute + activation + combine + the router GEMM):
torch.profiler over single steps (CPU activities, record_shapes off). Per step, the wall time of the
GEMM ops (aten::mm, addmm, bmm, ...) issued inside moediffuseq::moe_ffn and moe_ffn_backward is
divided by the wall time of the whole step; the median over ``--profile-steps`` steps is reported.
This is preferred to timing the GEMMs alone and subtracting because both numbers come from the same
step: on a shared, noisy machine the difference of two separately measured medians can swing with the
load, or even go negative, while a per-step ratio cannot. On a GPU the same share comes from the
kernels: the GPU time of the CUTLASS grouped GEMM kernels launched inside the MoE ops against all
kernels of the call, and the run fails when any other GEMM kernel (a cuBLAS fallback) ran inside
them (bench/moe_profile.py).
"""
from __future__ import annotations

import argparse
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from bench.common import DEFAULT_OUT_DIR, Cell, append_targets, device_description, matmul_rate, timer, write_table
from bench.moe_layer import DTYPES, METHODS, PASSES, Shape, layer_call, make_params, pass_call, probe_grouped_mm, verify
from bench.moe_profile import moe_kernel_profile, outside_expert_gemm_share

DEFAULT_SHAPE = {"cpu": dict(tokens=8192, dim=1024, ffn=2048), "cuda": dict(tokens=32768, dim=2048, ffn=4096)}
DEFAULT_DTYPES = {"cpu": ["float32", "bfloat16"], "cuda": ["bfloat16"]}
# targets, per device: ours fwd+bwd vs the matmul rate (CPU: the whole layer; GPU: its expert
# GEMM kernels), vs the HF loop and the grouped_mm pipeline, and the share outside the expert GEMMs
TARGET_MATMUL_FRACTION = {"cpu": 0.85}
TARGET_GEMM_FRACTION = {"cuda": 0.70}
TARGET_SPEEDUP = {("cpu", "hf_loop", "float32"): 1.2, ("cpu", "hf_loop", "bfloat16"): 2.0,
                  ("cuda", "hf_loop", "bfloat16"): 2.0, ("cuda", "grouped_mm", "bfloat16"): 1.0}
TARGET_OUTSIDE_SHARE = {"cpu": 0.10}
COLUMNS = ("dtype", "pass", "method", "median ms", "min ms", "repeats", "GFLOP/s", "% matmul", "ours speed-up",
           "expert GEMM % matmul", "outside expert GEMMs %", "note")


@dataclass
class Result:
    """One (dtype, pass, method) measurement, or the reason it was not run; for ours, where its
    time goes (CPU: op wall time; GPU: kernel time of the CUTLASS grouped GEMMs)."""

    median_s: Optional[float] = None
    min_s: Optional[float] = None
    repeats: Optional[int] = None
    outside_share: Optional[float] = None
    gemm_s: Optional[float] = None
    reason: Optional[str] = None
    problems: list[str] = field(default_factory=list)


def bench_dtype(shape: Shape, dtype: torch.dtype, args: argparse.Namespace) -> dict[tuple[str, str], Result]:
    """Verifies and times every method and pass of one dtype; (pass, method) -> Result."""
    cuda = args.device == "cuda"
    time = timer(args.device, warmup=2 if cuda else 1, repeats=args.repeats,
                 max_seconds=args.max_seconds or (30.0 if cuda else None))
    p = make_params(shape, dtype, device=args.device)
    grouped = probe_grouped_mm(p, shape.k)
    for line in verify(p, shape.k, grouped["fwd"] is None):
        print(f"  check {line}", flush=True)
    results: dict[tuple[str, str], Result] = {}
    for pass_ in PASSES:
        for method in METHODS:
            if method == "grouped_mm" and grouped[pass_] is not None:
                results[pass_, method] = Result(reason=grouped[pass_])
                print(f"  {pass_:8s} {method:11s} {grouped[pass_]}", flush=True)
                continue
            forward, wrt = layer_call(method, p, shape.k)
            run = pass_call(forward, wrt, p.grad_y, pass_)
            timing = time(run)
            result = Result(median_s=timing["median_s"], min_s=timing["min_s"], repeats=timing["repeats"])
            if method == "ours" and cuda:
                kernels = moe_kernel_profile(run, args.profile_steps)
                result.gemm_s = kernels.grouped_s
                result.outside_share = 1.0 - kernels.grouped_s / kernels.total_s if kernels.total_s else None
                result.problems = kernels.problems(pass_)
                print(f"  {pass_:8s} ours kernels inside the MoE ops: {kernels.inside}, CUTLASS grouped GEMM "
                      f"launches {kernels.grouped}, other GEMMs {len(kernels.library)}", flush=True)
            elif method == "ours":
                result.outside_share = outside_expert_gemm_share(run, args.profile_steps)
            results[pass_, method] = result
            print(f"  {pass_:8s} {method:11s} {result.median_s * 1e3:9.2f} ms", flush=True)
            if cuda:
                torch.cuda.empty_cache()
    return results


def table_rows(shape: Shape, dtype_name: str, rate: float,
               results: dict[tuple[str, str], Result]) -> list[dict[str, Cell]]:
    """Table rows of one dtype (``rate``: the matmul GFLOP/s of that dtype on this device)."""
    rows: list[dict[str, Cell]] = []
    for pass_ in PASSES:
        ours = results[pass_, "ours"]
        for method in METHODS:
            r = results[pass_, method]
            row: dict[str, Cell] = {"dtype": dtype_name, "pass": pass_, "method": method}
            if r.median_s is None:
                row["note"] = r.reason
            else:
                gflops = shape.flops(method, pass_) / r.median_s / 1e9
                row.update({
                    "median ms": r.median_s * 1e3,
                    "min ms": r.min_s * 1e3,
                    "repeats": r.repeats,
                    "GFLOP/s": gflops,
                    "% matmul": 100.0 * gflops / rate,
                    "ours speed-up": None if method == "ours" else r.median_s / ours.median_s,
                })
                if r.outside_share is not None:
                    row["outside expert GEMMs %"] = 100.0 * r.outside_share
                if r.gemm_s:
                    row["expert GEMM % matmul"] = 100.0 * shape.flops("dense", pass_) / r.gemm_s / 1e9 / rate
                if method == "dense":
                    row["note"] = "router not included"
            rows.append(row)
    return rows


def targets(device: str, rates: dict[str, float], shape: Shape,
            all_results: dict[str, dict[tuple[str, str], Result]]) -> list[str]:
    """PASS/FAIL lines of this device's targets, from this run's numbers."""
    lines = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for dtype_name, results in all_results.items():
        ours = results["fwd+bwd", "ours"]
        if device in TARGET_MATMUL_FRACTION:
            need = TARGET_MATMUL_FRACTION[device]
            fraction = shape.flops("ours", "fwd+bwd") / ours.median_s / 1e9 / rates[dtype_name]
            lines.append(f"{verdict(fraction >= need)} {dtype_name}: ours fwd+bwd at {100 * fraction:.1f}% of the "
                         f"matmul rate ({rates[dtype_name]:.0f} GFLOP/s), target >= {100 * need:.0f}%")
        if device in TARGET_GEMM_FRACTION and ours.gemm_s:
            need = TARGET_GEMM_FRACTION[device]
            fraction = shape.flops("dense", "fwd+bwd") / ours.gemm_s / 1e9 / rates[dtype_name]
            lines.append(f"{verdict(fraction >= need)} {dtype_name}: ours fwd+bwd expert GEMMs at "
                         f"{100 * fraction:.0f}% of the matmul rate, target >= {100 * need:.0f}%")
        for method in ("hf_loop", "grouped_mm"):
            need, other = TARGET_SPEEDUP.get((device, method, dtype_name)), results["fwd+bwd", method]
            if need is not None and other.median_s is not None:
                speedup = other.median_s / ours.median_s
                lines.append(f"{verdict(speedup >= need)} {dtype_name}: ours fwd+bwd {speedup:.2f}x {method}, "
                             f"target >= {need:g}x")
        if device in TARGET_OUTSIDE_SHARE:
            need, share = TARGET_OUTSIDE_SHARE[device], ours.outside_share
            lines.append(f"{verdict(share <= need)} {dtype_name}: ours fwd+bwd spends {100 * share:.1f}% outside "
                         f"the expert GEMMs (routing + permute + combine), target <= {100 * need:.0f}%")
        if device == "cuda":
            problems = [line for pass_ in PASSES for line in results[pass_, "ours"].problems]
            lines.append(f"{verdict(not problems)} {dtype_name}: the expert GEMMs are the CUTLASS grouped GEMM "
                         "kernels, no cuBLAS GEMM inside moe_ffn / moe_ffn_backward"
                         + (f" ({'; '.join(problems)})" if problems else ""))
    return lines


def parse_args() -> argparse.Namespace:
    """Command-line flags; ``--quick`` swaps in the smoke sizes."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu",
                        help="cuda: bfloat16 at T=32768, D=2048, F=4096 unless -T/-D/-F are given")
    parser.add_argument("--tokens", "-T", type=int, default=None, help="default 8192 (cpu), 32768 (cuda)")
    parser.add_argument("--dim", "-D", type=int, default=None, help="default 1024 (cpu), 2048 (cuda)")
    parser.add_argument("--experts", "-E", type=int, default=8)
    parser.add_argument("--topk", "-k", type=int, default=2)
    parser.add_argument("--ffn", "-F", type=int, default=None, help="expert width; default 2048 (cpu), 4096 (cuda)")
    parser.add_argument("--quick", action="store_true", help="smoke config: T=1024, D=256, F=512 (overrides -T, -D, -F)")
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=None,
                        help="default float32 bfloat16 (cpu), bfloat16 (cuda)")
    parser.add_argument("--repeats", type=int, default=5, help="timed calls per measurement")
    parser.add_argument("--max-seconds", type=float, default=None,
                        help="stop repeating a measurement once its timed calls took this long")
    parser.add_argument("--profile-steps", type=int, default=3,
                        help="profiled calls for the share outside the expert GEMMs")
    parser.add_argument("--matmul-n", type=int, default=None,
                        help="size of the reference square matmul; default 2048 (cpu), 8192 (cuda)")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    defaults = DEFAULT_SHAPE[args.device]
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    args.dtypes = args.dtypes or DEFAULT_DTYPES[args.device]
    if args.matmul_n is None:
        args.matmul_n = 8192 if cuda else 2048
    if args.quick:
        args.tokens, args.dim, args.ffn = 1024, 256, 512
    return args


def main() -> None:
    """Measures every dtype on the device, writes <out>/moe.md and moe.csv (moe_cuda.* on a GPU),
    prints and appends the targets; on a GPU, exits with an error when the CUTLASS check fails."""
    args = parse_args()
    cuda = args.device == "cuda"
    shape = Shape(T=args.tokens, D=args.dim, E=args.experts, k=args.topk, F=args.ffn)
    print(f"MoE layer on {device_description(args.device)}: {shape}, gelu (tanh); dtypes {', '.join(args.dtypes)}",
          flush=True)
    load_start = os.getloadavg()[0]
    rates: dict[str, float] = {}
    all_results: dict[str, dict[tuple[str, str], Result]] = {}
    rows: list[dict[str, Cell]] = []
    rate_samples: dict[str, tuple[float, float]] = {}
    for dtype_name in args.dtypes:
        before = matmul_rate(DTYPES[dtype_name], n=args.matmul_n, device=args.device)
        print(f"{dtype_name}: matmul rate {before:.0f} GFLOP/s (n={args.matmul_n})", flush=True)
        all_results[dtype_name] = bench_dtype(shape, DTYPES[dtype_name], args)
        after = matmul_rate(DTYPES[dtype_name], n=args.matmul_n, device=args.device)
        print(f"{dtype_name}: matmul rate {after:.0f} GFLOP/s after the layer runs", flush=True)
        rate_samples[dtype_name] = (before, after)
        rates[dtype_name] = max(before, after)
        rows += table_rows(shape, dtype_name, rates[dtype_name], all_results[dtype_name])
    s = shape
    notes = [
        f"{device_description(args.device)}; T={s.T}, D={s.D}, E={s.E}, k={s.k}, F={s.F}; gelu (tanh); "
        "routing in float32.",
        f"matmul rate (GFLOP/s, n={args.matmul_n} square matmul on this device, the higher of before / after the "
        "dtype's runs): " + ", ".join(f"{name} {rates[name]:.0f} ({b:.0f} / {a:.0f})"
                                       for name, (b, a) in rate_samples.items()) + ".",
        "useful FLOPs: fwd = 2*T*D*E + 4*T*k*D*F, fwd+bwd = 3x fwd; dense: 4*T*k*D*F (no router), 3x for fwd+bwd.",
        "fwd runs under torch.no_grad; fwd+bwd = forward + torch.autograd.grad of x and all weights; times: "
        + ("CUDA events around each call" if cuda else "wall clock") + ", median of the repeats.",
        "ours speed-up = method median / ours median, same dtype and pass.",
    ]
    if cuda:
        notes.append("expert GEMM % matmul (ours): GPU time of the CUTLASS grouped GEMM kernels launched inside "
                     f"moe_ffn / moe_ffn_backward (torch.profiler, median of {args.profile_steps} calls) against "
                     "the expert GEMM FLOPs; outside = the other kernels' share of the call's kernel time.")
    else:
        notes.append("outside expert GEMMs % (ours): torch.profiler, median over " + str(args.profile_steps)
                     + " steps of 1 - (wall time of the GEMMs inside moe_ffn / moe_ffn_backward) / (step wall time).")
    notes.append(f"1-minute load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
                 f"({os.cpu_count()} CPUs; other work on the machine skews every number).")
    name = "moe_cuda" if cuda else "moe"
    out_dir = write_table(rows, COLUMNS, name, out_dir=args.out, notes=notes,
                          title=f"MoE layer on {args.device}: ours vs HF loop vs torch._grouped_mm vs dense FFN")
    append_targets(out_dir, name, targets(args.device, rates, shape, all_results))
    problems = [line for results in all_results.values() for pass_ in PASSES
                for line in results[pass_, "ours"].problems]
    if problems:
        sys.exit("bench/moe.py: the CUTLASS grouped GEMM check failed:\n  " + "\n  ".join(problems))


if __name__ == "__main__":
    main()
