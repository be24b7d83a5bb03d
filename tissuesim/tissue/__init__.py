"""Tissue geometry: labelled voxel compartments, generators (muscle, lung, joint) and label files.

Public API::

    build_tissue(cfg, grid, seed) -> Tissue
    Tissue(grid, labels, compartments, initial_cells, initial_fields, meta)
    Compartment(name, open_to_cells, vessel, diffusion, default_diffusion, niche)
    TISSUE_SCHEMAS, TissueConfig, MuscleConfig, LungConfig, JointConfig, FromLabelsConfig
"""

from tissuesim.tissue.base import FIELD_NAMES, INITIAL_CELL_TYPES, Compartment, Tissue
from tissuesim.tissue.build import as_tissue_config, build_tissue
from tissuesim.tissue.schema import (
    TISSUE_SCHEMAS,
    Diffusion,
    FromLabelsConfig,
    InfiltrateConfig,
    JointConfig,
    LungConfig,
    MuscleConfig,
    TissueConfig,
)

__all__ = [
    "FIELD_NAMES",
    "INITIAL_CELL_TYPES",
    "TISSUE_SCHEMAS",
    "Compartment",
    "Diffusion",
    "FromLabelsConfig",
    "InfiltrateConfig",
    "JointConfig",
    "LungConfig",
    "MuscleConfig",
    "Tissue",
    "TissueConfig",
    "as_tissue_config",
    "build_tissue",
]
