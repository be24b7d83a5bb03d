"""python -m tissuesim.course: the systemic course from the command line."""

from __future__ import annotations

import json

import numpy as np

from tissuesim import course


def test_course_prints_the_readouts_and_writes_the_timeseries(tmp_path, capsys):
    csv = tmp_path / "c.csv"
    assert course.main(["therapy=bcma", "--days", "100", "--csv", str(csv)]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["autoantibody_rel"]["90"] < 0.5 and out["autoantibody_rel"]["180"] is None
    assert [e["what"] for e in out["events"]] == ["lymphodepletion", "infuse_bcma_car_t"]
    table = np.genfromtxt(csv, delimiter=",", names=True)
    assert table["time"][-1] == 100.0
    assert np.interp(90, table["time"], table["serum_autoantibody_rel"]) == out["autoantibody_rel"]["90"]


def test_course_rejects_a_bad_value_with_one_line(capsys):
    assert course.main(["biology.blood.disease_drive_half_rel=2"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disease_drive_half_rel" in err and "2" in err
