"""moediffuseq.nn.BlockSparseSelfAttention: the fused kind against the dense kind."""
import pytest
import torch

from moediffuseq.nn import BlockSparseSelfAttention


def test_window_limits_the_receptive_field():
    torch.manual_seed(1)
    attn = BlockSparseSelfAttention(32, 2, window=3)
    x = torch.randn(1, 50, 32, requires_grad=True)
    (g,) = torch.autograd.grad(attn(x)[0, 25].sum(), x)
    touched = g[0].abs().sum(-1) > 0
    assert touched[22:29].all() and not touched[:22].any() and not touched[29:].any()


def test_global_token_sees_and_is_seen_by_everyone():
    torch.manual_seed(2)
    attn = BlockSparseSelfAttention(32, 2, window=1)
    x = torch.randn(1, 40, 32, requires_grad=True)
    g = torch.zeros(1, 40, dtype=torch.bool)
    g[0, 0] = True
    (grad_from_global,) = torch.autograd.grad(attn(x, global_mask=g)[0, 0].sum(), x)
    assert (grad_from_global[0].abs().sum(-1) > 0).all()
    (grad_from_far,) = torch.autograd.grad(attn(x, global_mask=g)[0, 30].sum(), x)
    assert grad_from_far[0, 0].abs().sum() > 0 and grad_from_far[0, 10].abs().sum() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(d_model=30, n_heads=4), "divisible"),
    (dict(d_model=32, n_heads=4, kind="flash"), "kind must be one of"),
    (dict(d_model=32, n_heads=4, window=-1), "window >= 0"),
    (dict(d_model=32, n_heads=4, dilation=0), "dilation >= 1"),
])
def test_bad_configuration(kwargs, message):
    with pytest.raises(ValueError, match=message):
        BlockSparseSelfAttention(**kwargs)


def test_bad_input_shape():
    attn = BlockSparseSelfAttention(32, 4)
    with pytest.raises(ValueError, match=r"x must be \(B, L, 32\)"):
        attn(torch.randn(2, 10, 16))


@pytest.mark.parametrize("causal,n_kv_heads", [(False, 4), (True, 4), (True, 2), (True, 1)])
def test_sparse_equals_dense_when_the_window_covers_the_sequence(causal, n_kv_heads):
    """The fused kind (layout "blhd", strided views of the projection) against SDPA (is_causal /
    a causal padding mask, enable_gqa), without and with padding: outputs and input gradients."""
    torch.manual_seed(3)
    kw = dict(causal=causal, n_kv_heads=n_kv_heads)
    sparse = BlockSparseSelfAttention(64, 4, window=100, kind="sparse", **kw)
    dense = BlockSparseSelfAttention(64, 4, kind="dense", **kw)
    dense.load_state_dict(sparse.state_dict())
    x = torch.randn(2, 77, 64, requires_grad=True)
    for pad in (None, torch.arange(77).expand(2, 77) >= torch.tensor([[77], [60]])):
        ys, yd = sparse(x, key_padding_mask=pad), dense(x, key_padding_mask=pad)
        torch.testing.assert_close(ys, yd, atol=2e-5, rtol=2e-5)
        (gs,) = torch.autograd.grad(ys.square().sum(), x)
        (gd,) = torch.autograd.grad(yd.square().sum(), x)
        torch.testing.assert_close(gs, gd, atol=1e-4, rtol=1e-4)


def test_causal_window_sees_only_the_past():
    torch.manual_seed(4)
    attn = BlockSparseSelfAttention(32, 2, window=3, causal=True, n_kv_heads=1)
    x = torch.randn(1, 50, 32, requires_grad=True)
    (g,) = torch.autograd.grad(attn(x)[0, 25].sum(), x)
    touched = g[0].abs().sum(-1) > 0
    assert touched[22:26].all() and not touched[:22].any() and not touched[26:].any()


def test_bad_kv_heads():
    with pytest.raises(ValueError, match=r"n_heads \(4\) must be a multiple of n_kv_heads \(3\)"):
        BlockSparseSelfAttention(32, 4, n_kv_heads=3)
