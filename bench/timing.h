// Timing for the benchmarks: CUDA events around repeated calls on the default stream.
#pragma once

#include <functional>

#include "../kernels/common.cuh"

// Milliseconds per call: the mean of `reps` calls after a warm-up; negative where the call throws
// (cuBLASLt without an algorithm for the shape).
inline double time_ms(const std::function<void()>& call, int reps = 20) {
    try {
        call();
        CUDA_CHECK(cudaDeviceSynchronize());
    } catch (const std::exception&) {
        return -1.0;
    }
    cudaEvent_t start, stop;
    CUDA_CHECK(cudaEventCreate(&start));
    CUDA_CHECK(cudaEventCreate(&stop));
    CUDA_CHECK(cudaEventRecord(start));
    for (int i = 0; i < reps; i++) call();
    CUDA_CHECK(cudaEventRecord(stop));
    CUDA_CHECK(cudaEventSynchronize(stop));
    float ms = 0.0f;
    CUDA_CHECK(cudaEventElapsedTime(&ms, start, stop));
    cudaEventDestroy(start);
    cudaEventDestroy(stop);
    return ms / reps;
}
