"""Training metrics: a CSV file (always), TensorBoard (when installed) and a loss-curve PNG
(when matplotlib is installed)."""
from __future__ import annotations

import csv
import io
import os
import sys
import time
from pathlib import Path
from typing import Optional

FIELDS = ("step", "split", "loss", "mse", "nll", "prior", "aux", "lr", "grad_norm", "tokens_per_s", "elapsed_s",
          "bleu")


class RunLog:
    """Appends rows to ``metrics.csv``; on resume, rows after the resumed step are dropped (the
    file is rewritten atomically, and a row cut short by a killed process is ignored)."""

    def __init__(self, out_dir: str | os.PathLike, resume_step: Optional[int] = None, tensorboard: bool = True) -> None:
        self.out_dir = Path(out_dir)
        self.path = self.out_dir / "metrics.csv"
        rows = self.read() if resume_step is not None and self.path.is_file() else []
        rows = [r for r in rows if int(r["step"]) <= (resume_step or 0)]
        tmp = self.path.with_name(self.path.name + ".tmp")
        with tmp.open("w", newline="") as f:
            writer = csv.DictWriter(f, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        os.replace(tmp, self.path)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(self.out_dir / "tensorboard"))
            except ImportError:  # tensorboard is optional
                self.writer = None

    def log(self, step: int, split: str, **values) -> None:
        row = {"step": step, "split": split, **{k: v for k, v in values.items() if v is not None}}
        unknown = set(row) - set(FIELDS)
        if unknown:
            raise KeyError(f"unknown metric fields {sorted(unknown)}")
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, FIELDS).writerow(row)
        if self.writer is not None:
            for key, value in values.items():
                if isinstance(value, (int, float)):
                    self.writer.add_scalar(f"{split}/{key}", value, step)

    def read(self) -> list[dict]:
        """The complete rows (a last line cut short by a kill has missing fields and is left out)."""
        with self.path.open(newline="") as f:
            text = f.read()
        if text and not text.endswith("\n"):
            text = text[:text.rfind("\n") + 1]
        rows = []
        for row in csv.DictReader(io.StringIO(text, newline="")):
            if None in row.values() or None in row:
                continue
            try:
                int(row["step"])
            except ValueError:
                continue
            rows.append(row)
        return rows

    def has_row(self, step: int, split: str) -> bool:
        return any(int(r["step"]) == step and r["split"] == split for r in self.read())

    def plot(self) -> Optional[Path]:
        """loss.png: training loss (raw and smoothed) and validation loss against the step."""
        try:
            import matplotlib

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            return None
        rows = self.read()
        train = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "train" and r["loss"]]
        valid = [(int(r["step"]), float(r["loss"])) for r in rows if r["split"] == "valid" and r["loss"]]
        if not train:
            return None
        fig, ax = plt.subplots(figsize=(7, 4), dpi=110)
        steps, losses = zip(*train)
        ax.plot(steps, losses, color="tab:blue", alpha=0.3, lw=0.8, label="train")
        smooth, acc = [], None
        for v in losses:
            acc = v if acc is None else 0.9 * acc + 0.1 * v
            smooth.append(acc)
        ax.plot(steps, smooth, color="tab:blue", lw=1.5, label="train (smoothed)")
        if valid:
            ax.plot(*zip(*valid), "o-", color="tab:orange", lw=1.5, label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss")
        ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = self.out_dir / "loss.png"
        tmp = path.with_name(path.name + ".tmp")
        fig.savefig(tmp, format="png")
        plt.close(fig)
        os.replace(tmp, path)
        return path

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def progress_bar(total: int, desc: str, unit: str, enabled: bool = True, initial: int = 0):
    """A tqdm bar with ETA: live in a terminal, a line every 30 s when stderr is a log file."""
    from tqdm.auto import tqdm

    interactive = sys.stderr.isatty()
    return tqdm(total=total, initial=initial, desc=desc, unit=unit, disable=not enabled, dynamic_ncols=True,
                mininterval=0.5 if interactive else 30.0, leave=interactive)


PLAIN_LOG_INTERVAL_S = 30.0  # seconds between the plain progress lines of a run without a progress bar


class PlainProgress:
    """Without a progress bar (``--no-progress``): one plain line, at most every
    ``PLAIN_LOG_INTERVAL_S`` seconds, of the step, the loss, the speed and the time left."""

    def __init__(self, total: int, initial: int = 0, enabled: bool = True) -> None:
        self.total, self.initial, self.enabled = total, initial, enabled
        self.begin = self.last = time.perf_counter()

    def update(self, step: int, loss: float, tokens_per_s: float) -> None:
        now = time.perf_counter()
        if not self.enabled or now - self.last < PLAIN_LOG_INTERVAL_S:
            return
        self.last = now
        elapsed = now - self.begin
        left = elapsed / max(step - self.initial, 1) * (self.total - step)
        print(f"step {step}/{self.total}  loss {loss:.4f}  {tokens_per_s:,.0f} tokens/s  elapsed {_clock(elapsed)}  "
              f"left {_clock(left)}", flush=True)


def _clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"
