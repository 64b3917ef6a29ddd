"""The README's command-line block ("Training, generating, evaluating") runs as written, in order,
in a scratch directory; each `train` gets flags appended that shrink it to seconds (the last
value of a flag wins), each `generate` reads only a few sources."""
import re
import shlex

from moediffuseq.cli import main
from utils import README

SMALL_TRAIN = ["--steps", "2", "--batch-size", "4", "--max-train-examples", "48", "--eval-batches", "1",
               "--bleu-examples", "2", "--vocab-size", "300", "--no-progress", "--device", "cpu"]
SMALL_MODEL = ["--seq-len", "32", "--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2",
               "--set", "d_emb=16", "--set", "window=4", "--set", "d_expert=32", "--set", "diffusion_steps=50"]
SMALL_GENERATE = ["--limit", "3", "--steps", "2", "--device", "cpu"]


def cli_block() -> list[list[str]]:
    """The commands of the README's first block of `moediffuseq` commands, comments removed."""
    blocks = re.findall(r"```bash\n(.*?)```", README.read_text(), flags=re.S)
    block = next(b for b in blocks if b.lstrip().startswith("moediffuseq info"))
    return [shlex.split(line, comments=True) for line in block.splitlines() if line.strip()]


def test_readme_cli_block_runs(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MOEDIFFUSEQ_CACHE", str(tmp_path / "cache"))
    data = tmp_path / "my_data"  # the fine-tuning line's own data
    data.mkdir()
    (data / "train.jsonl").write_text("".join(f'{{"src": "add {i} and {i + 1}", "trg": "{2 * i + 1}"}}\n'
                                              for i in range(40)))
    commands = cli_block()
    assert [c[1] for c in commands] == ["info", "train", "generate", "evaluate", "generate", "train"]
    for argv in commands:
        assert argv[0] == "moediffuseq"
        args = argv[1:]
        if args[0] == "train":
            args += SMALL_TRAIN + ([] if "--init-from" in args else SMALL_MODEL)
        elif args[0] == "generate":
            args += SMALL_GENERATE
        assert main(args) == 0, argv
    assert (tmp_path / "runs/pycode/scores.json").is_file()
    assert (tmp_path / "runs/mine/model/model.safetensors").is_file()

