"""What the command says besides errors: --version, help text without markup, the note on a
warm-up longer than the run, plain progress lines with --no-progress, and the warnings on
generations that are all empty."""
import csv
import json

import pytest
import torch

import moediffuseq
from moediffuseq.cli import build_parser, main
from moediffuseq.model import MoEDiffuSeq
from utils import SMALL_MODEL_SET, write_reversal_corpus


def test_version(capsys):
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    assert done.value.code == 0
    assert capsys.readouterr().out.strip() == f"moediffuseq {moediffuseq.__version__} (torch {torch.__version__})"


def test_help_text_has_no_raw_markup():
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    for name, text in [("moediffuseq", parser.format_help())] + [(n, p.format_help()) for n, p in commands.items()]:
        assert "``" not in text, name


@pytest.fixture(scope="module")
def short_run(tmp_path_factory):
    """A 10-step run with the default 500-step warm-up and --no-progress, its plain lines printed
    at every log row (the interval set to 0); its model made to end every text at once."""
    root = tmp_path_factory.mktemp("short")
    corpus = write_reversal_corpus(root, {"train": 32, "valid": 8, "test": 4})
    out = root / "run"
    patch = pytest.MonkeyPatch()
    patch.setattr("moediffuseq.run_log.PLAIN_LOG_INTERVAL_S", 0.0, raising=False)
    import contextlib
    import io

    stdout = io.StringIO()
    with contextlib.redirect_stdout(stdout):
        rc = main(["train", "--data", str(corpus), "--out", str(out), "--seq-len", "24", "--vocab-size", "120",
                   *SMALL_MODEL_SET, "--steps", "10", "--batch-size", "8", "--lr", "3e-3", "--log-every", "5",
                   "--eval-every", "0", "--bleu-examples", "0", "--no-progress", "--device", "cpu"])
    patch.undo()
    assert rc == 0
    model = MoEDiffuSeq.from_pretrained(out / "model")
    with torch.no_grad():
        model.lm_head_bias[2] = 1e4  # [SEP] (id 2 in a trained tokenizer) first: every text ends at once
    model.save_pretrained(out / "model")
    return {"corpus": corpus, "out": out, "stdout": stdout.getvalue()}


def test_a_warm_up_longer_than_the_run_is_shortened_with_a_note(short_run):
    assert ("note: the warm-up (500 steps) is longer than the run (10 steps), so the learning rate would never "
            "reach 0.003: warm-up shortened to 1 steps, a tenth of the run (--warmup-steps sets it)"
            in short_run["stdout"])
    assert json.loads((short_run["out"] / "run_config.json").read_text())["train"]["warmup_steps"] == 1
    with open(short_run["out"] / "metrics.csv") as f:
        lrs = [float(r["lr"]) for r in csv.DictReader(f) if r["split"] == "train"]
    assert max(lrs) > 1e-3  # past the shortened warm-up, decaying from 3e-3; the 500-step one stays below 6e-5


def test_no_progress_prints_plain_lines(short_run):
    lines = [line for line in short_run["stdout"].splitlines() if line.startswith("step ")]
    assert [line.split()[1] for line in lines] == ["5/10", "10/10"]
    assert all(" loss " in line and " tokens/s " in line and " left " in line for line in lines)


def test_all_empty_generations_and_their_evaluation_warn(short_run, tmp_path, capsys):
    gens = tmp_path / "gens.jsonl"
    assert main(["generate", "--model", str(short_run["out"] / "model"), "--input",
                 str(short_run["corpus"] / "test.jsonl"), "--output", str(gens), "--steps", "2",
                 "--device", "cpu"]) == 0
    err = capsys.readouterr().err
    assert ("warning: all 4 generated texts are empty: it was trained for only 10 steps and ends every text at "
            "once: train it longer (--steps)") in err
    assert all(json.loads(line)["hypothesis"] == "" for line in gens.read_text().splitlines())
    assert main(["evaluate", str(gens)]) == 0
    err = capsys.readouterr().err
    assert err.strip().splitlines() == [f"warning: {gens}: all 4 hypotheses are empty, so every score is 0: the "
                                        "model that wrote them generated nothing (undertrained? generate says why)"]


def test_resume_keeps_the_warm_up_the_run_recorded(short_run, tmp_path, capsys):
    """The shortened warm-up is what run_config.json records, so --resume with the same options
    sees no change; a run recorded with the long warm-up (before it was shortened) keeps it."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(short_run["out"], out)
    argv = ["train", "--data", str(short_run["corpus"]), "--out", str(out), "--seq-len", "24", "--vocab-size", "120",
            *SMALL_MODEL_SET, "--steps", "10", "--batch-size", "8", "--lr", "3e-3", "--log-every", "5",
            "--eval-every", "0", "--bleu-examples", "0", "--no-progress", "--device", "cpu", "--resume"]
    assert main(argv) == 0, capsys.readouterr().err
    capsys.readouterr()
    record = json.loads((out / "run_config.json").read_text())
    record["train"]["warmup_steps"] = 500
    (out / "run_config.json").write_text(json.dumps(record))
    assert main(argv) == 0, capsys.readouterr().err
    assert "note: the warm-up" not in capsys.readouterr().out
