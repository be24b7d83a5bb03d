"""FieldSpec and FieldSet: all reaction-diffusion fields of a simulation, stacked on one backend."""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import numpy as np

from tissuesim.fields import ops
from tissuesim.fields.boundary import normalize_bc
from tissuesim.fields.solvers import (
    AUTO_MAX_EXPLICIT_SUBSTEPS,
    explicit_stable_dt,
    stencil_weight,
    substeps_needed,
)

log = logging.getLogger(__name__)

SOLVERS = ("auto", "explicit", "lod")
BUDGET_TERMS = ("dirichlet_in", "vessel_in", "source_in", "decay_out", "uptake_out")


@dataclass
class FieldSpec:
    """One diffusing (or not) species.

    name : key of the field (e.g. 'cxcl13'); also its HDF5 dataset name.
    diffusion_um2_per_min : D in um^2/min in plain tissue (FieldSet's D_multiplier scales it per
        voxel); 0 for a field that does not diffuse (damage).
    decay_per_min : first-order loss rate k in 1/min (ln 2 / half-life).
    solver : 'auto' | 'explicit' | 'lod' (see tissuesim.fields).
    units, long_name : metadata for outputs.
    bc : face -> condition mapping (tissuesim.fields.boundary); faces left out are zero-flux.
    max_substeps : most forward-Euler substeps the explicit solver may take per step (None: no
        limit); more raises a one-line error naming the field, dt and the stable limit.
    """

    name: str
    diffusion_um2_per_min: float
    decay_per_min: float = 0.0
    solver: str = "auto"
    units: str = ""
    long_name: str = ""
    bc: Mapping = field(default_factory=dict)
    max_substeps: int | None = None

    def __post_init__(self) -> None:
        if self.solver not in SOLVERS:
            raise ValueError(f"field {self.name!r}: solver={self.solver!r}: allowed are {', '.join(SOLVERS)}")
        if not (self.diffusion_um2_per_min >= 0 and math.isfinite(self.diffusion_um2_per_min)):
            raise ValueError(
                f"field {self.name!r}: diffusion_um2_per_min={self.diffusion_um2_per_min}: must be >= 0"
            )
        if not (self.decay_per_min >= 0 and math.isfinite(self.decay_per_min)):
            raise ValueError(f"field {self.name!r}: decay_per_min={self.decay_per_min}: must be >= 0")
        if self.max_substeps is not None and int(self.max_substeps) < 1:
            raise ValueError(f"field {self.name!r}: max_substeps={self.max_substeps}: must be >= 1 or None")


@dataclass
class _Plan:
    """Host-side schedule of one step length: which fields go through which scheme."""

    explicit: list  # [(n_substeps, slots (backend int32), {face: slots with Dirichlet there})]
    lod: tuple | None  # (slots, {face: slots}) or None
    solver: dict  # name -> 'explicit' | 'lod' | 'none'
    substeps: dict  # name -> explicit substeps (0 for lod / none)
    #: per explicit group: slice(first, last + 1) when its slots are consecutive, else the host
    #: list of slots (for the odd-substep copy, which must not read the device slot array)
    explicit_host: list


def _abandon(stream) -> None:
    """End a failed capture, discarding what was captured."""
    try:
        stream.end_capture()
    except Exception:
        pass


def _buffer_key(a):
    """Identity of a device buffer for the graph key (None for no array)."""
    return None if a is None else (ops._ptr(a), tuple(a.shape), a.dtype.str)


class FieldSet:
    """All fields of a simulation, stacked as ``values`` (n_fields, nz, ny, nx) on the backend.

    Per field f, with lengths in um and times in min::

        du/dt = div(D_f(x) grad u) - k_f u - lambda_f(x) u + S_f(x) + vr_f(x) (c_b,f - u)

    D_f(x) = diffusion_um2_per_min * D_multiplier[name](x) (um^2/min); k_f = decay_per_min;
    lambda (uptake, 1/min) and S (source, units/min) are passed to :meth:`step`; vr (vessel_rate,
    1/min) is P * vessel wall area / voxel volume, and c_b the blood concentration (units of u).

    Each step integrates the linear reactions (sources included) exactly per voxel over the whole
    dt first, then diffusion (explicit or LOD per field, see tissuesim.fields): Lie splitting,
    first order in dt, in the order that leaves a step's secretion spread when cells read it.

    Parameters
    ----------
    be : Backend. grid : Grid. specs : sequence of FieldSpec (distinct names).
    D_multiplier : None or {name: (nz, ny, nx) array} of dimensionless multipliers (default 1);
        a voxel with multiplier 0 is impermeable.
    vessel_rate : None, a (nz, ny, nx) array shared by all fields, or {name: (nz, ny, nx)} (1/min).
    dtype : 'float32' (default) or 'float64'.
    dt : the step in min the simulation will use; solvers are chosen and explicit limits checked
        here (errors before any work). step() accepts another dt and re-plans for it.
    track_budget : keep device-side accumulators of what enters and leaves (see :meth:`budget`).
    """

    def __init__(
        self,
        be,
        grid,
        specs: Sequence[FieldSpec],
        D_multiplier: Mapping | None = None,
        vessel_rate=None,
        dtype: str = "float32",
        dt: float | None = None,
        track_budget: bool = True,
    ):
        self.be = be
        self.grid = grid
        self.specs = list(specs)
        self.names = [s.name for s in self.specs]
        if len(set(self.names)) != len(self.names):
            raise ValueError(f"field names must be distinct, got {self.names}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype={dtype!r}: allowed are 'float32', 'float64'")
        xp = be.xp
        self.xp = xp
        nf = len(self.specs)
        shape = grid.shape
        self.track_budget = bool(track_budget)
        self.time = 0.0

        D_multiplier = dict(D_multiplier or {})
        unknown = set(D_multiplier) - set(self.names)
        if unknown:
            raise ValueError(f"D_multiplier names unknown fields {sorted(unknown)}; fields are {self.names}")
        D = np.zeros((nf, *shape), dtype=self.dtype)
        self.D_max = {}
        for f, s in enumerate(self.specs):
            m = (
                np.ones(shape)
                if s.name not in D_multiplier
                else np.asarray(_host(be, D_multiplier[s.name]), float)
            )
            if m.shape != shape:
                raise ValueError(f"D_multiplier[{s.name!r}] has shape {m.shape}, the grid is {shape}")
            if not (np.all(np.isfinite(m)) and np.all(m >= 0)):
                raise ValueError(f"D_multiplier[{s.name!r}] must be finite and >= 0")
            D[f] = s.diffusion_um2_per_min * m
            self.D_max[s.name] = float(D[f].max())
        self.D = xp.asarray(D)

        kinds = np.zeros((nf, 6), dtype=np.int32)
        vals = np.zeros((nf, 6), dtype=np.float64)
        for f, s in enumerate(self.specs):
            kinds[f], vals[f] = normalize_bc(s.bc, shape, who=f"field {s.name!r}")
        self._kinds_host = kinds
        #: per field, W of its explicit limit h <= dx^2 / (W D_max) (solvers.stencil_weight)
        self._weights = [stencil_weight(kinds[f], shape) for f in range(nf)]
        self.bc_kind = xp.asarray(kinds)
        self.bc_val = xp.asarray(vals.astype(self.dtype))

        self.k = xp.asarray(np.array([s.decay_per_min for s in self.specs], dtype=np.float64))
        self._vr, self._vr_sum = self._vessels(vessel_rate)

        self.values = xp.zeros((nf, *shape), dtype=self.dtype)
        self._all = xp.arange(nf, dtype=xp.int32)
        self._decaying = xp.asarray(
            np.array([f for f, s in enumerate(self.specs) if s.decay_per_min > 0], np.int32)
        )
        self._mask_all = xp.ones(nf, dtype=xp.float64)
        self._mask_decay = xp.asarray(np.array([s.decay_per_min > 0 for s in self.specs], np.float64))
        self._tmp = None
        self._faces: dict = {}  # NumPy explicit face coefficients by slot (_faces_for)
        self._U = None
        self._lod_work = None
        self._plans: dict[float, _Plan] = {}
        #: CuPy: replay each step as a CUDA graph (see :meth:`step`); False forces plain launches
        self.use_graph = bool(be.is_gpu)
        self._graph = None  # (key, graph, private memory pool, c_blood buffer)
        self.reset_budget()
        self.dt = dt
        if dt is not None:
            self.plan(dt)

    # ------------------------------------------------------------------ access

    def index(self, name: str) -> int:
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no field {name!r}; fields are {self.names}") from None

    def __getitem__(self, name: str):
        """(nz, ny, nx) view of one field (writable)."""
        return self.values[self.index(name)]

    def __len__(self) -> int:
        return len(self.specs)

    # ------------------------------------------------------------------ planning

    def _vessels(self, vessel_rate):
        xp = self.xp
        if vessel_rate is None:
            return None, None
        if isinstance(vessel_rate, Mapping):
            unknown = set(vessel_rate) - set(self.names)
            if unknown:
                raise ValueError(
                    f"vessel_rate names unknown fields {sorted(unknown)}; fields are {self.names}"
                )
            vr = np.zeros((len(self.specs), *self.grid.shape), dtype=self.dtype)
            for name, a in vessel_rate.items():
                vr[self.index(name)] = _host(self.be, a)
        else:
            vr = np.asarray(_host(self.be, vessel_rate), dtype=self.dtype)
            if vr.shape != self.grid.shape:
                raise ValueError(f"vessel_rate has shape {vr.shape}, the grid is {self.grid.shape}")
        if not (np.all(np.isfinite(vr)) and np.all(vr >= 0)):
            raise ValueError("vessel_rate must be finite and >= 0 (1/min)")
        if vr.ndim == 3:
            vsum = np.full(len(self.specs), vr.sum(dtype=np.float64))
        else:
            vsum = vr.reshape(len(self.specs), -1).sum(axis=1, dtype=np.float64)
        return xp.asarray(vr), xp.asarray(vsum)

    def stable_dt(self, name: str) -> float:
        """Largest stable explicit step for one field, in min."""
        f = self.names.index(name)
        return explicit_stable_dt(self.D_max[name], self.grid.dx, self.grid.ndim, weight=self._weights[f])

    def plan(self, dt: float) -> _Plan:
        """Choose the scheme of every field for step dt (min); raise if an explicit one cannot take it.

        Host arithmetic only (cached per dt).
        """
        dt = float(dt)
        if dt in self._plans:
            return self._plans[dt]
        if not (dt > 0 and math.isfinite(dt)):
            raise ValueError(f"dt={dt}: must be a positive number of minutes")
        xp = self.xp
        groups: dict[int, list[int]] = {}
        lod: list[int] = []
        solver, nsub = {}, {}
        for f, s in enumerate(self.specs):
            n = substeps_needed(dt, self.D_max[s.name], self.grid.dx, self.grid.ndim, weight=self._weights[f])
            if n == 0:
                solver[s.name], nsub[s.name] = "none", 0
                continue
            cap = s.max_substeps
            if s.solver == "explicit" and cap is not None and n > cap:
                raise ValueError(
                    f"field {s.name!r}: dt={dt:g} min needs {n} explicit substeps (stable limit "
                    f"{self.stable_dt(s.name):.4g} min) but max_substeps={cap}; use solver='lod' or a smaller dt"
                )
            auto_cap = min(AUTO_MAX_EXPLICIT_SUBSTEPS, cap) if cap is not None else AUTO_MAX_EXPLICIT_SUBSTEPS
            if s.solver == "explicit" or (s.solver == "auto" and n <= auto_cap):
                groups.setdefault(n, []).append(f)
                solver[s.name], nsub[s.name] = "explicit", n
            else:
                lod.append(f)
                solver[s.name], nsub[s.name] = "lod", 0

        def dirichlet_faces(fs):
            out = {}
            for face in range(6):
                hit = [f for f in fs if self._kinds_host[f, face] == ops.BC_DIRICHLET]
                if hit:
                    out[face] = xp.asarray(np.array(hit, dtype=np.int32))
            return out

        explicit, host = [], []
        for n, fs in sorted(groups.items()):
            explicit.append((n, xp.asarray(np.array(fs, dtype=np.int32)), dirichlet_faces(fs)))
            host.append(slice(fs[0], fs[-1] + 1) if fs == list(range(fs[0], fs[-1] + 1)) else list(fs))
        lod_entry = (xp.asarray(np.array(lod, dtype=np.int32)), dirichlet_faces(lod)) if lod else None
        p = _Plan(explicit, lod_entry, solver, nsub, host)
        self._plans[dt] = p
        return p

    def solver_for(self, name: str, dt: float | None = None) -> str:
        """'explicit', 'lod' or 'none' (D == 0 everywhere) for this field at step dt."""
        return self.plan(self.dt if dt is None else dt).solver[name]

    # ------------------------------------------------------------------ stepping

    def step(self, dt: float | None = None, source=None, uptake=None, c_blood=None) -> None:
        """Advance all fields by dt minutes (no host synchronisation).

        source : None or (n_fields, nz, ny, nx) backend array, units/min.
        uptake : None or (n_fields, nz, ny, nx) backend array, 1/min (>= 0).
        c_blood : None (0) or (n_fields,) backend array, blood concentration in field units.
        """
        dt = self.dt if dt is None else float(dt)
        if dt is None:
            raise ValueError("FieldSet.step: no dt given and none configured")
        if self.use_graph and self.be.is_gpu and not self.track_budget:
            self._step_graph(dt, source, uptake, c_blood)
        else:
            self._step_now(dt, source, uptake, c_blood)
        self.time += dt

    def _step_graph(self, dt, source, uptake, c_blood) -> None:
        """The step as one CUDA graph launch (CuPy): a step of 6 fields is some 10-40 small
        kernels, each costing CuPy several microseconds of Python to launch; a graph launches them
        all at once. The graph is captured at the first step and again whenever dt, the values,
        source or uptake buffer (the same device buffers from step to step, their content read at
        replay) or the presence of c_blood changes; c_blood is copied into a fixed buffer before
        each replay.
        Temporaries of the captured step come from a private memory pool held with the graph, so
        no other array ever takes their addresses; nothing that outlives the graph comes from it.
        Capture also proves the step sync-free: CUDA refuses a synchronising call while capturing."""
        import cupy

        xp = self.xp
        # values too: a caller that rebinds fields.values (instead of writing into it) must not
        # have a graph replay into the old buffer
        key = (dt, _buffer_key(self.values), _buffer_key(source), _buffer_key(uptake), c_blood is None)
        g = self._graph
        if g is not None and g[0] == key:
            _, graph, _pool, cb = g
            if cb is not None:
                cb[...] = xp.asarray(c_blood, dtype=xp.float64).reshape(len(self.specs))
            graph.launch(cupy.cuda.get_current_stream())
            return
        cb = None if c_blood is None else xp.empty(len(self.specs), dtype=xp.float64)
        if cb is not None:
            cb[...] = xp.asarray(c_blood, dtype=xp.float64).reshape(len(self.specs))
        # This step's work, done plainly; it also makes the work arrays that outlive the graph
        # (the plan's slot arrays, the ping-pong buffer, the LOD scratch and transposed D), so
        # they must come from the default pool: CuPy frees a pool's memory when the pool goes,
        # even under live arrays, and the private pool goes with this graph at the next capture.
        self._step_now(dt, source, uptake, cb)
        pool = cupy.cuda.MemoryPool()
        with cupy.cuda.using_allocator(pool.malloc):
            # captured work is recorded, not run; replays go to the current stream, in order
            stream = cupy.cuda.Stream(non_blocking=True)
            error = None
            with stream:
                stream.begin_capture(cupy.cuda.runtime.streamCaptureModeRelaxed)
                try:
                    self._step_now(dt, source, uptake, cb)
                except Exception as e:  # a call that synchronises: CUDA refuses it in capture
                    error = e
                if error is None:
                    try:  # a capture invalidated without a Python error fails here
                        graph = stream.end_capture()
                    except Exception as e:
                        error = e
                else:
                    _abandon(stream)
        if error is not None:
            # this step's work is done (above); later steps launch plainly
            log.warning("fields: CUDA graph capture failed (%s); using plain launches", error)
            self.use_graph = False
            self._graph = None
            return
        self._graph = (key, graph, pool, cb)

    def _step_now(self, dt, source, uptake, c_blood) -> None:
        """One step of plain launches (NumPy, or CuPy outside a graph)."""
        p = self.plan(dt)
        be, xp = self.be, self.xp
        u = self.values
        dx2 = self.grid.dx**2
        if self.track_budget and self._total0 is None:
            self._total0 = self._totals()
        acc_d = self._acc["dirichlet_in"]

        # Reactions first, then diffusion (DESIGN.md's order: sources -> react -> diffuse). Both
        # orders are the same Lie splitting, but what the cells read next (the values after the
        # step) differs: diffusing last spreads this step's secretion, where reacting last left
        # all of it in the secreting cell's voxel (IFN-gamma there 40x the steady state of the
        # discrete operator at dt = 1 min, and not converging with dt; see
        # tests/fields/test_accuracy.py).
        self._react(dt, source, uptake, c_blood)

        for (n, slots, dfaces), host in zip(p.explicit, p.explicit_host, strict=True):
            if self._tmp is None:
                self._tmp = xp.empty_like(u)
            h_dx2 = dt / n / dx2
            # Ping-pong so that the last substep writes into self.values (whose views callers hold).
            if n % 2:
                # one pass over consecutive slots (the usual case), else slot by slot: u[slots]
                # would gather a copy of them all first and scatter it (two passes, one temporary)
                for sl in [host] if isinstance(host, slice) else host:
                    self._tmp[sl] = u[sl]
                src, dst = self._tmp, u
            else:
                src, dst = u, self._tmp
            for _ in range(n):
                if self.track_budget and dfaces:
                    ops.dirichlet_inflow(xp, src, self.D, dfaces, self.bc_val, h_dx2, acc_d)
                if be.is_gpu:
                    ops.explicit_substep(be, src, dst, self.D, slots, self.bc_kind, self.bc_val, h_dx2)
                else:
                    ops.explicit_substep_numpy(
                        src,
                        dst,
                        self.D,
                        slots,
                        self.bc_kind,
                        self.bc_val,
                        h_dx2,
                        faces=self._faces_for(slots),
                    )
                src, dst = dst, src

        if p.lod is not None:
            slots, dfaces = p.lod
            if be.is_gpu and self._lod_work is None:
                self._lod_work = ops.LodWork(xp, u.shape, u.dtype)
            h_dx2 = dt / dx2
            for axis, faces in (("x", (0, 1)), ("y", (2, 3)), ("z", (4, 5))):
                if axis == "z" and self.grid.nz == 1:
                    continue
                ops.lod_sweep(
                    be, u, self.D, slots, self.bc_kind, self.bc_val, axis, h_dx2, work=self._lod_work
                )
                sub = {f: dfaces[f] for f in faces if f in dfaces}
                if self.track_budget and sub:
                    ops.dirichlet_inflow(xp, u, self.D, sub, self.bc_val, h_dx2, acc_d)

    def _faces_for(self, slots) -> dict:
        """NumPy: the explicit stencil's face coefficients of these slots, made once (D is fixed
        after construction). Kept memory: about one field-sized array per axis and field."""
        faces = self._faces
        for sl in np.asarray(slots).tolist():
            if sl not in faces:
                faces[sl] = ops.explicit_faces_numpy(self.D, sl, self._kinds_host)
        return faces

    def _check(self, name, a):
        if a is None:
            return None
        if tuple(a.shape) != tuple(self.values.shape):
            raise ValueError(
                f"FieldSet.step: {name} has shape {tuple(a.shape)}, expected {tuple(self.values.shape)}"
            )
        return a if a.dtype == self.dtype else a.astype(self.dtype)

    def _react(self, dt, source, uptake, c_blood) -> None:
        xp = self.xp
        source = self._check("source", source)
        uptake = self._check("uptake", uptake)
        everything = source is not None or uptake is not None or self._vr is not None
        if everything:
            slots, mask = self._all, self._mask_all
        else:
            slots, mask = self._decaying, self._mask_decay
        if slots.size == 0:
            return
        cb = None
        if c_blood is not None and self._vr is not None:
            cb = xp.asarray(c_blood, dtype=xp.float64).reshape(len(self.specs))
        U = None
        if self.track_budget:
            if self._U is None:
                self._U = xp.zeros_like(self.values)
            U = self._U
        ops.react(self.be, self.values, slots, self.k, uptake, source, self._vr, cb, dt, U=U)
        if not self.track_budget:
            return
        nf = len(self.specs)
        acc = self._acc

        def per_field(a):
            return xp.sum(a.reshape(nf, -1), axis=1, dtype=xp.float64)

        acc["decay_out"] += self.k * per_field(U) * mask
        if uptake is not None:
            acc["uptake_out"] += per_field(uptake * U)
        if source is not None:
            acc["source_in"] += dt * per_field(source)
        if self._vr is not None:
            vrU = per_field(self._vr * U)
            acc["vessel_in"] -= vrU
            if cb is not None:
                acc["vessel_in"] += dt * cb * self._vr_sum

    # ------------------------------------------------------------------ budget

    def _totals(self):
        return self.xp.sum(self.values.reshape(len(self.specs), -1), axis=1, dtype=self.xp.float64)

    def reset_budget(self) -> None:
        """Zero the accumulators; the next step records the totals the budget starts from."""
        self._acc = {t: self.xp.zeros(len(self.specs), dtype=self.xp.float64) for t in BUDGET_TERMS}
        self._total0 = None

    def budget(self) -> dict[str, dict[str, float]]:
        """Amounts (field units x um^3) per field since the last reset (reads the device: output time only).

        Per field: total (now), total_start, change, dirichlet_in (through Dirichlet faces),
        vessel_in (vessel exchange, net), source_in, decay_out, uptake_out, and
        imbalance = change - (dirichlet_in + vessel_in + source_in - decay_out - uptake_out),
        which is round-off when nothing else wrote into ``values``.
        """
        vol = self.grid.voxel_volume_um3
        tot = self.be.asnumpy(self._totals()) * vol
        t0 = tot if self._total0 is None else self.be.asnumpy(self._total0) * vol
        acc = {t: self.be.asnumpy(a) * vol for t, a in self._acc.items()}
        out = {}
        for f, name in enumerate(self.names):
            d = {t: float(acc[t][f]) for t in BUDGET_TERMS}
            d["total"] = float(tot[f])
            d["total_start"] = float(t0[f])
            d["change"] = d["total"] - d["total_start"]
            net = d["dirichlet_in"] + d["vessel_in"] + d["source_in"] - d["decay_out"] - d["uptake_out"]
            d["imbalance"] = d["change"] - net
            out[name] = d
        return out


def _host(be, a):
    """A host copy of an init-time input (numpy or cupy array, or scalar)."""
    if type(a).__module__.split(".")[0] == "cupy":
        return a.get()
    return np.asarray(a)
