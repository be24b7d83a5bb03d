"""The systemic course alone: ``python -m tissuesim.course [overrides] [--days N] [--csv FILE]``.

Integrates the blood compartment (tissuesim.biology.blood.run_blood) under the chosen therapy
without a tissue patch, and prints the clinical readouts of summary.json (DESIGN.md section 5)
with the therapy events. A 600-day course takes about a second, so this is the quick way to see
what a parameter does to the whole-patient course before running the spatial model::

    python -m tissuesim.course therapy=bcma --days 365
    python -m tissuesim.course +experiment=antisynthetase_case --csv course.csv
    python -m tissuesim.course therapy=cd19 therapy.binder_immunogenicity=0.8 --days 730

Overrides are the same Hydra overrides as for ``tissuesim`` (validated the same way).
"""

from __future__ import annotations

import argparse
import json
import sys

import numpy as np


def course(overrides, days: float | None = None, dt_min: float = 15.0):
    """(table, events, readouts) of the systemic course for a list of overrides."""
    import tissuesim
    from tissuesim.analysis.readouts import compute_readouts
    from tissuesim.biology.blood import run_blood
    from tissuesim.config import validate

    cfg = tissuesim.load_config(list(overrides))
    validate(cfg)
    table, events = run_blood(cfg, float(cfg.duration_days if days is None else days), dt_min=dt_min)
    return table, events, compute_readouts(table)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tissuesim.course", description=__doc__.splitlines()[0])
    ap.add_argument("overrides", nargs="*", help="Hydra overrides, e.g. therapy=bcma")
    ap.add_argument("--days", type=float, default=None, help="duration (default: duration_days)")
    ap.add_argument("--dt-min", type=float, default=15.0, help="RK4 step, minutes (default 15)")
    ap.add_argument("--csv", default=None, help="write the timeseries to this CSV file")
    a = ap.parse_args(argv)
    from tissuesim.cli import preflight
    from tissuesim.config import ConfigError

    try:
        preflight(list(a.overrides))  # one clear line for a bad key or value, as tissuesim gives
        table, events, readouts = course(a.overrides, a.days, a.dt_min)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    readouts["events"] = [{"day": round(e.day, 3), "what": e.what, "detail": e.detail} for e in events]
    print(json.dumps(readouts, indent=1))
    if a.csv:
        cols = list(table)
        rows = np.column_stack([table[c] for c in cols])
        np.savetxt(a.csv, rows, delimiter=",", header=",".join(cols), comments="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
