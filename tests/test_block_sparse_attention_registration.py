"""block_sparse_attention's registration: opcheck of the op and its backward op, torch.compile
(aot_eager and inductor on every device), and CUDA's report of a nondeterministic backward."""
import pytest
import torch

from moediffuseq.ops import block_sparse_attention
from utils import (ATTENTION_CASE_IDS, ATTENTION_CASES, default_dtype, head_dim, make_inputs, run_with_grads,
                   skip_unless_ready)


@pytest.mark.parametrize("masks", ["none", "global", "padding", "both"])
@pytest.mark.parametrize("device,dtype", ATTENTION_CASES, ids=ATTENTION_CASE_IDS)
def test_opcheck(masks, device, dtype):
    skip_unless_ready(device)
    q, k, v, g, kp, _ = make_inputs(2, 2, 37, head_dim(device, 16), dtype, seed=9,
                                    p_global=0.1 if masks in ("global", "both") else 0.0,
                                    p_pad=0.2 if masks in ("padding", "both") else 0.0, device=device)
    args = (q.requires_grad_(), k.requires_grad_(), v.requires_grad_(), 3, 2, g, kp, 0.25)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention.default, args)


def test_opcheck_backward_op(device):
    q, k, v, g, kp, grad = make_inputs(1, 2, 45, head_dim(device, 8), default_dtype(device), seed=10, p_global=0.1,
                                       p_pad=0.1, device=device)
    out, lse = torch.ops.moediffuseq.block_sparse_attention(q, k, v, 4, 1, g, kp, 0.35)
    args = (grad, q, k, v, out, lse, 4, 1, g, kp, 0.35)
    torch.library.opcheck(torch.ops.moediffuseq.block_sparse_attention_backward.default, args,
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_torch_compile_fullgraph(device):
    from moediffuseq.nn import BlockSparseSelfAttention

    torch.manual_seed(0)
    width, heads = (48, 3) if device == "cpu" else (128, 2)  # head dimension 16 / 64
    attn = BlockSparseSelfAttention(width, heads, window=4, dilation=2).to(device, default_dtype(device))
    x = torch.randn(2, 61, width).to(device, default_dtype(device)).requires_grad_()
    g = torch.zeros(2, 61, dtype=torch.bool, device=device)
    g[:, 0] = True
    kp = torch.zeros(2, 61, dtype=torch.bool, device=device)
    kp[1, 50:] = True
    compiled = torch.compile(attn, fullgraph=True, backend="aot_eager")
    y_eager = attn(x, g, kp)
    y_comp = compiled(x, g, kp)
    torch.testing.assert_close(y_comp, y_eager)
    (gx_eager,) = torch.autograd.grad(y_eager.sum(), x)
    (gx_comp,) = torch.autograd.grad(y_comp.sum(), x)
    torch.testing.assert_close(gx_comp, gx_eager)


def test_torch_compile_inductor(device):
    """The op inside an inductor-compiled function (no graph breaks), forward and backward: on the
    CPU at float32 (a small problem: inductor compiles C++ there), on CUDA at bfloat16."""
    dtype = default_dtype(device)
    L, D = (61, 16) if device == "cpu" else (200, 64)
    q, k, v, g, kp, grad = make_inputs(1, 2, L, D, dtype, seed=12, p_global=0.05, p_pad=0.1, device=device)

    def attend(q, k, v):
        return block_sparse_attention(q * 1.5, k, v, window=16, dilation=2, global_mask=g, key_padding_mask=kp)

    torch._dynamo.reset()
    compiled = torch.compile(attend, fullgraph=True, backend="inductor")
    out_eager, grads_eager = run_with_grads(attend, q, k, v, grad)
    out_comp, grads_comp = run_with_grads(compiled, q, k, v, grad)
    torch.testing.assert_close(out_comp, out_eager)
    for a, b in zip(grads_comp, grads_eager):
        torch.testing.assert_close(a, b)


def test_cuda_backward_is_reported_as_nondeterministic():
    """dQ is a sum of float atomics on CUDA: torch.use_deterministic_algorithms hears of it."""
    skip_unless_ready("cuda")
    q, k, v, _, _, grad = make_inputs(1, 2, 200, 64, torch.bfloat16, seed=16, device="cuda")
    previous = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True, warn_only=True)
    try:
        with pytest.warns(UserWarning, match="block_sparse_attention_backward"):
            run_with_grads(block_sparse_attention, q, k, v, grad, window=8)
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
