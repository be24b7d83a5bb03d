"""snapshots.h5 writer and reader: round trip, SWMR reading while writing, crash safety."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import h5py
import numpy as np
import pytest

from tissuesim.io.hdf5 import SnapshotWriter, open_run

SHAPE = (1, 6, 5)
TYPES = ["b_cell", "plasma_cell", "cd19_car_t"]


def make_writer(path, **kw):
    return SnapshotWriter(
        path,
        shape=SHAPE,
        fields={"il6": {"units": "pg/mL", "long_name": "IL-6"}, "damage": {"units": "rel"}},
        cell_types=TYPES,
        agent_attrs={"state": "u1", "age_min": "f4"},
        timeseries=["count_b_cell", "mean_il6"],
        root_attrs={"seed": 7, "backend": "numpy", "shape": np.asarray(SHAPE)},
        **kw,
    )


def snapshot_data(k: int, rng: np.random.Generator):
    n = int(rng.integers(0, 9))  # ragged, including empty snapshots
    fields = {
        "il6": rng.random(SHAPE).astype(np.float32),
        "damage": np.full(SHAPE, k, dtype=np.float32),
    }
    agents = {
        "position": rng.random((n, 3)).astype(np.float32) * 50,
        "type": rng.integers(0, 3, n).astype(np.uint8),
        "id": np.arange(100 * k, 100 * k + n, dtype=np.int64),
        "state": rng.integers(0, 4, n).astype(np.uint8),
        "age_min": rng.random(n).astype(np.float32),
    }
    return fields, agents


def test_round_trip_fields_ragged_agents_timeseries_events(tmp_path):
    path = tmp_path / "snapshots.h5"
    rng = np.random.default_rng(1)
    written = []
    with make_writer(path) as w:
        for k in range(5):
            f, a = snapshot_data(k, rng)
            written.append((f, a))
            w.write_snapshot(0.5 * k, f, a)
            w.write_timeseries(0.5 * k, {"count_b_cell": float(k), "mean_il6": float(f["il6"].mean())})
        w.write_event(0.0, "infuse_cd19_car_t", "1e6 per kg")
    with open_run(tmp_path) as r:
        assert r.attrs["seed"] == 7
        np.testing.assert_array_equal(r.times, 0.5 * np.arange(5))
        assert r.cell_types == TYPES
        for k, (f, a) in enumerate(written):
            np.testing.assert_array_equal(r.field("il6", k), f["il6"])
            np.testing.assert_array_equal(r.field("damage", day=0.5 * k), f["damage"])
            got = r.agents(k)
            for name in a:
                np.testing.assert_array_equal(got[name], a[name])
        ts = r.timeseries()
        np.testing.assert_array_equal(ts["count_b_cell"], np.arange(5.0))
        assert r.events() == [{"day": 0.0, "what": "infuse_cd19_car_t", "detail": "1e6 per kg"}]
    with h5py.File(path, "r") as f:
        off = f["agents/offsets"][:]
        assert off[0] == 0 and np.all(np.diff(off) >= 0) and off[-1] == f["agents/id"].shape[0]
        # every dataset is extendible along its first axis (needed for SWMR appends)
        for name in ("time", "fields/il6", "agents/position", "agents/id", "timeseries/time"):
            assert f[name].maxshape[0] is None


def test_existing_file_is_never_overwritten(tmp_path):
    path = tmp_path / "snapshots.h5"
    make_writer(path).close()
    before = path.read_bytes()
    with pytest.raises(FileExistsError):
        make_writer(path)
    assert path.read_bytes() == before


def test_wrong_shapes_are_rejected(tmp_path):
    rng = np.random.default_rng(0)
    with make_writer(tmp_path / "s.h5") as w:
        f, a = snapshot_data(0, rng)
        f["il6"] = np.zeros((1, 5, 5), np.float32)
        with pytest.raises(ValueError, match="il6"):
            w.write_snapshot(0.0, f, a)


WRITER_SCRIPT = textwrap.dedent(
    """
    import sys, time
    import numpy as np
    sys.path.insert(0, {testdir!r})
    from test_hdf5 import make_writer, snapshot_data
    w = make_writer({path!r})
    rng = np.random.default_rng(3)
    for k in range({n}):
        f, a = snapshot_data(k, rng)
        w.write_snapshot(float(k), f, a)
        print(k, flush=True)
        time.sleep({pause})
    w.close()
    """
)


def _start_writer(tmp_path, n, pause):
    path = str(tmp_path / "snapshots.h5")
    code = WRITER_SCRIPT.format(testdir=os.path.dirname(__file__), path=path, n=n, pause=pause)
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, path


def test_reader_sees_snapshots_while_writer_runs(tmp_path):
    proc, path = _start_writer(tmp_path, n=40, pause=0.05)
    try:
        assert proc.stdout.readline().strip() == "0"
        seen = []
        with open_run(path) as r:
            for _ in range(30):
                seen.append(len(r.times))
                if len(r.times):
                    r.field("il6")  # reading the last complete snapshot works mid-run
                    r.agents()
                time.sleep(0.03)
        assert seen[0] >= 1
        assert seen[-1] > seen[0], f"reader never saw new snapshots: {seen}"
    finally:
        proc.wait(timeout=60)
    assert proc.returncode == 0


def test_sigkill_leaves_every_flushed_snapshot(tmp_path):
    proc, path = _start_writer(tmp_path, n=1000, pause=0.01)
    flushed = -1
    while flushed < 5:
        flushed = int(proc.stdout.readline())
    proc.send_signal(signal.SIGKILL)
    proc.wait(timeout=30)
    assert proc.returncode == -signal.SIGKILL
    rng = np.random.default_rng(3)
    with open_run(path) as r:
        n = len(r.times)
        assert n >= flushed + 1
        for k in range(n):
            f, a = snapshot_data(k, rng)
            np.testing.assert_array_equal(r.field("il6", k), f["il6"])
            np.testing.assert_array_equal(r.agents(k)["id"], a["id"])


def _vtk_read(xdmf_path, t):
    vtk = pytest.importorskip("vtk")
    from vtk.util.numpy_support import vtk_to_numpy

    reader = vtk.vtkXdmfReader()
    reader.SetFileName(str(xdmf_path))
    reader.UpdateInformation()
    reader.UpdateTimeStep(t)
    out = reader.GetOutputDataObject(0)
    blocks = {
        out.GetMetaData(i).Get(vtk.vtkCompositeDataSet.NAME()): out.GetBlock(i)
        for i in range(out.GetNumberOfBlocks())
    }
    return blocks, vtk_to_numpy


def test_xdmf_opens_in_vtk_with_same_numbers(tmp_path):
    path = tmp_path / "snapshots.h5"
    rng = np.random.default_rng(5)
    written = []

    def tissue(g):
        g.create_dataset("labels", data=np.arange(np.prod(SHAPE), dtype=np.uint8).reshape(SHAPE))

    with make_writer(path, tissue_writer=tissue, dx=10.0, origin=(5.0, -20.0, 0.0)) as w:
        for k in range(3):
            f, a = snapshot_data(k, rng)
            if k == 1:
                a = {n: v[:0] for n, v in a.items()}  # an empty snapshot must not break the reader
            while k == 2 and len(a["id"]) == 0:  # the last snapshot must hold cells
                _, a = snapshot_data(7, rng)
            written.append((f, a))
            w.write_snapshot(float(k), f, a)
    xdmf = tmp_path / "snapshots.xdmf"
    assert xdmf.is_file()
    for k in (0, 2):
        blocks, to_np = _vtk_read(xdmf, float(k))
        img = blocks["fields"]
        assert img.GetDimensions() == (SHAPE[2] + 1, SHAPE[1] + 1, SHAPE[0] + 1)
        np.testing.assert_allclose(img.GetOrigin(), (5.0, -20.0, 0.0))
        np.testing.assert_allclose(img.GetSpacing(), (10.0, 10.0, 10.0))
        il6 = to_np(img.GetCellData().GetArray("il6")).reshape(SHAPE)
        np.testing.assert_array_equal(il6, written[k][0]["il6"])
        labels = to_np(img.GetCellData().GetArray("tissue")).reshape(SHAPE)
        np.testing.assert_array_equal(labels, np.arange(np.prod(SHAPE)).reshape(SHAPE))
        pts = blocks["cells"]
        a = written[k][1]
        assert pts.GetNumberOfPoints() == len(a["id"])
        if len(a["id"]):
            np.testing.assert_allclose(to_np(pts.GetPoints().GetData()), a["position"])
            np.testing.assert_array_equal(to_np(pts.GetPointData().GetArray("id")), a["id"])
            np.testing.assert_array_equal(to_np(pts.GetPointData().GetArray("type")), a["type"])
