"""Captions: five per image from a small grammar with synonyms, grounded token by token.

A caption names one noun phrase ("a photo of two dogs", "a cat in a field"), two with a relation
("a cup is on a table", "there are two wheels inside a car") or three ("a cup and a bowl on a
table"). A noun phrase names *all* objects of its category with their exact count ("a dog" =
the scene's only dog, "three cups" = exactly three), so counts are right and referents
unambiguous. The relation is drawn among those true of the two groups' boxes (see
:mod:`geocap.data.relations`), and which group is the subject is drawn too, so "left of" and "right of" are
equally likely for any two categories: only the boxes tell them apart.

Grounding: ``refs[t]`` is the object token t names (the noun's words; for a plural noun the
group's first object), -1 for every other token; ``mentions`` give each noun phrase's token
span and all its objects; ``relations`` each relation phrase's span and the mentions it links.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..relations import RELATIONS, group_relations
from .scenes import Draws, Scene
from .world import CATEGORIES, CLUSTERS

CAPTIONS_PER_IMAGE = 5
RELATION_PHRASES = {
    "left of": ("to the left of", "left of"),
    "right of": ("to the right of", "right of"),
    "above": ("above", "over"),
    "below": ("below", "under", "beneath"),
    "on": ("on", "on top of"),
    "inside": ("inside", "in"),
    "next to": ("next to", "beside"),
}
NUMBERS = {2: "two", 3: "three", 4: "four", 5: "five", 6: "six", 7: "seven", 8: "eight",
           9: "nine", 10: "ten", 11: "eleven", 12: "twelve"}
SINGLE_TEMPLATES = ("{A}", "a photo of {A}", "a picture of {A}", "{A} {place}", "there {be} {A} {place}")
PAIR_TEMPLATES = ("{A} {rel} {B}", "{A} {be} {rel} {B}", "there {be} {A} {rel} {B}", "a photo of {A} {rel} {B}")
TRIPLE_TEMPLATES = ("{A} and {C} {rel} {B}", "{A} and {C} are {rel} {B}", "a picture of {A} and {C} {rel} {B}")
KIND_WEIGHTS = {"single": 0.2, "pair": 0.55, "triple": 0.25}   # renormalised over the kinds possible


@dataclass
class Mention:
    """A noun phrase: tokens ``[start, end)`` (determiner or number, then the noun); every
    object of ``category`` in the scene, ascending."""
    start: int
    end: int
    category: int
    objects: tuple

    @property
    def count(self) -> int:
        return len(self.objects)


@dataclass
class RelationUse:
    """Mention ``subject`` <relation> mention ``object``; the phrase is tokens ``[start, end)``."""
    relation: str
    subject: int
    object: int
    start: int
    end: int


@dataclass
class SynthCaption:
    """A caption (``raw``: capitalised, with a full stop; ``tokens``: lower-case words) and its
    grounding: ``refs[t]`` = the object token t names, -1 for none."""
    caption_id: int
    raw: str
    tokens: list
    refs: list
    mentions: list
    relations: list


class _Sentence:
    def __init__(self):
        self.tokens, self.refs, self.mentions, self.relations = [], [], [], []

    def words(self, text: str, ref: int = -1):
        for w in text.split():
            self.tokens.append(w)
            self.refs.append(ref)

    def noun_phrase(self, draws: Draws, category: int, objects: tuple) -> int:
        singular, plural = draws.choice(CATEGORIES[category].names)
        start = len(self.tokens)
        if len(objects) == 1:
            self.words("an" if singular[0] in "aeiou" else "a")
            self.words(singular, objects[0])
        else:
            self.words(NUMBERS[len(objects)])
            self.words(plural, objects[0])
        self.mentions.append(Mention(start, len(self.tokens), category, objects))
        return len(self.mentions) - 1

    def text(self) -> str:
        s = " ".join(self.tokens)
        return s[:1].upper() + s[1:] + "."


def _render(draws: Draws, template: str, groups: dict, place: str, relation: Optional[str]) -> _Sentence:
    """Fill ``template``; ``groups`` maps "A", "B", "C" to (category, objects); the relation,
    if any, links A (and C) to B."""
    s = _Sentence()
    index, phrase = {}, None
    plural_subject = "C" in groups or len(groups["A"][1]) > 1
    for part in template.split():
        if part in ("{A}", "{B}", "{C}"):
            index[part[1]] = s.noun_phrase(draws, *groups[part[1]])
        elif part == "{rel}":
            start = len(s.tokens)
            s.words(draws.choice(RELATION_PHRASES[relation]))
            phrase = (start, len(s.tokens))
        elif part == "{be}":
            s.words("are" if plural_subject else "is")
        elif part == "{place}":
            s.words(place)
        else:
            s.words(part)
    if relation is not None:
        for subject in ("A", "C"):
            if subject in index:
                s.relations.append(RelationUse(relation, index[subject], index["B"], *phrase))
    return s


def sample_captions(draws: Draws, scene: Scene, relations: np.ndarray, first_id: int,
                    count: int = CAPTIONS_PER_IMAGE) -> list:
    """``count`` :class:`SynthCaption` of ``scene`` with ids from ``first_id``; ``relations``
    is the scene's ``relation_matrix`` ``[7, N, N]``. Captions differ when ten tries allow."""
    cats = scene.categories.tolist()
    groups = sorted({c: tuple(i for i, k in enumerate(cats) if k == c) for c in cats}.items())
    rel = group_relations(relations, [objs for _, objs in groups])
    pairs: dict = {}                             # (group a, group b) -> the relations true of them
    for r, a, b in zip(*np.nonzero(rel)):
        pairs.setdefault((int(a), int(b)), []).append(RELATIONS[r])
    pair_keys = sorted(pairs)
    triples = [(RELATIONS[r], int(b)) for r, b in zip(*np.nonzero(rel.sum(axis=1) >= 2))]
    kinds = ["single"] + (["pair"] if pair_keys else []) + (["triple"] if triples else [])
    cum = np.cumsum([KIND_WEIGHTS[k] for k in kinds]).tolist()
    place = CLUSTERS[scene.theme].place

    captions, seen = [], set()
    for k in range(count):
        for _attempt in range(10):
            kind = kinds[draws.cumulative(cum)]
            if kind == "single":
                s = _render(draws, draws.choice(SINGLE_TEMPLATES), {"A": draws.choice(groups)}, place, None)
            elif kind == "pair":
                a, b = draws.choice(pair_keys)
                s = _render(draws, draws.choice(PAIR_TEMPLATES), {"A": groups[a], "B": groups[b]}, place,
                            draws.choice(pairs[a, b]))
            else:
                relation, b = draws.choice(triples)
                r = RELATIONS.index(relation)
                subjects = draws.shuffled(g for g in range(len(groups)) if rel[r, g, b])
                s = _render(draws, draws.choice(TRIPLE_TEMPLATES),
                            {"A": groups[subjects[0]], "B": groups[b], "C": groups[subjects[1]]}, place, relation)
            if s.text() not in seen:
                break
        seen.add(s.text())
        captions.append(SynthCaption(first_id + k, s.text(), s.tokens, s.refs, s.mentions, s.relations))
    return captions
