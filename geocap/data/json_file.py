"""Reading a JSON file whose absence or corruption must be reported by name."""
from __future__ import annotations

import json
import os

from geocap.errors import DataError


def read_json(path, what: str, error: type = DataError):
    """The parsed JSON at ``path``; ``error`` (a ValueError subclass, DataError by default) naming
    the file otherwise:
    ``"<path>: <what> missing"`` or ``"<path>: not a readable <what> (<reason>)"``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: {what} missing") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: not a readable {what} ({err})") from None
