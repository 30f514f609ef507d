"""The synthetic world: 6 thematic clusters of 25 object categories, the parts of the wholes, the
image sizes, and the scene-level constants.

Category ids index ``CATEGORIES`` (and the feature store's ``label_names``); cluster ids index
``CLUSTERS``. A category's ``width`` is a range of box widths as a fraction of the image width,
its ``aspect`` the box height / width in pixels, its ``zone`` where it stands when placed freely
(``ground``: bottom edge in the lower half; ``middle``; ``high``: top edge in the upper 30%),
``supports`` the categories it may rest on, ``part_only`` whether it only appears as a part.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

MIN_OBJECTS, MAX_OBJECTS = 3, 12
MIN_SIZE = 0.02            # smallest box width / height (normalised): >= 7 px on 360..640 px sides
MARGIN = 0.005             # boxes keep this far from the image border
MAX_HEIGHT = 0.9           # a taller box is scaled down (keeping its aspect)
THEME_P = 0.8              # an object is from the scene's theme with this probability
ON_P = 0.7                 # an object that can rest on something present is put on it
BESIDE_P = 0.35            # a ground object is put beside another ground object
PART_JITTER = 0.02         # part places inside their whole move by up to this fraction


@dataclass(frozen=True)
class Cluster:
    name: str
    place: str                          # the phrase for "where": "in a kitchen"


@dataclass(frozen=True)
class Category:
    name: str
    plural: str
    cluster: str
    width: tuple                        # (lo, hi) fraction of the image width
    aspect: float                       # height / width in pixels
    zone: str                           # "ground", "middle" or "high"
    supports: tuple = ()                # names of categories it may rest on
    synonyms: tuple = ()                # extra (singular, plural) names
    part_only: bool = False

    @property
    def names(self) -> tuple:
        """Every (singular, plural) name, the main one first."""
        return ((self.name, self.plural),) + self.synonyms


CLUSTERS = (
    Cluster("kitchen", "in a kitchen"),
    Cluster("street", "on a street"),
    Cluster("animals", "in a field"),
    Cluster("living room", "in a living room"),
    Cluster("beach", "on a beach"),
    Cluster("office", "in an office"),
)

CATEGORIES = (
    Category("refrigerator", "refrigerators", "kitchen", (0.15, 0.30), 2.0, "ground",
             synonyms=(("fridge", "fridges"),)),
    Category("table", "tables", "kitchen", (0.30, 0.50), 0.6, "ground"),
    Category("bowl", "bowls", "kitchen", (0.06, 0.14), 0.5, "middle", ("table",)),
    Category("cup", "cups", "kitchen", (0.04, 0.08), 1.1, "middle", ("table", "desk"), (("mug", "mugs"),)),
    Category("car", "cars", "street", (0.20, 0.40), 0.5, "ground", synonyms=(("automobile", "automobiles"),)),
    Category("bus", "buses", "street", (0.35, 0.60), 0.6, "ground"),
    Category("wheel", "wheels", "street", (0.04, 0.08), 1.0, "ground", part_only=True),
    Category("window", "windows", "street", (0.05, 0.10), 0.8, "middle", part_only=True),
    Category("traffic light", "traffic lights", "street", (0.04, 0.07), 2.5, "high"),
    Category("dog", "dogs", "animals", (0.12, 0.25), 0.8, "ground", ("couch",), (("puppy", "puppies"),)),
    Category("cat", "cats", "animals", (0.10, 0.20), 0.9, "ground", ("couch", "table", "desk", "car"),
             (("kitten", "kittens"),)),
    Category("horse", "horses", "animals", (0.20, 0.35), 1.0, "ground"),
    Category("bird", "birds", "animals", (0.04, 0.08), 0.8, "high", ("car", "bus", "boat", "horse")),
    Category("couch", "couches", "living room", (0.35, 0.60), 0.5, "ground", synonyms=(("sofa", "sofas"),)),
    Category("television", "televisions", "living room", (0.20, 0.30), 0.65, "middle", ("table", "desk"),
             (("tv", "tvs"),)),
    Category("lamp", "lamps", "living room", (0.06, 0.12), 1.8, "ground", ("table", "desk")),
    Category("pillow", "pillows", "living room", (0.08, 0.14), 0.6, "middle", ("couch",),
             (("cushion", "cushions"),)),
    Category("umbrella", "umbrellas", "beach", (0.15, 0.30), 0.7, "high", synonyms=(("parasol", "parasols"),)),
    Category("surfboard", "surfboards", "beach", (0.06, 0.10), 3.0, "ground"),
    Category("boat", "boats", "beach", (0.25, 0.45), 0.5, "ground"),
    Category("sail", "sails", "beach", (0.08, 0.15), 1.5, "high", part_only=True),
    Category("laptop", "laptops", "office", (0.18, 0.28), 0.7, "middle", ("desk", "table"),
             (("notebook", "notebooks"),)),
    Category("screen", "screens", "office", (0.15, 0.25), 0.7, "middle", ("desk",), (("monitor", "monitors"),)),
    Category("keyboard", "keyboards", "office", (0.15, 0.25), 0.3, "middle", ("desk",)),
    Category("desk", "desks", "office", (0.35, 0.60), 0.6, "ground"),
)

# The parts a whole shows: (part, probability, (fx1, fy1, fx2, fy2) as fractions of the whole's
# box). Fractions stay >= 0.02 from the whole's edges (the jitter), and every part covers at most
# half the whole's area, so a part is always "inside" its whole.
PARTS = {
    "car": (("wheel", 0.9, (0.10, 0.62, 0.30, 0.98)), ("wheel", 0.9, (0.70, 0.62, 0.90, 0.98)),
            ("window", 0.7, (0.30, 0.10, 0.70, 0.45))),
    "bus": (("wheel", 0.9, (0.08, 0.72, 0.22, 0.98)), ("wheel", 0.9, (0.76, 0.72, 0.90, 0.98)),
            ("window", 0.7, (0.06, 0.15, 0.30, 0.45)), ("window", 0.7, (0.38, 0.15, 0.62, 0.45)),
            ("window", 0.7, (0.70, 0.15, 0.94, 0.45))),
    "laptop": (("screen", 0.95, (0.10, 0.05, 0.90, 0.55)), ("keyboard", 0.8, (0.05, 0.65, 0.95, 0.95))),
    "boat": (("sail", 0.6, (0.30, 0.02, 0.65, 0.65)),),
}

# (width, height) in pixels, and how often
IMAGE_SIZES = ((640, 480), (480, 640), (640, 427), (427, 640), (500, 375), (375, 500), (640, 360))
IMAGE_SIZE_WEIGHTS = (0.35, 0.15, 0.20, 0.10, 0.10, 0.05, 0.05)

CATEGORY_IDS = {c.name: i for i, c in enumerate(CATEGORIES)}
CLUSTER_IDS = {c.name: i for i, c in enumerate(CLUSTERS)}
CLUSTER_OF = np.array([CLUSTER_IDS[c.cluster] for c in CATEGORIES], dtype=np.int64)   # [n_categories]
THEME_CATEGORIES = tuple(tuple(i for i, c in enumerate(CATEGORIES) if c.cluster == k.name and not c.part_only)
                         for k in CLUSTERS)                  # per cluster, the ids drawn on their own
SUPPORT_IDS = tuple(frozenset(CATEGORY_IDS[s] for s in c.supports) for c in CATEGORIES)
PART_SLOTS = {CATEGORY_IDS[w]: tuple((CATEGORY_IDS[p], prob, frac) for p, prob, frac in slots)
              for w, slots in PARTS.items()}


def category_names() -> list:
    """The category names, indexed by category id (the store's ``label_names``)."""
    return [c.name for c in CATEGORIES]
