"""The Simulation: state (grid, tissue, fields, cells, blood, clock) and the step loop.

One step of ``dt_min`` minutes runs, in this order (DESIGN.md section 2, one direction only):
therapy events -> blood ODE and arrivals from blood -> cells sense fields and move -> contacts
(kill, engage) -> deaths, divisions, differentiation -> exits into blood -> secretion sources ->
fields react and diffuse -> clock (tissuesim.biology.immunology holds the biology).
On the GPU a step reads device memory once: the cell count after deaths and births, with the
exits per type and the blood compartment (Population.remove_and_divide). The blood ODE runs as
a kernel just before that read (exits into blood, then the next step's advance; see
biology/blood_device.py), and the next step's arrivals are drawn on the host from what it
read. Readouts, flags and snapshots are copied to the host only at output intervals
(timeseries rows and snapshots), which are whole numbers of steps.

Usable from Python without Hydra::

    from tissuesim import Simulation, load_config
    cfg = load_config(["grid=tiny", "duration_days=1"])
    sim = Simulation(cfg)
    sim.run()                       # or sim.step() in your own loop
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable

import numpy as np
from omegaconf import DictConfig, OmegaConf

from tissuesim import provenance
from tissuesim.analysis.readouts import compute_readouts
from tissuesim.backend import Backend, select_backend
from tissuesim.biology.therapy import Event, TherapySchedule
from tissuesim.config import validate
from tissuesim.grid import Grid
from tissuesim.units import days

log = logging.getLogger("tissuesim")

#: Cell type names (DESIGN.md section 5); /agents/type stores the index into this tuple.
CELL_TYPES = ("b_cell", "plasmablast", "plasma_cell", "cd19_car_t", "bcma_car_t", "anti_car_t", "macrophage")


def _steps(interval_days: float, dt_min: float) -> int:
    """Whole steps in an output interval (at least one)."""
    return max(1, round(interval_days * days / dt_min))


class Simulation:
    """A tissue patch with its fields, cells and blood, advanced in steps of ``dt_min``.

    Parameters
    ----------
    cfg : the run configuration (DictConfig of tissuesim.config.Config); validated here.
    backend : a Backend to use; default chooses from cfg.backend.name and cfg.device.
    job_num : Hydra job number in a multirun (spreads jobs over GPUs when device is unset).

    Attributes
    ----------
    grid : Grid (nz, ny, nx), dx um.
    tissue : tissuesim.tissue.Tissue (labels and compartment properties).
    fields : tissuesim.fields.FieldSet, values (n_fields, nz, ny, nx) on the backend.
    cells : tissuesim.agents.Population.
    step_count : steps taken; ``day`` = step_count * dt_min / 1440.
    """

    def __init__(self, cfg: DictConfig, backend: Backend | None = None, job_num: int | None = None) -> None:
        if not isinstance(cfg, DictConfig):
            cfg = OmegaConf.structured(cfg)
        validate(cfg)
        self.cfg = cfg
        self.backend = backend or select_backend(cfg.backend.name, cfg.device, job_num)
        self.xp = self.backend.xp
        # Unset seed: 0 for a single run, the job number in a sweep, so jobs differ unless the
        # user fixes the seed (seed=0 for paired comparisons, seed=0,1,2 to sweep it).
        self.seed = int(cfg.seed) if cfg.seed is not None else int(job_num or 0)
        self.dt_min = float(cfg.dt_min)
        self.duration_days = float(cfg.duration_days)
        self.n_steps = max(1, round(self.duration_days * days / self.dt_min))
        g = cfg.grid
        self.grid = Grid((g.nz, g.ny, g.nx), g.dx_um)
        self.cell_types = CELL_TYPES
        self.step_count = 0
        self.stop_signal: int | None = None
        self.last_snapshot_step: int | None = None
        #: CuPy: snapshots leave the device through staging and pinned buffers while the next
        #: steps run (tissuesim.io.staging; conf output.async_snapshots); False copies them at once
        self.async_snapshots = bool(cfg.output.get("async_snapshots", True))
        self._stager = None
        self._ts_rows: list[dict[str, float]] = []
        self._counts: dict[str, int] = {}

        self._build_tissue()
        self._build_fields()
        self._build_cells()
        # Dated events and relapse-triggered infusions still to give (biology.therapy).
        self.schedule = TherapySchedule(cfg.therapy)
        self.event_log: list[Event] = []
        self._build_biology()

    # ---------------------------------------------------------------------------------------
    # construction
    def _build_tissue(self) -> None:
        from tissuesim.tissue import build_tissue

        self.tissue = build_tissue(self.cfg.tissue, self.grid, self.seed)

    def _build_fields(self) -> None:
        from tissuesim.config import active_fields
        from tissuesim.fields import FieldSet, FieldSpec

        # fields tied to a product the therapy does not give (rituximab) are left out of the run
        present = {n: self.cfg.fields[n] for n in active_fields(self.cfg)}
        specs = []
        for name, f in present.items():
            specs.append(
                FieldSpec(
                    name=name,
                    diffusion_um2_per_min=f.diffusion_um2_per_min,
                    decay_per_min=f.decay_per_min,
                    solver=f.solver,
                    units=f.units,
                    long_name=f.long_name,
                    max_substeps=f.max_substeps,
                )
            )
        self.field_specs = specs
        vessel = self.tissue.vessel_mask().astype(np.float32)
        # A vessel voxel exchanges through about one voxel face of wall: rate = P * dx^2 / dx^3.
        vessel_rate = {
            name: vessel * (f.vessel_permeability_um_per_min / self.grid.dx) for name, f in present.items()
        }
        self.fields = FieldSet(
            self.backend,
            self.grid,
            specs,
            D_multiplier={
                n: self.tissue.diffusion_multiplier(f.diffuses_as or n) for n, f in present.items()
            },
            vessel_rate=vessel_rate,
            dtype=self.cfg.backend.dtype,
            dt=self.dt_min,
            # nothing in a run reads the mass budget; tracking it costs work every step and
            # keeps the GPU field step out of its CUDA graph
            track_budget=False,
        )
        for name, arr in self.tissue.initial_fields.items():
            if name in self.fields.names:
                self.fields[name][...] = self.xp.asarray(arr, dtype=self.fields.values.dtype)
        # Blood concentrations seen by the vessel exchange (n_fields,), kept on the device.
        # Until the systemic model lands they hold the baseline: autoantibody at 1 (= baseline).
        c = np.zeros(len(specs), dtype=self.fields.values.dtype)
        if "autoantibody" in self.fields.names:
            c[self.fields.index("autoantibody")] = 1.0
        self.c_blood = self.xp.asarray(c)

    def _build_cells(self) -> None:
        from tissuesim.agents import MotilityParams, Population
        from tissuesim.agents.motility import init_velocity

        unknown = set(self.tissue.initial_cells) - set(self.cell_types)
        if unknown:
            raise ValueError(f"tissue places unknown cell types {sorted(unknown)}; known: {self.cell_types}")
        self.motility = []
        for t in self.cell_types:
            c = self.cfg.cells.get(t)
            if c is None:
                self.motility.append(MotilityParams(speed_um_per_min=0.0))
                continue
            self.motility.append(
                MotilityParams(
                    speed_um_per_min=c.speed_um_per_min,
                    persistence_min=c.persistence_min,
                    chemotaxis_field=c.chemotaxis_field,
                    chemotactic_sensitivity_um2_per_min=c.chemotactic_sensitivity_um2_per_min,
                    receptor_kd=c.receptor_kd,
                    max_drift_fraction=c.max_drift_fraction,
                    crowding_radius_um=c.radius_um,
                    crowding_stiffness_per_min=c.crowding_stiffness_per_min,
                )
            )
        n0 = sum(len(p) for p in self.tissue.initial_cells.values())
        self.cells = Population(self.backend, capacity=max(1024, 2 * n0))
        for tname in self.cell_types:
            pos = self.tissue.initial_cells.get(tname)
            if pos is not None and len(pos):
                self.cells.add(self.xp.asarray(pos, dtype=np.float32), self.cell_types.index(tname))
        # Start every walk from its stationary velocity law, so MSD statistics hold from t = 0.
        init_velocity(self.cells, self.motility, self.grid.ndim, self.seed)
        self.open_mask = self.xp.asarray(self.tissue.open_mask())

    def _build_biology(self) -> None:
        from tissuesim.biology.immunology import Immunology

        self.immunology = Immunology(self)
        self.blood = self.immunology.blood
        self._crs_max_since_row = 0

    # ---------------------------------------------------------------------------------------
    # the clock
    @property
    def day(self) -> float:
        return self.step_count * self.dt_min / days

    def request_stop(self, signum: int) -> None:
        """Ask run() to stop after the current step (signal handlers call this)."""
        self.stop_signal = signum

    def step(self) -> None:
        """Advance one step of dt_min minutes."""
        self._apply_events()
        imm = self.immunology
        for what in imm.before_move(self.step_count, self.dt_min):
            self._log_event(Event(self.blood.day, what, "CRS grade 2 reached"))
        self._check_relapse()
        self._move_cells()
        imm.after_move(self.step_count, self.dt_min)
        self._crs_max_since_row = max(self._crs_max_since_row, self.blood.step_grade)
        if imm.blood_on_device:  # written by this step's blood kernel: no host-to-device copy
            self.c_blood[...] = imm.c_blood_device()
        else:
            self.c_blood = self.xp.asarray(imm.c_blood(self.fields.names, self.fields.values.dtype))
        self.fields.step(self.dt_min, source=imm.source, uptake=imm.uptake, c_blood=self.c_blood)
        self.step_count += 1

    @property
    def pending_events(self) -> list[Event]:
        return self.schedule.pending

    @pending_events.setter
    def pending_events(self, events: list[Event]) -> None:
        self.schedule.pending = list(events)

    def _apply_events(self) -> None:
        for ev in self.schedule.due((self.step_count + 1) * self.dt_min / days):
            self.schedule.apply(ev, self.blood)
            self._log_event(ev)

    def _log_event(self, ev: Event) -> None:
        self.event_log.append(ev)
        if self._writer is not None:
            self._writer.write_event(ev.day, ev.what, ev.detail)

    def _check_relapse(self) -> None:
        """Give relapse-triggered infusions once relapse is detected and their day is reached."""
        for ev in self.schedule.on_relapse(self.blood.day, self.blood.relapse, self.event_log):
            self.schedule.apply(ev, self.blood)
            self._log_event(ev)

    def _move_cells(self) -> None:
        from tissuesim.agents import move

        move(
            self.cells,
            self.grid,
            self.open_mask,
            self.dt_min,
            self.step_count,
            self.seed,
            motility=self.motility,
            fields=self.fields,
        )

    # ---------------------------------------------------------------------------------------
    # outputs
    _writer = None

    def field_attrs(self) -> dict[str, dict]:
        return {
            s.name: {
                "units": s.units,
                "long_name": s.long_name,
                "diffusion_um2_per_min": s.diffusion_um2_per_min,
                "decay_per_min": s.decay_per_min,
            }
            for s in self.field_specs
        }

    def agent_attr_dtypes(self) -> dict[str, str]:
        return {"state": "u1", "age_min": "f4"}

    def timeseries_names(self) -> list[str]:
        """Timeseries columns: patch counts, field means, then the blood row (Blood.row)."""
        blood = list(self.blood.row())
        return [f"count_{t}" for t in self.cell_types] + [f"mean_{n}" for n in self.fields.names] + blood

    def provenance(self, config_yaml: str) -> dict:
        return {
            "tissuesim_version": provenance.version(),
            "git_commit": provenance.git_commit(),
            "config": config_yaml,
            "seed": self.seed,
            "backend": self.backend.name,
            "device": -1 if self.backend.device is None else self.backend.device,
            "dx_um": self.grid.dx,
            "dt_min": self.dt_min,
            "shape": np.asarray(self.grid.shape, dtype=np.int64),
            "created": provenance.now_iso(),
        }

    def last_counts(self) -> dict[str, int]:
        return dict(self._counts)

    def record_timeseries(self, writer=None) -> dict[str, float]:
        """Read counts and field means back to the host (a sync point) and append a row.

        The cells' device flags (pair-buffer overflow, capped steps, cells found in closed voxels,
        unknown types) are read here too, at output time only, and logged as warnings.
        """
        self.cells.check_flags()
        types = self.backend.asnumpy(self.cells.type[: self.cells.n])
        counts = np.bincount(types, minlength=len(self.cell_types))
        self._counts = {t: int(c) for t, c in zip(self.cell_types, counts)}
        means = self.backend.asnumpy(self.fields.values.reshape(len(self.fields.names), -1).mean(axis=1))
        row = {"time": self.day}
        row.update({f"count_{t}": float(c) for t, c in self._counts.items()})
        row.update({f"mean_{n}": float(m) for n, m in zip(self.fields.names, means)})
        b = self.blood
        row.update(b.row())
        # the highest grade since the last row, so a short CRS peak between rows is not missed
        row["crs_grade"] = float(max(self._crs_max_since_row, b.crs_grade()))
        self._crs_max_since_row = 0
        self._ts_rows.append(row)
        if writer is not None:
            writer.write_timeseries(self.day, row)
        return row

    def snapshot(self) -> tuple[dict[str, np.ndarray], dict[str, np.ndarray]]:
        """Host copies of the fields {name: (nz, ny, nx)} and cells {attr: (n, ...)}."""
        vals = self.backend.asnumpy(self.fields.values)
        fields = {n: vals[i] for i, n in enumerate(self.fields.names)}
        from tissuesim.io.staging import AGENT_ATTRS

        n = self.cells.n
        agents = {out: self.backend.asnumpy(self.cells[attr][:n]).copy() for out, attr in AGENT_ATTRS.items()}
        return fields, agents

    def write_snapshot(self, writer) -> None:
        """Write a snapshot of the state now, after any snapshot still in flight (synchronous)."""
        self.flush_snapshots()
        fields, agents = self.snapshot()
        writer.write_snapshot(self.day, fields, agents)
        self.last_snapshot_step = self.step_count

    def _submit_snapshot(self, writer) -> None:
        """A snapshot of the state now, written once its copy has left the device (see
        tissuesim.io.staging; on NumPy, or with async_snapshots off, at once)."""
        from tissuesim.io.staging import Stager

        if self._stager is None:
            gpu = self.backend.is_gpu and self.async_snapshots
            self._stager = Stager(self, "cupy" if gpu else None)
        self._stager.submit(writer, self.day)
        self.last_snapshot_step = self.step_count

    def flush_snapshots(self) -> None:
        """Wait for the snapshot in flight, if any, and write it."""
        if self._stager is not None:
            self._stager.flush()

    def run(
        self,
        writer=None,
        on_output: Callable[[Simulation], None] | None = None,
        until_day: float | None = None,
    ) -> str:
        """Step to ``until_day`` (default the configured duration), writing on schedule.

        Snapshots every output.snapshot_every_days and timeseries rows every
        output.timeseries_every_days, both at day 0 and at the end. Returns 'completed', or
        'interrupted' when request_stop() was called (the loop stops after the current step).
        """
        self._writer = writer
        last = self.n_steps if until_day is None else max(0, round(until_day * days / self.dt_min))
        out = self.cfg.output
        snap_every = _steps(out.snapshot_every_days, self.dt_min)
        ts_every = _steps(out.timeseries_every_days, self.dt_min)
        # Checkpoints on schedule, and always at the end and on a stop, so any run can be resumed
        # or extended (tissuesim resume=RUN_DIR).
        ck_every = _steps(out.checkpoint_every_days, self.dt_min) if out.checkpoint_every_days > 0 else 0
        status = "completed"
        ok = False
        try:
            if self.step_count == 0:
                self.record_timeseries(writer)
                if writer is not None:
                    self._submit_snapshot(writer)
                if on_output:
                    on_output(self)
            while self.step_count < last:
                self.step()
                if self._stager is not None:
                    self._stager.poll()
                s = self.step_count
                final = s == last
                wrote = False
                if s % ts_every == 0 or final:
                    self.record_timeseries(writer)
                    wrote = True
                if writer is not None and (s % snap_every == 0 or final):
                    self._submit_snapshot(writer)
                    wrote = True
                if wrote and on_output:
                    on_output(self)
                stopping = self.stop_signal is not None and not final
                if writer is not None and (final or stopping or (ck_every and s % ck_every == 0)):
                    self.write_checkpoint(writer)
                if stopping:
                    status = "interrupted"
                    if not wrote:
                        self.record_timeseries(writer)
                    break
            ok = True
        finally:
            # every snapshot taken is in the file when run() returns or raises; when run() raises,
            # a failing flush is logged and the first error propagates
            if ok:
                self.flush_snapshots()
            else:
                try:
                    self.flush_snapshots()
                except Exception:
                    log.warning("the snapshot in flight could not be written", exc_info=True)
        return status

    def write_checkpoint(self, writer) -> None:
        """Append the full restartable state to the writer's file (a sync point)."""
        from tissuesim.io import checkpoint

        self.flush_snapshots()  # the file holds every snapshot up to a checkpoint
        arrays, meta = checkpoint.capture(self)
        writer.write_checkpoint(self.day, arrays, meta)

    def checkpoint_spec(self) -> dict:
        from tissuesim.io import checkpoint

        return checkpoint.checkpoint_spec(self)

    def timeseries_table(self) -> dict[str, list[float]]:
        names = ["time", *self.timeseries_names()]
        return {n: [r.get(n, math.nan) for r in self._ts_rows] for n in names}

    def summary(self, wall_seconds: float, status: str = "completed") -> dict:
        """summary.json content (DESIGN.md section 5); readouts null where not reached."""
        ts = {k: np.asarray(v, dtype=float) for k, v in self.timeseries_table().items()}
        out = {
            "tissue": self.cfg.tissue.name,
            "therapy": self.cfg.therapy.name,
            "seed": self.seed,
            "backend": self.backend.name,
            "device": self.backend.device,
            "duration_days": self.day,
            "wall_seconds": round(wall_seconds, 3),
            "steps_per_second": (self.step_count / wall_seconds)
            if wall_seconds > 0 and self.step_count
            else None,
        }
        out.update(compute_readouts(ts))
        out["status"] = status
        out["requested_duration_days"] = self.duration_days
        out["steps"] = self.step_count
        out["events"] = [{"day": e.day, "what": e.what, "detail": e.detail} for e in self.event_log]
        return out
