"""geocap.analysis: the four attention analyses of N. Ilinykh, "On the Interplay between Language
and Vision in Transformers: How Much of a 'Multi-Modal Learning' Do We Observe?" (CLASP seminar,
University of Gothenburg, 2022; "the seed study" in geocap's docstrings) over records (entropy,
thematic clusters, proximity, grounding). Built on geocap.kernels and the record format
(geocap.data.attention_record) only, so they apply to any model's records.

Each analysis' verdict rests on a controlled measure with a 95 % interval over images (within-row
partial correlations given feature similarity for proximity and thematic clusters, the referent
effect for grounding; :mod:`.rows`, :mod:`.uncertainty`), the naive measure kept beside it.

Each analysis is a function over any iterable of Records returning a result with ``to_json()``,
``plot(path)`` and ``reading()``, built on a streaming, mergeable accumulator (``update``,
``update_image`` for one image's records at once, ``merge``, ``state``, ``from_state``,
``result``); :class:`StatsCollector` bundles the four (what ``geocap dump --stats-only`` stores
per shard) and :func:`run_analyses` writes analysis.json, the
figures and report.md (``geocap analyze``).
"""
from .collector import StatsCollector
from .entropy import EntropyAccumulator, EntropyResult, entropy
from .grounding import GroundingAccumulator, GroundingResult, grounding
from .proximity import ProximityAccumulator, ProximityResult, proximity
from .report import collect, run_analyses
from .thematic import ThematicAccumulator, ThematicResult, thematic

__all__ = ["EntropyAccumulator", "EntropyResult", "GroundingAccumulator", "GroundingResult", "ProximityAccumulator",
           "ProximityResult", "StatsCollector", "ThematicAccumulator", "ThematicResult", "collect", "entropy",
           "grounding", "proximity", "run_analyses", "thematic"]
