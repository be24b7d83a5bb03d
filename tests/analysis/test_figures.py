"""tissuesim-view and tissuesim-report on runs written through the real writer."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest

from tissuesim.analysis.figures import PANEL_SIZE_IN, TIMESERIES_SIZE_IN, render_run
from tissuesim.analysis.report import write_report
from tissuesim.io.hdf5 import SnapshotWriter

TYPES = ["b_cell", "plasmablast", "plasma_cell", "cd19_car_t", "bcma_car_t", "anti_car_t", "macrophage"]


def fake_run(run_dir, shape, n_snap=3):
    run_dir.mkdir(parents=True)
    rng = np.random.default_rng(0)
    nz, ny, nx = shape

    def tissue(g):
        lab = (np.indices(shape).sum(axis=0) // 7 % 3).astype(np.uint8)
        ds = g.create_dataset("labels", data=lab)
        ds.attrs["names"] = json.dumps(["fibre", "endomysium", "capillary"])

    w = SnapshotWriter(
        run_dir / "snapshots.h5",
        shape=shape,
        fields={"il6": {"units": "pg/mL"}, "damage": {"units": "rel"}},
        cell_types=TYPES,
        agent_attrs={"state": "u1"},
        timeseries=["count_b_cell", "mean_il6", "mean_damage"],
        root_attrs={"dx_um": 10.0, "shape": np.asarray(shape)},
        tissue_writer=tissue,
        dx=10.0,
    )
    for k in range(n_snap):
        n = 50
        pos = rng.random((n, 3)).astype(np.float32) * np.array([nx, ny, nz], np.float32) * 10
        w.write_snapshot(
            float(k),
            {"il6": rng.random(shape).astype(np.float32) * (k + 1), "damage": np.zeros(shape, np.float32)},
            {
                "position": pos,
                "type": rng.integers(0, 7, n).astype(np.uint8),
                "id": np.arange(n),
                "state": np.zeros(n, np.uint8),
            },
        )
        w.write_timeseries(float(k), {"count_b_cell": 10.0 - k, "mean_il6": float(k), "mean_damage": 0.5})
    w.write_event(0.0, "infuse_cd19_car_t", "1e6 per kg")
    return w


def _png_size(path):
    import imageio.v2 as imageio

    return imageio.imread(path).shape


@pytest.mark.parametrize("shape", [(1, 40, 60), (12, 30, 40)], ids=["2D", "3D"])
def test_view_writes_panels_timeseries_and_movie(tmp_path, shape):
    import imageio.v2 as imageio

    run = tmp_path / "run"
    w = fake_run(run, shape)
    try:  # the writer is still open: the viewer must read a live SWMR file
        res = render_run(run, field="il6", z="max" if shape[0] > 1 else "mid")
    finally:
        w.close()
    assert len(res["panels"]) == 3
    for p in res["panels"]:
        h, wd, _ = _png_size(p)
        assert (wd, h) == (int(PANEL_SIZE_IN[0] * 100), int(PANEL_SIZE_IN[1] * 100))
        assert imageio.imread(p).std() > 10  # not a blank canvas
    h, wd, _ = _png_size(res["timeseries"])
    assert (wd, h) == (int(TIMESERIES_SIZE_IN[0] * 100), int(TIMESERIES_SIZE_IN[1] * 100))
    assert res["movie"] and res["movie"].endswith(".mp4")
    frames = imageio.mimread(res["movie"])
    assert len(frames) == 3


def test_view_rejects_unknown_field(tmp_path):
    fake_run(tmp_path / "run", (1, 20, 20)).close()
    with pytest.raises(ValueError, match="--field=tnf: allowed: damage, il6"):
        render_run(tmp_path / "run", field="tnf")


def test_report_over_a_four_job_sweep(tmp_path):
    sweep = tmp_path / "sweep"
    jobs = [("cd19", 0), ("cd19", 1), ("bcma", 0), ("bcma", 1)]
    for i, (therapy, seed) in enumerate(jobs):
        d = sweep / str(i)
        (d / ".hydra").mkdir(parents=True)
        (d / ".hydra" / "overrides.yaml").write_text(
            f"- therapy={therapy}\n- seed={seed}\n- hydra.verbose=false\n"
        )
        summary = {
            "therapy": therapy,
            "seed": seed,
            "final_damage_rel": 0.5 + 0.1 * seed + (therapy == "bcma"),
            "autoantibody_rel": {"90": 0.2},
        }
        (d / "summary.json").write_text(json.dumps(summary))
    res = write_report(sweep)
    assert res["jobs"] == 4
    rows = list(csv.DictReader(open(res["csv"])))
    assert [(r["therapy"], r["seed"]) for r in rows] == [(t, str(s)) for t, s in jobs]
    assert "hydra.verbose" not in rows[0]
    assert rows[0]["autoantibody_rel.90"] == "0.2"
    from tissuesim.analysis.report import collect, group_stats

    keys, rows = collect(sweep)
    stats = group_stats(keys, rows, "final_damage_rel")
    assert stats["therapy=cd19"][0] == pytest.approx(0.55)
    assert stats["therapy=bcma"][0] == pytest.approx(1.55)
    assert stats["therapy=bcma"][1] == pytest.approx(0.05)


def test_exporters_return_the_file_numbers(tmp_path):
    import h5py

    from tissuesim.analysis.export import cells_csv, cells_dataframe, fields_xarray

    fake_run(tmp_path / "run", (2, 5, 4)).close()
    with h5py.File(tmp_path / "run" / "snapshots.h5", "r") as f:
        off = f["agents/offsets"][:]
        pos = f["agents/position"][off[1] : off[2]]
        types = f["agents/type"][off[1] : off[2]]
        il6 = f["fields/il6"][2]
    df = cells_dataframe(tmp_path / "run", 1)
    np.testing.assert_array_equal(df[["x_um", "y_um", "z_um"]].to_numpy(), pos)
    assert list(df["type"].astype(str)) == [TYPES[t] for t in types]
    assert set(df.columns) >= {"time_days", "id", "state"} and (df["time_days"] == 1.0).all()
    paths = cells_csv(tmp_path / "run", tmp_path / "csv")
    assert len(paths) == 3 and paths[1].read_text().splitlines()[0].startswith("time_days,id,type,x_um")
    ds = fields_xarray(tmp_path / "run")
    assert ds["il6"].dims == ("time", "z", "y", "x")
    np.testing.assert_array_equal(ds["il6"].sel(time=2.0).to_numpy(), il6)
    np.testing.assert_allclose(ds["x"].to_numpy(), [5, 15, 25, 35])
    assert ds["il6"].attrs["units"] == "pg/mL" and ds["x"].attrs["units"] == "um"
