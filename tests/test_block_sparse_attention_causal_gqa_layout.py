"""block_sparse_attention's causal mask, grouped-query k/v and the (B, L, H, D) layout: the
future has no effect, strided views of a fused projection are read in place, registration
with all three, on every device."""
import pytest
import torch

from moediffuseq.ops import block_sparse_attention
from utils import ATTENTION_CASE_IDS, ATTENTION_CASES, head_dim, make_inputs, run_with_grads, skip_unless_ready


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
def test_causal_output_ignores_the_future(device, dtype):
    """Changing k and v at positions > i (global ones included) leaves rows <= i bitwise equal,
    and their gradients with respect to those keys are exactly zero."""
    skip_unless_ready(device)
    L, cut = 300, 170
    q, k, v, g, _, grad = make_inputs(1, 4, L, head_dim(device, 16), dtype, seed=30, p_global=0.1, kv_heads=2,
                                      layout="blhd", device=device)
    g[0, cut + 5] = True  # a global token in the future of the rows compared
    kw = dict(window=40, dilation=2, global_mask=g, causal=True, layout="blhd")
    future = (torch.arange(L, device=device) <= cut)[:, None, None]
    out, (dq, dk, dv) = run_with_grads(block_sparse_attention, q, k, v, grad * future, **kw)
    k2, v2 = k.clone(), v.clone()
    k2[:, cut + 1:] = torch.randn_like(k2[:, cut + 1:])
    v2[:, cut + 1:] = 100.0
    out2 = block_sparse_attention(q, k2, v2, **kw)
    assert torch.equal(out[:, :cut + 1], out2[:, :cut + 1])
    assert not torch.equal(out[:, cut + 1:], out2[:, cut + 1:])
    assert dk[:, cut + 1:].abs().max() == 0 and dv[:, cut + 1:].abs().max() == 0


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
def test_blhd_reads_the_views_of_a_fused_qkv_projection(device, dtype):
    """q, k, v as strided views of one (B, L, 3, H, D) projection output (no copy), and the
    same values in contiguous (B, H, L, D) tensors, give the same output (transposed) and grads."""
    skip_unless_ready(device)
    B, L, H, D = 2, 131, 3, head_dim(device, 24)
    qkv = torch.randn(B, L, 3, H, D, generator=torch.Generator().manual_seed(31)).to(device, dtype).requires_grad_()
    q, k, v = qkv.unbind(2)  # (B, L, H, D) each, row stride 3 H D
    assert not q.is_contiguous() and q.stride(-1) == 1
    g = (torch.rand(B, L, generator=torch.Generator().manual_seed(32)) < 0.05).to(device)
    out = block_sparse_attention(q, k, v, window=7, global_mask=g, causal=True, layout="blhd")
    grad = torch.randn_like(out)
    (dqkv,) = torch.autograd.grad(out, qkv, grad)
    leaves = [t.detach().transpose(1, 2).contiguous().requires_grad_() for t in (q, k, v)]
    ref = block_sparse_attention(*leaves, window=7, global_mask=g, causal=True)
    ref_grads = torch.autograd.grad(ref, leaves, grad.transpose(1, 2))
    assert out.shape == (B, L, H, D) and out.is_contiguous()
    torch.testing.assert_close(out, ref.transpose(1, 2), rtol=0, atol=0)
    # bitwise on CPU; CUDA sums dQ with float atomics in an order that varies from run to run
    exact = dict(rtol=0, atol=0) if device == "cpu" else dict(rtol=1e-2, atol=1e-2)
    for i in range(3):
        torch.testing.assert_close(dqkv[:, :, i], ref_grads[i].transpose(1, 2), **exact)


@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
@pytest.mark.parametrize("layout", ["bhld", "blhd"])
def test_opcheck_causal_grouped_query(layout, device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, _ = make_inputs(2, 4, 37, head_dim(device, 16), dtype, seed=9, p_global=0.1, p_pad=0.2,
                                    kv_heads=2, layout=layout, device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25, True, layout)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)
