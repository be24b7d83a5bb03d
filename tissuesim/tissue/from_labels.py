"""Tissue from a label volume on disk (segmented histology or imaging) and a YAML label map.

The map is a YAML mapping from label value (int) to compartment properties::

    0: {name: interstitium, open_to_cells: true}
    1: {name: fibre, open_to_cells: false, diffusion: {ifng: 0.05, damage: 0.0}, default_diffusion: 0.05}
    7: {name: capillary, open_to_cells: true, vessel: true}
    9: {name: aggregate, open_to_cells: true, niche: true}

Allowed properties: name (required), open_to_cells (required), vessel, diffusion (field ->
multiplier), default_diffusion, niche. Label values need not be contiguous: they are renumbered
0..K-1 in increasing order of value (meta ``source_label_values`` keeps the originals). Every
value present in the volume must be in the map; map entries absent from the volume are kept.

Volumes: ``.npy``; ``.h5``/``.hdf5`` with ``dataset``; ``.tif``/``.tiff`` stacks (needs tifffile).
Shape (nz, ny, nx), or (ny, nx) for a 2D grid; integer dtype.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import yaml
from scipy import ndimage

from tissuesim.grid import Grid
from tissuesim.tissue._geometry import face_structure, initial_cells, rng_for
from tissuesim.tissue.base import COMPARTMENT_PROPERTIES, FIELD_NAMES, Compartment, Tissue

log = logging.getLogger(__name__)

_REQUIRED = ("name", "open_to_cells")


class LabelMapError(ValueError):
    """A bad label volume or label map; the message is one line."""


def load_label_volume(path: str | Path, dataset: str | None = None) -> np.ndarray:
    """Read an integer label volume from .npy, .h5/.hdf5 (``dataset``) or .tif/.tiff."""
    p = Path(path)
    if not p.is_file():
        raise LabelMapError(f"tissue.path={str(path)!r}: file not found")
    suffix = p.suffix.lower()
    if suffix == ".npy":
        vol = np.load(p, allow_pickle=False)
    elif suffix in (".h5", ".hdf5"):
        import h5py

        if not dataset:
            raise LabelMapError(f"tissue.dataset=None: an HDF5 label file ({p.name}) needs the dataset path")
        with h5py.File(p, "r") as f:
            if dataset not in f or not isinstance(f[dataset], h5py.Dataset):
                raise LabelMapError(f"tissue.dataset={dataset!r}: no such dataset in {p.name}")
            vol = f[dataset][()]
    elif suffix in (".tif", ".tiff"):
        try:
            import tifffile
        except ImportError:
            raise LabelMapError(
                f"tissue.path={str(path)!r}: reading TIFF needs the tifffile package"
            ) from None
        vol = tifffile.imread(p)
    else:
        raise LabelMapError(
            f"tissue.path={str(path)!r}: unknown format {suffix!r}; allowed: .npy, .h5, .hdf5, .tif, .tiff"
        )
    vol = np.asarray(vol)
    if not np.issubdtype(vol.dtype, np.integer):
        raise LabelMapError(f"tissue.path={str(path)!r}: label dtype {vol.dtype}; allowed: integer types")
    return vol


def parse_label_map(source) -> dict[int, Compartment]:
    """Label value -> Compartment, from a YAML path or an already-loaded mapping."""
    where = "tissue.map"
    if isinstance(source, str | Path):
        p = Path(source)
        if not p.is_file():
            raise LabelMapError(f"tissue.map={str(source)!r}: file not found")
        with open(p) as fh:
            raw = yaml.safe_load(fh)
    else:
        raw = source
    if not isinstance(raw, dict) or not raw:
        raise LabelMapError(f"{where}: must be a non-empty mapping of label value -> compartment properties")
    out = {}
    for key, props in raw.items():
        try:
            value = int(key)
        except (TypeError, ValueError):
            raise LabelMapError(f"{where}: label {key!r}: keys must be integer label values") from None
        if not isinstance(props, dict):
            raise LabelMapError(f"{where}[{value}]: must be a mapping of compartment properties")
        for k in props:
            if k not in COMPARTMENT_PROPERTIES:
                raise LabelMapError(
                    f"{where}[{value}].{k}: unknown compartment property; allowed: {', '.join(COMPARTMENT_PROPERTIES)}"
                )
        for k in _REQUIRED:
            if k not in props:
                raise LabelMapError(f"{where}[{value}].{k}: missing (required: {', '.join(_REQUIRED)})")
        for k in ("open_to_cells", "vessel", "niche"):
            if k in props and not isinstance(props[k], bool):
                raise LabelMapError(f"{where}[{value}].{k}={props[k]!r}: allowed: true, false")
        diff = props.get("diffusion") or {}
        if not isinstance(diff, dict):
            raise LabelMapError(f"{where}[{value}].diffusion: must be a mapping field -> multiplier")
        for f, m in diff.items():
            if f not in FIELD_NAMES:
                raise LabelMapError(
                    f"{where}[{value}].diffusion.{f}: unknown field; allowed: {', '.join(FIELD_NAMES)}"
                )
            if isinstance(m, bool) or not isinstance(m, int | float) or not m >= 0:
                raise LabelMapError(f"{where}[{value}].diffusion.{f}={m!r}: must be a number >= 0")
        dd = props.get("default_diffusion", 1.0)
        if isinstance(dd, bool) or not isinstance(dd, int | float) or not dd >= 0:
            raise LabelMapError(f"{where}[{value}].default_diffusion={dd!r}: must be a number >= 0")
        if value < 0:
            raise LabelMapError(f"{where}: label {value}: label values must be >= 0")
        out[value] = Compartment(
            name=str(props["name"]),
            open_to_cells=props["open_to_cells"],
            vessel=props.get("vessel", False),
            diffusion=dict(diff),
            default_diffusion=dd,
            niche=props.get("niche", False),
        )
    if len(out) > 256:
        raise LabelMapError(f"{where}: {len(out)} compartments; at most 256 (labels are stored as uint8)")
    return out


def write_label_map(path: str | Path, compartments: list[Compartment]) -> None:
    """Write the YAML map for ``compartments`` (label value = list index), the inverse of
    :func:`parse_label_map`."""
    data = {i: c.to_dict() for i, c in enumerate(compartments)}
    with open(path, "w") as fh:
        yaml.safe_dump(data, fh, sort_keys=False)


def build_from_labels(cfg, grid: Grid, seed: int) -> Tissue:
    """Load ``cfg.path`` (+ ``cfg.dataset``) with map ``cfg.map``; see the module docstring.

    Disease state: B cells, plasmablasts and plasma cells are placed in niche compartments and in
    open voxels within ``niche_distance_um`` of a vessel; macrophages anywhere open; damage
    ``damage_initial`` in closed, non-vessel voxels; autoantibody in open voxels.
    """
    vol = load_label_volume(cfg.path, cfg.dataset)
    cmap = parse_label_map(cfg.map)
    if vol.ndim == 2 and grid.ndim == 2:
        vol = vol[None]
    if vol.shape != grid.shape:
        raise LabelMapError(
            f"tissue.path={str(cfg.path)!r}: label volume shape {tuple(vol.shape)} does not match grid (nz, ny, nx)="
            f"{grid.shape}; allowed: {grid.shape}" + (f" or {grid.shape[1:]}" if grid.ndim == 2 else "")
        )
    present = np.unique(vol)
    missing = [int(v) for v in present if int(v) not in cmap]
    if missing:
        raise LabelMapError(
            f"tissue.map={str(cfg.map)!r}: label value(s) {missing} in {Path(cfg.path).name} have no entry; "
            f"map has {sorted(cmap)}"
        )
    values = sorted(cmap)
    lut = np.zeros(int(max(values)) + 1, np.uint8)
    lut[values] = np.arange(len(values), dtype=np.uint8)
    labels = lut[vol]
    comps = [cmap[v] for v in values]
    tissue = Tissue(grid, labels, comps)

    open_m, ves = tissue.open_mask(), tissue.vessel_mask()
    comp, n = ndimage.label(open_m, structure=face_structure(3))
    reach = np.bincount(comp[ves], minlength=n + 1) > 0
    reach[0] = True
    unreachable = int((~reach[comp]).sum())

    disease = bool(cfg.disease)
    free = open_m & ~ves
    near_v = (
        ndimage.distance_transform_edt(~ves, sampling=grid.dx) <= cfg.niche_distance_um
        if ves.any()
        else np.zeros_like(ves)
    )
    regions = {"niche": tissue.niche_mask() | near_v, "infiltrate": free, "macrophage": free}
    cells, counts = initial_cells(rng_for(seed, 2), grid, cfg.infiltrate, disease, free, regions)
    fields = {"damage": np.zeros(grid.shape, np.float32)}
    if disease:
        fields["damage"] = np.where(~open_m, cfg.damage_initial, 0.0).astype(np.float32)
        fields["autoantibody"] = np.where(open_m, cfg.autoantibody_interstitial, 0.0).astype(np.float32)
    if unreachable:
        log.warning("tissue from %s: %d open voxels cannot reach any vessel", cfg.path, unreachable)
    meta = {
        "generator": "from_labels",
        "seed": int(seed),
        "disease": disease,
        "path": str(cfg.path),
        "dataset": cfg.dataset,
        "map": str(cfg.map),
        "source_label_values": values,
        "unreachable_open_voxels": unreachable,
        "initial_cell_counts": counts,
    }
    return Tissue(grid, labels, comps, initial_cells=cells, initial_fields=fields, meta=meta)
