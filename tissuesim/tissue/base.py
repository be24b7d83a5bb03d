"""Tissue data model: voxel labels, the compartment each label stands for, and initial content.

The fields engine and the agents read a tissue only through :class:`Tissue`'s masks and
multipliers (``open_mask``, ``vessel_mask``, ``diffusion_multiplier``); they never look at
compartment names, so a generated muscle and a segmented histology volume behave alike.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from tissuesim.grid import Grid

#: Reaction-diffusion fields a compartment may scale (DESIGN.md section 5).
FIELD_NAMES = ("cxcl13", "cxcl10", "ifng", "il6", "autoantibody", "damage")

#: Cell types a tissue may seed at t = 0 (the disease infiltrate and resident macrophages).
INITIAL_CELL_TYPES = ("b_cell", "plasmablast", "plasma_cell", "macrophage")

#: Properties a compartment may carry (the keys of a from_labels YAML map entry).
COMPARTMENT_PROPERTIES = ("name", "open_to_cells", "vessel", "diffusion", "default_diffusion", "niche")


@dataclass
class Compartment:
    """One voxel label.

    name : human-readable name (written to /tissue/labels attr ``names``).
    open_to_cells : cells may sit in and move through these voxels.
    vessel : blood vessel lumen: cells enter and leave the blood here and fields exchange with blood.
        Vessels count as open to cells (``Tissue.open_mask`` includes them).
    diffusion : field name -> multiplier (>= 0) of that field's free diffusion coefficient D;
        fields not listed take ``default_diffusion``. 0 means the field cannot enter.
    default_diffusion : multiplier for fields absent from ``diffusion``.
    niche : survival niche for B-lineage cells (lymphoid aggregate); used to place initial
        plasma cells in tissues loaded from labels.
    """

    name: str
    open_to_cells: bool
    vessel: bool = False
    diffusion: dict[str, float] = field(default_factory=dict)
    default_diffusion: float = 1.0
    niche: bool = False

    def __post_init__(self) -> None:
        for k, v in self.diffusion.items():
            if k not in FIELD_NAMES:
                raise ValueError(
                    f"compartment {self.name!r}: diffusion.{k}: unknown field; allowed: {', '.join(FIELD_NAMES)}"
                )
            if not (float(v) >= 0 and np.isfinite(v)):
                raise ValueError(
                    f"compartment {self.name!r}: diffusion.{k}={v}: must be a finite number >= 0"
                )
        if not (float(self.default_diffusion) >= 0 and np.isfinite(self.default_diffusion)):
            raise ValueError(
                f"compartment {self.name!r}: default_diffusion={self.default_diffusion}: must be a finite number >= 0"
            )
        self.diffusion = {k: float(v) for k, v in self.diffusion.items()}
        self.default_diffusion = float(self.default_diffusion)
        self.open_to_cells = bool(self.open_to_cells)
        self.vessel = bool(self.vessel)
        self.niche = bool(self.niche)

    @property
    def is_open(self) -> bool:
        """Cells may enter: open compartments and vessels."""
        return self.open_to_cells or self.vessel

    def multiplier(self, field_name: str) -> float:
        """Multiplier of the free D of ``field_name`` in this compartment."""
        return self.diffusion.get(field_name, self.default_diffusion)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Tissue:
    """A labelled voxel tissue and its state at t = 0.

    grid : the Grid the labels live on.
    labels : uint8 (nz, ny, nx); value v means ``compartments[v]``.
    compartments : list of Compartment, index = label value.
    initial_cells : cell type -> float32 (n, 3) positions (x, y, z) in um, every one inside an open,
        non-vessel voxel. Types from INITIAL_CELL_TYPES; absent types start with no cells.
    initial_fields : field name -> float32 (nz, ny, nx) initial value (units of the field:
        damage rel 0..1, autoantibody rel to baseline serum). Absent fields start at zero.
    meta : generator, seed, parameters actually used and measured facts (JSON-serialisable).
    """

    grid: Grid
    labels: np.ndarray
    compartments: list[Compartment]
    initial_cells: dict[str, np.ndarray] = field(default_factory=dict)
    initial_fields: dict[str, np.ndarray] = field(default_factory=dict)
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        lab = np.asarray(self.labels)
        if lab.shape != self.grid.shape:
            raise ValueError(f"tissue labels shape {lab.shape} does not match grid shape {self.grid.shape}")
        if lab.dtype != np.uint8:
            raise ValueError(f"tissue labels dtype {lab.dtype}: must be uint8")
        if len(self.compartments) == 0 or len(self.compartments) > 256:
            raise ValueError(f"tissue needs 1..256 compartments, got {len(self.compartments)}")
        if lab.size and int(lab.max()) >= len(self.compartments):
            raise ValueError(
                f"tissue label value {int(lab.max())} has no compartment (only {len(self.compartments)} defined)"
            )
        self.labels = np.ascontiguousarray(lab)
        for k, v in self.initial_cells.items():
            if k not in INITIAL_CELL_TYPES:
                raise ValueError(
                    f"initial_cells.{k}: unknown cell type; allowed: {', '.join(INITIAL_CELL_TYPES)}"
                )
            v = np.asarray(v, dtype=np.float32).reshape(-1, 3)
            self.initial_cells[k] = v
        for k, v in self.initial_fields.items():
            if k not in FIELD_NAMES:
                raise ValueError(f"initial_fields.{k}: unknown field; allowed: {', '.join(FIELD_NAMES)}")
            if np.shape(v) != self.grid.shape:
                raise ValueError(
                    f"initial_fields.{k} shape {np.shape(v)} does not match grid {self.grid.shape}"
                )
            self.initial_fields[k] = np.ascontiguousarray(v, dtype=np.float32)

    # -- per-label lookup tables: a mask is one gather, whatever the number of compartments
    def _lut(self, values, dtype) -> np.ndarray:
        return np.asarray(values, dtype=dtype)

    @property
    def names(self) -> list[str]:
        """Compartment names, index = label value (the /tissue/labels ``names`` attr)."""
        return [c.name for c in self.compartments]

    def open_mask(self) -> np.ndarray:
        """bool (nz, ny, nx): voxels cells may occupy (open compartments and vessels)."""
        return self._lut([c.is_open for c in self.compartments], bool)[self.labels]

    def vessel_mask(self) -> np.ndarray:
        """bool (nz, ny, nx): vessel voxels (blood exchange of cells and fields)."""
        return self._lut([c.vessel for c in self.compartments], bool)[self.labels]

    def niche_mask(self) -> np.ndarray:
        """bool (nz, ny, nx): voxels of compartments flagged as B-lineage survival niches."""
        return self._lut([c.niche for c in self.compartments], bool)[self.labels]

    def diffusion_multiplier(self, field_name: str) -> np.ndarray:
        """float32 (nz, ny, nx): multiplier of ``field_name``'s free D in each voxel."""
        if field_name not in FIELD_NAMES:
            raise ValueError(f"field {field_name!r}: unknown; allowed: {', '.join(FIELD_NAMES)}")
        return self._lut([c.multiplier(field_name) for c in self.compartments], np.float32)[self.labels]

    def label_of(self, name: str) -> int:
        """Label value of the compartment called ``name`` (for generators and tests, not for physics)."""
        try:
            return self.names.index(name)
        except ValueError:
            raise KeyError(f"no compartment {name!r}; have {', '.join(self.names)}") from None

    def volume_fractions(self) -> dict[str, float]:
        """Compartment name -> fraction of all voxels (area fraction in 2D)."""
        counts = np.bincount(self.labels.ravel(), minlength=len(self.compartments))
        total = max(int(counts.sum()), 1)
        return {c.name: float(counts[i]) / total for i, c in enumerate(self.compartments)}

    # -- HDF5 (DESIGN.md section 5: /tissue/labels uint8 (nz, ny, nx), attr names = JSON list)
    def to_hdf5_group(self, group, compression: str | None = "gzip") -> None:
        """Write dataset ``labels`` into an open h5py group (normally /tissue).

        attrs of ``labels``: ``names`` JSON list (index -> compartment name), ``compartments`` JSON
        list of the compartment properties; attrs of the group: ``meta`` JSON.
        """
        kw = {"compression": "gzip", "compression_opts": 4} if compression == "gzip" else {}
        ds = group.create_dataset("labels", data=self.labels, dtype="u1", **kw)
        ds.attrs["names"] = json.dumps(self.names)
        ds.attrs["compartments"] = json.dumps([c.to_dict() for c in self.compartments])
        group.attrs["meta"] = json.dumps(_jsonable(self.meta))

    @classmethod
    def from_hdf5_group(cls, group, grid: Grid) -> Tissue:
        """Read a tissue written by :meth:`to_hdf5_group` (no initial cells or fields: a snapshot
        file holds the state of the cells and fields itself)."""
        ds = group["labels"]
        labels = np.asarray(ds[()], dtype=np.uint8)
        if "compartments" in ds.attrs:
            comps = [Compartment(**d) for d in json.loads(ds.attrs["compartments"])]
        else:  # a file written by another tool: names only, properties unknown
            comps = [Compartment(name=n, open_to_cells=True) for n in json.loads(ds.attrs["names"])]
        meta = json.loads(group.attrs["meta"]) if "meta" in group.attrs else {}
        return cls(grid=grid, labels=labels, compartments=comps, meta=meta)


def _jsonable(x):
    """Convert numpy scalars/arrays inside nested dicts/lists to plain Python for json.dumps."""
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, list | tuple):
        return [_jsonable(v) for v in x]
    if isinstance(x, np.ndarray):
        return x.tolist()
    if isinstance(x, np.generic):
        return x.item()
    return x
