"""Peak memory of ``moediffuseq train`` (tokenizer trained on the data, one step of a tiny model)
on a small corpus, and on the same corpus with one huge line added: a line of words, and a line
without any whitespace (one 41 MB "word"). Each run is a fresh process; its peak resident set
(ru_maxrss) is reported, and the difference from the small corpus alone.

    python -m bench.input_memory                 # 41 MB lines
    python -m bench.input_memory --mib 10
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--seq-len", "64", "--set", "n_layers=1", "--vocab-size", "256", "--batch-size", "8", "--steps", "1",
        "--warmup-steps", "1", "--eval-every", "0", "--bleu-examples", "0", "--no-progress", "--device", "cpu"]


def corpus(directory: Path, huge: str | None) -> Path:
    directory.mkdir(parents=True)
    words = "alpha beta gamma delta epsilon zeta".split()
    with (directory / "train.jsonl").open("w") as f:
        for i in range(64):
            f.write(json.dumps({"src": f"{words[i % 6]} {words[(i + 1) % 6]}", "trg": words[(i + 2) % 6]}) + "\n")
        if huge is not None:
            f.write(json.dumps({"src": huge, "trg": "alpha"}) + "\n")
    return directory


def peak_mib(data: Path, out: Path) -> float:
    code = ("import resource, sys; from moediffuseq.cli import main; rc = main(sys.argv[1:]); "
            "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss); sys.exit(rc)")
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    result = subprocess.run([sys.executable, "-c", code, "train", "--data", str(data), "--out", str(out), *TINY],
                            capture_output=True, text=True, env=env, check=True)
    return int(result.stdout.strip().splitlines()[-1]) / 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--mib", type=int, default=41, help="size of the huge line in MiB")
    args = parser.parse_args()
    n = args.mib << 20
    sentence = "the quick brown fox jumps over the lazy dog "
    cases = {"small corpus": None, f"+ a {args.mib} MiB line of words": (sentence * (n // len(sentence) + 1))[:n],
             f"+ a {args.mib} MiB line without whitespace": "y" * n}
    with tempfile.TemporaryDirectory() as tmp:
        rows = {}
        for i, (name, huge) in enumerate(cases.items()):
            rows[name] = peak_mib(corpus(Path(tmp) / f"data{i}", huge), Path(tmp) / f"run{i}")
    base = rows["small corpus"]
    print("| corpus | peak RSS (MiB) | more than the small corpus (MiB) |\n| --- | ---: | ---: |")
    for name, mib in rows.items():
        print(f"| {name} | {mib:.0f} | {mib - base:+.0f} |")


if __name__ == "__main__":
    main()
