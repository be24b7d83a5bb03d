"""The Simulation loop, its schedule and the run directory it writes (end to end, NumPy)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import h5py
import numpy as np
import pytest

import tissuesim
from tissuesim.runner import run_to_directory

SUMMARY_KEYS = [
    "tissue",
    "therapy",
    "seed",
    "backend",
    "device",
    "duration_days",
    "wall_seconds",
    "steps_per_second",
    "car_t_peak_day",
    "car_t_peak_blood_per_ul",
    "b_cell_depletion_day",
    "b_cell_recovery_day",
    "autoantibody_rel",
    "max_crs_grade",
    "relapse_day",
    "final_damage_rel",
]
ROOT_ATTRS = [
    "tissuesim_version",
    "git_commit",
    "config",
    "seed",
    "backend",
    "device",
    "dx_um",
    "dt_min",
    "shape",
    "created",
]

TINY = ["grid=tiny", "backend=numpy", "output.progress=false"]


def tiny_cfg(*extra):
    return tissuesim.load_config([*TINY, *extra])


def test_run_directory_contract(tmp_path):
    cfg = tiny_cfg(
        "duration_days=0.5", "output.snapshot_every_days=0.25", "output.timeseries_every_days=0.125"
    )
    summary = run_to_directory(cfg, tmp_path)
    for name in ("snapshots.h5", "summary.json", "timeseries.csv"):
        assert (tmp_path / name).is_file()
    on_disk = json.loads((tmp_path / "summary.json").read_text())
    assert on_disk == json.loads(json.dumps(summary))
    for k in SUMMARY_KEYS:
        assert k in on_disk
    assert on_disk["status"] == "completed" and on_disk["backend"] == "numpy"
    assert on_disk["duration_days"] == pytest.approx(0.5)
    with tissuesim.open_run(tmp_path) as r:
        np.testing.assert_allclose(r.times, [0.0, 0.25, 0.5])
        for k in ROOT_ATTRS:
            assert k in r.attrs
        assert tuple(r.attrs["shape"]) == (1, 48, 48)
        assert "tissue:" in r.attrs["config"] and "therapy:" in r.attrs["config"]
        ts = r.timeseries()
        np.testing.assert_allclose(ts["time"], [0, 0.125, 0.25, 0.375, 0.5])
        assert r.labels.shape == (1, 48, 48)
        assert set(r.field_names) >= {"cxcl13", "cxcl10", "ifng", "il6", "autoantibody", "damage"}
        assert sum(ts[f"count_{t}"][0] for t in r.cell_types) == len(r.agents(0)["id"])
        ev = r.events()
    assert [e["what"] for e in ev] == ["lymphodepletion", "infuse_cd19_car_t"]
    assert [e["what"] for e in on_disk["events"]] == ["lymphodepletion", "infuse_cd19_car_t"]
    csv_lines = (tmp_path / "timeseries.csv").read_text().splitlines()
    assert csv_lines[0].startswith("time,") and len(csv_lines) == 6


def test_same_seed_same_run_different_seed_differs(tmp_path):
    def final(seed, d):
        run_to_directory(tiny_cfg("duration_days=0.05", f"seed={seed}"), tmp_path / d)
        with tissuesim.open_run(tmp_path / d) as r:
            return r.agents(-1)["position"], r.fields(-1)

    p1, f1 = final(1, "a")
    p2, f2 = final(1, "b")
    p3, _ = final(2, "c")
    np.testing.assert_array_equal(p1, p2)
    for k in f1:
        np.testing.assert_array_equal(f1[k], f2[k])
    assert p1.shape != p3.shape or not np.array_equal(p1, p3)


def test_step_advances_the_clock_by_dt():
    sim = tissuesim.Simulation(tiny_cfg("dt_min=0.5", "duration_days=1"))
    for _ in range(3):
        sim.step()
    assert sim.step_count == 3 and sim.day == pytest.approx(1.5 / 1440)
    assert sim.run(until_day=0.01) == "completed"
    assert sim.step_count == round(0.01 * 1440 / 0.5)


def _tissuesim(*args, **kw):
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    return subprocess.run(
        [sys.executable, "-m", "tissuesim.cli", *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
        **kw,
    )


def test_console_run_and_refusal_to_overwrite(tmp_path):
    run_dir = tmp_path / "run"
    p = _tissuesim(*TINY, "duration_days=0.1", f"hydra.run.dir={run_dir}")
    assert p.returncode == 0, p.stderr
    assert (run_dir / ".hydra" / "config.yaml").is_file()
    assert (run_dir / "tissuesim.log").is_file()
    assert "backend: numpy" in (run_dir / "tissuesim.log").read_text()
    before = (run_dir / "snapshots.h5").read_bytes()
    p = _tissuesim(*TINY, "duration_days=0.1", f"hydra.run.dir={run_dir}")
    assert p.returncode == 2
    assert len(p.stderr.strip().splitlines()) == 1 and "never overwritten" in p.stderr
    assert (run_dir / "snapshots.h5").read_bytes() == before


def test_multirun_basic_launcher(tmp_path):
    sweep = tmp_path / "sweep"
    p = _tissuesim("-m", *TINY, "duration_days=0.05", "seed=3,4", f"hydra.sweep.dir={sweep}")
    assert p.returncode == 0, p.stderr
    seeds = sorted(json.loads((sweep / str(i) / "summary.json").read_text())["seed"] for i in (0, 1))
    assert seeds == [3, 4]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_signal_gives_final_snapshot_and_summary(tmp_path, sig):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "tissuesim.cli",
            *TINY,
            "duration_days=200",
            "output.snapshot_every_days=0.01",
            f"hydra.run.dir={run_dir}",
        ],
        env=env,
        stderr=subprocess.PIPE,
        text=True,
    )
    h5 = run_dir / "snapshots.h5"
    deadline = time.time() + 120
    n = 0
    while time.time() < deadline and n < 2:
        time.sleep(0.2)
        if h5.exists():
            try:
                with tissuesim.open_run(run_dir) as r:
                    n = len(r.times)
            except OSError:
                pass
    assert n >= 2, "run did not start writing"
    proc.send_signal(sig)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + sig, err
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "interrupted"
    assert 0 < summary["duration_days"] < 200
    with h5py.File(h5, "r") as f:  # closed cleanly: opens without SWMR
        assert f["time"][-1] == pytest.approx(summary["duration_days"])
    assert len((run_dir / "timeseries.csv").read_text().splitlines()) >= 2


def test_progress_bar_on_a_terminal_only(tmp_path):
    import pty
    import select

    args = [sys.executable, "-m", "tissuesim.cli", "grid=tiny", "backend=numpy", "duration_days=0.05"]
    env = {**os.environ, "PYTHONWARNINGS": "ignore", "COLUMNS": "160"}
    # not a terminal: no bar
    p = _tissuesim("grid=tiny", "backend=numpy", "duration_days=0.05", f"hydra.run.dir={tmp_path / 'a'}")
    assert p.returncode == 0 and "steps/s," not in p.stderr + p.stdout
    # a terminal: the bar shows the simulated day, steps/s and cell counts
    master, slave = pty.openpty()
    proc = subprocess.Popen([*args, f"hydra.run.dir={tmp_path / 'b'}"], stderr=slave, stdout=slave, env=env)
    os.close(slave)
    out = b""
    while True:
        r, _, _ = select.select([master], [], [], 60)
        if not r:
            break
        try:
            chunk = os.read(master, 65536)
        except OSError:
            break
        if not chunk:
            break
        out += chunk
    proc.wait(timeout=60)
    text = out.decode(errors="replace")
    assert proc.returncode == 0
    assert "steps/s," in text and "day 0.05/" in text and "macrophage=" in text, text[-500:]


def test_device_flags_are_reported_at_output_time(caplog):
    """A cell found inside a closed voxel raises a device flag that the timeseries row logs."""
    import logging

    sim = tissuesim.Simulation(tiny_cfg("duration_days=1"))
    closed = np.argwhere(~sim.tissue.open_mask())
    k, j, i = closed[len(closed) // 2]
    centre = (np.array([i, j, k], dtype=np.float32) + 0.5) * sim.grid.dx
    sim.cells.add(sim.xp.asarray(centre[None]), 0)
    sim.step()
    with caplog.at_level(logging.WARNING):
        sim.record_timeseries()
    assert any("closed voxel" in r.getMessage() for r in caplog.records)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        sim.record_timeseries()  # read and cleared: reported once
    assert not any("closed voxel" in r.getMessage() for r in caplog.records)
