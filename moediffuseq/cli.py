"""The ``moediffuseq`` command: train, generate, evaluate, demo, info.

    moediffuseq info
    moediffuseq train --data pycode --preset tiny --out runs/pycode-tiny
    moediffuseq generate --model runs/pycode-tiny/model --input pycode:test --output runs/pycode-tiny/test.jsonl
    moediffuseq evaluate runs/pycode-tiny/test.jsonl
    moediffuseq demo

Data: a built-in corpus name (pycode, pycode-body, aclsum; built once and cached) or a
directory holding DiffuSeq jsonl files (train.jsonl, valid.jsonl, test.jsonl). For generate,
``--input`` is a jsonl file or ``<corpus>:<split>``.

Configuration: ``--preset`` picks the model, ``--config FILE`` (YAML or JSON with optional
``preset``, ``model`` and ``train`` sections) overrides it, ``--set field=value`` overrides model
fields, and training flags (``--steps``, ``--lr``, ...) override the ``train`` section.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moediffuseq.data.corpora import CORPORA
from moediffuseq.extras import missing_extra_message

TRAIN_HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay", "warmup_steps": "linear warm-up steps",
    "lr_decay": "after warm-up: linear, cosine or constant", "clip_grad": "max gradient norm (0: off)",
    "ema_decay": "EMA decay of the weights", "bf16": "bf16 autocast (CPU and GPU)",
    "timestep_sampler": "uniform or loss-aware", "seed": "random seed", "log_every": "steps between log rows",
    "eval_every": "steps between validations (0: only at the end)", "eval_batches": "validation loss batches",
    "bleu_examples": "validation sources generated for the sample BLEU (0: off)",
    "save_every": "steps between checkpoints (0: end and Ctrl-C only)", "progress": "show the progress bar",
}


class CliError(Exception):
    """A bad command line: printed as one ``error: ...`` line, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _int_at_least(minimum: int):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _yaml_loader():
    """A safe YAML loader that reads 1e-3 as a number (YAML 1.2), not as text (YAML 1.1)."""
    import yaml

    class Loader(yaml.SafeLoader):
        pass

    Loader.add_implicit_resolver(
        "tag:yaml.org,2002:float",
        re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
                    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
                    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
                    |[-+]?\.(?:inf|Inf|INF)
                    |\.(?:nan|NaN|NAN))$""", re.X),
        list("-+0123456789."))
    return Loader


def _load_config_file(path: Optional[str]) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise CliError(f"--config: file not found: {p}")
    is_yaml = p.suffix in (".yaml", ".yml")
    try:
        text = p.read_text(encoding="utf-8-sig")
        if is_yaml:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        message = " ".join(str(e).split())
        raise CliError(f"--config: {p} is not valid {'YAML' if is_yaml else 'JSON'}: {message}") from None
    if not isinstance(data, dict) or set(data) - {"preset", "model", "train"}:
        raise CliError(f"--config: {p}: expected a mapping with keys preset, model, train; got "
                       f"{sorted(map(str, data)) if isinstance(data, dict) else type(data).__name__}")
    for section in ("model", "train"):
        if not isinstance(data.get(section) or {}, dict):
            raise CliError(f"--config: {p}: the {section} section must be a mapping, got "
                           f"{type(data[section]).__name__}")
    return data


def _device(name: str) -> str:
    """The device to run on: ``auto`` is the local GPU when there is one, else the CPU. A CUDA
    device that is not there is an error, before any work."""
    import torch

    if name == "auto":
        from moediffuseq.train_run import auto_device

        return auto_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise CliError(f"--device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise CliError(f"--device {name!r}: no CUDA device is available here (use --device cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return name


# ------------------------------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.model import PRESETS
    from moediffuseq.train import TrainConfig

    p.add_argument("--data", required=True, help=f"built-in corpus ({', '.join(CORPORA)}) or a jsonl directory")
    p.add_argument("--out", required=True, help="output directory (model/, checkpoint/, metrics.csv, loss.png)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--config", help="YAML or JSON file with preset / model / train sections")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    p.add_argument("--seq-len", type=_int_at_least(5), help="sequence length L (the model's max_len)")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the training split)")
    p.add_argument("--vocab-size", type=_int_at_least(5), default=8192, help="vocabulary size of a trained tokenizer")
    p.add_argument("--tokenizer-kind", default="bpe", choices=["bpe", "wordpiece"])
    p.add_argument("--max-train-examples", type=_int_at_least(1), help="use only the first N training examples")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and report) malformed jsonl lines")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue the run in OUT (from OUT/checkpoint)")
    p.add_argument("--overwrite", action="store_true", help="replace the run in OUT (its files are deleted)")
    p.add_argument("--allow-change", action="store_true",
                   help="with --resume: continue with a configuration that differs from the run's")
    p.add_argument("--init-from", help="a trained model directory: start from its weights and tokenizer "
                   "(fine-tuning); its config is the model's, --set / --config may change what keeps the shapes")
    group = p.add_argument_group("training (override the config file's train section)")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            group.add_argument(flag, dest=f"train_{f.name}", action=argparse.BooleanOptionalAction, default=None,
                               help=TRAIN_HELP.get(f.name))
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            group.add_argument(flag, dest=f"train_{f.name}", type=kind, default=None, metavar=f.name.upper(),
                               help=f"{TRAIN_HELP.get(f.name, '')} (default {f.default})")


# model fields that the tokenizer decides
TOKENIZER_FIELDS = ("vocab_size", "pad_id", "special_ids")


def train_configs(args: argparse.Namespace, vocab_size: int, special, device: str = "cpu") -> tuple[Any, Any]:
    """The model and training configs from the preset, the config file and the flags (in that
    order of precedence, last wins). bf16 autocast defaults to on for a CUDA device, where the
    attention kernels run in bf16/fp16 only. A bad value is a ``CliError`` naming where it came
    from (the flag, ``--set`` or the config file) and the field."""
    from moediffuseq.fields import ConfigError
    from moediffuseq.model import MoEDiffuSeqConfig
    from moediffuseq.train import TrainConfig

    file_cfg = _load_config_file(args.config)
    preset = args.preset or file_cfg.get("preset", "tiny")
    file_model = dict(file_cfg.get("model") or {})
    file_train = dict(file_cfg.get("train") or {})
    set_fields = {}
    for item in args.set:
        if "=" not in item:
            raise CliError(f"--set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        set_fields[key.strip()] = _parse_value(value)
    for where, names in ((f"--config {args.config}: model.", file_model), ("--set ", set_fields)):
        for key in names:
            if key in TOKENIZER_FIELDS:
                raise CliError(f"{where}{key}: set by the tokenizer, not a model option (use --vocab-size to "
                               "size a trained tokenizer, or --tokenizer)")
    model_fields = {**file_model, **set_fields}
    if args.seq_len is not None:
        model_fields["max_len"] = args.seq_len
    model_fields.update(vocab_size=vocab_size, pad_id=special.pad, special_ids=(special.cls, special.sep))
    flags = {k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_") and v is not None}
    train_fields = {**file_train, **flags}
    unknown = sorted(set(train_fields) - {f.name for f in dataclasses.fields(TrainConfig)})
    if unknown:
        raise CliError(f"--config {args.config}: unknown train fields {unknown}")
    if device.startswith("cuda"):
        train_fields.setdefault("bf16", True)

    def where(field: str, section: str) -> str:
        if section == "train" and field in flags:
            return "--" + field.replace("_", "-")
        if section == "model" and field in set_fields:
            return f"--set {field}"
        if section == "model" and field == "max_len" and args.seq_len is not None:
            return "--seq-len"
        if field in (file_model if section == "model" else file_train):
            return f"--config {args.config}: {section}.{field}"
        return f"preset {preset}: {field}" if section == "model" else field

    try:
        if getattr(args, "init_from", None) is not None:  # the trained model's config, with the overrides
            if args.preset:
                raise CliError("--preset: the model of --init-from is fine-tuned as it is; drop --preset")
            model_cfg = dataclasses.replace(MoEDiffuSeqConfig.load(args.init_from), **model_fields)
        else:
            model_cfg = MoEDiffuSeqConfig.preset(preset, **model_fields)
    except ConfigError as e:
        raise CliError(f"{where(e.field, 'model')}: {e}") from None
    except ValueError as e:
        raise CliError(f"bad model configuration: {e}") from None
    try:
        train_cfg = TrainConfig(**train_fields)
    except ConfigError as e:
        raise CliError(f"{where(e.field, 'train')}: {e}") from None
    return model_cfg, train_cfg


def cmd_train(args: argparse.Namespace) -> Path:
    """Trains into ``--out`` through ``moediffuseq.train_run.run``, once every value is checked."""
    from moediffuseq.data.tokenizer import SpecialIds
    from moediffuseq.train_run import TrainingRun, run

    device = _device(args.device)
    if args.init_from is not None and not Path(args.init_from).is_dir():
        raise CliError(f"--init-from {args.init_from}: not a model directory")
    model_cfg, train_cfg = train_configs(args, args.vocab_size, SpecialIds(0, 1, 2, 3), device)
    return run(TrainingRun(args.data, args.out, model_cfg, train_cfg, args.tokenizer, args.vocab_size,
                           args.tokenizer_kind, args.max_train_examples, args.skip_bad_lines, device, args.resume,
                           args.overwrite, args.allow_change, args.init_from))


# ---------------------------------------------------------------------------------- generate

def add_generate_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.diffusion.samplers import SAMPLERS
    from moediffuseq.generate import DTYPES

    p.add_argument("--model", required=True, help="a model directory (e.g. OUT/model from train)")
    p.add_argument("--input", help="a jsonl file ({\"src\": ...} lines; \"trg\" is the reference when present), "
                   "<corpus>:<split> (e.g. pycode:test), a text file with one source per line, or - (stdin)")
    p.add_argument("--text", action="append", default=[], help="a source text (repeatable), instead of --input")
    p.add_argument("--output", help="jsonl with source, reference, hypothesis, candidates (default: print the "
                   "generated texts, one per line)")
    p.add_argument("--show-steps", action="store_true",
                   help="print the first source's text after every sampling step (on stderr)")
    p.add_argument("--sampler", default="dpm++", choices=SAMPLERS)
    p.add_argument("--steps", type=_int_at_least(1), default=10, help="sampling steps (default 10)")
    p.add_argument("--mbr", type=_int_at_least(1), default=1, help="samples per source; output is their MBR choice")
    p.add_argument("--clamp", action="store_true", help="round x0 predictions to the nearest embedding")
    p.add_argument("--early-stop", type=_int_at_least(0), default=0,
                   help="stop when tokens are unchanged this many steps")
    p.add_argument("--batch-size", type=_int_at_least(1), default=16,
                   help="sources per batch; the noise is drawn per batch, so outputs depend on it (and --seed)")
    p.add_argument("--target-len", type=_int_at_least(1), help="target token budget for source truncation")
    p.add_argument("--limit", type=_int_at_least(1), help="only the first N examples")
    p.add_argument("--seed", type=_int_at_least(0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype of the model (default: bf16 on CUDA, "
                   "whose attention kernels need bf16 or fp16; fp32 on CPU)")
    p.add_argument("--skip-bad-lines", action="store_true")


def _input_path(spec: str) -> Path:
    from moediffuseq.data import split_path

    if ":" in spec and spec.split(":", 1)[0] in CORPORA:
        corpus, split = spec.split(":", 1)
        try:
            split_path(".", split)  # the split name is checked before the corpus is built
        except ValueError as e:
            raise CliError(f"--input {spec!r}: {e}") from None
        from moediffuseq.train_run import data_dir

        return split_path(data_dir(corpus), split)
    path = Path(spec)
    if path.is_dir():
        raise CliError(f"--input {path} is a directory, not a jsonl file")
    return path


def _check_output(output: Path, inputs: Sequence[Path], flag: str = "--output") -> None:
    """An output file must not be a directory nor one of the inputs (it would be overwritten)."""
    if output.is_dir():
        raise CliError(f"{flag} {output} is a directory, not a file")
    for path in inputs:
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise CliError(f"{flag} {output} is also an input: it would be overwritten; write elsewhere")


def cmd_generate(args: argparse.Namespace) -> Optional[Path]:
    from moediffuseq.diffusion.samplers import SamplerConfig
    from moediffuseq.generate import GenerationConfig, generate_file

    if (args.input is None) == (not args.text):
        raise CliError("give the sources with --input or with --text (one of them)")
    for text in args.text:
        if not text.strip():
            raise CliError("--text: an empty source")
    device = _device(args.device)
    model_dir = Path(args.model)
    output = Path(args.output) if args.output else None
    input_path = None if args.input in (None, "-") else _input_path(args.input)
    if output is not None:
        _check_output(output, [input_path] if input_path else [])
    cfg = GenerationConfig(SamplerConfig(args.sampler, args.steps, args.clamp, args.early_stop), args.mbr,
                           args.batch_size, args.target_len, args.seed, args.dtype)
    n = generate_file(model_dir, input_path or args.input, output, cfg, device, args.limit, args.skip_bad_lines,
                      texts=args.text or None, show_steps=args.show_steps)
    if output is not None:
        print(f"wrote {n} generations to {output}")
    return output


# -------------------------------------------------------------------------------------- demo

def add_demo_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.demo import DEMO_STEPS

    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=_int_at_least(1), default=DEMO_STEPS, help="training steps")
    p.add_argument("--seq-len", type=_int_at_least(5), default=64, help="sequence length")
    p.add_argument("--vocab-size", type=_int_at_least(5), default=2048)
    p.add_argument("--test-examples", type=_int_at_least(1), default=200, help="held-out functions to generate for")
    p.add_argument("--mbr", type=_int_at_least(1), default=10, help="samples per source for MBR decoding (DiffuSeq: 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the demo's training run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's run in OUT")


def cmd_demo(args: argparse.Namespace) -> dict:
    from moediffuseq.demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a directory")
    return run_demo(out, args.steps, args.seq_len, args.vocab_size, args.test_examples, args.mbr, _device(args.device),
                    not args.no_progress, args.resume, args.overwrite)


# ---------------------------------------------------------------------------------- evaluate

def _system_names(paths: Sequence[str]) -> list[str]:
    """The file stems, or the paths as given where two stems are the same."""
    stems = [Path(p).stem for p in paths]
    names = [stem if stems.count(stem) == 1 else p for stem, p in zip(stems, paths)]
    for i, name in enumerate(names):
        if names.index(name) != i:
            raise CliError(f"evaluate: {paths[i]} is given twice")
    return names


def cmd_evaluate(args: argparse.Namespace) -> dict:
    from moediffuseq.evaluate import bootstrap_intervals, evaluate_texts, format_intervals, format_table, read_generations

    names = _system_names(args.generations)
    if args.json:
        _check_output(Path(args.json), [Path(p) for p in args.generations], "--json")
    rows, intervals = {}, {}
    for name, path in zip(names, args.generations):
        _, refs, hyps, cands = read_generations(path)
        if refs is None:
            print(f"note: {path} has no references (generated for unlabeled sources): not scored")
            continue
        rows[name] = evaluate_texts(hyps, refs, cands)
        intervals[name] = bootstrap_intervals(hyps, refs)
        rows[name]["intervals_95"] = {k: list(v) for k, v in intervals[name].items()}
    if rows:
        print(format_table(rows))
        print()
        print(format_intervals(intervals))
    if args.json:
        path = Path(args.json)
        path.parent.mkdir(parents=True, exist_ok=True)
        from moediffuseq.run_dir import write_json

        write_json(path, rows)
        print(f"metrics: {args.json}")
    return rows


# -------------------------------------------------------------------------------------- info

def cmd_info(args: argparse.Namespace) -> None:
    import torch

    import moediffuseq

    info = moediffuseq.build_info()
    print(f"moediffuseq {moediffuseq.__version__}, torch {torch.__version__}")
    for key, value in info.as_dict().items():
        print(f"  {key}: {value}")
    print(f"  threads: {torch.get_num_threads()}, CUDA device available: {torch.cuda.is_available()}")
    print(f"  built-in corpora: {', '.join(f'{k} ({v[0]})' for k, v in CORPORA.items())}")


# -------------------------------------------------------------------------------------- main

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="moediffuseq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a model on a corpus (torchrun for data-parallel)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("generate", help="generate outputs for sources (jsonl, text, --text, stdin) with a trained "
                       "model")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("evaluate", help="score generations (BLEU, ROUGE, diversity) and print a table")
    p.add_argument("generations", nargs="+", help="jsonl files written by generate")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="the end-to-end demo: corpus, tokenizer, train tiny, generate, evaluate")
    add_demo_args(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="build information: CPU ISA, CUDA, CUTLASS")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Runs one command. Bad input (a flag's value, a file, a configuration, a diverged run) ends
    with one ``error: ...`` line on stderr and exit status 2; Ctrl-C with 130."""
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except ModuleNotFoundError as e:  # an optional dependency: name the extra that provides it
        message = missing_extra_message(e)
        if message is None:
            raise
        print(message, file=sys.stderr)
        return 2
    except (CliError, OSError, ValueError, FloatingPointError) as e:
        message = " ".join(line.strip() for line in str(e).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
