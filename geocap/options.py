"""Checks of option values shared by the commands: each raises
:class:`~geocap.errors.UsageError` (a ValueError) naming the option."""
from __future__ import annotations

from geocap.errors import UsageError

__all__ = ["check_int"]


def check_int(name: str, value, low: int) -> int:
    """``value`` when it is an int (not a bool) ``>= low``; UsageError naming ``name`` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise UsageError(f"{name} must be an int >= {low}, got {value!r}")
    return value
