"""moe_ffn against the HF-style loop reference: forward, all gradients, registration, errors.

Every test runs on the CPU and, where a GPU and the CUDA kernels are present, on CUDA, where
bfloat16 / float16 with widths that are multiples of 8 take the tensor-core grouped GEMMs and
the other cases the per-expert matmul path (the references run on the same device).
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moediffuseq.ops import moe_ffn, moe_ffn_ref, moe_topk_softmax
from utils import DEVICE_DTYPES, DEVICES, assert_close_to_reference, skip_unless_ready

ACTIVATIONS = ["gelu", "silu", "swiglu"]


def make_problem(T, D, F, E, k, activation, dtype, routing, seed, drop=0.0, device="cpu"):
    """Drawn on the CPU from one generator, then moved: the same problem on every device."""
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(T, D, generator=gen)
    if routing == "one_expert":
        logits = torch.randn(T, E, generator=gen) * 0.1
        logits[:, 0] += 10
    elif routing == "skewed":  # the last experts get (almost) nothing
        logits = torch.randn(T, E, generator=gen) + torch.linspace(3, -6, E)
    elif routing == "ties":
        logits = torch.randint(0, 2, (T, E), generator=gen).float()
    else:
        logits = torch.randn(T, E, generator=gen)
    weights, indices = moe_topk_softmax(logits, k)
    if drop > 0:
        indices = torch.where(torch.rand(T, k, generator=gen) < drop, -1, indices)
    width1 = 2 * F if activation == "swiglu" else F
    w1 = torch.randn(E, D, width1, generator=gen) / D**0.5
    w2 = torch.randn(E, F, D, generator=gen) / F**0.5
    grad = torch.randn(T, D, generator=gen)
    return tuple(t.to(device) for t in (x.to(dtype), weights, indices, w1.to(dtype), w2.to(dtype), grad.to(dtype)))


def run(fn, x, weights, indices, w1, w2, grad, activation, **kw):
    leaves = [t.detach().clone().requires_grad_(True) for t in (x, weights, w1, w2)]
    y = fn(leaves[0], leaves[1], indices, leaves[2], leaves[3], activation, **kw)
    if not y.requires_grad:  # the reference builds no graph when every slot is dropped
        return y.detach(), tuple(torch.zeros_like(t) for t in leaves)
    return y.detach(), torch.autograd.grad(y, leaves, grad, allow_unused=True, materialize_grads=True)


def check(problem, activation):
    x, weights, indices, w1, w2, grad = problem
    y, grads = run(moe_ffn, x, weights, indices, w1, w2, grad, activation)
    ref, ref_grads = run(moe_ffn_ref, x, weights, indices, w1, w2, grad, activation)
    base, base_grads = run(moe_ffn_ref, x, weights, indices, w1, w2, grad, activation, upcast=False)
    assert y.dtype == x.dtype and y.shape == x.shape
    assert_close_to_reference(y, ref, base, "y")
    for name, g, rg, bg in zip(["x", "weights", "w1", "w2"], grads, ref_grads, base_grads):
        assert g.shape == rg.shape
        assert_close_to_reference(g, rg, bg, f"grad_{name}", compute_dtype=x.dtype)


# CUDA problems take the CUTLASS grouped GEMMs (bfloat16 / float16, D and F multiples of 8) four
# times in five; the others the per-expert matmul path.
CUTLASS_WIDTHS = dict(D=[8, 64, 72, 136, 256], F=[8, 24, 96, 200])


def cutlass_eligible(p) -> bool:
    return p["dtype"] in (torch.bfloat16, torch.float16) and p["D"] % 8 == 0 and p["F"] % 8 == 0


@st.composite
def moe_problems(draw, device="cpu"):
    # up to the 1024 experts the op takes (E > 32: several logits per lane on CUDA); many experts
    # with few tokens (at most 64 x 4 slots: the reference loops over every expert) leave most empty
    E = draw(st.one_of(st.integers(1, 16), st.integers(17, 1024)))
    T = draw(st.one_of(st.integers(1, 64), st.integers(65, 700))) if E <= 16 else draw(st.integers(1, 64))
    if device == "cuda" and draw(st.sampled_from([True, True, True, True, False])):
        D, F = draw(st.sampled_from(CUTLASS_WIDTHS["D"])), draw(st.sampled_from(CUTLASS_WIDTHS["F"]))
        dtype = draw(st.sampled_from([torch.bfloat16, torch.float16]))
    else:
        D, F = draw(st.sampled_from([1, 8, 17, 40, 64, 72])), draw(st.sampled_from([1, 5, 24, 33, 96]))
        dtype = draw(st.sampled_from(DEVICE_DTYPES[device]))
    return dict(T=T, D=D, F=F,
                E=E, k=draw(st.integers(1, min(E, 16 if E <= 16 else 4))), activation=draw(st.sampled_from(ACTIVATIONS)),
                dtype=dtype,
                routing=draw(st.sampled_from(["normal", "one_expert", "skewed", "ties"])),
                drop=draw(st.sampled_from([0.0, 0.0, 0.3])), seed=draw(st.integers(0, 2**31 - 1)))


# Explicit examples (edge cases, kept failing cases), per device.
EXAMPLES = {
    "cpu": [
        dict(T=1, D=8, F=5, E=1, k=1, activation="gelu", dtype=torch.float32, routing="normal", drop=0.0, seed=0),
        dict(T=700, D=72, F=96, E=16, k=2, activation="swiglu", dtype=torch.bfloat16, routing="skewed",
             drop=0.0, seed=1),
        dict(T=97, D=40, F=33, E=8, k=8, activation="silu", dtype=torch.float32, routing="one_expert",
             drop=0.3, seed=2),
    ],
    "cuda": [
        dict(T=1, D=8, F=8, E=1, k=1, activation="gelu", dtype=torch.bfloat16, routing="normal", drop=0.0, seed=0),
        # several tiles in M, N and K of the grouped GEMMs, empty experts, dropped slots
        dict(T=700, D=256, F=384, E=8, k=2, activation="swiglu", dtype=torch.bfloat16, routing="skewed",
             drop=0.1, seed=1),
        dict(T=1025, D=136, F=200, E=5, k=3, activation="gelu", dtype=torch.float16, routing="normal",
             drop=0.0, seed=2),
        dict(T=97, D=40, F=33, E=8, k=8, activation="silu", dtype=torch.bfloat16, routing="one_expert",
             drop=0.3, seed=3),
    ],
}


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    skip_unless_ready(device)

    @given(moe_problems(device))
    def matches(p):
        p = dict(p)
        activation = p.pop("activation")
        check(make_problem(**p, activation=activation, device=device), activation)

    for case in EXAMPLES[device]:
        matches = example(case)(matches)
    matches()


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
@pytest.mark.parametrize("routing", ["uniform", "skewed"])
def test_experts_in_several_passes(device, activation, routing):
    """T k = 6000 grouped rows: on the CPU the experts run in passes of at most 2048 rows
    (MoeKernels::pass_rows) through reused buffers, some passes holding several experts, one
    expert holding more than a pass; a quarter of the slots dropped. All against the reference."""
    skip_unless_ready(device)
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    check(make_problem(3000, 16, 24, 6, 2, activation, dtype, routing, seed=5, drop=0.25, device=device), activation)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_empty_experts_get_zero_weight_gradients(device, dtype):
    x, weights, indices, w1, w2, grad = make_problem(50, 16, 8, 6, 1, "gelu", dtype, "one_expert", 3, device=device)
    used = set(indices.unique().tolist())
    _, (_, _, gw1, gw2) = run(moe_ffn, x, weights, indices, w1, w2, grad, "gelu")
    for e in range(6):
        if e not in used:
            assert torch.equal(gw1[e], torch.zeros_like(gw1[e])) and torch.equal(gw2[e], torch.zeros_like(gw2[e]))
    assert len(used) < 6


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dropped_slots_contribute_nothing(device, dtype):
    x, weights, indices, w1, w2, _ = make_problem(30, 16, 8, 4, 2, "silu", dtype, "normal", 4, device=device)
    all_dropped = torch.full_like(indices, -1)
    assert torch.equal(moe_ffn(x, weights, all_dropped, w1, w2, "silu"), torch.zeros_like(x))
    one_dropped = indices.clone()
    one_dropped[:, 1] = -1
    only_first = moe_ffn(x, weights[:, :1].contiguous(), indices[:, :1].contiguous(), w1, w2, "silu")
    torch.testing.assert_close(moe_ffn(x, weights, one_dropped, w1, w2, "silu"), only_first)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype,F", [(torch.float32, 12), (torch.bfloat16, 12), (torch.bfloat16, 16),
                                     (torch.float16, 16)])
def test_opcheck(device, activation, dtype, F):
    if device == "cpu" and dtype == torch.float16:
        pytest.skip("float16 moe_ffn is a CUDA feature")
    x, weights, indices, w1, w2, _ = make_problem(37, 16, F, 5, 2, activation, dtype, "skewed", 5, drop=0.1,
                                                  device=device)
    args = (x.requires_grad_(), weights.requires_grad_(), indices, w1.requires_grad_(), w2.requires_grad_(),
            activation)
    torch.library.opcheck(torch.ops.moediffuseq.moe_ffn.default, args)


def test_torch_compile_fullgraph(device):
    from moediffuseq.nn import MoEFeedForward

    torch.manual_seed(0)
    layer = MoEFeedForward(32, 24, num_experts=4, top_k=2, capacity_factor=1.25).to(device)
    x = torch.randn(2, 45, 32, device=device, requires_grad=True)
    compiled = torch.compile(layer, fullgraph=True, backend="aot_eager")
    (y_e, aux_e), (y_c, aux_c) = layer(x), compiled(x)
    torch.testing.assert_close(y_c, y_e)
    torch.testing.assert_close(aux_c.loss, aux_e.loss)
    assert torch.equal(aux_c.expert_counts, aux_e.expert_counts)
    (g_e,) = torch.autograd.grad(y_e.sum() + aux_e.loss, x)
    (g_c,) = torch.autograd.grad(y_c.sum() + aux_c.loss, x)
    torch.testing.assert_close(g_c, g_e)


def _good(device="cpu"):
    x, weights, indices, w1, w2, _ = make_problem(10, 8, 6, 4, 2, "gelu", torch.float32, "normal", 6, device=device)
    return dict(x=x, weights=weights, indices=indices, w1=w1, w2=w2, activation="gelu")


BAD_INPUTS = [
    ("x rank", lambda a: a.update(x=a["x"][None]), r"x must be \(T, D\)"),
    ("x dtype", lambda a: a.update(x=a["x"].double()), r"x must be float32 or bfloat16"),
    ("T mismatch", lambda a: a.update(indices=a["indices"][:5], weights=a["weights"][:5]),
     r"indices must be \(T, k\) with T = 10"),
    ("weights shape", lambda a: a.update(weights=a["weights"][:, :1]), r"weights must be \(T, k\)"),
    ("weights dtype", lambda a: a.update(weights=a["weights"].double()), r"weights must be float32"),
    ("indices dtype", lambda a: a.update(indices=a["indices"].int()), r"indices must be int64"),
    ("index too large", lambda a: a["indices"].__setitem__((3, 1), 4), r"indices must lie in \[0, 4\)"),
    ("index negative", lambda a: a["indices"].__setitem__((0, 0), -2), r"indices must lie in \[0, 4\)"),
    ("w1 D", lambda a: a.update(w1=a["w1"][:, :7]), r"w1 must be \(E, D, F\) with D = 8"),
    ("w2 shape", lambda a: a.update(w2=a["w2"][:3]), r"w2 must be \(E, F, D\) = \(4, 6, 8\)"),
    ("w2 dtype", lambda a: a.update(w2=a["w2"].bfloat16()), r"w2 must have the dtype of x"),
    ("swiglu odd width", lambda a: a.update(activation="swiglu", w1=a["w1"][:, :, :5]), r"w1 must be \(E, D, 2F\)"),
    ("activation", lambda a: a.update(activation="relu"), r'activation must be "gelu", "silu" or "swiglu", got "relu"'),
    ("device", lambda a: a.update(w1=a["w1"].to("meta")), r"w1 must be on the device of x"),
    ("w1 not a tensor", lambda a: a.update(w1=3), r"moe_ffn\(\) Expected a value of type 'Tensor' for argument 'w1'"),
]


@pytest.mark.parametrize("case,mutate,message", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_bad_input_is_named(device, case, mutate, message):
    args = _good(device)
    mutate(args)
    with pytest.raises((RuntimeError, ValueError), match=message):
        moe_ffn(**args)
