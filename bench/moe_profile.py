"""Where the MoE layer's time goes (bench/moe.py): on the CPU, the wall time of the GEMM ops
issued inside moe_ffn / moe_ffn_backward against the whole step (torch.profiler, CPU ops); on a
GPU, the kernels each MoE op launched, the CUTLASS grouped GEMM told from cuBLAS GEMMs by name."""
from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from bench.moe_layer import EXPERT_OPS

GEMM_OPS = frozenset({"aten::mm", "aten::addmm", "aten::bmm", "aten::baddbmm", "aten::matmul", "aten::_grouped_mm"})
STEP_LABEL = "moe_bench_step"
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
