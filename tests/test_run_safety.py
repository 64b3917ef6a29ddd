"""A run directory under real operations: one writer at a time (the lock, two writers and a
resume on a live run), preemption by SIGTERM (a real signal: checkpoint, exit 143, exact
resume), --overwrite removing everything the run owns, checkpoint files verified on resume, a
full disk named as such."""
import errno
import io
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from moediffuseq.cli import main
from moediffuseq.run_dir import run_files

LOCK_FILE = ".lock"  # moediffuseq.run_lock.LOCK_FILE

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--seq-len", "24", "--set", "n_layers=1", "--set", "d_model=32", "--set", "n_heads=2", "--set", "d_emb=16",
        "--set", "window=4", "--set", "num_experts=2", "--set", "d_expert=32", "--set", "diffusion_steps=100",
        "--vocab-size", "60", "--batch-size", "8", "--warmup-steps", "1", "--bleu-examples", "0", "--no-progress",
        "--device", "cpu"]


def corpus(directory: Path) -> Path:
    words = "alpha beta gamma delta epsilon zeta".split()
    lines = [json.dumps({"src": f"{words[i % 6]} {words[(i + 1) % 6]}", "trg": words[(i + 2) % 6]}) for i in range(24)]
    directory.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        (directory / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    return directory


def train_argv(data, out, *extra):
    return ["train", "--data", str(data), "--out", str(out), *TINY, *extra]


def spawn(argv):
    env = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    return subprocess.Popen([sys.executable, "-m", "moediffuseq", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env, cwd=ROOT)


def train_rows(out: Path) -> list[int]:
    path = out / "metrics.csv"
    if not path.is_file():
        return []
    return [int(line.split(",")[0]) for line in path.read_text().splitlines()[1:]
            if line.count(",") > 5 and line.split(",")[1] == "train"]


def wait_for_rows(out: Path, n: int, proc, timeout: float = 120.0) -> None:
    end = time.monotonic() + timeout
    while len(train_rows(out)) < n:
        assert proc.poll() is None, proc.communicate()
        assert time.monotonic() < end, "the run logged no rows in time"
        time.sleep(0.05)


# ------------------------------------------------------------------------------------- the lock

def test_the_lock_refuses_a_second_holder_naming_the_pid_and_is_released(tmp_path):
    from moediffuseq.run_lock import RunDirectoryBusy, RunLock

    out = tmp_path / "run"
    with RunLock(out):
        record = json.loads((out / LOCK_FILE).read_text())
        assert record["pid"] == os.getpid()
        with pytest.raises(RunDirectoryBusy, match=rf"in use by another training run \(pid {os.getpid()}"):
            RunLock(out).acquire()
    assert not (out / LOCK_FILE).exists()
    assert not out.exists()  # created for the lock, nothing written: removed again
    with RunLock(out):  # free again
        pass


def test_a_lock_of_a_killed_process_is_taken_over(tmp_path):
    from moediffuseq.run_lock import RunDirectoryBusy, RunLock

    out = tmp_path / "run"
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from moediffuseq.run_lock import RunLock; "
            f"RunLock({str(out)!r}).acquire(); print('held', flush=True); time.sleep(60)")
    holder = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    with pytest.raises(RunDirectoryBusy, match=f"pid {holder.pid}"):
        RunLock(out).acquire()
    holder.kill()
    holder.wait()
    assert json.loads((out / LOCK_FILE).read_text())["pid"] == holder.pid  # the stale file is still there
    with RunLock(out) as lock:
        assert lock.previous["pid"] == holder.pid
        assert json.loads((out / LOCK_FILE).read_text())["pid"] == os.getpid()


def test_two_writers_and_a_resume_on_a_live_run(tmp_path, capsys):
    """Two runs started together into one directory: one trains, the other is refused naming it;
    then a resume and an --overwrite while the run is still going are refused; the run, stopped
    by SIGTERM, has one consecutive metrics row per step up to its checkpoint."""
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    argv = train_argv(data, out, "--steps", "100000", "--log-every", "1", "--eval-every", "0")
    procs = {p.pid: p for p in (spawn(argv), spawn(argv))}
    try:
        end = time.monotonic() + 180
        while not (out / LOCK_FILE).is_file() or "pid" not in (out / LOCK_FILE).read_text():
            assert time.monotonic() < end, "no run took the lock"
            assert all(p.poll() is None or p.returncode == 2 for p in procs.values()), "a run ended"
            time.sleep(0.02)
        holder_pid = json.loads((out / LOCK_FILE).read_text())["pid"]
        live, other = procs[holder_pid], next(p for pid, p in procs.items() if pid != holder_pid)
        _, err = other.communicate(timeout=180)
        assert other.returncode == 2, err
        assert err.strip().splitlines()[-1].startswith(f"error: --out {out} is in use by another training run "
                                                       f"(pid {holder_pid}")
        wait_for_rows(out, 3, live)
        for extra in (["--resume"], ["--overwrite"]):
            capsys.readouterr()
            assert main(argv + extra) == 2
            assert f"in use by another training run (pid {holder_pid}" in capsys.readouterr().err
        assert live.poll() is None  # refused while the run was live
        live.send_signal(signal.SIGTERM)
        _, err = live.communicate(timeout=180)
        assert live.returncode == 143, err
    finally:
        for p in procs.values():
            if p.poll() is None:
                p.kill()
                p.communicate()
    step = json.loads((out / "checkpoint" / "step.json").read_text())["step"]
    assert train_rows(out) == list(range(1, step + 1))
    assert json.loads((out / "run_config.json").read_text())["train"]["steps"] == 100000
    assert not (out / LOCK_FILE).exists()


# ------------------------------------------------------------------------------------- SIGTERM

def test_sigterm_checkpoints_the_last_step_and_exits_143_then_resume_continues(tmp_path):
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    argv = train_argv(data, out, "--steps", "100000", "--log-every", "1", "--eval-every", "0")
    proc = spawn(argv)  # --save-every: the default 1000, never reached
    try:
        wait_for_rows(out, 5, proc)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 143, stderr
    step = json.loads((out / "checkpoint" / "step.json").read_text())["step"]
    assert step >= 5 and train_rows(out)[-1] == step
    assert f"terminated (SIGTERM) at step {step}: checkpoint saved" in stdout
    assert not (out / LOCK_FILE).exists()
    assert main(train_argv(data, out, "--steps", str(step + 3), "--log-every", "1", "--eval-every", "0",
                           "--resume", "--allow-change")) == 0
    assert train_rows(out) == list(range(1, step + 4))


def test_sigterm_inside_a_step_waits_for_the_step():
    from moediffuseq.interrupts import HeldInterrupts, Terminated, exit_status

    done = []
    with pytest.raises(Terminated) as caught:
        with HeldInterrupts() as interrupts:
            with interrupts.held():
                os.kill(os.getpid(), signal.SIGTERM)
                done.append("the step ended")
    assert done == ["the step ended"] and exit_status(caught.value) == 143
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL


# ----------------------------------------------------------------------------------- overwrite

def test_overwrite_removes_everything_the_run_owns_best_model_too(tmp_path):
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_argv(data, out, "--steps", "2", "--eval-every", "1", "--keep-best")) == 0
    assert (out / "best_model").is_dir()
    assert sorted(p.name for p in run_files(out)) == sorted(p.name for p in out.iterdir())
    # an old best that the new run can never beat: kept, it would be exported as the new run's model
    record = json.loads((out / "best_model" / "best.json").read_text())
    (out / "best_model" / "best.json").write_text(json.dumps({**record, "value": 1e9}))
    assert main(train_argv(data, out, "--steps", "1", "--eval-every", "1", "--keep-best", "--overwrite")) == 0
    assert json.loads((out / "best_model" / "best.json").read_text())["step"] == 1
    from safetensors.torch import load_file

    exported = load_file(out / "model" / "model.safetensors")
    best = load_file(out / "best_model" / "model.safetensors")
    assert all(torch.equal(exported[k], best[k]) for k in best)


def test_a_refused_overwrite_deletes_nothing(tmp_path):
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_argv(data, out, "--steps", "1", "--eval-every", "0")) == 0
    before = sorted(p.name for p in out.iterdir())
    assert main(train_argv(data, out, "--steps", "1", "--overwrite", "--seq-len", "1048576")) == 2
    assert sorted(p.name for p in out.iterdir()) == before


# --------------------------------------------------------------------------------- checkpoints

def test_a_swapped_or_missing_checkpoint_file_is_refused_by_name(tmp_path, capsys):
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    argv = train_argv(data, out, "--steps", "2", "--eval-every", "0")
    assert main(argv) == 0
    ckpt = out / "checkpoint"
    assert set(json.loads((ckpt / "checksums.json").read_text())) == {
        "model/config.json", "model/model.safetensors", "ema/config.json", "ema/model.safetensors",
        "tokenizer.json", "trainer_state.pt", "train_config.json", "step.json"}
    weights, ema = ckpt / "model" / "model.safetensors", ckpt / "ema" / "model.safetensors"
    original = weights.read_bytes()
    weights.write_bytes(ema.read_bytes())  # same names and shapes, other values
    resume = train_argv(data, out, "--steps", "3", "--eval-every", "0", "--resume", "--allow-change")
    capsys.readouterr()
    assert main(resume) == 2
    assert f"error: {weights} does not match the checksum" in capsys.readouterr().err
    weights.write_bytes(original)
    (ckpt / "trainer_state.pt").unlink()
    assert main(resume) == 2
    err = capsys.readouterr().err
    assert f"error: {ckpt} has no trainer_state.pt: the checkpoint is incomplete or damaged" in err
    assert train_rows(out)[-1] == 2  # nothing started over


class _FullDisk(io.RawIOBase):
    """A file that takes ``room`` bytes, then fails as a full device does."""

    def __init__(self, target, room: int) -> None:
        self.target, self.room = target, room

    def writable(self) -> bool:
        return True

    def write(self, data) -> int:
        if len(data) > self.room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self.room -= len(data)
        return self.target.write(data)


def test_a_full_disk_during_a_checkpoint_is_named_and_the_previous_one_kept(tmp_path, capsys, monkeypatch):
    data = corpus(tmp_path / "data")
    out = tmp_path / "run"
    assert main(train_argv(data, out, "--steps", "2", "--eval-every", "0")) == 0
    real_save = torch.save

    def save_on_a_full_disk(obj, f, *args, **kwargs):
        target = open(f, "wb") if isinstance(f, (str, os.PathLike)) else f
        return real_save(obj, _FullDisk(target, 4096), *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_on_a_full_disk)
    capsys.readouterr()
    assert main(train_argv(data, out, "--steps", "4", "--eval-every", "0", "--resume", "--allow-change")) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1
    assert "no space left on the device while writing" in err and f"{out / 'checkpoint'} is kept as it was" in err
    assert json.loads((out / "checkpoint" / "step.json").read_text())["step"] == 2
    assert not [p for p in out.iterdir() if ".tmp-" in p.name]
    monkeypatch.setattr(torch, "save", real_save)
    assert main(train_argv(data, out, "--steps", "4", "--eval-every", "0", "--resume", "--allow-change")) == 0
