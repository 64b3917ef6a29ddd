"""The ops' Python wrappers with unusual arguments: double backward, autograd through
denoise_step, out= overlapping an input."""
import pytest
import torch

from moediffuseq.ops import (block_sparse_attention, denoise_step, denoise_step_ref, moe_ffn, moe_topk_softmax,
                             moe_topk_softmax_ref, soft_absorb_q_sample)


def _double_backward(fn, *inputs):
    """Second derivatives through the inputs and through the output gradient v (the
    double-backward trick of forward-mode AD needs the latter even for an affine op)."""
    out = fn(*inputs)
    v = torch.randn_like(out, requires_grad=True)
    grads = torch.autograd.grad((out * v).sum(), inputs, create_graph=True)
    total = sum(g.pow(2).sum() for g in grads if g is not None)
    return torch.autograd.grad(total, (*inputs, v), allow_unused=True)


@pytest.mark.parametrize("op", ["block_sparse_attention", "moe_ffn", "soft_absorb_q_sample"])
def test_double_backward_is_a_clear_error_not_zeros(op):
    torch.manual_seed(0)
    if op == "block_sparse_attention":
        q, k, v = (torch.randn(1, 2, 9, 4, requires_grad=True) for _ in range(3))
        fn, inputs = (lambda q, k, v: block_sparse_attention(q, k, v, window=2)), (q, k, v)
    elif op == "moe_ffn":
        x = torch.randn(6, 8, requires_grad=True)
        w1, w2 = torch.randn(3, 8, 16, requires_grad=True), torch.randn(3, 16, 8, requires_grad=True)
        weights, indices = moe_topk_softmax(torch.randn(6, 3), 2)
        fn, inputs = (lambda x, w1, w2: moe_ffn(x, weights, indices, w1, w2)), (x, w1, w2)
    else:
        x0, m = torch.randn(2, 5, 4, requires_grad=True), torch.randn(4, requires_grad=True)
        mask = torch.tensor([[False, True, True, False, True]] * 2)
        t = torch.full((2,), 0.6)
        fn = lambda x0, m: soft_absorb_q_sample(x0, m, mask, t, (1 - t * t).sqrt(),  # noqa: E731
                                                generator=torch.Generator().manual_seed(0))
        inputs = (x0, m)
    with pytest.raises(RuntimeError, match=f"{op}: double backward is not supported"):
        _double_backward(fn, *inputs)
    out = fn(*inputs)  # first-order gradients still work, with or without create_graph
    first = torch.autograd.grad(out.sum(), inputs, create_graph=True)
    assert all(g is not None and g.abs().sum() > 0 for g in first)


def test_moe_topk_softmax_is_twice_differentiable():
    """Its backward is plain PyTorch ops: second derivatives match the reference's."""
    torch.manual_seed(0)
    logits = torch.randn(5, 4, requires_grad=True)
    weight = torch.randn(5, 2)
    second = []
    for fn in (moe_topk_softmax, moe_topk_softmax_ref):
        g, = torch.autograd.grad((fn(logits, 2)[0] * weight).sum(), logits, create_graph=True)
        second.append(torch.autograd.grad((g * g).sum(), logits)[0])
    assert second[0].abs().sum() > 0 and torch.allclose(second[0], second[1], atol=1e-6)


def _denoise_inputs(dtype=torch.float64, requires_grad=True):
    g = torch.Generator().manual_seed(0)
    B, L, d = 2, 5, 3
    t = [torch.randn(B, L, d, generator=g, dtype=dtype) for _ in range(5)]  # x_t, x0_hat, x0_prev, noise, anchor
    m = torch.randn(d, generator=g, dtype=dtype)
    coefs = [torch.rand(B, generator=g, dtype=torch.float32) for _ in range(4)]
    mask = torch.tensor([[False, True, True, False, True], [True, False, True, True, False]])
    tensors = [x.requires_grad_(requires_grad) for x in [*t, m, *coefs]]
    return tensors, mask


def _call(fn, tensors, mask, **kw):
    x_t, x0_hat, x0_prev, noise, anchor, m, a, b, c, s = tensors
    return fn(x_t, x0_hat, anchor, mask, m, a, b, x0_prev=x0_prev, coef_x0_prev=c, noise=noise, coef_noise=s, **kw)


def test_denoise_step_is_differentiable_like_its_reference():
    """Its output used to claim requires_grad and give no gradient; now every input gets the
    gradient of the reference, also of the gradient."""
    tensors, mask = _denoise_inputs(torch.float32)
    weight = torch.randn(2, 5, 3)
    got = torch.autograd.grad((_call(denoise_step, tensors, mask) * weight).sum(), tensors)
    want = torch.autograd.grad((_call(denoise_step_ref, tensors, mask) * weight).sum(), tensors)
    for name, a, b in zip("x_t x0_hat x0_prev noise anchor m a b c s".split(), got, want):
        assert a.dtype == b.dtype and torch.allclose(a, b, atol=1e-5), name
    assert any(g.abs().sum() > 0 for g in got)
    tensors, mask = _denoise_inputs(torch.float32)
    first = torch.autograd.grad((_call(denoise_step, tensors, mask) * weight).sum(), tensors, create_graph=True)
    second = torch.autograd.grad(sum((g * g).sum() for g in first), tensors, allow_unused=True)
    first_ref = torch.autograd.grad((_call(denoise_step_ref, tensors, mask) * weight).sum(), tensors,
                                    create_graph=True)
    second_ref = torch.autograd.grad(sum((g * g).sum() for g in first_ref), tensors, allow_unused=True)
    for a, b in zip(second, second_ref):
        assert (a is None and b is None) or (a is not None and b is not None and torch.allclose(a, b, atol=1e-4))


def test_denoise_step_out_refuses_autograd():
    tensors, mask = _denoise_inputs(torch.float32)
    with pytest.raises(RuntimeError, match="out= does not take part in autograd"):
        _call(denoise_step, tensors, mask, out=torch.empty(2, 5, 3))
    with torch.no_grad():
        out = torch.empty(2, 5, 3)
        assert torch.equal(_call(denoise_step, tensors, mask, out=out), _call(denoise_step, tensors, mask))


def test_denoise_step_out_partially_overlapping_an_input_is_refused():
    tensors, mask = _denoise_inputs(torch.float32, requires_grad=False)
    x_t = tensors[0]
    expected = _call(denoise_step, tensors, mask)
    buffer = torch.empty(x_t.numel() + 3)
    buffer[:x_t.numel()] = x_t.flatten()
    shifted_in = buffer[:x_t.numel()].view_as(x_t)
    shifted_out = buffer[3:].view_as(x_t)
    with pytest.raises(ValueError, match="out overlaps x_t"):
        _call(denoise_step, [shifted_in, *tensors[1:]], mask, out=shifted_out)
    m_buffer = torch.empty(2 * 5 * 3)
    with pytest.raises(ValueError, match="out overlaps m"):
        _call(denoise_step, [*tensors[:5], m_buffer[:3], *tensors[6:]], mask, out=m_buffer.view(2, 5, 3))
    # the documented in-place forms still work: out is x_t, or out is another elementwise input
    in_place = x_t.clone()
    assert torch.equal(_call(denoise_step, [in_place, *tensors[1:]], mask, out=in_place), expected)
    anchor = tensors[4].clone()
    assert torch.equal(_call(denoise_step, [*tensors[:4], anchor, *tensors[5:]], mask, out=anchor), expected)
    disjoint = torch.empty(2 * x_t.numel())
    left, right = disjoint[:x_t.numel()].view_as(x_t), disjoint[x_t.numel():].view_as(x_t)
    left.copy_(x_t)
    assert torch.equal(_call(denoise_step, [left, *tensors[1:]], mask, out=right), expected)


def test_denoise_step_autograd_passes_opcheck():
    tensors, mask = _denoise_inputs(torch.float32)
    x_t, x0_hat, x0_prev, noise, anchor, m, a, b, c, s = tensors
    args = (x_t, x0_hat, anchor, mask, m, a, b, x0_prev, c, noise, s)
    torch.library.opcheck(torch.ops.moediffuseq.denoise_step.default, args)
