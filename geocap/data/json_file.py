"""Reading a JSON file whose absence or corruption must be reported by name."""
from __future__ import annotations

import json
import os


def read_json(path, what: str, error: type = ValueError):
    """The parsed JSON at ``path``; ``error`` (a ValueError subclass) naming the file otherwise:
    ``"<path>: <what> missing"`` or ``"<path>: not a readable <what> (<reason>)"``."""
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except FileNotFoundError:
        raise error(f"{path}: {what} missing") from None
    except (OSError, ValueError) as err:
        raise error(f"{path}: not a readable {what} ({err})") from None
