"""Peak memory of ``geocap view``'s site builder at two scales (not a timed test).

Builds the viewer for synthetic records (:func:`geocap.view.synthetic.synthetic_records`, small
maps: 4 objects, 1 layer, 1 head; 4 captions of 16 tokens per image, so that the per-image memory of
the builder itself shows, not the maps') of N and 4N images, each in a fresh process, and prints
the peak RSS (``ru_maxrss``; it also holds what numpy and malloc keep, hence noisy), the peak of
the Python heap (``tracemalloc``: what the builder holds) and the wall time (slowed by
tracemalloc); with ``--old REV`` the same for ``geocap/view/site.py`` as of git revision REV
(e.g. the commit before the spooling builder). The builder holds ~120 bytes per image, plus,
while it writes the word index, the (word, image) pairs of a group of word buckets: at most
``WORD_PAIRS_IN_MEMORY`` of them, or one bucket's when a bucket holds more (a word of every
caption gives a pair per image: that list is written whole, so it still grows with the images).

Run: ``python bench/view_memory.py [--images N] [--old REV]`` (N = 5000 by default; the sites
are written under a temporary folder and removed).
"""
from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile

CHILD = r"""
import importlib.util, resource, sys, time, tracemalloc
images, out, site_file = int(sys.argv[1]), sys.argv[2], sys.argv[3]
spec = importlib.util.spec_from_file_location("site_under_test", site_file)
site = sys.modules["site_under_test"] = importlib.util.module_from_spec(spec)
spec.loader.exec_module(site)
import pathlib, geocap.view
site.STATIC_DIR = pathlib.Path(geocap.view.__file__).parent / "static"   # an old copy lives elsewhere
from geocap.view.synthetic import synthetic_records
tracemalloc.start()
t0 = time.perf_counter()
records = synthetic_records(range(1, images + 1), objects=4, tokens=16, layers=1, heads=1, captions=4)
site.build_site(records, out, progress=False, grouped=True)
seconds = time.perf_counter() - t0
rss, heap = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, tracemalloc.get_traced_memory()[1] / 2**20
print(f"{rss:.0f} {heap:.1f} {seconds:.1f}")
"""


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=5000)
    parser.add_argument("--old", default=None, help="also measure geocap/view/site.py of this git revision")
    args = parser.parse_args()
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    work = tempfile.mkdtemp(prefix="geocap-view-mem-")
    sites = {"now": os.path.join(root, "geocap", "view", "site.py")}
    if args.old:
        old = os.path.join(work, "old_site.py")
        with open(old, "w", encoding="utf-8") as fh:
            fh.write(subprocess.run(["git", "-C", root, "show", f"{args.old}:geocap/view/site.py"], check=True,
                                    capture_output=True, text=True).stdout)
        sites[f"at {args.old[:10]}"] = old
    try:
        print("images  site.py       peak RSS MB  peak Python heap MB  seconds (under tracemalloc)")
        for n in (args.images, 4 * args.images):
            for name, path in sites.items():
                out = os.path.join(work, f"site-{n}")
                done = subprocess.run([sys.executable, "-c", CHILD, str(n), out, path], capture_output=True,
                                      text=True, check=True).stdout.split()
                print(f"{n:>6}  {name:<12}  {done[0]:>11}  {done[1]:>19}  {done[2]:>7}")
                shutil.rmtree(out, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
