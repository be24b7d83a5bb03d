// Host (CPU) build of kernels/blood.cu for tests/biology/test_blood_device.py.
//
// Reuses the CUDA built-ins of tests/fields/cuda_host_shim.cpp (threadIdx/blockIdx) without its
// diffusion kernels. pow and exp are glibc's, the same functions Python's float ** and math.exp
// call, so the kernel and its host twin must agree bit for bit here.
// Build: g++ -std=c++20 -O1 -ffp-contract=off -shared -fPIC -I kernels -I tests/fields
//        tests/biology/cuda_host_shim_blood.cpp -o libemu_blood.so
#define TSIM_SHIM_NO_DIFFUSION
#include "cuda_host_shim.cpp"

#include "blood.cu"
