"""Sweeps through the launcher plugins: joblib (one machine) and submitit (local, as on SLURM)."""

from __future__ import annotations

import csv
import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

import tissuesim
from tissuesim.analysis.report import collect, swept_keys, write_report

pytest.importorskip("hydra_plugins.hydra_joblib_launcher")
pytest.importorskip("hydra_plugins.hydra_submitit_launcher")

TINY = ["grid=tiny", "backend=numpy", "output.progress=false", "output.snapshot_every_days=0.01"]


def _cmd(*args):
    return [sys.executable, "-m", "tissuesim.cli", "-m", *TINY, *args]


def _env():
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def _jobs(sweep: Path) -> list[Path]:
    return sorted(p.parent for p in sweep.rglob("summary.json"))


def test_joblib_sweep_and_its_report(tmp_path):
    sweep = tmp_path / "sweep"
    p = subprocess.run(
        _cmd(
            "hydra/launcher=joblib",
            "hydra.launcher.n_jobs=2",
            "duration_days=0.03",
            "therapy=cd19,none",
            "tissue=muscle,lung",
            f"hydra.sweep.dir={sweep}",
        ),
        capture_output=True,
        text=True,
        env=_env(),
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    jobs = _jobs(sweep)
    assert len(jobs) == 4
    pids = set()
    for j in jobs:
        s = json.loads((j / "summary.json").read_text())
        assert s["status"] == "completed"
        pids.add(re.search(r"process (\d+)", (j / "tissuesim.log").read_text()).group(1))
    assert len(pids) >= 2, "joblib ran every job in one process"
    keys, rows = collect(sweep)
    assert swept_keys(keys, rows) == ["therapy", "tissue"]
    assert sorted(r["seed"] for r in rows) == [0, 1, 2, 3]  # distinct seeds unless set
    res = write_report(sweep)
    table = list(csv.DictReader(open(res["csv"])))
    assert len(table) == 4
    for row in table:  # each row's overrides match what that job ran
        s = json.loads((sweep / row["job"] / "summary.json").read_text())
        assert (row["therapy"], row["tissue"]) == (s["therapy"], s["tissue"])
    assert sorted((r["therapy"], r["tissue"]) for r in table) == [
        ("cd19", "lung"),
        ("cd19", "muscle"),
        ("none", "lung"),
        ("none", "muscle"),
    ]
    assert Path(res["png"]).stat().st_size > 0


def test_submitit_local_sweep_and_a_killed_job_leaves_the_others_intact(tmp_path):
    sweep = tmp_path / "sweep"
    proc = subprocess.Popen(
        _cmd(
            "hydra/launcher=submitit_local",
            "hydra.launcher.timeout_min=10",
            "duration_days=0.05,30,0.05",
            f"hydra.sweep.dir={sweep}",
        ),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=_env(),
    )
    # The long job is job 1; kill its process with SIGKILL once it has written snapshots.
    log = sweep / "1" / "tissuesim.log"
    deadline = time.time() + 240
    pid = None
    while time.time() < deadline and pid is None:
        time.sleep(0.5)
        if log.exists() and (sweep / "1" / "snapshots.h5").exists():
            m = re.search(r"process (\d+)", log.read_text())
            if m:
                try:
                    with tissuesim.open_run(sweep / "1") as r:
                        pid = int(m.group(1)) if len(r.times) >= 2 else None
                except OSError:
                    pass
    assert pid is not None, "the long job never started writing"
    os.kill(pid, signal.SIGKILL)
    proc.communicate(timeout=300)
    for j in ("0", "2"):  # the others finished and their outputs are whole
        s = json.loads((sweep / j / "summary.json").read_text())
        assert s["status"] == "completed" and s["duration_days"] == pytest.approx(0.05)
        with tissuesim.open_run(sweep / j) as r:
            assert r.times[-1] == pytest.approx(0.05)
    with tissuesim.open_run(sweep / "1") as r:  # the killed one still opens, with what it flushed
        assert len(r.times) >= 2
    assert not (sweep / "1" / "summary.json").exists()
