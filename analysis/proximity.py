"""Analysis II of Ilinykh (2022), the seed study (:mod:`geocap.analysis`): encoder self-attention
against visual proximity and semantic similarity of the two objects.

**Controlled measures (the verdict)**, per layer, on the head-mean map of each image's first
record: for each query object i (a regular object, with at least :data:`~.rows.MIN_ROW_KEYS` other
regular objects), a correlation within its row over the other regular objects j, averaged over
the image's rows with a defined value; then the mean over images with a 95 % t interval
(:class:`~.uncertainty.ImageMeans`). ``per_image["distance"]``: Spearman's rho of ``w(i, j)`` with
``d(i, j)``. ``per_image["distance_given_similarity"]`` (records with features; objects with an
all-zero feature vector left out): the partial correlation of ``log w(i, j)`` with the ranks of
``d(i, j)``, the feature cosine ``s(i, j)`` regressed out of both
(:func:`~.rows.partial_attention_correlation`). Null: attention that follows feature similarity
alone scores 0 on it, whatever links similarity to position in the scenes; a row of equal
weights has no value. Within rows, the number of objects of an image (the level 1/N of its
weights) never mixes into the correlation, as it does in the pooled Spearman below.

**Description** (the seed study's measures):

For every ordered pair of distinct objects ``(i, j)`` of a record (query i, key j), per layer ``l``:

- the attention weight ``w_l(i, j)``: the encoder self-attention of i to j, averaged over heads
  (raw weight: rows sum to 1 over the image's N objects);
- the normalised distance ``d(i, j) = ||centre_i - centre_j|| / sqrt(2)`` between the box centres
  (boxes are normalised to the image, so ``d`` is in [0, 1], 1 = opposite corners);
- the semantic similarity ``s(i, j)``: the cosine of the two objects' feature vectors (records
  with features; objects with an all-zero feature vector are skipped).

Results, per layer: **binned curves** (exact means of ``w`` over all pairs, in ``bins`` equal bins of
``d`` on [0, 1] and of ``s`` on [-1, 1]) and **Spearman's rank correlation** of ``w_l`` with ``d`` and
with ``s``. Spearman over all pairs of a 100k-image dump cannot be held in memory, so it is computed
on a uniform random sample of at most ``reservoir`` pairs (bottom-k by a seeded hash of the pair,
see :mod:`.reservoir`: the same pairs for every layer, and merging shards gives exactly the
single-pass sample; with fewer pairs than ``reservoir`` it is every pair, and exact). A dump shard
stores its samples cut to about twice its share of the merged sample
(:meth:`ProximityAccumulator.shard_share`), so a dump's samples stay near ``2 * reservoir`` pairs in
all however many shards it has; the merge is still the single pass's sample unless a shard held
more than that of it (then it is the smaller uniform sample of every pair below the lowest cut, and
``spearman_sample_pairs`` gives its size).

What is counted: each *image's* pairs, once. Encoder attention, boxes and features depend on the
image alone, and a dump holds one record per caption of an image, all with the same encoder maps;
only the first record of an image is used (the others are counted under
``records_repeating_an_image``), so ``pairs`` is the number of ordered pairs of distinct objects
over ``images`` images. A bin with fewer than :data:`MIN_BIN_PAIRS` pairs is too thin for its mean
to mean much: the figure and the report leave it out (``analysis.json`` keeps its mean and count
under ``*_curve`` / ``*_bin_pairs``). Records of kind ``"hypothetical"`` are skipped. Special objects
(``extra["special_objects"]``, e.g. a ViT's
class token; :mod:`geocap.data.attention_record`) stand for no region and are in no pair. Memory:
``[L, bins]`` sums, the two samples and one id per image.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geocap.data.attention_record import Record, regular_objects
from geocap.errors import DataError, UsageError

from .accumulator import (Accumulator, SeenImages, SumTable, config_state, describe, encoder_head_mean,
                          encoder_rows, feature_cosines, fold, ratio, read_config, skip_hypothetical, to_list)
from .reservoir import PairReservoir, pair_keys
from .rows import MIN_ROW_KEYS, mean_over_rows
from .uncertainty import ImageMeans, first_measured, image_means, layer_verdicts, layers_text

MEASURES = ("distance", "similarity")
RANGES = {"distance": (0.0, 1.0), "similarity": (-1.0, 1.0)}
MIN_BIN_PAIRS = 30   # bins with fewer object pairs are left out of the figure and the report's table
SHARD_SLACK = 500    # pairs a dump shard's stored sample keeps beyond twice its share (see shard_share)
# the controlled, per-image measures (see the module docstring): name -> what it correlates
PER_IMAGE = {"distance": "Spearman's rho of attention and box-centre distance within each query's row",
             "distance_given_similarity": "partial correlation within each query's row of the log attention weights "
                                          "(the logits up to a constant) and the ranks of box-centre distance, "
                                          "feature cosine regressed out of both"}


def spearman(x: np.ndarray, y: np.ndarray) -> tuple[float | None, str | None]:
    """Spearman's rho of two samples, or ``(None, reason)`` when it is undefined."""
    from scipy.stats import spearmanr

    if len(x) < 3:
        return None, f"only {len(x)} pairs (need 3)"
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        return None, "constant values (no ranking)"
    return float(spearmanr(x, y).statistic), None


@dataclass
class ProximityResult:
    """Binned curves and Spearman correlations per layer; None / null where undefined, with the
    reason in ``unavailable`` (keys ``spearman_distance``, ``spearman_similarity``, ``..._layer<l>``)."""

    bins: int = 10
    spearman_distance: list = field(default_factory=list)     # [L] float or None
    spearman_similarity: list = field(default_factory=list)
    curves: dict = field(default_factory=dict)                # measure -> [L, bins] mean weight (NaN: empty)
    counts: dict = field(default_factory=dict)                # measure -> [bins] pairs per bin
    sampled: dict = field(default_factory=dict)               # measure -> pairs in the Spearman sample
    pairs: dict = field(default_factory=dict)                 # measure -> pairs seen (each image once)
    per_image: dict = field(default_factory=dict)             # PER_IMAGE name -> [L] of {mean, ci95, images}|None
    images: int = 0
    records: int = 0
    records_repeating_an_image: int = 0
    records_without_encoder_self: int = 0                     # of the images' first records
    records_without_features: int = 0
    skipped_hypothetical: int = 0
    unavailable: dict = field(default_factory=dict)

    def edges(self, measure: str) -> np.ndarray:
        low, high = RANGES[measure]
        return np.linspace(low, high, self.bins + 1)

    def shown_curve(self, measure: str) -> np.ndarray | None:
        """``curves[measure]`` with NaN in the bins holding fewer than :data:`MIN_BIN_PAIRS` pairs."""
        curve = self.curves.get(measure)
        if curve is None:
            return None
        return np.where(self.counts[measure][None, :] >= MIN_BIN_PAIRS, curve, np.nan)

    def to_json(self) -> dict:
        return {
            "per_image": {name: self.per_image.get(name) for name in PER_IMAGE},
            "min_row_keys": MIN_ROW_KEYS,
            "spearman_distance": list(self.spearman_distance) if self.spearman_distance else None,
            "spearman_similarity": list(self.spearman_similarity) if self.spearman_similarity else None,
            "distance_bin_edges": to_list(self.edges("distance")),
            "distance_curve": to_list(self.curves.get("distance")),
            "distance_bin_pairs": to_list(self.counts.get("distance")),
            "similarity_bin_edges": to_list(self.edges("similarity")),
            "similarity_curve": to_list(self.curves.get("similarity")),
            "similarity_bin_pairs": to_list(self.counts.get("similarity")),
            "spearman_sample_pairs": {m: int(self.sampled.get(m, 0)) for m in MEASURES},
            "pairs": {m: int(self.pairs.get(m, 0)) for m in MEASURES},
            "min_bin_pairs": MIN_BIN_PAIRS,
            "images": self.images,
            "records": self.records,
            "records_repeating_an_image": self.records_repeating_an_image,
            "records_without_encoder_self": self.records_without_encoder_self,
            "records_without_features": self.records_without_features,
            "skipped_hypothetical": self.skipped_hypothetical,
            "unavailable": dict(self.unavailable),
        }

    def controlled(self) -> tuple[str | None, list | None]:
        """The measure the verdict rests on: ``distance_given_similarity`` where records have features,
        else ``distance`` (position alone, similarity not controlled); ``(name, entries)``."""
        return first_measured(self.per_image, ("distance_given_similarity", "distance"))

    def controlled_reading(self) -> str:
        name, entries = self.controlled()
        if name is None:
            reason = self.unavailable.get("per_image.distance", "no image with enough objects")
            return f"Attention against distance, controlled: not computed ({reason})."
        shown = layers_text(entries)
        verdict = layer_verdicts(entries, {"negative": "attention falls with distance",
                                           "positive": "attention rises with distance"})
        text = (f"Attention against distance, controlled ({PER_IMAGE[name]}, over the query's other regular objects; "
                f"averaged over the image's rows, then over images with a 95 % interval; 0 = no relation): {shown}. "
                f"**Verdict: {verdict}.**")
        if name == "distance":
            why = self.unavailable.get("per_image.distance_given_similarity", "no features")
            text += (" Similarity is not controlled, so attention that merely follows feature similarity (linked to "
                     f"position in most scenes) is not ruled out ({why}).")
        else:
            plain = self.per_image.get("distance") or []
            text += (" Without the similarity control: " + layer_verdicts(plain) + ".")
        if self.spearman_distance and self.spearman_distance[0] is not None:
            naive = [v for v in self.spearman_distance if v is not None]
            text += (f" The naive measure (Spearman over the pooled pairs of all images) would have said "
                     f"{naive[0]:+.3f} in layer 1 and {naive[-1]:+.3f} in layer {len(naive)}: it pools images of "
                     f"different object counts and does not separate distance from similarity.")
        return text

    def reading(self) -> str:
        parts = [self.controlled_reading()]
        for measure, values in (("distance", self.spearman_distance), ("similarity", self.spearman_similarity)):
            key = f"spearman_{measure}"
            shown = [f"layer {i + 1}: {v:+.2f}" for i, v in enumerate(values or []) if v is not None]
            if not shown:
                reason = self.unavailable.get(key) or self.unavailable.get(f"{key}_layer1")
                parts.append(f"Spearman correlation of attention with {measure}: not computed ({reason}).")
                continue
            what = "box-centre distance" if measure == "distance" else "feature cosine similarity"
            sampled, pairs = self.sampled[measure], self.pairs[measure]
            over = f"all {pairs} ordered pairs of distinct objects" if sampled == pairs else \
                f"a uniform sample of {sampled} of the {pairs} ordered pairs of distinct objects"
            parts.append(f"Spearman correlation of attention weight with {what}, over {over} of {self.images} "
                         f"images (each image once, not once per caption): {', '.join(shown)}.")
        sparse = {m: int((self.counts[m] < MIN_BIN_PAIRS).sum()) for m in MEASURES if m in self.counts}
        if any(sparse.values()):
            parts.append(f"Bins with fewer than {MIN_BIN_PAIRS} pairs are left out of the curves ("
                         + ", ".join(f"{v} of {self.bins} {m} bins" for m, v in sparse.items() if v) + ").")
        return " ".join(parts)

    def plot(self, path) -> None:
        from .plotting import plot_proximity

        plot_proximity(self, path)


def row_sums(rows, distances: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """``(sum of the rows' correlations [L], defined rows [L])`` of one image's prepared encoder rows
    (:func:`~.accumulator.encoder_rows`) with the distances ``[N, N]`` (Spearman, or the partial
    correlation given similarity when the rows were prepared for it); None when the rows are
    missing or have fewer than :data:`MIN_ROW_KEYS` keys."""
    if rows is None or not rows.usable:
        return None
    return mean_over_rows(*rows.correlation(distances))


def centre_distances(record: Record) -> np.ndarray:
    """``[N, N]`` normalised distances of the box centres (1 = opposite corners of the image)."""
    boxes = np.asarray(record.boxes, dtype=np.float64)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    return np.linalg.norm(centres[:, None] - centres[None, :], axis=-1) / np.sqrt(2.0)


def image_values(record: Record) -> dict:
    """This image's values of the :data:`PER_IMAGE` measures (what each image adds to the means over
    images): ``{name: [L] floats, None for a layer without a defined row}`` or ``{name: None}`` when
    the record lacks encoder maps (or features, for the similarity control) or has too few objects."""
    out = dict.fromkeys(PER_IMAGE)
    distances = centre_distances(record)
    for name in PER_IMAGE:
        got = row_sums(encoder_rows(record, name != "distance"), distances)
        if got is not None:
            out[name] = [float(t / n) if n else None for t, n in zip(*got)]
    return out


class ProximityAccumulator(Accumulator):
    """Streaming sums and pair samples behind :class:`ProximityResult`; see the module docstring.

    Args:
        bins: bins of each curve.
        reservoir: pairs kept for each Spearman correlation.
        seed: seed of the pair hash.
    """

    name = "proximity"

    def __init__(self, *, bins: int = 10, reservoir: int = 20000, seed: int = 0):
        if bins < 1:
            raise UsageError(f"bins must be >= 1, got {bins}")
        self.bins, self.capacity, self.seed = int(bins), int(reservoir), int(seed)
        self.stored: int | None = None        # pairs each sample keeps in state() (None: all it holds)
        self.sums = SumTable()
        self.samples = {m: PairReservoir(self.capacity) for m in MEASURES}
        self.images = SeenImages()
        self.units = ImageMeans()

    def shard_share(self, images: int, total: int) -> None:
        """This accumulator sees one shard of ``images`` of a dump's ``total`` images: its
        :meth:`state` keeps only what the merged sample can need, ``stored`` =
        ``min(reservoir, 2 * reservoir * images / total + SHARD_SLACK)`` pairs per sample (about twice
        the shard's expected share of the merged sample; see :class:`~.reservoir.PairReservoir` for
        why a cut part still merges exactly). What a dump stores then stays near
        ``2 * reservoir + SHARD_SLACK * shards`` pairs, however many pairs each shard had."""
        if total < 1 or not 0 <= images <= total:
            raise UsageError(f"shard_share: images must be in [0, total] and total >= 1, got {images} of {total}")
        self.stored = min(self.capacity, int(np.ceil(2 * self.capacity * images / total)) + SHARD_SLACK)

    def _bin(self, measure: str, values: np.ndarray) -> np.ndarray:
        low, high = RANGES[measure]
        return np.clip(((values - low) / (high - low) * self.bins).astype(np.int64), 0, self.bins - 1)

    def _add(self, measure: str, record: Record, x: np.ndarray, weights: np.ndarray, i, j) -> None:
        """Add pairs ``x [P]`` with weights ``[L, P]`` to the binned sums and the sample."""
        where = describe(record)
        layers = weights.shape[0]
        index = self._bin(measure, x)
        flat = (np.arange(layers)[:, None] * self.bins + index[None, :]).ravel()
        sums = np.bincount(flat, weights=weights.ravel(), minlength=layers * self.bins).reshape(layers, self.bins)
        self.sums.add(f"{measure}.weight", sums, where)
        self.sums.add(f"{measure}.pairs", np.bincount(index, minlength=self.bins), where)
        keys = pair_keys(self.seed, record.image_id, i, j)
        self.samples[measure].add(keys, x, weights, where)

    def _update_image(self, records: list) -> None:
        counted = skip_hypothetical(self.sums, records)
        if not counted:
            return
        first = self.images.first(counted[0].image_id)
        if len(counted) > 1 or not first:
            self.sums.add("records_repeating_an_image", len(counted) - first)
        if first:
            self._add_image(counted[0])

    def _add_image(self, record: Record) -> None:
        """Add the pairs of an image seen for the first time (its encoder maps and boxes)."""
        head_mean = encoder_head_mean(record)                                  # [L, N, N]
        if head_mean is None:
            self.sums.add("records_without_encoder_self", 1)
            return
        regular = regular_objects(record)            # special objects (a class token) are no region
        i, j = np.nonzero(~np.eye(record.num_objects, dtype=bool) & regular[:, None] & regular[None, :])
        weights = head_mean[:, i, j]                                           # [L, P]
        distances = centre_distances(record)
        self._add("distance", record, distances[i, j], weights, i, j)
        cosines = feature_cosines(record)
        self._rows("distance", record, distances)
        if cosines is None:
            self.sums.add("records_without_features", 1)
            self.units.close(self.sums)
            return
        cosine, nonzero = cosines
        self._rows("distance_given_similarity", record, distances)
        self.units.close(self.sums)
        keep = nonzero[i] & nonzero[j]
        i, j = i[keep], j[keep]
        self._add("similarity", record, cosine[i, j], weights[:, keep], i, j)

    def _rows(self, name: str, record: Record, distances: np.ndarray) -> None:
        """Add the image's mean over its rows of the within-row (partial) correlation of attention with
        distance."""
        got = row_sums(encoder_rows(record, name != "distance"), distances)
        if got is None:
            self.sums.add(f"rows.{name}.too_few_objects", 1)
            return
        total, rows = got
        if not rows.any():
            self.sums.add(f"rows.{name}.no_ranked_row", 1)
        self.units.add(self.sums, f"per_image.{name}", record.image_id, total, rows, describe(record))

    def _per_image_reason(self, name: str, images: int) -> str:
        few = int(self.sums.scalar(f"rows.{name}.too_few_objects"))
        flat = int(self.sums.scalar(f"rows.{name}.no_ranked_row"))
        what = "regular objects" + (" with nonzero features" if name != "distance" else "")
        return (f"no image had a query row of {MIN_ROW_KEYS} or more other {what} whose attention and distance "
                f"vary ({images} images with encoder maps: {few} have fewer than {MIN_ROW_KEYS + 1} such objects, "
                f"{flat} only rows of equal ranks, e.g. equal weights)")

    def _merge(self, other: "ProximityAccumulator") -> None:
        if (other.bins, other.capacity, other.seed) != (self.bins, self.capacity, self.seed):
            raise ValueError("proximity: cannot merge accumulators with different bins, reservoir or seed "
                             f"({(self.bins, self.capacity, self.seed)} vs {(other.bins, other.capacity, other.seed)})")
        self.images.merge(other.images, "proximity")
        self.units.flush(self.sums)
        other.units.flush(other.sums)
        self.sums.merge(other.sums)
        for m in MEASURES:
            self.samples[m].merge(other.samples[m])

    def state(self) -> dict[str, np.ndarray]:
        self.units.flush(self.sums)
        state = self.sums.state()
        state.update(config_state(bins=self.bins, reservoir=self.capacity, seed=self.seed))
        state.update(self.images.state("seen"))
        for m in MEASURES:
            state.update(self.samples[m].state(f"sample_{m}", self.stored))
        return state

    @classmethod
    def from_state(cls, state: dict) -> "ProximityAccumulator":
        owner = "proximity"
        acc = cls(bins=read_config(state, "bins", int, owner), reservoir=read_config(state, "reservoir", int, owner),
                  seed=read_config(state, "seed", int, owner))
        acc.sums = SumTable.from_state(state)
        acc.images = SeenImages.from_state(state, "seen", owner)
        for m in MEASURES:
            if f"sample_{m}.keys" not in state:
                raise DataError(f"proximity state lacks 'sample_{m}.keys'")
            acc.samples[m] = PairReservoir.from_state(state, f"sample_{m}", acc.capacity)
        return acc

    def result(self) -> ProximityResult:
        self.units.flush(self.sums)
        s = self.sums
        res = ProximityResult(bins=self.bins, records=int(s.scalar("records")), images=len(self.images.ids),
                              records_repeating_an_image=int(s.scalar("records_repeating_an_image")),
                              records_without_encoder_self=int(s.scalar("records_without_encoder_self")),
                              records_without_features=int(s.scalar("records_without_features")),
                              skipped_hypothetical=int(s.scalar("skipped_hypothetical")))
        for m in MEASURES:
            key = f"spearman_{m}"
            weight, pairs = s.get(f"{m}.weight"), s.get(f"{m}.pairs")
            sample = self.samples[m]
            sample.compact()
            res.sampled[m], res.pairs[m] = len(sample.keys), sample.seen
            if weight is None:
                if res.records == 0:
                    res.unavailable[key] = "no reference or generated records"
                elif m == "distance" or res.records_without_encoder_self == res.images:
                    res.unavailable[key] = (f"none of the {res.records} records ({res.images} images) has "
                                            "encoder_self maps")
                else:
                    res.unavailable[key] = "no record with encoder_self maps has object features"
                continue
            res.curves[m], res.counts[m] = ratio(weight, pairs[None, :]), pairs
            if sample.y is None:
                res.unavailable[key] = "no record has two or more objects"
                setattr(res, key, [None] * weight.shape[0])
                continue
            values = []
            for layer in range(sample.y.shape[0]):
                rho, why = spearman(sample.x, sample.y[layer].astype(np.float64))
                values.append(rho)
                if why:
                    res.unavailable[f"{key}_layer{layer + 1}"] = why
            setattr(res, key, values)
        with_maps = res.images - res.records_without_encoder_self
        for name in PER_IMAGE:
            if name != "distance" and with_maps and res.records_without_features == with_maps:
                reason = f"none of the {with_maps} images with encoder maps has object features"
            elif not with_maps:
                reason = (f"none of the {res.records} records ({res.images} images) has encoder_self maps"
                          if res.records else "no reference or generated records")
            else:
                reason = self._per_image_reason(name, with_maps)
            entries, missing = image_means(s, f"per_image.{name}", reason)
            res.per_image[name] = entries
            res.unavailable.update({f"per_image.{name}" + (f"_{k}" if k else ""): why for k, why in missing.items()})
        return res


def proximity(records, **options) -> ProximityResult:
    """Attention against box distance and feature similarity over ``records`` (any iterable of
    Records); ``options`` go to :class:`ProximityAccumulator`."""
    return fold(ProximityAccumulator(**options), records).result()
