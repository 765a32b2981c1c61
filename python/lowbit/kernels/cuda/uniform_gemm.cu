// y = x · Wᵀ (+ bias) for a packed uniform low-bit weight, batch 1..16: GEMV / skinny GEMM.
//
// Weight: W[o, perm[j]] = scale[o, g] · (code[o, j] − zero[o, g]), g = j / group_size, codes in the
// GPU layout of lowbit/kernels/uniform.py (built once from QuantLinear.qweight):
//   LOWBIT_BITS 2, 4, 8: one row of 32-bit words per output row, codes LSB first (word w holds
//     codes w·32/BITS …), rows padded to whole chunks of 4 words (one 128-bit load). This is the
//     checkpoint's byte layout, padded.
//   LOWBIT_BITS 3: chunks of 128 codes in 12 words: words 0..7 hold the low 2 bits of codes
//     16·w … 16·w+15 (LSB first), words 8..11 the high bit of codes 32·v … 32·v+31.
// 1-bit and ternary weights use the 2-bit layout; 5..7-bit weights the 8-bit one.
//
// Work split: a warp owns RPW output rows; its lanes stride over the row's 128-bit chunks, so a warp
// reads 512 contiguous bytes per row per step (coalesced). A chunk is decoded in units of 16 bits
// (8 codes at 3 bits): for BITS 2/4/8 the code i of a unit is turned into a float without a shift
// or an int->float conversion — OR-ing the masked bits into the mantissa of 2^23 gives
// 2^23 + code·2^(BITS·i) exactly; the matching activation was pre-multiplied by 2^(−BITS·i), so
// the product is exactly x·code. Per unit and batch row:
//   P = Σ x_i·code_i,  X = Σ x_i   →   acc += scale·(P − zero·X)          (all fp32)
// The lanes' partial sums are reduced with warp shuffles at the end.
#include "common.cuh"

#ifndef LOWBIT_BITS
#define LOWBIT_BITS 4
#endif

#define WARPS 4
#define RPW 2

constexpr int BITS = LOWBIT_BITS;
static_assert(BITS == 2 || BITS == 3 || BITS == 4 || BITS == 8, "LOWBIT_BITS must be 2, 3, 4 or 8");
constexpr int UC = (BITS == 3) ? 8 : 16 / BITS;    // codes per unit
constexpr int UPC = (BITS == 3) ? 16 : 8;          // units per chunk
constexpr int CPC = UC * UPC;                      // codes per chunk
constexpr int WPC = (BITS == 3) ? 12 : 4;          // 32-bit words per chunk

// vals[i] = code_i · 2^(BITS·i) (BITS 2/4/8) or code_i (BITS 3) of one unit: for BITS 2/4/8 `lo`
// holds the unit's 16 bits in its low half (the high half is ignored by the masks); for BITS 3 the
// low 16 bits of `lo` are the 2-bit parts and the low 8 bits of `hi` the high bits.
__device__ __forceinline__ void unit_codes(const u32 lo, const u32 hi, float (&vals)[UC]) {
#if LOWBIT_BITS == 3
#pragma unroll
    for (int i = 0; i < UC; ++i) {
        const u32 c = ((lo >> (2 * i)) & 3u) | (((hi >> i) & 1u) << 2);
        vals[i] = magic_float(c) - LOWBIT_MAGIC_F;
    }
#else
    constexpr u32 M = (1u << BITS) - 1u;
#pragma unroll
    for (int i = 0; i < UC; ++i) vals[i] = magic_float(lo & (M << (BITS * i))) - LOWBIT_MAGIC_F;
#endif
}

// The factor the activation of code i of a unit is multiplied by (the inverse of the code's
// position scale above).
__device__ __forceinline__ float pos_scale(const int i) {
#if LOWBIT_BITS == 3
    return 1.0f;
#else
    return __uint_as_float((u32)(127 - BITS * i) << 23);  // 2^(−BITS·i)
#endif
}

// x[k .. k+UC) of one activation row into floats; columns >= K read as 0. `vec`: no permutation
// and the row is aligned for one vector load of the unit.
__device__ __forceinline__ void load_x(const act_t* __restrict__ xr, const int* __restrict__ perm, const int k,
                                       const int K, const bool vec, float (&xv)[UC]) {
    if (vec && k + UC <= K) {
        constexpr int NB = UC * (int)sizeof(act_t);  // 4, 8, 16 or 32 bytes
        constexpr int NW = NB / 4;
        u32 raw[NW];
        const void* p = (const void*)(xr + k);
        if constexpr (NB >= 16) {
#pragma unroll
            for (int j = 0; j < NB / 16; ++j) {
                const uint4 t = __ldg((const uint4*)p + j);
                raw[4 * j] = t.x; raw[4 * j + 1] = t.y; raw[4 * j + 2] = t.z; raw[4 * j + 3] = t.w;
            }
        } else if constexpr (NB == 8) {
            const uint2 t = __ldg((const uint2*)p);
            raw[0] = t.x; raw[1] = t.y;
        } else {
            raw[0] = __ldg((const u32*)p);
        }
#pragma unroll
        for (int i = 0; i < UC; ++i) {
#if LOWBIT_DTYPE == 2
            xv[i] = __uint_as_float(raw[i]);
#else
            xv[i] = act_to_f((u16)((raw[i >> 1] >> ((i & 1) * 16)) & 0xffffu));
#endif
        }
    } else {
#pragma unroll
        for (int i = 0; i < UC; ++i) {
            const int kk = k + i;
            xv[i] = kk < K ? act_load(xr + (perm ? __ldg(perm + kk) : kk)) : 0.0f;
        }
    }
}

// The chunk `ch` (WPC words) of rows row0 .. row0+RPW-1; rows past N read as zero codes.
__device__ __forceinline__ void load_chunk(const u32* __restrict__ qw, const int words_per_row, const int row0,
                                           const int N, const int ch, u32 (&q)[RPW][WPC]) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int row = row0 + r;
        if (row < N) {
            const uint4* p = (const uint4*)(qw + (size_t)row * words_per_row + (size_t)ch * WPC);
#pragma unroll
            for (int j = 0; j < WPC / 4; ++j) {
                const uint4 t = __ldg(p + j);
                q[r][4 * j] = t.x; q[r][4 * j + 1] = t.y; q[r][4 * j + 2] = t.z; q[r][4 * j + 3] = t.w;
            }
        } else {
#pragma unroll
            for (int j = 0; j < WPC; ++j) q[r][j] = 0u;
        }
    }
}

template <int BT>
__device__ __forceinline__ void uniform_gemm(
    const u32* __restrict__ qw, const int words_per_row,
    const u16* __restrict__ scales, const u16* __restrict__ zeros, const float zero_const,
    const int n_groups, const int group_size, const int* __restrict__ perm,
    const act_t* __restrict__ x, const int ldx, act_t* __restrict__ y, const int ldy,
    const float* __restrict__ bias, const int N, const int K, const int B, const int xvec) {
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + warp) * RPW;
    const int b0 = blockIdx.y * BT;
    if (row0 >= N) return;  // the whole warp leaves; there is no block-wide barrier
    const bool vec = xvec != 0;

    float acc[RPW][BT];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[r][b] = 0.0f;

    const int chunks = words_per_row / WPC;
    // Double buffering: the next chunk's codes are loaded before this chunk is decoded, so every
    // warp keeps two 128-bit loads per row in flight.
    u32 q[RPW][WPC], qn[RPW][WPC];
    if (lane < chunks) load_chunk(qw, words_per_row, row0, N, lane, q);
    for (int ch = lane; ch < chunks; ch += 32) {
        if (ch + 32 < chunks) load_chunk(qw, words_per_row, row0, N, ch + 32, qn);
        // The chunk's words carrying units (all 4; at 3 bits the 8 low-plane words) are consumed from
        // q[r][0], two units each, and shifted down after use: the loop need not be unrolled (large
        // batch tiles) and every register index stays a compile-time constant.
#pragma unroll(BT >= 8 ? 1 : UPC / 2)
        for (int wi = 0; wi < UPC / 2; ++wi) {
#pragma unroll
            for (int h = 0; h < 2; ++h) {
                const int u = 2 * wi + h;
                const int k = ch * CPC + u * UC;
                if (k < K) {  // else: padding at the end of the row
                    const int g = k / group_size;  // the host checks group_size % UC == 0
                    float w[RPW][UC], s[RPW], z[RPW];
#pragma unroll
                    for (int r = 0; r < RPW; ++r) {
#if LOWBIT_BITS == 3
                        // high bits of unit u: byte (u & 3) of hi-plane word u >> 2 (q[r][8] after shifts)
                        unit_codes(q[r][0] >> (16 * h), q[r][8] >> (8 * (2 * (wi & 1) + h)), w[r]);
#else
                        unit_codes(h ? q[r][0] >> 16 : q[r][0], 0u, w[r]);
#endif
                        const int row = min(row0 + r, N - 1);
                        s[r] = h2f(__ldg(scales + (size_t)row * n_groups + g));
                        z[r] = zeros ? h2f(__ldg(zeros + (size_t)row * n_groups + g)) : zero_const;
                    }
#pragma unroll
                    for (int b = 0; b < BT; ++b) {
                        const int bb = b0 + b;
                        if (bb < B) {
                            float xv[UC];
                            load_x(x + (size_t)bb * ldx, perm, k, K, vec, xv);
                            float xs = 0.0f;
#pragma unroll
                            for (int i = 0; i < UC; ++i) {
                                xs += xv[i];
                                xv[i] *= pos_scale(i);
                            }
#pragma unroll
                            for (int r = 0; r < RPW; ++r) {
                                float p = 0.0f;
#pragma unroll
                                for (int i = 0; i < UC; ++i) p = fmaf(xv[i], w[r][i], p);
                                acc[r][b] = fmaf(s[r], fmaf(-z[r], xs, p), acc[r][b]);
                            }
                        }
                    }
                }
            }
            // shift: the next unit-carrying word into q[r][0]; at 3 bits the high-plane words move
            // on every second word (each covers two low-plane words)
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
#if LOWBIT_BITS == 3
#pragma unroll
                for (int j = 0; j < 7; ++j) q[r][j] = q[r][j + 1];
                if (wi & 1) {
#pragma unroll
                    for (int j = 8; j < 11; ++j) q[r][j] = q[r][j + 1];
                }
#else
#pragma unroll
                for (int j = 0; j < WPC - 1; ++j) q[r][j] = q[r][j + 1];
#endif
            }
        }
#pragma unroll
        for (int r = 0; r < RPW; ++r)
#pragma unroll
            for (int j = 0; j < WPC; ++j) q[r][j] = qn[r][j];
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
#pragma unroll
        for (int b = 0; b < BT; ++b) {
            const float v = warp_sum(acc[r][b]);
            const int row = row0 + r, bb = b0 + b;
            if (lane == 0 && row < N && bb < B) y[(size_t)bb * ldy + row] = f_to_act(v + (bias ? __ldg(bias + row) : 0.0f));
        }
    }
}

// The entry point, for the batch tile LOWBIT_BT (rows of x one block handles; grid.y covers the
// rest). One module per (LOWBIT_BITS, LOWBIT_DTYPE, LOWBIT_BT), compiled on first use.
#ifndef LOWBIT_BT
#define LOWBIT_BT 1
#endif
static_assert(LOWBIT_BT == 1 || LOWBIT_BT == 2 || LOWBIT_BT == 4 || LOWBIT_BT == 8 || LOWBIT_BT == 16,
              "LOWBIT_BT must be 1, 2, 4, 8 or 16");

extern "C" __global__ void __launch_bounds__(WARPS * 32) uniform_gemm_kernel(
    const u32* __restrict__ qw, const int words_per_row, const u16* __restrict__ scales,
    const u16* __restrict__ zeros, const float zero_const, const int n_groups, const int group_size,
    const int* __restrict__ perm, const act_t* __restrict__ x, const int ldx, act_t* __restrict__ y,
    const int ldy, const float* __restrict__ bias, const int N, const int K, const int B, const int xvec) {
    uniform_gemm<LOWBIT_BT>(qw, words_per_row, scales, zeros, zero_const, n_groups, group_size, perm, x, ldx,
                            y, ldy, bias, N, K, B, xvec);
}
