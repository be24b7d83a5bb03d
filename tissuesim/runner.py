"""Run a Simulation into a run directory: snapshots.h5, timeseries.csv, summary.json.

Signals. SIGINT and SIGTERM do not kill the run: they ask the step loop to stop at the end of the
current step; the runner then writes a final snapshot, the timeseries table and the summary (with
``"status": "interrupted"``), closes the HDF5 file cleanly and raises :class:`Interrupted`, which
the command line turns into exit status 128 + signal number. A SIGKILL cannot be caught; the
SWMR file then still holds every snapshot flushed before it.
"""

from __future__ import annotations

import csv
import json
import logging
import os
import signal
import socket
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import h5py
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from tissuesim.io.hdf5 import SnapshotWriter
from tissuesim.simulation import Simulation

log = logging.getLogger("tissuesim")


class Interrupted(RuntimeError):
    """The run stopped early on a signal; its outputs are complete up to the stop."""

    def __init__(self, signum: int, day: float) -> None:
        self.signum = signum
        self.exit_code = 128 + signum
        super().__init__(
            f"interrupted by {signal.Signals(signum).name} at day {day:.3f}; outputs closed cleanly"
        )


@contextmanager
def _stop_on_signals(sim: Simulation):
    """Route SIGINT/SIGTERM to sim.request_stop while the block runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {}

    def handler(signum, _frame):
        if sim.stop_signal is not None:  # second signal: the user insists
            raise KeyboardInterrupt
        sim.request_stop(signum)

    for s in (signal.SIGINT, signal.SIGTERM):
        previous[s] = signal.signal(s, handler)
    try:
        yield
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def write_json_atomic(path: Path, obj) -> None:
    """Write JSON to a temporary file and rename it: readers never see half a file."""
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w") as fh:
        json.dump(obj, fh, indent=2, sort_keys=False)
        fh.write("\n")
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def write_timeseries_csv(path: Path, ts: dict) -> None:
    names = list(ts)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerow(names)
        for row in zip(*(ts[n] for n in names)):
            w.writerow([f"{v:.10g}" for v in row])
    os.replace(tmp, path)


def _progress_bar(sim: Simulation, enabled: bool):
    """tqdm bar over simulated days, refreshed only at output intervals; None off a terminal."""
    if not enabled or not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    try:
        size = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        size = os.terminal_size((0, 0))
    # A terminal that reports no size (some batch PTYs) would hide the bar: tqdm draws nothing at
    # zero width and hides bars below a zero screen height.
    width = {"dynamic_ncols": True} if size.columns > 0 and size.lines > 0 else {"ncols": 100, "nrows": 40}
    return tqdm(
        total=round(sim.duration_days, 6),
        unit="day",
        bar_format="{l_bar}{bar}| day {n:.2f}/{total:.0f} [{elapsed}<{remaining}{postfix}]",
        file=sys.stderr,
        **width,
    )


# What may differ between a run and its resumption: how long, how it is written, where it runs.
RESUMABLE_CHANGES = ("duration_days", "output", "backend", "device", "resume")


def resumed_config(cfg: DictConfig, overrides: list[str] | None = None) -> tuple[DictConfig, Path]:
    """The configuration of the run at ``cfg.resume``, with the allowed changes of ``cfg`` applied.

    overrides : the command-line overrides of this invocation (key=value); any key outside
        RESUMABLE_CHANGES is an error, since a resumed run must be the same model.
    Returns (config, path of the old snapshots.h5).
    """
    from tissuesim.biology.therapy import TherapyConfig
    from tissuesim.config import BackendConfig, Config, ConfigError, GridConfig, validate
    from tissuesim.io.hdf5 import open_run
    from tissuesim.tissue.schema import TISSUE_SCHEMAS

    old = Path(cfg.resume)
    h5 = old / "snapshots.h5" if old.is_dir() else old
    if not h5.is_file():
        raise ConfigError(
            f"resume={cfg.resume}: no snapshots.h5 there; allowed: a run directory of tissuesim"
        )
    changed = []
    for ov in overrides or []:
        key = ov.split("=", 1)[0].lstrip("+~").replace("/", ".")
        if key.startswith("hydra"):
            continue
        if key.split(".")[0] not in RESUMABLE_CHANGES:
            raise ConfigError(
                f"{ov}: a resumed run continues the same model; allowed changes: {', '.join(RESUMABLE_CHANGES)}"
            )
        changed.append(key)
    with open_run(h5) as r:
        saved = OmegaConf.create(r.attrs["config"])
    try:
        tissue = OmegaConf.select(saved, "tissue.name")
        if tissue not in TISSUE_SCHEMAS:
            raise ConfigError(
                f"resume={cfg.resume}: its tissue {tissue!r} is not one of this version's "
                f"({', '.join(sorted(TISSUE_SCHEMAS))})"
            )
        base = OmegaConf.structured(Config)
        base.tissue = OmegaConf.structured(TISSUE_SCHEMAS[tissue])
        base.therapy = OmegaConf.structured(TherapyConfig)
        base.grid = OmegaConf.structured(GridConfig)
        base.backend = OmegaConf.structured(BackendConfig)
        new = OmegaConf.merge(base, saved)
    except OmegaConfBaseException as e:  # a key this version no longer has (or a changed type)
        raise ConfigError(
            f"resume={cfg.resume}: its saved configuration does not fit this version of tissuesim "
            f"({str(e).splitlines()[0]}); allowed: a run made by a version with the same model"
        ) from None
    for key in changed:
        OmegaConf.update(new, key, OmegaConf.select(cfg, key), merge=False)
    new.resume = str(cfg.resume)
    validate(new)
    return new, h5


def _resume(sim: Simulation, old_h5: Path, writer: SnapshotWriter) -> None:
    """Restore the last checkpoint of old_h5 into sim and copy the outputs up to it into writer."""
    from tissuesim.io import checkpoint
    from tissuesim.io.hdf5 import open_run

    with open_run(old_h5) as r:
        day, arrays, meta = checkpoint.read(r.f)
        checkpoint.restore(sim, arrays, meta)
        eps = 1e-9
        for k, t in enumerate(r.times):
            if t <= day + eps:
                a = r.agents(k)
                writer.write_snapshot(float(t), r.fields(k), a)
        ts = r.timeseries()
        rows = []
        for i, t in enumerate(ts["time"]):
            if t <= day + eps:
                row = {name: float(v[i]) for name, v in ts.items()}
                writer.write_timeseries(float(t), row, flush=False)
                rows.append(row)
        sim._ts_rows = rows
    for ev in sim.event_log:
        writer.write_event(ev.day, ev.what, ev.detail)
    writer.flush()
    log.info("resumed %s from its checkpoint at day %.4f (step %d)", old_h5, day, sim.step_count)


def run_to_directory(
    cfg: DictConfig,
    run_dir: str | Path,
    job_num: int | None = None,
    backend=None,
    overrides: list[str] | None = None,
) -> dict:
    """Build the Simulation for ``cfg`` and run it, writing the run directory; returns the summary.

    run_dir must not already hold a snapshots.h5 (runs are never overwritten). With cfg.resume
    set, the run at that path continues from its last checkpoint into run_dir: the configuration
    is the old run's (``overrides`` may change only RESUMABLE_CHANGES, e.g. a longer duration),
    and the snapshots and timeseries up to the checkpoint are copied, so run_dir holds the whole
    run.
    """
    run_dir = Path(run_dir)
    old_h5 = None
    if cfg.resume:
        cfg, old_h5 = resumed_config(cfg, overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    h5_path = run_dir / "snapshots.h5"
    if h5_path.exists():
        raise FileExistsError(f"{h5_path} exists: runs are never overwritten; choose a new hydra.run.dir")

    t0 = time.perf_counter()
    if old_h5 is not None:
        from tissuesim.io import checkpoint

        with h5py.File(old_h5, "r", swmr=True) as f:
            _, _, meta = checkpoint.read(f)
        if cfg.seed is None:
            cfg.seed = int(meta["seed"])  # a sweep job's seed came from its job number
    sim = Simulation(cfg, backend=backend, job_num=job_num)
    log.info("backend: %s", sim.backend.describe())
    log.info("process %d on %s writing %s", os.getpid(), socket.gethostname(), run_dir)
    log.info(
        "tissue=%s therapy=%s grid=%s %s dx=%g um, dt=%g min, %d steps to day %g",
        cfg.tissue.name,
        cfg.therapy.name,
        cfg.grid.name,
        sim.grid.shape,
        sim.grid.dx,
        sim.dt_min,
        sim.n_steps,
        sim.duration_days,
    )
    writer = SnapshotWriter(
        h5_path,
        shape=sim.grid.shape,
        fields=sim.field_attrs(),
        cell_types=sim.cell_types,
        agent_attrs=sim.agent_attr_dtypes(),
        timeseries=sim.timeseries_names(),
        root_attrs=sim.provenance(OmegaConf.to_yaml(cfg, resolve=True)),
        tissue_writer=sim.tissue.to_hdf5_group,
        compression=cfg.output.compression,
        compression_level=cfg.output.compression_level,
        checkpoint_spec=sim.checkpoint_spec(),
        dx=sim.grid.dx,
        origin=sim.grid.origin,
    )
    if old_h5 is not None:
        _resume(sim, old_h5, writer)
    bar = _progress_bar(sim, cfg.output.progress)
    state = {"last_t": time.perf_counter(), "last_step": 0}

    def on_output(s: Simulation) -> None:
        now = time.perf_counter()
        rate = (s.step_count - state["last_step"]) / max(now - state["last_t"], 1e-9)
        state.update(last_t=now, last_step=s.step_count)
        counts = s.last_counts()
        if bar is not None:
            bar.n = round(s.day, 6)
            bar.set_postfix_str(
                f"{rate:.0f} steps/s, " + " ".join(f"{k}={v}" for k, v in counts.items() if v), refresh=True
            )
        log.debug("day %.3f: %.0f steps/s %s", s.day, rate, counts)

    status = "completed"
    try:
        with _stop_on_signals(sim):
            status = sim.run(writer=writer, on_output=on_output)
    finally:
        if bar is not None:
            bar.close()
        if sim.step_count and writer.n_snapshots and sim.last_snapshot_step != sim.step_count:
            sim.write_snapshot(writer)  # the state at the stop, whatever stopped us
        writer.close()
        wall = time.perf_counter() - t0
        if sys.exc_info()[0] is not None and status == "completed":
            status = "failed"
        summary = sim.summary(wall_seconds=wall, status=status)
        write_timeseries_csv(run_dir / "timeseries.csv", sim.timeseries_table())
        write_json_atomic(run_dir / "summary.json", summary)
        log.info(
            "%s: day %.3f after %.1f s (%.0f steps/s); outputs in %s",
            status,
            sim.day,
            wall,
            summary["steps_per_second"] or 0,
            run_dir,
        )
    if status == "interrupted":
        raise Interrupted(sim.stop_signal, sim.day)
    return summary
