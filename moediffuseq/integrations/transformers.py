"""Hugging Face transformers drop-ins: block-sparse attention and the MoE feed-forward.

Attention: ``register()`` adds ``"moediffuseq"`` to transformers' attention and attention-mask
registries, so ``AutoModel.from_config(config, attn_implementation="moediffuseq")`` (or
``model.set_attn_implementation("moediffuseq")``) runs every attention layer through
``block_sparse_attention``. What is mapped:

  * the layer's ``sliding_window`` argument W (keys with |i - j| < W, the convention of
    Mistral/Qwen2/Gemma local layers and ModernBERT's local layers) -> ``window = W - 1``; no
    sliding window -> a window covering the sequence;
  * ``is_causal`` (the argument, else the module's attribute) -> ``causal``;
  * the 2-D padding mask (1 = token) -> ``key_padding_mask``;
  * grouped key/value heads, ``scaling`` -> ``scale``; the (B, H, L, D) query/key/value views go
    in as (B, L, H, D) strided views (layout "blhd"), and the output comes back as the
    (B, L, H, D) tensor the model expects;
  * a query shorter than the keys (decoding with a KV cache: ``model.generate()``) -> the query
    rows are the last positions of the key sequence (``query_offset = L_k - L_q``).

The function has no Python branch on tensor values, so a model using it compiles with
``torch.compile(fullgraph=True)``, with or without a padding mask. float16 on the CPU (which the
CPU kernels do not take) is computed in float32 and returned as float16.

Refused with a ValueError naming the reason: a 4-D (custom) attention mask, a query longer than
the keys (cross-attention), attention dropout while training, logit soft-capping, attention
sinks and position biases.

MoE: ``moe_block_from_hf(block)`` builds a ``MoEBlock`` from a Mixtral-style
(``MixtralSparseMoeBlock``) or Qwen-MoE-style (``Qwen2MoeSparseMoeBlock``, with its shared
expert) block with SwiGLU experts, ``replace_moe_blocks(model)`` swaps them in place and
``restore_moe_blocks(model)`` swaps transformers' blocks back. A ``MoEBlock``'s state dict
keeps transformers' parameter names and layouts, so the model's ``save_pretrained``,
``from_pretrained`` and Hugging Face state dicts work as before the replacement.
Router conventions supported: softmax over all experts then top-k, renormalised over the k
(Mixtral; Qwen-MoE with ``norm_topk_prob=True``) or not (Qwen-MoE with ``norm_topk_prob=False``).

transformers is an optional dependency: ``pip install "moediffuseq[hf]"``.
"""
from typing import Optional

import torch
from torch import Tensor, nn

from moediffuseq.extras import optional_dependencies
from moediffuseq.nn.moe import MoEFeedForward
from moediffuseq.ops import block_sparse_attention

NAME = "moediffuseq"


def _key_padding_mask_from(attention_mask: Optional[Tensor], batch: int, length: int) -> Optional[Tensor]:
    if attention_mask is None:
        return None
    if attention_mask.dim() != 2:
        raise ValueError(
            f"moediffuseq attention: got a {attention_mask.dim()}-D attention mask of shape "
            f"{tuple(attention_mask.shape)}; it takes a sliding window, a causal flag and a 2-D padding mask "
            "(B, L) only, not an arbitrary mask (use attn_implementation='sdpa' for custom masks)")
    if attention_mask.shape != (batch, length):
        raise ValueError(f"moediffuseq attention: the padding mask must be (B, L) = ({batch}, {length}), got "
                         f"{tuple(attention_mask.shape)}")
    # True = padded key. Passed on even when nothing is padded: a branch on the mask's values
    # would break torch.compile's graph (a data-dependent Python branch), and an all-False mask
    # gives the kernel's result without one.
    return ~attention_mask.to(torch.bool)


def attention_forward(module: nn.Module, query: Tensor, key: Tensor, value: Tensor,
                      attention_mask: Optional[Tensor], scaling: Optional[float] = None, dropout: float = 0.0,
                      sliding_window: Optional[int] = None, is_causal: Optional[bool] = None,
                      **kwargs) -> tuple[Tensor, None]:
    """transformers' attention-function signature: query (B, H, L_q, D), key and value
    (B, H_kv, L, D) with L_q <= L, the query rows being the last L_q positions of the keys (all
    of them without a cache) -> ((B, L_q, H, D), None)."""
    for name in ("softcap", "s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise ValueError(f"moediffuseq attention: {name} is not supported")
    if dropout and module.training:
        raise ValueError(f"moediffuseq attention: attention dropout ({dropout}) is not supported while training; "
                         "set the config's attention_dropout to 0")
    B, H, Lq, D = query.shape
    L = key.shape[2]
    if Lq > L:
        raise ValueError(f"moediffuseq attention: query length {Lq} > key length {L} (cross-attention?); the "
                         "query rows must be the last positions of the key sequence")
    causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
    window = L if sliding_window is None else max(int(sliding_window) - 1, 0)
    dtype = query.dtype
    if _upcast_on(query):  # fp16 on the CPU: the kernels compute in fp32, as CPU matmuls of fp16 do
        query, key, value = query.float(), key.float(), value.float()
    out = block_sparse_attention(
        query.transpose(1, 2), key.transpose(1, 2), value.transpose(1, 2),  # (B, L, heads, D) views
        window=window, key_padding_mask=_key_padding_mask_from(attention_mask, B, L), scale=scaling,
        causal=bool(causal), layout="blhd", query_offset=L - Lq,
    )  # (B, L_q, H, D)
    return out.to(dtype), None


def _upcast_on(x: Tensor) -> bool:
    """float16 on the CPU, which the CPU kernels do not take (float32 and bfloat16 only): the
    drop-ins then compute in float32 and return float16, so a ``model.half()`` runs as it does
    with transformers' own implementations."""
    return x.device.type == "cpu" and x.dtype == torch.float16


def _padding_mask(batch_size: int, q_length: int, kv_length: int, q_offset: int = 0, kv_offset: int = 0,
                  mask_function=None, attention_mask: Optional[Tensor] = None, **kwargs) -> Optional[Tensor]:
    """The mask transformers builds for this implementation: the 2-D padding mask as it is
    (window and causality travel as the attention function's arguments)."""
    if attention_mask is not None and attention_mask.dim() == 2:
        attention_mask = attention_mask[:, -kv_length:].to(torch.bool)
    return attention_mask


def register() -> None:
    """Registers ``attn_implementation="moediffuseq"`` with transformers (idempotent); without
    transformers, a ModuleNotFoundError naming ``pip install "moediffuseq[hf]"``."""
    with optional_dependencies():
        from transformers import AttentionInterface, AttentionMaskInterface

    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, _padding_mask)


class MoEBlock(nn.Module):
    """A sparse MoE block on the fused ops, with the interface of transformers' Mixtral /
    Qwen-MoE blocks: forward(hidden_states (B, L, D)) -> (B, L, D).

    ``ffn`` holds the router and the stacked experts; ``shared_expert`` and
    ``shared_expert_gate`` (Qwen-MoE: y += sigmoid(gate(x)) * shared_expert(x)) are optional.
    ``gate`` is the model's own router module, whose weight is ``ffn.router.weight`` (one
    parameter): transformers records the router logits that its auxiliary load-balancing loss
    (``output_router_logits=True``) is computed from at that module, so the block calls it on
    the tokens too; it costs one (T, D) x (D, E) product and a top-k beside the experts'.

    The state dict keeps transformers' names and layouts: ``gate.weight`` (E, D) once (not again
    as ``ffn.router.weight``), ``experts.gate_up_proj`` (E, 2F, D) and ``experts.down_proj``
    (E, D, F), written as transposed views of ``ffn.w1`` (E, D, 2F) and ``ffn.w2`` (E, F, D) and
    read back into them; so ``save_pretrained``, ``from_pretrained`` and ``load_state_dict`` of a
    Hugging Face state dict work on a model whose blocks were replaced (the block's own names are
    read too).
    """

    def __init__(self, ffn: MoEFeedForward, shared_expert: Optional[nn.Module] = None,
                 shared_expert_gate: Optional[nn.Module] = None, gate: Optional[nn.Module] = None) -> None:
        super().__init__()
        self.ffn = ffn
        self.shared_expert = shared_expert
        self.shared_expert_gate = shared_expert_gate
        self.gate = gate
        self.register_state_dict_post_hook(_state_dict_in_hf_names)
        self.register_load_state_dict_pre_hook(_state_dict_from_hf_names)

    def forward(self, hidden_states: Tensor) -> Tensor:
        if self.gate is not None:
            self.gate(hidden_states.reshape(-1, hidden_states.shape[-1]))  # (T, D): recorded by transformers
        x = hidden_states.float() if _upcast_on(hidden_states) else hidden_states
        y, _ = self.ffn(x)
        y = y.to(hidden_states.dtype)
        if self.shared_expert is not None:
            shared = self.shared_expert(hidden_states)
            if self.shared_expert_gate is not None:
                shared = torch.sigmoid(self.shared_expert_gate(hidden_states)) * shared
            y = y + shared
        return y


def _state_dict_in_hf_names(block: MoEBlock, state: dict, prefix: str, local_metadata) -> None:
    """``ffn.*`` -> transformers' names and layouts (views: no copy)."""
    router = state.pop(prefix + "ffn.router.weight")
    state.setdefault(prefix + "gate.weight", router)
    state[prefix + "experts.gate_up_proj"] = state.pop(prefix + "ffn.w1").transpose(1, 2)  # (E, 2F, D)
    state[prefix + "experts.down_proj"] = state.pop(prefix + "ffn.w2").transpose(1, 2)  # (E, D, F)


def _state_dict_from_hf_names(block: MoEBlock, state: dict, prefix: str, *args) -> None:
    """transformers' names and layouts -> ``ffn.*`` (the block's own names pass as they are)."""
    for hf, ours in (("experts.gate_up_proj", "ffn.w1"), ("experts.down_proj", "ffn.w2")):
        if prefix + hf in state:
            state[prefix + ours] = state.pop(prefix + hf).transpose(1, 2)
    if prefix + "gate.weight" in state and prefix + "ffn.router.weight" not in state:
        # one parameter under both names, or only the router's for a block without a gate module
        state[prefix + "ffn.router.weight"] = state[prefix + "gate.weight"]
        if block.gate is None:
            del state[prefix + "gate.weight"]
    if block.gate is not None and prefix + "ffn.router.weight" in state and prefix + "gate.weight" not in state:
        state[prefix + "gate.weight"] = state[prefix + "ffn.router.weight"]


def moe_block_from_hf(block: nn.Module) -> MoEBlock:
    """A MoEBlock with copies of the weights of a transformers sparse MoE block (Mixtral or
    Qwen-MoE style: ``gate.weight`` (E, D), ``experts.gate_up_proj`` (E, 2F, D) gate rows then
    up rows, ``experts.down_proj`` (E, D, F), SiLU); the router and the shared expert modules are
    reused (the router's weight becomes ``ffn.router.weight``); ``block`` itself is left as it is."""
    gate, experts = getattr(block, "gate", None), getattr(block, "experts", None)
    if gate is None or experts is None or not hasattr(experts, "gate_up_proj") or not hasattr(experts, "down_proj"):
        raise ValueError(f"moe_block_from_hf: {type(block).__name__} is not a Mixtral/Qwen-MoE-style block "
                         "(gate.weight, experts.gate_up_proj, experts.down_proj)")
    act = getattr(experts, "act_fn", None)
    if not isinstance(act, nn.SiLU) and type(act).__name__ != "SiLUActivation":
        raise ValueError(f"moe_block_from_hf: the experts' activation must be SiLU (SwiGLU), got {act}")
    if getattr(block, "jitter_noise", 0.0):
        raise ValueError(f"moe_block_from_hf: router jitter noise ({block.jitter_noise}) is not supported")
    gate_up = experts.gate_up_proj.detach()  # (E, 2F, D)
    gate_proj, up_proj = gate_up.chunk(2, dim=1)  # (E, F, D) each
    ffn = MoEFeedForward.from_experts(gate.weight.detach(), gate_proj, up_proj, experts.down_proj.detach(),
                                      top_k=gate.top_k, normalize_topk=getattr(gate, "norm_topk_prob", True))
    ffn.w1.requires_grad_(experts.gate_up_proj.requires_grad)
    ffn.w2.requires_grad_(experts.down_proj.requires_grad)
    ffn.router.weight = gate.weight  # one parameter: the experts' routing and the recorded logits
    return MoEBlock(ffn, getattr(block, "shared_expert", None), getattr(block, "shared_expert_gate", None), gate)


def _parent_and_name(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    parent_name, _, child = name.rpartition(".")
    return (model.get_submodule(parent_name) if parent_name else model), child


def replace_moe_blocks(model: nn.Module) -> int:
    """Replaces, in place, every submodule of ``model`` whose class name ends in
    ``SparseMoeBlock`` by ``moe_block_from_hf`` of it; returns how many were replaced.
    ``restore_moe_blocks`` undoes it: each replaced block is kept (not as a submodule) without its
    expert weights, which ``ffn.w1`` / ``ffn.w2`` now hold, so the replacement costs no memory."""
    targets = [(name, m) for name, m in model.named_modules() if type(m).__name__.endswith("SparseMoeBlock")]
    for name, m in targets:
        ours = moe_block_from_hf(m)
        m.experts.gate_up_proj = m.experts.down_proj = None  # rebuilt from ffn.w1 / ffn.w2 by restore_moe_blocks
        object.__setattr__(ours, "_hf_block", m)  # not a submodule: not in the state dict, not moved by .to()
        parent, child = _parent_and_name(model, name)
        setattr(parent, child, ours)
    return len(targets)


def restore_moe_blocks(model: nn.Module) -> int:
    """Puts back, in place, the transformers block of every ``MoEBlock`` made by
    ``replace_moe_blocks``, holding the block's current weights (trained
    or moved since: the router, shared expert and shared-expert gate are the same modules, the
    experts' ``gate_up_proj`` / ``down_proj`` are rebuilt from ``ffn.w1`` / ``ffn.w2``); returns
    how many were restored."""
    targets = [(name, m) for name, m in model.named_modules() if isinstance(m, MoEBlock)]
    for name, ours in targets:
        block = getattr(ours, "_hf_block", None)
        if block is None:
            raise ValueError(f"restore_moe_blocks: {name or 'the model'} is a MoEBlock not made by "
                             "replace_moe_blocks: there is no transformers block to restore")
        w1, w2 = ours.ffn.w1, ours.ffn.w2
        block.experts.gate_up_proj = nn.Parameter(w1.detach().transpose(1, 2).contiguous(),  # (E, 2F, D)
                                                  requires_grad=w1.requires_grad)
        block.experts.down_proj = nn.Parameter(w2.detach().transpose(1, 2).contiguous(),  # (E, D, F)
                                               requires_grad=w2.requires_grad)
        parent, child = _parent_and_name(model, name)
        setattr(parent, child, block)
    return len(targets)
