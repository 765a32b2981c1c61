// A host build of lowbit's CUDA kernels, for tests on machines without a GPU.
//
// Force-included (g++ -include shim.h) before a kernel source compiled with -DLOWBIT_HOST_EMULATION:
// the CUDA keywords become plain C++, the vector types and intrinsics get host versions, and
// launch.h runs every thread of a block as a std::thread, with warp shuffles exchanged through a
// per-warp buffer and barrier (the kernels under test shuffle only with whole warps converged) and
// __syncthreads a block-wide barrier (no thread may leave before a barrier the others reach).
#pragma once
#include <algorithm>
#include <barrier>
#include <cmath>
#include <cstdint>
#include <cstring>

#define __global__
#define __device__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __restrict__ __restrict
// Dynamic shared memory (`extern __shared__ T name[];`) becomes a global array the entry file
// defines (blocks run one after another). Static __shared__ arrays are not supported.
#define __shared__

struct uint4 { unsigned x, y, z, w; };
struct uint2 { unsigned x, y; };
struct float4 { float x, y, z, w; };
struct float2 { float x, y; };
struct dim3 { unsigned x = 1, y = 1, z = 1; };

inline thread_local dim3 threadIdx, blockIdx, blockDim, gridDim;

template <class T> inline T __ldg(const T* p) { return *p; }
inline float __uint_as_float(unsigned u) { float f; std::memcpy(&f, &u, 4); return f; }
inline unsigned __float_as_uint(float f) { unsigned u; std::memcpy(&u, &f, 4); return u; }
inline float __int_as_float(int i) { float f; std::memcpy(&f, &i, 4); return f; }
inline int __float_as_int(float f) { int i; std::memcpy(&i, &f, 4); return i; }
inline int __popc(unsigned v) { return __builtin_popcount(v); }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float4 make_float4(float x, float y, float z, float w) { return float4{x, y, z, w}; }
inline float2 make_float2(float x, float y) { return float2{x, y}; }
inline uint4 make_uint4(unsigned x, unsigned y, unsigned z, unsigned w) { return uint4{x, y, z, w}; }
using std::max;
using std::min;

struct LowbitWarp {
    std::barrier<>* bar;
    float vals[32];
};
inline thread_local LowbitWarp* lowbit_warp = nullptr;
inline thread_local std::barrier<>* lowbit_block = nullptr;

inline void __syncthreads() { lowbit_block->arrive_and_wait(); }

inline float __shfl_xor_sync(unsigned, float v, int o) {
    const int lane = threadIdx.x & 31;
    lowbit_warp->vals[lane] = v;
    lowbit_warp->bar->arrive_and_wait();
    const float r = lowbit_warp->vals[lane ^ o];
    lowbit_warp->bar->arrive_and_wait();
    return r;
}
