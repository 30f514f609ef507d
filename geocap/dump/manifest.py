"""The dump job's side of ``manifest.json`` (format: :mod:`geocap.data.dump_format`): created
or checked when a dump (re)starts, one entry added per finished shard, damaged shards dropped
for a resume. Every read-modify-write runs under an exclusive ``flock`` on ``manifest.lock`` and
rewrites the file atomically, so concurrent ranks never lose an entry."""
from __future__ import annotations

import contextlib
import fcntl
import glob
import json
import math
import os
import warnings

from geocap.data.atomic import write_text_atomic
from geocap.data.dump_format import (FORMAT, FORMAT_VERSION, LOCK, MANIFEST, DumpError, metadata_digest,
                                     read_manifest, shard_name, shard_problem)

UNCHECKED = ("checkpoint", "data")          # metadata keys a rerun may change (paths)

__all__ = ["UNCHECKED", "add_shard", "add_skipped", "drop_lost_shards", "manifest_lock", "open_manifest",
           "remove_stale"]


@contextlib.contextmanager
def manifest_lock(path: str):
    """An exclusive ``flock`` on ``path/manifest.lock`` (blocks until free)."""
    fd = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def _write_manifest(path: str, manifest: dict) -> None:
    write_text_atomic(os.path.join(path, MANIFEST), json.dumps(manifest, indent=1, sort_keys=True))


def open_manifest(out: str, metadata: dict, n_images: int, shard_images: int) -> dict:
    """Create the manifest, or check a rerun's ``metadata`` against it; the manifest (under the
    lock). DumpError naming the differing keys when the dump was written with other settings
    (only the ``UNCHECKED`` paths may differ; k-means centroids are the first run's). The settings
    are fixed by the first finished shard: a manifest that lists none (a first run stopped before
    finishing one, e.g. by a bad image) holds nothing, and a rerun with other settings (the bad
    image removed) starts the dump afresh, with a warning."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        if manifest is not None and not manifest["shards"] and _differing(manifest["metadata"], metadata)[1]:
            warnings.warn(f"{os.path.join(out, MANIFEST)}: no shard of the earlier run finished; starting afresh "
                          f"with this run's settings", stacklevel=3)
            manifest = None
        if manifest is None:
            manifest = {"format": FORMAT, "format_version": FORMAT_VERSION, "metadata": metadata,
                        "metadata_sha256": metadata_digest(metadata), "n_images": n_images,
                        "shard_images": shard_images, "n_shards": math.ceil(n_images / shard_images), "shards": []}
            _write_manifest(out, manifest)
            return manifest
        old = manifest["metadata"]
        adopted, differ = _differing(old, metadata)
        if differ:
            shown = "; ".join(f"{k}: {_short(old.get(k))} in the dump, {_short(adopted.get(k))} now"
                              for k in differ[:4])
            raise DumpError(f"{os.path.join(out, MANIFEST)}: the existing dump was written with other settings "
                            f"({shown}); use another --out or the same settings to resume")
        return manifest


def _differing(old: dict, metadata: dict) -> tuple:
    """``(metadata as a rerun adopts it, sorted keys that differ from ``old``)``: the ``UNCHECKED``
    paths and the k-means centroids are the first run's."""
    adopted = dict(metadata, **{k: old[k] for k in UNCHECKED if k in old})
    if "cluster_centroids" in old and metadata.get("clusters") == "kmeans":
        adopted["cluster_centroids"] = old["cluster_centroids"]      # the first run's fit
    return adopted, sorted(k for k in set(old) | set(adopted) if old.get(k) != adopted.get(k))


def _short(value) -> str:
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def add_shard(out: str, entry: dict) -> dict:
    """List a finished shard (replacing an entry of the same index); the manifest now."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        shards = [e for e in manifest["shards"] if e["index"] != entry["index"]] + [entry]
        manifest["shards"] = sorted(shards, key=lambda e: e["index"])
        _write_manifest(out, manifest)
        return manifest


def add_skipped(out: str, skipped: dict) -> dict:
    """Record images left out (``--on-error skip``): ``skipped`` maps an image id (str) to
    ``{"file", "reason", "shard"}``, kept in the manifest's ``skipped_images``; the manifest now."""
    with manifest_lock(out):
        manifest = read_manifest(out)
        manifest.setdefault("skipped_images", {}).update(skipped)
        _write_manifest(out, manifest)
        return manifest


def drop_lost_shards(out: str, entries: list) -> list:
    """Indices of the listed ``entries`` whose file is missing, damaged or replaced (not of the
    recorded size or SHA-256; shards listed without a digest, by geocap before checksums, are
    checked by size alone, with a warning); they are removed from the manifest (under the lock)
    so that they are written again."""
    lost = [e["index"] for e in entries if shard_problem(os.path.join(out, e["file"]), e, digest=True)]
    unchecked = [e["file"] for e in entries if "sha256" not in e and e["index"] not in lost]
    if unchecked:
        warnings.warn(f"{out}: {len(unchecked)} listed shards (first: {unchecked[0]}) were written without a "
                      f"checksum (by an older geocap): resuming checks their size only", stacklevel=3)
    if lost:
        with manifest_lock(out):
            manifest = read_manifest(out)
            manifest["shards"] = [e for e in manifest["shards"] if e["index"] not in lost]
            _write_manifest(out, manifest)
    return lost


def remove_stale(out: str, index: int) -> None:
    """Remove shard ``index``'s temporary files left by a killed run."""
    for tmp in glob.glob(os.path.join(glob.escape(out), shard_name(index) + ".tmp-*")):
        with contextlib.suppress(FileNotFoundError):
            os.remove(tmp)
