"""Config schemas: YAML files load into their dataclasses; validation and dispatch."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml
from omegaconf import OmegaConf

from tissuesim.grid import Grid
from tissuesim.tissue import TISSUE_SCHEMAS, TissueConfig, build_tissue

CONF = Path(__file__).resolve().parents[2] / "conf" / "tissue"


@pytest.mark.parametrize("name", sorted(TISSUE_SCHEMAS))
def test_yaml_loads_into_schema_and_matches_defaults(name):
    raw = yaml.safe_load((CONF / f"{name}.yaml").read_text())
    assert raw.pop("defaults") == [f"schema_{name}", "_self_"]
    assert (CONF / f"{name}.yaml").read_text().startswith("# @package tissue\n")
    cls = TISSUE_SCHEMAS[name]
    assert issubclass(cls, TissueConfig)
    merged = OmegaConf.merge(OmegaConf.structured(cls), raw)  # fails on unknown keys / wrong types
    assert merged.name == name
    # YAML and dataclass defaults agree, so a run without Hydra sees the same tissue
    ref = OmegaConf.to_container(OmegaConf.structured(cls))
    got = OmegaConf.to_container(merged)
    assert {k: v for k, v in got.items() if v != "???"} == {k: v for k, v in ref.items() if v != "???"}


def test_yaml_unknown_key_is_rejected():
    raw = yaml.safe_load((CONF / "muscle.yaml").read_text())
    raw.pop("defaults")
    raw["fiber_diameter_um"] = 40.0
    with pytest.raises(Exception, match="fiber_diameter_um"):
        OmegaConf.merge(OmegaConf.structured(TISSUE_SCHEMAS["muscle"]), raw)


@pytest.mark.parametrize(
    "name, key, value, match",
    [
        ("muscle", "perimysium_max_um", 5.0, "perimysium_max_um=5.0"),
        ("muscle", "fibre_jitter", 1.5, "fibre_jitter=1.5"),
        ("lung", "capillary_fraction", 2.0, "capillary_fraction=2.0"),
        ("joint", "lining_um", 0.0, "lining_um=0.0"),
    ],
)
def test_validate_names_key_and_value(name, key, value, match):
    with pytest.raises(ValueError, match=match):
        build_tissue({"name": name, key: value}, Grid((1, 32, 32), 10.0), 0)


def test_build_tissue_accepts_dataclass_dictconfig_and_dict():
    grid = Grid((1, 32, 32), 10.0)
    cls = TISSUE_SCHEMAS["lung"]
    a = build_tissue(cls(), grid, 1)
    b = build_tissue(OmegaConf.structured(cls), grid, 1)
    c = build_tissue({"name": "lung"}, grid, 1)
    assert (a.labels == b.labels).all() and (a.labels == c.labels).all()
    with pytest.raises(ValueError, match=r"tissue\.name='liver'"):
        build_tissue({"name": "liver"}, grid, 1)


@pytest.mark.parametrize("name", ["muscle", "lung", "joint", "from_labels"])
def test_validate_works_on_a_dictconfig(name):
    """tissuesim.config.validate calls ``Schema.validate(cfg.tissue)`` with a DictConfig."""
    cls = TISSUE_SCHEMAS[name]
    node = OmegaConf.structured(cls)
    node.infiltrate.niche_fraction = 1.5
    with pytest.raises(ValueError, match=r"tissue\.infiltrate\.niche_fraction=1\.5: allowed 0\.0\.\.1\.0"):
        cls.validate(node)
