"""Image tokens of a patch encoder as the objects of a record: their boxes and which are patches.

A ViT-like encoder's tokens are ``prefix`` special tokens (a class token, register tokens: they
stand for no region) followed by ``rows x cols`` patches in row-major order (row 0 at the top).
Patch k is grid cell (r, c) = (k // cols, k % cols) with the box
``(c / cols, r / rows, (c + 1) / cols, (r + 1) / rows)``, normalised (x1, y1, x2, y2) over the
area the patches cover (pixels past the last whole patch, which the encoder never sees, are
outside it); the patch boxes tile [0, 1]^2 exactly. A special token keeps its place in the
token order (the maps stay the model's own, rows summing to 1) with the whole image
``(0, 0, 1, 1)`` as its box, and is flagged: ``special`` lists its index, so a consumer can
tell it from the patches instead of mixing it in.

``window``: where the grid lies in the image, normalised ``(x1, y1, x2, y2)``; ``(0, 0, 1, 1)``
(the default) when the model saw the whole image, else the part its processor kept (a centre
crop, :mod:`geocap.hf.crop`): the cells then tile the window, in the original image's coordinates.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class PatchGrid:
    """``prefix`` special tokens then a ``rows x cols`` grid of patches."""

    rows: int
    cols: int
    prefix: int = 1
    window: tuple = (0.0, 0.0, 1.0, 1.0)

    @property
    def num_tokens(self) -> int:
        return self.prefix + self.rows * self.cols

    @property
    def special(self) -> list:
        """Indices of the special (class / register) tokens: ``[0, prefix)``."""
        return list(range(self.prefix))

    def boxes(self) -> np.ndarray:
        """``[prefix + rows * cols, 4]`` float32: ``(0, 0, 1, 1)`` per special token, then each
        patch's grid cell (of the window), normalised (x1, y1, x2, y2)."""
        wx1, wy1, wx2, wy2 = (float(v) for v in self.window)
        xs = wx1 + (wx2 - wx1) * np.arange(self.cols + 1, dtype=np.float64) / self.cols
        ys = wy1 + (wy2 - wy1) * np.arange(self.rows + 1, dtype=np.float64) / self.rows
        r, c = np.divmod(np.arange(self.rows * self.cols), self.cols)
        cells = np.stack([xs[c], ys[r], xs[c + 1], ys[r + 1]], axis=1)
        whole = np.tile([0.0, 0.0, 1.0, 1.0], (self.prefix, 1))
        return np.concatenate([whole, cells]).astype(np.float32)
