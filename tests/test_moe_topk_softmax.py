"""moe_topk_softmax against its reference: exact indices (ties: lowest index), weights, grads.

Every test runs on the CPU and, where a GPU and the CUDA kernels are present, on CUDA (the
references then run on the GPU too, in float32 / float64).
"""
import pytest
import torch
from hypothesis import example, given
from hypothesis import strategies as st

from moediffuseq.ops import moe_topk_softmax, moe_topk_softmax_ref
from utils import DEVICES, assert_close_to_reference, skip_unless_ready


@st.composite
def routing_problems(draw):
    # up to the 1024 experts the op takes (E > 32: several logits per lane on CUDA)
    E = draw(st.one_of(st.integers(1, 16), st.integers(17, 1024)))
    return dict(T=draw(st.integers(1, 700)), E=E, k=draw(st.integers(1, min(E, 16))),
                kind=draw(st.sampled_from(["normal", "ties", "skewed", "one_expert"])),
                dtype=draw(st.sampled_from([torch.float32, torch.bfloat16, torch.float16])),
                seed=draw(st.integers(0, 2**31 - 1)))


def make_logits(T, E, kind, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    if kind == "ties":  # few distinct values: many exact ties
        logits = torch.randint(-2, 3, (T, E), generator=gen).float()
    elif kind == "skewed":  # some experts (almost) never chosen
        logits = torch.randn(T, E, generator=gen) + torch.linspace(4, -4, E)
    elif kind == "one_expert":
        logits = torch.randn(T, E, generator=gen) * 0.1
        logits[:, E // 2] += 20
    else:
        logits = torch.randn(T, E, generator=gen) * 2
    return logits.to(dtype)


def check_problem(p, device):
    logits = make_logits(p["T"], p["E"], p["kind"], p["dtype"], p["seed"]).to(device)
    weights, indices = moe_topk_softmax(logits, p["k"])
    ref_w, ref_i = moe_topk_softmax_ref(logits, p["k"])
    assert indices.dtype == torch.int64 and weights.dtype == torch.float32
    assert weights.device == logits.device and indices.device == logits.device
    assert torch.equal(indices, ref_i)
    ref64, _ = moe_topk_softmax_ref(logits.double(), p["k"])
    assert_close_to_reference(weights, ref64, ref_w, "weights")
    torch.testing.assert_close(weights.sum(-1), torch.ones(p["T"], device=device), atol=1e-6, rtol=0)
    assert (weights[:, :-1] >= weights[:, 1:]).all()

    leaf = logits.float().requires_grad_(True)
    grad = torch.randn(p["T"], p["k"], generator=torch.Generator().manual_seed(p["seed"] + 1)).to(device)
    (g,) = torch.autograd.grad(moe_topk_softmax(leaf, p["k"])[0], leaf, grad)
    leaf64 = logits.double().requires_grad_(True)
    (g64,) = torch.autograd.grad(moe_topk_softmax_ref(leaf64, p["k"])[0], leaf64, grad.double())
    leaf32 = logits.float().requires_grad_(True)
    (g32,) = torch.autograd.grad(moe_topk_softmax_ref(leaf32, p["k"])[0], leaf32, grad)
    assert_close_to_reference(g, g64, g32, "grad_logits")


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    skip_unless_ready(device)

    @given(routing_problems())
    @example(dict(T=5, E=4, k=4, kind="ties", dtype=torch.float32, seed=0))
    @example(dict(T=1, E=1, k=1, kind="normal", dtype=torch.float32, seed=0))
    @example(dict(T=300, E=40, k=3, kind="ties", dtype=torch.float16, seed=1))  # E > 32: several logits per lane
    def matches(p):
        check_problem(p, device)

    matches()


def test_ties_pick_the_lowest_index(device):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0, 3.0], [2.0, 2.0, 2.0, 2.0, 2.0]], device=device)
    weights, indices = moe_topk_softmax(logits, 3)
    assert indices.tolist() == [[1, 2, 4], [0, 1, 2]]
    torch.testing.assert_close(weights, torch.full((2, 3), 1 / 3, device=device))


def test_all_minus_infinity_is_uniform(device):
    logits = torch.tensor([[float("-inf")] * 4, [0.0, float("-inf"), 1.0, float("-inf")]], device=device)
    weights, indices = moe_topk_softmax(logits, 2)
    assert indices.tolist() == [[0, 1], [2, 0]]
    torch.testing.assert_close(weights[0], torch.full((2,), 0.5, device=device))
    assert torch.isfinite(weights).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_opcheck(device, dtype):
    logits = torch.randn(33, 7, device=device).to(dtype).requires_grad_(True)
    torch.library.opcheck(torch.ops.moediffuseq.moe_topk_softmax.default, (logits, 3))


def test_torch_compile_fullgraph(device):
    logits = torch.randn(40, 8, device=device)
    compiled = torch.compile(lambda x: moe_topk_softmax(x, 2), fullgraph=True, backend="aot_eager")
    w, i = compiled(logits)
    rw, ri = moe_topk_softmax(logits, 2)
    assert torch.equal(i, ri) and torch.equal(w, rw)


@pytest.mark.parametrize("logits,k,message", [
    (torch.randn(4, 3, 2), 1, r"logits must be \(T, E\)"),
    (torch.randn(4, 3), 0, r"k must be in \[1, E\]"),
    (torch.randn(4, 3), 4, r"k must be in \[1, E\]"),
    (torch.randint(0, 3, (4, 3)), 1, r"logits must be a floating tensor"),
    (torch.tensor([[0.0, float("nan")], [1.0, 2.0]]), 1, r"logits contain NaN"),
    (torch.tensor([[0.0, 1.0], [float("inf"), 2.0]]), 1, r"logits contain NaN or \+inf \(row 1\)"),
])
def test_bad_input_is_named(device, logits, k, message):
    with pytest.raises(RuntimeError, match=message):
        moe_topk_softmax(logits.to(device), k)


@pytest.mark.parametrize("logits,k,message", [
    ([[0.0, 1.0]], 1, r"moe_topk_softmax\(\) Expected a value of type 'Tensor' for argument 'logits'"),
    (torch.randn(4, 3), 1.5, r"moe_topk_softmax\(\) Expected a value of type 'int' for argument 'k'"),
])
def test_bad_argument_type_is_named(logits, k, message):
    with pytest.raises(RuntimeError, match=message):
        moe_topk_softmax(logits, k)
