"""``geocap view``: time to write the static site per 1,000 images, and its size on disk.

Records: :func:`geocap.view.synthetic.synthetic_records`, of a real dump's size: N = 36 objects,
T = 16 tokens, L = 6 layers, H = 8 heads, float16 maps (one encoder map per image, shared by its
records), built in memory before timing. Variants: 1 or 5 captions per image with every map, and
5 captions with no maps (a stats-only dump: entropies alone). Each timed call writes the whole
site for ``IMAGES`` images (no image files) into a fresh folder, atomically, as ``geocap view``
does; the figures are scaled to 1,000 images. ``extra_info``: seconds per 1,000 images, MB on
disk per 1,000 images, the largest per-image data file, the number of files, and the process
CPU seconds per 1,000 images (steadier than wall time on a shared machine).

Run: ``python -m pytest bench/test_bench_viewer.py --benchmark-only -q``.
"""
from __future__ import annotations

import itertools
import shutil
import statistics
import time

import pytest

from geocap.view import build_site
from geocap.view.site import image_data_key
from geocap.view.synthetic import synthetic_records

IMAGES, N, T, L, H = 100, 36, 16, 6, 8
ROUNDS = 3
VARIANTS = {"maps_1cap": (1, True), "maps_5cap": (5, True), "nomaps_5cap": (5, False)}


def _records(captions: int, maps: bool) -> list:
    records = list(synthetic_records(range(IMAGES), objects=N, tokens=T, layers=L, heads=H, captions=captions))
    if not maps:
        for rec in records:
            rec.encoder_self = rec.decoder_self = rec.cross = None
    return records


@pytest.mark.parametrize("variant", list(VARIANTS))
def test_bench_viewer(benchmark, tmp_path, variant):
    captions, maps = VARIANTS[variant]
    records = _records(captions, maps)
    counter = itertools.count()

    cpu = []

    def run():
        out = tmp_path / f"site-{next(counter)}"
        start = time.process_time()
        build_site(records, out, progress=False)
        cpu.append(time.process_time() - start)
        shutil.rmtree(out)

    setup_out = tmp_path / "site-check"
    check = build_site(records, setup_out, progress=False)
    assert check.images == IMAGES and check.records == IMAGES * captions
    largest = max((setup_out / "data" / image_data_key(i)).stat().st_size for i in range(IMAGES))
    shutil.rmtree(setup_out)

    benchmark.group = f"viewer site N={N} T={T} L={L} H={H}, {IMAGES} images"
    benchmark.pedantic(run, rounds=ROUNDS, iterations=1)
    median = benchmark.stats.stats.median
    scale = 1000 / IMAGES
    benchmark.extra_info.update(
        variant=variant, baseline=variant == "nomaps_5cap", subject=variant == "maps_5cap",
        images=IMAGES, captions_per_image=captions, maps=maps,
        s_per_1000_images=round(median * scale, 2),
        cpu_s_per_1000_images=round(statistics.median(cpu) * scale, 2),
        mb_per_1000_images=round(check.bytes * scale / 1e6, 1),
        largest_image_file_kb=round(largest / 1e3, 1), files=check.files)
