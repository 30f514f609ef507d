"""Which image tokens a caption's words name, for patch-based captioners: COCO instance boxes
turned into regions of patches, and caption words matched to categories.

Words to categories: a word (lower-cased, stripped of punctuation) names a category when it is the
category's name or its plural (name + "s" or "es"; the embedded synthetic scenes' names, or COCO's
80 category names as ``instances_*.json`` lists them); a category whose name has several words
("traffic light") is named by the whole phrase, its last word (the head noun) carrying the
referent. No synonym list: "man" does not name COCO's "person", so grounding on COCO counts only
the nouns that are category names (the analysis reports how many tokens it grounded).

Regions: a category present in the image is the region of every patch whose grid cell's centre
lies inside one of the category's instance boxes (at least the patch holding the centre of each
box's part in the grid's window, so a small object still has one); the special tokens are never
in a region. A box wholly outside the window (cropped away by the processor) gives no patch. A word names the
region of its category in the image, or nothing when the image has no instance of it (such
words are not grounded: their referent is unknown, -1). A plural noun names all the category's
instances, as a singular one does (COCO does not say which instance a caption meant).

Tokens to words: a captioner's tokens are sub-words; the word a token starts is read off the
tokenizer's own decoding of the caption's prefixes (a token starts a word when the decoded prefix
ending with it holds one more word than the one before it), so any tokenizer works (byte-level BPE,
SentencePiece, WordPiece, word-level), a bare space token included. The referent goes on the token
that starts the word (its first token with letters, not a lone space token): row t of a decoder
map is the step that predicts ``tokens[t]``, and the step that predicts a word's first letters is
where the model commits to the word.
"""
from __future__ import annotations

import re
from typing import Mapping, Sequence

import numpy as np

from .patches import PatchGrid

__all__ = ["CategoryWords", "category_regions", "caption_referents", "word_starts"]

_STRIP = re.compile(r"^\W+|\W+$")


def _clean(word: str) -> str:
    return _STRIP.sub("", word.lower())


class CategoryWords:
    """Matches caption words to category ids. ``categories``: ``{category id: name}``."""

    def __init__(self, categories: Mapping[int, str]):
        self.phrases: dict = {}                 # tuple of words -> category id
        for cid, name in categories.items():
            words = tuple(_clean(w) for w in str(name).split() if _clean(w))
            if not words:
                continue
            for last in {words[-1], words[-1] + "s", words[-1] + "es"}:
                self.phrases.setdefault(words[:-1] + (last,), int(cid))
        self.longest = max((len(p) for p in self.phrases), default=0)

    def match(self, words: Sequence[str]) -> list:
        """``[(index of the head word, category id)]`` for each category named in ``words``, the
        longest phrase first where they overlap."""
        cleaned = [_clean(w) for w in words]
        found, i = [], 0
        while i < len(cleaned):
            for size in range(min(self.longest, len(cleaned) - i), 0, -1):
                cid = self.phrases.get(tuple(cleaned[i:i + size]))
                if cid is not None:
                    found.append((i + size - 1, cid))
                    i += size
                    break
            else:
                i += 1
        return found


def word_starts(ids: Sequence[int], tokenizer) -> tuple:
    """``(words, starts)``: the words of the decoded caption ``ids`` (split on white space) and per
    token the index of the word it starts, -1 for a token inside a word or one that adds no text.

    A token starts a word when the tokenizer's decoding of the caption up to it holds more words
    than the decoding up to the token before: so a token that adds only white space (byte-level
    BPE's lone ``'Ġ'``, SentencePiece's lone ``'▁'``) starts none, and the word's first token
    with letters starts it; special tokens (skipped in decoding) and sub-word pieces start none.
    A token that adds several words starts the first of them."""
    starts, count = [], 0
    for k in range(len(ids)):
        text = tokenizer.decode(list(ids[:k + 1]), skip_special_tokens=True, clean_up_tokenization_spaces=False)
        now = len(text.split())
        starts.append(count if now > count else -1)
        count = max(count, now)
    words = tokenizer.decode(list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=False).split()
    return words, starts


def category_regions(grid: PatchGrid, instances: Sequence[tuple]) -> dict:
    """``{category id: sorted object indices}`` of the patches the category's boxes cover (see the
    module doc). ``instances``: ``(category id, (x1, y1, x2, y2) normalised)`` per object."""
    boxes = grid.boxes()[grid.prefix:].astype(np.float64)
    centres = np.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2], axis=1)
    wx1, wy1, wx2, wy2 = (float(v) for v in grid.window)
    regions: dict = {}
    for cid, (x1, y1, x2, y2) in instances:
        if x2 <= wx1 or x1 >= wx2 or y2 <= wy1 or y1 >= wy2:
            continue                            # outside what the model saw (a cropped-away object)
        inside = ((centres[:, 0] >= x1) & (centres[:, 0] <= x2) & (centres[:, 1] >= y1) & (centres[:, 1] <= y2))
        cx = (min(max(x1, wx1), wx2) + min(max(x2, wx1), wx2)) / 2 - wx1     # the centre of its visible part,
        cy = (min(max(y1, wy1), wy2) + min(max(y2, wy1), wy2)) / 2 - wy1     # in the window's coordinates
        col = min(grid.cols - 1, max(0, int(cx / (wx2 - wx1) * grid.cols)))
        row = min(grid.rows - 1, max(0, int(cy / (wy2 - wy1) * grid.rows)))
        inside[row * grid.cols + col] = True
        regions.setdefault(int(cid), set()).update((np.flatnonzero(inside) + grid.prefix).tolist())
    return {cid: sorted(members) for cid, members in sorted(regions.items())}


def caption_referents(ids: Sequence[int], tokenizer, words: CategoryWords, region_of: Mapping[int, int]) -> np.ndarray:
    """``[T]`` int64: per token of ``ids`` the index of the region it names (``region_of``:
    category id -> index of its region in the record's ``referent_objects``), -1 for none."""
    caption_words, starts = word_starts(ids, tokenizer)
    token_of_word = {w: t for t, w in enumerate(starts) if w >= 0}
    out = np.full(len(ids), -1, np.int64)
    for head, cid in words.match(caption_words):
        if cid in region_of and head in token_of_word:
            out[token_of_word[head]] = region_of[cid]
    return out
