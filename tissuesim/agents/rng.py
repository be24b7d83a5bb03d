"""Philox4x32-10 counter-based random numbers, bit-exact twin of kernels/philox.cuh.

Every draw is a pure function of (seed, cell id, step, purpose, draw index)::

    counter = (id & 0xffffffff, id >> 32, step, purpose << 16 | draw)
    key     = (seed & 0xffffffff, seed >> 32)

so a run gives the same numbers whatever the thread count, scheduling or memory order of the
cells, and a restart from a checkpoint continues the same streams. The functions here are written
against an array module ``xp`` (numpy or cupy) with vectorised uint32/uint64 arithmetic, so the
same code also runs on the GPU where no custom kernel is needed (e.g. placing new cells).

Reference: J. K. Salmon, M. A. Moraes, R. O. Dror, D. E. Shaw, "Parallel random numbers: as
easy as 1, 2, 3", SC'11 (2011), doi:10.1145/2063384.2063405.
"""

from __future__ import annotations

import math
import sys

import numpy as np

M0 = 0xD2511F53
M1 = 0xCD9E8D57
W0 = 0x9E3779B9
W1 = 0xBB67AE85
_MASK32 = 0xFFFFFFFF

#: purposes (the high 16 bits of counter word 3); one per kind of decision so streams never overlap
PURPOSE_MOVE = 1
PURPOSE_EXTRAVASATE = 2
PURPOSE_INTRAVASATE = 3
PURPOSE_POISSON = 4
PURPOSE_CLAIM = 5
PURPOSE_USER = 64  # first purpose free for the biology layer


def philox4x32_10(c0, c1, c2, c3, k0, k1, xp=np):
    """Philox4x32-10 block function.

    c0..c3 : uint32 arrays (broadcastable) of counter words; k0, k1 : key words (uint32 arrays or
    Python ints). Returns four uint32 arrays. uint32 x uint32 products are formed in uint64, so
    the high and low halves are exact on numpy and cupy alike.
    """
    u32, u64 = xp.uint32, xp.uint64
    c0, c1, c2, c3 = (xp.asarray(c, dtype=u32) for c in (c0, c1, c2, c3))
    m0, m1 = u64(M0), u64(M1)
    sh = u64(32)
    scalar_key = isinstance(k0, (int, np.integer)) and isinstance(k1, (int, np.integer))
    for r in range(10):
        # Key schedule k + r W (mod 2^32); Python ints keep numpy from warning about wrap-around.
        if scalar_key:
            kr0 = u32((int(k0) + r * W0) & _MASK32)
            kr1 = u32((int(k1) + r * W1) & _MASK32)
        else:
            kr0 = (xp.asarray(k0, dtype=u64) + u64(r * W0)).astype(u32)
            kr1 = (xp.asarray(k1, dtype=u64) + u64(r * W1)).astype(u32)
        # uint32 words, products in uint64 (exact): high half p >> 32, low half the truncation
        p0 = m0 * c0.astype(u64)
        p1 = m1 * c2.astype(u64)
        c0, c1, c2, c3 = (
            (p1 >> sh).astype(u32) ^ c1 ^ kr0,
            p1.astype(u32),
            (p0 >> sh).astype(u32) ^ c3 ^ kr1,
            p0.astype(u32),
        )
    return c0, c1, c2, c3


def seed_key(seed: int) -> tuple[int, int]:
    """(k0, k1) key words of a 64-bit seed (negative seeds wrap modulo 2^64)."""
    s = int(seed) & 0xFFFFFFFFFFFFFFFF
    return s & _MASK32, s >> 32


def draw(ids, step: int, purpose: int, draw_index: int, seed: int, xp=np):
    """Four uint32 arrays for each id (int64 array) at (step, purpose, draw_index) under seed."""
    if xp is np:
        ids = np.asarray(ids, dtype=np.int64)
        if ids.ndim == 1:
            k0, k1 = seed_key(seed)
            c3 = ((int(purpose) << 16) | (int(draw_index) & 0xFFFF)) & _MASK32
            return _philox_ids_numpy(ids.view(np.uint64), int(step) & _MASK32, c3, k0, k1)
    ids = xp.asarray(ids, dtype=xp.int64)
    if ids.ndim == 1 and ids.size < 2**29:  # philox_fill indexes its (n, 4) output with an int
        return _draw_kernel(ids, step, purpose, draw_index, seed, xp)
    return draw_elementwise(ids, step, purpose, draw_index, seed, xp)


def draw_elementwise(ids, step: int, purpose: int, draw_index: int, seed: int, xp=np):
    """:func:`draw` as whole-array operations on ``xp`` (the reference form for any array module;
    on CuPy some 150 small kernels, which the fused kernel of :func:`draw` replaces)."""
    ids = xp.asarray(ids, dtype=xp.int64).view(xp.uint64)
    lo = (ids & xp.uint64(_MASK32)).astype(xp.uint32)
    hi = (ids >> xp.uint64(32)).astype(xp.uint32)
    c2 = xp.full(ids.shape, int(step) & _MASK32, dtype=xp.uint32)
    c3 = xp.full(ids.shape, ((int(purpose) << 16) | (int(draw_index) & 0xFFFF)) & _MASK32, dtype=xp.uint32)
    k0, k1 = seed_key(seed)
    return philox4x32_10(lo, hi, c2, c3, k0, k1, xp=xp)


def _launch_philox(kernel: str, ids, step: int, purpose: int, draw_index: int, seed: int, out) -> None:
    """Launch philox_fill or philox_uniform_fill (kernels/agents.cu): one thread per id of the
    contiguous int64 ``ids``, the Philox block (id, step, purpose, draw_index) under ``seed``."""
    from tissuesim.agents import _kernels as K
    from tissuesim.fields._device import backend_of

    n = int(ids.shape[0])
    k0, k1 = seed_key(seed)
    K.launch(
        backend_of(ids),
        kernel,
        n,
        (
            ids,
            np.int32(n),
            np.uint32(int(step) & _MASK32),
            np.uint32(int(purpose) & 0xFFFF),
            np.uint32(int(draw_index) & 0xFFFF),
            np.uint32(k0),
            np.uint32(k1),
            out,
        ),
    )


def _draw_kernel(ids, step: int, purpose: int, draw_index: int, seed: int, xp):
    """CuPy: :func:`draw` by the kernel philox_fill of kernels/agents.cu (one launch; the same bits
    as draw_elementwise, checked in tests/agents/test_philox.py). Returns four strided views
    of one (n, 4) uint32 array."""
    out = xp.empty((int(ids.shape[0]), 4), dtype=xp.uint32)
    _launch_philox("philox_fill", xp.ascontiguousarray(ids), step, purpose, draw_index, seed, out)
    return out[:, 0], out[:, 1], out[:, 2], out[:, 3]


def draw_uniform(ids, step: int, purpose: int, draw_index: int, seed: int, xp=np):
    """float32 (4, n): :func:`uniform` of the four words of :func:`draw`, one row per word.

    On CuPy one launch of the kernel philox_uniform_fill (the Philox block and the four
    uniforms; draw and four uniform() calls are some 20 small launches), bit for bit the same
    floats."""
    if xp is np or np.ndim(ids) != 1:
        return uniform(xp.stack(draw(ids, step, purpose, draw_index, seed, xp=xp)), xp)
    ids = xp.ascontiguousarray(xp.asarray(ids, dtype=xp.int64))
    n = int(ids.shape[0])
    if n > 2**31 - 4096:  # the kernel's int thread index must not overflow in its last block
        return uniform(xp.stack(draw(ids, step, purpose, draw_index, seed, xp=xp)), xp)
    out = xp.empty((4, n), dtype=xp.float32)
    _launch_philox("philox_uniform_fill", ids, step, purpose, draw_index, seed, out)
    return out


def draw_blocks(ids, step: int, purpose: int, draw_indices, seed: int):
    """NumPy only: :func:`draw` for several draw indices at once, bit for bit.

    Returns four uint32 arrays of shape (len(draw_indices), n): row b holds draw(ids, step,
    purpose, draw_indices[b], seed) (one pass of Philox rounds for all blocks).
    """
    ids = np.asarray(ids, dtype=np.int64).reshape(-1)
    nb = len(draw_indices)
    n = ids.shape[0]
    k0, k1 = seed_key(seed)
    c3 = np.array(
        [((int(purpose) << 16) | (int(d) & 0xFFFF)) & _MASK32 for d in draw_indices], dtype=np.uint32
    )
    u = np.broadcast_to(ids.view(np.uint64), (nb, n)).reshape(-1)
    x0, x1, x2, x3 = _philox_ids_numpy(u, int(step) & _MASK32, np.repeat(c3, n), k0, k1)
    return x0.reshape(nb, n), x1.reshape(nb, n), x2.reshape(nb, n), x3.reshape(nb, n)


_MCOL = np.array([[M0], [M1]], dtype=np.uint64)
_BIG_ENDIAN = sys.byteorder == "big"
_ROUND_KEYS: dict = {}


def _round_keys(k0: int, k1: int) -> np.ndarray:
    """uint32 (10, 2, 1) key schedule (k0 + r W0, k1 + r W1) mod 2^32 of rounds r, cached."""
    keys = _ROUND_KEYS.get((k0, k1))
    if keys is None:
        keys = np.array(
            [[(k0 + r * W0) & _MASK32, (k1 + r * W1) & _MASK32] for r in range(10)], dtype=np.uint32
        ).reshape(10, 2, 1)
        keys.flags.writeable = False
        if len(_ROUND_KEYS) >= 64:
            _ROUND_KEYS.clear()
        _ROUND_KEYS[(k0, k1)] = keys
    return keys


def _philox_ids_numpy(ids_u64, c2, c3, k0: int, k1: int):
    """Philox4x32-10 of the counters (lo(id), hi(id), c2, c3) on NumPy, bit for bit.

    ids_u64 : uint64 (n,); c2 : int (or uint32 (n,)); c3 : int or uint32 (n,). The two multiply
    lanes form one (2, n) array L = (c0, c2), R = (c1, c3); the products P = M L are uint64, and
    viewed as uint32 pairs (little-endian) their high and low halves are strided views, so a
    round is three array operations: P_r = M L_r; L_{r+1} = hi(P_r)' ^ lo(P_{r-1})' ^ k_r
    (' = lanes swapped), with lo(P_{-1}) = R. L is kept in uint64 (its low halves) so the
    products need no cast. Returns (c0, c1, c2, c3) after 10 rounds, contiguous uint32 (n,).
    """
    n = ids_u64.shape[0]
    keys = _round_keys(k0, k1)
    L = np.empty((2, n), dtype=np.uint64)
    np.bitwise_and(ids_u64, np.uint64(_MASK32), out=L[0])
    L[1] = c2
    R = np.empty((2, n), dtype=np.uint32)
    np.right_shift(ids_u64, np.uint64(32), out=R[0], casting="unsafe")
    R[1] = c3
    if _BIG_ENDIAN:  # no uint32 views of the halves: the plain formulation
        return _philox_rows_numpy(L[0].astype(np.uint32), R[0], L[1].astype(np.uint32), R[1], k0, k1)
    Lv = L.view(np.uint32)[:, 0::2]  # low halves of L (the high ones stay 0)
    P = np.empty((2, 2, n), dtype=np.uint64)  # products of this round and of the last
    # the strided halves of both product buffers, lanes swapped, made once rather than per round
    hv = [P[b].view(np.uint32) for b in (0, 1)]
    hi = [h[::-1, 1::2] for h in hv]
    lo_sw = [h[::-1, 0::2] for h in hv]
    xor, mul = np.bitwise_xor, np.multiply
    prev = R
    for r in range(9):
        b = r & 1
        mul(L, _MCOL, out=P[b])  # exact 64-bit products
        xor(hi[b], prev, out=Lv)  # high halves, lanes swapped
        xor(Lv, keys[r], out=Lv)
        prev = lo_sw[b]  # low halves, lanes swapped
    mul(L, _MCOL, out=P[1])  # round 9 (r & 1 == 1)
    out = np.empty((2, n), dtype=np.uint32)
    xor(hi[1], prev, out=out)
    xor(out, keys[9], out=out)
    lo = np.empty((2, n), dtype=np.uint32)
    np.copyto(lo, lo_sw[1])
    return out[0], lo[0], out[1], lo[1]


def _philox_rows_numpy(c0, c1, c2, c3, k0: int, k1: int):
    """philox4x32_10 for 1-D uint32 counter arrays and scalar keys on NumPy, bit for bit
    (the fallback of _philox_ids_numpy on big-endian hosts).

    The two multiply lanes are one (2, n) array: L = (c0, c2), R = (c1, c3), and a round is
    L' = hi(M L) reversed ^ R ^ k, R' = lo(M L) reversed (5 array operations instead of 14).
    """
    n = c0.shape[0]
    L = np.empty((2, n), dtype=np.uint32)
    L[0], L[1] = c0, c2
    R = np.empty((2, n), dtype=np.uint32)
    R[0], R[1] = c1, c3
    keys = _round_keys(k0, k1)
    P = np.empty((2, n), dtype=np.uint64)
    H = np.empty((2, n), dtype=np.uint32)
    lo = np.empty((2, n), dtype=np.uint32)
    for r in range(10):
        np.multiply(L, _MCOL, out=P, dtype=np.uint64)  # exact 64-bit products
        np.right_shift(P, np.uint64(32), out=H, casting="unsafe")  # high halves
        np.bitwise_xor(H[::-1], R, out=L)
        L ^= keys[r]
        np.copyto(lo, P, casting="unsafe")  # low halves (truncation)
        R, lo = lo[::-1], (R if R.base is None else R.base)
    return L[0], np.ascontiguousarray(R[0]), L[1], np.ascontiguousarray(R[1])


def uniform(x, xp=np):
    """float32 uniform in (0, 1) from uint32: (2 (x >> 9) + 1) 2^-24, exact in float32."""
    if xp is np:  # (2 (x >> 9) + 1) == (x >> 8) | 1; < 2^24, so the cast and product are exact
        u = np.right_shift(np.asarray(x, dtype=np.uint32), np.uint32(8))
        u |= np.uint32(1)
        return np.multiply(u, np.float32(2.0**-24), dtype=np.float32, casting="unsafe")
    x = xp.asarray(x, dtype=xp.uint32)
    return ((x >> xp.uint32(9)) * xp.uint32(2) + xp.uint32(1)).astype(xp.float32) * xp.float32(2.0**-24)


def box_muller(a, b, xp=np):
    """Two float32 standard normals from two uint32 arrays (same formula as the CUDA side)."""
    u1 = uniform(a, xp)
    u2 = uniform(b, xp)
    r = xp.sqrt(xp.float32(-2.0) * xp.log(u1))
    th = xp.float32(6.2831855) * u2
    return r * xp.cos(th), r * xp.sin(th)


def uniform53(a, b) -> np.ndarray:
    """float64 uniform in (0, 1) from two uint32 host arrays (53 random bits)."""
    a = np.asarray(a, dtype=np.uint64) >> np.uint64(5)
    b = np.asarray(b, dtype=np.uint64) >> np.uint64(6)
    return ((a * np.uint64(1 << 26) + b).astype(np.float64) + 0.5) * 2.0**-53


def poisson_host(lam: float, seed: int, step: int, stream: int) -> int:
    """Exact Poisson(lam) sample on the host from counter-based uniforms.

    Keyed by (seed, stream as the id word, step, PURPOSE_POISSON). lam is split into pieces of at
    most 32 (a sum of independent Poisson variables is Poisson of the summed mean); each piece is
    drawn by inversion of its CDF with a 53-bit uniform, so the result is exact and identical on
    every backend (the host does the work; no device sync is needed to know a birth count).
    """
    lam = float(lam)
    if not lam >= 0 or not math.isfinite(lam):
        raise ValueError(f"Poisson mean must be finite and >= 0, got {lam}")
    if lam == 0:
        return 0
    n_pieces = math.ceil(lam / 32.0)
    if n_pieces > 0xFFFF:
        raise ValueError(f"Poisson mean {lam} too large for the counter layout (max {32 * 0xFFFF})")
    piece = lam / n_pieces
    idx = np.full(n_pieces, int(stream), dtype=np.int64)
    total = 0
    # One Philox block per piece: draw index = piece number.
    c0 = (idx.view(np.uint64) & np.uint64(_MASK32)).astype(np.uint32)
    c1 = (idx.view(np.uint64) >> np.uint64(32)).astype(np.uint32)
    c2 = np.full(n_pieces, int(step) & _MASK32, dtype=np.uint32)
    c3 = ((PURPOSE_POISSON << 16) | np.arange(n_pieces, dtype=np.uint32)).astype(np.uint32)
    k0, k1 = seed_key(seed)
    x0, x1, _, _ = philox4x32_10(c0, c1, c2, c3, k0, k1)
    u = uniform53(x0, x1)
    # Inversion: smallest k with CDF(k) >= u; the pmf recursion is stable for means <= 32.
    kmax = int(piece + 20 * math.sqrt(piece) + 40)
    k = np.arange(kmax + 1)
    logpmf = -piece + k * math.log(piece) - np.array([math.lgamma(i + 1) for i in k])
    cdf = np.cumsum(np.exp(logpmf))
    total = int(np.searchsorted(cdf, u, side="left").clip(0, kmax).sum())
    return total
