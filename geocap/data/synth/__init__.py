"""Synthetic scenes: the embedded default dataset, written in the public formats the readers take,
so the real loading code runs on it.

``generate_synthetic(out_dir)`` (``geocap synth OUT``) writes four files, each atomically (a
temporary ``<name>.tmp-<pid>`` renamed over the final name once complete):

``captions_coco.json``
    COCO caption annotations: ``{"info", "licenses", "images": [{id, width, height,
    file_name}], "annotations": [{id, image_id, caption}]}``.
``dataset_coco.json``
    A Karpathy split file: ``{"images": [{filepath, filename, imgid, cocoid, split, sentids,
    sentences: [{tokens, raw, imgid, sentid}]}], "dataset": "coco"}``; sentid = the COCO
    annotation id; split by position: image index i % 10 == 8 -> val, 9 -> test, else train.
``features.h5``
    The feature store (``geocap.data.store.write_store``): float16 features ``[N, D]``,
    float32 boxes, image sizes, labels = category ids, ``label_names`` = the category names.
``ground_truth.json``
    What the generator knows: ``parameters`` (the feature model included), the ``clusters``
    and ``categories`` tables, the ``relations`` and their phrases, and per image its id, size,
    split, theme, ``objects`` (category and cluster id / name, ``box`` = the stored float32
    values, ``part_of`` = index of the whole or -1) and ``captions``: ``tokens``, ``refs`` (per
    token the index of the object it names, -1 for none; a plural noun points at its group's
    first object), ``mentions`` (each noun phrase's token span ``[start, end)``, category, count
    and *all* its objects) and ``relations`` (relation name, subject and object mention indices,
    the phrase's token span).

Conventions: image ids 1..images; caption ids ``5 (image_id - 1) + k`` for k = 1..5; boxes float32
(x1, y1, x2, y2) normalised to [0, 1] by the image width and height, y pointing down, in the
store's order (shuffled, so parts do not follow their wholes); object indices are positions in
that order. The modules: ``world`` (categories, clusters, parts), ``scenes`` (placement),
``captions`` (grammar and grounding; the relations are :mod:`geocap.data.relations`), ``features``
(the calibrated feature model), ``generate`` (the files and the command), ``render`` (the scenes
drawn as PNG images with COCO captions and instances files, for pixel captioners; ``geocap
synth-images``).

Default ``feature_dim`` 2048, the bottom-up detectors' size, is kept because it costs little here:
10,000 images take ~6 s and 330 MB (308 MB of float16 features) on two cores, 6000 images ~4 s
and ~200 MB, and a captioner's input projection from 2048 is a small share of its training cost.
``--feature-dim 512`` quarters the feature file (10,000 images: ~4 s, 113 MB).

Determinism: a seed gives byte-identical JSON files and identical feature arrays. Each random
stream (scenes, captions, prototypes, noise) is drawn in image order, so the first n images of
a larger run equal a run of n images.
"""
from .captions import (CAPTIONS_PER_IMAGE, NUMBERS, RELATION_PHRASES, Mention, RelationUse, SynthCaption,
                       sample_captions)
from .features import (DEFAULT_FEATURE_DIM, MIN_FEATURE_DIM, SIMILARITY, FeatureModel, category_means, feature_model,
                       iter_features, object_features, prototypes, relu_cosine, similarity_by_pair_type)
from .generate import (DEFAULT_IMAGES, FILES, SynthImage, SynthSummary, caption_set, coco_json,
                       generate_scenes, generate_synthetic, ground_truth_json, karpathy_json, split_of)
from ..relations import RELATIONS, group_relations, relation_matrix
from .render import CategoryStyle, category_style, render_images
from .scenes import Draws, Scene, sample_scene
from .world import (CATEGORIES, CATEGORY_IDS, CLUSTER_IDS, CLUSTER_OF, CLUSTERS, IMAGE_SIZES, MAX_OBJECTS,
                    MIN_OBJECTS, MIN_SIZE, PARTS, Category, Cluster, category_names)

__all__ = [
    "CAPTIONS_PER_IMAGE", "CATEGORIES", "CATEGORY_IDS", "CLUSTERS", "CLUSTER_IDS", "CLUSTER_OF", "Category",
    "CategoryStyle", "Cluster", "DEFAULT_FEATURE_DIM", "DEFAULT_IMAGES", "Draws", "FILES", "FeatureModel",
    "IMAGE_SIZES", "MAX_OBJECTS", "MIN_FEATURE_DIM", "MIN_OBJECTS", "MIN_SIZE", "Mention", "NUMBERS", "PARTS",
    "RELATIONS", "RELATION_PHRASES", "RelationUse", "SIMILARITY", "Scene", "SynthCaption", "SynthImage",
    "SynthSummary", "caption_set", "category_means",
    "category_names", "category_style", "coco_json", "feature_model", "generate_scenes", "generate_synthetic",
    "ground_truth_json", "group_relations", "iter_features", "karpathy_json", "object_features", "prototypes",
    "relation_matrix", "relu_cosine", "render_images", "sample_captions", "sample_scene", "similarity_by_pair_type",
    "split_of",
]
