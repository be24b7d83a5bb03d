"""Sweep reports: one table of every job's summary and overrides, and plots by swept parameter.

``tissuesim-report SWEEP_DIR`` finds every job directory below SWEEP_DIR (those holding a
summary.json), reads the job's overrides from .hydra/overrides.yaml, and writes

- sweep_report.csv: one row per job, the override columns first, then every summary readout
  (nested readouts flattened as ``autoantibody_rel.90``);
- sweep_report.png: each numeric readout by the swept parameters other than ``seed``, as the mean
  over seeds with the standard deviation as error bar and every job as a dot.
"""

from __future__ import annotations

import csv
import json
import math
from collections import defaultdict
from pathlib import Path

import numpy as np
import yaml

PLOTTED = (
    "car_t_peak_day",
    "car_t_peak_blood_per_ul",
    "b_cell_depletion_day",
    "b_cell_recovery_day",
    "autoantibody_rel.90",
    "autoantibody_rel.365",
    "max_crs_grade",
    "relapse_day",
    "final_damage_rel",
    "steps_per_second",
)


def _flatten(d: dict, prefix: str = "") -> dict:
    out = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict):
            out.update(_flatten(v, key + "."))
        elif isinstance(v, list):
            continue  # the event list is not a column
        else:
            out[key] = v
    return out


def collect(sweep_dir: str | Path) -> tuple[list[str], list[dict]]:
    """(override keys, rows) for every job below sweep_dir; rows sorted by job directory."""
    sweep_dir = Path(sweep_dir)
    rows = []
    keys: list[str] = []
    for summary in sorted(sweep_dir.rglob("summary.json"), key=lambda p: (len(p.parts), str(p))):
        job = summary.parent
        row = {"job": str(job.relative_to(sweep_dir))}
        ov_file = job / ".hydra" / "overrides.yaml"
        overrides = yaml.safe_load(ov_file.read_text()) if ov_file.exists() else []
        for ov in overrides or []:
            k, _, v = str(ov).lstrip("+~").partition("=")
            if k.startswith("hydra"):
                continue
            row[k] = v
            if k not in keys:
                keys.append(k)
        row.update(_flatten(json.loads(summary.read_text())))
        rows.append(row)
    return keys, rows


def write_report(sweep_dir: str | Path, out: str | Path | None = None) -> dict:
    """Write sweep_report.csv and sweep_report.png; returns their paths and the job count."""
    sweep_dir = Path(sweep_dir)
    keys, rows = collect(sweep_dir)
    if not rows:
        raise FileNotFoundError(f"{sweep_dir}: no job with a summary.json below it")
    out = Path(out) if out else sweep_dir
    out.mkdir(parents=True, exist_ok=True)
    columns = ["job", *keys]
    for r in rows:
        columns += [k for k in r if k not in columns]
    csv_path = out / "sweep_report.csv"
    with open(csv_path, "w", newline="") as fh:
        w = csv.DictWriter(fh, fieldnames=columns, restval="")
        w.writeheader()
        for r in rows:
            w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in columns})
    png = _plot(keys, rows, out / "sweep_report.png")
    return {"csv": str(csv_path), "png": str(png), "jobs": len(rows)}


def _num(v) -> float:
    try:
        x = float(v)
    except (TypeError, ValueError):
        return math.nan
    return x


def swept_keys(keys: list[str], rows: list[dict]) -> list[str]:
    """The override keys whose value differs between jobs (those the sweep varied)."""
    return [k for k in keys if len({str(r.get(k)) for r in rows}) > 1]


def group_stats(
    keys: list[str], rows: list[dict], readout: str
) -> dict[str, tuple[float, float, list[float]]]:
    """{group label: (mean, std, values)} of ``readout`` over jobs grouped by the swept overrides
    other than the seed (so each group's spread is the spread over seeds)."""
    by = [k for k in swept_keys(keys, rows) if k != "seed"]
    groups: dict[str, list[float]] = defaultdict(list)
    for r in rows:
        label = " ".join(f"{k}={r.get(k, '')}" for k in by) or "all"
        groups[label].append(_num(r.get(readout)))
    out = {}
    for label, vals in groups.items():
        v = np.array(vals, dtype=float)
        ok = v[~np.isnan(v)]
        out[label] = (
            float(ok.mean()) if ok.size else math.nan,
            float(ok.std()) if ok.size else math.nan,
            vals,
        )
    return out


def _plot(keys, rows, path: Path) -> Path:
    from tissuesim.analysis.figures import _mpl

    plt = _mpl()
    readouts = [k for k in PLOTTED if any(not math.isnan(_num(r.get(k))) for r in rows)] or ["wall_seconds"]
    ncol = 2
    nrow = math.ceil(len(readouts) / ncol)
    fig, axes = plt.subplots(
        nrow, ncol, figsize=(12, 2.8 * nrow), dpi=100, squeeze=False, constrained_layout=True
    )
    for ax, readout in zip(axes.flat, readouts):
        stats = group_stats(keys, rows, readout)
        labels = list(stats)
        x = np.arange(len(labels))
        means = [stats[g][0] for g in labels]
        sds = [stats[g][1] for g in labels]
        ax.bar(x, means, yerr=sds, color="#56B4E9", capsize=3)
        for i, g in enumerate(labels):
            ax.plot(np.full(len(stats[g][2]), x[i]), stats[g][2], "k.", ms=4)
        ax.set_xticks(x, labels, rotation=30, ha="right", fontsize=7)
        ax.set_title(readout + " (mean +- sd over seeds)", fontsize=9)
    for ax in list(axes.flat)[len(readouts) :]:
        ax.axis("off")
    fig.savefig(path)
    plt.close(fig)
    return path
