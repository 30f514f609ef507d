"""How far from converged: a ladder of training runs whose schedules double, scored by the study's
schedule check (geocap.study.schedule) on each consecutive pair.

    python bench/schedule_ladder.py --data DIR --runs RUN_A RUN_B [RUN_C ...] --out FOLDER [--images 1000]

``RUN_*``: ``geocap train`` run folders (RUN/checkpoint-latest.pt, metrics.jsonl) of the same model,
data, seed and options but the steps, in increasing steps (each usually twice the previous).
``--data``: the data folder they were trained on (features.h5, caps/); every checkpoint must record
this data's digest. Writes ``FOLDER/ladder.json`` (per run: steps, final validation loss, seconds
per step as its metrics.jsonl logged them; per consecutive pair: the schedule check's dict) and
``FOLDER/ladder.png`` (the validation curves, one per schedule, and the gain of each doubling with
its 95 % interval). Both written atomically.
"""
from __future__ import annotations

import argparse
import json
import os
import sys


def _entries(run: str) -> list:
    with open(os.path.join(run, "metrics.jsonl"), encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def _run_summary(run: str) -> dict:
    from geocap.study.convergence import loss_curve

    config = json.load(open(os.path.join(run, "train_config.json"), encoding="utf-8"))
    entries = _entries(run)
    train = [e for e in entries if e.get("kind") == "train" and e.get("time") is not None]
    curve = loss_curve(entries)
    vals = [e for e in entries if e.get("kind") == "val"]
    val_seconds = sum(float(e.get("seconds") or 0.0) for e in vals)
    last = train[-1] if train else None
    return {"run": run, "steps": int(config["steps"]), "final_val_loss": curve[-1][1] if curve else None,
            "final_val_loss_se": curve[-1][2] if curve else None, "curve": curve,
            "seconds": float(last["time"]) if last else None,
            "seconds_per_step": ((float(last["time"]) - val_seconds) / int(last["step"])) if last else None}


def ladder(data: str, runs: list, images: int) -> dict:
    """The ladder's dict (module doc). ValueError naming the run whose steps are not increasing or
    whose checkpoint was trained on other data."""
    from geocap.checkpoint import load_checkpoint
    from geocap.study.schedule import measure, schedule_gain
    from geocap.train.config import TrainConfig
    from geocap.train.loop import data_digest

    summaries = [_run_summary(run) for run in runs]
    for a, b in zip(summaries, summaries[1:]):
        if b["steps"] <= a["steps"]:
            raise ValueError(f"--runs: {b['run']} ({b['steps']} steps) does not have more steps than {a['run']} "
                             f"({a['steps']})")
    expected = data_digest(TrainConfig.from_dict({"data": data, "out": ""}))
    for s in summaries:
        got = load_checkpoint(os.path.join(s["run"], "checkpoint-latest.pt")).extra.get("data_digest")
        if got != expected:
            raise ValueError(f"--runs: {s['run']} was trained on other data than --data {data}")
    checks = []
    for a, b in zip(summaries, summaries[1:]):
        print(f"ladder: {a['steps']} -> {b['steps']} steps on {images} validation images", file=sys.stderr)
        record = measure(os.path.join(a["run"], "checkpoint-latest.pt"), os.path.join(b["run"], "checkpoint-latest.pt"),
                         data, images=images)
        record.update(short_steps=a["steps"], steps=b["steps"])
        checks.append(schedule_gain(record))
    return {"data": os.path.abspath(data), "images": images, "runs": summaries, "checks": checks}


def plot(result: dict, path: str) -> None:
    from geocap.analysis.plotting import new_figure, save_figure

    fig, (curves, gains) = new_figure(2)
    for s in result["runs"]:
        curves.plot([p[0] / 1000 for p in s["curve"]], [p[1] for p in s["curve"]], marker=".", markersize=3,
                    linewidth=1, label=f"{s['steps']}-step schedule")
    curves.set_xlabel("training step (thousands)")
    curves.set_ylabel("teacher-forced validation loss")
    curves.set_title("validation loss, one schedule per line", fontsize=9)
    curves.legend(fontsize=7)
    labels = [f"{c['short_steps']}->{c['steps']}" for c in result["checks"]]
    mid = [100 * c["gain"] for c in result["checks"]]
    err = [[100 * (c["gain"] - c["gain_ci95"][0]) for c in result["checks"]],
           [100 * (c["gain_ci95"][1] - c["gain"]) for c in result["checks"]]]
    gains.errorbar(range(len(mid)), mid, yerr=err, fmt="o", capsize=4)
    tolerance = result["checks"][0]["tolerance"] if result["checks"] else None
    if tolerance is not None:
        gains.axhline(100 * tolerance, linestyle="--", linewidth=1, color="grey", label="tolerance")
    gains.axhline(0, linewidth=0.5, color="black")
    gains.set_xticks(range(len(mid)), labels)
    gains.set_xlim(-0.5, len(mid) - 0.5)
    gains.set_xlabel("doubling (steps)")
    gains.set_ylabel("validation loss gain, % [95 %]")
    gains.set_title("what doubling the schedule buys", fontsize=9)
    gains.legend(fontsize=7)
    save_figure(fig, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--runs", nargs="+", required=True)
    parser.add_argument("--out", required=True)
    parser.add_argument("--images", type=int, default=1000)
    args = parser.parse_args(argv)
    if len(args.runs) < 2:
        parser.error("--runs: at least two runs")
    from geocap.data.atomic import write_text_atomic

    result = ladder(args.data, args.runs, args.images)
    os.makedirs(args.out, exist_ok=True)
    write_text_atomic(os.path.join(args.out, "ladder.json"), json.dumps(result, indent=1) + "\n")
    plot(result, os.path.join(args.out, "ladder.png"))
    for c in result["checks"]:
        print(c["reason"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
