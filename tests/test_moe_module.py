"""moediffuseq.nn.MoEFeedForward: routing, aux losses, capacity dropping; the dense baseline."""
import math

import pytest
import torch
from torch.nn import functional as F

from moediffuseq.nn import DenseFeedForward, MoEFeedForward
from moediffuseq.ops import moe_ffn_ref, moe_topk_softmax_ref


def reference_layer(layer, x):
    """The layer computed from the references, with the capacity rule written as a loop."""
    h = x.reshape(-1, layer.d_model)
    logits = h.float() @ layer.router.weight.float().T
    weights, indices = moe_topk_softmax_ref(logits, layer.top_k)
    routed = indices.clone()
    if layer.capacity_factor is not None:
        capacity = math.ceil(layer.capacity_factor * h.shape[0] * layer.top_k / layer.num_experts)
        used = [0] * layer.num_experts
        for t in range(routed.shape[0]):
            for j in range(routed.shape[1]):
                e = int(routed[t, j])
                routed[t, j] = e if used[e] < capacity else -1
                used[e] += 1
    y = moe_ffn_ref(h, weights, routed, layer.w1, layer.w2, layer.activation, upcast=False)
    probs = torch.softmax(logits, -1)
    f = torch.bincount(indices.flatten(), minlength=layer.num_experts).float() / indices.numel()
    lb = layer.load_balance_weight * layer.num_experts * (f * probs.mean(0)).sum()
    z = layer.z_loss_weight * (torch.logsumexp(logits, -1) ** 2).mean()
    return y.reshape(x.shape), lb, z, routed


@pytest.mark.parametrize("capacity_factor", [None, 1.0, 0.5])
@pytest.mark.parametrize("activation", ["gelu", "swiglu"])
def test_layer_matches_reference(capacity_factor, activation):
    torch.manual_seed(0)
    layer = MoEFeedForward(24, 20, num_experts=5, top_k=2, activation=activation, capacity_factor=capacity_factor)
    x = torch.randn(3, 41, 24)
    y, aux = layer(x)
    ref_y, ref_lb, ref_z, routed = reference_layer(layer, x)
    torch.testing.assert_close(y, ref_y, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(aux.load_balance_loss, ref_lb)
    torch.testing.assert_close(aux.z_loss, ref_z)
    kept = routed.flatten()
    assert torch.equal(aux.expert_counts, torch.bincount(kept[kept >= 0], minlength=5))
    assert int(aux.dropped) == int((kept < 0).sum())
    if capacity_factor == 0.5:
        assert int(aux.dropped) > 0 and int(aux.expert_counts.max()) <= math.ceil(0.5 * 123 * 2 / 5)


def test_balanced_routing_gives_alpha():
    layer = MoEFeedForward(8, 8, num_experts=4, top_k=1)
    with torch.no_grad():
        layer.router.weight.copy_(torch.eye(4, 8) * 10)
    x = torch.zeros(400, 8)
    x[torch.arange(400), torch.arange(400) % 4] = 1.0  # each expert gets a quarter of the tokens
    _, aux = layer(x)
    assert torch.equal(aux.expert_counts, torch.full((4,), 100))
    assert abs(aux.load_balance_loss.item() - 0.01) < 1e-3


def test_router_and_experts_receive_gradients():
    torch.manual_seed(1)
    layer = MoEFeedForward(16, 12, num_experts=4, top_k=2)
    y, aux = layer(torch.randn(2, 30, 16))
    (y.square().mean() + aux.loss).backward()
    for name, p in layer.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_dense_baseline_interface():
    torch.manual_seed(2)
    dense = DenseFeedForward(16, 32, "silu")
    x = torch.randn(2, 5, 16)
    y, aux = dense(x)
    torch.testing.assert_close(y, dense.fc2(F.silu(dense.fc1(x))))
    assert aux.loss.item() == 0.0 and aux.expert_counts.numel() == 0


@pytest.mark.parametrize("kwargs,message", [
    (dict(top_k=5), r"top_k must be in \[1, num_experts=4\]"),
    (dict(top_k=0), r"top_k must be in"),
    (dict(activation="relu"), r"activation must be one of"),
    (dict(capacity_factor=0.0), r"capacity_factor must be positive"),
])
def test_bad_configuration(kwargs, message):
    args = dict(d_model=8, d_expert=8, num_experts=4, top_k=2)
    args.update(kwargs)
    with pytest.raises(ValueError, match=message):
        MoEFeedForward(**args)
