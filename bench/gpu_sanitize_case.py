"""The block_sparse_attention case of the GPU check's sanitizer stage: causal, L = 8192, global keys
past L / 2, so that a split tile of global keys has an empty causal query range and its backward
CTA has nothing to do but wait for the K / V copies it started (it once exited with them in
flight). Forward and backward once on CUDA under ``compute-sanitizer --tool memcheck|racecheck``
(bench/gpu_check_stages.py runs it), then the gradients against the CPU kernels on the same
bfloat16 inputs, so a kernel that the sanitizer passes but that computes garbage fails too.

    python -m bench.gpu_sanitize_case [--length 8192]
"""
from __future__ import annotations

import argparse
import sys

import torch

from moediffuseq.ops import block_sparse_attention


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--no-compare", action="store_true", help="skip the comparison with the CPU kernels")
    args = parser.parse_args(argv)
    L, D, window = args.length, 64, 32
    g = torch.Generator().manual_seed(0)
    q, k, v, grad = (torch.randn(1, 2, L, D, generator=g).to(torch.bfloat16) for _ in range(4))
    global_mask = torch.zeros(1, L, dtype=torch.bool)
    # every global key past L / 2: the first split of their key tile (query tiles below L / 2 at
    # L = 8192, two splits) has an empty causal query range
    global_mask[0, [L // 2 + 5, L // 2 + 700, L - 9]] = True

    def run(device):
        leaves = [t.to(device).requires_grad_(True) for t in (q, k, v)]
        out = block_sparse_attention(*leaves, window=window, global_mask=global_mask.to(device), causal=True)
        grads = torch.autograd.grad(out, leaves, grad.to(device))
        return [t.detach().float().cpu() for t in (out, *grads)]

    got = run("cuda")
    torch.cuda.synchronize()
    print(f"causal block-sparse attention, L = {L}, global keys {global_mask.nonzero()[:, 1].tolist()}: "
          "forward and backward ran", flush=True)
    if args.no_compare:
        return 0
    want = run("cpu")
    worst = 0.0
    for name, a, b in zip(("out", "dq", "dk", "dv"), got, want):
        err = (a - b).abs().max().item() / max(b.abs().max().item(), 1e-6)
        worst = max(worst, err)
        print(f"{name}: max |cuda - cpu| / max |cpu| = {err:.3g}", flush=True)
    if worst > 2 ** -5:
        print(f"FAIL: CUDA and CPU kernels differ by {worst:.3g} of the largest entry (bound {2 ** -5:.3g})")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
