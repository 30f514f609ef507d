"""Digests of whole files: what checkpoints, evaluations and dump manifests record to recognise
the exact bytes they were made from."""
from __future__ import annotations

import hashlib
import os

__all__ = ["file_sha256", "update_with_file"]


def update_with_file(digest, path) -> None:
    """Feed the file's bytes to ``digest`` (a ``hashlib`` object), read in 1 MiB blocks."""
    with open(os.fspath(path), "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            digest.update(block)


def file_sha256(path) -> str:
    """Hex SHA-256 of the file's bytes (read in 1 MiB blocks)."""
    digest = hashlib.sha256()
    update_with_file(digest, path)
    return digest.hexdigest()
