"""Entry point: ``build_tissue(cfg, grid, seed)`` dispatches on ``cfg.name``."""

from __future__ import annotations

from dataclasses import is_dataclass

from omegaconf import DictConfig, OmegaConf

from tissuesim.grid import Grid
from tissuesim.tissue.base import Tissue
from tissuesim.tissue.schema import TISSUE_SCHEMAS


def _builders():
    # imported lazily so ``tissuesim.tissue.schema`` (read by tissuesim.config) stays light
    from tissuesim.tissue.from_labels import build_from_labels
    from tissuesim.tissue.joint import build_joint
    from tissuesim.tissue.lung import build_lung
    from tissuesim.tissue.muscle import build_muscle

    return {
        "muscle": build_muscle,
        "lung": build_lung,
        "joint": build_joint,
        "from_labels": build_from_labels,
    }


def as_tissue_config(cfg):
    """The typed config dataclass for ``cfg`` (a dataclass, a DictConfig or a plain dict).

    Unknown keys and wrong types fail here (OmegaConf against the schema); values the types cannot
    judge fail in the schema's ``validate`` (ValueError, one line naming key and value).
    """
    if is_dataclass(cfg) and not isinstance(cfg, type):
        obj = cfg
    else:
        if isinstance(cfg, DictConfig):
            name = cfg.get("name")
        elif isinstance(cfg, dict):
            name = cfg.get("name")
        else:
            raise TypeError(
                f"tissue config must be a dataclass, DictConfig or dict, got {type(cfg).__name__}"
            )
        if name not in TISSUE_SCHEMAS:
            raise ValueError(f"tissue.name={name!r}: allowed: {', '.join(sorted(TISSUE_SCHEMAS))}")
        merged = OmegaConf.merge(OmegaConf.structured(TISSUE_SCHEMAS[name]), cfg)
        obj = OmegaConf.to_object(merged)
    if obj.name not in TISSUE_SCHEMAS:
        raise ValueError(f"tissue.name={obj.name!r}: allowed: {', '.join(sorted(TISSUE_SCHEMAS))}")
    obj.validate()
    return obj


def build_tissue(cfg, grid: Grid, seed: int) -> Tissue:
    """Generate (or load) the tissue ``cfg.name`` on ``grid``; the same seed gives the same tissue.

    cfg : MuscleConfig | LungConfig | JointConfig | FromLabelsConfig, or a DictConfig/dict of one.
    grid : the simulation Grid (2D when nz == 1).
    seed : int >= 0; geometry and initial cells use independent streams derived from it.
    """
    obj = as_tissue_config(cfg)
    return _builders()[obj.name](obj, grid, int(seed))
