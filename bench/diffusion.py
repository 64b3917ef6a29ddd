"""Benchmark the three fused diffusion ops against the same computation as eager PyTorch ops and
as torch.compile of those ops, in the same run, on the CPU or a GPU:

  denoise_step          one DPM-Solver++(2M) update with source re-anchoring (x0_prev term on)
  soft_absorb_q_sample  the forward process with the soft absorbing state (noise, uniform given)
  nearest_embedding     rounding to the vocabulary: argmin_v ||x - e_v||^2

Sizes are elements per (B, L, d) tensor, B = 8, d = 128; a fraction f = 0.75 of the B*L rows is on
target. Bytes per call are what the fused kernel must move in its one pass, credited to every
method alike (e bytes per element, n = B*L*d elements):
  denoise_step:  target rows read x_t, x0_hat, x0_prev, source rows the anchor, every element is
                 written once, the bool mask and m are read once:
                 bytes = n e (3 f + (1 - f) + 1) + B L + d e
  soft_absorb:   every row reads x0, target rows also read the noise, every element is written
                 once; the bool mask and the float32 uniform once per row, m once:
                 bytes = n e (1 + f + 1) + 5 B L + d e
GB/s is compared with the copy bandwidth measured in this run (a copy moves 2 n e bytes).
nearest_embedding is a GEMM plus an argmin: N = n / d rows of x against a (V, d) vocabulary,
FLOPs = 2 N V d, compared with the square matmul rate of the same dtype measured in this run; its
eager baseline is ||e||^2 - 2 x e^T then argmin, in the dtype of x (the float64 cdist of
nearest_embedding_ref is the contract, not a speed baseline).

    python -m bench.diffusion                          # 1e5 .. 1e8 elements, float32 and bfloat16
    python -m bench.diffusion --quick                  # 1e5 and 1e6 elements
    python -m bench.diffusion --sizes 1e6 --ops denoise_step
    python -m bench.diffusion --device cuda            # 1e6 .. 4e8 elements, CUDA-event timing
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from bench.common import (DEFAULT_OUT_DIR, Cell, append_targets, copy_bandwidth, device_description, matmul_rate,
                          timer, write_table)
from moediffuseq.ops import (denoise_step, denoise_step_ref, nearest_embedding, soft_absorb_q_sample,
                             soft_absorb_q_sample_ref)

B, D, TARGET_SHARE = 8, 128, 0.75
OPS = ("denoise_step", "soft_absorb_q_sample", "nearest_embedding")
DTYPES = (torch.float32, torch.bfloat16)
COLUMNS = ["op", "dtype", "elements", "method", "median ms", "GB/s", "% copy bw", "GFLOP/s", "% matmul",
           "fused speed-up"]
FUSED_OUT = "fused out="


@dataclass
class Case:
    """One op at one size and dtype: the methods to time (the first is the fused op every other
    is compared with), a check of the fused op, and the bytes or FLOPs of one call."""

    methods: dict[str, Callable[[], object]]
    check: Callable[[], None]
    bytes: float = 0.0
    flops: float = 0.0


def rows_of(n: int, dtype: torch.dtype, device: str, generator: torch.Generator, count: int) -> list[Tensor]:
    L = max(1, n // (B * D))
    return [torch.randn(B, L, D, generator=generator, device=device).to(dtype) for _ in range(count)]


def denoise_case(n: int, dtype: torch.dtype, device: str, compiled: Callable) -> Case:
    g = torch.Generator(device=device).manual_seed(0)
    x_t, x0, prev, anchor = rows_of(n, dtype, device, g, 4)
    mask = torch.rand(x_t.shape[:2], generator=g, device=device) < TARGET_SHARE  # (B, L)
    m = torch.randn(D, generator=g, device=device).to(dtype)
    a, b, c = (torch.rand(B, generator=g, device=device) for _ in range(3))
    out = torch.empty_like(x_t)
    args, kw = (x_t, x0, anchor, mask, m, a, b), dict(x0_prev=prev, coef_x0_prev=c)
    f, e = mask.float().mean().item(), x_t.element_size()

    def check() -> None:
        torch.testing.assert_close(denoise_step(*args, **kw), denoise_step_ref(*args, **kw), atol=1e-2, rtol=1e-2)

    return Case({FUSED_OUT: lambda: denoise_step(*args, **kw, out=out),
                 "fused": lambda: denoise_step(*args, **kw),
                 "eager ops": lambda: denoise_step_ref(*args, **kw),
                 "torch.compile": lambda: compiled(*args, **kw)},
                check, bytes=x_t.numel() * e * (3 * f + (1 - f) + 1) + mask.numel() + D * e)


def soft_absorb_case(n: int, dtype: torch.dtype, device: str, compiled: Callable) -> Case:
    g = torch.Generator(device=device).manual_seed(0)
    x0, noise = rows_of(n, dtype, device, g, 2)
    mask = torch.rand(x0.shape[:2], generator=g, device=device) < TARGET_SHARE  # (B, L)
    uniform = torch.rand(x0.shape[:2], generator=g, device=device)
    m = torch.randn(D, generator=g, device=device).to(dtype)
    ab = torch.rand(B, generator=g, device=device)
    sa, s1 = ab.sqrt(), (1 - ab).sqrt()
    f, e = mask.float().mean().item(), x0.element_size()
    args, kw = (x0, m, mask, sa, s1), dict(noise=noise, uniform=uniform, gamma=0.5)

    def check() -> None:
        torch.testing.assert_close(soft_absorb_q_sample(*args, **kw), soft_absorb_q_sample_ref(*args, **kw),
                                   atol=2e-2, rtol=1e-2)

    return Case({"fused": lambda: soft_absorb_q_sample(*args, **kw),
                 "eager ops": lambda: soft_absorb_q_sample_ref(*args, **kw),
                 "torch.compile": lambda: compiled(*args, **kw)},
                check, bytes=x0.numel() * e * (2 + f) + 5 * mask.numel() + D * e)


def nearest_eager(x: Tensor, emb: Tensor) -> Tensor:
    """The same computation as plain ops in the dtype of x: ||e||^2 - 2 x e^T, then argmin."""
    return (emb.square().sum(-1) - 2 * x @ emb.T).argmin(-1)  # (N, V) -> (N,)


def nearest_case(n: int, dtype: torch.dtype, device: str, compiled: Callable, vocab: int) -> Case:
    g = torch.Generator(device=device).manual_seed(0)
    emb = torch.randn(vocab, D, generator=g, device=device).to(dtype)
    rows = max(1, n // D)
    pick = torch.randint(0, vocab, (rows,), generator=g, device=device)
    x = (emb[pick].float() + 0.01 * torch.randn(rows, D, generator=g, device=device)).to(dtype)

    def check() -> None:
        got = nearest_embedding(x, emb)
        share = (got == pick).float().mean().item()  # rows drawn next to a (well-separated) row
        if share < 0.99:
            raise RuntimeError(f"nearest_embedding found the row each x was drawn next to for {share:.3f} of rows")

    return Case({"fused": lambda: nearest_embedding(x, emb),
                 "eager ops": lambda: nearest_eager(x, emb),
                 "torch.compile": lambda: compiled(x, emb)},
                check, flops=2.0 * rows * vocab * D)


def run(args: argparse.Namespace) -> tuple[list[dict[str, Cell]], list[str]]:
    cuda = args.device == "cuda"
    time = timer(args.device, warmup=3 if cuda else 2, repeats=args.repeats, max_seconds=10 if cuda else 20)
    bandwidth = copy_bandwidth(args.device)
    rates = {dtype: matmul_rate(dtype, device=args.device) for dtype in DTYPES} if "nearest_embedding" in args.ops \
        else {}
    compiled = {op: torch.compile(fn, dynamic=False) for op, fn in
                (("denoise_step", denoise_step_ref), ("soft_absorb_q_sample", soft_absorb_q_sample_ref),
                 ("nearest_embedding", nearest_eager))}
    build = {"denoise_step": denoise_case, "soft_absorb_q_sample": soft_absorb_case,
             "nearest_embedding": lambda n, dtype, device, fn: nearest_case(n, dtype, device, fn, args.vocab)}
    rows: list[dict[str, Cell]] = []
    for op in args.ops:
        for dtype in DTYPES:
            for size in args.sizes:
                case = build[op](int(size), dtype, args.device, compiled[op])
                case.check()
                times = {name: time(fn)["median_s"] for name, fn in case.methods.items()}
                fused = times[next(iter(case.methods))]
                for name, seconds in times.items():
                    row: dict[str, Cell] = {"op": op, "dtype": str(dtype).removeprefix("torch."),
                                            "elements": int(size), "method": name, "median ms": seconds * 1e3,
                                            "fused speed-up": seconds / fused}
                    if case.bytes:
                        row.update({"GB/s": case.bytes / seconds / 1e9,
                                    "% copy bw": 100 * case.bytes / seconds / 1e9 / bandwidth})
                    if case.flops:
                        row.update({"GFLOP/s": case.flops / seconds / 1e9,
                                    "% matmul": 100 * case.flops / seconds / 1e9 / rates[dtype]})
                    rows.append(row)
                    print(f"[{op} {row['dtype']} {int(size):.0e}] {name}: {seconds * 1e3:.3f} ms", flush=True)
    notes = [f"{device_description(args.device)}; B={B}, d={D}, {TARGET_SHARE:.0%} target rows; median of up to "
             f"{args.repeats} calls" + (" timed with CUDA events" if cuda else ""),
             f"copy bandwidth ({'1 GiB' if cuda else '256 MiB'} float32, read+write): {bandwidth:.1f} GB/s"
             + "".join(f"; {n}x{n} matmul {str(t).removeprefix('torch.')} {r:.1f} GFLOP/s"
                       for t, r in rates.items() for n in [2048]),
             "bytes per call: denoise_step n e (3 f + (1 - f) + 1) + B L + d e; "
             "soft_absorb_q_sample n e (2 + f) + 5 B L + d e (module docstring)",
             f"nearest_embedding: N = elements / d rows, V = {args.vocab}, FLOPs 2 N V d",
             "fused speed-up = t_method / t_fused (denoise_step: t_fused_out=, the samplers' form)"]
    return rows, notes


def target_lines(rows: list[dict[str, Cell]], cuda: bool) -> list[str]:
    """denoise_step's targets at the largest size: share of copy bandwidth and speed-up over eager."""
    lines = []
    for dtype in ("float32", "bfloat16"):
        mine = [r for r in rows if r["op"] == "denoise_step" and r["dtype"] == dtype]
        if not mine:
            continue
        size = max(r["elements"] for r in mine)
        by = {r["method"]: r for r in mine if r["elements"] == size}
        share, ratio, need = by[FUSED_OUT]["% copy bw"], by["eager ops"]["fused speed-up"], 80 if cuda else 60
        lines.append(f"{'PASS' if share >= need else 'FAIL'} denoise_step {dtype}: fused out= at {share:.0f}% of "
                     f"copy bandwidth at {size:.0e} elements, target >= {need}%")
        lines.append(f"{'PASS' if ratio >= 3 else 'FAIL'} denoise_step {dtype}: fused out= {ratio:.1f}x eager, "
                     "target >= 3x")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=float, nargs="+", default=None,
                        help="elements per tensor; default 1e5 1e6 1e7 1e8 (cpu), 1e6 1e7 1e8 4e8 (cuda)")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS))
    parser.add_argument("--vocab", type=int, default=8192, help="nearest_embedding's vocabulary rows V")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (cpu), 50 (cuda)")
    parser.add_argument("--quick", action="store_true", help="sizes 1e5 and 1e6 only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    args.sizes = [1e5, 1e6] if args.quick else args.sizes or ([1e6, 1e7, 1e8, 4e8] if cuda else [1e5, 1e6, 1e7, 1e8])
    args.repeats = args.repeats or (50 if cuda else 7)
    rows, notes = run(args)
    name = "diffusion_cuda" if cuda else "diffusion"
    out_dir = write_table(rows, COLUMNS, name, out_dir=args.out, notes=notes,
                          title=f"diffusion ops on {args.device}: fused vs eager and compiled ops")
    append_targets(out_dir, name, target_lines(rows, cuda))


if __name__ == "__main__":
    main()
