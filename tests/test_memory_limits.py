"""Hostile inputs under an address-space cap: every one ends in one ``error:`` line (exit 2), or
succeeds within the cap, never in an abort, a panic, a traceback or the OOM killer.

One child process, its address space capped at 4 GiB (``RLIMIT_AS``, as ``prlimit --as``), runs
``moediffuseq`` on each input in turn and reports one JSON line per case; a case that kills the
child (an abort, a Rust panic, an allocation failure) shows as the child's death after the last
case it reported.
"""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from moediffuseq.data.tokenizer import TextTokenizer
from moediffuseq.generate import GENERATION_FILE
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig

ROOT = Path(__file__).resolve().parents[1]
CAP = 4 << 30
TINY = ["--seq-len", "24", "--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "d_emb=16",
        "--set", "window=4", "--set", "num_experts=2", "--set", "d_expert=32", "--set", "diffusion_steps=100",
        "--vocab-size", "60", "--batch-size", "8", "--warmup-steps", "1", "--bleu-examples", "0", "--no-progress",
        "--device", "cpu", "--eval-every", "0"]

CHILD = textwrap.dedent("""
    import contextlib, io, json, resource, sys
    resource.setrlimit(resource.RLIMIT_AS, ({cap}, {cap}))
    from moediffuseq.cli import main
    for name, argv in json.loads(sys.argv[1]):
        err = io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
            try:
                rc = main(argv)
            except SystemExit as e:  # argparse's own errors
                rc = e.code
            except BaseException as e:
                rc, err = "raised", io.StringIO(f"{{type(e).__name__}}: {{e}}")
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        print(json.dumps({{"case": name, "rc": rc, "stderr": err.getvalue(), "peak_kib": peak}}), flush=True)
""")


def tiny_model(directory: Path, **changes) -> Path:
    texts = ["alpha beta gamma", "delta epsilon zeta"] * 8
    tokenizer = TextTokenizer.train(texts, 60)
    tokenizer.save(directory)
    config = MoEDiffuSeqConfig.preset("tiny", max_len=24, n_layers=1, d_model=32, n_heads=2, d_emb=16, window=4,
                                      num_experts=2, d_expert=32, diffusion_steps=100, vocab_size=len(tokenizer))
    MoEDiffuSeq(config).save_pretrained(directory)
    (directory / GENERATION_FILE).write_text(json.dumps({"target_len": 6}))
    if changes:
        values = json.loads((directory / "config.json").read_text())
        (directory / "config.json").write_text(json.dumps({**values, **changes}))
    return directory


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    model = tiny_model(root / "model")
    huge_steps = tiny_model(root / "huge-steps", diffusion_steps=10_000_000_000)
    huge_global = tiny_model(root / "huge-global", global_target_max=10 ** 30)
    zero_config = tiny_model(root / "zero-config")
    (zero_config / "config.json").unlink()
    (zero_config / "config.json").symlink_to("/dev/zero")
    one_word = root / "one-word.txt"  # a 50 MB source without whitespace
    with one_word.open("w") as f:
        for _ in range(50):
            f.write("x" * (1 << 20))
        f.write("\n")
    with (root / "sparse.txt").open("wb") as f:  # 1 GiB of zero bytes without a line end, sparse: no disk used
        f.truncate(1 << 30)
    (root / "empty.txt").write_text("")
    (root / "src.txt").write_text("alpha beta\n")
    words = "alpha beta gamma delta epsilon zeta".split()
    lines = [json.dumps({"src": f"{words[i % 6]} {words[(i + 1) % 6]}", "trg": words[(i + 2) % 6]}) for i in range(24)]
    long_line = root / "long-line"  # a 41 MB line without whitespace in train.jsonl
    long_line.mkdir()
    with (long_line / "train.jsonl").open("w") as f:
        f.write("\n".join(lines) + "\n")
        f.write('{"src": "' + "y" * (41 << 20) + '", "trg": "alpha"}\n')
    normal = root / "data"
    normal.mkdir()
    (normal / "train.jsonl").write_text("\n".join(lines) + "\n")
    zero_data = root / "zero-data"
    zero_data.mkdir()
    with (zero_data / "train.jsonl").open("wb") as f:
        f.truncate(1 << 30)

    def gen(model_dir, source, *extra):
        return ["generate", "--model", str(model_dir), "--input", str(source), "--device", "cpu", "--steps", "2",
                *extra]

    def train(data, out, *extra):
        return ["train", "--data", str(data), "--out", str(root / out), *TINY, "--steps", "1", *extra]

    cases = {
        "diffusion_steps 1e10": (gen(huge_steps, root / "src.txt"), "diffusion_steps must be <= 100_000"),
        "global_target_max 1e30": (gen(huge_global, root / "src.txt"), "global_target_max must be <= 1_048_576"),
        "config.json -> /dev/zero": (gen(zero_config, root / "src.txt"), "larger than 1 MiB, the limit of a model"),
        "1 GiB line in a source file": (gen(model, root / "sparse.txt"), "a line longer than 64 MiB"),
        "empty source file": (gen(model, root / "empty.txt"), "holds no sources"),
        "50 MB word as a source": (gen(model, one_word, "--output", str(root / "one-word.jsonl")), None),
        "41 MB line, tokenizer trained": (train(long_line, "long-line-run"), None),
        "1 GiB line in train.jsonl": (train(zero_data, "zero-run"), "a line longer than 64 MiB"),
        "--vocab-size 1e8": (train(normal, "r1", "--vocab-size", "100000000"), "must be an integer <= 1_048_576"),
        "--seq-len 1e6": (train(normal, "r2", "--seq-len", "1000000"), "this run needs at least"),
        "--set d_model=100000": (train(normal, "r3", "--set", "d_model=100000"), "d_model must be <= 65_536"),
        "--set d_model=65536": (train(normal, "r4", "--set", "d_model=65536"), "this run needs at least"),
        "--set n_layers=100000": (train(normal, "r5", "--set", "n_layers=100000"), "n_layers must be <= 1_024"),
        "--set n_layers=1024 --set d_model=4096": (train(normal, "r6", "--set", "n_layers=1024", "--set",
                                                         "d_model=4096"), "this run needs at least"),
        "--steps 1e20": (train(normal, "r7", "--steps", str(10 ** 20)), "steps must be <= 1_000_000_000"),
        "--grad-accum 1e9": (train(normal, "r8", "--grad-accum", str(10 ** 9)), "grad_accum must be <= 65_536"),
        "--lr 1e38": (train(normal, "r9", "--lr", "1e38", "--warmup-steps", "0", "--clip-grad", "0"),
                      "lr must be > 0.0 and <= 1000000.0"),
    }
    return root, cases


def test_hostile_inputs_end_in_one_error_line_under_an_address_space_cap(hostile):
    root, cases = hostile
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "OMP_NUM_THREADS": "1", "RAYON_NUM_THREADS": "2"}
    argv = [[name, argv] for name, (argv, _) in cases.items()]
    child = subprocess.run([sys.executable, "-c", CHILD.format(cap=CAP), json.dumps(argv)], capture_output=True,
                           text=True, env=env, cwd=root, timeout=900)
    reports = {r["case"]: r for r in map(json.loads, child.stdout.splitlines())}
    missing = [name for name in cases if name not in reports]
    assert not missing, f"the child died (status {child.returncode}) at {missing[0]!r}: {child.stderr[-2000:]}"
    wrong = []
    for name, (argv, expected) in cases.items():
        report = reports[name]
        lines = report["stderr"].strip().splitlines()
        if expected is None:  # within the cap, it works
            ok = report["rc"] == 0
        else:
            ok = report["rc"] == 2 and len(lines) == 1 and "error" in lines[0] and expected in lines[0]
        if not ok:
            wrong.append(f"{name}: exit {report['rc']}, {report['stderr'][-600:]!r}")
    assert not wrong, "\n".join(wrong)
    for out in ("r2", "r4", "r6"):  # refused by the memory check before anything was written
        assert not (root / out).exists(), out
    generated = [json.loads(line) for line in (root / "one-word.jsonl").read_text().splitlines()]
    assert len(generated) == 1
