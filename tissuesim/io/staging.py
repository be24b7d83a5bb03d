"""Snapshots that leave the device without stalling the step (issue #8).

A snapshot of a 256^3 x 6-field patch with 1e6 cells is ~0.5 GB; copied to the host
synchronously it holds the step for ~0.2 s. On CuPy the Stager instead

1. copies the fields and the live cell rows into device staging buffers on the compute stream
   (stream-ordered after the step that produced them: a device-to-device copy at device
   bandwidth, well under a millisecond even at 256^3);
2. copies the staging buffers into pinned host buffers on a side stream, which waits only for
   step 1 (an event) and then overlaps the following steps;
3. writes the snapshot to HDF5 once that copy has finished: polled (without waiting) after each
   step, or waited for before the next snapshot, a checkpoint and at the end of the run.

The live arrays are free to change from the moment step 1 is queued, so what is written is the
state at the snapshot's step. One snapshot is in flight at most. A crash loses at most the one
in flight and never touches what the file already holds (the writer appends a snapshot whole).
On NumPy the snapshot is copied and written at once, as before.

The device-specific part is ``_CupyTransfers`` (four operations); the bookkeeping above runs on
any ``transfers`` object with the same four methods, which is how the tests check it on the CPU.
"""

from __future__ import annotations

import numpy as np

#: the cell attributes a snapshot holds (HDF5 name -> Population attribute)
AGENT_ATTRS = {"position": "position", "type": "type", "id": "id", "state": "state", "age_min": "age"}


class _CupyTransfers:
    """Device staging, pinned host buffers, a side stream and its events (CuPy)."""

    def __init__(self, xp):
        self.xp = xp
        self.stream = xp.cuda.Stream(non_blocking=True)

    def device_copy(self, dst, src) -> None:
        self.xp.copyto(dst, src)  # on the current (compute) stream

    def host_buffer(self, shape, dtype):
        import cupyx

        return cupyx.empty_pinned(shape, dtype=dtype)

    def start_download(self, pairs):
        """Queue device -> pinned host copies [(dev, host)] after the work queued so far on the
        current stream; returns the event that marks their end."""
        xp = self.xp
        ready = xp.cuda.Event()
        ready.record()  # the staging copies of the compute stream
        self.stream.wait_event(ready)
        for dev, host in pairs:
            xp.asnumpy(dev, stream=self.stream, out=host, blocking=False)
        done = xp.cuda.Event()
        done.record(self.stream)
        return done

    def finished(self, token) -> bool:
        return bool(token.done)

    def wait(self, token) -> None:
        token.synchronize()


class Stager:
    """Snapshot writes of one Simulation: ``submit`` at a snapshot step, ``poll`` after each step,
    ``flush`` before anything that must see every snapshot written (checkpoint, end of run).

    transfers : None (NumPy: write at once), "cupy", or an object with device_copy, host_buffer,
        start_download, finished and wait (tests)."""

    def __init__(self, sim, transfers=None):
        self.sim = sim
        if transfers == "cupy":
            transfers = _CupyTransfers(sim.xp)
        self.t = transfers
        self._dev: dict[str, object] = {}
        self._host: dict[str, np.ndarray] = {}
        self.pending = None  # (writer, day, n cells, token)

    @property
    def asynchronous(self) -> bool:
        return self.t is not None

    def _buffers(self, name: str, shape, dtype):
        """Device staging and pinned host buffer for one array, grown along axis 0 as needed."""
        dev = self._dev.get(name)
        if dev is None or dev.shape[1:] != tuple(shape[1:]) or dev.shape[0] < shape[0] or dev.dtype != dtype:
            rows = (
                shape[0]
                if name == "fields"
                else max(shape[0], 1024, 2 * (0 if dev is None else dev.shape[0]))
            )
            full = (rows, *shape[1:])
            self.flush()  # a copy in flight may still read the old buffers
            self._dev[name] = self.sim.xp.empty(full, dtype=dtype)
            self._host[name] = self.t.host_buffer(full, dtype)
        return self._dev[name], self._host[name]

    def submit(self, writer, day: float) -> None:
        """Snapshot the state now; written at once (NumPy) or when its copy has finished."""
        sim = self.sim
        if not self.asynchronous:
            fields, agents = sim.snapshot()
            writer.write_snapshot(day, fields, agents)
            return
        self.flush()
        pop = sim.cells
        n = int(pop.n)
        pairs = []
        vals = sim.fields.values
        dev, host = self._buffers("fields", vals.shape, vals.dtype)
        self.t.device_copy(dev, vals)
        pairs.append((dev, host))
        for out_name, attr in AGENT_ATTRS.items():
            a = pop[attr]
            dev, host = self._buffers(out_name, (n, *a.shape[1:]), a.dtype)
            self.t.device_copy(dev[:n], a[:n])
            pairs.append((dev[:n], host[:n]))
        self.pending = (writer, day, n, self.t.start_download(pairs))

    def poll(self) -> bool:
        """Write the snapshot in flight if its copy has finished (never waits). True if written."""
        if self.pending is None or not self.t.finished(self.pending[3]):
            return False
        p, self.pending = self.pending, None
        self._write(p)
        return True

    def flush(self) -> None:
        """Wait for the snapshot in flight, if any, and write it. It leaves the queue first, so
        a failed copy or write raises once, not again at every later flush."""
        if self.pending is not None:
            p, self.pending = self.pending, None
            self.t.wait(p[3])
            self._write(p)

    def _write(self, pending) -> None:
        """Hand the pinned host buffers to the writer, which must copy them before it returns
        (the HDF5 writer does): the next snapshot downloads into the same buffers."""
        writer, day, n, _ = pending
        h = self._host
        fields = {name: h["fields"][i] for i, name in enumerate(self.sim.fields.names)}
        agents = {name: h[name][:n] for name in AGENT_ATTRS}
        writer.write_snapshot(day, fields, agents)
