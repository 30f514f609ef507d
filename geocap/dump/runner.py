"""The shard runner of a dump job: the records of each shard of a plan's ``todo`` (a
:class:`~geocap.dump.plan.DumpPlan`'s, or ``geocap.hf``'s), batch by batch, into the shard writer
(in a child process or inline), each finished shard listed in the manifest as soon as it is renamed.
With ``stats_only``, a fresh ``collector_class()`` sees every record of a shard (maps included)
and its ``state()`` is stored in the shard instead of the maps; a collector with a
``shard_share(images, total)`` method is first told the shard's share of the plan's images (so it
can size what it stores). A collector class with ``in_writer_process = True`` (importable by
name in a fresh interpreter, as ``geocap.analysis.StatsCollector``) runs in the writer process,
when there is one (on the writer's core, beside the model's: the records go there anyway); any
other runs in the model's process. Maps the collector class does not read (its ``maps_read``,
when it has one) are dropped before the records travel, when the records carry those maps' row
entropies."""
from __future__ import annotations

import os
import time

from geocap import stop
from geocap.data.dump_format import shard_name
from geocap.dump.manifest import add_shard
from geocap.dump.result import DumpResult
from geocap.dump.writer_process import collect_records, new_collector
from geocap.data.attention_record import ENTROPY_NAMES, MAP_NAMES

__all__ = ["run_shards"]


def _drop_unread_maps(records, unread) -> None:
    """Drop the maps named in ``unread`` from records that carry their row entropies."""
    for r in records:
        for name in unread:
            if getattr(r, ENTROPY_NAMES[name]) is not None:
                setattr(r, name, None)


def run_shards(plan, record_images, result: DumpResult, *, collector_class=None, progress: bool = True) -> None:
    """Write every shard of ``plan.todo`` with the records ``record_images(positions)`` gives (per
    position in the plan's image order, that image's list of Records), counting into ``result``.
    ``plan``: a :class:`~geocap.dump.plan.DumpPlan` or any plan with its ``out``, ``split``,
    ``rank``, ``world_size``, ``options`` (``batch_size``, ``writer``), ``todo``, ``n_images``, ``shard_range(k)``
    and ``shard_args(k)``. On any error the open shard is aborted (its temporary file removed)
    and the shards already renamed stay listed."""
    from geocap.dump.writer import ShardWriter
    from geocap.progress import progress_bar

    o, out = plan.options, plan.out
    in_child = (bool(plan.todo and o.writer == "process") and collector_class is not None
                and getattr(collector_class, "in_writer_process", False))
    read = getattr(collector_class, "maps_read", None)
    unread = tuple(m for m in MAP_NAMES if read is not None and m not in read)

    todo_images = sum(hi - lo for lo, hi in map(plan.shard_range, plan.todo))
    bar = progress_bar(enabled=progress, total=todo_images, unit="img",
                       desc=f"dump {plan.split}" + (f" rank {plan.rank}" if plan.world_size > 1 else ""))
    child = None
    if plan.todo and o.writer == "process":
        from geocap.dump.writer_process import QUEUE_IMAGES, WriterProcess
        t0 = time.perf_counter()
        # a collector in the child lets it fall behind while it imports the analyses (torch too, for
        # records without stored entropies): a longer queue keeps the model going meanwhile
        # (stats-only records hold no decoder maps)
        child = WriterProcess(queue_images=QUEUE_IMAGES * (4 if in_child else 1))
        result.writer_seconds += time.perf_counter() - t0
    closing: dict = {}          # writer process: seq -> (k, t_shard, parent seconds) of shards closing

    def finish(k, t_shard, size, sha256, n_records, parent_seconds, child_seconds) -> None:
        """A shard is complete (renamed): count it and list it in the manifest."""
        lo, hi = plan.shard_range(k)
        result.writer_seconds += parent_seconds
        result.writer_child_seconds += child_seconds
        result.bytes += size
        result.records += n_records
        result.shards_written.append(k)
        entry = {"index": k, "file": shard_name(k), "images": hi - lo, "records": n_records, "bytes": size,
                 "sha256": sha256, "rank": plan.rank, "seconds": round(time.perf_counter() - t_shard, 4),
                 "writer_seconds": round(parent_seconds, 4)}
        if child is not None:
            entry["writer_child_seconds"] = round(child_seconds, 4)
        add_shard(out, entry)

    def collect(block: bool) -> None:
        t0 = time.perf_counter()
        for seq, size, n_records, child_seconds, sha256 in child.collect(block):
            k, t_shard, parent_seconds = closing.pop(seq)
            finish(k, t_shard, size, sha256, n_records, parent_seconds, child_seconds)
        result.writer_seconds += time.perf_counter() - t0

    try:
        for k in plan.todo:
            t_shard = time.perf_counter()
            lo, hi = plan.shard_range(k)
            path = os.path.join(out, shard_name(k))
            shard = child if child is not None else ShardWriter(path, **plan.shard_args(k))
            collector = None
            if child is not None:
                spec = (collector_class, hi - lo, plan.n_images) if in_child else None
                child.open(path, collector=spec, **plan.shard_args(k))
            if collector_class is not None and not in_child:
                collector = new_collector(collector_class, hi - lo, plan.n_images)
            try:
                for b0 in range(lo, hi, o.batch_size):
                    stop.check()
                    positions = list(range(b0, min(hi, b0 + o.batch_size)))
                    for recs in record_images(positions):
                        if collector is not None:
                            collect_records(collector, recs)
                        elif in_child:
                            _drop_unread_maps(recs, unread)
                        shard.add_image(recs)
                        result.images += 1          # an image left out (geocap.hf's on_error skip) is not
                    bar.update(len(positions))
                    if closing:
                        collect(block=False)        # list the shards the writer process finished meanwhile
                state = None if collector is None else collector.state()
                if child is None:
                    size = shard.close(state)
                else:                               # the child finishes it while the model goes on
                    seq = child.send_close(state)
                    closing[seq] = (k, t_shard, child.seconds)
            except BaseException:
                shard.abort()
                raise
            if child is None:
                finish(k, t_shard, size, shard.sha256, shard.n_records, shard.seconds, 0.0)
        while closing:
            collect(block=True)             # each shard listed as soon as the writer process renamed it
    finally:
        bar.close()
        if child is not None:
            t0 = time.perf_counter()
            child.stop()
            result.writer_seconds += time.perf_counter() - t0
