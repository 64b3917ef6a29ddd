"""Training end to end on a small corpus: CLI train / resume / generate / evaluate, exact resume
after an interruption, checkpoint round trip and errors, and data-parallel training (torchrun)."""
import csv
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from moediffuseq.checkpoint import find_checkpoint, read_state
from moediffuseq.cli import main
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.train import TrainConfig, Trainer, lr_factor

MODEL_SET = ["--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "d_emb=16",
             "--set", "window=4", "--set", "num_experts=2", "--set", "d_expert=32", "--set", "diffusion_steps=100"]


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Reverse a short list of words: 96 training, 16 validation and 16 test examples."""
    directory = tmp_path_factory.mktemp("corpus")
    g = torch.Generator().manual_seed(0)
    words = "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu".split()
    for split, n in (("train", 96), ("valid", 16), ("test", 16)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for _ in range(n):
                seq = [words[i] for i in torch.randint(0, len(words), (int(torch.randint(2, 6, (1,), generator=g)),),
                                                       generator=g)]
                f.write(json.dumps({"src": " ".join(seq), "trg": " ".join(reversed(seq))}) + "\n")
    return directory


def train_argv(corpus, out, steps=6, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--seq-len", "24", "--vocab-size", "120",
            *MODEL_SET, "--steps", str(steps), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
            "--log-every", "1", "--eval-every", "3", "--save-every", "3", "--bleu-examples", "4",
            "--no-progress", "--device", "cpu", *extra]


def train_losses(out):
    with open(out / "metrics.csv") as f:
        return [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["split"] == "train"]


def test_cli_train_generate_evaluate(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out)) == 0
    for name in ("model/model.safetensors", "model/config.json", "model/tokenizer.json", "model/generation.json",
                 "checkpoint/trainer_state.pt", "metrics.csv", "loss.png"):
        assert (out / name).is_file(), name
    steps = [s for s, _ in train_losses(out)]
    assert steps == [1, 2, 3, 4, 5, 6]
    rows = list(csv.DictReader(open(out / "metrics.csv")))
    valid = [r for r in rows if r["split"] == "valid"]
    assert [int(r["step"]) for r in valid] == [3, 6] and all(r["bleu"] != "" for r in valid)
    gens = tmp_path / "gens.jsonl"
    assert main(["generate", "--model", str(out / "model"), "--input", str(corpus / "test.jsonl"), "--output",
                 str(gens), "--mbr", "2", "--batch-size", "5", "--device", "cpu"]) == 0
    records = [json.loads(line) for line in gens.read_text().splitlines()]
    assert len(records) == 16 and all(len(r["candidates"]) == 2 and r["hypothesis"] in r["candidates"]
                                      for r in records)
    metrics_file = tmp_path / "metrics.json"
    assert main(["evaluate", str(gens), "--json", str(metrics_file)]) == 0
    metrics = json.loads(metrics_file.read_text())["gens"]
    assert 0 <= metrics["bleu"] <= 1 and metrics["self_bleu"] is not None and metrics["div4"] is not None
    assert "| gens |" in capsys.readouterr().out


def test_resume_after_interrupt_continues_exactly(corpus, tmp_path, monkeypatch):
    straight = tmp_path / "straight"
    assert main(train_argv(corpus, straight, 6)) == 0

    interrupted = tmp_path / "interrupted"
    real_step = Trainer.train_step

    def step_then_interrupt(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(train_argv(corpus, interrupted, 6)) == 130  # Ctrl-C: checkpoint of step 4
    assert read_state(find_checkpoint(interrupted / "checkpoint"))["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(train_argv(corpus, interrupted, 6, "--resume")) == 0
    assert train_losses(interrupted) == train_losses(straight)  # bit-identical losses after the resume
    a = MoEDiffuSeq.from_pretrained(straight / "model").state_dict()
    b = MoEDiffuSeq.from_pretrained(interrupted / "model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoint_errors(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, 3, "--resume")) == 2
    assert "no checkpoint" in capsys.readouterr().err
    assert main(train_argv(corpus, out, 3)) == 0
    state = out / "checkpoint" / "trainer_state.pt"
    state.write_bytes(state.read_bytes()[:100])
    assert main(train_argv(corpus, out, 4, "--resume")) == 2
    assert "corrupt" in capsys.readouterr().err
    weights = out / "model" / "model.safetensors"
    weights.write_bytes(b"\x00" * 16)
    assert main(["generate", "--model", str(out / "model"), "--input", str(corpus / "test.jsonl"), "--output",
                 str(tmp_path / "g.jsonl"), "--device", "cpu"]) == 2
    assert "corrupt or not a safetensors file" in capsys.readouterr().err


def test_interrupted_checkpoint_swap_keeps_the_previous_one(tmp_path):
    (tmp_path / "checkpoint.old").mkdir()
    torch.save({"step": 7}, tmp_path / "checkpoint.old" / "trainer_state.pt")
    assert find_checkpoint(tmp_path / "checkpoint") == tmp_path / "checkpoint.old"


def test_bad_configuration_is_named(corpus, tmp_path):
    with pytest.raises(SystemExit, match="unknown config fields"):
        main(train_argv(corpus, tmp_path / "x", 2, "--set", "n_layer=3"))
    with pytest.raises(SystemExit, match="neither a built-in corpus"):
        main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y")])
    config = tmp_path / "bad.yaml"
    config.write_text("model: [1, 2\n")
    with pytest.raises(SystemExit, match="not valid YAML"):
        main(train_argv(corpus, tmp_path / "z", 2, "--config", str(config)))
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")


def test_config_file_and_flags(corpus, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"preset": "tiny", "model": {"n_layers": 2}, "train": {"steps": 2, "lr": 1e-2}}))
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, 3, "--config", str(config))) == 0  # the flag wins over the file
    assert len(train_losses(out)) == 3
    assert json.loads((out / "model" / "config.json").read_text())["n_layers"] == 1  # --set wins too
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["lr"] == 3e-3


def test_learning_rate_schedule():
    cfg = TrainConfig(steps=100, warmup_steps=10)
    assert lr_factor(0, cfg) == pytest.approx(0.1) and lr_factor(9, cfg) == 1.0
    assert lr_factor(55, cfg) == pytest.approx(0.5) and lr_factor(100, cfg) == 0.0
    cos = TrainConfig(steps=100, warmup_steps=0, lr_decay="cosine")
    assert lr_factor(50, cos) == pytest.approx(0.5)


@pytest.mark.skipif(shutil.which("torchrun") is None and not os.path.exists(os.path.join(os.path.dirname(
    sys.executable), "torchrun")), reason="torchrun not installed")
def test_torchrun_two_processes_gloo(corpus, tmp_path):
    out = tmp_path / "ddp"
    torchrun = os.path.join(os.path.dirname(sys.executable), "torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    result = subprocess.run([torchrun, "--standalone", "--nproc_per_node=2", "-m", "moediffuseq",
                             *train_argv(corpus, out, 4, "--timestep-sampler", "loss-aware")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(l)) for _, l in losses)
    MoEDiffuSeq.from_pretrained(out / "model")


def test_bf16_autocast_and_loss_aware_steps_train(corpus, tmp_path):
    out = tmp_path / "bf16"
    assert main(train_argv(corpus, out, 4, "--bf16", "--timestep-sampler", "loss-aware", "--grad-accum", "2")) == 0
    losses = train_losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(l)) for _, l in losses)
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["bf16"] is True
