"""The CUDA mode of bench/attention.py (``python -m bench.attention --device cuda``): bfloat16,
the op against dense SDPA on its flash backend and compiled FlexAttention with the same block
mask, forward and forward+backward, timed with CUDA events through bench.common.timer; a table
line per length as it finishes."""
from __future__ import annotations

import gc
import time as clock

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.nn.attention import SDPBackend, sdpa_kernel

from bench.attention_problem import (BACKWARD_FLOP_FACTOR, FWD, FWD_BWD, PASSES, Attention, Config, Key, Problem,
                                     compiled_block_mask, compiled_flex, flex_mask_mod, forward_flops, make_problem,
                                     report_progress)
from bench.common import Cell, Timing, markdown_row, timer, write_table
from moediffuseq.ops import block_sparse_attention

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
    kwargs = dict(window=cfg.window, dilation=cfg.dilation, global_mask=problem.global_mask, causal=cfg.causal)
    mask_mod = flex_mask_mod(problem.global_mask, cfg)

    start = clock.perf_counter()
    block_mask = compiled_block_mask(mask_mod, cfg.batch, None, problem.length, problem.length, device="cuda")
    torch.cuda.synchronize()
    notes.append(f"{CUDA_FLEX} at L={problem.length}: create_block_mask {clock.perf_counter() - start:.1f} s, "
                 f"{block_mask.sparsity():.1f}% of 128x128 blocks skipped")

    def sdpa(q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return F.scaled_dot_product_attention(q, k, v, is_causal=cfg.causal)

    return {
        CUDA_OURS: lambda q, k, v: block_sparse_attention(q, k, v, **kwargs),
        CUDA_SDPA: sdpa,
        CUDA_FLEX: lambda q, k, v: compiled_flex(q, k, v, block_mask=block_mask),
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
    # dense work of SDPA: L^2 pairs, or the L (L + 1) / 2 on and below the diagonal when causal
    dense = 4.0 * cfg.batch * cfg.heads * cfg.dim * (length * (length + 1) / 2 if cfg.causal else length * length)
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
    time = timer("cuda", warmup=1, repeats=cfg.repeats, max_seconds=cfg.cell_seconds)
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
                start = clock.perf_counter()
                attend(q, k, v)
                torch.cuda.synchronize()
                first = clock.perf_counter() - start
                timings[(length, name, FWD)] = time(lambda: attend(q, k, v))
            if name == CUDA_FLEX:
                notes.append(f"{name} at L={length}: first forward call (compile) {first:.1f} s")
            report_progress(length, name, FWD, timings[(length, name, FWD)])
            leaves = [t.detach().requires_grad_() for t in (q, k, v)]

            def step() -> None:
                for leaf in leaves:
                    leaf.grad = None
                attend(*leaves).backward(problem.grad)

            timings[(length, name, FWD_BWD)] = time(step)
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
