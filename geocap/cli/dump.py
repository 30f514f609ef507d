"""``geocap dump``: the command line of :func:`geocap.dump.job.dump`.

Usage::

    geocap dump --checkpoint CKPT --data DIR --split SPLIT --out DUMP \\
        [--mode teacher-forced|generated] [--what encoder,decoder,cross] [--stats-only] \\
        [--no-hypothetical] [--features] [--compression lzf|gzip|none] [--writer process|inline] \\
        [--shard-images 256] [--batch-size 16] [--beam-size 3] [--max-len 20] [--limit N] [--clusters 8]
    geocap dump --hf MODEL_DIR --images DIR [--captions COCO_JSON] [--instances COCO_JSON] --out DUMP \
        [--on-error raise|skip] [--maps KINDS] [--encoder-top-k K] [...]

The second form records a Hugging Face captioner saved with ``save_pretrained`` (geocap.hf.dump):
its reference captions (with ``--captions``) or its own (``--mode generated``, the default without
captions), over a folder of JPEG/PNG images; ``--instances`` gives the nouns their referents.
Without ``--beam-size`` / ``--max-len`` its own caption follows the model's ``generation_config``;
``--on-error skip`` leaves a bad image out (listed in the manifest, counted in the summary);
``--maps`` (either form) keeps the maps of some kinds only, the others' entropies still stored;
``--encoder-top-k K`` keeps each encoder map row's K largest weights (float16, their columns, each
row's lost weight), which the readers expand back to dense maps.

Run the same command again after an interruption to resume. Under ``torchrun`` every rank
dumps its share of the shards (shard k: rank k % WORLD_SIZE) into one dump; each rank uses
``cuda:LOCAL_RANK`` when CUDA is available, and rank 0 prints the summary once all are done.
"""
from __future__ import annotations

import argparse

from geocap.cli import add_progress_option
from geocap.errors import UsageError

__all__ = ["add_parser", "run"]


def run(args: argparse.Namespace) -> int:
    """Handler of ``geocap dump``: runs the job (joining the torchrun process group when
    WORLD_SIZE > 1; with ``--stats-only`` feeding ``geocap.analysis.StatsCollector``), prints
    the summary, returns 0; geocap's errors for bad options or data."""
    from geocap import distributed
    from geocap.dump.job import DumpOptions, dump, summarize

    hf = args.hf is not None
    _check_sources(args, hf)
    mode = args.mode or ("generated" if hf and args.captions is None else "teacher-forced")
    options = DumpOptions(mode=mode, what=args.what, stats_only=args.stats_only,
                          hypothetical=False if args.no_hypothetical or hf else None, features=args.features,
                          compression=args.compression, shard_images=args.shard_images, batch_size=args.batch_size,
                          beam_size=args.beam_size, max_len=args.max_len, limit=args.limit, clusters=args.clusters,
                          features_file=args.features_file, captions=args.captions or "caps", writer=args.writer,
                          on_error=args.on_error, maps=args.maps, encoder_top_k=args.encoder_top_k)
    collector = None
    if args.stats_only:
        from geocap.analysis import StatsCollector as collector
    info = distributed.setup(distributed.resolve_device(args.device).type)
    try:
        if hf:
            from geocap.hf.dump import dump_hf
            result = dump_hf(args.hf, args.images, args.out, options, captions=args.captions, instances=args.instances,
                             device=args.device, rank=info.rank, world_size=info.world_size, progress=args.progress,
                             stats_collector=collector)
        else:
            result = dump(args.checkpoint, args.data, args.split, args.out, options, device=args.device,
                          rank=info.rank, world_size=info.world_size, progress=args.progress,
                          stats_collector=collector)
        distributed.barrier(info)
        if info.enabled:
            result = summarize(result)
        for line in result.lines():
            if info.is_main or not result.complete:
                print(line)
    finally:
        distributed.teardown(info)
    return 0


def _check_sources(args, hf: bool) -> None:
    """A geocap checkpoint's dump needs --checkpoint, --data and --split; a Hugging Face model's
    --hf and --images; never a mix."""
    if hf:
        extra = [f"--{n}" for n in ("checkpoint", "data", "split") if getattr(args, n) is not None]
        if extra or args.images is None:
            raise UsageError("geocap dump --hf MODEL_DIR needs --images DIR" + (f" and takes no {', '.join(extra)}"
                                                                                 if extra else ""))
        return
    missing = [f"--{n}" for n in ("checkpoint", "data", "split") if getattr(args, n) is None]
    if missing:
        raise UsageError(f"geocap dump needs {', '.join(missing)} (or --hf MODEL_DIR --images DIR for a Hugging Face "
                         f"captioner)")
    if args.images is not None or args.instances is not None:
        raise UsageError("--images and --instances are options of geocap dump --hf")


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap dump`` on an argparse subparsers object; returns its parser. The handler
    (``args.func(args)``) returns 0 or raises geocap's errors for bad options or data."""
    from geocap.dump.writer import COMPRESSIONS
    parser = subparsers.add_parser(
        "dump", help="record a checkpoint's attention over a split into HDF5 shards (resumable)",
        description="Teacher-force the reference captions (or the model's own captions) of every image of a split "
                    "through a checkpoint and store every layer's attention maps and entropies in HDF5 shards. "
                    "Rerun the same command to resume; run under torchrun to share the shards among ranks.")
    parser.add_argument("--checkpoint", metavar="CKPT", help="a geocap checkpoint (loaded safely)")
    parser.add_argument("--data", metavar="DIR",
                        help="folder holding the feature store, the captions directory and (synthetic data) "
                             "ground_truth.json")
    parser.add_argument("--split", help="split of the captions directory")
    parser.add_argument("--hf", metavar="MODEL_DIR",
                        help="instead of a checkpoint: a Hugging Face captioner saved with save_pretrained "
                             "(VisionEncoderDecoderModel, BlipForConditionalGeneration; safetensors weights)")
    parser.add_argument("--images", metavar="DIR", help="--hf: the folder of JPEG/PNG images")
    parser.add_argument("--instances", metavar="COCO_JSON",
                        help="--hf: COCO instance annotations (instances_*.json): nouns naming a category get the "
                             "patches its boxes cover as referents")
    parser.add_argument("--out", required=True, metavar="DUMP",
                        help="the dump directory (created; must be empty, absent or this dump, to resume it)")
    parser.add_argument("--mode", choices=("teacher-forced", "generated"), default=None,
                        help="teacher-force the reference captions (default; --hf without --captions: generated) "
                             "or the model's own (beam search)")
    parser.add_argument("--what", default="encoder,decoder,cross",
                        help="map kinds to record, comma-separated subset of encoder,decoder,cross (default all)")
    parser.add_argument("--stats-only", action="store_true",
                        help="compute the analysis statistics during the pass and store no maps")
    parser.add_argument("--no-hypothetical", action="store_true",
                        help="no hypothetical (noun-swapped) captions (default: on when referents are known)")
    parser.add_argument("--features", action="store_true", help="also store each object's features (float16)")
    parser.add_argument("--compression", choices=COMPRESSIONS, default="lzf",
                        help="compression of maps and entropies: lzf (default), gzip (shuffle + zlib level 1, by "
                             "a thread pool: ~20%% smaller, 2.4x slower to read) or none")
    parser.add_argument("--writer", choices=("process", "inline"), default="process",
                        help="run the shard writer (compression, HDF5) in a child process of each rank (default) "
                             "or inline in the model's process; the shards are identical")
    parser.add_argument("--shard-images", type=int, default=256, help="images per shard (default 256)")
    parser.add_argument("--batch-size", type=int, default=16, help="images per batch (default 16)")
    parser.add_argument("--beam-size", type=int, default=None,
                        help="generated mode: beams (1 = greedy; default 3, --hf: the model's generation_config)")
    parser.add_argument("--max-len", type=int, default=None,
                        help="generated mode: at most this many tokens (default 20, --hf: the model's "
                             "generation_config)")
    parser.add_argument("--maps", default=None, metavar="KINDS",
                        help="of the --what kinds, those whose maps are stored (default: all); the others keep only "
                             "their entropies (e.g. --maps decoder,cross: a patch encoder's N x N maps dropped, its "
                             "entropies kept)")
    parser.add_argument("--encoder-top-k", type=int, default=None, metavar="K",
                        help="store each encoder map row as its K largest weights (float16, uint16 columns, the "
                             "weight each row lost), read back as dense maps with the rest 0 (default: whole maps; "
                             "a ViT-base encoder's maps: 11 MiB per image)")
    parser.add_argument("--on-error", choices=("raise", "skip"), default="raise",
                        help="--hf: a bad image stops the dump naming it (raise, default), or is left out, listed with "
                             "its reason in manifest.json and counted in the summary (skip)")
    parser.add_argument("--limit", type=int, default=0, metavar="N", help="the first N images only (0: all)")
    parser.add_argument("--clusters", type=int, default=8,
                        help="k-means clusters of the features when the data has no ground truth (0: none)")
    parser.add_argument("--features-file", default="features.h5", help="feature store file inside --data")
    parser.add_argument("--captions", default=None,
                        help="captions directory inside --data (default caps); with --hf: a COCO captions file")
    parser.add_argument("--device", default="auto", help="auto (cuda:LOCAL_RANK when available), cpu, cuda, ...")
    add_progress_option(parser)
    parser.set_defaults(func=run)
    return parser
