"""Checks of configuration fields: one message per bad value, naming the field and the value.

The configs (``MoEDiffuSeqConfig``, ``TrainConfig``) call these in ``__post_init__``, so a bad
value from a config file, a ``--set`` or a flag is refused before any work starts.
"""
from __future__ import annotations

import math
from typing import Any, Iterable, Optional


class ConfigError(ValueError):
    """A bad value of one configuration field; ``field`` names it."""

    def __init__(self, field: str, message: str) -> None:
        super().__init__(f"{field} {message}")
        self.field = field


def _shown(value: Any) -> str:
    if isinstance(value, str):
        return f"the string {value!r}"
    return f"{value!r}"


def integer(name: str, value: Any, minimum: Optional[int] = None, maximum: Optional[int] = None) -> int:
    """An integer in [minimum, maximum]: every size a config gives is bounded, so that a huge value
    is refused here, with the bound, rather than by the allocator."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise ConfigError(name, f"must be an integer{f' >= {minimum}' if minimum is not None else ''}, "
                                f"got {_shown(value)}")
    if minimum is not None and value < minimum:
        raise ConfigError(name, f"must be >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(name, f"must be <= {maximum:_}, got {value:_}")
    return value


def number(name: str, value: Any, minimum: Optional[float] = None, maximum: Optional[float] = None,
           above: bool = False, below: bool = False) -> float:
    """A finite real number in [minimum, maximum] (``above``/``below``: the bound excluded)."""
    low = "" if minimum is None else f"{'>' if above else '>='} {minimum}"
    high = "" if maximum is None else f"{'<' if below else '<='} {maximum}"
    wanted = " and ".join(x for x in (low, high) if x)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        hint = ""
        if isinstance(value, str):
            try:
                float(value)
                hint = " (quoted, or a YAML 1.1 reader took it for text: write it as 1.0e-3, not 1e-3)"
            except ValueError:
                pass
        raise ConfigError(name, f"must be a number{f' {wanted}' if wanted else ''}, got {_shown(value)}{hint}")
    if not math.isfinite(value):
        raise ConfigError(name, f"must be a finite number, got {value}")
    if minimum is not None and (value <= minimum if above else value < minimum):
        raise ConfigError(name, f"must be {wanted}, got {value}")
    if maximum is not None and (value >= maximum if below else value > maximum):
        raise ConfigError(name, f"must be {wanted}, got {value}")
    return float(value)


def boolean(name: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigError(name, f"must be true or false, got {_shown(value)}")
    return value


def choice(name: str, value: Any, choices: Iterable[str]) -> str:
    choices = tuple(choices)
    if value not in choices:
        raise ConfigError(name, f"must be one of {', '.join(map(repr, choices))}, got {_shown(value)}")
    return value
