"""What the subcommands of the ``moediffuseq`` command share: the one-line error, the argument
types and the checks of devices and output files."""
from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Optional, Sequence


class CliError(Exception):
    """A bad command line: printed as one ``error: ...`` line, exit status 2."""


class Parser(argparse.ArgumentParser):
    """argparse with a one-line error (the usage is in --help)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def int_at_least(minimum: int, maximum: Optional[int] = None):
    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be an integer >= {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be an integer <= {maximum:_}, got {value:_}")
        return value

    parse.__name__ = f"integer >= {minimum}"
    return parse


def device_arg(name: str) -> str:
    """The device to run on (``--device``): ``auto`` is the local GPU when there is one, else the CPU. A CUDA
    device that is not there is an error, before any work."""
    import torch

    if name == "auto":
        from moediffuseq.train_run import auto_device

        return auto_device()
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise CliError(f"--device {name!r}: not a device (cpu, cuda, cuda:N or auto)") from None
    if device.type == "cpu":
        return name
    if device.type != "cuda":
        raise CliError(f"--device {name!r}: only cpu and cuda devices are supported")
    if not torch.cuda.is_available():
        raise CliError(f"--device {name!r}: no CUDA device is available here (use --device cpu or auto)")
    if device.index is not None and device.index >= torch.cuda.device_count():
        raise CliError(f"--device {name!r}: there are only {torch.cuda.device_count()} CUDA device(s)")
    return name


def check_output(output: Path, inputs: Sequence[Path], flag: str = "--output") -> None:
    """An output file must not be a directory nor one of the inputs (it would be overwritten)."""
    if output.is_dir():
        raise CliError(f"{flag} {output} is a directory, not a file")
    for path in inputs:
        if output.exists() and path.exists() and os.path.samefile(output, path):
            raise CliError(f"{flag} {output} is also an input: it would be overwritten; write elsewhere")
