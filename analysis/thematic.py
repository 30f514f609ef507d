"""Analysis I of Ilinykh (2022), the seed study (:mod:`geocap.analysis`): thematic relatedness of the
objects encoder self-attention links.

Clusters, per record: ``record.clusters`` when present; else ``record.labels`` (each category is
its own cluster: a stricter grouping than thematic clusters, used when the dump knows categories
but not clusters); else k-means on the object features: the features (L2-normalised, so distances
follow cosine similarity) of the first ``kmeans_buffer`` records lacking both are buffered,
:func:`scipy.cluster.vq.kmeans2` fits ``k`` centroids on them (k-means++ init, fixed ``seed``), and
those records and every later one are assigned to the nearest centroid. Records with none of
clusters, labels and features are counted under ``records_without_clusters``. The buffer is fitted
early when ``state()``, ``merge()`` or ``result()`` is called; two accumulators merged after each
fitted its own centroids pool statistics over assignments from their own centroids (the sums stay
exact; the cluster ids of the two parts need not match, which the statistics never compare).

Statistics:

- **controlled (the verdict)**, per layer, on the head-mean map of each image's first record
  (:data:`PER_IMAGE`): within each query's row over the other regular objects, the correlation of
  attention with "same cluster as the query": ``per_image["cluster"]`` Spearman's rho,
  ``per_image["cluster_given_similarity"]`` the partial correlation of the log weights given the
  feature cosine (:func:`~.rows.partial_attention_correlation`); averaged over the image's rows,
  then over images with a 95 % t interval. ``per_image["affinity"]``: each image's affinity
  (below), averaged over images. Null: attention that follows feature similarity alone scores 0
  on the controlled measure and above 1 on the affinity. With k-means clusters (fitted on the
  features) the control removes most of what the clusters mean: report such results as such.
- **affinity** ``[L, H]`` (encoder self-attention ``A``, self-attention ``A[i, i]`` excluded): for a
  query object ``i`` with at least one other object of its cluster and one of another cluster,
  ``share_i = sum_{j != i, c_j = c_i} A[i, j] / sum_{j != i} A[i, j]`` and
  ``chance_i = #{j != i: c_j = c_i} / (N - 1)``. ``affinity = sum_i share_i / sum_i chance_i`` over
  all such queries of all records (a ratio of sums). 1.0 = attention spread over the other objects
  regardless of cluster (chance), above 1 = attention stays within the cluster. Queries whose
  attention to other objects is 0 are skipped (per layer and head).
- **same_cluster_cosine / diff_cluster_cosine**: over all unordered pairs ``i < j`` of objects of
  every record with features, the mean cosine similarity of the two feature vectors, pooled over
  pairs, separately for same-cluster and different-cluster pairs (Ilinykh 2022 reports 0.50 vs 0.31).
  Objects with an all-zero feature vector have no cosine and are skipped.

Records of kind ``"hypothetical"`` are skipped (their encoder attention repeats the reference
record's). Special objects (``extra["special_objects"]``, a ViT's class token) are neither queries
nor "other objects" nor in a cosine pair: "the other objects" of a query are the other regular ones.
Memory: ``[L, H]`` sums, and at most ``kmeans_buffer`` records before the fit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geocap.data.attention_record import Record, regular_objects

from .accumulator import (Accumulator, SumTable, as_map, config_state, describe, encoder_rows, feature_cosines, fold,
                          ratio, read_config, same_objects, same_values, skip_hypothetical, to_list, unit_features)
from .rows import MIN_ROW_KEYS, mean_over_rows
from .uncertainty import (ImageMeans, ImageUnits, first_measured, image_means, layer_uncertainty, layer_verdicts,
                          layers_text, trend_phrase, uncertainty_json)
from geocap.errors import DataError, UsageError

CLUSTER_SOURCES = ("clusters", "labels", "kmeans")
# the per-image measures (see the module docstring): name -> what it is
PER_IMAGE = {"affinity": "within-cluster affinity of each image (1 = chance)",
             "cluster": "Spearman's rho of attention and 'same cluster as the query' within each query's row",
             "cluster_given_similarity": "partial correlation within each query's row of the log attention weights "
                                         "(the logits up to a constant) and 'same cluster as the query', feature "
                                         "cosine regressed out of both"}


@dataclass
class ThematicResult:
    """Thematic statistics; see the module docstring for definitions. Arrays hold NaN where a
    value is undefined; ``to_json`` writes those as null and ``unavailable`` says why."""

    affinity: np.ndarray | None = None              # [L, H]
    affinity_per_layer: np.ndarray | None = None    # [L], pooled over heads
    queries: np.ndarray | None = None               # [L, H] queries behind each affinity
    affinity_uncertainty: dict | None = None        # standard errors of affinity_per_layer, its trend
    per_image: dict = field(default_factory=dict)   # PER_IMAGE name -> [L] of {mean, ci95, images} or None
    same_cluster_cosine: float | None = None
    diff_cluster_cosine: float | None = None
    pairs: dict = field(default_factory=dict)       # same / diff -> pairs behind each cosine
    cluster_sources: dict = field(default_factory=dict)
    records: int = 0
    records_without_clusters: int = 0
    records_without_encoder_self: int = 0
    records_without_features: int = 0
    skipped_hypothetical: int = 0
    unavailable: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {
            "per_image": {name: self.per_image.get(name) for name in PER_IMAGE},
            "min_row_keys": MIN_ROW_KEYS,
            "same_cluster_cosine": self.same_cluster_cosine,
            "diff_cluster_cosine": self.diff_cluster_cosine,
            "affinity": to_list(self.affinity),
            "affinity_per_layer": to_list(self.affinity_per_layer),
            "affinity_per_layer_uncertainty": uncertainty_json(self.affinity_uncertainty),
            "affinity_queries": to_list(self.queries),
            "cosine_pairs": {k: int(v) for k, v in self.pairs.items()},
            "cluster_sources": {k: int(v) for k, v in self.cluster_sources.items()},
            "records": self.records,
            "records_without_clusters": self.records_without_clusters,
            "records_without_encoder_self": self.records_without_encoder_self,
            "records_without_features": self.records_without_features,
            "skipped_hypothetical": self.skipped_hypothetical,
            "unavailable": dict(self.unavailable),
        }

    def controlled(self) -> tuple[str | None, list | None]:
        """The measure the verdict rests on: ``cluster_given_similarity`` where records have features,
        else ``cluster``; ``(name, entries)``."""
        return first_measured(self.per_image, ("cluster_given_similarity", "cluster"))

    def controlled_reading(self) -> str:
        name, entries = self.controlled()
        if name is None:
            return f"Thematic attention, controlled: not computed ({self.unavailable.get('per_image.cluster')})."
        shown = layers_text(entries)
        verdict = layer_verdicts(entries, {"positive": "attention stays within clusters",
                                           "negative": "attention avoids the query's cluster"})
        beyond = " beyond what feature similarity explains" if name != "cluster" else ""
        text = (f"Thematic attention, controlled ({PER_IMAGE[name]}, over the query's other regular objects; averaged "
                f"over the image's rows, then over images with a 95 % interval; 0 = no preference for the query's "
                f"cluster{beyond}): {shown}. **Verdict: {verdict}.**")
        if name == "cluster":
            why = self.unavailable.get("per_image.cluster_given_similarity", "no features")
            text += (" Similarity is not controlled: attention that merely follows feature similarity would also stay "
                     f"within clusters ({why}).")
        affinity = self.per_image.get("affinity")
        if affinity and affinity[0] is not None:
            text += (f" The naive measure (affinity, 1 = chance) would have said {affinity[0]['mean']:.2f} in layer 1 "
                     f"and {affinity[-1]['mean']:.2f} in layer {len(affinity)} (means over images); attention that "
                     f"follows feature similarity alone also scores above 1 on it.")
        return text

    def reading(self) -> str:
        parts = [self.controlled_reading()]
        if self.affinity_per_layer is not None and np.isfinite(self.affinity_per_layer).any():
            layers = self.affinity_per_layer
            best = int(np.nanargmax(layers))
            parts.append(f"Within-cluster attention affinity (1.0 = chance, mean over heads) "
                         f"{trend_phrase(layers, self.affinity_uncertainty, '.2f')}; highest in layer {best + 1} "
                         f"({layers[best]:.2f}), strongest head {np.nanmax(self.affinity):.2f}.")
        else:
            parts.append(f"Affinity not computed ({self.unavailable.get('affinity')}).")
        if self.same_cluster_cosine is not None and self.diff_cluster_cosine is not None:
            relation = "more" if self.same_cluster_cosine > self.diff_cluster_cosine else "not more"
            parts.append(f"Object features are {relation} similar within clusters ({self.same_cluster_cosine:.2f}) "
                         f"than across ({self.diff_cluster_cosine:.2f}); Ilinykh (2022) reports 0.50 vs 0.31.")
        else:
            reason = self.unavailable.get("same_cluster_cosine") or self.unavailable.get("diff_cluster_cosine")
            parts.append(f"Feature cosine not computed ({reason}).")
        source_names = {"clusters": "the records' clusters", "labels": "the records' labels",
                        "kmeans": "k-means on the features"}
        sources = ", ".join(f"{source_names.get(k, k)} for {v} records" for k, v in self.cluster_sources.items() if v)
        if sources:
            parts.append(f"Clusters: {sources}.")
        return " ".join(parts)

    def plot(self, path) -> None:
        from .plotting import plot_thematic

        plot_thematic(self, path)


class ThematicAccumulator(Accumulator):
    """Streaming sums behind :class:`ThematicResult`; see the module docstring.

    Args:
        k: clusters of the k-means fallback (at most the number of buffered objects).
        kmeans_buffer: records buffered to fit the k-means fallback.
        seed: k-means seed.
    """

    name = "thematic"

    def __init__(self, *, k: int = 6, kmeans_buffer: int = 256, seed: int = 0):
        if k < 1:
            raise UsageError(f"k must be >= 1, got {k}")
        if kmeans_buffer < 1:
            raise UsageError(f"kmeans_buffer must be >= 1, got {kmeans_buffer}")
        self.k, self.kmeans_buffer, self.seed = int(k), int(kmeans_buffer), int(seed)
        self.sums = SumTable()
        self.units = ImageUnits()
        self.means = ImageMeans()
        self._cache = None             # (inputs, sums) of the last record: its image's next records reuse them
        self.centroids: np.ndarray | None = None
        self._pending: list[Record] = []

    # clusters ---------------------------------------------------------------------------------

    def _fit(self) -> None:
        """Fit the k-means fallback on the buffered records' features and process them."""
        pending, self._pending = self._pending, []
        if not pending:
            return                      # (before the import: scipy.cluster costs a dump ~0.5 CPU-s to import)
        from scipy.cluster.vq import kmeans2

        data = np.concatenate([unit_features(r) for r in pending])
        k = min(self.k, len(data))
        centroids, _ = kmeans2(data, k, minit="++", seed=np.random.default_rng(self.seed))
        self.centroids = centroids
        for record in pending:
            self._process(record, self._assign(record), "kmeans")

    def _assign(self, record: Record) -> np.ndarray:
        from scipy.cluster.vq import vq

        unit = unit_features(record)
        if unit.shape[1] != self.centroids.shape[1]:
            raise DataError(f"record of {describe(record)}: features have {unit.shape[1]} dimensions, the k-means "
                             f"centroids {self.centroids.shape[1]}")
        return vq(unit, self.centroids, check_finite=False)[0]

    def flush(self) -> "ThematicAccumulator":
        """Fit the k-means fallback now on whatever is buffered (no-op when nothing is)."""
        self._fit()
        return self

    # streaming --------------------------------------------------------------------------------

    def _update(self, record: Record) -> None:
        if record.kind == "hypothetical":
            self.sums.add("skipped_hypothetical", 1)
            return
        self.sums.add("records", 1)
        if record.clusters is not None:
            self._process(record, np.asarray(record.clusters), "clusters")
        elif record.labels is not None:
            self._process(record, np.asarray(record.labels), "labels")
        elif record.features is None:
            self.sums.add("records_without_clusters", 1)
        elif self.centroids is not None:
            self._process(record, self._assign(record), "kmeans")
        else:
            self._pending.append(record)
            if len(self._pending) >= self.kmeans_buffer:
                self._fit()

    def _update_image(self, records: list) -> None:
        counted = [r for r in records if r.kind != "hypothetical"]
        first = counted[0] if counted else None
        if (len(counted) < 2 or (first.clusters is None and first.labels is None)
                or not all(same_objects(first, r) and same_values(first.encoder_self, r.encoder_self)
                           for r in counted[1:])):
            for record in records:
                self._update(record)
            return
        skip_hypothetical(self.sums, records)
        clusters, source = (first.clusters, "clusters") if first.clusters is not None else (first.labels, "labels")
        self._process(first, np.asarray(clusters), source, records=len(counted))

    def _process(self, record: Record, clusters: np.ndarray, source: str, records: int = 1) -> None:
        """Add the record's sums, ``records`` times (the image's records with the same objects and
        encoder maps: :meth:`_update_image`). An image's records share its objects and encoder maps,
        so the sums computed for the image's previous record are reused when its inputs are equal
        (each record still counts, as the pooled affinity always has), and the per-image measures
        read its first."""
        where = describe(record)
        self.sums.add(f"source.{source}", records)
        inputs = (record.image_id, record.encoder_self, clusters, record.features, record.boxes)
        cached = self._cache
        repeat = cached is not None and _same_inputs(cached[0], inputs)
        adds = cached[1] if repeat else self._image_sums(record, clusters)
        self._cache = (inputs, adds)
        for name, value in adds.items():
            if not name.startswith("_"):
                self.sums.add(name, value * records, where)
        if "_unit" in adds:
            x, n = adds["_unit"]
            self.units.add(self.sums, "units.affinity", record.image_id, x * records, n * records, where)
        if repeat or "_unit" not in adds:
            return
        self.means.add(self.sums, "per_image.affinity", record.image_id, *adds["_unit"], where)
        same = adds["_same"]
        self._rows("cluster", record, same)
        if record.features is not None:
            self._rows("cluster_given_similarity", record, same)

    @staticmethod
    def _image_sums(record: Record, clusters: np.ndarray) -> dict:
        """The sums one record of this image adds (names of :attr:`sums`), plus ``"_unit"``: its
        affinity's share and chance sums ``[L]`` and ``"_rows"``: what the per-image measures need."""
        adds = {}
        n = record.num_objects
        regular = regular_objects(record)                          # special objects (class tokens) are in no pair
        pairs = regular[:, None] & regular[None, :]
        same = (clusters[:, None] == clusters[None, :]) & pairs
        cosines = feature_cosines(record)
        if cosines is None:
            adds["records_without_features"] = 1
        else:
            cosine, nonzero = cosines
            i, j = np.triu_indices(n, k=1)
            keep = nonzero[i] & nonzero[j] & regular[i] & regular[j]
            i, j = i[keep], j[keep]
            pair_cosine = cosine[i, j]
            pair_same = same[i, j]
            adds.update({"cos_same.sum": pair_cosine[pair_same].sum(), "cos_same.pairs": pair_same.sum(),
                         "cos_diff.sum": pair_cosine[~pair_same].sum(), "cos_diff.pairs": (~pair_same).sum()})
        attn = as_map(record, "encoder_self")
        if attn is None:
            adds["records_without_encoder_self"] = 1
            return adds
        others = ~np.eye(n, dtype=bool) & pairs
        same_others = same & others
        n_same = same_others.sum(axis=1)                           # [N]
        n_others = others.sum(axis=1)
        eligible = regular & (n_same >= 1) & (n_same <= n_others - 1)   # a same- and an other-cluster object
        mass_same = np.einsum("lhij,ij->lhi", attn, same_others)   # [L, H, N]
        mass_others = np.einsum("lhij,ij->lhi", attn, others)
        ok = eligible & (mass_others > 0)
        share = np.divide(mass_same, mass_others, out=np.zeros_like(mass_same), where=ok)
        chance = np.where(ok, n_same / np.maximum(n_others, 1), 0.0)
        adds.update({"affinity.share": share.sum(axis=-1), "affinity.chance": chance.sum(axis=-1),
                     "affinity.queries": ok.sum(axis=-1), "_unit": (share.sum(axis=(1, 2)), chance.sum(axis=(1, 2))),
                     "_same": same.astype(np.float64)})
        return adds

    def _rows(self, name: str, record: Record, same: np.ndarray) -> None:
        """Add the image's mean over its rows of the within-row (partial) correlation of attention with
        "same cluster as the query" ``same [N, N]`` (rows where the key clusters do not vary are undefined)."""
        rows = encoder_rows(record, name != "cluster")
        if rows is None or not rows.usable:
            self.sums.add(f"rows.{name}.too_few_objects", 1)
            return
        total, count = mean_over_rows(*rows.correlation(same))
        if not count.any():
            self.sums.add(f"rows.{name}.no_ranked_row", 1)
        self.means.add(self.sums, f"per_image.{name}", record.image_id, total, count, describe(record))

    def _flush(self) -> None:
        self._fit()
        self.units.flush(self.sums)
        self.means.flush(self.sums)
        self._cache = None

    def _merge(self, other: "ThematicAccumulator") -> None:
        self._flush()
        other._flush()
        self.sums.merge(other.sums)
        if self.centroids is None:
            self.centroids = other.centroids

    # state ------------------------------------------------------------------------------------

    def state(self) -> dict[str, np.ndarray]:
        self._flush()
        state = self.sums.state()
        state.update(config_state(k=self.k, kmeans_buffer=self.kmeans_buffer, seed=self.seed))
        if self.centroids is not None:
            state["centroids"] = self.centroids.copy()
        return state

    @classmethod
    def from_state(cls, state: dict) -> "ThematicAccumulator":
        owner = "thematic"
        acc = cls(k=read_config(state, "k", int, owner), kmeans_buffer=read_config(state, "kmeans_buffer", int, owner),
                  seed=read_config(state, "seed", int, owner))
        acc.sums = SumTable.from_state(state)
        if "centroids" in state:
            acc.centroids = np.array(state["centroids"], dtype=np.float64)
        return acc

    def result(self) -> ThematicResult:
        self._flush()
        s = self.sums
        res = ThematicResult(
            records=int(s.scalar("records")), records_without_clusters=int(s.scalar("records_without_clusters")),
            records_without_encoder_self=int(s.scalar("records_without_encoder_self")),
            records_without_features=int(s.scalar("records_without_features")),
            skipped_hypothetical=int(s.scalar("skipped_hypothetical")),
            cluster_sources={src: int(s.scalar(f"source.{src}")) for src in CLUSTER_SOURCES},
            pairs={"same": int(s.scalar("cos_same.pairs")), "diff": int(s.scalar("cos_diff.pairs"))},
        )
        clustered = sum(res.cluster_sources.values())
        no_clusters = (f"no record has clusters, labels or features ({res.records} reference/generated records)"
                       if clustered == 0 else None)
        share, chance = s.get("affinity.share"), s.get("affinity.chance")
        if no_clusters:
            res.unavailable["affinity"] = no_clusters
        elif share is None:
            res.unavailable["affinity"] = f"none of the {clustered} clustered records has encoder_self maps"
        else:
            res.queries = s.get("affinity.queries")
            res.affinity = ratio(share, chance)
            res.affinity_per_layer = ratio(share.sum(axis=1), chance.sum(axis=1))
            res.affinity_uncertainty = layer_uncertainty(s, "units.affinity")
            if not np.isfinite(res.affinity).all():
                res.unavailable["affinity"] = ("no query object had both another object of its cluster and one of "
                                               "another cluster (null entries)")
        for name in PER_IMAGE:
            if no_clusters or share is None:
                reason = res.unavailable["affinity"]
            elif name == "cluster_given_similarity" and s.get("rows.cluster_given_similarity.too_few_objects") is None \
                    and s.get("per_image.cluster_given_similarity.sum") is None:
                reason = "no clustered record with encoder maps has object features"
            elif name == "affinity":
                reason = "no query object had both another object of its cluster and one of another cluster"
            else:
                few = int(s.scalar(f"rows.{name}.too_few_objects"))
                flat = int(s.scalar(f"rows.{name}.no_ranked_row"))
                reason = (f"no image had a query row of {MIN_ROW_KEYS} or more other objects mixing its cluster and "
                          f"others, with varying attention ({few} images have fewer than {MIN_ROW_KEYS + 1} objects, "
                          f"{flat} only rows of equal ranks, e.g. equal weights or one cluster)")
            entries, missing = image_means(s, f"per_image.{name}", reason)
            res.per_image[name] = entries
            res.unavailable.update({f"per_image.{name}" + (f"_{k}" if k else ""): why for k, why in missing.items()})
        for key, part in (("same_cluster_cosine", "cos_same"), ("diff_cluster_cosine", "cos_diff")):
            pairs = s.scalar(f"{part}.pairs")
            if no_clusters:
                res.unavailable[key] = no_clusters
            elif s.get(f"{part}.sum") is None:
                res.unavailable[key] = f"none of the {clustered} clustered records has features"
            elif pairs == 0:
                kind = "same-cluster" if part == "cos_same" else "different-cluster"
                res.unavailable[key] = f"no {kind} pair of objects with nonzero features"
            else:
                setattr(res, key, s.scalar(f"{part}.sum") / pairs)
        return res


def _same_inputs(a: tuple, b: tuple) -> bool:
    """Whether two records' (image id, encoder map, clusters, features, boxes) are equal."""
    return a[0] == b[0] and all(same_values(x, y) for x, y in zip(a[1:], b[1:]))


def thematic(records, **options) -> ThematicResult:
    """Thematic affinity and feature cosines over ``records`` (any iterable of Records);
    ``options`` go to :class:`ThematicAccumulator`."""
    return fold(ThematicAccumulator(**options), records).result()
