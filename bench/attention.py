"""Benchmark ``moediffuseq.ops.block_sparse_attention`` against PyTorch baselines (CPU or CUDA).

For every sequence length it times the forward pass and the forward+backward pass of the op
(float32 and bfloat16), dense SDPA, SDPA with the allowed pattern as a boolean mask, compiled
FlexAttention with the same pattern, and the dense pure-PyTorch reference. Throughput is in
useful GFLOP/s: every method is credited only with the FLOPs of the allowed (query, key) pairs.
The table goes to ``<out>/attention.md`` and ``<out>/attention.csv``; a Targets section follows.

    python bench/attention.py --quick        # smoke run, L in {1024, 4096}
    python bench/attention.py                # full run, L up to 32768
    python bench/attention.py --device cuda  # GPU run (see run_cuda), L in {8k, 32k, 128k}
    python bench/attention.py --device cuda --lengths 8192 32768   # a table line per L as it finishes
    python bench/attention.py --causal --lengths 8192   # causal: SDPA is_causal, the causal band as a
                                                        # bool mask, FlexAttention with q >= kv
"""
from __future__ import annotations

import argparse
import functools
import gc
import os
import sys
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

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from common import (  # noqa: E402
    DEFAULT_OUT_DIR,
    Cell,
    Timing,
    copy_bandwidth,
    markdown_row,
    matmul_rate,
    measure,
    measure_cuda,
    write_table,
)

from moediffuseq.ops import (  # noqa: E402
    block_sparse_allowed_mask,
    block_sparse_attention,
    block_sparse_attention_ref,
)

Attention = Callable[[Tensor, Tensor, Tensor], Tensor]

FWD = "fwd"
FWD_BWD = "fwd+bwd"
PASSES = (FWD, FWD_BWD)
BACKWARD_FLOP_FACTOR = 3.5  # forward + backward ~ (1 + 2.5) x forward
CHECK_MAX_LENGTH = 4096  # sanity checks against the dense reference up to this length
CHECK_TOLERANCE = 1e-4

OURS_FP32 = "ours fp32"
OURS_BF16 = "ours bf16"
SDPA_DENSE = "sdpa dense fp32"
SDPA_MASK = "sdpa bool-mask fp32"
FLEX = "flex compiled fp32"
REFERENCE = "reference fp32"


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
    build: Callable[[Problem, Config], Built]
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
    """Seeded inputs at ``length`` (independent of which other lengths are run)."""
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
    return Problem(length, q, k, v, grad, global_mask, pairs)


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
    """Check the pair count and the op's float32 output against the dense reference."""
    mask = dense_allowed(problem, cfg)
    if int(mask.sum()) != problem.pairs:
        raise RuntimeError(f"allowed_pairs gives {problem.pairs}, the dense mask {int(mask.sum())}")
    kwargs = dict(window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask, causal=cfg.causal)
    with torch.no_grad():
        ours = block_sparse_attention(problem.q, problem.k, problem.v, **kwargs)
        reference = block_sparse_attention_ref(problem.q, problem.k, problem.v, **kwargs)
    check_close(f"{OURS_FP32} at L={problem.length}", ours, reference)


def build_ours(problem: Problem, cfg: Config) -> Built:
    """The fused op."""
    return Built(lambda q, k, v: block_sparse_attention(
        q, k, v, window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask, causal=cfg.causal
    ))


def build_sdpa_dense(problem: Problem, cfg: Config) -> Built:
    """SDPA without a mask: all L^2 pairs (is_causal=True: the causal half)."""
    return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal))


def build_sdpa_mask(problem: Problem, cfg: Config) -> Built:
    """SDPA with the allowed pattern as a dense boolean mask."""
    mask = dense_allowed(problem, cfg)
    return Built(lambda q, k, v: F.scaled_dot_product_attention(q, k, v, attn_mask=mask))


def build_reference(problem: Problem, cfg: Config) -> Built:
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
_compiled_flex = torch.compile(flex_attention, dynamic=False)
_compiled_block_mask = torch.compile(create_block_mask, dynamic=False)


@functools.cache
def flex_backward_error() -> Optional[str]:
    """Why FlexAttention cannot run a CPU backward (None if it can), probed on tiny inputs.

    The probe calls the eager ``flex_attention``: an error raised while the compiled one is
    tracing makes torch.compile fall back to eager for every later call, and eager
    FlexAttention on CPU materialises the dense B x H x L x L scores.
    """
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


def build_flex(problem: Problem, cfg: Config) -> Built:
    """Compiled FlexAttention with a block mask of the same pattern; makes the first call."""
    mask_mod = flex_mask_mod(problem.global_mask, cfg)

    length = problem.length
    start = time.perf_counter()
    block_mask = _compiled_block_mask(mask_mod, cfg.batch, None, length, length, device="cpu")
    mask_seconds = time.perf_counter() - start

    def attend(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        return _compiled_flex(q, k, v, block_mask=block_mask)

    start = time.perf_counter()
    with torch.no_grad():
        out = attend(problem.q, problem.k, problem.v)
    first_seconds = time.perf_counter() - start
    if length <= CHECK_MAX_LENGTH:
        with torch.no_grad():
            ours = build_ours(problem, cfg).attend(problem.q, problem.k, problem.v)
        check_close(f"{FLEX} at L={length}", out, ours)
    note = (f"create_block_mask (compiled) {mask_seconds:.1f} s, "
            f"{block_mask.sparsity():.1f}% of 128x128 blocks skipped")
    return Built(attend, setup_note=note, first_call_s=first_seconds, no_backward=flex_backward_error())


METHODS = (
    Method(OURS_FP32, torch.float32, build_ours),
    Method(OURS_BF16, torch.bfloat16, build_ours),
    Method(SDPA_DENSE, torch.float32, build_sdpa_dense, max_length=16384),
    Method(SDPA_MASK, torch.float32, build_sdpa_mask, max_length=8192),
    Method(FLEX, torch.float32, build_flex),
    Method(REFERENCE, torch.float32, build_reference, max_length=8192),
)


def time_forward(method: Method, built: Built, problem: Problem, cfg: Config) -> Timing:
    """Median forward time under no_grad."""
    q, k, v = (t.to(method.dtype) for t in (problem.q, problem.k, problem.v))
    with torch.no_grad():
        return measure(
            lambda: built.attend(q, k, v),
            warmup=0 if built.first_call_s is not None else 1,
            repeats=cfg.repeats,
            max_seconds=cfg.cell_seconds,
            slow_call_seconds=cfg.slow_call_seconds,
        )


def time_forward_backward(method: Method, attend: Attention, problem: Problem, cfg: Config) -> Timing:
    """Median time of forward plus ``out.backward(grad)``, with grads reset before each call."""
    leaves = [t.detach().to(method.dtype).requires_grad_() for t in (problem.q, problem.k, problem.v)]
    grad = problem.grad.to(method.dtype)

    def step() -> None:
        for leaf in leaves:
            leaf.grad = None
        attend(*leaves).backward(grad)

    return measure(
        step, warmup=1, repeats=cfg.repeats,
        max_seconds=cfg.cell_seconds, slow_call_seconds=cfg.slow_call_seconds,
    )


Key = tuple[int, str, str]  # (L, method, pass)


def run(cfg: Config, notes: list[str]) -> tuple[dict[Key, Timing], dict[Key, str], dict[int, int]]:
    """Time every (L, method, pass); returns timings, statuses of untimed cells and the
    allowed-pair count per L. Appends setup and compile observations to ``notes``."""
    timings: dict[Key, Timing] = {}
    statuses: dict[Key, str] = {}
    pairs: dict[int, int] = {}
    for length in cfg.lengths:
        problem = make_problem(length, cfg)
        pairs[length] = problem.pairs
        if length <= CHECK_MAX_LENGTH:
            sanity_check(problem, cfg)
        for method in METHODS:
            if method.max_length is not None and length > method.max_length:
                for pass_ in PASSES:
                    statuses[(length, method.name, pass_)] = "skipped (memory)"
                continue
            built = method.build(problem, cfg)
            forward = timings[(length, method.name, FWD)] = time_forward(method, built, problem, cfg)
            report_progress(length, method.name, FWD, forward)
            observations = [built.setup_note] if built.setup_note else []
            if built.first_call_s is not None:
                observations.insert(0, f"first call {built.first_call_s:.1f} s, "
                                       f"so compile ~ {built.first_call_s - forward['median_s']:.1f} s")
            if observations:
                notes.append(f"{method.name} at L={length}: " + "; ".join(observations))
            key = (length, method.name, FWD_BWD)
            if built.no_backward is not None:
                statuses[key] = "n/a (no backward)"
                note = f"{method.name} backward: {built.no_backward}"
                if note not in notes:
                    notes.append(note)
            else:
                timings[key] = time_forward_backward(method, built.attend, problem, cfg)
                report_progress(length, method.name, FWD_BWD, timings[key])
            del built
            gc.collect()
        del problem
        gc.collect()
    return timings, statuses, pairs


def report_progress(length: int, method: str, pass_: str, timing: Timing) -> None:
    """One line per timed cell on stderr, so long runs show where they are."""
    print(
        f"[L={length}] {method} {pass_}: {timing['median_s'] * 1e3:.1f} ms ({timing['repeats']} runs)",
        file=sys.stderr, flush=True,
    )


def table_rows(
    cfg: Config,
    timings: dict[Key, Timing],
    statuses: dict[Key, str],
    pairs: dict[int, int],
    rates: dict[torch.dtype, float],
) -> list[dict[str, Cell]]:
    """One row per (L, method, pass) with time, useful GFLOP/s, % of matmul rate, speed-up."""
    rows: list[dict[str, Cell]] = []
    for length in cfg.lengths:
        for method in METHODS:
            for pass_ in PASSES:
                key = (length, method.name, pass_)
                row: dict[str, Cell] = {"L": length, "method": method.name, "pass": pass_}
                timing = timings.get(key)
                if timing is None:
                    row["status"] = statuses.get(key, "not run")
                    rows.append(row)
                    continue
                flops = forward_flops(cfg, pairs[length]) * (BACKWARD_FLOP_FACTOR if pass_ == FWD_BWD else 1.0)
                seconds = timing["median_s"]
                gflops = flops / seconds / 1e9
                row.update({
                    "median ms": seconds * 1e3,
                    "runs": timing["repeats"],
                    "useful GFLOP/s": gflops,
                    "% matmul": 100.0 * gflops / rates[method.dtype],
                    "status": "ok" if timing["repeats"] > 1 else "ok (1 run)",
                })
                ours = timings.get((length, OURS_FP32, pass_))
                if ours is not None:
                    row["ours fp32 speed-up"] = seconds / ours["median_s"]
                rows.append(row)
    return rows


def target_lines(
    cfg: Config, timings: dict[Key, Timing], pairs: dict[int, int], rates: dict[torch.dtype, float]
) -> list[str]:
    """PASS/FAIL lines for the performance targets, from this run's timings."""

    def seconds(length: int, method: str, pass_: str) -> Optional[float]:
        timing = timings.get((length, method, pass_))
        return None if timing is None else timing["median_s"]

    def verdict(label: str, value: Optional[float], threshold: float, higher_is_better: bool, unit: str) -> str:
        if value is None:
            return f"{label}: not run"
        ok = value >= threshold if higher_is_better else value <= threshold
        sign = ">=" if higher_is_better else "<="
        return f"{label}: {'PASS' if ok else 'FAIL'} (measured {value:.2f}{unit}, target {sign} {threshold:g}{unit})"

    def ratio(num: Optional[float], den: Optional[float]) -> Optional[float]:
        return None if num is None or den is None else num / den

    ours_fwd = seconds(8192, OURS_FP32, FWD)
    matmul_pct = None
    if ours_fwd is not None:
        matmul_pct = 100.0 * forward_flops(cfg, pairs[8192]) / ours_fwd / 1e9 / rates[torch.float32]
    return [
        verdict("fp32 forward vs compiled FlexAttention at L=8192 (t_flex / t_ours)",
                ratio(seconds(8192, FLEX, FWD), ours_fwd), 5.0, True, "x"),
        verdict("fp32 forward useful GFLOP/s vs fp32 matmul rate at L=8192",
                matmul_pct, 50.0, True, "%"),
        verdict("fp32 fwd+bwd vs SDPA with bool mask at L=8192 (t_sdpa / t_ours)",
                ratio(seconds(8192, SDPA_MASK, FWD_BWD), seconds(8192, OURS_FP32, FWD_BWD)), 5.0, True, "x"),
        verdict("linearity, fp32 forward t(32768) / t(8192)",
                ratio(seconds(32768, OURS_FP32, FWD), ours_fwd), 4.5, False, "x"),
        verdict("linearity, fp32 fwd+bwd t(32768) / t(8192)",
                ratio(seconds(32768, OURS_FP32, FWD_BWD), seconds(8192, OURS_FP32, FWD_BWD)), 4.5, False, "x"),
        verdict("bf16 forward vs fp32 forward at L=8192 (t_fp32 / t_bf16)",
                ratio(ours_fwd, seconds(8192, OURS_BF16, FWD)), 2.0, True, "x"),
    ]


def parse_args(argv: Optional[Sequence[str]] = None) -> tuple[Config, int, str]:
    """Command-line flags -> (Config, thread count, device)."""
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--heads", type=int, help="default 8 (cpu), 16 (cuda)")
    parser.add_argument("--dim", type=int, help="default 64 (cpu), 128 (cuda)")
    parser.add_argument("--window", type=int, default=256)
    parser.add_argument("--dilation", type=int, default=1)
    parser.add_argument("--globals", type=int, default=64, dest="n_global", help="number of global tokens")
    parser.add_argument("--lengths", type=int, nargs="+",
                        help="default 1024 4096 8192 16384 32768 (cpu), 8192 32768 131072 (cuda)")
    parser.add_argument("--threads", type=int, default=torch.get_num_threads())
    parser.add_argument("--repeats", type=int, help="timed calls per cell (default 5, 2 with --quick)")
    parser.add_argument("--cell-seconds", type=float, default=15.0,
                        help="stop repeating a cell once its timed calls reach this many seconds")
    parser.add_argument("--slow-call-seconds", type=float, default=20.0,
                        help="a cell whose first call takes longer is recorded from that one call")
    parser.add_argument("--quick", action="store_true", help="L in {1024, 4096} and fewer repeats")
    parser.add_argument("--causal", action="store_true", help="causal attention (key j <= query i) for every method")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT_DIR)
    args = parser.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and args.causal:
        parser.error("--causal: the CUDA kernels have no causal mode yet (CPU only)")
    if cuda:
        lengths = args.lengths or ([8192] if args.quick else list(CUDA_LENGTHS))
        repeats = args.repeats or (3 if args.quick else 10)
    else:
        lengths = args.lengths or ([1024, 4096] if args.quick else [1024, 4096, 8192, 16384, 32768])
        repeats = args.repeats or (2 if args.quick else 5)
    heads = args.heads or (16 if cuda else 8)
    dim = args.dim or (128 if cuda else 64)
    cfg = Config(
        batch=args.batch, heads=heads, dim=dim, window=args.window, dilation=args.dilation,
        n_global=args.n_global, lengths=tuple(lengths), repeats=repeats, cell_seconds=args.cell_seconds,
        slow_call_seconds=args.slow_call_seconds, seed=args.seed, out=args.out, causal=args.causal,
    )
    return cfg, args.threads, args.device


def main(argv: Optional[Sequence[str]] = None) -> None:
    cfg, threads, device = parse_args(argv)
    if device == "cuda":
        run_cuda(cfg)
        return
    torch.manual_seed(cfg.seed)
    torch.set_num_threads(threads)
    rates = {dtype: matmul_rate(dtype) for dtype in (torch.float32, torch.bfloat16)}
    bandwidth = copy_bandwidth()
    notes = [
        f"B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, window={cfg.window}, dilation={cfg.dilation}, "
        f"{cfg.n_global} global tokens (seeded randperm), no padding{', causal' if cfg.causal else ''}; "
        f"repeats={cfg.repeats}, "
        f"cell budget {cfg.cell_seconds:g} s, single call above {cfg.slow_call_seconds:g} s",
        f"2048^3 matmul: fp32 {rates[torch.float32]:.1f} GFLOP/s, bf16 {rates[torch.bfloat16]:.1f} GFLOP/s; "
        f"copy bandwidth {bandwidth:.1f} GB/s",
        "useful FLOPs: forward 4*H*D*(allowed pairs), fwd+bwd 3.5x forward; "
        "% matmul is against the fp32 rate for fp32 rows, bf16 rate for bf16 rows",
        "ours fp32 speed-up = t_method / t_ours_fp32 for the same L and pass",
    ]
    timings, statuses, pairs = run(cfg, notes)
    for length, count in pairs.items():
        notes.append(f"L={length}: {count} allowed pairs ({100 * count / (cfg.batch * length**2):.2f}% of B*L^2)")
    columns = ["L", "method", "pass", "median ms", "runs", "useful GFLOP/s", "% matmul",
               "ours fp32 speed-up", "status"]
    rows = table_rows(cfg, timings, statuses, pairs, rates)
    write_table(rows, columns, "attention_causal" if cfg.causal else "attention", out_dir=cfg.out,
                title=f"block_sparse_attention CPU benchmark{' (causal)' if cfg.causal else ''}", notes=notes)
    print("\n## Targets\n")
    for line in target_lines(cfg, timings, pairs, rates):
        print(f"- {line}")


# ---------------------------------------------------------------------------------------------
# CUDA mode: bfloat16, the op against dense SDPA on its flash backend and compiled FlexAttention
# with the same block mask, forward and forward+backward, timed with CUDA events.

CUDA_LENGTHS = (8192, 32768, 131072)
CUDA_OURS = "ours bf16"
CUDA_SDPA = "sdpa flash dense bf16"
CUDA_FLEX = "flex compiled bf16"
CUDA_CHECK_TOLERANCE = 3e-2  # bfloat16 outputs of two fused kernels, |v| ~ 1


def cuda_problem(length: int, cfg: Config) -> Problem:
    """The CPU problem's seeded inputs, in bfloat16 on the GPU."""
    problem = make_problem(length, cfg)
    move = lambda t: t.to("cuda", torch.bfloat16)  # noqa: E731
    return Problem(length, move(problem.q), move(problem.k), move(problem.v), move(problem.grad),
                   problem.global_mask.cuda(), problem.pairs)


def cuda_methods(problem: Problem, cfg: Config, notes: list[str]) -> dict[str, Attention]:
    """The three attention callables for one problem (FlexAttention compiled on its first call)."""
    kwargs = dict(window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask)
    mask_mod = flex_mask_mod(problem.global_mask, cfg)

    start = time.perf_counter()
    block_mask = _compiled_block_mask(mask_mod, cfg.batch, None, problem.length, problem.length, device="cuda")
    torch.cuda.synchronize()
    notes.append(f"{CUDA_FLEX} at L={problem.length}: create_block_mask {time.perf_counter() - start:.1f} s, "
                 f"{block_mask.sparsity():.1f}% of 128x128 blocks skipped")

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v)

    return {
        CUDA_OURS: lambda q, k, v: block_sparse_attention(q, k, v, **kwargs),
        CUDA_SDPA: sdpa,
        CUDA_FLEX: lambda q, k, v: _compiled_flex(q, k, v, block_mask=block_mask),
    }


def cuda_check(problem: Problem, methods: dict[str, Attention], notes: list[str]) -> str:
    """Compares the op with FlexAttention (same pattern) on this problem, output and gradients."""
    outs = {}
    for name in (CUDA_OURS, CUDA_FLEX):
        leaves = [t.detach().clone().requires_grad_() for t in (problem.q, problem.k, problem.v)]
        out = methods[name](*leaves)
        outs[name] = (out.detach(), *torch.autograd.grad(out, leaves, problem.grad))
    errors = [(a.float() - b.float()).abs().max().item() for a, b in zip(outs[CUDA_OURS], outs[CUDA_FLEX])]
    verdict = "ok" if all(e <= CUDA_CHECK_TOLERANCE * max(1.0, b.abs().max().item())
                          for e, b in zip(errors, outs[CUDA_FLEX])) else "MISMATCH"
    notes.append(f"check at L={problem.length}, ours vs FlexAttention max abs difference: out {errors[0]:.3g}, "
                 f"grad q {errors[1]:.3g}, grad k {errors[2]:.3g}, grad v {errors[3]:.3g} -> {verdict}")
    return verdict


CUDA_COLUMNS = ["L", "method", "pass", "median ms", "TFLOP/s", "useful TFLOP/s", "% flash", "x flex", "x sdpa",
                "check"]
# widths of the lines printed as each length finishes (the saved table is aligned on its own)
CUDA_WIDTHS = [max(len(column), width) for column, width in zip(CUDA_COLUMNS, (6, 21, 7, 9, 7, 14, 7, 6, 6, 8))]


def cuda_rows(length: int, cfg: Config, timings: dict[Key, Timing], pairs: dict[int, int],
              verdicts: dict[int, str]) -> list[dict[str, Cell]]:
    """The table rows of one sequence length."""
    rows: list[dict[str, Cell]] = []
    useful = forward_flops(cfg, pairs[length])
    dense = 4.0 * cfg.batch * cfg.heads * cfg.dim * length * length
    for name in (CUDA_OURS, CUDA_SDPA, CUDA_FLEX):
        for pass_ in PASSES:
            factor = BACKWARD_FLOP_FACTOR if pass_ == FWD_BWD else 1.0
            seconds = timings[(length, name, pass_)]["median_s"]
            done = (dense if name == CUDA_SDPA else useful) * factor
            sdpa_seconds = timings[(length, CUDA_SDPA, pass_)]["median_s"]
            flex_seconds = timings[(length, CUDA_FLEX, pass_)]["median_s"]
            rows.append({
                "L": length, "method": name, "pass": pass_, "median ms": seconds * 1e3,
                "TFLOP/s": done / seconds / 1e12,
                "useful TFLOP/s": useful * factor / seconds / 1e12,
                "% flash": 100.0 * (useful * factor / seconds) / (dense * factor / sdpa_seconds),
                "x flex": flex_seconds / seconds,
                "x sdpa": sdpa_seconds / seconds,
                "check": verdicts.get(length, ""),
            })
    return rows


def run_cuda(cfg: Config) -> None:
    """Times every (L, method, pass) on the GPU and writes ``attention_cuda.{md,csv}``. The rows
    of each length are printed as soon as that length is done, and the files are rewritten with
    the rows so far, so a run stopped at a long length keeps the shorter ones."""
    torch.manual_seed(cfg.seed)
    notes = [
        f"{torch.cuda.get_device_name()}; B={cfg.batch}, H={cfg.heads}, D={cfg.dim}, window={cfg.window}, "
        f"dilation={cfg.dilation}, {cfg.n_global} global tokens (seeded randperm), no padding, bfloat16; "
        f"median of up to {cfg.repeats} calls timed with CUDA events",
        "TFLOP/s counts the FLOPs each method performs (dense L^2 for SDPA, allowed pairs for the others); "
        "useful TFLOP/s counts allowed pairs only; fwd+bwd = 3.5x forward FLOPs",
        "% flash = useful TFLOP/s / SDPA flash TFLOP/s at the same L and pass; x flex = t_flex / t_method",
    ]
    timings: dict[Key, Timing] = {}
    pairs: dict[int, int] = {}
    verdicts: dict[int, str] = {}
    rows: list[dict[str, Cell]] = []
    title = "block_sparse_attention CUDA benchmark"
    print(markdown_row(CUDA_COLUMNS, CUDA_WIDTHS), flush=True)
    print("|" + "|".join("-" * (width + 2) for width in CUDA_WIDTHS) + "|", flush=True)
    for length in cfg.lengths:
        problem = cuda_problem(length, cfg)
        pairs[length] = problem.pairs
        methods = cuda_methods(problem, cfg, notes)
        if length == min(cfg.lengths):
            verdicts[length] = cuda_check(problem, methods, notes)
        for name, attend in methods.items():
            q, k, v = problem.q, problem.k, problem.v
            with torch.no_grad():
                start = time.perf_counter()
                attend(q, k, v)
                torch.cuda.synchronize()
                first = time.perf_counter() - start
                timings[(length, name, FWD)] = measure_cuda(lambda: attend(q, k, v), warmup=1,
                                                            repeats=cfg.repeats, max_seconds=cfg.cell_seconds)
            if name == CUDA_FLEX:
                notes.append(f"{name} at L={length}: first forward call (compile) {first:.1f} s")
            report_progress(length, name, FWD, timings[(length, name, FWD)])
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def step() -> None:
                for leaf in leaves:
                    leaf.grad = None
                attend(*leaves).backward(problem.grad)

            timings[(length, name, FWD_BWD)] = measure_cuda(step, warmup=1, repeats=cfg.repeats,
                                                            max_seconds=cfg.cell_seconds)
            report_progress(length, name, FWD_BWD, timings[(length, name, FWD_BWD)])
            del leaves
        del problem, methods
        gc.collect()
        torch.cuda.empty_cache()
        length_rows = cuda_rows(length, cfg, timings, pairs, verdicts)
        for row in length_rows:
            print(markdown_row([row.get(c) for c in CUDA_COLUMNS], CUDA_WIDTHS), flush=True)
        rows += length_rows
        write_table(rows, CUDA_COLUMNS, "attention_cuda", out_dir=cfg.out, title=title, notes=notes, echo=False)

    for length, count in pairs.items():
        notes.append(f"L={length}: {count} allowed pairs ({100 * count / (cfg.batch * length**2):.2f}% of B*L^2)")
    write_table(rows, CUDA_COLUMNS, "attention_cuda", out_dir=cfg.out, title=title, notes=notes)


if __name__ == "__main__":
    main()
