"""The geometry variants: one name each, for ``geocap train --variant`` and ``geocap study``.

Each name stands for the :class:`~geocap.train.config.TrainConfig` options that make it; all other
options are the caller's:

- ``ort``: ORT's box-relation geometry (``geometry=True``, ORT's embedding of |offsets|);
- ``none``: no geometry, ORT's ablation (``geometry=False``);
- ``directional``: the direction-aware embedding (``geometry=True, embedding="signed"``: signed
  offsets, so a layout and its mirror image differ);
- ``absolute``: ``none`` plus each object's normalised box and area in its features
  (``box_features=True``), how captioners are usually given positions.
"""
from __future__ import annotations

from geocap.errors import UsageError

__all__ = ["VARIANTS", "variant_options"]

VARIANTS = {
    "ort": {"geometry": True},
    "none": {"geometry": False},
    "directional": {"geometry": True, "embedding": "signed"},
    "absolute": {"geometry": False, "box_features": True},
}


def variant_options(name: str, given: dict | None = None) -> dict:
    """The TrainConfig options of variant ``name`` (a copy), checked against the options ``given``
    beside it: UsageError naming the variant for an unknown name, or when ``given`` sets one of
    them to another value (``--variant none --geometry true``)."""
    if name not in VARIANTS:
        raise UsageError(f"variant must be one of {', '.join(VARIANTS)}, got {name!r}")
    options = dict(VARIANTS[name])
    for key, value in (given or {}).items():
        if key in options and value != options[key]:
            raise UsageError(f"--variant {name} sets {key} = {options[key]!r}, but {key} = {value!r} was given too")
    return options
