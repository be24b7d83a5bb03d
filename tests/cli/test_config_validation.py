"""Bad input fails before any work, with one line naming key, value and what is allowed."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tissuesim.backend import cupy_status
from tissuesim.cli import preflight
from tissuesim.config import ConfigError

# (overrides, substrings the one-line message must contain)
BAD = [
    (["seed=abc"], ["seed", "abc"]),
    (["grid.nx=1.5"], ["grid.nx", "1.5"]),
    (["frobnicate=1"], ["frobnicate", "unknown key"]),
    (["grid.bogus=3"], ["grid.bogus", "unknown key"]),
    (["grid.nx=-5"], ["grid.nx=-5", ">= 1"]),
    (["grid.dx_um=0"], ["grid.dx_um=0", "> 0"]),
    (["duration_days=-1"], ["duration_days=-1", "> 0"]),
    (["dt_min=0"], ["dt_min=0", "> 0"]),
    (["output.snapshot_every_days=-2"], ["output.snapshot_every_days=-2", "> 0"]),
    (["+sed=3"], ["sed=3", "unknown key in the top level"]),
    (["+grid.foo=2"], ["grid.foo=2", "unknown key in 'grid'"]),
    (["seed=abc"], ["seed=abc", "allowed: an integer"]),
    (["fields.il6.diffusion_um2_per_min=-1"], ["fields.il6.diffusion_um2_per_min=-1", ">= 0"]),
    (["tissue=brain"], ["tissue=brain", "allowed", "muscle", "lung", "joint"]),
    (["therapy=aspirin"], ["therapy=aspirin", "allowed", "cd19", "bcma"]),
    (["grid=huge"], ["grid=huge", "allowed", "tiny", "large"]),
    (["backend=opencl"], ["backend=opencl", "allowed", "numpy", "cupy"]),
    (["backend.dtype=float16"], ["backend.dtype='float16'", "float32, float64"]),
    (["therapy.crs_management=aspirin"], ["therapy.crs_management='aspirin'", "allowed", "tocilizumab"]),
    (["fields.il6.solver=explicit", "dt_min=1"], ["dt_min=1.0", "fields.il6.solver=explicit", "substeps"]),
    (["fields.il6.solver=magic"], ["fields.il6.solver='magic'", "explicit", "lod"]),
    (["device=-1"], ["device=-1", ">= 0"]),
    (["therapy=cd19,bcma"], ["therapy=cd19,bcma", "-m"]),
    (["output.timeseries_every_days=0.0001"], ["output.timeseries_every_days", "one step"]),
    (["cells.b_cell.chemotaxis_field=tnf"], ["cells.b_cell.chemotaxis_field='tnf'", "cxcl13"]),
    (["dt_min=2"], ["dt_min=2.0", "cells.cd19_car_t", "more than one"]),
    (["cells.macrophage.persistence_min=0"], ["cells.macrophage.persistence_min=0", "> 0"]),
    (["output.async_snapshots=sometimes"], ["output.async_snapshots=sometimes", "allowed: true or false"]),
    (["output.progress=maybe"], ["output.progress=maybe", "allowed: true or false"]),
    (
        ["biology.blood.lymphodepletion_b_cell_fraction=1.5"],
        ["biology.blood.lymphodepletion_b_cell_fraction=1.5", "0..1"],
    ),
    (["biology.blood.tocilizumab_blockade=-0.1"], ["biology.blood.tocilizumab_blockade=-0.1", "0..1"]),
    (
        ["biology.blood.autoreactive_niche_access=2"],
        ["biology.blood.autoreactive_niche_access=2", "0..1"],
    ),
    (["biology.blood.rituximab_niche_access=1.1"], ["biology.blood.rituximab_niche_access=1.1", "0..1"]),
    (["biology.blood.rituximab_ec50_ug_per_ml=0"], ["biology.blood.rituximab_ec50_ug_per_ml=0", "> 0"]),
    (
        ["fields.rituximab.with_product=cd20_car_t"],
        ["fields.rituximab.with_product='cd20_car_t'", "cd19_car_t"],
    ),
    (
        ["fields.rituximab.diffuses_as=cxcl99"],
        ["fields.rituximab.diffuses_as='cxcl99'", "autoantibody", "moves like"],
    ),
    (["cells.b_cell.chemotaxis_field=rituximab"], ["chemotaxis_field='rituximab'", "fields of this run"]),
    (["fields.ifng.uptake_by=[b_cell,nk_cell]"], ["fields.ifng.uptake_by='nk_cell'", "macrophage"]),
    (
        ["fields.il6.uptake_by=[macrophage]", "fields.il6.uptake_molecules_per_cell_per_s=1"],
        ["fields.il6.units='pg/mL'", "nM"],
    ),
    (["fields.ifng.uptake_kd_nM=0"], ["fields.ifng.uptake_kd_nM=0", "> 0"]),
    (["fields.rituximab.uptake_by=[b_cell]"], ["fields.rituximab.units='ug/mL'", "nM"]),
    (["therapy=rituximab", "~fields.rituximab"], ["therapy.infusions='rituximab'", "field named rituximab"]),
    (
        ["therapy=rituximab", "fields.rituximab.with_product=cd19_car_t"],
        ["therapy.infusions='rituximab'", "field named"],
    ),
    (["fields.rituximab.diffuses_as=null"], ["fields.rituximab.diffuses_as=null", "'rituximab' must name"]),
    (
        ["fields.ifng.uptake_molecules_per_cell_per_s=-1"],
        ["fields.ifng.uptake_molecules_per_cell_per_s=-1", ">= 0"],
    ),
]


@pytest.mark.parametrize(("overrides", "expect"), BAD, ids=[" ".join(o) for o, _ in BAD])
def test_bad_input_one_line(overrides, expect):
    with pytest.raises(ConfigError) as info:
        preflight(overrides)
    msg = str(info.value)
    assert "\n" not in msg, msg
    for s in expect:
        assert s in msg, f"{s!r} not in {msg!r}"


def test_bad_value_inside_a_sweep_is_caught_before_any_job(tmp_path):
    with pytest.raises(ConfigError, match="tissue=brain"):
        preflight(["-m", "tissue=muscle,brain", "seed=0,1"])
    preflight(["-m", "tissue=muscle,lung", "seed=0,1", "grid=tiny"])  # good sweep passes


def test_limits_of_a_field_the_run_does_not_have_do_not_apply():
    """An explicit solver too slow for this dt on the rituximab field fails only in runs that
    have that field (therapy=rituximab), not in a CD19 run."""
    over = ["fields.rituximab.solver=explicit", "grid=medium"]
    preflight([*over, "therapy=cd19"])
    with pytest.raises(ConfigError, match=r"fields\.rituximab\.solver=explicit needs"):
        preflight([*over, "therapy=rituximab"])


def test_negative_tissue_length_is_rejected():
    import dataclasses

    from tissuesim.config import _NONNEGATIVE_SUFFIXES
    from tissuesim.tissue.schema import TISSUE_SCHEMAS

    fields = [
        f.name for f in dataclasses.fields(TISSUE_SCHEMAS["muscle"]) if f.name.endswith(_NONNEGATIVE_SUFFIXES)
    ]
    assert fields, "muscle schema has no length/time keys to check"
    key = fields[0]
    with pytest.raises(ConfigError, match=rf"tissue\.{key}=-3"):
        preflight(["tissue=muscle", f"tissue.{key}=-3"])


def test_cupy_without_gpu_fails_preflight():
    if cupy_status()[0]:
        pytest.skip("a GPU answers here")
    with pytest.raises(ConfigError, match="backend=cupy: no usable GPU"):
        preflight(["backend=cupy"])


def test_every_group_option_loads():
    from tissuesim import load_config
    from tissuesim.config import group_options

    for group in ("tissue", "therapy", "grid", "backend"):
        opts = group_options(group)
        assert opts
        for opt in opts:
            if group == "backend" and opt == "cupy":
                continue  # loads, but preflight needs a GPU; composition is checked below
            if group == "tissue" and opt == "from_labels":
                with pytest.raises(ConfigError, match=r"^tissue\.(map|path)=\?\?\?: required"):
                    load_config([f"{group}={opt}"])
                continue
            cfg = load_config([f"{group}={opt}"])
            assert cfg[group].name == opt
    assert load_config(["backend=cupy"]).backend.name == "cupy"


def test_cli_exits_nonzero_with_one_line_and_no_run_dir(tmp_path):
    run_dir = tmp_path / "run"
    env = {**os.environ, "PYTHONWARNINGS": "ignore"}
    p = subprocess.run(
        [sys.executable, "-m", "tissuesim.cli", "grid.nx=-4", f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert p.returncode == 2
    lines = [ln for ln in p.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and "grid.nx=-4" in lines[0], p.stderr
    assert not run_dir.exists()


def test_help_lists_exactly_the_options_of_each_group():
    """--help names each group's YAML files (conf/<group>/*.yaml), and no schema_* entry."""
    from pathlib import Path

    conf = Path(__file__).resolve().parents[2] / "conf"
    p = subprocess.run(
        [sys.executable, "-m", "tissuesim.cli", "--help"], capture_output=True, text=True, timeout=120
    )
    assert p.returncode == 0, p.stderr
    assert "schema_" not in p.stdout
    listed = {}
    for line in p.stdout.split("== Config ==")[0].splitlines():
        if ": " in line and not line.startswith(" "):
            group, opts = line.split(": ", 1)
            listed[group.lstrip("+")] = sorted(o.strip() for o in opts.split(","))
    for group in ("tissue", "therapy", "grid", "backend", "experiment"):
        assert listed.get(group) == sorted(f.stem for f in (conf / group).glob("*.yaml")), group
