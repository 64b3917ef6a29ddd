"""The log-sum-exp round trip of block_sparse_attention's CUDA kernels, and the backward at a huge
scale.

The CUDA forward rounds the scaled score to log2 units (s2 = S * scale_log2), keeps the row
maximum m2 of s2 and the sum of exp2(s2 - m2), and saves lse = fl(fl(m2 * ln2) + log(sum)) in
natural-log units (the op's output). The backward rebuilds the probabilities from that lse. At a
huge scale one ulp of the score dwarfs log(sum), so any rounding that differs between the two
directions moves the row maximum's exponent by ulps of the score and its probability from 1 to
0 (and its dV with it). ``emulate_cuda_probabilities`` replays, in float32 on the CPU, the
arithmetic of the kernels as written (``KERNEL_LINES`` pins the source lines it replays, so the
emulation cannot drift from the kernels unnoticed). The dV test runs the op itself: the CPU
backend against the float64 reference, and where a GPU is present the CUDA kernels against the
CPU backend on the same inputs.
"""
import torch

from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref
from utils import ROOT, make_inputs, run_with_grads, skip_unless_ready

import pytest

F32 = torch.float32
LOG2E = torch.tensor(1.4426950408889634, dtype=F32)  # kLog2e of the kernels
LN2 = torch.tensor(0.6931471805599453, dtype=F32)    # kLn2 / kBsaLn2 of the kernels

# The kernel lines whose float32 roundings emulate_cuda_probabilities replays (each product and
# sum rounded on its own: __fmul_rn / __fadd_rn / __fsub_rn are never fused into an FMA).
KERNEL_LINES = {
    "csrc/attention/cuda/block_sparse_attention_fwd_kernel.cuh": [
        "const float scale_log2 = p.scale * kLog2e;",
        "float s = __fmul_rn(s_rc(r, c), scale_log2);",
        "__fadd_rn(__fmul_rn(row_max[r], kLn2), logf(row_sum[r]))",
    ],
    "csrc/attention/cuda/block_sparse_attention_launch.cu": [
        "__fadd_rn(__fmul_rn(max_all, kBsaLn2), logf(sum))",
    ],
    "csrc/attention/cuda/block_sparse_attention_bwd_kernel.cuh": [
        "const float scale_log2 = p.scale * kLog2e;",
        "ss.lse[tid] = keep ? lse[row] : INFINITY;",
        "const float s_ln = __fmul_rn(__fmul_rn(acc_s(i), scale_log2), kLn2);",
        "exp2f(__fmul_rn(fminf(__fsub_rn(s_ln, ss.lse[row]), 0.f), kLog2e))",
    ],
}


def emulate_cuda_probabilities(scores: torch.Tensor, scale: float) -> torch.Tensor:
    """The probabilities the CUDA backward rebuilds from the lse the CUDA forward saved, for float32
    ``scores`` (rows, keys) = q . k as the tensor cores produce them (the same MMA in both
    kernels: the same bits), every operation rounded to float32 as the kernels round it."""
    assert scores.dtype == F32
    scale_log2 = torch.tensor(scale, dtype=F32) * LOG2E
    # forward
    s2 = scores * scale_log2
    m2 = s2.amax(-1, keepdim=True)
    total = torch.exp2(s2 - m2).sum(-1, keepdim=True)
    lse = m2 * LN2 + torch.log(total)
    # backward
    s_ln = (scores * scale_log2) * LN2
    return torch.exp2(torch.clamp(s_ln - lse, max=0.0) * LOG2E)


def clear_rows(scores: torch.Tensor, gap: float = 1e-3) -> torch.Tensor:
    """Rows whose best two scores are more than ``gap`` apart (far above float32 rounding of a
    q . k of unit-scale inputs): at a huge scale their softmax is one-hot in any precision."""
    top2 = scores.double().topk(2, dim=-1).values
    return (top2[..., 0] - top2[..., 1]) > gap


def test_the_emulation_replays_the_kernel_lines():
    for path, lines in KERNEL_LINES.items():
        text = (ROOT / path).read_text()
        for line in lines:
            assert line in text, f"{path} no longer contains `{line}`: update emulate_cuda_probabilities to match"


@pytest.mark.parametrize("scale", [1e5, 1e7, 1e9, 1e12])
def test_the_cuda_lse_round_trip_keeps_the_row_maximum_at_huge_scales(scale):
    """Every clear row's winning key keeps probability 1 (float64 softmax: exactly one-hot), and
    the whole rebuilt softmax is within float32 rounding of the exact one."""
    gen = torch.Generator().manual_seed(3)
    q, k = torch.randn(4096, 16, generator=gen), torch.randn(96, 16, generator=gen)
    scores = q @ k.T
    probs = emulate_cuda_probabilities(scores, scale)
    exact = torch.softmax(scores.double() * scale, dim=-1)
    clear = clear_rows(scores)
    assert clear.float().mean() > 0.9
    winner = probs.gather(1, scores.argmax(-1, keepdim=True))[:, 0]
    lost = (winner[clear] != 1.0).float().mean().item()
    assert lost == 0.0, f"scale {scale:g}: the winning key lost its probability in {lost:.1%} of the clear rows"
    assert (probs.double() - exact)[clear].abs().max().item() <= 1e-6


def test_the_cuda_lse_round_trip_at_ordinary_scales():
    """At the usual 1/sqrt(D) scale the rebuilt softmax is the exact one to float32 rounding."""
    gen = torch.Generator().manual_seed(4)
    scores = torch.randn(512, 16, generator=gen) @ torch.randn(256, 16, generator=gen).T
    probs = emulate_cuda_probabilities(scores, 0.25)
    exact = torch.softmax(scores.double() * 0.25, dim=-1)
    assert (probs.double() - exact).abs().max().item() <= 2e-6


@pytest.mark.parametrize("causal", [False, True])
def test_dv_at_scale_1e9_on_the_clear_rows(device, causal):
    """dV at scale 1e9: the softmax is one-hot on the clear rows, so dV of a key is the sum of the
    grad_out rows it wins (grad_out of the other rows is zeroed). CPU: the CPU backend against
    the float64 reference; CUDA: the CUDA kernels against the CPU backend on the same bfloat16
    inputs (both add the same bfloat16 rows in float32: at most one bfloat16 rounding apart)."""
    skip_unless_ready(device)
    B, H, L, window, scale = 1, 2, 256, 16, 1e9
    D = 16 if device == "cpu" else 64
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    q, k, v, g, _, grad = make_inputs(B, H, L, D, dtype, seed=29, p_global=0.03)
    allowed = block_sparse_allowed_mask(L, window=window, global_mask=g, causal=causal)[:, None]  # (B, 1, L, L)
    scores = (q.double() @ k.double().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    clear = clear_rows(scores)  # (B, H, L)
    assert clear.float().mean() > 0.85
    grad = grad * clear[..., None].to(grad.dtype)
    kw = dict(window=window, global_mask=g, scale=scale, causal=causal)
    if device == "cpu":
        _, (_, _, dv) = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
        _, (_, _, dv_ref) = run_with_grads(block_sparse_attention_ref, q.double(), k.double(), v.double(),
                                           grad.double(), **kw)
        tol = 1e-5
    else:
        _, (_, _, dv) = run_with_grads(block_sparse_attention, *(t.to(device) for t in (q, k, v)), grad.to(device),
                                       window=window, global_mask=g.to(device), scale=scale, causal=causal)
        _, (_, _, dv_ref) = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
        dv = dv.cpu()
        tol = 2.0 ** -7  # one bfloat16 rounding of the sum
    ref = dv_ref.double()
    err = (dv.double() - ref).abs()
    bound = tol * ref.abs().clamp_min(1.0)
    bad = err > bound
    assert not bad.any(), (f"dV at scale 1e9: {bad.any(-1).sum().item()} key rows off (max error "
                           f"{err.max().item():.3g}); winning keys that lost their probability get dV = 0")
    assert ref.abs().amax(-1).gt(0).float().mean() > 0.3  # enough winning keys to test
