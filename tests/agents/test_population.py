"""Population: births, deaths, ids, capacity growth, extra attributes."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.agents import Population


def _add(pop, m, rs, t=0):
    pos = rs.uniform(0, 100, (m, 3)).astype(np.float32)
    return pop.add(pop.xp.asarray(pos), t, kills=pop.xp.arange(m, dtype=np.int32) + 10 * t), pos


def test_capacity_growth_preserves_every_cell(be):
    rs = np.random.default_rng(1)
    pop = Population(be, capacity=3, attrs={"kills": np.int32})
    pop.register("engaged_until", np.float32, fill=-1.0)
    host = []
    for k in range(6):
        m = 5 * k + 1
        ids, pos = _add(pop, m, rs, t=k)
        host.append((be.asnumpy(ids), pos, k))
    assert pop.capacity >= pop.n == sum(5 * k + 1 for k in range(6))
    # amortised doubling from 3: capacity = 3 * 2^k, the smallest such >= n
    k = pop.capacity // 3
    assert pop.capacity % 3 == 0 and k & (k - 1) == 0 and pop.capacity // 2 < pop.n
    h = pop.host_arrays()
    ids = np.concatenate([x[0] for x in host])
    np.testing.assert_array_equal(h["id"], ids)
    np.testing.assert_array_equal(h["id"], np.arange(pop.n))
    np.testing.assert_array_equal(h["position"], np.concatenate([x[1] for x in host]))
    np.testing.assert_array_equal(h["type"], np.concatenate([np.full(len(x[0]), x[2]) for x in host]))
    np.testing.assert_array_equal(
        h["kills"], np.concatenate([np.arange(len(x[0])) + 10 * x[2] for x in host])
    )
    assert (h["engaged_until"] == -1).all() and h["kills"].dtype == np.int32
    assert set(h) >= {"position", "velocity", "type", "id", "state", "age", "kills", "engaged_until"}


def test_births_and_deaths_ids_unique_counts_exact(be):
    rs = np.random.default_rng(2)
    pop = Population(be, capacity=8)
    alive = {}
    ever = set()
    for _ in range(30):
        m = int(rs.integers(0, 40))
        pos = rs.uniform(0, 100, (m, 3)).astype(np.float32)
        ids = be.asnumpy(pop.add(be.asarray(pos), be.asarray(rs.integers(0, 7, m))))
        assert not (set(ids.tolist()) & ever), "an id was reused"
        ever |= set(ids.tolist())
        for i, p in zip(ids, pos):
            alive[int(i)] = p
        kill = rs.random(pop.n) < 0.3
        cur = be.asnumpy(pop.view("id")).copy()
        removed = pop.remove(be.asarray(kill))
        assert removed == int(kill.sum())
        for i in cur[kill]:
            del alive[int(i)]
        h = pop.host_arrays()
        assert pop.n == len(alive) == len(h["id"])
        assert np.all(np.diff(h["id"]) > 0), "rows must stay sorted by id (stable compaction)"
        np.testing.assert_array_equal(
            h["position"], np.array([alive[int(i)] for i in h["id"]]).reshape(-1, 3)
        )


def test_unknown_attribute_and_bad_dtype(be):
    pop = Population(be)
    with pytest.raises(KeyError):
        pop.add(be.xp.zeros((1, 3)), 0, nope=1)
    with pytest.raises(TypeError):
        pop.register("x", np.float64)


def test_counts_by_type(be):
    pop = Population(be)
    pop.add(be.xp.zeros((5, 3)), be.xp.asarray([0, 2, 2, 6, 2], dtype=np.uint8))
    np.testing.assert_array_equal(be.asnumpy(pop.counts_by_type(7)), [1, 0, 3, 0, 0, 0, 1])


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize(
    "p_gone,p_div", [(0.3, 0.4), (0.0, 0.4), (0.3, 0.0), (0.0, 0.0)], ids=["both", "births", "deaths", "none"]
)
def test_remove_and_divide_equals_remove_then_add(be, seed, p_gone, p_div):
    """The one-read compaction gives the buffers that remove() then add() of the daughters give,
    with cells going and dividing, only dividing, only going, or neither."""
    rs = np.random.default_rng(seed)
    pops = []
    n = 300 if seed else 1  # one cell: the smallest population
    pos = rs.uniform(0, 100, (n, 3)).astype(np.float32)
    types = rs.integers(0, 5, n).astype(np.uint8)
    state = rs.integers(0, 2, n).astype(np.uint8)
    kills = rs.integers(0, 9, n).astype(np.int32)
    busy = rs.uniform(0, 5, n).astype(np.float32)
    vel = rs.normal(0, 1, (n, 3)).astype(np.float32)
    for _ in range(2):
        p = Population(be, capacity=n + 1, attrs={"kills": np.int32})
        p.register("busy_until", np.float32, fill=-7.0)
        p.add(be.asarray(pos), be.asarray(types), state=be.asarray(state))
        p["kills"][:n] = be.asarray(kills)
        p["busy_until"][:n] = be.asarray(busy)
        p.velocity[:n] = be.asarray(vel)
        pops.append(p)
    gone = rs.random(n) < p_gone
    divide = rs.random(n) < p_div  # some of them gone too: those do not divide
    if seed and p_gone:
        assert gone.any()
    if seed and p_div:
        assert (divide & ~gone).any()
    inherit = ("position", "type", "state", "kills")
    a, b = pops
    parents = np.flatnonzero(divide & ~gone)
    d = {k: a[k][be.asarray(parents)].copy() for k in inherit}
    removed_a = a.remove(be.asarray(gone))
    a.add(d["position"], d["type"], state=d["state"], kills=d["kills"])
    extra = be.asarray(np.array([5, 0, 3], dtype=np.int64))
    removed_b, born, got = b.remove_and_divide(be.asarray(gone), be.asarray(divide), inherit, extra=extra)
    assert (removed_b, born) == (removed_a, parents.size)
    np.testing.assert_array_equal(got, [5, 0, 3])
    assert (b.n, b.next_id, b.capacity) == (a.n, a.next_id, a.capacity)
    for name in a.names:  # whole buffers: the rows past n hold the fill in both
        np.testing.assert_array_equal(be.asnumpy(a[name]), be.asnumpy(b[name]), name)


def test_remove_and_divide_takes_integer_masks_as_remove_does(be):
    pops = []
    for _ in range(2):
        p = Population(be, capacity=8)
        p.add(be.asarray(np.arange(15, dtype=np.float32).reshape(5, 3)), 1)
        pops.append(p)
    mask = be.asarray(np.array([0, 1, 0, 1, 0], dtype=np.uint8))
    no = be.asarray(np.zeros(5, dtype=np.uint8))
    pops[0].remove(mask)
    removed, born, _ = pops[1].remove_and_divide(mask, no)
    assert (removed, born) == (2, 0)
    np.testing.assert_array_equal(be.asnumpy(pops[0].id[:3]), be.asnumpy(pops[1].id[:3]))


def test_bin_ranges_equal_counting(be):
    from tissuesim.agents.neighbours import bin_ranges

    rs = np.random.default_rng(4)
    for n, nbins in ((0, 5), (1, 1), (500, 37), (2000, 3000)):
        bins = np.sort(rs.integers(0, nbins, n)).astype(np.int64)
        start, end = bin_ranges(be.xp, be.asarray(bins), nbins)
        counts = np.bincount(bins, minlength=nbins)
        np.testing.assert_array_equal(be.asnumpy(end), np.cumsum(counts))
        np.testing.assert_array_equal(be.asnumpy(start), np.cumsum(counts) - counts)
        assert be.asnumpy(start).dtype == np.int32
