"""Cell agents: population (structure of arrays), motility, neighbour search, random numbers.

Public API::

    Population(be, capacity=1024, attrs=None)          .add .remove .register .host_arrays .check_flags
    MotilityParams(...)                                per cell type
    move(pop, grid, open_mask, dt_min, step, seed, motility=None, fields=None, cell_list=None)
    init_velocity(pop, motility, ndim, seed)
    build_cell_list(pop, grid, width) -> CellList
    contacts(pop, radius, source_types, target_types, grid=..., cell_list=..., exact=True) -> Pairs
    claim_targets(pop, pairs, source_ok=None, target_ok=None, rounds=1) -> (target_of, taken_by)
    vessel_sites(vessel_mask, xp); extravasate(...); extravasate_many(...); intravasate(...)

Every CUDA kernel (kernels/agents.cu) has its NumPy twin next to its Python wrapper.
"""

from tissuesim.agents import rng
from tissuesim.agents._kernels import (
    FLAG_BAD_TYPE,
    FLAG_DISPLACEMENT_CAPPED,
    FLAG_IN_CLOSED_VOXEL,
    FLAG_PAIR_OVERFLOW,
)
from tissuesim.agents.motility import (
    MotilityParams,
    extravasate,
    extravasate_many,
    init_velocity,
    intravasate,
    move,
    ou_coefficients,
    vessel_sites,
)
from tissuesim.agents.neighbours import (
    CellList,
    Pairs,
    build_cell_list,
    claim_targets,
    contacts,
    crowd_displacement,
)
from tissuesim.agents.population import AgentError, Population

__all__ = [
    "FLAG_BAD_TYPE",
    "FLAG_DISPLACEMENT_CAPPED",
    "FLAG_IN_CLOSED_VOXEL",
    "FLAG_PAIR_OVERFLOW",
    "AgentError",
    "CellList",
    "MotilityParams",
    "Pairs",
    "Population",
    "build_cell_list",
    "claim_targets",
    "contacts",
    "crowd_displacement",
    "extravasate",
    "extravasate_many",
    "init_velocity",
    "intravasate",
    "move",
    "ou_coefficients",
    "rng",
    "vessel_sites",
]
