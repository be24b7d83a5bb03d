"""The whole Simulation on CuPy against the same Simulation on NumPy (skipped without a GPU).

The biology layer is element-wise CuPy on the GPU and NumPy on the CPU; both draw the same
counter-based random numbers (Philox keyed by seed, cell id, step and purpose) and the blood ODE
runs in float64 on both (on the GPU as kernels/blood.cu, equal to the host's but for libm's last
bits). So from one state (a NumPy checkpoint restored into a CuPy
simulation) the two backends must take the same decisions in each part of the step: which cells
arrive, are killed, divide, die, change state and leave, and what they secrete. The move is the
one part whose float32 positions differ in the last bits (fused multiply-adds on the GPU; a few
cells per thousand then take another reflection or sub-step), so whole runs are compared
statistically.
Each test that takes ``cupy_be`` runs twice: on the GPU (marked ``gpu``, skipped without one)
and on CuPy emulated on the host (conftest's emulated_cupy: the CuPy code path of the step with
the CUDA kernels of kernels/ built by g++, the fields on their NumPy twins), which runs in CI and
checks the device path's logic, its reads and its kernel arguments, though not the GPU's
arithmetic or CuPy's own behaviour. Tests that take ``gpu_be`` need the GPU itself.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

import tissuesim
from tissuesim.io import checkpoint

BASE = ["grid=small", "output.progress=false", "seed=3"]


@pytest.fixture(params=[pytest.param("gpu", marks=pytest.mark.gpu), "emulated"])
def cupy_be(request):
    """The CuPy backend that ``backend=cupy`` gives: the GPU's (skipped without one), or CuPy
    emulated on the host (conftest's emulated_cupy: the same CuPy code path with the CUDA kernels
    built for the host), so these checks of the step's device path also run in CI."""
    if request.param == "gpu":
        return request.getfixturevalue("gpu_be")
    return request.getfixturevalue("emulated_cupy_numpy_fields")


def _sim(backend: str, therapy: str, *overrides: str):
    return tissuesim.Simulation(
        tissuesim.load_config([*BASE, f"backend={backend}", f"therapy={therapy}", *overrides])
    )


def _engage(sim, engagements: int = 150) -> None:
    """Add CD19 CAR-T / B cell and BCMA CAR-T / plasma cell pairs 3 um apart in open voxels, so
    that kills, divisions and deaths happen every few steps (the patch alone changes only a few
    times in a hundred steps). The same cells for the same simulation state."""
    rs = np.random.default_rng(7)
    open_idx = np.flatnonzero(sim.tissue.open_mask().reshape(-1))
    k, j, i = np.unravel_index(rs.choice(open_idx, 2 * engagements, replace=False), sim.grid.shape)
    target = ((np.stack([i, j, k], 1) + 0.5) * sim.grid.dx).astype(np.float32)
    if sim.grid.nz == 1:
        target[:, 2] = 0.5 * sim.grid.dx
    killer = target + np.float32([3.0, 0.0, 0.0])
    ct = sim.cell_types
    t_types = np.repeat([ct.index("b_cell"), ct.index("plasma_cell")], engagements).astype(np.uint8)
    k_types = np.repeat([ct.index("cd19_car_t"), ct.index("bcma_car_t")], engagements).astype(np.uint8)
    be = sim.backend
    sim.cells.add(
        be.asarray(np.concatenate([target, killer])), be.asarray(np.concatenate([t_types, k_types]))
    )


def _cells(sim) -> dict[str, np.ndarray]:
    n = sim.cells.n
    return {k: sim.backend.asnumpy(sim.cells[k][:n]) for k in sim.cells.names}


def _only_cells(sim, typ, state=None):
    """sim's cells replaced by len(typ) cells of types ``typ`` (and ``state``) at the origin."""
    xp, pop = sim.xp, sim.cells
    pop.remove(xp.ones(pop.n, dtype=bool))
    st = None if state is None else xp.asarray(state)
    pop.add(xp.zeros((len(typ), 3), dtype=np.float32), xp.asarray(typ), state=st)
    return pop


def _same_state(c, b, what: str) -> None:
    """The NumPy simulation c and the CuPy simulation b hold the same cells, sources and blood."""
    ca, cb = _cells(c), _cells(b)
    assert ca["id"].shape == cb["id"].shape, f"{what}: {ca['id'].size} vs {cb['id'].size} cells"
    for name in ca:
        if ca[name].dtype.kind == "f":
            # daughters' and newcomers' velocities come from float32 normals: last-bit differences
            np.testing.assert_allclose(ca[name], cb[name], rtol=1e-5, atol=1e-4, err_msg=f"{what}: {name}")
        else:
            np.testing.assert_array_equal(ca[name], cb[name], err_msg=f"{what}: {name}")
    np.testing.assert_allclose(
        c.immunology.source, b.backend.asnumpy(b.immunology.source), rtol=1e-5, atol=1e-12, err_msg=what
    )
    for key in c.blood.y:
        assert c.blood.y[key] == pytest.approx(b.blood.y[key], rel=1e-12, abs=1e-15), f"{what}: blood {key}"


@pytest.mark.parametrize(
    "therapy,day,grid",
    [
        ("cd19", 0.5, ()),
        ("bcma", 1.0, ()),
        ("rituximab", 0.5, ()),
        ("dual", 0.5, ()),
        ("allo_cd19", 0.5, ()),
        ("cd19_then_bcma", 0.5, ("therapy.infusions.1.trigger=day", "therapy.infusions.1.day=0.25")),
        ("cd19", 0.5, ("grid=tiny", "grid.nz=6")),  # 3D
        (  # anti-CAR T cells arrive (specific to one product each) and kill
            "cd19_then_bcma",
            0.5,
            (
                "therapy.infusions.1.trigger=day",
                "therapy.infusions.1.day=0.25",
                "biology.blood.anti_car_seed=0.5",
                "biology.anti_car_t_max_per_ul=100000",
            ),
        ),
    ],
    ids=["cd19", "bcma", "rituximab", "dual", "allo_cd19", "cd19_then_bcma", "cd19-3d", "anti-car"],
)
def test_each_step_part_takes_the_same_decisions_on_both_backends(cupy_be, therapy, day, grid):
    """From one state (with 300 fresh killer-target pairs), the arrivals (before_move) and the
    contacts, kills, fates, divisions, exits and sources (after_move) of CuPy equal NumPy's, over
    25 states of a NumPy run, for every therapy (both products given by day 0.25 in the
    sequential case) and in 3D. The move itself is compared with its NumPy twin in
    tests/agents/test_gpu_parity.py (float32 positions differ in the last bits, so whole steps
    are compared statistically below)."""
    a = _sim("numpy", therapy, *grid)
    a.run(until_day=day)
    c, b = _sim("numpy", therapy, *grid), _sim("cupy", therapy, *grid)
    changed = 0
    for k in range(25):
        a.step()
        arrays, meta = checkpoint.capture(a)
        s, dt = a.step_count, a.dt_min
        for part in ("before_move", "after_move"):
            for sim in (c, b):
                checkpoint.restore(sim, arrays, meta)
                _engage(sim)
                sim.immunology.source[...] = 0
                getattr(sim.immunology, part)(s, dt)
            _same_state(c, b, f"{therapy} state {k} {part}")
        changed += c.cells.n != meta["n_cells"] + 600
    # the comparison is only worth something if cells were killed, born, changed or left
    assert changed >= 8, f"{therapy}: after_move changed the cells in only {changed} of 25 states"
    if "biology.blood.anti_car_seed=0.5" in grid:  # both specificities were compared
        spec = _cells(c)["specific_to"]
        ct = c.cell_types
        assert {ct.index("cd19_car_t"), ct.index("bcma_car_t")} <= set(spec.tolist())


@pytest.mark.parametrize(
    "drop,repair,uptake",
    [
        ((), True, True),
        ((), False, True),
        (("ifng",), True, True),
        (("damage",), False, True),
        (("cxcl10", "il6"), True, True),
        ((), True, False),  # no field with uptake (n_up = 0)
    ],
)
def test_the_step_sources_on_the_device_equal_the_twin_bitwise(cupy_be, drop, repair, uptake):
    """Immunology._step_sources on CuPy (the kernels source_counts and source_fields) against its
    twin on NumPy (_sources): every field's source and uptake rate bit for bit, from cells of
    every type, state, engagement (busy_until one float32 either side of now, or at it) and fate
    (dead cells secrete and take up nothing), piled up to 40 in a voxel, on random fields with
    zeros; with and without the antibody damage repair, and with fields missing (the rules that
    need them are skipped), and with no field taking any up."""
    more = [f"biology.antibody_damage={repair}"]
    if not uptake:
        more += [f"fields.{n}.uptake_molecules_per_cell_per_s=0" for n in ("cxcl13", "cxcl10", "ifng")]
    a = _sim("numpy", "cd19", "grid=tiny", *more)
    b = _sim("cupy", "cd19", "grid=tiny", *more)
    rs = np.random.default_rng(len(drop) + 10 * repair)
    nvox = int(np.prod(a.grid.shape))
    n = 3000
    now = np.float32(700.0)
    typ = rs.integers(0, len(a.cell_types), n).astype(np.uint8)
    state = rs.integers(0, 2, n).astype(np.uint8)
    busy = rs.choice(np.array([np.nextafter(now, 0), now, np.nextafter(now, 1e9), 0, 900], np.float32), n)
    vox = np.where(rs.random(n) < 0.3, rs.integers(0, 5, n), rs.integers(0, nvox, n)).astype(np.int64)
    dead = rs.random(n) < 0.2
    vals = (3 * rs.random(a.fields.values.shape)).astype(np.float32)
    vals[a.fields.index("damage")] /= 3  # relative damage, 0-1
    vals[rs.random(vals.shape) < 0.2] = 0
    for name in ("cxcl13", "cxcl10"):  # chemokines a hair below zero: their uptake reads them as 0
        row = vals[a.fields.index(name)]
        row[rs.random(row.shape) < 0.1] = -1e-3
    out, up = [], []
    for sim in (a, b):
        xp = sim.xp
        imm = sim.immunology
        imm.fi = {k: v for k, v in imm.fi.items() if k not in drop}
        imm.blood.y["ab"] = 1.7
        pop = _only_cells(sim, typ, state)
        pop["busy_until"][:n] = xp.asarray(busy)
        sim.fields.values[...] = xp.asarray(vals)
        imm.source[...] = -1.0  # every source must be written
        if uptake:
            imm.uptake[...] = -1.0  # every uptake row of an uptake field must be written, no other
        imm._step_sources(xp.asarray(vox), xp.asarray(dead), float(now), xp.asarray(typ.astype(np.int64)))
        out.append(sim.backend.asnumpy(imm.source).copy())
        up.append(None if imm.uptake is None else sim.backend.asnumpy(imm.uptake).copy())
    ga, gb = out
    if uptake:
        assert up[0].tobytes() == up[1].tobytes()
        rows = a.immunology.up_field
        assert len(rows) == 3 and (up[0][rows] >= 0).all() and (up[0][rows] > 0).any()
        assert (np.delete(up[0], rows, axis=0) == -1).all()
    else:
        assert up == [None, None]
    assert ga.tobytes() == gb.tobytes(), [
        a.fields.names[k] for k in range(len(ga)) if not np.array_equal(ga[k], gb[k])
    ]
    if hasattr(cupy_be.xp, "launches"):  # emulated: the kernels ran, not the element-wise twin
        ran = {name for name, _ in cupy_be.xp.launches}
        assert {"source_counts", "source_fields"} <= ran
    # the fields dropped have no source, nor CXCL13 without damage; the others have some
    zero = {name for k, name in enumerate(a.fields.names) if (ga[k] == 0).all()}
    assert zero == set(drop) | ({"cxcl13"} if "damage" in drop else set())
    assert (ga >= 0).all()


def test_the_step_exits_on_the_device_equal_the_twin(cupy_be):
    """Immunology._exits on CuPy (the kernel fate_exits) against its element-wise twin on NumPy:
    the same dead, divide, leave and gone masks and exits per type, from cells of every type in
    vessel voxels and elsewhere, killed, dying, dividing or neither. Two types sit on the edge of
    the exit test (p_exit equal to their uniform: none leaves; one double above: all that may,
    leave), so a comparison in float32 or with <= shows."""
    a = _sim("numpy", "cd19", "grid=tiny")
    b = _sim("cupy", "cd19", "grid=tiny")
    rs = np.random.default_rng(5)
    nt = len(a.cell_types)
    n = 4000
    vessel = np.flatnonzero(a.immunology.vessel_mask.reshape(-1))
    nvox = int(np.prod(a.grid.shape))
    assert vessel.size > 10
    vox = np.where(rs.random(n) < 0.6, rs.choice(vessel, n), rs.integers(0, nvox, n)).astype(np.int64)
    typ = rs.integers(0, nt, n).astype(np.uint8)
    u3 = rs.random(n).astype(np.float32)
    x = np.float32(0.375)
    u3[typ == 2] = x
    u3[typ == 3] = x
    p_exit = 0.2 + 0.6 * rs.random(nt)
    p_exit[2], p_exit[3] = np.float64(x), np.nextafter(np.float64(x), 1.0)
    masks = [rs.random(n) < q for q in (0.1, 0.1, 0.15)]  # killed, died, divide
    got = []
    for sim in (a, b):
        xp = sim.xp
        imm = sim.immunology
        imm._p_exit_d = xp.asarray(p_exit)
        pop = _only_cells(sim, typ)
        k, d, v = (xp.asarray(m.copy()) for m in masks)
        dead, divide, leave, gone, left, _ = imm._exits(pop, xp.asarray(vox), xp.asarray(u3), k, d, v)
        if gone is None:  # the twin: the caller forms these
            gone = dead | leave
            left = np.bincount(typ[leave], minlength=nt)
        got.append([sim.backend.asnumpy(m).copy() for m in (dead, divide, leave, gone, left)])
    for name, ga, gb in zip(("dead", "divide", "leave", "gone", "left"), *got):
        assert np.array_equal(ga, gb), name
    dead, divide, leave, _, left = got[0]
    assert left.sum() > 200 and (dead & ~masks[0]).any() and divide.any()
    may = np.isin(vox, vessel) & ~dead & ~divide
    assert not leave[typ == 2].any() and np.array_equal(leave[typ == 3], may[typ == 3])
    if hasattr(cupy_be.xp, "launches"):  # emulated: the kernel ran, not the element-wise twin
        assert "fate_exits" in {name for name, _ in cupy_be.xp.launches}


def test_the_step_kernels_skip_types_without_tables(cupy_be):
    """A cell whose type has no tables (the move flags it as FLAG_BAD_TYPE; NumPy's gathers would
    raise) neither leaves nor secretes on the device: with every cell in a vessel voxel that all
    would leave by (p_exit 1, uniform 0) and every cell engaged and activated in one voxel, the
    exits and the sources are those of the known cells alone."""
    b = _sim("cupy", "cd19", "grid=tiny")
    imm = b.immunology
    xp = b.xp
    nt = len(b.cell_types)
    vessel = int(np.flatnonzero(b.backend.asnumpy(imm.vessel_mask).reshape(-1))[0])
    known = np.arange(nt, dtype=np.uint8)
    results = []
    for typ in (known, np.concatenate([known, np.full(5, nt + 3, np.uint8), [255]])):
        n = len(typ)
        pop = _only_cells(b, typ, np.ones(n, np.uint8))
        pop["busy_until"][:n] = np.float32(1e9)
        imm._p_exit_d = xp.ones(nt)
        none = xp.zeros(n, dtype=bool)
        vox = xp.full(n, vessel, dtype=np.int64)
        dead, _, leave, _, left, _ = imm._exits(
            pop, vox, xp.zeros(n, np.float32), none, none.copy(), none.copy()
        )
        imm._step_sources(vox, dead, 700.0, None)
        results.append(
            (
                b.backend.asnumpy(leave).copy(),
                b.backend.asnumpy(left).copy(),
                b.backend.asnumpy(imm.source).copy(),
            )
        )
    (leave_k, left_k, src_k), (leave_u, left_u, src_u) = results
    assert leave_k.all() and not leave_u[nt:].any() and np.array_equal(leave_u[:nt], leave_k)
    np.testing.assert_array_equal(left_u, left_k)
    assert src_u.tobytes() == src_k.tobytes() and src_k.any()


def test_the_biology_runs_on_cupy_and_tracks_numpy_over_a_day(cupy_be):
    """One day of CD19 therapy from day 0 on both backends: the same course within noise."""
    rows = {}
    for name in ("numpy", "cupy"):
        sim = _sim(name, "cd19")
        sim.run(until_day=1.0)
        rows[name] = sim.record_timeseries()
        assert sim.cells.check_flags() == 0
    a, b = rows["numpy"], rows["cupy"]
    assert a["count_cd19_car_t"] > 0 and b["count_cd19_car_t"] > 0
    for t in ("b_cell", "plasma_cell", "cd19_car_t", "macrophage"):
        na, nb = a[f"count_{t}"], b[f"count_{t}"]
        assert abs(na - nb) <= max(3.0, 0.25 * na), (t, na, nb)
    for key in ("blood_cd19_car_t_per_ul", "serum_autoantibody_rel", "serum_il6_pg_per_ml"):
        assert b[key] == pytest.approx(a[key], rel=0.05), key


def test_run_directory_on_cupy(cupy_be, tmp_path):
    from tissuesim.runner import run_to_directory

    cfg = tissuesim.load_config(
        [*BASE, "backend=cupy", "therapy=cd19", "duration_days=0.5", "output.snapshot_every_days=0.25"]
    )
    run_to_directory(cfg, tmp_path)
    s = json.loads((tmp_path / "summary.json").read_text())
    assert s["backend"] == "cupy" and s["status"] == "completed"
    with tissuesim.open_run(tmp_path) as r:
        assert r.attrs["backend"] == "cupy"
        np.testing.assert_allclose(r.times, [0.0, 0.25, 0.5])
        ag = r.agents(-1)
        assert len(ag["id"]) > 0 and np.all(np.diff(ag["id"]) > 0)


def _run_pair(configure, steps: int = 300):
    """Two CuPy CD19 runs of ``steps`` steps, configure(sim, True) and configure(sim, False)."""
    sims = []
    for flag in (True, False):
        sim = _sim("cupy", "cd19")
        configure(sim, flag)
        sim.run(until_day=steps * sim.dt_min / 1440)
        sims.append(sim)
    return sims


def test_field_graph_in_a_run_equals_plain_launches(gpu_be):
    """A CuPy run whose field step replays a CUDA graph (the default) equals, bit for bit, the
    same run launching the field kernels one by one: fields, cells and blood after 300 steps."""
    a, b = _run_pair(lambda sim, graph: setattr(sim.fields, "use_graph", graph))
    assert a.fields._graph is not None and b.fields._graph is None
    assert gpu_be.asnumpy(a.fields.values).tobytes() == gpu_be.asnumpy(b.fields.values).tobytes()
    ca, cb = _cells(a), _cells(b)
    for name in ca:
        assert ca[name].tobytes() == cb[name].tobytes(), name
    assert a.blood.y == b.blood.y


def test_snapshots_through_pinned_buffers_equal_synchronous_copies(cupy_be, recorder):
    """CuPy runs stage each snapshot on the device and download it on a side stream while the
    next steps run (tissuesim.io.staging); the same run copying synchronously writes the same
    snapshots, bit for bit, in the same order (deterministic CuPy step: same seed, same launches)."""
    logs = []
    for asynchronous in (True, False):
        sim = _sim(
            "cupy",
            "cd19",
            "duration_days=0.1",
            "output.snapshot_every_days=0.01",
            "output.checkpoint_every_days=0.05",
        )
        sim.async_snapshots = asynchronous
        rec = recorder()
        sim.run(writer=rec)
        assert (sim._stager.t is not None) == asynchronous
        logs.append(rec.log)
    a, b = logs
    assert [e[:2] for e in a] == [e[:2] for e in b] and len(a) >= 11
    for x, y in zip(a, b):
        if x[0] == "snapshot":
            for part in (2, 3):
                for k in x[part]:
                    assert x[part][k].tobytes() == y[part][k].tobytes(), (x[1], k)


def test_a_staged_snapshot_holds_the_state_its_stream_order_gives(gpu_be, recorder):
    """The download must start after the work queued before the snapshot (its event) and must
    read the staging copy, not the live arrays: a kernel that spins ~50 ms and then writes the
    fields is queued before the snapshot, the fields are overwritten right after it; the
    snapshot holds the spun kernel's values."""
    cp = gpu_be.xp
    spin = cp.RawKernel(
        r"""extern "C" __global__ void spin_then_set(float* a, long long n, long long cycles, float v) {
            long long t0 = clock64();
            while (clock64() - t0 < cycles) {}
            for (long long i = threadIdx.x; i < n; i += blockDim.x) a[i] = v;
        }""",
        "spin_then_set",
    )
    sim = _sim("cupy", "cd19")
    rec = recorder()
    vals = sim.fields.values
    assert vals.dtype == np.float32
    spin((1,), (256,), (vals, np.int64(vals.size), np.int64(100_000_000), np.float32(7.25)))
    sim._submit_snapshot(rec)
    vals.fill(-1.0)  # the live fields change at once; the snapshot must not see it
    assert sim._stager.pending is not None
    sim.flush_snapshots()
    ((_, _, fields, agents),) = rec.log
    for name, a in fields.items():
        assert np.all(a == np.float32(7.25)), name
    assert len(agents["id"]) == sim.cells.n


@pytest.mark.parametrize("paths", ["device", "host"])
def test_blood_step_on_the_device_equals_the_host_blood(cupy_be, paths):
    """The blood ODE as kernels/blood.cu (the default on CuPy: exits, the end-of-step state and
    the next step's advance before the step's one read) against the same CuPy run with the blood
    on the host: the same cells bit for bit over 300 steps with CD19 CAR-T expanding (arrival
    counts come from Poisson draws on the blood concentrations, which differ at most by libm's
    last bits, pow and exp), the blood within 1e-10, and a read of its own only on the first step.
    ``paths="host"``: the step's host formulation (bench/step.py --host-paths, exits counted on the
    host) with the blood kernel fed from it.
    """

    def configure(sim, on_device):
        sim.immunology.blood_on_device = on_device
        sim.immunology.device_paths = paths == "device"

    a, b = _run_pair(configure)
    assert a.immunology.blood_extra_reads == 1 and a.immunology._dblood is not None
    assert b.immunology._dblood is None
    ca, cb = _cells(a), _cells(b)
    for name in ca:
        assert ca[name].tobytes() == cb[name].tobytes(), name
    for key in b.blood.y:
        assert a.blood.y[key] == pytest.approx(b.blood.y[key], rel=1e-10, abs=1e-300), key
    ma, mb = a.blood.meta_dict(), b.blood.meta_dict()
    for key in ("day", "growth", "toci_day", "steroid_day", "depleted", "relapse", "treated"):
        assert ma[key] == mb[key], key
    np.testing.assert_array_equal(cupy_be.asnumpy(a.c_blood), cupy_be.asnumpy(b.c_blood))


def _tiny_from_numpy_state(*overrides: str, therapy: str = "cd19"):
    """(a, b): a NumPy and a CuPy simulation of the tiny preset with ``therapy`` (CD19 CAR-T),
    both at a's state of day 0.5, b with 40 fresh killer-target pairs."""
    a = _sim("numpy", therapy, "grid=tiny", *overrides)
    a.run(until_day=0.5)
    arrays, meta = checkpoint.capture(a)
    b = _sim("cupy", therapy, "grid=tiny", *overrides)
    checkpoint.restore(b, arrays, meta)
    _engage(b, 40)
    return a, b


@pytest.mark.parametrize("therapy", ["cd19", "rituximab"])
def test_every_kernel_of_the_step_emulated_follows_numpy(emulated_cupy, therapy):
    """The step's CuPy path with every kernel emulated, the field kernels too (the tests above keep
    the fields on their NumPy twins for speed): 20 steps of the tiny preset with CD19 CAR-T (or
    rituximab, whose field the blood kernel feeds and the fate kernel reads), from one NumPy
    state. Every kernel the step uses is launched, no flag is raised, and the fields, cells and
    blood follow the NumPy run (float32 rounding: the kernels' libm and summation order)."""
    a, b = _tiny_from_numpy_state(therapy=therapy)
    if therapy == "rituximab":  # in the tissue by day 0.5, from the vessels
        assert a.fields["rituximab"].max() > 1.0
    assert b.backend is emulated_cupy and b.fields.be is emulated_cupy
    _engage(a, 40)
    for _ in range(20):
        a.step()
        b.step()
    assert b.cells.check_flags() == 0
    launched = {name for name, _ in emulated_cupy.xp.launches}
    want = {"move_cells", "crowd_displacement", "cell_fates", "blood_step", "philox_uniform_fill"}
    want |= {"diffusion_lod_lines_f32", "fields_react_f32"}
    assert want <= launched, want - launched
    ca, cb = _cells(a), _cells(b)
    assert ca["id"].size == cb["id"].size
    np.testing.assert_array_equal(ca["type"], cb["type"])
    # a few crowded pairs amplify last-bit differences step by step (measured: 3e-5 um after one
    # step, 1e-3 to 1e-2 um after 20); 0.05 um is 0.5% of a voxel, far below a wrong move
    np.testing.assert_allclose(ca["position"], cb["position"], rtol=1e-5, atol=5e-2)
    np.testing.assert_allclose(a.fields.values, b.backend.asnumpy(b.fields.values), rtol=1e-4, atol=1e-9)
    for key in a.blood.y:
        assert a.blood.y[key] == pytest.approx(b.blood.y[key], rel=1e-9, abs=1e-300), key


def test_a_step_on_the_device_waits_for_it_once(emulated_cupy):
    """Issue #8: inside a CuPy step the host waits for the device once, at the read of the new
    cell count (Population.remove_and_divide), whatever happens in the step. Counted on the
    emulated CuPy, which records what makes CuPy wait (reading device data: asnumpy, bool(),
    int(), .item(), boolean-mask indexing, bincount / nonzero and kin, synchronize) over 40 steps
    of the tiny preset with cells arriving, CD19 CAR-T killing, cells dividing, dying and leaving,
    every kernel emulated, the field step included, after 40 steps of warm-up; nor does the step
    upload host data (CuPy stages that through pinned memory without a wait, but a CUDA graph of
    the step could not replay it). (On a GPU, bench/syncs.py counts the real waits.)"""
    # monocytes arriving every few steps (the defaults bring a few a day to the tiny patch),
    # stimulated CAR-T dividing and CAR-T leaving through vessel walls within the window (at the
    # default rates the 40 steps hold about one division and one exit, or none, as the model's
    # other rates move)
    more = "biology.extravasation_per_ul_per_vessel_voxel_per_min.macrophage=5e-6"
    faster = ("biology.car_t_doubling_days=0.1", "biology.intravasation_per_min.cd19_car_t=0.05")
    _, b = _tiny_from_numpy_state(more, *faster)
    # warm-up: the first step after a restore reads the blood once more, and each per-type
    # table goes up to the device the first time it is used (device_constant), once per run
    for _ in range(40):
        b.step()
    emu, launches = emulated_cupy.xp.emulation, emulated_cupy.xp.launches
    events = {"dead": 0, "leave": 0, "divide": 0}
    imm = b.immunology
    births_and_exits = imm._births_and_exits_device

    def spy(pop, dead, leave, divide, *rest, **kw):  # what the step decided, seen without a wait
        with emu.lenient():
            for k, m in (("dead", dead), ("leave", leave), ("divide", divide)):
                events[k] += int(m.view(np.ndarray).sum())
        return births_and_exits(pop, dead, leave, divide, *rest, **kw)

    imm._births_and_exits_device = spy
    first = len(launches)
    per_step = []
    with emu.counted():
        for _ in range(40):
            k = len(emu.waits)
            b.step()
            per_step.append(len(emu.waits) - k)
    assert per_step == [1] * 40, (per_step, sorted(set(emu.waits)))
    assert {where for _, where in emu.waits} == {emu.waits[0][1]}
    assert "remove_and_divide" in emu.waits[0][1]
    assert emu.uploads == [], sorted(set(emu.uploads))  # nothing a CUDA graph could not replay
    # the window held every kind of event the step handles
    ran = {name for name, _ in launches[first:]}
    assert {"extravasate_fill", "init_velocity_fill", "cell_fates", "blood_step"} <= ran, sorted(
        {"extravasate_fill", "init_velocity_fill"} - ran
    )
    assert min(events.values()) > 0, events
    # Census of the device operations (CuPy kernel launches, roughly) per step, by tissuesim
    # function: the GPU step is bound by their host cost (~5-10 us each in CuPy). A bound, so a
    # change that adds launches to the step is seen; TISSUESIM_CENSUS_JSON=path writes the census.
    per_step_ops = sum(emu.ops.values()) / 40
    census = {
        "what": "device operations per step of the CuPy path, counted on the emulated CuPy "
        "(ufuncs, xp functions, gathers, assignments, reductions, kernels; not conversions that "
        "return their input, such as ascontiguousarray of a C-contiguous array; grid=tiny, cd19, "
        "40 steps with arrivals, kills, divisions, deaths, exits; CAR-T doubling every 0.1 d, "
        "CAR-T exits at 0.05/min and more monocyte arrivals, so that most steps change the cells "
        "and compact). The count grows with the steps that change cells: 62.6 per step at the "
        "default doubling and exit rates (66.6 before the open mask became a view). The same "
        "count at bb00a7b, before the kill, source, exit, bin-range and voxel-index kernels, "
        "with the default doubling: 164.6 per step",
        "per_step": per_step_ops,
        "by_function": {k: v / 40 for k, v in emu.op_sites.most_common()},
        "by_kind": {k: v / 40 for k, v in emu.ops.most_common()},
    }
    if os.environ.get("TISSUESIM_CENSUS_JSON"):
        Path(os.environ["TISSUESIM_CENSUS_JSON"]).write_text(json.dumps(census, indent=1) + "\n")
    assert per_step_ops <= 85, census["by_function"]  # 69 now (63 at the default doubling)
