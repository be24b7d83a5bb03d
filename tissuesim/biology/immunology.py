"""The immunology layer: couples the cells, the fields and the blood compartment each step.

Order inside a step (DESIGN.md section 2): blood ODE -> arrivals through vessel walls -> (cells
move, in the Simulation) -> contacts (kill, engage) -> deaths, divisions, differentiation ->
exits into blood -> secretion sources for the fields.

Patch-to-body scaling: the patch (grid volume, a 2D grid is a slab one voxel thick) stands for
``inflamed_volume_ml`` of inflamed organ, so one patch cell that enters or leaves moves
patch_equivalents = inflamed volume / patch volume body cells, i.e. patch_equivalents /
blood volume (uL) cells/uL between blood and tissue. Arrivals per vessel voxel per minute are
``extravasation x blood concentration (cells/uL)`` scaled by inflammation (serum IL-6).
"""

from __future__ import annotations

import math

import numpy as np

from tissuesim.agents import extravasate, init_velocity, intravasate, rng, vessel_sites
from tissuesim.agents.neighbours import contacts
from tissuesim.biology import rules
from tissuesim.biology.blood import Blood
from tissuesim.biology.cells import build_cell_table, ifng_nM_per_min_per_cell, pg_per_ml_per_min_per_cell

MIN_PER_DAY = 1440.0
LAST_KILL_NEVER = -1.0e30


def poisson_small(means, seed: int, step: int) -> np.ndarray:
    """Poisson counts (int64 (k,)) for the host means (k,), one Philox block per entry.

    Keyed by (seed, entry index as the id word, step, PURPOSE_ARRIVAL); exact inversion of the
    CDF with a 53-bit uniform, vectorised over entries (the means of one step are small, so few
    iterations run; large means fall back to rng.poisson_host).
    """
    means = np.asarray(means, dtype=np.float64)
    w = rng.draw(np.arange(means.size, dtype=np.int64), step, PURPOSE_ARRIVAL, 0, seed)
    u = rng.uniform53(w[0], w[1])
    k = np.zeros(means.size, dtype=np.int64)
    big = means > 30.0
    p = np.exp(-np.where(big, 0.0, means))
    cdf = p.copy()
    active = (u > cdf) & ~big & (means > 0)
    i = 0
    while active.any() and i < 200:
        i += 1
        k = np.where(active, k + 1, k)
        p = p * means / np.maximum(k, 1)
        cdf = cdf + np.where(active, p, 0.0)
        active = active & (u > cdf)
    for j in np.flatnonzero(big):
        k[j] = rng.poisson_host(float(means[j]), seed, step, int(j))
    return k


PURPOSE_ARRIVAL = rng.PURPOSE_USER + 2


def plain(node):
    """A plain dataclass copy of a config node (OmegaConf attribute access is slow in the loop)."""
    from omegaconf import DictConfig, OmegaConf

    return OmegaConf.to_object(node) if isinstance(node, DictConfig) else node


class Immunology:
    """Rules and blood of one Simulation (``sim``: grid, tissue, fields, cells, motility, seed)."""

    def __init__(self, sim):
        cfg = sim.cfg
        bio = plain(cfg.biology)
        self.sim = sim
        self.bio = bio
        self.xp = sim.xp
        self.table = build_cell_table(bio, sim.cell_types)
        products = {p: str(c.target) for p, c in bio.car_products.items()}
        self.blood = Blood(bio.blood, products, plain(cfg.therapy))
        pop = sim.cells
        for name, dt, fill in (
            ("busy_until", np.float32, 0.0),
            ("last_kill", np.float32, LAST_KILL_NEVER),
            ("kills", np.int32, 0),
        ):
            if name not in pop.names:
                pop.register(name, dt, fill)
        g = sim.grid
        self.voxel_um3 = g.dx**3
        self.nvox = int(np.prod(g.shape))
        patch_ml = self.nvox * self.voxel_um3 * 1e-12
        self.patch_equivalents = bio.inflamed_volume_ml / patch_ml
        self.per_ul_per_cell = self.patch_equivalents / (bio.blood.blood_volume_l * 1e6)
        self.vessel_mask = self.xp.asarray(sim.tissue.vessel_mask())
        self.sites = vessel_sites(self.vessel_mask, self.xp)
        self.n_sites = int(self.sites.shape[0])
        t = self.table
        self.idx = {n: t.index(n) for n in ("b_cell", "plasmablast", "plasma_cell", "macrophage")}
        self.car_mask = np.zeros(len(t.cell_types), bool)
        self.car_mask[list(t.car_types)] = True
        self.killer_types = [int(k) for k in np.flatnonzero(t.kill_p > 0)]
        self.target_types = [int(k) for k in np.flatnonzero(t.can_kill[self.killer_types].any(axis=0))]
        self.cd20 = t.carrying("CD20")
        self.secretes_ab = np.zeros(len(t.cell_types), bool)
        self.secretes_ab[[self.idx["plasmablast"], self.idx["plasma_cell"]]] = True
        d = MIN_PER_DAY
        self.rates = {
            "b_div": bio.b_cell_division_per_day / d,
            "b_div_act": bio.activated_b_cell_division_per_day / d,
            "car_div": math.log(2.0) / (bio.car_t_doubling_days * d),
            "stim_window": np.float32(bio.stimulation_window_min),
            "b_act": bio.b_cell_activation_per_day / d,
            "pb_diff": bio.plasmablast_differentiation_per_day / d,
            "pc_diff": bio.plasma_cell_differentiation_per_day / d,
            "mac_ifng": bio.macrophage_activation_per_day / d,
            "mac_kd": bio.macrophage_ifng_kd_nM,
            "mac_damage": bio.macrophage_damage_activation_per_day / d,
            "mac_off": bio.macrophage_deactivation_per_day / d,
        }
        # Secretion per cell as a rate of concentration in its voxel (units/min).
        self.ifng_per_cell = ifng_nM_per_min_per_cell(bio.ifng_molecules_per_cell_per_s, self.voxel_um3)
        self.il6_per_cell = pg_per_ml_per_min_per_cell(bio.il6_pg_per_cell_per_hour, self.voxel_um3)
        # IgG molecules/s -> nM/min in the voxel -> rel (1 = baseline serum concentration).
        self.ab_per_cell = (
            ifng_nM_per_min_per_cell(bio.igg_molecules_per_cell_per_s, self.voxel_um3)
            / bio.autoantibody_baseline_nM
        )
        f = sim.fields
        self.fi = {n: f.index(n) for n in f.names}
        self.damage0 = f["damage"].copy() if "damage" in f.names else None
        self.repair_per_min = cfg.fields["damage"].decay_per_min if "damage" in f.names else 0.0
        self.max_crs = 0
        self.p_exit = -np.expm1(-self.table.intravasation * sim.dt_min)
        self.source = self.xp.zeros_like(f.values)

    # ------------------------------------------------------------------ blood side
    def blood_per_ul(self, cell_type: str) -> float:
        """Blood concentration (cells/uL) of the cells that arrive as ``cell_type``."""
        b = self.blood
        if cell_type == "b_cell":
            return b.b_cell_per_ul()
        if cell_type in b.products:
            return b.car_t_per_ul(cell_type)
        if cell_type == "anti_car_t":
            r = max((b.y[f"R_{p}"] for p in b.products), default=0.0)
            return self.bio.anti_car_t_max_per_ul * r
        if cell_type == "macrophage":
            return self.bio.monocyte_per_ul
        return 0.0

    def inflammation_factor(self) -> float:
        il6 = self.blood.y["il6"]
        return 1.0 + self.bio.inflammation_gain * il6 / (il6 + self.bio.inflammation_il6_kd_pg_per_ml)

    def _move_blood(self, cell_type: str, cells: int) -> None:
        """``cells`` patch cells moved into blood (negative: out of blood into the patch)."""
        if cells == 0:
            return
        d = cells * self.per_ul_per_cell
        b = self.blood
        if cell_type == "b_cell":
            tot = b.b_cell_per_ul()
            if tot > 0:
                fa = b.y["b_auto"] / tot
                b.exchange("b_auto", d * fa)
                b.exchange("b_naive", d * (1 - fa))
            elif d > 0:
                b.exchange("b_naive", d)
        elif cell_type in b.products:
            b.exchange(f"E_{cell_type}", d)

    # ------------------------------------------------------------------ step parts
    def before_move(self, step: int, dt_min: float) -> list[str]:
        """Blood ODE, then arrivals from blood. Returns blood events (CRS management)."""
        sim = self.sim
        events = self.blood.advance(dt_min)
        self.max_crs = max(self.max_crs, self.blood.step_grade)
        pop = sim.cells
        infl = self.inflammation_factor()
        n0 = pop.n
        names = self.table.cell_types
        conc = np.array([self.blood_per_ul(nm) for nm in names])
        means = self.table.extravasation * conc * self.n_sites * dt_min * infl
        arrivals = poisson_small(means, sim.seed, step)
        for ti in np.flatnonzero(arrivals):
            m = int(arrivals[ti])
            extravasate(pop, sim.grid, self.sites, int(ti), step, sim.seed, n_sites=self.n_sites, number=m)
            if names[ti] not in ("macrophage", "anti_car_t"):  # these come from pools not modelled in blood
                self._move_blood(names[ti], -m)
        if pop.n > n0:
            init_velocity(pop, sim.motility, sim.grid.ndim, sim.seed, rows=self.xp.arange(n0, pop.n))
        return events

    def after_move(self, step: int, dt_min: float) -> None:
        """Contacts, fates, births, exits and the field sources of this step."""
        sim = self.sim
        xp = self.xp
        pop = sim.cells
        now = (step + 1) * dt_min  # minutes at the end of this step
        n = pop.n
        dead = xp.zeros(n, dtype=bool)
        if n and self.killer_types:
            # A contact search only when some killer is free and some target type is present
            # (host-side test; on the GPU this is one small read per step).
            t_h = sim.backend.asnumpy(pop.type[:n])
            counts = np.bincount(t_h, minlength=len(self.table.cell_types))
            is_killer = np.isin(t_h, self.killer_types)
            free = is_killer & (sim.backend.asnumpy(pop["busy_until"][:n]) <= np.float32(now))
            targets_present = counts[self.target_types].sum() > 0
            if free.any() and targets_present:
                pairs = contacts(
                    pop, self.bio.contact_radius_um, self.killer_types, self.target_types, grid=sim.grid
                )
                killed, _ = rules.contact_kills(
                    pop,
                    pairs,
                    self.table.can_kill,
                    self.table.kill_p,
                    now,
                    self.bio.handling_time_min,
                    self.bio.exhaustion_kills,
                    step,
                    sim.seed,
                )
                dead |= killed
        vox = sim.grid.voxel_index(pop.position[:n], xp=xp)
        f = sim.fields
        ifng_at = rules.sample_field(f["ifng"], vox) if "ifng" in self.fi else xp.zeros(n)
        damage_at = rules.sample_field(f["damage"], vox) if "damage" in self.fi else xp.zeros(n)
        rtx = self.blood.y["rtx"]
        b = self.bio.blood
        rtx_h = (
            b.rituximab_kill_per_day / MIN_PER_DAY * rtx / (rtx + b.rituximab_ec50_ug_per_ml)
            if rtx > 0
            else 0.0
        )
        rtx_h *= self.bio.rituximab_tissue_penetration
        u = [rng.uniform(w, xp) for w in rng.draw(pop.id[:n], step, rules.PURPOSE_FATE, 0, sim.seed, xp=xp)]
        died, divide = rules.cell_fates(
            pop,
            u,
            dt_min,
            now,
            self.table.death_per_min,
            self.idx,
            self.rates,
            ifng_at,
            damage_at,
            rtx_h,
            self.cd20,
            self.car_mask,
        )
        dead |= died
        divide &= ~dead
        # Exits into blood: a cell in a vessel voxel leaves with probability 1 - exp(-rate dt)
        # (the same law as agents.intravasate, here on the fate block's fourth word so the
        # step needs one draw and one compaction).
        t = pop.type[:n].astype(np.int64)
        in_vessel = self.vessel_mask.reshape(-1)[vox] != 0
        leave = in_vessel & ~dead & ~divide & (u[3] < xp.asarray(self.p_exit)[t])
        left = np.bincount(sim.backend.asnumpy(t[leave]), minlength=len(self.p_exit)) if n else None
        # Daughters start at the parent's position (crowding separates them) with its kills.
        parents = xp.flatnonzero(divide)
        d_pos = pop.position[parents].copy()
        d_type = pop.type[parents].copy()
        d_state = pop.state[parents].copy()
        d_kills = pop["kills"][parents].copy()
        d_last = pop["last_kill"][parents].copy()
        engaged = pop["busy_until"][:n] > np.float32(now)
        # sources are computed on the cells alive after the kills (dead cells do not secrete)
        self._sources(vox, ~dead & engaged, ~dead)
        pop.remove(dead | leave)
        if left is not None:
            for ti in np.flatnonzero(left):
                self._move_blood(self.table.cell_types[ti], int(left[ti]))
        m = int(parents.shape[0])
        if m:
            n0 = pop.n
            pop.add(d_pos, d_type, state=d_state, kills=d_kills, last_kill=d_last)
            init_velocity(pop, sim.motility, sim.grid.ndim, sim.seed, rows=xp.arange(n0, pop.n))

    def exits(self, step: int, dt_min: float) -> None:
        """Cells in vessel voxels leaving into blood (agents.intravasate), moved to the blood pools.

        The step itself folds exits into after_move (one draw, one compaction); this stand-alone
        form serves tests and callers that only exchange cells."""
        sim = self.sim
        pop = sim.cells
        rate = self.table.intravasation
        if rate.max() > 0 and pop.n:
            counts = intravasate(
                pop,
                sim.grid,
                self.vessel_mask,
                rate,
                dt_min,
                step,
                sim.seed,
                type_filter=np.flatnonzero(rate > 0),
                ntypes=len(rate),
            )
            counts = sim.backend.asnumpy(counts)
            for ti in np.flatnonzero(counts):
                self._move_blood(self.table.cell_types[ti], int(counts[ti]))

    def _sources(self, vox, engaged, alive) -> None:
        """Fill self.source (n_fields, nz, ny, nx), units/min, from cells and tissue."""
        sim = self.sim
        xp = self.xp
        f = sim.fields
        src = self.source
        src[...] = 0
        t = sim.cells.type[: sim.cells.n].astype(np.int64)
        shape = sim.grid.shape
        fi = self.fi
        car = xp.asarray(self.car_mask)[t]
        if "ifng" in fi:
            src[fi["ifng"]] = (
                rules.count_per_voxel(vox, engaged & car, self.nvox, xp) * np.float32(self.ifng_per_cell)
            ).reshape(shape)
        mac_act = alive & (t == self.idx["macrophage"]) & (sim.cells.state[: sim.cells.n] == rules.ACTIVATED)
        n_mac = rules.count_per_voxel(vox, mac_act, self.nvox, xp).reshape(shape)
        if "il6" in fi:
            src[fi["il6"]] = n_mac * np.float32(self.il6_per_cell)
        if "autoantibody" in fi:
            ab = alive & xp.asarray(self.secretes_ab)[t]
            src[fi["autoantibody"]] = (
                rules.count_per_voxel(vox, ab, self.nvox, xp) * np.float32(self.ab_per_cell)
            ).reshape(shape)
        bio = self.bio
        if "damage" in fi:
            dmg = f["damage"]
            s = n_mac * np.float32(bio.damage_per_day_per_macrophage / MIN_PER_DAY) * (1 - dmg)
            if bio.antibody_damage and self.damage0 is not None:
                s = s + np.float32(self.repair_per_min * self.blood.y["ab"]) * self.damage0
            src[fi["damage"]] = s
            if "cxcl13" in fi:
                src[fi["cxcl13"]] = np.float32(bio.cxcl13_nM_per_min_per_damage) * dmg
        if "cxcl10" in fi:
            # IFN-gamma-induced (engaged CAR-T) plus the disease's own CXCL10 from damaged tissue
            c10 = src[fi["cxcl10"]]
            if "ifng" in fi:
                g = f["ifng"]
                c10 += np.float32(bio.cxcl10_nM_per_min) * g / (g + np.float32(bio.cxcl10_ifng_kd_nM))
            if "damage" in fi:
                c10 += np.float32(bio.cxcl10_nM_per_min_per_damage) * f["damage"]

    def c_blood(self, names, dtype):
        """Blood concentrations for the fields' vessel exchange (n_fields,), host array."""
        c = np.zeros(len(names), dtype=dtype)
        for i, n in enumerate(names):
            if n == "autoantibody":
                c[i] = self.blood.y["ab"]
            elif n == "il6":
                c[i] = self.blood.y["il6"]
        return c
