"""Memory and time of reading a dump's synthetic ground truth at two scales (not a timed test).

``geocap dump`` used to ``json.load`` the whole ``ground_truth.json`` and keep the split's
images as dicts: memory grew with the dataset (2.3 GB at 100k images). It now reads it through
:class:`geocap.data.synth.truth_file.TruthFile` (offsets only; one image parsed at a time).

This script writes ground-truth files of 10k and 100k images (the images of a small ``geocap
synth`` set repeated under new ids: the same per-image size as the real thing, without running
the generator at scale), then, in a fresh process per case, builds the dump's
:class:`~geocap.dump.ground_truth.GroundTruth` for every image and reads each image's objects
and captions, as a dump does. It prints the peak RSS (``ru_maxrss``) and the wall time, and the
same for ``json.load`` of the file (what the old reader started with).

Run: ``python bench/ground_truth_memory.py [WORK_DIR]`` (~1 GB of disk at 100k images).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, resource, sys, time
path, how = sys.argv[1], sys.argv[2]
t0 = time.perf_counter()
if how == "json.load":
    with open(path, encoding="utf-8") as fh:
        data = json.load(fh)
    n = len(data["images"])
else:
    from geocap.data.synth.truth_file import TruthFile
    from geocap.dump.ground_truth import GroundTruth
    ids = TruthFile(path).image_ids.tolist()
    truth = GroundTruth(path, ids)
    for i in ids:
        truth.clusters(i)
        truth.caption(i, truth._file.image(i)["captions"][0]["caption_id"])
    n = len(ids)
print(f"{n} {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} {time.perf_counter() - t0:.1f}")
"""


def write_scaled(template: dict, n: int, path: str) -> int:
    """``template``'s images repeated under ids 1..n into ``path`` (compact JSON); its size."""
    images = template["images"]
    head = json.dumps(dict(template, images=[]), separators=(",", ":"))[:-3]    # drop "[]}"
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(head + "[")
        for i in range(n):
            image = dict(images[i % len(images)], image_id=i + 1)
            fh.write(("," if i else "") + json.dumps(image, separators=(",", ":")))
        fh.write("]}")
    return os.path.getsize(path)


def main() -> int:
    from geocap.data.synth import generate_synthetic

    work = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="geocap-gt-")
    os.makedirs(work, exist_ok=True)
    generate_synthetic(os.path.join(work, "small"), images=50, seed=0, feature_dim=8, progress=False)
    with open(os.path.join(work, "small", "ground_truth.json"), encoding="utf-8") as fh:
        template = json.load(fh)
    print("images  file MB  reader        peak RSS MB  seconds")
    for n in (10_000, 100_000):
        path = os.path.join(work, f"gt-{n}.json")
        size = write_scaled(template, n, path)
        for how in ("GroundTruth", "json.load"):
            out = subprocess.run([sys.executable, "-c", CHILD, path, how], capture_output=True, text=True,
                                 check=True).stdout.split()
            print(f"{n:>6}  {size / 1e6:7.0f}  {how:<12}  {out[1]:>11}  {out[2]:>7}")
        os.remove(path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
