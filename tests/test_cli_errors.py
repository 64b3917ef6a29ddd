"""Bad values for every option of every command: one ``error:`` line on stderr naming the option
or field, exit status 2, no traceback, and no file the user had is changed or removed."""
import json
import math
import subprocess
import sys

import pytest
import torch

from moediffuseq.cli import build_parser, main
from moediffuseq.data import TextTokenizer
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """A corpus, a trained-looking model directory and generations, shared by the cases."""
    root = tmp_path_factory.mktemp("cli")
    corpus = root / "corpus"
    corpus.mkdir()
    lines = [json.dumps({"src": f"alpha beta {i}", "trg": f"gamma {i}"}) for i in range(16)]
    for split in ("train", "valid", "test"):
        (corpus / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    tok = TextTokenizer.train(["alpha beta gamma delta"] * 10, vocab_size=60)
    tok.save(root)
    model_dir = root / "model"
    cfg = MoEDiffuSeqConfig.preset("tiny", vocab_size=tok.vocab_size, max_len=16, n_layers=1, d_model=16, n_heads=2,
                                   d_emb=8, window=2, num_experts=2, d_expert=16)
    torch.manual_seed(0)
    MoEDiffuSeq(cfg).save_pretrained(model_dir)
    tok.save(model_dir)
    empty_gen = root / "model-empty-generation-json"
    MoEDiffuSeq(cfg).save_pretrained(empty_gen)
    tok.save(empty_gen)
    (empty_gen / "generation.json").write_text("{}")
    nan_model = root / "model-nan"
    broken = MoEDiffuSeq(cfg)
    with torch.no_grad():
        broken.input_up[0].weight[0, 0] = math.nan
    broken.save_pretrained(nan_model)
    tok.save(nan_model)
    gens = {}
    for name, record in {"ok": {"reference": "a b", "hypothesis": "a b", "candidates": ["a b", "a c"]},
                         "string-candidates": {"reference": "a", "hypothesis": "a", "candidates": "abc"},
                         "null-reference": {"reference": None, "hypothesis": "a"}}.items():
        gens[name] = root / f"{name}.jsonl"
        gens[name].write_text(json.dumps(record) + "\n")
    (root / "afile").write_text("not a directory")
    (root / "adir").mkdir()
    (root / "bad.yaml").write_text("train: [1\n")
    (root / "lr-text.json").write_text(json.dumps({"train": {"lr": "fast"}}))
    (root / "model-section.yaml").write_text("model: [1, 2]\n")
    return {"root": root, "corpus": corpus, "model": model_dir, "empty_gen": empty_gen, "nan_model": nan_model,
            **gens}


def train(f, *extra):
    return ["train", "--data", str(f["corpus"]), "--out", str(f["root"] / "run"), "--device", "cpu", *extra]


def generate(f, *extra, model=None, input=None, output=None):
    return ["generate", "--model", str(model or f["model"]), "--input", str(input or f["corpus"] / "test.jsonl"),
            "--output", str(output or f["root"] / "out.jsonl"), "--device", "cpu", *extra]


def evaluate(f, *extra, gens=None):
    return ["evaluate", *(str(g) for g in (gens or [f["ok"]])), *extra]


def demo(f, *extra):
    return ["demo", "--out", str(f["root"] / "demo"), "--device", "cpu", *extra]


# (command, option, argv builder, what the message must name)
CASES = [
    ("train", "--data", lambda f: train(f, "--data", str(f["root"] / "nowhere")), "--data"),
    ("train", "--out", lambda f: train(f, "--out", str(f["root"] / "afile")), "--out"),
    ("train", "--preset", lambda f: train(f, "--preset", "huge"), "--preset"),
    ("train", "--config", lambda f: train(f, "--config", str(f["root"] / "missing.yaml")), "--config"),
    ("train", "--config", lambda f: train(f, "--config", str(f["root"] / "bad.yaml")), "--config"),
    ("train", "--config", lambda f: train(f, "--config", str(f["root"] / "lr-text.json")), "train.lr"),
    ("train", "--config", lambda f: train(f, "--config", str(f["root"] / "model-section.yaml")), "model section"),
    ("train", "--set", lambda f: train(f, "--set", "n_layers=abc"), "n_layers"),
    ("train", "--set", lambda f: train(f, "--set", "n_heads=0"), "n_heads"),
    ("train", "--set", lambda f: train(f, "--set", "window=-1"), "window"),
    ("train", "--set", lambda f: train(f, "--set", "dropout=1.5"), "dropout"),
    ("train", "--set", lambda f: train(f, "--set", "attention=flash"), "attention"),
    ("train", "--set", lambda f: train(f, "--set", "top_k=9"), "top_k"),
    ("train", "--set", lambda f: train(f, "--set", "vocab_size=10"), "vocab_size"),
    ("train", "--set", lambda f: train(f, "--set", "pad_id=5"), "pad_id"),
    ("train", "--set", lambda f: train(f, "--set", "n_layers"), "--set"),
    ("train", "--set", lambda f: train(f, "--set", "n_layer=2"), "n_layer"),
    ("train", "--seq-len", lambda f: train(f, "--seq-len", "0"), "--seq-len"),
    ("train", "--seq-len", lambda f: train(f, "--seq-len", "abc"), "--seq-len"),
    ("train", "--tokenizer", lambda f: train(f, "--tokenizer", str(f["root"] / "none.json")), "--tokenizer"),
    ("train", "--vocab-size", lambda f: train(f, "--vocab-size", "2"), "--vocab-size"),
    ("train", "--tokenizer-kind", lambda f: train(f, "--tokenizer-kind", "unigram"), "--tokenizer-kind"),
    ("train", "--max-train-examples", lambda f: train(f, "--max-train-examples", "-1"), "--max-train-examples"),
    ("train", "--skip-bad-lines", lambda f: train(f, "--skip-bad-lines=1"), "--skip-bad-lines"),
    ("train", "--device", lambda f: train(f, "--device", "cuda:99"), "--device"),
    ("train", "--device", lambda f: train(f, "--device", "gpu"), "--device"),
    ("train", "--resume", lambda f: train(f, "--resume"), "--resume"),
    ("train", "--overwrite", lambda f: train(f, "--resume", "--overwrite"), "--overwrite"),
    ("train", "--allow-change", lambda f: train(f, "--allow-change"), "--allow-change"),
    ("train", "--init-from", lambda f: train(f, "--init-from", str(f["root"] / "nowhere")), "--init-from"),
    ("train", "--init-from", lambda f: train(f, "--init-from", str(f["model"]), "--set", "d_model=64"), "--init-from"),
    ("train", "--init-from", lambda f: train(f, "--init-from", str(f["model"]), "--preset", "tiny"), "--init-from"),
    ("train", "--steps", lambda f: train(f, "--steps", "0"), "--steps"),
    ("train", "--batch-size", lambda f: train(f, "--batch-size", "0"), "--batch-size"),
    ("train", "--grad-accum", lambda f: train(f, "--grad-accum", "-2"), "--grad-accum"),
    ("train", "--lr", lambda f: train(f, "--lr", "-1"), "--lr"),
    ("train", "--lr", lambda f: train(f, "--lr", "nan"), "--lr"),
    ("train", "--lr", lambda f: train(f, "--lr", "fast"), "--lr"),
    ("train", "--weight-decay", lambda f: train(f, "--weight-decay", "-0.1"), "--weight-decay"),
    ("train", "--warmup-steps", lambda f: train(f, "--warmup-steps", "-1"), "--warmup-steps"),
    ("train", "--lr-decay", lambda f: train(f, "--lr-decay", "step"), "--lr-decay"),
    ("train", "--clip-grad", lambda f: train(f, "--clip-grad", "-1"), "--clip-grad"),
    ("train", "--ema-decay", lambda f: train(f, "--ema-decay", "1.5"), "--ema-decay"),
    ("train", "--bf16", lambda f: train(f, "--bf16=yes"), "--bf16"),
    ("train", "--timestep-draw", lambda f: train(f, "--timestep-draw", "lossy"), "--timestep-draw"),
    ("train", "--seed", lambda f: train(f, "--seed", "-1"), "--seed"),
    ("train", "--log-every", lambda f: train(f, "--log-every", "0"), "--log-every"),
    ("train", "--eval-every", lambda f: train(f, "--eval-every", "-1"), "--eval-every"),
    ("train", "--eval-batches", lambda f: train(f, "--eval-batches", "-1"), "--eval-batches"),
    ("train", "--bleu-examples", lambda f: train(f, "--bleu-examples", "-1"), "--bleu-examples"),
    ("train", "--save-every", lambda f: train(f, "--save-every", "-5"), "--save-every"),
    ("train", "--keep-checkpoints", lambda f: train(f, "--keep-checkpoints", "0"), "--keep-checkpoints"),
    ("train", "--progress", lambda f: train(f, "--progress=2"), "--progress"),
    ("train", "--keep-best", lambda f: train(f, "--keep-best=yes"), "--keep-best"),
    ("generate", "--model", lambda f: generate(f, model=f["root"] / "nowhere"), "nowhere"),
    ("generate", "--model", lambda f: generate(f, model=f["empty_gen"]), "generation.json"),
    ("generate", "--model", lambda f: generate(f, model=f["nan_model"]), "NaN"),
    ("generate", "--input", lambda f: generate(f, input=f["root"] / "none.jsonl"), "none.jsonl"),
    ("generate", "--input", lambda f: generate(f, input=f["root"] / "adir"), "--input"),
    ("generate", "--input", lambda f: generate(f, input="pycode:training"), "--input"),
    ("generate", "--output", lambda f: generate(f, output=f["root"] / "adir"), "--output"),
    ("generate", "--output", lambda f: generate(f, input=f["ok"], output=f["ok"]), "--output"),
    ("generate", "--sampler", lambda f: generate(f, "--sampler", "euler"), "--sampler"),
    ("generate", "--steps", lambda f: generate(f, "--steps", "0"), "--steps"),
    ("generate", "--mbr", lambda f: generate(f, "--mbr", "0"), "--mbr"),
    ("generate", "--clamp", lambda f: generate(f, "--clamp=1"), "--clamp"),
    ("generate", "--early-stop", lambda f: generate(f, "--early-stop", "-1"), "--early-stop"),
    ("generate", "--batch-size", lambda f: generate(f, "--batch-size", "0"), "--batch-size"),
    ("generate", "--target-len", lambda f: generate(f, "--target-len", "0"), "--target-len"),
    ("generate", "--limit", lambda f: generate(f, "--limit", "-1"), "--limit"),
    ("generate", "--seed", lambda f: generate(f, "--seed", "-3"), "--seed"),
    ("generate", "--device", lambda f: generate(f, "--device", "cuda:99"), "--device"),
    ("generate", "--dtype", lambda f: generate(f, "--dtype", "int8"), "--dtype"),
    ("generate", "--dtype", lambda f: generate(f, "--dtype", "fp16"), "--dtype: dtype float16 is not supported on "
     "the CPU, whose kernels take float32 and bfloat16: use bf16 or fp32"),
    ("generate", "--dtype", lambda f: generate(f, "--dtype", "torch.float16"), "use bf16 or fp32"),
    ("generate", "--skip-bad-lines", lambda f: generate(f, "--skip-bad-lines=yes"), "--skip-bad-lines"),
    ("generate", "--text", lambda f: generate(f, "--text", "alpha"), "--text"),
    ("generate", "--text", lambda f: ["generate", "--model", str(f["model"]), "--text", "  ", "--device", "cpu"],
     "--text"),
    ("generate", "--input", lambda f: ["generate", "--model", str(f["model"]), "--device", "cpu"], "--input"),
    ("generate", "--show-steps", lambda f: generate(f, "--show-steps=1"), "--show-steps"),
    ("generate", "no_source_cache", lambda f: generate(f, "--no-source-cache=1"), "--no-source-cache"),
    ("evaluate", "generations", lambda f: evaluate(f, gens=[f["root"] / "none.jsonl"]), "none.jsonl"),
    ("evaluate", "generations", lambda f: evaluate(f, gens=[f["string-candidates"]]), "'candidates'"),
    ("evaluate", "generations", lambda f: evaluate(f, gens=[f["null-reference"]]), "'reference'"),
    ("evaluate", "generations", lambda f: evaluate(f, gens=[f["ok"], f["ok"]]), "twice"),
    ("evaluate", "--json", lambda f: evaluate(f, "--json", str(f["root"] / "adir")), "--json"),
    ("evaluate", "--json", lambda f: evaluate(f, "--json", str(f["ok"])), "--json"),
    ("demo", "--out", lambda f: demo(f, "--out", str(f["root"] / "afile")), "--out"),
    ("demo", "--steps", lambda f: demo(f, "--steps", "0"), "--steps"),
    ("demo", "--seq-len", lambda f: demo(f, "--seq-len", "3"), "--seq-len"),
    ("demo", "--vocab-size", lambda f: demo(f, "--vocab-size", "x"), "--vocab-size"),
    ("demo", "--test-examples", lambda f: demo(f, "--test-examples", "0"), "--test-examples"),
    ("demo", "--mbr", lambda f: demo(f, "--mbr", "-1"), "--mbr"),
    ("demo", "--device", lambda f: demo(f, "--device", "tpu:0"), "--device"),
    ("demo", "--no-progress", lambda f: demo(f, "--no-progress=1"), "--no-progress"),
    ("demo", "--resume", lambda f: demo(f, "--resume=1"), "--resume"),
    ("demo", "--overwrite", lambda f: demo(f, "--overwrite=1"), "--overwrite"),
]


def snapshot(root):
    return {p: p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def run(argv, capsys):
    try:
        rc = main(argv)
    except SystemExit as e:  # argparse
        rc = e.code
    return rc, capsys.readouterr().err


@pytest.mark.parametrize("command, option, argv, names", CASES,
                         ids=[f"{c}{o}-{i}" for i, (c, o, _, _) in enumerate(CASES)])
def test_bad_value_is_one_named_line(files, capsys, command, option, argv, names):
    before = snapshot(files["root"])
    rc, err = run(argv(files), capsys)
    assert rc == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0] and "Traceback" not in err, err
    assert names in lines[0], lines[0]
    assert snapshot(files["root"]) == before  # nothing written, nothing lost


def test_every_option_has_a_bad_value_case():
    covered = {(c, o) for c, o, _, _ in CASES}
    parser = build_parser()
    commands = next(a for a in parser._actions if a.dest == "command").choices
    missing = []
    for name, sub in commands.items():
        for action in sub._actions:
            if action.dest == "help":
                continue
            option = next((s for s in action.option_strings if not s.startswith("--no-") or s == "--no-progress"),
                          action.dest)
            if action.option_strings and option.startswith("--no-") and name == "train":
                option = option.replace("--no-", "--")
            if (name, option) not in covered:
                missing.append((name, option))
    assert not missing, missing


def test_yaml_numbers_in_exponent_form_are_numbers(files, tmp_path):
    from moediffuseq.cli import train_configs
    from moediffuseq.data.tokenizer import SpecialIds

    config = tmp_path / "run.yaml"
    config.write_text("train:\n  lr: 1e-3\n  weight_decay: 1E-2\nmodel:\n  dropout: .5\n")
    args = build_parser().parse_args(train(files, "--config", str(config)))
    model_cfg, train_cfg = train_configs(args, 100, SpecialIds(0, 1, 2, 3))
    assert train_cfg.lr == 1e-3 and train_cfg.weight_decay == 1e-2 and model_cfg.dropout == 0.5


def test_a_real_process_prints_no_traceback(files):
    result = subprocess.run([sys.executable, "-m", "moediffuseq", *train(files, "--set", "n_layers=abc")],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2 and result.stderr.strip().count("\n") == 0, result.stderr
    assert "n_layers" in result.stderr and "Traceback" not in result.stderr


def test_a_batch_larger_than_the_data_is_refused_before_the_run_starts(files, capsys):
    out = files["root"] / "big-batch"
    rc, err = run([*train(files, "--batch-size", "17"), "--out", str(out)], capsys)
    assert rc == 2 and "--batch-size 17" in err and not out.exists()
