"""The guard every command that writes a folder of outputs (``--out``) applies first: it writes
only into a folder that is absent, empty, or one it wrote itself (recognised by a marker file),
never into anything else (a dump, a dataset, a home folder)."""
from __future__ import annotations

import os
from geocap.errors import UsageError

__all__ = ["check_out_dir"]


def check_out_dir(out, *, marker: str, kind: str, verb: str = "write into") -> None:
    """ValueError naming ``--out`` unless the folder ``out`` is absent, empty, or holds the file
    ``marker`` (what every ``kind``, e.g. "geocap view site", holds); ``verb`` says what the
    command would have done to it ("write into", "replace")."""
    out = os.fspath(out)
    if not os.path.exists(out):
        return
    if not os.path.isdir(out):
        raise UsageError(f"--out: {out} exists and is not a folder")
    if os.listdir(out) and not os.path.isfile(os.path.join(out, marker)):
        raise UsageError(f"--out: {out} is not empty and is not a {kind}; refusing to {verb} it")
