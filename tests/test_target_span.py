"""The bounded target span, source isolation and sampling with a source cache: packing, the
model's positions, that an isolated source does not see the target, and that cached sampling is
the uncached sampling of the same model."""
import json
import warnings

import pytest
import torch

from moediffuseq.cli import main
from moediffuseq.data import Seq2SeqDataset, TextTokenizer, pack, pack_source
from moediffuseq.data.jsonl import Example
from moediffuseq.data.tokenizer import SpecialIds
from moediffuseq.diffusion import NoiseSchedule, diffusion_loss
from moediffuseq.diffusion.samplers import SamplerConfig, sample
from moediffuseq.fields import ConfigError
from moediffuseq.generate import GENERATION_FILE, GenerationConfig, generate
from moediffuseq.hub import model_card
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.pipeline import MoEDiffuSeqPipeline

SP = SpecialIds(pad=0, cls=1, sep=2, unk=3)
V = 60


def test_pack_with_a_span_puts_the_target_on_the_last_positions():
    ids, start = pack([10, 11, 12], [20, 21], 12, SP, span=5)
    assert start == 7
    assert ids == [1, 10, 11, 12, 2, 0, 0, 20, 21, 2, 0, 0]
    src_ids, src_start = pack_source([10, 11, 12], 12, 99, SP, span=5)
    assert src_start == 7 and src_ids == [1, 10, 11, 12, 2] + [0] * 7  # target_len does not cut a span's source


def test_pack_with_a_span_truncates_each_side_to_its_own_room():
    ids, start = pack(list(range(10, 30)), list(range(40, 50)), 12, SP, span=4)
    assert start == 8 and len(ids) == 12
    assert ids[:8] == [1, 10, 11, 12, 13, 14, 15, 2]  # 12 - 4 - 2 = 6 source tokens
    assert ids[8:] == [40, 41, 42, 2]  # span - 1 = 3 target tokens and the target's [SEP]
    assert pack([5], [6], 12, SP, span=9)[0] == [1, 5, 2, 6, 2] + [0] * 7  # the largest span: 12 - 3


@pytest.mark.parametrize("span", [1, 10, -2])
def test_a_span_without_room_for_a_source_is_refused(span):
    with pytest.raises(ValueError, match="target_span must be between 2 and seq_len - 3 = 9"):
        pack([5], [6], 12, SP, span=span)
    with pytest.raises(ConfigError, match="target_span"):
        MoEDiffuSeqConfig.preset("tiny", max_len=12, target_span=span)


def test_isolation_with_a_capacity_factor_is_refused():
    with pytest.raises(ConfigError, match="source_isolation needs dropless experts"):
        MoEDiffuSeqConfig.preset("tiny", source_isolation=True, capacity_factor=1.0)


def test_dataset_counts_what_a_span_truncates():
    tok = TextTokenizer.train(["a b c d e f g h"] * 10, vocab_size=40)
    examples = [Example("a b c", "d e"), Example("a b c d e f g h a b c d", "e"), Example("a", "b c d e f g")]
    data = Seq2SeqDataset(examples, tok, 16, span=5)  # source room 16 - 5 - 2 = 9, target room 4
    assert data.truncated_sources == 1 and data.truncated == 2
    assert (data.target_start == 11).all()
    assert data.batch([0, 1]).target_mask[:, 11:].all() and not data.batch([0, 1]).target_mask[:, :11].any()


def span_model(attention="sparse", isolation=True, span=12, max_len=40, window=4, **kw):
    torch.manual_seed(0)
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=V, max_len=max_len, target_span=span,
                                   source_isolation=isolation, attention=attention, window=window, dropout=0.0,
                                   diffusion_steps=100, **kw)
    return MoEDiffuSeq(cfg).eval()


def span_batch(L=40, T=12, lengths=(5, 20, 26), seed=0):
    """Sources of different lengths, their own padding up to L - T, an all-padding span."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(4, V, (len(lengths), L), generator=g)
    ids[:, L - T:] = 0
    for b, n in enumerate(lengths):
        ids[b, 0], ids[b, n + 1] = 1, 2
        ids[b, n + 2:L - T] = 0
    target = torch.zeros(len(lengths), L, dtype=torch.bool)
    target[:, L - T:] = True
    return ids, target


@pytest.mark.parametrize("attention", ["sparse", "dense"])
def test_positions_mask_the_source_padding_and_isolate_the_source(attention):
    model = span_model(attention)
    ids, target = span_batch()
    pos = model.positions(ids, target)
    assert torch.equal(pos.key_padding_mask, ~target & (ids == 0))
    assert pos.key_padding_mask[0, 7:28].all() and not pos.key_padding_mask[:, 28:].any()
    assert pos.source_lengths.tolist() == [28, 28, 28]
    assert (pos.global_mask is None) == (attention == "dense")
    plain = span_model(attention, isolation=False).positions(ids, target)
    assert plain.source_lengths is None and plain.key_padding_mask is not None
    diffuseq = MoEDiffuSeq(MoEDiffuSeqConfig.preset("tiny", vocab_size=V, max_len=40)).positions(ids, target)
    assert diffuseq.key_padding_mask is None and diffuseq.source_lengths is None  # DiffuSeq's layout as before


@pytest.mark.parametrize("attention", ["sparse", "dense"])
@pytest.mark.parametrize("self_conditioning", [False, True])
def test_an_isolated_source_depends_on_the_source_alone(attention, self_conditioning):
    model = span_model(attention, self_conditioning=self_conditioning)
    ids, target = span_batch()
    pos = model.positions(ids, target)
    x = model.embed(ids).detach().clone()
    x[:, 28:] = torch.randn(3, 12, model.config.d_emb)
    changed = x.clone()
    changed[:, 28:] = torch.randn(3, 12, model.config.d_emb)
    with torch.no_grad():
        a = model(x, torch.tensor([5, 50, 99]), pos, torch.randn_like(x) if self_conditioning else None)[0]
        b = model(changed, torch.tensor([0, 7, 3]), pos, torch.randn_like(x) if self_conditioning else None)[0]
        assert torch.equal(a[:, :28], b[:, :28])  # other target, other step, other estimate: same source rows
        assert not torch.allclose(a[:, 28:], b[:, 28:])
        # without isolation the source sees the step and the target
        plain = span_model(attention, isolation=False, self_conditioning=self_conditioning)
        pp = plain.positions(ids, target)
        c = plain(x, torch.tensor([5, 50, 99]), pp, torch.randn_like(x) if self_conditioning else None)[0]
        d = plain(changed, torch.tensor([0, 7, 3]), pp, torch.randn_like(x) if self_conditioning else None)[0]
        assert not torch.allclose(c[:, :28], d[:, :28])


@pytest.mark.parametrize("attention", ["sparse", "dense"])
@pytest.mark.parametrize("pre_ln", [False, True])
def test_the_span_run_against_the_cache_is_the_span_of_the_whole_run(attention, pre_ln):
    model = span_model(attention, pre_ln=pre_ln)
    ids, target = span_batch()
    pos = model.positions(ids, target, torch.tensor([3, 5, 11]))
    x = model.embed(ids).detach().clone()
    x[:, 28:] = torch.randn(3, 12, model.config.d_emb)
    t = torch.tensor([5, 50, 99])
    with torch.no_grad():
        whole = model(x, t, pos)[0]
        cache = model.encode_source(ids, pos)
        for _ in range(2):  # the cache is read, not changed, by the span's calls
            span = model.denoise_span(x[:, 28:], t, pos, cache)
            torch.testing.assert_close(span, whole[:, 28:], atol=2e-6, rtol=1e-5)


def test_long_form_output_with_windows_on_the_target():
    """T = 1024: the span is longer than the window, so target rows see only part of the target."""
    L, T = 1100, 1024
    model = span_model("sparse", span=T, max_len=L, window=16, n_layers=1)
    ids, target = span_batch(L, T, lengths=(30, 70))
    pos = model.positions(ids, target, torch.tensor([600, 1023]))
    x = model.embed(ids).detach().clone()
    x[:, L - T:] = torch.randn(2, T, model.config.d_emb)
    t = torch.tensor([10, 90])
    with torch.no_grad():
        whole = model(x, t, pos)[0]
        span = model.denoise_span(x[:, L - T:], t, pos, model.encode_source(ids, pos))
    torch.testing.assert_close(span, whole[:, L - T:], atol=2e-6, rtol=1e-5)


@pytest.mark.parametrize("method", ["ddpm", "ddim", "dpm++"])
def test_cached_sampling_is_uncached_sampling(method):
    model = span_model("sparse")
    ids, target = span_batch()
    schedule = NoiseSchedule.create("sqrt", 100)
    budget = torch.tensor([4, 4, 4])
    with torch.no_grad():
        runs = [sample(model.condition(ids, target, None, budget, source_cache=cached), schedule,
                       SamplerConfig(method, 6), generator=torch.Generator().manual_seed(3))
                for cached in (False, True)]
    whole, span = runs[0].x0, runs[1].x0
    assert span.shape == (3, 12, model.config.d_emb)
    torch.testing.assert_close(span, whole[:, 28:], atol=1e-5, rtol=1e-5)
    assert runs[0].steps_taken == runs[1].steps_taken


def test_isolated_training_never_noises_the_source():
    model = span_model("sparse")
    ids, target = span_batch()
    schedule = NoiseSchedule.create("sqrt", 100)
    seen = []
    model.register_forward_pre_hook(lambda m, args: seen.append(args[0].detach().clone()))
    terms = diffusion_loss(model, schedule, ids, target, torch.tensor([1, 50, 99]),
                           generator=torch.Generator().manual_seed(0))
    terms.loss.backward()
    torch.testing.assert_close(seen[0][:, :28], model.embed(ids)[:, :28].detach(), atol=0, rtol=0)
    assert not torch.allclose(seen[0][:, 28:], model.embed(ids)[:, 28:].detach())


WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu"
SOURCES = ["alpha beta", "gamma delta epsilon zeta eta", WORDS + " " + WORDS, "iota"]


@pytest.fixture(scope="module")
def span_model_dir(tmp_path_factory):
    tok = TextTokenizer.train([WORDS] * 20, vocab_size=80)
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=28, target_span=8, source_isolation=True,
                                   n_layers=2, d_model=32, n_heads=2, d_emb=16, window=3, num_experts=2,
                                   d_expert=32, dropout=0.0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("span") / "model"
    MoEDiffuSeqPipeline(MoEDiffuSeq(cfg), tok, target_len=5).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("mbr, batch_size, method", [(1, 3, "ddpm"), (3, 16, "dpm++")])
def test_generate_with_and_without_the_cache_gives_the_same_text(span_model_dir, mbr, batch_size, method):
    model, tok = MoEDiffuSeq.from_pretrained(span_model_dir), TextTokenizer.load(span_model_dir)
    calls = []
    encode = model.encode_source
    model.encode_source = lambda *a: calls.append(1) or encode(*a)
    outputs = {}
    for cached in (True, False):
        cfg = GenerationConfig(SamplerConfig(method, 5), mbr, batch_size, seed=4, source_cache=cached)
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            outputs[cached] = [(g.hypothesis, g.candidates) for g in generate(model, tok, SOURCES, cfg, 5)]
    assert outputs[True] == outputs[False]
    assert len(calls) == -(-len(SOURCES) // batch_size)  # one source pass per batch, shared by the MBR samples


def test_a_truncated_source_is_said_once_per_call(span_model_dir):
    model, tok = MoEDiffuSeq.from_pretrained(span_model_dir), TextTokenizer.load(span_model_dir)
    long = sum(len(ids) > 18 for ids in tok.encode_batch(SOURCES))
    assert 0 < long < len(SOURCES)
    with pytest.warns(UserWarning, match=rf"{long} of 4 source\(s\) longer than max_len - target_span - 2 = 18") as seen:
        generate(model, tok, SOURCES, GenerationConfig(SamplerConfig(steps=2), batch_size=2), 5)
    assert len([w for w in seen if "truncated" in str(w.message)]) == 1


def test_a_cache_for_a_model_without_isolation_is_refused(tmp_path):
    tok = TextTokenizer.train([WORDS] * 20, vocab_size=80)
    for overrides in (dict(target_span=8), dict(source_isolation=True)):
        cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=28, n_layers=1, d_model=32, n_heads=2,
                                       d_emb=16, window=3, num_experts=2, d_expert=32, **overrides)
        model = MoEDiffuSeq(cfg)
        with pytest.raises(ValueError, match="source_cache needs a model trained with source_isolation and a "
                                             "target_span"):
            generate(model, tok, ["alpha"], GenerationConfig(SamplerConfig(steps=2), source_cache=True), 5)
        generate(model, tok, ["alpha"], GenerationConfig(SamplerConfig(steps=2)), 5)  # the default: no cache


def test_pipeline_cli_and_records_follow_the_span(span_model_dir, capsys):
    record = json.loads((span_model_dir / GENERATION_FILE).read_text())
    assert record == {"target_len": 5, "target_span": 8, "source_cache": True}
    card = model_card(span_model_dir, "user/span")
    assert "| target_span | 8 |" in card and "| source_isolation | True |" in card
    pipe = MoEDiffuSeqPipeline.from_pretrained(span_model_dir, device="cpu")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        cached = pipe(SOURCES, steps=3, seed=1)
        assert pipe(SOURCES, steps=3, seed=1, source_cache=False) == cached
        for flags in ([], ["--no-source-cache"]):
            main(["generate", "--model", str(span_model_dir), "--steps", "3", "--seed", "1", "--device", "cpu",
                  *[a for s in SOURCES for a in ("--text", s)], *flags])
            assert capsys.readouterr().out.splitlines() == cached


def test_readme_long_document_block_runs(tmp_path, monkeypatch):
    """The README's long-document commands, shrunk as tests/test_readme_cli.py shrinks its block."""
    import re
    import shlex

    from test_readme_cli import SMALL_GENERATE, SMALL_MODEL, SMALL_TRAIN
    from utils import README

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEDIFFUSEQ_CACHE", str(tmp_path / "cache"))
    section = README.read_text().split("### Long documents", 1)[1]
    block = re.findall(r"```bash\n(.*?)```", section, flags=re.S)[0]
    commands = [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]
    assert [c[1] for c in commands] == ["train", "generate", "generate"]
    outputs = []
    for argv in commands:
        args = argv[1:]
        if args[0] == "train":
            args += SMALL_TRAIN + SMALL_MODEL + ["--set", "target_span=8"]
        else:
            args += SMALL_GENERATE
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the sources are truncated to the small model's length
            assert main(args) == 0, argv
    model = MoEDiffuSeq.from_pretrained(tmp_path / "runs/aclsum/model")
    assert model.config.target_span == 8 and model.config.source_isolation
    assert (tmp_path / "runs/aclsum/test.jsonl").is_file()
