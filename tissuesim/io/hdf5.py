"""snapshots.h5: the run's fields, cells, timeseries and provenance (DESIGN.md section 5).

Crash safety. Every dataset is created before the first write, with an unlimited first axis, and
the file is switched to SWMR (single writer, multiple readers) mode. After that the writer only
appends and flushes, so the file on disk is always a consistent earlier state: a reader may open
it while the run goes on, and a run killed with SIGKILL leaves every snapshot flushed before the
kill. Within a snapshot the bulk data goes first and ``/time`` last: ``len(/time)`` is the number
of complete snapshots, and readers ignore anything written past it.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import h5py
import numpy as np

# Rows per chunk of the ragged agent datasets: large enough for fast appends, small enough that a
# tiny run does not allocate megabytes.
AGENT_CHUNK = 16384
EVENT_TEXT = "S96"
# SWMR needs the HDF5 1.10 file format; pinning it (rather than 'latest') keeps files readable by
# the HDF5 1.10-1.14 libraries inside ParaView, VisIt and older h5py/MATLAB installs.
LIBVER = ("v110", "v110")


def _append(ds: h5py.Dataset, rows: np.ndarray) -> None:
    n = ds.shape[0]
    ds.resize(n + rows.shape[0], axis=0)
    ds[n:] = rows


class SnapshotWriter:
    """Appends snapshots and timeseries rows to a new snapshots.h5.

    Parameters
    ----------
    path : file to create; an existing file is never overwritten (FileExistsError).
    shape : (nz, ny, nx) of the fields.
    fields : {name: attrs}; attrs holds units, long_name, diffusion_um2_per_min, decay_per_min.
    cell_types : cell type names; /agents/type stores the index into this list.
    agent_attrs : {name: dtype} of per-cell datasets besides position, type and id (e.g. state).
    timeseries : names of the /timeseries columns (time is added).
    root_attrs : provenance written on / (version, git commit, config YAML, seed, backend, ...).
    labels, label_names : optional tissue (uint8 (nz, ny, nx)) written to /tissue/labels, or a
        callable ``tissue_writer(group)`` that writes the /tissue group itself.
    compression : 'gzip' or None; level 0..9.
    checkpoint_spec : shapes and dtypes of the restartable state (tissuesim.io.checkpoint), or
        None for a file without checkpoints.
    xdmf, dx, origin : also keep snapshots.xdmf beside the file (ParaView/VisIt index) for a grid
        of voxel edge dx um with outer corner at origin (x0, y0, z0) um.
    """

    def __init__(
        self,
        path: str | Path,
        shape: Sequence[int],
        fields: Mapping[str, Mapping[str, object]],
        cell_types: Sequence[str],
        agent_attrs: Mapping[str, np.dtype | str],
        timeseries: Sequence[str],
        root_attrs: Mapping[str, object],
        tissue_writer=None,
        compression: str | None = "gzip",
        compression_level: int = 1,
        xdmf: bool = True,
        checkpoint_spec: dict | None = None,
        dx: float = 1.0,
        origin: Sequence[float] = (0.0, 0.0, 0.0),
    ) -> None:
        self.path = Path(path)
        self.shape = tuple(int(s) for s in shape)
        self.field_names = list(fields)
        self.agent_attrs = {k: np.dtype(v) for k, v in agent_attrs.items()}
        self.ts_names = list(timeseries)
        comp = (
            {}
            if compression in (None, "none")
            else {"compression": "gzip", "compression_opts": compression_level}
        )
        # 'w-' fails if the file exists: a run never overwrites another run's data.
        self.f = h5py.File(self.path, "w-", libver=LIBVER)
        f = self.f
        for k, v in root_attrs.items():
            f.attrs[k] = v
        g = f.create_group("tissue")
        if tissue_writer is not None:
            tissue_writer(g)
        f.create_dataset("time", shape=(0,), maxshape=(None,), dtype="f8", chunks=(256,))
        f["time"].attrs["units"] = "days"
        fg = f.create_group("fields")
        for name, attrs in fields.items():
            ds = fg.create_dataset(
                name,
                shape=(0, *self.shape),
                maxshape=(None, *self.shape),
                dtype="f4",
                chunks=(1, *self.shape),
                **comp,
            )
            for k, v in attrs.items():
                ds.attrs[k] = v
        ag = f.create_group("agents")
        off = ag.create_dataset("offsets", shape=(1,), maxshape=(None,), dtype="i8", chunks=(256,))
        off[0] = 0
        ag.create_dataset("position", shape=(0, 3), maxshape=(None, 3), dtype="f4", chunks=(AGENT_CHUNK, 3))
        ag["position"].attrs["units"] = "um (x, y, z)"
        ag.create_dataset("type", shape=(0,), maxshape=(None,), dtype="u1", chunks=(AGENT_CHUNK,))
        ag["type"].attrs["names"] = json.dumps(list(cell_types))
        ag.create_dataset("id", shape=(0,), maxshape=(None,), dtype="i8", chunks=(AGENT_CHUNK,))
        for name, dt in self.agent_attrs.items():
            ag.create_dataset(name, shape=(0,), maxshape=(None,), dtype=dt, chunks=(AGENT_CHUNK,))
        tg = f.create_group("timeseries")
        for name in ["time", *self.ts_names]:
            tg.create_dataset(name, shape=(0,), maxshape=(None,), dtype="f8", chunks=(1024,))
        tg["time"].attrs["units"] = "days"
        eg = f.create_group("events")
        eg.create_dataset("day", shape=(0,), maxshape=(None,), dtype="f8", chunks=(64,))
        eg.create_dataset("what", shape=(0,), maxshape=(None,), dtype=EVENT_TEXT, chunks=(64,))
        eg.create_dataset("detail", shape=(0,), maxshape=(None,), dtype=EVENT_TEXT, chunks=(64,))
        if checkpoint_spec is not None:
            from tissuesim.io import checkpoint

            checkpoint.create_datasets(f, checkpoint_spec)
        f.swmr_mode = True
        f.flush()
        self.n_snapshots = 0
        self.n_timeseries = 0
        self._times: list[float] = []
        self._offsets: list[int] = [0]
        self._xdmf = self.path.with_suffix(".xdmf") if xdmf else None
        self._dx, self._origin = float(dx), tuple(origin)
        self._has_labels = "labels" in f["tissue"]
        self._update_xdmf()

    def _update_xdmf(self) -> None:
        if self._xdmf is None:
            return
        from tissuesim.io.xdmf import write_xdmf

        write_xdmf(
            self._xdmf,
            self.path.name,
            self._times,
            self._offsets,
            self.shape,
            self._dx,
            self._origin,
            self.field_names,
            {"type": np.dtype("u1"), "id": np.dtype("i8"), **self.agent_attrs},
            self._has_labels,
        )

    # -----------------------------------------------------------------------------------------
    def write_snapshot(
        self, day: float, fields: Mapping[str, np.ndarray], agents: Mapping[str, np.ndarray]
    ) -> None:
        """Append one snapshot and flush.

        fields : {name: float (nz, ny, nx)} host arrays, every name given at creation.
        agents : {'position': float (n, 3) um, 'type': uint8 (n,), 'id': int64 (n,), plus every
            name of agent_attrs: (n,)}.
        """
        f = self.f
        n = int(np.asarray(agents["id"]).shape[0])
        ag = f["agents"]
        for name in ("position", "type", "id", *self.agent_attrs):
            a = np.asarray(agents[name])
            if a.shape[0] != n:
                raise ValueError(f"agents[{name!r}] has {a.shape[0]} rows, expected {n}")
            _append(ag[name], a.astype(ag[name].dtype, copy=False))
        for name in self.field_names:
            a = np.asarray(fields[name], dtype=np.float32)
            if a.shape != self.shape:
                raise ValueError(f"field {name!r} has shape {a.shape}, expected {self.shape}")
            ds = f["fields"][name]
            ds.resize(self.n_snapshots + 1, axis=0)
            ds[self.n_snapshots] = a
        off = ag["offsets"]
        _append(off, np.array([off[-1] + n], dtype=np.int64))
        _append(f["time"], np.array([day], dtype=np.float64))  # last: marks the snapshot complete
        self.n_snapshots += 1
        f.flush()
        self._times.append(float(day))
        self._offsets.append(int(off[-1]))
        self._update_xdmf()

    def write_timeseries(self, day: float, values: Mapping[str, float], flush: bool = True) -> None:
        """Append one row; every timeseries name must be present (NaN where undefined)."""
        tg = self.f["timeseries"]
        for name in self.ts_names:
            _append(tg[name], np.array([values[name]], dtype=np.float64))
        _append(tg["time"], np.array([day], dtype=np.float64))  # last: marks the row complete
        self.n_timeseries += 1
        if flush:
            self.f.flush()

    def write_event(self, day: float, what: str, detail: str = "") -> None:
        eg = self.f["events"]
        _append(eg["what"], np.array([what.encode()[:96]], dtype=EVENT_TEXT))
        _append(eg["detail"], np.array([detail.encode()[:96]], dtype=EVENT_TEXT))
        _append(eg["day"], np.array([day], dtype=np.float64))
        self.f.flush()

    def write_checkpoint(self, day: float, arrays: dict, meta: dict) -> None:
        """Append one checkpoint (see tissuesim.io.checkpoint) and flush."""
        from tissuesim.io import checkpoint

        checkpoint.write(self.f, day, arrays, meta)

    def flush(self) -> None:
        self.f.flush()

    def close(self) -> None:
        if self.f.id.valid:
            self.f.flush()
            self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---------------------------------------------------------------------------------------------
class RunReader:
    """Read a run's snapshots.h5, also while the run is still writing it (SWMR).

    Every accessor refreshes the datasets first, so a reader kept open sees new snapshots.
    """

    def __init__(self, path: str | Path) -> None:
        path = Path(path)
        if path.is_dir():
            path = path / "snapshots.h5"
        if not path.is_file():
            raise FileNotFoundError(
                f"{path}: no such file (expected a tissuesim run directory or its snapshots.h5)"
            )
        self.path = path
        self.f = h5py.File(path, "r", libver="latest", swmr=True)

    # provenance ---------------------------------------------------------------------------
    @property
    def attrs(self) -> dict:
        """Root attributes: tissuesim_version, git_commit, config, seed, backend, device, ..."""
        return {k: (v.decode() if isinstance(v, bytes) else v) for k, v in self.f.attrs.items()}

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.f.attrs["shape"])

    @property
    def field_names(self) -> list[str]:
        return list(self.f["fields"])

    @property
    def cell_types(self) -> list[str]:
        return json.loads(self.f["agents/type"].attrs["names"])

    def refresh(self) -> None:
        for name in ("time", "agents/offsets"):
            self.f[name].refresh()

    # snapshots ----------------------------------------------------------------------------
    @property
    def times(self) -> np.ndarray:
        """float64 (n_snap,): days of the complete snapshots."""
        ds = self.f["time"]
        ds.refresh()
        return ds[:]

    def _index(self, index: int | None, day: float | None) -> int:
        t = self.times
        if len(t) == 0:
            raise IndexError(f"{self.path} holds no complete snapshot yet")
        if day is not None:
            return int(np.argmin(np.abs(t - day)))
        i = -1 if index is None else index
        if not -len(t) <= i < len(t):
            raise IndexError(f"snapshot {i} out of range: {len(t)} complete snapshots")
        return i % len(t)

    def field(self, name: str, index: int | None = None, day: float | None = None) -> np.ndarray:
        """float32 (nz, ny, nx) of field ``name`` at snapshot ``index`` (default last) or nearest ``day``."""
        k = self._index(index, day)
        ds = self.f["fields"][name]
        ds.refresh()
        return ds[k]

    def fields(self, index: int | None = None, day: float | None = None) -> dict[str, np.ndarray]:
        return {n: self.field(n, index, day) for n in self.field_names}

    def agents(self, index: int | None = None, day: float | None = None) -> dict[str, np.ndarray]:
        """Cells of one snapshot: {'position': (n, 3) um, 'type': uint8, 'id': int64, ...}."""
        k = self._index(index, day)
        off = self.f["agents/offsets"]
        off.refresh()
        a, b = int(off[k]), int(off[k + 1])
        out = {}
        for name, ds in self.f["agents"].items():
            if name == "offsets":
                continue
            ds.refresh()
            out[name] = ds[a:b]
        return out

    def timeseries(self) -> dict[str, np.ndarray]:
        """{'time': days (n,), name: (n,)} of the complete rows."""
        tg = self.f["timeseries"]
        tg["time"].refresh()
        n = tg["time"].shape[0]
        out = {}
        for name, ds in tg.items():
            ds.refresh()
            out[name] = ds[:n]
        return out

    def events(self) -> list[dict]:
        eg = self.f["events"]
        for ds in eg.values():
            ds.refresh()
        n = eg["day"].shape[0]
        return [
            {"day": float(eg["day"][i]), "what": eg["what"][i].decode(), "detail": eg["detail"][i].decode()}
            for i in range(n)
        ]

    @property
    def labels(self) -> np.ndarray | None:
        """uint8 (nz, ny, nx) tissue labels, or None when the run wrote none."""
        g = self.f["tissue"]
        return g["labels"][()] if "labels" in g else None

    @property
    def label_names(self) -> list[str]:
        return json.loads(self.f["tissue/labels"].attrs["names"])

    def close(self) -> None:
        self.f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def open_run(path: str | Path) -> RunReader:
    """Open a run directory (or its snapshots.h5) for reading; safe while the run is writing."""
    return RunReader(path)
