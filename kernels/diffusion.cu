// Reaction-diffusion kernels of tissuesim.fields (NumPy twins: tissuesim/fields/ops.py).
//
// Layout: fields are stacked C-ordered arrays u[f][z][y][x] of shape (nf, nz, ny, nx). A kernel
// works on the subset of fields listed in `slots` (int32, n_slots), so fields with D == 0 or on
// another solver are not touched and nothing is copied. Boundary conditions come per field as
// bc_kind[f*6 + face] (int32; 0 zero-flux, 1 Dirichlet, 2 periodic) and bc_val[f*6 + face]
// (Dirichlet value on the face), faces ordered x-, x+, y-, y+, z-, z+.
//
// The physics lives in __device__ inline templates; thin extern "C" wrappers instantiate them for
// float (_f32) and double (_f64), so the loader needs no name_expressions.
//
// Discretisation (cell-centred finite volumes): the flux through the face between voxels a and b
// is Df (u_b - u_a) / dx with Df the harmonic mean 2 Da Db / (Da + Db), which is zero next to a
// D == 0 voxel and exact for a layered medium with the interface on a face. A Dirichlet value g
// sits on the face, half a voxel from the centre: ghost = 2 g - u, so the face flux is
// 2 D (g - u) / dx. Periodic axes couple the first and last voxel through one more face.

#define BC_ZERO_FLUX 0
#define BC_DIRICHLET 1
#define BC_PERIODIC 2

typedef long long i64;

template <typename T>
__device__ inline T face_coef(T a, T b) {
    // Harmonic mean; a face next to a D == 0 voxel carries no flux.
    T s = a + b;
    return s > T(0) ? T(2) * a * b / s : T(0);
}

// Net diffusive inflow into voxel c along one axis, times dx^2 (so the caller multiplies by
// h / dx^2). i is the voxel's index along the axis, n the axis length, s the element stride.
template <typename T>
__device__ inline T axis_inflow(const T* __restrict__ u, const T* __restrict__ D, i64 c, i64 s, int i,
                                int n, int kind_lo, T val_lo, int kind_hi, T val_hi) {
    const T uc = u[c];
    const T dc = D[c];
    T acc = T(0);
    if (i > 0) {
        acc += face_coef(D[c - s], dc) * (u[c - s] - uc);
    } else if (kind_lo == BC_PERIODIC && n > 1) {
        const i64 w = c + (i64)(n - 1) * s;
        acc += face_coef(D[w], dc) * (u[w] - uc);
    } else if (kind_lo == BC_DIRICHLET) {
        acc += T(2) * dc * (val_lo - uc);
    }
    if (i < n - 1) {
        acc += face_coef(D[c + s], dc) * (u[c + s] - uc);
    } else if (kind_hi == BC_PERIODIC && n > 1) {
        const i64 e = c - (i64)(n - 1) * s;
        acc += face_coef(D[e], dc) * (u[e] - uc);
    } else if (kind_hi == BC_DIRICHLET) {
        acc += T(2) * dc * (val_hi - uc);
    }
    return acc;
}

// One forward-Euler substep of length h for every voxel of the listed fields:
// u_out = u_in + h/dx^2 * sum_axes inflow. Launch: blockIdx.y = field (index into slots),
// x = voxels in a grid-stride loop. One thread per voxel; the 7-point stencil reads neighbours
// that adjacent threads share, so the loads coalesce along x and the y/z neighbours come from
// L1/L2. (i, j, k) come from 32-bit unsigned division (the host guarantees nvox < 2^31): 64-bit
// division is a long software sequence on the GPU and would make this bandwidth-bound kernel
// compute-bound.
template <typename T>
__device__ inline void explicit_substep(const T* __restrict__ u_in, T* __restrict__ u_out,
                                        const T* __restrict__ D, const int* __restrict__ slots, int nz, int ny,
                                        int nx, const int* __restrict__ bc_kind, const T* __restrict__ bc_val,
                                        T h_dx2) {
    const unsigned nvox = (unsigned)nz * (unsigned)ny * (unsigned)nx;
    const int slot = slots[blockIdx.y];
    const int* kind = bc_kind + slot * 6;
    const T* val = bc_val + slot * 6;
    const i64 base = (i64)slot * nvox;
    const unsigned nxy = (unsigned)nx * (unsigned)ny;
    for (unsigned v = blockIdx.x * blockDim.x + threadIdx.x; v < nvox; v += blockDim.x * gridDim.x) {
        const i64 c = base + v;
        const unsigned k = v / nxy;
        const unsigned rem = v - k * nxy;
        const unsigned j = rem / (unsigned)nx;
        const unsigned i = rem - j * (unsigned)nx;
        T acc = axis_inflow(u_in, D, c, (i64)1, (int)i, nx, kind[0], val[0], kind[1], val[1]);
        if (ny > 1 || kind[2] == BC_DIRICHLET || kind[3] == BC_DIRICHLET)
            acc += axis_inflow(u_in, D, c, (i64)nx, (int)j, ny, kind[2], val[2], kind[3], val[3]);
        if (nz > 1 || kind[4] == BC_DIRICHLET || kind[5] == BC_DIRICHLET)
            acc += axis_inflow(u_in, D, c, (i64)nxy, (int)k, nz, kind[4], val[4], kind[5], val[5]);
        u_out[c] = u_in[c] + h_dx2 * acc;
    }
}

// Backward Euler along one axis for every grid line of the listed fields (one LOD sweep):
//   (1 + r_lo + r_hi) u_m - r_lo u_{m-1} - r_hi u_{m+1} = u_m^old,  r = h/dx^2 * Df
// solved in place with the Thomas algorithm, one thread per line. Lines are addressed as
// (outer, line, inner): element m of line (o, in) of field slot s sits at
//   (s * outer_pf + o) * n * inner + m * inner + in,
// so neighbouring threads (consecutive `in`) touch neighbouring addresses at every step m and
// every load/store of a warp is coalesced. That holds for z lines (inner = ny*nx) and y lines
// (inner = nx); x lines (inner = 1) would be strided by nx, so the host transposes x <-> y first
// (fields_transpose_xy below) and sweeps the transposed copy with inner = ny.
// cp holds the modified super-diagonal and zs the second right-hand side of the cyclic (periodic)
// solve (Sherman-Morrison); both have u's layout. u holds d' during the forward sweep.
template <typename T>
__device__ inline void lod_line(T* __restrict__ u, const T* __restrict__ D, T* __restrict__ cp,
                                T* __restrict__ zs, i64 base, i64 s, int n, int kind_lo, T val_lo,
                                int kind_hi, T val_hi, T h_dx2) {
    const bool cyclic = (kind_lo == BC_PERIODIC) && n >= 3;
    // r of the face that wraps from the last to the first voxel (periodic only).
    const T r_wrap = cyclic ? h_dx2 * face_coef(D[base + (i64)(n - 1) * s], D[base]) : T(0);
    T d_prev = T(0);
    T d_cur = D[base];
    T b0 = T(1);
    T prev_cp = T(0), prev_dp = T(0), prev_zp = T(0);
    for (int m = 0; m < n; ++m) {
        const i64 e = base + (i64)m * s;
        const T d_next = (m + 1 < n) ? D[e + s] : T(0);
        const T r_lo = (m > 0) ? h_dx2 * face_coef(d_prev, d_cur) : T(0);
        const T r_hi = (m + 1 < n) ? h_dx2 * face_coef(d_cur, d_next) : T(0);
        T b = T(1) + r_lo + r_hi;
        T rhs = u[e];
        if (m == 0) {
            if (kind_lo == BC_DIRICHLET) {
                b += T(2) * h_dx2 * d_cur;
                rhs += T(2) * h_dx2 * d_cur * val_lo;
            } else if (cyclic) {
                b += r_wrap;
            }
        }
        if (m == n - 1) {
            if (kind_hi == BC_DIRICHLET) {
                b += T(2) * h_dx2 * d_cur;
                rhs += T(2) * h_dx2 * d_cur * val_hi;
            } else if (cyclic) {
                b += r_wrap;
            }
        }
        T zrhs = T(0);
        if (cyclic) {
            // Sherman-Morrison: A = A' + w v^T with w = (gamma, 0, .., 0, -r_wrap),
            // v = (1, 0, .., 0, -r_wrap/gamma), gamma = -b_0.
            if (m == 0) {
                b0 = b;
                b = b + b;  // b_0 - gamma
                zrhs = -b0;  // gamma
            }
            if (m == n - 1) {
                b += r_wrap * r_wrap / b0;  // b_{n-1} - alpha beta / gamma
                zrhs = -r_wrap;
            }
        }
        const T a = -r_lo;
        const T c = -r_hi;
        const T denom = b - a * prev_cp;
        prev_cp = c / denom;
        prev_dp = (rhs - a * prev_dp) / denom;
        cp[e] = prev_cp;
        u[e] = prev_dp;
        if (cyclic) {
            prev_zp = (zrhs - a * prev_zp) / denom;
            zs[e] = prev_zp;
        }
        d_prev = d_cur;
        d_cur = d_next;
    }
    // Back substitution (u and zs hold d' and z'; x_{n-1} = d'_{n-1}).
    T x_next = u[base + (i64)(n - 1) * s];
    T z_next = cyclic ? zs[base + (i64)(n - 1) * s] : T(0);
    for (int m = n - 2; m >= 0; --m) {
        const i64 e = base + (i64)m * s;
        const T cm = cp[e];
        x_next = u[e] - cm * x_next;
        u[e] = x_next;
        if (cyclic) {
            z_next = zs[e] - cm * z_next;
            zs[e] = z_next;
        }
    }
    if (cyclic) {
        const i64 last = base + (i64)(n - 1) * s;
        const T vfac = r_wrap / b0;  // v_{n-1} = beta / gamma = (-r_wrap) / (-b_0)
        const T fact = (u[base] + vfac * u[last]) / (T(1) + zs[base] + vfac * zs[last]);
        for (int m = 0; m < n; ++m) {
            const i64 e = base + (i64)m * s;
            u[e] = u[e] - fact * zs[e];
        }
    }
}

template <typename T>
__device__ inline void lod_lines(T* __restrict__ u, const T* __restrict__ D, T* __restrict__ cp,
                                 T* __restrict__ zs, const int* __restrict__ slots, const int* __restrict__ rows,
                                 int n_slots, int outer_pf, int n, int inner, const int* __restrict__ bc_kind,
                                 const T* __restrict__ bc_val, int face_lo, T h_dx2) {
    const i64 lines_pf = (i64)outer_pf * inner;
    const i64 total = lines_pf * n_slots;
    for (i64 t = (i64)blockIdx.x * blockDim.x + threadIdx.x; t < total; t += (i64)blockDim.x * gridDim.x) {
        const int f = (int)(t / lines_pf);
        const i64 rem = t - (i64)f * lines_pf;
        const i64 o = rem / inner;
        const i64 in = rem - o * inner;
        const i64 base = ((i64)slots[f] * outer_pf + o) * (i64)n * inner + in;
        const int row = rows[f] * 6;
        lod_line(u, D, cp, zs, base, (i64)inner, n, bc_kind[row + face_lo], bc_val[row + face_lo],
                 bc_kind[row + face_lo + 1], bc_val[row + face_lo + 1], h_dx2);
    }
}

// phi1(z) = (1 - e^-z)/z and phi2(z) = (e^-z - 1 + z)/z^2, accurate near z = 0.
__device__ inline double phi1(double z) {
    return fabs(z) < 1e-8 ? 1.0 - 0.5 * z : -expm1(-z) / z;
}
__device__ inline double phi2(double z) {
    if (fabs(z) < 1e-2) return 0.5 + z * (-1.0 / 6 + z * (1.0 / 24 + z * (-1.0 / 120 + z / 720)));
    return (expm1(-z) + z) / (z * z);
}

// Exact integration over h of the per-voxel linear reaction
//   du/dt = b - a u,  a = k + lambda + vessel_rate,  b = S + vessel_rate * c_blood
// (in double, whatever T): u(h) = u e^{-a h} + b h phi1(a h). If U is given it receives
// int_0^h u dt = u h phi1(a h) + b h^2 phi2(a h), from which the host forms the exact budget of
// decay (k U), uptake (lambda U), vessel exchange (vr (c_b h - U)) and source (S h).
// Optional inputs are flagged: has_lam, has_src (per-field arrays like u), vr_mode (0 none,
// 1 shared (nz,ny,nx), 2 per field like u), has_cb (c_blood (nf,) double), want_U.
template <typename T>
__device__ inline void react(T* __restrict__ u, const int* __restrict__ slots, i64 nvox,
                             const double* __restrict__ k, const T* __restrict__ lam, int has_lam,
                             const T* __restrict__ src, int has_src, const T* __restrict__ vr, int vr_mode,
                             const double* __restrict__ cb, int has_cb, double h, T* __restrict__ U,
                             int want_U) {
    // Launch: blockIdx.y = field (index into slots), x = voxels in a grid-stride loop.
    const int slot = slots[blockIdx.y];
    const double kf = k[slot];
    const double cbf = has_cb ? cb[slot] : 0.0;
    for (i64 v = (i64)blockIdx.x * blockDim.x + threadIdx.x; v < nvox; v += (i64)blockDim.x * gridDim.x) {
        const i64 c = (i64)slot * nvox + v;
        double a = kf;
        double b = 0.0;
        if (has_lam) a += (double)lam[c];
        if (has_src) b += (double)src[c];
        if (vr_mode) {
            const double r = (double)vr[vr_mode == 1 ? v : c];
            a += r;
            b += r * cbf;
        }
        const double z = a * h;
        const double u0 = (double)u[c];
        const double p1 = phi1(z);
        u[c] = (T)(u0 * exp(-z) + b * h * p1);
        if (want_U) U[c] = (T)(u0 * h * p1 + b * h * h * phi2(z));
    }
}

// out[out_slots[s]][z] = transpose(in[in_slots[s]][z]) for (ny, nx) planes, through a 32x33
// shared tile so both the read (along x) and the write (along y) are coalesced; the extra column
// avoids shared-memory bank conflicts. Launch with block (32, 8), grid (ceil(nx/32), ceil(ny/32),
// min(n_slots*nz, 65535)).
template <typename T>
__device__ inline void transpose_xy(const T* __restrict__ in, T* __restrict__ out, const int* __restrict__ in_slots,
                                    const int* __restrict__ out_slots, int n_slots, int nz, int ny, int nx,
                                    T (*tile)[33]) {
    const int x = blockIdx.x * 32 + threadIdx.x;
    const int y0 = blockIdx.y * 32;
    const int x0 = blockIdx.x * 32;
    for (int b = blockIdx.z; b < n_slots * nz; b += gridDim.z) {
        const int s = b / nz;
        const int z = b - s * nz;
        const T* src = in + ((i64)in_slots[s] * nz + z) * ny * nx;
        T* dst = out + ((i64)out_slots[s] * nz + z) * nx * ny;
        for (int j = threadIdx.y; j < 32; j += 8) {
            const int y = y0 + j;
            if (x < nx && y < ny) tile[j][threadIdx.x] = src[(i64)y * nx + x];
        }
        __syncthreads();
        const int yo = y0 + threadIdx.x;
        for (int j = threadIdx.y; j < 32; j += 8) {
            const int xo = x0 + j;
            if (xo < nx && yo < ny) dst[(i64)xo * ny + yo] = tile[threadIdx.x][j];
        }
        __syncthreads();
    }
}

#define FIELDS_KERNELS(T, SFX)                                                                                   \
    extern "C" __global__ void diffusion_explicit_##SFX(const T* u_in, T* u_out, const T* D, const int* slots,  \
                                                        int nz, int ny, int nx, const int* bc_kind,             \
                                                        const T* bc_val, T h_dx2) {                             \
        explicit_substep<T>(u_in, u_out, D, slots, nz, ny, nx, bc_kind, bc_val, h_dx2);                       \
    }                                                                                                            \
    extern "C" __global__ void diffusion_lod_lines_##SFX(T* u, const T* D, T* cp, T* zs, const int* slots,      \
                                                         const int* rows, int n_slots, int outer_pf, int n,     \
                                                         int inner, const int* bc_kind, const T* bc_val,        \
                                                         int face_lo, T h_dx2) {                                \
        lod_lines<T>(u, D, cp, zs, slots, rows, n_slots, outer_pf, n, inner, bc_kind, bc_val, face_lo, h_dx2); \
    }                                                                                                            \
    extern "C" __global__ void fields_react_##SFX(T* u, const int* slots, i64 nvox, const double* k,            \
                                                  const T* lam, int has_lam, const T* src, int has_src,         \
                                                  const T* vr, int vr_mode, const double* cb, int has_cb,       \
                                                  double h, T* U, int want_U) {                                  \
        react<T>(u, slots, nvox, k, lam, has_lam, src, has_src, vr, vr_mode, cb, has_cb, h, U, want_U);         \
    }                                                                                                            \
    extern "C" __global__ void fields_transpose_xy_##SFX(const T* in, T* out, const int* in_slots,              \
                                                         const int* out_slots, int n_slots, int nz, int ny,     \
                                                         int nx) {                                              \
        __shared__ T tile[32][33];                                                                               \
        transpose_xy<T>(in, out, in_slots, out_slots, n_slots, nz, ny, nx, tile);                               \
    }

FIELDS_KERNELS(float, f32)
FIELDS_KERNELS(double, f64)
