"""bench/sampler_quality.py (python -m bench.sampler_quality) on a small untrained model: the
table it writes, the sampler specs it takes, and its errors on bad specs and on a model directory
it cannot find the test data of."""
import json
import subprocess

import pytest
import torch

from moediffuseq.data import TextTokenizer
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.pipeline import MoEDiffuSeqPipeline
from utils import ROOT, bench_command

WORDS = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A training run's layout: RUN/model and RUN/run_config.json naming a data directory."""
    run = tmp_path_factory.mktemp("run")
    tok = TextTokenizer.train([WORDS] * 20, vocab_size=80)
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=24, n_layers=1, d_model=32, n_heads=2,
                                   d_emb=16, window=4, num_experts=2, d_expert=32, dropout=0.0)
    torch.manual_seed(0)
    MoEDiffuSeqPipeline(MoEDiffuSeq(cfg), tok, target_len=6).save_pretrained(run / "model")
    data = run / "data"
    data.mkdir()
    words = WORDS.split()
    (data / "test.jsonl").write_text("".join(json.dumps({"src": " ".join(words[i:i + 3]), "trg": words[i]}) + "\n"
                                             for i in range(5)))
    (run / "run_config.json").write_text(json.dumps({"data": {"data": str(data)}, "model": {}, "train": {}}))
    return run


def bench(*args, cwd=ROOT):
    return subprocess.run([*bench_command("bench.sampler_quality"), *map(str, args)], cwd=cwd,
                          capture_output=True, text=True, timeout=300)


def test_writes_one_row_per_sampler_against_the_last(run_dir, tmp_path):
    out = bench(run_dir / "model", "--samplers", "ddpm:3", "dpm++:2+clamp", "ddim:2", "--examples", 4,
                "--out", tmp_path)
    assert out.returncode == 0, out.stderr
    rows = json.loads((tmp_path / "sampler_quality.json").read_text())
    assert [r["sampler"] for r in rows] == ["ddpm:3", "dpm++:2+clamp", "ddim:2"]
    table = (tmp_path / "sampler_quality.md").read_text()
    assert "4 test sources of" in table and "one sample each" in table
    assert "within ddim:2's intervals" in table
    body = [line for line in table.splitlines() if line.startswith("| ddim:2 |")]
    assert len(body) == 1 and "| 1.0000 |" in body[0] and "| yes |" in body[0]  # the base is within itself
    for r in rows:
        for key in ("bleu", "rouge2", "rougeL"):
            assert r["iv"][key][0] <= r[key] <= r["iv"][key][1]


@pytest.mark.parametrize("spec, message", [("dpm++", "expected method:steps"), ("ddpm:ten", "expected method:steps"),
                                           ("euler:5", "sampler must be one of"), ("ddpm:0", "steps must be >= 1")])
def test_bad_sampler_specs_are_refused_before_any_work(run_dir, tmp_path, spec, message):
    out = bench(run_dir / "model", "--samplers", spec, "--out", tmp_path)
    assert out.returncode == 2 and message in out.stderr, out.stderr
    assert not (tmp_path / "sampler_quality.md").exists()


def test_a_model_outside_a_run_needs_data(tmp_path):
    lone = tmp_path / "lone"
    tok = TextTokenizer.train([WORDS] * 20, vocab_size=80)
    model = MoEDiffuSeq(MoEDiffuSeqConfig.preset("tiny", vocab_size=len(tok), max_len=24))
    MoEDiffuSeqPipeline(model, tok).save_pretrained(lone)
    out = bench(lone, "--samplers", "ddpm:2", "--out", tmp_path)
    assert out.returncode != 0 and "run_config.json" in out.stderr and "--data" in out.stderr, out.stderr
