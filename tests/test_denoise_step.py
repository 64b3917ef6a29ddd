"""denoise_step against its reference, its registration and its errors.

Every test runs on the CPU and, where a GPU and the CUDA kernels are present, on CUDA (float16
too there; the references run on the same device). Inputs are drawn on the CPU and moved.
"""
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moediffuseq.ops import denoise_step, denoise_step_ref
from utils import DEVICE_DTYPES, DEVICES, skip_unless_ready

TOLERANCE = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=3e-2, rtol=1e-2),
             torch.float16: dict(atol=4e-3, rtol=2e-3)}


@pytest.mark.parametrize("device", DEVICES)
def test_denoise_step_matches_reference(device):
    skip_unless_ready(device)

    @given(B=st.integers(1, 4), L=st.integers(1, 200), d=st.sampled_from([1, 5, 64, 130, 1024]),
           dtype=st.sampled_from(DEVICE_DTYPES[device]), with_prev=st.booleans(), with_noise=st.booleans(),
           seed=st.integers(0, 2**31 - 1))
    def matches(B, L, d, dtype, with_prev, with_noise, seed):
        check_denoise_step(B, L, d, dtype, with_prev, with_noise, seed, device)

    matches()


def check_denoise_step(B, L, d, dtype, with_prev, with_noise, seed, device):
    g = torch.Generator().manual_seed(seed)
    x_t, x0, anchor, prev, noise = (torch.randn(B, L, d, generator=g).to(device, dtype) for _ in range(5))
    tm = (torch.rand(B, L, generator=g) < 0.6).to(device)
    m = torch.randn(d, generator=g).to(device, dtype)
    a, b, c, s = (torch.rand(B, generator=g).to(device) for _ in range(4))
    kw = dict(x0_prev=prev if with_prev else None, coef_x0_prev=c if with_prev else None,
              noise=noise if with_noise else None, coef_noise=s if with_noise else None)
    out = denoise_step(x_t, x0, anchor, tm, m, a, b, **kw)
    ref = denoise_step_ref(x_t.double(), x0.double(), anchor.double(), tm, m.double(), a, b,
                           **{k: (v.double() if isinstance(v, torch.Tensor) and v.dim() == 3 else v) for k, v in kw.items()})
    torch.testing.assert_close(out.double(), ref.to(dtype).double(), **TOLERANCE[dtype])
    assert torch.equal(out[~tm], anchor[~tm])  # source re-anchored bit-exactly
    in_place = x_t.clone()
    denoise_step(in_place, x0, anchor, tm, m, a, b, **kw, out=in_place)
    assert torch.equal(in_place, out)


@pytest.mark.parametrize("d", [4, 16])  # on CUDA: by element, and in 16-byte packs
def test_denoise_step_opcheck(device, d):
    x = torch.randn(2, 9, d, device=device)
    a, b, c, s = (torch.rand(2, device=device) for _ in range(4))
    # schema order: x_t, x0_hat, anchor, target_mask, m, coef_xt, coef_x0, x0_prev, coef_x0_prev, noise, coef_noise
    args = (x, x + 1, x * 2, torch.rand(2, 9, device=device) < 0.5, torch.randn(d, device=device), a, b, x - 1, c,
            torch.randn_like(x), s)
    torch.library.opcheck(torch.ops.moediffuseq.denoise_step.default, args)
    torch.library.opcheck(torch.ops.moediffuseq.denoise_step.out, args, {"out": torch.empty_like(x)})


def test_denoise_step_bad_inputs(device):
    x = torch.randn(2, 9, 4, device=device)
    tm = torch.rand(2, 9, device=device) < 0.5
    m = torch.zeros(4, device=device)
    with pytest.raises(ValueError, match=r"coef_xt must be a float or a \(B,\) = \(2,\) tensor"):
        denoise_step(x, x, x, tm, m, torch.rand(3), 0.5)
    with pytest.raises(RuntimeError, match=r"x0_hat must have the shape of x_t"):
        denoise_step(x, x[:, :3], x, tm, m, 0.5, 0.5)
    with pytest.raises(RuntimeError, match=r"x0_prev and coef_x0_prev go together"):
        denoise_step(x, x, x, tm, m, 0.5, 0.5, x0_prev=x)
    with pytest.raises(RuntimeError, match=r"noise and coef_noise go together"):
        denoise_step(x, x, x, tm, m, 0.5, 0.5, coef_noise=0.1)
