"""Image files named by their image id: the number a file's name ends with before its extension
(COCO's ``COCO_val2014_000000391895.jpg`` and ``000000391895.jpg`` -> 391895)."""
from __future__ import annotations

import os
import re
from typing import Optional

__all__ = ["IMAGE_EXTENSIONS", "image_id_from_name"]

#: Extensions (lower case) of the image files geocap reads (the viewer shows them; PIL reads them).
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".gif", ".webp", ".bmp")

_TRAILING_NUMBER = re.compile(r"(\d+)$")


def image_id_from_name(file_name: str) -> Optional[int]:
    """The number ``file_name`` ends with before its extension, or None when it ends with none."""
    match = _TRAILING_NUMBER.search(os.path.splitext(os.path.basename(file_name))[0])
    return int(match.group(1)) if match else None
