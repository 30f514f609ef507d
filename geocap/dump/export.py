"""A dump's records as flat tables, for notebooks: CSV files, or pandas DataFrames.

Three tables (one row each per ...), every column a plain number or string:

- ``records`` (record): ``image_id``, ``kind``, ``caption_id``, ``file_name`` ("" unknown),
  ``width``, ``height`` (0 unknown), ``n_objects``, ``n_tokens``, ``caption`` (its words,
  sub-word pieces joined: :mod:`geocap.data.token_words`; without the final ``<eos>``);
- ``tokens`` (token of a record): ``image_id``, ``kind``, ``caption_id``, ``step`` (row t of the
  decoder maps: the step that predicts the token), ``token`` (as stored), ``word`` (index of the
  word it belongs to, -1 for a bare space token), ``referent`` (-1 none; an index into the
  record's regions for patch dumps), then per decoder layer l (1-based, as the report numbers
  them) ``cross_entropy_l<l>`` and ``decoder_entropy_l<l>``: the row's entropy in nats, mean over
  heads (empty when not recorded), and ``cross_top_l<l>``: the object the mean over heads of its
  cross-attention weighs most, special tokens (class/register) left out (-1 without maps);
- ``objects`` (image token of an image, from its first record: records of an image share the
  encoder): ``image_id``, ``object``, ``special`` (0/1), ``x1``, ``y1``, ``x2``, ``y2`` (normalised),
  ``label`` (-1 unknown), then per encoder layer ``encoder_entropy_l<l>`` (nats, mean over heads).

:func:`write_csv` writes ``records.csv``, ``tokens.csv`` and ``objects.csv`` into a folder
(each to a temporary name, then renamed); :func:`to_pandas` gives the same tables as
DataFrames (pandas is imported only there). Command line: ``geocap export DUMP --csv DIR
[--analysis REPORT]`` (:mod:`geocap.cli.export`).

The analysis results (``geocap analyze``'s ``analysis.json``) as one long table,
:func:`analysis_rows`: per number in the file a row ``key`` (its path of keys, joined by ``.``),
``index`` (its position in nested lists, e.g. ``"2,5"`` for layer 3, head 6 of a per-layer,
per-head list; ``""`` for a lone number) and ``value``; strings, nulls and booleans are left
out. Written as ``analysis.csv``, or a DataFrame with :func:`to_pandas` (``analysis=``).
"""
from __future__ import annotations

import csv
import io
import os
from typing import Iterable

import numpy as np

from geocap.data.atomic import write_text_atomic
from geocap.data.attention_record import regular_objects
from geocap.data.token_words import caption_words, token_words
from geocap.errors import DataError

__all__ = ["TABLES", "analysis_rows", "tables", "to_pandas", "write_csv"]

TABLES = ("records", "tokens", "objects")


def _per_layer(values, prefix: str, row: dict, layers: int, index=None) -> None:
    """``row[prefix_l<l>]`` for l = 1..layers: ``values [L, H, ...]`` meaned over heads at ``index``."""
    for layer in range(layers):
        row[f"{prefix}_l{layer + 1}"] = "" if values is None else float(np.mean(values[layer, :, index]))


def _layers(record, *names) -> int:
    return max((getattr(record, n).shape[0] for n in names if getattr(record, n) is not None), default=0)


def tables(records: Iterable) -> dict:
    """``{"records": [...], "tokens": [...], "objects": [...]}``: per table its rows (dicts with the
    same keys in every row of a table; see the module doc). The records are read one at a time (a
    dump's maps are not all held); the layer columns are the first record's, and a record with
    other layer counts is a ValueError naming it."""
    out = {name: [] for name in TABLES}
    seen_images = set()
    dec_layers = enc_layers = None
    for r in records:
        if dec_layers is None:
            dec_layers = _layers(r, "cross_entropy", "decoder_entropy", "cross")
            enc_layers = _layers(r, "encoder_entropy")
        if (_layers(r, "cross_entropy", "decoder_entropy", "cross"), _layers(r, "encoder_entropy")) \
                != (dec_layers, enc_layers):
            raise DataError(f"record of image {r.image_id} (caption {r.caption_id}, {r.kind}) has other layer counts "
                             f"than the first record's ({dec_layers} decoder, {enc_layers} encoder)")
        extra = r.extra or {}
        words = caption_words(r.tokens)
        if r.tokens and r.tokens[-1] == "<eos>" and words and words[-1] == "<eos>":
            words = words[:-1]
        key = {"image_id": int(r.image_id), "kind": r.kind, "caption_id": int(r.caption_id)}
        out["records"].append(dict(key, file_name=str(extra.get("file_name", "")),
                                   width=int(extra.get("width", 0) or 0), height=int(extra.get("height", 0) or 0),
                                   n_objects=r.num_objects, n_tokens=r.num_tokens, caption=" ".join(words)))
        _, word_of = token_words(r.tokens)
        regular = np.flatnonzero(regular_objects(r))
        cross = None if r.cross is None else r.cross.astype(np.float64).mean(axis=1)       # [L, T, N]
        for t, token in enumerate(r.tokens):
            row = dict(key, step=t, token=str(token), word=word_of[t],
                       referent=int(r.referents[t]) if r.referents is not None else -1)
            _per_layer(r.cross_entropy, "cross_entropy", row, dec_layers, t)
            _per_layer(r.decoder_entropy, "decoder_entropy", row, dec_layers, t)
            for layer in range(dec_layers):
                top = -1
                if cross is not None and layer < cross.shape[0] and regular.size:
                    top = int(regular[np.argmax(cross[layer, t, regular])])
                row[f"cross_top_l{layer + 1}"] = top
            out["tokens"].append(row)
        if r.image_id in seen_images:
            continue
        seen_images.add(r.image_id)
        special = ~regular_objects(r)
        for i in range(r.num_objects):
            x1, y1, x2, y2 = (float(v) for v in r.boxes[i])
            row = {"image_id": int(r.image_id), "object": i, "special": int(special[i]), "x1": x1, "y1": y1,
                   "x2": x2, "y2": y2, "label": int(r.labels[i]) if r.labels is not None else -1}
            _per_layer(r.encoder_entropy, "encoder_entropy", row, enc_layers, i)
            out["objects"].append(row)
    return out


def analysis_rows(analysis) -> list:
    """``[{"key", "index", "value"}]``: every number of an analysis report (the parsed
    ``analysis.json``, or its path, or the report folder holding it), see the module doc."""
    if not isinstance(analysis, dict):
        path = os.fspath(analysis)
        if os.path.isdir(path):
            path = os.path.join(path, "analysis.json")
        from geocap.data.json_file import read_json
        analysis = read_json(path, "analysis report")
    rows = []

    def walk(value, key, index):
        if isinstance(value, bool) or value is None or isinstance(value, str):
            return
        if isinstance(value, (int, float)):
            rows.append({"key": key, "index": ",".join(map(str, index)), "value": value})
        elif isinstance(value, dict):
            for k in value:
                walk(value[k], f"{key}.{k}" if key else str(k), index)
        elif isinstance(value, list):
            for i, item in enumerate(value):
                walk(item, key, index + [i])
    walk(analysis, "", [])
    return rows


def write_csv(records: Iterable, folder, *, analysis=None) -> dict:
    """Write the tables as ``folder/<table>.csv`` (the folder is created), with ``analysis``
    (see :func:`analysis_rows`) also ``analysis.csv``; ``{table: path}``."""
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    paths = {}
    named = tables(records)
    if analysis is not None:
        named["analysis"] = analysis_rows(analysis)
    for name, rows in named.items():
        text = io.StringIO()
        if rows:
            writer = csv.DictWriter(text, fieldnames=list(rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(rows)
        paths[name] = os.path.join(folder, f"{name}.csv")
        write_text_atomic(paths[name], text.getvalue())
    return paths


def to_pandas(records: Iterable = (), *, analysis=None) -> dict:
    """The tables as pandas DataFrames ``{table: DataFrame}`` (needs pandas); with ``analysis``
    also ``"analysis"`` (:func:`analysis_rows`)."""
    try:
        import pandas
    except ImportError as err:
        raise ImportError("to_pandas needs pandas (pip install pandas); write_csv needs nothing more") from err
    named = tables(records)
    if analysis is not None:
        named["analysis"] = analysis_rows(analysis)
    return {name: pandas.DataFrame(rows) for name, rows in named.items()}
