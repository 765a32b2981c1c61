// Shared helpers of lowbit's CUDA kernels. Header-free on purpose (no <cuda_fp16.h>): fp16 and bf16
// travel as their 16-bit patterns (unsigned short) and convert with one PTX instruction, so every
// kernel compiles with NVRTC alone, on any machine, without a CUDA toolkit's include directory.
//
// LOWBIT_DTYPE selects the activation type of a module: 0 = float16, 1 = bfloat16, 2 = float32.
#pragma once

#ifndef LOWBIT_DTYPE
#define LOWBIT_DTYPE 0
#endif

typedef unsigned short u16;
typedef unsigned int u32;

#if LOWBIT_DTYPE == 2
typedef float act_t;
#else
typedef u16 act_t;
#endif

#ifdef LOWBIT_HOST_EMULATION
// The tests' host build of a kernel (tests/cuda_host/): the same code on the CPU, with C++'s
// _Float16 in place of the two PTX conversions.
__device__ __forceinline__ float h2f(u16 h) { _Float16 v; __builtin_memcpy(&v, &h, 2); return (float)v; }
__device__ __forceinline__ u16 f2h(float f) { _Float16 v = (_Float16)f; u16 h; __builtin_memcpy(&h, &v, 2); return h; }
#else
__device__ __forceinline__ float h2f(u16 h) {
    float f;
    asm("cvt.f32.f16 %0, %1;" : "=f"(f) : "h"(h));
    return f;
}

__device__ __forceinline__ u16 f2h(float f) {
    u16 h;
    asm("cvt.rn.f16.f32 %0, %1;" : "=h"(h) : "f"(f));
    return h;
}
#endif

__device__ __forceinline__ float bf2f(u16 b) { return __int_as_float(((u32)b) << 16); }

__device__ __forceinline__ u16 f2bf(float f) {
    // round to nearest even; NaN stays NaN (quiet bit set)
    u32 u = __float_as_uint(f);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (u16)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (u16)(u >> 16);
}

// activation element -> float and back, for the module's LOWBIT_DTYPE
__device__ __forceinline__ float act_load(const act_t* p) {
#if LOWBIT_DTYPE == 0
    return h2f(__ldg(p));
#elif LOWBIT_DTYPE == 1
    return bf2f(__ldg(p));
#else
    return __ldg(p);
#endif
}

__device__ __forceinline__ float act_to_f(act_t v) {
#if LOWBIT_DTYPE == 0
    return h2f(v);
#elif LOWBIT_DTYPE == 1
    return bf2f(v);
#else
    return v;
#endif
}

__device__ __forceinline__ act_t f_to_act(float f) {
#if LOWBIT_DTYPE == 0
    return f2h(f);
#elif LOWBIT_DTYPE == 1
    return f2bf(f);
#else
    return f;
#endif
}

// Sum of v over the 32 lanes of a warp (every lane gets the total).
__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// The float 2^23 + c for an integer 0 <= c < 2^23 held in the low bits of `bits` (the other bits of
// `bits` must be zero): one OR, no int->float conversion. Subtracting 2^23 gives c exactly.
#define LOWBIT_MAGIC 0x4B000000u
#define LOWBIT_MAGIC_F 8388608.0f
__device__ __forceinline__ float magic_float(u32 bits) { return __uint_as_float(LOWBIT_MAGIC | bits); }
