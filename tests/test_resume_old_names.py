"""Runs written before the timestep draw had its name (trainer state key "step_sampler", train
field "timestep_sampler") resume as they were, and a config file may still use the old field."""
import json
import shutil

import torch

from moediffuseq.checkpoint import STATE_FILE, read_state
from moediffuseq.cli import build_parser, train_configs
from moediffuseq.data.tokenizer import SpecialIds
from moediffuseq.model import MoEDiffuSeq, MoEDiffuSeqConfig
from moediffuseq.run_dir import RUN_FILE
from moediffuseq.train import TrainConfig
from moediffuseq.train_run import TrainingRun, run

SHAPE = dict(max_len=24, n_layers=1, d_model=32, n_heads=2, d_emb=16, window=4, num_experts=2, d_expert=32,
             diffusion_steps=100)


def _corpus(directory):
    words = "alpha beta gamma delta epsilon zeta".split()
    lines = [json.dumps({"src": f"{words[i % 6]} {words[(i + 1) % 6]}", "trg": words[(i + 2) % 6]}) for i in range(24)]
    (directory / "train.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def _to_old_names(checkpoint, out):
    """Rewrites a checkpoint and its run's run_config.json as they were written before the rename."""
    state = torch.load(checkpoint / STATE_FILE, weights_only=True)
    state["step_sampler"] = state.pop("timestep_draw")
    torch.save(state, checkpoint / STATE_FILE)
    for path, section in ((checkpoint / "train_config.json", None), (out / RUN_FILE, "train")):
        record = json.loads(path.read_text())
        fields = record[section] if section else record
        fields["timestep_sampler"] = fields.pop("timestep_draw")
        path.write_text(json.dumps(record, indent=2) + "\n")
    (checkpoint / "checksums.json").unlink()  # checkpoints of that release had no checksums


def test_a_checkpoint_written_before_the_rename_resumes_exactly(tmp_path):
    data = _corpus(tmp_path)
    cfg = TrainConfig(steps=4, batch_size=8, warmup_steps=1, eval_every=0, eval_batches=0, bleu_examples=0,
                      save_every=2, keep_checkpoints=2, timestep_draw="loss-aware", progress=False)
    out = tmp_path / "run"
    model = MoEDiffuSeqConfig.preset("tiny", **SHAPE)
    run(TrainingRun(str(data), out, model, cfg, vocab_size=60, device="cpu"))
    straight = read_state(out / "checkpoint")
    straight_weights = MoEDiffuSeq.from_pretrained(out / "model").state_dict()
    assert straight["timestep_draw"]["counts"].sum() > 0
    # back to step 2, with the names of the earlier release
    shutil.rmtree(out / "checkpoint")
    shutil.rmtree(out / "model")
    _to_old_names(out / "checkpoint-00000002", out)
    assert "step_sampler" in read_state(out / "checkpoint-00000002")
    run(TrainingRun(str(data), out, model, cfg, vocab_size=60, device="cpu", resume=True))
    resumed = read_state(out / "checkpoint")
    assert resumed["step"] == 4
    for key in ("losses", "counts"):
        assert torch.equal(resumed["timestep_draw"][key], straight["timestep_draw"][key])
    for (name, a), b in zip(straight_weights.items(), MoEDiffuSeq.from_pretrained(out / "model").state_dict().values()):
        assert torch.equal(a, b), name


def test_a_config_file_may_name_the_old_field(tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps({"train": {"timestep_sampler": "loss-aware"}}))
    args = build_parser().parse_args(["train", "--data", "x", "--out", "y", "--config", str(config)])
    _, train_cfg = train_configs(args, 100, SpecialIds(0, 1, 2, 3))
    assert train_cfg.timestep_draw == "loss-aware"
