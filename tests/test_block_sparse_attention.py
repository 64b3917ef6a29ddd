"""block_sparse_attention against its reference: forward, gradients, log-sum-exp, the mask
contract and edge cases (empty rows, NaN, huge scales, windows beyond the sequence).

Every test runs on CPU and, where a GPU and the CUDA kernels are present, on CUDA (bfloat16 and
float16 there, head dimensions 64 and 128; the float64 reference runs on the same device),
causal and grouped-query problems in both layouts included; their own properties are in
test_block_sparse_attention_causal_gqa_layout.py.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref
from utils import (ATTENTION_CASE_IDS, ATTENTION_CASES, ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, DEVICES,
                   assert_close_to_reference, default_dtype, head_dim, make_inputs, run_with_grads, skip_unless_ready)


def lse_ref(q, k, global_mask, key_padding_mask, window, dilation, scale=None, dtype=torch.float64, causal=False,
            layout="bhld"):
    """The op's log-sum-exp (B, H, L): logsumexp over the allowed keys of the scaled scores
    q . k * scale, computed in ``dtype``; +inf for a row with no allowed key."""
    if layout == "blhd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, H, L, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = block_sparse_allowed_mask(L, window=window, dilation=dilation, global_mask=global_mask,
                                        key_padding_mask=key_padding_mask, batch=B, device=q.device,
                                        causal=causal)[:, None]
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, H, L, L)
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)  # (B, H, L)
    return lse.masked_fill(~allowed.any(-1), float("inf"))


def check_lse(q, k, v, global_mask, key_padding_mask, window, dilation, scale=None, causal=False, layout="bhld"):
    """The lse output of torch.ops.moediffuseq.block_sparse_attention (float32, the saved input
    of the backward) against lse_ref: the same rows are +inf, the others within tolerance of
    the float64 reference (baseline: the float32 computation from the same inputs)."""
    op_scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    _, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, window, dilation, global_mask, key_padding_mask,
                                                          op_scale, causal, layout)
    kw = dict(causal=causal, layout=layout)
    ref = lse_ref(q, k, global_mask, key_padding_mask, window, dilation, op_scale, **kw)
    base = lse_ref(q, k, global_mask, key_padding_mask, window, dilation, op_scale, dtype=torch.float32, **kw)
    B, H, L = (q.shape[:3] if layout == "bhld" else (q.shape[0], q.shape[2], q.shape[1]))
    assert lse.dtype == torch.float32 and lse.shape == (B, H, L)
    empty = ref == float("inf")
    assert torch.equal(lse == float("inf"), empty), "lse: +inf exactly on the rows with no allowed key"
    assert_close_to_reference(lse[~empty], ref[~empty], base[~empty], "lse", compute_dtype=torch.float32)


def check_against_reference(q, k, v, global_mask, key_padding_mask, grad, window, dilation, scale=None, causal=False,
                            layout="bhld"):
    kw = dict(window=window, dilation=dilation, global_mask=global_mask,
              key_padding_mask=key_padding_mask, scale=scale, causal=causal, layout=layout)
    out, grads = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
    ref, ref_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, **kw)  # float64
    base, base_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, upcast=False, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, base, "out")
    for name, x, g, rg, bg in zip("qkv", (q, k, v), grads, ref_grads, base_grads):
        assert g.dtype == q.dtype and g.shape == x.shape
        assert_close_to_reference(g, rg, bg, f"grad_{name}")
    check_lse(q, k, v, global_mask, key_padding_mask, window, dilation, scale, causal, layout)


lengths = st.one_of(st.integers(1, 160), st.sampled_from([255, 256, 257, 513, 1025, 1100]))


@st.composite
def problems(draw, device="cpu"):
    L = draw(lengths)
    small = L <= 300
    return dict(
        B=draw(st.integers(1, 2 if small else 1)),
        H=draw(st.integers(1, 3 if small else 2)),
        L=L,
        D=draw(st.sampled_from(ATTENTION_HEAD_DIMS[device])),
        window=draw(st.one_of(st.integers(0, 8), st.integers(0, L + 2))),
        dilation=draw(st.integers(1, 4)),
        p_global=draw(st.sampled_from([0.0, 0.02, 0.1, 1.0])),
        p_pad=draw(st.sampled_from([0.0, 0.1, 0.5])),
        pad_batch=draw(st.booleans()),
        dtype=draw(st.sampled_from(ATTENTION_DTYPES[device])),
        seed=draw(st.integers(0, 2**31 - 1)),
        causal=draw(st.booleans()),
        group=draw(st.sampled_from([1, 1, 2, 3])),
        layout=draw(st.sampled_from(["bhld", "blhd"])),
    )


# Explicit examples (kept failing cases and edge cases), per device.
EXAMPLES = {
    "cpu": [
        dict(B=1, H=1, L=1, D=16, window=0, dilation=1, p_global=0.0, p_pad=0.0, pad_batch=False,
             dtype=torch.float32, seed=0),
        dict(B=1, H=2, L=1025, D=64, window=256, dilation=1, p_global=0.02, p_pad=0.1, pad_batch=False,
             dtype=torch.float32, seed=1),
        dict(B=2, H=1, L=97, D=40, window=3, dilation=4, p_global=0.1, p_pad=0.1, pad_batch=True,
             dtype=torch.bfloat16, seed=2),
        # causal x GQA x layout: a window wider than a 512-key chunk, global keys past the window
        dict(B=1, H=2, L=1025, D=72, window=600, dilation=1, p_global=0.02, p_pad=0.1, pad_batch=False,
             dtype=torch.float32, seed=20, causal=True, group=3, layout="blhd"),
        dict(B=2, H=1, L=257, D=40, window=5, dilation=3, p_global=0.1, p_pad=0.1, pad_batch=True,
             dtype=torch.bfloat16, seed=21, causal=True, group=2, layout="bhld"),
        dict(B=1, H=1, L=300, D=16, window=2, dilation=2, p_global=1.0, p_pad=0.5, pad_batch=False,
             dtype=torch.float32, seed=22, causal=True, group=4, layout="blhd"),
    ],
    "cuda": [
        dict(B=1, H=1, L=1, D=64, window=0, dilation=1, p_global=0.0, p_pad=0.0, pad_batch=False,
             dtype=torch.bfloat16, seed=0),
        dict(B=1, H=2, L=1025, D=128, window=256, dilation=1, p_global=0.02, p_pad=0.1, pad_batch=False,
             dtype=torch.bfloat16, seed=1),
        dict(B=2, H=1, L=97, D=64, window=3, dilation=4, p_global=0.1, p_pad=0.1, pad_batch=True,
             dtype=torch.float16, seed=2),
        dict(B=1, H=1, L=300, D=128, window=70, dilation=3, p_global=1.0, p_pad=0.5, pad_batch=False,
             dtype=torch.float16, seed=3),
        dict(B=2, H=2, L=200, D=64, window=9, dilation=2, p_global=0.05, p_pad=0.1, pad_batch=False,
             dtype=torch.bfloat16, seed=4, layout="blhd"),
        # causal x GQA x layout: windows wider than a tile, dilation, global keys past the window,
        # whole global query tiles (the dense CTAs trimmed to the past)
        dict(B=1, H=2, L=1025, D=128, window=150, dilation=1, p_global=0.02, p_pad=0.1, pad_batch=False,
             dtype=torch.bfloat16, seed=20, causal=True, group=3, layout="blhd"),
        dict(B=2, H=1, L=257, D=64, window=5, dilation=3, p_global=0.1, p_pad=0.1, pad_batch=True,
             dtype=torch.float16, seed=21, causal=True, group=2, layout="bhld"),
        dict(B=1, H=1, L=300, D=64, window=2, dilation=2, p_global=1.0, p_pad=0.5, pad_batch=False,
             dtype=torch.bfloat16, seed=22, causal=True, group=4, layout="blhd"),
    ],
}


def check_problem(p, device):
    group, layout = p.get("group", 1), p.get("layout", "bhld")
    q, k, v, g, kp, grad = make_inputs(p["B"], p["H"] * group, p["L"], p["D"], p["dtype"], p["seed"],
                                       p["p_global"], p["p_pad"], p["pad_batch"], device=device,
                                       kv_heads=p["H"], layout=layout)
    check_against_reference(q, k, v, g, kp, grad, p["window"], p["dilation"], causal=p.get("causal", False),
                            layout=layout)


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    skip_unless_ready(device)

    @given(problems(device))
    def matches(problem):
        check_problem(problem, device)

    for case in EXAMPLES[device]:
        matches = example(case)(matches)
    matches()


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
def test_explicit_scale_and_long_window(device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, grad = make_inputs(1, 2, 2100, head_dim(device, 40), dtype, seed=3, p_global=0.01, p_pad=0.05,
                                       device=device)
    check_against_reference(q, k, v, g, kp, grad, window=1500, dilation=1, scale=0.3)


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
@pytest.mark.parametrize("dilation", [1, 2])
def test_global_target_span_as_in_the_model(device, dtype, dilation):
    """The model's layout: a contiguous global target span, so whole query blocks are global
    and only the dense pass computes them; some padded keys inside and outside the span."""
    skip_unless_ready(device)
    q, k, v, _, _, grad = make_inputs(2, 2, 300, head_dim(device, 40), dtype, seed=11, device=device)
    global_mask = torch.zeros(2, 300, dtype=torch.bool, device=device)
    global_mask[:, 100:] = True
    global_mask[:, 0] = True
    key_padding_mask = torch.zeros(2, 300, dtype=torch.bool, device=device)
    key_padding_mask[0, -9:] = True
    key_padding_mask[1, 40:45] = True
    check_against_reference(q, k, v, global_mask, key_padding_mask, grad, window=16, dilation=dilation)


@pytest.mark.parametrize("dilation,causal,kv_heads,layout",
                         [(1, False, 2, "bhld"), (3, False, 2, "bhld"), (1, True, 1, "blhd"), (3, True, 1, "bhld")])
def test_long_sequence_with_many_global_tokens_on_cuda(dilation, causal, kv_heads, layout):
    """L = 8300 splits the dense parts (global rows, global keys) over 2 CTAs (one split per 64
    tiles of 64 rows, csrc/attention/cuda/block_sparse_attention_cuda.h), and more than 256 global tokens
    also leave some of their tiles whole: both paths against the reference, also causal (the
    dense tiles trimmed to the past) with two query heads on one key/value head."""
    skip_unless_ready("cuda")
    q, k, v, g, kp, grad = make_inputs(1, 2, 8300, 64, torch.bfloat16, seed=13, p_global=0.05, p_pad=0.05,
                                       device="cuda", kv_heads=kv_heads, layout=layout)
    assert 256 < int(g.sum()) < 600
    check_against_reference(q, k, v, g, kp, grad, window=100, dilation=dilation, causal=causal, layout=layout)


def test_split_dense_parts_with_batches_of_different_global_masks_on_cuda():
    """The split path with 3 splits (L = 12300: 193 tiles of 64 rows) and B = 3 with a different
    global layout per batch element: many scattered global tokens in one (some of their tiles
    whole, some split), a contiguous global span plus padding in the second, global tokens whose
    keys are all padded in the third (the split combine of rows without keys: zeros, lse +inf),
    so the per-batch global lists and split offsets differ."""
    skip_unless_ready("cuda")
    B, L = 3, 12300
    q, k, v, _, _, grad = make_inputs(B, 1, L, 64, torch.bfloat16, seed=14, device="cuda")
    gen = torch.Generator().manual_seed(14)
    global_mask = torch.zeros(B, L, dtype=torch.bool)
    global_mask[0] = torch.rand(L, generator=gen) < 0.07
    global_mask[1, 3000:3090] = True
    global_mask[1, 7] = True
    key_padding_mask = torch.zeros(B, L, dtype=torch.bool)
    key_padding_mask[0] = torch.rand(L, generator=gen) < 0.03
    key_padding_mask[1, -200:] = True
    global_mask[2, 5000:5040] = True
    key_padding_mask[2] = True
    assert int(global_mask[0].sum()) > 256 and int(global_mask[1].sum()) < 128
    check_against_reference(q, k, v, global_mask.cuda(), key_padding_mask.cuda(), grad, window=64, dilation=2)


@pytest.mark.parametrize("window,dilation", [(3, 2**32 + 1), (2**63 - 1, 1), (2**31, 2**31 + 3), (5, 70)],
                         ids=["dilation-2^32+1", "window-int64-max", "both-beyond-int32", "dilation-L"])
def test_window_and_dilation_beyond_the_sequence(device, window, dilation):
    """A dilation >= L leaves only the diagonal in the band and a window beyond L covers every
    slot: int64 values past the int32 range saturate, they do not wrap (2^32 + 1 is not 1)."""
    dtype = default_dtype(device)
    q, k, v, g, kp, grad = make_inputs(2, 2, 70, head_dim(device, 16), dtype, seed=15, p_global=0.05, p_pad=0.1,
                                       device=device)
    check_against_reference(q, k, v, g, kp, grad, window=window, dilation=dilation)


@pytest.mark.parametrize("causal", [False, True])
def test_allowed_mask_is_the_contract(causal):
    """The reference's mask against the METHOD §3 formula, pair by pair; causal: also j <= i,
    global tokens included (a global query sees only the past, a global key only the future)."""
    L, w, d = 23, 2, 3
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(2, L, generator=gen) < 0.15
    kp = torch.rand(2, L, generator=gen) < 0.2
    mask = block_sparse_allowed_mask(L, window=w, dilation=d, global_mask=g, key_padding_mask=kp, batch=2,
                                     causal=causal)
    for b in range(2):
        for i in range(L):
            for j in range(L):
                expect = (not kp[b, j]) and bool(g[b, i] or g[b, j] or (abs(i - j) <= w * d and (i - j) % d == 0))
                expect = expect and (j <= i or not causal)
                assert bool(mask[b, i, j]) == expect, (b, i, j)


def test_rows_without_keys_are_zero_with_zero_grads(device):
    q, k, v, g, kp, grad = make_inputs(2, 2, 50, head_dim(device, 16), default_dtype(device), seed=4, pad_batch=True,
                                       device=device)
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad, window=3,
                                       key_padding_mask=kp)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert out[0].abs().sum() > 0
    _, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 3, 1, None, kp, 0.25)
    assert (lse[1] == float("inf")).all() and lse[0].isfinite().all()  # the contract: +inf without keys


def test_global_query_attends_to_every_key(device):
    D, dtype = head_dim(device, 16), default_dtype(device)
    q, k, v, _, _, _ = make_inputs(1, 1, 300, D, dtype, seed=5, device=device)
    g = torch.zeros(1, 300, dtype=torch.bool, device=device)
    g[0, 150] = True
    out = block_sparse_attention(q, k, v, window=2, global_mask=g)
    q32, k32, v32 = (t[0, 0].float() for t in (q, k, v))
    dense = torch.softmax(q32[150] @ k32.T / math.sqrt(D), dim=-1) @ v32
    tol = 2e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(out[0, 0, 150].float(), dense, atol=tol, rtol=tol)


def test_default_scale_is_inverse_sqrt_head_dim(device):
    """Without a scale the op computes the reference's attention at an explicit 1/sqrt(D)."""
    D = head_dim(device, 24)
    q, k, v, _, _, _ = make_inputs(1, 2, 70, D, default_dtype(device), seed=6, device=device)
    out = block_sparse_attention(q, k, v, window=5)
    explicit = dict(window=5, scale=1 / math.sqrt(D))
    ref = block_sparse_attention_ref(q, k, v, **explicit)  # float64
    base = block_sparse_attention_ref(q, k, v, upcast=False, **explicit)
    assert_close_to_reference(out, ref, base, "out")


def test_non_contiguous_inputs(device):
    q, k, v, g, kp, grad = make_inputs(2, 3, 90, head_dim(device, 32), default_dtype(device), seed=7, p_global=0.05,
                                       p_pad=0.1, device=device)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    a = block_sparse_attention(qt, kt, vt, window=4, global_mask=g, key_padding_mask=kp)
    b = block_sparse_attention(q, k, v, window=4, global_mask=g, key_padding_mask=kp)
    assert torch.equal(a, b)


def test_nan_propagates_like_the_reference(device):
    q, k, v, _, _, _ = make_inputs(1, 1, 40, head_dim(device, 8), default_dtype(device), seed=8, device=device)
    v[0, 0, 10, 3] = float("nan")
    out = block_sparse_attention(q, k, v, window=2)
    ref = block_sparse_attention_ref(q, k, v, window=2)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 0, 8:13, 3].isnan().all()  # rows whose window holds the NaN value
    assert not out[..., :3].isnan().any()  # other channels unaffected


def test_empty_batch_and_sequence(device):
    for shape in [(0, 2, 5, 8), (1, 2, 0, 8)]:
        shape = shape[:3] + (head_dim(device, shape[3]),)
        q = torch.randn(shape).to(device, default_dtype(device)).requires_grad_()
        out = block_sparse_attention(q, q, q, window=1)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape


@pytest.mark.parametrize("scale", [3e8, 1e9, 1e12])
def test_huge_scales_give_the_hard_maximum_not_nan(device, scale):
    """At a huge scale the softmax is the hard maximum: one ulp of scale * q.k exceeds the range
    of exp, which must not turn rows into NaN (forward and backward)."""
    dtype = default_dtype(device)
    q, k, v, g, kp, grad = make_inputs(1, 2, 64, head_dim(device, 16), dtype, seed=17, p_global=0.05, device=device)
    out, grads = run_with_grads(block_sparse_attention, q, k, v, grad, window=8, global_mask=g, scale=scale)
    assert torch.isfinite(out).all() and all(torch.isfinite(x).all() for x in grads)
    ref = block_sparse_attention_ref(q, k, v, window=8, global_mask=g, scale=scale)
    # rows whose best two keys are 1e-3 apart in q.k (far above float32 rounding) have one
    # maximum in any precision: there the output is that key's value row
    allowed = block_sparse_allowed_mask(64, window=8, global_mask=g)[:, None]  # (B, 1, L, L)
    scores = (q.double() @ k.double().transpose(-1, -2)).masked_fill(~allowed, float("-inf"))
    top2 = scores.topk(2, dim=-1).values
    clear = (top2[..., 0] - top2[..., 1]) > 1e-3  # (B, H, L)
    assert clear.float().mean() > 0.9
    # float32: the output is the value row itself up to the accumulation's rounding; bfloat16 /
    # float16 (CUDA): one rounding of the output
    tol = 1e-6 if dtype == torch.float32 else 1e-2
    assert (out.double() - ref.double())[clear].abs().max() <= tol * max(1.0, ref.abs().max().item())
