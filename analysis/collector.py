"""``StatsCollector``: the four analyses' accumulators behind one streaming, mergeable interface.

``geocap dump --stats-only`` keeps one per shard (``update`` per record), stores ``state()`` in the
shard, and the reader merges the shards' collectors (``from_state`` + ``merge``); ``geocap analyze``
turns the merged collector into ``analysis.json`` (``to_json()``) and the figures.

State: a flat ``dict[str, np.ndarray]`` (names like ``entropy.sum.cross.sum``: ``<analysis>.<key>``,
plain numeric arrays, 0-d for scalars) storable as HDF5 datasets, plus ``collector.records`` and
``collector.version`` (:data:`STATE_VERSION`; ``from_state`` refuses other versions).
"""
from __future__ import annotations

import numpy as np

from geocap.data.attention_record import Record

from .accumulator import STATE_SEPARATOR, image_group, one_thread, shared_per_record
from .entropy import EntropyAccumulator
from .grounding import GroundingAccumulator
from .proximity import ProximityAccumulator
from .thematic import ThematicAccumulator
from geocap.errors import DataError

# 2: proximity counts each image once (its state holds the image ids); 3: the controlled per-image
# measures (within-row correlations, referent effect) with their per-image sums; 4: the proximity
# samples carry their bound, and a dump shard stores its sample cut to its share (shard_share)
STATE_VERSION = 4
ANALYSES = ("entropy", "thematic", "proximity", "grounding")


class StatsCollector:
    """All four analyses at once (each record is validated once).

    Args:
        k, kmeans_buffer: the thematic analysis' k-means fallback (see :mod:`.thematic`).
        bins, reservoir: the proximity analysis' curve bins and Spearman sample size (:mod:`.proximity`).
        seed: seed of the k-means fallback and of the pair sample.
    """

    # the maps the analyses read when a record carries row entropies (decoder self-attention only
    # feeds the entropy analysis, which then reads its rows); a stats-only dump drops the others
    maps_read = ("encoder_self", "cross")
    # importable by name: a stats-only dump's writer process runs it (geocap.dump.runner)
    in_writer_process = True

    def __init__(self, *, k: int = 6, kmeans_buffer: int = 256, bins: int = 10, reservoir: int = 20000,
                 seed: int = 0):
        self.parts = {
            "entropy": EntropyAccumulator(),
            "thematic": ThematicAccumulator(k=k, kmeans_buffer=kmeans_buffer, seed=seed),
            "proximity": ProximityAccumulator(bins=bins, reservoir=reservoir, seed=seed),
            "grounding": GroundingAccumulator(),
        }
        self.records = 0

    def update(self, record: Record) -> "StatsCollector":
        """Validate ``record`` (ValueError naming it) and add it to every analysis; returns self."""
        return self.update_image([record])

    def update_image(self, records) -> "StatsCollector":
        """Add one image's records (consecutive, one image id: what a dump sends per image) to every
        analysis, validating each (ValueError naming it): the sums of :meth:`update` on each in turn,
        up to float64 summation order, at a fraction of the cost (see
        :meth:`.accumulator.Accumulator.update_image`); returns self."""
        records = image_group(records, "StatsCollector")
        with one_thread(), shared_per_record():
            for part in self.parts.values():
                part._update_image(records)
        self.records += len(records)
        return self

    def shard_share(self, images: int, total: int) -> None:
        """Told by a dump that this collector sees one shard of ``images`` of its ``total`` images, so
        that :meth:`state` stores no more than the merged statistics can need (the proximity pair
        samples: :meth:`.proximity.ProximityAccumulator.shard_share`); merging stays exact."""
        self.parts["proximity"].shard_share(images, total)

    def merge(self, other: "StatsCollector") -> "StatsCollector":
        """Add every record ``other`` has seen; returns self."""
        if not isinstance(other, StatsCollector):
            raise ValueError(f"StatsCollector.merge: expected a StatsCollector, got {type(other).__name__}")
        for name, part in self.parts.items():
            part.merge(other.parts[name])
        self.records += other.records
        return self

    def state(self) -> dict[str, np.ndarray]:
        out = {"collector.version": np.asarray(STATE_VERSION, dtype=np.int64),
               "collector.records": np.asarray(self.records, dtype=np.int64)}
        for name, part in self.parts.items():
            out.update({f"{name}{STATE_SEPARATOR}{key}": value for key, value in part.state().items()})
        return out

    @classmethod
    def from_state(cls, state: dict) -> "StatsCollector":
        if "collector.version" not in state:
            raise DataError("not a StatsCollector state: 'collector.version' is missing")
        version = int(np.asarray(state["collector.version"]))
        if version != STATE_VERSION:
            raise DataError(f"StatsCollector state version {version} is not supported (this geocap reads "
                             f"version {STATE_VERSION}; statistics of an older stats-only dump lack the controlled "
                             f"measures or the proximity samples' bounds: dump again, or dump the maps and run "
                             f"geocap analyze on them)")
        collector = cls()
        for name, part in collector.parts.items():
            head = f"{name}{STATE_SEPARATOR}"
            sub = {key[len(head):]: value for key, value in state.items() if key.startswith(head)}
            collector.parts[name] = type(part).from_state(sub)
        collector.records = int(np.asarray(state.get("collector.records", 0)))
        return collector

    def results(self) -> dict:
        """``{analysis name: result}`` (each with ``to_json()``, ``plot(path)`` and ``reading()``)."""
        return {name: part.result() for name, part in self.parts.items()}

    def to_json(self) -> dict:
        """The analysis.json dict: one section per analysis plus ``records`` and ``model``."""
        results = self.results()
        out = {name: result.to_json() for name, result in results.items()}
        out["records"] = self.records
        out["model"] = model_size(results)
        return out


def model_size(results: dict) -> dict:
    """Layers and heads of the encoder and the decoder, from the shapes of the attention statistics
    (so any model's records, not geocap's config): ``{"encoder": [L, H] or None, "decoder": ...}``."""
    entropy, thematic, grounding = results["entropy"], results["thematic"], results["grounding"]
    encoder = entropy.per_head.get("encoder_self")
    encoder = encoder if encoder is not None else thematic.affinity
    decoder = next((entropy.per_head[k] for k in ("decoder_self", "cross") if entropy.per_head.get(k) is not None),
                   grounding.accuracy_per_head)
    return {part: None if values is None else [int(n) for n in np.shape(values)]
            for part, values in (("encoder", encoder), ("decoder", decoder))}

