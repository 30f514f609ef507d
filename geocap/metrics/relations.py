"""Relation-word accuracy of generated captions on the synthetic scenes (``geocap synth``).

For each generated caption the relation phrases it uses ("to the left of", "under", "on top
of", ...) are found, with the noun mentions each one links, and each use is judged against the
image's boxes by the very definition that decided which relations were true when the reference
captions were written (:func:`geocap.data.relations.relation_matrix` and
:func:`geocap.data.relations.group_relations`). So the reference captions score 1.0 by construction,
and a model that says "left of" where the boxes say "right of" is wrong.

What the phrases, nouns and places are comes from the dataset's ``ground_truth.json``:
``relations`` (relation name -> its phrases, the names those of
:data:`geocap.data.relations.RELATIONS`), ``categories`` (every singular and plural name, synonyms
included), ``clusters`` (the place phrases, "in a kitchen", which are not relations). The file's
relation thresholds must equal :mod:`geocap.data.relations`', else the truth recomputed here would not be
the one the captions were written from (ValueError).

Parsing a caption (PTB-tokenised, :func:`geocap.metrics.python_ptb_tokenize`), left to right,
longest match first at each token: a place phrase (skipped), a category name (a *mention* of that
category; singular or plural, synonyms included), a relation phrase, or another word (ignored).
A relation phrase links

* its *subjects*: every mention after the previous relation phrase (or the caption's start) and
  before it ("a cup and a bowl on a table": cup, bowl -- two uses, as the synthetic captions
  count them), and
* its *object*: the first mention after it and before the next relation phrase.

Each (subject, relation, object) is one *use*. A use is **correct** when both mentions resolve to
two different categories present in the image and the relation holds between the two groups:
between every object of the subject's category and every object of the object's category (a
noun phrase of the synthetic grammar names all objects of its category). Counts ("two cups" in
an image with three) are not judged here: only the relation is.

A use whose mentions cannot be resolved -- no mention before the phrase, none after it, or a
category that the image does not hold (or the same category on both sides) -- counts as
**wrong**, and is counted in ``unresolved`` too.

Result (:class:`RelationAccuracy`): ``accuracy`` = correct uses / uses (None when no caption uses
a relation phrase: an undefined ratio is reported as such, never as NaN), ``uses``, ``correct``,
``unresolved``, ``captions``, ``captions_with_relation`` and ``fraction_with_relation`` (None for
no captions), and per relation name its uses and correct uses.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Mapping, Optional, Sequence, Union

import numpy as np

from geocap.data.json_file import read_json
from geocap.data.relations import RELATIONS, group_relations, relation_matrix, relation_thresholds
from geocap.data.synth import FILES

from .tokenize import python_ptb_tokenize
from geocap.errors import DataError

__all__ = ["GROUND_TRUTH_FILE", "ParsedRelation", "RelationAccuracy", "RelationLexicon", "RelationTruth",
           "find_relations", "load_relation_truth", "relation_accuracy"]

GROUND_TRUTH_FILE = FILES["ground_truth"]
GROUND_TRUTH_FORMAT, GROUND_TRUTH_VERSION = "geocap-synth-ground-truth", 1

_PLACE, _NOUN, _RELATION = 0, 1, 2


@dataclass(frozen=True)
class RelationLexicon:
    """The words the parser knows, as token tuples: ``relations`` phrase -> relation name,
    ``nouns`` name -> category id (singular and plural), ``places`` the place phrases."""
    relations: Mapping[tuple, str]
    nouns: Mapping[tuple, int]
    places: frozenset
    _index: dict = field(init=False, default_factory=dict, repr=False, compare=False)

    def __post_init__(self):
        # first token -> [(length, kind, tokens, value)], longest first; places before nouns before relations
        index: dict = {}
        entries = [(t, _PLACE, None) for t in self.places] + [(t, _NOUN, c) for t, c in self.nouns.items()] + \
                  [(t, _RELATION, r) for t, r in self.relations.items()]
        for tokens, kind, value in entries:
            if not tokens:
                raise ValueError("relation lexicon: an empty phrase")
            index.setdefault(tokens[0], []).append((len(tokens), kind, tokens, value))
        for options in index.values():
            options.sort(key=lambda o: (-o[0], o[1]))
        object.__setattr__(self, "_index", index)

    def match(self, tokens: Sequence[str], i: int):
        """(length, kind, value) of the longest entry starting at ``tokens[i]``, or None."""
        for length, kind, phrase, value in self._index.get(tokens[i], ()):
            if tuple(tokens[i:i + length]) == phrase:
                return length, kind, value
        return None


@dataclass(frozen=True)
class ParsedRelation:
    """One relation use found in a caption: ``relation`` (a name of RELATIONS), the subject's and
    the object's category ids (None: no mention there), the phrase's token span ``[start, end)``."""
    relation: str
    subject: Optional[int]
    object: Optional[int]
    start: int
    end: int


def find_relations(caption: str, lexicon: RelationLexicon) -> list:
    """The :class:`ParsedRelation` uses of ``caption`` (a string, PTB-tokenised here), in order;
    the parsing rules are in the module doc."""
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a string, got {type(caption).__name__}")
    tokens = python_ptb_tokenize(caption).split()
    items = []                                   # (kind, value, start, end)
    i = 0
    while i < len(tokens):
        hit = lexicon.match(tokens, i)
        if hit is None:
            i += 1
            continue
        length, kind, value = hit
        if kind != _PLACE:
            items.append((kind, value, i, i + length))
        i += length
    phrases = [k for k, item in enumerate(items) if item[0] == _RELATION]
    out = []
    for n, k in enumerate(phrases):
        _, relation, start, end = items[k]
        lo = phrases[n - 1] + 1 if n else 0
        hi = phrases[n + 1] if n + 1 < len(phrases) else len(items)
        subjects = [items[j][1] for j in range(lo, k)]                      # only mentions lie between phrases
        after = [items[j][1] for j in range(k + 1, hi)]
        obj = after[0] if after else None
        for subject in subjects or [None]:
            out.append(ParsedRelation(relation, subject, obj, start, end))
    return out


@dataclass
class _Image:
    categories: np.ndarray          # int64 [N]
    boxes: np.ndarray               # float32 [N, 4]
    _relations: Optional[np.ndarray] = None

    @property
    def relations(self) -> np.ndarray:
        """bool [7, N, N], computed on first use."""
        if self._relations is None:
            self._relations = relation_matrix(self.boxes)
        return self._relations


@dataclass
class RelationTruth:
    """A synthetic dataset's ground truth as the metric needs it: the lexicon and, per image id,
    the objects' categories (int64 ``[N]``) and boxes (float32 ``[N, 4]``, normalised x1, y1, x2,
    y2); ``path`` the file it came from."""
    lexicon: RelationLexicon
    images: dict
    path: str = ""

    def resolvable(self, image_id: int, subject: Optional[int], obj: Optional[int]) -> bool:
        """Whether both categories are given, differ, and are present in image ``image_id``."""
        cats = self.images[image_id].categories
        return subject is not None and obj is not None and subject != obj and \
            bool((cats == subject).any()) and bool((cats == obj).any())

    def holds(self, image_id: int, relation: str, subject: Optional[int], obj: Optional[int]) -> bool:
        """Whether "<all objects of category subject> relation <all objects of category obj>" is
        true in image ``image_id``; False when the pair is not :meth:`resolvable`."""
        if not self.resolvable(image_id, subject, obj):
            return False
        image = self.images[image_id]
        members = [tuple(np.flatnonzero(image.categories == c).tolist()) for c in (subject, obj)]
        return bool(group_relations(image.relations, members)[RELATIONS.index(relation), 0, 1])


def _bad(path: str, what: str) -> DataError:
    return DataError(f"{path}: {what}")


def _token_tuple(text) -> tuple:
    return tuple(python_ptb_tokenize(str(text)).split())


def load_relation_truth(path: Union[str, os.PathLike]) -> RelationTruth:
    """Read ``ground_truth.json`` (written by ``geocap synth``) into a :class:`RelationTruth`.
    ValueError naming the file (and the image id) for a missing or malformed file, another
    format, relations unknown to :mod:`geocap.data.relations` or relation thresholds that differ from it."""
    path = os.fspath(path)
    data = read_json(path, "ground truth file")
    if not isinstance(data, dict) or data.get("format") != GROUND_TRUTH_FORMAT:
        raise _bad(path, f"not a {GROUND_TRUTH_FORMAT} file")
    if data.get("format_version") != GROUND_TRUTH_VERSION:
        raise _bad(path, f"format_version {data.get('format_version')!r}, expected {GROUND_TRUTH_VERSION}")
    try:
        thresholds = data["parameters"]["relation_thresholds"]
        relations = data["relations"]
        categories = data["categories"]
        places = [c["place"] for c in data["clusters"]]
        images = data["images"]
    except (KeyError, TypeError) as err:
        raise _bad(path, f"missing or malformed field {err}") from None
    for name, value in relation_thresholds().items():
        got = thresholds.get(name) if isinstance(thresholds, dict) else None
        if not isinstance(got, (int, float)) or not math.isclose(got, value, rel_tol=0, abs_tol=1e-12):
            raise _bad(path, f"relation threshold {name} is {got!r} but geocap.data.relations uses {value}: "
                             f"the relations cannot be recomputed as the captions were written")
    if not isinstance(relations, dict) or not relations:
        raise _bad(path, "'relations' must map relation names to their phrases")
    phrase_map = {}
    for name, phrases in relations.items():
        if name not in RELATIONS:
            raise _bad(path, f"relation {name!r} is not one of geocap.data.relations.RELATIONS "
                             f"({', '.join(RELATIONS)})")
        if not isinstance(phrases, list) or not phrases:
            raise _bad(path, f"relation {name!r}: its phrases must be a non-empty list")
        for phrase in phrases:
            tokens = _token_tuple(phrase)
            if phrase_map.get(tokens, name) != name:
                raise _bad(path, f"phrase {phrase!r} names two relations")
            phrase_map[tokens] = name
    nouns = {}
    for k, cat in enumerate(categories if isinstance(categories, list) else [None]):
        try:
            cid, names = int(cat["id"]), [noun for pair in cat["names"] for noun in pair]
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(path, f"category #{k}: malformed ({err!r})") from None
        for noun in names:
            tokens = _token_tuple(noun)
            if nouns.get(tokens, cid) != cid:
                raise _bad(path, f"noun {noun!r} names two categories")
            nouns[tokens] = cid
    lexicon = RelationLexicon(relations=phrase_map, nouns=nouns, places=frozenset(_token_tuple(p) for p in places))
    table = {}
    for k, image in enumerate(images):
        image_id = image.get("image_id") if isinstance(image, dict) else None
        try:
            objects = image["objects"]
            cats = np.array([int(o["category_id"]) for o in objects], dtype=np.int64)
            boxes = np.array([o["box"] for o in objects], dtype=np.float32).reshape(len(objects), 4)
        except (KeyError, TypeError, ValueError) as err:
            raise _bad(path, f"image {image_id if image_id is not None else f'#{k}'}: malformed objects ({err!r})") \
                from None
        if not np.isfinite(boxes).all():
            raise _bad(path, f"image {image_id}: a box is not finite")
        if image_id in table:
            raise _bad(path, f"image {image_id} listed twice")
        table[image_id] = _Image(cats, boxes)
    return RelationTruth(lexicon=lexicon, images=table, path=path)


@dataclass
class RelationAccuracy:
    """Counts of :func:`relation_accuracy` (see the module doc); ``per_relation``: relation name ->
    {"uses": int, "correct": int} for every relation name, in RELATIONS order."""
    captions: int = 0
    captions_with_relation: int = 0
    uses: int = 0
    correct: int = 0
    unresolved: int = 0
    per_relation: dict = field(default_factory=lambda: {r: {"uses": 0, "correct": 0} for r in RELATIONS})

    @property
    def accuracy(self) -> Optional[float]:
        """correct / uses; None when there are no uses."""
        return self.correct / self.uses if self.uses else None

    @property
    def fraction_with_relation(self) -> Optional[float]:
        """captions with at least one relation phrase / captions; None for no captions."""
        return self.captions_with_relation / self.captions if self.captions else None

    def as_dict(self) -> dict:
        """A JSON-able dict: ``relation_accuracy`` and ``fraction_with_relation`` (float or None)
        and every count."""
        return {"relation_accuracy": self.accuracy, "uses": self.uses, "correct": self.correct,
                "unresolved": self.unresolved, "captions": self.captions,
                "captions_with_relation": self.captions_with_relation,
                "fraction_with_relation": self.fraction_with_relation,
                "per_relation": {k: dict(v) for k, v in self.per_relation.items()}}


def relation_accuracy(captions: Mapping[int, Union[str, Sequence[str]]], truth: RelationTruth) -> RelationAccuracy:
    """Relation-word accuracy of ``captions`` (image id -> a caption, or a list of captions of
    that image) against ``truth`` (:func:`load_relation_truth`). ValueError naming the image id
    for an image the ground truth does not hold or a caption that is not a string."""
    if not isinstance(captions, Mapping):
        raise ValueError(f"captions must map image ids to captions, got {type(captions).__name__}")
    result = RelationAccuracy()
    for image_id, texts in captions.items():
        if image_id not in truth.images:
            raise DataError(f"image {image_id!r}: not in the ground truth {truth.path or '(in memory)'}")
        for text in [texts] if isinstance(texts, str) else texts:
            if not isinstance(text, str):
                raise ValueError(f"image {image_id}: a caption must be a string, got {type(text).__name__}")
            uses = find_relations(text, truth.lexicon)
            result.captions += 1
            result.captions_with_relation += bool(uses)
            for use in uses:
                ok = truth.holds(image_id, use.relation, use.subject, use.object)
                result.uses += 1
                result.correct += ok
                result.unresolved += not truth.resolvable(image_id, use.subject, use.object)
                result.per_relation[use.relation]["uses"] += 1
                result.per_relation[use.relation]["correct"] += ok
    return result
