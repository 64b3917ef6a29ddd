"""Smoke check of every op: forward and backward once on tiny inputs, compared loosely with its
``*_ref``, each op in its own process so that a crash (segfault, illegal memory access) in one
does not hide the others. float32 and bfloat16, except on CUDA for block-sparse attention
(bfloat16 kernels, D = 64) and moe_ffn (bfloat16: the CUTLASS grouped GEMM).

    python -m bench.gpu_smoke --device cuda               # every op, 6 processes at once
    python -m bench.gpu_smoke --device cpu --jobs 2
    python -m bench.gpu_smoke --device cuda --op moe_ffn  # one op, in this process
    python -m bench.gpu_smoke --device cuda --sanitizer   # each op under compute-sanitizer memcheck

Every check prints one line (max abs error, tolerance, verdict); the table goes to
``<out>/smoke_<device>.{md,csv}``. Exit status 0 when every op passed. The CUDA processes run with
CUDA_LAUNCH_BLOCKING=1, so an error is reported at the launch that caused it. Tolerances are
loose (a smoke check, not the tests): relative to max(1, max |reference|), 2e-3 in float32,
6e-2 in bfloat16.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Callable, Optional


RESULT_TAG = "SMOKE_RESULT "
TOLERANCE = {"float32": 2e-3, "bfloat16": 6e-2}
OPS = ("block_sparse_attention", "moe_topk_softmax", "moe_ffn", "soft_absorb_q_sample", "denoise_step",
       "nearest_embedding")
# dtypes per op and device. CUDA block-sparse attention has bfloat16 / float16 kernels only; CUDA
# moe_ffn runs its CUTLASS grouped GEMM in bfloat16 (float32 takes a per-expert matmul path by
# design); under MOEDIFFUSEQ_STRICT_CUTLASS=1, which the GPU check sets, a refused bf16 problem is
# an error.
DTYPES = {
    "cuda": {"block_sparse_attention": ("bfloat16",), "moe_ffn": ("bfloat16",)},
    "cpu": {},
}
DEFAULT_DTYPES = ("float32", "bfloat16")


# ---------------------------------------------------------------------------------------------
# One op (child process)

class Checks:
    """Collects the comparisons of one (op, dtype)."""

    def __init__(self, op: str, dtype_name: str) -> None:
        self.op, self.dtype_name, self.rows = op, dtype_name, []

    def close(self, what: str, got, ref, tol: Optional[float] = None) -> None:
        """max |got - ref| against tol * max(1, max |ref|), both finite."""
        import torch

        tol = TOLERANCE[self.dtype_name] if tol is None else tol
        got64, ref64 = got.detach().double(), ref.detach().double()
        err = (got64 - ref64).abs().max().item() if ref64.numel() else 0.0
        bound = tol * max(1.0, ref64.abs().max().item() if ref64.numel() else 0.0)
        ok = bool(torch.isfinite(got64).all()) and err <= bound
        self.add(what, ok, err, bound)

    def add(self, what: str, ok: bool, err: float, bound: float, note: str = "") -> None:
        self.rows.append(dict(check=what, ok=ok, err=err, bound=bound, note=note))
        print(f"{self.op} {self.dtype_name} {what}: max abs error {err:.3g} (bound {bound:.3g}) "
              f"{'ok' if ok else 'FAIL'}{' - ' + note if note else ''}", flush=True)


def leaf(t):
    return t.detach().clone().requires_grad_()


def smoke_block_sparse_attention(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import block_sparse_attention, block_sparse_attention_ref

    g = torch.Generator().manual_seed(0)
    B, H, L, D = 2, 2, 197, 64
    q, k, v, grad = (torch.randn(B, H, L, D, generator=g).to(device, dtype) for _ in range(4))
    global_mask = torch.zeros(B, L, dtype=torch.bool)
    global_mask[:, [0, 50, 121]] = True
    padding = torch.zeros(B, L, dtype=torch.bool)
    padding[1, -7:] = True
    kw = dict(window=16, dilation=2, global_mask=global_mask.to(device), key_padding_mask=padding.to(device))
    leaves = [leaf(t) for t in (q, k, v)]
    out = block_sparse_attention(*leaves, **kw)
    out.backward(grad)
    ref_leaves = [leaf(t.double()) for t in (q, k, v)]
    ref = block_sparse_attention_ref(*ref_leaves, **kw, upcast=True)
    ref.backward(grad.double())
    c.close("fwd out", out, ref)
    for name, a, b in zip(("q", "k", "v"), leaves, ref_leaves):
        c.close(f"bwd grad {name}", a.grad, b.grad)


def smoke_moe_topk_softmax(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import moe_topk_softmax, moe_topk_softmax_ref

    g = torch.Generator().manual_seed(1)
    logits = torch.randn(61, 8, generator=g).to(device, dtype)
    grad = torch.randn(61, 2, generator=g).to(device)
    x, x_ref = leaf(logits), leaf(logits)
    weights, indices = moe_topk_softmax(x, 2)
    weights.backward(grad)
    ref_weights, ref_indices = moe_topk_softmax_ref(x_ref, 2)
    ref_weights.backward(grad)
    same = int((indices == ref_indices).all())
    c.add("fwd indices", bool(same), float(1 - same), 0.0, "exact match" if same else "indices differ")
    c.close("fwd weights", weights, ref_weights)
    c.close("bwd grad logits", x.grad, x_ref.grad)


def smoke_moe_ffn(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import moe_ffn, moe_ffn_ref, moe_topk_softmax_ref

    g = torch.Generator().manual_seed(2)
    T, D, F, E, k = 45, 64, 128, 4, 2
    x = torch.randn(T, D, generator=g)
    w1 = torch.randn(E, D, F, generator=g) / D**0.5
    w2 = torch.randn(E, F, D, generator=g) / F**0.5
    weights, indices = moe_topk_softmax_ref(torch.randn(T, E, generator=g), k)
    indices[3, 1] = -1  # a dropped slot
    grad = torch.randn(T, D, generator=g).to(device, dtype)
    x, w1, w2 = (t.to(device, dtype) for t in (x, w1, w2))
    weights, indices = weights.to(device), indices.to(device)
    leaves = [leaf(t) for t in (x, weights, w1, w2)]
    y = moe_ffn(leaves[0], leaves[1], indices, leaves[2], leaves[3], "gelu")
    y.backward(grad)
    ref_leaves = [leaf(t.double()) for t in (x, weights, w1, w2)]
    ref = moe_ffn_ref(ref_leaves[0], ref_leaves[1], indices, ref_leaves[2], ref_leaves[3], "gelu", upcast=True)
    ref.backward(grad.double())
    c.close("fwd y", y, ref)
    for name, a, b in zip(("x", "weights", "w1", "w2"), leaves, ref_leaves):
        c.close(f"bwd grad {name}", a.grad, b.grad)


def smoke_soft_absorb_q_sample(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import soft_absorb_q_sample, soft_absorb_q_sample_ref

    g = torch.Generator().manual_seed(3)
    B, L, d = 2, 33, 64
    x0, noise, grad = (torch.randn(B, L, d, generator=g).to(device, dtype) for _ in range(3))
    m = torch.randn(d, generator=g).to(device, dtype)
    mask = (torch.rand(B, L, generator=g) < 0.6).to(device)
    uniform = torch.rand(B, L, generator=g).to(device)
    sqrt_ab = torch.tensor([0.9, 0.3]).to(device)
    sqrt_1mab = (1 - sqrt_ab**2).sqrt()
    x, mm = leaf(x0), leaf(m)
    out = soft_absorb_q_sample(x, mm, mask, sqrt_ab, sqrt_1mab, gamma=0.5, noise=noise, uniform=uniform)
    out.backward(grad)
    x_ref, m_ref = leaf(x0), leaf(m)
    ref = soft_absorb_q_sample_ref(x_ref, m_ref, mask, sqrt_ab, sqrt_1mab, noise=noise, uniform=uniform, gamma=0.5)
    ref.backward(grad)
    c.close("fwd x_t", out, ref)
    c.close("bwd grad x0", x.grad, x_ref.grad)
    c.close("bwd grad m", mm.grad, m_ref.grad)


def smoke_denoise_step(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import denoise_step, denoise_step_ref

    g = torch.Generator().manual_seed(4)
    B, L, d = 2, 33, 64
    x_t, x0, prev, noise, anchor = (torch.randn(B, L, d, generator=g).to(device, dtype) for _ in range(5))
    mask = (torch.rand(B, L, generator=g) < 0.6).to(device)
    m = torch.randn(d, generator=g).to(device, dtype)
    a, b, cc, s = (torch.rand(B, generator=g).to(device) for _ in range(4))
    kw = dict(x0_prev=prev, coef_x0_prev=cc, noise=noise, coef_noise=s)
    out = denoise_step(x_t, x0, anchor, mask, m, a, b, **kw)
    c.close("fwd x_next", out, denoise_step_ref(x_t, x0, anchor, mask, m, a, b, **kw))
    into = torch.empty_like(x_t)
    denoise_step(x_t, x0, anchor, mask, m, a, b, **kw, out=into)
    c.close("fwd out=", into, out, tol=0.0)
    in_place = x_t.clone()
    denoise_step(in_place, x0, anchor, mask, m, a, b, **kw, out=in_place)
    c.close("fwd in place (out = x_t)", in_place, out, tol=0.0)
    c.close("fwd source rows = anchor", out[~mask], anchor[~mask], tol=0.0)
    c.add("bwd", True, 0.0, 0.0, "no backward: a sampler update, not differentiated")


def smoke_nearest_embedding(c: Checks, device: str, dtype) -> None:
    import torch
    from moediffuseq.ops import nearest_embedding, nearest_embedding_ref

    g = torch.Generator().manual_seed(5)
    x = torch.randn(2, 33, 64, generator=g).to(device, dtype)
    emb = torch.randn(300, 64, generator=g).to(device, dtype)
    got, ref = nearest_embedding(x, emb), nearest_embedding_ref(x, emb)
    # where the indices differ, the two rows must be (nearly) equally close: a float32 near-tie
    flat = x.reshape(-1, 64).double()
    dist = torch.cdist(flat, emb.double())  # (N, V)
    gap = (dist.gather(1, got.reshape(-1, 1)) - dist.gather(1, ref.reshape(-1, 1))).abs().max().item()
    differ = int((got != ref).sum())
    bound = 1e-4 * max(1.0, dist.max().item())
    c.add("fwd indices", gap <= bound, gap, bound, f"{differ} of {got.numel()} indices differ (near-ties)"
          if differ else "exact match")
    c.add("bwd", True, 0.0, 0.0, "no backward: an argmin")


SMOKES: dict[str, Callable] = {name: globals()[f"smoke_{name}"] for name in OPS}


def run_op(op: str, device: str) -> int:
    """Runs one op in this process; prints its checks and a final result line."""
    import torch
    import moediffuseq

    info = moediffuseq.build_info()
    if device == "cuda" and not (torch.cuda.is_available() and info.has_cuda):
        print(f"{op}: CUDA unusable (torch.cuda.is_available() = {torch.cuda.is_available()}, "
              f"has_cuda = {info.has_cuda})", flush=True)
        return 2
    dtypes = DTYPES[device].get(op, DEFAULT_DTYPES)
    results = []
    for dtype_name in dtypes:
        checks = Checks(op, dtype_name)
        start = time.perf_counter()
        error = None
        try:
            SMOKES[op](checks, device, getattr(torch, dtype_name))
            if device == "cuda":
                torch.cuda.synchronize()
        except Exception as exc:  # noqa: BLE001 (the message is the result)
            error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0] if str(exc).strip() else ''}"[:300]
            print(f"{op} {dtype_name}: {error}", flush=True)
        rows = checks.rows
        ok = error is None and bool(rows) and all(r["ok"] for r in rows)
        results.append(dict(
            op=op, dtype=dtype_name, status="ok" if ok else "FAIL",
            fwd=max((r["err"] for r in rows if r["check"].startswith("fwd")), default=None),
            bwd=max((r["err"] for r in rows if r["check"].startswith("bwd ")), default=None),
            seconds=time.perf_counter() - start,
            note=error or "; ".join(f"{r['check']}: {r['note'] or 'FAIL'}" for r in rows
                                    if not r["ok"] or r["note"]),
        ))
    print(RESULT_TAG + json.dumps(results), flush=True)
    return 0 if all(r["status"] == "ok" for r in results) else 1


# ---------------------------------------------------------------------------------------------
# Every op (parent process)

def run_all(args: argparse.Namespace) -> int:
    """Each op in its own process, ``--jobs`` at a time; a table of the results."""
    from bench.gpu_check_jobs import Job, run_jobs

    env = {"CUDA_LAUNCH_BLOCKING": "1", "TORCH_SHOW_CPP_STACKTRACES": "1", "PYTHONUNBUFFERED": "1"}
    prefix = (["compute-sanitizer", "--tool", "memcheck", "--print-limit", "20", "--error-exitcode", "99"]
              if args.sanitizer else [])
    jobs = [Job(op, tuple(prefix + [sys.executable, "-X", "faulthandler", "-m", "bench.gpu_smoke", "--device",
                                    args.device, "--op", op]), env) for op in args.ops]
    found: dict[str, list[dict]] = {}

    def emit(label: str, line: str) -> None:
        if line.startswith(RESULT_TAG):
            found[label] = json.loads(line[len(RESULT_TAG):])
        else:
            print(f"[{label}] {line}", flush=True)

    results = run_jobs(jobs, emit, parallel=args.jobs, job_timeout_s=args.op_timeout, cwd=Path.cwd())
    rows = []
    for result in results:
        if result.label in found:
            rows += found[result.label]
            if result.rc not in (0, 1):  # reported, then failed (the sanitizer's exit code, a crash at exit)
                for row in found[result.label]:
                    row.update(status="FAIL", note=f"process {result.describe()}; {row['note']}".strip("; "))
            continue
        if result.timed_out:
            status = f"TIMEOUT ({result.describe()})"
        elif result.rc is not None and result.rc < 0:
            status = f"CRASH ({result.describe()})"
        else:
            status = f"FAIL ({result.describe()})"
        last = result.tail[-1] if result.tail else ""
        rows.append(dict(op=result.label, dtype="", status=status, seconds=result.seconds, note=last[:300]))
    from bench.common import write_table

    columns = ["op", "dtype", "status", "fwd max err", "bwd max err", "seconds", "note"]
    for row in rows:
        row["fwd max err"], row["bwd max err"] = row.pop("fwd", None), row.pop("bwd", None)
    device_name = args.device
    if args.device == "cuda":
        import torch

        device_name = torch.cuda.get_device_name() if torch.cuda.is_available() else "cuda (unavailable)"
    write_table(rows, columns, f"smoke_{args.device}", out_dir=args.out,
                title=f"Smoke check of every op on {device_name}",
                notes=["forward and backward once on tiny inputs against the op's *_ref; errors are max abs "
                       f"differences; bounds {TOLERANCE} x max(1, max |ref|)",
                       "each op in its own process" + (", under compute-sanitizer memcheck" if args.sanitizer else "")])
    failed = [row["op"] + (f" {row['dtype']}" if row["dtype"] else "") for row in rows if row["status"] != "ok"]
    print(f"smoke: {len(rows) - len(failed)} of {len(rows)} ok" + (f"; failed: {', '.join(failed)}" if failed else ""),
          flush=True)
    return 1 if failed else 0


def main() -> int:
    from bench.common import DEFAULT_OUT_DIR

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cuda")
    parser.add_argument("--op", choices=OPS, help="run this op only, in this process")
    parser.add_argument("--ops", nargs="+", choices=OPS, default=list(OPS), help="ops to run, each in its own process")
    parser.add_argument("--jobs", type=int, default=None,
                        help="processes at once (default: every op on cuda, 2 on cpu)")
    parser.add_argument("--op-timeout", type=float, default=120.0, help="seconds per op process")
    parser.add_argument("--sanitizer", action="store_true", help="run each op under compute-sanitizer memcheck")
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args()
    if args.op:
        return run_op(args.op, args.device)
    if args.jobs is None:
        args.jobs = len(args.ops) if args.device == "cuda" else 2
    return run_all(args)


if __name__ == "__main__":
    sys.exit(main())
