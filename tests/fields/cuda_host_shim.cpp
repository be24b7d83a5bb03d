// Host (CPU) build of kernels/diffusion.cu for tests/fields/test_kernels_emulated.py.
//
// The CUDA built-ins are emulated: threadIdx/blockIdx are thread-local, __shared__ is a static
// shared by the threads of one emulated block, and __syncthreads is a std::barrier across them.
// This lets the tests run the real kernel source (index math, Thomas recursion, cyclic
// correction, shared-memory transpose) through the real Python launch code on a machine without a
// GPU. Build: g++ -std=c++20 -O1 -shared -fPIC -I kernels cuda_host_shim.cpp -o libemu.so
//
// Other kernel files reuse the built-ins: #define TSIM_SHIM_NO_DIFFUSION, #include this file, then
// #include their .cu (tests/agents/cuda_host_shim_agents.cpp does so for kernels/agents.cu).
#include <math.h>

#include <atomic>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <thread>
#include <vector>

struct dim3 {
    unsigned x = 1, y = 1, z = 1;
};
static thread_local dim3 threadIdx, blockIdx;
static dim3 blockDim, gridDim;
static thread_local std::barrier<>* emu_barrier = nullptr;

#define __global__
#define __device__
#define __restrict__ __restrict
#define __shared__ static
inline void __syncthreads() {
    if (emu_barrier) emu_barrier->arrive_and_wait();
}
using std::exp;
using std::expm1;
using std::fabs;

// Device intrinsics used by other kernel files (kernels/agents.cu, kernels/philox.cuh).
#define __forceinline__ inline
// Atomics: std::atomic_ref, so they stay atomic where emulated threads are real threads.
template <typename T>
inline T emu_atomic_or(T* a, T v) {
    return std::atomic_ref<T>(*a).fetch_or(v);
}
template <typename T>
inline T emu_atomic_add(T* a, T v) {
    return std::atomic_ref<T>(*a).fetch_add(v);
}
template <typename T>
inline T emu_atomic_min(T* a, T v) {
    std::atomic_ref<T> r(*a);
    T old = r.load();
    while (v < old && !r.compare_exchange_weak(old, v)) {
    }
    return old;
}
template <typename T>
inline T emu_atomic_max(T* a, T v) {
    std::atomic_ref<T> r(*a);
    T old = r.load();
    while (v > old && !r.compare_exchange_weak(old, v)) {
    }
    return old;
}
inline int atomicOr(int* a, int v) { return emu_atomic_or(a, v); }
inline unsigned int atomicOr(unsigned int* a, unsigned int v) { return emu_atomic_or(a, v); }
inline unsigned long long atomicOr(unsigned long long* a, unsigned long long v) { return emu_atomic_or(a, v); }
inline int atomicAdd(int* a, int v) { return emu_atomic_add(a, v); }
inline unsigned int atomicAdd(unsigned int* a, unsigned int v) { return emu_atomic_add(a, v); }
inline unsigned long long atomicAdd(unsigned long long* a, unsigned long long v) { return emu_atomic_add(a, v); }
inline int atomicMin(int* a, int v) { return emu_atomic_min(a, v); }
inline unsigned int atomicMin(unsigned int* a, unsigned int v) { return emu_atomic_min(a, v); }
inline long long atomicMin(long long* a, long long v) { return emu_atomic_min(a, v); }
inline unsigned long long atomicMin(unsigned long long* a, unsigned long long v) { return emu_atomic_min(a, v); }
inline int atomicMax(int* a, int v) { return emu_atomic_max(a, v); }
inline unsigned int atomicMax(unsigned int* a, unsigned int v) { return emu_atomic_max(a, v); }
inline long long atomicMax(long long* a, long long v) { return emu_atomic_max(a, v); }
inline unsigned long long atomicMax(unsigned long long* a, unsigned long long v) { return emu_atomic_max(a, v); }
inline unsigned int __float_as_uint(float x) {
    unsigned int u;
    std::memcpy(&u, &x, sizeof u);
    return u;
}
inline float __uint_as_float(unsigned int u) {
    float x;
    std::memcpy(&x, &u, sizeof x);
    return x;
}
inline int __float_as_int(float x) { return (int)__float_as_uint(x); }
inline float __int_as_float(int i) { return __uint_as_float((unsigned int)i); }
inline unsigned int __umulhi(unsigned int a, unsigned int b) {
    return (unsigned int)(((unsigned long long)a * b) >> 32);
}
inline unsigned long long __umul64hi(unsigned long long a, unsigned long long b) {
    return (unsigned long long)(((unsigned __int128)a * b) >> 64);
}
inline float rsqrtf(float x) { return 1.0f / sqrtf(x); }

// Set the built-ins of one emulated thread of a 1D (x) or 2D-grid (x, y) launch.
extern "C" void emu_set_1d(unsigned grid, unsigned grid_y, unsigned block, unsigned b, unsigned by, unsigned t);

#ifndef TSIM_SHIM_NO_DIFFUSION
#include "diffusion.cu"
#endif

extern "C" void emu_set_1d(unsigned grid, unsigned grid_y, unsigned block, unsigned b, unsigned by, unsigned t) {
    gridDim = {grid, grid_y, 1};
    blockDim = {block, 1, 1};
    blockIdx = {b, by, 0};
    threadIdx = {t, 0, 0};
    emu_barrier = nullptr;
}

#ifndef TSIM_SHIM_NO_DIFFUSION
// Run fields_transpose_xy_<T> block by block, each block's threads as real threads.
template <typename T, typename K>
static void emu_transpose(K kernel, const T* in, T* out, const int* is, const int* os, int ns, int nz, int ny, int nx,
                          unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by) {
    gridDim = {gx, gy, gz};
    blockDim = {bx, by, 1};
    for (unsigned z = 0; z < gz; ++z)
        for (unsigned y = 0; y < gy; ++y)
            for (unsigned x = 0; x < gx; ++x) {
                std::barrier<> bar((std::ptrdiff_t)(bx * by));
                std::vector<std::thread> th;
                for (unsigned ty = 0; ty < by; ++ty)
                    for (unsigned tx = 0; tx < bx; ++tx)
                        th.emplace_back([&, tx, ty] {
                            threadIdx = {tx, ty, 0};
                            blockIdx = {x, y, z};
                            emu_barrier = &bar;
                            kernel(in, out, is, os, ns, nz, ny, nx);
                        });
                for (auto& t : th) t.join();
            }
}

extern "C" void emu_transpose_f32(const float* in, float* out, const int* is, const int* os, int ns, int nz, int ny,
                                  int nx, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by) {
    emu_transpose<float>(fields_transpose_xy_f32, in, out, is, os, ns, nz, ny, nx, gx, gy, gz, bx, by);
}
extern "C" void emu_transpose_f64(const double* in, double* out, const int* is, const int* os, int ns, int nz,
                                  int ny, int nx, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by) {
    emu_transpose<double>(fields_transpose_xy_f64, in, out, is, os, ns, nz, ny, nx, gx, gy, gz, bx, by);
}
#endif  // TSIM_SHIM_NO_DIFFUSION
