"""Argument checks shared by the library, the studies and the CLIs: one definition of "a positive integer",
"a finite number", "one of these" and "a list of integers".

Each check raises the caller's error type (``error=``; a ``ValueError`` subclass such as ``MethodError``,
``ConfigError`` or ``argparse.ArgumentTypeError``) with a one-line message naming the argument and the bad value,
so every command reports bad input the same way before any work starts. Booleans are refused where a number is
asked for (``True`` is an ``int`` in Python, never a sensible rank); numpy scalars are accepted and returned as
plain Python numbers. The predicates :func:`is_int` and :func:`is_finite` serve callers whose message has its own
wording (the compare config's ``key: expected ...``). Only the standard library is imported.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

T = TypeVar("T")


def is_int(value: Any, minimum: int | None = None) -> bool:
    """Whether ``value`` is an integer (not a bool; numpy integers count) at least ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        return False
    return minimum is None or int(value) >= minimum


def is_finite(value: Any) -> bool:
    """Whether ``value`` is a finite real number (not a bool; numpy numbers count)."""
    return not isinstance(value, bool) and isinstance(value, numbers.Real) and math.isfinite(value)


def _integer_phrase(minimum: int) -> str:
    if minimum == 1:
        return "a positive integer"
    if minimum == 0:
        return "a non-negative integer"
    return f"an integer >= {minimum}"


def positive_int(name: str, value: Any, *, minimum: int = 1, error: type[Exception] = ValueError) -> int:
    """``value`` as an ``int`` if it is an integer >= ``minimum``; else ``error("<name> must be a positive
    integer, got <value>")`` (or ``... an integer >= <minimum> ...``)."""
    if not is_int(value, minimum):
        raise error(f"{name} must be {_integer_phrase(minimum)}, got {value!r}")
    return int(value)


def finite_number(
    name: str,
    value: Any,
    *,
    positive: bool = False,
    minimum: float | None = None,
    error: type[Exception] = ValueError,
) -> float:
    """``value`` as a ``float`` if it is finite (and > 0 with ``positive``, >= ``minimum`` if given); else
    ``error("<name> must be a finite number, got <value>")`` (``a positive finite number``, ``a finite number >=
    <minimum>``)."""
    if not is_finite(value):
        phrase = "a positive finite number" if positive else "a finite number"
        raise error(f"{name} must be {phrase}, got {value!r}")
    if positive and value <= 0:
        raise error(f"{name} must be a positive finite number, got {value!r}")
    if minimum is not None and value < minimum:
        raise error(f"{name} must be a finite number >= {minimum}, got {value!r}")
    return float(value)


def one_of(name: str, value: T, choices: Iterable[Any], *, error: type[Exception] = ValueError) -> T:
    """``value`` if it is one of ``choices``; else ``error("unknown <name> <value>; choose one of <choices>")``."""
    options = tuple(choices)
    if value not in options:
        raise error(f"unknown {name} {value!r}; choose one of {options}")
    return value


def int_list(name: str, text: str, *, minimum: int = 1, error: type[Exception] = ValueError) -> tuple[int, ...]:
    """The integers of ``text`` ("1,2,3", "1 2 3" or both), each >= ``minimum``; an error naming ``text`` if a part
    is not an integer, and naming the value if one is too small. For a CLI's ``type=`` pass
    ``error=argparse.ArgumentTypeError``."""
    parts = str(text).replace(",", " ").split()
    if not parts:
        raise error(f"{name} needs at least one integer, got {text!r}")
    try:
        values = tuple(int(part) for part in parts)
    except ValueError:
        raise error(f"{name} expects integers separated by commas, got {text!r}") from None
    for value in values:
        positive_int(name, value, minimum=minimum, error=error)
    return values


def cli_int(minimum: int = 1) -> Callable[[str], int]:
    """An argparse ``type=``: the argument as an ``int`` >= ``minimum``; otherwise argparse's one-line usage error
    (exit 2) naming the flag and the value."""
    import argparse

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer, got {text!r}") from None
        if not is_int(value, minimum):
            raise argparse.ArgumentTypeError(f"must be {_integer_phrase(minimum)}, got {value}")
        return value

    return parse
