"""``moediffuseq train``: its options, and the model and training configurations resolved from
the preset, the ``--config`` file, ``--set`` and the training flags."""
from __future__ import annotations

import argparse
import dataclasses
import json
import re
from pathlib import Path
from typing import Any, Optional

from moediffuseq.cli_args import CliError, device_arg, int_at_least
from moediffuseq.data.corpora import CORPORA
from moediffuseq.limits import MAX_VOCAB_SIZE, read_text

TRAIN_HELP = {
    "steps": "optimizer steps", "batch_size": "sequences per micro-batch per process",
    "grad_accum": "micro-batches per optimizer step", "lr": "peak learning rate (AdamW)",
    "weight_decay": "AdamW weight decay", "warmup_steps": "linear warm-up steps",
    "lr_decay": "after warm-up: linear, cosine or constant", "clip_grad": "max gradient norm (0: off)",
    "ema_decay": "EMA decay of the weights", "bf16": "bf16 autocast (CPU and GPU)",
    "timestep_draw": "diffusion steps of a training batch: uniform or loss-aware", "seed": "random seed", "log_every": "steps between log rows",
    "eval_every": "steps between validations (0: only at the end)", "eval_batches": "validation loss batches",
    "bleu_examples": "validation sources generated for the sample BLEU (0: off)",
    "save_every": "steps between checkpoints (0: end and Ctrl-C only)", "progress": "show the progress bar",
}


def _parse_value(text: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def _no_duplicates(pairs: list) -> dict:
    """A JSON object's pairs as a dict; a key given twice is an error (not the last one kept)."""
    out = {}
    for key, value in pairs:
        if key in out:
            raise ValueError(f"the key {key!r} is given twice")
        out[key] = value
    return out


def _yaml_loader():
    """A safe YAML loader that reads 1e-3 as a number (YAML 1.2), not as text (YAML 1.1), and
    refuses a key given twice in a mapping (YAML 1.2 forbids it; PyYAML keeps the last)."""
    import yaml

    class Loader(yaml.SafeLoader):
        def construct_mapping(self, node, deep=False):
            seen = set()
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=True)
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        None, None, f"the key {key!r} is given twice", key_node.start_mark)
                seen.add(key)
            return super().construct_mapping(node, deep=deep)

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
    if p.exists() and not p.is_file():
        raise CliError(f"--config: {p} is not a regular file")
    if not p.is_file():
        raise CliError(f"--config: file not found: {p}")
    is_yaml = p.suffix in (".yaml", ".yml")
    try:
        text = read_text(p, "configuration file")
        if is_yaml:
            import yaml

            data = yaml.load(text, Loader=_yaml_loader()) or {}
        else:
            data = json.loads(text, object_pairs_hook=_no_duplicates)
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


# ------------------------------------------------------------------------------------- train

def add_train_args(p: argparse.ArgumentParser) -> None:
    from moediffuseq.model import CONFIG_MAXIMA, PRESETS
    from moediffuseq.train_config import TrainConfig

    p.add_argument("--data", required=True, help=f"built-in corpus ({', '.join(CORPORA)}) or a jsonl directory")
    p.add_argument("--out", required=True, help="output directory (model/, checkpoint/, metrics.csv, loss.png)")
    p.add_argument("--preset", default=None, choices=sorted(PRESETS), help="model preset (default: tiny)")
    p.add_argument("--config", help="YAML or JSON file with preset / model / train sections")
    p.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE", help="override a model field")
    p.add_argument("--seq-len", type=int_at_least(5, CONFIG_MAXIMA["max_len"]),
                   help="sequence length L (the model's max_len)")
    p.add_argument("--tokenizer", help="an existing tokenizer.json (default: train one on the training split)")
    p.add_argument("--vocab-size", type=int_at_least(5, MAX_VOCAB_SIZE), default=8192,
                   help="vocabulary size of a trained tokenizer")
    p.add_argument("--tokenizer-kind", default="bpe", choices=["bpe", "wordpiece"])
    p.add_argument("--max-train-examples", type=int_at_least(1), help="use only the first N training examples")
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
    from moediffuseq.train_config import TrainConfig, upgrade_fields

    file_cfg = _load_config_file(args.config)
    preset = args.preset or file_cfg.get("preset", "tiny")
    file_model = dict(file_cfg.get("model") or {})
    try:
        file_train = upgrade_fields(file_cfg.get("train") or {})
    except ValueError as e:
        raise CliError(f"--config {args.config}: {e}") from None
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

    device = device_arg(args.device)
    if args.init_from is not None and not Path(args.init_from).is_dir():
        raise CliError(f"--init-from {args.init_from}: not a model directory")
    model_cfg, train_cfg = train_configs(args, args.vocab_size, SpecialIds(0, 1, 2, 3), device)
    return run(TrainingRun(args.data, args.out, model_cfg, train_cfg, args.tokenizer, args.vocab_size,
                           args.tokenizer_kind, args.max_train_examples, args.skip_bad_lines, device, args.resume,
                           args.overwrite, args.allow_change, args.init_from))
