"""Which part of an image a Hugging Face image processor shows its model: the window, in the
original image's normalised coordinates, that the processed ``pixel_values`` cover.

A processor that resizes the whole image shows all of it: window ``(0, 0, 1, 1)``. One that
resizes then centre-crops (DeiT: resize to 256 x 256, crop 224; CLIP: shortest edge to 224, crop
224) shows a centred window: with the resized size ``(rh, rw)`` and the crop ``(ch, cw)``, the crop
starts at row ``(rh - ch) // 2`` and column ``(rw - cw) // 2`` of the resized image (as both of
transformers' backends crop), and since resizing maps the image's edges onto the resized image's
edges, that is ``x1 = left / rw``, ``x2 = (left + cw) / rw`` (likewise y) of the original. Resize
rules followed: ``size`` ``{height, width}`` (exact) and ``{shortest_edge}`` (the short side to it,
the long side ``int(shortest * long / short)``, transformers' rule), or no resize. Anything else
(padding, ``longest_edge``, ``max_height``, a crop larger than the resized image) is refused with
:class:`UnsupportedProcessor` naming the processor: geocap draws maps only where it knows the
model looked.
"""
from __future__ import annotations

__all__ = ["UnsupportedProcessor", "processor_window"]


class UnsupportedProcessor(ValueError):
    """An image processor whose geometry geocap cannot map back onto the original image."""


def _get(size, key):
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


def _resized(processor, width: int, height: int, name: str) -> tuple:
    if not getattr(processor, "do_resize", False):
        return height, width
    size = getattr(processor, "size", None)
    other = [k for k in ("longest_edge", "max_height", "max_width", "min_pixels", "max_pixels") if _get(size, k)]
    if other:
        raise UnsupportedProcessor(f"image processor {name}: size {other[0]}={_get(size, other[0])} is not supported "
                                   f"by geocap.hf (supported: size height/width, or shortest_edge)")
    if _get(size, "height") and _get(size, "width"):
        return int(_get(size, "height")), int(_get(size, "width"))
    short = _get(size, "shortest_edge")
    if short:
        short = int(short)
        if width <= height:
            return int(short * height / width), short
        return short, int(short * width / height)
    raise UnsupportedProcessor(f"image processor {name}: cannot read its resize size {size!r}")


def processor_window(processor, width: int, height: int) -> tuple:
    """``((x1, y1, x2, y2), (h, w))``: the window of a ``width`` x ``height`` image that
    ``processor``'s output shows (normalised to the original image) and that output's size in
    pixels; :class:`UnsupportedProcessor` for a processor this module cannot map (module doc)."""
    name = type(processor).__name__
    if getattr(processor, "do_pad", False):
        raise UnsupportedProcessor(f"image processor {name} pads images (do_pad): geocap.hf cannot map its pixels "
                                   f"back onto the image; save the processor with do_pad=False")
    rh, rw = _resized(processor, width, height, name)
    if not getattr(processor, "do_center_crop", False):
        return (0.0, 0.0, 1.0, 1.0), (rh, rw)
    crop = getattr(processor, "crop_size", None)
    ch, cw = _get(crop, "height"), _get(crop, "width")
    if not (ch and cw):
        raise UnsupportedProcessor(f"image processor {name}: cannot read its crop size {crop!r}")
    ch, cw = int(ch), int(cw)
    if ch > rh or cw > rw:
        raise UnsupportedProcessor(f"image processor {name} crops {ch}x{cw} out of a {rh}x{rw} resized image "
                                   f"(it pads): not supported by geocap.hf")
    top, left = (rh - ch) // 2, (rw - cw) // 2
    return (left / rw, top / rh, (left + cw) / rw, (top + ch) / rh), (ch, cw)
