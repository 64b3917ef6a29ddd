"""The pipeline and the model sampled whole: the same outputs as ``generate`` for the same seed,
the per-step callback, text in and text out from the command line."""
import dataclasses
import json

import pytest
import torch

from moediffuseq.cli import main
from moediffuseq.data import TextTokenizer
from moediffuseq.diffusion import NoiseSchedule
from moediffuseq.diffusion.samplers import SamplerConfig, sample
from moediffuseq.generate import GENERATION_FILE, GenerationConfig, generate
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.pipeline import MoEDiffuSeqPipeline

SOURCES = ["alpha beta", "gamma delta epsilon", "zeta", "eta theta iota kappa"]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    tok = TextTokenizer.train(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"] * 20, vocab_size=80)
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=24, n_layers=1, d_model=32, n_heads=2,
                                   d_emb=16, window=4, num_experts=2, d_expert=32, dropout=0.0)
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("pipe") / "model"
    MoEDiffuSeqPipeline(MoEDiffuSeq(cfg), tok, target_len=6).save_pretrained(directory)
    return directory


@pytest.mark.parametrize("sampler, steps, mbr, batch_size, seed, clamp, early_stop", [
    ("dpm++", 5, 1, 3, 1, False, 0), ("ddpm", 4, 3, 2, 7, False, 0), ("ddim", 3, 1, 16, 2, True, 1)])
def test_pipeline_gives_the_outputs_of_generate(model_dir, sampler, steps, mbr, batch_size, seed, clamp, early_stop):
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    model, tokenizer = MoEDiffuSeq.from_pretrained(model_dir), TextTokenizer.load(model_dir)
    cfg = GenerationConfig(SamplerConfig(sampler, steps, clamp, early_stop), mbr, batch_size, seed=seed)
    expected = generate(model, tokenizer, SOURCES, cfg, target_len=6)
    got = pipe(SOURCES, sampler=sampler, steps=steps, mbr=mbr, batch_size=batch_size, seed=seed, clamp=clamp,
               early_stop=early_stop, return_candidates=True)
    assert [(g.hypothesis, g.candidates) for g in got] == [(e.hypothesis, e.candidates) for e in expected]
    assert pipe(SOURCES, sampler=sampler, steps=steps, mbr=mbr, batch_size=batch_size, seed=seed, clamp=clamp,
                early_stop=early_stop) == [e.hypothesis for e in expected]


def test_callback_and_steps_watch_the_text_emerge_without_changing_it(model_dir):
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    seen = []
    plain = pipe(SOURCES, steps=4, batch_size=3)
    watched = pipe(SOURCES, steps=4, batch_size=3, return_steps=True,
                   callback=lambda step, t, texts: seen.append((step, t, texts)))
    assert [w.hypothesis for w in watched] == plain
    assert [s for s, _, _ in seen] == [1, 2, 3, 4] * 2  # the default ddpm with 4 steps: 4 model calls; 2 batches
    assert [len(texts) for _, _, texts in seen] == [3] * 4 + [1] * 4
    assert watched[0].steps == [texts[0] for _, _, texts in seen[:4]]
    assert watched[0].steps[-1] == watched[0].hypothesis
    assert watched[3].steps == [texts[0] for _, _, texts in seen[4:]]
    assert pipe("zeta", steps=4, batch_size=3) == pipe(["zeta"], steps=4, batch_size=3)[0]


def test_the_model_is_sampled_whole_through_forward(model_dir):
    """A sampler takes ``model.condition(...)``; every model call goes through ``forward``."""
    model = MoEDiffuSeq.from_pretrained(model_dir).eval()
    ids = torch.tensor([[1, 5, 6, 2, 0, 0, 0, 0]])
    target = torch.arange(8)[None] >= 4
    cond = model.condition(ids, target)
    assert torch.equal(cond.anchor, model.embed(ids)) and cond.m is model.m
    calls = []
    model.register_forward_hook(lambda module, args, out: calls.append(args[1]))
    with torch.inference_mode():
        result = sample(cond, NoiseSchedule.create("sqrt", 2000), SamplerConfig("ddim", 3),
                        generator=torch.Generator().manual_seed(0))
    assert len(calls) == result.steps_taken == 3
    assert torch.equal(result.x0[~target], cond.anchor[~target])
    x, t = torch.randn(1, 8, 16), torch.tensor([5])
    torch.testing.assert_close(cond.denoise(x, t), model(x, t, model.positions(ids, target))[0])


def test_from_pretrained_reads_the_target_length_and_checks_the_tokenizer(model_dir, tmp_path):
    assert json.loads((model_dir / GENERATION_FILE).read_text()) == {"target_len": 6, "target_span": None,
                                                                      "source_cache": False}
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    assert pipe.target_len == 6 and pipe.device == torch.device("cpu")
    bigger = MoEDiffuSeq(dataclasses.replace(pipe.model.config, vocab_size=len(pipe.tokenizer) + 1))
    with pytest.raises(ValueError, match="tokenizer has"):
        MoEDiffuSeqPipeline(bigger, pipe.tokenizer)


def test_generate_takes_text_in_and_gives_text_out(model_dir, tmp_path, capsys, monkeypatch):
    expected = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")(SOURCES[:2], steps=3)
    base = ["generate", "--model", str(model_dir), "--steps", "3", "--device", "cpu"]
    assert main([*base, "--text", SOURCES[0], "--text", SOURCES[1]]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    plain = tmp_path / "sources.txt"
    plain.write_text(f"{SOURCES[0]}\n\n{SOURCES[1]}\n")
    assert main([*base, "--input", str(plain)]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    monkeypatch.setattr("sys.stdin", plain.open())
    assert main([*base, "--input", "-"]) == 0
    assert capsys.readouterr().out.splitlines() == expected
    unlabeled = tmp_path / "unlabeled.jsonl"
    unlabeled.write_text("\n".join(json.dumps({"src": s}) for s in SOURCES[:2]) + "\n")
    out = tmp_path / "out.jsonl"
    assert main([*base, "--input", str(unlabeled), "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["hypothesis"] for r in records] == expected and "reference" not in records[0]
    capsys.readouterr()
    assert main(["evaluate", str(out)]) == 0
    assert "no references" in capsys.readouterr().out
    assert main([*base, "--text", SOURCES[0], "--show-steps"]) == 0
    captured = capsys.readouterr()
    alone = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")(SOURCES[:1], steps=3)  # its own noise draw
    assert captured.out.splitlines() == alone
    assert [line.split(":", 1)[0] for line in captured.err.splitlines()] == [
        f"step {i:3d} (t={t:4d})" for i, t in zip(range(1, 4), (1999, 1000, 0))]  # the default ddpm, 3 steps


def test_generation_files_hold_the_reference_decoded_from_its_ids(model_dir, tmp_path):
    """``evaluate`` scores ``reference``: it is normalised as the hypotheses are (decoded from
    token ids); the text as given stays beside it, labelled ``reference_raw``."""
    tok = TextTokenizer.load(model_dir)
    labeled = tmp_path / "labeled.jsonl"
    targets = ["alpha (beta), gamma!", "zeta"]
    labeled.write_text("\n".join(json.dumps({"src": s, "trg": t}) for s, t in zip(SOURCES, targets)) + "\n")
    out = tmp_path / "out.jsonl"
    assert main(["generate", "--model", str(model_dir), "--steps", "2", "--device", "cpu", "--input", str(labeled),
                 "--output", str(out)]) == 0
    records = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reference"] for r in records] == [tok.decode(tok.encode(t)) for t in targets]
    assert [r["reference_raw"] for r in records] == targets


@pytest.mark.parametrize("sampler", ["dpm++", "ddpm", "ddim"])
def test_a_self_conditioned_model_generates_with_every_sampler_and_mbr(tmp_path, sampler):
    tok = TextTokenizer.train(["alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"] * 20, vocab_size=80)
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=24, n_layers=1, d_model=32, n_heads=2,
                                   d_emb=16, window=4, num_experts=2, d_expert=32, dropout=0.0,
                                   self_conditioning=True)
    torch.manual_seed(0)
    model = MoEDiffuSeq(cfg)
    gen = GenerationConfig(SamplerConfig(sampler, 3), mbr=2, batch_size=3, seed=1)
    out = generate(model, tok, SOURCES, gen, target_len=6)
    assert len(out) == 4 and all(len(o.candidates) == 2 for o in out)
    assert [o.hypothesis for o in generate(model, tok, SOURCES, gen, target_len=6)] == [o.hypothesis for o in out]
    x = torch.randn(1, 24, 16)
    with pytest.raises(ValueError, match="self_conditioning"):
        MoEDiffuSeq(dataclasses.replace(cfg, self_conditioning=False))(x, torch.tensor([1]), None, x)


def test_dtype_takes_torch_dtypes_and_their_names(model_dir):
    from moediffuseq.generate import parse_dtype

    for names, dtype in (((torch.bfloat16, "bfloat16", "bf16", "torch.bfloat16", "BFloat16"), torch.bfloat16),
                         ((torch.float32, "float32", "fp32", "float", "torch.float32"), torch.float32),
                         ((torch.float16, "float16", "fp16", "half"), torch.float16)):
        assert all(parse_dtype(name) is dtype for name in names), names
    for bad in ("int8", torch.int8, "bf32", 16):
        with pytest.raises(ValueError, match="dtype must be one of float32, bfloat16 or float16"):
            parse_dtype(bad)
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    bf16 = pipe(SOURCES, num_inference_steps=2, dtype="bf16", return_candidates=True)
    for name in (torch.bfloat16, "bfloat16", "torch.bfloat16"):
        assert pipe(SOURCES, num_inference_steps=2, dtype=name, return_candidates=True) == bf16
    assert pipe(SOURCES, num_inference_steps=2, dtype=torch.float32) == pipe(SOURCES, num_inference_steps=2)
    with pytest.raises(ValueError, match="float16 is not supported on the CPU"):
        pipe(SOURCES, dtype=torch.float16)


def test_arguments_have_diffusers_names_and_the_old_ones_as_aliases(model_dir):
    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    expected = pipe(SOURCES, num_inference_steps=3, generator=7, batch_size=3)
    assert pipe(SOURCES, steps=3, seed=7, batch_size=3) == expected
    assert pipe(SOURCES, num_inference_steps=3, generator=torch.Generator().manual_seed(7), batch_size=3) == expected
    assert pipe(SOURCES, num_inference_steps=3, batch_size=3) == pipe(SOURCES, num_inference_steps=3, generator=0,
                                                                       batch_size=3)
    with pytest.raises(TypeError, match="give num_inference_steps or steps"):
        pipe(SOURCES, num_inference_steps=3, steps=3)
    with pytest.raises(TypeError, match="give generator or seed"):
        pipe(SOURCES, generator=1, seed=1)
    with pytest.raises(TypeError, match="generator must be an int seed or a torch.Generator"):
        pipe(SOURCES, generator="7")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_a_cuda_device_without_cuda_says_so(model_dir):
    for load in (lambda: MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cuda"),
                 lambda: MoEDiffuSeq.from_pretrained(model_dir, map_location="cuda")):
        with pytest.raises(ValueError, match=r"device 'cuda': CUDA is not available here \(.*\): use device='cpu'") \
                as error:
            load()
        assert "corrupt" not in str(error.value) and "\n" not in str(error.value)


def test_a_missing_optional_package_names_the_pip_line(model_dir, monkeypatch):
    import sys

    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    for name in [m for m in sys.modules if m == "nltk" or m.startswith("nltk.")] + ["nltk"]:
        monkeypatch.setitem(sys.modules, name, None)  # MBR scores its candidates with nltk's BLEU
    with pytest.raises(ModuleNotFoundError, match=r"""^this needs the optional package 'nltk': """
                                                  r"""pip install "moediffuseq\[eval\]"$"""):
        pipe(SOURCES, steps=2, mbr=2)


def test_all_empty_outputs_warn_with_the_reason(model_dir, tmp_path):
    from moediffuseq.pipeline import EmptyOutputWarning

    pipe = MoEDiffuSeqPipeline.from_pretrained(model_dir, device="cpu")
    with torch.no_grad():
        pipe.model.lm_head_bias[pipe.tokenizer.special.sep] = 1e4  # [SEP] first: every text ends at once
    with pytest.warns(EmptyOutputWarning, match=r"all 4 generated texts are empty: the model ends every text at "
                                                r"once, as an untrained or undertrained model does: train it longer"):
        assert pipe(SOURCES, num_inference_steps=2) == [""] * 4
    run = tmp_path / "run"
    pipe.save_pretrained(run / "model")
    (run / "run_config.json").write_text(json.dumps({"train": {"steps": 200, "warmup_steps": 500, "lr": 1e-4}}))
    with pytest.warns(EmptyOutputWarning, match=r"trained for 200 steps with a 500-step warm-up, so its learning "
                                                r"rate never reached 0.0001: train longer than the warm-up"):
        MoEDiffuSeqPipeline.from_pretrained(run / "model", device="cpu")(SOURCES, num_inference_steps=2)
