"""The immunology layer: couples the cells, the fields and the blood compartment each step.

Order inside a step (DESIGN.md section 2): blood ODE -> arrivals through vessel walls -> (cells
move, in the Simulation) -> contacts (kill, engage) -> deaths, divisions, differentiation ->
exits into blood -> secretion sources for the fields.

Patch-to-body scaling: the patch (grid volume, a 2D grid is a slab one voxel thick) stands for
``inflamed_volume_ml`` of inflamed organ, so one patch cell that enters or leaves moves
patch_equivalents = inflamed volume / patch volume body cells, i.e. patch_equivalents /
blood volume (uL) cells/uL between blood and tissue. Arrivals per vessel voxel per minute are
``extravasation x blood concentration (cells/uL)`` scaled by inflammation (the serum IL-6 that
acts, after tocilizumab's receptor blockade).
"""

from __future__ import annotations

import numpy as np

from tissuesim.agents import extravasate_many, init_velocity, intravasate, rng, vessel_sites
from tissuesim.agents.neighbours import contacts
from tissuesim.backend import scatter_add
from tissuesim.biology import rules
from tissuesim.biology.blood import FIELD_IN_BLOOD, Blood
from tissuesim.biology.cells import build_cell_table, ifng_nM_per_min_per_cell, pg_per_ml_per_min_per_cell

MIN_PER_DAY = 1440.0


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
    any_big = bool(big.any())
    # exp(-0) = 1 for the big means, which the loop skips (the same floats where there are none)
    p = np.exp(-np.where(big, 0.0, means)) if any_big else np.exp(-means)
    cdf = p  # never written in place below
    active = u > cdf
    active &= means > 0
    if any_big:
        active &= ~big
    i = 0
    while i < 200 and active.any():
        i += 1
        k = np.where(active, k + 1, k)
        p = p * means / np.maximum(k, 1)
        cdf = cdf + np.where(active, p, 0.0)
        active = active & (u > cdf)
    if any_big:
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
        rules.register_cell_attributes(pop)
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
        # anti-CAR T cells and the cell types of the blood's CAR products, in its order
        self._anti = t.index("anti_car_t") if "anti_car_t" in t.cell_types else None
        self._product_types_d = self.xp.asarray(
            np.array([t.index(p) for p in self.blood.products], dtype=np.int32)
        )
        self.target_types = [int(k) for k in np.flatnonzero(t.can_kill[self.killer_types].any(axis=0))]
        self.cd20 = t.carrying("CD20")
        self.secretes_ab = np.zeros(len(t.cell_types), bool)
        self.secretes_ab[[self.idx["plasmablast"], self.idx["plasma_cell"]]] = True
        self.rates = rules.fate_rates(bio)
        # Secretion per cell as a rate of concentration in its voxel (units/min).
        self.ifng_per_cell = ifng_nM_per_min_per_cell(bio.ifng_molecules_per_cell_per_s, self.voxel_um3)
        self.il6_per_cell = pg_per_ml_per_min_per_cell(bio.il6_pg_per_cell_per_hour, self.voxel_um3)
        # IgG molecules/s -> nM/min in the voxel -> rel (1 = baseline serum concentration), of
        # which the disease autoantibody is the share tissue_igg_autoantibody_fraction.
        self.ab_per_cell = (
            ifng_nM_per_min_per_cell(bio.igg_molecules_per_cell_per_s, self.voxel_um3)
            * bio.tissue_igg_autoantibody_fraction
            / bio.autoantibody_baseline_nM
        )
        f = sim.fields
        self.fi = {n: f.index(n) for n in f.names}
        self.damage0 = f["damage"].copy() if "damage" in f.names else None
        self.repair_per_min = cfg.fields["damage"].decay_per_min if "damage" in f.names else 0.0
        self.p_exit = -np.expm1(-self.table.intravasation * sim.dt_min)
        self.source = self.xp.zeros_like(f.values)
        self._build_uptake(cfg, t.cell_types)
        # Per-type tables on the device, made once (no host-to-device copy inside the step).
        nt = len(t.cell_types)
        self.ntypes = nt
        xp = self.xp
        self.killer_mask = np.zeros(nt, bool)
        self.killer_mask[self.killer_types] = True
        self.target_mask = np.zeros(nt, bool)
        self.target_mask[self.target_types] = True
        #: the step's sync-free formulations (GPU): contacts into a padded buffer, kills as masks,
        #: one compaction that also appends the daughters, per-voxel counts by atomic adds; the
        #: step then reads the device once (the new cell count and the exits per type). NumPy
        #: takes the compact forms (fewer operations); both give the same cells, bit for bit.
        self.device_paths = bool(sim.backend.is_gpu)
        #: the blood ODE as kernels/blood.cu at the end of each step (biology/blood_device.py), its
        #: result read with the step's one device read; on NumPy Blood.advance runs at the start
        #: of the step. Tests set it on NumPy to run the same bookkeeping through the kernel's twin.
        self.blood_on_device = bool(sim.backend.is_gpu)
        self._dblood = None
        #: steps whose blood advance needed a read of its own (events, restores; GPU diagnostics)
        self.blood_extra_reads = 0
        self._ones_buf = None
        self._counts = self._work = self._work2 = None  # kept buffers of _sources
        self._can_kill_d = xp.asarray(self.table.can_kill)
        self._kill_p_d = xp.asarray(np.asarray(self.table.kill_p, dtype=np.float64))
        self._type_range_d = xp.arange(nt, dtype=np.int64)
        self._killer_mask_d = xp.asarray(self.killer_mask)  # for the host path on a GPU
        self._target_mask_d = xp.asarray(self.target_mask)
        self._secretes_ab_d = xp.asarray(self.secretes_ab)
        self._p_exit_d = xp.asarray(self.p_exit)
        self._vessel_flat = self.vessel_mask.reshape(-1) != 0
        self._fate_tables = None
        # Source category of a cell by (type, engaged, activated): 0 IFN-gamma (engaged CAR-T
        # and anti-CAR T cells: "engaged CAR-T and T cells", MODEL.md section 2), 1 activated
        # macrophage, 2 antibody-secreting, 3 none. The categories are exclusive by type, so one
        # integer bincount over (category, voxel) gives all three counts.
        self.secretes_ifng = self.car_mask.copy()
        if self._anti is not None:
            self.secretes_ifng[self._anti] = True
        self._secretes_ifng_d = xp.asarray(self.secretes_ifng)
        cat = np.full((nt, 2, 2), 3, dtype=np.int64)
        cat[self.secretes_ifng, 1, :] = 0
        cat[self.idx["macrophage"], :, 1] = 1
        cat[self.secretes_ab, :, :] = 2
        exclusive = not (self.secretes_ifng & self.secretes_ab).any() and not (
            self.secretes_ifng[self.idx["macrophage"]] or self.secretes_ab[self.idx["macrophage"]]
        )
        self._source_cat = xp.asarray(cat.reshape(-1)) if exclusive else None
        # Which types can arrive (extravasation > 0): only their blood concentration is needed.
        self._arriving = [int(k) for k in np.flatnonzero(t.extravasation != 0)]
        # Contact pre-check on the host (NumPy): squared contact radius as contacts() uses it,
        # with a margin so the check never skips a search that would find a pair.
        r = np.float32(self.bio.contact_radius_um)
        self._r2_reach = np.float32(np.float32(r * r) * np.float32(1.001))
        self.prefilter_max_pairs = 1 << 18

    def _build_uptake(self, cfg, cell_types) -> None:
        """Receptor uptake of the fields (config fields.<name>.uptake_by, MODEL.md section 2).

        Uptake field k (of n_up, in field order) is the field ``up_field[k]``; its consumers are
        the types with bit k of ``consumes`` (uint8 (ntypes,)); ``up_rate[k]`` is one consumer's
        uptake at saturation (nM/min in its voxel), ``up_kd[k]`` its half-saturation level (nM).
        Each step fills ``self.uptake`` (n_fields, nz, ny, nx), 1/min, None when no field has
        uptake: lambda = n_consumers x up_rate / (up_kd + max(u, 0)) in the up_field rows, 0
        elsewhere (the field step integrates -lambda u exactly over the step, lambda taken at
        the step's start)."""
        from tissuesim.config import takes_up

        f = self.sim.fields
        fields, masks, rates, kds = [], [], [], []
        for name in f.names:
            c = cfg.fields[name]
            if not takes_up(c):
                continue
            fields.append(f.index(name))
            masks.append(np.isin(np.asarray(cell_types), list(c.uptake_by)))
            rates.append(ifng_nM_per_min_per_cell(c.uptake_molecules_per_cell_per_s, self.voxel_um3))
            kds.append(c.uptake_kd_nM)
        assert len(fields) <= 8, "config.validate allows at most 8 fields with uptake"
        self.n_up = len(fields)
        self.uptake = self.xp.zeros_like(f.values) if fields else None
        # source_fields' uptake argument when there is none: never written, but an array of its
        # own (the kernel's pointers are __restrict__, so it may not alias the sources)
        self._no_uptake = self.xp.zeros(1, dtype=f.values.dtype)
        consumes = np.zeros(len(cell_types), np.uint8)
        for k, m in enumerate(masks):
            consumes[m] |= np.uint8(1 << k)
        xp = self.xp
        self.up_field = fields
        self.up_masks = [xp.asarray(m) for m in masks]
        self.up_rate = np.array(rates, np.float32)
        self.up_kd = np.array(kds, np.float32)
        self._consumes_d = xp.asarray(consumes)
        self._up_field_d = xp.asarray(np.array(fields, np.int32))
        self._up_rate_d = xp.asarray(self.up_rate)
        self._up_kd_d = xp.asarray(self.up_kd)

    # ------------------------------------------------------------------ blood side
    def blood_per_ul(self, cell_type: str) -> float:
        """Blood concentration (cells/uL) of the cells that arrive as ``cell_type``."""
        b = self.blood
        if cell_type == "b_cell":
            return b.b_cell_per_ul()
        if cell_type in b.products:
            return b.car_t_per_ul(cell_type)
        if cell_type == "anti_car_t":
            # one clone per CAR binder, each at most anti_car_t_max_per_ul at full response
            return self.bio.anti_car_t_max_per_ul * sum(b.y[f"R_{p}"] for p in b.products)
        if cell_type == "macrophage":
            return self.bio.monocyte_per_ul
        return 0.0

    def device_blood(self):
        """The blood step of kernels/blood.cu for this run (made on first use)."""
        if self._dblood is None:
            from tissuesim.biology.blood_device import DeviceBlood

            f = self.sim.fields
            self._dblood = DeviceBlood(
                self.blood,
                self.table.cell_types,
                self.per_ul_per_cell,
                f.names,
                f.values.dtype,
                self.sim.backend,
            )
        return self._dblood

    def c_blood_device(self):
        """Blood concentrations for the vessel exchange (n_fields,) float64 on the backend, as
        written by this step's blood kernel (the state after the exits)."""
        return self.device_blood().cb[: len(self.sim.fields.names)]

    def inflammation_factor(self) -> float:
        """1 + gain x IL-6 / (IL-6 + Kd): extravasation in inflamed tissue, driven by the IL-6
        that acts (tocilizumab blocks the receptor: Blood.il6_effective), as the CRS grade is."""
        il6 = self.blood.il6_effective()
        return 1.0 + self.bio.inflammation_gain * il6 / (il6 + self.bio.inflammation_il6_kd_pg_per_ml)

    def _move_blood(self, cell_type: str, cells: int) -> None:
        """``cells`` patch cells moved into blood (negative: out of blood into the patch)."""
        if cells == 0:
            return
        self.blood.move(cell_type, cells * self.per_ul_per_cell)

    # ------------------------------------------------------------------ step parts
    def before_move(self, step: int, dt_min: float) -> list[str]:
        """Blood ODE, then arrivals from blood. Returns blood events (CRS management)."""
        sim = self.sim
        if self.blood_on_device:
            events, read = self.device_blood().advance(step, dt_min)
            self.blood_extra_reads += read
        else:
            events = self.blood.advance(dt_min)
        pop = sim.cells
        infl = self.inflammation_factor()
        n0 = pop.n
        names = self.table.cell_types
        conc = np.zeros(len(names))
        for ti in self._arriving:  # the others have extravasation 0, hence mean 0
            conc[ti] = self.blood_per_ul(names[ti])
        means = self.table.extravasation * conc * self.n_sites * dt_min * infl
        arrivals = poisson_small(means, sim.seed, step)
        extravasate_many(pop, sim.grid, self.sites, arrivals, step, sim.seed, n_sites=self.n_sites)
        if self._anti is not None and arrivals[self._anti] > 0:
            self._assign_specificity(pop, n0, step)
        for ti in np.flatnonzero(arrivals):
            if names[ti] not in ("macrophage", "anti_car_t"):  # these come from pools not modelled in blood
                self._move_blood(names[ti], -int(arrivals[ti]))
        if pop.n > n0:
            init_velocity(pop, sim.motility, sim.grid.ndim, sim.seed, start=n0)
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
            killed = self._contact_kills(pop, n, now, step)
            if killed is not None:
                dead |= killed
        vox = sim.grid.voxel_index(pop.position[:n], xp=xp)
        f = sim.fields
        # a missing field reads as zeros of the fields' dtype (float32 zeros keep the GPU's fate
        # kernel; the zero terms add exactly either way)
        ifng_at = rules.sample_field(f["ifng"], vox) if "ifng" in self.fi else xp.zeros(n, f.values.dtype)
        damage_at = (
            rules.sample_field(f["damage"], vox) if "damage" in self.fi else xp.zeros(n, f.values.dtype)
        )
        # rituximab acts on each cell at the field value where it is (runs that give it)
        rtx_at = rules.sample_field(f["rituximab"], vox) if "rituximab" in self.fi else None
        u = rng.draw_uniform(pop.id[:n], step, rules.PURPOSE_FATE, 0, sim.seed, xp=xp)  # (4, n)
        if self._fate_tables is None or self._fate_tables.dt_min != float(dt_min):
            self._fate_tables = rules.fate_tables(
                self.ntypes,
                dt_min,
                self.table.death_per_min,
                self.idx,
                self.rates,
                self.cd20,
                self.car_mask,
                xp,
            )
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
            rtx_at,
            self.cd20,
            self.car_mask,
            tables=self._fate_tables,
        )
        dead, divide, leave, gone, left, t = self._exits(pop, vox, u[3], dead, died, divide)
        # sources are computed on the cells alive after the kills (dead cells do not secrete)
        self._step_sources(vox, dead, now, t)
        if not self.device_paths:
            self._births_and_exits_host(pop, dead, leave, divide, t, step, dt_min)
        else:
            self._births_and_exits_device(pop, dead, leave, divide, t, step, dt_min, gone=gone, left=left)

    def _exits(self, pop, vox, u3, killed, died, divide):
        """The step's final masks and its exits into blood, after the fates.

        A cell in a vessel voxel leaves with probability 1 - exp(-rate dt) (the law of
        agents.intravasate, here on the fate block's fourth word u3, float32 (n,), so the step
        needs one draw and one compaction); a cell that dies or divides does not leave. Types as
        after the fates. killed, died, divide : bool (n,) (died and divide may be changed in
        place). Returns (dead, divide, leave, gone, left, t): bool (n,) masks, gone = dead |
        leave; left int64 (ntypes,) leavers per type on the device, or None where the caller
        counts them; t int64 (n,) types, or None. On CuPy with the step's device formulation one
        launch of fate_exits (agents.cu), of which the element-wise form below is the twin.
        """
        xp = self.xp
        n = pop.n
        if self.sim.backend.is_gpu and self.device_paths:
            from tissuesim.agents import _kernels as K

            leave = xp.empty(n, dtype=bool)
            gone = xp.empty(n, dtype=bool)
            left = xp.zeros(self.ntypes, dtype=np.uint64)
            K.launch(
                self.sim.backend,
                "fate_exits",
                n,
                (
                    np.int32(n),
                    xp.ascontiguousarray(vox),
                    self._vessel_flat.view(np.uint8),
                    pop.type,
                    u3,
                    self._p_exit_d,
                    np.int32(self.ntypes),
                    killed.view(np.uint8),
                    died.view(np.uint8),
                    divide.view(np.uint8),
                    leave.view(np.uint8),
                    gone.view(np.uint8),
                    left,
                ),
            )
            return died, divide, leave, gone, left.view(np.int64), None
        dead = killed
        dead |= died
        divide &= ~dead
        t = pop.type[:n].astype(np.int64)
        leave = self._vessel_flat[vox]
        leave &= ~dead
        leave &= ~divide
        leave &= u3 < self._p_exit_d[t]
        return dead, divide, leave, None, None, t

    def _contact_kills(self, pop, n: int, now: float, step: int):
        """Contacts and kills of this step: bool (n,) targets killed, or None (no search)."""
        if self.device_paths:
            # a pair buffer no contact count can outgrow in practice (a killer touches a dozen
            # cells at most); an overflow would be flagged and read at output time
            pop.pair_capacity = max(pop.pair_capacity, 16 * n, 1024)
            exact, kill = False, rules.contact_kills_masked
            can_kill, kill_p = self._can_kill_d, self._kill_p_d
        else:
            if not self._contact_search_needed(pop, n, now):
                return None
            exact, kill = True, rules.contact_kills
            can_kill, kill_p = self.table.can_kill, self.table.kill_p
        r = self.bio.contact_radius_um
        pairs = contacts(pop, r, self.killer_types, self.target_types, grid=self.sim.grid, exact=exact)
        bio = self.bio
        killed, _ = kill(
            pop,
            pairs,
            can_kill,
            kill_p,
            now,
            bio.handling_time_min,
            bio.exhaustion_kills,
            step,
            self.sim.seed,
        )
        return killed

    def _assign_specificity(self, pop, n0: int, step: int) -> None:
        """Anti-CAR T cells that arrived (rows n0:) each take one CAR product as their target,
        with probability R_p / sum R (the blood responses against each product's binder), by a
        uniform keyed by the cell's id; a response raised against one binder then spares the
        others (a fully human binder escapes one raised against a murine binder). Host
        scalars only: no upload on the GPU."""
        b = self.blood
        r = np.array([b.y[f"R_{p}"] for p in b.products], dtype=np.float64)
        cum = np.cumsum(r) / r.sum()
        xp = self.xp
        ids = pop.id[n0 : pop.n]
        u = rng.draw_uniform(ids, step, rules.PURPOSE_SPECIFICITY, 0, self.sim.seed, xp=xp)[0]
        k = xp.zeros(u.shape, dtype=np.intp)
        u = u.astype(np.float64)  # compared in double: a float32 would round the shares
        for c in cum[:-1].tolist():  # k = number of cumulative shares below u
            k += u > c
        spec = pop["specific_to"][n0 : pop.n]
        spec[...] = xp.where(pop.type[n0 : pop.n] == self._anti, self._product_types_d[k], spec)

    #: what a daughter takes from its parent (position, type, state, its kill history and target)
    INHERIT = ("position", "type", "state", "kills", "last_kill", "specific_to")

    def _births_and_exits_host(self, pop, dead, leave, divide, t, step: int, dt_min: float) -> None:
        sim = self.sim
        xp = self.xp
        if xp is np:
            left = np.bincount(t[leave], minlength=self.ntypes) if leave.any() else None
        else:  # the host path on the GPU (for comparisons)
            left = np.bincount(sim.backend.asnumpy(t[leave]), minlength=self.ntypes)
        # Daughters start at the parent's position (crowding separates them) with its kills.
        parents = xp.flatnonzero(divide)
        if parents.shape[0]:
            d = {name: pop[name][parents].copy() for name in self.INHERIT}
        gone = dead | leave
        if gone.any():
            pop.remove(gone)
        if self.blood_on_device:  # the exits go into the blood step (the twin on NumPy)
            db = self.device_blood()
            out = db.launch(dt_min, left)  # left None: no exits
            db.finish(sim.backend.asnumpy(out), step + 1, dt_min)
        elif left is not None:
            for ti in np.flatnonzero(left):
                self._move_blood(self.table.cell_types[ti], int(left[ti]))
        if parents.shape[0]:
            n0 = pop.n
            # every inherited attribute beyond position, type and state, as the device path does
            more = {k: d[k] for k in self.INHERIT if k not in ("position", "type", "state")}
            pop.add(d["position"], d["type"], state=d["state"], **more)
            init_velocity(pop, sim.motility, sim.grid.ndim, sim.seed, start=n0)

    def _births_and_exits_device(
        self, pop, dead, leave, divide, t, step: int, dt_min: float, gone=None, left=None
    ) -> None:
        """The same as _births_and_exits_host with one device read (Population.remove_and_divide).
        gone (dead | leave) and left (exits per type, int64 (ntypes,)) are formed here when None."""
        sim = self.sim
        if left is None:  # exits per type without a host read: a (ntypes, n) one-hot sum
            left = ((t[None, :] == self._type_range_d[:, None]) & leave[None, :]).sum(axis=1)
        if gone is None:
            gone = dead | leave
        if self.blood_on_device:
            # the blood step (exits, then the next step's advance) goes just before the read,
            # and its results come back with it
            db = self.device_blood()
            out = db.launch(dt_min, left)
            nt = self.ntypes
            # int64 both: the float64 results travel as their bits and are viewed back on the host
            extra = self.xp.concatenate((left.astype(self.xp.int64, copy=False), out.view(self.xp.int64)))
            _removed, born, got = pop.remove_and_divide(gone, divide, self.INHERIT, extra=extra)
            db.finish(np.ascontiguousarray(got[nt:]).view(np.float64), step + 1, dt_min)
        else:
            _removed, born, left = pop.remove_and_divide(gone, divide, self.INHERIT, extra=left)
            for ti in np.flatnonzero(left):
                self._move_blood(self.table.cell_types[ti], int(left[ti]))
        if born:
            init_velocity(pop, sim.motility, sim.grid.ndim, sim.seed, start=pop.n - born)

    def _contact_search_needed(self, pop, n: int, now: float) -> bool:
        """Whether a contact search can find a kill (NumPy): some free killer has a target of a
        type it kills within the contact radius. The distances are the float32 ones of
        contacts() against the radius plus 0.1 %, so a skipped search is one that finds no pair a
        free killer can claim (contact_kills would change nothing). The device path always
        searches: deciding would need a host read."""
        t = pop.type[:n]
        busy = pop["busy_until"][:n]
        if self.xp is not np:  # the host path on the GPU (for comparisons): two flags read back
            xp = self.xp
            free = self._killer_mask_d[t] & (busy <= np.float32(now))
            tgt = self._target_mask_d[t]
            flags = self.sim.backend.asnumpy(xp.stack((free.any(), tgt.any())))
            return bool(flags[0]) and bool(flags[1])
        free = self.killer_mask[t]
        free &= busy <= np.float32(now)
        fi = np.flatnonzero(free)
        if fi.size == 0:
            return False
        ti = np.flatnonzero(self.target_mask[t])
        if ti.size == 0:
            return False
        if fi.size * ti.size > self.prefilter_max_pairs:
            return True
        ok = self.table.can_kill[t[fi][:, None], t[ti]]
        pos = pop.position
        fx, tx = pos[fi], pos[ti]
        d = tx[:, 0] - fx[:, 0, None]  # x_j - x_i, then y, z as contacts() sums them
        r2 = d * d
        d = tx[:, 1] - fx[:, 1, None]
        d *= d
        r2 += d
        d = tx[:, 2] - fx[:, 2, None]
        d *= d
        r2 += d
        ok &= r2 < self._r2_reach
        return bool(ok.any())

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

    def _step_sources(self, vox, dead, now: float, t) -> None:
        """The step's sources from the cells alive after the kills (dead cells do not secrete),
        engaged where busy_until > now (min). On CuPy with float32 fields and exclusive source
        categories: the kernels source_counts and source_fields (agents.cu; 3 launches instead of
        some 25), whose twin is :meth:`_sources`."""
        pop = self.sim.cells
        f = self.sim.fields
        if self.sim.backend.is_gpu and self._source_cat is not None and f.values.dtype == np.float32:
            self._sources_kernels(vox, dead, now)
            return
        n = pop.n
        engaged = pop["busy_until"][:n] > np.float32(now)
        alive = ~dead
        self._sources(vox, engaged & alive, alive, t)

    def _sources_kernels(self, vox, dead, now: float) -> None:
        """:meth:`_sources` on CuPy in three launches (see _step_sources)."""
        from tissuesim.agents import _kernels as K

        sim = self.sim
        xp = self.xp
        pop = sim.cells
        f = sim.fields
        n = pop.n
        nvox = self.nvox
        self._zeroed_counts()
        K.launch(
            sim.backend,
            "source_counts",
            n,
            (
                np.int32(n),
                xp.ascontiguousarray(vox),
                pop.type,
                pop.state,
                pop["busy_until"],
                np.float32(now),
                xp.ascontiguousarray(dead).view(np.uint8),
                self._source_cat,
                np.int32(self.ntypes),
                np.int64(nvox),
                self._consumes_d,
                np.int32(self.n_up),
                self._counts,
            ),
        )
        fi = self.fi
        bio = self.bio
        f32 = np.float32
        repair = bool(bio.antibody_damage and self.damage0 is not None and "damage" in fi)
        K.launch(
            sim.backend,
            "source_fields",
            nvox,
            (
                np.int64(nvox),
                np.int32(len(f.names)),
                self._counts,
                f.values,
                self.damage0 if repair else f.values,  # not read without repair
                np.int32(repair),
                *(
                    np.int32(fi.get(k, -1))
                    for k in ("ifng", "il6", "autoantibody", "damage", "cxcl13", "cxcl10")
                ),
                f32(self.ifng_per_cell),
                f32(self.il6_per_cell),
                f32(self.ab_per_cell),
                f32(bio.damage_per_day_per_macrophage / MIN_PER_DAY),
                f32(self.repair_per_min * self.blood.y["ab"]) if repair else f32(0),
                f32(bio.cxcl13_nM_per_min_per_damage),
                f32(bio.cxcl10_nM_per_min),
                f32(bio.cxcl10_ifng_kd_nM),
                f32(bio.cxcl10_nM_per_min_per_damage),
                self.source,
                np.int32(self.n_up),
                self._up_field_d,
                self._up_rate_d,
                self._up_kd_d,
                self._no_uptake if self.uptake is None else self.uptake,
            ),
        )

    def _sources(self, vox, engaged, alive, t=None) -> None:
        """Fill self.source (n_fields, nz, ny, nx), units/min, from cells and tissue.

        vox : int64 (n,) voxel of each cell; engaged, alive : bool (n,); t : int64 (n,) types
        (read from the population when None).

        Works in place: the per-voxel counts (and the uptake fields' consumers, from which
        _uptake_rates fills self.uptake) go into a kept int32 buffer ((3 + n_up) nvox + 1) by one
        scatter-add and every field-sized product is written with ``out=`` into the source array
        or two kept fields (self._work, self._work2), so the step allocates nothing of grid size here.
        The floats are those of the plain expressions (float32 count x float32 rate, the same
        operand order)."""
        sim = self.sim
        xp = self.xp
        f = sim.fields
        src = self.source
        src[...] = 0
        n = sim.cells.n
        if t is None:
            t = sim.cells.type[:n].astype(np.int64)
        fi = self.fi
        nvox = self.nvox
        f32 = np.float32
        act = sim.cells.state[:n] == rules.ACTIVATED
        counts = self._zeroed_counts()
        if self._work is None:
            self._work = xp.empty(nvox, dtype=f.values.dtype)
            self._work2 = xp.empty(nvox, dtype=f.values.dtype)
        if self._source_cat is not None:
            # one integer count over (category, voxel): the same counts as three bincounts;
            # cells of no category (3) count into the spare last bin
            k = t * 2
            k += engaged
            k *= 2
            k += act
            cat = xp.where(alive, self._source_cat[k], 3)
            cat *= nvox
            cat += vox
            xp.minimum(cat, 3 * nvox, out=cat)
        else:
            ifng = engaged & self._secretes_ifng_d[t]
            mac = alive & (t == self.idx["macrophage"]) & act
            ab = alive & self._secretes_ab_d[t]
            cat = xp.concatenate(
                [xp.where(m, vox + c * nvox, 3 * nvox) for c, m in enumerate((ifng, mac, ab))]
            )
        if self.n_up:  # the consumers of each uptake field, counted in the same scatter
            base = 3 * nvox + 1
            cat = xp.concatenate(
                [cat]
                + [
                    xp.where(alive & m[t], vox + (base + k * nvox), 3 * nvox)
                    for k, m in enumerate(self.up_masks)
                ]
            )
        scatter_add(xp, counts, cat, self._ones(cat.shape[0]))
        n_ifng, n_mac, n_ab = counts[:nvox], counts[nvox : 2 * nvox], counts[2 * nvox : 3 * nvox]
        if self.n_up:
            self._uptake_rates(counts[3 * nvox + 1 :])

        def out(name):
            return src[fi[name]].reshape(-1)

        def scaled(c, rate, dst):  # float32(count) * float32(rate) into dst
            xp.multiply(c, f32(rate), out=dst, dtype=f32)
            return dst

        if "ifng" in fi:
            scaled(n_ifng, self.ifng_per_cell, out("ifng"))
        if "il6" in fi:
            scaled(n_mac, self.il6_per_cell, out("il6"))
        if "autoantibody" in fi:
            scaled(n_ab, self.ab_per_cell, out("autoantibody"))
        bio = self.bio
        w = self._work
        if "damage" in fi:
            dmg = f["damage"].reshape(-1)
            s = scaled(n_mac, bio.damage_per_day_per_macrophage / MIN_PER_DAY, out("damage"))
            xp.subtract(1, dmg, out=w)
            s *= w  # n_mac rate (1 - damage)
            if bio.antibody_damage and self.damage0 is not None:
                xp.multiply(self.damage0.reshape(-1), f32(self.repair_per_min * self.blood.y["ab"]), out=w)
                s += w
            if "cxcl13" in fi:
                xp.multiply(dmg, f32(bio.cxcl13_nM_per_min_per_damage), out=out("cxcl13"))
        if "cxcl10" in fi:
            # IFN-gamma-induced (engaged CAR-T and anti-CAR T) plus the disease's own CXCL10 from
            # damaged tissue
            c10 = out("cxcl10")
            if "ifng" in fi:
                g = f["ifng"].reshape(-1)
                r = self._work2
                xp.multiply(g, f32(bio.cxcl10_nM_per_min), out=w)
                xp.add(g, f32(bio.cxcl10_ifng_kd_nM), out=r)
                w /= r
                c10 += w
            if "damage" in fi:
                xp.multiply(f["damage"].reshape(-1), f32(bio.cxcl10_nM_per_min_per_damage), out=w)
                c10 += w

    def _uptake_rates(self, consumers) -> None:
        """self.uptake's rows of the uptake fields from their consumer counts (int32 (n_up nvox,))
        and the fields now: float32(count) x rate, then / (kd + max(u, 0)), one rounding each in
        the fields' dtype, as the kernel source_fields does."""
        xp = self.xp
        f = self.sim.fields
        nvox = self.nvox
        w = self._work
        dt = f.values.dtype
        for k, fi in enumerate(self.up_field):
            lam = self.uptake[fi].reshape(-1)
            xp.multiply(consumers[k * nvox : (k + 1) * nvox], dt.type(self.up_rate[k]), out=lam, dtype=dt)
            xp.maximum(f.values[fi].reshape(-1), 0, out=w)
            w += dt.type(self.up_kd[k])
            lam /= w

    def _zeroed_counts(self):
        """The kept per-voxel counts, int32 ((3 + n_up) nvox + 1,), set to zero (made on first use):
        the three source categories (3 nvox), a spare bin (cells of none), then the consumers of
        each uptake field (n_up nvox, from 3 nvox + 1)."""
        if self._counts is None:
            self._counts = self.xp.zeros((3 + self.n_up) * self.nvox + 1, dtype=np.int32)
        else:
            self._counts[...] = 0
        return self._counts

    def _ones(self, n: int):
        """int32 ones (n,) on the device, kept between steps (a view of a grown buffer)."""
        if self._ones_buf is None or self._ones_buf.shape[0] < n:
            self._ones_buf = self.xp.ones(max(n, 1024) * 2, dtype=np.int32)
        return self._ones_buf[:n]

    def c_blood(self, names, dtype):
        """Blood concentrations for the fields' vessel exchange (n_fields,), host array."""
        c = np.zeros(len(names), dtype=dtype)
        for i, n in enumerate(names):
            if n in FIELD_IN_BLOOD:
                c[i] = self.blood.y[FIELD_IN_BLOOD[n]]
        return c
