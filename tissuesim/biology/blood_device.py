"""The blood compartment's step on the device (kernels/blood.cu), folded into the step's one read.

On the GPU the step reads the device once, when the cells that died, divided or left are
compacted (Population.remove_and_divide). The blood ODE needs what that read brings (how many
cells of each type left into blood) and the next step needs the advanced blood state (its arrival
counts are drawn on the host), so the kernel runs just before the read and does, in order:

1. the exits of this step into the blood pools (what Immunology._move_blood does on the host);
2. a copy of that state: the blood at the end of this step (rows, checkpoints, the fields'
   vessel exchange through ``cb``);
3. the next step's RK4 advance, CRS grade and management, and relapse detection
   (Blood.advance).

The host mirror (Immunology.blood) then holds the end-of-step state, and the advanced one waits
as ``pending`` until the next step begins. If anything changed the host's blood in between (a
therapy event, a restored checkpoint, a user), the pending result no longer applies: it is
dropped and the advance is redone from the host state, at the cost of one more read on that step.
Between steps the host's changes (arrivals, infusions, relapse-triggered doses) travel to the
device in the state uploaded before each launch, through a pinned buffer and an asynchronous copy
on the compute stream (no host wait).

The order of events within a step is that of DESIGN.md section 2 on both backends; on NumPy
(``Immunology.blood_on_device`` false) Blood.advance runs at the start of the step as before.
``run_host`` is the kernel's twin on NumPy arrays: it runs the host code (Blood.exchange and
Blood.advance) on the unpacked state, so a NumPy run through this module is bit for bit a plain
NumPy run (tests/biology/test_blood_device.py), and the kernel is checked against it.
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass

import numpy as np

from tissuesim.biology.blood import FIELD_IN_BLOOD, Blood

FILENAME = "blood.cu"
OPTIONS = ("--fmad=false",)
MAXV = 64  # as in blood.cu
#: the constants in kernels/blood.cu's order (enum P_*)
PRM_NAMES = (
    "kill",
    "kd",
    "k_anti",
    "mf",
    "exh",
    "k_rk",
    "ec50",
    "tau_b",
    "b0n",
    "a0",
    "pb0",
    "pc0",
    "g_auto",
    "niche",
    "niche_rtx",
    "tpb",
    "tpc",
    "phi",
    "steroid",
    "il6_0",
    "s_6",
    "rho",
    "d_e",
    "d_m",
    "k_g",
    "k_6",
    "k_rtx",
    "h_drive",
    "k_drive",
    "extinction",
    "toci_block",
    "k_toci",
    "b0",
    "relapse_b",
    "relapse_ab",
    "uses_toci",
    "uses_steroids",
    "per_ul_per_cell",
)
META = 7  # day, toci_day, steroid_day, depleted, ab_nadir, relapse, treated
OUT_META = 8  # day, toci_day, steroid_day, depleted, ab_nadir, relapse, grade, events
TARGET_CODES = {"CD19": 0, "BCMA": 1, "CD20": 2}
POOL_NONE, POOL_B = -1, -2


def _nan_if_none(x) -> float:
    return math.nan if x is None else float(x)


def _none_if_nan(x: float):
    return None if math.isnan(x) else float(x)


@dataclass
class Advanced:
    """The next step's blood, computed at the end of the previous one (host copies)."""

    step: int  # the step it is for
    dt_min: float
    fingerprint: bytes  # the host state it was advanced from
    y: np.ndarray  # float64 (nv,)
    day: float
    toci_day: float | None
    steroid_day: float | None
    depleted: bool
    ab_nadir: float
    relapse: bool
    grade: int
    events: list[str]


class DeviceBlood:
    """Packs a Blood for kernels/blood.cu, launches it (or its twin) and unpacks the results.

    blood : the host Blood (Immunology.blood), kept as the mirror; cell_types : names (ntypes,);
    per_ul_per_cell : blood cells/uL per patch cell; field_names : the fields (vessel exchange);
    field_dtype : the fields' dtype (cb is rounded through float32 for float32 fields);
    backend : tissuesim.backend.Backend (CuPy: the kernel; NumPy: run_host).

    The constants (rates, baselines, CRS thresholds, management) are read from ``blood`` when the
    DeviceBlood is made, as Blood reads them from its configuration when it is made; the state,
    the anti-CAR growth rates and the clock travel with every launch.
    """

    def __init__(self, blood: Blood, cell_types, per_ul_per_cell: float, field_names, field_dtype, backend):
        self.blood = blood
        self.be = backend
        self.xp = backend.xp
        self.np_ = len(blood.products)
        self.nv = 7 + 4 * self.np_
        if self.nv > MAXV:
            raise ValueError(
                f"biology.car_products: {self.np_} products; the device blood step allows at most {(MAXV - 7) // 4}"
            )
        layout = ["b_naive", "b_auto", "pb", "pc", "ab", "il6", "rtx"]
        layout += [f"{v}_{p}" for p in blood.products for v in ("E", "M", "R", "X")]
        if list(blood.names) != layout:
            raise ValueError(f"unexpected blood state layout {blood.names}")  # kernel indices
        self.cell_types = list(cell_types)
        self.ntypes = len(self.cell_types)
        self.per_ul_per_cell = float(per_ul_per_cell)
        self.field_names = list(field_names)
        self.cb_f32 = np.dtype(field_dtype) == np.float32
        c = blood.cfg
        # the values of Blood._constants / _rhs_list, by the same expressions
        vals = {
            "kill": c.kill_per_car_t_per_ul_per_day,
            "kd": c.antigen_kd_per_ul,
            "k_anti": c.anti_car_kill_per_day,
            "mf": c.memory_fraction,
            "exh": c.exhaustion_days,
            "k_rk": c.rituximab_kill_per_day,
            "ec50": c.rituximab_ec50_ug_per_ml,
            "tau_b": c.b_cell_lifespan_days,
            "b0n": c.b_cell_per_ul - c.autoreactive_b_cell_per_ul,
            "a0": c.autoreactive_b_cell_per_ul,
            "pb0": c.plasmablast_per_ul,
            "pc0": c.plasma_cell_per_ul,
            "g_auto": c.autoreactive_b_cell_growth_per_day,
            "niche": c.autoreactive_niche_access,
            "niche_rtx": c.rituximab_niche_access,
            "tpb": c.plasmablast_lifespan_days,
            "tpc": c.plasma_cell_lifespan_days,
            "phi": c.long_lived_antibody_fraction,
            "steroid": c.steroid_il6_reduction,
            "il6_0": c.il6_baseline_pg_per_ml,
            "s_6": c.il6_pg_per_ml_per_killed_cell_per_ul,
            "rho": blood.rho,
            "d_e": blood.d_e,
            "d_m": blood.d_m,
            "k_g": blood.k_g,
            "k_6": blood.k_6,
            "k_rtx": blood.k_rtx,
            "h_drive": blood._drive_h,
            "k_drive": blood._drive_kh,
            "extinction": c.extinction_per_ul,
            "toci_block": c.tocilizumab_blockade,
            "k_toci": blood.k_toci,
            "b0": c.b_cell_per_ul,
            "relapse_b": c.relapse_b_cell_fraction,
            "relapse_ab": c.relapse_autoantibody_rise,
            "uses_toci": float(blood.uses_tocilizumab),
            "uses_steroids": float(blood.uses_steroids),
            "per_ul_per_cell": self.per_ul_per_cell,
        }
        self.prm = np.array([float(vals[k]) for k in PRM_NAMES] + list(blood._thresholds), dtype=np.float64)
        pool = []
        for t in self.cell_types:
            if t == "b_cell":
                pool.append(POOL_B)
            elif t in blood.products:
                k = blood.names.index(f"E_{t}")
                if blood.names.index(f"M_{t}") != k + 1:  # the kernel finds M_p next to E_p
                    raise RuntimeError(f"blood state: M_{t} does not follow E_{t}")
                pool.append(k)
            else:
                pool.append(POOL_NONE)
        # the blood state each field's c_blood is (-1: none)
        from_blood = [
            blood.names.index(FIELD_IN_BLOOD[n]) if n in FIELD_IN_BLOOD else -1 for n in self.field_names
        ]
        self.iprm = np.array(
            [self.np_, self.ntypes, len(blood._thresholds), len(self.field_names)]
            + [TARGET_CODES.get(t, 3) for t in blood.products.values()]
            + pool
            + from_blood,
            dtype=np.int32,
        )
        n_up = self.nv + self.np_ + META
        n_out = 2 * self.nv + OUT_META
        self.pending: Advanced | None = None
        self._kernel = None
        self._fp_buf = np.empty(n_up, dtype=np.float64)
        if backend.is_gpu:
            import cupyx

            xp = self.xp
            self._prm_d = xp.asarray(self.prm)
            self._iprm_d = xp.asarray(self.iprm)
            self._up_host = cupyx.empty_pinned((n_up,), dtype=np.float64)
            self._up_d = xp.empty(n_up, dtype=np.float64)
            self._zero_left = xp.zeros(max(self.ntypes, 1), dtype=np.int64)
            self.out = xp.empty(n_out, dtype=np.float64)
            self.cb = xp.zeros(max(len(self.field_names), 1), dtype=np.float64)
        else:
            self._up_host = np.empty(n_up, dtype=np.float64)
            self._zero_left = np.zeros(max(self.ntypes, 1), dtype=np.int64)
            self.out = np.empty(n_out, dtype=np.float64)
            self.cb = np.zeros(max(len(self.field_names), 1), dtype=np.float64)

    # ------------------------------------------------------------------ packing
    def pack(self, blood: Blood, up: np.ndarray) -> np.ndarray:
        """Write the host state into ``up`` (float64 (nv + P + 7,), layout of blood.cu)."""
        nv, np_ = self.nv, self.np_
        y = blood.y
        up[:nv] = [y[n] for n in blood.names]
        up[nv : nv + np_] = [blood.growth[p] for p in blood.products]
        up[nv + np_ :] = (
            blood.day,
            _nan_if_none(blood.toci_day),
            _nan_if_none(blood.steroid_day),
            float(blood.depleted),
            blood.ab_nadir,
            float(blood.relapse),
            float(blood.treated),
        )
        return up

    def fingerprint(self, blood: Blood) -> bytes:
        """Everything of the host Blood that the kernel reads, as the bytes of its packed state
        (to see if it changed; bytes, so a NaN 'not given' day compares equal to itself)."""
        return self.pack(blood, self._fp_buf).tobytes()

    # ------------------------------------------------------------------ launching
    def launch(self, dt_min: float, left=None, state=None):
        """Upload the host state, run the blood step (exits ``left``: int64 (ntypes,) backend
        array, or None for none) and return ``self.out`` (backend float64 (2 nv + 8,)); also
        fills ``self.cb``. No host wait on the GPU. ``state``: a packed state (float64
        (nv + P + 7,)) to upload instead of the host Blood's (tests)."""
        if state is None:
            up = self.pack(self.blood, self._up_host)
        else:
            up = self._up_host
            up[...] = state
        apply_exits = left is not None
        if left is None:
            left = self._zero_left
        if not self.be.is_gpu:
            run_host(
                self, up, np.asarray(left, dtype=np.int64), float(dt_min), apply_exits, self.out, self.cb
            )
            return self.out
        xp = self.xp
        stream = xp.cuda.get_current_stream()
        # pinned -> device on the compute stream: asynchronous, and the pinned buffer is rewritten
        # only after the step's read (a full wait for this stream), so the copy has long finished
        self._up_d.data.copy_from_host_async(up.ctypes.data, up.nbytes, stream)
        # asarray first: on the GPU's host paths (comparisons) ``left`` is a NumPy array, which
        # cupy.ascontiguousarray refuses
        left = xp.ascontiguousarray(xp.asarray(left, dtype=xp.int64))
        k = self._kernel
        if k is None:  # looked up once (the lookup is Python work in every step otherwise)
            from tissuesim.backend import get_kernel

            k = self._kernel = get_kernel(self.be, FILENAME, "blood_step", options=OPTIONS)
        k(
            (1,),
            (1,),
            (
                self._up_d,
                left,
                self._prm_d,
                self._iprm_d,
                np.float64(dt_min),
                np.int32(apply_exits),
                np.int32(self.cb_f32),
                self.out,
                self.cb,
            ),
        )
        return self.out

    # ------------------------------------------------------------------ unpacking
    def finish(self, out: np.ndarray, next_step: int, dt_min: float) -> None:
        """After the read: the host mirror takes the end-of-step state (``out``: host float64
        (2 nv + 8,)) and the advanced state waits for step ``next_step``."""
        b = self.blood
        nv = self.nv
        b.y = dict(zip(b.names, out[:nv].tolist()))
        self.pending = self._advanced(out, next_step, dt_min)

    def _advanced(self, out: np.ndarray, step: int, dt_min: float) -> Advanced:
        nv = self.nv
        o = out[2 * nv :].tolist()
        ev = int(o[7])
        return Advanced(
            step=step,
            dt_min=float(dt_min),
            fingerprint=self.fingerprint(self.blood),
            y=out[nv : 2 * nv].copy(),
            day=o[0],
            toci_day=_none_if_nan(o[1]),
            steroid_day=_none_if_nan(o[2]),
            depleted=bool(o[3]),
            ab_nadir=o[4],
            relapse=bool(o[5]),
            grade=int(o[6]),
            events=[name for bit, name in ((1, "tocilizumab"), (2, "steroids")) if ev & bit],
        )

    def advance(self, step: int, dt_min: float) -> tuple[list[str], bool]:
        """Blood.advance for ``step``: the pending result when it still applies, else a launch and
        a read. Returns (events, whether the device was read)."""
        p = self.pending
        self.pending = None
        read = False
        if (
            p is None
            or p.step != step
            or p.dt_min != float(dt_min)
            or p.fingerprint != self.fingerprint(self.blood)
        ):
            out = self.be.asnumpy(self.launch(dt_min))
            p = self._advanced(out, step, dt_min)
            read = True
        b = self.blood
        b.y = dict(zip(b.names, p.y.tolist()))
        b.day = p.day
        b.toci_day = p.toci_day
        b.steroid_day = p.steroid_day
        b.depleted = p.depleted
        b.ab_nadir = p.ab_nadir
        b.relapse = p.relapse
        b.step_grade = p.grade
        return list(p.events), read


def run_host(db: DeviceBlood, up, left, dt_min: float, apply_exits: bool, out, cb) -> Blood:
    """The twin of kernels/blood.cu's blood_step on NumPy arrays (same layouts), by the host code:
    Blood.move as Immunology._move_blood calls it, then Blood.advance. Returns the advanced Blood
    (a copy of db.blood)."""
    b = copy.copy(db.blood)
    nv, np_ = db.nv, db.np_
    b.y = dict(zip(b.names, up[:nv].tolist()))
    b.growth = dict(zip(b.products, up[nv : nv + np_].tolist()))
    m = up[nv + np_ :].tolist()
    b.day = m[0]
    b.toci_day = _none_if_nan(m[1])
    b.steroid_day = _none_if_nan(m[2])
    b.depleted, b.ab_nadir, b.relapse, b.treated = bool(m[3]), m[4], bool(m[5]), bool(m[6])
    if apply_exits:
        for ti in range(db.ntypes):
            cells = int(left[ti])
            if cells != 0:  # as Immunology._move_blood
                b.move(db.cell_types[ti], cells * db.per_ul_per_cell)
    out[:nv] = [b.y[n] for n in b.names]
    cb[...] = 0.0
    for i, n in enumerate(db.field_names):
        v = b.y[FIELD_IN_BLOOD[n]] if n in FIELD_IN_BLOOD else 0.0
        cb[i] = np.float32(v) if db.cb_f32 else v
    events = b.advance(dt_min)
    out[nv : 2 * nv] = [b.y[n] for n in b.names]
    ev = (1 if "tocilizumab" in events else 0) | (2 if "steroids" in events else 0)
    out[2 * nv :] = (
        b.day,
        _nan_if_none(b.toci_day),
        _nan_if_none(b.steroid_day),
        float(b.depleted),
        b.ab_nadir,
        float(b.relapse),
        float(b.step_grade),
        float(ev),
    )
    return b
