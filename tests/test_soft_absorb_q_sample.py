"""soft_absorb_q_sample against its reference, its statistics, registration and errors.

Every test runs on the CPU and, where a GPU and the CUDA kernels are present, on CUDA (float16
too there; the references run on the same device).
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moediffuseq.ops import soft_absorb_q_sample, soft_absorb_q_sample_ref
from utils import DEVICE_DTYPES, DEVICES, assert_close_to_reference, skip_unless_ready

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=2e-2, rtol=1e-2),
             torch.float16: dict(atol=3e-3, rtol=2e-3)}


def make(B, L, d, dtype, seed, p_target=0.5, device="cpu"):
    """Drawn on the CPU from one generator, then moved: the same problem on every device."""
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, L, d, generator=g).to(dtype)
    m = torch.randn(d, generator=g).to(dtype)
    tm = torch.rand(B, L, generator=g) < p_target
    ab = torch.rand(B, generator=g)
    noise = torch.randn(B, L, d, generator=g).to(dtype)
    u = torch.rand(B, L, generator=g)
    return tuple(t.to(device) for t in (x0, m, tm, ab.sqrt(), (1 - ab).sqrt(), noise, u))


@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device):
    skip_unless_ready(device)

    @given(B=st.integers(1, 4), L=st.integers(1, 300), d=st.sampled_from([1, 7, 64, 129, 1024]),
           dtype=st.sampled_from(DEVICE_DTYPES[device]), gamma=st.sampled_from([0.0, 0.5, 1.0]),
           seed=st.integers(0, 2**31 - 1))
    def matches(B, L, d, dtype, gamma, seed):
        check_problem(B, L, d, dtype, gamma, seed, device)

    matches()


def check_problem(B, L, d, dtype, gamma, seed, device):
    x0, m, tm, sa, s1, noise, u = make(B, L, d, dtype, seed, device=device)
    x0.requires_grad_(True)
    m.requires_grad_(True)
    out = soft_absorb_q_sample(x0, m, tm, sa, s1, gamma=gamma, noise=noise, uniform=u)
    ref = soft_absorb_q_sample_ref(x0.double(), m.double(), tm, sa, s1, noise=noise.double(), uniform=u,
                                   gamma=gamma)
    torch.testing.assert_close(out.float(), ref.float().to(dtype).float(), **TOLERANCE[dtype])
    assert torch.equal(out[~tm], x0[~tm].detach())  # source untouched, bit-exact
    grad = torch.randn_like(out)
    gx, gm = torch.autograd.grad(out, (x0, m), grad)
    x64, m64 = x0.detach().double().requires_grad_(True), m.detach().double().requires_grad_(True)
    r64 = soft_absorb_q_sample_ref(x64, m64, tm, sa, s1, noise=noise.double(), uniform=u, gamma=gamma)
    rx, rm = torch.autograd.grad(r64, (x64, m64), grad.double())
    x32, m32 = x0.detach().float().requires_grad_(True), m.detach().float().requires_grad_(True)
    r32 = soft_absorb_q_sample_ref(x32, m32, tm, sa, s1, noise=noise.float(), uniform=u, gamma=gamma)
    bx, bm = torch.autograd.grad(r32, (x32, m32), grad.float())
    assert_close_to_reference(gx, rx, bx.to(dtype), "grad_x0")
    assert_close_to_reference(gm, rm, bm.to(dtype), "grad_m", compute_dtype=dtype)


def test_statistics_of_the_forward_process(device):
    """Mask rate ~ gamma sqrt(1 - abar), noise centred on m, source untouched."""
    B, L, d, gamma = 4, 4000, 8, 0.5
    x0 = torch.randn(B, L, d, device=device)
    m = torch.full((d,), 2.0, device=device)
    tm = torch.ones(B, L, dtype=torch.bool, device=device)
    tm[:, :500] = False
    ab = torch.tensor([0.985, 0.5, 0.1, 2e-7], device=device)
    g = torch.Generator(device=device).manual_seed(0)
    out = soft_absorb_q_sample(x0, m, tm, ab.sqrt(), (1 - ab).sqrt(), gamma=gamma, generator=g)
    absorbed = (out == m).all(-1) & tm
    rate = absorbed[:, 500:].float().mean(-1)
    torch.testing.assert_close(rate, gamma * (1 - ab).sqrt(), atol=0.03, rtol=0)
    assert torch.equal(out[:, :500], x0[:, :500])
    keep = tm & ~absorbed
    y = out - m
    expected_mean = ab.sqrt()[:, None, None] * (x0 - m)
    resid = (y - expected_mean)[keep]  # ~ N(0, 1 - abar) per example
    for b in range(B):
        r = (y[b] - expected_mean[b])[keep[b]]
        assert abs(r.mean().item()) < 0.05
        assert abs(r.std().item() - (1 - ab[b]).sqrt().item()) < 0.05
    assert resid.numel() > 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_opcheck(device, dtype):
    x0, m, tm, sa, s1, noise, u = make(2, 33, 16, dtype, 0, device=device)
    args = (x0.requires_grad_(), m.requires_grad_(), tm, sa, s1, noise, u, 0.5)
    torch.library.opcheck(torch.ops.moediffuseq.soft_absorb_q_sample.default, args)


@pytest.mark.parametrize("case,mutate,message", [
    ("x0 rank", lambda a: a.update(x0=a["x0"][0]), r"x0 must be \(B, L, d\)"),
    ("noise shape", lambda a: a.update(noise=a["noise"][:, :3]), r"noise must have the shape of x0"),
    ("mask dtype", lambda a: a.update(target_mask=a["target_mask"].float()), r"target_mask must be bool"),
    ("m shape", lambda a: a.update(m=a["m"][:3]), r"m must be \(d,\)"),
    ("sqrt_ab shape", lambda a: a.update(sqrt_ab=a["sqrt_ab"][:1]), r"sqrt_ab must be float32 \(B,\)"),
    ("uniform shape", lambda a: a.update(uniform=a["uniform"][:, :2]), r"uniform must be float32 \(B, L\)"),
    ("gamma", lambda a: a.update(gamma=1.5), r"gamma must be in \[0, 1\]"),
])
def test_bad_input_is_named(device, case, mutate, message):
    x0, m, tm, sa, s1, noise, u = make(2, 10, 4, torch.float32, 1, device=device)
    args = dict(x0=x0, m=m, target_mask=tm, sqrt_ab=sa, sqrt_1mab=s1, noise=noise, uniform=u, gamma=0.5)
    mutate(args)
    with pytest.raises(RuntimeError, match=message):
        soft_absorb_q_sample(args.pop("x0"), args.pop("m"), args.pop("target_mask"), args.pop("sqrt_ab"),
                             args.pop("sqrt_1mab"), **args)
