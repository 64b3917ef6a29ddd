"""Mixture-of-experts feed-forward (METHOD §4) on the fused ops, and the dense baseline."""
import contextlib
import math
from dataclasses import dataclass
from typing import Optional

import torch
from torch import Tensor, nn
from torch.nn import functional as F

from moediffuseq.ops import moe_ffn, moe_topk_softmax
from moediffuseq.ops.moe_ffn import ACTIVATIONS


@dataclass
class MoEAux:
    """What a feed-forward layer reports besides its output; losses already weighted."""

    load_balance_loss: Tensor  # alpha * E * sum_e f_e P_e (~alpha when balanced)
    z_loss: Tensor             # beta * mean(logsumexp(logits)^2)
    expert_counts: Tensor      # (E,) int64 routed slots per expert, after capacity dropping; (0,) if dense
    dropped: Tensor            # () int64 slots dropped by the capacity factor

    @property
    def loss(self) -> Tensor:
        return self.load_balance_loss + self.z_loss


class MoEFeedForward(nn.Module):
    """Top-k routed experts: y = sum_j w_j FFN_{e_j}(x), dropless unless capacity_factor is set.

    Args:
        d_model: model width D.
        d_expert: expert width F.
        num_experts: E.
        top_k: experts per token k (1 <= k <= E).
        activation: "gelu" (tanh approximation), "silu" or "swiglu".
        capacity_factor: None for dropless routing; else each expert takes at most
            ceil(capacity_factor * T * k / E) slots, in token order, and the overflow slots
            contribute zero (reported in ``aux.dropped``).
        load_balance_weight: alpha of the load-balancing loss (METHOD §4: 0.01).
        z_loss_weight: beta of the router z-loss (METHOD §4: 1e-3).
        normalize_topk: the routing weights are the softmax over all E experts renormalised over
            the k chosen (True: METHOD §4, Mixtral, Qwen-MoE with ``norm_topk_prob=True``) or the
            plain softmax probabilities of the k chosen (False: Qwen-MoE's default).

    forward(x (..., D)) -> (y (..., D), MoEAux). The router runs in float32.
    """

    def __init__(self, d_model: int, d_expert: int, num_experts: int, top_k: int, activation: str = "gelu",
                 capacity_factor: Optional[float] = None, load_balance_weight: float = 0.01,
                 z_loss_weight: float = 1e-3, normalize_topk: bool = True) -> None:
        super().__init__()
        if not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be in [1, num_experts={num_experts}], got {top_k}")
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        if capacity_factor is not None and capacity_factor <= 0:
            raise ValueError(f"capacity_factor must be positive or None, got {capacity_factor}")
        self.d_model, self.d_expert, self.num_experts, self.top_k = d_model, d_expert, num_experts, top_k
        self.activation, self.capacity_factor = activation, capacity_factor
        self.load_balance_weight, self.z_loss_weight = load_balance_weight, z_loss_weight
        self.normalize_topk = normalize_topk
        width1 = 2 * d_expert if activation == "swiglu" else d_expert
        self.router = nn.Linear(d_model, num_experts, bias=False)
        self.w1 = nn.Parameter(torch.empty(num_experts, d_model, width1))
        self.w2 = nn.Parameter(torch.empty(num_experts, d_expert, d_model))
        nn.init.uniform_(self.w1, -1 / math.sqrt(d_model), 1 / math.sqrt(d_model))
        nn.init.uniform_(self.w2, -1 / math.sqrt(d_expert), 1 / math.sqrt(d_expert))

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        if x.shape[-1] != self.d_model:
            raise ValueError(f"x must be (..., {self.d_model}), got {tuple(x.shape)}")
        shape = x.shape
        h = x.reshape(-1, self.d_model)  # (T, D)
        logits = self.router_logits(h)  # (T, E) float32
        weights, indices = moe_topk_softmax(logits, self.top_k)  # (T, k), (T, k)
        if not self.normalize_topk:
            weights = torch.softmax(logits, dim=-1).gather(-1, indices)  # (T, k) not renormalised
        routed = indices
        if self.capacity_factor is not None:
            routed = self._drop_overflow(indices)
        y = moe_ffn(h, weights, routed, self.w1.to(h.dtype), self.w2.to(h.dtype), self.activation)
        return y.reshape(shape), self._aux(logits, indices, routed)

    @classmethod
    def from_experts(cls, router_weight: Tensor, gate_proj, up_proj, down_proj, top_k: int, *,
                     normalize_topk: bool = True, **kwargs) -> "MoEFeedForward":
        """A SwiGLU MoEFeedForward holding copies of per-expert weights in nn.Linear layout
        (Mixtral ``w1``/``w3``/``w2``, Qwen-MoE and Llama-style ``gate_proj``/``up_proj``/``down_proj``):
        expert e computes down_proj[e] @ (silu(gate_proj[e] @ x) * up_proj[e] @ x).

        Args:
            router_weight: (E, D), the router's nn.Linear weight (no bias).
            gate_proj, up_proj: (E, F, D) tensors or sequences of E (F, D) weights.
            down_proj: an (E, D, F) tensor or a sequence of E (D, F) weights.
            top_k: experts per token.
            normalize_topk: see the class docstring.
            **kwargs: the other constructor arguments (capacity_factor, loss weights).

        The stacked layout: w1 (E, D, 2F) = [gate^T | up^T], w2 (E, F, D) = down^T.
        """
        stack = (lambda w: w if isinstance(w, Tensor) else torch.stack(list(w)))
        gate, up, down = (stack(w).detach() for w in (gate_proj, up_proj, down_proj))  # (E, F, D) x 2, (E, D, F)
        E, D = router_weight.shape
        if gate.dim() != 3 or gate.shape[0] != E or gate.shape[2] != D or up.shape != gate.shape:
            raise ValueError(f"from_experts: gate_proj and up_proj must be (E, F, D) = ({E}, F, {D}), got "
                             f"{tuple(gate.shape)} and {tuple(up.shape)}")
        F_ = gate.shape[1]
        if down.shape != (E, D, F_):
            raise ValueError(f"from_experts: down_proj must be (E, D, F) = ({E}, {D}, {F_}), got {tuple(down.shape)}")
        ffn = cls(D, F_, E, top_k, activation="swiglu", normalize_topk=normalize_topk, **kwargs)
        ffn = ffn.to(device=router_weight.device, dtype=router_weight.dtype)
        with torch.no_grad():
            ffn.router.weight.copy_(router_weight)
            ffn.w1.copy_(torch.cat([gate, up], dim=1).transpose(1, 2))  # (E, D, 2F): gate half, then up half
            ffn.w2.copy_(down.transpose(1, 2))  # (E, F, D)
        return ffn

    def router_logits(self, h: Tensor) -> Tensor:
        """(T, D) -> (T, E) float32 router logits, also under autocast (routing decisions and the
        balance statistics stay exact; the experts take the autocast dtype in ``moe_ffn``)."""
        device = h.device.type
        no_autocast = torch.autocast(device, enabled=False) if torch.amp.is_autocast_available(device) \
            else contextlib.nullcontext()  # e.g. meta: no autocast to turn off
        with no_autocast:
            return F.linear(h.float(), self.router.weight.float())

    def _drop_overflow(self, indices: Tensor) -> Tensor:
        T = indices.shape[0]
        capacity = math.ceil(self.capacity_factor * T * self.top_k / self.num_experts)
        one_hot = F.one_hot(indices.reshape(-1), self.num_experts)  # (T*k, E), slots in token order
        position = (one_hot.cumsum(0) * one_hot).sum(-1) - 1  # rank of each slot within its expert
        return torch.where(position.view_as(indices) < capacity, indices, -1)

    def _aux(self, logits: Tensor, indices: Tensor, routed: Tensor) -> MoEAux:
        E = self.num_experts
        probs = torch.softmax(logits, dim=-1)  # (T, E)
        f = _count(indices, E).float() / max(indices.numel(), 1)
        load_balance = self.load_balance_weight * E * (f * probs.mean(0)).sum()
        z_loss = self.z_loss_weight * torch.logsumexp(logits, dim=-1).square().mean()
        return MoEAux(load_balance, z_loss, _count(routed, E), (routed < 0).sum())

    def extra_repr(self) -> str:
        return (f"d_model={self.d_model}, d_expert={self.d_expert}, num_experts={self.num_experts}, "
                f"top_k={self.top_k}, activation={self.activation}, capacity_factor={self.capacity_factor}"
                + ("" if self.normalize_topk else ", normalize_topk=False"))


def _count(indices: Tensor, num_experts: int) -> Tensor:
    """(E,) int64 slots per expert; -1 (a dropped slot) is not counted. Shape-static (no
    bincount, no boolean indexing), so it runs on any device and compiles without a graph break."""
    flat = indices.reshape(-1)
    kept = (flat >= 0).long()
    return torch.zeros(num_experts, dtype=torch.int64, device=flat.device).scatter_add_(0, flat.clamp(min=0), kept)


class DenseFeedForward(nn.Module):
    """The dense baseline with MoEFeedForward's interface: Linear -> act -> Linear, zero aux."""

    def __init__(self, d_model: int, d_ff: int, activation: str = "gelu") -> None:
        super().__init__()
        if activation not in ACTIVATIONS:
            raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
        self.d_model, self.activation = d_model, activation
        self.fc1 = nn.Linear(d_model, 2 * d_ff if activation == "swiglu" else d_ff)
        self.fc2 = nn.Linear(d_ff, d_model)

    def forward(self, x: Tensor) -> tuple[Tensor, MoEAux]:
        h = self.fc1(x)
        if self.activation == "gelu":
            a = F.gelu(h, approximate="tanh")
        elif self.activation == "silu":
            a = F.silu(h)
        else:
            gate, up = h.chunk(2, dim=-1)
            a = F.silu(gate) * up
        zero = x.new_zeros((), dtype=torch.float32)
        aux = MoEAux(zero, zero, torch.zeros(0, dtype=torch.int64, device=x.device),
                     torch.zeros((), dtype=torch.int64, device=x.device))
        return self.fc2(a), aux
