"""Benchmark the fused ``denoise_step`` (one DPM-Solver++(2M) update with source re-anchoring)
against the same update as eager PyTorch ops and as torch.compile of those ops.

Bytes per call: what the fused kernel must move in its one pass (csrc/diffusion/cpu/denoise_step.cpp,
csrc/diffusion/cuda/denoise_step_kernel.cu), credited to every method alike. With n = B*L*d elements of
e bytes and a fraction f of the B*L rows on target:
  target rows read x_t, x0_hat and x0_prev (3 f n e; the anchor is not read there),
  source rows read the anchor only (the re-anchoring copy, (1 - f) n e),
  every element is written once (n e), the (B, L) bool mask is read once (B*L bytes) and the
  absorbing vector m once (d e; the (B,) coefficients are negligible):
  bytes = n e (3 f + (1 - f) + 1) + B L + d e,  = 3.5 n e at f = 0.75 (this script's mask).
GB/s is compared with the copy bandwidth measured in the same run (a copy moves 2 n e). "fused"
allocates its result; "fused out=" writes into a preallocated buffer, as the samplers do.

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


def bytes_moved(x_t: torch.Tensor, mask: torch.Tensor, m: torch.Tensor, *, x0_prev: bool, noise: bool) -> float:
    """Bytes the fused update must move (module docstring): target rows read x_t, x0_hat
    [, x0_prev][, noise], source rows read the anchor, every element is written, mask and m read once."""
    n, e = x_t.numel(), x_t.element_size()
    f = mask.float().mean().item()  # share of target rows
    reads_per_target = 2 + int(x0_prev) + int(noise)
    return n * e * (reads_per_target * f + (1.0 - f) + 1.0) + mask.numel() * mask.element_size() + m.numel() * e


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
            nbytes = bytes_moved(x_t, mask, m, x0_prev=True, noise=False)
            per_element = (nbytes - mask.numel() - m.numel() * m.element_size()) / (n * x_t.element_size())
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
    name = "denoise_step_cuda" if cuda else "denoise_step"
    out_dir = write_table(
        rows, ["dtype", "elements", "method", "median ms", "GB/s", "% copy bw", "fused out= speed-up"], name,
        out_dir=args.out, title=f"denoise_step{where}: fused update vs eager and compiled ops",
        notes=[f"copy bandwidth ({'1 GiB, CUDA events' if cuda else '256 MiB'}, read+write): {bandwidth:.1f} GB/s",
               "update: x = a x_t + b x0_hat + c x0_prev + (1-a-b-c) m on target rows, anchor elsewhere; "
               "B=8, d=128, 75% target rows",
               "bytes per call = n e (3 f + (1 - f) + 1) + B L + d e (target rows read x_t, x0_hat, x0_prev; "
               "source rows the anchor; every element written once; mask and m once): "
               f"{per_element:.2f} n e at this run's share f of target rows",
               "fused out= speed-up = t_method / t_fused_out"])
    lines = []
    for dtype in ("float32", "bfloat16"):
        big = [r for r in rows if r["dtype"] == dtype and r["elements"] == max(x["elements"] for x in rows)]
        by = {r["method"]: r for r in big}
        share = by["fused out="]["% copy bw"]
        ratio = by["fused out="]["fused out= speed-up"] and by["eager ops"]["median ms"] / by["fused out="]["median ms"]
        need = 80 if cuda else 60
        lines.append(f"{'PASS' if share >= need else 'FAIL'} {dtype}: fused out= at {share:.0f}% of copy bandwidth "
                     f"at {big[0]['elements']:.0e} elements, target >= {need}%")
        lines.append(f"{'PASS' if ratio >= 3 else 'FAIL'} {dtype}: fused out= {ratio:.1f}x eager, target >= 3x")
    section = "\nTargets\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    print(section, end="")
    with open(out_dir / f"{name}.md", "a", encoding="utf-8") as handle:
        handle.write(section)


if __name__ == "__main__":
    main()
