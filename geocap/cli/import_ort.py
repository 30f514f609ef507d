"""``geocap import-ort MODEL_PTH INFOS_PKL --out CKPT``: an original ORT checkpoint as a geocap
checkpoint (:mod:`geocap.ort_import`)."""
from __future__ import annotations

import argparse


def run(args) -> int:
    """Handler of ``geocap import-ort``: converts, prints what was imported (and what was ignored)."""
    from geocap.ort_import import import_ort, read_ort_infos

    skip = None if args.legacy_extra_skip == "auto" else args.legacy_extra_skip == "1"
    captioner = import_ort(args.model_pth, args.infos_pkl, args.out, max_len=args.max_len, legacy_extra_skip=skip)
    c = captioner.config
    print(f"imported {args.model_pth} -> {args.out}: {c.layers} layers, d_model {c.d_model}, {c.heads} heads, "
          f"d_ff {c.d_ff}, features {c.feature_dim}, {len(captioner.vocab)} ids (0 = start/end/padding)"
          f"{', legacy extra skip' if c.legacy_extra_skip else ''}")
    infos = read_ort_infos(args.infos_pkl)
    if infos.ignored_globals:
        print(f"ignored (never loaded, not needed): {', '.join(infos.ignored_globals)} in {args.infos_pkl}")
    opt = infos.opt
    if opt.get("norm_att_feat"):
        print("note: ORT trained this model on L2-normalised region features (opt.norm_att_feat): "
              "feed features normalised the same way")
    return 0


def add_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``geocap import-ort MODEL_PTH INFOS_PKL --out CKPT`` on an argparse subparsers
    object; returns its parser. The handler returns 0 or raises
    geocap's errors (:mod:`geocap.errors`)."""
    parser = subparsers.add_parser(
        "import-ort", help="convert an original ORT checkpoint (model.pth + infos.pkl) into a geocap checkpoint",
        description="Convert a checkpoint of the original Object Relation Transformer code (its model.pth state "
                    "dict and infos_<id>.pkl) into a geocap checkpoint with ORT's vocabulary and token ids. "
                    "Neither file can run code: the state dict is loaded with weights_only=True, the pickle with "
                    "an unpickler that admits argparse.Namespace and plain containers only.")
    parser.add_argument("model_pth", metavar="MODEL_PTH", help="ORT's model.pth (a state dict)")
    parser.add_argument("infos_pkl", metavar="INFOS_PKL", help="ORT's infos_<id>.pkl (opt and vocab)")
    parser.add_argument("--out", required=True, metavar="CKPT", help="the geocap checkpoint to write")
    parser.add_argument("--max-len", type=int, default=5000,
                        help="positions of the sinusoidal table, the longest caption decodable (default 5000, ORT's)")
    parser.add_argument("--legacy-extra-skip", choices=("auto", "0", "1"), default="auto",
                        help="ORT's extra skip in the box attention: auto (default) takes opt.legacy_extra_skip "
                             "(off when absent, as ORT's code); 1 for checkpoints of ORT code older than that option, "
                             "which always applied it")
    parser.set_defaults(func=run)
    return parser
