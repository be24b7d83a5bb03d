"""The NumPy move's block size (motility.MOVE_BLOCK): step time and the largest transient
allocation with two block sizes, side by side in one process (alternating rounds).

    python bench/move_block.py [--cases 64:1e4 128:1e5] [--blocks 16384 4096] [--rounds 3]

Writes bench/results/step_cpu_move_block<b1>_<b2>.json (or --out DIR).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import _allocation, build

import tissuesim.agents.motility as motility


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cases", nargs="+", default=["64:1e4", "128:1e5"])
    ap.add_argument("--blocks", nargs=2, type=int, default=[16384, 4096])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--out", default=str(Path(__file__).resolve().parent / "results"))
    args = ap.parse_args()
    res = {}
    for case in args.cases:
        sim = build(case, "numpy", ["therapy=cd19"])
        for _ in range(3):
            sim.step()
        steps = max(2, round(0.25 / max(_time_step(sim), 1e-4)))
        t = {b: [] for b in args.blocks}
        for _ in range(args.rounds):
            for b in args.blocks:
                motility.MOVE_BLOCK = b
                t0 = time.perf_counter()
                for _ in range(steps):
                    sim.step()
                t[b].append((time.perf_counter() - t0) / steps)
        res[case] = {"cells": sim.cells.n, "steps_per_round": steps}
        for b in args.blocks:
            motility.MOVE_BLOCK = b
            res[case][str(b)] = {"step_s": t[b], "allocation": _allocation(sim, steps=3)}
            al = res[case][str(b)]["allocation"]
            print(
                f"{case:>8} block {b:>6}: best step {min(t[b]) * 1e3:8.2f} ms, transient {al['ratio']:.2f}x state"
            )
    info = {"what": __doc__.splitlines()[0], "blocks": args.blocks, "rounds": args.rounds}
    name = f"step_cpu_move_block{args.blocks[0]}_{args.blocks[1]}.json"
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / name).write_text(json.dumps({"info": info, "cases": res}, indent=1) + "\n")


def _time_step(sim) -> float:
    t0 = time.perf_counter()
    sim.step()
    return time.perf_counter() - t0


if __name__ == "__main__":
    main()
