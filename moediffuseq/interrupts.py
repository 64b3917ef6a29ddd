"""Ctrl-C and SIGTERM that wait for the state they would cut in half.

``with HeldInterrupts() as interrupts:`` installs a SIGINT and a SIGTERM handler (main thread
only) for the block; inside it, ``with interrupts.held():`` marks a section that must not be cut
(a training step, a checkpoint write): a signal there is raised when the outermost held section
ends. Elsewhere, and for a second signal while one is held, it is raised at once. SIGINT raises
``KeyboardInterrupt``; SIGTERM (how clusters and container platforms preempt a job) raises
``Terminated``, a ``KeyboardInterrupt`` too, so both take the same path: the checkpoint of the
last completed step, then exit status 130 (SIGINT) or 143 (SIGTERM).
"""
from __future__ import annotations

import contextlib
import signal
import threading
from typing import Optional


class Terminated(KeyboardInterrupt):
    """A SIGTERM, raised where a Ctrl-C would be."""

    signum = signal.SIGTERM


def exit_status(interrupt: KeyboardInterrupt) -> int:
    """128 + the signal's number: 130 for Ctrl-C (SIGINT), 143 for SIGTERM."""
    return 128 + int(getattr(interrupt, "signum", signal.SIGINT))


def _raise(signum: int) -> None:
    if signum == signal.SIGTERM:
        raise Terminated
    raise KeyboardInterrupt


class HeldInterrupts:
    """SIGINT or SIGTERM while the training state is being changed (a step, a checkpoint write) is
    held until that change is complete and then raised (``KeyboardInterrupt`` / ``Terminated``),
    so that the state the interrupt's checkpoint saves is always that of a completed step. A
    second signal while one is held interrupts at once (the state is then not saved)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.depth, self.pending = 0, None
        self.previous: dict[int, object] = {}

    def __enter__(self) -> "HeldInterrupts":
        if threading.current_thread() is threading.main_thread():
            for signum in self.SIGNALS:
                self.previous[signum] = signal.signal(signum, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        for signum, handler in self.previous.items():
            signal.signal(signum, handler)
        self.previous = {}

    def _handler(self, signum, frame) -> None:
        if self.depth and self.pending is None:
            self.pending = signum
            return
        _raise(signum)

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending is not None:
            signum: Optional[int] = self.pending
            self.pending = None
            _raise(signum)
