"""Snapshots through staging buffers (tissuesim.io.staging): the bookkeeping, on the CPU.

The Stager's device part is four operations (device copy, host buffer, start a download, ask or
wait for its end). Here a stand-in does the download late, only after several polls, so it reads
the staging buffers while the simulation has gone on stepping: what lands in the file must still
be the state at each snapshot's step, every snapshot must be written, in order, before a
checkpoint and when the run ends. The CuPy form of the four operations is checked on a GPU in
tests/test_gpu_simulation.py.
"""

from __future__ import annotations

import numpy as np
import pytest

import tissuesim
from tissuesim.io.staging import AGENT_ATTRS, Stager

BASE = [
    "grid=tiny",
    "backend=numpy",
    "output.progress=false",
    "therapy=cd19",
    "duration_days=0.3",
    "output.snapshot_every_days=0.025",  # 36 steps
    "output.timeseries_every_days=0.0125",
    "output.checkpoint_every_days=0.1",  # 144 steps: a flush before each
    "seed=3",
]


class LateTransfers:
    """Downloads that finish only after ``delay`` polls (or when waited for)."""

    def __init__(self, delay: int):
        self.delay = delay
        self.started = 0

    def device_copy(self, dst, src):
        np.copyto(dst, src)

    def host_buffer(self, shape, dtype):
        return np.full(shape, 0x7F, dtype=dtype)  # junk until a download lands

    def start_download(self, pairs):
        self.started += 1
        return {"pairs": pairs, "polls": 0, "done": False}

    def _land(self, token):
        if not token["done"]:
            for dev, host in token["pairs"]:
                np.copyto(host, dev)
            token["done"] = True

    def finished(self, token):
        token["polls"] += 1
        if token["polls"] >= self.delay:
            self._land(token)
        return token["done"]

    def wait(self, token):
        self._land(token)


def _run(transfers, recorder):
    sim = tissuesim.Simulation(tissuesim.load_config(BASE))
    if transfers is not None:
        sim._stager = Stager(sim, transfers)
    rec = recorder()
    sim.run(writer=rec)
    return sim, rec


@pytest.mark.parametrize("delay", [1, 5, 1000])
def test_late_downloads_write_the_state_of_each_snapshot_step_in_order(delay, recorder):
    _, ref = _run(None, recorder)
    sim, got = _run(LateTransfers(delay), recorder)
    snaps = [e for e in ref.log if e[0] == "snapshot"]
    assert len(snaps) == 13  # day 0 and every 36 steps to 0.3 d
    assert [e[:2] for e in got.log] == [e[:2] for e in ref.log], "order of snapshots and checkpoints"
    for a, b in zip(ref.log, got.log):
        if a[0] != "snapshot":
            continue
        for k in a[2]:
            assert np.array_equal(a[2][k], b[2][k]), (a[1], k)
        assert set(b[3]) == set(AGENT_ATTRS)
        for k in a[3]:
            assert np.array_equal(a[3][k], b[3][k]), (a[1], k)
    assert sim._stager.pending is None
    assert sim._stager.t.started == len(snaps)


def test_a_run_that_raises_still_writes_the_snapshot_in_flight(recorder):
    sim = tissuesim.Simulation(tissuesim.load_config(BASE))
    sim._stager = Stager(sim, LateTransfers(1000))  # nothing lands unless waited for
    rec = recorder()
    outputs = []

    def on_output(s):
        outputs.append(s.step_count)
        if len(outputs) == 4:  # steps 0, 18, 36 (a snapshot), 54
            raise RuntimeError("stop here")

    with pytest.raises(RuntimeError, match="stop here"):
        sim.run(writer=rec, on_output=on_output)
    snaps = [e for e in rec.log if e[0] == "snapshot"]
    assert [round(e[1] * 1440) for e in snaps] == [0, 36]
    assert sim._stager.pending is None


def test_an_error_at_the_first_output_still_writes_the_day_0_snapshot(recorder):
    sim = tissuesim.Simulation(tissuesim.load_config(BASE))
    sim._stager = Stager(sim, LateTransfers(1000))
    rec = recorder()

    def on_output(s):
        raise RuntimeError("first output")

    with pytest.raises(RuntimeError, match="first output"):
        sim.run(writer=rec, on_output=on_output)
    assert [e[:2] for e in rec.log] == [("snapshot", 0.0)]


class FailingTransfers(LateTransfers):
    def wait(self, token):
        raise OSError("device lost")


def test_a_failed_download_raises_once_and_does_not_hide_the_first_error(recorder):
    """A download that fails is reported where it is waited for, once; when run() is already
    raising, the failure of the final flush is logged and the first error propagates."""
    sim = tissuesim.Simulation(tissuesim.load_config(BASE))
    sim._stager = Stager(sim, FailingTransfers(1000))
    rec = recorder()
    with pytest.raises(OSError, match="device lost"):
        sim.run(writer=rec)  # the second snapshot flushes the first: raises there
    assert sim._stager.pending is None
    sim.flush_snapshots()  # nothing left in flight: no second error

    sim = tissuesim.Simulation(tissuesim.load_config(BASE))
    sim._stager = Stager(sim, FailingTransfers(1000))

    def on_output(s):
        if s.step_count == 18:
            raise RuntimeError("first error")

    with pytest.raises(RuntimeError, match="first error"):
        sim.run(writer=recorder(), on_output=on_output)


def test_async_snapshots_is_a_config_switch():
    # (a bad value is refused in tests/cli/test_config_validation.py)
    assert tissuesim.Simulation(tissuesim.load_config(BASE)).async_snapshots is True
    off = tissuesim.Simulation(tissuesim.load_config([*BASE, "output.async_snapshots=false"]))
    assert off.async_snapshots is False
