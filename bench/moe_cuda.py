"""The GPU mode of bench/moe.py (``python -m bench.moe --device cuda``): bfloat16, CUDA-event timing
through bench.common, the expert GEMMs found among the profiler's kernels (CUTLASS grouped GEMM
asserted, no cuBLAS GEMM inside the op)."""
from __future__ import annotations

import argparse
import statistics
import sys
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile

from bench.common import Cell, matmul_rate, timer, write_table
from bench.moe_layer import (EXPERT_OPS, METHODS, PASSES, Shape, layer_call, make_params, pass_call,
                             probe_grouped_mm, verify)


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
    rate_before = matmul_rate(dtype, args.matmul_n, device="cuda") / 1e3
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
            results[pass_, method] = timer("cuda", warmup=2, repeats=args.repeats, max_seconds=30)(run)
            if method == "ours":
                kernels = moe_kernel_profile(run, args.profile_steps)
                results[pass_, method].update(gemm_s=kernels.grouped_s, kernels_s=kernels.total_s)
                problems += kernels.problems(pass_)
                print(f"  {pass_:8s} ours kernels inside the MoE ops: {kernels.inside}, CUTLASS grouped GEMM "
                      f"launches {kernels.grouped}, other GEMMs {len(kernels.library)}", flush=True)
            print(f"  {pass_:8s} {method:11s} {results[pass_, method]['median_s'] * 1e3:9.2f} ms", flush=True)
            torch.cuda.empty_cache()
    rate = max(rate_before, matmul_rate(dtype, args.matmul_n, device="cuda") / 1e3)

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
