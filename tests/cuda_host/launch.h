// emulate_launch(grid, block, f): run f() once per CUDA thread, block after block; the threads of a
// block run concurrently (std::thread) so warp shuffles can meet. 1-D blocks of whole warps only.
#pragma once
#include <memory>
#include <thread>
#include <vector>

template <class F>
void emulate_launch(dim3 grid, dim3 block, F&& f) {
    const unsigned n = block.x;
    for (unsigned gz = 0; gz < grid.z; ++gz)
        for (unsigned gy = 0; gy < grid.y; ++gy)
            for (unsigned gx = 0; gx < grid.x; ++gx) {
                std::vector<std::unique_ptr<std::barrier<>>> bars;
                std::vector<LowbitWarp> warps(n / 32);
                for (unsigned w = 0; w < n / 32; ++w) {
                    bars.emplace_back(new std::barrier<>(32));
                    warps[w].bar = bars.back().get();
                }
                std::barrier<> block_bar(n);
                std::vector<std::thread> threads;
                for (unsigned t = 0; t < n; ++t)
                    threads.emplace_back([&, t] {
                        threadIdx = dim3{t, 0, 0};
                        blockIdx = dim3{gx, gy, gz};
                        blockDim = block;
                        gridDim = grid;
                        lowbit_warp = &warps[t / 32];
                        lowbit_block = &block_bar;
                        f();
                    });
                for (auto& th : threads) th.join();
            }
}
