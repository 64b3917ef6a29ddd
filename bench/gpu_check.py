"""The GPU check runner: stages as data, one global deadline, one streamed log, a summary that is
always written, and resumption across calls on the same machine. ``bench/gpu_check.sh`` says how
to run it on a Hopper machine and which wheels to carry; ``python bench/gpu_check.py --list``
prints the stages.

Time. The run has one wall-clock deadline (``--deadline``, env ``DEADLINE``, default 540 s,
the build included). A stage runs for at most min(its limit, time left - 30 s); when that is
under a second the stage is skipped. A stage still running at that point has its process group
sent SIGTERM, then SIGKILL after a grace period, and the run goes on with the next stage (which
usually finds no time left and is skipped). The summary is rewritten when each stage starts and
ends and when the runner itself is stopped (SIGTERM, SIGINT, SIGHUP), so a run cut short still
says how far it got.

Outputs, in the results directory (``--results``, env ``RESULTS_DIR``, default ``$OUT``, else
bench/out/gpu), four files and no folder:
  gpu_check.log   this call's streamed log, each line "[time +elapsed] [stage/job] text";
  summary.md      the key lines of every table, then one row per stage (status, seconds, budget);
  state.json      the stages' statuses across calls (a copy of the work directory's);
  tables.tar.gz   tables/ (every table the stages wrote, Markdown, CSV, JUnit XML), the log of
                  every call on this machine (history.log), state.json and summary.md;
                  refreshed after every stage.
The work directory (``--work-dir``, env ``GPU_CHECK_WORK_DIR``, default build/gpu_check, out of
git) holds what outlives a call on a warm machine: tables/, state.json, history.log, the CMake
build tree, the site directory of the carried wheels and the hash of the last build's sources.

Resumption. A stage that ended ok is not run again by a later call unless it is named in
``--stages`` (env ``STAGES``) or ``--force`` (env ``FORCE=1``) is given; "environment" runs in
every call. When the code under test (csrc/, cmake/, moediffuseq/, the build files) changes, the
earlier statuses are dropped. The build stage itself skips compiling when the extension is
present and the hash of its sources and build settings matches the last successful build.

Dry run (CI, tests/test_gpu_check.py): ``--fake SPEC`` (env ``GPU_CHECK_FAKE``) replaces every
job's command with ``gpu_check.py fake MODE``: SPEC is "1" (all ok) or "stage=mode,..." with
mode ok, fail, crash (SIGSEGV), hang, or hang-noterm (ignores SIGTERM); ``--limits
"stage=seconds,..."`` (env ``GPU_CHECK_LIMITS``) overrides limits and ``GPU_CHECK_KILL_GRACE``
the SIGTERM-to-SIGKILL grace; ``GPU_CHECK_CODE_HASH`` stands in for the hash of the code under test.

The subcommands env, build and archs are the bodies of those stages, run as child processes.
"""
from __future__ import annotations

import argparse
import datetime
import hashlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tarfile
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence

ROOT = Path(__file__).resolve().parent.parent
THIS = Path(__file__).resolve()

DEFAULT_DEADLINE_S = 540.0
MARGIN_S = 30.0  # kept free before the deadline: the summary, the archive, the tool's transfers
MIN_STAGE_S = 1.0  # a stage with less time than this is skipped
KILL_GRACE_S = 5.0  # SIGTERM, then SIGKILL after this many seconds
CUDA_ARCH_LIST = "9.0a"  # TORCH_CUDA_ARCH_LIST of the build: sm_90a code only
CUDA_ARCHS = "90a"  # what cmake/check_cuda_archs.py must find in the .so, and nothing else

LOG_NAME, SUMMARY_NAME, STATE_NAME, ARCHIVE_NAME = "gpu_check.log", "summary.md", "state.json", "tables.tar.gz"
RESULT_FILES = (LOG_NAME, SUMMARY_NAME, STATE_NAME, ARCHIVE_NAME)
ARCHIVE_SUFFIXES = frozenset({".md", ".csv", ".xml", ".json", ".log", ".txt"})
ARCHIVE_MAX_FILE_BYTES = 4 << 20

# The code under test: a change here makes earlier stage results stale.
CODE_PATHS = ("csrc", "cmake", "moediffuseq", "CMakeLists.txt", "setup.py", "pyproject.toml")
# What the compiled extension depends on.
BUILD_PATHS = ("csrc", "cmake", "CMakeLists.txt", "setup.py", "pyproject.toml")
SOURCE_SUFFIXES = frozenset({".py", ".cpp", ".cc", ".c", ".cu", ".cuh", ".h", ".hpp", ".cmake", ".toml", ".in"})

# CUDA tests: one pytest process per file (a crash in one file hides nothing in the others), all
# at once; "-k cuda" keeps the CUDA cases. test_build.py runs whole (it checks the build info).
CUDA_TEST_FILES = ("test_block_sparse_attention.py", "test_moe_topk_softmax.py", "test_moe_ffn.py",
                   "test_soft_absorb_q_sample.py", "test_denoise_step.py")

FAKE_MODES = ("ok", "fail", "crash", "hang", "hang-noterm")


# ---------------------------------------------------------------------------------------------
# Stages as data

@dataclass(frozen=True)
class Job:
    """One command of a stage, run in the repository root; ``env`` is added to the runner's."""

    label: str
    argv: tuple[str, ...]
    env: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Stage:
    """A named step: its jobs run ``parallel`` at a time within ``limit_s`` seconds; it runs only
    when every stage in ``needs`` ended ok (in this call or an earlier one)."""

    name: str
    limit_s: float
    jobs: tuple[Job, ...]
    needs: tuple[str, ...] = ()
    parallel: int = 1
    always: bool = False  # run in every call, whatever the state says
    doc: str = ""


def pytest_job(label: str, path: str, tables: Path, python: str, threads: int, select_cuda: bool = True) -> Job:
    """A pytest run of one test file under the ``gpu`` hypothesis profile, a JUnit XML into tables/
    (``threads``: CPU threads of its torch, as several files run at once)."""
    argv = [python, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rfEs", "--tb=short",
            "-o", "faulthandler_timeout=120", f"--junitxml={tables / f'junit_{label}.xml'}"]
    if select_cuda:
        argv += ["-k", "cuda"]
    return Job(label, tuple(argv + [path]), {"MOEDIFFUSEQ_HYPOTHESIS_PROFILE": "gpu", "OMP_NUM_THREADS": str(threads)})


def stages(python: str, tables: Path) -> list[Stage]:
    """The stages of a GPU check, in order."""
    me, out = str(THIS), str(tables)

    def job(label: str, *argv: str) -> tuple[Job, ...]:
        return (Job(label, (python, *argv)),)

    threads = max(1, (os.cpu_count() or 1) // (len(CUDA_TEST_FILES) + 1))
    tests = [pytest_job(f.removeprefix("test_").removesuffix(".py"), f"tests/{f}", tables, python, threads)
             for f in CUDA_TEST_FILES]
    tests.append(pytest_job("build_info", "tests/test_build.py", tables, python, threads, select_cuda=False))
    return [
        Stage("environment", 60, job("env", me, "env"), always=True,
              doc="GPU, driver, toolchain, torch; installs the carried wheels; fails without CUDA or CUTLASS"),
        Stage("build", 300, job("build", me, "build"), needs=("environment",),
              doc=f"MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST}, all cores; skipped when up to date"),
        Stage("archs", 30, job("archs", me, "archs"), needs=("build",),
              doc=f"cmake/check_cuda_archs.py: the .so holds sm_{CUDA_ARCHS} code only"),
        Stage("smoke", 150, job("smoke", "bench/gpu_smoke.py", "--device", "cuda", "--out", out), needs=("build",),
              doc="every op forward and backward once against its reference, each op in its own process"),
        Stage("tests", 180, tuple(tests), needs=("build",), parallel=len(tests),
              doc="CUDA tests, hypothesis profile gpu, one process per file"),
        Stage("bench_attention", 180,
              job("attention", "bench/attention.py", "--device", "cuda", "--lengths", "8192", "32768",
                  "--repeats", "5", "--cell-seconds", "3", "--out", out), needs=("build",),
              doc="L = 8192 and 32768, a table line per length"),
        Stage("bench_moe", 150,
              job("moe", "bench/moe.py", "--device", "cuda", "--repeats", "5", "--profile-steps", "2", "--out", out),
              needs=("build",), doc="asserts the CUTLASS grouped GEMM kernels ran and no cuBLAS GEMM inside the op"),
        Stage("bench_denoise_step", 120,
              job("denoise_step", "bench/denoise_step.py", "--device", "cuda", "--sizes", "1e7", "1e8",
                  "--repeats", "20", "--out", out), needs=("build",), doc="1e7 and 1e8 elements"),
        Stage("end_to_end", 180,
              job("end_to_end", "bench/end_to_end.py", "--device", "cuda", "--lengths", "1024", "--steps", "3",
                  "--ddpm-probe", "5", "--quality-minutes", "0.25", "--out", out), needs=("build",),
              doc="short training and sampling, MoE-DiffuSeq vs DiffuSeq"),
    ]


def stage_budget(limit_s: float, left_s: float, margin_s: float = MARGIN_S) -> float:
    """Seconds a stage may run: its own limit, or the time left before the deadline less the
    margin, whichever is smaller (negative when the margin is already eaten into)."""
    return min(limit_s, left_s - margin_s)


# ---------------------------------------------------------------------------------------------
# Running jobs

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


# ---------------------------------------------------------------------------------------------
# Log, state, summary, archive

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


def tree_hash(paths: Sequence[str], extra: Sequence[str] = (), root: Path = ROOT) -> str:
    """sha256 over the relative paths and contents of the source files under ``paths``."""
    digest = hashlib.sha256()
    for name in paths:
        top = root / name
        files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
        for path in files:
            if path.suffix not in SOURCE_SUFFIXES and path.name != "CMakeLists.txt":
                continue
            if "__pycache__" in path.parts:
                continue
            digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes() + b"\0")
    for item in extra:
        digest.update(item.encode() + b"\0")
    return digest.hexdigest()


def write_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def table_lines(tables: Path, max_lines: int = 60) -> list[str]:
    """The table rows and PASS/FAIL lines of every Markdown table in ``tables``, file by file."""
    out: list[str] = []
    for md in sorted(tables.glob("*.md")):
        lines = [line for line in md.read_text(encoding="utf-8", errors="replace").splitlines()
                 if line.startswith("|") or re.match(r"^- (PASS|FAIL)\b", line)]
        if lines:
            out += [f"### {md.name}", ""] + lines[:max_lines] + [""]
    return out


def write_archive(path: Path, work: Path, members: Sequence[str]) -> None:
    """``members`` of the work directory (files, or folders taken file by file) into a tar.gz,
    text results only, each at most ARCHIVE_MAX_FILE_BYTES."""
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for name in members:
            top = work / name
            files = [top] if top.is_file() else sorted(p for p in top.rglob("*") if p.is_file())
            for file in files:
                if file.suffix in ARCHIVE_SUFFIXES and file.stat().st_size <= ARCHIVE_MAX_FILE_BYTES:
                    tar.add(file, arcname=str(file.relative_to(work)))
    os.replace(tmp, path)


@dataclass
class Record:
    """What happened to a stage in this call."""

    status: str  # ok, FAIL, TIMEOUT, killed, running, skipped, not selected, ok (earlier call)
    seconds: float = 0.0
    budget_s: Optional[float] = None
    note: str = ""


class Stopped(Exception):
    """The runner received a signal asking it to stop."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


class Runner:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.start = time.monotonic()
        self.deadline = self.start + args.deadline
        self.started_at = datetime.datetime.now(datetime.timezone.utc)
        self.results: Path = args.results
        self.work: Path = args.work_dir
        self.tables = self.work / "tables"
        for folder in (self.results, self.work, self.tables, Path(os.environ["SITE_DIR"])):
            folder.mkdir(parents=True, exist_ok=True)
        self.stages = stages(args.python, self.tables)
        limits = parse_pairs(args.limits, float)
        fake = parse_fake(args.fake)
        names = {stage.name for stage in self.stages}
        unknown = (set(limits) | set(fake or {}) | set(args.stages or ())) - names
        if unknown:
            raise SystemExit(f"gpu_check: unknown stage(s) {', '.join(sorted(unknown))}; stages: {', '.join(names)}")
        self.stages = [self.adjust(stage, limits.get(stage.name), fake) for stage in self.stages]
        self.grace = float(os.environ.get("GPU_CHECK_KILL_GRACE", KILL_GRACE_S))
        self.log = Log(self.results / LOG_NAME, self.work / "history.log", self.start)
        self.code_hash = os.environ.get("GPU_CHECK_CODE_HASH") or tree_hash(CODE_PATHS)
        self.state = self.load_state()
        self.records: dict[str, Record] = {}
        self.stopped: Optional[str] = None

    def adjust(self, stage: Stage, limit: Optional[float], fake: Optional[dict[str, str]]) -> Stage:
        """The stage with its limit overridden and, in a dry run, its commands faked."""
        changes: dict = {}
        if limit is not None:
            changes["limit_s"] = limit
        if fake is not None:
            mode = fake.get(stage.name, "ok")
            changes["jobs"] = tuple(
                Job(job.label, (sys.executable, str(THIS), "fake", mode, "--stage", stage.name, "--label", job.label,
                                "--tables", str(self.tables)))
                for job in stage.jobs)
        return Stage(**{**stage.__dict__, **changes}) if changes else stage

    # state ----------------------------------------------------------------------------------
    def load_state(self) -> dict:
        path = self.work / STATE_NAME
        try:
            state = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            state = {}
        if state.get("code_hash") != self.code_hash:
            if state:  # tables of other code: not this code's results
                shutil.rmtree(self.tables, ignore_errors=True)
                self.tables.mkdir(parents=True, exist_ok=True)
            state = {"code_hash": self.code_hash, "stages": {}}
        return state

    def earlier_ok(self, name: str) -> bool:
        return self.state["stages"].get(name, {}).get("status") == "ok"

    def is_ok(self, name: str) -> bool:
        record = self.records.get(name)
        if record is not None and record.status in ("ok", "ok (earlier call)"):
            return True
        return (record is None or record.status == "not selected") and self.earlier_ok(name)

    # outputs --------------------------------------------------------------------------------
    def left(self) -> float:
        return self.deadline - time.monotonic()

    def summary(self) -> str:
        elapsed = time.monotonic() - self.start
        head = [
            "# GPU check summary",
            "",
            f"- call started {self.started_at:%Y-%m-%d %H:%M:%S} UTC; deadline {self.args.deadline:.0f} s "
            f"(stages stop {MARGIN_S:.0f} s before it); elapsed {elapsed:.0f} s"
            + (f"; stopped by {self.stopped}" if self.stopped else ""),
            f"- results in {self.results}: {', '.join(RESULT_FILES)}; work directory {self.work}",
            "- a stage that ended ok is skipped by the next call on this machine (STAGES=name reruns it)",
            "",
        ]
        rows = ["| stage | status | seconds | budget s | note |", "| --- | --- | --- | --- | --- |"]
        for stage in self.stages:
            record = self.records.get(stage.name, Record("not reached"))
            budget = "" if record.budget_s is None else f"{record.budget_s:.1f}"
            seconds = f"{record.seconds:.1f}" if record.status not in ("not reached", "not selected", "skipped") else ""
            note = record.note.replace("|", "/").replace("\n", " ")[:300]
            rows.append(f"| {stage.name} | {record.status} | {seconds} | {budget} | {note} |")
        return "\n".join(head + table_lines(self.tables) + ["## Stages", ""] + rows) + "\n"

    def save(self) -> None:
        """State, summary and archive, in the work directory and the results directory."""
        state_text = json.dumps(self.state, indent=2) + "\n"
        summary = self.summary()
        for folder in (self.work, self.results):
            write_atomic(folder / STATE_NAME, state_text)
        write_atomic(self.work / SUMMARY_NAME, summary)
        write_atomic(self.results / SUMMARY_NAME, summary)
        write_archive(self.results / ARCHIVE_NAME, self.work, ("tables", "history.log", STATE_NAME, SUMMARY_NAME))

    # the run --------------------------------------------------------------------------------
    def plan(self, stage: Stage) -> Optional[Record]:
        """The record of a stage that does not run now, or None when it runs."""
        selected = self.args.stages is None or stage.name in self.args.stages
        named = self.args.stages is not None and stage.name in self.args.stages
        if not selected and not stage.always:
            return Record("not selected")
        if not (stage.always or named or self.args.force) and self.earlier_ok(stage.name):
            return Record("ok (earlier call)", note=self.state["stages"][stage.name].get("note", ""))
        missing = [need for need in stage.needs if not self.is_ok(need)]
        if missing:
            return Record("skipped", note=f"needs {', '.join(missing)}")
        return None

    def run_stage(self, stage: Stage) -> Record:
        budget = stage_budget(stage.limit_s, self.left())
        if budget < MIN_STAGE_S:
            return Record("skipped", budget_s=max(budget, 0.0),
                          note=f"no time: {self.left():.0f} s left before the deadline, {MARGIN_S:.0f} s kept free")
        self.records[stage.name] = Record("running", budget_s=budget)
        self.save()
        self.log("runner", f"=== {stage.name}: start, limit {stage.limit_s:.0f} s, budget {budget:.1f} s"
                           f" ({self.left():.0f} s to the deadline) ===")
        began = time.monotonic()
        try:
            results = run_jobs(stage.jobs, lambda label, line: self.log(
                stage.name if label == stage.name or len(stage.jobs) == 1 else f"{stage.name}/{label}", line),
                parallel=stage.parallel, timeout_s=budget, grace_s=self.grace)
        except Stopped as stop:
            self.stopped = str(stop)
            return Record("killed", time.monotonic() - began, budget, f"the runner got {stop} during this stage")
        seconds = time.monotonic() - began
        notes = [job_note(r, with_label=len(results) > 1) for r in results]
        if any(r.timed_out for r in results):
            status = "TIMEOUT"
            notes.insert(0, f"killed at {budget:.0f} s (limit {stage.limit_s:.0f} s)")
        elif all(r.ok for r in results):
            status = "ok"
        else:
            status = "FAIL"
        return Record(status, seconds, budget, "; ".join(n for n in notes if n))

    def run(self) -> int:
        def on_signal(signum, frame):  # noqa: ARG001
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)  # one stop is enough; the cleanup runs undisturbed
            raise Stopped(signum)

        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(sig, on_signal)
        self.log("runner", f"GPU check: deadline {self.args.deadline:.0f} s, results {self.results}, "
                           f"work {self.work}{', DRY RUN (fake commands)' if self.args.fake else ''}")
        try:
            for stage in self.stages:
                record = self.plan(stage)
                ran = record is None
                if record is None:
                    record = self.run_stage(stage)
                    if record.status != "skipped":
                        self.state["stages"][stage.name] = {
                            "status": record.status, "seconds": round(record.seconds, 1), "note": record.note,
                            "finished": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
                self.records[stage.name] = record
                if record.status != "not selected":
                    took = f" in {record.seconds:.1f} s" if ran and record.status != "skipped" else ""
                    detail = f" ({record.note})" if record.note and not record.status.startswith("ok") else ""
                    self.log("runner", f"=== {stage.name}: {record.status}{took}{detail} ===")
                    self.save()
                if self.stopped:
                    break
        except Stopped as stop:  # between stages
            self.stopped = str(stop)
        finally:
            for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
                signal.signal(sig, signal.SIG_IGN)
            self.save()
            self.log("runner", f"summary: {self.results / SUMMARY_NAME}")
            sys.stdout.write("\n" + self.summary())
            sys.stdout.flush()
            self.log.close()
        if self.stopped:
            return 128 + int(signal.Signals[self.stopped])
        failed = [s.name for s in self.stages if self.records.get(s.name, Record("not reached")).status
                  not in ("ok", "ok (earlier call)", "not selected")]
        return 1 if failed else 0


def parse_pairs(text: Optional[str], convert: Callable) -> dict:
    """'a=1,b=2' -> {'a': convert('1'), 'b': convert('2')}."""
    pairs = {}
    for item in (text or "").replace(" ", ",").split(","):
        if item:
            name, _, value = item.partition("=")
            pairs[name.strip()] = convert(value.strip())
    return pairs


def parse_fake(text: Optional[str]) -> Optional[dict[str, str]]:
    """None (real run), or the fake mode of each named stage ("1": every stage ok)."""
    if not text or text == "0":
        return None
    if text in ("1", "ok"):
        return {}
    modes = parse_pairs(text, str)
    bad = {mode for mode in modes.values() if mode not in FAKE_MODES}
    if bad:
        raise SystemExit(f"gpu_check: unknown fake mode(s) {', '.join(sorted(bad))}; modes: {', '.join(FAKE_MODES)}")
    return modes


# ---------------------------------------------------------------------------------------------
# Stage bodies (child processes)

def sh(argv: Sequence[str], timeout: float = 30) -> None:
    """Runs a probe command, printing its output, or why it could not run."""
    print("$ " + " ".join(argv), flush=True)
    if shutil.which(argv[0]) is None:
        print(f"  {argv[0]}: not found", flush=True)
        return
    try:
        proc = subprocess.run(list(argv), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                              timeout=timeout)
        print("\n".join("  " + line for line in proc.stdout.strip().splitlines()[-15:]), flush=True)
    except subprocess.TimeoutExpired:
        print(f"  timed out after {timeout:.0f} s", flush=True)


ENV_CHECK = r"""
import importlib, sys
failed = []
import torch
print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    print("device", p.name, "capability", torch.cuda.get_device_capability(), "SMs", p.multi_processor_count,
          "memory GiB", round(p.total_memory / 2**30))
else:
    failed.append("torch.cuda")
for name, need in (("cutlass_library", True), ("pybind11", True), ("expecttest", False), ("hypothesis", False),
                   ("pytest", False), ("nltk", False), ("sacrebleu", False), ("tokenizers", False)):
    try:
        module = importlib.import_module(name)
        print(f"{name:16s} {getattr(module, '__version__', '')} {getattr(module, '__file__', '')}")
    except Exception as error:
        print(f"{name:16s} MISSING ({type(error).__name__}: {error})" + ("" if need else " (some stages need it)"))
        if need:
            failed.append(name)
if failed:
    sys.exit("environment: missing " + ", ".join(failed))
"""


def cmd_env(_: argparse.Namespace) -> int:
    """Machine and toolchain facts, the carried wheels installed into SITE_DIR, imports checked."""
    print(f"host {os.uname().nodename}, {os.cpu_count()} CPUs, python {sys.version.split()[0]} ({sys.executable})")
    sh(["nvidia-smi", "--query-gpu=name,memory.total,driver_version,clocks.max.sm", "--format=csv,noheader"])
    sh(["nvcc", "--version"])
    sh(["cmake", "--version"])
    sh(["ninja", "--version"])
    for tool in ("cuobjdump", "compute-sanitizer", "ncu"):
        print(f"{tool}: {shutil.which(tool) or 'not found'}")
    wheel_dir, site = Path(os.environ.get("WHEEL_DIR", ".whl")), os.environ["SITE_DIR"]
    wheels = sorted(str(p) for p in wheel_dir.glob("*.whl"))
    if wheels:
        print(f"installing {len(wheels)} carried wheel(s) into {site}: {', '.join(Path(w).name for w in wheels)}")
        rc = subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                             "--no-cache-dir", "--upgrade", "--target", site, *wheels]).returncode
        if rc != 0:
            print(f"pip install of the carried wheels failed (rc {rc})")
            return rc
    else:
        print(f"no wheels in {wheel_dir}: using the packages already installed")
    return subprocess.run([sys.executable, "-c", ENV_CHECK]).returncode


def find_extension() -> Optional[Path]:
    found = sorted(ROOT.glob("moediffuseq/_C*.so"))
    return found[0] if found else None


BUILD_INFO_CHECK = ("import sys, moediffuseq; info = moediffuseq.build_info(); print(info); "
                    "sys.exit(0 if info.has_cuda else 'the extension was built without its CUDA kernels')")


def cmd_build(args: argparse.Namespace) -> int:
    """Builds the extension in place (CUDA on, sm_90a only, every core) unless it is up to date."""
    import torch  # noqa: PLC0415 (the machine's CUDA torch: part of what the build depends on)

    work = Path(os.environ["GPU_CHECK_WORK_DIR"])
    settings = [f"TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST}", "MOEDIFFUSEQ_CUDA=ON", f"torch {torch.__version__}",
                f"python {sys.version}"]
    digest = tree_hash(BUILD_PATHS, settings)
    stamp = work / "build.sha256"
    so = find_extension()
    if so is not None and not args.force and stamp.exists() and stamp.read_text().strip() == digest:
        print(f"{so.name} is up to date with the sources (sha256 {digest[:12]}): not rebuilt")
    else:
        stamp.unlink(missing_ok=True)
        jobs = os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1)
        env = {**os.environ, "TORCH_CUDA_ARCH_LIST": CUDA_ARCH_LIST, "MOEDIFFUSEQ_CUDA": "ON", "MAX_JOBS": jobs}
        argv = [sys.executable, "setup.py", "build_ext", "--inplace", "--build-temp", str(work / "cmake")]
        print(f"building with {jobs} jobs: MOEDIFFUSEQ_CUDA=ON TORCH_CUDA_ARCH_LIST={CUDA_ARCH_LIST} "
              + " ".join(argv[1:]), flush=True)
        start = time.monotonic()
        rc = subprocess.run(argv, cwd=ROOT, env=env).returncode
        print(f"build finished with rc {rc} in {time.monotonic() - start:.0f} s", flush=True)
        if rc != 0:
            return rc
        stamp.write_text(digest + "\n")
    return subprocess.run([sys.executable, "-c", BUILD_INFO_CHECK], cwd=ROOT).returncode


def cmd_archs(_: argparse.Namespace) -> int:
    """cmake/check_cuda_archs.py on the built extension: sm_90a code and nothing else."""
    so, checker = find_extension(), ROOT / "cmake" / "check_cuda_archs.py"
    if so is None:
        print("no moediffuseq/_C*.so: nothing to check")
        return 1
    if not checker.exists():
        print(f"{checker.relative_to(ROOT)} is missing: the architectures of {so.name} were not checked")
        return 1
    argv = [sys.executable, str(checker), "--so", str(so), "--archs", CUDA_ARCHS]
    print("$ " + " ".join(argv), flush=True)
    return subprocess.run(argv, cwd=ROOT).returncode


def cmd_fake(args: argparse.Namespace) -> int:
    """A stand-in for a stage's job in a dry run."""
    print(f"fake {args.mode}: stage {args.stage}, job {args.label}, pid {os.getpid()}", flush=True)
    if args.mode == "ok":
        tables = Path(args.tables)
        tables.mkdir(parents=True, exist_ok=True)
        (tables / f"fake_{args.stage}_{args.label}.md").write_text(
            f"| stage | job |\n| --- | --- |\n| {args.stage} | {args.label} |\n", encoding="utf-8")
        print("done", flush=True)
        return 0
    if args.mode == "fail":
        print("failing on purpose", flush=True)
        return 1
    if args.mode == "crash":
        os.kill(os.getpid(), signal.SIGSEGV)
    if args.mode == "hang-noterm":
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    while True:
        time.sleep(60)


# ---------------------------------------------------------------------------------------------

def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    env = os.environ
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--deadline", type=float, default=float(env.get("DEADLINE") or DEFAULT_DEADLINE_S),
                        help="wall-clock seconds for the whole run, build included (env DEADLINE; default 540)")
    parser.add_argument("--stages", default=env.get("STAGES") or None,
                        help="comma- or space-separated stages to run (env STAGES; default: all)")
    parser.add_argument("--force", action="store_true", default=env.get("FORCE", "") not in ("", "0"),
                        help="rerun stages that ended ok in an earlier call (env FORCE=1)")
    parser.add_argument("--results", type=Path,
                        default=Path(env.get("RESULTS_DIR") or env.get("OUT") or ROOT / "bench" / "out" / "gpu"))
    parser.add_argument("--work-dir", type=Path,
                        default=Path(env.get("GPU_CHECK_WORK_DIR") or ROOT / "build" / "gpu_check"))
    parser.add_argument("--python", default=env.get("PYTHON") or sys.executable,
                        help="the Python with the machine's CUDA torch (env PYTHON)")
    parser.add_argument("--fake", default=env.get("GPU_CHECK_FAKE") or None, help="dry run: see the module doc")
    parser.add_argument("--limits", default=env.get("GPU_CHECK_LIMITS") or None, help="'stage=seconds,...'")
    parser.add_argument("--list", action="store_true", help="print the stages and exit")
    sub = parser.add_subparsers(dest="command")
    sub.add_parser("env")
    build = sub.add_parser("build")
    build.add_argument("--force", action="store_true", help="rebuild even when up to date")
    sub.add_parser("archs")
    fake = sub.add_parser("fake")
    fake.add_argument("mode", choices=FAKE_MODES)
    fake.add_argument("--stage", default="")
    fake.add_argument("--label", default="")
    fake.add_argument("--tables", default=".")
    args = parser.parse_args(argv)
    if args.stages is not None:
        args.stages = [name for name in args.stages.replace(",", " ").split() if name]
    args.results, args.work_dir = args.results.resolve(), args.work_dir.resolve()
    return args


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = parse_args(argv)
    if args.command == "fake":
        return cmd_fake(args)
    if args.command is not None:
        return {"env": cmd_env, "build": cmd_build, "archs": cmd_archs}[args.command](args)
    if args.list:
        for stage in stages(args.python, args.work_dir / "tables"):
            needs = f", needs {', '.join(stage.needs)}" if stage.needs else ""
            print(f"{stage.name} (limit {stage.limit_s:.0f} s{needs}): {stage.doc}")
            for job in stage.jobs:
                env = " ".join(f"{k}={v}" for k, v in job.env.items())
                print(f"    {env + ' ' if env else ''}{' '.join(job.argv)}")
        return 0
    # What every stage inherits: the carried wheels and the in-place build importable, Python
    # output unbuffered, CUTLASS refusals as errors.
    site = Path(os.environ.get("SITE_DIR") or args.work_dir / "site").resolve()
    os.environ.update({
        "SITE_DIR": str(site),
        "GPU_CHECK_WORK_DIR": str(args.work_dir),
        "PYTHONPATH": os.pathsep.join([str(site), str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]),
        "PYTHONUNBUFFERED": "1",
        "MOEDIFFUSEQ_STRICT_CUTLASS": "1",
        "MAX_JOBS": os.environ.get("MAX_JOBS") or str(os.cpu_count() or 1),
    })
    return Runner(args).run()


if __name__ == "__main__":
    sys.exit(main())
