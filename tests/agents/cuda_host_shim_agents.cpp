// Host (CPU) build of kernels/agents.cu (+ philox.cuh) for tests/agents/test_kernels_emulated.py.
//
// Reuses the CUDA built-ins of tests/fields/cuda_host_shim.cpp (threadIdx/blockIdx, atomics,
// __float_as_uint, __umulhi, ...) without its diffusion kernels. Every agents kernel is a plain
// one-thread-per-item launch without shared memory or barriers, so the test runs the emulated
// threads one after another in the order it chooses (forward, reversed, shuffled), which exposes
// any dependence of the results on thread order.
// Build: g++ -std=c++20 -O1 -ffp-contract=off -shared -fPIC -I kernels -I tests/fields
//        tests/agents/cuda_host_shim_agents.cpp -o libemu_agents.so
#define TSIM_SHIM_NO_DIFFUSION
#include "cuda_host_shim.cpp"

#include "agents.cu"
