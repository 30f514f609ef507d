"""Renamed keyword arguments: the old name keeps working for one release, with a warning.

    @renamed_argument("key_padding_mask", "attention_mask")
    def attention(q, k, v, attention_mask=None, ...): ...

``attention(q, k, v, key_padding_mask=m)`` then runs as ``attention(q, k, v, attention_mask=m)``
and emits a DeprecationWarning naming the new argument; passing both names (the new one by
keyword or by position) raises a TypeError naming both. Nothing is renamed in meaning: the value
is passed through unchanged. The warning points at the first caller outside torch, so a user's
``module(..., old=...)`` line is named, not ``nn.Module.__call__``.
"""
from __future__ import annotations

import functools
import inspect
import os
import sys
import warnings

import torch

_TORCH_DIR = os.path.dirname(torch.__file__) + os.sep


def renamed_argument(old: str, new: str):
    """Decorator: accept ``old`` as a deprecated keyword alias of the parameter ``new`` of the
    decorated function (which must have a parameter ``new`` and none called ``old``)."""

    def wrap(fn):
        params = inspect.signature(fn).parameters
        if new not in params or old in params:
            raise TypeError(f"renamed_argument: {fn.__qualname__} must have a parameter {new!r} and none {old!r}")
        names = list(params)
        kind = params[new].kind
        # how many positional arguments reach `new` (None when it is keyword-only)
        position = names.index(new) if kind in (inspect.Parameter.POSITIONAL_ONLY,
                                                 inspect.Parameter.POSITIONAL_OR_KEYWORD) else None

        @functools.wraps(fn)
        def call(*args, **kwargs):
            if old in kwargs:
                if new in kwargs or (position is not None and len(args) > position):
                    raise TypeError(f"{fn.__qualname__}() got both {new!r} and its deprecated alias {old!r}: "
                                    f"pass {new!r} only")
                warnings.warn(f"{fn.__qualname__}(): the argument {old!r} is deprecated and will be removed in the "
                              f"next release; pass {new!r} (same values: True = attend, a real object)",
                              DeprecationWarning, stacklevel=_caller_level())
                kwargs[new] = kwargs.pop(old)
            return fn(*args, **kwargs)

        return call

    return wrap


def _caller_level() -> int:
    """``warnings.warn``'s stacklevel, seen from ``call`` above, of the first frame outside torch."""
    level, frame = 2, sys._getframe(2)   # 1 = call, 2 = its caller
    while frame is not None and frame.f_code.co_filename.startswith(_TORCH_DIR):
        frame, level = frame.f_back, level + 1
    return level
