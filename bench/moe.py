"""Mixture-of-experts layer: ours vs the HF-Mixtral loop vs torch._grouped_mm vs a dense FFN.

    python bench/moe.py                 # CPU (T=8192, D=1024, E=8, k=2, F=2048; float32 and bfloat16)
    python bench/moe.py --device cuda   # GPU (T=32768, D=2048, E=8, k=2, F=4096; bfloat16), see run_cuda

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
load, or even go negative, while a per-step ratio cannot.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.autograd.profiler_util import FunctionEvent
from torch.nn import functional as F
from torch.profiler import ProfilerActivity, profile, record_function

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import DEFAULT_OUT_DIR, Cell, matmul_rate, measure, measure_cuda, write_table  # noqa: E402

from moediffuseq.ops import moe_ffn, moe_topk_softmax  # noqa: E402

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("ours", "hf_loop", "grouped_mm", "dense")
PASSES = ("fwd", "fwd+bwd")
GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_grouped_mm"})
EXPERT_OPS = frozenset({"moediffuseq::moe_ffn", "moediffuseq::moe_ffn_backward"})
STEP_LABEL = "moe_bench_step"
# relative Frobenius-norm error allowed between methods' outputs, per dtype
AGREEMENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# targets: ours fwd+bwd vs the matmul rate, vs the HF loop (per dtype), and time outside expert GEMMs
TARGET_MATMUL_FRACTION = 0.85
TARGET_HF_SPEEDUP = {torch.float32: 1.2, torch.bfloat16: 2.0}
TARGET_OUTSIDE_SHARE = 0.10

COLUMNS = ("dtype", "pass", "method", "median ms", "min ms", "repeats", "GFLOP/s", "% matmul",
           "ours speed-up", "outside expert GEMMs %", "note")


@dataclass(frozen=True)
class Shape:
    """Layer sizes: T tokens of width D, E experts of width F, k experts per token."""

    T: int
    D: int
    E: int
    k: int
    F: int

    def flops(self, method: str, pass_: str) -> float:
        """Useful FLOPs of one call (the dense FFN has no router)."""
        experts = 2.0 * (2.0 * self.T * self.k * self.D * self.F)
        forward = experts if method == "dense" else 2.0 * self.T * self.D * self.E + experts
        return forward if pass_ == "fwd" else 3.0 * forward


@dataclass
class Params:
    """Inputs and weights of one dtype; every tensor but grad_y requires grad."""

    x: Tensor  # (T, D)
    w_gate: Tensor  # (D, E)
    w1: Tensor  # (E, D, F)
    w2: Tensor  # (E, F, D)
    dense_w1: Tensor  # (D, k*F)
    dense_w2: Tensor  # (k*F, D)
    grad_y: Tensor  # (T, D)


def make_params(shape: Shape, dtype: torch.dtype, seed: int = 0, device: str = "cpu") -> Params:
    """Random inputs with fan-in scaled weights, so activations stay O(1) (drawn on the CPU, moved)."""
    gen = torch.Generator().manual_seed(seed)

    def rand(*size: int, fan_in: int = 1) -> Tensor:
        return (torch.randn(*size, generator=gen) / fan_in**0.5).to(device=device, dtype=dtype).requires_grad_()

    s = shape
    return Params(
        x=rand(s.T, s.D),
        w_gate=rand(s.D, s.E, fan_in=s.D),
        w1=rand(s.E, s.D, s.F, fan_in=s.D),
        w2=rand(s.E, s.F, s.D, fan_in=s.F),
        dense_w1=rand(s.D, s.k * s.F, fan_in=s.D),
        dense_w2=rand(s.k * s.F, s.D, fan_in=s.k * s.F),
        grad_y=torch.randn(s.T, s.D, generator=gen).to(device=device, dtype=dtype),
    )


def gelu(h: Tensor) -> Tensor:
    """The activation of every method: gelu, tanh approximation."""
    return F.gelu(h, approximate="tanh")


def torch_route(logits: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """HF Mixtral routing: float32 softmax, top-k, renormalised; weights (T, k) f32, indices (T, k)."""
    probs = torch.softmax(logits.float(), dim=-1)
    weights, indices = torch.topk(probs, k, dim=-1)
    return weights / weights.sum(dim=-1, keepdim=True), indices


def hf_loop_experts(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """HF Mixtral's expert loop: select each expert's tokens, run its FFN, index_add the result."""
    weights = weights.to(x.dtype)
    y = torch.zeros_like(x)
    for e in range(w1.shape[0]):
        token, slot = torch.where(indices == e)
        if token.numel() == 0:
            continue
        out = gelu(x[token] @ w1[e]) @ w2[e]
        y = y.index_add(0, token, out * weights[token, slot, None])
    return y


def grouped_mm_experts(x: Tensor, weights: Tensor, indices: Tensor, w1: Tensor, w2: Tensor) -> Tensor:
    """Sort the slots by expert, two torch._grouped_mm calls over the groups, scatter back."""
    k = indices.shape[1]
    flat = indices.reshape(-1)
    order = torch.argsort(flat, stable=True)  # grouped row -> slot
    token = order // k
    offs = torch.bincount(flat, minlength=w1.shape[0]).cumsum(0).to(torch.int32)
    hidden = torch._grouped_mm(x[token], w1, offs=offs)
    out = torch._grouped_mm(gelu(hidden), w2, offs=offs)
    out = out * weights.reshape(-1)[order, None].to(x.dtype)
    return torch.zeros_like(x).index_add(0, token, out)


def layer_call(method: str, p: Params, k: int) -> tuple[Callable[[], Tensor], tuple[Tensor, ...]]:
    """The forward of ``method`` as a closure, and the tensors its backward differentiates."""
    if method == "dense":
        return (lambda: gelu(p.x @ p.dense_w1) @ p.dense_w2), (p.x, p.dense_w1, p.dense_w2)
    if method == "ours":
        def forward() -> Tensor:
            weights, indices = moe_topk_softmax(p.x @ p.w_gate, k)
            return moe_ffn(p.x, weights, indices, p.w1, p.w2, "gelu")
    elif method in ("hf_loop", "grouped_mm"):
        experts = hf_loop_experts if method == "hf_loop" else grouped_mm_experts

        def forward() -> Tensor:
            return experts(p.x, *torch_route(p.x @ p.w_gate, k), p.w1, p.w2)
    else:
        raise ValueError(f"unknown method {method!r}")
    return forward, (p.x, p.w_gate, p.w1, p.w2)


def pass_call(forward: Callable[[], Tensor], wrt: tuple[Tensor, ...], grad_y: Tensor,
              pass_: str) -> Callable[[], object]:
    """One timed call: the forward under no_grad, or the forward and the gradients of ``wrt``."""
    if pass_ == "fwd":
        def run() -> object:
            with torch.no_grad():
                return forward()
    else:
        def run() -> object:
            return torch.autograd.grad(forward(), wrt, grad_y)
    return run


def failure_reason(exc: Exception) -> str:
    """'n/a (...)' text of an unsupported method: the exception type and its first line."""
    first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    return f"n/a ({type(exc).__name__}: {first_line[:120]})"


def probe_grouped_mm(p: Params, k: int) -> dict[str, Optional[str]]:
    """Whether torch._grouped_mm runs forward and backward on this build and dtype, on a few tokens
    with the real weights (so the real strides and alignment); pass -> None or the reason it does not."""
    if not hasattr(torch, "_grouped_mm"):
        return dict.fromkeys(PASSES, "n/a (torch._grouped_mm missing in this torch build)")
    x = p.x[: 8 * p.w1.shape[0]].detach().clone().requires_grad_()
    reasons: dict[str, Optional[str]] = {}
    try:
        with torch.no_grad():
            grouped_mm_experts(x, *torch_route(x @ p.w_gate, k), p.w1, p.w2)
        reasons["fwd"] = None
    except RuntimeError as exc:
        return dict.fromkeys(PASSES, failure_reason(exc))
    try:
        y = grouped_mm_experts(x, *torch_route(x @ p.w_gate, k), p.w1, p.w2)
        torch.autograd.grad(y, (x, p.w_gate, p.w1, p.w2), torch.randn_like(y))
        reasons["fwd+bwd"] = None
    except RuntimeError as exc:
        reasons["fwd+bwd"] = failure_reason(exc)
    return reasons


def relative_error(a: Tensor, b: Tensor) -> float:
    """||a - b|| / ||b|| in float32."""
    a, b = a.float(), b.float()
    return ((a - b).norm() / b.norm().clamp_min(1e-30)).item()


def verify(p: Params, k: int, grouped_ok: bool) -> list[str]:
    """Checks, on the benchmark inputs, that the routers agree and that ours, the HF loop and the
    grouped_mm pipeline give the same y for the SAME routing (ours). Raises on a mismatch."""
    tol = AGREEMENT_TOL[p.x.dtype]
    with torch.no_grad():
        logits = p.x @ p.w_gate
        weights, indices = moe_topk_softmax(logits, k)
        # by descending weight in both, so the values compare even where ties order indices apart
        router_err = (weights - torch_route(logits, k)[0]).abs().max().item()
        if router_err > 1e-5:
            raise RuntimeError(f"routing weights disagree: max abs difference {router_err:.3g}")
        lines = [f"router weights: max abs diff {router_err:.2g}"]
        y_ours = moe_ffn(p.x, weights, indices, p.w1, p.w2, "gelu")
        others = {"hf_loop": hf_loop_experts}
        if grouped_ok:
            others["grouped_mm"] = grouped_mm_experts
        for name, experts in others.items():
            err = relative_error(experts(p.x, weights, indices, p.w1, p.w2), y_ours)
            if not err <= tol:
                raise RuntimeError(f"{name} disagrees with ours: relative error {err:.3g} > {tol:g}")
            lines.append(f"y {name} vs ours: relative error {err:.2g} (tolerance {tol:g})")
    return lines


def _has_ancestor(event: FunctionEvent, names: frozenset[str]) -> bool:
    """Whether an op enclosing ``event`` in the profiler's call tree is named one of ``names``."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name in names:
            return True
        parent = parent.cpu_parent
    return False


def outside_expert_gemm_share(run: Callable[[], object], steps: int) -> float:
    """Median over ``steps`` profiled calls of 1 - (expert GEMM wall time / step wall time)."""
    shares = []
    for _ in range(steps):
        with profile(activities=[ProfilerActivity.CPU], record_shapes=False) as prof:
            with record_function(STEP_LABEL):
                run()
        events = prof.events()
        step_us = next(ev.cpu_time_total for ev in events if ev.name == STEP_LABEL)
        gemm_us = sum(ev.cpu_time_total for ev in events
                      if ev.name in GEMM_OPS and _has_ancestor(ev, EXPERT_OPS) and not _has_ancestor(ev, GEMM_OPS))
        shares.append(1.0 - gemm_us / step_us)
    return statistics.median(shares)


@dataclass
class Result:
    """One (dtype, pass, method) measurement, or the reason it was not run."""

    median_s: Optional[float] = None
    min_s: Optional[float] = None
    repeats: Optional[int] = None
    outside_share: Optional[float] = None
    reason: Optional[str] = None


def bench_dtype(shape: Shape, dtype: torch.dtype, args: argparse.Namespace) -> dict[tuple[str, str], Result]:
    """Verifies and times every method and pass of one dtype; (pass, method) -> Result."""
    p = make_params(shape, dtype)
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
            timing = measure(run, warmup=1, repeats=args.repeats, max_seconds=args.max_seconds)
            result = Result(median_s=timing["median_s"], min_s=timing["min_s"], repeats=timing["repeats"])
            if method == "ours":
                result.outside_share = outside_expert_gemm_share(run, args.profile_steps)
            results[pass_, method] = result
            print(f"  {pass_:8s} {method:11s} {result.median_s * 1e3:9.1f} ms", flush=True)
    return results


def table_rows(shape: Shape, dtype_name: str, rate: float,
               results: dict[tuple[str, str], Result]) -> list[dict[str, Cell]]:
    """Table rows of one dtype."""
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
                if method == "dense":
                    row["note"] = "router not included"
            rows.append(row)
    return rows


def targets(rates: dict[str, float], shape: Shape,
            all_results: dict[str, dict[tuple[str, str], Result]]) -> list[str]:
    """PASS/FAIL lines of the targets, from this run's numbers."""
    lines = []

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    for dtype_name, results in all_results.items():
        ours, hf = results["fwd+bwd", "ours"], results["fwd+bwd", "hf_loop"]
        fraction = shape.flops("ours", "fwd+bwd") / ours.median_s / 1e9 / rates[dtype_name]
        lines.append(f"{verdict(fraction >= TARGET_MATMUL_FRACTION)} {dtype_name}: ours fwd+bwd at "
                     f"{100 * fraction:.1f}% of the matmul rate ({rates[dtype_name]:.0f} GFLOP/s), "
                     f"target >= {100 * TARGET_MATMUL_FRACTION:.0f}%")
        speedup, need = hf.median_s / ours.median_s, TARGET_HF_SPEEDUP[DTYPES[dtype_name]]
        lines.append(f"{verdict(speedup >= need)} {dtype_name}: ours fwd+bwd {speedup:.2f}x the HF loop, "
                     f"target >= {need:g}x")
        share = ours.outside_share
        lines.append(f"{verdict(share <= TARGET_OUTSIDE_SHARE)} {dtype_name}: ours fwd+bwd spends "
                     f"{100 * share:.1f}% outside the expert GEMMs (routing + permute + combine), "
                     f"target <= {100 * TARGET_OUTSIDE_SHARE:.0f}%")
    return lines


# ---------------------------------------------------------------------------------------------
# GPU mode (--device cuda): bfloat16, CUDA-event timing, expert GEMMs from the profiler's kernels.

CUDA_SHAPE = dict(tokens=32768, dim=2048, ffn=4096)
# targets of the GPU run: ours fwd+bwd vs the grouped_mm pipeline and the HF loop; the expert
# GEMMs' rate vs a dense bf16 matmul of the same machine
CUDA_TARGET_GROUPED_SPEEDUP = 1.0
CUDA_TARGET_HF_SPEEDUP = 2.0
CUDA_TARGET_GEMM_FRACTION = 0.70
# Kernel names as the profiler reports them (demangled; each substring below is in the mangled
# name too). The expert GEMMs are CUTLASS 3.x grouped (ptr-array) kernels, csrc/moe/cuda/moe_grouped_gemm.cuh:
#   cutlass::device_kernel<cutlass::gemm::kernel::GemmUniversal<cutlass::gemm::GroupProblemShape<...>, ...>>
# cuBLAS / cuBLASLt kernels have flat names (sm90_xmma_gemm_*, nvjet_*, ampere_*gemm*, gemv2T_kernel*,
# cublasLt::splitKreduce_kernel) and the CUTLASS kernels compiled into cuBLAS too
# (cutlass3x_sm90_tensorop_*gemm*, cutlass::Kernel2<cutlass_80_*>): "cutlass" or "gemm" alone would
# count a per-expert cuBLAS fallback as the grouped GEMM. torch._grouped_mm's own CUTLASS kernel has a
# name like ours, so kernels are also attributed to the op that launched them (EXPERT_OPS).
CUTLASS_GROUPED_GEMM_MARKERS = ("cutlass", "device_kernel", "GemmUniversal", "GroupProblemShape")
LIBRARY_GEMM_MARKERS = ("gemm", "gemv", "nvjet", "xmma", "cublas", "cutlass", "splitk")
CUDA_COLUMNS = ("pass", "method", "median ms", "min ms", "repeats", "TFLOP/s", "% matmul", "ours speed-up",
                "expert GEMM TFLOP/s", "expert GEMM % matmul", "outside expert GEMMs %", "note")


def cuda_matmul_rate(dtype: torch.dtype, n: int) -> float:
    """TFLOP/s of an n x n @ n x n matmul on the GPU (median of CUDA-event timings)."""
    a = torch.randn(n, n, device="cuda").to(dtype)
    b = torch.randn(n, n, device="cuda").to(dtype)
    t = measure_cuda(lambda: a @ b, warmup=3, repeats=20, max_seconds=5)["median_s"]
    return 2.0 * n**3 / t / 1e12


def is_cutlass_grouped_gemm(name: str) -> bool:
    """A CUTLASS 3.x grouped GEMM kernel, as the expert GEMMs are."""
    return all(marker in name for marker in CUTLASS_GROUPED_GEMM_MARKERS)


def is_library_gemm(name: str) -> bool:
    """Any other GEMM or GEMV kernel (cuBLAS, cuBLASLt, CUTLASS kernels shipped in cuBLAS)."""
    return not is_cutlass_grouped_gemm(name) and any(marker in name.lower() for marker in LIBRARY_GEMM_MARKERS)


def _expert_op(event: FunctionEvent) -> Optional[str]:
    """The MoE op (EXPERT_OPS) that is ``event`` or encloses it in the profiler's call tree."""
    while event is not None:
        if event.name in EXPERT_OPS:
            return event.name
        event = event.cpu_parent
    return None


@dataclass
class KernelProfile:
    """The GPU kernels of one call of ours, from the profiler: times are medians over the profiled
    calls; names and counts cover all of them."""

    grouped_s: float = 0.0  # CUTLASS grouped GEMM kernels launched inside the MoE ops
    total_s: float = 0.0  # every kernel of the call
    inside: int = 0  # kernels attributed to the MoE ops
    grouped: dict[str, int] = field(default_factory=dict)  # MoE op -> its CUTLASS grouped GEMM launches
    library: set[str] = field(default_factory=set)  # other GEMM kernels inside the MoE ops

    def problems(self, pass_: str) -> list[str]:
        """Why this call does not show the CUTLASS grouped GEMMs as the only expert GEMMs."""
        ops = ("moediffuseq::moe_ffn",) + (("moediffuseq::moe_ffn_backward",) if pass_ != "fwd" else ())
        if self.inside == 0:
            return [f"{pass_}: the profiler attributed no kernel to {' / '.join(ops)}, so which GEMMs ran "
                    "cannot be told"]
        problems = [f"{pass_}: no CUTLASS grouped GEMM kernel (cutlass::device_kernel<GemmUniversal<"
                    f"GroupProblemShape...>>) ran inside {op}" for op in ops if not self.grouped.get(op)]
        if self.library:
            names = ", ".join(sorted(name[:80] for name in self.library)[:3])
            problems.append(f"{pass_}: {len(self.library)} cuBLAS / other GEMM kernel(s) ran inside the MoE op "
                            f"(a per-expert fallback?): {names}")
        return problems


def moe_kernel_profile(run: Callable[[], object], steps: int) -> KernelProfile:
    """Profiles ``steps`` calls (CPU ops and CUDA kernels); each kernel is attributed to the op
    that launched it (the profiler's ``FunctionEvent.kernels``), and that op to the MoE op above
    it, if any."""
    result = KernelProfile()
    grouped_s, total_s = [], []
    for _ in range(steps):
        torch.cuda.synchronize()
        with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
            run()
            torch.cuda.synchronize()
        events = prof.events()
        total_s.append(sum(ev.time_range.elapsed_us() for ev in events
                           if ev.device_type == torch.autograd.DeviceType.CUDA) / 1e6)
        grouped_us = 0.0
        for ev in events:
            if ev.device_type != torch.autograd.DeviceType.CPU or not ev.kernels:
                continue
            op = _expert_op(ev)
            if op is None:
                continue
            for kernel in ev.kernels:
                result.inside += 1
                if is_cutlass_grouped_gemm(kernel.name):
                    grouped_us += kernel.duration
                    result.grouped[op] = result.grouped.get(op, 0) + 1
                elif is_library_gemm(kernel.name):
                    result.library.add(kernel.name)
        grouped_s.append(grouped_us / 1e6)
    result.grouped_s, result.total_s = statistics.median(grouped_s), statistics.median(total_s)
    return result


def run_cuda(args: argparse.Namespace) -> None:
    """The GPU table: every (pass, method) in bfloat16, CUDA-event medians; for ours, the time of
    the expert GEMM kernels (profiler) as a rate and as a share of the dense matmul rate."""
    dtype = torch.bfloat16
    shape = Shape(T=args.tokens, D=args.dim, E=args.experts, k=args.topk, F=args.ffn)
    print(f"MoE layer on {torch.cuda.get_device_name()}: {shape}, gelu (tanh), bfloat16", flush=True)
    rate_before = cuda_matmul_rate(dtype, args.matmul_n)
    p = make_params(shape, dtype, device="cuda")
    grouped = probe_grouped_mm(p, shape.k)
    for line in verify(p, shape.k, grouped["fwd"] is None):
        print(f"  check {line}", flush=True)
    results: dict[tuple[str, str], dict] = {}
    problems: list[str] = []  # the expert GEMMs were not (only) the CUTLASS grouped kernels
    for pass_ in PASSES:
        for method in METHODS:
            if method == "grouped_mm" and grouped[pass_] is not None:
                results[pass_, method] = dict(note=grouped[pass_])
                print(f"  {pass_:8s} {method:11s} {grouped[pass_]}", flush=True)
                continue
            forward, wrt = layer_call(method, p, shape.k)
            run = pass_call(forward, wrt, p.grad_y, pass_)
            results[pass_, method] = measure_cuda(run, warmup=2, repeats=args.repeats, max_seconds=30)
            if method == "ours":
                kernels = moe_kernel_profile(run, args.profile_steps)
                results[pass_, method].update(gemm_s=kernels.grouped_s, kernels_s=kernels.total_s)
                problems += kernels.problems(pass_)
                print(f"  {pass_:8s} ours kernels inside the MoE ops: {kernels.inside}, CUTLASS grouped GEMM "
                      f"launches {kernels.grouped}, other GEMMs {len(kernels.library)}", flush=True)
            print(f"  {pass_:8s} {method:11s} {results[pass_, method]['median_s'] * 1e3:9.2f} ms", flush=True)
            torch.cuda.empty_cache()
    rate = max(rate_before, cuda_matmul_rate(dtype, args.matmul_n))

    rows: list[dict[str, Cell]] = []
    for pass_ in PASSES:
        ours = results[pass_, "ours"]
        expert_flops = shape.flops("dense", pass_)  # the expert GEMM FLOPs alone
        for method in METHODS:
            r = results[pass_, method]
            row: dict[str, Cell] = {"pass": pass_, "method": method, "note": r.get("note")}
            if "median_s" in r:
                tflops = shape.flops(method, pass_) / r["median_s"] / 1e12
                row.update({"median ms": r["median_s"] * 1e3, "min ms": r["min_s"] * 1e3, "repeats": r["repeats"],
                            "TFLOP/s": tflops, "% matmul": 100 * tflops / rate,
                            "ours speed-up": None if method == "ours" else r["median_s"] / ours["median_s"]})
                if method == "dense":
                    row["note"] = "router not included"
            if "gemm_s" in r and r["gemm_s"] > 0:
                gemm_tflops = expert_flops / r["gemm_s"] / 1e12
                row.update({"expert GEMM TFLOP/s": gemm_tflops, "expert GEMM % matmul": 100 * gemm_tflops / rate,
                            "outside expert GEMMs %": 100 * (1 - r["gemm_s"] / r["kernels_s"])})
            rows.append(row)
    s = shape
    notes = [
        f"{torch.cuda.get_device_name()}; T={s.T}, D={s.D}, E={s.E}, k={s.k}, F={s.F}; gelu (tanh); bfloat16, "
        "routing in float32.",
        f"dense bf16 matmul rate: {rate:.0f} TFLOP/s (n={args.matmul_n} square matmul, the higher of before / after).",
        "useful FLOPs: fwd = 2*T*D*E + 4*T*k*D*F, fwd+bwd = 3x fwd; dense: 4*T*k*D*F (no router), 3x for fwd+bwd.",
        "times: CUDA events around each call, median of the repeats; fwd under torch.no_grad, fwd+bwd = forward "
        "+ torch.autograd.grad of x and all weights.",
        "expert GEMM columns (ours): GPU time of the CUTLASS grouped GEMM kernels launched inside moe_ffn / "
        f"moe_ffn_backward in one call (torch.profiler, median of {args.profile_steps} calls) against the expert "
        "GEMM FLOPs; outside = the other kernels' share of the kernel time (router GEMM, routing, gather, "
        "activation, combine, routing-weight gradient).",
    ]
    out_dir = write_table(rows, CUDA_COLUMNS, "moe_cuda", out_dir=args.out,
                          title="MoE layer on the GPU: ours vs HF loop vs torch._grouped_mm vs dense FFN", notes=notes)

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    ours = results["fwd+bwd", "ours"]
    lines = []
    for method, need in (("grouped_mm", CUDA_TARGET_GROUPED_SPEEDUP), ("hf_loop", CUDA_TARGET_HF_SPEEDUP)):
        other = results["fwd+bwd", method]
        if "median_s" in other:
            speedup = other["median_s"] / ours["median_s"]
            lines.append(f"{verdict(speedup >= need)} ours fwd+bwd {speedup:.2f}x {method}, target >= {need:g}x")
    if ours.get("gemm_s"):
        fraction = shape.flops("dense", "fwd+bwd") / ours["gemm_s"] / 1e12 / rate
        lines.append(f"{verdict(fraction >= CUDA_TARGET_GEMM_FRACTION)} ours fwd+bwd expert GEMMs at "
                     f"{100 * fraction:.0f}% of the dense bf16 matmul rate, target >= "
                     f"{100 * CUDA_TARGET_GEMM_FRACTION:.0f}%")
    lines.append(f"{verdict(not problems)} ours: the expert GEMMs are the CUTLASS grouped GEMM kernels, "
                 "no cuBLAS GEMM inside moe_ffn / moe_ffn_backward" + (f" ({'; '.join(problems)})" if problems else ""))
    section = "\nTargets\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    print(section, end="")
    with open(out_dir / "moe_cuda.md", "a", encoding="utf-8") as handle:
        handle.write(section)
    if problems:
        sys.exit("bench/moe.py: the CUTLASS grouped GEMM check failed:\n  " + "\n  ".join(problems))


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
    parser.add_argument("--dtypes", nargs="+", choices=sorted(DTYPES), default=["float32", "bfloat16"])
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
    defaults = CUDA_SHAPE if cuda else dict(tokens=8192, dim=1024, ffn=2048)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    if args.matmul_n is None:
        args.matmul_n = 8192 if cuda else 2048
    if args.quick:
        args.tokens, args.dim, args.ffn = 1024, 256, 512
    return args


def main() -> None:
    """Measures every dtype, writes <out>/moe.md and moe.csv, prints and appends the targets."""
    args = parse_args()
    if args.device == "cuda":
        run_cuda(args)
        return
    shape = Shape(T=args.tokens, D=args.dim, E=args.experts, k=args.topk, F=args.ffn)
    print(f"MoE layer {shape}, gelu (tanh); dtypes {', '.join(args.dtypes)}", flush=True)
    load_start = os.getloadavg()[0]
    rates: dict[str, float] = {}
    all_results: dict[str, dict[tuple[str, str], Result]] = {}
    rows: list[dict[str, Cell]] = []
    rate_samples: dict[str, tuple[float, float]] = {}
    for dtype_name in args.dtypes:
        before = matmul_rate(DTYPES[dtype_name], n=args.matmul_n)
        print(f"{dtype_name}: matmul rate {before:.0f} GFLOP/s (n={args.matmul_n})", flush=True)
        all_results[dtype_name] = bench_dtype(shape, DTYPES[dtype_name], args)
        after = matmul_rate(DTYPES[dtype_name], n=args.matmul_n)
        print(f"{dtype_name}: matmul rate {after:.0f} GFLOP/s after the layer runs", flush=True)
        rate_samples[dtype_name] = (before, after)
        rates[dtype_name] = max(before, after)
        rows += table_rows(shape, dtype_name, rates[dtype_name], all_results[dtype_name])
    s = shape
    notes = [
        f"T={s.T}, D={s.D}, E={s.E}, k={s.k}, F={s.F}; gelu (tanh); routing in float32.",
        f"matmul rate (GFLOP/s, n={args.matmul_n} square matmul, the higher of before / after the dtype's runs): "
        + ", ".join(f"{name} {rates[name]:.0f} ({b:.0f} / {a:.0f})" for name, (b, a) in rate_samples.items()) + ".",
        "useful FLOPs: fwd = 2*T*D*E + 4*T*k*D*F, fwd+bwd = 3x fwd; dense: 4*T*k*D*F (no router), 3x for fwd+bwd.",
        "fwd runs under torch.no_grad; fwd+bwd = forward + torch.autograd.grad of x and all weights.",
        "ours speed-up = method median / ours median, same dtype and pass.",
        "outside expert GEMMs % (ours): torch.profiler, median over " + str(args.profile_steps)
        + " steps of 1 - (wall time of the GEMMs inside moe_ffn / moe_ffn_backward) / (step wall time).",
        f"1-minute load average at start / end: {load_start:.2f} / {os.getloadavg()[0]:.2f} "
        f"({os.cpu_count()} CPUs; other work on the machine skews every number).",
    ]
    out_dir = write_table(rows, COLUMNS, "moe", out_dir=args.out,
                          title="MoE layer: ours vs HF loop vs torch._grouped_mm vs dense FFN", notes=notes)
    target_lines = targets(rates, shape, all_results)
    section = "\nTargets\n" + "\n".join(f"- {line}" for line in target_lines) + "\n"
    print(section, end="")
    with open(out_dir / "moe.md", "a", encoding="utf-8") as handle:
        handle.write(section)


if __name__ == "__main__":
    main()
