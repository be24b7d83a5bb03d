// Philox4x32-10 counter-based random numbers (Salmon, Moraes, Dror & Shaw, "Parallel random
// numbers: as easy as 1, 2, 3", SC'11). NumPy twin: tissuesim/agents/rng.py (bit-exact).
//
// tissuesim keys every draw by (seed, cell id, step, purpose):
//   counter = (id lo 32 bits, id hi 32 bits, step, purpose << 16 | draw index)
//   key     = (seed lo 32 bits, seed hi 32 bits)
// so a cell's random numbers depend on nothing but these values: not on the thread that draws
// them, the launch configuration, or where the cell sits in memory.
//
// Conversions (identical in the twin):
//   uniform  u = (2 (x >> 9) + 1) 2^-24, an odd multiple of 2^-24 in (0, 1): exact in float32,
//            never 0 (safe for log) and never 1.
//   normal   Box-Muller on two uniforms: r = sqrt(-2 log u1), z0 = r cos(2 pi u2), z1 = r sin(..).
#pragma once

#define TSIM_PHILOX_M0 0xD2511F53u
#define TSIM_PHILOX_M1 0xCD9E8D57u
#define TSIM_PHILOX_W0 0x9E3779B9u
#define TSIM_PHILOX_W1 0xBB67AE85u

struct tsim_u32x4 {
    unsigned int x, y, z, w;
};

__device__ __forceinline__ tsim_u32x4 tsim_philox_round(tsim_u32x4 c, unsigned int k0, unsigned int k1) {
    unsigned int hi0 = __umulhi(TSIM_PHILOX_M0, c.x);
    unsigned int lo0 = TSIM_PHILOX_M0 * c.x;
    unsigned int hi1 = __umulhi(TSIM_PHILOX_M1, c.z);
    unsigned int lo1 = TSIM_PHILOX_M1 * c.z;
    tsim_u32x4 r;
    r.x = hi1 ^ c.y ^ k0;
    r.y = lo1;
    r.z = hi0 ^ c.w ^ k1;
    r.w = lo0;
    return r;
}

// Ten rounds; the key is bumped by the Weyl constants between rounds (nine bumps).
__device__ __forceinline__ tsim_u32x4 tsim_philox4x32_10(tsim_u32x4 c, unsigned int k0, unsigned int k1) {
    c = tsim_philox_round(c, k0, k1);
#pragma unroll
    for (int r = 1; r < 10; ++r) {
        k0 += TSIM_PHILOX_W0;
        k1 += TSIM_PHILOX_W1;
        c = tsim_philox_round(c, k0, k1);
    }
    return c;
}

// Four uint32 for (id, step, purpose, draw) under key (k0, k1) = seed.
__device__ __forceinline__ tsim_u32x4 tsim_draw(long long id, unsigned int step, unsigned int purpose,
                                                unsigned int draw, unsigned int k0, unsigned int k1) {
    unsigned long long uid = (unsigned long long)id;
    tsim_u32x4 c;
    c.x = (unsigned int)(uid & 0xffffffffull);
    c.y = (unsigned int)(uid >> 32);
    c.z = step;
    c.w = (purpose << 16) | (draw & 0xffffu);
    return tsim_philox4x32_10(c, k0, k1);
}

__device__ __forceinline__ float tsim_uniform(unsigned int x) {
    return (float)((x >> 9) * 2u + 1u) * 5.9604644775390625e-08f;  // 2^-24
}

// Two standard normals from two uint32 (Box-Muller).
__device__ __forceinline__ void tsim_box_muller(unsigned int a, unsigned int b, float* z0, float* z1) {
    float u1 = tsim_uniform(a);
    float u2 = tsim_uniform(b);
    float r = sqrtf(-2.0f * logf(u1));
    float th = 6.2831855f * u2;  // float32(2 pi)
    *z0 = r * cosf(th);
    *z1 = r * sinf(th);
}
