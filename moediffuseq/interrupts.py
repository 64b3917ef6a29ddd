"""Ctrl-C that waits for the state it would cut in half.

``with HeldInterrupts() as interrupts:`` installs a SIGINT handler (main thread only) for the
block; inside it, ``with interrupts.held():`` marks a section that must not be cut (a training
step, a checkpoint write): a Ctrl-C there is raised as KeyboardInterrupt when the outermost held
section ends. Elsewhere, and for a second Ctrl-C while one is held, KeyboardInterrupt is raised
at once, as without the handler.
"""
from __future__ import annotations

import contextlib
import signal
import threading


class HeldInterrupts:
    """Ctrl-C (SIGINT) while the training state is being changed (a step, a checkpoint write) is
    held until that change is complete and then raised as KeyboardInterrupt, so that the state a
    Ctrl-C checkpoint saves is always that of a completed step. A second Ctrl-C while one is held
    interrupts at once (the state is then not saved)."""

    def __init__(self) -> None:
        self.depth, self.pending, self.previous = 0, False, None

    def __enter__(self) -> "HeldInterrupts":
        if threading.current_thread() is threading.main_thread():
            self.previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc) -> None:
        if self.previous is not None:
            signal.signal(signal.SIGINT, self.previous)
            self.previous = None

    def _handler(self, signum, frame) -> None:
        if self.depth and not self.pending:
            self.pending = True
            return
        raise KeyboardInterrupt

    @contextlib.contextmanager
    def held(self):
        self.depth += 1
        try:
            yield
        finally:
            self.depth -= 1
        if self.depth == 0 and self.pending:
            self.pending = False
            raise KeyboardInterrupt
