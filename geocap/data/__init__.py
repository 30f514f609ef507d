"""geocap.data: what captioning researchers already have, read; the project's own feature
store; the PyTorch dataset; and the synthetic-scenes generator (the embedded default).

Conventions shared by every module here (see ``items.py``): boxes are (x1, y1, x2, y2)
normalised to [0, 1] by the image width and height, in the order of the source file (never
re-sorted); features are float32 ``[N, D]`` in memory; image ids are ints.
"""
