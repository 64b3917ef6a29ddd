"""The MoE layer of bench/moe.py: its sizes and weights, the methods timed (ours, the HF-Mixtral
loop, the torch._grouped_mm pipeline, a dense FFN) and the check that they agree."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import Tensor
from torch.nn import functional as F

from moediffuseq.ops import moe_ffn, moe_topk_softmax

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
METHODS = ("ours", "hf_loop", "grouped_mm", "dense")
PASSES = ("fwd", "fwd+bwd")
EXPERT_OPS = frozenset({"moediffuseq::moe_ffn", "moediffuseq::moe_ffn_backward"})
# relative Frobenius-norm error allowed between methods' outputs, per dtype
AGREEMENT_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}


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
