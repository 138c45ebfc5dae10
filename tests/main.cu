// The test runner: doctest's main. Test suites that this machine cannot run are filtered out, and so counted as
// skipped: "gpu", "fp8" and "fp8-cublaslt" where no GPU can be used; "fp8" where the GPU has no FP8 tensor cores (or
// the build none for it); "fp8-cublaslt" where cuBLASLt has no block-scaled FP8 GEMM for it; "multi-gpu" where fewer
// than two GPUs can be used.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../fp8.cuh"

int main(int argc, char** argv) {
    doctest::Context context;
    context.applyCommandLine(argc, argv);
    int gpus = 0;
    if (gpu_available()) CUDA_CHECK(cudaGetDeviceCount(&gpus));
    try {
        if (gpus == 0) {
            std::printf("no usable GPU: the gpu, fp8 and fp8-cublaslt test suites are skipped\n");
            for (const char* suite : {"gpu", "fp8", "fp8-cublaslt"}) context.addFilter("test-suite-exclude", suite);
        } else if (!gpu_info().fp8_mma()) {
            std::printf("%s (sm_%d) runs code built for sm_%d, without FP8 tensor cores: the fp8 and fp8-cublaslt test "
                        "suites are skipped\n",
                        gpu_info().name.c_str(), gpu_info().capability, gpu_info().code_arch);
            for (const char* suite : {"fp8", "fp8-cublaslt"}) context.addFilter("test-suite-exclude", suite);
        } else if (!cublaslt_block_scaled_fp8()) {
            std::printf("cuBLASLt has no block-scaled FP8 GEMM for this GPU: the fp8-cublaslt test suite is skipped\n");
            context.addFilter("test-suite-exclude", "fp8-cublaslt");
        }
    } catch (const std::exception& e) {  // a MINI_DEEPSEEK_* variable that makes no sense
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
    if (gpus < 2) {
        std::printf("fewer than two GPUs: the multi-gpu test suite is skipped\n");
        context.addFilter("test-suite-exclude", "multi-gpu");
    }
    return context.run();
}
