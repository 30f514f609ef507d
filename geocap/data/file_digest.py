"""Digests of whole files: what checkpoints, evaluations and dump manifests record to recognise
the exact bytes they were made from."""
from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256"]


def file_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    with open(os.fspath(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
