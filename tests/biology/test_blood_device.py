"""The blood compartment's device step: kernels/blood.cu and its bookkeeping (blood_device.py).

Three checks, none needing a GPU:

- The bookkeeping: a NumPy run with ``Immunology.blood_on_device`` (the kernel's twin, run_host,
  at the end of each step; the advanced state adopted at the next step unless the host changed
  the blood in between) ends bit for bit where the plain NumPy run ends, through infusions given
  mid-run, CRS management, and a restored checkpoint; and it reads "the device" for the blood
  only where it must (the first step, a step after an infusion, after a restore).
- The systemic model alone over the seed patient's course (relapse, the relapse-triggered
  BCMA dose, CRS management), driven through DeviceBlood with random exits, against Blood driven
  as the host path drives it: the same states every step, bit for bit.
- The kernel itself, built for the host with g++ (-ffp-contract=off, as NVRTC's --fmad=false),
  against run_host on states from that course and on edge cases: bit for bit (the same libm).
"""

from __future__ import annotations

import math
import types
from pathlib import Path

import numpy as np
import pytest

import tissuesim
from tissuesim.backend import NUMPY
from tissuesim.biology.blood import Blood
from tissuesim.biology.blood_device import META, OUT_META, DeviceBlood, run_host
from tissuesim.biology.immunology import Immunology, plain
from tissuesim.biology.therapy import Event, TherapySchedule
from tissuesim.io import checkpoint

CFG = [
    "grid=tiny",
    "backend=numpy",
    "output.progress=false",
    "therapy=cd19_then_bcma",
    "therapy.infusions.1.trigger=day",
    "therapy.infusions.1.day=0.5",  # an infusion mid-run: the host changes the blood between steps
    "therapy.crs_management=tocilizumab_steroids",
    # grade 2 at IL-6 30 pg/mL, reached on day ~0.75 of this dose: management given mid-run
    "biology.blood.crs_il6_thresholds_pg_per_ml=[10.0,30.0,60.0,1000.0]",
    "seed=4",
]


def _sim(device: bool, device_paths: bool = False):
    sim = tissuesim.Simulation(tissuesim.load_config(CFG))
    sim.immunology.blood_on_device = device
    sim.immunology.device_paths = device_paths
    return sim


def _assert_same(a, b) -> None:
    assert (a.step_count, a.cells.n, a.cells.next_id) == (b.step_count, b.cells.n, b.cells.next_id)
    for name in a.cells.names:
        assert a.cells.view(name).tobytes() == b.cells.view(name).tobytes(), name
    assert a.fields.values.tobytes() == b.fields.values.tobytes()
    assert a.blood.y == b.blood.y
    assert a.blood.meta_dict() == b.blood.meta_dict()
    assert a.blood.step_grade == b.blood.step_grade
    assert [(e.day, e.what) for e in a.event_log] == [(e.day, e.what) for e in b.event_log]


@pytest.mark.parametrize("device_paths", [False, True], ids=["host-paths", "device-paths"])
def test_numpy_run_through_the_blood_step_is_bitwise_the_host_run(device_paths):
    """device_paths: the GPU's formulation of the step on NumPy, where the blood step's result
    comes back inside Population.remove_and_divide's one read (concatenated to the exits)."""
    a, b = _sim(False), _sim(True, device_paths=device_paths)
    a.run(until_day=1.25)
    b.run(until_day=1.25)
    _assert_same(a, b)
    assert a._ts_rows == b._ts_rows  # rows read the end-of-step state, not the advanced one
    what = [e.what for e in a.event_log]
    assert "infuse_bcma_car_t" in what and "tocilizumab" in what and "steroids" in what
    # the pending advance was used on every other step: one read for the first step, one for
    # the step after the BCMA infusion (CRS management comes out of the kernel itself)
    assert b.immunology.blood_extra_reads == 2
    # cells left the patch into blood, so the exits went through the blood step
    assert a.immunology.blood.y["E_cd19_car_t"] > 0


def test_restored_checkpoint_continues_bitwise():
    ref = _sim(True)
    ref.run(until_day=0.6)
    arrays, meta = checkpoint.capture(ref)
    ref.run(until_day=1.0)
    c = _sim(True)
    checkpoint.restore(c, arrays, meta)
    c.run(until_day=1.0)
    _assert_same(ref, c)
    assert c.immunology.blood_extra_reads == 1  # the first step after the restore
    # back into the same simulation, whose pending advance is for a later step
    reads = ref.immunology.blood_extra_reads
    checkpoint.restore(ref, arrays, meta)
    ref.run(until_day=1.0)
    _assert_same(ref, c)
    assert ref.immunology.blood_extra_reads == reads + 1


def _cfg_course():
    return tissuesim.load_config(
        [
            "+experiment=antisynthetase_case",
            "therapy.crs_management=tocilizumab_steroids",
            # low thresholds: several grades, and management after the first steps (in the kernel)
            "biology.blood.crs_il6_thresholds_pg_per_ml=[10.0,25.0,35.0,1000.0]",
        ]
    )


def _blood_parts():
    """(biology config, therapy config, {product: target}) of the course below, plain."""
    cfg = _cfg_course()
    bio, therapy = plain(cfg.biology), plain(cfg.therapy)
    return bio, therapy, {p: str(c.target) for p, c in bio.car_products.items()}


#: cell types and fields of the stand-alone DeviceBlood checks (all pools, and types without)
TYPES = ["b_cell", "plasmablast", "cd19_car_t", "macrophage", "bcma_car_t", "anti_car_t"]
FIELDS = ["ifng", "autoantibody", "il6", "rituximab"]


def _course(dt_min: float, days: float, seed: int = 0, collect=None):
    """The seed case's systemic course twice: Blood as the host path drives it (advance, exits by
    Immunology._move_blood) and DeviceBlood on NumPy (pending advance, exits in the blood step),
    with the same random exits. Returns (host Blood, device-driven Blood, reads, event logs)."""
    bio, therapy, products = _blood_parts()
    per = 3.7e-6
    host = Blood(bio.blood, products, therapy)
    dev = Blood(bio.blood, products, therapy)
    db = DeviceBlood(dev, TYPES, per, FIELDS, np.float32, NUMPY)
    mover = types.SimpleNamespace(blood=host, per_ul_per_cell=per)
    sched = [TherapySchedule(therapy), TherapySchedule(therapy)]
    logs: list[list] = [[], []]
    rs = np.random.default_rng(seed)
    reads = 0
    n = round(days * 1440.0 / dt_min)
    for k in range(n):
        for i, b in enumerate((host, dev)):
            for ev in sched[i].due((k + 1) * dt_min / 1440.0):
                sched[i].apply(ev, b)
                logs[i].append((ev.day, ev.what))
        for what in host.advance(dt_min):
            logs[0].append((host.day, what))
        events, read = db.advance(k, dt_min)
        reads += read
        logs[1].extend((dev.day, what) for what in events)
        for i, b in enumerate((host, dev)):
            for ev in sched[i].on_relapse(b.day, b.relapse, [Event(d, w, "") for d, w in logs[i]]):
                sched[i].apply(ev, b)
                logs[i].append((ev.day, ev.what))
        assert host.y == dev.y and host.meta_dict() == dev.meta_dict(), k
        assert host.step_grade == dev.step_grade
        left = rs.poisson(0.3, len(TYPES)).astype(np.int64) * (rs.random(len(TYPES)) < 0.5)
        for ti in np.flatnonzero(left):
            Immunology._move_blood(mover, TYPES[ti], int(left[ti]))
        if collect is not None:
            collect.append((db.pack(dev, np.empty_like(db._up_host)), left.copy()))
        out = db.launch(dt_min, left)
        db.finish(out.copy(), k + 1, dt_min)
        assert host.y == dev.y, k  # the exits in the blood step = the host's
    return host, dev, reads, logs


def test_blood_course_through_the_device_step_is_bitwise_the_host_course():
    host, dev, reads, logs = _course(dt_min=60.0, days=330.0)
    assert logs[0] == logs[1]
    what = [w for _, w in logs[0]]
    # the course went through everything the blood step decides: management, relapse, its dose
    assert {"tocilizumab", "steroids", "infuse_bcma_car_t"} <= set(what)
    assert host.relapse and dev.relapse
    # a read of its own only on step 0 (with the scheduled doses); the relapse-triggered dose is
    # given after the step's advance, so it travels in the next upload and costs no read
    assert reads == 1


# --------------------------------------------------------------------------- the kernel, emulated


@pytest.fixture(scope="module")
def emu_blood(build_host_kernels):
    return build_host_kernels("emu_blood", Path(__file__).resolve().parent / "cuda_host_shim_blood.cpp")


@pytest.fixture(scope="module")
def blood_kernel(emu_blood, kernel_signatures, emulated_kernel):
    """run(db, up, left, dt_min, apply_exits) -> (out, cb) float64: blood_step built for the host,
    called through conftest's EmulatedKernel (argument types from blood.cu, guard bytes checked,
    const inputs left alone)."""
    kernel = emulated_kernel(
        emu_blood, "blood_step", kernel_signatures("blood.cu")["blood_step"], "forward", []
    )

    def run(db: DeviceBlood, up, left, dt_min: float, apply_exits: bool):
        out, cb = _outputs(db)
        args = (
            np.array(up, dtype=np.float64),
            np.array(left, dtype=np.int64),
            db.prm.copy(),
            db.iprm.copy(),
            np.float64(dt_min),
            np.int32(int(apply_exits)),
            np.int32(int(db.cb_f32)),
            out,
            cb,
        )
        kernel((1,), (1,), args)
        return out, cb

    return run


def _outputs(db: DeviceBlood):
    """Output buffers of the blood step (out, cb), float64, filled with -7 (written or not shows)."""
    return np.full(2 * db.nv + OUT_META, -7.0), np.full(len(db.field_names), -7.0)


def _host(db: DeviceBlood, up, left, dt_min: float, apply_exits: bool):
    out, cb = _outputs(db)
    run_host(
        db, np.asarray(up, dtype=np.float64), np.asarray(left, dtype=np.int64), dt_min, apply_exits, out, cb
    )
    return out, cb


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """bit for bit, NaN included"""
    return a.tobytes() == b.tobytes()


def test_kernel_is_bitwise_its_twin_over_the_course(blood_kernel):
    samples: list = []
    _, dev, _, _ = _course(dt_min=60.0, days=330.0, seed=1, collect=samples)
    db = DeviceBlood(dev, TYPES, 3.7e-4, FIELDS, np.float32, NUMPY)
    grades, events, relapsed = set(), 0, 0
    for k, (up, left) in enumerate(samples):
        # every step as the run takes it; every 7th also without exits and with another dt
        for dt, exits in ((60.0, True),) + (((1.0, False),) if k % 7 == 0 else ()):
            ko, kc = blood_kernel(db, up, left, dt, exits)
            ho, hc = _host(db, up, left, dt, exits)
            assert _same(ko, ho), (k, dt, np.flatnonzero(ko.view(np.int64) != ho.view(np.int64)))
            assert _same(kc, hc), k
            if dt == 60.0:
                grades.add(int(ho[2 * db.nv + 6]))
                events += int(ho[-1]) != 0
                relapsed += bool(ho[2 * db.nv + 5]) and not bool(up[db.nv + db.np_ + 5])
    # the samples cover the decisions: several CRS grades, management given, relapse detected
    assert len(grades) >= 3 and events >= 1 and relapsed == 1


@pytest.mark.parametrize("f32", [True, False])
def test_kernel_edge_cases(blood_kernel, f32):
    """Empty B pool (exits into it), exits that empty a pool (clamp at 0), the clone's extinction,
    rituximab present, a fresh product (X mixing is the host's; here X < 1 with E + M = 0),
    tocilizumab given long ago, NaN / infinite meta, float64 fields."""
    bio, therapy, products = _blood_parts()
    b = Blood(bio.blood, products, therapy)
    types_ = ["b_cell", "cd19_car_t", "bcma_car_t", "plasma_cell"]
    fields = ["il6", "rituximab", "autoantibody"]
    db = DeviceBlood(b, types_, 0.01, fields, np.float32 if f32 else np.float64, NUMPY)
    rs = np.random.default_rng(3)
    nv, np_ = db.nv, db.np_
    cases = []
    for trial in range(300):
        y = rs.lognormal(0, 2, nv) * rs.choice([0.0, 1.0], nv, p=[0.2, 0.8])
        y[[7 + 4 * p + 3 for p in range(np_)]] = rs.random(np_)  # X in 0..1
        y[[7 + 4 * p + 2 for p in range(np_)]] = rs.random(np_) * 0.9  # R
        y[1] = rs.choice([0.0, 1e-9, 5.0])  # b_auto: gone, below extinction, present
        if trial % 3 == 0:
            y[0] = y[1] = 0.0  # an empty B pool
        growth = rs.random(np_) * rs.choice([0.0, 1.0], np_)
        meta = [
            rs.random() * 400 - 3,
            rs.choice([math.nan, 0.5, -200.0]),
            rs.choice([math.nan, 2.0]),
            float(rs.random() < 0.5),
            rs.choice([math.inf, 0.3, 1e-3]),
            float(rs.random() < 0.2),
            float(rs.random() < 0.8),
        ]
        up = np.concatenate([y, growth, meta])
        assert up.size == nv + np_ + META
        left = rs.integers(-3000, 300, len(types_)) * (rs.random(len(types_)) < 0.6)
        cases.append((up, left.astype(np.int64)))
    clamped = 0
    for up, left in cases:
        for dt in (1.0, 30.0):
            ko, kc = blood_kernel(db, up, left, dt, True)
            ho, hc = _host(db, up, left, dt, True)
            assert _same(ko, ho), (up, left, dt)
            assert _same(kc, hc)
        clamped += (ho[:nv] == 0).sum() > (up[:nv] == 0).sum()
    assert clamped > 20  # exits emptied pools in many cases


def test_kernel_decisions_at_their_boundaries(blood_kernel):
    """The CRS grade, the clone's extinction and relapse detection each compare a value with a
    threshold. Here each threshold is set to exactly the value the step reaches (grade 3 at the
    effective IL-6, extinction at the advanced autoreactive pool, the relapse level at the
    advanced B-cell count), where < and <= (> and >=) part: the kernel decides as the host."""
    import dataclasses

    bio, therapy, products = _blood_parts()
    types_ = ["b_cell", "cd19_car_t", "bcma_car_t"]
    samples: list = []
    _course(dt_min=60.0, days=120.0, seed=5, collect=samples)
    hits = {"grade": 0, "extinction": 0, "relapse": 0}
    for up, left in samples[::25]:
        up = up.copy()
        db = DeviceBlood(Blood(bio.blood, products, therapy), types_, 3.7e-4, ["il6"], np.float32, NUMPY)
        m = db.nv + db.np_
        up[m + 3], up[m + 4], up[m + 5], up[m + 6] = 1.0, 1e-6, 0.0, 1.0  # depleted, nadir, -, treated
        # management given days ago: the grade's value (before management) is il6_effective()
        up[m + 1], up[m + 2] = up[m] - 3.0, up[m] - 3.0
        left = left[: len(types_)]
        adv = run_host(db, up, left, 60.0, True, np.empty(2 * db.nv + OUT_META), np.empty(1))
        il6, b_auto, b = adv.il6_effective(), adv.y["b_auto"], adv.b_cell_per_ul()
        b0 = bio.blood.b_cell_per_ul
        frac = b / b0
        for _ in range(8):  # the fraction whose level is b exactly, if there is one
            if frac * b0 == b:
                break
            frac = np.nextafter(frac, np.inf if frac * b0 < b else -np.inf)
        changes = {}
        if il6 > 0:
            changes["crs_il6_thresholds_pg_per_ml"] = [0.25 * il6, 0.5 * il6, il6, 2 * il6]
            hits["grade"] += 1
        if b_auto > 0:
            changes["extinction_per_ul"] = b_auto
            hits["extinction"] += 1
        if frac * b0 == b:
            changes["relapse_b_cell_fraction"] = float(frac)
            hits["relapse"] += 1
        edge = DeviceBlood(
            Blood(dataclasses.replace(bio.blood, **changes), products, therapy),
            types_,
            3.7e-4,
            ["il6"],
            np.float32,
            NUMPY,
        )
        ko, kc = blood_kernel(edge, up, left, 60.0, True)
        ho, hc = _host(edge, up, left, 60.0, True)
        assert _same(ko, ho) and _same(kc, hc)
        if "crs_il6_thresholds_pg_per_ml" in changes:
            assert ho[2 * edge.nv + 6] == 3.0  # the threshold reached counts
        if "relapse_b_cell_fraction" in changes:
            assert ho[2 * edge.nv + 5] == 0.0  # at the level is not above it
    assert min(hits.values()) >= 3, hits


def test_pending_advance_is_redone_when_the_host_changed_anything():
    """The advance computed at the end of a step is used by the next step only if nothing the
    kernel reads changed on the host in between and the step and dt are the ones it was made
    for: here a change of the treated flag alone, of an anti-CAR growth rate alone, or a step or
    dt other than expected makes it launch again (a read), and the result is the host's."""
    bio, therapy, products = _blood_parts()
    host, dev = Blood(bio.blood, products, therapy), Blood(bio.blood, products, therapy)
    db = DeviceBlood(dev, ["b_cell"], 3.7e-4, ["il6"], np.float32, NUMPY)
    for b in (host, dev):
        b.infuse("cd19_car_t", 1e6)
        b.treated = False  # as if the dose had not counted: the flag alone changes below
    step = 0

    def end_of_step():
        db.finish(db.launch(60.0, np.zeros(1, np.int64)).copy(), step + 1, 60.0)

    events = host.advance(60.0)  # the first step: the host's advance, its events alike
    assert db.advance(step, 60.0) == (events, True)
    end_of_step()
    for change in ("none", "treated", "growth", "step", "dt"):
        step += 1
        dt = 30.0 if change == "dt" else 60.0
        if change == "treated":
            host.treated = dev.treated = True
        elif change == "growth":
            host.growth["cd19_car_t"] = dev.growth["cd19_car_t"] = 0.123
        elif change == "step":
            db.pending.step += 1
        host.advance(dt)
        _, read = db.advance(step, dt)
        assert read == (change != "none"), change
        assert host.y == dev.y and host.meta_dict() == dev.meta_dict(), change
        end_of_step()


# --------------------------------------------------------------------------- the CuPy path, emulated


def test_cupy_path_of_the_device_blood_equals_the_host_course(emulated_cupy):
    """DeviceBlood's CuPy branch (pinned upload on the compute stream, the kernel's arguments,
    the read) on the emulated CuPy (conftest: the upload must come from a pinned buffer on the
    current stream, the kernel is the host build of blood.cu launched as one thread), driven over
    the seed patient's course with random exits like the NumPy bookkeeping test: the same Blood
    states as the host path."""
    be = emulated_cupy
    samples: list = []
    _, dev, _, _ = _course(dt_min=60.0, days=40.0, seed=4, collect=samples)
    ref = DeviceBlood(dev, TYPES, 3.7e-4, FIELDS, np.float32, NUMPY)
    gpu = DeviceBlood(dev, TYPES, 3.7e-4, FIELDS, np.float32, be)
    device_array = type(be.xp.empty(0))
    assert isinstance(gpu.out, device_array) and isinstance(gpu.cb, device_array)
    first = len(be.xp.launches)
    for up, left in samples:
        out = be.asnumpy(gpu.launch(60.0, be.asarray(left), state=up))
        ho, hc = _host(ref, up, left, 60.0, True)
        assert _same(out, ho) and _same(be.asnumpy(gpu.cb)[: len(FIELDS)], hc)
    # the packed state of a Blood goes up as well (launch without state=)
    gpu.blood = ref.blood = dev
    out = be.asnumpy(gpu.launch(60.0))
    ho, _ = _host(ref, ref.pack(dev, np.empty_like(ref._up_host)), np.zeros(6, np.int64), 60.0, False)
    assert _same(out, ho)
    launched = [name for name, _ in be.xp.launches[first:]]
    assert launched == ["blood_step"] * (len(samples) + 1)


def test_blood_kernel_on_the_gpu_equals_its_twin(gpu_be):
    """kernels/blood.cu on the GPU against run_host on states of the seed patient's course: the
    same decisions (relapse, CRS grade, management) and the same numbers to 1e-12 (the GPU's pow
    and exp may differ from glibc's by an ulp). Skipped without a GPU."""
    samples: list = []
    _, dev, _, _ = _course(dt_min=60.0, days=330.0, seed=2, collect=samples)
    ref = DeviceBlood(dev, TYPES, 3.7e-4, FIELDS, np.float32, NUMPY)
    gpu = DeviceBlood(dev, TYPES, 3.7e-4, FIELDS, np.float32, gpu_be)
    nv = ref.nv
    grades = set()
    for k, (up, left) in enumerate(samples[::5]):
        ho, hc = _host(ref, up, left, 60.0, True)
        out = gpu_be.asnumpy(gpu.launch(60.0, gpu_be.asarray(left), state=up))
        np.testing.assert_allclose(
            out[: 2 * nv + 5], ho[: 2 * nv + 5], rtol=1e-12, atol=1e-300, err_msg=str(k)
        )
        assert out[2 * nv + 5 :].tolist() == ho[2 * nv + 5 :].tolist(), k  # relapse, grade, events
        np.testing.assert_array_equal(gpu_be.asnumpy(gpu.cb[: len(FIELDS)]), hc)
        grades.add(int(ho[2 * nv + 6]))
    assert len(grades) >= 3
