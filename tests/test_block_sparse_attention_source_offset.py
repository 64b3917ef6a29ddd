"""block_sparse_attention with source isolation (source_lengths) and queries at an offset
(query_offset, L_q <= L): forward, log-sum-exp and gradients against the float64 reference,
the two equivalences that define them (an offset run of rows is those rows of the full call;
source rows do not depend on the target), opcheck and torch.compile with the new arguments.

Every test runs on CPU and, where a GPU and the CUDA kernels are present, on CUDA.
"""
import math

import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moediffuseq.ops import block_sparse_allowed_mask, block_sparse_attention, block_sparse_attention_ref
from utils import (ATTENTION_CASE_IDS, ATTENTION_CASES, ATTENTION_DTYPES, ATTENTION_HEAD_DIMS, DEVICES,
                   assert_close_to_reference, default_dtype, head_dim, make_inputs, run_with_grads, skip_unless_ready)


def rows_of(t, offset, length, layout):
    """Query rows [offset, offset + length) of a tensor in ``layout``."""
    return t[:, :, offset:offset + length] if layout == "bhld" else t[:, offset:offset + length]


def lse_ref(q, k, dtype=torch.float64, layout="bhld", scale=None, **mask):
    """The op's log-sum-exp (B, H, L_q) over the allowed keys; +inf for a row without any."""
    if layout == "blhd":
        q, k = q.transpose(1, 2), k.transpose(1, 2)
    B, H, Lq, D = q.shape
    k = k.repeat_interleave(H // k.shape[1], dim=1)
    scale = 1.0 / math.sqrt(D) if scale is None else scale
    allowed = block_sparse_allowed_mask(k.shape[2], batch=B, device=q.device, query_length=Lq, **mask)[:, None]
    scores = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale  # (B, H, L_q, L)
    lse = torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)
    return lse.masked_fill(~allowed.any(-1), float("inf"))


def check_against_reference(q, k, v, grad, layout="bhld", **kw):
    """Output and the gradients of q, k, v within 2x the same-dtype error of the float64
    reference, and the lse output: +inf on exactly the empty rows, the others within tolerance."""
    kw["layout"] = layout
    out, grads = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
    ref, ref_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, **kw)  # float64
    base, base_grads = run_with_grads(block_sparse_attention_ref, q, k, v, grad, upcast=False, **kw)
    assert out.dtype == q.dtype and out.shape == q.shape
    assert_close_to_reference(out, ref, base, "out")
    for name, x, g, rg, bg in zip("qkv", (q, k, v), grads, ref_grads, base_grads):
        assert g.dtype == q.dtype and g.shape == x.shape
        assert_close_to_reference(g, rg, bg, f"grad_{name}")
    scale = 1.0 / math.sqrt(q.shape[-1])
    _, lse = torch.ops.moediffuseq.block_sparse_attention(
        q, k, v, kw["window"], kw["dilation"], kw["global_mask"], kw["key_padding_mask"], scale, kw["causal"],
        layout, kw["source_lengths"], kw["query_offset"])
    mask = {n: kw[n] for n in ("window", "dilation", "global_mask", "key_padding_mask", "causal", "source_lengths",
                               "query_offset")}
    lref = lse_ref(q, k, layout=layout, scale=scale, **mask)
    lbase = lse_ref(q, k, torch.float32, layout=layout, scale=scale, **mask)
    B, Lq, H = q.shape[0], q.shape[2 if layout == "bhld" else 1], q.shape[1 if layout == "bhld" else 2]
    assert lse.dtype == torch.float32 and lse.shape == (B, H, Lq)
    empty = lref == float("inf")
    assert torch.equal(lse == float("inf"), empty), "lse: +inf exactly on the rows with no allowed key"
    assert_close_to_reference(lse[~empty], lref[~empty], lbase[~empty], "lse", compute_dtype=torch.float32)


def source_length(draw, L):
    """0, L, a tile border (multiples of 64, the query tiles of both backends), one off it, or
    any value inside."""
    borders = [c for c in (64, 128, 192, 256) if c <= L]
    near = [c + e for c in borders for e in (-1, 1) if 0 <= c + e <= L]
    return draw(st.one_of(st.sampled_from([0, L] + borders + near), st.integers(0, L)))


@st.composite
def problems(draw, device="cpu"):
    L = draw(st.one_of(st.integers(1, 140), st.sampled_from([191, 255, 257, 300])))
    B = draw(st.integers(1, 2))
    Lq = draw(st.one_of(st.just(L), st.just(1), st.integers(1, L)))
    return dict(
        B=B,
        H=draw(st.integers(1, 2)),
        L=L,
        Lq=Lq,
        offset=draw(st.one_of(st.just(0), st.just(L - Lq), st.integers(0, L - Lq))),
        sources=[source_length(draw, L) for _ in range(B)] if draw(st.booleans()) else None,
        D=draw(st.sampled_from(ATTENTION_HEAD_DIMS[device])),
        window=draw(st.one_of(st.integers(0, 8), st.integers(0, L + 2))),
        dilation=draw(st.integers(1, 4)),
        p_global=draw(st.sampled_from([0.0, 0.05, 0.3, 1.0])),
        p_pad=draw(st.sampled_from([0.0, 0.1, 0.5])),
        dtype=draw(st.sampled_from(ATTENTION_DTYPES[device])),
        seed=draw(st.integers(0, 2**31 - 1)),
        causal=draw(st.booleans()),
        group=draw(st.sampled_from([1, 1, 2])),
        layout=draw(st.sampled_from(["bhld", "blhd"])),
    )


def _case(**kw):
    base = dict(B=1, H=1, group=1, D=16, window=4, dilation=1, p_global=0.0, p_pad=0.0, dtype=torch.float32,
                seed=0, causal=False, layout="bhld", sources=None, offset=0)
    base.update(kw)
    base.setdefault("Lq", base["L"] - base["offset"])
    return base


# Kept and edge cases: sources 0 and L, on and beside a tile border, straddling, one query row,
# the last row, a window wider than a 512-key chunk, all-global rows, padded source.
EXAMPLES = [
    _case(L=1, sources=[0]),
    _case(L=1, sources=[1], causal=True),
    _case(B=2, L=200, sources=[64, 65], window=10, p_global=0.05, p_pad=0.1),
    _case(B=2, L=200, sources=[63, 128], window=10, dilation=3, causal=True, p_global=0.05, layout="blhd"),
    _case(B=2, L=257, sources=[0, 257], offset=100, Lq=60, window=7, dilation=2, p_global=0.1, group=2),
    _case(L=300, Lq=1, offset=299, window=3, p_global=0.1, p_pad=0.1, causal=True, sources=[200]),
    _case(L=300, Lq=1, offset=0, window=3, p_global=0.1, causal=True),
    _case(L=1100, offset=1000, Lq=100, window=600, p_global=0.02, p_pad=0.1, sources=[900], D=40),
    _case(L=1100, window=600, p_global=0.02, p_pad=0.1, sources=[700], causal=True, dtype=torch.bfloat16),
    _case(B=2, L=150, sources=[70, 150], window=5, p_global=1.0, p_pad=0.5, dtype=torch.bfloat16, causal=True),
    _case(L=130, sources=[100], window=2, dilation=3, offset=31, Lq=97, p_pad=0.5, group=3, layout="blhd"),
]


def check_problem(p, device):
    D = p["D"] if device == "cpu" else head_dim(device, p["D"])
    dtype = p["dtype"] if p["dtype"] in ATTENTION_DTYPES[device] else default_dtype(device)
    layout = p["layout"]
    q, k, v, g, kp, grad = make_inputs(p["B"], p["H"] * p["group"], p["L"], D, dtype, p["seed"], p["p_global"],
                                       p["p_pad"], device=device, kv_heads=p["H"], layout=layout)
    q, grad = (rows_of(t, p["offset"], p["Lq"], layout) for t in (q, grad))
    sources = None if p["sources"] is None else torch.tensor(p["sources"], dtype=torch.int64, device=device)
    check_against_reference(q, k, v, grad, layout, window=p["window"], dilation=p["dilation"], global_mask=g,
                            key_padding_mask=kp, causal=p["causal"], source_lengths=sources,
                            query_offset=p["offset"])


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    skip_unless_ready(device)

    @given(problems(device))
    def matches(problem):
        check_problem(problem, device)

    for case in EXAMPLES:
        matches = example(case)(matches)
    matches()


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_offset_rows_are_the_rows_of_the_full_call(device, dtype, causal, layout):
    """q's rows [offset, offset + L_q) alone give those rows of the full-length call (output,
    lse, dQ), and the same dK, dV as the full call with grad_out zero on the other rows."""
    skip_unless_ready(device)
    L, offset, Lq = 290, 131, 97
    q, k, v, g, kp, grad = make_inputs(2, 4, L, head_dim(device, 24), dtype, seed=40, p_global=0.05, p_pad=0.1,
                                       kv_heads=2, layout=layout, device=device)
    sources = torch.tensor([150, 60], device=device)
    kw = dict(window=9, dilation=2, global_mask=g, key_padding_mask=kp, causal=causal, layout=layout,
              source_lengths=sources)
    inside = torch.zeros(L, dtype=torch.bool, device=device)
    inside[offset:offset + Lq] = True
    inside = inside[:, None] if layout == "bhld" else inside[:, None, None]
    full, (dq_full, dk_full, dv_full) = run_with_grads(block_sparse_attention, q, k, v, grad * inside, **kw)
    part, (dq, dk, dv) = run_with_grads(block_sparse_attention, rows_of(q, offset, Lq, layout), k, v,
                                        rows_of(grad, offset, Lq, layout), query_offset=offset, **kw)
    tol = dict(rtol=1e-5, atol=1e-5) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(part, rows_of(full, offset, Lq, layout), **tol)
    torch.testing.assert_close(dq, rows_of(dq_full, offset, Lq, layout), **tol)
    torch.testing.assert_close(dk, dk_full, **tol)
    torch.testing.assert_close(dv, dv_full, **tol)
    scale = 1.0 / math.sqrt(q.shape[-1])
    args = (9, 2, g, kp, scale, causal, layout, sources)
    _, lse_full = torch.ops.moediffuseq.block_sparse_attention(q, k, v, *args)
    _, lse = torch.ops.moediffuseq.block_sparse_attention(rows_of(q, offset, Lq, layout), k, v, *args, offset)
    torch.testing.assert_close(lse, lse_full[:, :, offset:offset + Lq], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
@pytest.mark.parametrize("causal", [False, True])
def test_source_rows_ignore_the_target(device, dtype, causal):
    """With isolation, changing the target's keys and values (global ones included) leaves the
    source rows bitwise equal, and the gradients of target keys and values through source rows
    are exactly zero; the target rows do see the change."""
    skip_unless_ready(device)
    B, L, layout = 2, 300, "blhd"
    q, k, v, g, kp, grad = make_inputs(B, 4, L, head_dim(device, 16), dtype, seed=41, p_global=0.05, p_pad=0.05,
                                       kv_heads=2, layout=layout, device=device)
    S = [170, 64]  # one inside a query tile, one on a tile border
    g[0, S[0] + 3] = g[1, S[1]] = True  # global target tokens just after the source
    g[0, 5] = True  # a global source query
    sources = torch.tensor(S, device=device)
    source = (torch.arange(L, device=device)[None, :] < sources[:, None])[:, :, None, None]  # (B, L, 1, 1)
    kw = dict(window=40, dilation=2, global_mask=g, key_padding_mask=kp, causal=causal, layout=layout,
              source_lengths=sources)
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad * source, **kw)
    k2 = torch.where(source, k, torch.randn_like(k))
    v2 = torch.where(source, v, torch.full_like(v, 100.0))
    out2 = block_sparse_attention(q, k2, v2, **kw)
    assert torch.equal(torch.where(source, out, 0), torch.where(source, out2, 0))
    assert not torch.equal(torch.where(source, 0, out), torch.where(source, 0, out2))
    assert torch.where(source, 0, dk).abs().max() == 0 and torch.where(source, 0, dv).abs().max() == 0
    assert torch.where(source, dk, 0).abs().max() > 0  # the source keys do get gradients


def test_allowed_mask_is_the_contract():
    """The reference's mask against the formula, pair by pair, with query rows at an offset and
    source lengths 0, inside and L."""
    L, w, d, offset, Lq = 23, 2, 3, 5, 13
    gen = torch.Generator().manual_seed(1)
    g = torch.rand(3, L, generator=gen) < 0.15
    kp = torch.rand(3, L, generator=gen) < 0.2
    S = [0, 11, L]
    for causal in (False, True):
        mask = block_sparse_allowed_mask(L, window=w, dilation=d, global_mask=g, key_padding_mask=kp, batch=3,
                                         causal=causal, source_lengths=torch.tensor(S), query_offset=offset,
                                         query_length=Lq)
        assert mask.shape == (3, Lq, L)
        for b in range(3):
            for r in range(Lq):
                i = offset + r
                for j in range(L):
                    expect = (not kp[b, j]) and bool(g[b, i] or g[b, j] or (abs(i - j) <= w * d and (i - j) % d == 0))
                    expect = expect and (j <= i or not causal) and (i >= S[b] or j < S[b])
                    assert bool(mask[b, r, j]) == expect, (b, i, j)


def test_source_rows_without_keys_are_zero(device):
    """A source query whose source keys are all padded has no allowed key: zeros, lse +inf and
    zero gradients, even though target keys are there."""
    dtype = default_dtype(device)
    q, k, v, _, _, grad = make_inputs(1, 2, 80, head_dim(device, 16), dtype, seed=42, device=device)
    kp = torch.zeros(1, 80, dtype=torch.bool, device=device)
    kp[0, :30] = True
    sources = torch.tensor([30], device=device)
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad, window=100, key_padding_mask=kp,
                                       source_lengths=sources)
    assert out[:, :, :30].abs().max() == 0 and dq[:, :, :30].abs().max() == 0
    assert out[:, :, 30:].abs().min() > 0
    _, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 100, 1, None, kp, 0.25, False, "bhld", sources)
    assert (lse[:, :, :30] == float("inf")).all() and lse[:, :, 30:].isfinite().all()


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_opcheck_with_source_and_offset(layout, device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, _ = make_inputs(2, 4, 45, head_dim(device, 16), dtype, seed=43, p_global=0.1, p_pad=0.2,
                                    kv_heads=2, layout=layout, device=device)
    q = rows_of(q, 10, 21, layout).contiguous()
    sources = torch.tensor([20, 0], device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25, True, layout, sources, 10)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)


def test_opcheck_backward_op_with_source_and_offset(device):
    q, k, v, g, kp, grad = make_inputs(1, 2, 45, head_dim(device, 8), default_dtype(device), seed=44, p_global=0.1,
                                       p_pad=0.1, device=device)
    q, grad = q[:, :, 7:30].contiguous(), grad[:, :, 7:30].contiguous()
    sources = torch.tensor([19], device=device)
    out, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 4, 1, g, kp, 0.35, False, "bhld", sources, 7)
    args = (grad, q, k, v, out, lse, 4, 1, g, kp, 0.35, False, "bhld", sources, 7)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_torch_compile_fullgraph(device, backend):
    """The op with source lengths and an offset inside a compiled function (no graph breaks),
    forward and backward; inductor on CPU too."""
    if backend == "inductor" and device == "cpu":
        pytest.importorskip("torch._inductor")
    dtype = default_dtype(device)
    q, k, v, g, kp, grad = make_inputs(2, 2, 130, head_dim(device, 16), dtype, seed=45, p_global=0.05, p_pad=0.1,
                                       device=device)
    q, grad = q[:, :, 100:].contiguous(), grad[:, :, 100:].contiguous()
    sources = torch.tensor([110, 64], device=device)

    def attend(q, k, v):
        return block_sparse_attention(q * 1.5, k, v, window=16, dilation=2, global_mask=g, key_padding_mask=kp,
                                      causal=True, source_lengths=sources, query_offset=100)

    compiled = torch.compile(attend, fullgraph=True, backend=backend)
    out_eager, grads_eager = run_with_grads(attend, q, k, v, grad)
    out_comp, grads_comp = run_with_grads(compiled, q, k, v, grad)
    torch.testing.assert_close(out_comp, out_eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


@pytest.mark.parametrize("case,kw,message", [
    ("offset past the keys", dict(query_offset=40), r"query_offset \+ L_q must be <= L"),
    ("negative offset", dict(query_offset=-1), r"query_offset must be >= 0"),
    ("source_lengths dtype", dict(source_lengths=torch.zeros(2, dtype=torch.int32)), r"source_lengths must be an int64"),
    ("source_lengths per batch", dict(source_lengths=torch.zeros(3, dtype=torch.int64)), r"shape \(B,\) = \(2,\)"),
], ids=lambda x: x if isinstance(x, str) and " " in x else "")
def test_fake_kernel_names_bad_arguments(case, kw, message):
    """The fake kernel (meta tensors, torch.compile's tracing) names the same problems."""
    q, k, v = (torch.empty(2, 2, n, 8, device="meta") for n in (10, 45, 45))
    kw = dict(kw)
    if "source_lengths" in kw:
        kw["source_lengths"] = kw["source_lengths"].to("meta")
    with pytest.raises(RuntimeError, match=message):
        block_sparse_attention(q, k, v, window=2, **kw)
