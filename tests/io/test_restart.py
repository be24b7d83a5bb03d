"""Restart: a run resumed from its checkpoint equals the uninterrupted run, bitwise on NumPy."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tissuesim
from tissuesim.config import ConfigError
from tissuesim.runner import run_to_directory

BASE = [
    "grid=tiny",
    "backend=numpy",
    "output.progress=false",
    # whole numbers of 1-minute steps: 36, 18 and 54
    "output.snapshot_every_days=0.025",
    "output.timeseries_every_days=0.0125",
    "output.checkpoint_every_days=0.0375",
    "seed=5",
]


def _assert_same_run(a, b, strict: bool):
    """Snapshots and timeseries rows at the times both runs hold are bitwise equal.

    strict: the two runs must also hold the same times (a stopped-and-resumed run has one extra
    snapshot and row, at the stop)."""
    with tissuesim.open_run(a) as ra, tissuesim.open_run(b) as rb:
        ta, tb = ra.times, rb.times
        if strict:
            np.testing.assert_array_equal(ta, tb)
        common = sorted(set(ta) & set(tb))
        assert len(common) >= 3 and common[-1] == ta[-1]
        for t in common:
            i, j = int(np.flatnonzero(ta == t)[0]), int(np.flatnonzero(tb == t)[0])
            for name in ra.field_names:
                np.testing.assert_array_equal(
                    ra.field(name, i), rb.field(name, j), err_msg=f"{name} at day {t}"
                )
            ca, cb = ra.agents(i), rb.agents(j)
            for name in ca:
                np.testing.assert_array_equal(ca[name], cb[name], err_msg=f"cells {name} at day {t}")
        tsa, tsb = ra.timeseries(), rb.timeseries()
        if strict:
            np.testing.assert_array_equal(tsa["time"], tsb["time"])
        ia = np.isin(tsa["time"], tsb["time"])
        ib = np.isin(tsb["time"], tsa["time"])
        assert ia.sum() >= len(tsa["time"]) - 1
        for name in tsa:
            np.testing.assert_array_equal(tsa[name][ia], tsb[name][ib], err_msg=name)
        assert ra.events() == rb.events()


def test_resume_extends_a_finished_run_bitwise(tmp_path):
    full = tissuesim.load_config([*BASE, "duration_days=0.1"])
    run_to_directory(full, tmp_path / "full")
    short = tissuesim.load_config([*BASE, "duration_days=0.05"])
    run_to_directory(short, tmp_path / "short")
    cont = tissuesim.load_config([*BASE, "duration_days=0.1", f"resume={tmp_path / 'short'}"])
    summary = run_to_directory(
        cont, tmp_path / "cont", overrides=["duration_days=0.1", f"resume={tmp_path / 'short'}"]
    )
    assert summary["status"] == "completed" and summary["duration_days"] == pytest.approx(0.1)
    _assert_same_run(tmp_path / "full", tmp_path / "cont", strict=True)
    with tissuesim.open_run(tmp_path / "cont") as r:
        assert "resume:" in r.attrs["config"]


def test_resume_after_sigterm_equals_uninterrupted(tmp_path):
    run_to_directory(tissuesim.load_config([*BASE, "duration_days=0.3"]), tmp_path / "full")
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    run_dir = tmp_path / "cut"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tissuesim.cli", *BASE, "duration_days=0.3", f"hydra.run.dir={run_dir}"],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while time.time() < deadline:
        time.sleep(0.05)
        try:
            with tissuesim.open_run(run_dir) as r:
                if len(r.times) >= 3:
                    break
        except (OSError, KeyError):
            pass
    proc.send_signal(signal.SIGTERM)
    proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM
    stopped = json.loads((run_dir / "summary.json").read_text())["duration_days"]
    assert 0 < stopped < 0.3
    p = subprocess.run(
        [sys.executable, "-m", "tissuesim.cli", f"resume={run_dir}", f"hydra.run.dir={tmp_path / 'cont'}"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert p.returncode == 0, p.stderr[-2000:]
    _assert_same_run(tmp_path / "full", tmp_path / "cont", strict=False)


def test_resume_refuses_to_change_the_model(tmp_path):
    run_to_directory(tissuesim.load_config([*BASE, "duration_days=0.025"]), tmp_path / "a")
    cfg = tissuesim.load_config([*BASE, "therapy=bcma", f"resume={tmp_path / 'a'}"])
    with pytest.raises(ConfigError, match="therapy=bcma: a resumed run continues the same model"):
        run_to_directory(cfg, tmp_path / "b", overrides=["therapy=bcma", f"resume={tmp_path / 'a'}"])
    cfg = tissuesim.load_config([*BASE, f"resume={tmp_path / 'nowhere'}"])
    with pytest.raises(ConfigError, match=r"no snapshots\.h5 there"):
        run_to_directory(cfg, tmp_path / "c", overrides=[])
    # a run saved by a version with a key this one has dropped: one line saying so
    import h5py
    from omegaconf import OmegaConf

    with h5py.File(tmp_path / "a" / "snapshots.h5", "r+") as f:
        saved = OmegaConf.create(f.attrs["config"])
        OmegaConf.update(saved, "biology.rituximab_tissue_penetration", 0.1, force_add=True)
        f.attrs["config"] = OmegaConf.to_yaml(saved)
    cfg = tissuesim.load_config([*BASE, f"resume={tmp_path / 'a'}"])
    with pytest.raises(ConfigError) as info:
        run_to_directory(cfg, tmp_path / "d", overrides=[f"resume={tmp_path / 'a'}"])
    msg = str(info.value)
    assert "\n" not in msg and "does not fit this version" in msg and "rituximab_tissue_penetration" in msg
    with h5py.File(tmp_path / "a" / "snapshots.h5", "r+") as f:  # a tissue this version lacks
        f.attrs["config"] = f.attrs["config"].replace("name: muscle", "name: skin")
    with pytest.raises(
        ConfigError, match=r"its tissue 'skin' is not one of this version's \(from_labels, joint"
    ):
        run_to_directory(cfg, tmp_path / "e", overrides=[f"resume={tmp_path / 'a'}"])


def test_restore_from_a_checkpoint_without_a_newer_cell_attribute(caplog):
    """A checkpoint written before a cell attribute existed (here: without specific_to) restores
    the others and gives that attribute its registered fill for every cell, with a warning."""
    from tissuesim.io import checkpoint

    a = tissuesim.Simulation(tissuesim.load_config(BASE))
    a.run(until_day=0.05)
    arrays, meta = checkpoint.capture(a)
    a.cells["specific_to"][: a.cells.n] = 3  # what the restore must overwrite
    old = {k: v for k, v in arrays.items() if k != "cells/specific_to"}
    with caplog.at_level("WARNING", logger="tissuesim"):
        checkpoint.restore(a, old, meta)
    assert "specific_to" in caplog.text
    assert (a.cells["specific_to"][: a.cells.n] == -1).all()
    np.testing.assert_array_equal(a.cells["id"][: a.cells.n], arrays["cells/id"])
