"""Caption preprocessing: tokens, the vocabulary, and the encoded captions directory.

A captions directory holds two files, each written atomically (temporary file + rename):

``vocab.json``
    ``{"format": "geocap-vocab", "format_version": 1, "min_count": 5, "words": [...],
    "pad_id": 0, "bos_id": 1, "eos_id": 2, "unk_id": 3}``; word ``i`` has id ``i``. geocap's own
    vocabularies (:func:`build_vocab`) put ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` at ids 0-3 (the
    defaults, assumed when a file gives no ids); an imported one keeps its source's ids (ORT: one
    id 0 for padding, start and end at once, no <unk>; see :class:`Vocabulary`).
``captions.h5`` (format ``geocap-captions`` version 1), one row per caption, grouped by image
(ascending image id, source order within an image)::

    image_id    [M]           int64
    caption_id  [M]           int64
    split       [M]           uint8, an index into the attribute ``split_names``
                              (images the source gives no split get "none")
    tokens      [M, max_len]  int32 word ids, no <bos>/<eos>, padded with the vocabulary's pad_id
    length      [M]           int32 words kept (<= max_len)
    reference   [M]           UTF-8 strings: all the caption's tokens joined by spaces, before
                              truncation and <unk> (what caption metrics compare against)

    attributes: format, format_version, max_len, vocab_size, vocab_sha1 (the vocabulary the
    ids refer to: a captions.h5 read with another vocab.json is rejected)

Tokenising: a caption's own tokens when the source has them (Karpathy's files do), lower-cased;
else its text lower-cased, apostrophes dropped ("man's" -> "mans"), every other character that
is not a letter or digit taken as a space.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from collections import Counter
from dataclasses import dataclass
from typing import Iterable, Optional

import h5py
import numpy as np

from geocap.data.atomic import atomic_output, write_text_atomic
from geocap.data.hdf5_errors import named_hdf5_errors, open_hdf5
from geocap.data.json_file import read_json
from geocap.data.items import Caption, CaptionSet, DataError
from geocap.progress import progress_bar
from geocap.errors import UsageError

PAD, BOS, EOS, UNK = 0, 1, 2, 3
SPECIALS = ("<pad>", "<bos>", "<eos>", "<unk>")
VOCAB_FILE, CAPTIONS_FILE = "vocab.json", "captions.h5"
VOCAB_FORMAT, CAPTIONS_FORMAT, FORMAT_VERSION = "geocap-vocab", "geocap-captions", 1
NO_SPLIT = "none"

_APOSTROPHES = re.compile(r"['\u2019`]")
_NOT_WORD = re.compile(r"[^\w]|_")


def tokenize(text: str) -> list:
    """Lower-cased words of ``text``: apostrophes dropped, other punctuation splits words."""
    return _NOT_WORD.sub(" ", _APOSTROPHES.sub("", text.lower())).split()


def caption_tokens(caption: Caption) -> list:
    """The caption's given tokens (lower-cased, empty ones dropped), else ``tokenize(text)``."""
    if caption.tokens:
        return [t for t in (str(t).strip().lower() for t in caption.tokens) if t]
    return tokenize(caption.text or "")


class Vocabulary:
    """Words <-> ids. ``words[i]`` has id ``i``.

    The special ids are fields: ``pad_id`` (padding after a caption), ``bos_id`` (the decoder's
    first input), ``eos_id`` (the end of a caption) and ``unk_id`` (what unknown words encode as;
    None: the vocabulary has none and :meth:`encode` refuses unknown words). The defaults are
    geocap's layout, ids 0-3 = ``<pad>``, ``<bos>``, ``<eos>``, ``<unk>`` (then the first four words
    must be exactly those). Other layouts are for imported models, e.g. ORT's: ``pad_id = bos_id
    = eos_id = 0`` and ``unk_id`` None or the id of its ordinary word "UNK". pad, bos and eos may
    coincide; ``unk_id`` must differ from all three.
    """

    def __init__(self, words: Iterable[str], min_count: Optional[int] = None, *, pad_id: int = PAD,
                 bos_id: int = BOS, eos_id: int = EOS, unk_id: Optional[int] = UNK):
        self.words = list(words)
        if (pad_id, bos_id, eos_id, unk_id) == (PAD, BOS, EOS, UNK) and tuple(self.words[:4]) != SPECIALS:
            raise ValueError(f"a vocabulary with the default special ids starts with {SPECIALS}, "
                             f"got {self.words[:4]}")
        ids = {"pad_id": pad_id, "bos_id": bos_id, "eos_id": eos_id, "unk_id": unk_id}
        for name, value in ids.items():
            if value is None and name == "unk_id":
                continue
            if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < len(self.words):
                raise ValueError(f"{name} must be a word id in [0, {len(self.words)}), got {value!r}")
        if unk_id is not None and unk_id in (pad_id, bos_id, eos_id):
            raise ValueError(f"unk_id {unk_id} must differ from pad_id, bos_id and eos_id {(pad_id, bos_id, eos_id)}")
        self.index = {w: i for i, w in enumerate(self.words)}
        if len(self.index) != len(self.words):
            raise ValueError("a vocabulary lists some word twice")
        self.pad_id, self.bos_id, self.eos_id, self.unk_id = pad_id, bos_id, eos_id, unk_id
        self.min_count = min_count

    @property
    def special_ids(self) -> dict:
        """``{"pad_id", "bos_id", "eos_id", "unk_id"}`` -> id (``unk_id`` may be None): the fields
        a file stores next to the words."""
        return {"pad_id": self.pad_id, "bos_id": self.bos_id, "eos_id": self.eos_id, "unk_id": self.unk_id}

    @property
    def has_default_ids(self) -> bool:
        """True for geocap's own layout (ids 0-3 = <pad>, <bos>, <eos>, <unk>)."""
        return (self.pad_id, self.bos_id, self.eos_id, self.unk_id) == (PAD, BOS, EOS, UNK)

    def __len__(self) -> int:
        return len(self.words)

    def __eq__(self, other) -> bool:
        return isinstance(other, Vocabulary) and self.words == other.words and self.special_ids == other.special_ids

    def __repr__(self) -> str:
        ids = "" if self.has_default_ids else ", " + ", ".join(f"{k}={v}" for k, v in self.special_ids.items())
        return f"Vocabulary({len(self)} words, min_count={self.min_count}{ids})"

    @property
    def sha1(self) -> str:
        """Fingerprint of the word list, and of the special ids when they are not the defaults
        (recorded in captions.h5)."""
        text = "\n".join(self.words)
        if not self.has_default_ids:
            text += "\n" + json.dumps(self.special_ids, sort_keys=True)
        return hashlib.sha1(text.encode()).hexdigest()

    def encode(self, tokens: Iterable[str], max_len: Optional[int] = None) -> list:
        """Word ids of ``tokens`` (unknown words, and the words at the pad/bos/eos ids, -> ``unk_id``;
        ValueError naming the word when the vocabulary has no ``unk_id``), the first ``max_len``
        only; no <bos>/<eos>."""
        specials = {self.pad_id, self.bos_id, self.eos_id}
        ids = []
        for t in tokens:
            i = self.index.get(t)
            if i is None or i in specials:
                if self.unk_id is None:
                    raise ValueError(f"word {t!r} is not in the vocabulary, which has no unknown-word id")
                i = self.unk_id
            ids.append(i)
        return ids if max_len is None else ids[:max_len]

    def decode(self, ids: Iterable[int]) -> str:
        """Words of ``ids`` joined by spaces, stopping at ``eos_id`` or ``pad_id``; ``bos_id`` skipped
        (when it is neither)."""
        out = []
        for i in ids:
            i = int(i)
            if i in (self.eos_id, self.pad_id):
                break
            if i != self.bos_id:
                out.append(self.words[i])
        return " ".join(out)

    def save(self, path) -> None:
        write_text_atomic(os.fspath(path), json.dumps(
            {"format": VOCAB_FORMAT, "format_version": FORMAT_VERSION, "min_count": self.min_count,
             "words": self.words, **self.special_ids}, ensure_ascii=False))

    @classmethod
    def from_dict(cls, data: dict) -> "Vocabulary":
        """The vocabulary of ``{"words": [...], "min_count": ..., "pad_id": ..., ...}`` (the special
        ids optional: absent ones take the defaults); ValueError when it is not one."""
        words = data.get("words") if isinstance(data, dict) else None
        if not isinstance(words, list) or not all(isinstance(w, str) for w in words):
            raise DataError("'words' must be a list of strings")
        defaults = {"pad_id": PAD, "bos_id": BOS, "eos_id": EOS, "unk_id": UNK}
        ids = {k: data.get(k, v) for k, v in defaults.items()}
        return cls(words, data.get("min_count"), **ids)

    def to_dict(self) -> dict:
        """``{"words", "min_count", "pad_id", "bos_id", "eos_id", "unk_id"}``: plain data, the
        inverse of :meth:`from_dict`."""
        return {"words": list(self.words), "min_count": self.min_count, **self.special_ids}

    @classmethod
    def load(cls, path) -> "Vocabulary":
        path = os.fspath(path)
        data = read_json(path, "vocabulary file", DataError)
        if not isinstance(data, dict) or data.get("format") != VOCAB_FORMAT:
            raise DataError(f"{path}: not a geocap vocabulary (no format {VOCAB_FORMAT!r})")
        if data.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: vocabulary format version {data.get('format_version')}; this geocap reads "
                            f"version {FORMAT_VERSION}")
        try:
            return cls.from_dict(data)
        except ValueError as err:
            raise DataError(f"{path}: {err}") from None


def build_vocab(captions, min_count: int = 5) -> Vocabulary:
    """The vocabulary of ``captions`` (a CaptionSet or an iterable of Caption): the specials,
    then every word seen at least ``min_count`` times, most frequent first (ties
    alphabetical); rarer words will encode as <unk>. (ORT's ``count_thr=5`` keeps words seen
    more than 5 times, i.e. ``min_count=6``.)"""
    if min_count < 1:
        raise UsageError(f"min_count must be at least 1, got {min_count}")
    items = captions.captions if isinstance(captions, CaptionSet) else captions
    counts = Counter()
    for caption in items:
        counts.update(caption_tokens(caption))
    for special in SPECIALS:
        counts.pop(special, None)
    kept = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
    return Vocabulary(list(SPECIALS) + kept, min_count)


@dataclass
class EncodedCaptions:
    """A loaded captions directory; arrays have one row per caption (see the module doc)."""
    vocab: Vocabulary
    image_id: np.ndarray        # int64 [M]
    caption_id: np.ndarray      # int64 [M]
    split: np.ndarray           # uint8 [M], index into split_names
    split_names: list
    tokens: np.ndarray          # int32 [M, max_len]
    length: np.ndarray          # int32 [M]
    reference: list             # M strings
    max_len: int

    def __len__(self) -> int:
        return len(self.image_id)

    def rows(self, split: str = "all") -> np.ndarray:
        """Row indices of the captions whose image is in ``split`` ("all": every row)."""
        if split == "all":
            return np.arange(len(self))
        if split not in self.split_names:
            return np.zeros(0, dtype=np.int64)
        return np.flatnonzero(self.split == self.split_names.index(split))

    def references(self, image_id: int) -> list:
        """The reference strings of one image (empty when it has none)."""
        lo, hi = np.searchsorted(self.image_id, [image_id, image_id + 1])
        return self.reference[lo:hi]


def encode_captions(captions: CaptionSet, vocab: Vocabulary, max_len: int = 16, *,
                    progress: bool = False) -> EncodedCaptions:
    """Tokenise and encode every caption of ``captions``, grouped by image (stable)."""
    if max_len < 1:
        raise UsageError(f"max_len must be at least 1, got {max_len}")
    items = list(captions.captions)
    if not items:
        raise DataError("no captions to encode")
    order = sorted(range(len(items)), key=lambda k: int(items[k].image_id))
    names = sorted({str(s) for s in captions.splits.values()})
    if any(int(c.image_id) not in captions.splits for c in items) and NO_SPLIT not in names:
        names.append(NO_SPLIT)
    code = {name: i for i, name in enumerate(names)}
    m = len(items)
    out = EncodedCaptions(vocab=vocab, image_id=np.empty(m, np.int64), caption_id=np.empty(m, np.int64),
                          split=np.empty(m, np.uint8), split_names=names,
                          tokens=np.full((m, max_len), vocab.pad_id, np.int32),
                          length=np.empty(m, np.int32), reference=[""] * m, max_len=max_len)
    for row, k in enumerate(progress_bar(order, enabled=progress, unit="cap", desc="encoding captions")):
        cap = items[k]
        image_id = int(cap.image_id)
        words = caption_tokens(cap)
        ids = vocab.encode(words, max_len)
        out.image_id[row], out.caption_id[row] = image_id, int(cap.caption_id)
        out.split[row] = code[str(captions.splits.get(image_id, NO_SPLIT))]
        out.tokens[row, :len(ids)] = ids
        out.length[row] = len(ids)
        out.reference[row] = " ".join(words)
    return out


def write_captions(directory, encoded: EncodedCaptions) -> None:
    """Write ``vocab.json`` and ``captions.h5`` into ``directory`` (created if needed), each atomically."""
    directory = os.fspath(directory)
    os.makedirs(directory, exist_ok=True)
    path = os.path.join(directory, CAPTIONS_FILE)
    with atomic_output(path) as tmp:
        with h5py.File(tmp, "w", locking=False) as h5:
            h5.create_dataset("image_id", data=encoded.image_id)
            h5.create_dataset("caption_id", data=encoded.caption_id)
            h5.create_dataset("split", data=encoded.split)
            h5.create_dataset("tokens", data=encoded.tokens, chunks=True)
            h5.create_dataset("length", data=encoded.length)
            h5.create_dataset("reference", data=np.array(encoded.reference, dtype=object),
                              dtype=h5py.string_dtype("utf-8"))
            h5.attrs.update({"format": CAPTIONS_FORMAT, "format_version": FORMAT_VERSION,
                             "max_len": encoded.max_len, "vocab_size": len(encoded.vocab),
                             "vocab_sha1": encoded.vocab.sha1, "split_names": json.dumps(encoded.split_names)})
        encoded.vocab.save(os.path.join(directory, VOCAB_FILE))


def load_captions(directory) -> EncodedCaptions:
    """Read a captions directory written by ``write_captions``; DataError naming the file when
    a file is missing, foreign, or its ids do not fit the vocabulary."""
    directory = os.fspath(directory)
    vocab = Vocabulary.load(os.path.join(directory, VOCAB_FILE))
    path = os.path.join(directory, CAPTIONS_FILE)
    if not os.path.exists(path):
        raise DataError(f"{path}: captions file missing")
    h5 = open_hdf5(path, "HDF5 file", locking=False)
    with h5, named_hdf5_errors(path, "captions file"):
        attrs = dict(h5.attrs)
        if attrs.get("format") != CAPTIONS_FORMAT:
            raise DataError(f"{path}: not a geocap captions file (format {attrs.get('format')!r})")
        if attrs.get("format_version") != FORMAT_VERSION:
            raise DataError(f"{path}: captions format version {attrs.get('format_version')}; this geocap reads "
                            f"version {FORMAT_VERSION}")
        if attrs.get("vocab_sha1") != vocab.sha1:
            raise DataError(f"{path}: encoded with another vocabulary than {os.path.join(directory, VOCAB_FILE)} "
                            f"({attrs.get('vocab_size')} words there, {len(vocab)} here)")
        names = ("image_id", "caption_id", "split", "tokens", "length", "reference")
        missing = [n for n in names if n not in h5]
        if missing:
            raise DataError(f"{path}: incomplete captions file, missing {', '.join(missing)}")
        data = {n: h5[n][()] for n in names}
    split_names = json.loads(attrs["split_names"])
    max_len = int(attrs["max_len"])
    m = len(data["image_id"])
    tokens, length = data["tokens"].astype(np.int32), data["length"].astype(np.int32)
    shapes_ok = (all(len(data[n]) == m for n in names) and tokens.shape == (m, max_len)
                 and bool((np.diff(data["image_id"]) >= 0).all()))
    if not shapes_ok:
        raise DataError(f"{path}: inconsistent captions file (row counts, token shape or image order)")
    if m and (tokens.min() < 0 or tokens.max() >= len(vocab)):
        raise DataError(f"{path}: word ids {tokens.min()}..{tokens.max()} outside the vocabulary's 0..{len(vocab) - 1}")
    if m and (length.min() < 0 or length.max() > max_len or data["split"].max() >= len(split_names)):
        raise DataError(f"{path}: caption lengths or split codes out of range")
    reference = [r.decode() if isinstance(r, bytes) else str(r) for r in data["reference"]]
    return EncodedCaptions(vocab=vocab, image_id=data["image_id"].astype(np.int64),
                           caption_id=data["caption_id"].astype(np.int64), split=data["split"].astype(np.uint8),
                           split_names=split_names, tokens=tokens, length=length, reference=reference, max_len=max_len)


