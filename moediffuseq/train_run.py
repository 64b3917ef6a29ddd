"""The training entry: one ``TrainingRun`` (data, output directory, model and training configs,
tokenizer) in, the trained model directory out. ``moediffuseq train``, ``moediffuseq demo`` and
bench/end_to_end.py all train through ``run``.

    from moediffuseq.train_run import TrainingRun, run
    from moediffuseq.train_config import TrainConfig

    model_dir = run(TrainingRun(data="pycode", out="runs/pycode", train=TrainConfig(steps=2000)))

A fresh run writes OUT/run_config.json (the resolved model, training and data configuration)
before anything else; ``resume`` compares the run's configuration with it (a change is an error
naming the fields, unless ``allow_change``). ``init_from`` starts a new run from the weights
(and the tokenizer) of a trained model directory: fine-tuning.
"""
from __future__ import annotations

import dataclasses
import os
import shutil
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
import torch.distributed as dist

from moediffuseq.data.corpora import CORPORA
from moediffuseq.data.packing import source_budget
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.distributed import DistributedContext
from moediffuseq.memory import check_training_memory
from moediffuseq.train import Trainer
from moediffuseq.train_config import TrainConfig, fit_warmup


@dataclass
class TrainingRun:
    data: str                      # a built-in corpus (pycode, pycode-body, aclsum) or a jsonl directory
    out: str | os.PathLike         # the run directory (model/, checkpoint/, metrics.csv, loss.png)
    model: Optional[MoEDiffuSeqConfig] = None  # default: that of init_from, else the tiny preset; vocab_size,
    # pad_id and special_ids are taken from the tokenizer
    train: TrainConfig = field(default_factory=TrainConfig)
    tokenizer: Optional[str | os.PathLike] = None  # an existing tokenizer.json (default: trained on the data)
    vocab_size: int = 8192         # of a trained tokenizer
    tokenizer_kind: str = "bpe"    # or "wordpiece"
    max_train_examples: Optional[int] = None
    skip_bad_lines: bool = False
    device: str = "auto"           # cpu, cuda, cuda:N or auto (the local GPU when there is one)
    resume: bool = False           # continue the run in ``out`` from its checkpoint
    overwrite: bool = False        # replace the run in ``out``
    allow_change: bool = False     # with resume: continue with a configuration that differs from the run's
    init_from: Optional[str | os.PathLike] = None  # a trained model directory to start from (its tokenizer too)


def auto_device() -> str:
    """The local GPU (``LOCAL_RANK`` under torchrun) when there is one, else the CPU."""
    if torch.cuda.is_available():
        return f"cuda:{os.environ.get('LOCAL_RANK', '0')}"
    return "cpu"


def data_dir(spec: str, rebuild: bool = False) -> Path:
    """A built-in corpus (built once and cached) or a directory holding train.jsonl."""
    from moediffuseq.data import build_corpus

    if spec in CORPORA:
        return build_corpus(spec, rebuild=rebuild)
    path = Path(spec)
    if not path.is_dir():
        raise ValueError(f"--data {spec!r} is neither a built-in corpus ({', '.join(CORPORA)}) nor a directory")
    if not (path / "train.jsonl").is_file():
        raise ValueError(f"--data: {path} has no train.jsonl")
    return path


def _data_record(config: TrainingRun, directory: Path) -> dict:
    record = {"data": config.data if config.data in CORPORA else str(directory.resolve()),
              "max_train_examples": config.max_train_examples, "skip_bad_lines": config.skip_bad_lines,
              "tokenizer": str(Path(config.tokenizer).resolve()) if config.tokenizer
              else f"trained {config.tokenizer_kind}, vocab_size {config.vocab_size}"}
    if config.init_from is not None:
        record["init_from"] = str(Path(config.init_from).resolve())
    return record


def run(config: TrainingRun) -> Path:
    """Trains ``config`` into ``config.out``; returns the directory of the final (EMA) model. The
    main process holds the run directory's lock (``moediffuseq.run_lock``) for the whole run."""
    from moediffuseq.run_lock import RunLock

    device = auto_device() if config.device == "auto" else config.device
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise ValueError(f"--out {out} is a file, not a directory")
    ctx = DistributedContext.from_environment(torch.device(device))
    if not ctx.is_main:
        return _run(config, device, out, ctx)
    with RunLock(out):
        return _run(config, device, out, ctx)


def _run(config: TrainingRun, device: str, out: Path, ctx: DistributedContext) -> Path:
    from moediffuseq.checkpoint import resume_checkpoint
    from moediffuseq.data import Seq2SeqDataset, TextTokenizer, read_jsonl, split_path
    from moediffuseq.run_dir import RUN_FILE, check_run_dir, config_changes, previous_config, write_json

    existing = check_run_dir(out, config.resume, config.overwrite, config.allow_change, config.tokenizer)
    if config.tokenizer and not Path(config.tokenizer).exists():
        raise FileNotFoundError(f"--tokenizer: file not found: {config.tokenizer}")
    if config.init_from is not None and config.tokenizer:
        raise ValueError("--init-from: the run takes the tokenizer of the model it starts from; drop --tokenizer")
    directory = data_dir(config.data) if ctx.is_main else None
    if ctx.world_size > 1:  # the corpus is built once, by the main process
        holder = [str(directory)]
        dist.broadcast_object_list(holder, src=0)
        directory = Path(holder[0])
    on_error = "skip" if config.skip_bad_lines else "raise"
    train_path = split_path(directory, "train")
    train_examples = read_jsonl(train_path, on_error).examples[:config.max_train_examples]
    if not train_examples:
        raise ValueError(f"--data: {train_path} holds no examples (empty, or only blank or skipped lines)")
    valid_path = split_path(directory, "valid")
    valid_examples = read_jsonl(valid_path, on_error).examples if valid_path.is_file() else None

    checkpoint = resume_checkpoint(out / "checkpoint") if config.resume else None
    run_tok = out / "tokenizer.json"
    if checkpoint is not None and (checkpoint / "tokenizer.json").is_file():
        tokenizer = TextTokenizer.load(checkpoint / "tokenizer.json")
    elif config.resume and run_tok.is_file():
        tokenizer = TextTokenizer.load(run_tok)
    elif config.init_from is not None:
        tokenizer = TextTokenizer.load(config.init_from)
    elif config.tokenizer:
        tokenizer = TextTokenizer.load(config.tokenizer)
    else:
        tokenizer = None
        if ctx.is_main:
            tokenizer = TextTokenizer.train((t for e in train_examples for t in (e.src, e.trg)), config.vocab_size,
                                            config.tokenizer_kind)
    if ctx.world_size > 1:
        holder = [tokenizer.tokenizer.to_str() if ctx.is_main else None]
        dist.broadcast_object_list(holder, src=0)
        if not ctx.is_main:
            from tokenizers import Tokenizer

            tokenizer = TextTokenizer(Tokenizer.from_str(holder[0]))
    special = tokenizer.special
    base = config.model
    if base is None:
        base = MoEDiffuSeqConfig.load(config.init_from) if config.init_from else MoEDiffuSeqConfig.preset("tiny")
    model_cfg = dataclasses.replace(base, vocab_size=len(tokenizer), pad_id=special.pad,
                                    special_ids=(special.cls, special.sep))
    train_cfg, warmup_note = fit_warmup(config.train)
    resolved = {"data": _data_record(config, directory), "model": dataclasses.asdict(model_cfg),
                "train": dataclasses.asdict(train_cfg)}
    if config.resume:
        before = previous_config(out)
        if warmup_note and (before.get("train") or {}).get("warmup_steps") == config.train.warmup_steps:
            train_cfg, warmup_note = config.train, None  # a run recorded with the long warm-up keeps its schedule
            resolved["train"] = dataclasses.asdict(train_cfg)
        changes = config_changes(before, resolved)
        if changes and not config.allow_change:
            raise ValueError(f"--resume: this command changes the run's configuration: {', '.join(changes)}; "
                             "repeat the run's options, or pass --allow-change to continue with the new values")
        if changes and ctx.is_main:
            print(f"--allow-change: continuing with {', '.join(changes)}")
    check_training_memory(model_cfg, train_cfg, device, len(train_examples) + len(valid_examples or ()))
    span = model_cfg.target_span
    train_set = Seq2SeqDataset(train_examples, tokenizer, model_cfg.max_len, span)
    valid_set = Seq2SeqDataset(valid_examples, tokenizer, model_cfg.max_len, span) if valid_examples else None
    torch.manual_seed(train_cfg.seed)
    model = MoEDiffuSeq(model_cfg)
    if config.init_from is not None and checkpoint is None:
        _load_initial_weights(model, Path(config.init_from))
    if train_cfg.batch_size * ctx.world_size > len(train_set):
        raise ValueError(f"--batch-size {train_cfg.batch_size} x {ctx.world_size} process(es) is more than the "
                         f"{len(train_set)} training examples")
    if config.overwrite and ctx.is_main:  # every check passed: the old run goes
        for path in existing:
            shutil.rmtree(path) if path.is_dir() else path.unlink()
    if ctx.is_main and (not config.resume or config.allow_change or not (out / RUN_FILE).is_file()):
        out.mkdir(parents=True, exist_ok=True)
        write_json(out / RUN_FILE, resolved)
    if ctx.is_main and not run_tok.is_file():
        tokenizer.save(out)
    if ctx.is_main:
        n_params = sum(p.numel() for p in model.parameters())
        print(f"data: {directory} ({len(train_set)} train, {len(valid_set) if valid_set else 0} valid; "
              f"{train_set.truncated} truncated to L={model_cfg.max_len})")
        cut = train_set.truncated_sources + (valid_set.truncated_sources if valid_set else 0)
        if span is not None and cut:  # one warning per run: a bounded span cuts long sources
            warnings.warn(f"{cut} source(s) longer than max_len - target_span - 2 = "
                          f"{source_budget(model_cfg.max_len, span)} tokens were truncated (max_len "
                          f"{model_cfg.max_len}, target_span {span}); raise max_len to keep them whole",
                          stacklevel=2)
        print(f"model: {n_params / 1e6:.2f} M parameters, {model_cfg.n_layers} layers x {model_cfg.d_model}, "
              f"attention={model_cfg.attention}, ffn={model_cfg.ffn}; device {device}, {ctx.world_size} process(es), "
              f"{'bf16 autocast' if train_cfg.bf16 else 'fp32'}"
              + (f"; initialised from {config.init_from}" if config.init_from is not None else ""))
        if config.resume and checkpoint is None:
            print(f"--resume: no checkpoint in {out} yet: the run starts again from step 0")
        if warmup_note:
            print(warmup_note)
    trainer = Trainer(model, tokenizer, train_set, valid_set, train_cfg, out, device)
    model_dir = trainer.fit(resume=checkpoint is not None, allow_change=config.allow_change)
    if ctx.is_main:
        print(f"model: {model_dir}\nmetrics: {out / 'metrics.csv'}")
        if (out / "loss.png").is_file():
            print(f"loss plot: {out / 'loss.png'}")
    return model_dir


def _load_initial_weights(model: MoEDiffuSeq, directory: Path) -> None:
    """The weights of a trained model directory, into a model of the same shapes."""
    trained = MoEDiffuSeq.from_pretrained(directory)
    try:
        model.load_state_dict(trained.state_dict())
    except RuntimeError as e:
        raise ValueError(f"--init-from {directory}: its weights do not fit this run's model configuration: "
                         f"{str(e).splitlines()[-1].strip()}") from None
