"""Tissue rules, vectorised over all cells (array module ``xp``: numpy or cupy, same code).

Each function is written with whole-array operations only (no per-cell Python loops), so it maps
one-to-one onto a kernel later; on the GPU these expressions already run as CuPy element-wise
kernels. Random numbers come from agents.rng keyed by (seed, cell id, step, purpose).

Cell states (Population.state, uint8): 0 resting, 1 activated (B cells, macrophages).
Per-cell attributes registered by the immunology layer (float32 unless noted):
``busy_until`` (min, end of the current contact), ``last_kill`` (min, time of the last kill, for
antigen-driven proliferation), ``kills`` (int32, accumulated kills, for exhaustion).
"""

from __future__ import annotations

import math

import numpy as np

from tissuesim.agents import rng
from tissuesim.agents.neighbours import Pairs, claim_targets

PURPOSE_FATE = rng.PURPOSE_USER  # death, division, state change: one Philox block per cell
PURPOSE_KILL = rng.PURPOSE_USER + 1

RESTING = 0
ACTIVATED = 1


def prob(rate_per_min, dt_min: float, xp=np):
    """Probability of at least one event of a Poisson process of ``rate`` (1/min) within dt."""
    return -xp.expm1(-xp.asarray(rate_per_min, dtype=np.float64) * dt_min)


def contact_kills(
    pop,
    pairs: Pairs,
    can_kill,
    kill_p,
    now_min: float,
    handling_min: float,
    exhaustion_kills: float,
    step: int,
    seed: int,
):
    """Contact killing by antigen: claim, engage for the handling time, kill with probability p.

    pairs : contacts (i source row, j target row) within the contact radius.
    can_kill : bool (ntypes, ntypes) host table; kill_p : float64 (ntypes,) per contact.
    Free killers (now >= busy_until) claim the nearest compatible target (agents.claim_targets,
    lowest id wins); each claimed contact engages the killer for ``handling_min`` and kills with
    probability kill_p x exp(-kills / exhaustion_kills). Updates busy_until, kills, last_kill in
    place. Returns (dead: bool (n,) targets killed, engaged_rows: int64 rows that engaged now).
    """
    xp = pop.xp
    n = pop.n
    dead = xp.zeros(n, dtype=bool)
    if n == 0 or pairs.i.shape[0] == 0:
        return dead, xp.zeros(0, dtype=np.int64)
    t = pop.type[:n].astype(np.int64)
    ck = xp.asarray(can_kill)
    i = xp.asarray(pairs.i).astype(np.int64)
    j = xp.asarray(pairs.j).astype(np.int64)
    v = (i >= 0) & (j >= 0)
    i, j = i[v], j[v]
    ok = ck[t[i], t[j]]
    i, j = i[ok], j[ok]
    busy = pop["busy_until"][:n]
    free = busy <= np.float32(now_min)
    target_of, _ = claim_targets(
        pop, Pairs(i.astype(np.int32), j.astype(np.int32), int(i.shape[0])), source_ok=free
    )
    s = xp.flatnonzero(target_of >= 0)
    if s.shape[0] == 0:
        return dead, s
    tgt = target_of[s].astype(np.int64)
    kills = pop["kills"]
    p = xp.asarray(kill_p)[t[s]] * xp.exp(-kills[s].astype(np.float64) / exhaustion_kills)
    u = rng.uniform(rng.draw(pop.id[s], step, PURPOSE_KILL, 0, seed, xp=xp)[0], xp)
    hit = u < p
    busy[s] = np.float32(now_min + handling_min)
    kills[s] += hit.astype(np.int32)
    pop["last_kill"][s] = xp.where(hit, np.float32(now_min), pop["last_kill"][s])
    dead[tgt[hit]] = True
    return dead, s


def sample_field(values, vox):
    """Field values at the cells' voxels: values (nz, ny, nx), vox int64 (n,) flat indices."""
    return values.reshape(-1)[vox]


def cell_fates(
    pop,
    u,
    dt_min: float,
    now_min: float,
    death_per_min,
    idx: dict,
    rates: dict,
    ifng_at,
    damage_at,
    rtx_hazard_per_min: float,
    cd20,
    car_mask,
):
    """Deaths, divisions and state changes of all live cells from four uniforms per cell.

    u : four float32 (n,) uniforms (Philox words of PURPOSE_FATE): u[0] death, u[1] division,
    u[2] state change. idx : type indices {'b_cell', 'plasmablast', 'plasma_cell',
    'macrophage'}; rates : per-minute rates (see Immunology). ifng_at, damage_at : (n,) field
    values at each cell (nM, rel). rtx_hazard_per_min : rituximab killing of CD20+ cells in
    tissue (1/min); cd20 : bool (ntypes,) CD20+ types; car_mask : bool (ntypes,) CAR types.
    Returns (dead bool (n,), divide bool (n,)); type and state change in place.
    """
    xp = pop.xp
    n = pop.n
    t = pop.type[:n].astype(np.int64)
    st = pop.state[:n]
    hazard = xp.asarray(death_per_min)[t] + xp.asarray(cd20)[t] * rtx_hazard_per_min
    dead = u[0] < prob(hazard, dt_min, xp)

    is_b = t == idx["b_cell"]
    is_car = xp.asarray(car_mask)[t]
    act = st == ACTIVATED
    div_rate = xp.zeros(n, dtype=np.float64)
    div_rate = xp.where(is_b, xp.where(act, rates["b_div_act"], rates["b_div"]), div_rate)
    stimulated = (np.float32(now_min) - pop["last_kill"][:n]) < rates["stim_window"]
    div_rate = xp.where(is_car & stimulated, rates["car_div"], div_rate)
    divide = (u[1] < prob(div_rate, dt_min, xp)) & ~dead

    # State changes (one draw: the states are exclusive, so one uniform decides each cell).
    is_pb = t == idx["plasmablast"]
    is_mac = t == idx["macrophage"]
    r_state = xp.zeros(n, dtype=np.float64)
    r_state = xp.where(is_b & ~act, rates["b_act"] * damage_at, r_state)
    r_state = xp.where(is_b & act, rates["pb_diff"], r_state)
    r_state = xp.where(is_pb, rates["pc_diff"], r_state)
    mac_on = rates["mac_ifng"] * ifng_at / (ifng_at + rates["mac_kd"]) + rates["mac_damage"] * damage_at
    r_state = xp.where(is_mac & ~act, mac_on, r_state)
    r_state = xp.where(is_mac & act, rates["mac_off"], r_state)
    change = (u[2] < prob(r_state, dt_min, xp)) & ~dead & ~divide
    # B: resting -> activated; activated -> plasmablast; plasmablast -> plasma cell
    to_pb = change & is_b & act
    to_pc = change & is_pb
    b_on = change & is_b & ~act
    pop.type[:n] = xp.where(to_pb, np.uint8(idx["plasmablast"]), pop.type[:n])
    pop.type[:n] = xp.where(to_pc, np.uint8(idx["plasma_cell"]), pop.type[:n])
    new_state = xp.where(b_on | (change & is_mac & ~act), np.uint8(ACTIVATED), st)
    new_state = xp.where(to_pb | to_pc | (change & is_mac & act), np.uint8(RESTING), new_state)
    pop.state[:n] = new_state
    return dead, divide


def count_per_voxel(vox, mask, nvox: int, xp=np):
    """Integer count of the cells in ``mask`` per voxel, float32 (nvox,).

    Counting with an integer bincount, then scaling, keeps the sources free of order-dependent
    float atomics (DESIGN.md section 3).
    """
    return xp.bincount(vox[mask], minlength=nvox)[:nvox].astype(np.float32)


def ln2_over(x: float) -> float:
    return math.log(2.0) / x
