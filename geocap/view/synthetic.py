"""Random but well-formed attention records, for the viewer's tests and benchmark and for trying
the viewer without a model: softmax rows (causal for the decoder), their entropies, valid
normalised boxes, labels and referents. Not a model of real attention."""
from __future__ import annotations

import numpy as np

from geocap.data.attention_record import Record

WORDS = ("a man woman dog cat riding sitting on the red blue bus bench table with two near of "
         "under tree street car plate pizza small big holding").split()
KIND_CYCLE = ("reference", "reference", "generated", "hypothetical")


def _softmax(logits: np.ndarray, mask=None) -> np.ndarray:
    if mask is not None:
        logits = np.where(mask, logits, -np.inf)
    logits = logits - logits.max(axis=-1, keepdims=True)
    weights = np.exp(logits)
    return weights / weights.sum(axis=-1, keepdims=True)


def _entropy(probs: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(probs > 0, -probs * np.log(probs), 0.0)
    return terms.sum(axis=-1).astype(np.float32)


def synthetic_records(image_ids, *, objects: int = 36, tokens: int = 16, layers: int = 6, heads: int = 8,
                      captions: int = 2, labels: int = 25, seed: int = 0, sharpness: float = 3.0, patches=None):
    """Yield ``captions`` records per image id (in the order given; kinds cycle reference,
    reference, generated, hypothetical), each with N = ``objects`` boxes, T = ``tokens`` tokens
    (the last ``"<eos>"``), and float16 maps ``[layers, heads, ...]`` whose rows sum to 1 (decoder
    self-attention causal); entropies float32; one shared encoder map per image. ``sharpness``
    scales the random logits (larger: peakier attention).

    ``patches``: a :class:`geocap.hf.patches.PatchGrid` (or anything with its ``rows``, ``cols``,
    ``num_tokens``, ``special`` and ``boxes()``): the objects are a patch encoder's image tokens
    instead, as ``geocap.hf.record`` records them: N = ``patches.num_tokens``, its boxes, no labels
    nor referents, ``extra["special_objects"]`` and ``extra["patch_grid"]``; ``objects`` and
    ``labels`` are ignored."""
    rng = np.random.default_rng(seed)
    causal = np.tril(np.ones((tokens, tokens), dtype=bool))
    if patches is not None:
        objects = int(patches.num_tokens)
    for image_id in image_ids:
        xy = rng.random((objects, 2)) * 0.7
        wh = 0.05 + rng.random((objects, 2)) * (0.95 - xy)
        boxes = np.concatenate([xy, np.minimum(xy + wh, 1.0)], axis=1).astype(np.float32)
        object_labels = rng.integers(0, labels, objects)
        extra = {}
        if patches is not None:
            boxes, object_labels = np.asarray(patches.boxes(), dtype=np.float32), None
            extra = {"special_objects": list(patches.special), "patch_grid": [int(patches.rows), int(patches.cols)]}
        encoder = _softmax(sharpness * rng.standard_normal((layers, heads, objects, objects)))
        encoder_f16, encoder_entropy = encoder.astype(np.float16), _entropy(encoder)
        for k in range(captions):
            words = list(rng.choice(WORDS, tokens - 1)) + ["<eos>"]
            decoder = _softmax(sharpness * rng.standard_normal((layers, heads, tokens, tokens)), causal)
            cross = _softmax(sharpness * rng.standard_normal((layers, heads, tokens, objects)))
            referents = np.where(rng.random(tokens) < 0.3, rng.integers(0, objects, tokens), -1)
            referents[-1] = -1
            if patches is not None:
                referents = None
            kind = KIND_CYCLE[k % len(KIND_CYCLE)]
            yield Record(
                image_id=int(image_id), boxes=boxes, tokens=words, kind=kind,
                caption_id=-1 if kind == "generated" else int(image_id) * 10 + k,
                labels=object_labels, referents=referents,
                source_referents=referents.copy() if kind == "hypothetical" and referents is not None else None,
                encoder_self=encoder_f16, decoder_self=decoder.astype(np.float16),
                cross=cross.astype(np.float16), encoder_entropy=encoder_entropy,
                decoder_entropy=_entropy(decoder), cross_entropy=_entropy(cross), extra=dict(extra))
