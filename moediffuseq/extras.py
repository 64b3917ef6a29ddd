"""Optional dependencies: which extra of ``pip install "moediffuseq[...]"`` provides a module.

The core (the ops, the modules, the model) needs torch, numpy and safetensors only; the CLI's
commands import the rest when they run and, where one is missing, say which extra to install.
The extras are listed once, in pyproject.toml's ``[project.optional-dependencies]``; this module
reads them from the installed package's metadata.
"""
from __future__ import annotations

import contextlib
import functools
import importlib.metadata
import re
from typing import Iterator, Optional

# the module a distribution is imported as, where it is not its name with "-" written "_"
MODULE_OF_DISTRIBUTION = {"pyyaml": "yaml"}


@functools.cache
def extra_of_module() -> dict[str, str]:
    """Each optional module -> the first extra (in pyproject.toml's order) that provides it, from
    the installed metadata; empty when moediffuseq is not installed (run from a bare checkout)."""
    try:
        requirements = importlib.metadata.requires("moediffuseq") or []
    except importlib.metadata.PackageNotFoundError:
        return {}
    found: dict[str, str] = {}
    for requirement in requirements:
        name = re.match(r"[A-Za-z0-9._-]+", requirement).group(0).lower()
        extra = re.search(r"""extra\s*==\s*["']([^"']+)["']""", requirement)
        if extra is None or name == "moediffuseq" or extra.group(1) == "test":
            continue  # a core dependency, an extra made of extras, or what only the tests use
        found.setdefault(MODULE_OF_DISTRIBUTION.get(name, name.replace("-", "_")), extra.group(1))
    return found


def install_hint(error: ModuleNotFoundError) -> Optional[str]:
    """"this needs the optional package 'x': pip install "moediffuseq[extra]"" for the module
    ``error`` is about, or None when it is not one of the optional dependencies (a real error)."""
    root = (error.name or "").split(".")[0]
    extra = extra_of_module().get(root)
    if extra is None:
        return None
    return f"this needs the optional package '{root}': pip install \"moediffuseq[{extra}]\""


def missing_extra_message(error: ModuleNotFoundError) -> Optional[str]:
    """One line naming the pip command that installs the module ``error`` is about, or None when
    the module is not one of the optional dependencies (then it is a real error)."""
    hint = install_hint(error)
    return None if hint is None else f"error: {hint}"


@contextlib.contextmanager
def optional_dependencies() -> Iterator[None]:
    """A block (or, as a decorator, a function) in which a missing optional package raises a
    ModuleNotFoundError whose message is the pip line that installs it (``install_hint``)."""
    try:
        yield
    except ModuleNotFoundError as e:
        hint = install_hint(e)
        if hint is None or str(e) == hint:
            raise
        raise ModuleNotFoundError(hint, name=e.name) from None
