// The test runner: doctest's main, with every test of the "gpu" suite filtered out (and so counted as skipped)
// where no GPU can be used.
#define DOCTEST_CONFIG_IMPLEMENT
#include <doctest/doctest.h>

#include "../kernels/common.cuh"

int main(int argc, char** argv) {
    doctest::Context context;
    context.applyCommandLine(argc, argv);
    if (!gpu_available()) {
        std::printf("no usable GPU: the gpu test suite is skipped\n");
        context.addFilter("test-suite-exclude", "gpu");
    }
    return context.run();
}
