#include "uniform_gemm.cu"
#include "launch.h"

extern "C" void run(unsigned gx, unsigned gy, unsigned bx, const u32* qw, int words_per_row, const u16* scales,
                    const u16* zeros, float zero_const, int n_groups, int group_size, const int* perm,
                    const act_t* x, int ldx, act_t* y, int ldy, const float* bias, int N, int K, int B, int xvec) {
    emulate_launch(dim3{gx, gy, 1}, dim3{bx, 1, 1}, [&] {
        uniform_gemm_kernel(qw, words_per_row, scales, zeros, zero_const, n_groups, group_size, perm, x, ldx, y,
                            ldy, bias, N, K, B, xvec);
    });
}
