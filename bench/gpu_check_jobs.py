"""The GPU check's job runner and log (bench/gpu_check.py): commands run in their own process
groups, their output streamed line by line, stopped at a time limit (SIGTERM, then SIGKILL)."""
from __future__ import annotations

import datetime
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent  # jobs run in the repository root

KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this many seconds


@dataclass(frozen=True)
class Job:
    """One command of a stage, run in the repository root; ``env`` is added to the runner's."""

    label: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass
class JobResult:
    label: str
    rc: Optional[int] = None  # None: not started, or killed before it ended on its own
    timed_out: bool = False
    seconds: float = 0.0
    tail: list[str] = field(default_factory=list)  # its last lines of output

    @property
    def ok(self) -> bool:
        return self.rc == 0 and not self.timed_out

    def describe(self) -> str:
        """'ok', 'rc 1', 'signal SIGSEGV', 'killed after 12 s' or 'not started'."""
        if self.timed_out:
            return f"killed after {self.seconds:.0f} s"
        if self.rc is None:
            return "not started"
        if self.rc == 0:
            return "ok"
        if self.rc < 0:
            try:
                return f"signal {signal.Signals(-self.rc).name}"
            except ValueError:
                return f"signal {-self.rc}"
        return f"rc {self.rc}"


def job_note(result: JobResult, with_label: bool) -> str:
    """'[label ]outcome: last line of output'; a single job's outcome only when it failed by itself
    (the stage's status says ok or TIMEOUT)."""
    outcome = result.describe() if with_label or result.rc not in (0, None) else ""
    head = " ".join(part for part in (result.label if with_label else "", outcome) if part)
    last = result.tail[-1].strip() if result.tail else ""
    return ": ".join(part for part in (head, last) if part)


def _kill_group(proc: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(proc.pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop(procs: Sequence[subprocess.Popen], grace_s: float) -> None:
    """SIGTERM to each process group, SIGKILL after ``grace_s`` to the groups of leaders that still
    run, and to whatever is left of every group in any case."""
    for proc in procs:
        if proc.poll() is None:
            _kill_group(proc, signal.SIGTERM)
    end = time.monotonic() + grace_s
    while time.monotonic() < end and any(proc.poll() is None for proc in procs):
        time.sleep(0.02)
    for proc in procs:
        _kill_group(proc, signal.SIGKILL)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            pass


def run_jobs(
    jobs: Sequence[Job],
    emit: Callable[[str, str], None],
    *,
    parallel: int = 1,
    timeout_s: Optional[float] = None,
    job_timeout_s: Optional[float] = None,
    grace_s: float = KILL_GRACE_S,
    cwd: Path = ROOT,
    tail_lines: int = 5,
) -> list[JobResult]:
    """Runs ``jobs``, ``parallel`` at a time, each in its own process group with stdout and stderr
    merged and passed line by line to ``emit(label, line)``. A job running past ``job_timeout_s``
    from its start, or past ``timeout_s`` from the start of the whole call, is stopped; jobs not
    yet started by then are not started. Any exception (a signal turned into one by the caller
    included) stops every running job before it propagates."""
    start = time.monotonic()
    pending = list(jobs)
    results = {job.label: JobResult(job.label) for job in jobs}
    running: dict[str, tuple[subprocess.Popen, threading.Thread, float, deque]] = {}

    def reader(label: str, proc: subprocess.Popen, tail: deque) -> None:
        for raw in iter(proc.stdout.readline, b""):
            line = raw.decode("utf-8", errors="replace").rstrip("\r\n")
            tail.append(line)
            emit(label, line)
        proc.stdout.close()

    def finish(labels: Sequence[str], timed_out: bool) -> None:
        _stop([running[label][0] for label in labels], grace_s if timed_out else 0.0)
        for label in labels:
            proc, thread, began, tail = running.pop(label)
            thread.join(timeout=5)
            result = results[label]
            result.rc = None if timed_out else proc.returncode
            result.timed_out = timed_out
            result.seconds = time.monotonic() - began
            result.tail = [line for line in tail if line.strip()][-tail_lines:]

    try:
        while pending or running:
            overall_over = timeout_s is not None and time.monotonic() - start >= timeout_s
            if overall_over:
                pending.clear()
            while pending and len(running) < max(1, parallel):
                job = pending.pop(0)
                proc = subprocess.Popen(
                    list(job.argv), cwd=cwd, env={**os.environ, **job.env}, stdin=subprocess.DEVNULL,
                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True,
                )
                tail: deque = deque(maxlen=max(tail_lines, 20))
                thread = threading.Thread(target=reader, args=(job.label, proc, tail), daemon=True)
                thread.start()
                running[job.label] = (proc, thread, time.monotonic(), tail)
            now = time.monotonic()
            ended = [label for label, entry in running.items() if entry[0].poll() is not None]
            finish(ended, timed_out=False)
            late = [label for label, (_, _, began, _) in running.items()
                    if overall_over or (job_timeout_s is not None and now - began >= job_timeout_s)]
            finish(late, timed_out=True)
            time.sleep(0.02)
    finally:
        finish(list(running), timed_out=True)
    return [results[job.label] for job in jobs]


class Log:
    """One streamed log: every line timestamped, to stdout, to this call's log and to the history."""

    def __init__(self, path: Path, history: Path, start: float) -> None:
        self.start = start
        self.files = [open(path, "w", encoding="utf-8"), open(history, "a", encoding="utf-8")]
        self.lock = threading.Lock()

    def __call__(self, tag: str, text: str) -> None:
        now = datetime.datetime.now().strftime("%H:%M:%S")
        line = f"[{now} +{time.monotonic() - self.start:6.1f}s] [{tag}] {text}\n"
        with self.lock:
            sys.stdout.write(line)
            sys.stdout.flush()
            for handle in self.files:
                handle.write(line)
                handle.flush()

    def close(self) -> None:
        for handle in self.files:
            handle.close()
