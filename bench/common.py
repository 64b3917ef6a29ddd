"""Shared timing, peak and reporting helpers for the benchmarks in bench/, on either device.

The benchmarks run as modules from the repository root (``python -m bench.attention ...``) and
import this one as ``bench.common``. Device-aware entries: :func:`timer` (wall clock on the
CPU, CUDA events on a GPU), :func:`copy_bandwidth` and :func:`matmul_rate` (the machine peaks a
table is compared with, measured in the same run), :func:`device_description`.
"""
from __future__ import annotations

import csv
import datetime
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Callable, Mapping, Optional, Sequence, TypedDict, Union

import torch

DEFAULT_OUT_DIR = Path(__file__).resolve().parent / "out"

Cell = Union[str, int, float, None]


class Timing(TypedDict):
    """Result of :func:`measure`: wall-clock seconds per call."""

    median_s: float
    min_s: float
    repeats: int


def measure(
    fn: Callable[[], object],
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: Optional[float] = None,
    slow_call_seconds: Optional[float] = None,
) -> Timing:
    """Time ``fn()`` with ``time.perf_counter``.

    Runs ``warmup`` untimed calls, then up to ``repeats`` timed calls, stopping early once
    ``max_seconds`` of timed calls have been spent (always at least one timed call). When
    ``slow_call_seconds`` is set and the first warm-up call takes longer than that, its time
    is returned as the only sample and ``fn`` is not called again.
    """
    for index in range(warmup):
        start = time.perf_counter()
        fn()
        elapsed = time.perf_counter() - start
        if index == 0 and slow_call_seconds is not None and elapsed > slow_call_seconds:
            return Timing(median_s=elapsed, min_s=elapsed, repeats=1)
    samples: list[float] = []
    while len(samples) < max(1, repeats):
        start = time.perf_counter()
        fn()
        samples.append(time.perf_counter() - start)
        if max_seconds is not None and sum(samples) >= max_seconds:
            break
    return Timing(median_s=statistics.median(samples), min_s=min(samples), repeats=len(samples))


def measure_cuda(fn: Callable[[], object], *, warmup: int = 1, repeats: int = 5, max_seconds: float = 10.0) -> Timing:
    """GPU time of ``fn()`` between two CUDA events: median and minimum over ``repeats`` calls
    after ``warmup`` untimed ones, stopping early once ``max_seconds`` of timed calls are spent."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    samples: list[float] = []
    while len(samples) < max(1, repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        samples.append(start.elapsed_time(end) / 1e3)
        if sum(samples) >= max_seconds:
            break
    return Timing(median_s=statistics.median(samples), min_s=min(samples), repeats=len(samples))


Timer = Callable[[Callable[[], object]], Timing]


def timer(
    device: str,
    *,
    warmup: int = 1,
    repeats: int = 5,
    max_seconds: Optional[float] = None,
    slow_call_seconds: Optional[float] = None,
) -> Timer:
    """``time(fn) -> Timing`` on ``device``: :func:`measure` (wall clock) on the CPU,
    :func:`measure_cuda` (CUDA events; ``slow_call_seconds`` unused) on a GPU."""
    if device == "cuda":
        return lambda fn: measure_cuda(fn, warmup=warmup, repeats=repeats,
                                       max_seconds=10.0 if max_seconds is None else max_seconds)
    return lambda fn: measure(fn, warmup=warmup, repeats=repeats, max_seconds=max_seconds,
                              slow_call_seconds=slow_call_seconds)


def matmul_rate(dtype: torch.dtype, n: int = 2048, device: str = "cpu") -> float:
    """GFLOP/s of an ``n x n @ n x n`` ``torch.matmul`` in ``dtype`` on ``device`` (2 n^3 flops,
    median of 5 calls; 20 calls timed with CUDA events on a GPU)."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    time = timer(device, warmup=2 if device == "cpu" else 3, repeats=5 if device == "cpu" else 20)
    return 2.0 * n**3 / time(lambda: torch.matmul(a, b))["median_s"] / 1e9


def copy_bandwidth(device: str = "cpu") -> float:
    """GB/s of copying a float32 tensor (256 MiB on the CPU, 1 GiB on a GPU), counting bytes
    read plus bytes written."""
    src = torch.ones((256 if device == "cpu" else 1024) * 2**20 // 4, dtype=torch.float32, device=device)
    dst = torch.empty_like(src)
    time = timer(device, warmup=1 if device == "cpu" else 3, repeats=5 if device == "cpu" else 20)
    return 2.0 * src.numel() * src.element_size() / time(lambda: dst.copy_(src))["median_s"] / 1e9


def device_description(device: str) -> str:
    """The GPU's name on "cuda", else the CPU model and logical CPU count."""
    return torch.cuda.get_device_name() if device == "cuda" else machine_description()


def machine_description() -> str:
    """CPU model name (``/proc/cpuinfo``, else ``platform.processor()``) and logical CPU count."""
    model = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return f"{model}, {cpus} logical CPUs"


def run_header() -> str:
    """One line naming the date (UTC), the machine, the torch version and the thread count."""
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    return (
        f"{now} | {machine_description()} | torch {torch.__version__} | "
        f"{torch.get_num_threads()} threads"
    )


def format_cell(value: Cell) -> str:
    """Human-readable cell: floats to 3 significant digits (integers above 1000), None empty."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.0f}" if abs(value) >= 1000 else f"{value:.3g}"
    return str(value)


def markdown_row(cells: Sequence[Cell], widths: Sequence[Union[int, str]] = ()) -> str:
    """One Markdown table line of ``cells`` (formatted by :func:`format_cell`), each padded to the
    matching entry of ``widths`` (a width, or a header whose length is the width): the lines a
    long benchmark prints one by one as its rows finish."""
    sizes = [w if isinstance(w, int) else len(w) for w in widths]
    text = [format_cell(cell) for cell in cells]
    return "| " + " | ".join(t.ljust(sizes[i]) if i < len(sizes) else t for i, t in enumerate(text)) + " |"


def write_table(
    rows: Sequence[Mapping[str, Cell]],
    columns: Sequence[str],
    name: str,
    *,
    out_dir: Optional[Path] = None,
    title: Optional[str] = None,
    notes: Sequence[str] = (),
    echo: bool = True,
) -> Path:
    """Save ``rows`` as ``<name>.md`` and ``<name>.csv`` and, with ``echo``, print the Markdown.

    The Markdown file holds the title, the :func:`run_header` line, the aligned table and
    ``notes``; the CSV file holds the raw cell values in ``columns`` order. Missing cells are
    empty. Returns the output directory (``bench/out/`` by default, created if missing).
    """
    out_dir = Path(out_dir) if out_dir is not None else DEFAULT_OUT_DIR
    out_dir.mkdir(parents=True, exist_ok=True)

    text = [[format_cell(row.get(column)) for column in columns] for row in rows]
    widths = [max([len(column)] + [len(line[i]) for line in text]) for i, column in enumerate(columns)]

    def render(cells: Sequence[str]) -> str:
        return "| " + " | ".join(cell.ljust(width) for cell, width in zip(cells, widths)) + " |"

    table = [render(columns), "|" + "|".join("-" * (width + 2) for width in widths) + "|"]
    table += [render(line) for line in text]

    document = ([f"# {title}", ""] if title else []) + [run_header(), ""] + table
    if notes:
        document += [""] + [f"- {note}" for note in notes]
    markdown = "\n".join(document) + "\n"
    if echo:
        print(markdown, end="")

    (out_dir / f"{name}.md").write_text(markdown, encoding="utf-8")
    with open(out_dir / f"{name}.csv", "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows([["" if row.get(column) is None else row.get(column) for column in columns] for row in rows])
    return out_dir


def append_targets(out_dir: Path, name: str, lines: Sequence[str]) -> None:
    """Print the target verdicts ``lines`` as a "Targets" section and append it to ``<name>.md``."""
    if not lines:
        return
    section = "\n## Targets\n\n" + "\n".join(f"- {line}" for line in lines) + "\n"
    print(section, end="")
    with open(Path(out_dir) / f"{name}.md", "a", encoding="utf-8") as handle:
        handle.write(section)
