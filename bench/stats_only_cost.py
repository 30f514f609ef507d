"""CPU seconds and bytes of ``geocap dump --stats-only`` against the full dump, on the synthetic scenes.

Why CPU seconds: this machine's cores are shared with other jobs, and wall time scatters by 2x
with their load; the CPU time a dump's processes spend (the model's process and its writer
process: ``getrusage`` user + sys of the process and of its waited-for children) moves much less.
Each dump runs in a fresh Python process (same imports, same caches for both variants), in
alternation, and only the ``dump()`` call is counted; the minimum over ``--reps`` repetitions is
reported.

Data: ``geocap synth`` scenes (3-12 objects, grounded captions, hypothetical captions on: about
10 records per image), ``--images`` train images, features D = 64, and a checkpoint of ORT's
attention shape (L = 6 layers, H = 8 heads, d_model 64) trained for ``--train-steps`` steps (60, as
``bench/test_bench_dump.py``'s synth set: attention peakier than at initialisation). Dumps: the
default writer (a child process), batches of 16, shards of 32 images; ``full`` stores every map
(lzf), ``stats`` is ``--stats-only`` with ``geocap.analysis.StatsCollector``.

Also printed: bytes per image of each dump, and what a stats-only shard holds, bytes by dataset
group (``stats/`` split by analysis and state entry), as HDF5 stores them (after compression).

Run: ``OMP_NUM_THREADS=1 python bench/stats_only_cost.py --images 128 --reps 3`` (``--work DIR`` keeps
the data and checkpoint between runs). bench/scale_dump.sh's setting (a 2-layer, 4-head model, reference
captions only, shards of 256): ``--layers 2 --heads 4 --no-hypothetical --shard-images 256``.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections import Counter

LAYERS, HEADS, D = 6, 8, 64
SETTINGS = dict(batch_size=16, shard_images=32, progress=False)


def _cpu() -> tuple[float, float]:
    """User + sys seconds of this process and of its waited-for children (the writer process)."""
    own, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


def prepare(work: str, images: int, steps: int, layers: int = LAYERS, heads: int = HEADS) -> tuple[str, str]:
    """The synthetic data and a checkpoint under ``work`` (reused when there)."""
    data, ckpt = os.path.join(work, "data"), os.path.join(work, "model.pt")
    if os.path.exists(ckpt):
        return data, ckpt
    import torch

    from geocap.checkpoint import save_checkpoint
    from geocap.cli import main as cli_main
    from geocap.data.synth import generate_synthetic
    from geocap.data.vocab import Vocabulary
    from geocap.model import ObjectRelationTransformer, ORTConfig
    from geocap.train import TrainConfig, train

    torch.set_num_threads(1)
    generate_synthetic(data, images=images * 10 // 8, seed=0, feature_dim=D, progress=False)   # 80 % train
    assert cli_main(["prepro", "captions", "--karpathy", os.path.join(data, "dataset_coco.json"), "--out",
                     os.path.join(data, "caps"), "--min-count", "1"]) == 0
    if steps:
        result = train(TrainConfig(data=data, out=os.path.join(work, "run"), layers=layers, d_model=64, heads=heads,
                                   d_ff=128, batch_size=3, steps=steps, optimizer="adamw", lr=3e-3, warmup=5,
                                   val_every=0, checkpoint_every=0, progress=False, log_every=1000))
        os.replace(os.path.join(result.out, "checkpoint-latest.pt"), ckpt)
    else:
        vocab = Vocabulary.load(os.path.join(data, "caps", "vocab.json"))
        torch.manual_seed(0)
        config = ORTConfig(vocab_size=len(vocab), feature_dim=D, layers=layers, d_model=64, heads=heads, d_ff=128,
                           max_len=40)
        save_checkpoint(ckpt, model=ObjectRelationTransformer(config), config=config, vocab=vocab, rng=False)
    return data, ckpt


def one(variant: str, data: str, ckpt: str, out: str, settings: str = "{}") -> dict:
    """One dump in this process: ``{"cpu_s", "model_cpu_s", "writer_cpu_s", "wall_s", "images", "records",
    "bytes"}`` (``cpu_s``: the model's process, ``model_cpu_s``, plus its writer process, ``writer_cpu_s``)."""
    import torch

    from geocap.dump.job import dump

    torch.set_num_threads(1)
    kw = dict(SETTINGS, **json.loads(settings))
    if variant == "stats":
        from geocap.analysis import StatsCollector
        kw.update(stats_only=True, stats_collector=StatsCollector)
    (own0, kids0), wall0 = _cpu(), time.perf_counter()
    r = dump(ckpt, data, "train", out, **kw)
    wall, (own, kids) = time.perf_counter() - wall0, _cpu()
    return {"cpu_s": own - own0 + kids - kids0, "model_cpu_s": own - own0, "writer_cpu_s": kids - kids0,
            "wall_s": wall, "images": r.images, "records": r.records, "bytes": r.bytes}


def shard_bytes(path: str) -> Counter:
    """Stored bytes of the dump's shards by dataset (``stats/`` entries by their state key)."""
    import h5py

    sizes: Counter = Counter()
    for name in sorted(os.listdir(path)):
        if name.endswith(".h5"):
            with h5py.File(os.path.join(path, name), "r") as h5:
                def visit(key, obj):
                    if isinstance(obj, h5py.Dataset):
                        label = f"stats:{obj.attrs['key']}" if key.startswith("stats/") else key
                        sizes[label] += obj.id.get_storage_size()
                h5.visititems(visit)
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=128, help="train images of the dumps")
    parser.add_argument("--reps", type=int, default=3, help="dumps of each variant (the minimum is reported)")
    parser.add_argument("--train-steps", type=int, default=60, help="training steps of the checkpoint (0: untrained)")
    parser.add_argument("--work", help="folder for the data and checkpoint (kept; default: a temporary one)")
    parser.add_argument("--baseline", help="also time the dumps of another geocap source tree (e.g. an earlier "
                        "commit's `git archive`, with its analysis/ and kernels/ copied into geocap/), put first on "
                        "PYTHONPATH, interleaved with this one's")
    parser.add_argument("--layers", type=int, default=LAYERS, help="the checkpoint's layers (the work folder's "
                        "checkpoint is reused whatever its size: use a new --work per size)")
    parser.add_argument("--heads", type=int, default=HEADS, help="the checkpoint's heads")
    parser.add_argument("--no-hypothetical", action="store_true", help="dump the reference captions only "
                        "(5 records per image), as bench/scale_dump.sh")
    parser.add_argument("--shard-images", type=int, default=SETTINGS["shard_images"], help="images per shard")
    parser.add_argument("--one", nargs=5, metavar=("VARIANT", "DATA", "CKPT", "OUT", "SETTINGS"),
                        help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(*args.one)))
        return
    work = args.work or tempfile.mkdtemp(prefix="stats-cost-")
    os.makedirs(work, exist_ok=True)
    data, ckpt = prepare(work, args.images, args.train_steps, args.layers, args.heads)
    settings = json.dumps({"shard_images": args.shard_images,
                           **({"hypothetical": False} if args.no_hypothetical else {})})
    runs: dict = {"full": [], "stats": []}
    if args.baseline:
        runs.update({"baseline full": [], "baseline stats": []})
    for rep in range(args.reps):
        for variant in runs:
            out = os.path.join(work, f"dump-{variant.replace(' ', '-')}-{rep}")
            shutil.rmtree(out, ignore_errors=True)          # a dump left there would be resumed (nothing to do)
            env = dict(os.environ)
            if variant.startswith("baseline"):
                env["PYTHONPATH"] = os.pathsep.join(filter(None, [args.baseline, env.get("PYTHONPATH")]))
            # cwd: not a source tree (``python -m`` puts the cwd first on sys.path, before PYTHONPATH, in the
            # dump's writer process too)
            done = subprocess.run([sys.executable, os.path.abspath(__file__), "--one", variant.split()[-1], data,
                                   ckpt, out, settings], check=True, capture_output=True, text=True, env=env, cwd=work)
            runs[variant].append(json.loads(done.stdout.strip().splitlines()[-1]))
            print(variant, rep, runs[variant][-1], flush=True)
    print(f"load average at the end: {os.getloadavg()}")
    for variant, got in runs.items():
        best = min(got, key=lambda r: r["cpu_s"])
        every = ", ".join(f"{r['cpu_s']:.2f}" for r in got)
        print(f"{variant}: CPU s min {best['cpu_s']:.2f} (all: {every}; that run's model process "
              f"{best['model_cpu_s']:.2f}, writer process {best['writer_cpu_s']:.2f}), "
              f"wall s min {min(r['wall_s'] for r in got):.2f}, {best['images']} images, {best['records']} records, "
              f"{best['bytes'] / best['images']:.0f} bytes per image")
    for variant in [v for v in runs if v.endswith("stats")]:
        sizes = shard_bytes(os.path.join(work, f"dump-{variant.replace(' ', '-')}-0"))
        images = runs[variant][0]["images"]
        groups: Counter = Counter()
        for key, size in sizes.items():
            groups[key.split(".")[0] if key.startswith("stats:") else key.split("/")[0]] += size
        print(f"{variant}-only dump, stored bytes per image by group:")
        for key, size in groups.most_common():
            print(f"  {key:32s} {size / images:10.1f}")
        print("largest datasets, bytes per image:")
        for key, size in sizes.most_common(8):
            print(f"  {key:50s} {size / images:10.1f}")


if __name__ == "__main__":
    main()
