"""Analysis IV of Ilinykh (2022), the seed study (:mod:`geocap.analysis`): visual grounding of nouns
in cross-attention, and the hypothetical-caption follow-up.

Row ``t`` of a decoder map is the step that predicts ``tokens[t]`` (its input is ``tokens[t - 1]``;
see :mod:`geocap.data.attention_record`). The "most-attended object" of a row is the argmax over
the image's objects (the first one on ties).

**Grounding** (records of kind ``"reference"`` or ``"generated"`` with ``cross`` and ``referents``):
for each token ``t`` with a referent (``referents[t] >= 0``), is the most-attended object of cross-
attention row ``t`` (the step that produces the word) its referent? ``accuracy [L]`` uses the
head-mean map of each layer, ``accuracy_per_head [L, H]`` each head's map; both are hits / grounded
tokens pooled over all records. ``chance`` = the mean over grounded tokens of ``1 / N`` (the hit
rate of a uniformly random pick).

**Referent effect (the verdict)**, per layer: for each grounded token with at least one *wrong
referent*, ``hit(own referent) - mean over its wrong referents of hit(wrong referent)`` on the
layer's head-mean map (a hit: the most-attended regular object is in the referent). Wrong
referents: with regions (``extra["referent_objects"]``, one per category present), every other
region less the token's own objects; with single objects, every other regular object of another
category (``labels``; without labels, every other regular object). Averaged over an image's
tokens, then over images with a 95 % t interval (``referent_effect``; ``referent_effect_parts``
holds the two hit rates). Null: attention that lands on *some* object, picked whatever the noun
names, scores 0, where accuracy scores far above chance. A model drawn to large regions scores
above 0 when nouns name larger regions than the other categories' (hits are per region).

Patch-based records (:mod:`geocap.data.attention_record`): special objects (a class token) are
never the most-attended object (the argmax runs over the regular objects only, N counts only
them); a referent may be a region of several objects (``extra["referent_objects"]``, e.g. the
patches an object's box covers): a row hits when its most-attended object is one of the region's,
and the chance of a random pick is the region's size over N.

**Follow-up** (records of kind ``"hypothetical"`` with ``cross``, ``referents`` and
``source_referents``): each swapped token ``t`` (``referents[t] >= 0``, ``source_referents[t] >= 0``,
different) now names ``referents[t]`` instead of ``source_referents[t]``. Under teacher forcing the
step that predicts ``tokens[t]`` has not read it yet, so the model can only react to the new word at
row ``t + 1``, the first step whose input is the swapped word (swaps at the last position have no
such row and are skipped). ``hypothetical_follow_rate [L]`` (head-mean map; ``..._per_head [L, H]``):
how often row ``t + 1``'s most-attended object is the new referent; ``hypothetical_source_rate``:
how often it stays on the original referent; ``hypothetical_follow_rate_same_step``: the same as the
follow rate at row ``t`` itself (attention driven by earlier swaps only; a baseline);
``hypothetical_chance``: mean ``1 / N``. Memory: ``[L, H]`` sums.

The head-mean map can ground more nouns than every single head: each head may miss on other
tokens, and in the mean the heads that point at the referent outvote the rest (both use the same
tokens and the same argmax rule). The report says so when it happens. Per-layer rates carry
standard errors over images (:mod:`.uncertainty`).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from geocap.data.attention_record import Record, referent_objects, regular_objects

from .accumulator import (Accumulator, SumTable, as_map, describe, fold, ratio, rows_of, same_objects, to_list,
                          valid_weights)
from .uncertainty import (ImageMeans, ImageUnits, image_means, layer_uncertainty, layer_verdicts, layers_text,
                          trend_phrase, uncertainty_json)

RATES = {"accuracy": "ground", "hypothetical_follow_rate": "follow", "hypothetical_source_rate": "source",
         "hypothetical_follow_rate_same_step": "same_step"}   # JSON name -> the sums' name


@dataclass
class GroundingResult:
    """Grounding accuracies and follow rates; NaN where undefined (null in JSON, reason in
    ``unavailable``)."""

    accuracy: np.ndarray | None = None               # [L] head-mean map
    accuracy_per_head: np.ndarray | None = None      # [L, H]
    chance: float | None = None
    tokens: int = 0
    follow_rate: np.ndarray | None = None            # [L]
    follow_rate_per_head: np.ndarray | None = None   # [L, H]
    source_rate: np.ndarray | None = None            # [L]
    follow_rate_same_step: np.ndarray | None = None  # [L]
    hypothetical_chance: float | None = None
    hypothetical_tokens: int = 0
    records: int = 0
    hypothetical_records: int = 0
    records_without_cross: int = 0
    records_without_referents: int = 0
    uncertainty: dict = field(default_factory=dict)  # RATES key -> per-layer standard errors and trend
    referent_effect: list | None = None              # [L] of {mean, ci95, images} or None: own - wrong referent
    referent_parts: dict = field(default_factory=dict)   # "own" / "wrong" -> [L] of the same, per image
    effect_tokens: int = 0                           # grounded tokens with at least one wrong referent
    unavailable: dict = field(default_factory=dict)

    def best_head_below_head_mean(self) -> bool:
        """Whether no single head grounds as many nouns as the head-mean map of the best layer."""
        return bool(np.max(self.accuracy_per_head) < np.max(self.accuracy))

    def to_json(self) -> dict:
        return {
            "referent_effect": self.referent_effect,
            "referent_effect_parts": {key: self.referent_parts.get(key) for key in ("own", "wrong")},
            "referent_effect_tokens": self.effect_tokens,
            "uncertainty": {key: uncertainty_json(self.uncertainty.get(key)) for key in RATES},
            "accuracy": to_list(self.accuracy),
            "accuracy_per_head": to_list(self.accuracy_per_head),
            "chance": self.chance,
            "tokens": self.tokens,
            "hypothetical_follow_rate": to_list(self.follow_rate),
            "hypothetical_follow_rate_per_head": to_list(self.follow_rate_per_head),
            "hypothetical_source_rate": to_list(self.source_rate),
            "hypothetical_follow_rate_same_step": to_list(self.follow_rate_same_step),
            "hypothetical_chance": self.hypothetical_chance,
            "hypothetical_tokens": self.hypothetical_tokens,
            "records": self.records,
            "hypothetical_records": self.hypothetical_records,
            "records_without_cross": self.records_without_cross,
            "records_without_referents": self.records_without_referents,
            "unavailable": dict(self.unavailable),
        }

    def controlled_reading(self) -> str:
        if self.referent_effect is None:
            return (f"Referent effect not computed ({self.unavailable.get('referent_effect')}).")
        shown = layers_text(self.referent_effect, "+.1%")
        verdict = layer_verdicts(self.referent_effect, {"positive": "attends to the noun's own referent",
                                                        "negative": "attends away from the noun's referent"})
        text = (f"Referent effect (per grounded token, 1 if the most-attended object of the layer's head-mean map is "
                f"in the noun's referent, minus the mean of the same for each wrong referent, i.e. the other "
                f"categories present in the image; averaged over an image's tokens, then over images with a 95 % "
                f"interval; 0 = looks at objects regardless of which one the noun names): {shown}, over "
                f"{self.effect_tokens} tokens. **Verdict: {verdict}.**")
        if self.accuracy is not None:
            best = int(np.argmax(self.accuracy))
            text += (f" The naive measure (accuracy against chance) would have said {self.accuracy[best]:.1%} against "
                     f"{self.chance:.1%} in layer {best + 1}, which also counts attention to any object as grounding.")
        return text

    def reading(self) -> str:
        parts = [self.controlled_reading()]
        if self.accuracy is not None:
            best_layer = int(np.argmax(self.accuracy))
            l, h = np.unravel_index(int(np.argmax(self.accuracy_per_head)), self.accuracy_per_head.shape)
            trend = trend_phrase(self.accuracy, self.uncertainty.get("accuracy"), ".1%")
            parts.append(f"Grounding accuracy (share of {self.tokens} grounded tokens whose referent is the "
                         f"most-attended object of the layer's head-mean map) {trend}; chance {self.chance:.1%}. "
                         f"Best layer {best_layer + 1}: {self.accuracy[best_layer]:.1%}; best single head "
                         f"L{l + 1}H{h + 1}: {self.accuracy_per_head[l, h]:.1%}.")
            if self.best_head_below_head_mean():
                parts.append("No single head reaches the head-mean map: the heads miss on different tokens, and in "
                             "their mean the heads pointing at the referent outvote the others (same tokens, same "
                             "argmax rule).")
        else:
            parts.append(f"Grounding accuracy not computed ({self.unavailable.get('accuracy')}).")
        if self.follow_rate is not None:
            best = int(np.argmax(self.follow_rate))
            parts.append(f"With hypothetical captions, attention at the step after a swapped word moves to the object "
                         f"the word now names for {self.follow_rate[best]:.1%} of {self.hypothetical_tokens} swaps in "
                         f"layer {best + 1}, against {self.follow_rate_same_step[best]:.1%} at the step of the word "
                         f"itself, before the model has read it (the baseline); it stays on the original object "
                         f"{self.source_rate[best]:.1%}; chance {self.hypothetical_chance:.1%}. The follow rate "
                         f"{trend_phrase(self.follow_rate, self.uncertainty.get('hypothetical_follow_rate'), '.1%')}.")
        else:
            parts.append(f"Hypothetical follow rate not computed ({self.unavailable.get('hypothetical_follow_rate')}).")
        return " ".join(parts)

    def plot(self, path) -> None:
        from .plotting import plot_grounding

        plot_grounding(self, path)


class GroundingAccumulator(Accumulator):
    """Streaming sums behind :class:`GroundingResult`; see the module docstring."""

    name = "grounding"

    def __init__(self):
        self.sums = SumTable()
        self.units = ImageUnits()
        self.means = ImageMeans()

    def _update_image(self, records: list) -> None:
        grounded = []                                # reference and generated records with cross maps and referents
        counts = {"records": 0, "hypothetical_records": 0, "records_without_cross": 0, "records_without_referents": 0}
        for record in records:
            hypothetical = record.kind == "hypothetical"
            counts["hypothetical_records" if hypothetical else "records"] += 1
            if record.cross is None:
                counts["records_without_cross"] += 1
            elif record.referents is None or (hypothetical and record.source_referents is None):
                as_map(record, "cross")              # (checks its weights)
                counts["records_without_referents"] += 1
            elif hypothetical:
                self._follow(record)
            else:
                grounded.append(record)
        for name, count in counts.items():
            if count:
                self.sums.add(name, count)
        if len(grounded) > 1 and not all(same_objects(grounded[0], r) for r in grounded[1:]):
            for record in grounded:
                self._ground([record])
        elif grounded:
            self._ground(grounded)

    def _ground(self, records: list) -> None:
        """Add the grounded tokens of ``records`` (reference or generated, with cross maps and
        referents, of one image with the same objects): their rows joined, counted as one record's."""
        first, where = records[0], describe(records[0])
        cross = np.asarray(rows_of(records, [r.cross for r in records], axis=2), dtype=np.float64)
        if not valid_weights(cross):
            for record in records:
                as_map(record, "cross")              # names the record with invalid weights
        referents = np.concatenate([np.asarray(r.referents, dtype=np.int64) for r in records])
        record_of_row = np.repeat(np.arange(len(records)), [r.num_tokens for r in records])
        regular = regular_objects(first)
        rows = np.flatnonzero(referents >= 0)
        target = referents[rows]
        member = self._members(first, target, regular)
        picked = self._hits("ground", first, cross, rows, member, regular, where)
        self.sums.add("ground.chance", self._chance(member, regular))
        self._referent_effect(first, cross, rows, target, regular, where, member, picked, record_of_row[rows],
                              len(records))

    def _follow(self, record: Record) -> None:
        """Add a hypothetical record's swapped tokens: where attention goes at the step after each."""
        cross, where, regular = as_map(record, "cross"), describe(record), regular_objects(record)
        referents = np.asarray(record.referents, dtype=np.int64)
        source = np.asarray(record.source_referents, dtype=np.int64)
        t = np.flatnonzero((referents >= 0) & (source >= 0) & (referents != source))
        t = t[t + 1 < record.num_tokens]
        member = self._members(record, referents[t], regular)
        picked = self._hits("follow", record, cross, t + 1, member, regular, where)
        self._hits("source", record, cross, t + 1, self._members(record, source[t], regular), regular, where,
                   per_head=False, picked=picked)
        self._hits("same_step", record, cross, t, member, regular, where, per_head=False)
        self.sums.add("follow.chance", self._chance(member, regular))

    @staticmethod
    def _members(record: Record, target: np.ndarray, regular: np.ndarray) -> np.ndarray:
        """``[K, N]`` bool: the regular objects each target referent names."""
        member = np.zeros((len(target), record.num_objects), dtype=bool)
        if (record.extra or {}).get("referent_objects") is None:      # a referent is one object
            member[np.arange(len(target)), target] = True
        else:
            for k, referent in enumerate(target.tolist()):
                member[k, referent_objects(record, referent)] = True
        return member & regular

    @staticmethod
    def _head_mean_pick(cross: np.ndarray, rows: np.ndarray, regular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(head-mean pick [L, K], per-head pick [L, H, K])``: the most-attended regular object of
        each of the ``rows`` (the first on ties; special objects never)."""
        picked = cross[:, :, rows, :]
        if not regular.all():
            picked = np.where(regular, picked, -np.inf)                       # [L, H, K, N], special keys out
        return picked.mean(axis=1).argmax(-1), picked.argmax(-1)

    @classmethod
    def _wrong_shares(cls, record: Record, target: np.ndarray, regular: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(share [K, N], has_wrong [K])``: for each target referent, the share of its *wrong* referents
        that contain each object. Wrong referents: with regions (``extra["referent_objects"]``, one per
        category present), every other region less the target's own objects; with single objects, every
        other regular object of another category (``labels``; any other object without labels)."""
        own = cls._members(record, target, regular)                            # [K, N]
        share = np.zeros(own.shape)
        regions = (record.extra or {}).get("referent_objects")
        if regions is not None:
            masks = np.zeros((len(regions), record.num_objects), dtype=bool)
            for r, region in enumerate(regions):
                masks[r, np.asarray(region, dtype=np.int64)] = True
            masks &= regular
        labels = None if record.labels is None else np.asarray(record.labels)
        if regions is None:                          # every target at once: [K, N]
            wrong = regular & ~own
            if labels is not None:
                wrong &= labels[None, :] != labels[target][:, None]
            count = wrong.sum(axis=1, keepdims=True)
            np.divide(wrong, count, out=share, where=count > 0)
            return share, share.any(axis=1)
        for k, referent in enumerate(target.tolist()):
            wrong = masks & ~own[k]
            wrong[referent] = False
            wrong = wrong[wrong.any(axis=1)]
            if len(wrong):
                share[k] = wrong.mean(axis=0)
        return share, share.any(axis=1)

    @classmethod
    def referent_hits(cls, record: Record, cross: np.ndarray, rows: np.ndarray, target: np.ndarray,
                      regular: np.ndarray, own: np.ndarray | None = None, picked: np.ndarray | None = None
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(own [L], wrong [L], counted [K] bool)``: over the ``rows`` (tokens naming ``target``) that
        have a wrong referent (``counted``), the sums of ``hit(own referent)`` and of the mean
        ``hit(wrong referent)`` of the layer's head-mean map. ``own`` (:meth:`_members` of ``target``)
        and ``picked`` (the rows' head-mean picks ``[L, K]``): when the caller has them."""
        layers = cross.shape[0]
        if len(rows) == 0 or not regular.any():
            return np.zeros(layers), np.zeros(layers), np.zeros(len(rows), dtype=bool)
        share, has = cls._wrong_shares(record, target, regular)
        own = cls._members(record, target, regular) if own is None else own
        picked = cls._head_mean_pick(cross, rows, regular)[0] if picked is None else picked    # [L, K]
        k = np.arange(len(rows))
        own_hit = np.where(has, own[k, picked], False)                          # [L, K]
        return own_hit.sum(axis=-1).astype(np.float64), share[k, picked].sum(axis=-1), has

    def _referent_effect(self, record: Record, cross: np.ndarray, rows: np.ndarray, target: np.ndarray,
                         regular: np.ndarray, where: str, member: np.ndarray, picked: np.ndarray | None,
                         of_row: np.ndarray, records: int) -> None:
        """Add the image's per-token ``hit(own referent) - mean hit(wrong referents)`` per layer
        (``member``, ``picked``: the rows' :meth:`_members` and head-mean picks; ``of_row [K]``: the
        record, of ``records``, each row is from, so that records without a token with a wrong
        referent are counted as such, one by one)."""
        if len(rows) == 0 or not regular.any():
            return
        own, wrong, counted = self.referent_hits(record, cross, rows, target, regular, member, picked)
        tokens = int(counted.sum())
        self.sums.add("effect.tokens", tokens)
        # the records with rows but none of them counted
        without = int(((np.bincount(of_row, minlength=records) > 0)
                       & (np.bincount(of_row[counted], minlength=records) == 0)).sum())
        if without:
            self.sums.add("effect.no_wrong_referent", without)
        if not tokens:
            return
        count = np.full(cross.shape[0], float(tokens))
        for name, value in (("effect", own - wrong), ("effect_own", own), ("effect_wrong", wrong)):
            self.means.add(self.sums, f"per_image.{name}", record.image_id, value, count, where)

    @staticmethod
    def _chance(member: np.ndarray, regular: np.ndarray) -> float:
        """Sum over the targets (``member``: :meth:`_members`) of the hit rate of a uniformly random
        regular object."""
        count = int(regular.sum())
        return float(member.sum()) / count if count else 0.0

    def _hits(self, name: str, record: Record, cross: np.ndarray, rows: np.ndarray, member: np.ndarray,
              regular: np.ndarray, where: str, per_head: bool = True, picked: np.ndarray | None = None
              ) -> np.ndarray | None:
        """Count rows whose most-attended regular object is one of its target's objects (``member
        [K, N]``: :meth:`_members`): head-mean ``[L]`` and per head ``[L, H]``. Returns the rows'
        head-mean picks ``[L, K]`` (None when nothing was counted); ``picked``: the head-mean picks of
        the same rows when the caller has them (used without ``per_head``)."""
        layers, heads = cross.shape[:2]
        if len(rows) == 0 or not regular.any():      # nothing to count (also when the image has no objects)
            layer_hits, head_hits = np.zeros(layers), np.zeros((layers, heads))
            picked = None
        else:
            if picked is None or per_head:
                picked, head_picked = self._head_mean_pick(cross, rows, regular)
            k = np.arange(len(rows))
            layer_hits = member[k, picked].sum(-1)
            if per_head:
                head_hits = member[k, head_picked].sum(-1)
        self.sums.add(f"{name}.layer", layer_hits, where)
        if per_head:
            self.sums.add(f"{name}.head", head_hits, where)
        self.sums.add(f"{name}.tokens", len(rows))
        self.units.add(self.sums, f"units.{name}", record.image_id, layer_hits, len(rows), where)
        return picked

    def _flush(self) -> None:
        self.units.flush(self.sums)
        self.means.flush(self.sums)

    def _merge(self, other: "GroundingAccumulator") -> None:
        self._flush()
        other._flush()
        self.sums.merge(other.sums)

    def state(self) -> dict[str, np.ndarray]:
        self._flush()
        return self.sums.state()

    @classmethod
    def from_state(cls, state: dict) -> "GroundingAccumulator":
        acc = cls()
        acc.sums = SumTable.from_state(state)
        return acc

    def result(self) -> GroundingResult:
        self._flush()
        s = self.sums
        res = GroundingResult(records=int(s.scalar("records")),
                              hypothetical_records=int(s.scalar("hypothetical_records")),
                              records_without_cross=int(s.scalar("records_without_cross")),
                              records_without_referents=int(s.scalar("records_without_referents")),
                              tokens=int(s.scalar("ground.tokens")), hypothetical_tokens=int(s.scalar("follow.tokens")))
        if res.tokens:
            res.accuracy = ratio(s.get("ground.layer"), res.tokens)
            res.accuracy_per_head = ratio(s.get("ground.head"), res.tokens)
            res.chance = s.scalar("ground.chance") / res.tokens
        else:
            reason = self._reason(res.records, "ground.tokens", "reference or generated records", "referents")
            for key in ("accuracy", "chance"):
                res.unavailable[key] = reason
        if res.hypothetical_tokens:
            res.follow_rate = ratio(s.get("follow.layer"), res.hypothetical_tokens)
            res.follow_rate_per_head = ratio(s.get("follow.head"), res.hypothetical_tokens)
            res.source_rate = ratio(s.get("source.layer"), res.hypothetical_tokens)
            res.follow_rate_same_step = ratio(s.get("same_step.layer"), res.hypothetical_tokens)
            res.hypothetical_chance = s.scalar("follow.chance") / res.hypothetical_tokens
        for key, name in RATES.items():
            if res.tokens if name == "ground" else res.hypothetical_tokens:
                res.uncertainty[key] = layer_uncertainty(s, f"units.{name}")
        res.effect_tokens = int(s.scalar("effect.tokens"))
        if not res.tokens:
            reason = res.unavailable["accuracy"]
        else:
            reason = (f"none of the {res.tokens} grounded tokens has a wrong referent (another category's object or "
                      f"region present in its image): {int(s.scalar('effect.no_wrong_referent'))} records name "
                      f"objects of images holding one category only")
        res.referent_effect, missing = image_means(s, "per_image.effect", reason)
        res.unavailable.update({"referent_effect" + (f"_{k}" if k else ""): why for k, why in missing.items()})
        for part in ("own", "wrong"):
            res.referent_parts[part] = image_means(s, f"per_image.effect_{part}", reason)[0]
        if not res.hypothetical_tokens:
            res.unavailable["hypothetical_follow_rate"] = self._reason(
                res.hypothetical_records, "follow.tokens", "hypothetical records", "referents and source_referents")
        return res

    def _reason(self, records: int, tokens_key: str, what: str, fields: str) -> str:
        if records == 0:
            return f"no {what}"
        if self.sums.get(tokens_key) is None:
            return f"none of the {records} {what} has both cross maps and {fields}"
        if tokens_key == "follow.tokens":
            return f"the {what} have no swapped token before the last position"
        return f"the {what} have no token with a referent"


def record_referent_effect(record: Record) -> list | None:
    """This record's referent effect per layer (the mean over its grounded tokens that have a wrong
    referent of ``hit(own) - mean hit(wrong)``; what its tokens add to its image's value), or None
    when it has no such token, no cross maps or no referents (hypothetical records: None)."""
    cross = as_map(record, "cross")
    if cross is None or record.referents is None or record.kind == "hypothetical":
        return None
    referents = np.asarray(record.referents, dtype=np.int64)
    rows = np.flatnonzero(referents >= 0)
    own, wrong, counted = GroundingAccumulator.referent_hits(record, cross, rows, referents[rows],
                                                             regular_objects(record))
    tokens = int(counted.sum())
    return [float(v) for v in (own - wrong) / tokens] if tokens else None


def grounding(records) -> GroundingResult:
    """Grounding accuracy and hypothetical follow rates over ``records`` (any iterable of Records)."""
    return fold(GroundingAccumulator(), records).result()
