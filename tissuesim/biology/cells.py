"""Cell types as data: antigens, CAR products and their targets, per-type rate tables.

Everything here is built once from ``cfg.biology`` into small host NumPy tables indexed by the
cell-type index (the order of Simulation.cell_types), so the rules can gather per-cell values with
one fancy index and a new CAR target is a config entry, not code.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

MIN_PER_DAY = 1440.0


@dataclass
class CellTable:
    """Per-type tables (host NumPy, index = cell type).

    antigens : bool (ntypes, nantigens); antigen_names : tuple of str.
    car_types : {cell type index: target antigen} of the CAR products.
    can_kill : bool (ntypes, ntypes), source type i kills target type j on contact.
    kill_p : float64 (ntypes,), kill probability per contact of each killer type (0 otherwise).
    death_per_min : float64 (ntypes,), 1 / lifespan (1/min); 0 for an unset lifespan.
    extravasation : float64 (ntypes,), arrivals per (cell/uL) per vessel voxel per min.
    intravasation : float64 (ntypes,), exit rate of a cell in a vessel voxel, 1/min.
    """

    cell_types: tuple[str, ...]
    antigen_names: tuple[str, ...]
    antigens: np.ndarray
    car_types: dict[int, str]
    can_kill: np.ndarray
    kill_p: np.ndarray
    death_per_min: np.ndarray
    extravasation: np.ndarray
    intravasation: np.ndarray

    def index(self, name: str) -> int:
        return self.cell_types.index(name)

    def carrying(self, antigen: str) -> np.ndarray:
        """bool (ntypes,): types carrying ``antigen``."""
        if antigen not in self.antigen_names:
            return np.zeros(len(self.cell_types), bool)
        return self.antigens[:, self.antigen_names.index(antigen)].copy()


def build_cell_table(bio, cell_types) -> CellTable:
    """CellTable from the ``biology`` config section and the ordered cell-type names."""
    cell_types = tuple(cell_types)
    nt = len(cell_types)
    for where, keys in (
        ("biology.antigens", bio.antigens),
        ("biology.car_products", bio.car_products),
        ("biology.lifespan_days", bio.lifespan_days),
        (
            "biology.extravasation_per_ul_per_vessel_voxel_per_min",
            bio.extravasation_per_ul_per_vessel_voxel_per_min,
        ),
        ("biology.intravasation_per_min", bio.intravasation_per_min),
    ):
        unknown = set(keys) - set(cell_types)
        if unknown:
            raise ValueError(f"{where}: unknown cell types {sorted(unknown)}; known: {', '.join(cell_types)}")
    names = sorted(
        {a for lst in bio.antigens.values() for a in lst} | {p.target for p in bio.car_products.values()}
    )
    ag = np.zeros((nt, len(names)), bool)
    for t, lst in bio.antigens.items():
        for a in lst:
            ag[cell_types.index(t), names.index(a)] = True
    car = {cell_types.index(p): str(c.target) for p, c in bio.car_products.items()}
    can_kill = np.zeros((nt, nt), bool)
    kill_p = np.zeros(nt)
    for s, target in car.items():
        can_kill[s] = ag[:, names.index(target)]
        kill_p[s] = bio.kill_probability_per_contact
    if "anti_car_t" in cell_types:
        a = cell_types.index("anti_car_t")
        for s in car:
            can_kill[a, s] = True  # host T cells against the CAR transgene
        kill_p[a] = bio.anti_car_kill_probability_per_contact
    death = np.zeros(nt)
    for t, d in bio.lifespan_days.items():
        death[cell_types.index(t)] = 1.0 / (d * MIN_PER_DAY) if d > 0 and math.isfinite(d) else 0.0
    ex = np.zeros(nt)
    for t, r in bio.extravasation_per_ul_per_vessel_voxel_per_min.items():
        ex[cell_types.index(t)] = r
    iv = np.zeros(nt)
    for t, r in bio.intravasation_per_min.items():
        iv[cell_types.index(t)] = r
    return CellTable(cell_types, tuple(names), ag, car, can_kill, kill_p, death, ex, iv)


def ifng_nM_per_min_per_cell(molecules_per_s: float, voxel_volume_um3: float) -> float:
    """Secretion of one cell as a concentration rate in its voxel (nM/min).

    molecules/s x 60 s/min / N_A = mol/min; / voxel volume in litres (1 um^3 = 1e-15 L) = M/min;
    x 1e9 = nM/min. With 10 molecules/s in a 10 um voxel (1e-12 L): 0.996 nM/min.
    """
    n_a = 6.02214076e23
    return molecules_per_s * 60.0 / n_a / (voxel_volume_um3 * 1e-15) * 1e9


def pg_per_ml_per_min_per_cell(pg_per_hour: float, voxel_volume_um3: float) -> float:
    """Secretion of pg/h by one cell as pg/mL/min in its voxel (1 um^3 = 1e-12 mL)."""
    return pg_per_hour / 60.0 / (voxel_volume_um3 * 1e-12)
