"""The study runner (``geocap study``): train, evaluate, dump and analyse every (variant, seed)
of a :class:`~geocap.study.settings.StudySettings`, then aggregate them into ``study.json``,
``study.md`` and its figures. Every step is the existing command's Python entry point
(:func:`geocap.data.synth.generate_synthetic`, ``geocap prepro captions``,
:func:`geocap.train.train`, :func:`geocap.evaluate.evaluate`, :func:`geocap.dump.dump`,
:func:`geocap.analysis.run_analyses`); nothing here trains, scores or analyses on its own.

Layout of a study folder ``DIR``::

    DIR/settings.json             the StudySettings (written first; a rerun with others is refused)
    DIR/study.lock                held (flock) while a study runs in DIR
    DIR/data/                     one synthetic dataset: features.h5, ground_truth.json, caps/, ...
    DIR/data/done.json            SHA-256 of each data file (written last)
    DIR/models/<variant>-seed<k>/
        run/                      geocap train output (checkpoint-latest.pt: the final model, evaluated;
                                  metrics.jsonl with the validation loss curve, ...)
        eval/                     geocap evaluate of the final model on the test split (metrics_test.json,
                                  captions_test.json)
        dump/                     geocap dump of the test split (teacher-forced reference and hypothetical
                                  captions, with the objects' features)
        analysis/                 geocap analyze output (analysis.json, figures, report.md)
        untrained/                the control: checkpoint.pt (the same architecture at its random
                                  initialisation, the weights run/ started from), its dump/ and analysis/
        short/                    seeds below schedule_check_seeds only: the schedule check's half-length
                                  run (geocap train output) and schedule_check.json (both final models'
                                  per-image validation losses, :mod:`geocap.study.schedule`)
        done.json                 written LAST: the SHA-256 of every file above and of data/done.json
    DIR/study.json                the aggregate (the aggregation's dict plus "settings"), written last
    DIR/study.md, DIR/*.png       the report (the aggregation writes them)

Models are made one at a time (``jobs=1``) or ``jobs`` at once, each in a process of its own (spawned,
one torch thread each, dying with the study's process); the results do not depend on ``jobs``.

Resume: a model counts as finished only when its ``done.json`` is readable and every file it
lists exists with its recorded SHA-256 and the data is the data it was made from; any other
model folder (a killed run, a deleted ``done.json``, a corrupt or missing checkpoint) is removed
and made again from the start, and the log says why. The data folder is made in a temporary
folder ``data.tmp-<pid>`` and renamed when complete, so it is complete or absent. Killing a
study at any moment (SIGINT, SIGTERM, SIGKILL) and rerunning the same command therefore goes on
from the models finished so far. Models are trained with ``TrainConfig.seed`` = their seed;
training is deterministic on one machine, so a redone model equals the one an uninterrupted
study makes (weights; the checkpoint files also hold wall-clock timings).
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import sys
import time
from typing import Callable, Optional

from geocap import stop
from geocap.data.atomic import pid_alive, write_text_atomic
from geocap.data.file_digest import file_sha256
from geocap.data.json_file import read_json
from geocap.errors import UsageError
from geocap.out_dir import check_out_dir
from geocap.progress import progress_bar

from .settings import SETTINGS_FILE, StudySettings

__all__ = ["DONE_FILE", "LOCK_FILE", "STUDY_FILE", "StudyLocked", "finished_models", "model_dir", "model_name",
           "model_result_fields", "run_study"]

DONE_FILE = "done.json"
LOCK_FILE = "study.lock"
STUDY_FILE = "study.json"
DATA_DIR, MODELS_DIR = "data", "models"
TEST_SPLIT = "test"
CHECKPOINT = os.path.join("run", "checkpoint-latest.pt")   # the final model: training has an end
UNTRAINED = "untrained"
SHORT = "short"
DONE_FORMAT = "geocap-study-done"


class StudyLocked(UsageError):
    """Another process runs a study in the same folder."""


def model_name(variant: str, seed: int) -> str:
    """``<variant>-seed<k>``: the folder name of one model of a study."""
    return f"{variant}-seed{seed}"


def model_dir(out, variant: str, seed: int) -> str:
    return os.path.join(os.fspath(out), MODELS_DIR, model_name(variant, seed))


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------- digests


def _digests(folder: str) -> dict:
    """Relative path -> SHA-256 of every file under ``folder`` except its done.json, sorted."""
    found = {}
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            path = os.path.join(root, name)
            rel = os.path.relpath(path, folder)
            if rel != DONE_FILE:
                found[rel] = file_sha256(path)
    return found


def _write_done(folder: str, record: dict) -> None:
    """``folder/done.json`` (atomically) vouching for every file under ``folder`` as it is now."""
    record = {"format": DONE_FORMAT, **record, "files": _digests(folder)}
    write_text_atomic(os.path.join(folder, DONE_FILE), json.dumps(record, indent=1) + "\n")


def _done_problem(folder: str, expected: dict) -> Optional[str]:
    """None when ``folder/done.json`` exists, holds ``expected``'s items and every file it lists
    has its recorded SHA-256; else why not (for the log)."""
    path = os.path.join(folder, DONE_FILE)
    if not os.path.isfile(path):
        return f"{DONE_FILE} missing (not finished)"
    try:
        record = read_json(path, "study done file")
    except ValueError as err:
        return str(err)
    if not isinstance(record, dict) or record.get("format") != DONE_FORMAT or not isinstance(record.get("files"),
                                                                                            dict):
        return f"{path}: not a study done file"
    for key, value in expected.items():
        if record.get(key) != value:
            return f"{path}: made with {key} {record.get(key)!r}, expected {value!r}"
    for rel, digest in record["files"].items():
        file = os.path.join(folder, rel)
        if not os.path.isfile(file):
            return f"{file} missing"
        if file_sha256(file) != digest:
            return f"{file} changed or corrupt (SHA-256 differs from {DONE_FILE})"
    return None


def _remove(path: str) -> None:
    if os.path.isdir(path) and not os.path.islink(path):
        shutil.rmtree(path)
    elif os.path.lexists(path):
        os.remove(path)


# ---------------------------------------------------------------------------- data


def _prepro_captions(karpathy: str, out: str, settings: StudySettings) -> None:
    """``geocap prepro captions --karpathy FILE --out DIR`` (its report on stderr)."""
    from geocap.data.prepro import prepro_captions

    summary = prepro_captions(out, karpathy=karpathy, min_count=settings.min_count,
                              max_len=settings.max_caption_len, progress=False)
    print("\n".join(summary.lines()), file=sys.stderr)


def _data_record(settings: StudySettings) -> dict:
    return {"images": settings.images, "feature_dim": settings.feature_dim, "data_seed": settings.data_seed,
            "min_count": settings.min_count, "max_caption_len": settings.max_caption_len}


def _ensure_data(out: str, settings: StudySettings, log: Callable[[str], None], progress: bool) -> str:
    """DIR/data, made now unless a complete one is there; returns the SHA-256 of its done.json
    (what each model's done.json records)."""
    from geocap.data.synth import generate_synthetic

    data = os.path.join(out, DATA_DIR)
    expected = _data_record(settings)
    problem = _done_problem(data, expected) if os.path.exists(data) else "absent"
    if problem is not None:
        if os.path.exists(data):
            log(f"study: data: {problem}; making it again")
            _remove(data)
        tmp = f"{data}.tmp-{os.getpid()}"
        _remove(tmp)
        log(f"study: data: {settings.images} synthetic images -> {data}")
        try:
            with contextlib.redirect_stdout(sys.stderr):
                generate_synthetic(tmp, images=settings.images, seed=settings.data_seed,
                                   feature_dim=settings.feature_dim, progress=progress)
            _prepro_captions(os.path.join(tmp, "dataset_coco.json"), os.path.join(tmp, "caps"), settings)
            _write_done(tmp, expected)
            stop.check()            # a stop request lost as an exception replaces nothing
            os.replace(tmp, data)
        except BaseException:
            _remove(tmp)
            raise
    return file_sha256(os.path.join(data, DONE_FILE))


# ---------------------------------------------------------------------------- one model


def _make_model(folder: str, data: str, settings: StudySettings, variant: str, seed: int, progress: bool,
                log: Callable[[str], None]) -> None:
    """Train, evaluate, dump and analyse model (``variant``, ``seed``) into the empty ``folder``, and
    dump and analyse its untrained control (done.json is the caller's)."""
    from geocap.analysis import run_analyses
    from geocap.data.dump_format import open_dump
    from geocap.dump.job import DumpOptions, dump
    from geocap.evaluate import evaluate
    from geocap.train import TrainConfig, initial_checkpoint, train

    def dump_and_analyse(checkpoint: str, where: str) -> None:
        dump(checkpoint, data, TEST_SPLIT, os.path.join(where, "dump"), DumpOptions(features=True),
             progress=progress)
        run_analyses(open_dump(os.path.join(where, "dump"), progress=progress), os.path.join(where, "analysis"),
                     progress=progress)

    name = model_name(variant, seed)
    run = os.path.join(folder, "run")
    log(f"study: {name}: train {settings.steps} steps")
    config = TrainConfig.from_dict({"data": data, "out": run, "progress": progress,
                                    **settings.train_options(variant, seed)})
    train(config)
    log(f"study: {name}: evaluate the final model on the {TEST_SPLIT} split")
    evaluate(os.path.join(folder, CHECKPOINT), data, TEST_SPLIT, beam_size=settings.beam_size,
             max_len=settings.max_decode_len, out_dir=os.path.join(folder, "eval"), meteor=False, spice=False,
             tokenizer=settings.tokenizer, progress=progress)
    log(f"study: {name}: dump and analyse the {TEST_SPLIT} split's attention")
    dump_and_analyse(os.path.join(folder, CHECKPOINT), folder)
    log(f"study: {name}: the untrained control (its initialisation): dump and analyse")
    untrained = os.path.join(folder, UNTRAINED)
    os.makedirs(untrained)
    initial_checkpoint(config, os.path.join(untrained, "checkpoint.pt"))
    dump_and_analyse(os.path.join(untrained, "checkpoint.pt"), untrained)
    if settings.schedule_checked(seed):
        _schedule_check(folder, data, settings, variant, seed, progress, log)


def _schedule_check(folder: str, data: str, settings: StudySettings, variant: str, seed: int, progress: bool,
                    log: Callable[[str], None]) -> None:
    """The schedule check of model (``variant``, ``seed``): its half-length run in ``folder/short/run``
    and both final models' per-image validation losses in ``folder/short/schedule_check.json``."""
    from geocap.train import TrainConfig, train

    from .convergence import loss_curve
    from .schedule import CHECK_FILE, measure

    options = settings.short_train_options(variant, seed)
    log(f"study: {model_name(variant, seed)}: schedule check: train {options['steps']} steps")
    short = os.path.join(folder, SHORT)
    train(TrainConfig.from_dict({"data": data, "out": os.path.join(short, "run"), "progress": progress, **options}))
    record = measure(os.path.join(short, CHECKPOINT), os.path.join(folder, CHECKPOINT), data,
                     images=settings.val_loss_images)
    record.update(short_steps=options["steps"], steps=settings.steps,
                  short_curve=loss_curve(_metrics_entries(os.path.join(short, "run", "metrics.jsonl"))))
    write_text_atomic(os.path.join(short, CHECK_FILE), json.dumps(record) + "\n")


def _make_and_finish(folder: str, data: str, settings_dict: dict, variant: str, seed: int, data_sha256: str,
                     progress: bool, threads: Optional[int], log: Optional[Callable[[str], None]] = None) -> float:
    """One model, start to done.json (in this process, or a worker's with ``threads`` torch threads,
    dying with its parent); ``log`` None: stderr. Returns its seconds."""
    if threads is not None:
        import torch

        from geocap.parent_death import die_with_parent

        die_with_parent()
        torch.set_num_threads(threads)
    settings = StudySettings.from_dict(settings_dict)
    started = time.perf_counter()
    _make_model(folder, data, settings, variant, seed, progress, _stderr if log is None else log)
    _write_done(folder, _model_record(settings, variant, seed, data_sha256))
    return time.perf_counter() - started


def _model_record(settings: StudySettings, variant: str, seed: int, data_sha256: str) -> dict:
    """What a model's done.json must hold besides its files' digests."""
    return {"variant": variant, "seed": seed, "data_sha256": data_sha256,
            "train_options": settings.train_options(variant, seed),
            "schedule_check": settings.short_train_options(variant, seed) if settings.schedule_checked(seed) else None,
            "evaluation": {"split": TEST_SPLIT, "beam_size": settings.beam_size,
                           "max_len": settings.max_decode_len, "tokenizer": settings.tokenizer}}


def finished_models(out, settings: StudySettings) -> list:
    """The (variant, seed) pairs of the study in ``out`` whose done.json is valid now."""
    out = os.fspath(out)
    data_done = os.path.join(out, DATA_DIR, DONE_FILE)
    if not os.path.isfile(data_done):
        return []
    data_sha256 = file_sha256(data_done)
    return [(v, s) for v, s in settings.models()
            if _done_problem(model_dir(out, v, s), _model_record(settings, v, s, data_sha256)) is None]


# ---------------------------------------------------------------------------- aggregation


def _metrics_entries(metrics_jsonl: str) -> list:
    with open(metrics_jsonl, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def model_result_fields(out, variant: str, seed: int, references: dict) -> dict:
    """The fields of :class:`geocap.study.summary.ModelResult` for one finished model of the
    study in ``out``; ``references``: test image id -> its reference strings (shared by all)."""
    folder = model_dir(out, variant, seed)
    data = os.path.abspath(os.path.join(os.fspath(out), DATA_DIR))
    results = read_json(os.path.join(folder, "eval", f"captions_{TEST_SPLIT}.json"), "captions file")
    captions = {int(item["image_id"]): str(item["caption"]) for item in results}
    truth = os.path.join(data, "ground_truth.json")
    from .convergence import loss_curve

    config = read_json(os.path.join(folder, "run", "train_config.json"), "train config file")
    untrained = os.path.join(folder, UNTRAINED, "analysis", "analysis.json")
    from .schedule import CHECK_FILE

    check = os.path.join(folder, SHORT, CHECK_FILE)
    return {"variant": variant, "seed": seed,
            "references": {i: list(references[i]) for i in captions},
            "captions": captions,
            "ground_truth": truth if os.path.isfile(truth) else None,
            "analysis": read_json(os.path.join(folder, "analysis", "analysis.json"), "analysis file"),
            "metrics": read_json(os.path.join(folder, "eval", f"metrics_{TEST_SPLIT}.json"), "metrics file"),
            "val_curve": loss_curve(_metrics_entries(os.path.join(folder, "run", "metrics.jsonl"))),
            "steps": int(config["steps"]),
            "untrained_analysis": read_json(untrained, "analysis file") if os.path.isfile(untrained) else None,
            "schedule_check": read_json(check, "schedule check file") if os.path.isfile(check) else None}


def _test_references(data: str) -> dict:
    """Test image id -> its untruncated reference strings (as geocap evaluate scores them)."""
    from geocap.data.vocab import load_captions

    captions = load_captions(os.path.join(data, "caps"))
    ids = sorted({int(i) for i in captions.image_id[captions.rows(TEST_SPLIT)]})
    return {i: list(captions.references(i)) for i in ids}


def blind_captions(data: str) -> dict:
    """The blind captioners' captions (:mod:`geocap.study.blind`) of the study data in ``data``: rule
    name -> test image id -> caption, for ``"all"`` (every relation) and each group of
    :data:`geocap.study.stats.RELATION_GROUPS` (that group's relations only); counts from the
    training split's references, the categories from ground_truth.json."""
    from geocap.data.vocab import load_captions
    from geocap.metrics import load_relation_truth

    from .blind import BlindCaptioner
    from .stats import RELATION_GROUPS

    captions = load_captions(os.path.join(data, "caps"))
    train_ids = sorted({int(i) for i in captions.image_id[captions.rows("train")]})
    truth = load_relation_truth(os.path.join(data, "ground_truth.json"))
    blind = BlindCaptioner.fit([c for i in train_ids for c in captions.references(i)], truth)
    rules = {"all": blind, **{g: blind.restrict(names) for g, names in RELATION_GROUPS.items()}}
    test = _test_references(data)
    return {name: {i: rule.caption(truth.images[i].categories) for i in test} for name, rule in rules.items()}


def summarize_and_report(results: list, out_dir: str, settings: dict) -> dict:
    """The default aggregation: :func:`geocap.study.summary.summarize` over the models'
    ModelResults (and the blind captioner's captions of the study's data, when ``out_dir`` holds it),
    with ``settings`` added, then its report (study.md, figures) in ``out_dir``. ``results``: one
    dict of ModelResult fields per model. Returns study.json's content."""
    from geocap.study.summary import ModelResult, summarize, write_report

    from .schedule import DEFAULT_TOLERANCE

    data = os.path.join(os.fspath(out_dir), DATA_DIR)
    blind = blind_captions(data) if os.path.isfile(os.path.join(data, "ground_truth.json")) else None
    study = summarize([ModelResult(**fields) for fields in results], blind=blind,
                      tolerance=float(settings.get("converge_tolerance", 0.01)),
                      schedule_tolerance=float(settings.get("schedule_tolerance", DEFAULT_TOLERANCE)))
    study["settings"] = settings
    write_report(study, out_dir)
    return study


# ---------------------------------------------------------------------------- the study


@contextlib.contextmanager
def _study_lock(out: str):
    """Hold DIR/study.lock (flock) for the block; StudyLocked when another process holds it."""
    import fcntl

    path = os.path.join(out, LOCK_FILE)
    with open(path, "a+", encoding="utf-8") as fh:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            holder = fh.read().strip()
            raise StudyLocked(f"--out: another geocap study is running in {out} (pid {holder or '?'})") from None
        fh.seek(0)
        fh.truncate()
        fh.write(str(os.getpid()))
        fh.flush()
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _check_settings(out: str, settings: StudySettings) -> bool:
    """ValueError unless ``out`` is absent, empty or a study of these very settings; returns
    whether it already holds the settings file. Writes nothing."""
    check_out_dir(out, marker=SETTINGS_FILE, kind="geocap study")
    path = os.path.join(out, SETTINGS_FILE)
    if not os.path.isfile(path):
        return False
    saved = StudySettings.load(path)
    changed = settings.differences(saved)
    if changed:
        raise UsageError(f"--out: {out} holds a study with other settings: {'; '.join(changed)}. Studies are never "
                         f"mixed: rerun with that study's settings to continue it, or choose another --out")
    return True


def _check_train_options(settings: StudySettings) -> None:
    """ValueError, before anything is written, when a model's train options are not ones this
    geocap's trainer takes (e.g. a variant's option not yet in TrainConfig)."""
    from geocap.train import TrainConfig

    for variant, seed in settings.models():
        try:
            TrainConfig.from_dict({"data": "", "out": "", **settings.train_options(variant, seed)})
        except ValueError as err:
            raise UsageError(f"study variant {variant}: {err}") from None


def _remove_stale(out: str, log: Callable[[str], None]) -> None:
    """Delete what killed studies left beside the layout: ``<name>.tmp-<pid>`` files and folders
    of dead processes in DIR and DIR/models (a live process's are left alone)."""
    for folder in (out, os.path.join(out, MODELS_DIR)):
        if not os.path.isdir(folder):
            continue
        for entry in sorted(os.listdir(folder)):
            head, sep, pid = entry.rpartition(".tmp-")
            if sep and head and pid.isdigit() and not pid_alive(int(pid)):
                log(f"study: removing {os.path.join(folder, entry)} (left by a killed study)")
                _remove(os.path.join(folder, entry))


def _run_parallel(out: str, data: str, settings: StudySettings, todo: list, data_sha256: str, jobs: int,
                  finished: Callable) -> None:
    """Make the models of ``todo`` ``jobs`` at a time, each in a spawned process with one torch
    thread that dies with this one; the first failure is raised once the running ones have ended."""
    import concurrent.futures
    import multiprocessing

    context = multiprocessing.get_context("spawn")
    pool = concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=context)
    try:
        futures = {pool.submit(_make_and_finish, model_dir(out, v, s), data, settings.to_dict(), v, s, data_sha256,
                               False, 1): (v, s) for v, s in todo}
        for k, future in enumerate(concurrent.futures.as_completed(futures)):
            variant, seed = futures[future]
            finished(k, variant, seed, future.result())
    except BaseException:
        # stop now (a model being made is left without done.json, so a rerun makes it again): the pool's
        # processes are not public, hence getattr; they would also die with this process
        processes = list((getattr(pool, "_processes", None) or {}).values())
        pool.shutdown(wait=False, cancel_futures=True)
        for process in processes:
            process.terminate()
        raise
    pool.shutdown(wait=True)


def run_study(out, settings: StudySettings, *, aggregate: Optional[Callable] = None, progress: bool = True,
              log: Optional[Callable[[str], None]] = None, jobs: int = 1) -> str:
    """Run (or continue) the study ``settings`` in the folder ``out`` (layout and resume: the
    module doc) and return the path of ``out/study.json``.

    ``aggregate(results, out_dir, settings_dict) -> dict``: called once every model is finished
    with one dict of :class:`~geocap.study.summary.ModelResult` fields per model (in
    ``settings.models()`` order), the study folder and the settings as a dict; it writes the
    report (study.md, figures) and returns study.json's content, which is written atomically
    (default: :func:`summarize_and_report`). ``progress``: the trainer's and the other steps'
    bars, and the study's overall one (models done of all, elapsed, the time left estimated from
    the models made in this run). ``log``: one line per event (default: stderr; a worker process's
    lines go to stderr). ``jobs``: models made at once (module doc).

    ValueError (nothing written) when ``out`` is a non-empty folder that is not a study, a study
    with other settings, or one in which another study is running.
    """
    out = os.fspath(out)
    log = _stderr if log is None else log
    aggregate = summarize_and_report if aggregate is None else aggregate
    if isinstance(jobs, bool) or not isinstance(jobs, int) or jobs < 1:
        raise UsageError(f"--jobs must be a positive int, got {jobs!r}")
    settings.validate()
    _check_train_options(settings)
    if not _check_settings(out, settings):
        os.makedirs(out, exist_ok=True)
        settings.save(os.path.join(out, SETTINGS_FILE))   # first: it marks DIR as this study's
    with _study_lock(out):
        _check_settings(out, settings)     # again: another study may have begun in DIR meanwhile
        _remove_stale(out, log)
        data_sha256 = _ensure_data(out, settings, log, progress)
        data = os.path.abspath(os.path.join(out, DATA_DIR))
        os.makedirs(os.path.join(out, MODELS_DIR), exist_ok=True)
        models = settings.models()
        todo = []
        for variant, seed in models:
            folder = model_dir(out, variant, seed)
            problem = _done_problem(folder, _model_record(settings, variant, seed, data_sha256)) \
                if os.path.exists(folder) else "absent"
            if problem is None:
                log(f"study: {model_name(variant, seed)}: finished earlier, kept")
                continue
            if problem != "absent":
                log(f"study: {model_name(variant, seed)}: {problem}; removing it and making it again")
                _remove(folder)
            todo.append((variant, seed))
        bar = progress_bar(enabled=progress, total=len(models), initial=len(models) - len(todo), unit="model",
                           desc="study")
        run_started = time.perf_counter()

        def finished(k: int, variant: str, seed: int, seconds: float) -> None:
            bar.update(1)
            elapsed = time.perf_counter() - run_started
            left = len(todo) - k - 1
            log(f"study: {model_name(variant, seed)}: done in {seconds:.0f} s; "
                f"{len(models) - left} of {len(models)} models done, {elapsed:.0f} s elapsed, "
                f"about {elapsed / (k + 1) * left:.0f} s left")

        try:
            if jobs == 1 or len(todo) <= 1:
                for k, (variant, seed) in enumerate(todo):
                    stop.check()
                    bar.set_postfix_str(f"now {model_name(variant, seed)}", refresh=True)
                    seconds = _make_and_finish(model_dir(out, variant, seed), data, settings.to_dict(), variant,
                                               seed, data_sha256, progress, None, log)
                    finished(k, variant, seed, seconds)
            else:
                _run_parallel(out, data, settings, todo, data_sha256, jobs, finished)
        finally:
            bar.close()
        references = _test_references(data)
        results = [model_result_fields(out, variant, seed, references) for variant, seed in models]
        study = aggregate(results, out, settings.to_dict())
        if not isinstance(study, dict):
            raise TypeError(f"the study's aggregate returned {type(study).__name__}, not a dict")
        study = {**study, "settings": settings.to_dict()}
        path = os.path.join(out, STUDY_FILE)
        write_text_atomic(path, json.dumps(study, indent=1, allow_nan=False) + "\n")
    log(f"study: wrote {path}")
    return path
