// Fused fast Walsh–Hadamard transform of the last axis of a row-major (rows, n) activation tensor:
//
//     y = ((x ⊙ pre) @ (H_K ⊗ H_P) / sqrt(n)) ⊙ post,      n = K·P, P = 2^m >= 8, n <= 32768,
//
// H_P Sylvester (natural order), H_K one of lowbit's ±1 tables (K = 1: none), index i = a·P + c
// (a < K, c < P). pre / post: optional float32 (n,) vectors (null = none); y == x is allowed.
// Arithmetic in fp32; every rounding is explicit (__fmul_rn / __fmaf_rn, no contraction), so
// lowbit.kernels.hadamard.fwht_emulate reproduces the fp32 result step for step.
//
// Layout of a launch (see hadamard._launch_plan, which the emulation shares):
// * a block transforms a tile of `rpb` consecutive rows (contiguous memory); the tile is cut into
//   chunks of 8 consecutive elements and the chunks into warp-chunks of 32 chunks (256 elements);
//   warp w of W takes warp-chunks w + i·W (i < R), lane l chunk 32·(w + i·W) + l. Slots past the
//   tile's end are idle but still take part in the shuffles (their partners are idle too).
// * bits 0..2 of the P index (inside a chunk) in registers, after a 16-byte load;
// * K = 1 and P <= 256: bits 3..m-1 (chunk bits = lane bits) by warp shuffles, then scale, post
//   and a 16-byte store — no shared memory;
// * otherwise the tile goes to shared memory (fp32, padded: see fwht_pos) and bits 3..m-1 are done
//   in passes of up to 5 bits (each thread a group of up to 32 elements in registers: 2 shared
//   memory accesses per element and pass, fewer than one shuffle per element and bit); then
//   K = 1: scale, post and a 16-byte store per chunk; K > 1: the H_K stage, each thread 4 values
//   of a × 2 columns (reads of K/4 floats and K FMAs per output), fused with scale, post, store.
#include "common.cuh"

// Position of tile element e in shared memory: 4 floats of padding after every 32 (the 16-byte
// chunk stores / loads of a warp hit each bank once per wavefront) and 8 more after every 256 (the
// pass over bits 3..7, whose warps read 8 consecutive elements in each of 4 blocks of 256, too).
__device__ __forceinline__ int fwht_pos(int e) { return e + ((e >> 5) << 2) + ((e >> 8) << 3); }

__device__ __forceinline__ void fwht_radix8(float* v) {
#pragma unroll
    for (int h = 1; h < 8; h <<= 1) {
#pragma unroll
        for (int j = 0; j < 8; ++j) {
            if (!(j & h)) {
                const float a = v[j], b = v[j + h];
                v[j] = a + b;
                v[j + h] = a - b;
            }
        }
    }
}

// 8 consecutive activations -> fp32; `vec`: the address is 16-byte aligned
__device__ __forceinline__ void fwht_load8(const act_t* p, bool vec, float* v) {
#if LOWBIT_DTYPE == 2
    if (vec) {
        const float4 a = *reinterpret_cast<const float4*>(p);
        const float4 b = *reinterpret_cast<const float4*>(p + 4);
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
        return;
    }
#else
    if (vec) {
        const uint4 u = *reinterpret_cast<const uint4*>(p);
        const u32 w[4] = {u.x, u.y, u.z, u.w};
#pragma unroll
        for (int k = 0; k < 4; ++k) {
            v[2 * k] = act_to_f((u16)(w[k] & 0xffffu));
            v[2 * k + 1] = act_to_f((u16)(w[k] >> 16));
        }
        return;
    }
#endif
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = act_to_f(p[j]);
}

__device__ __forceinline__ void fwht_store8(act_t* p, bool vec, const float* v) {
#if LOWBIT_DTYPE == 2
    if (vec) {
        *reinterpret_cast<float4*>(p) = make_float4(v[0], v[1], v[2], v[3]);
        *reinterpret_cast<float4*>(p + 4) = make_float4(v[4], v[5], v[6], v[7]);
        return;
    }
#else
    if (vec) {
        u32 w[4];
#pragma unroll
        for (int k = 0; k < 4; ++k) w[k] = (u32)f_to_act(v[2 * k]) | ((u32)f_to_act(v[2 * k + 1]) << 16);
        *reinterpret_cast<uint4*>(p) = make_uint4(w[0], w[1], w[2], w[3]);
        return;
    }
#endif
#pragma unroll
    for (int j = 0; j < 8; ++j) p[j] = f_to_act(v[j]);
}

// 2 consecutive outputs; `vec`: the tensor is 16-byte aligned (so an even element is 4/8-byte aligned)
__device__ __forceinline__ void fwht_store2(act_t* p, bool vec, float a, float b) {
    if (vec) {
#if LOWBIT_DTYPE == 2
        *reinterpret_cast<float2*>(p) = make_float2(a, b);
#else
        *reinterpret_cast<u32*>(p) = (u32)f_to_act(a) | ((u32)f_to_act(b) << 16);
#endif
    } else {
        p[0] = f_to_act(a);
        p[1] = f_to_act(b);
    }
}

// 8 consecutive float32 of a (n,) vector at a multiple-of-8 offset
__device__ __forceinline__ void fwht_vec8(const float* p, bool vec, float* v) {
    if (vec) {
        const float4 a = __ldg(reinterpret_cast<const float4*>(p));
        const float4 b = __ldg(reinterpret_cast<const float4*>(p + 4));
        v[0] = a.x; v[1] = a.y; v[2] = a.z; v[3] = a.w;
        v[4] = b.x; v[5] = b.y; v[6] = b.z; v[7] = b.w;
    } else {
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __ldg(p + j);
    }
}

// y = v · scale (· post) for the chunk at tile element e0 (row column col), then the store
__device__ __forceinline__ void fwht_finish8(float* v, act_t* y, bool vec, const float* post, bool vecp, int col,
                                             float scale) {
#pragma unroll
    for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(v[j], scale);
    if (post != nullptr) {
        float s[8];
        fwht_vec8(post + col, vecp, s);
#pragma unroll
        for (int j = 0; j < 8; ++j) v[j] = __fmul_rn(v[j], s[j]);
    }
    fwht_store8(y, vec, v);
}

// One group of a shared-memory pass: the 2^RB elements e + k·2^B (k < 2^RB), e with its bits
// B .. B+RB-1 zero. Bits that do not overlap add without carries, so fwht_pos(e + k·2^B) =
// fwht_pos(e) + fwht_pos(k·2^B): one address, compile-time offsets.
template <int B, int RB>
__device__ __forceinline__ void fwht_smem_group(float* sm, int e) {
    float* p = sm + fwht_pos(e);
    float t[1 << RB];
#pragma unroll
    for (int k = 0; k < (1 << RB); ++k) t[k] = p[fwht_pos(k << B)];
#pragma unroll
    for (int h = 1; h < (1 << RB); h <<= 1) {
#pragma unroll
        for (int j = 0; j < (1 << RB); ++j) {
            if (!(j & h)) {
                const float a = t[j], b = t[j + h];
                t[j] = a + b;
                t[j + h] = a - b;
            }
        }
    }
#pragma unroll
    for (int k = 0; k < (1 << RB); ++k) p[fwht_pos(k << B)] = t[k];
}

// P-bits B .. B+r-1, r = min(5, m - B) >= 1, for the first valid_len elements of the tile: group q
// has its bits below B from q (consecutive lanes, consecutive addresses) and its bits from B + r up
// from q >> B. No barrier inside.
template <int B>
__device__ __forceinline__ void fwht_smem_pass(float* sm, int m, int valid_len) {
    const int r = min(5, m - B);
    const int groups = valid_len >> r;
    for (int q = threadIdx.x; q < groups; q += blockDim.x) {
        const int e = ((q >> B) << (B + r)) | (q & ((1 << B) - 1));
        switch (r) {
            case 5: fwht_smem_group<B, 5>(sm, e); break;
            case 4: fwht_smem_group<B, 4>(sm, e); break;
            case 3: fwht_smem_group<B, 3>(sm, e); break;
            case 2: fwht_smem_group<B, 2>(sm, e); break;
            default: fwht_smem_group<B, 1>(sm, e); break;
        }
    }
}

template <int R>
__device__ __forceinline__ void fwht_tile(const act_t* x, act_t* y, const float* pre, const float* post,
                                          const float* hk, int rows, int n, int K, int m, int rpb, float scale) {
    extern __shared__ float4 fwht_smem4[];
    float* sm = reinterpret_cast<float*>(fwht_smem4);

    const int tid = threadIdx.x, lane = tid & 31, w = tid >> 5, W = blockDim.x >> 5;
    const long long row0 = (long long)blockIdx.x * rpb;
    const int rows_here = min(rpb, (int)(rows - row0));
    const int C = n >> 3;                        // chunks per row
    const int valid_chunks = rows_here * C;
    const int valid_len = rows_here * n;
    const act_t* xt = x + row0 * n;
    act_t* yt = y + row0 * n;
    typedef unsigned long long addr_t;
    const bool vec = ((reinterpret_cast<addr_t>(x) | reinterpret_cast<addr_t>(y)) & 15) == 0;
    const bool vecp = ((reinterpret_cast<addr_t>(pre) | reinterpret_cast<addr_t>(post)) & 15) == 0;  // null: aligned
    const bool use_smem = K > 1 || m > 8;

    // 1. load 8 consecutive elements per slot (· pre), P-bits 0..2 in registers
    float v[R][8];
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int g = ((w + i * W) << 5) + lane;
        if (g < valid_chunks) {
            const int e0 = g << 3;
            fwht_load8(xt + e0, vec, v[i]);
            if (pre != nullptr) {
                float s[8];
                fwht_vec8(pre + e0 % n, vecp, s);
#pragma unroll
                for (int j = 0; j < 8; ++j) v[i][j] = __fmul_rn(v[i][j], s[j]);
            }
        } else {
#pragma unroll
            for (int j = 0; j < 8; ++j) v[i][j] = 0.0f;
        }
        fwht_radix8(v[i]);
    }

    if (!use_smem) {  // K = 1, P <= 256: P-bits 3..m-1 = lane bits 0..m-4, butterflies across lanes
        for (int s = 0; s < m - 3; ++s) {
            const int mask = 1 << s;
            const bool upper = (lane & mask) != 0;
#pragma unroll
            for (int i = 0; i < R; ++i) {
#pragma unroll
                for (int j = 0; j < 8; ++j) {
                    const float o = __shfl_xor_sync(0xffffffffu, v[i][j], mask);
                    v[i][j] = upper ? o - v[i][j] : v[i][j] + o;
                }
            }
        }
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int g = ((w + i * W) << 5) + lane;
            if (g < valid_chunks) {
                const int e0 = g << 3;
                fwht_finish8(v[i], yt + e0, vec, post, vecp, e0 % n, scale);
            }
        }
        return;
    }

    // 2. to shared memory (fp32, padded)
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int g = ((w + i * W) << 5) + lane;
        if (g < valid_chunks) {
            const int p = fwht_pos(g << 3);
            *reinterpret_cast<float4*>(sm + p) = make_float4(v[i][0], v[i][1], v[i][2], v[i][3]);
            *reinterpret_cast<float4*>(sm + p + 4) = make_float4(v[i][4], v[i][5], v[i][6], v[i][7]);
        }
    }
    __syncthreads();

    // 3. P-bits 3 .. m-1 in place, in passes of up to 5 bits: 3..7, 8..12, 13..14
    if (m > 3) {
        fwht_smem_pass<3>(sm, m, valid_len);
        __syncthreads();
    }
    if (m > 8) {
        fwht_smem_pass<8>(sm, m, valid_len);
        __syncthreads();
    }
    if (m > 13) {
        fwht_smem_pass<13>(sm, m, valid_len);
        __syncthreads();
    }

    // 4. the output
    if (K == 1) {
#pragma unroll
        for (int i = 0; i < R; ++i) {
            const int g = ((w + i * W) << 5) + lane;
            if (g < valid_chunks) {
                const int e0 = g << 3;
                const int p = fwht_pos(e0);
                const float4 a = *reinterpret_cast<const float4*>(sm + p);
                const float4 c = *reinterpret_cast<const float4*>(sm + p + 4);
                float t[8] = {a.x, a.y, a.z, a.w, c.x, c.y, c.z, c.w};
                fwht_finish8(t, yt + e0, vec, post, vecp, e0 % n, scale);
            }
        }
        return;
    }
    // H_K stage: item g of a row = (a-block ab of 4 rows of H_K, column pair cp): the 8 outputs
    // y[a0 + q, c + {0, 1}] = sum_b hk[b, a0 + q] · z[b, c + {0, 1}], q < 4, a0 = 4·ab, c = 2·cp
    const int half_m = m - 1;  // log2 of the column pairs per P-group
#pragma unroll
    for (int i = 0; i < R; ++i) {
        const int g = ((w + i * W) << 5) + lane;
        if (g < valid_chunks) {
            const int r = g / C;
            const int ir = g - r * C;
            const int c = (ir & ((1 << half_m) - 1)) << 1;
            const int a0 = (ir >> half_m) << 2;
            const int base = r * n + c;
            float acc[4][2];
#pragma unroll
            for (int q = 0; q < 4; ++q) acc[q][0] = acc[q][1] = 0.0f;
            for (int bb = 0; bb < K; ++bb) {
                const float2 z = *reinterpret_cast<const float2*>(sm + fwht_pos(base + (bb << m)));
                const float4 h = __ldg(reinterpret_cast<const float4*>(hk + bb * K + a0));
                acc[0][0] = __fmaf_rn(h.x, z.x, acc[0][0]);
                acc[0][1] = __fmaf_rn(h.x, z.y, acc[0][1]);
                acc[1][0] = __fmaf_rn(h.y, z.x, acc[1][0]);
                acc[1][1] = __fmaf_rn(h.y, z.y, acc[1][1]);
                acc[2][0] = __fmaf_rn(h.z, z.x, acc[2][0]);
                acc[2][1] = __fmaf_rn(h.z, z.y, acc[2][1]);
                acc[3][0] = __fmaf_rn(h.w, z.x, acc[3][0]);
                acc[3][1] = __fmaf_rn(h.w, z.y, acc[3][1]);
            }
#pragma unroll
            for (int q = 0; q < 4; ++q) {
                const int col = ((a0 + q) << m) + c;
                float o0 = __fmul_rn(acc[q][0], scale), o1 = __fmul_rn(acc[q][1], scale);
                if (post != nullptr) {
                    float2 s;
                    if (vecp) {
                        s = __ldg(reinterpret_cast<const float2*>(post + col));
                    } else {
                        s.x = __ldg(post + col);
                        s.y = __ldg(post + col + 1);
                    }
                    o0 = __fmul_rn(o0, s.x);
                    o1 = __fmul_rn(o1, s.y);
                }
                fwht_store2(yt + r * n + col, vec, o0, o1);
            }
        }
    }
}

// R = warp-chunk slots per warp (8·R elements per thread): the launcher takes 1 for n <= 4096, 2 up
// to 8192, 4 up to 32768 (at most 512 threads per block up to n = 16384, 1024 above). Arguments:
// x, y (may be x), pre, post, hk (K×K ±1 float32, row-major; null when K = 1), rows, n, K, m
// (P = 2^m), rows per block, scale (float32(1/sqrt(n))).
#define FWHT_KERNEL(NAME, R)                                                                                 \
    extern "C" __global__ void __launch_bounds__(1024)                                                       \
        NAME(const act_t* x, act_t* y, const float* pre, const float* post, const float* hk, int rows, int n, \
             int K, int m, int rpb, float scale) {                                                           \
        fwht_tile<R>(x, y, pre, post, hk, rows, n, K, m, rpb, scale);                                        \
    }

FWHT_KERNEL(fwht_r1, 1)
FWHT_KERNEL(fwht_r2, 2)
FWHT_KERNEL(fwht_r4, 4)
