"""The problem of bench/attention.py: its configuration, seeded inputs, allowed-pair count
(closed form, or counted from the mask when causal), the check of the op, and the methods timed
on each device: on the CPU the op (fp32, bf16), SDPA dense and with a boolean mask, compiled
FlexAttention and the dense reference; on a GPU the op, SDPA on its flash backend and compiled
FlexAttention, all in bfloat16."""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
import torch._inductor.config
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention.flex_attention import create_block_mask, flex_attention

from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]

FWD = "fwd"
FWD_BWD = "fwd+bwd"
PASSES = (FWD, FWD_BWD)
BACKWARD_FLOP_FACTOR = 3.5  # forward + backward ~ (1 + 2.5) x forward
CHECK_MAX_LENGTH = 4096  # CPU: checks against the dense reference up to this length
CHECK_TOLERANCE = 1e-4
CUDA_CHECK_TOLERANCE = 3e-2  # bfloat16 outputs of two fused kernels, |v| ~ 1

OURS_FP32 = "ours fp32"
OURS_BF16 = "ours bf16"
SDPA_DENSE = "sdpa dense fp32"
SDPA_MASK = "sdpa bool-mask fp32"
FLEX = "flex compiled fp32"
REFERENCE = "reference fp32"
SDPA_FLASH = "sdpa flash dense bf16"
FLEX_BF16 = "flex compiled bf16"


@dataclass(frozen=True)
class Config:
    """Problem shape and benchmark settings, from the command line."""

    batch: int
    heads: int
    dim: int
    window: int
    dilation: int
    n_global: int
    lengths: tuple[int, ...]
    repeats: int
    cell_seconds: float
    slow_call_seconds: float
    seed: int
    out: Path
    causal: bool = False
    device: str = "cpu"


@dataclass
class Problem:
    """Inputs at one sequence length (float32, no grad) and the allowed-pair count."""

    length: int
    q: Tensor
    k: Tensor
    v: Tensor
    grad: Tensor
    global_mask: Tensor  # (B, L) bool
    pairs: int


@dataclass
class Built:
    """An attention callable set up for one problem.

    ``first_call_s`` is set when building already made a forward call at this length (for a
    compiled method, compile plus one run), so the timed forward needs no warm-up call.
    ``no_backward`` is set, to the reason, when the method cannot run a backward pass.
    """

    attend: Attention
    setup_note: Optional[str] = None
    first_call_s: Optional[float] = None
    no_backward: Optional[str] = None


@dataclass(frozen=True)
class Method:
    """One implementation to time: ``build`` sets it up outside the timed region, and it runs
    only at lengths up to ``max_length`` (larger ones would not fit in memory)."""

    name: str
    dtype: torch.dtype
    build: Callable[[Problem, Config, torch.dtype], Built]
    max_length: Optional[int] = None


def forward_flops(cfg: Config, pairs: int) -> float:
    """Useful forward FLOPs: QK^T and PV over the allowed pairs, 2 x 2 x D per pair and head."""
    return 4.0 * cfg.heads * cfg.dim * pairs


def allowed_pairs(
    length: int, window: int, dilation: int, global_positions: Sequence[int] | Tensor, batch: int
) -> int:
    """Number of allowed (query, key) pairs over the batch, without an L x L matrix.

    Every batch element has global tokens at ``global_positions`` and no padding. A pair is
    allowed when either side is global or it lies in the dilated band; by inclusion-exclusion
    that is (pairs touching a global token) + (band pairs with neither side global).
    """
    g = torch.unique(torch.as_tensor(global_positions, dtype=torch.long))
    offsets = torch.arange(-window, window + 1)
    band_total = int((length - offsets.abs() * dilation).clamp(min=0).sum())
    # Band partners of position p: offsets k in [-w, w] with 0 <= p + k * d < L.
    band_of_globals = int(
        ((g // dilation).clamp(max=window) + ((length - 1 - g) // dilation).clamp(max=window) + 1).sum()
    )
    diff = g[:, None] - g[None, :]
    band_both_global = int(((diff.abs() <= window * dilation) & (diff.remainder(dilation) == 0)).sum())
    band_no_global = band_total - 2 * band_of_globals + band_both_global
    touching_global = length * length - (length - g.numel()) ** 2
    return batch * (touching_global + band_no_global)


def counted_pairs(length: int, cfg: Config, global_mask: Tensor, rows: int = 1024) -> int:
    """Allowed pairs counted from the op's mask, ``rows`` query rows at a time (no L x L matrix)."""
    i = torch.arange(length)
    total = 0
    for r0 in range(0, length, rows):
        qi = i[r0:r0 + rows, None]
        diff = qi - i[None, :]  # (rows, L)
        band = (diff.abs() <= cfg.window * cfg.dilation) & (diff.remainder(cfg.dilation) == 0)
        allowed = band | global_mask[:, r0:r0 + rows, None] | global_mask[:, None, :]  # (B, rows, L)
        if cfg.causal:
            allowed = allowed & (diff >= 0)
        total += int(allowed.sum())
    return total


def make_problem(length: int, cfg: Config) -> Problem:
    """Seeded inputs at ``length`` (independent of which other lengths are run), drawn on the
    CPU in float32 and moved to the device; methods cast them to their dtype."""
    gen = torch.Generator().manual_seed(cfg.seed + length)
    shape = (cfg.batch, cfg.heads, length, cfg.dim)
    q, k, v, grad = (torch.randn(shape, generator=gen) for _ in range(4))
    positions = torch.randperm(length, generator=gen)[: cfg.n_global]
    global_mask = torch.zeros(cfg.batch, length, dtype=torch.bool)
    global_mask[:, positions] = True
    if cfg.causal:
        pairs = counted_pairs(length, cfg, global_mask)
    else:
        pairs = allowed_pairs(length, cfg.window, cfg.dilation, positions, cfg.batch)
    move = lambda t: t.to(cfg.device)  # noqa: E731
    return Problem(length, move(q), move(k), move(v), move(grad), move(global_mask), pairs)


def dense_allowed(problem: Problem, cfg: Config) -> Tensor:
    """The (B, 1, L, L) allowed mask, as SDPA takes it."""
    mask = block_sparse_allowed_mask(
        problem.length, window=cfg.window, dilation=cfg.dilation,
        global_mask=problem.global_mask, batch=cfg.batch, causal=cfg.causal,
    )
    return mask[:, None].contiguous()


def check_close(name: str, got: Tensor, expected: Tensor) -> None:
    """Raise if ``got`` differs from ``expected`` by more than CHECK_TOLERANCE anywhere."""
    error = (got.double() - expected.double()).abs().max().item()
    if not error <= CHECK_TOLERANCE:
        raise RuntimeError(f"{name}: max abs error {error:.3g} vs the reference exceeds {CHECK_TOLERANCE}")


def sanity_check(problem: Problem, cfg: Config) -> None:
    """CPU: check the pair count and the op's float32 output against the dense reference."""
    mask = dense_allowed(problem, cfg)
    if int(mask.sum()) != problem.pairs:
        raise RuntimeError(f"allowed_pairs gives {problem.pairs}, the dense mask {int(mask.sum())}")
    kwargs = dict(window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask, causal=cfg.causal)
    with torch.no_grad():
        ours = block_sparse_attention(problem.q, problem.k, problem.v, **kwargs)
        reference = block_sparse_attention_ref(problem.q, problem.k, problem.v, **kwargs)
    check_close(f"{OURS_FP32} at L={problem.length}", ours, reference)


def check_against_flex(problem: Problem, cfg: Config, notes: list[str]) -> str:
    """GPU: the op against FlexAttention with the same pattern (bfloat16), output and gradients;
    "ok" or "MISMATCH", with the differences in ``notes``."""
    methods = {OURS_BF16: build_ours(problem, cfg, torch.bfloat16).attend,
               FLEX_BF16: build_flex(problem, cfg, torch.bfloat16).attend}
    outs = {}
    for name, attend in methods.items():
        leaves = [t.detach().to(torch.bfloat16).requires_grad_() for t in (problem.q, problem.k, problem.v)]
        out = attend(*leaves)
        outs[name] = (out.detach(), *torch.autograd.grad(out, leaves, problem.grad.to(torch.bfloat16)))
    errors = [(a.float() - b.float()).abs().max().item() for a, b in zip(outs[OURS_BF16], outs[FLEX_BF16])]
    verdict = "ok" if all(e <= CUDA_CHECK_TOLERANCE * max(1.0, b.abs().max().item())
                          for e, b in zip(errors, outs[FLEX_BF16])) else "MISMATCH"
    notes.append(f"check at L={problem.length}, ours vs FlexAttention max abs difference: out {errors[0]:.3g}, "
                 f"grad q {errors[1]:.3g}, grad k {errors[2]:.3g}, grad v {errors[3]:.3g} -> {verdict}")
    return verdict


def build_ours(problem: Problem, cfg: Config, dtype: torch.dtype) -> Built:
    """The fused op."""
    return Built(lambda q, k, v: block_sparse_attention(
        q, k, v, window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask, causal=cfg.causal
    ))


def build_sdpa_dense(problem: Problem, cfg: Config, dtype: torch.dtype) -> Built:
    """SDPA without a mask: all L^2 pairs (is_causal=True: the causal half); on a GPU its flash
    backend."""
    if cfg.device == "cpu":
        return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal))

    def flash(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)

    return Built(flash)


def build_sdpa_mask(problem: Problem, cfg: Config, dtype: torch.dtype) -> Built:
    """SDPA with the allowed pattern as a dense boolean mask."""
    mask = dense_allowed(problem, cfg)
    return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def build_reference(problem: Problem, cfg: Config, dtype: torch.dtype) -> Built:
    """The dense pure-PyTorch reference in the input dtype."""
    return Built(lambda q, k, v: block_sparse_attention_ref(
        q, k, v, window=cfg.window, dilation=cfg.dilation,
        global_mask=problem.global_mask, upcast=False, causal=cfg.causal,
    ))


# Compile from scratch so that the reported first-call time includes the real compile time
# rather than a hit in inductor's on-disk cache from an earlier run.
torch._inductor.config.force_disable_caches = True
# Static shapes for both: compiled with dynamic shapes, create_block_mask materialises the
# L x L mask (about 7 GiB peak at L=8192), which does not fit at L=16384.
compiled_flex = torch.compile(flex_attention, dynamic=False)
compiled_block_mask = torch.compile(create_block_mask, dynamic=False)


@functools.cache
def flex_backward_error(device: str) -> Optional[str]:
    """Why FlexAttention cannot run a CPU backward (None if it can), probed on tiny inputs.

    The probe calls the eager ``flex_attention``: an error raised while the compiled one is
    tracing makes torch.compile fall back to eager for every later call, and eager
    FlexAttention on CPU materialises the dense B x H x L x L scores.
    """
    if device != "cpu":
        return None
    q, k, v = (torch.randn(1, 1, 128, 16, requires_grad=True) for _ in range(3))
    try:
        flex_attention(q, k, v).sum().backward()
    except NotImplementedError as error:
        return str(error).splitlines()[0]
    return None


def flex_mask_mod(is_global: Tensor, cfg: Config) -> Callable:
    """The op's allowed pairs (METHOD §3, no padding) as a FlexAttention mask_mod."""
    reach = cfg.window * cfg.dilation

    def mask_mod(b: Tensor, h: Tensor, q_idx: Tensor, kv_idx: Tensor) -> Tensor:
        diff = q_idx - kv_idx
        band = (diff.abs() <= reach) & (diff % cfg.dilation == 0)
        allowed = band | is_global[b, q_idx] | is_global[b, kv_idx]
        return allowed & (diff >= 0) if cfg.causal else allowed

    return mask_mod


def build_flex(problem: Problem, cfg: Config, dtype: torch.dtype) -> Built:
    """Compiled FlexAttention with a block mask of the same pattern; makes the first call (in
    ``dtype``), checked against the op up to CHECK_MAX_LENGTH on the CPU."""
    mask_mod = flex_mask_mod(problem.global_mask, cfg)

    length = problem.length
    start = time.perf_counter()
    block_mask = compiled_block_mask(mask_mod, cfg.batch, None, length, length, device=cfg.device)
    mask_seconds = time.perf_counter() - start

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return compiled_flex(q, k, v, block_mask=block_mask)

    q, k, v = (t.to(dtype) for t in (problem.q, problem.k, problem.v))
    start = time.perf_counter()
    with torch.no_grad():
        out = attend(q, k, v)
        if cfg.device == "cuda":
            torch.cuda.synchronize()
    first_seconds = time.perf_counter() - start
    if cfg.device == "cpu" and length <= CHECK_MAX_LENGTH:
        with torch.no_grad():
            ours = build_ours(problem, cfg, dtype).attend(q, k, v)
        check_close(f"{FLEX} at L={length}", out, ours)
    note = (f"create_block_mask (compiled) {mask_seconds:.1f} s, "
            f"{block_mask.sparsity():.1f}% of 128x128 blocks skipped")
    return Built(attend, setup_note=note, first_call_s=first_seconds, no_backward=flex_backward_error(cfg.device))


METHODS = {
    "cpu": (
        Method(OURS_FP32, torch.float32, build_ours),
        Method(OURS_BF16, torch.bfloat16, build_ours),
        Method(SDPA_DENSE, torch.float32, build_sdpa_dense, max_length=16384),
        Method(SDPA_MASK, torch.float32, build_sdpa_mask, max_length=8192),
        Method(FLEX, torch.float32, build_flex),
        Method(REFERENCE, torch.float32, build_reference, max_length=8192),
    ),
    "cuda": (  # the CUDA kernels run in bfloat16/float16 only
        Method(OURS_BF16, torch.bfloat16, build_ours),
        Method(SDPA_FLASH, torch.bfloat16, build_sdpa_dense),
        Method(FLEX_BF16, torch.bfloat16, build_flex),
    ),
}
