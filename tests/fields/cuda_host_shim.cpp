// Host (CPU) build of kernels/diffusion.cu for tests/fields/test_kernels_emulated.py.
//
// The CUDA built-ins are emulated: threadIdx/blockIdx are thread-local, __shared__ is a static
// shared by the threads of one emulated block, and __syncthreads is a std::barrier across them.
// This lets the tests run the real kernel source (index math, Thomas recursion, cyclic
// correction, shared-memory transpose) through the real Python launch code on a machine without a
// GPU. Build: g++ -std=c++20 -O1 -shared -fPIC -I kernels cuda_host_shim.cpp -o libemu.so
#include <barrier>
#include <cmath>
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

#include "diffusion.cu"

extern "C" void emu_set_1d(unsigned grid, unsigned grid_y, unsigned block, unsigned b, unsigned by, unsigned t) {
    gridDim = {grid, grid_y, 1};
    blockDim = {block, 1, 1};
    blockIdx = {b, by, 0};
    threadIdx = {t, 0, 0};
    emu_barrier = nullptr;
}

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
