// Cell-agent kernels of tissuesim.agents (NumPy twins side by side in tissuesim/agents/*.py:
// rng.py, neighbours.py, motility.py). One thread per cell; every kernel is a gather, so results
// do not depend on thread scheduling: no float atomics anywhere, integer atomicMin/atomicOr only
// (commutative, hence deterministic).
//
// Conventions: positions float32 [n][3] as (x, y, z) um; grids C-ordered [z][y][x]; the cell list
// holds `order` (cell indices sorted by (bin, index)) and bin_start/bin_end (int32, one per bin,
// bins C-ordered [bz][by][bx]); type masks are uint32 bit sets over cell types (type < 32).
// Compiled with --fmad=false so the float arithmetic rounds as NumPy's does.
#include "philox.cuh"

typedef long long i64;

#define FLAG_PAIR_OVERFLOW 1u
#define FLAG_DISPLACEMENT_CAPPED 2u
#define FLAG_IN_CLOSED_VOXEL 4u
#define FLAG_BAD_TYPE 8u

#define PURPOSE_MOVE 1u

// Number of per-type motility parameters in `tp` (see motility.py: _type_table).
#define NTP 9
// An axis move is split into at most this many substeps (|d| <= 64 max_disp, else capped).
#define MAX_SUBSTEPS 64
// tp[t*NTP + ...]: 0 a = exp(-dt/P), 1 sd_v, 2 c_xv, 3 sd_x, 4 P(1-a), 5 chi (um^2/min),
// 6 K (field units), 7 drift cap (um/min), 8 unused

__device__ __forceinline__ int clampi(int v, int lo, int hi) { return v < lo ? lo : (v > hi ? hi : v); }

// Voxel (i, j, k) of a position, clipped into the grid (as Grid.voxel_index).
__device__ __forceinline__ void voxel_of(float x, float y, float z, float ox, float oy, float oz, float dx,
                                         int nx, int ny, int nz, int* i, int* j, int* k) {
    *i = clampi((int)floorf((x - ox) / dx), 0, nx - 1);
    *j = clampi((int)floorf((y - oy) / dx), 0, ny - 1);
    *k = clampi((int)floorf((z - oz) / dx), 0, nz - 1);
}

// Bin coordinate of a position, clipped.
__device__ __forceinline__ int bin_coord(float x, float o, float w, int nb) {
    return clampi((int)floorf((x - o) / w), 0, nb - 1);
}

// ---------------------------------------------------------------------------------------------
// Cell list: key = bin * n + index (unique, so any sort gives the same order).
extern "C" __global__ void bin_keys(const float* __restrict__ pos, int n, float ox, float oy, float oz, float w,
                                    int nbx, int nby, int nbz, i64* __restrict__ key) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 p = 3 * (i64)i;  // 64-bit: 3 n passes 2^31 from 716 M cells on
    int bx = bin_coord(pos[p], ox, w, nbx);
    int by = bin_coord(pos[p + 1], oy, w, nby);
    int bz = bin_coord(pos[p + 2], oz, w, nbz);
    i64 b = ((i64)bz * nby + by) * nbx + bx;
    key[i] = b * (i64)n + i;
}

// Row range [start, end) of every bin (one thread per bin) from the keys bin * n + index and their
// ascending order (argsort of key, int64): start = the cells in bins < b, end = those in bins <= b,
// two binary searches over key[order[m]] (neighbours.bin_ranges_of_keys; twin: searchsorted of the
// sorted bins, bin_ranges). An empty bin gets start = end.
extern "C" __global__ void bin_ranges_fill(const i64* __restrict__ key, const i64* __restrict__ order, int n,
                                           i64 nbins, int* __restrict__ start, int* __restrict__ end) {
    i64 b = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (b >= nbins) return;
    int out[2];
    for (int s = 0; s < 2; ++s) {
        const i64 bound = (b + s) * (i64)n;  // first key of bin b (s = 0) or b + 1 (s = 1)
        int lo = 0, hi = n;
        while (lo < hi) {
            const int mid = lo + (hi - lo) / 2;
            if (key[order[mid]] < bound) lo = mid + 1;
            else hi = mid;
        }
        out[s] = lo;
    }
    start[b] = out[0];
    end[b] = out[1];
}

// Flat voxel index (k ny + j) nx + i of each position (Grid.voxel_index on CuPy; twin: its NumPy
// form): per axis floor((x - origin) / dx) in float32, clipped to [0, n - 1] before the conversion
// to an integer (NaN goes to 0, as NumPy's conversion and clip give on x86).
__device__ __forceinline__ i64 voxel_coord(float c, int n) {
    const float f = floorf(c);
    if (!(f >= 0.0f)) return 0;
    if (f >= (float)(n - 1)) return n - 1;
    return (i64)f;
}

extern "C" __global__ void voxel_index_fill(const float* __restrict__ pos, int n, float ox, float oy, float oz,
                                            float dx, int nx, int ny, int nz, i64* __restrict__ out) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= n) return;
    const i64 p = 3 * (i64)r;
    const i64 i = voxel_coord((pos[p] - ox) / dx, nx);
    const i64 j = voxel_coord((pos[p + 1] - oy) / dx, ny);
    const i64 k = voxel_coord((pos[p + 2] - oz) / dx, nz);
    out[r] = (k * ny + j) * nx + i;
}

// ---------------------------------------------------------------------------------------------
// The one neighbour traversal: every other cell j in the 3x3x3 bins around (xi, yi, zi), bins in
// (dz, dy, dx) lexicographic order from -1, inside a bin in cell-list order. Contacts and crowding
// both sum in this fixed order, which makes their results independent of thread scheduling.
template <class Visit>
__device__ __forceinline__ void for_each_neighbour(int i, float xi, float yi, float zi, const int* __restrict__ order,
                                                   const int* __restrict__ bstart, const int* __restrict__ bend,
                                                   float ox, float oy, float oz, float w, int nbx, int nby, int nbz,
                                                   Visit&& visit) {
    int bx = bin_coord(xi, ox, w, nbx), by = bin_coord(yi, oy, w, nby), bz = bin_coord(zi, oz, w, nbz);
    for (int dz = -1; dz <= 1; ++dz) {
        int cz = bz + dz;
        if (cz < 0 || cz >= nbz) continue;
        for (int dy = -1; dy <= 1; ++dy) {
            int cy = by + dy;
            if (cy < 0 || cy >= nby) continue;
            for (int dx = -1; dx <= 1; ++dx) {
                int cx = bx + dx;
                if (cx < 0 || cx >= nbx) continue;
                int b = (cz * nby + cy) * nbx + cx;
                for (int s = bstart[b]; s < bend[b]; ++s) {
                    int j = order[s];
                    if (j != i) visit(j);
                }
            }
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Contacts. Pairs (i, j), i != j, |x_i - x_j| < radius, type_i in src_mask, type_j in tgt_mask.
// Order: i ascending; for each i the neighbour bins in (dz, dy, dx) lexicographic order from -1;
// inside a bin j ascending. Pass 1 counts, an exclusive scan gives offsets, pass 2 writes.
__device__ __forceinline__ int visit_pairs(int i, const float* __restrict__ pos, const unsigned char* __restrict__ type,
                                           const int* __restrict__ order, const int* __restrict__ bstart,
                                           const int* __restrict__ bend, float ox, float oy, float oz, float w,
                                           int nbx, int nby, int nbz, float r2max, unsigned int tgt_mask,
                                           i64 out_off, i64 cap, int* __restrict__ pi, int* __restrict__ pj,
                                           unsigned int* flags) {
    float xi = pos[3 * i], yi = pos[3 * i + 1], zi = pos[3 * i + 2];
    int count = 0;
    for_each_neighbour(i, xi, yi, zi, order, bstart, bend, ox, oy, oz, w, nbx, nby, nbz, [&](int j) {
        if (type[j] >= 32 || !((tgt_mask >> type[j]) & 1u)) return;
        float ddx = pos[3 * j] - xi, ddy = pos[3 * j + 1] - yi, ddz = pos[3 * j + 2] - zi;
        float r2 = ddx * ddx + ddy * ddy + ddz * ddz;
        if (r2 < r2max) {
            if (pi != nullptr) {
                i64 o = out_off + count;
                if (o < cap) {
                    pi[o] = i;
                    pj[o] = j;
                } else {
                    atomicOr(flags, FLAG_PAIR_OVERFLOW);
                }
            }
            ++count;
        }
    });
    return count;
}

extern "C" __global__ void count_pairs(const float* __restrict__ pos, const unsigned char* __restrict__ type,
                                       const int* __restrict__ order, const int* __restrict__ bstart,
                                       const int* __restrict__ bend, int n, float ox, float oy, float oz, float w,
                                       int nbx, int nby, int nbz, float r2max, unsigned int src_mask,
                                       unsigned int tgt_mask, i64* __restrict__ counts) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (type[i] >= 32 || !((src_mask >> type[i]) & 1u)) {
        counts[i] = 0;
        return;
    }
    counts[i] = visit_pairs(i, pos, type, order, bstart, bend, ox, oy, oz, w, nbx, nby, nbz, r2max, tgt_mask, 0, 0,
                            nullptr, nullptr, nullptr);
}

// offsets: exclusive prefix sum of counts (int64, n). Entries past `cap` are dropped and flagged.
extern "C" __global__ void write_pairs(const float* __restrict__ pos, const unsigned char* __restrict__ type,
                                       const int* __restrict__ order, const int* __restrict__ bstart,
                                       const int* __restrict__ bend, int n, float ox, float oy, float oz, float w,
                                       int nbx, int nby, int nbz, float r2max, unsigned int src_mask,
                                       unsigned int tgt_mask, const i64* __restrict__ offsets, i64 cap,
                                       int* __restrict__ pi, int* __restrict__ pj, unsigned int* flags) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    if (type[i] >= 32 || !((src_mask >> type[i]) & 1u)) return;
    visit_pairs(i, pos, type, order, bstart, bend, ox, oy, oz, w, nbx, nby, nbz, r2max, tgt_mask, offsets[i], cap,
                pi, pj, flags);
}

// ---------------------------------------------------------------------------------------------
// Crowding: displacement of cell i (um, over one step of dt) pushing it out of every overlap,
//   d_i = sum_j min(1, k_ij dt) * (R_ij - r_ij) / 2 * (x_i - x_j) / r_ij,   r_ij < R_ij = R_i + R_j,
// k_ij = (k_i + k_j) / 2 (1/min). Each cell of an overlapping pair moves half the overlap (times
// the relaxation fraction), so a resolved pair ends just touching. Coincident cells are split
// along x, the lower id going to -x. Summation order is the fixed pair order of visit_pairs.
extern "C" __global__ void crowd_displacement(const float* __restrict__ pos, const unsigned char* __restrict__ type,
                                              const i64* __restrict__ id, const int* __restrict__ order,
                                              const int* __restrict__ bstart, const int* __restrict__ bend, int n,
                                              float ox, float oy, float oz, float w, int nbx, int nby, int nbz,
                                              const float* __restrict__ radius, const float* __restrict__ stiff,
                                              float dt, float* __restrict__ disp) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    float xi = pos[3 * i], yi = pos[3 * i + 1], zi = pos[3 * i + 2];
    int ti = type[i];
    float ri = radius[ti], ki = stiff[ti];
    float ax = 0.0f, ay = 0.0f, az = 0.0f;
    if (ri > 0.0f) {
        for_each_neighbour(i, xi, yi, zi, order, bstart, bend, ox, oy, oz, w, nbx, nby, nbz, [&](int j) {
            int tj = type[j];
            float rj = radius[tj];
            if (rj <= 0.0f) return;
            float R = ri + rj;
            float ux = xi - pos[3 * j], uy = yi - pos[3 * j + 1], uz = zi - pos[3 * j + 2];
            float r2 = ux * ux + uy * uy + uz * uz;
            if (r2 >= R * R) return;
            float f = 0.5f * (ki + stiff[tj]) * dt;
            f = f < 1.0f ? f : 1.0f;
            if (r2 > 0.0f) {
                float r = sqrtf(r2);
                float m = f * 0.5f * (R - r) / r;
                ax += m * ux;
                ay += m * uy;
                az += m * uz;
            } else {
                float m = f * 0.5f * R;
                ax += id[i] < id[j] ? -m : m;
            }
        });
    }
    disp[3 * i] = ax;
    disp[3 * i + 1] = ay;
    disp[3 * i + 2] = az;
}

// ---------------------------------------------------------------------------------------------
// Motility: exact Ornstein-Uhlenbeck step of velocity and position per axis (see motility.py),
// with the velocity relaxing towards the chemotactic drift, plus the crowding displacement,
// applied axis by axis (x, y, z) in equal substeps shorter than max_disp (< dx): a substep that
// would end in a closed voxel stops that axis' move and reverses that velocity component (cells
// slide along walls); domain faces reflect position and velocity.
extern "C" __global__ void move_cells(float* __restrict__ pos, float* __restrict__ vel,
                                      const unsigned char* __restrict__ type, const i64* __restrict__ id,
                                      const float* __restrict__ crowd, const float* __restrict__ fields,
                                      const int* __restrict__ tfield, const float* __restrict__ tp, int ntypes,
                                      const unsigned char* __restrict__ open, int nx, int ny, int nz, float dx,
                                      float ox, float oy, float oz, int n, float dt, unsigned int step,
                                      unsigned int k0, unsigned int k1, int ndim, float max_disp,
                                      unsigned int* flags) {
    int c = blockIdx.x * blockDim.x + threadIdx.x;
    if (c >= n) return;
    int t = type[c];
    if (t >= ntypes) {
        atomicOr(flags, FLAG_BAD_TYPE);
        return;
    }
    const float* P = tp + t * NTP;
    float p[3] = {pos[3 * c], pos[3 * c + 1], pos[3 * c + 2]};
    float v[3] = {vel[3 * c], vel[3 * c + 1], vel[3 * c + 2]};
    int i, j, k;
    voxel_of(p[0], p[1], p[2], ox, oy, oz, dx, nx, ny, nz, &i, &j, &k);
    i64 nxy = (i64)nx * ny;
    if (!open[k * nxy + (i64)j * nx + i]) atomicOr(flags, FLAG_IN_CLOSED_VOXEL);

    // Chemotactic drift vd = chi K / (K + c)^2 grad c (gradient of receptor occupancy c/(K+c)),
    // grad c by central differences over open neighbours (one-sided next to walls and faces).
    float vd[3] = {0.0f, 0.0f, 0.0f};
    int fi = tfield[t];
    if (fi >= 0) {
        const float* f = fields + (i64)fi * nz * nxy;
        i64 here = k * nxy + (i64)j * nx + i;
        float cc = f[here];
        int idx3[3] = {i, j, k};
        int nn[3] = {nx, ny, nz};
        i64 stride[3] = {1, nx, nxy};
        for (int a = 0; a < ndim; ++a) {
            int ip = idx3[a] + 1 < nn[a] && open[here + stride[a]] ? 1 : 0;
            int im = idx3[a] - 1 >= 0 && open[here - stride[a]] ? 1 : 0;
            if (ip + im > 0) {
                float fp = f[here + ip * stride[a]];
                float fm = f[here - im * stride[a]];
                vd[a] = (fp - fm) / ((float)(ip + im) * dx);
            }
        }
        float K = P[6];
        float den = K + cc;
        float s = den > 0.0f ? P[5] * K / (den * den) : 0.0f;
        float m2 = 0.0f;
        for (int a = 0; a < 3; ++a) {
            vd[a] = s * vd[a];
            m2 += vd[a] * vd[a];
        }
        float cap = P[7];
        if (m2 > cap * cap) {
            float sc = cap / sqrtf(m2);
            for (int a = 0; a < 3; ++a) vd[a] = vd[a] * sc;
        }
    }

    // Normals: x uses (z0, z1), y (z2, z3), z (z4, z5).
    float z[6];
    tsim_u32x4 r0 = tsim_draw(id[c], step, PURPOSE_MOVE, 0u, k0, k1);
    tsim_box_muller(r0.x, r0.y, &z[0], &z[1]);
    tsim_box_muller(r0.z, r0.w, &z[2], &z[3]);
    if (ndim == 3) {
        tsim_u32x4 r1 = tsim_draw(id[c], step, PURPOSE_MOVE, 1u, k0, k1);
        tsim_box_muller(r1.x, r1.y, &z[4], &z[5]);
    } else {
        z[4] = 0.0f;
        z[5] = 0.0f;
    }
    float d[3];
    for (int a = 0; a < 3; ++a) {
        float u = v[a] - vd[a];
        d[a] = vd[a] * dt + P[4] * u + P[2] * z[2 * a] + P[3] * z[2 * a + 1] + crowd[3 * c + a];
        v[a] = vd[a] + P[0] * u + P[1] * z[2 * a];
    }
    if (ndim == 2) {
        d[2] = 0.0f;
        v[2] = 0.0f;
    }
    float lo[3] = {ox, oy, oz};
    float hi[3] = {ox + nx * dx, oy + ny * dx, oz + nz * dx};
    int idx[3] = {i, j, k};
    int nn[3] = {nx, ny, nz};
    float o3[3] = {ox, oy, oz};
    for (int a = 0; a < ndim; ++a) {
        // Equal substeps shorter than max_disp (< dx): each crosses at most one voxel face, so
        // the wall test after each one cannot be tunnelled through.
        int nsub = (int)ceilf(fabsf(d[a]) / max_disp);
        if (nsub < 1) nsub = 1;
        if (nsub > MAX_SUBSTEPS) {
            nsub = MAX_SUBSTEPS;
            d[a] = d[a] > 0.0f ? MAX_SUBSTEPS * max_disp : -MAX_SUBSTEPS * max_disp;
            atomicOr(flags, FLAG_DISPLACEMENT_CAPPED);
        }
        float sub = d[a] / (float)nsub;
        float va = v[a];
        for (int s = 0; s < nsub; ++s) {
            float q = p[a] + sub;
            float vq = va, sq = sub;
            if (q < lo[a]) {
                q = lo[a] + (lo[a] - q);
                vq = -vq;
                sq = -sq;
            } else if (q >= hi[a]) {
                q = hi[a] - (q - hi[a]);
                vq = -vq;
                sq = -sq;
            }
            q = fminf(fmaxf(q, lo[a]), hi[a]);
            int t3[3] = {idx[0], idx[1], idx[2]};
            t3[a] = clampi((int)floorf((q - o3[a]) / dx), 0, nn[a] - 1);
            if (open[t3[2] * nxy + (i64)t3[1] * nx + t3[0]]) {
                p[a] = q;
                va = vq;
                sub = sq;
                idx[a] = t3[a];
            } else {
                va = -va;  // blocked: drop the rest of this axis' move, reverse the component
                break;
            }
        }
        v[a] = va;
    }
    for (int a = 0; a < 3; ++a) {
        pos[3 * c + a] = p[a];
        vel[3 * c + a] = v[a];
    }
}

// ---------------------------------------------------------------------------------------------
// Claims. Step 1: each eligible source keeps its best pair as a packed 64-bit key
// (float bits of r^2) << 32 | target index, taken with atomicMin: nearest target wins, ties go to
// the lowest index (indices ascend with ids, see Population). Step 2: each chosen target keeps the
// lowest source id (atomicMin). Integer atomics only, so the outcome is deterministic.
// Step 0, one thread per cell: the claim's per-cell state in one launch (instead of six fills and
// casts): src_ok / tgt_ok = 1 where the optional masks allow (has_src / has_tgt = 0: every cell;
// the mask is then not read), target_of = taken_by = -1, best = winner = 2^64 - 1 (no key yet).
extern "C" __global__ void claim_init(int n, const unsigned char* __restrict__ source_ok, int has_src,
                                      const unsigned char* __restrict__ target_ok, int has_tgt,
                                      unsigned char* __restrict__ src_ok, unsigned char* __restrict__ tgt_ok,
                                      int* __restrict__ target_of, int* __restrict__ taken_by,
                                      unsigned long long* __restrict__ best, unsigned long long* __restrict__ winner) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    src_ok[i] = (!has_src || source_ok[i]) ? 1 : 0;
    tgt_ok[i] = (!has_tgt || target_ok[i]) ? 1 : 0;
    target_of[i] = -1;
    taken_by[i] = -1;
    best[i] = 0xffffffffffffffffull;
    winner[i] = 0xffffffffffffffffull;
}

extern "C" __global__ void claim_choose(const int* __restrict__ pi, const int* __restrict__ pj, i64 npairs,
                                        const float* __restrict__ pos, const unsigned char* __restrict__ src_ok,
                                        const unsigned char* __restrict__ tgt_ok,
                                        const int* __restrict__ taken_by, unsigned long long* __restrict__ best) {
    i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= npairs) return;
    int i = pi[p], j = pj[p];
    if (i < 0 || j < 0) return;
    if (!src_ok[i] || !tgt_ok[j] || taken_by[j] >= 0) return;
    float ux = pos[3 * i] - pos[3 * j], uy = pos[3 * i + 1] - pos[3 * j + 1], uz = pos[3 * i + 2] - pos[3 * j + 2];
    float r2 = ux * ux + uy * uy + uz * uz;
    unsigned long long key = ((unsigned long long)__float_as_uint(r2) << 32) | (unsigned int)j;
    atomicMin(best + i, key);
}

extern "C" __global__ void claim_resolve(const unsigned long long* __restrict__ best, const i64* __restrict__ id,
                                         int n, unsigned long long* __restrict__ winner) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long b = best[i];
    if (b == 0xffffffffffffffffull) return;
    int j = (int)(b & 0xffffffffull);
    atomicMin(winner + j, (unsigned long long)id[i]);
}

// Source i wins target j when winner[j] == id[i]: record it, mark both as used for later rounds.
extern "C" __global__ void claim_commit(const unsigned long long* __restrict__ best,
                                        const unsigned long long* __restrict__ winner, const i64* __restrict__ id,
                                        int n, int* __restrict__ target_of, int* __restrict__ taken_by,
                                        unsigned char* __restrict__ src_ok) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    unsigned long long b = best[i];
    if (b == 0xffffffffffffffffull) return;
    int j = (int)(b & 0xffffffffull);
    if (winner[j] == (unsigned long long)id[i]) {
        target_of[i] = j;
        taken_by[j] = i;
        src_ok[i] = 0;
    }
}

// Cells entering through vessel walls (motility.extravasate_many; NumPy twin: extravasate).
// Row r < m of this launch is the new cell id0 + r of type cell_type: from its Philox block
// (id, step, PURPOSE_EXTRAVASATE, 0) word 0 picks a vessel voxel uniformly from `sites`, words
// 1-3 a uniform point inside it (z at the slab centre when nz == 1). As in the twin the point is
// formed in double (voxel index + float32 uniform) and rounded to float once; a coordinate that
// rounds onto the voxel's upper face is pulled back to the float below it.
extern "C" __global__ void extravasate_fill(const i64* __restrict__ sites, i64 n_sites, int cell_type, i64 id0,
                                            int m, unsigned int step, unsigned int purpose, unsigned int k0,
                                            unsigned int k1, int nz, int ny, int nx, double ox, double oy,
                                            double oz, double dx, float* __restrict__ pos,
                                            unsigned char* __restrict__ type) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= m) return;
    tsim_u32x4 w = tsim_draw(id0 + r, step, purpose, 0u, k0, k1);
    i64 pick = (i64)((double)tsim_uniform(w.x) * (double)n_sites);
    if (pick > n_sites - 1) pick = n_sites - 1;
    const i64 flat = sites[pick];
    const i64 plane = (i64)ny * nx;
    const i64 k = flat / plane, rem = flat % plane;
    const i64 j = rem / nx, i = rem % nx;
    const double frac[3] = {(double)tsim_uniform(w.y), (double)tsim_uniform(w.z),
                            nz > 1 ? (double)tsim_uniform(w.w) : 0.5};
    const double org[3] = {ox, oy, oz};
    const i64 cell[3] = {i, j, k};
    for (int a = 0; a < 3; ++a) {
        float p = (float)(org[a] + ((double)cell[a] + frac[a]) * dx);
        const float upper = (float)(org[a] + (double)(cell[a] + 1) * dx);
        if (p >= upper) p = nextafterf(upper, -3.40282347e38f);  // towards -FLT_MAX: NVRTC has no INFINITY
        pos[3 * (i64)r + a] = p;
    }
    type[r] = (unsigned char)cell_type;
}

// Four float32 uniforms per id (rng.draw_uniform; twin: rng.uniform of rng.draw's words), as
// four rows of n: out[k * n + i] from word k of the Philox block (id[i], step, purpose, draw).
extern "C" __global__ void philox_uniform_fill(const i64* __restrict__ id, int n, unsigned int step,
                                               unsigned int purpose, unsigned int draw, unsigned int k0,
                                               unsigned int k1, float* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    tsim_u32x4 r = tsim_draw(id[i], step, purpose, draw, k0, k1);
    const i64 m = n;
    out[i] = tsim_uniform(r.x);
    out[m + i] = tsim_uniform(r.y);
    out[2 * m + i] = tsim_uniform(r.z);
    out[3 * m + i] = tsim_uniform(r.w);
}

// Velocities from the stationary OU law for rows row0 .. row0 + m - 1 (motility.init_velocity):
// per axis N(0, sig[type]^2), the normals by Box-Muller from the Philox block (id, 0xffffffff,
// PURPOSE_MOVE, 2): words 0, 1 give x and y, words 2, 3 give z (0 in 2D). sig : float32 (256,),
// zero past the configured types.
extern "C" __global__ void init_velocity_fill(const i64* __restrict__ id, const unsigned char* __restrict__ type,
                                              i64 row0, int m, unsigned int k0, unsigned int k1,
                                              const float* __restrict__ sig, int ndim, float* __restrict__ vel) {
    int r = blockIdx.x * blockDim.x + threadIdx.x;
    if (r >= m) return;
    const i64 row = row0 + r;
    tsim_u32x4 w = tsim_draw(id[row], 0xffffffffu, PURPOSE_MOVE, 2u, k0, k1);
    float z0, z1, z2, z3;
    tsim_box_muller(w.x, w.y, &z0, &z1);
    tsim_box_muller(w.z, w.w, &z2, &z3);
    const float s = sig[type[row]];
    vel[3 * row] = z0 * s;
    vel[3 * row + 1] = z1 * s;
    vel[3 * row + 2] = ndim == 3 ? z2 * s : 0.0f;
}

// ------------------------------------------------------------------ biology
// Deaths, divisions and state changes of every live cell in one pass (tissuesim.biology.rules.
// cell_fates; float32 fields only). u : (4, n) uniforms; tables by type t and kt = 2 t + activated:
// death (1/min), plus on CD20+ types with has_rtx rituximab's hazard rtx_kill r / (r + rtx_ec50) at
// the cell's field value r = max(rtx_at, 0) (ug/mL), p_div over 2 kt + stimulated,
// (a type >= ntypes has no tables: it neither dies nor divides nor changes here; NumPy raises)
// r_state and kind over kt (kind 1: rate b_act x damage, 2: the macrophage's IFN-gamma and damage
// rate), new_type / new_state over kt. The arithmetic is the twin's: probabilities 1 - e^{-r dt}
// in double from the double rates; the per-cell rates in float32 from float32 constants, as
// NumPy forms them from a float32 array and Python floats; the kill window compared in float32.
extern "C" __global__ void cell_fates(int n, const float* __restrict__ u, unsigned char* __restrict__ type,
                                      unsigned char* __restrict__ state, const float* __restrict__ last_kill,
                                      const float* __restrict__ ifng_at, const float* __restrict__ damage_at,
                                      const double* __restrict__ death, const unsigned char* __restrict__ cd20,
                                      const float* __restrict__ rtx_at, int has_rtx, double rtx_kill,
                                      double rtx_ec50, const double* __restrict__ p_div,
                                      const double* __restrict__ r_state, const unsigned char* __restrict__ kind,
                                      const unsigned char* __restrict__ new_type,
                                      const unsigned char* __restrict__ new_state, float now, float stim_window,
                                      float b_act, float mac_ifng, float mac_kd, float mac_damage, double dt,
                                      int ntypes, unsigned char* __restrict__ dead,
                                      unsigned char* __restrict__ divide) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const i64 m = n;
    const int t = type[i];
    if (t >= ntypes) {  // no tables for it (the move flags FLAG_BAD_TYPE): no fate, no table read
        dead[i] = 0;
        divide[i] = 0;
        return;
    }
    const int kt = 2 * t + (state[i] == 1 ? 1 : 0);
    double h = 0.0;
    if (has_rtx && cd20[t]) {
        const double r = fmax((double)rtx_at[i], 0.0);
        h = rtx_kill * r / (r + rtx_ec50);
    }
    const double a = death[t] + h;
    const bool d = (double)u[i] < -expm1(-a * dt);
    const bool stim = (now - last_kill[i]) < stim_window;
    const bool div = !d && (double)u[m + i] < p_div[2 * kt + (stim ? 1 : 0)];
    double r = r_state[kt];
    const int k = kind[kt];
    if (k == 1) {
        r = (double)(b_act * damage_at[i]);
    } else if (k == 2) {
        const float g = ifng_at[i];
        r = (double)(mac_ifng * g / (g + mac_kd) + mac_damage * damage_at[i]);
    }
    const bool change = !d && !div && (double)u[2 * m + i] < -expm1(-r * dt);
    if (change) {
        type[i] = new_type[kt];
        state[i] = new_state[kt];
    }
    dead[i] = d ? 1 : 0;
    divide[i] = div ? 1 : 0;
}

// Contact kills (rules.contact_kills_masked on CuPy; twin: its element-wise form). Step 1, one
// thread per pair of a -1-padded contact buffer: keep (i, j) where the killer's type can kill the
// target's (can_kill (ntypes, ntypes) uint8, row = killer) and, with has_specific, the killer's
// specific_to is -1 or the target's type; else write -1 to both. A type >= ntypes kills and is
// killed by nothing (the twin's table gather would fail on NumPy).
extern "C" __global__ void kill_pair_mask(const int* __restrict__ pi, const int* __restrict__ pj, i64 npairs,
                                          const unsigned char* __restrict__ type,
                                          const unsigned char* __restrict__ can_kill, int ntypes,
                                          const int* __restrict__ specific_to, int has_specific,
                                          int* __restrict__ oi, int* __restrict__ oj) {
    i64 p = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (p >= npairs) return;
    const int i = pi[p], j = pj[p];
    bool ok = i >= 0 && j >= 0;
    if (ok) {
        const int ti = type[i], tj = type[j];
        ok = ti < ntypes && tj < ntypes && can_kill[ti * ntypes + tj] != 0;
        // a killer raised against one target type (specific_to >= 0) attacks that type only
        if (ok && has_specific) ok = specific_to[i] < 0 || specific_to[i] == tj;
    }
    oi[p] = ok ? i : -1;
    oj[p] = ok ? j : -1;
}

// Step 2, one thread per cell after the claim (target_of: claimed target row or -1): a killer that
// claimed engages until busy_to (float32 of now + handling time) and kills with probability
// kill_p[type] exp(-kills / exhaustion) (double, as the twin), its uniform word 0 of the Philox block
// (id, step, purpose, 0). A hit counts a kill, stamps last_kill = now and marks its target dead
// (each target has one claimant: plain stores, no race). dead must be zero on entry.
extern "C" __global__ void kill_commit(int n, const int* __restrict__ target_of, const unsigned char* __restrict__ type,
                                       const i64* __restrict__ id, const double* __restrict__ kill_p, int ntypes,
                                       double exhaustion, float now, float busy_to, unsigned int step,
                                       unsigned int purpose, unsigned int k0, unsigned int k1,
                                       float* __restrict__ busy, int* __restrict__ kills,
                                       float* __restrict__ last_kill, unsigned char* __restrict__ dead,
                                       unsigned char* __restrict__ engaged) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int tgt = target_of[i];
    engaged[i] = tgt >= 0 ? 1 : 0;
    if (tgt < 0) return;
    const int t = type[i];
    const double p = t < ntypes ? kill_p[t] * exp(-(double)kills[i] / exhaustion) : 0.0;
    const float u = tsim_uniform(tsim_draw(id[i], step, purpose, 0u, k0, k1).x);
    busy[i] = busy_to;
    if ((double)u < p) {
        kills[i] += 1;
        last_kill[i] = now;
        dead[tgt] = 1;
    }
}

// The step's final masks and its exits into blood (Immunology._exits on CuPy; twin: its
// element-wise form), one thread per cell after the fates: dead = killed by contact or died (in:
// cell_fates' deaths), divide only if not dead, and a cell that neither dies nor divides leaves
// from a vessel voxel when its fourth fate uniform u3 < p_exit[type] (compared in double; type as
// after the fates, >= ntypes never leaves). gone = dead or leaving; left[type] counts the leavers
// (uint64, zero on entry; integer atomics, so the counts do not depend on thread order).
extern "C" __global__ void fate_exits(int n, const i64* __restrict__ vox, const unsigned char* __restrict__ vessel,
                                      const unsigned char* __restrict__ type, const float* __restrict__ u3,
                                      const double* __restrict__ p_exit, int ntypes,
                                      const unsigned char* __restrict__ killed, unsigned char* __restrict__ dead,
                                      unsigned char* __restrict__ divide, unsigned char* __restrict__ leave,
                                      unsigned char* __restrict__ gone, unsigned long long* __restrict__ left) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const bool d = killed[i] || dead[i];
    const bool dv = divide[i] && !d;
    const int t = type[i];
    const bool lv = !d && !dv && vessel[vox[i]] && t < ntypes && (double)u3[i] < p_exit[t];
    dead[i] = d ? 1 : 0;
    divide[i] = dv ? 1 : 0;
    leave[i] = lv ? 1 : 0;
    gone[i] = (d || lv) ? 1 : 0;
    if (lv) atomicAdd(left + t, 1ull);
}

// Secretion sources and uptake rates (Immunology._sources on CuPy, float32 fields; twin: its
// element-wise form). Step 1, one thread per cell: count each live cell into its source category
// over voxels, counts[cat * nvox + vox] (int32, (3 + n_up) nvox + 1; zero on entry), cat =
// cat_table[(2 t + engaged) * 2 + activated] with engaged = busy_until > now; category 3 (none) is
// not counted. A cell whose type has bit k of consumes[t] set also counts as a consumer of uptake
// field k at counts[3 nvox + 1 + k nvox + vox]. Dead cells and types >= ntypes count nowhere.
// Integer atomics only: the counts do not depend on thread order.
extern "C" __global__ void source_counts(int n, const i64* __restrict__ vox, const unsigned char* __restrict__ type,
                                         const unsigned char* __restrict__ state, const float* __restrict__ busy,
                                         float now, const unsigned char* __restrict__ dead,
                                         const i64* __restrict__ cat_table, int ntypes, i64 nvox,
                                         const unsigned char* __restrict__ consumes, int n_up,
                                         int* __restrict__ counts) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    const int t = type[i];
    if (dead[i] || t >= ntypes) return;
    const i64 v = vox[i];
    const int k = (2 * t + (busy[i] > now ? 1 : 0)) * 2 + (state[i] == 1 ? 1 : 0);
    const i64 c = cat_table[k];
    if (c >= 0 && c < 3) atomicAdd(counts + c * nvox + v, 1);
    const unsigned int bits = consumes[t];
    for (int u = 0; u < n_up; ++u)
        if (bits & (1u << u)) atomicAdd(counts + 3 * nvox + 1 + (i64)u * nvox + v, 1);
}

// Step 2, one thread per voxel: every field's source (units/min) from the counts and the fields
// (f, src: float32 (nf, nvox)); a field index < 0 is a field this run does not have, and a field no
// rule names gets 0. The operations and their order are the twin's, one float32 rounding each:
// ifng, il6, autoantibody = float(count) x rate; damage = float(n_mac) x r_dmg x (1 - damage)
// (+ damage0 x repair_ab when with_repair); cxcl13 = damage x r_c13; cxcl10 = 0 + ifng r_c10 /
// (ifng + kd_c10) + damage x r_c10_dmg (the terms of the fields present). Uptake field k (field
// up_field[k]) gets lam = float(consumers) x up_rate[k], then / (up_kd[k] + max(u, 0)) (1/min; the
// other rows of lam are never written).
extern "C" __global__ void source_fields(i64 nvox, int nf, const int* __restrict__ counts,
                                         const float* __restrict__ f, const float* __restrict__ damage0,
                                         int with_repair, int i_ifng, int i_il6, int i_ab, int i_dmg, int i_c13,
                                         int i_c10, float r_ifng, float r_il6, float r_ab, float r_dmg,
                                         float repair_ab, float r_c13, float r_c10, float kd_c10, float r_c10_dmg,
                                         float* __restrict__ src, int n_up, const int* __restrict__ up_field,
                                         const float* __restrict__ up_rate, const float* __restrict__ up_kd,
                                         float* __restrict__ lam) {
    i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x;
    if (v >= nvox) return;
    for (int k = 0; k < n_up; ++k) {
        const i64 o = (i64)up_field[k] * nvox + v;
        float l = (float)counts[3 * nvox + 1 + (i64)k * nvox + v] * up_rate[k];
        l = l / (fmaxf(f[o], 0.0f) + up_kd[k]);
        lam[o] = l;
    }
    for (int k = 0; k < nf; ++k) src[k * nvox + v] = 0.0f;
    if (i_ifng >= 0) src[i_ifng * nvox + v] = (float)counts[v] * r_ifng;
    if (i_il6 >= 0) src[i_il6 * nvox + v] = (float)counts[nvox + v] * r_il6;
    if (i_ab >= 0) src[i_ab * nvox + v] = (float)counts[2 * nvox + v] * r_ab;
    if (i_dmg >= 0) {
        const float dmg = f[i_dmg * nvox + v];
        float s = (float)counts[nvox + v] * r_dmg;
        s = s * (1.0f - dmg);
        if (with_repair) s = s + damage0[v] * repair_ab;
        src[i_dmg * nvox + v] = s;
        if (i_c13 >= 0) src[i_c13 * nvox + v] = dmg * r_c13;
    }
    if (i_c10 >= 0) {
        float c = 0.0f;
        if (i_ifng >= 0) {
            const float g = f[i_ifng * nvox + v];
            float w = g * r_c10;
            w = w / (g + kd_c10);
            c = c + w;
        }
        if (i_dmg >= 0) c = c + f[i_dmg * nvox + v] * r_c10_dmg;
        src[i_c10 * nvox + v] = c;
    }
}

// Test kernel: four uint32 per id (parity with rng.draw).
extern "C" __global__ void philox_fill(const i64* __restrict__ id, int n, unsigned int step, unsigned int purpose,
                                       unsigned int draw, unsigned int k0, unsigned int k1,
                                       unsigned int* __restrict__ out) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    tsim_u32x4 r = tsim_draw(id[i], step, purpose, draw, k0, k1);
    out[4 * i] = r.x;
    out[4 * i + 1] = r.y;
    out[4 * i + 2] = r.z;
    out[4 * i + 3] = r.w;
}

// Test kernel: float32 normals, two per uint32 pair (parity with rng.box_muller).
extern "C" __global__ void box_muller_fill(const unsigned int* __restrict__ a, const unsigned int* __restrict__ b,
                                           int n, float* __restrict__ z0, float* __restrict__ z1) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= n) return;
    tsim_box_muller(a[i], b[i], &z0[i], &z1[i]);
}
