"""Kernel tests tight enough to catch a 1% bug: inputs that are exact in bfloat16 (small integers
times powers of two), so the only errors left are a few bfloat16 roundings the kernels make on
purpose, and bounds of a few such roundings (2^-8 .. 2^-7 relative) instead of the generic
1e-2 x max(1, |ref|) floor of ``assert_close_to_reference``.

Every test runs the same code on each backend: on the CPU the CPU kernels against the float64
reference; on CUDA the CUDA kernels against the float64 reference and, on the same bfloat16
inputs, against the CPU kernels. A 1% error in the softmax scale, a 1% error in moe_ffn's output
scale and the erf GELU in place of the tanh GELU each fail here (see the bounds' comments).
"""
import pytest
import torch

from moediffuseq.ops import block_sparse_attention, block_sparse_attention_ref, moe_ffn, moe_ffn_ref
from utils import run_with_grads, skip_unless_ready

BF16 = torch.bfloat16
ULP = 2.0 ** -8  # one bfloat16 rounding, relative (round to nearest: half of that, twice for slack)


def attention_problem(seed, causal):
    """q, k, v, grad_out exact in bfloat16. Column 0 of q . k spreads the scaled scores over
    [-4, 4] (a 1% scale error moves the log-sum-exp by ~0.04 and the probabilities by ~4%), and
    v's column 0 follows that score term, so the outputs move with the probabilities; v > 0: no
    cancellation in P v, so relative bounds hold elementwise."""
    B, H, L, D = 1, 2, 320, 64
    g = torch.Generator().manual_seed(seed)
    q = torch.randint(-2, 3, (B, H, L, D), generator=g) / 8.0
    k = torch.randint(-2, 3, (B, H, L, D), generator=g) / 8.0
    q[..., 0] = 4.0
    k[..., 0] = torch.randint(-2, 3, (B, H, L), generator=g) / 2.0
    v = torch.randint(1, 5, (B, H, L, D), generator=g).float()
    v[..., 0] = k[..., 0] * 2 + 3
    grad = torch.randint(-2, 3, (B, H, L, D), generator=g).float()
    global_mask = torch.rand(B, L, generator=g) < 0.04
    return [t.to(BF16) for t in (q, k, v, grad)] + [global_mask]


def lse_reference(q, k, global_mask, window, scale, causal):
    """logsumexp over the allowed keys of the float64 scores (the kernels' float32 lse output)."""
    from moediffuseq.ops import block_sparse_allowed_mask

    L = q.shape[2]
    allowed = block_sparse_allowed_mask(L, window=window, global_mask=global_mask, causal=causal)[:, None]
    scores = (q.double() @ k.double().transpose(-1, -2)) * scale
    return torch.logsumexp(scores.masked_fill(~allowed, float("-inf")), dim=-1)


def relative_to_max(actual, reference):
    return (actual.double() - reference.double()).abs().max().item() / reference.double().abs().max().item()


@pytest.mark.parametrize("causal", [False, True])
def test_attention_on_exact_inputs(device, causal):
    skip_unless_ready(device)
    q, k, v, grad, gm = attention_problem(seed=11, causal=causal)
    window, scale = 16, 1.0
    kw = dict(window=window, global_mask=gm, scale=scale, causal=causal)
    dev = [t.to(device) for t in (q, k, v, grad)]
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, *dev[:3], dev[3], **{**kw, "global_mask": gm.to(device)})
    _, lse = torch.ops.moediffuseq.block_sparse_attention(*dev[:3], window, 1, gm.to(device), None, scale, causal,
                                                          "bhld")
    ref, (rq, rk, rv) = run_with_grads(block_sparse_attention_ref, q.double(), k.double(), v.double(), grad.double(),
                                       **kw)
    # lse: float32 arithmetic on exact scores, |lse| <= ~10: 1e-5 absolute (a 1% scale error: ~4e-2)
    lse_err = (lse.cpu().double() - lse_reference(q, k, gm, window, scale, causal)).abs().max().item()
    assert lse_err <= 1e-5, f"lse: max error {lse_err:.3g} > 1e-5"
    # out: P rounded to bfloat16 (CUDA) and the output rounding, both relative, v > 0
    rel = ((out.cpu().double() - ref) / ref).abs().max().item()
    assert rel <= 2 * ULP, f"out: max relative error {rel:.3g} > {2 * ULP:.3g}"
    # gradients, relative to their largest entry: dV = P^T dO (P's rounding), dK through dS
    # (rounded to bfloat16 once) and dQ through the same dS with more cancellation; a 1% scale
    # error gives dK ~1.8e-2, dV ~6.6e-3 here
    for name, got, want, bound in (("dV", dv, rv, ULP), ("dK", dk, rk, 3 * ULP), ("dQ", dq, rq, 16 * ULP)):
        err = relative_to_max(got.cpu(), want)
        assert err <= bound, f"{name}: max error / max |ref| = {err:.3g} > {bound:.3g}"
    if device == "cuda":  # the same bfloat16 inputs through the CPU kernels
        cpu_out, cpu_grads = run_with_grads(block_sparse_attention, q, k, v, grad, **kw)
        rel = ((out.cpu().double() - cpu_out.double()) / cpu_out.double()).abs().max().item()
        assert rel <= 2 * ULP, f"out against the CPU kernels: max relative difference {rel:.3g}"
        for name, got, want, bound in zip(("dQ", "dK", "dV"), (dq, dk, dv), cpu_grads, (16 * ULP, 3 * ULP, ULP)):
            err = relative_to_max(got.cpu(), want)
            assert err <= bound, f"{name} against the CPU kernels: {err:.3g} > {bound:.3g}"


def moe_problem(activation, E=8, T=256, D=64, seed=5):
    """x one-hot rows and w2 = identity blocks make y[t] = sum_j weights[t, j] * act(h_j[t]) with
    h_j[t] = a row of w1[e_j]: the activation itself, on exact bfloat16 values in [-4, 4] (where
    the erf and tanh GELUs differ by up to 11% relative, at h = -3). The two experts of a token
    scale one shared row of values by 1 or 1/2, so their activations share a sign: no cancellation,
    relative bounds hold elementwise. Routing weights 3/4 and 1/4, exact."""
    g = torch.Generator().manual_seed(seed)
    F = D
    x = torch.zeros(T, D)
    x[torch.arange(T), torch.arange(T) % D] = 1.0
    base = torch.randint(-16, 17, (D, F), generator=g) / 4.0  # [-4, 4] in steps of 1/4
    factor = torch.tensor([1.0, 0.5])[torch.arange(E) % 2]
    width1 = 2 * F if activation == "swiglu" else F
    w1 = (base[None] * factor[:, None, None])
    if activation == "swiglu":  # silu(gate) * up with up = 1
        w1 = torch.cat([w1, torch.ones(E, D, F)], dim=-1)
    assert w1.shape == (E, D, width1)
    w2 = torch.eye(F, D).expand(E, F, D).clone()
    indices = torch.stack([torch.randint(0, E, (T,), generator=g), torch.randint(0, E, (T,), generator=g)], 1)
    indices[:, 1] = (indices[:, 0] + 2 * torch.randint(1, E // 2, (T,), generator=g)) % E  # same parity, distinct
    weights = torch.tensor([0.75, 0.25]).expand(T, 2).clone()
    grad = torch.randint(-2, 3, (T, D), generator=g).float()
    return x.to(BF16), weights, indices, w1.to(BF16), w2.to(BF16), grad.to(BF16)


@pytest.mark.parametrize("activation", ["gelu", "silu", "swiglu"])
def test_moe_ffn_on_exact_inputs(device, activation):
    skip_unless_ready(device)
    x, weights, indices, w1, w2, grad = moe_problem(activation)
    dev = [t.to(device) for t in (x, weights, indices, w1, w2)]
    y = moe_ffn(*dev, activation).cpu()
    ref = moe_ffn_ref(x.double(), weights.double(), indices, w1.double(), w2.double(), activation)
    # the activation rounded to bfloat16, the sum of two same-sign terms, the output rounded:
    # 2^-8 relative plus 1e-6 where the activation underflows (a 1% output scale: 1e-2)
    err = (y.double() - ref).abs()
    bound = 2 * ULP * ref.abs() + 1e-6
    worst = (err / bound).max().item()
    assert worst <= 1.0, (f"y: error {worst:.3g} x the bound (max relative error "
                          f"{(err / ref.abs().clamp_min(1e-6)).max().item():.3g})")
    if device == "cuda":
        cpu_y = moe_ffn(x, weights, indices, w1, w2, activation).double()
        diff = ((y.double() - cpu_y).abs() / (2 * ULP * cpu_y.abs() + 1e-6)).max().item()
        assert diff <= 1.0, f"y against the CPU kernels: {diff:.3g} x the bound"


@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_moe_ffn_gradients_on_exact_inputs(device, activation):
    """grad_x through the activation's derivative: dh = (dy w2^T) * act'(h) summed into dx = dh w1^T
    (w1 rows exact), relative to the largest entry (cancellation across the F columns)."""
    skip_unless_ready(device)
    x, weights, indices, w1, w2, grad = moe_problem(activation)
    kw = dict(activation=activation)

    def grads(fn, *args):
        leaves = [t.detach().clone().requires_grad_(True) for t in (args[0], args[1], args[3], args[4])]
        y = fn(leaves[0], leaves[1], args[2], leaves[2], leaves[3], **kw)
        return torch.autograd.grad(y, leaves, args[5])

    got = grads(moe_ffn, *(t.to(device) for t in (x, weights, indices, w1, w2, grad)))
    want = grads(moe_ffn_ref, x.double(), weights.double(), indices, w1.double(), w2.double(), grad.double())
    for name, a, b, bound in zip(("x", "weights", "w1", "w2"), got, want, (2 * ULP, 2 * ULP, 2 * ULP, 2 * ULP)):
        err = relative_to_max(a.cpu(), b)
        assert err <= bound, f"grad_{name}: max error / max |ref| = {err:.3g} > {bound:.3g}"
