"""Generating the dataset and writing its four files; the ``geocap synth`` command."""
from __future__ import annotations

import contextlib
import gc
import json
import os
import time
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np

from ..atomic import write_text_atomic
from ..items import Caption, CaptionSet
from .captions import CAPTIONS_PER_IMAGE, RELATION_PHRASES, SynthCaption, sample_captions
from .features import DEFAULT_FEATURE_DIM, check_feature_dim, feature_model, iter_features, similarity_by_pair_type
from ..relations import RELATIONS, relation_matrix, relation_thresholds
from .scenes import Draws, Scene, sample_scene
from .world import (CATEGORIES, CLUSTER_IDS, CLUSTER_OF, CLUSTERS, MARGIN, MAX_OBJECTS, MIN_OBJECTS, MIN_SIZE,
                    PARTS, THEME_P, category_names)
from geocap.errors import UsageError

DEFAULT_IMAGES = 6000
FILES = {"captions": "captions_coco.json", "karpathy": "dataset_coco.json",
         "features": "features.h5", "ground_truth": "ground_truth.json"}
SIMILARITY_SAMPLE = 1500                         # objects the summary measures similarities on
_SCENES, _CAPTIONS = 1, 2                        # random streams: seeds are (seed, stream)


@dataclass
class SynthImage:
    """One generated image: id, split, scene and captions (features come from ``iter_features``)."""
    image_id: int
    split: str
    scene: Scene
    captions: list

    @property
    def file_name(self) -> str:
        return f"synth_{self.image_id:012d}.jpg"


def split_of(index: int) -> str:
    """The split of the image at 0-based position ``index``: 80% train, 10% val, 10% test."""
    return {8: "val", 9: "test"}.get(index % 10, "train")


def _check_count(name: str, value, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise UsageError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise UsageError(f"{name} must be at least {low}, got {value}")


@contextlib.contextmanager
def _gc_paused():
    """Pause the cyclic garbage collector: building ~10^6 small acyclic objects otherwise
    triggers collections that rescan the growing heap (measured: 40% of the time)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


class _NoProgress:
    def update(self, n: int = 1):
        pass

    def close(self):
        pass


def _progress(enabled: bool, total: int, desc: str):
    if not enabled:
        return _NoProgress()
    from geocap.progress import progress_bar
    return progress_bar(total=total, unit="img", desc=desc)


def generate_scenes(images: int, seed: int = 0, *, progress: bool = False) -> list:
    """``images`` :class:`SynthImage` (ids 1..images, caption ids ``5 (id - 1) + 1..5``):
    scenes and captions, no features. The first n of a run equal a run of n."""
    _check_count("images", images, 1)
    _check_count("seed", seed, 0)
    with _gc_paused():
        scene_draws = Draws(np.random.default_rng([seed, _SCENES]))
        caption_draws = Draws(np.random.default_rng([seed, _CAPTIONS]))
        scenes = [sample_scene(scene_draws) for _ in range(images)]
        padded = np.zeros((images, MAX_OBJECTS, 4), dtype=np.float32)
        for i, scene in enumerate(scenes):
            padded[i, :len(scene.boxes)] = scene.boxes
        out, block = [], 1024                    # relation matrices for a block of images at once
        bar = _progress(progress, images, "captions")
        for lo in range(0, images, block):
            relations = relation_matrix(padded[lo:lo + block])
            for i in range(lo, min(lo + block, images)):
                n = len(scenes[i].boxes)
                captions = sample_captions(caption_draws, scenes[i], relations[i - lo, :, :n, :n],
                                           first_id=CAPTIONS_PER_IMAGE * i + 1)
                out.append(SynthImage(image_id=i + 1, split=split_of(i), scene=scenes[i], captions=captions))
            bar.update(min(block, images - lo))
        bar.close()
    return out


def caption_set(images: Iterable[SynthImage]) -> CaptionSet:
    """The captions and splits, as the Karpathy reader returns them from ``dataset_coco.json``."""
    out = CaptionSet()
    for im in images:
        out.splits[im.image_id] = im.split
        out.captions.extend(Caption(im.image_id, c.caption_id, c.raw, list(c.tokens)) for c in im.captions)
    return out


# ----------------------------------------------------------------------------- the files


def coco_json(images: Sequence[SynthImage]) -> dict:
    """COCO caption annotations."""
    return {
        "info": {"description": "geocap synthetic scenes", "version": "1"},
        "licenses": [],
        "images": [{"id": im.image_id, "width": im.scene.width, "height": im.scene.height, "file_name": im.file_name}
                   for im in images],
        "annotations": [{"id": c.caption_id, "image_id": im.image_id, "caption": c.raw}
                        for im in images for c in im.captions],
    }


def karpathy_json(images: Sequence[SynthImage]) -> dict:
    """A Karpathy split file (sentid = the COCO annotation id)."""
    return {"images": [{
        "filepath": "synth", "filename": im.file_name, "imgid": i, "cocoid": im.image_id, "split": im.split,
        "sentids": [c.caption_id for c in im.captions],
        "sentences": [{"tokens": c.tokens, "raw": c.raw, "imgid": i, "sentid": c.caption_id} for c in im.captions],
    } for i, im in enumerate(images)], "dataset": "coco"}


def _objects_json(scene: Scene) -> list:
    boxes = scene.boxes.astype(np.float64).ravel().tolist()      # the float32 values, exactly
    return [{"category_id": k, "category": CATEGORIES[k].name, "cluster_id": int(CLUSTER_OF[k]),
             "cluster": CATEGORIES[k].cluster, "part_of": p, "box": boxes[4 * i:4 * i + 4]}
            for i, (k, p) in enumerate(zip(scene.categories.tolist(), scene.part_of.tolist()))]


def _caption_json(c: SynthCaption) -> dict:
    return {"caption_id": c.caption_id, "tokens": c.tokens, "refs": c.refs,
            "mentions": [{"start": m.start, "end": m.end, "category_id": m.category, "count": m.count,
                          "objects": list(m.objects)} for m in c.mentions],
            "relations": [{"relation": r.relation, "subject": r.subject, "object": r.object,
                           "start": r.start, "end": r.end} for r in c.relations]}


def ground_truth_json(images: Sequence[SynthImage], parameters: dict) -> dict:
    """The ground-truth sidecar (layout in the package docstring)."""
    return {
        "format": "geocap-synth-ground-truth", "format_version": 1,
        "parameters": parameters,
        "clusters": [{"id": i, "name": c.name, "place": c.place} for i, c in enumerate(CLUSTERS)],
        "categories": [{"id": i, "name": c.name, "plural": c.plural, "cluster_id": CLUSTER_IDS[c.cluster],
                        "cluster": c.cluster, "names": [list(n) for n in c.names], "part_only": c.part_only,
                        "parts": sorted({p for p, _, _ in PARTS.get(c.name, ())})}
                       for i, c in enumerate(CATEGORIES)],
        "relations": {name: list(RELATION_PHRASES[name]) for name in RELATIONS},
        "images": [{"image_id": im.image_id, "width": im.scene.width, "height": im.scene.height, "split": im.split,
                    "theme_id": im.scene.theme, "theme": CLUSTERS[im.scene.theme].name,
                    "objects": _objects_json(im.scene), "captions": [_caption_json(c) for c in im.captions]}
                   for im in images],
    }


def _write_json_atomic(path: str, obj) -> None:
    """``obj`` as compact JSON at ``path``, through ``<path>.tmp-<pid>`` and a rename."""
    text = json.dumps(obj, separators=(",", ":"))      # one C-encoder pass: much faster than json.dump
    write_text_atomic(path, text)


@dataclass
class SynthSummary:
    """What ``generate_synthetic`` wrote: counts, the files (key of ``FILES`` -> path), their
    total size in bytes, the wall time, and the mean cosine similarities by pair type measured
    on the first ~1500 objects (see ``similarity_by_pair_type``)."""
    out_dir: str
    images: int
    objects: int
    captions: int
    feature_dim: int
    seed: int
    files: dict
    bytes: int
    seconds: float
    similarity: dict = field(default_factory=dict)

    def lines(self) -> list:
        sims = ", ".join(f"{k} {v:.3f}" for k, v in self.similarity.items())
        return [f"wrote {self.images} images, {self.objects} objects, {self.captions} captions "
                f"(D={self.feature_dim}, seed {self.seed}) to {self.out_dir} in {self.seconds:.1f} s, "
                f"{self.bytes / 2 ** 20:.1f} MiB: {', '.join(FILES.values())}",
                f"mean cosine similarity: {sims}"]


def generate_synthetic(out_dir, *, images: int = DEFAULT_IMAGES, seed: int = 0,
                       feature_dim: int = DEFAULT_FEATURE_DIM, progress: bool = True) -> SynthSummary:
    """Write the synthetic dataset's four files (see the package docstring) into ``out_dir``,
    created if missing; files there of the same names are replaced, each atomically.
    ValueError (before anything is written) for images < 1, seed < 0 or feature_dim < 8."""
    from ..store import write_store

    _check_count("images", images, 1)
    _check_count("seed", seed, 0)
    check_feature_dim(feature_dim)
    started = time.perf_counter()
    out_dir = os.fspath(out_dir)
    os.makedirs(out_dir, exist_ok=True)
    paths = {key: os.path.join(out_dir, name) for key, name in FILES.items()}
    data = generate_scenes(images, seed, progress=progress)
    parameters = {"seed": seed, "images": images, "feature_dim": feature_dim, "feature_dtype": "float16",
                  "captions_per_image": CAPTIONS_PER_IMAGE, "objects_per_image": [MIN_OBJECTS, MAX_OBJECTS],
                  "theme_probability": THEME_P, "min_box_size": MIN_SIZE, "box_margin": MARGIN,
                  "split_rule": "image index % 10: 8 -> val, 9 -> test, else train",
                  "relation_thresholds": relation_thresholds(),
                  "feature_model": feature_model().as_dict()}
    with _gc_paused():
        _write_json_atomic(paths["captions"], coco_json(data))
        _write_json_atomic(paths["karpathy"], karpathy_json(data))
        _write_json_atomic(paths["ground_truth"], ground_truth_json(data, parameters))

    sample = []                                  # the first records, to measure similarities on

    def records():
        kept = 0
        for record in iter_features(data, seed=seed, feature_dim=feature_dim):
            if kept < SIMILARITY_SAMPLE:
                sample.append(record)
                kept += len(record.labels)
            yield record

    write_store(paths["features"], records(), feature_dtype="float16", label_names=category_names(),
                n_images=images, progress=progress)
    similarity = similarity_by_pair_type(np.concatenate([r.features for r in sample])[:SIMILARITY_SAMPLE],
                                         np.concatenate([r.labels for r in sample])[:SIMILARITY_SAMPLE])
    return SynthSummary(out_dir=out_dir, images=images, objects=sum(len(im.scene.categories) for im in data),
                        captions=sum(len(im.captions) for im in data), feature_dim=feature_dim, seed=seed,
                        files=paths, bytes=sum(os.path.getsize(p) for p in paths.values()),
                        seconds=time.perf_counter() - started, similarity=similarity)
