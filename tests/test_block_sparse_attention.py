"""block_sparse_attention against its reference: forward, gradients, registration, errors.

Every test runs on CPU and, where a GPU and the CUDA kernels are present, on CUDA (bfloat16 and
float16 there, head dimensions 64 and 128; the float64 reference runs on the same device).
Causal and grouped-query attention run on CPU only (the CUDA entry refuses them by name).
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref
from utils import DEVICES, assert_close_to_reference, skip_unless_ready

DTYPES = [torch.float32, torch.bfloat16]  # CPU
DEVICE_DTYPES = {"cpu": DTYPES, "cuda": [torch.bfloat16, torch.float16]}
DEVICE_HEAD_DIMS = {"cpu": [1, 8, 16, 40, 64, 72, 128], "cuda": [64, 128]}
DEVICE_DTYPE_CASES = [(d, t) for d in DEVICES for t in DEVICE_DTYPES[d]]
DEVICE_DTYPE_IDS = [f"{d}-{str(t).removeprefix('torch.')}" for d, t in DEVICE_DTYPE_CASES]


def head_dim(device, cpu_dim):
    """``cpu_dim`` on CPU; on CUDA the nearest head dimension the kernels support."""
    return cpu_dim if device == "cpu" else (64 if cpu_dim <= 64 else 128)


def default_dtype(device):
    return torch.float32 if device == "cpu" else torch.bfloat16


def shape_of(B, H, L, D, layout):
    return (B, H, L, D) if layout == "bhld" else (B, L, H, D)


def make_inputs(B, H, L, D, dtype, seed, p_global=0.0, p_pad=0.0, pad_batch=False, device="cpu", kv_heads=None,
                layout="bhld"):
    """q (and grad) with H heads, k and v with kv_heads (default H), all in ``layout``."""
    gen = torch.Generator().manual_seed(seed)
    Hkv = H if kv_heads is None else kv_heads
    q, k, v = (torch.randn(shape_of(B, h, L, D, layout), generator=gen).to(device=device, dtype=dtype)
               for h in (H, Hkv, Hkv))
    global_mask = (torch.rand(B, L, generator=gen) < p_global).to(device) if p_global > 0 else None
    key_padding_mask = (torch.rand(B, L, generator=gen) < p_pad).to(device) if p_pad > 0 else None
    if pad_batch:  # the last batch element has every key padded
        key_padding_mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, L, dtype=torch.bool)
        key_padding_mask = key_padding_mask.to(device)
        key_padding_mask[-1] = True
    grad = torch.randn(shape_of(B, H, L, D, layout), generator=gen).to(device=device, dtype=dtype)
    return q, k, v, global_mask, key_padding_mask, grad


def run_with_grads(fn, q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


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
        D=draw(st.sampled_from(DEVICE_HEAD_DIMS[device])),
        window=draw(st.one_of(st.integers(0, 8), st.integers(0, L + 2))),
        dilation=draw(st.integers(1, 4)),
        p_global=draw(st.sampled_from([0.0, 0.02, 0.1, 1.0])),
        p_pad=draw(st.sampled_from([0.0, 0.1, 0.5])),
        pad_batch=draw(st.booleans()),
        dtype=draw(st.sampled_from(DEVICE_DTYPES[device])),
        seed=draw(st.integers(0, 2**31 - 1)),
        # causal and grouped-query heads: CPU kernels only
        causal=draw(st.booleans()) if device == "cpu" else False,
        group=draw(st.sampled_from([1, 1, 2, 3])) if device == "cpu" else 1,
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


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPE_CASES, ids=DEVICE_DTYPE_IDS)
def test_explicit_scale_and_long_window(device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, grad = make_inputs(1, 2, 2100, head_dim(device, 40), dtype, seed=3, p_global=0.01, p_pad=0.05,
                                       device=device)
    check_against_reference(q, k, v, g, kp, grad, window=1500, dilation=1, scale=0.3)


@pytest.mark.parametrize("device,dtype", DEVICE_DTYPE_CASES, ids=DEVICE_DTYPE_IDS)
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


@pytest.mark.parametrize("dilation", [1, 3])
def test_long_sequence_with_many_global_tokens_on_cuda(dilation):
    """L = 8300 splits the dense parts (global rows, global keys) over 2 CTAs (one split per 64
    tiles of 64 rows, csrc/attention/cuda/block_sparse_attention_cuda.h), and more than 256 global tokens
    also leave some of their tiles whole: both paths against the reference."""
    skip_unless_ready("cuda")
    q, k, v, g, kp, grad = make_inputs(1, 2, 8300, 64, torch.bfloat16, seed=13, p_global=0.05, p_pad=0.05,
                                       device="cuda")
    assert 256 < int(g.sum()) < 600
    check_against_reference(q, k, v, g, kp, grad, window=100, dilation=dilation)


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


@pytest.mark.parametrize("dtype", DTYPES)
def test_causal_output_ignores_the_future(dtype):
    """Changing k and v at positions > i (global ones included) leaves rows <= i bitwise equal,
    and their gradients with respect to those keys are exactly zero."""
    L, cut = 300, 170
    q, k, v, g, _, grad = make_inputs(1, 4, L, 16, dtype, seed=30, p_global=0.1, kv_heads=2, layout="blhd")
    g[0, cut + 5] = True  # a global token in the future of the rows compared
    kw = dict(window=40, dilation=2, global_mask=g, causal=True, layout="blhd")
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad * (torch.arange(L) <= cut)[:, None, None],
                                       **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, cut + 1:] = torch.randn_like(k2[:, cut + 1:])
    v2[:, cut + 1:] = 100.0
    out2 = block_sparse_attention(q, k2, v2, **kw)
    assert torch.equal(out[:, :cut + 1], out2[:, :cut + 1])
    assert not torch.equal(out[:, cut + 1:], out2[:, cut + 1:])
    assert dk[:, cut + 1:].abs().max() == 0 and dv[:, cut + 1:].abs().max() == 0


@pytest.mark.parametrize("dtype", DTYPES)
def test_blhd_reads_the_views_of_a_fused_qkv_projection(dtype):
    """q, k, v as strided views of one (B, L, 3, H, D) projection output (no copy), and the
    same values in contiguous (B, H, L, D) tensors, give the same output (transposed) and grads."""
    B, L, H, D = 2, 131, 3, 24
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(31)).to(dtype).requires_grad_()
    q, k, v = qkv.unbind(2)  # (B, L, H, D) each, row stride 3 H D
    assert not q.is_contiguous() and q.stride(-1) == 1
    g = torch.rand(B, L, generator=torch.Generator().manual_seed(32)) < 0.05
    out = block_sparse_attention(q, k, v, window=7, global_mask=g, causal=True, layout="blhd")
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention(*leaves, window=7, global_mask=g, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, grad.transpose(1, 2))
    assert out.shape == (B, L, H, D) and out.is_contiguous()
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=0)
    for i in range(3):
        torch.testing.assert_close(dqkv[:, :, i], ref_grads[i].transpose(1, 2), rtol=0, atol=0)


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
    D = head_dim(device, 24)
    q, k, v, _, _, _ = make_inputs(1, 2, 70, D, default_dtype(device), seed=6, device=device)
    a = block_sparse_attention(q, k, v, window=5)
    b = block_sparse_attention(q, k, v, window=5, scale=1 / math.sqrt(D))
    assert torch.equal(a, b)


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


@pytest.mark.parametrize("masks", ["none", "global", "padding", "both"])
@pytest.mark.parametrize("device,dtype", DEVICE_DTYPE_CASES, ids=DEVICE_DTYPE_IDS)
def test_opcheck(masks, device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, _ = make_inputs(2, 2, 37, head_dim(device, 16), dtype, seed=9,
                                    p_global=0.1 if masks in ("global", "both") else 0.0,
                                    p_pad=0.2 if masks in ("padding", "both") else 0.0, device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_opcheck_causal_grouped_query(layout, dtype):
    q, k, v, g, kp, _ = make_inputs(2, 4, 37, 16, dtype, seed=9, p_global=0.1, p_pad=0.2, kv_heads=2, layout=layout)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25, True, layout)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)


def test_opcheck_backward_op(device):
    q, k, v, g, kp, grad = make_inputs(1, 2, 45, head_dim(device, 8), default_dtype(device), seed=10, p_global=0.1,
                                       p_pad=0.1, device=device)
    out, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 4, 1, g, kp, 0.35)
    args = (grad, q, k, v, out, lse, 4, 1, g, kp, 0.35)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    from moediffuseq.nn import BlockSparseSelfAttention

    torch.manual_seed(0)
    width, heads = (48, 3) if device == "cpu" else (128, 2)  # head dimension 16 / 64
    attn = BlockSparseSelfAttention(width, heads, window=4, dilation=2).to(device, default_dtype(device))
    x = torch.randn(2, 61, width).to(device, default_dtype(device)).requires_grad_()
    g = torch.zeros(2, 61, dtype=torch.bool, device=device)
    g[:, 0] = True
    kp = torch.zeros(2, 61, dtype=torch.bool, device=device)
    kp[1, 50:] = True
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    y_eager = attn(x, g, kp)
    y_comp = compiled(x, g, kp)
    torch.testing.assert_close(y_comp, y_eager)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (gx_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(gx_comp, gx_eager)


def test_torch_compile_inductor_on_cuda():
    """The op inside an inductor-compiled CUDA function (no graph breaks), forward and backward."""
    skip_unless_ready("cuda")
    q, k, v, g, kp, grad = make_inputs(1, 2, 200, 64, torch.bfloat16, seed=12, p_global=0.05, p_pad=0.1,
                                       device="cuda")

    def attend(q, k, v):
        return block_sparse_attention(q * 1.5, k, v, window=16, dilation=2, global_mask=g, key_padding_mask=kp)

    compiled = torch.compile(attend, fullgraph=True)
    out_eager, grads_eager = run_with_grads(attend, q, k, v, grad)
    out_comp, grads_comp = run_with_grads(compiled, q, k, v, grad)
    torch.testing.assert_close(out_comp, out_eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


def _good():
    q, k, v, _, _, _ = make_inputs(2, 2, 16, 8, torch.float32, seed=11)
    return dict(q=q, k=k, v=v, window=2)


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=a["q"][0]), r"q must be \(B, H, L, D\)"),
    ("k shape", lambda a: a.update(k=a["k"][:, :, :8]), r"k must be \(B, H_kv, L, D\) with the B, L and D of q"),
    ("v shape", lambda a: a.update(v=a["v"][:1]), r"v must be \(B, H_kv, L, D\) with the B, L and D of q"),
    ("v heads differ from k", lambda a: a.update(v=a["v"][:, :1]), r"v must have the shape of k"),
    ("H_q not a multiple of H_kv", lambda a: a.update(q=torch.randn(2, 3, 16, 8)),
     r"the query heads H = 3 must be a multiple of the key/value heads H_kv = 2 \(grouped-query attention"),
    ("mismatched layouts: q blhd, k and v bhld",
     lambda a: a.update(q=a["q"].transpose(1, 2).contiguous(), layout="blhd"),
     r'k must be \(B, L, H_kv, D\) with the B, L and D of q \[2, 16, 2, 8\] \(layout "blhd"; both tensors in '
     r"the same layout\)"),
    ("blhd q rank", lambda a: a.update(q=a["q"][0], layout="blhd"), r"q must be \(B, L, H, D\)"),
    ("unknown layout", lambda a: a.update(layout="bshd"), r'layout must be "bhld" or "blhd"'),
    ("k dtype", lambda a: a.update(k=a["k"].double()), r"k must have the dtype of q"),
    ("float64", lambda a: a.update(q=a["q"].double(), k=a["k"].double(), v=a["v"].double()),
     r"must be float32 or bfloat16"),
    ("float16", lambda a: a.update(q=a["q"].half(), k=a["k"].half(), v=a["v"].half()),
     r"must be float32 or bfloat16"),
    ("window", lambda a: a.update(window=-1), r"window must be >= 0"),
    ("dilation", lambda a: a.update(dilation=0), r"dilation must be >= 1"),
    ("global_mask shape", lambda a: a.update(global_mask=torch.zeros(2, 15, dtype=torch.bool)),
     r"global_mask must have shape \(B, L\)"),
    ("global_mask dtype", lambda a: a.update(global_mask=torch.zeros(2, 16)),
     r"global_mask must be a bool tensor"),
    ("key_padding_mask shape", lambda a: a.update(key_padding_mask=torch.zeros(16, dtype=torch.bool)),
     r"key_padding_mask must have shape \(B, L\)"),
    ("key_padding_mask dtype", lambda a: a.update(key_padding_mask=torch.zeros(2, 16, dtype=torch.int64)),
     r"key_padding_mask must be a bool tensor"),
    ("device", lambda a: a.update(k=a["k"].to("meta")), r"k must be on the device of q"),
    ("empty head dim", lambda a: a.update(q=a["q"][..., :0], k=a["k"][..., :0], v=a["v"][..., :0]),
     r"head dimension D must be positive"),
    ("not a tensor", lambda a: a.update(q=a["q"].tolist()), r"q must be a Tensor"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_named(case, mutate, message):
    args = _good()
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


CUDA_BAD_INPUTS = [
    ("float32 on CUDA", lambda a: a.update(q=a["q"].float(), k=a["k"].float(), v=a["v"].float()),
     r"\(CUDA\): q is float32; the CUDA kernels run in bfloat16/float16: run under "
     r"torch\.autocast\('cuda', dtype=torch\.bfloat16\) or cast the model"),
    ("head dim 40 on CUDA", lambda a: a.update(q=a["q"][..., :40], k=a["k"][..., :40], v=a["v"][..., :40]),
     r"support head dimensions 64 and 128"),
    ("mask on CPU", lambda a: a.update(global_mask=torch.zeros(2, 16, dtype=torch.bool)),
     r"global_mask must be on the device of q"),
]


@pytest.mark.parametrize("case,mutate,message", CUDA_BAD_INPUTS, ids=[c[0] for c in CUDA_BAD_INPUTS])
def test_bad_input_is_named_on_cuda(case, mutate, message):
    skip_unless_ready("cuda")
    q, k, v, _, _, _ = make_inputs(2, 2, 16, 64, torch.bfloat16, seed=11, device="cuda")
    args = dict(q=q, k=k, v=v, window=2)
    mutate(args)
    with pytest.raises((RuntimeError, ValueError, TypeError), match=message):
        block_sparse_attention(args.pop("q"), args.pop("k"), args.pop("v"), **args)


@pytest.mark.parametrize("what", ["causal", "grouped-query"])
def test_cuda_refuses_what_its_kernels_lack(what):
    """Causal and grouped-query attention have CPU kernels only: CUDA says so, never a silent
    wrong result."""
    skip_unless_ready("cuda")
    q, k, v, _, _, _ = make_inputs(1, 4, 64, 64, torch.bfloat16, seed=17, device="cuda",
                                   kv_heads=2 if what == "grouped-query" else 4)
    with pytest.raises(RuntimeError, match=f"{what}.*CPU"):
        block_sparse_attention(q, k, v, window=4, causal=what == "causal")


def test_empty_batch_and_sequence(device):
    for shape in [(0, 2, 5, 8), (1, 2, 0, 8)]:
        shape = shape[:3] + (head_dim(device, shape[3]),)
        q = torch.randn(shape).to(device, default_dtype(device)).requires_grad_()
        out = block_sparse_attention(q, q, q, window=1)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape


def test_cuda_backward_is_reported_as_nondeterministic():
    """dQ is a sum of float atomics on CUDA: torch.use_deterministic_algorithms hears of it."""
    skip_unless_ready("cuda")
    q, k, v, _, _, grad = make_inputs(1, 2, 200, 64, torch.bfloat16, seed=16, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="block_sparse_attention_backward"):
            run_with_grads(block_sparse_attention, q, k, v, grad, window=8)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])


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
    assert (out.double() - ref.double())[clear].abs().max() <= 1e-2 * max(1.0, ref.abs().max().item())
