// ỹ = x̃ · W̃ᵀ for a QuIP#-style vector-quantized weight, batch 1..16 (GEMV / skinny GEMM).
//
// W̃[o, 8v : 8v+8] = gain0 · row_scale[o] · (E8P[c0[o, v]] + gain1 · S1[c1[o, v]]), where stage 1 (the
// residual) is absent (LOWBIT_STAGE2 0), an E81B code (1: 8-bit index into a 256 × 8 table) or a
// second E8P code (2). x̃ is the activation already in the rotated basis (the Hadamard transforms
// around this kernel are cuda/fwht.cu).
//
// Codes: c0 as rows of 16-bit words (the checkpoint's little-endian byte pairs), rows padded to
// whole chunks of 8 codes (one 128-bit load = 64 weights); c1 likewise (8 bytes per chunk for
// E81B). E8P decoding (the code layout of rust/src/vq/e8p.rs): with c = abs << 8 | shift << 7 | s7,
//   v_i = ±abs_tab[abs][i] (bit i of s7 set → −, i < 7; coordinate 7 negated when s7 has an odd
//         number of set bits) + (shift ? −1/4 : +1/4),
// abs_tab holding the source vector with coordinate 7 already negated when its sum is odd. Signs
// are applied by XOR into the float's sign bit. Accumulation in fp32; lanes stride over chunks and
// the partial sums are reduced with warp shuffles.
#include "common.cuh"

#ifndef LOWBIT_STAGE2
#define LOWBIT_STAGE2 0
#endif
#ifndef LOWBIT_BT
#define LOWBIT_BT 1
#endif
static_assert(LOWBIT_STAGE2 >= 0 && LOWBIT_STAGE2 <= 2, "LOWBIT_STAGE2 must be 0, 1 or 2");
static_assert(LOWBIT_BT == 1 || LOWBIT_BT == 2 || LOWBIT_BT == 4 || LOWBIT_BT == 8 || LOWBIT_BT == 16,
              "LOWBIT_BT must be 1, 2, 4, 8 or 16");

#define WARPS 4
#define RPW 2
#define CODES_PER_CHUNK 8

__device__ __forceinline__ void e8p_decode(const u32 c, const float* __restrict__ abs_tab, float (&v)[8]) {
    const float4* a = (const float4*)(abs_tab + (size_t)(c >> 8) * 8);
    const float4 a0 = __ldg(a), a1 = __ldg(a + 1);
    const float av[8] = {a0.x, a0.y, a0.z, a0.w, a1.x, a1.y, a1.z, a1.w};
    u32 s = c & 0x7fu;
    s |= (u32)(__popc(s) & 1) << 7;
    const float sh = (c & 0x80u) ? -0.25f : 0.25f;
#pragma unroll
    for (int i = 0; i < 8; ++i) v[i] = __uint_as_float(__float_as_uint(av[i]) ^ ((s << (31 - i)) & 0x80000000u)) + sh;
}

// x[k .. k+8) of one activation row (k + 8 <= K always: K is a multiple of 8).
__device__ __forceinline__ void load_x8(const act_t* __restrict__ xr, const int k, const bool vec, float (&xv)[8]) {
    if (vec) {
#if LOWBIT_DTYPE == 2
        const float4* p = (const float4*)(xr + k);
        const float4 t0 = __ldg(p), t1 = __ldg(p + 1);
        xv[0] = t0.x; xv[1] = t0.y; xv[2] = t0.z; xv[3] = t0.w;
        xv[4] = t1.x; xv[5] = t1.y; xv[6] = t1.z; xv[7] = t1.w;
#else
        const uint4 t = __ldg((const uint4*)(xr + k));
        const u32 raw[4] = {t.x, t.y, t.z, t.w};
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = act_to_f((u16)((raw[i >> 1] >> ((i & 1) * 16)) & 0xffffu));
#endif
    } else {
#pragma unroll
        for (int i = 0; i < 8; ++i) xv[i] = act_load(xr + k + i);
    }
}

// The codes of one chunk (8 codes = 64 weights) of RPW rows, both stages.
struct Chunk {
    u32 c0[RPW][4];
#if LOWBIT_STAGE2 == 1
    u32 c1[RPW][2];
#elif LOWBIT_STAGE2 == 2
    u32 c1[RPW][4];
#endif
};

// Rows past N load row N-1: their sums are computed and never stored.
__device__ __forceinline__ void load_chunk(const u16* __restrict__ c0, const void* __restrict__ c1,
                                           const int codes_per_row, const int row0, const int N, const int ch,
                                           Chunk& q) {
#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int row = min(row0 + r, N - 1);
        const size_t at = (size_t)row * codes_per_row + (size_t)ch * CODES_PER_CHUNK;
        const uint4 t = __ldg((const uint4*)(c0 + at));
        q.c0[r][0] = t.x; q.c0[r][1] = t.y; q.c0[r][2] = t.z; q.c0[r][3] = t.w;
#if LOWBIT_STAGE2 == 1
        const uint2 t1 = __ldg((const uint2*)((const unsigned char*)c1 + at));
        q.c1[r][0] = t1.x; q.c1[r][1] = t1.y;
#elif LOWBIT_STAGE2 == 2
        const uint4 t1 = __ldg((const uint4*)((const u16*)c1 + at));
        q.c1[r][0] = t1.x; q.c1[r][1] = t1.y; q.c1[r][2] = t1.z; q.c1[r][3] = t1.w;
#endif
    }
}

extern "C" __global__ void __launch_bounds__(WARPS * 32) vq_gemm_kernel(
    const u16* __restrict__ c0, const void* __restrict__ c1, const int codes_per_row,  // padded row length
    const float* __restrict__ abs_tab, const float* __restrict__ tab1, const float gain1,
    const float gain0, const u16* __restrict__ row_scale, const act_t* __restrict__ x, const int ldx, act_t* __restrict__ y,
    const int ldy, const int N, const int K, const int B, const int xvec) {
    constexpr int BT = LOWBIT_BT;
    const int warp = threadIdx.x >> 5, lane = threadIdx.x & 31;
    const int row0 = (blockIdx.x * WARPS + warp) * RPW;
    const int b0 = blockIdx.y * BT;
    if (row0 >= N) return;
    const bool vec = xvec != 0;
    const int n_codes = K >> 3;

    float acc[RPW][BT];
#pragma unroll
    for (int r = 0; r < RPW; ++r)
#pragma unroll
        for (int b = 0; b < BT; ++b) acc[r][b] = 0.0f;

    const int chunks = codes_per_row / CODES_PER_CHUNK;
    // Double buffering: the next chunk's codes are loaded before this chunk is decoded.
    Chunk q, qn;
    if (lane < chunks) load_chunk(c0, c1, codes_per_row, row0, N, lane, q);
    for (int ch = lane; ch < chunks; ch += 32) {
        if (ch + 32 < chunks) load_chunk(c0, c1, codes_per_row, row0, N, ch + 32, qn);
#pragma unroll
        for (int u = 0; u < CODES_PER_CHUNK; ++u) {
            const int v = ch * CODES_PER_CHUNK + u;
            if (v >= n_codes) break;
            float w[RPW][8];
#pragma unroll
            for (int r = 0; r < RPW; ++r) {
                e8p_decode((q.c0[r][u >> 1] >> ((u & 1) * 16)) & 0xffffu, abs_tab, w[r]);
#if LOWBIT_STAGE2 == 1
                const u32 c = (q.c1[r][u >> 2] >> ((u & 3) * 8)) & 0xffu;
                const float4* t = (const float4*)(tab1 + (size_t)c * 8);
                const float4 t0 = __ldg(t), t1 = __ldg(t + 1);
                w[r][0] = fmaf(gain1, t0.x, w[r][0]); w[r][1] = fmaf(gain1, t0.y, w[r][1]);
                w[r][2] = fmaf(gain1, t0.z, w[r][2]); w[r][3] = fmaf(gain1, t0.w, w[r][3]);
                w[r][4] = fmaf(gain1, t1.x, w[r][4]); w[r][5] = fmaf(gain1, t1.y, w[r][5]);
                w[r][6] = fmaf(gain1, t1.z, w[r][6]); w[r][7] = fmaf(gain1, t1.w, w[r][7]);
#elif LOWBIT_STAGE2 == 2
                float w1[8];
                e8p_decode((q.c1[r][u >> 1] >> ((u & 1) * 16)) & 0xffffu, abs_tab, w1);
#pragma unroll
                for (int i = 0; i < 8; ++i) w[r][i] = fmaf(gain1, w1[i], w[r][i]);
#endif
            }
#pragma unroll
            for (int b = 0; b < BT; ++b) {
                const int bb = b0 + b;
                if (bb >= B) break;
                float xv[8];
                load_x8(x + (size_t)bb * ldx, v * 8, vec, xv);
#pragma unroll
                for (int r = 0; r < RPW; ++r) {
                    float p = acc[r][b];
#pragma unroll
                    for (int i = 0; i < 8; ++i) p = fmaf(xv[i], w[r][i], p);
                    acc[r][b] = p;
                }
            }
        }
        q = qn;
    }

#pragma unroll
    for (int r = 0; r < RPW; ++r) {
        const int row = row0 + r;
        const float rs = h2f(__ldg(row_scale + min(row, N - 1)));
#pragma unroll
        for (int b = 0; b < BT; ++b) {
            const float s = warp_sum(acc[r][b]);
            const int bb = b0 + b;
            if (lane == 0 && row < N && bb < B) y[(size_t)bb * ldy + row] = f_to_act(gain0 * rs * s);
        }
    }
}
