"""What one dump job (one rank) did: :class:`DumpResult`, and :func:`summarize` for the whole dump."""
from __future__ import annotations

from dataclasses import dataclass, field

from geocap.data.dump_format import read_manifest

__all__ = ["DumpResult", "summarize"]


@dataclass
class DumpResult:
    """What one call of :func:`geocap.dump.job.dump` did (this rank): shards written and skipped
    (and ``shards_redone``: listed in the manifest but missing or damaged), images and
    records written, wall ``seconds``, ``writer_seconds`` the time this process spent on writing
    (in the shard writer, or with ``writer="process"`` handing records to the writer process and
    waiting for it), ``writer_child_seconds`` the writer process's own time (0 inline), ``bytes``
    written; ``complete`` whether the manifest lists every shard now, ``dump_bytes`` /
    ``dump_images`` the whole dump's totals over the listed shards."""
    path: str
    rank: int
    world_size: int
    shards_written: list = field(default_factory=list)
    shards_skipped: list = field(default_factory=list)
    shards_redone: list = field(default_factory=list)
    images: int = 0
    records: int = 0
    seconds: float = 0.0
    writer_seconds: float = 0.0
    writer_child_seconds: float = 0.0
    bytes: int = 0
    complete: bool = False
    dump_bytes: int = 0
    dump_images: int = 0
    images_skipped: int = 0          # the whole dump's images left out by --on-error skip (manifest)
    notes: list = field(default_factory=list)        # more lines for the summary (e.g. files left out)

    @property
    def images_per_s(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else 0.0

    @property
    def bytes_per_image(self) -> float:
        return self.dump_bytes / self.dump_images if self.dump_images else 0.0

    def lines(self) -> list:
        share = 100.0 * self.writer_seconds / self.seconds if self.seconds > 0 else 0.0
        out = [f"rank {self.rank}/{self.world_size}: wrote {len(self.shards_written)} shards "
               f"({self.images} images, {self.records} records, {self.bytes / 2**20:.1f} MiB) in {self.seconds:.1f} s "
               f"({self.images_per_s:.1f} images/s; writer {share:.0f}% of the time"
               + (f", writer process busy {100.0 * self.writer_child_seconds / self.seconds:.0f}%"
                  if self.writer_child_seconds and self.seconds > 0 else "") + "); "
               f"{len(self.shards_skipped)} shards already done"
               + (f"; redid {len(self.shards_redone)} listed shards whose files were missing or damaged"
                  if self.shards_redone else "")]
        out.extend(self.notes)
        if self.images_skipped:
            out.append(f"{self.images_skipped} images skipped (unreadable or refused; each with its reason in "
                       f"{self.path}/manifest.json, skipped_images)")
        if self.complete:
            out.append(f"dump complete: {self.path}: {self.dump_images} images, "
                       f"{self.dump_bytes / 2**20:.1f} MiB, {self.bytes_per_image / 1024:.1f} KiB per image")
        else:
            out.append(f"dump not complete yet: {self.path} (other ranks still writing, or rerun to resume)")
        return out



def summarize(result: DumpResult) -> DumpResult:
    """``result`` with ``complete``, ``dump_bytes`` and ``dump_images`` read from the manifest now
    (after the other ranks finished, under torchrun)."""
    manifest = read_manifest(result.path)
    result.complete = len(manifest["shards"]) == manifest["n_shards"]
    result.dump_bytes = sum(e["bytes"] for e in manifest["shards"])
    skipped = manifest.get("skipped_images", {})
    listed = {e["index"] for e in manifest["shards"]}
    result.images_skipped = len(skipped)
    result.dump_images = (sum(e["images"] for e in manifest["shards"])
                          - sum(1 for s in skipped.values() if s.get("shard") in listed))
    return result
