// The test runner: doctest's main, with every test of the "gpu" and "fp8" suites filtered out (and so counted as
// skipped) where no GPU can be used, of the "fp8" suite where the GPU has no FP8 tensor cores (or the build none for
// it), and of the "multi-gpu" suite where fewer than two GPUs can be used.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../kernels/gpu.cuh"

int main(int argc, char** argv) {
    doctest::Context context;
    context.applyCommandLine(argc, argv);
    int gpus = 0;
    if (gpu_available()) CUDA_CHECK(cudaGetDeviceCount(&gpus));
    if (gpus == 0) {
        std::printf("no usable GPU: the gpu and fp8 test suites are skipped\n");
        context.addFilter("test-suite-exclude", "gpu");
        context.addFilter("test-suite-exclude", "fp8");
    } else if (!gpu_info().fp8_mma()) {
        std::printf("%s (sm_%d) runs code built for sm_%d, without FP8 tensor cores: the fp8 test suite is skipped\n",
                    gpu_info().name.c_str(), gpu_info().capability, gpu_info().code_arch);
        context.addFilter("test-suite-exclude", "fp8");
    }
    if (gpus < 2) {
        std::printf("fewer than two GPUs: the multi-gpu test suite is skipped\n");
        context.addFilter("test-suite-exclude", "multi-gpu");
    }
    return context.run();
}
