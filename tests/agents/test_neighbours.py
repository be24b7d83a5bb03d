"""Cell list, contacts, crowding and claims against brute force."""

from __future__ import annotations

import numpy as np
import pytest

from tissuesim.agents import FLAG_PAIR_OVERFLOW, Population, build_cell_list, claim_targets, contacts
from tissuesim.agents.neighbours import Pairs, crowd_displacement
from tissuesim.grid import Grid


def _population(be, grid, n, rs, ntypes=3, boundary_fraction=0.2):
    lo = np.array(grid.origin)
    ext = np.array(grid.extent_um)
    pos = lo + rs.random((n, 3)) * ext
    # cells exactly on the domain faces (both ends) and at bin edges
    nb = int(boundary_fraction * n)
    for a in range(3 if grid.nz > 1 else 2):
        sel = rs.random(n) < boundary_fraction / 3
        pos[sel, a] = rs.choice([lo[a], lo[a] + ext[a], lo[a] + 20.0 * rs.integers(0, 5)], size=sel.sum())
    if grid.nz == 1:
        pos[:, 2] = lo[2] + 0.5 * grid.dx
    assert nb >= 0
    pos = pos.astype(np.float32)
    types = rs.integers(0, ntypes, n).astype(np.uint8)
    pop = Population(be, capacity=max(n, 1))
    pop.add(be.asarray(pos), be.asarray(types))
    return pop, pos, types


def _brute(pos, types, radius, src, tgt):
    d = pos[None, :, :] - pos[:, None, :]
    r2 = (d[..., 0] * d[..., 0] + d[..., 1] * d[..., 1]) + d[..., 2] * d[..., 2]
    ok = r2 < np.float32(radius) * np.float32(radius)
    np.fill_diagonal(ok, False)
    ok &= np.isin(types, src)[:, None] & np.isin(types, tgt)[None, :]
    i, j = np.nonzero(ok)
    return set(zip(i.tolist(), j.tolist()))


GRIDS = {
    "2d": Grid((1, 13, 17), dx=10.0, origin=(-30.0, 5.0, 0.0)),
    "3d": Grid((9, 7, 11), dx=10.0, origin=(0.0, 0.0, -50.0)),
}


@pytest.mark.parametrize("gname", ["2d", "3d"])
@pytest.mark.parametrize("n", [0, 1, 60, 700])
def test_contacts_equal_brute_force(be, gname, n):
    grid = GRIDS[gname]
    rs = np.random.default_rng(n + len(gname))
    pop, pos, types = _population(be, grid, n, rs)
    for radius, width, src, tgt in [
        (12.0, 12.0, [0, 1, 2], [0, 1, 2]),
        (7.5, 20.0, [1], [0, 2]),
        (25.0, 25.0, [2], [2]),
    ]:
        cl = build_cell_list(pop, grid, width)
        pr = contacts(pop, radius, src, tgt, cell_list=cl)
        i, j = be.asnumpy(pr.i), be.asnumpy(pr.j)
        got = list(zip(i.tolist(), j.tolist()))
        assert len(got) == len(set(got)) == pr.n, "duplicate pairs"
        assert set(got) == _brute(pos, types, radius, src, tgt)
        assert np.all(np.diff(i) >= 0), "pairs must be grouped by source (documented order)"
    if n > 100:
        # empty bins exist at this density with small bins
        cl = build_cell_list(pop, grid, 10.0)
        cnt = be.asnumpy(cl.bin_end) - be.asnumpy(cl.bin_start)
        assert (cnt == 0).any() and cnt.sum() == n


def test_cell_list_is_a_sorted_partition(be):
    grid = GRIDS["3d"]
    pop, pos, _ = _population(be, grid, 500, np.random.default_rng(3))
    cl = build_cell_list(pop, grid, 15.0)
    order = be.asnumpy(cl.order)
    assert sorted(order.tolist()) == list(range(500))
    start, end = be.asnumpy(cl.bin_start), be.asnumpy(cl.bin_end)
    for b in np.flatnonzero(end > start)[:50]:
        members = order[start[b] : end[b]]
        assert np.all(np.diff(members) > 0)
        ijk = np.clip(
            np.floor((pos[members] - np.float32(grid.origin)) / np.float32(15.0)).astype(int),
            0,
            np.array(cl.nb) - 1,
        )
        flat = (ijk[:, 2] * cl.nb[1] + ijk[:, 1]) * cl.nb[0] + ijk[:, 0]
        assert (flat == b).all()


def test_stale_or_narrow_cell_list_rejected(be):
    grid = GRIDS["2d"]
    pop, _, _ = _population(be, grid, 50, np.random.default_rng(4))
    cl = build_cell_list(pop, grid, 5.0)
    with pytest.raises(ValueError, match="width"):
        contacts(pop, 10.0, cell_list=cl)
    pop.add(be.xp.zeros((1, 3)), 0)
    with pytest.raises(ValueError, match="stale"):
        contacts(pop, 5.0, cell_list=cl)


def test_pair_buffer_overflow_flagged_and_grown(be):
    grid = GRIDS["2d"]
    pop, _pos, _types = _population(be, grid, 400, np.random.default_rng(5))
    full = contacts(pop, 30.0, grid=grid)
    pop.pair_capacity = full.n // 3
    pr = contacts(pop, 30.0, grid=grid, exact=False)
    assert int(pr.n_device) == full.n
    assert pop.check_flags() & FLAG_PAIR_OVERFLOW
    # the buffer holds the first pairs in order, the rest is -1
    m = full.n // 3
    np.testing.assert_array_equal(be.asnumpy(pr.i), be.asnumpy(full.i)[:m])
    assert pop.pair_capacity >= 2 * full.n
    pr = contacts(pop, 30.0, grid=grid, exact=False)
    assert pop.check_flags() == 0
    i = be.asnumpy(pr.i)
    np.testing.assert_array_equal(i[: full.n], be.asnumpy(full.i))
    assert (i[full.n :] == -1).all()


def test_crowding_pushes_overlaps_apart_symmetrically(be):
    grid = Grid((1, 10, 10), dx=10.0)
    pos = np.array([[50, 50, 5], [56, 50, 5], [80, 80, 5], [80, 80, 5], [20, 20, 5]], dtype=np.float32)
    pop = Population(be)
    pop.add(be.asarray(pos), be.asarray([0, 0, 0, 1, 1]))
    cl = build_cell_list(pop, grid, 10.0)
    d = be.asnumpy(
        crowd_displacement(pop, cl, np.array([5.0, 5.0], np.float32), np.array([0.5, 1.5], np.float32), 1.0)
    )
    # pair 0-1: overlap 4 um, k dt = 0.5 -> each moves 0.5 * 4 / 2 = 1 um apart along x
    np.testing.assert_allclose(d[0], [-1, 0, 0], atol=1e-6)
    np.testing.assert_allclose(d[1], [1, 0, 0], atol=1e-6)
    # coincident 2-3 (k mean 1 -> fraction 1): split along x, lower id to -x, by R/2 = 5 um each
    np.testing.assert_allclose(d[2], [-5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(d[3], [5, 0, 0], atol=1e-6)
    np.testing.assert_allclose(d[4], 0)


def test_crowding_ignores_types_without_parameters(be):
    """A type past the tables does not crowd (move flags it), and nothing reads past the tables."""
    grid = Grid((1, 10, 10), dx=10.0)
    pos = np.array([[50, 50, 5], [56, 50, 5], [53, 50, 5]], dtype=np.float32)
    pop = Population(be)
    pop.add(be.asarray(pos), be.asarray([0, 0, 9]))
    cl = build_cell_list(pop, grid, 10.0)
    d = be.asnumpy(crowd_displacement(pop, cl, np.array([5.0], np.float32), np.array([0.5], np.float32), 1.0))
    np.testing.assert_allclose(d, [[-1, 0, 0], [1, 0, 0], [0, 0, 0]], atol=1e-6)


def _claim_brute(pos, ids, pi, pj, n, src_ok, tgt_ok, rounds):
    """Plain-Python reference of the documented rule."""
    target_of = [-1] * n
    taken_by = [-1] * n
    src_ok = list(src_ok)
    for _ in range(rounds):
        best = {}
        for i, j in zip(pi, pj):
            if i < 0 or not src_ok[i] or not tgt_ok[j] or taken_by[j] >= 0:
                continue
            d = pos[i] - pos[j]
            r2 = np.float32(d[0] * d[0] + d[1] * d[1] + d[2] * d[2])
            key = (r2, j)
            if i not in best or key < best[i]:
                best[i] = key
        claim = {}
        for i, (_, j) in best.items():
            if j not in claim or ids[i] < ids[claim[j]]:
                claim[j] = i
        for j, i in claim.items():
            target_of[i], taken_by[j] = j, i
            src_ok[i] = False
    return np.array(target_of), np.array(taken_by)


@pytest.mark.parametrize("rounds", [1, 3])
def test_claim_lowest_id_wins_each_target_once(be, rounds):
    grid = GRIDS["2d"]
    rs = np.random.default_rng(6)
    pop, pos, types = _population(be, grid, 300, rs, ntypes=2)
    pr = contacts(pop, 25.0, [0], [1], grid=grid)
    src_ok = rs.random(300) < 0.9
    tgt_ok = rs.random(300) < 0.9
    tof, tby = claim_targets(pop, pr, be.asarray(src_ok), be.asarray(tgt_ok), rounds=rounds)
    tof, tby = be.asnumpy(tof), be.asnumpy(tby)
    ids = be.asnumpy(pop.view("id"))
    e_tof, e_tby = _claim_brute(pos, ids, be.asnumpy(pr.i), be.asnumpy(pr.j), 300, src_ok, tgt_ok, rounds)
    np.testing.assert_array_equal(tof, e_tof)
    np.testing.assert_array_equal(tby, e_tby)
    won = np.flatnonzero(tof >= 0)
    assert len(set(tof[won].tolist())) == won.size, "a target taken twice"
    assert won.size > 10 and (types[won] == 0).all() and (types[tof[won]] == 1).all()
    # determinism: the same call gives the same answer; permuting the pair list does too
    perm = rs.permutation(pr.n)
    again = claim_targets(
        pop,
        Pairs(pr.i[be.asarray(perm)], pr.j[be.asarray(perm)], pr.n),
        be.asarray(src_ok),
        be.asarray(tgt_ok),
        rounds=rounds,
    )
    np.testing.assert_array_equal(be.asnumpy(again[0]), tof)


def test_claim_contested_target_goes_to_lowest_id(be):
    # three sources at the same distance from one target: the lowest id (row 0) must win,
    # whatever the order of the pairs
    pos = np.array([[10, 0, 0], [-10, 0, 0], [0, 10, 0], [0, 0, 0]], dtype=np.float32)
    pop = Population(be)
    pop.add(be.asarray(pos), be.asarray([0, 0, 0, 1]))
    for order in ([2, 1, 0], [0, 1, 2], [1, 2, 0]):
        pr = Pairs(be.asarray(np.array(order, np.int32)), be.asarray(np.full(3, 3, np.int32)), 3)
        tof, tby = claim_targets(pop, pr)
        assert be.asnumpy(tof).tolist() == [3, -1, -1, -1]
        assert be.asnumpy(tby).tolist() == [-1, -1, -1, 0]


def test_a_held_cell_list_keeps_its_tables_when_others_are_built(be):
    """NumPy lists take their bin-grid tables from a pool that hands a buffer to the next list
    once no list holds it: a list kept while others (same grid, same width, other cells) are
    built and queried must still give its own pairs."""
    grid = GRIDS["3d"]
    pop_a, pos_a, types_a = _population(be, grid, 400, np.random.default_rng(11))
    pop_b, _, _ = _population(be, grid, 250, np.random.default_rng(12))
    want = _brute(pos_a, types_a, 12.0, [0, 1, 2], [0, 1, 2])
    held = build_cell_list(pop_a, grid, 12.0)
    for _ in range(3):  # other lists come, are queried and go before the held one is used
        other = build_cell_list(pop_b, grid, 12.0)
        contacts(pop_b, 12.0, [0, 1, 2], [0, 1, 2], cell_list=other)
        del other
    pr = contacts(pop_a, 12.0, [0, 1, 2], [0, 1, 2], cell_list=held)
    got = set(zip(be.asnumpy(pr.i).tolist(), be.asnumpy(pr.j).tolist()))
    assert got == want
    start, end = be.asnumpy(held.bin_start), be.asnumpy(held.bin_end)
    assert int((end - start).sum()) == 400


@pytest.mark.parametrize("gname", ["2d", "3d"])
def test_pair_search_in_blocks_equals_one_expansion(gname, monkeypatch):
    """The NumPy pair search expands PAIR_BLOCK sources at a time and keeps only the pairs within
    the list's reach (its memory stays bounded). With blocks of 13 sources, contacts (every cell
    a source; a fifth of them, which takes the per-source path) and crowding give the same pairs
    in the same order and the same displacements, bit for bit, as one expansion of all
    candidates; a query reaching past the list's width is refused rather than answered short."""
    from tissuesim.agents import neighbours as nb
    from tissuesim.backend import NUMPY

    grid = GRIDS[gname]
    pop, pos, types = _population(NUMPY, grid, 900, np.random.default_rng(11), ntypes=5)

    def search():
        out = []
        for radius, width, src, tgt in [
            (12.0, 12.0, None, None),
            (7.5, 20.0, [1], [0, 2]),
            (25.0, 25.0, [2], [2]),
        ]:
            cl = build_cell_list(pop, grid, width)
            pr = contacts(pop, radius, src, tgt, cell_list=cl)
            out.append((pr.i.tobytes(), pr.j.tobytes()))
            if src is not None:
                assert set(zip(pr.i.tolist(), pr.j.tolist())) == _brute(pos, types, radius, src, tgt)
        # on one list, queries of decreasing reach (the later ones filter the pairs the first
        # kept); on another, of increasing reach (each finds its farther pairs)
        for radii in ((25.0, 12.0, 3.0), (3.0, 12.0, 25.0)):
            cl = build_cell_list(pop, grid, 25.0)
            for radius in radii:
                pr = contacts(pop, radius, [0, 1, 2], [0, 1, 2, 3, 4], cell_list=cl)
                assert set(zip(pr.i.tolist(), pr.j.tolist())) == _brute(
                    pos, types, radius, [0, 1, 2], range(5)
                )
                out.append((pr.i.tobytes(), pr.j.tobytes()))
        # crowding (reach 12) on the last list, whose cached pairs reach 25
        radius = np.array([6.0, 4.0, 5.0, 0.0, 3.0], np.float32)
        stiff = np.array([1.0, 0.5, 0.7, 0.0, 2.0], np.float32)
        out.append(crowd_displacement(pop, cl, radius, stiff, 0.7).tobytes())
        fresh = crowd_displacement(pop, build_cell_list(pop, grid, 12.0), radius, stiff, 0.7)
        assert fresh.tobytes() == out[-1]
        return out

    monkeypatch.setattr(nb, "PAIR_BLOCK", 13)
    blocked = search()
    monkeypatch.setattr(nb, "PAIR_BLOCK", 1 << 30)
    assert search() == blocked
    cl = build_cell_list(pop, grid, 12.0)
    with pytest.raises(ValueError, match="beyond the cell list's width"):
        nb._candidates_for(cl, pop.position, None, np.float32(13.0 * 13.0))


def test_pairs_exactly_at_the_reach_are_not_neighbours(be):
    """Contacts are |x_i - x_j| < radius and crowding needs overlap: cells exactly one radius
    (12 um, exact in float32) apart are not in contact, on a list exactly as wide as the radius;
    1/64 um closer, they are. A crowding query on a list narrower than twice its largest radius
    is refused (on both backends), as contacts refuse a list narrower than their radius."""
    grid = Grid((1, 4, 6), dx=10.0)
    pos = np.array([[5.0, 5.0, 5.0], [17.0, 5.0, 5.0], [5.0, 25.0, 5.0], [16.984375, 25.0, 5.0]], np.float32)
    pop = Population(be, capacity=8)
    pop.add(be.asarray(pos), be.asarray(np.zeros(4, np.uint8)))
    pr = contacts(pop, 12.0, [0], [0], cell_list=build_cell_list(pop, grid, 12.0))
    got = set(zip(be.asnumpy(pr.i).tolist(), be.asnumpy(pr.j).tolist()))
    assert got == {(2, 3), (3, 2)}
    r = np.array([6.0], np.float32)
    with pytest.raises(ValueError, match="crowding radius"):
        crowd_displacement(pop, build_cell_list(pop, grid, 11.9), r, np.array([1.0], np.float32), 1.0)
