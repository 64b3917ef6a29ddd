"""moediffuseq.integrations.transformers against transformers' own implementations, on small
models built from configs with random weights (no downloads)."""
import pytest
import torch

transformers = pytest.importorskip("transformers")

from moediffuseq.integrations.transformers import (MoEBlock, attention_forward, moe_block_from_hf,  # noqa: E402
                                                   register, replace_moe_blocks)
from moediffuseq.nn import MoEFeedForward  # noqa: E402


def randomize(module, seed, std=0.2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * std)


def mixtral_block():
    from transformers import MixtralConfig
    from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock

    block = MixtralSparseMoeBlock(MixtralConfig(hidden_size=32, intermediate_size=48, num_local_experts=5,
                                                num_experts_per_tok=2))
    randomize(block, 0)
    return block


def qwen_block(norm_topk_prob):
    from transformers import Qwen2MoeConfig
    from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

    block = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=32, moe_intermediate_size=24,
                                                  shared_expert_intermediate_size=40, num_experts=6,
                                                  num_experts_per_tok=3, norm_topk_prob=norm_topk_prob))
    randomize(block, 1)
    return block


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe-normalized", "qwen2_moe-unnormalized"])
def test_moe_block_matches_transformers(family):
    """Outputs and the gradients of the input, the router and the expert weights."""
    block = mixtral_block() if family == "mixtral" else qwen_block(family.endswith("-normalized"))
    ours = moe_block_from_hf(block)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(2))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = block(xa), ours(xb)
    torch.testing.assert_close(yb, ya, atol=2e-6, rtol=1e-5)
    grad = torch.randn_like(ya)
    ga = torch.autograd.grad(ya, [xa, block.gate.weight, block.experts.gate_up_proj, block.experts.down_proj], grad)
    gb = torch.autograd.grad(yb, [xb, ours.ffn.router.weight, ours.ffn.w1, ours.ffn.w2], grad)
    torch.testing.assert_close(gb[0], ga[0], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb[1], ga[1], atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(gb[2], ga[2].transpose(1, 2), atol=1e-5, rtol=1e-4)  # (E, D, 2F), gate half first
    torch.testing.assert_close(gb[3], ga[3].transpose(1, 2), atol=1e-5, rtol=1e-4)  # (E, F, D)


def test_from_experts_takes_per_expert_linear_weights():
    """The Mixtral v4 layout (per-expert w1 = gate, w3 = up, w2 = down nn.Linear weights) gives
    the loop-over-experts result."""
    gen = torch.Generator().manual_seed(3)
    E, D, F, k = 4, 16, 24, 2
    router = torch.randn(E, D, generator=gen)
    gate, up = [torch.randn(F, D, generator=gen) * 0.3 for _ in range(E)], [torch.randn(F, D, generator=gen) * 0.3
                                                                            for _ in range(E)]
    down = [torch.randn(D, F, generator=gen) * 0.3 for _ in range(E)]
    ffn = MoEFeedForward.from_experts(router, gate, up, down, top_k=k)
    x = torch.randn(13, D, generator=gen)
    probs = torch.softmax(x @ router.T, -1)
    top, idx = probs.topk(k, -1)
    top = top / top.sum(-1, keepdim=True)
    expect = torch.zeros_like(x)
    for t in range(13):
        for j in range(k):
            e = int(idx[t, j])
            h = torch.nn.functional.silu(gate[e] @ x[t]) * (up[e] @ x[t])
            expect[t] += top[t, j] * (down[e] @ h)
    torch.testing.assert_close(ffn(x)[0], expect, atol=2e-6, rtol=1e-5)


def test_from_experts_names_bad_shapes():
    with pytest.raises(ValueError, match=r"down_proj must be \(E, D, F\) = \(2, 8, 4\)"):
        MoEFeedForward.from_experts(torch.randn(2, 8), torch.randn(2, 4, 8), torch.randn(2, 4, 8),
                                    torch.randn(2, 4, 8), top_k=1)


def tiny_mixtral(attn_implementation):
    from transformers import MixtralConfig, MixtralForCausalLM

    config = MixtralConfig(vocab_size=101, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                           sliding_window=7, max_position_embeddings=256, attn_implementation=attn_implementation)
    torch.manual_seed(4)
    return MixtralForCausalLM(config).eval()


def test_replace_moe_blocks_in_a_mixtral_model():
    model = tiny_mixtral("eager")
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(5))
    expect = model(ids).logits
    assert replace_moe_blocks(model) == 2
    assert all(isinstance(layer.mlp, MoEBlock) for layer in model.model.layers)
    torch.testing.assert_close(model(ids).logits, expect, atol=1e-5, rtol=1e-5)


def test_replaced_blocks_feed_the_router_aux_loss():
    """With output_router_logits=True the model's load-balancing loss is computed from the
    router logits recorded at each block's router: after the replacement the same loss, the
    same logits, and its gradient reaches the (one) router weight our experts route with."""
    model = tiny_mixtral("eager")
    model.config.output_router_logits = True
    model.config.router_aux_loss_coef = 0.1
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(6))
    expect = model(ids)
    assert expect.aux_loss is not None and expect.aux_loss > 0
    replace_moe_blocks(model)
    got = model(ids)
    torch.testing.assert_close(got.aux_loss, expect.aux_loss, atol=1e-6, rtol=1e-6)
    assert len(got.router_logits) == len(expect.router_logits) == 2
    for a, b in zip(got.router_logits, expect.router_logits):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)
    block = model.model.layers[0].mlp
    assert block.ffn.router.weight is block.gate.weight
    (grad,) = torch.autograd.grad(got.aux_loss, block.ffn.router.weight)
    assert grad.abs().sum() > 0


def _logits_and_grads(model, ids, mask):
    model.zero_grad()
    out = model(input_ids=ids, attention_mask=mask).logits
    keep = mask.bool()
    loss = (out[keep] * torch.linspace(-1, 1, out.shape[-1])).sum()
    loss.backward()
    return out[keep].detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def compare_implementations(make_model, ids, mask):
    register()
    ref_model, our_model = make_model("eager"), make_model("moediffuseq")
    our_model.load_state_dict(ref_model.state_dict())
    assert our_model.config._attn_implementation == "moediffuseq"
    ref, ref_grads = _logits_and_grads(ref_model, ids, mask)
    ours, our_grads = _logits_and_grads(our_model, ids, mask)
    torch.testing.assert_close(ours, ref, atol=2e-5, rtol=2e-5)
    assert ref_grads.keys() == our_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(our_grads[name], ref_grads[name], atol=5e-5, rtol=5e-4, msg=name)


def padded_batch(vocab, B, L, seed, left=False):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, vocab, (B, L), generator=gen)
    mask = torch.ones(B, L, dtype=torch.long)
    if left:
        mask[1, :6] = 0
    else:
        mask[1, L - 6:] = 0
    return ids, mask


def tiny_mistral(attn_implementation):
    """Mistral with a sliding window of 7 and grouped key/value heads."""
    from transformers import MistralConfig, MistralForCausalLM

    config = MistralConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                           num_attention_heads=4, num_key_value_heads=2, sliding_window=7,
                           max_position_embeddings=256, attn_implementation=attn_implementation)
    torch.manual_seed(6)
    return MistralForCausalLM(config).eval()


def test_sliding_window_decoder_matches_eager():
    """Mistral (causal, sliding window 7, grouped key/value heads), left padding: logits and
    every parameter's gradient against transformers' eager attention."""
    ids, mask = padded_batch(97, 2, 40, seed=7, left=True)
    compare_implementations(tiny_mistral, ids, mask)


def test_full_attention_decoder_matches_eager():
    """Qwen2 without a sliding window: causal attention over the whole sequence."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    def make(impl):
        config = Qwen2Config(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                             num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=256,
                             attn_implementation=impl)
        torch.manual_seed(8)
        return Qwen2ForCausalLM(config).eval()

    ids, mask = padded_batch(97, 2, 33, seed=9)
    compare_implementations(make, ids, mask)


def test_local_attention_encoder_matches_eager():
    """ModernBERT: bidirectional, local attention (window 8) on every other layer, global on the rest."""
    from transformers import ModernBertConfig, ModernBertForMaskedLM

    def make(impl):
        config = ModernBertConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
                                  num_attention_heads=4, local_attention=16, global_attn_every_n_layers=2,
                                  max_position_embeddings=256, pad_token_id=0, attn_implementation=impl)
        torch.manual_seed(10)
        return ModernBertForMaskedLM(config).eval()

    ids, mask = padded_batch(97, 2, 45, seed=11)
    compare_implementations(make, ids, mask)


def test_training_step_runs():
    register()
    model = tiny_mixtral("moediffuseq").train()
    replace_moe_blocks(model)
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    ids, mask = padded_batch(101, 2, 24, seed=12)
    loss = model(input_ids=ids, attention_mask=mask, labels=ids).loss
    loss.backward()
    opt.step()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for n, p in model.named_parameters() if "embed" not in n or p.requires_grad)


class _Module(torch.nn.Module):
    is_causal = True


@pytest.mark.parametrize("case,kwargs,message", [
    ("4-D mask", dict(attention_mask=torch.zeros(1, 1, 8, 8, dtype=torch.bool)), r"4-D attention mask"),
    ("cross-attention", dict(key_len=3), r"query length 8 > key length 3"),
    ("softcap", dict(softcap=30.0), r"softcap is not supported"),
])
def test_attention_refuses_what_it_cannot_express(case, kwargs, message):
    q = torch.randn(1, 2, 8, 16)
    kv = torch.randn(1, 2, kwargs.pop("key_len", 8), 16)
    mask = kwargs.pop("attention_mask", None)
    with pytest.raises(ValueError, match=message):
        attention_forward(_Module(), q, kv, kv, mask, **kwargs)


def tiny_llama(attn_implementation="moediffuseq", seed=13):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=96, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                         attn_implementation=attn_implementation)
    torch.manual_seed(seed)
    return LlamaForCausalLM(config).eval()


@pytest.mark.parametrize("padded", [False, True], ids=["no-mask", "padding-mask"])
def test_attention_drop_in_compiles_without_graph_breaks(padded):
    """No data-dependent Python branch on the padding mask: zero graph breaks in dynamo's
    explain, and fullgraph=True compiles and gives the eager logits, with and without padding."""
    register()
    model = tiny_llama()
    ids, mask = padded_batch(97, 2, 24, seed=14)
    mask = mask if padded else None

    def logits(input_ids, attention_mask):
        return model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).logits

    explained = torch._dynamo.explain(logits)(ids, mask)
    assert explained.graph_break_count == 0, [str(b.reason)[:200] for b in explained.break_reasons]
    torch._dynamo.reset()
    compiled = torch.compile(logits, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(ids, mask), logits(ids, mask), atol=1e-6, rtol=1e-6)


def tiny_qwen2_moe():
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM

    config = Qwen2MoeConfig(vocab_size=101, hidden_size=64, intermediate_size=96, moe_intermediate_size=48,
                            shared_expert_intermediate_size=80, num_hidden_layers=2, num_attention_heads=4,
                            num_key_value_heads=2, num_experts=4, num_experts_per_tok=2, norm_topk_prob=False,
                            max_position_embeddings=256)
    torch.manual_seed(15)
    return Qwen2MoeForCausalLM(config).eval()


def test_a_block_without_a_gate_module_round_trips_its_state_dict():
    ffn = moe_block_from_hf(mixtral_block()).ffn
    block = MoEBlock(ffn)
    state = block.state_dict()
    assert sorted(state) == ["experts.down_proj", "experts.gate_up_proj", "gate.weight"]
    fresh = MoEBlock(MoEFeedForward(32, 48, 5, 2, activation="swiglu"))
    fresh.load_state_dict(state, strict=True)
    x = torch.randn(2, 7, 32, generator=torch.Generator().manual_seed(21))
    torch.testing.assert_close(fresh(x), block(x))


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_replaced_blocks_keep_hugging_face_names_save_load_and_restore(family, tmp_path):
    """After replace_moe_blocks: the state dict has transformers' names, layouts and values (the
    router once), save_pretrained works and transformers' from_pretrained reads it into a plain
    model, a transformers state dict loads strictly into a replaced model, and
    restore_moe_blocks puts transformers' blocks back with the current weights."""
    from moediffuseq.integrations.transformers import restore_moe_blocks

    make = (lambda: tiny_mixtral("eager")) if family == "mixtral" else tiny_qwen2_moe
    model = make()
    randomize(model, 16, std=0.1)
    ids = torch.randint(0, 101, (2, 19), generator=torch.Generator().manual_seed(17))
    with torch.no_grad():
        expect = model(ids).logits
        hf_state = {k: v.clone() for k, v in model.state_dict().items()}
        assert replace_moe_blocks(model) == 2
        state = model.state_dict()
        assert sorted(state) == sorted(hf_state)
        for name in state:
            assert torch.equal(state[name], hf_state[name]), name
        model.save_pretrained(tmp_path / "replaced")
        reloaded = type(model).from_pretrained(tmp_path / "replaced").eval()
        assert not any(isinstance(m, MoEBlock) for m in reloaded.modules())
        torch.testing.assert_close(reloaded(ids).logits, expect, atol=1e-5, rtol=1e-5)

        fresh = make()
        replace_moe_blocks(fresh)
        fresh.load_state_dict(hf_state, strict=True)
        torch.testing.assert_close(fresh(ids).logits, expect, atol=1e-5, rtol=1e-5)

        block = fresh.model.layers[1].mlp
        block.ffn.w1.mul_(1.5)  # changed after the replacement (trained): restored as it is now
        block.gate.weight.mul_(-1.0)
        x = torch.randn(2, 5, 64, generator=torch.Generator().manual_seed(18))
        changed = block(x)
        assert restore_moe_blocks(fresh) == 2
        assert not any(isinstance(m, MoEBlock) for m in fresh.modules())
        restored = fresh.model.layers[1].mlp
        assert type(restored).__name__.endswith("SparseMoeBlock")
        out = restored(x)
        torch.testing.assert_close(out[0] if isinstance(out, tuple) else out, changed, atol=1e-5, rtol=1e-5)
        assert sorted(fresh.state_dict()) == sorted(hf_state)
        fresh.save_pretrained(tmp_path / "restored")


def test_float16_attention_on_the_cpu_runs_like_transformers():
    """model.half() on the CPU, whose kernels take float32 and bfloat16: the attention drop-in
    computes in float32 and returns float16, within float16 rounding of transformers' own."""
    register()
    reference, ours = tiny_llama("eager").half(), tiny_llama("moediffuseq").half()
    ids, mask = padded_batch(97, 2, 24, seed=19)
    with torch.no_grad():
        expect = reference(input_ids=ids, attention_mask=mask).logits
        got = ours(input_ids=ids, attention_mask=mask).logits
    assert got.dtype == torch.float16
    keep = mask.bool()
    torch.testing.assert_close(got[keep], expect[keep], atol=2e-3, rtol=2e-3)


@pytest.mark.parametrize("family", ["mixtral", "qwen2_moe"])
def test_float16_moe_block_on_the_cpu_runs_like_transformers(family):
    block = (mixtral_block() if family == "mixtral" else qwen_block(True)).half()
    ours = moe_block_from_hf(block)
    x = torch.randn(3, 11, 32, generator=torch.Generator().manual_seed(20)).half()
    with torch.no_grad():
        expect, got = block(x), ours(x)
    expect = expect[0] if isinstance(expect, tuple) else expect
    assert got.dtype == torch.float16
    torch.testing.assert_close(got, expect, atol=2e-3, rtol=2e-3)


def test_without_transformers_register_names_the_extra(monkeypatch):
    """The [hf] extra brings transformers (pyproject.toml's optional dependencies, the one list
    moediffuseq.extras reads), and register() without it names the pip line."""
    import sys
    import tomllib

    from utils import ROOT

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    assert any(r.startswith("transformers") for r in extras["hf"])
    monkeypatch.setattr("moediffuseq.extras.extra_of_module", lambda: {"transformers": "hf"})  # as installed
    for name in [m for m in sys.modules if m == "transformers" or m.startswith("transformers.")] + ["transformers"]:
        monkeypatch.setitem(sys.modules, name, None)
    with pytest.raises(ModuleNotFoundError, match=r"""^this needs the optional package 'transformers': """
                                                  r"""pip install "moediffuseq\[hf\]"$"""):
        register()


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_cached_generate_gives_the_greedy_tokens_of_sdpa(family):
    """model.generate() with its KV cache: every decoding step's single query row runs against
    the cached keys (query_offset = L_k - 1), with left padding; Mistral's sliding window (7)
    is shorter than the prompt plus the new tokens."""
    register()
    make = tiny_llama if family == "llama" else tiny_mistral
    ids, mask = padded_batch(97, 2, 12, seed=3, left=True)
    tokens = {}
    for impl in ("sdpa", "moediffuseq"):
        with torch.no_grad():
            tokens[impl] = make(impl).generate(ids, attention_mask=mask, max_new_tokens=10, do_sample=False,
                                               pad_token_id=0)
    assert tokens["moediffuseq"].shape == (2, 22)
    assert torch.equal(tokens["moediffuseq"], tokens["sdpa"])
