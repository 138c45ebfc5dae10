// The test runner: doctest's main, with every test of the "gpu" suite filtered out (and so counted as skipped)
// where no GPU can be used, and of the "multi-gpu" suite where fewer than two can.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../kernels/common.cuh"

int main(int argc, char** argv) {
    doctest::Context context;
    context.applyCommandLine(argc, argv);
    int gpus = 0;
    if (gpu_available()) CUDA_CHECK(cudaGetDeviceCount(&gpus));
    if (gpus == 0) {
        std::printf("no usable GPU: the gpu test suite is skipped\n");
        context.addFilter("test-suite-exclude", "gpu");
    }
    if (gpus < 2) {
        std::printf("fewer than two GPUs: the multi-gpu test suite is skipped\n");
        context.addFilter("test-suite-exclude", "multi-gpu");
    }
    return context.run();
}
