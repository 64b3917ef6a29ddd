"""Benchmark the fused ``denoise_step`` (one DPM-Solver++(2M) update with source re-anchoring)
against the same update as eager PyTorch ops and as torch.compile of those ops.

Bytes moved per call: x_t, x0_hat, x0_prev, anchor read and the result written (5 tensors of
B*L*d elements) plus the (B, L) mask; GB/s is compared with the copy bandwidth measured in
the same run. "fused" allocates its result; "fused out=" writes into a preallocated buffer,
as the samplers do.

    python bench/denoise_step.py             # 1e5 .. 1e8 elements, float32 and bfloat16
    python bench/denoise_step.py --quick
    python bench/denoise_step.py --device cuda   # GPU: 1e6 .. 4e8 elements, CUDA-event timing,
                                                 # against the GPU's measured copy bandwidth
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_OUT_DIR, copy_bandwidth, measure, measure_cuda, write_table  # noqa: E402

from moediffuseq.ops import denoise_step, denoise_step_ref  # noqa: E402

D = 128  # d_emb


def inputs(n: int, dtype: torch.dtype, batch: int = 8, device: str = "cpu"):
    L = max(1, n // (batch * D))
    g = torch.Generator(device=device).manual_seed(0)
    x_t, x0, prev, anchor = (torch.randn(batch, L, D, generator=g, device=device).to(dtype) for _ in range(4))
    mask = torch.rand(batch, L, generator=g, device=device) < 0.75
    m = torch.randn(D, generator=g, device=device).to(dtype)
    a, b, c = (torch.rand(batch, generator=g, device=device) for _ in range(3))
    return x_t, x0, prev, anchor, mask, m, a, b, c


def cuda_copy_bandwidth() -> float:
    """GB/s of copying a 1 GiB float32 tensor on the GPU, bytes read plus bytes written."""
    src = torch.ones(2**30 // 4, dtype=torch.float32, device="cuda")
    dst = torch.empty_like(src)
    t = measure_cuda(lambda: dst.copy_(src), warmup=3, repeats=20, max_seconds=10)["median_s"]
    return 2.0 * src.numel() * src.element_size() / t / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--sizes", type=float, nargs="+", default=None,
                        help="elements per tensor; default 1e5 1e6 1e7 1e8 (cpu), 1e6 1e7 1e8 4e8 (cuda)")
    parser.add_argument("--repeats", type=int, default=None, help="default 7 (cpu), 50 (cuda)")
    parser.add_argument("--quick", action="store_true", help="sizes 1e5 and 1e6 only")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    cuda = args.device == "cuda"
    sizes = args.sizes or ([1e6, 1e7, 1e8, 4e8] if cuda else [1e5, 1e6, 1e7, 1e8])
    sizes = [1e5, 1e6] if args.quick else sizes
    repeats = args.repeats or (50 if cuda else 7)
    bandwidth = cuda_copy_bandwidth() if cuda else copy_bandwidth()
    compiled_ref = torch.compile(denoise_step_ref, dynamic=False)
    if cuda:
        def timed(fn):
            return measure_cuda(fn, warmup=3, repeats=repeats, max_seconds=10)["median_s"]
    else:
        def timed(fn):
            return measure(fn, warmup=2, repeats=repeats, max_seconds=20)["median_s"]
    rows = []
    for dtype in (torch.float32, torch.bfloat16):
        for size in sizes:
            x_t, x0, prev, anchor, mask, m, a, b, c = inputs(int(size), dtype, device=args.device)
            n = x_t.numel()
            nbytes = 5 * n * x_t.element_size() + mask.numel()
            out = torch.empty_like(x_t)
            kw = dict(x0_prev=prev, coef_x0_prev=c)
            methods = {
                "fused": lambda: denoise_step(x_t, x0, anchor, mask, m, a, b, **kw),
                "fused out=": lambda: denoise_step(x_t, x0, anchor, mask, m, a, b, **kw, out=out),
                "eager ops": lambda: denoise_step_ref(x_t, x0, anchor, mask, m, a, b, **kw),
                "torch.compile": lambda: compiled_ref(x_t, x0, anchor, mask, m, a, b, **kw),
            }
            expected = denoise_step_ref(x_t, x0, anchor, mask, m, a, b, **kw)
            torch.testing.assert_close(methods["fused"](), expected, atol=1e-2, rtol=1e-2)
            times = {name: timed(fn) for name, fn in methods.items()}
            for name, t in times.items():
                gbs = nbytes / t / 1e9
                rows.append({"dtype": str(dtype).removeprefix("torch."), "elements": n, "method": name,
                             "median ms": t * 1e3, "GB/s": gbs, "% copy bw": 100 * gbs / bandwidth,
                             "fused out= speed-up": t / times["fused out="]})
    where = f" on {torch.cuda.get_device_name()}" if cuda else ""
    write_table(rows, ["dtype", "elements", "method", "median ms", "GB/s", "% copy bw", "fused out= speed-up"],
                "denoise_step_cuda" if cuda else "denoise_step", out_dir=args.out,
                title=f"denoise_step{where}: fused update vs eager and compiled ops",
                notes=[f"copy bandwidth ({'1 GiB, CUDA events' if cuda else '256 MiB'}, read+write): "
                       f"{bandwidth:.1f} GB/s",
                       "update: x = a x_t + b x0_hat + c x0_prev + (1-a-b-c) m on target rows, anchor elsewhere; "
                       "B=8, d=128; 5 tensors moved per call",
                       "fused out= speed-up = t_method / t_fused_out"])
    print("\nTargets")
    for dtype in ("float32", "bfloat16"):
        big = [r for r in rows if r["dtype"] == dtype and r["elements"] == max(x["elements"] for x in rows)]
        by = {r["method"]: r for r in big}
        share = by["fused out="]["% copy bw"]
        ratio = by["fused out="]["fused out= speed-up"] and by["eager ops"]["median ms"] / by["fused out="]["median ms"]
        need = 80 if cuda else 60
        print(f"- {'PASS' if share >= need else 'FAIL'} {dtype}: fused out= at {share:.0f}% of copy bandwidth "
              f"at {big[0]['elements']:.0e} elements, target >= {need}%")
        print(f"- {'PASS' if ratio >= 3 else 'FAIL'} {dtype}: fused out= {ratio:.1f}x eager, target >= 3x")


if __name__ == "__main__":
    main()
