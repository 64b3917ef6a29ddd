"""Fault injection: training runs interrupted by SIGINT (Ctrl-C) and killed by SIGKILL at random
moments (inside a step, inside a checkpoint write and its directory swap, in a validation,
the final one included, while writing a metrics row, in the final export, and after random
delays), each resumed with ``--resume`` until it finishes, must end bit-identical to an
uninterrupted run: the exported model, the final checkpoint (weights, EMA, optimizer, schedule,
data position, RNG) and every metrics row but the timings.

Each attempt is a forked child of one driver process (the moediffuseq import is paid once):
the child patches the chosen moment to signal itself and runs ``moediffuseq train``. Every moment
is hit by both signals, before or after it, on an occurrence drawn at random: the seed is drawn
afresh for every run of the test and printed (and named in any failure);
``MOEDIFFUSEQ_FAULT_SEED=<seed>`` replays a run's faults.
"""
import csv
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from utils import SMALL_MODEL_SET, write_reversal_corpus

DRIVER = r'''
import json, os, signal, sys, time
from pathlib import Path

import moediffuseq.checkpoint as checkpoint_module
from moediffuseq import cli, train
from moediffuseq.data.dataset import BatchStream
from moediffuseq.model import MoEDiffuSeq
from moediffuseq.run_log import RunLog

import nltk.translate.bleu_score  # imported here once rather than in every forked attempt
import torch._dynamo  # noqa: F401  (imported by the optimizer)

plan = json.loads(sys.argv[1])


def hook(name, fault):
    """Patches the moment ``name`` to send ``fault['signal']`` on its ``fault['nth']`` call."""
    calls = [0]

    def fire():
        calls[0] += 1
        if calls[0] == fault["nth"]:
            sig = {"INT": signal.SIGINT, "KILL": signal.SIGKILL}[fault["signal"]]
            for _ in range(fault.get("times", 1)):
                os.kill(os.getpid(), sig)

    def wrap(owner, attr):
        real = getattr(owner, attr)

        def patched(*args, **kwargs):
            if fault.get("after"):
                result = real(*args, **kwargs)
                fire()
                return result
            fire()
            return real(*args, **kwargs)

        setattr(owner, attr, patched)

    if name == "swap":  # between the renames of a checkpoint's directory swap
        class Os:
            def __getattr__(self, attr):
                return getattr(os, attr)

            def replace(self, a, b):
                if not fault.get("after"):
                    fire()
                os.replace(a, b)
                if fault.get("after"):
                    fire()

        checkpoint_module.os = Os()
        return
    owner, attr = {
        "step": (train.Trainer, "train_step"), "batch": (BatchStream, "next"),
        "backward": (train.Trainer, "_update_timestep_draw"), "update": (train.Trainer, "_update_ema"),
        "checkpoint": (train, "write_state"), "weights": (MoEDiffuSeq, "save_pretrained"),
        "validation": (train.Trainer, "validation_loss"), "bleu": (train.Trainer, "validation_bleu"),
        "metrics": (RunLog, "log"), "export": (train.Trainer, "_export"),
    }[name]
    wrap(owner, attr)


results = []
for attempt in plan["attempts"]:
    out = Path(attempt["out"])
    resume = (out / "run_config.json").is_file() or (out / "checkpoint").is_dir()
    argv = plan["argv"] + ["--out", str(out)] + (["--resume"] if resume else [])
    fault = attempt.get("fault")
    pid = os.fork()
    if pid == 0:
        sys.stdout = sys.stderr = open(os.devnull, "w")
        if fault and "at" in fault:
            hook(fault["at"], fault)
        rc = cli.main(argv)
        os._exit(rc)
    if fault and "after_s" in fault:
        time.sleep(fault["after_s"])
        try:
            os.kill(pid, {"INT": signal.SIGINT, "KILL": signal.SIGKILL}[fault["signal"]])
        except ProcessLookupError:
            pass
    begin = time.perf_counter()
    _, status = os.waitpid(pid, 0)
    code = os.waitstatus_to_exitcode(status)
    results.append({"out": str(out), "resume": resume, "fault": fault, "rc": code,
                    "seconds": time.perf_counter() - begin})
print(json.dumps(results))
'''

STEPS = 6
# events of one uninterrupted run and how often each happens: 6 steps, checkpoints at 2, 4 and 6
# (2 model directories each), validations at 3 and 6, one metrics row per step and validation
MOMENTS = {"step": STEPS, "batch": STEPS, "backward": STEPS, "update": STEPS, "checkpoint": 3, "weights": 7,
           "swap": 5, "validation": 2, "bleu": 2, "metrics": STEPS + 2, "export": 1}


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_reversal_corpus(tmp_path_factory.mktemp("corpus"), {"train": 64, "valid": 8})


def run_driver(plan):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    result = subprocess.run([sys.executable, "-c", DRIVER, json.dumps(plan)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def schedule(rng, tmp_path, duration):
    """Scenarios: lists of faults, each followed by a resume; the last attempt runs undisturbed."""
    scenarios = []
    # every moment with each signal, at a random occurrence, before or after it
    for moment, count in MOMENTS.items():
        for signal_ in ("INT", "KILL"):
            scenarios.append([{"at": moment, "nth": rng.randint(1, count), "signal": signal_,
                               "after": rng.random() < 0.5}])
    # Ctrl-C twice inside a step (the step is cut short: no checkpoint, the last one stands)
    scenarios.append([{"at": "backward", "nth": rng.randint(2, STEPS), "signal": "INT", "times": 2}])
    # SIGKILL between the two renames of a checkpoint swap: the previous checkpoint moved aside as
    # checkpoint.old, the new one not yet in place (os.replace calls 2 and 4 are those moves)
    scenarios.append([{"at": "swap", "nth": rng.choice([2, 4]), "signal": "KILL", "after": True}])
    # a chain: two faults in a row, the second in the resumed run
    scenarios.append([{"at": "checkpoint", "nth": 2, "signal": "KILL"},
                      {"at": "validation", "nth": 1, "signal": "INT"}])
    # random delays
    for signal_ in ("INT", "KILL", "KILL"):
        scenarios.append([{"after_s": round(rng.uniform(0.0, duration), 3), "signal": signal_}])
    attempts = []
    for i, faults in enumerate(scenarios):
        out = str(tmp_path / f"scenario{i:02d}")
        attempts += [{"out": out, "fault": f} for f in faults] + [{"out": out}]
    return scenarios, attempts


def fault_seed() -> int:
    """MOEDIFFUSEQ_FAULT_SEED when set (to replay a run), else a fresh seed from the OS."""
    value = os.environ.get("MOEDIFFUSEQ_FAULT_SEED", "")
    if not value:
        return random.SystemRandom().randrange(2**32)
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"MOEDIFFUSEQ_FAULT_SEED must be an integer, got {value!r}") from None


def outcome(out: Path):
    """What must be identical: exported model files, checkpoint tensors and state, metrics rows."""
    files = {name: (out / name).read_bytes() for name in ("model/model.safetensors", "model/config.json",
                                                          "model/tokenizer.json", "model/generation.json",
                                                          "tokenizer.json", "run_config.json")}
    ckpt = out / "checkpoint"
    tensors = {f"{d}/{k}": v for d in ("model", "ema") for k, v in load_file(ckpt / d / "model.safetensors").items()}
    state = torch.load(ckpt / "trainer_state.pt", weights_only=True)
    with open(out / "metrics.csv") as f:
        rows = [{k: v for k, v in r.items() if k not in ("tokens_per_s", "elapsed_s")} for r in csv.DictReader(f)]
    return files, tensors, state, sorted(rows, key=lambda r: (int(r["step"]), r["split"]))


def assert_same_state(a, b, where=""):
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and a.dtype == b.dtype and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for k in a:
            assert_same_state(a[k], b[k], f"{where}/{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


def test_interrupted_and_killed_runs_resume_to_the_uninterrupted_result(corpus, tmp_path):
    argv = ["train", "--data", str(corpus), "--seq-len", "24", "--vocab-size", "120", *SMALL_MODEL_SET, "--steps",
            str(STEPS), "--batch-size", "8", "--lr", "3e-3", "--warmup-steps", "2", "--log-every", "1",
            "--eval-every", "3", "--save-every", "2", "--bleu-examples", "2", "--no-progress", "--device", "cpu"]
    reference = run_driver({"argv": argv, "attempts": [{"out": str(tmp_path / "reference")}]})
    assert reference[0]["rc"] == 0
    seed = fault_seed()
    print(f"fault moments drawn with seed {seed} (MOEDIFFUSEQ_FAULT_SEED={seed} replays them)")
    scenarios, attempts = schedule(random.Random(seed), tmp_path, reference[0]["seconds"])
    results = run_driver({"argv": argv, "attempts": attempts})
    expected = outcome(tmp_path / "reference")
    by_out = {}
    for r in results:
        by_out.setdefault(r["out"], []).append(r)
    for i, faults in enumerate(scenarios):
        out = tmp_path / f"scenario{i:02d}"
        runs = by_out[str(out)]
        what = f"MOEDIFFUSEQ_FAULT_SEED={seed} scenario {i} {faults}: {[(r['rc'], r['resume']) for r in runs]}"
        for r in runs[:-1]:  # a fault ends a run with Ctrl-C's 130, SIGKILL's -9, or not at all
            assert r["rc"] in (0, 130, -9), what
        assert runs[-1]["rc"] == 0, what
        files, tensors, state, rows = outcome(out)
        assert files == expected[0], what
        assert_same_state(tensors, expected[1], what)
        assert_same_state(state, expected[2], what)
        assert rows == expected[3], what
        assert not [p.name for p in out.iterdir() if p.name.startswith(".") or p.name.endswith(".tmp")], what
    # every fault at a moment of the run interrupted it (a random delay may come after the end)
    missed = [r["fault"] for r in results if r["fault"] and "at" in r["fault"] and r["rc"] == 0]
    assert not missed, (f"MOEDIFFUSEQ_FAULT_SEED={seed}", missed)
