"""Caption metrics with pycocoevalcap's scorers, called one by one, and COCO results files.

:func:`caption_metrics` tokenises references and candidates with
:func:`geocap.metrics.tokenize.tokenize_captions` (Stanford PTBTokenizer when Java is
present, else the Python fallback), then computes

* ``Bleu_1`` .. ``Bleu_4`` (``pycocoevalcap.bleu.Bleu(4)``), ``ROUGE_L`` (``Rouge``) and
  ``CIDEr`` (``Cider``, i.e. CIDEr-D with document frequencies from the evaluated images'
  references) -- always;
* ``METEOR`` (``Meteor``, a Java subprocess) only when Java is on the PATH; the subprocess
  runs under a timeout and any failure is reported as skipped, with the reason;
* ``SPICE`` (``Spice``, Java) only when Java is present *and* the Stanford CoreNLP 3.6.0
  jars are already in ``pycocoevalcap/spice/lib``; this module never triggers their ~385 MB
  download (``Spice()`` is only instantiated when they exist).

Metric values are pycocoevalcap's raw values (fractions in [0, 1] for BLEU/METEOR/ROUGE-L/
SPICE; CIDEr-D on its x10 scale), not percentages.  ``COCOEvalCap.evaluate`` is never used.
"""

from __future__ import annotations

import json
import os
import threading
from collections.abc import Hashable, Mapping, Sequence
from pathlib import Path

from .tokenize import java_available, tokenize_captions

__all__ = ["caption_metrics", "require_pycocoevalcap", "spice_models_present", "write_results", "METRIC_NAMES"]

#: All metric names :func:`caption_metrics` may report (computed or skipped).
METRIC_NAMES = ("Bleu_1", "Bleu_2", "Bleu_3", "Bleu_4", "METEOR", "ROUGE_L", "CIDEr", "SPICE")

_SPICE_JARS = ("stanford-corenlp-3.6.0.jar", "stanford-corenlp-3.6.0-models.jar")


def require_pycocoevalcap(what: str = "the caption metrics") -> None:
    """UsageError saying how to install pycocoevalcap when it is missing (it is the optional
    extra ``geocap[eval]``: commands that score captions call this before any work)."""
    import importlib.util

    from geocap.errors import UsageError
    if importlib.util.find_spec("pycocoevalcap") is None:
        raise UsageError(f"{what} need pycocoevalcap, which is not installed: pip install 'geocap[eval]' "
                         f"(or pip install pycocoevalcap)")


def spice_models_present() -> bool:
    """True when the Stanford CoreNLP jars SPICE needs are already installed (no download)."""
    try:
        import pycocoevalcap.spice as spice_pkg
    except ImportError:
        return False
    lib = Path(spice_pkg.__file__).resolve().parent / "lib"
    return all((lib / name).is_file() for name in _SPICE_JARS)


def _run_meteor(gts: dict, res: dict, timeout_s: float) -> float:
    """pycocoevalcap's Meteor in a worker thread, with a timeout and clean teardown.

    Meteor talks to ``java -jar meteor-1.5.jar`` over pipes while holding a lock that its
    ``__del__`` re-acquires; if the subprocess dies mid-way the lock stays held (``__del__``
    would then deadlock) and a hung subprocess would block forever.  Here the scorer runs in
    a daemon thread; on timeout the subprocess is killed (which ends any blocked read), and
    the lock is released before the object is dropped.
    """
    from pycocoevalcap.meteor.meteor import Meteor

    meteor = Meteor()
    box: dict = {}

    def work() -> None:
        try:
            box["score"] = meteor.compute_score(gts, res)[0]
        except BaseException as exc:  # noqa: BLE001 -- reported to the caller
            box["error"] = exc

    thread = threading.Thread(target=work, name="meteor", daemon=True)
    try:
        thread.start()
        thread.join(timeout_s)
        if thread.is_alive():
            meteor.meteor_p.kill()
            thread.join(10.0)
            raise TimeoutError(f"METEOR did not finish within {timeout_s:.0f} s")
        if "error" in box:
            raise RuntimeError(f"METEOR failed: {box['error']!r}") from box["error"]
        return float(box["score"])
    finally:
        proc = meteor.meteor_p
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            try:  # close here so that Meteor.__del__ has nothing left to fail on
                stream.close()
            except OSError:
                pass
        if meteor.lock.locked():
            meteor.lock.release()


def caption_metrics(gts: Mapping[Hashable, Sequence[str]], res: Mapping[Hashable, str],
                    *, tokenizer: str = "auto", meteor: bool = True, spice: bool = True,
                    meteor_timeout_s: float = 600.0) -> tuple[dict[str, float], dict[str, str]]:
    """COCO caption metrics of one candidate per image.

    Args:
        gts: image id -> list of raw reference captions (at least one each).
        res: image id -> raw candidate caption (a one-element list is accepted too); must
            have exactly the keys of ``gts``.
        tokenizer: backend for :func:`tokenize_captions` (``"auto"``, ``"java"``,
            ``"python"``).
        meteor / spice: set False to skip these Java metrics on purpose.
        meteor_timeout_s: wall-clock limit for the METEOR subprocess.

    Returns:
        ``(metrics, skipped)``: ``metrics`` maps each computed name of :data:`METRIC_NAMES`
        to its corpus-level value; ``skipped`` maps each metric not computed to the reason.
        When the Python fallback tokenizer ran instead of PTBTokenizer, ``skipped`` also
        holds the key ``"tokenizer"`` with that note (scores may then differ slightly from
        coco-caption's).
    """
    require_pycocoevalcap()
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if set(gts) != set(res):
        missing = set(gts) ^ set(res)
        raise ValueError(f"gts and res must have the same image ids (differ on {len(missing)})")
    if not gts:
        raise ValueError("no images to evaluate")
    ids = list(gts)
    for i in ids:
        if isinstance(gts[i], str) or len(gts[i]) == 0:
            raise ValueError(f"image {i!r}: gts must be a non-empty list of captions")
    cand = {i: [res[i]] if isinstance(res[i], str) else list(res[i]) for i in ids}
    for i in ids:
        if len(cand[i]) != 1:
            raise ValueError(f"image {i!r}: expected one candidate, got {len(cand[i])}")
    gts_tok, backend = tokenize_captions({i: list(gts[i]) for i in ids}, tokenizer)
    res_tok, backend_res = tokenize_captions(cand, backend)

    metrics: dict[str, float] = {}
    skipped: dict[str, str] = {}
    if backend != "java" or backend_res != "java":
        skipped["tokenizer"] = ("PTBTokenizer (Java) not used; captions tokenised by the Python "
                                "fallback, scores may differ slightly from coco-caption's")

    bleu, _ = Bleu(4).compute_score(gts_tok, res_tok, verbose=0)
    for k, v in enumerate(bleu, start=1):
        metrics[f"Bleu_{k}"] = float(v)

    if not meteor:
        skipped["METEOR"] = "disabled by the caller"
    elif not java_available():
        skipped["METEOR"] = "java not found on PATH"
    else:
        try:
            metrics["METEOR"] = _run_meteor(gts_tok, res_tok, meteor_timeout_s)
        except Exception as exc:  # noqa: BLE001 -- any failure becomes a skip reason
            skipped["METEOR"] = f"METEOR subprocess failed: {exc}"

    metrics["ROUGE_L"] = float(Rouge().compute_score(gts_tok, res_tok)[0])
    metrics["CIDEr"] = float(Cider().compute_score(gts_tok, res_tok)[0])

    if not spice:
        skipped["SPICE"] = "disabled by the caller"
    elif not java_available():
        skipped["SPICE"] = "java not found on PATH"
    elif not spice_models_present():
        skipped["SPICE"] = ("Stanford CoreNLP 3.6.0 jars not installed in pycocoevalcap/spice/lib "
                            "(not downloaded automatically; run pycocoevalcap.spice."
                            "get_stanford_models once to enable SPICE)")
    else:
        try:
            from pycocoevalcap.spice.spice import Spice

            metrics["SPICE"] = float(Spice().compute_score(gts_tok, res_tok)[0])
        except Exception as exc:  # noqa: BLE001
            skipped["SPICE"] = f"SPICE failed: {exc!r}"
    return metrics, skipped


def write_results(path: str | os.PathLike, res: Mapping[Hashable, str | Sequence[str]]) -> Path:
    """Write COCO-format caption results ``[{"image_id": id, "caption": str}, ...]`` atomically.

    ``res`` maps image id -> caption (a one-element list is accepted).  Image ids that are
    numpy integers are converted to ``int``.  Written atomically
    (:func:`geocap.data.atomic.write_text_atomic`: temporary file, fsync, rename), so readers
    never see a partial file.  Returns the path.
    """
    path = Path(path)
    records = []
    for image_id, cap in res.items():
        if not isinstance(cap, str):
            if len(cap) != 1:
                raise ValueError(f"image {image_id!r}: expected one caption, got {len(cap)}")
            cap = cap[0]
        if hasattr(image_id, "item"):  # numpy scalar
            image_id = image_id.item()
        records.append({"image_id": image_id, "caption": str(cap)})
    from geocap.data.atomic import write_text_atomic

    path.parent.mkdir(parents=True, exist_ok=True)
    write_text_atomic(path, json.dumps(records))
    return path
