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
import sys
from pathlib import Path
from typing import Any, Optional, Sequence

from moediffuseq.data.corpora import CORPORA

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


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _load_config_file(path: Optional[str]) -> dict:
    if not path:
        return {}
    p = Path(path)
    if not p.is_file():
        raise SystemExit(f"error: config file not found: {p}")
    text = p.read_text()
    try:
        if p.suffix in (".yaml", ".yml"):
            import yaml

            data = yaml.safe_load(text) or {}
        else:
            data = json.loads(text)
    except Exception as e:
        raise SystemExit(f"error: {p} is not valid {'YAML' if p.suffix in ('.yaml', '.yml') else 'JSON'}: {e}")
    if not isinstance(data, dict) or set(data) - {"preset", "model", "train"}:
        raise SystemExit(f"error: {p}: expected a mapping with keys preset, model, train; got "
                         f"{sorted(data) if isinstance(data, dict) else type(data).__name__}")
    return data


def _device(name: str) -> str:
    import torch

    if name == "auto":
        if torch.cuda.is_available():
            return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
        return "cpu"
    return name


def _data_dir(spec: str, rebuild: bool = False) -> Path:
    from moediffuseq.data import build_corpus

    if spec in CORPORA:
        return build_corpus(spec, rebuild=rebuild)
    path = Path(spec)
    if not path.is_dir():
        raise SystemExit(f"error: --data {spec!r} is neither a built-in corpus ({', '.join(CORPORA)}) nor a directory")
    if not (path / "train.jsonl").is_file():
        raise SystemExit(f"error: {path} has no train.jsonl")
    return path


# ------------------------------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.model import PRESETS
    from moediffuseq.train import TrainConfig

    p.add_argument("--data", required=True, help=f"built-in corpus ({', '.join(CORPORA)}) or a jsonl directory")
    p.add_argument("--out", required=True, help="output directory (model/, checkpoint/, metrics.csv, loss.png)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--config", help="YAML or JSON file with preset / model / train sections")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    p.add_argument("--seq-len", type=int, help="sequence length L (the model's max_len)")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the training split)")
    p.add_argument("--vocab-size", type=int, default=8192, help="vocabulary size of a trained tokenizer")
    p.add_argument("--tokenizer-kind", default="bpe", choices=["bpe", "wordpiece"])
    p.add_argument("--max-train-examples", type=int, help="use only the first N training examples")
    p.add_argument("--skip-bad-lines", action="store_true", help="skip (and report) malformed jsonl lines")
    p.add_argument("--device", default="auto", help="cpu, cuda, cuda:N or auto")
    p.add_argument("--resume", action="store_true", help="continue from OUT/checkpoint")
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


def train_configs(args: argparse.Namespace, vocab_size: int, special, device: str = "cpu") -> tuple[Any, Any]:
    """The model and training configs from the preset, the config file and the flags (in that
    order of precedence, last wins). bf16 autocast defaults to on for a CUDA device, where the
    attention kernels run in bf16/fp16 only."""
    from moediffuseq.model import MoEDiffuSeqConfig
    from moediffuseq.train import TrainConfig

    file_cfg = _load_config_file(args.config)
    preset = args.preset or file_cfg.get("preset", "tiny")
    model_fields = dict(file_cfg.get("model") or {})
    for item in args.set:
        if "=" not in item:
            raise SystemExit(f"error: --set expects FIELD=VALUE, got {item!r}")
        key, value = item.split("=", 1)
        model_fields[key.strip()] = _parse_value(value)
    if args.seq_len:
        model_fields["max_len"] = args.seq_len
    model_fields.update(vocab_size=vocab_size, pad_id=special.pad, special_ids=(special.cls, special.sep))
    train_fields = dict(file_cfg.get("train") or {})
    train_fields.update({k[len("train_"):]: v for k, v in vars(args).items() if k.startswith("train_") and v is not None})
    if device.startswith("cuda"):
        train_fields.setdefault("bf16", True)
    try:
        return MoEDiffuSeqConfig.preset(preset, **model_fields), TrainConfig(**train_fields)
    except (TypeError, ValueError) as e:
        raise SystemExit(f"error: bad configuration: {e}")


def cmd_train(args: argparse.Namespace) -> Path:
    import torch
    import torch.distributed as dist

    from moediffuseq.data import Seq2SeqDataset, TextTokenizer, read_jsonl, split_path
    from moediffuseq.model import MoEDiffuSeq
    from moediffuseq.train import DistributedContext, Trainer

    device = _device(args.device)
    ctx = DistributedContext.from_environment(torch.device(device))
    out = Path(args.out)
    data_dir = _data_dir(args.data) if ctx.is_main else None
    if ctx.world_size > 1:  # the corpus is built once, by the main process
        holder = [str(data_dir)]
        dist.broadcast_object_list(holder, src=0)
        data_dir = Path(holder[0])
    on_error = "skip" if args.skip_bad_lines else "raise"
    train_examples = read_jsonl(split_path(data_dir, "train"), on_error).examples[:args.max_train_examples]
    valid_path = split_path(data_dir, "valid")
    valid_examples = read_jsonl(valid_path, on_error).examples if valid_path.is_file() else None

    saved_tok = out / "checkpoint" / "tokenizer.json"
    if args.resume and saved_tok.is_file():
        tokenizer = TextTokenizer.load(saved_tok)
    elif args.tokenizer:
        tokenizer = TextTokenizer.load(args.tokenizer)
    else:
        tok_path = out / "tokenizer.json"
        if ctx.is_main:
            TextTokenizer.train((t for e in train_examples for t in (e.src, e.trg)), args.vocab_size,
                                args.tokenizer_kind).save(out)
        if ctx.world_size > 1:
            dist.barrier()
        tokenizer = TextTokenizer.load(tok_path)
    model_cfg, train_cfg = train_configs(args, tokenizer.vocab_size, tokenizer.special, device)
    torch.manual_seed(train_cfg.seed)
    model = MoEDiffuSeq(model_cfg)
    train_set = Seq2SeqDataset(train_examples, tokenizer, model_cfg.max_len)
    valid_set = Seq2SeqDataset(valid_examples, tokenizer, model_cfg.max_len) if valid_examples else None
    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {data_dir} ({len(train_set)} train, {len(valid_set) if valid_set else 0} valid; "
              f"{train_set.truncated} truncated to L={model_cfg.max_len})")
        print(f"model: {n_params / 1e6:.2f} M parameters, {model_cfg.n_layers} layers x {model_cfg.d_model}, "
              f"attention={model_cfg.attention}, ffn={model_cfg.ffn}; device {device}, {ctx.world_size} process(es), "
              f"{'bf16 autocast' if train_cfg.bf16 else 'fp32'}")
    trainer = Trainer(model, tokenizer, train_set, valid_set, train_cfg, out, device)
    model_dir = trainer.fit(resume=args.resume)
    if ctx.is_main:
        print(f"model: {model_dir}\nmetrics: {out / 'metrics.csv'}\nloss plot: {out / 'loss.png'}")
    return model_dir


# ---------------------------------------------------------------------------------- generate

def add_generate_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.diffusion.samplers import SAMPLERS
    from moediffuseq.generate import DTYPES

    p.add_argument("--model", required=True, help="a model directory (e.g. OUT/model from train)")
    p.add_argument("--input", required=True, help="a jsonl file or <corpus>:<split>, e.g. pycode:test")
    p.add_argument("--output", required=True, help="jsonl with source, reference, hypothesis, candidates")
    p.add_argument("--sampler", default="dpm++", choices=SAMPLERS)
    p.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    p.add_argument("--mbr", type=int, default=1, help="samples per source; output is their MBR choice")
    p.add_argument("--clamp", action="store_true", help="round x0 predictions to the nearest embedding")
    p.add_argument("--early-stop", type=int, default=0, help="stop when tokens are unchanged this many steps")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--target-len", type=int, help="target token budget for source truncation")
    p.add_argument("--limit", type=int, help="only the first N examples")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--dtype", choices=sorted(DTYPES), help="autocast dtype of the model (default: bf16 on CUDA, "
                   "whose attention kernels need bf16 or fp16; fp32 on CPU)")
    p.add_argument("--skip-bad-lines", action="store_true")


def _input_path(spec: str) -> Path:
    from moediffuseq.data import split_path

    if ":" in spec and spec.split(":", 1)[0] in CORPORA:
        corpus, split = spec.split(":", 1)
        return split_path(_data_dir(corpus), split)
    return Path(spec)


def cmd_generate(args: argparse.Namespace) -> Path:
    from moediffuseq.diffusion.samplers import SamplerConfig
    from moediffuseq.generate import GenerationConfig, generate_file

    cfg = GenerationConfig(SamplerConfig(args.sampler, args.steps, args.clamp, args.early_stop), args.mbr,
                           args.batch_size, args.target_len, args.seed, args.dtype)
    n = generate_file(args.model, _input_path(args.input), args.output, cfg, _device(args.device), args.limit,
                      args.skip_bad_lines)
    print(f"wrote {n} generations to {args.output}")
    return Path(args.output)


# ---------------------------------------------------------------------------------- evaluate

def cmd_evaluate(args: argparse.Namespace) -> dict:
    from moediffuseq.evaluate import evaluate_texts, format_table, read_generations

    rows = {}
    for path in args.generations:
        _, refs, hyps, cands = read_generations(path)
        rows[Path(path).stem] = evaluate_texts(hyps, refs, cands)
    print(format_table(rows))
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=2) + "\n")
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
    parser = argparse.ArgumentParser(prog="moediffuseq", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    p = sub.add_parser("train", help="train a model on a corpus (torchrun for data-parallel)")
    add_train_args(p)
    p.set_defaults(func=cmd_train)
    p = sub.add_parser("generate", help="generate outputs for a jsonl file with a trained model")
    add_generate_args(p)
    p.set_defaults(func=cmd_generate)
    p = sub.add_parser("evaluate", help="score generations (BLEU, ROUGE, diversity) and print a table")
    p.add_argument("generations", nargs="+", help="jsonl files written by generate")
    p.add_argument("--json", help="also write the metrics to this JSON file")
    p.set_defaults(func=cmd_evaluate)
    p = sub.add_parser("demo", help="the end-to-end demo: corpus, tokenizer, train tiny, generate, evaluate")
    from moediffuseq.demo import add_demo_args, cmd_demo

    add_demo_args(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("info", help="build information: CPU ISA, CUDA, CUTLASS")
    p.set_defaults(func=cmd_info)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        args.func(args)
    except KeyboardInterrupt:
        return 130
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
