"""Where the CuPy step makes the host wait for the GPU, and which parts a CUDA graph can capture.

Part 1, census. CuPy's own sync detector (cupyx.allow_synchronize) is a no-op in CuPy >= 10, so
the census finds waits by making them visible: before each step, and again after each wait it
finds, a spin kernel keeps the GPU busy for ``--spin-ms``. A host line that waits for the device
(a device -> host copy, a scalar read, the size of a nonzero/bincount result, a pageable
host -> device copy that drains the stream) then takes at least that long, while a line that
only queues work returns at once. A line tracer over tissuesim's own frames times every line;
lines that took >= 60% of the spin are the sync sites, reported per step with the phase of the
step they are in (the phases of bench/step.py).

Part 2, capture. Each phase of the step is run once inside CUDA stream capture (relaxed mode),
which refuses any call that would synchronise the capturing stream: a phase that captures is
sync-free. The first refusal is reported with its tissuesim line.

    python bench/syncs.py --out DIR [--case small] [--steps 20]

Part 3, profile: cProfile of a few whole steps per case (host time per function; where the host
waits for the device, the waiting call carries the time).

Writes DIR/syncs_gpu.json. GPU only.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
import traceback
from collections import Counter
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from step import PHASES, build, phase_target

import tissuesim

PKG = Path(tissuesim.__file__).resolve().parent


_OURS: dict[str, bool] = {}


def _ours(filename: str) -> bool:
    """Whether a code object's file is in the tissuesim package (paths compared resolved, once
    per file: the tracer asks at every call, and a slow tracer would outlast the spin)."""
    hit = _OURS.get(filename)
    if hit is None:
        try:
            hit = Path(filename).resolve().is_relative_to(PKG)
        except (OSError, ValueError):
            hit = False
        _OURS[filename] = hit
    return hit


SPIN_SRC = r"""
extern "C" __global__ void spin(long long cycles) {
    long long t0 = clock64();
    while (clock64() - t0 < cycles) { }
}
"""


class Census:
    """Line tracer over tissuesim frames that records lines during which the host waited."""

    def __init__(self, spin, threshold_s: float):
        self.spin = spin
        self.threshold = threshold_s
        self.sites: Counter = Counter()
        self.waited = 0.0  # seconds of the waits found (to tell host work from waiting)
        self.phase = "step"
        self._last = None
        self._site = None

    def _tracer(self, frame, event, arg):
        if not _ours(frame.f_code.co_filename):
            return None
        self._note(frame)
        return self._local

    def _local(self, frame, event, arg):
        if event in ("line", "return"):
            self._note(frame)
        return self._local

    def _note(self, frame):
        now = time.perf_counter()
        if self._last is not None and now - self._last >= self.threshold:
            self.sites[(self.phase, self._site)] += 1
            self.waited += now - self._last
            self.spin()  # busy the GPU again so the next wait shows too
            now = time.perf_counter()
        path = frame.f_code.co_filename
        short = path[path.rfind("tissuesim/") :]
        self._site = f"{short}:{frame.f_lineno} ({frame.f_code.co_name})"
        self._last = now

    def __enter__(self):
        self._last = None
        sys.settrace(self._tracer)
        return self

    def __exit__(self, *exc):
        sys.settrace(None)


def _phase_tagger(sim, census: Census):
    for name in PHASES:
        obj, attr = phase_target(sim, name)
        fn = getattr(obj, attr, None) if obj is not None else None
        if fn is None:
            continue

        def tagged(*a, _fn=fn, _name=name, **k):
            prev = census.phase
            census.phase = _name
            try:
                return _fn(*a, **k)
            finally:
                census.phase = prev

        setattr(obj, attr, tagged)


def census(case: str, steps: int, spin_ms: float, warm_days: float) -> dict:
    import cupy

    sim = build(case, "cupy", ["therapy=cd19"])
    sim.run(until_day=warm_days)
    clock_khz = cupy.cuda.runtime.deviceGetAttribute(cupy.cuda.runtime.cudaDevAttrClockRate, 0)
    ker = cupy.RawKernel(SPIN_SRC, "spin")
    cycles = int(spin_ms * 1e-3 * clock_khz * 1e3)

    def spin():
        ker((1,), (1,), (cupy.int64(cycles),))

    # calibrate: how long does the host wait on a spin (clock rate read may be the boost clock)
    spin()
    t = time.perf_counter()
    cupy.cuda.Device().synchronize()
    waited = time.perf_counter() - t
    # a wait shows as the rest of the spin: the step's own host time (~10 ms) must not eat it
    c = Census(spin, threshold_s=0.3 * waited)
    _phase_tagger(sim, c)
    host = []
    for _ in range(steps):
        spin()
        w0 = c.waited
        t = time.perf_counter()
        with c:
            sim.step()
        host.append(time.perf_counter() - t - (c.waited - w0))
        cupy.cuda.Device().synchronize()
    # A wait shows only while a spin still runs: one that comes more than (spin - threshold)
    # of host work after the last spin started is missed. Valid when a whole step's host work
    # (its time less the waits found) stays under half the spin. A host line that alone takes
    # the threshold would be counted as a wait: none should (kernels are compiled in warm-up).
    valid = max(host) < 0.5 * waited
    rows = [
        {"phase": ph, "site": site, "per_step": n / steps}
        for (ph, site), n in sorted(c.sites.items(), key=lambda kv: (-kv[1], kv[0]))
    ]
    return {
        "case": case,
        "steps": steps,
        "spin_seconds_measured": waited,
        "cells": int(sim.cells.n),
        "syncs_per_step": sum(r["per_step"] for r in rows),
        "host_seconds_per_step_max": max(host),
        "valid": bool(valid),
        "sites": rows,
    }


def capture_phases(case: str, warm_days: float) -> dict:
    """Run each phase once under stream capture; report whether it captured."""
    import cupy

    sim = build(case, "cupy", ["therapy=cd19"])
    sim.run(until_day=warm_days)
    # the plain field step: is it sync-free? (its CUDA graph cannot be launched into a capture)
    sim.fields.use_graph = False
    # on the GPU the blood phase takes up the advance the last step left (into the host Blood);
    # before_move (arrivals) takes it up again in a real step, so the pending advance and the
    # host Blood it was made from are put back before its capture
    imm = sim.immunology
    db = imm.device_blood() if imm.blood_on_device else None
    if db is not None:
        b = sim.blood
        saved = (db.pending, dict(b.y), b.meta_dict(), b.step_grade)
    out = {}
    for name in PHASES:
        obj, attr = phase_target(sim, name)
        fn = getattr(obj, attr, None) if obj is not None else None
        if fn is None:
            continue
        on_device = name == "blood" and sim.immunology.blood_on_device
        args = {
            "events": (),
            # DeviceBlood.advance takes up the result left by the last step (no device work)
            "blood": (sim.step_count, sim.dt_min) if on_device else (sim.dt_min,),
            "arrivals": (sim.step_count, sim.dt_min),
            "agents": (),
            "biology": (sim.step_count, sim.dt_min),
            "fields": (sim.dt_min,),
        }[name]
        kw = {"source": sim.immunology.source, "c_blood": sim.c_blood} if name == "fields" else {}
        if db is not None and name == "arrivals":
            db.pending, b.y, meta, b.step_grade = saved[0], dict(saved[1]), saved[2], saved[3]
            b.load_meta_dict(meta)
        s = cupy.cuda.Stream(non_blocking=True)
        res = {"captured": False}
        with s:
            s.begin_capture()
            try:
                fn(*args, **kw)
            except Exception as e:  # the refusal, raised at the first synchronising call
                tb = [f for f in traceback.extract_tb(e.__traceback__) if "tissuesim" in f.filename]
                where = tb[-1] if tb else None
                res["error"] = f"{type(e).__name__}: {str(e)[:160]}"
                if where is not None:
                    res["site"] = f"{where.filename[where.filename.rfind('tissuesim/') :]}:{where.lineno}"
            try:
                g = s.end_capture()
                if "error" not in res:
                    res["captured"] = True
                    g.launch(s)
                    s.synchronize()
            except Exception as e:
                res.setdefault("error", f"end_capture: {type(e).__name__}: {str(e)[:160]}")
        out[name] = res
        try:
            cupy.cuda.Device().synchronize()
        except Exception as e:  # a broken capture can poison the context; say so and stop
            out["_context"] = f"{type(e).__name__}: {e}"
            break
    return out


def profile(case: str, steps: int, warm_days: float, top: int = 25) -> dict:
    """cProfile of ``steps`` whole steps (host time per function; a sync shows as the time of
    the call that waited)."""
    import cProfile
    import pstats

    import cupy

    sim = build(case, "cupy", ["therapy=cd19"])
    if ":" in case:  # synthetic cubes start full of cells: a few steps warm the caches
        for _ in range(5):
            sim.step()
    else:
        sim.run(until_day=warm_days)
    cupy.cuda.Device().synchronize()
    prof = cProfile.Profile()
    t = time.perf_counter()
    prof.enable()
    for _ in range(steps):
        sim.step()
    cupy.cuda.Device().synchronize()
    prof.disable()
    wall = (time.perf_counter() - t) / steps
    st = pstats.Stats(prof)
    rows = []
    for (fn, line, name), (_cc, nc, tt, ct, _callers) in st.stats.items():
        short = fn[fn.rfind("tissuesim/") :] if "tissuesim/" in fn else fn.split("/")[-1]
        rows.append(
            {
                "function": f"{short}:{line}({name})",
                "calls_per_step": nc / steps,
                "tottime_ms_per_step": 1e3 * tt / steps,
                "cumtime_ms_per_step": 1e3 * ct / steps,
            }
        )
    rows.sort(key=lambda r: -r["tottime_ms_per_step"])
    return {
        "case": case,
        "steps": steps,
        "cells": int(sim.cells.n),
        "ms_per_step_profiled": 1e3 * wall,
        "top_tottime": rows[:top],
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--case", default="small")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--spin-ms", type=float, default=100.0)
    ap.add_argument("--warm-days", type=float, default=0.25, help="run this long first (CAR-T arrive)")
    ap.add_argument("--profile", nargs="*", default=["small", "256:1e6"], help="cases to cProfile")
    ap.add_argument("--profile-steps", type=int, default=20)
    ap.add_argument("--out", type=Path, default=Path("bench/results"))
    a = ap.parse_args(argv)
    from tissuesim.backend import select_backend

    be = select_backend("cupy")
    res = {"device": be.describe(), "census": None, "capture": None}
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / "syncs_gpu.json"
    try:
        res["census"] = census(a.case, a.steps, a.spin_ms, a.warm_days)
        cs = res["census"]
        print(f"# {res['device']}: {cs['syncs_per_step']:.1f} host waits per step ({a.case})")
        if not cs["valid"]:
            print(
                f"  NOT VALID: a traced step had {cs['host_seconds_per_step_max']:.3f} s of host work; raise --spin-ms"
            )
        for r in res["census"]["sites"]:
            print(f"  {r['per_step']:5.2f}/step  {r['phase']:>9}  {r['site']}")
    except Exception as e:
        res["census_error"] = traceback.format_exc()
        print("census failed:", e)
    path.write_text(json.dumps(res, indent=1) + "\n")
    try:
        res["capture"] = capture_phases(a.case, a.warm_days)
        for k, v in res["capture"].items():
            print(f"  capture {k:>9}: {v}")
    except Exception as e:
        res["capture_error"] = traceback.format_exc()
        print("capture failed:", e)
    path.write_text(json.dumps(res, indent=1) + "\n")
    res["profile"] = []
    for case in a.profile:
        try:
            pr = profile(case, a.profile_steps, a.warm_days)
        except Exception:
            res["profile"].append({"case": case, "error": traceback.format_exc()})
            continue
        res["profile"].append(pr)
        print(
            f"# profile {case}: {pr['ms_per_step_profiled']:.2f} ms/step under cProfile, {pr['cells']} cells"
        )
        for r in pr["top_tottime"][:15]:
            print(f"  {r['tottime_ms_per_step']:7.3f} ms {r['calls_per_step']:6.1f}/step  {r['function']}")
        path.write_text(json.dumps(res, indent=1) + "\n")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
