"""A blind captioner for relations: the control every relation finding is compared with.

It sees no features and no boxes, only the *categories* present in a test image, and states one
relation chosen from the training captions: among the (subject category, relation, object category)
uses of the training references (parsed as the relation judge parses captions,
:func:`geocap.metrics.relations.find_relations`), the most frequent one whose two categories are
both present (and differ); ties go to the first in (relation, subject, object) order. Restricted
to a group of relations (``relations``, e.g. left of / right of), it is the blind rule for that group. Its caption is
``"a <subject noun> <relation phrase> a <object noun>"`` (each category's and relation's shortest
name in the lexicon, so the judge reads back exactly that use); an image with no such pair gets
``"a <noun>"`` of one present category, which states no relation. Scored by the same judge as the
models (:func:`geocap.metrics.relation_accuracy`), its accuracy is what knowing the categories and
the training co-occurrences alone gives: the floor a model's relation accuracy must beat before
its geometry can be said to help.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional, Sequence

import numpy as np

__all__ = ["BlindCaptioner"]


def _shortest(mapping, value) -> str:
    names = sorted((t for t, v in mapping.items() if v == value), key=lambda t: (len(" ".join(t)), t))
    if not names:
        raise ValueError(f"the lexicon has no name for {value!r}")
    return " ".join(names[0])


@dataclass
class BlindCaptioner:
    """``counts``: (subject category id, relation name, object category id) -> uses in the training
    references; ``lexicon``: the judge's :class:`~geocap.metrics.relations.RelationLexicon`."""
    counts: Counter
    lexicon: object

    @classmethod
    def fit(cls, train_captions: Iterable[str], truth, relations: Optional[Sequence[str]] = None
            ) -> "BlindCaptioner":
        """Count the relation uses of ``train_captions`` (raw reference strings) with ``truth``'s
        lexicon (a :class:`~geocap.metrics.relations.RelationTruth`); uses with a missing side or the
        same category on both sides are not counted, nor, when ``relations`` (names) is given, uses
        of other relations (a blind captioner for one group, e.g. left/right, states only those)."""
        from geocap.data.relations import RELATIONS
        from geocap.metrics.relations import find_relations

        if relations is not None:
            unknown = sorted(set(relations) - set(RELATIONS))
            if unknown or not relations:
                raise ValueError(f"blind captioner: relations must be names of {', '.join(RELATIONS)}, got "
                                 f"{list(relations)!r}")
        counts: Counter = Counter()
        for caption in train_captions:
            for use in find_relations(caption, truth.lexicon):
                if use.subject is not None and use.object is not None and use.subject != use.object \
                        and (relations is None or use.relation in relations):
                    counts[(int(use.subject), use.relation, int(use.object))] += 1
        if not counts:
            raise ValueError("blind captioner: the training captions state no relation between two categories"
                             + ("" if relations is None else f" among {', '.join(relations)}"))
        return cls(counts=counts, lexicon=truth.lexicon)

    def restrict(self, relations: Sequence[str]) -> "BlindCaptioner":
        """The blind captioner of the same counts restricted to ``relations`` (names); ValueError when
        none of them was counted."""
        counts = Counter({k: n for k, n in self.counts.items() if k[1] in set(relations)})
        if not counts:
            raise ValueError(f"blind captioner: the training captions state none of {', '.join(relations)}")
        return BlindCaptioner(counts=counts, lexicon=self.lexicon)

    def choose(self, categories: Sequence[int]):
        """The (subject, relation, object) stated for an image holding ``categories`` (ids, with
        repeats), or None when no counted use has both its categories present."""
        present = {int(c) for c in np.asarray(categories).ravel()}
        best = None
        for (a, r, b), n in self.counts.items():
            if a in present and b in present:
                key = (-n, r, a, b)
                if best is None or key < best[0]:
                    best = (key, (a, r, b))
        return None if best is None else best[1]

    def caption(self, categories: Sequence[int]) -> str:
        """The blind caption of an image holding ``categories`` (module doc). ValueError for an
        image without objects."""
        present = sorted({int(c) for c in np.asarray(categories).ravel()})
        if not present:
            raise ValueError("blind captioner: an image without objects has no caption")
        chosen = self.choose(present)
        if chosen is None:
            return f"a {_shortest(self.lexicon.nouns, present[0])}"
        a, r, b = chosen
        return (f"a {_shortest(self.lexicon.nouns, a)} {_shortest(self.lexicon.relations, r)} "
                f"a {_shortest(self.lexicon.nouns, b)}")
