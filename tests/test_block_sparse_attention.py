"""block_sparse_attention against its reference: forward, gradients, registration, errors."""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from conftest import assert_close_to_reference
from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref

DTYPES = [torch.float32, torch.bfloat16]


def make_inputs(B, H, L, D, dtype, seed, p_global=0.0, p_pad=0.0, pad_batch=False, device="cpu"):
    gen = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype) for _ in range(3))
    global_mask = (torch.rand(B, L, generator=gen) < p_global).to(device) if p_global > 0 else None
    key_padding_mask = (torch.rand(B, L, generator=gen) < p_pad).to(device) if p_pad > 0 else None
    if pad_batch:  # the last batch element has every key padded
        key_padding_mask = key_padding_mask if key_padding_mask is not None else torch.zeros(B, L, dtype=torch.bool)
        key_padding_mask[-1] = True
    grad = torch.randn(B, H, L, D, generator=gen).to(device=device, dtype=dtype)
    return q, k, v, global_mask, key_padding_mask, grad


def run_with_grads(fn, q, k, v, grad, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (q, k, v)]
    out = fn(*leaves, **kw)
    grads = torch.autograd.grad(out, leaves, grad)
    return out.detach(), grads


def check_against_reference(q, k, v, global_mask, key_padding_mask, grad, window, dilation, scale=None):
    kw = dict(window=window, dilation=dilation, global_mask=global_mask,
              key_padding_mask=key_padding_mask, scale=scale)
    out, grads = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
    ref, ref_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, **kw)  # float64
    base, base_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, upcast=False, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, base, "out")
    for name, g, rg, bg in zip("qkv", grads, ref_grads, base_grads):
        assert g.dtype == q.dtype and g.shape == q.shape
        assert_close_to_reference(g, rg, bg, f"grad_{name}")


lengths = st.one_of(st.integers(1, 160), st.sampled_from([255, 256, 257, 513, 1025, 1100]))


@st.composite
def problems(draw):
    L = draw(lengths)
    small = L <= 300
    return dict(
        B=draw(st.integers(1, 2 if small else 1)),
        H=draw(st.integers(1, 3 if small else 2)),
        L=L,
        D=draw(st.sampled_from([1, 8, 16, 40, 64, 72, 128])),
        window=draw(st.one_of(st.integers(0, 8), st.integers(0, L + 2))),
        dilation=draw(st.integers(1, 4)),
        p_global=draw(st.sampled_from([0.0, 0.02, 0.1, 1.0])),
        p_pad=draw(st.sampled_from([0.0, 0.1, 0.5])),
        pad_batch=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        seed=draw(st.integers(0, 2**31 - 1)),
    )


@given(problems())
@example(dict(B=1, H=1, L=1, D=16, window=0, dilation=1, p_global=0.0, p_pad=0.0, pad_batch=False,
              dtype=torch.float32, seed=0))
@example(dict(B=1, H=2, L=1025, D=64, window=256, dilation=1, p_global=0.02, p_pad=0.1, pad_batch=False,
              dtype=torch.float32, seed=1))
@example(dict(B=2, H=1, L=97, D=40, window=3, dilation=4, p_global=0.1, p_pad=0.1, pad_batch=True,
              dtype=torch.bfloat16, seed=2))
def test_matches_reference(problem):
    p = dict(problem)
    q, k, v, g, kp, grad = make_inputs(p["B"], p["H"], p["L"], p["D"], p["dtype"], p["seed"],
                                       p["p_global"], p["p_pad"], p["pad_batch"])
    check_against_reference(q, k, v, g, kp, grad, p["window"], p["dilation"])


@pytest.mark.parametrize("dtype", DTYPES)
def test_explicit_scale_and_long_window(dtype):
    q, k, v, g, kp, grad = make_inputs(1, 2, 2100, 40, dtype, seed=3, p_global=0.01, p_pad=0.05)
    check_against_reference(q, k, v, g, kp, grad, window=1500, dilation=1, scale=0.3)


def test_allowed_mask_is_the_contract():
    """The reference's mask against the METHOD §3 formula, pair by pair."""
    L, w, d = 23, 2, 3
    gen = torch.Generator().manual_seed(0)
    g = torch.rand(2, L, generator=gen) < 0.15
    kp = torch.rand(2, L, generator=gen) < 0.2
    mask = block_sparse_allowed_mask(L, window=w, dilation=d, global_mask=g, key_padding_mask=kp, batch=2)
    for b in range(2):
        for i in range(L):
            for j in range(L):
                expect = (not kp[b, j]) and bool(g[b, i] or g[b, j] or (abs(i - j) <= w * d and (i - j) % d == 0))
                assert bool(mask[b, i, j]) == expect, (b, i, j)


def test_rows_without_keys_are_zero_with_zero_grads():
    q, k, v, g, kp, grad = make_inputs(2, 2, 50, 16, torch.float32, seed=4, pad_batch=True)
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad, window=3,
                                       key_padding_mask=kp)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.equal(dq[1], torch.zeros_like(dq[1]))
    assert torch.equal(dk[1], torch.zeros_like(dk[1])) and torch.equal(dv[1], torch.zeros_like(dv[1]))
    assert out[0].abs().sum() > 0


def test_global_query_attends_to_every_key():
    q, k, v, _, _, _ = make_inputs(1, 1, 300, 16, torch.float32, seed=5)
    g = torch.zeros(1, 300, dtype=torch.bool)
    g[0, 150] = True
    out = block_sparse_attention(q, k, v, window=2, global_mask=g)
    dense = torch.softmax(q[0, 0, 150] @ k[0, 0].T / 4.0, dim=-1) @ v[0, 0]
    torch.testing.assert_close(out[0, 0, 150], dense, atol=2e-5, rtol=2e-5)


def test_default_scale_is_inverse_sqrt_head_dim():
    q, k, v, _, _, _ = make_inputs(1, 2, 70, 24, torch.float32, seed=6)
    a = block_sparse_attention(q, k, v, window=5)
    b = block_sparse_attention(q, k, v, window=5, scale=1 / math.sqrt(24))
    assert torch.equal(a, b)


def test_non_contiguous_inputs():
    q, k, v, g, kp, grad = make_inputs(2, 3, 90, 32, torch.float32, seed=7, p_global=0.05, p_pad=0.1)
    qt, kt, vt = (t.transpose(1, 2).contiguous().transpose(1, 2) for t in (q, k, v))
    assert not qt.is_contiguous()
    a = block_sparse_attention(qt, kt, vt, window=4, global_mask=g, key_padding_mask=kp)
    b = block_sparse_attention(q, k, v, window=4, global_mask=g, key_padding_mask=kp)
    assert torch.equal(a, b)


def test_nan_propagates_like_the_reference():
    q, k, v, _, _, _ = make_inputs(1, 1, 40, 8, torch.float32, seed=8)
    v[0, 0, 10, 3] = float("nan")
    out = block_sparse_attention(q, k, v, window=2)
    ref = block_sparse_attention_ref(q, k, v, window=2)
    assert torch.equal(out.isnan(), ref.isnan())
    assert out[0, 0, 8:13, 3].isnan().all()  # rows whose window holds the NaN value
    assert not out[..., :3].isnan().any()  # other channels unaffected


@pytest.mark.parametrize("masks", ["none", "global", "padding", "both"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_opcheck(masks, dtype):
    q, k, v, g, kp, _ = make_inputs(2, 2, 37, 16, dtype, seed=9,
                                    p_global=0.1 if masks in ("global", "both") else 0.0,
                                    p_pad=0.2 if masks in ("padding", "both") else 0.0)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)


def test_opcheck_backward_op():
    q, k, v, g, kp, grad = make_inputs(1, 2, 45, 8, torch.float32, seed=10, p_global=0.1, p_pad=0.1)
    out, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 4, 1, g, kp, 0.35)
    args = (grad, q, k, v, out, lse, 4, 1, g, kp, 0.35)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph():
    from moediffuseq.nn import BlockSparseSelfAttention

    torch.manual_seed(0)
    attn = BlockSparseSelfAttention(48, 3, window=4, dilation=2)
    x = torch.randn(2, 61, 48, requires_grad=True)
    g = torch.zeros(2, 61, dtype=torch.bool)
    g[:, 0] = True
    kp = torch.zeros(2, 61, dtype=torch.bool)
    kp[1, 50:] = True
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    y_eager = attn(x, g, kp)
    y_comp = compiled(x, g, kp)
    torch.testing.assert_close(y_comp, y_eager)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (gx_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(gx_comp, gx_eager)


def _good():
    q, k, v, _, _, _ = make_inputs(2, 2, 16, 8, torch.float32, seed=11)
    return dict(q=q, k=k, v=v, window=2)


BAD_INPUTS = [
    ("q rank", lambda a: a.update(q=a["q"][0]), r"q must be \(B, H, L, D\)"),
    ("k shape", lambda a: a.update(k=a["k"][:, :, :8]), r"k must have the shape of q"),
    ("v shape", lambda a: a.update(v=a["v"][:1]), r"v must have the shape of q"),
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


def test_empty_batch_and_sequence():
    for shape in [(0, 2, 5, 8), (1, 2, 0, 8)]:
        q = torch.randn(shape, requires_grad=True)
        out = block_sparse_attention(q, q, q, window=1)
        assert out.shape == shape
        out.sum().backward()
        assert q.grad.shape == shape
