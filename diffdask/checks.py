"""Parameter checks at the door, shared by every domain.

Each check takes the parameter's name (and its unit, where it has one) so the error says what
is wrong and what is expected; each returns the value as the plain Python type the caller
computes with. Booleans are never numbers here: ``True`` passed as a count or a length is
a mistake, not 1. A domain with its own exception type (geometry raises `GeometryError`)
passes it as ``error``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from diffdask.errors import ParameterError


def _unit_in(unit: str) -> str:
    return f" in {unit}" if unit else ""


def _number(name: str, value: Any, unit: str, error: type[Exception]) -> float:
    if isinstance(value, (bool, np.bool_)):
        raise error(f"{name} must be a number{_unit_in(unit)}, got {value!r}.")
    try:
        return float(value)
    except (TypeError, ValueError):
        raise error(f"{name} must be a number{_unit_in(unit)}, got {value!r}.") from None


def check_finite(name: str, value: Any, unit: str = "", error: type[Exception] = ParameterError) -> float:
    """A finite float (of any sign), or ``error`` naming ``name``."""
    v = _number(name, value, unit, error)
    if not math.isfinite(v):
        raise error(f"{name} must be finite{_unit_in(unit)}, got {value!r}.")
    return v


def check_positive(name: str, value: Any, unit: str = "", error: type[Exception] = ParameterError) -> float:
    """A positive finite float, or ``error`` naming ``name``."""
    v = _number(name, value, unit, error)
    if not math.isfinite(v) or v <= 0:
        raise error(f"{name} must be positive and finite{unit and ' (' + unit + ')'}, got {value!r}.")
    return v


def check_nonnegative(name: str, value: Any, unit: str = "", error: type[Exception] = ParameterError) -> float:
    """A non-negative finite float, or ``error`` naming ``name``."""
    v = _number(name, value, unit, error)
    if not math.isfinite(v) or v < 0:
        raise error(f"{name} must be ≥ 0 and finite{unit and ' (' + unit + ')'}, got {value!r}.")
    return v


def check_fraction(name: str, value: Any) -> float:
    """A probability in [0, 1], or a `ParameterError` naming ``name``."""
    v = _number(name, value, "", ParameterError)
    if not 0.0 <= v <= 1.0:
        raise ParameterError(f"{name} must be a fraction in [0, 1], got {value!r}.")
    return v


def check_int(
    name: str, value: Any, minimum: int | None = None, maximum: int | None = None, what: str = "",
) -> int:
    """An integer in ``[minimum, maximum]`` (either end open when None), or a `ParameterError`.

    ``what`` names the unit counted (``"pixels"``, ``"bins"``) in the message.
    """
    counted = f" number of {what}" if what else ""
    if isinstance(value, (bool, np.bool_)) or not isinstance(value, (int, np.integer)):
        raise ParameterError(f"{name} must be an integer{counted}, got {value!r}.")
    if minimum is not None and value < minimum:
        raise ParameterError(f"{name} must be an integer{counted} ≥ {minimum}, got {value!r}.")
    if maximum is not None and value > maximum:
        raise ParameterError(f"{name} = {value} is more than the {maximum:,} allowed; use fewer.")
    return int(value)


def check_seed(seed: Any) -> int:
    """A seed: a non-negative integer."""
    if isinstance(seed, (bool, np.bool_)) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ParameterError(f"seed must be a non-negative integer, got {seed!r}.")
    return int(seed)


def check_range(name: str, value: Any, unit: str = "", allow_zero: bool = False) -> tuple[float, float]:
    """A fixed value or a ``(low, high)`` pair of positive numbers as a ``(low, high)`` range."""
    pair = (value, value) if np.ndim(value) == 0 else tuple(value)
    if len(pair) != 2:
        raise ParameterError(f"{name} must be one number or a (low, high) pair{_unit_in(unit)}, got {value!r}.")
    check = check_nonnegative if allow_zero else check_positive
    low, high = check(name, pair[0], unit), check(name, pair[1], unit)
    if low > high:
        raise ParameterError(f"{name} range must have low ≤ high, got {value!r}.")
    return low, high


def check_choice(name: str, value: Any, choices: Sequence[str]) -> str:
    """``value`` if it is one of ``choices``, else a `ParameterError` listing them."""
    if not isinstance(value, str) or value not in choices:
        raise ParameterError(f"unknown {name} {value!r}; choose one of {', '.join(map(repr, choices))}.")
    return value
