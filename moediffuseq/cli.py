"""The moediffuseq command: train, generate, evaluate, demo, info.

    moediffuseq info
    moediffuseq train --data pycode --preset tiny --out runs/pycode-tiny
    moediffuseq generate --model runs/pycode-tiny/model --input pycode:test --output runs/pycode-tiny/test.jsonl
    moediffuseq evaluate runs/pycode-tiny/test.jsonl
    moediffuseq demo

Data: a built-in corpus name (pycode, pycode-body, aclsum; built once and cached) or a
directory holding DiffuSeq jsonl files (train.jsonl, valid.jsonl, test.jsonl). For generate,
--input is a jsonl file, <corpus>:<split>, a text file or - (standard input).

Configuration: --preset picks the model, --config FILE (YAML or JSON with optional preset,
model and train sections) overrides it, --set field=value overrides model fields, and training
flags (--steps, --lr, ...) override the train section.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path
from typing import Optional, Sequence

from moediffuseq.cli_args import CliError, Parser, check_output, device_arg, int_at_least
from moediffuseq.cli_train import add_train_args, cmd_train, train_configs
from moediffuseq.data.corpora import CORPORA
from moediffuseq.extras import missing_extra_message

__all__ = ["CliError", "build_parser", "main", "train_configs"]


# ---------------------------------------------------------------------------------- generate

def add_generate_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.diffusion.samplers import SAMPLERS, SamplerConfig

    p.add_argument("--model", required=True, help="a model directory (e.g. OUT/model from train)")
    p.add_argument("--input", help="a jsonl file ({\"src\": ...} lines; \"trg\" is the reference when present), "
                   "<corpus>:<split> (e.g. pycode:test), a text file with one source per line, or - (stdin)")
    p.add_argument("--text", action="append", default=[], help="a source text (repeatable), instead of --input")
    p.add_argument("--output", help="jsonl with source, reference, hypothesis, candidates (default: print the "
                   "generated texts, one per line)")
    p.add_argument("--show-steps", action="store_true",
                   help="print the first source's text after every sampling step (on stderr)")
    p.add_argument("--sampler", default=SamplerConfig.method, choices=SAMPLERS,
                   help=f"reverse process (default {SamplerConfig.method}: measured best at 10 steps, bench/RESULTS.md)")
    p.add_argument("--steps", type=int_at_least(1), default=SamplerConfig.steps,
                   help=f"sampling steps (default {SamplerConfig.steps})")
    p.add_argument("--mbr", type=int_at_least(1), default=1, help="samples per source; output is their MBR choice")
    p.add_argument("--clamp", action="store_true", help="round x0 predictions to the nearest embedding")
    p.add_argument("--early-stop", type=int_at_least(0), default=0,
                   help="stop when tokens are unchanged this many steps")
    p.add_argument("--batch-size", type=int_at_least(1), default=16,
                   help="sources per batch; the noise is drawn per batch, so outputs depend on it (and --seed)")
    p.add_argument("--target-len", type=int_at_least(1), help="target token budget for source truncation")
    p.add_argument("--limit", type=int_at_least(1), help="only the first N examples")
    p.add_argument("--seed", type=int_at_least(0), default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", type=dtype_arg, help="autocast dtype of the model: bf16, fp16 (CUDA only) or fp32, "
                   "or their torch names (default: bf16 on CUDA, whose attention kernels need bf16 or fp16; fp32 on CPU)")
    p.add_argument("--skip-bad-lines", action="store_true")
    p.add_argument("--no-source-cache", action="store_true",
                   help="run the whole sequence at every step, also for a model with source isolation and a "
                        "bounded target span (by default those encode the source once per batch; same text)")


def dtype_arg(text: str) -> str:
    """``--dtype``: bf16 / fp16 / fp32 or a torch name of one (bfloat16, float16, float32, ...),
    as its short name."""
    from moediffuseq.generate import DTYPES, parse_dtype

    try:
        dtype = parse_dtype(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e).removeprefix("dtype ")) from None
    return next(name for name, value in DTYPES.items() if value == dtype)


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


def cmd_generate(args: argparse.Namespace) -> Optional[Path]:
    import torch

    from moediffuseq.diffusion.samplers import SamplerConfig
    from moediffuseq.generate import GenerationConfig, generation_dtype
    from moediffuseq.generate_files import generate_file

    if (args.input is None) == (not args.text):
        raise CliError("give the sources with --input or with --text (one of them)")
    for text in args.text:
        if not text.strip():
            raise CliError("--text: an empty source")
    device = device_arg(args.device)
    try:
        generation_dtype(torch.device(device), args.dtype)  # fp16 on the CPU: refused before the model loads
    except ValueError as e:
        raise CliError(f"--dtype: {e}") from None
    model_dir = Path(args.model)
    output = Path(args.output) if args.output else None
    input_path = None if args.input in (None, "-") else _input_path(args.input)
    if output is not None:
        check_output(output, [input_path] if input_path else [])
    cfg = GenerationConfig(SamplerConfig(args.sampler, args.steps, args.clamp, args.early_stop), args.mbr,
                           args.batch_size, args.target_len, args.seed, args.dtype,
                           False if args.no_source_cache else None)
    n = generate_file(model_dir, input_path or args.input, output, cfg, device, args.limit, args.skip_bad_lines,
                      texts=args.text or None, show_steps=args.show_steps)
    if output is not None:
        print(f"wrote {n} generations to {output}")
    return output


# -------------------------------------------------------------------------------------- demo

def add_demo_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.demo import DEMO_STEPS

    p.add_argument("--out", default="runs/demo", help="output directory (default runs/demo)")
    p.add_argument("--steps", type=int_at_least(1), default=DEMO_STEPS, help="training steps")
    p.add_argument("--seq-len", type=int_at_least(5), default=64, help="sequence length")
    p.add_argument("--vocab-size", type=int_at_least(5), default=2048)
    p.add_argument("--test-examples", type=int_at_least(1), default=200, help="held-out functions to generate for")
    p.add_argument("--mbr", type=int_at_least(1), default=10, help="samples per source for MBR decoding (DiffuSeq: 10)")
    p.add_argument("--device", default="auto")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--resume", action="store_true", help="continue the demo's training run in OUT")
    p.add_argument("--overwrite", action="store_true", help="replace the demo's run in OUT")


def cmd_demo(args: argparse.Namespace) -> dict:
    from moediffuseq.demo import run_demo

    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise CliError(f"--out {out} is a file, not a directory")
    return run_demo(out, args.steps, args.seq_len, args.vocab_size, args.test_examples, args.mbr, device_arg(args.device),
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
    from moediffuseq.evaluate import (EmptyHypothesesWarning, bootstrap_intervals, evaluate_texts, format_intervals,
                                      format_table, read_generations)

    names = _system_names(args.generations)
    if args.json:
        check_output(Path(args.json), [Path(p) for p in args.generations], "--json")
    rows, intervals = {}, {}
    for name, path in zip(names, args.generations):
        _, refs, hyps, cands = read_generations(path)
        if refs is None:
            print(f"note: {path} has no references (generated for unlabeled sources): not scored")
            continue
        if hyps and not any(h.strip() for h in hyps):
            print(f"warning: {path}: all {len(hyps)} hypotheses are empty, so every score is 0: the model that "
                  "wrote them generated nothing (undertrained? generate says why)", file=sys.stderr)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", EmptyHypothesesWarning)  # said above, with the file's name
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

def _version() -> str:
    import torch

    import moediffuseq

    return f"moediffuseq {moediffuseq.__version__} (torch {torch.__version__})"


def _show_warning(message, category, filename, lineno, file=None, line=None) -> None:
    """A warning as the command prints it: one ``warning: ...`` line on stderr."""
    print(f"warning: {message}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="moediffuseq", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--version", action="version", version=_version())
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
    with one ``error: ...`` line on stderr and exit status 2; Ctrl-C with 130, SIGTERM with 143."""
    args = build_parser().parse_args(argv)
    try:
        with warnings.catch_warnings():
            warnings.showwarning = _show_warning  # restored on leaving the block
            args.func(args)
    except KeyboardInterrupt as e:  # 130 for Ctrl-C, 143 for SIGTERM (after the checkpoint)
        from moediffuseq.interrupts import exit_status

        return exit_status(e)
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
