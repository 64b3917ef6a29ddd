"""The training entry in Python (``moediffuseq.train_run.run``), fine-tuning with ``init_from``
(Python and ``--init-from``), and the demo built on it without importing the CLI."""
import json
import subprocess
import sys

import torch

from moediffuseq.cli import main
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.train import TrainConfig
from moediffuseq.train_run import TrainingRun, run

SHAPE = dict(max_len=24, n_layers=1, d_model=32, n_heads=2, d_emb=16, window=4, num_experts=2, d_expert=32,
             diffusion_steps=100)


def corpus(directory):
    words = "alpha beta gamma delta epsilon zeta".split()
    lines = [json.dumps({"src": f"{words[i % 6]} {words[(i + 1) % 6]}", "trg": words[(i + 2) % 6]}) for i in range(24)]
    for split in ("train", "valid"):
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def train_config(**overrides):
    return TrainConfig(**{**dict(steps=2, batch_size=8, warmup_steps=1, eval_every=0, bleu_examples=0,
                                 save_every=0, progress=False), **overrides})


def test_run_trains_and_init_from_starts_from_the_weights(tmp_path):
    data = corpus(tmp_path)
    first = run(TrainingRun(str(data), tmp_path / "first", MoEDiffuSeqConfig.preset("tiny", **SHAPE), train_config(),
                            vocab_size=60, device="cpu"))
    trained = MoEDiffuSeq.from_pretrained(first)
    # a new run from the trained weights with a learning rate too small to move them: its first EMA
    # (a 0.1 / 0.9 mix of the start and the updated weights) is the start
    tuned = run(TrainingRun(str(data), tmp_path / "tuned", train=train_config(steps=1, lr=1e-12), device="cpu",
                            init_from=first))
    assert MoEDiffuSeq.from_pretrained(tuned).config == trained.config
    for (name, a), b in zip(trained.state_dict().items(), MoEDiffuSeq.from_pretrained(tuned).state_dict().values()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    record = json.loads((tmp_path / "tuned" / "run_config.json").read_text())
    assert record["data"]["init_from"] == str(first.resolve())
    assert (tmp_path / "tuned" / "tokenizer.json").read_text() == (first / "tokenizer.json").read_text()
    # the CLI twin: --init-from with a training field changed, the model's own config kept
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "cli"), "--init-from", str(first),
                 "--steps", "1", "--batch-size", "8", "--set", "dropout=0.0", "--no-progress", "--device", "cpu"]) == 0
    cli = MoEDiffuSeq.from_pretrained(tmp_path / "cli" / "model").config
    assert cli.dropout == 0.0 and cli.n_layers == trained.config.n_layers and cli.max_len == 24


def test_the_demo_does_not_import_the_cli():
    code = "import sys, moediffuseq.demo, moediffuseq.train_run; print('moediffuseq.cli' in sys.modules)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "False"
