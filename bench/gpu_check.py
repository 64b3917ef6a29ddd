"""The GPU check runner: stages as data, one global deadline, one streamed log, a summary that is
always written, and resumption across calls on the same machine. ``bench/gpu_check.sh`` says how
to run it on a Hopper machine and which wheels to carry; ``python -m bench.gpu_check --list``
prints the stages. The stage table is bench/gpu_check_stages.py, the job runner and log
bench/gpu_check_jobs.py, the stage bodies (env, build, archs, fake) bench/gpu_check_bodies.py.

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
job's command with ``python -m bench.gpu_check fake MODE``: SPEC is "1" (all ok) or "stage=mode,..." with
mode ok, fail, crash (SIGSEGV), hang, or hang-noterm (ignores SIGTERM); ``--limits
"stage=seconds,..."`` (env ``GPU_CHECK_LIMITS``) overrides limits and ``GPU_CHECK_KILL_GRACE``
the SIGTERM-to-SIGKILL grace; ``GPU_CHECK_CODE_HASH`` stands in for the hash of the code under test.

The subcommands env, build and archs are the bodies of those stages, run as child processes.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import re
import shutil
import signal
import sys
import tarfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional, Sequence

from bench.gpu_check_bodies import FAKE_MODES, cmd_archs, cmd_build, cmd_env, cmd_fake, tree_hash
from bench.gpu_check_jobs import KILL_GRACE_S, ROOT, Job, Log, job_note, run_jobs
from bench.gpu_check_stages import DEADLINE_S, MARGIN_S, Stage, stage_budget, stages

DEFAULT_DEADLINE_S = DEADLINE_S
MIN_STAGE_S = 1.0  # a stage with less time than this is skipped
LOG_NAME, SUMMARY_NAME, STATE_NAME, ARCHIVE_NAME = "gpu_check.log", "summary.md", "state.json", "tables.tar.gz"
RESULT_FILES = (LOG_NAME, SUMMARY_NAME, STATE_NAME, ARCHIVE_NAME)
ARCHIVE_SUFFIXES = frozenset({".md", ".csv", ".xml", ".json", ".log", ".txt"})
ARCHIVE_MAX_FILE_BYTES = 4 << 20
# The code under test: a change here makes earlier stage results stale.
CODE_PATHS = ("csrc", "cmake", "moediffuseq", "CMakeLists.txt", "setup.py", "pyproject.toml")


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
                Job(job.label, (sys.executable, "-m", "bench.gpu_check", "fake", mode, "--stage", stage.name,
                                "--label", job.label, "--tables", str(self.tables)))
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
        cut = [s.name for s in self.stages
               if self.records.get(s.name, Record("not reached")).status in ("TIMEOUT", "killed", "skipped", "not reached")]
        if cut:
            head.insert(-1, f"- cut short or not run: {', '.join(cut)} (see their rows below)")
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
