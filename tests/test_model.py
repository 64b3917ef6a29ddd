"""The MoE-DiffuSeq model: shapes, gradients everywhere, learning, save/load."""
import dataclasses
import json

import pytest
import torch

from moediffuseq.diffusion import NoiseSchedule, diffusion_loss
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig


def tiny(**kw):
    return MoEDiffuSeqConfig.preset("tiny", vocab_size=120, max_len=48, window=8, **kw)


def batch(B=4, L=48, V=120, seed=0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, V, (B, L), generator=g)
    ids[:, 0] = 1
    ids[:, 20] = 2
    target = torch.zeros(B, L, dtype=torch.bool)
    target[:, 21:] = True
    return ids, target


@pytest.mark.parametrize("overrides", [dict(), dict(attention="dense"), dict(ffn="dense"), dict(pre_ln=True),
                                       dict(soft_absorbing=False, gamma=0.0)])
def test_shapes_and_every_parameter_gets_a_gradient(overrides):
    torch.manual_seed(0)
    model = MoEDiffuSeq(tiny(**overrides))
    ids, target = batch()
    schedule = NoiseSchedule.create("sqrt", 2000)
    terms = diffusion_loss(model, schedule, ids, target, torch.tensor([0, 5, 999, 1999]))
    assert terms.per_example.shape == (4,) and terms.loss.dim() == 0
    terms.loss.backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and p.grad.abs().sum() > 0, name
    if model.config.soft_absorbing:
        assert isinstance(model.m, torch.nn.Parameter)


def test_denoise_shapes_and_global_mask():
    model = MoEDiffuSeq(tiny())
    ids, target = batch(B=2)
    g = model.global_mask(ids, target)
    assert g[:, 0].all() and g[:, 20].all() and g[:, 21:].all() and not g[:, 5].any()
    x0, aux = model(torch.randn(2, 48, 64), torch.tensor([3, 7]), model.positions(ids, target))
    assert x0.shape == (2, 48, 64) and aux.dim() == 0
    with pytest.raises(ValueError, match="exceeds max_len"):
        model(torch.randn(1, 49, 64), torch.tensor([0]))


def test_a_few_steps_reduce_the_loss():
    torch.manual_seed(0)
    model = MoEDiffuSeq(tiny(dropout=0.0))
    ids, target = batch(B=8)
    schedule = NoiseSchedule.create("sqrt", 2000)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3)
    t = torch.arange(8) * 250

    def loss():
        return diffusion_loss(model, schedule, ids, target, t, generator=torch.Generator().manual_seed(1)).loss

    first = loss().item()
    for _ in range(30):
        opt.zero_grad()
        loss().backward()
        opt.step()
    assert loss().item() < 0.7 * first


def test_save_and_load_round_trip(tmp_path):
    torch.manual_seed(0)
    model = MoEDiffuSeq(tiny()).eval()
    model.save_pretrained(tmp_path)
    loaded = MoEDiffuSeq.from_pretrained(tmp_path).eval()
    assert loaded.config == model.config
    for (n1, p1), (n2, p2) in zip(model.state_dict().items(), loaded.state_dict().items()):
        assert n1 == n2 and torch.equal(p1, p2)
    x, t = torch.randn(2, 48, 64), torch.tensor([1, 2])
    assert torch.equal(model(x, t)[0], loaded(x, t)[0])


def test_corrupt_checkpoints_are_named(tmp_path):
    MoEDiffuSeq(tiny()).save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(ValueError, match="corrupt or not a safetensors file"):
        MoEDiffuSeq.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{broken")
    with pytest.raises(ValueError, match="not a valid MoE-DiffuSeq config"):
        MoEDiffuSeq.from_pretrained(tmp_path)
    other = tmp_path / "other"
    MoEDiffuSeq(tiny()).save_pretrained(other)
    cfg = json.loads((other / "config.json").read_text())
    cfg["d_model"] = 64
    (other / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match="does not match the config"):
        MoEDiffuSeq.from_pretrained(other)
    with pytest.raises(FileNotFoundError, match="no config.json"):
        MoEDiffuSeq.from_pretrained(tmp_path / "missing")


def test_presets_and_bad_config():
    base = MoEDiffuSeqConfig.preset("base")
    assert (base.n_layers, base.d_model, base.n_heads, base.num_experts, base.top_k, base.d_expert) == (12, 768, 12, 8, 2, 1536)
    dense = MoEDiffuSeqConfig.preset("diffuseq")
    assert dense.attention == "dense" and dense.ffn == "dense" and dense.d_ff == 3072 and not dense.soft_absorbing
    with pytest.raises(ValueError, match="preset must be one of"):
        MoEDiffuSeqConfig.preset("huge")
    with pytest.raises(ValueError, match="unknown config fields"):
        MoEDiffuSeqConfig.preset("tiny", layers=3)
    with pytest.raises(ValueError, match="divisible"):
        MoEDiffuSeqConfig(d_model=100, n_heads=12)


def test_from_pretrained_checks_the_config_against_the_weights_before_building(tmp_path, monkeypatch):
    """A config.json asking for a huge model is refused from the weights file's header, before a
    single layer is built (n_layers = 1000000 would otherwise try to allocate hundreds of GB)."""
    import moediffuseq.model as model_module

    MoEDiffuSeq(tiny()).save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["n_layers"] = 1_000
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    built = []
    real = model_module.DenoiserLayer.__init__

    def counted(self, *args, **kwargs):
        built.append(1)
        assert len(built) <= 10, "from_pretrained builds the layers of an unchecked config"
        real(self, *args, **kwargs)

    monkeypatch.setattr(model_module.DenoiserLayer, "__init__", counted)
    with pytest.raises(ValueError, match=r"n_layers=1000 but the weights hold 2 layers"):
        MoEDiffuSeq.from_pretrained(tmp_path)
    assert not built


def test_weights_with_nan_or_inf_are_refused(tmp_path):
    model = MoEDiffuSeq(tiny())
    with torch.no_grad():
        model.layers[0].ln1.weight[3] = float("inf")
    model.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"'layers.0.ln1.weight' holds NaN or inf"):
        MoEDiffuSeq.from_pretrained(tmp_path)


# one bad value per field of MoEDiffuSeqConfig, with the start of the error that names it
BAD_CONFIG_VALUES = {
    "vocab_size": (0, "vocab_size must be >= 1, got 0"),
    "max_len": (4, "max_len must be >= 5, got 4"),
    "target_span": (126, r"target_span \(126\) must be <= max_len - 3 = 125"),
    "source_isolation": ("yes", "source_isolation must be true or false"),
    "d_emb": (2.5, "d_emb must be an integer"),
    "d_model": (-8, "d_model must be >= 1, got -8"),
    "n_layers": ("abc", "n_layers must be an integer >= 1, got the string 'abc'"),
    "n_heads": (0, "n_heads must be >= 1, got 0"),
    "attention": ("full", "attention must be one of"),
    "window": (-1, "window must be >= 0, got -1"),
    "dilation": (0, "dilation must be >= 1, got 0"),
    "global_target_max": (-3, "global_target_max must be >= 0, got -3"),
    "ffn": ("sparse", "ffn must be one of"),
    "num_experts": (0, "num_experts must be >= 1, got 0"),
    "top_k": (5, r"top_k \(5\) must be <= num_experts \(4\)"),
    "d_expert": (0, "d_expert must be >= 1, got 0"),
    "d_ff": (None, "d_ff must be an integer"),
    "activation": ("relu6", "activation must be one of"),
    "capacity_factor": (0.0, "capacity_factor must be"),
    "dropout": (float("nan"), "dropout must be a finite number"),
    "pre_ln": ("yes", "pre_ln must be true or false"),
    "soft_absorbing": (2, "soft_absorbing must be true or false"),
    "gamma": (1.5, "gamma must be"),
    "schedule": ("cubic", "schedule must be one of"),
    "diffusion_steps": (0, "diffusion_steps must be >= 1, got 0"),
    "mse_target_only": ("no", "mse_target_only must be true or false"),
    "nll_target_only": (1.0, "nll_target_only must be true or false"),
    "self_conditioning": ("true", "self_conditioning must be true or false"),
    "load_balance_weight": (-0.1, "load_balance_weight must be"),
    "z_loss_weight": (float("inf"), "z_loss_weight must be a finite number"),
    "m_weight": (-1.0, "m_weight must be"),
    "special_ids": ((1, 500), r"special_ids hold 500, not < vocab_size \(120\)"),
    "pad_id": (500, r"pad_id \(500\) must be < vocab_size"),
}


def test_the_bad_values_cover_every_config_field():
    assert set(BAD_CONFIG_VALUES) == {f.name for f in dataclasses.fields(MoEDiffuSeqConfig)}


@pytest.mark.parametrize("field", list(BAD_CONFIG_VALUES))
def test_every_config_field_is_checked(field):
    value, why = BAD_CONFIG_VALUES[field]
    with pytest.raises(ValueError, match=why):
        MoEDiffuSeqConfig.preset("tiny", **{"vocab_size": 120, field: value})


def test_the_global_target_span_does_not_depend_on_the_padding_at_4096():
    """A 250-token target of a 1000-token source padded to L = 4096: its 250 positions are
    global (METHOD §3: the target tokens, up to global_target_max), not its ~3000 of padding;
    a 700-token target gets its first 512; at generation the budget stands for |y|."""
    model = MoEDiffuSeq(MoEDiffuSeqConfig.preset("tiny", vocab_size=120, max_len=4096, n_layers=1))
    L, n_src = 4096, 1000
    ids = torch.zeros(3, L, dtype=torch.long)
    ids[:, 0], ids[:, 1:n_src + 1], ids[:, n_src + 1] = 1, 7, 2  # [CLS] src [SEP]
    start = n_src + 2
    for row, n_trg in ((0, 250), (1, 700)):
        ids[row, start:start + n_trg] = 9
        ids[row, start + n_trg] = 2  # the target's closing [SEP]
    target = torch.zeros(3, L, dtype=torch.bool)
    target[:, start:] = True
    g = model.global_mask(ids, target)
    assert g[:, 0].all() and g[:, n_src + 1].all() and not g[:, 1:n_src + 1].any()
    assert g[0, start:start + 251].all() and not g[0, start + 251:].any()
    assert g[1, start:start + 512].all() and not g[1, start + 512:].any()
    assert g[2, start:start + 512].all()  # only padding (generation without a budget): the span up to 512
    budget = model.global_mask(ids, target, torch.tensor([251, 600, 40]))
    assert budget[0].equal(g[0]) and budget[1].equal(g[1]) and int(budget[2, start:].sum()) == 40


def test_nll_over_all_positions_by_default_and_target_only_as_an_option():
    """METHOD §5 (and the reference code): the decoder nll averages over every position."""
    from torch.nn import functional as F

    torch.manual_seed(0)
    ids, target = batch(B=2)
    schedule = NoiseSchedule.create("sqrt", 2000)
    for target_only in (False, True):
        model = MoEDiffuSeq(tiny(dropout=0.0, nll_target_only=target_only))
        gen = torch.Generator().manual_seed(3)
        terms = diffusion_loss(model, schedule, ids, target, torch.tensor([5, 900]), generator=gen)
        x0 = model.embed(ids) + (1 - float(schedule.alphas_cumprod[0])) ** 0.5 * torch.randn(
            model.embed(ids).shape, generator=torch.Generator().manual_seed(3))
        nll = F.cross_entropy(model.logits(x0).transpose(1, 2), ids, reduction="none")  # (B, L)
        expected = nll[:, 21:].mean(-1) if target_only else nll.mean(-1)
        torch.testing.assert_close(terms.nll, expected.detach())


def test_moe_loss_weights_are_config_fields():
    model = MoEDiffuSeq(tiny(load_balance_weight=0.5, z_loss_weight=0.0))
    ffn = model.layers[0].ffn
    assert (ffn.load_balance_weight, ffn.z_loss_weight) == (0.5, 0.0)
    with pytest.raises(ValueError, match="load_balance_weight"):
        tiny(load_balance_weight=-1.0)
    with pytest.raises(ValueError, match="z_loss_weight"):
        tiny(z_loss_weight="big")
