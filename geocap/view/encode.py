"""Turn attention records into the viewer's compact, JSON-able per-record data.

Encoding (read by ``static/common.js``; the two must agree):

- Attention maps: float16, little-endian, C order, base64 — ``{"shape": [L, H, R, C], "f16": "..."}``.
  With ``geocap view --encoder-top-k K`` the encoder's maps keep the K largest weights of each
  row: ``"k"``, values in ``"f16"`` ``[L, H, R, K]`` and their columns in ``"idx"`` (uint16, the
  same layout), ``"max_missing"`` / ``"max_dropped"`` the error (:func:`encode_top_k`); the
  page reads the dropped weights as 0 and says so.
  float16 keeps ~3.3 significant digits (relative error <= 2**-11 for values >= 6.1e-5, absolute
  error <= 3e-8 below), plenty for shading; the values shown and put in ``data-attention`` are
  exactly the float16 values, and "mean over heads" is the mean of those.
- Boxes: normalised (x1, y1, x2, y2) rounded to 4 decimals (1/10 pixel on a 1000-pixel image).
- Entropies: normalised as the analysis report normalises them (``geocap.analysis.entropy``:
  each row's entropy over log(its valid keys), so 1 = uniform; decoder self-attention row t has
  the t + 1 causal-visible inputs, the others the N objects; rows with fewer than two valid keys
  excluded), averaged over rows: ``[L][H]`` rounded to 4 significant digits; null when no row
  qualifies or the record has neither the map nor its entropies.
- Labels: per box its name from the dump's ``label_names``, else ``"#<id>"``; null for a
  negative (unknown) id, and no list at all when every id is unknown.
- Image tokens of a patch encoder (geocap.hf.patches), from ``record.extra``, each key only when
  the record has it: ``"special_objects"``: sorted indices of the special (class / register)
  tokens, objects that stand for no region (never drawn as a box; their weights are shown as
  numbers); ``"patch_grid"``: ``[rows, cols]``, the other objects being the patches in row-major
  order (row 0 at the top), so rows * cols + len(special_objects) = N. Both are checked against N
  (``ValueError`` naming the image). ``"referent_objects"``: the regions (lists of object indices)
  that ``referents`` index when the record has them (a referent is then a region, not an object).
- Sub-word tokens (:mod:`geocap.data.token_words`): ``"pieces"`` (per token the text it shows) and
  ``"word_of"`` (per token its word's index, -1 for a bare space token) and ``"words"`` (the
  words, decoded), only when they differ from the tokens themselves; captions in the index and
  the search words are the joined words.
- Controlled measures (``"controlled"``): the record's own values of the analyses' controlled measures
  per layer (:func:`controlled_values`), shown beside the entropies; the analysis report gives their
  means over images with intervals.
- Search words: lower-cased runs of letters, digits and ``_`` (``\\w+``); the bucket of a word is
  the 32-bit FNV-1a hash of its UTF-16 code units modulo the bucket count.
"""
from __future__ import annotations

import base64
import re

import numpy as np

from geocap.analysis.entropy import normalised_entropy
from geocap.analysis.grounding import record_referent_effect
from geocap.analysis.proximity import image_values
from geocap.data.attention_record import ENTROPY_NAMES, KINDS, MAP_NAMES, Record
from geocap.data.token_words import caption_words, token_words
from geocap.data.top_k_rows import expand_top_k, keep_top_k
from geocap.errors import DataError

MAP_TITLES = {"encoder_self": "encoder self-attention", "decoder_self": "decoder self-attention",
              "cross": "cross-attention"}
_WORD = re.compile(r"\w+")
_BOX_TOLERANCE = 1e-3


def encode_f16(array: np.ndarray) -> dict:
    """``{"shape": [...], "f16": base64 of little-endian float16 in C order}``."""
    data = np.ascontiguousarray(array, dtype="<f2")
    return {"shape": list(data.shape), "f16": base64.b64encode(data.tobytes()).decode("ascii")}


def decode_f16(encoded: dict) -> np.ndarray:
    """Inverse of :func:`encode_f16` (float16 array of the stored shape); a top-k map
    (:func:`encode_top_k`) comes back dense, its dropped weights 0."""
    raw = base64.b64decode(encoded["f16"])
    if "k" not in encoded:
        return np.frombuffer(raw, dtype="<f2").reshape(encoded["shape"])
    shape, k = encoded["shape"], encoded["k"]
    values = np.frombuffer(raw, dtype="<f2").reshape(shape[:-1] + [k])
    index = np.frombuffer(base64.b64decode(encoded["idx"]), dtype="<u2").reshape(shape[:-1] + [k])
    return expand_top_k(values, index, shape[-1])


def encode_top_k(array: np.ndarray, k: int) -> dict:
    """A map ``[..., C]`` kept as the ``k`` largest weights of each row (float16 values, uint16
    column indices, little-endian base64): ``{"shape", "k", "f16", "idx", "max_missing",
    "max_dropped"}``; ``max_missing``: the most weight a row loses (1 - the sum of its kept weights,
    over the float16 values), ``max_dropped``: the largest weight dropped. Rows of ``k`` or fewer
    columns are kept whole (the dense :func:`encode_f16` form is returned)."""
    data = np.asarray(array, dtype=np.float16)
    if k >= data.shape[-1]:
        return encode_f16(data)
    kept = keep_top_k(data, k)
    return {"shape": list(data.shape), "k": int(k),
            "f16": base64.b64encode(np.ascontiguousarray(kept.values, dtype="<f2").tobytes()).decode("ascii"),
            "idx": base64.b64encode(np.ascontiguousarray(kept.index, dtype="<u2").tobytes()).decode("ascii"),
            "max_missing": float(f"{float(kept.missing.max()):.4g}"),
            "max_dropped": float(f"{kept.max_dropped:.4g}")}


def caption_text(tokens) -> str:
    """The caption as words (sub-word pieces joined, :mod:`geocap.data.token_words`), without the final
    ``"<eos>"``."""
    words = caption_words(list(tokens))
    if words and words[-1] == "<eos>" and str(list(tokens)[-1]) == "<eos>":
        words = words[:-1]
    return " ".join(words)


def words_of(text: str) -> list:
    """The search words of a text (lower-cased ``\\w+`` runs), in order, with repeats."""
    return _WORD.findall(text.lower())


def word_bucket(word: str, buckets: int) -> int:
    """FNV-1a (32 bit) over the UTF-16 code units of ``word``, modulo ``buckets`` (as common.js)."""
    h = 0x811C9DC5
    raw = word.encode("utf-16-le")
    for i in range(0, len(raw), 2):
        h ^= raw[i] | (raw[i + 1] << 8)
        h = (h * 0x01000193) & 0xFFFFFFFF
    return h % buckets


def label_names_from(metadata) -> dict:
    """``{label id: name}`` from ``metadata["label_names"]`` (a list indexed by id, or a dict);
    empty when absent."""
    names = (metadata or {}).get("label_names")
    if names is None:
        return {}
    if isinstance(names, dict):
        return {int(k): str(v) for k, v in names.items()}
    return {i: str(v) for i, v in enumerate(names)}


def _where(record: Record) -> str:
    return f"image {record.image_id} (caption {record.caption_id}, {record.kind})"


def _check_values(record: Record) -> None:
    boxes = np.asarray(record.boxes, dtype=np.float64)
    if boxes.size and not np.isfinite(boxes).all():
        raise DataError(f"record of {_where(record)}: boxes hold NaN or inf")
    if boxes.size and (boxes.min() < -_BOX_TOLERANCE or boxes.max() > 1 + _BOX_TOLERANCE):
        raise DataError(f"record of {_where(record)}: boxes must be normalised to [0, 1] "
                         f"(got values in [{boxes.min():.4g}, {boxes.max():.4g}]; pixels?)")
    if boxes.size and ((boxes[:, 2] < boxes[:, 0]).any() or (boxes[:, 3] < boxes[:, 1]).any()):
        raise DataError(f"record of {_where(record)}: a box has x2 < x1 or y2 < y1")
    for name in MAP_NAMES + tuple(ENTROPY_NAMES.values()):
        value = getattr(record, name)
        if value is not None and not np.isfinite(value).all():
            raise DataError(f"record of {_where(record)}: {name} holds NaN or inf")


def encode_record(record: Record, label_names: dict, cache: dict | None = None, *,
                  encoder_top_k: int | None = None) -> dict:
    """One record as the viewer's JSON-able dict (see the module docstring); validates it first
    (``ValueError`` naming the image, caption and field). ``cache``: a dict kept across the
    records of one image; a map whose memory (address, shape, strides) was encoded already is
    not encoded again (the records of an image share their encoder map). ``encoder_top_k``: keep
    only the k largest weights of each encoder self-attention row (:func:`encode_top_k`)."""
    if not isinstance(record, Record):
        raise ValueError(f"expected a geocap.data.attention_record.Record, got {type(record).__name__}")
    record.validate()
    _check_values(record)
    if int(record.image_id) < 0:
        raise DataError(f"record of {_where(record)}: image_id must be >= 0")
    n = record.num_objects
    labels = None
    if record.labels is not None:            # a negative id is an unknown label
        labels = [label_names.get(int(x), f"#{int(x)}") if int(x) >= 0 else None
                  for x in np.asarray(record.labels).tolist()]
        if all(name is None for name in labels):
            labels = None
    out = {
        "kind": record.kind,
        "caption_id": int(record.caption_id),
        "tokens": [str(t) for t in record.tokens],
        "boxes": np.round(np.asarray(record.boxes, dtype=np.float64), 4).tolist(),
        "labels": labels,
        "maps": {},
        "entropy": {},
    }
    for name in ("referents", "source_referents"):
        value = getattr(record, name)
        out[name] = None if value is None else np.asarray(value).astype(int).tolist()
    for name in MAP_NAMES:
        value = getattr(record, name)
        top_k = encoder_top_k if name == "encoder_self" else None
        out["maps"][name] = None if value is None else _encode_cached(value, cache, top_k)
        out["entropy"][name] = _mean_normalised_entropy(record, name)
    out["num_objects"] = n
    out["controlled"] = controlled_values(record, cache)
    out.update(patch_fields(record))
    pieces, word_of = token_words(out["tokens"])
    if pieces != out["tokens"] or word_of != list(range(len(word_of))):
        out["pieces"], out["word_of"], out["words"] = pieces, word_of, caption_words(out["tokens"])
    return out


def controlled_values(record: Record, cache: dict | None = None) -> dict:
    """This record's values of the analyses' controlled measures, per layer (4 significant digits,
    null where undefined): ``"distance"`` and ``"distance_given_similarity"`` (its image's mean over
    query rows of the within-row correlation of encoder attention with distance;
    :func:`geocap.analysis.proximity.image_values`; computed once per image when ``cache`` is given)
    and ``"referent_effect"`` (its caption's tokens; :func:`geocap.analysis.grounding.record_referent_effect`).
    A measure the record cannot have is null."""
    key = ("controlled", int(record.image_id))
    if cache is not None and key in cache:
        values = cache[key]
    else:
        values = image_values(record)
        if cache is not None:
            cache[key] = values
    out = dict(values, referent_effect=record_referent_effect(record))
    return {name: None if layers is None else [None if v is None else float(f"{v:.4g}") for v in layers]
            for name, layers in out.items()}


def patch_fields(record: Record) -> dict:
    """``{"special_objects": [...] sorted, "patch_grid": [rows, cols], "referent_objects": [[...]]}``
    from ``record.extra`` (each key only when the record has it; lists or numpy arrays alike), as
    plain ints (``referent_objects``: the regions ``referents`` index, in patch records). The values are
    checked by ``Record.validate`` (the record contract), which ``encode_record`` runs first."""
    extra = record.extra or {}
    out = {}
    if extra.get("referent_objects") is not None:
        out["referent_objects"] = [[int(i) for i in np.asarray(region).reshape(-1)]
                                   for region in extra["referent_objects"]]
    if extra.get("special_objects") is not None:
        out["special_objects"] = sorted(int(i) for i in np.asarray(extra["special_objects"]).reshape(-1))
    if extra.get("patch_grid") is not None:
        out["patch_grid"] = [int(g) for g in np.asarray(extra["patch_grid"]).reshape(-1)]
    return out


def _mean_normalised_entropy(record: Record, name: str):
    """``[L][H]`` mean normalised entropy over the rows with two or more valid keys, or None."""
    got = normalised_entropy(record, name)
    if got is None or not got[1].any():
        return None
    values, used = got
    means = values[..., used].mean(axis=-1)
    return [[float(f"{v:.4g}") for v in row] for row in means.tolist()]


def _encode_cached(value, cache, top_k=None):
    encode = encode_f16 if top_k is None else (lambda a: encode_top_k(a, top_k))
    if cache is None or not isinstance(value, np.ndarray):
        return encode(value)
    key = (value.__array_interface__["data"][0], value.shape, value.strides, value.dtype.str, top_k)
    if key not in cache:                 # the array is kept too, so its address cannot be reused
        cache[key] = (value, encode(value))
    return cache[key][1]


def kind_order(kind: str) -> int:
    """Sort key of a record kind: reference, generated, hypothetical."""
    return KINDS.index(kind) if kind in KINDS else len(KINDS)
