#include "vq_gemm.cu"
#include "launch.h"

extern "C" void run(unsigned gx, unsigned gy, unsigned bx, const u16* c0, const void* c1, int codes_per_row,
                    const float* abs_tab, const float* tab1, float gain1, float gain0, const u16* row_scale,
                    const act_t* x, int ldx, act_t* y, int ldy, int N, int K, int B, int xvec) {
    emulate_launch(dim3{gx, gy, 1}, dim3{bx, 1, 1}, [&] {
        vq_gemm_kernel(c0, c1, codes_per_row, abs_tab, tab1, gain1, gain0, row_scale, x, ldx, y, ldy, N, K, B, xvec);
    });
}
