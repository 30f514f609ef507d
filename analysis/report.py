"""Run the four analyses and write ``analysis.json``, one PNG per analysis, ``report.md`` and
``report.html`` (the same report rendered from the markdown by Python-Markdown, figures as ``<img>``
with relative paths, no network).

``run_analyses(source, out_dir)`` accepts a :class:`~.collector.StatsCollector` (already filled),
a dump (an object with ``iter_chunks(size)``; a stats-only dump, ``metadata["stats_only"]`` true,
is read through its merged ``stats()`` instead of its records), or any iterable of Records.
Every file is written atomically; ``analysis.json`` is written with ``allow_nan=False``, so an
undefined number can only appear as null next to its reason in the section's ``unavailable``.
"""
from __future__ import annotations

import html
import json
import os

import numpy as np

from geocap.data.atomic import write_text_atomic

from .accumulator import image_runs
from .collector import ANALYSES, StatsCollector, model_size
from .proximity import MEASURES, MIN_BIN_PAIRS

CHUNK = 64
FIGURES = {name: f"{name}.png" for name in ANALYSES}
TITLES = {
    "entropy": "Attention entropy (seed analysis III)",
    "thematic": "Thematic relatedness (seed analysis I)",
    "proximity": "Visual proximity and semantic similarity (seed analysis II)",
    "grounding": "Visual grounding and hypothetical captions (seed analysis IV)",
}
# what a model that knows nothing would score on each analysis' controlled measure (its null)
NULLS = {
    "thematic": "Null: attention that follows feature similarity alone scores 0 on the controlled measure (it scores "
                "above 1 on the affinity).",
    "proximity": "Null: attention that follows feature similarity alone, or 1/N, scores 0 on the controlled measure "
                 "(the pooled Spearman calls both 'proximity' where position and category are linked).",
    "grounding": "Null: attention that lands on some object, whichever the noun names, scores 0 on the referent "
                 "effect (it scores far above chance on accuracy).",
}
DEFINITIONS = {
    "entropy": "Mean entropy of each attention row divided by the log of its valid keys (1 = uniform), per layer "
               "and head, for encoder self-, decoder self- and cross-attention.",
    "thematic": "Controlled: does a query's attention favour objects of its cluster beyond what feature similarity "
                "explains (a partial correlation within each row, averaged per image; 95 % interval over images). "
                "Described: the affinity, attention a query object gives to other objects of its cluster over its "
                "attention to all other objects, divided by the share chance would give (1.0 = chance), layer x head.",
    "proximity": "Controlled: does a query's attention fall with box-centre distance beyond what feature similarity "
                 "explains (a partial correlation within each row, averaged per image; 95 % interval over images). "
                 "Described: encoder self-attention (head mean) against the normalised distance of the box centres "
                 "and the cosine similarity of the object features, binned means per layer and Spearman correlations "
                 "over the pooled pairs.",
    "grounding": "Controlled: the referent effect, how much more often a noun's most-attended object is in its own "
                 "referent than in a wrong one (another category present), per image, 95 % interval over images. "
                 "Described: share of grounded nouns whose referent is the most-attended object in cross-attention, "
                 "per layer, against chance (1/N); for hypothetical captions with swapped nouns, how often attention "
                 "at the step after the new word moves to the object it now names.",
}


def _is_stats_only(source) -> bool:
    metadata = getattr(source, "metadata", None) or {}
    return bool(metadata.get("stats_only")) and callable(getattr(source, "stats", None))


def _records(source, progress: bool):
    """The records of a dump (in chunks of ``CHUNK``; the dump shows its own progress bar, as it
    was opened) or of any other iterable (with a tqdm bar when ``progress`` and stderr is a terminal)."""
    if hasattr(source, "iter_chunks"):
        for chunk in source.iter_chunks(CHUNK):
            yield from chunk
        return
    from geocap.progress import progress_bar

    try:
        total = len(source)
    except TypeError:
        total = None
    with progress_bar(enabled=progress, total=total, unit="rec", desc="analyse") as bar:
        for record in source:
            yield record
            bar.update(1)


def collect(source, *, progress: bool = True, **options) -> StatsCollector:
    """A filled :class:`StatsCollector` from a collector, a dump or an iterable of Records;
    ``options`` go to ``StatsCollector`` (ignored for a collector or a stats-only dump, whose
    settings were fixed when the statistics were gathered)."""
    if isinstance(source, StatsCollector):
        return source
    if _is_stats_only(source):
        stats = source.stats(StatsCollector)
        if not isinstance(stats, StatsCollector):
            raise ValueError(f"the stats-only dump's stats() returned {type(stats).__name__}, not a StatsCollector")
        return stats
    collector = StatsCollector(**options)
    for records in image_runs(_records(source, progress)):
        collector.update_image(records)
    return collector


def _size_sentence(size: dict) -> str:
    parts = [f"{part} {lh[0]} layers x {lh[1]} heads" for part, lh in size.items() if lh is not None]
    if not parts:
        return "Model size unknown (the records hold no attention maps or entropies)."
    return f"Model: {', '.join(parts)} (from the shapes of the recorded attention)."


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return lines + ["| " + " | ".join(row) + " |" for row in rows] + [""]


def _proximity_tables(result) -> list[str]:
    """Per measure: each bin's range, its pairs and the mean weight per layer (bins with fewer than
    MIN_BIN_PAIRS pairs show no mean)."""
    lines = []
    for measure in MEASURES:
        curve = result.curves.get(measure)
        if curve is None:
            continue
        edges, counts = result.edges(measure), result.counts[measure]
        rows = []
        for b in range(result.bins):
            means = [f"{v:.4f}" if counts[b] >= MIN_BIN_PAIRS and np.isfinite(v) else "-" for v in curve[:, b]]
            rows.append([f"{edges[b]:.2f} to {edges[b + 1]:.2f}", str(int(counts[b]))] + means)
        lines += [f"Mean attention weight by {measure} ({result.images} images; '-': fewer than {MIN_BIN_PAIRS} "
                  f"pairs):", ""]
        lines += _table([measure, "pairs"] + [f"layer {l + 1}" for l in range(curve.shape[0])], rows)
    return lines


def compact_maps(source) -> dict | None:
    """``{"encoder_top_k": k, "max_missing": w}`` when ``source`` is a dump whose encoder maps were
    stored as each row's top k weights (``geocap dump --encoder-top-k``; ``w`` the most weight a
    row lost), else None. The measures read from those maps are then approximate."""
    top_k = getattr(source, "encoder_top_k", None)
    k = top_k() if callable(top_k) else None
    if k is None:
        return None
    return {"encoder_top_k": int(k), "max_missing": float(source.encoder_missing())}


def _compact_sentence(compact: dict | None) -> list[str]:
    if compact is None:
        return []
    return [f"The encoder maps were stored as each row's {compact['encoder_top_k']} largest weights (a row lost at "
            f"most {compact['max_missing']:.3g} of its weight): measures read from encoder maps (thematic "
            f"relatedness, proximity) are approximate; encoder entropies are those of the whole maps.", ""]


def _report_markdown(results: dict, records: int, size: dict, viewer_href: str | None,
                     compact: dict | None = None) -> str:
    lines = ["# Attention analyses", "",
             f"{records} records. {_size_sentence(size)} Numbers: `analysis.json`. Definitions: the docstrings "
             "of `geocap.analysis`. Verdicts rest on controlled measures, each against the score of attention that "
             "knows nothing of what is asked (its null, stated per analysis), with 95 % intervals over images: a "
             "verdict is 'inconclusive' where the interval holds 0. The naive measures are kept as description. "
             "Standard errors are over images; a change across layers is called a rise or a fall only beyond two "
             "standard errors.", ""] + _compact_sentence(compact)
    if viewer_href:
        lines += [f"Browse the attention maps themselves in the [attention viewer]({viewer_href}).", ""]
    for name in ANALYSES:
        result = results[name]
        lines += [f"## {TITLES[name]}", "", DEFINITIONS[name]] + ([NULLS[name]] if name in NULLS else []) + \
                 ["", f"![{name}]({FIGURES[name]})", "", result.reading(), ""]
        if name == "proximity":
            lines += _proximity_tables(result)
        if result.unavailable:
            lines += ["Not computed:", ""]
            lines += [f"- `{key}`: {reason}" for key, reason in sorted(result.unavailable.items())]
            lines.append("")
    return "\n".join(lines)


def _report_html(markdown_text: str, title: str = "Attention analyses") -> str:
    """``report.md`` (or any report's markdown) rendered to one self-contained HTML page titled
    ``title`` (tables, images by relative path)."""
    import markdown

    body = markdown.markdown(markdown_text, extensions=["tables"], output_format="html")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n"
            "<style>body{font-family:sans-serif;max-width:1100px;margin:2em auto;padding:0 1em;line-height:1.45}"
            "img{max-width:100%}table{border-collapse:collapse;margin:0.5em 0}"
            "th,td{border:1px solid #ccc;padding:2px 8px;text-align:right}</style>\n</head>\n<body>\n"
            f"{body}\n</body>\n</html>\n")


def run_analyses(records_or_dump, out_dir, *, viewer_href: str | None = None, progress: bool = True,
                 **options) -> dict:
    """Run all four analyses over ``records_or_dump`` and write ``out_dir/analysis.json``, one PNG
    per analysis (``entropy.png``, ``thematic.png``, ``proximity.png``, ``grounding.png``),
    ``out_dir/report.md`` (the model's size, figures, a short reading of each, the proximity bins,
    what could not be computed and why, a note when the encoder maps were stored compact
    (``analysis.json["compact_maps"]``, :func:`compact_maps`), and a link to the attention viewer
    when ``viewer_href`` is given) and ``out_dir/report.html`` (the same, rendered). ``options`` go to
    :class:`StatsCollector`. Returns the analysis.json dict."""
    collector = collect(records_or_dump, progress=progress, **options)
    results = collector.results()
    data = {name: result.to_json() for name, result in results.items()}
    data["records"] = collector.records
    size = model_size(results)
    data["model"] = size
    compact = None if _is_stats_only(records_or_dump) else compact_maps(records_or_dump)
    if compact is not None:
        data["compact_maps"] = compact
    text = json.dumps(data, indent=1, allow_nan=False)   # fails loudly rather than write a NaN
    os.makedirs(out_dir, exist_ok=True)
    for name, result in results.items():
        result.plot(os.path.join(out_dir, FIGURES[name]))
    write_text_atomic(os.path.join(out_dir, "analysis.json"), text + "\n")
    report = _report_markdown(results, collector.records, size, viewer_href, compact)
    write_text_atomic(os.path.join(out_dir, "report.md"), report)
    write_text_atomic(os.path.join(out_dir, "report.html"), _report_html(report))
    return data
