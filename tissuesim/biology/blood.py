"""The systemic compartment (MODEL.md section 4): a small ODE system for one well-mixed blood pool.

State (host float64 scalars; time in days inside the equations, the caller passes minutes):

===========  ===============  =================================================================
E[p], M[p]   cells/uL         effector and memory CAR-T of product p (e.g. cd19_car_t)
R[p]         0..1             anti-CAR response against product p's binder
X[p]         0..1             expansion capacity of product p (exhaustion with engagement)
b_naive      cells/uL         naive B cells (marrow production, lifespan)
b_auto       cells/uL         autoreactive memory B cells (recruited from naive B by the disease)
pb           cells/uL-equiv.  body plasmablasts (made from autoreactive B), per uL of blood
pc           cells/uL-equiv.  body long-lived plasma cells (from plasmablasts)
ab           rel              serum autoantibody, 1 = baseline
il6          pg/mL            serum IL-6
rtx          ug/mL            serum rituximab
===========  ===============  =================================================================

Equations (per day; f_p = Ag_p / (Ag_p + K) with Ag_p the blood-equivalent antigen+ cells of
product p's target, k = kill_per_car_t_per_ul_per_day, T_p = E_p + M_p)::

    dE_p/dt = rho X_p f_p (E_p + M_p) - d_E (1 - X_p f_p) E_p - k_rej R_p E_p
    dX_p/dt = -X_p f_p / tau_exh                 (a fresh dose mixes in at X = 1)
    dM_p/dt = mu d_E (1 - X_p f_p) E_p - d_M M_p - k_rej R_p M_p
    dR_p/dt = g_p R_p (1 - R_p)                  (after first exposure; g_p = growth x immunogenicity [x allo])
    db_naive/dt = (b0 - a0 - b_naive) / tau_B - (kill_CD19 + rtx_kill) b_naive
    db_auto/dt  = g_A D(ab) b_auto (1 - b_auto / a0) - (access_A kill_CD19 + access_rtx rtx_kill) b_auto
    dpb/dt = (pb0 D(ab) b_auto / a0 - pb) / tau_pb - (kill_CD19 + kill_BCMA) pb
    dpc/dt = pc0 / tau_pc * pb / pb0 - pc / tau_pc - kill_BCMA pc
    dab/dt = k_G [(1 - phi) pb / pb0 + phi pc / pc0] - k_G ab
    dil6/dt = k_6 (il6_0 - il6) + s_6 (1 - steroid) killed,
              killed = kill_CD19 (b_naive + access_A b_auto + pb) + kill_BCMA (pb + pc)
    drtx/dt = -k_rtx rtx

with kill_CD19 = k sum of T_p over the CD19 products (BCMA alike) as per-cell rates, rtx_kill =
k_R rtx / (rtx + EC50), g_A the autoreactive clone's renewal rate and access_A, access_rtx the
shares of the blood kill rates that reach it in its niches.

The disease drive D(ab) = ab^h (1 + K^h) / (ab^h + K^h), with D(1) = 1, closes the autoimmune
loop: autoantibody damages tissue, damaged tissue releases autoantigen and inflammation, and
those drive the autoreactive memory clone to renew itself and to make plasmablasts (modelling
choice: antigen-driven activation with T-cell help is the usual account of persistent
autoimmunity). While the clone is present its logistic renewal holds it at a0, so the steady
states satisfy ab = pc/pc0 = pb/pb0 = D(ab): the disease state ab = 1 (stable, D'(1) =
h K^h / (1 + K^h) < 1) and, for h = 2, the remission threshold ab* = K^2
(``remission_threshold`` solves any h). The course after a therapy follows from two things:

- When the autoreactive clone regrows, relative to the autoantibody level. CD19 CAR-T reach it
  with ``autoreactive_niche_access`` of their blood killing rate (memory B cells in inflamed
  tissue and lymphoid aggregates); below ``extinction_per_ul`` (fewer than one cell in the
  body) it is gone for good, otherwise it regrows at autoreactive_b_cell_growth_per_day x
  D(ab) once the CAR-T have waned. CAR-T that persist for months hold it down until the
  autoantibody left by the dying long-lived plasma cells is below ab*: the clone comes back
  quiescent, naive B cells return after 3-5 months, and remission lasts (most patients:
  Mackensen 2022; Mueller 2024). An anti-CAR response that removes the CAR-T within weeks
  lets the clone regrow while autoantibody is still above ab*, and the disease returns after
  months (the seed patient, about nine months).
- Whether autoantibody stays under ab*. BCMA CAR-T remove plasmablasts and plasma cells but not
  the clone; once serum autoantibody has fallen below ab* the clone's plasmablast output
  (proportional to D) runs down with it, and remission lasts with B cells present (the seed
  patient after BCMA CAR-T).

Memory cells divide on antigen into effectors (the rho f M term) and stay memory. Every
baseline is a steady state, so without therapy nothing drifts. Stein 2019 gives the shape of the
CAR-T curve (0.78 d doubling, effector t1/2 4.3 d, memory fraction 0.8 %, memory t1/2 220 d).

Integration: classical RK4 over each step (dt = 1 min is ~1e-3 of the fastest rate, IL-6 at
~17/d, so the error is far below any biological uncertainty).

Where it runs: this class is the host side and the reference. On NumPy, advance() runs at the
start of each step. On CuPy the same step runs as kernels/blood.cu at the end of the previous
step, just before the step's one device read, which brings the advanced state back with the cell
count; this object then mirrors it (biology/blood_device.py). Either way the arrival counts are
drawn on the host from these concentrations.
"""

from __future__ import annotations

import bisect
import math

import numpy as np

LN2 = math.log(2.0)
#: fields whose blood side (the vessel exchange's c_blood) is a blood state: field -> state name
#: (autoantibody rel to baseline, IL-6 pg/mL, rituximab ug/mL); other fields see 0 in blood
FIELD_IN_BLOOD = {"autoantibody": "ab", "il6": "il6", "rituximab": "rtx"}
MIN_PER_DAY = 1440.0


def crs_grade(il6_effective_pg_per_ml, thresholds) -> np.ndarray:
    """CRS grade 0..4 from effective serum IL-6 (pg/mL): the number of thresholds reached.

    thresholds : ascending pg/mL at which grades 1, 2, 3, 4 begin (modelling choice, conf).
    """
    return np.searchsorted(np.asarray(thresholds, float), np.asarray(il6_effective_pg_per_ml, float), "right")


class Blood:
    """Blood ODEs for the CAR products ``products`` {name: target antigen}.

    cfg : BloodConfig (conf ``biology.blood``); therapy : TherapyConfig (immunogenicity, CRS
    management). The state is in ``self.y`` (dict name -> float, units as in the module table).
    """

    def __init__(self, cfg, products: dict[str, str], therapy=None):
        self.cfg = cfg
        self.products = dict(products)
        self._thresholds = sorted(float(x) for x in cfg.crs_il6_thresholds_pg_per_ml)
        self.immunogenicity = float(therapy.binder_immunogenicity) if therapy is not None else 0.0
        crs = therapy.crs_management if therapy is not None else "none"
        self.uses_tocilizumab = "tocilizumab" in crs
        self.uses_steroids = "steroids" in crs
        c = cfg
        self.v_blood_ul = c.blood_volume_l * 1e6
        self.rho = LN2 / c.car_t_doubling_days
        self.d_e = LN2 / c.effector_half_life_days
        self.d_m = LN2 / c.memory_half_life_days
        self.k_g = LN2 / c.igg_half_life_days
        self.k_6 = LN2 / (c.il6_half_life_hours / 24.0)
        self.k_rtx = LN2 / c.rituximab_half_life_days
        self.k_toci = LN2 / c.tocilizumab_half_life_days
        self._drive_h = float(c.disease_drive_hill)
        self._drive_kh = float(c.disease_drive_half_rel) ** self._drive_h
        y = {
            "b_naive": c.b_cell_per_ul - c.autoreactive_b_cell_per_ul,
            "b_auto": c.autoreactive_b_cell_per_ul,
            "pb": c.plasmablast_per_ul,
            "pc": c.plasma_cell_per_ul,
            "ab": 1.0,
            "il6": c.il6_baseline_pg_per_ml,
            "rtx": 0.0,
        }
        for p in self.products:
            y[f"E_{p}"] = 0.0
            y[f"M_{p}"] = 0.0
            y[f"R_{p}"] = 0.0
            y[f"X_{p}"] = 1.0
        self.y = y
        self.names = list(y)
        self._names_t = tuple(self.names)
        self.growth = {p: 0.0 for p in self.products}  # anti-CAR growth rate (1/d), set at exposure
        self.toci_day: float | None = None  # day tocilizumab was given
        self.steroid_day: float | None = None
        self.day = 0.0
        self.step_grade = 0  # CRS grade reached in the last step, before management
        # relapse detector
        self.depleted = False
        self.ab_nadir = math.inf
        self.relapse = False
        self.treated = False

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict[str, np.ndarray]:
        """The ODE state as float64 (k,) in the order of ``names`` (for io.checkpoint)."""
        return {"y": np.array([self.y[n] for n in self.names], dtype=np.float64)}

    def load_state_dict(self, d: dict) -> None:
        if "y" in d:
            self.y = {n: float(v) for n, v in zip(self.names, np.asarray(d["y"], dtype=np.float64))}

    def meta_dict(self) -> dict:
        """Scalars that are not ODE state: clock, treatment times, relapse detector."""
        return {
            "day": self.day,
            "growth": dict(self.growth),
            "toci_day": self.toci_day,
            "steroid_day": self.steroid_day,
            "depleted": self.depleted,
            "ab_nadir": None if math.isinf(self.ab_nadir) else self.ab_nadir,
            "relapse": self.relapse,
            "treated": self.treated,
        }

    def load_meta_dict(self, m: dict) -> None:
        self.day = float(m["day"])
        self.growth.update({k: float(v) for k, v in m["growth"].items()})
        self.toci_day = m["toci_day"]
        self.steroid_day = m["steroid_day"]
        self.depleted = bool(m["depleted"])
        self.ab_nadir = math.inf if m["ab_nadir"] is None else float(m["ab_nadir"])
        self.relapse = bool(m["relapse"])
        self.treated = bool(m["treated"])

    # ------------------------------------------------------------------ readouts
    def row(self) -> dict[str, float]:
        """The blood columns of a timeseries row (names as in DESIGN.md section 5)."""
        r = {f"blood_{p}_per_ul": self.car_t_per_ul(p) for p in self.products}
        r["blood_b_cell_per_ul"] = self.b_cell_per_ul()
        # the body's B lineage pools as blood equivalents (module table): what drives the disease
        r["blood_autoreactive_b_cell_per_ul"] = self.y["b_auto"]
        r["blood_plasmablast_per_ul"] = self.y["pb"]
        r["blood_plasma_cell_per_ul"] = self.y["pc"]
        r["serum_autoantibody_rel"] = self.y["ab"]
        r["serum_il6_pg_per_ml"] = self.y["il6"]
        r["crs_grade"] = float(self.crs_grade())
        r["relapse"] = float(self.relapse)
        for p in self.products:
            r[f"anti_car_response_{p}"] = self.y[f"R_{p}"]
        return r

    def car_t_per_ul(self, product: str) -> float:
        return self.y[f"E_{product}"] + self.y[f"M_{product}"]

    def b_cell_per_ul(self) -> float:
        return self.y["b_naive"] + self.y["b_auto"]

    def tocilizumab_blockade(self) -> float:
        if self.toci_day is None:
            return 0.0
        return self.cfg.tocilizumab_blockade * math.exp(-self.k_toci * (self.day - self.toci_day))

    def il6_effective(self) -> float:
        """Serum IL-6 (pg/mL) that acts: tocilizumab blocks the receptor, not the cytokine."""
        return self.y["il6"] * (1.0 - self.tocilizumab_blockade())

    def crs_grade(self) -> int:
        # bisect_right = the number of thresholds reached (same rule as crs_grade() above)
        return bisect.bisect_right(self._thresholds, self.il6_effective())

    def antigen_per_ul(self, antigen: str, y=None) -> float:
        """Blood-equivalent cells/uL carrying ``antigen`` (CD19: B + plasmablasts; BCMA:
        plasmablasts + plasma cells; CD20: B cells)."""
        y = self.y if y is None else y
        b = y["b_naive"] + y["b_auto"]
        return {"CD19": b + y["pb"], "BCMA": y["pb"] + y["pc"], "CD20": b}.get(antigen, 0.0)

    def disease_drive(self, ab: float) -> float:
        """D(ab) = ab^h (1 + K^h) / (ab^h + K^h): recruitment of autoreactive B cells by the
        disease at serum autoantibody ``ab`` (rel), 1 at baseline (see the module docstring)."""
        h, k = self._drive_h, self._drive_kh
        if ab <= 0.0:
            return 0.0
        a = ab**h
        return a * (1.0 + k) / (a + k)

    def remission_threshold(self) -> float:
        """The unstable steady state ab* of the autoimmune loop (rel; K^2 for h = 2).

        Serum autoantibody relaxes towards D(ab) (B cells at baseline), so ab grows where
        D(ab) > ab and shrinks where D(ab) < ab: the largest root below 1 where D - ab turns from
        negative to positive is the threshold. Found by a scan and bisection; 0 if there is none
        (the loop cannot run down while B cells are present)."""
        xs = np.linspace(1e-9, 1.0 - 1e-6, 4001)
        g = np.array([self.disease_drive(x) - x for x in xs])
        idx = np.flatnonzero((g[:-1] < 0) & (g[1:] >= 0))
        if idx.size == 0:
            return 0.0
        a, b = xs[idx[-1]], xs[idx[-1] + 1]
        for _ in range(80):
            m = 0.5 * (a + b)
            a, b = (m, b) if self.disease_drive(m) - m < 0 else (a, m)
        return 0.5 * (a + b)

    # ------------------------------------------------------------------ events
    def infuse(
        self, product: str, dose_per_kg: float, allogeneic: bool = False, immunogenicity: float | None = None
    ) -> float:
        """Add a CAR-T dose (cells/kg) or rituximab (mg/kg); returns the blood increment.

        CAR-T: dose x weight / blood volume x circulating fraction (cells/uL). Rituximab:
        dose x weight / plasma volume (ug/mL). Exposure starts the anti-CAR response, growing at
        anti_car_growth_per_day x immunogenicity (this infusion's, else the therapy's) [x the
        allogeneic factor].
        """
        c = self.cfg
        if product == "rituximab":
            add = dose_per_kg * c.body_weight_kg * 1e3 / (c.rituximab_plasma_volume_l * 1e3)  # ug/mL
            self.y["rtx"] += add
            self.treated = True
            return add
        if product not in self.products:
            raise KeyError(f"unknown CAR product {product!r}; known: {sorted(self.products)}")
        add = dose_per_kg * c.body_weight_kg / self.v_blood_ul * c.infusion_circulating_fraction
        # Fresh cells have their full expansion capacity: mix it in by cell number.
        t = self.car_t_per_ul(product)
        self.y[f"X_{product}"] = (self.y[f"X_{product}"] * t + add) / (t + add)
        self.y[f"E_{product}"] += add
        imm = self.immunogenicity if immunogenicity is None else float(immunogenicity)
        g = c.anti_car_growth_per_day * imm * (c.allogeneic_factor if allogeneic else 1.0)
        self.growth[product] = max(self.growth[product], g)
        if self.y[f"R_{product}"] < c.anti_car_seed and g > 0:
            self.y[f"R_{product}"] = c.anti_car_seed
        self.treated = True
        return add

    def lymphodeplete(self) -> None:
        c = self.cfg
        keep_b = 1.0 - c.lymphodepletion_b_cell_fraction
        self.y["b_naive"] *= keep_b
        self.y["b_auto"] *= keep_b
        for p in self.products:
            self.y[f"R_{p}"] *= 1.0 - c.lymphodepletion_t_cell_fraction

    def exchange(self, name: str, delta_cells_per_ul: float) -> None:
        """Cells moved between blood and the patch (positive: into blood), in cells/uL."""
        self.y[name] = max(0.0, self.y[name] + delta_cells_per_ul)

    def move(self, cell_type: str, d: float) -> None:
        """``d`` cells/uL of patch cell type ``cell_type`` moved into blood (negative: out of it).

        B cells split between the naive and autoreactive pools in proportion (into an empty B
        pool they go to the naive one). A CAR product's cells that leave blood come out of its
        effector and memory pools in proportion, as the arrivals are drawn from both
        (Immunology.blood_per_ul); those that come back join its effectors. Other types have no
        blood pool. kernels/blood.cu does the same, in this order, for the exits (the only moves
        it sees: arrivals are drawn and moved on the host)."""
        if cell_type == "b_cell":
            tot = self.b_cell_per_ul()
            if tot > 0:
                fa = self.y["b_auto"] / tot
                self.exchange("b_auto", d * fa)
                self.exchange("b_naive", d * (1 - fa))
            elif d > 0:
                self.exchange("b_naive", d)
        elif cell_type in self.products:
            e, m = f"E_{cell_type}", f"M_{cell_type}"
            tot = self.y[e] + self.y[m]
            if d < 0 and tot > 0:  # taking from effectors alone made cells out of the memory
                fm = self.y[m] / tot
                self.exchange(m, d * fm)
                self.exchange(e, d * (1 - fm))
            else:
                self.exchange(e, d)

    # ------------------------------------------------------------------ dynamics
    def rhs(self, y: dict) -> dict:
        """dy/dt (per day) at state y (dict of floats)."""
        c = self.cfg
        k = c.kill_per_car_t_per_ul_per_day
        d = dict.fromkeys(y, 0.0)
        kill_cd19 = 0.0  # per-capita kill rate (1/d) on CD19+ cells, summed over products
        kill_bcma = 0.0
        for p, target in self.products.items():
            e, m, r, x = y[f"E_{p}"], y[f"M_{p}"], y[f"R_{p}"], y[f"X_{p}"]
            ag = self.antigen_per_ul(target, y)
            f = ag / (ag + c.antigen_kd_per_ul)
            g = x * f  # stimulation that still drives expansion
            rej = c.anti_car_kill_per_day * r
            d[f"E_{p}"] = self.rho * g * (e + m) - self.d_e * (1 - g) * e - rej * e
            d[f"M_{p}"] = c.memory_fraction * self.d_e * (1 - g) * e - self.d_m * m - rej * m
            # capacity is a property of the cells present: it only wears down while there are any
            d[f"X_{p}"] = -x * f / c.exhaustion_days if e + m > 0 else 0.0
            d[f"R_{p}"] = self.growth[p] * r * (1.0 - r)
            t = e + m
            if target == "CD19":
                kill_cd19 += k * t
            elif target == "BCMA":
                kill_bcma += k * t
        rtx = y["rtx"]
        k_rtx = c.rituximab_kill_per_day * rtx / (rtx + c.rituximab_ec50_ug_per_ml) if rtx > 0 else 0.0
        tau_b = c.b_cell_lifespan_days
        b0n = c.b_cell_per_ul - c.autoreactive_b_cell_per_ul
        a0, pb0, pc0 = c.autoreactive_b_cell_per_ul, c.plasmablast_per_ul, c.plasma_cell_per_ul
        d["b_naive"] = (b0n - y["b_naive"]) / tau_b - (kill_cd19 + k_rtx) * y["b_naive"]
        drive = self.disease_drive(y["ab"])
        d["b_auto"] = (
            c.autoreactive_b_cell_growth_per_day * drive * y["b_auto"] * (1.0 - y["b_auto"] / a0)
            - (c.autoreactive_niche_access * kill_cd19 + c.rituximab_niche_access * k_rtx) * y["b_auto"]
        )
        tpb, tpc = c.plasmablast_lifespan_days, c.plasma_cell_lifespan_days
        d["pb"] = (pb0 * drive * y["b_auto"] / a0 - y["pb"]) / tpb - (kill_cd19 + kill_bcma) * y["pb"]
        d["pc"] = pc0 / tpc * y["pb"] / pb0 - y["pc"] / tpc - kill_bcma * y["pc"]
        phi = c.long_lived_antibody_fraction
        d["ab"] = self.k_g * ((1 - phi) * y["pb"] / pb0 + phi * y["pc"] / pc0) - self.k_g * y["ab"]
        steroid = c.steroid_il6_reduction if self.steroid_day is not None else 0.0
        # antigen+ cells killed by CAR-T per uL per day (the kill terms above, without rituximab's):
        # target killing activates the macrophages that make CRS IL-6 (Morris 2021; Liu 2020)
        bn, ba, pb, pc = y["b_naive"], y["b_auto"], y["pb"], y["pc"]
        niche = c.autoreactive_niche_access
        killed = kill_cd19 * bn + niche * kill_cd19 * ba + (kill_cd19 + kill_bcma) * pb + kill_bcma * pc
        d["il6"] = (
            self.k_6 * (c.il6_baseline_pg_per_ml - y["il6"])
            + c.il6_pg_per_ml_per_killed_cell_per_ul * (1 - steroid) * killed
        )
        d["rtx"] = -self.k_rtx * rtx
        return d

    def _constants(self) -> tuple:
        """The parameters of rhs() as one tuple (read once per advance, not per evaluation)."""
        c = self.cfg
        codes = {"CD19": 0, "BCMA": 1, "CD20": 2}
        prods = tuple(
            (7 + 4 * i, codes.get(target, 3), self.growth[p])
            for i, (p, target) in enumerate(self.products.items())
        )
        b0n = c.b_cell_per_ul - c.autoreactive_b_cell_per_ul
        return (
            prods,
            c.kill_per_car_t_per_ul_per_day,
            c.antigen_kd_per_ul,
            c.anti_car_kill_per_day,
            c.memory_fraction,
            c.exhaustion_days,
            c.rituximab_kill_per_day,
            c.rituximab_ec50_ug_per_ml,
            c.b_cell_lifespan_days,
            b0n,
            c.autoreactive_b_cell_per_ul,
            c.plasmablast_per_ul,
            c.plasma_cell_per_ul,
            c.autoreactive_b_cell_growth_per_day,
            c.autoreactive_niche_access,
            c.rituximab_niche_access,
            c.plasmablast_lifespan_days,
            c.plasma_cell_lifespan_days,
            c.long_lived_antibody_fraction,
            c.steroid_il6_reduction if self.steroid_day is not None else 0.0,
            c.il6_baseline_pg_per_ml,
            c.il6_pg_per_ml_per_killed_cell_per_ul,
        )

    def _rhs_list(self, const: tuple):
        """rhs() on a list of floats in the order of ``names`` (b_naive, b_auto, pb, pc, ab, il6,
        rtx, then E, M, R, X of each product), returned as a function of that list.

        Each derivative is the same expression as in rhs(), evaluated in the same order, so the
        floats are bit for bit those of rhs(); only the dict look-ups are gone."""
        (prods, k, kd, k_anti, mf, exh, k_rk, ec50, tau_b, b0n, a0, pb0, pc0, g_auto, niche, niche_rtx, tpb, tpc, phi,
         steroid, il6_0, s_6) = const  # fmt: skip
        rho, d_e, d_m, k_g, k_6, k_rtx_decay = self.rho, self.d_e, self.d_m, self.k_g, self.k_6, self.k_rtx
        h_drive, k_drive = self._drive_h, self._drive_kh
        one_k = 1.0 + k_drive
        pc0_tpc = pc0 / tpc
        one_phi = 1 - phi
        one_steroid = 1 - steroid
        nv = 7 + 4 * len(prods)

        def rhs(y):
            d = [0.0] * nv
            bn, ba, pb, pc, ab, il6, rtx = y[0], y[1], y[2], y[3], y[4], y[5], y[6]
            kill_cd19 = 0.0
            kill_bcma = 0.0
            for i, code, growth in prods:
                e, m, r, x = y[i], y[i + 1], y[i + 2], y[i + 3]
                if code == 0:
                    ag = bn + ba + pb
                elif code == 1:
                    ag = pb + pc
                elif code == 2:
                    ag = bn + ba
                else:
                    ag = 0.0
                f = ag / (ag + kd)
                g = x * f
                rej = k_anti * r
                d[i] = rho * g * (e + m) - d_e * (1 - g) * e - rej * e
                d[i + 1] = mf * d_e * (1 - g) * e - d_m * m - rej * m
                d[i + 3] = -x * f / exh if e + m > 0 else 0.0
                d[i + 2] = growth * r * (1.0 - r)
                t = e + m
                if code == 0:
                    kill_cd19 += k * t
                elif code == 1:
                    kill_bcma += k * t
            k_rtx = k_rk * rtx / (rtx + ec50) if rtx > 0 else 0.0
            d[0] = (b0n - bn) / tau_b - (kill_cd19 + k_rtx) * bn
            if ab <= 0.0:
                drive = 0.0
            else:
                a = ab**h_drive
                drive = a * one_k / (a + k_drive)
            d[1] = g_auto * drive * ba * (1.0 - ba / a0) - (niche * kill_cd19 + niche_rtx * k_rtx) * ba
            d[2] = (pb0 * drive * ba / a0 - pb) / tpb - (kill_cd19 + kill_bcma) * pb
            d[3] = pc0_tpc * pb / pb0 - pc / tpc - kill_bcma * pc
            d[4] = k_g * (one_phi * pb / pb0 + phi * pc / pc0) - k_g * ab
            killed = kill_cd19 * bn + niche * kill_cd19 * ba + (kill_cd19 + kill_bcma) * pb + kill_bcma * pc
            d[5] = k_6 * (il6_0 - il6) + s_6 * one_steroid * killed
            d[6] = -k_rtx_decay * rtx
            return d

        return rhs

    def advance(self, dt_min: float) -> list[str]:
        """Advance by dt_min minutes (RK4); returns the names of events it triggered
        ('tocilizumab', 'steroids') so the simulation can log them."""
        h = dt_min / MIN_PER_DAY
        y = self.y
        names = self.names
        if len(y) == len(names) and tuple(y) == self._names_t:
            # the same RK4 on lists (_rhs_list): the same floats in the same order, less dict work
            v = list(y.values())
            rhs = self._rhs_list(self._constants())
            hh = 0.5 * h
            k1 = rhs(v)
            k2 = rhs([a + hh * b for a, b in zip(v, k1)])
            k3 = rhs([a + hh * b for a, b in zip(v, k2)])
            k4 = rhs([a + h * b for a, b in zip(v, k3)])
            h6 = h / 6.0
            # x if x > 0.0 else 0.0 is max(0.0, x) (NaN and -0.0 give 0.0 as well)
            new = [a + h6 * (b1 + 2 * b2 + 2 * b3 + b4) for a, b1, b2, b3, b4 in zip(v, k1, k2, k3, k4)]
            self.y = dict(zip(names, [x if x > 0.0 else 0.0 for x in new]))
        else:
            k1 = self.rhs(y)
            k2 = self.rhs({n: y[n] + 0.5 * h * k1[n] for n in y})
            k3 = self.rhs({n: y[n] + 0.5 * h * k2[n] for n in y})
            k4 = self.rhs({n: y[n] + h * k3[n] for n in y})
            self.y = {n: max(0.0, y[n] + h / 6.0 * (k1[n] + 2 * k2[n] + 2 * k3[n] + k4[n])) for n in y}
        if self.y["b_auto"] < self.cfg.extinction_per_ul:
            self.y["b_auto"] = 0.0  # fewer than one cell in the body: the clone is gone
        self.day += h
        events = []
        # The grade this step reached, before any management given in it (tocilizumab blocks
        # the IL-6 receptor at once, so reading the grade afterwards would hide the grade that
        # triggered it).
        self.step_grade = self.crs_grade()
        # CRS management is given when CRS reaches grade 2 (the usual indication).
        if self.step_grade >= 2:
            if self.uses_tocilizumab and self.toci_day is None:
                self.toci_day = self.day
                events.append("tocilizumab")
            if self.uses_steroids and self.steroid_day is None:
                self.steroid_day = self.day
                events.append("steroids")
        self._detect_relapse()
        return events

    def _detect_relapse(self) -> None:
        """Relapse: after a treatment, blood B cells were depleted (< 5 % of baseline) and came
        back above relapse_b_cell_fraction of baseline, and serum autoantibody has risen by
        relapse_autoantibody_rise above its post-treatment nadir. Latched once set."""
        if not self.treated or self.relapse:
            return
        c = self.cfg
        b = self.b_cell_per_ul()
        if b < 0.05 * c.b_cell_per_ul:
            self.depleted = True
        self.ab_nadir = min(self.ab_nadir, self.y["ab"])
        if (
            self.depleted
            and b > c.relapse_b_cell_fraction * c.b_cell_per_ul
            and self.y["ab"] > (1.0 + c.relapse_autoantibody_rise) * self.ab_nadir
        ):
            self.relapse = True


def run_blood(cfg, duration_days: float, dt_min: float = 15.0, every_days: float = 0.25):
    """The systemic model alone: the blood ODEs under cfg.therapy, without a tissue patch.

    A fast way to explore therapies over months to years (a 600-day run takes seconds); the
    full Simulation adds the tissue and its small exchange of cells with blood. cfg : the run
    configuration (biology.blood, therapy, biology.car_products); dt_min : RK4 step, minutes (15
    is converged to ~1e-6 relative, see tests/biology/test_blood.py); every_days : row interval.

    Returns (table, events): table {column: float64 (rows,)} with ``time`` (days) and the blood
    columns of the simulation's timeseries (crs_grade is the highest grade since the last row);
    events a list of therapy.Event in the order given.
    """
    from tissuesim.biology.immunology import plain  # here: immunology imports this module
    from tissuesim.biology.therapy import Event, TherapySchedule

    bio, therapy = plain(cfg.biology), plain(cfg.therapy)
    blood = Blood(bio.blood, {p: str(c.target) for p, c in bio.car_products.items()}, therapy)
    schedule = TherapySchedule(therapy)
    log: list = []
    n = max(1, round(duration_days * MIN_PER_DAY / dt_min))
    every = max(1, round(every_days * MIN_PER_DAY / dt_min))
    rows = [{"time": 0.0, **blood.row()}]
    crs = 0
    for k in range(n):
        for ev in schedule.due((k + 1) * dt_min / MIN_PER_DAY):
            schedule.apply(ev, blood)
            log.append(ev)
        for what in blood.advance(dt_min):
            log.append(Event(blood.day, what, "CRS grade 2 reached"))
        for ev in schedule.on_relapse(blood.day, blood.relapse, log):
            schedule.apply(ev, blood)
            log.append(ev)
        crs = max(crs, blood.step_grade)
        if (k + 1) % every == 0 or k + 1 == n:
            r = blood.row()
            r["crs_grade"] = float(crs)
            crs = 0
            rows.append({"time": (k + 1) * dt_min / MIN_PER_DAY, **r})
    table = {c: np.array([r[c] for r in rows], dtype=np.float64) for c in rows[0]}
    return table, log
