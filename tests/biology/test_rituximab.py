"""Rituximab as a field (MODEL.md section 5): it enters the tissue from blood through the vessel
walls, stays out of muscle fibres as an IgG does, and kills each CD20+ cell at the hazard of the
level where that cell is."""

from __future__ import annotations

import math

import numpy as np
import pytest
from omegaconf import OmegaConf

import tissuesim
from tissuesim.agents import Population
from tissuesim.backend import NUMPY
from tissuesim.biology import rules
from tissuesim.biology.immunology import plain
from tissuesim.biology.therapy import InfusionConfig

BASE = ["grid=tiny", "backend=numpy", "output.progress=false", "seed=3"]


def _sim(*overrides, cfg=None):
    return tissuesim.Simulation(cfg if cfg is not None else tissuesim.load_config([*BASE, *overrides]))


def test_the_field_exists_only_in_runs_that_give_rituximab():
    cd19 = _sim("therapy=cd19")
    assert "rituximab" not in cd19.fields.names
    assert "mean_rituximab" not in cd19.timeseries_names()
    rtx = _sim("therapy=rituximab")
    assert "rituximab" in rtx.fields.names and "mean_rituximab" in rtx.timeseries_names()
    assert rtx.field_attrs()["rituximab"]["units"] == "ug/mL"
    # CAR-T with rituximab added: the field comes with the product, whatever the therapy's name
    cfg = tissuesim.load_config([*BASE, "therapy=cd19"])
    cfg.therapy.infusions.append(
        OmegaConf.structured(InfusionConfig(product="rituximab", day=2.0, dose_per_kg=5.0))
    )
    both = _sim(cfg=cfg)
    assert "rituximab" in both.fields.names
    assert both.fields.names[: len(cd19.fields.names)] == cd19.fields.names  # the others keep their slots


def test_rituximab_enters_through_the_vessel_walls_at_the_serum_level():
    """One step after the day-0 dose, from a field of zeros: each vessel voxel integrates
    du/dt = r (C - u) - k u exactly (r = P / dx, C the serum level), and diffusion moves but
    conserves the sum, so the patch holds N_vessel r C / (r + k) (1 - exp(-(r + k) dt)). The C the
    fields saw is the serum rituximab of the blood compartment."""
    sim = _sim("therapy=rituximab", "tissue=muscle")
    i = sim.fields.index("rituximab")
    assert float(np.abs(sim.fields["rituximab"]).max()) == 0.0
    sim.step()
    c = float(sim.c_blood[i])
    assert c == np.float32(sim.blood.y["rtx"]) and c > 100.0  # ug/mL after 1 g
    f = sim.cfg.fields.rituximab
    r = f.vessel_permeability_um_per_min / sim.grid.dx
    k = f.decay_per_min
    n_vessel = int(sim.tissue.vessel_mask().sum())
    want = n_vessel * r * c / (r + k) * -math.expm1(-(r + k) * sim.dt_min)
    got = float(sim.fields["rituximab"].sum(dtype=np.float64))
    assert got == pytest.approx(want, rel=1e-5)


def test_rituximab_spreads_from_vessels_and_stays_out_of_muscle_fibres():
    sim = _sim("therapy=rituximab", "tissue=muscle")
    sim.run(until_day=1.0)
    u = sim.fields["rituximab"]
    vessel = sim.tissue.vessel_mask().astype(bool)
    open_ = sim.tissue.open_mask().astype(bool) & ~vessel
    # the compartments that exclude IgG (multiplier 0 for the autoantibody): muscle fibres
    excluded = sim.tissue.diffusion_multiplier("autoantibody") == 0
    assert excluded.any() and open_.any()
    assert u[vessel].mean() > u[open_].mean() > 0.01 * sim.blood.y["rtx"]
    assert float(np.abs(u[excluded]).max()) == 0.0


def _fates_at(levels, types, dt=30.0, just_below=True, at_level=None):
    """Decisions of cell_fates for one cell per (level, type) with its death uniform just below
    (or just above) the death probability computed here from the configured constants, at the
    cell's own level (or at ``at_level`` for every cell)."""
    cfg = tissuesim.load_config(BASE)
    bio = plain(cfg.biology)
    sim = _sim()
    imm = sim.immunology
    n = len(levels)
    pop = Population(NUMPY, capacity=n)
    rules.register_cell_attributes(pop)
    pop.add(np.zeros((n, 3)), np.asarray(types, np.uint8))
    k_r = bio.rituximab_tissue_kill_per_day / 1440.0
    ec50 = bio.blood.rituximab_ec50_ug_per_ml
    p = []
    for level, t in zip(levels, types):
        level = level if at_level is None else at_level
        hazard = imm.table.death_per_min[t]
        if imm.cd20[t]:
            hazard += k_r * max(level, 0.0) / (max(level, 0.0) + ec50)
        p.append(-math.expm1(-hazard * dt))
    p = np.array(p)
    u = np.ones((4, n), np.float32)
    u[0] = np.where(just_below, p * (1 - 1e-4), p * (1 + 1e-4)).astype(np.float32)
    zeros = np.zeros(n, np.float32)
    dead, _ = rules.cell_fates(
        pop, u, dt, 0.0, imm.table.death_per_min, imm.idx, imm.rates, zeros, zeros,
        np.asarray(levels, np.float32), imm.cd20, imm.car_mask,
    )  # fmt: skip
    return dead, p


def test_cd20_cells_die_at_the_hazard_of_their_own_rituximab_level():
    """Each B cell (CD20+) dies with 1 - exp(-(death + k r / (r + EC50)) dt) at its own field
    level r: a uniform just below that probability kills it, one just above spares it. Plasma
    cells (CD20-) die at their lifespan's hazard whatever the level."""
    sim = _sim()
    b, pc = sim.cell_types.index("b_cell"), sim.cell_types.index("plasma_cell")
    levels = [0.0, 1.0, 10.0, 80.0, 400.0, -0.5] * 2
    types = [b] * 6 + [pc] * 6
    dead, _ = _fates_at(levels, types, just_below=True)
    assert dead.all()
    spared, _ = _fates_at(levels, types, just_below=False)
    assert not spared.any()
    # uniforms just above each cell's probability at level 0: the B cells above level 0 die,
    # the plasma cells do not (what kills them is their own level, and only if CD20+)
    dead0, _ = _fates_at(levels, types, just_below=False, at_level=0.0)
    np.testing.assert_array_equal(dead0, [False, True, True, True, True, False] + [False] * 6)


def test_the_step_gives_each_cell_the_rituximab_level_of_its_voxel(monkeypatch):
    """The fates of a rituximab run read the field at each cell's voxel (not the serum level,
    not a tissue-wide value): checked on every call over two days."""
    from tissuesim.biology import immunology

    sim = _sim("therapy=rituximab")
    seen = []
    fates = rules.cell_fates

    def spy(pop, u, dt_min, now_min, death, idx, rates, ifng_at, damage_at, rtx_at, *rest, **kw):
        vox = sim.grid.voxel_index(pop.position[: pop.n])
        np.testing.assert_array_equal(rtx_at, sim.fields["rituximab"].reshape(-1)[vox])
        seen.append(float(np.ptp(rtx_at)) if pop.n else 0.0)
        return fates(pop, u, dt_min, now_min, death, idx, rates, ifng_at, damage_at, rtx_at, *rest, **kw)

    monkeypatch.setattr(immunology.rules, "cell_fates", spy)
    sim.run(until_day=2.0)
    assert len(seen) == sim.step_count
    assert max(seen) > 1.0  # the cells see different levels (ug/mL)
