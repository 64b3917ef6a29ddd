"""Training end to end on a small corpus: CLI train / resume / generate / evaluate, exact resume
after an interruption, checkpoint round trip and errors, and data-parallel training (torchrun)."""
import csv
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moediffuseq.checkpoint import checkpoint_step, find_checkpoint, read_state
from moediffuseq.cli import main
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.train import TrainConfig, Trainer, lr_factor
from utils import SMALL_MODEL_SET, write_reversal_corpus


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """Reverse a short list of words: 96 training, 16 validation and 16 test examples."""
    return write_reversal_corpus(tmp_path_factory.mktemp("corpus"), {"train": 96, "valid": 16, "test": 16})


def train_argv(corpus, out, steps=6, *extra):
    return ["train", "--data", str(corpus), "--out", str(out), "--seq-len", "24", "--vocab-size", "120",
            *SMALL_MODEL_SET, "--steps", str(steps), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2",
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


@pytest.mark.parametrize("options", [[], ["--bf16"], ["--grad-accum", "2"]], ids=["fp32", "bf16", "grad-accum"])
def test_resume_after_interrupt_continues_exactly(corpus, tmp_path, monkeypatch, options):
    """On the CPU, in one process: fp32, bf16 autocast, and gradient accumulation over 2 batches."""
    straight = tmp_path / "straight"
    assert main(train_argv(corpus, straight, 6, *options)) == 0

    interrupted = tmp_path / "interrupted"
    real_step = Trainer.train_step

    def step_then_interrupt(self):
        if self.step == 4:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(train_argv(corpus, interrupted, 6, *options)) == 130  # Ctrl-C: checkpoint of step 4
    assert read_state(find_checkpoint(interrupted / "checkpoint"))["step"] == 4
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(train_argv(corpus, interrupted, 6, *options, "--resume")) == 0
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
    assert main(train_argv(corpus, out, 4, "--resume", "--allow-change")) == 2
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


def test_bad_configuration_is_named(corpus, tmp_path, capsys):
    assert main(train_argv(corpus, tmp_path / "x", 2, "--set", "n_layer=3")) == 2
    assert "unknown config fields" in capsys.readouterr().err
    assert main(["train", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "y"), "--device", "cpu"]) == 2
    assert "neither a built-in corpus" in capsys.readouterr().err
    config = tmp_path / "bad.yaml"
    config.write_text("model: [1, 2\n")
    assert main(train_argv(corpus, tmp_path / "z", 2, "--config", str(config))) == 2
    assert "not valid YAML" in capsys.readouterr().err
    with pytest.raises(ValueError, match="lr_decay"):
        TrainConfig(lr_decay="step")
    assert not any((tmp_path / name).exists() for name in "xyz")  # refused before anything was written


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
                             *train_argv(corpus, out, 4, "--timestep-draw", "loss-aware")],
                            env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "2 process(es)" in result.stdout
    losses = train_losses(out)
    assert [s for s, _ in losses] == [1, 2, 3, 4] and all(torch.isfinite(torch.tensor(l)) for _, l in losses)
    MoEDiffuSeq.from_pretrained(out / "model")


def test_bf16_autocast_and_loss_aware_steps_train(corpus, tmp_path):
    out = tmp_path / "bf16"
    assert main(train_argv(corpus, out, 4, "--bf16", "--timestep-draw", "loss-aware", "--grad-accum", "2")) == 0
    losses = train_losses(out)
    assert len(losses) == 4 and all(torch.isfinite(torch.tensor(l)) for _, l in losses)
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["bf16"] is True


# ---------------------------------------------------------------------- never lose a user's run

def snapshot(out):
    """Every file of a run folder and its bytes."""
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*")) if p.is_file()}


def final_weights(out):
    return MoEDiffuSeq.from_pretrained(out / "model").state_dict()


def same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def straight_run(corpus, tmp_path_factory):
    """The uninterrupted 6-step run the interrupted ones must equal."""
    out = tmp_path_factory.mktemp("straight") / "run"
    assert main(train_argv(corpus, out, 6)) == 0
    return out


def test_train_into_an_existing_run_is_refused_unless_resume_or_overwrite(corpus, straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    before = snapshot(out)
    assert main(train_argv(corpus, out, 6)) == 2
    err = capsys.readouterr().err
    assert "already holds a training run" in err and "--resume" in err and "--overwrite" in err
    assert snapshot(out) == before  # nothing touched
    (out / "notes.txt").write_text("mine")
    assert main(train_argv(corpus, out, 4, "--overwrite")) == 0
    assert [s for s, _ in train_losses(out)] == [1, 2, 3, 4]  # a new run, nothing left of the old one
    assert (out / "notes.txt").read_text() == "mine"  # files that are not the run's stay
    assert main(train_argv(corpus, out, 4, "--resume", "--overwrite")) == 2
    assert "exclude each other" in capsys.readouterr().err


@pytest.mark.parametrize("moment", ["data", "backward", "update"])
def test_ctrl_c_inside_a_step_checkpoints_that_step_and_resumes_exactly(corpus, straight_run, tmp_path, monkeypatch,
                                                                        moment):
    """SIGINT arriving in the middle of step 4 (after the batch is drawn, after the backward, after
    the optimizer update): the checkpoint holds a completed step and the resumed run equals the
    uninterrupted one bit for bit."""
    from moediffuseq.data.dataset import BatchStream

    out = tmp_path / "run"
    state = {"trainer": None}
    where = {"data": (BatchStream, "next"), "backward": (Trainer, "_update_timestep_draw"),
             "update": (Trainer, "_update_ema")}[moment]
    real = getattr(*where)
    real_step = Trainer.train_step

    def remember(self):
        state["trainer"] = self
        return real_step(self)

    def interrupting(self, *args):
        if state["trainer"] is not None and state["trainer"].step == 3:
            state["trainer"] = None
            os.kill(os.getpid(), signal.SIGINT)
        return real(self, *args)

    monkeypatch.setattr(Trainer, "train_step", remember)
    monkeypatch.setattr(*where, interrupting)
    assert main(train_argv(corpus, out, 6)) == 130
    assert read_state(find_checkpoint(out / "checkpoint"))["step"] == 4
    monkeypatch.undo()
    assert main(train_argv(corpus, out, 6, "--resume")) == 0
    assert train_losses(out) == train_losses(straight_run)
    assert same_weights(final_weights(out), final_weights(straight_run))


def test_ctrl_c_in_the_final_validation_loses_nothing(corpus, straight_run, tmp_path, monkeypatch):
    out = tmp_path / "run"
    real = Trainer.validation_loss

    def interrupted_at_the_end(self):
        if self.step == 6:
            raise KeyboardInterrupt
        return real(self)

    monkeypatch.setattr(Trainer, "validation_loss", interrupted_at_the_end)
    assert main(train_argv(corpus, out, 6)) == 130
    assert read_state(find_checkpoint(out / "checkpoint"))["step"] == 6  # the final step is saved first
    monkeypatch.undo()
    assert main(train_argv(corpus, out, 6, "--resume")) == 0
    assert same_weights(final_weights(out), final_weights(straight_run))
    rows = [(r["step"], r["split"], r["loss"], r["bleu"]) for r in csv.DictReader(open(out / "metrics.csv"))]
    straight = [(r["step"], r["split"], r["loss"], r["bleu"]) for r in csv.DictReader(open(straight_run / "metrics.csv"))]
    assert rows == straight  # the final validation ran once, after the resume


def test_a_run_without_validation_loss_finishes(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, 3, "--eval-batches", "0")) == 0
    assert (out / "model" / "model.safetensors").is_file()
    valid = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "valid"]
    assert [r["step"] for r in valid] == ["3"] and valid[0]["loss"] == "" and valid[0]["bleu"] != ""


def test_a_diverged_run_never_overwrites_the_last_good_checkpoint(corpus, tmp_path, capsys):
    out = tmp_path / "run"
    argv = train_argv(corpus, out, 12, "--lr", "1e4", "--clip-grad", "0", "--save-every", "1", "--eval-every", "0")
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "step" in err and "the last good checkpoint is" in err, err
    directory = find_checkpoint(out / "checkpoint")
    for name in ("model", "ema"):
        weights = MoEDiffuSeq.from_pretrained(directory / name).state_dict()  # refuses NaN / inf
        assert all(torch.isfinite(w).all() for w in weights.values())
    good = read_state(directory)["step"]
    assert f"(step {good})" in err and not (out / "model").exists()
    # the good checkpoint resumes (and, being the same run, stops at the same step with the same message)
    assert main([*argv, "--resume"]) == 2
    assert capsys.readouterr().err.strip() == err


def test_resume_refuses_a_changed_configuration_unless_allowed(corpus, straight_run, tmp_path, capsys):
    out = tmp_path / "run"
    shutil.copytree(straight_run, out)
    before = snapshot(out)
    assert main(train_argv(corpus, out, 6, "--resume", "--lr", "1e-2")) == 2
    assert "lr (0.003 -> 0.01)" in capsys.readouterr().err
    assert main(train_argv(corpus, out, 8, "--resume", "--lr", "1e-2", "--set", "dropout=0.0")) == 2
    err = capsys.readouterr().err
    assert "lr (0.003 -> 0.01)" in err and "dropout (0.1 -> 0.0)" in err and "steps (6 -> 8)" in err
    assert "--allow-change" in err and snapshot(out) == before
    assert main(train_argv(corpus, out, 6, "--resume", "--no-progress", "--keep-checkpoints", "2")) == 0  # not results
    assert main(train_argv(corpus, out, 8, "--resume", "--allow-change")) == 0
    assert [s for s, _ in train_losses(out)] == list(range(1, 9))
    assert json.loads((out / "run_config.json").read_text())["train"]["steps"] == 8
    assert json.loads((out / "checkpoint" / "train_config.json").read_text())["steps"] == 8


def test_resume_of_a_run_killed_before_its_first_checkpoint_starts_over(corpus, straight_run, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    shutil.copy(straight_run / "run_config.json", out)  # the run had started, nothing else was written
    assert main(train_argv(corpus, out, 6, "--resume")) == 0
    assert same_weights(final_weights(out), final_weights(straight_run))


def test_keep_checkpoints_keeps_history(corpus, tmp_path):
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, 6, "--save-every", "1", "--keep-checkpoints", "3")) == 0
    kept = sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint"))
    assert kept == ["checkpoint", "checkpoint-00000004", "checkpoint-00000005"]
    assert read_state(out / "checkpoint-00000004")["step"] == 4
    shutil.rmtree(out / "checkpoint")
    assert find_checkpoint(out / "checkpoint") == out / "checkpoint-00000005"


def test_stale_temporary_checkpoints_are_removed(tmp_path):
    from moediffuseq.checkpoint import save_checkpoint

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True,
                          text=True).stdout.strip()
    (tmp_path / f".checkpoint.tmp-{dead}" / "model").mkdir(parents=True)  # left by a killed process
    (tmp_path / f".checkpoint.tmp-{os.getppid()}").mkdir()  # a live process's write in progress
    save_checkpoint(tmp_path / "checkpoint", lambda d: (d / "x").write_text("1"))
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".checkpoint.tmp-{os.getppid()}", "checkpoint"]


def test_an_interrupted_export_leaves_no_partial_model(corpus, straight_run, tmp_path, monkeypatch):
    from moediffuseq.data import TextTokenizer

    out = tmp_path / "run"
    real = TextTokenizer.save

    def interrupted(self, directory):
        if Path(directory).name == "model" or Path(directory).name.startswith(".model.tmp"):
            raise KeyboardInterrupt
        return real(self, directory)

    monkeypatch.setattr(TextTokenizer, "save", interrupted)
    assert main(train_argv(corpus, out, 6)) == 130
    assert not (out / "model").exists()
    monkeypatch.undo()
    assert main(train_argv(corpus, out, 6, "--resume")) == 0
    assert same_weights(final_weights(out), final_weights(straight_run))
    assert not [p for p in out.iterdir() if p.name.startswith(".")]  # no temporary directory left


def test_no_loss_plot_is_announced_without_matplotlib(corpus, tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib -> ImportError
    out = tmp_path / "run"
    assert main(train_argv(corpus, out, 2)) == 0
    assert not (out / "loss.png").exists() and "loss plot" not in capsys.readouterr().out


def test_resume_with_self_conditioning_continues_exactly(corpus, tmp_path, monkeypatch):
    """The self-conditioning coin comes from the trainer's generator: a resumed run is bit-identical."""
    sc = ["--set", "self_conditioning=true"]
    straight = tmp_path / "straight"
    assert main(train_argv(corpus, straight, 6, *sc)) == 0
    interrupted = tmp_path / "interrupted"
    real_step = Trainer.train_step

    def step_then_interrupt(self):
        if self.step == 3:
            raise KeyboardInterrupt
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", step_then_interrupt)
    assert main(train_argv(corpus, interrupted, 6, *sc)) == 130
    monkeypatch.setattr(Trainer, "train_step", real_step)
    assert main(train_argv(corpus, interrupted, 6, *sc, "--resume")) == 0
    assert train_losses(interrupted) == train_losses(straight)
    a = MoEDiffuSeq.from_pretrained(straight / "model").state_dict()
    b = MoEDiffuSeq.from_pretrained(interrupted / "model").state_dict()
    assert "self_cond_up.weight" in a and all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_exports_the_weights_of_the_best_validation(corpus, tmp_path):
    out = tmp_path / "best"
    assert main(train_argv(corpus, out, 6, "--keep-best")) == 0
    best = json.loads((out / "best_model" / "best.json").read_text())
    rows = [r for r in csv.DictReader(open(out / "metrics.csv")) if r["split"] == "valid"]
    assert best["metric"] == "bleu" and best["value"] == max(float(r["bleu"]) for r in rows)
    assert best["step"] == next(int(r["step"]) for r in rows if float(r["bleu"]) == best["value"])
    a = MoEDiffuSeq.from_pretrained(out / "model").state_dict()
    b = MoEDiffuSeq.from_pretrained(out / "best_model").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_keep_best_holds_the_ema_weights_of_the_best_step(corpus, tmp_path, monkeypatch):
    """best_model/ (and the exported model/) hold the EMA weights of the step whose validation was
    best, compared with that step's kept checkpoint, when the best is not the last step."""
    bleu_at = {3: 0.9, 6: 0.1}  # the best validation at step 3 of 6
    monkeypatch.setattr(Trainer, "validation_bleu", lambda self: bleu_at[self.step])
    out = tmp_path / "best"
    assert main(train_argv(corpus, out, 6, "--keep-best", "--keep-checkpoints", "2")) == 0
    assert json.loads((out / "best_model" / "best.json").read_text())["step"] == 3
    at_3 = out / "checkpoint-00000003"
    assert checkpoint_step(at_3) == 3 and checkpoint_step(out / "checkpoint") == 6
    ema_3 = MoEDiffuSeq.from_pretrained(at_3 / "ema").state_dict()
    ema_6 = MoEDiffuSeq.from_pretrained(out / "checkpoint" / "ema").state_dict()
    assert any(not torch.equal(ema_3[k], ema_6[k]) for k in ema_3)  # the two steps are told apart
    for name in ("best_model", "model"):
        kept = MoEDiffuSeq.from_pretrained(out / name).state_dict()
        assert kept.keys() == ema_3.keys()
        assert all(torch.equal(kept[k], ema_3[k]) for k in kept), name
