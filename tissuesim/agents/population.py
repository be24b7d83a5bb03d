"""Cells as a structure of arrays on the backend's device.

Every attribute is one array of length ``capacity`` (the first ``n`` rows are live cells):

=========  ===============  ==========================================================
position   float32 (cap, 3) x, y, z in um
velocity   float32 (cap, 3) um/min; the persistent part of the motion (OU velocity)
type       uint8 (cap,)     index into the simulation's cell-type names
id         int64 (cap,)     unique, stable for the cell's life, never reused
state      uint8 (cap,)     biology-defined state code
age        float32 (cap,)   minutes since birth (or since entering the tissue)
<extra>    float32 / int32  registered by name (e.g. kills, engaged_until) by the biology layer
=========  ===============  ==========================================================

Order invariant: rows are always sorted by id. ``add`` appends ids larger than any before and
``remove`` compacts stably, so "lowest index" and "lowest id" name the same cell; the claim rule
(lowest id wins) and the tie-breaks of the kernels rely on this.

Sync policy (CuPy): the count ``n`` and the next id live on the host. They change only at births
(``add``: the caller knows how many, no sync) and deaths (``remove``: one integer is read back,
the number of survivors). Nothing else here reads the device; device-side error conditions are
accumulated in ``flags`` (uint32 bit set, see :mod:`tissuesim.agents._kernels`) and read by
:meth:`Population.check_flags` at output time.
"""

from __future__ import annotations

import logging

import numpy as np

from tissuesim.agents import _kernels as K
from tissuesim.backend import Backend

log = logging.getLogger(__name__)

#: core attributes: name -> (dtype, trailing shape)
CORE = {
    "position": (np.float32, (3,)),
    "velocity": (np.float32, (3,)),
    "type": (np.uint8, ()),
    "id": (np.int64, ()),
    "state": (np.uint8, ()),
    "age": (np.float32, ()),
}
EXTRA_DTYPES = (np.float32, np.int32)


class AgentError(RuntimeError):
    """A device-side check failed (see Population.check_flags)."""


class Population:
    """Structure of arrays of cells on ``be`` (numpy or cupy).

    be : Backend. capacity : initial number of rows (grows by doubling as needed).
    attrs : optional {name: dtype} of extra per-cell attributes (float32 or int32).
    """

    def __init__(self, be: Backend, capacity: int = 1024, attrs: dict | None = None):
        self.be = be
        self.xp = be.xp
        self.capacity = max(int(capacity), 1)
        self.n = 0
        self.next_id = 0
        self._arrays: dict = {}
        self._fill: dict = {}
        for name, (dt, shp) in CORE.items():
            self._arrays[name] = self.xp.zeros((self.capacity, *shp), dtype=dt)
            self._fill[name] = 0
        self.extra: list[str] = []
        for name, dt in (attrs or {}).items():
            self.register(name, dt)
        #: device bit set of K.FLAG_* (uint32 (1,))
        self.flags = self.xp.zeros(1, dtype=np.uint32)
        #: pair-buffer size for contacts(exact=False); grown by check_flags after an overflow
        self.pair_capacity = 0
        self._last_pair_total = None

    # -- attributes -------------------------------------------------------------------------
    def register(self, name: str, dtype=np.float32, fill=0) -> None:
        """Add a per-cell attribute (float32 or int32), ``fill`` for existing and new cells."""
        dtype = np.dtype(dtype)
        if dtype not in [np.dtype(d) for d in EXTRA_DTYPES]:
            raise TypeError(f"attribute {name!r}: dtype {dtype} not allowed (float32 or int32)")
        if name in self._arrays:
            raise ValueError(f"attribute {name!r} exists already")
        self._arrays[name] = self.xp.full(self.capacity, fill, dtype=dtype)
        self._fill[name] = fill
        self.extra.append(name)

    def __getitem__(self, name: str):
        """The full buffer (capacity rows) of attribute ``name``; rows [:n] are live."""
        return self._arrays[name]

    def view(self, name: str):
        """Live rows [:n] of attribute ``name`` (a view: writes go to the population)."""
        return self._arrays[name][: self.n]

    @property
    def names(self) -> list[str]:
        return list(self._arrays)

    position = property(lambda self: self._arrays["position"])
    velocity = property(lambda self: self._arrays["velocity"])
    type = property(lambda self: self._arrays["type"])
    id = property(lambda self: self._arrays["id"])
    state = property(lambda self: self._arrays["state"])
    age = property(lambda self: self._arrays["age"])

    # -- births and deaths -------------------------------------------------------------------
    def reserve(self, n_total: int) -> None:
        """Make room for n_total cells, doubling the capacity (amortised O(1) per birth)."""
        if n_total <= self.capacity:
            return
        cap = self.capacity
        while cap < n_total:
            cap *= 2
        for name, a in self._arrays.items():
            b = self.xp.full((cap, *a.shape[1:]), self._fill[name], dtype=a.dtype)
            b[: self.n] = a[: self.n]
            self._arrays[name] = b
        self.capacity = cap

    def add(self, positions, types, velocity=None, state=None, age=None, **attrs):
        """Append m cells; returns their new ids (int64 (m,), on the device).

        positions : (m, 3) um. types : (m,) or a scalar type index. velocity : (m, 3) um/min or
        None (zero). state, age, attrs : (m,) arrays or scalars, else 0 / the registered fill.
        """
        xp = self.xp
        positions = xp.asarray(positions, dtype=np.float32).reshape(-1, 3)
        m = int(positions.shape[0])
        unknown = set(attrs) - set(self.extra)
        if unknown:
            raise KeyError(f"unknown attributes {sorted(unknown)}; register them first")
        ids = xp.arange(self.next_id, self.next_id + m, dtype=np.int64)
        if m == 0:
            return ids
        self.reserve(self.n + m)
        s = slice(self.n, self.n + m)
        a = self._arrays
        a["position"][s] = positions
        a["velocity"][s] = 0 if velocity is None else xp.asarray(velocity, dtype=np.float32).reshape(m, 3)
        a["type"][s] = xp.asarray(types, dtype=np.uint8)
        a["id"][s] = ids
        a["state"][s] = 0 if state is None else xp.asarray(state, dtype=np.uint8)
        a["age"][s] = 0 if age is None else xp.asarray(age, dtype=np.float32)
        for name in self.extra:
            a[name][s] = xp.asarray(attrs[name], dtype=a[name].dtype) if name in attrs else self._fill[name]
        self.n += m
        self.next_id += m
        return ids

    def remove(self, mask) -> int:
        """Delete the cells where ``mask`` (bool, n or capacity rows) is True; stable compaction.

        Returns the number removed (reading it back is this call's one sync on the GPU).
        """
        xp = self.xp
        mask = xp.asarray(mask, dtype=bool)[: self.n]
        keep = xp.flatnonzero(~mask)
        m = int(keep.shape[0])
        removed = self.n - m
        if removed == 0:
            return 0
        for name, a in self._arrays.items():
            a[:m] = a[keep]
            a[m : self.n] = self._fill[name]
        self.n = m
        return removed

    def remove_and_divide(self, gone, divide, inherit=(), extra=None):
        """Remove the rows where ``gone``, then append one daughter of every row where ``divide``;
        one device read in all (the counts), instead of one per removal and one per birth.

        gone, divide : bool (n,) (divide is ignored where gone). inherit : attribute names the
        daughters copy from their parent (the rest get the registered fill, velocity 0, age 0, as
        :meth:`add` gives). extra : optional int64 (k,) device array read back with the counts.
        The result is that of ``remove(gone)`` followed by ``add`` of the daughters in parent-row
        order (new ids next_id, next_id + 1, ...): survivors keep their order, daughters follow.
        Returns (removed, born, extra as host int64 (k,) or None).
        """
        xp = self.xp
        n = self.n
        ex = None if extra is None else xp.asarray(extra, dtype=np.int64).reshape(-1)
        if n == 0:
            return 0, 0, None if ex is None else self.be.asnumpy(ex)
        keep = ~xp.asarray(gone, dtype=bool)[:n]
        div = xp.asarray(divide, dtype=bool)[:n] & keep
        kr = xp.cumsum(keep, dtype=np.int64)  # survivor rank + 1
        dr = xp.cumsum(div, dtype=np.int64)  # daughter rank + 1
        parts = [kr[-1:], dr[-1:]] + ([] if ex is None else [ex])
        got = self.be.asnumpy(xp.concatenate(parts))  # the one sync
        kept, born = int(got[0]), int(got[1])
        extra_out = got[2:] if ex is not None else None
        if kept == n and born == 0:  # most steps: nothing to move (and no launch on the GPU)
            return 0, 0, extra_out
        # The source row of every new row: survivors in order, then one daughter per dividing
        # row in row order; rows that go (and non-dividing rows, for the daughters' map) write
        # into a spare last entry.
        new_n = kept + born
        rows = xp.arange(n, dtype=np.int64)
        src = xp.empty(new_n + 1, dtype=np.int64)
        src[xp.where(keep, kr - 1, new_n)] = rows
        src[xp.where(div, kept + dr - 1, new_n)] = rows
        src = src[:new_n]
        self.reserve(new_n)  # grows as add() would: doubling to fit
        for name, a in self._arrays.items():
            a[:new_n] = a[src]  # the gather is a new array: reading and writing rows do not mix
            if born and name == "id":
                a[kept:new_n] = xp.arange(self.next_id, self.next_id + born, dtype=a.dtype)
            elif born and name not in inherit:
                a[kept:new_n] = self._fill[name]
            if new_n < n:
                a[new_n:n] = self._fill[name]
        self.n = new_n
        self.next_id += born
        return n - kept, born, extra_out

    def counts_by_type(self, ntypes: int):
        """Live cells per type, int64 (ntypes,) on the device. Not for inside a step on CuPy:
        cupy.bincount reads its input's minimum and maximum back to the host (two syncs)."""
        return self.xp.bincount(self.view("type"), minlength=ntypes)[:ntypes]

    # -- output ---------------------------------------------------------------------------------
    def host_arrays(self) -> dict[str, np.ndarray]:
        """Host copies of the live rows of every attribute, for the writer (a sync point)."""
        return {name: self.be.asnumpy(a[: self.n]).copy() for name, a in self._arrays.items()}

    def check_flags(self, strict: bool = False) -> int:
        """Read and clear the device flags (a sync point: call at output time).

        Pair-buffer overflow grows ``pair_capacity`` to twice the last pair count, so the next
        ``contacts(exact=False)`` fits; the overflowed query itself dropped contacts and is
        reported. Each raised flag is logged as a warning; ``strict`` raises AgentError instead.
        Returns the flag bits that were set.
        """
        bits = int(self.be.asnumpy(self.flags)[0])
        self.flags[...] = 0
        if bits & K.FLAG_PAIR_OVERFLOW and self._last_pair_total is not None:
            total = int(self.be.asnumpy(self._last_pair_total))
            self.pair_capacity = max(2 * total, 2 * self.pair_capacity, 1024)
        msgs = [txt for bit, txt in K.FLAG_NAMES.items() if bits & bit]
        for txt in msgs:
            if strict:
                raise AgentError(f"agents: {txt}")
            log.warning("agents: %s", txt)
        return bits
