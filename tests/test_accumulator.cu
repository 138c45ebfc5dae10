// Tests of kernels/fp8_accumulator.h, the host model of the FP8 tensor cores' limited accumulator and of V3's
// promotion every N_C = 128 elements of K: a case worked out by hand, and the errors of long random sums.
#include <doctest/doctest.h>

#include <vector>

#include "../kernels/fp8_accumulator.h"
#include "../kernels/rng.h"

namespace {

// Mean over rows of |dot - exact| / sum |a b|: relative to the magnitude of the terms, since a sum that cancels
// would make any error look large.
double mean_relative_error(int rows, int K, int bits, int promote_every, uint64_t seed) {
    Rng rng(seed);
    double error = 0.0;
    for (int r = 0; r < rows; r++) {
        std::vector<float> a(K), b(K);
        double exact = 0.0, magnitude = 0.0;
        for (int k = 0; k < K; k++) {
            a[k] = float(8.0 * rng.uniform() - 4.0), b[k] = float(8.0 * rng.uniform() - 4.0);
            exact += double(a[k]) * b[k], magnitude += std::fabs(double(a[k]) * b[k]);
        }
        error += std::fabs(tensor_core_dot(a.data(), b.data(), K, bits, promote_every) - exact) / magnitude;
    }
    return error / rows;
}

}  // namespace

TEST_SUITE("fp8-accumulation") {
    // 1 followed by 255 products of 2^-15. Next to 1, a 14-bit sum keeps multiples of 2^-13: every 2^-15 is lost.
    // Promoted every 128, the second block's partial sum starts from zero and keeps its 128 x 2^-15 = 2^-8 whole.
    TEST_CASE("tensor_core_dot: small products vanish beside a large sum, and promotion recovers those after it") {
        std::vector<float> a(256, std::ldexp(1.0f, -15)), ones(256, 1.0f);
        a[0] = 1.0f;
        CHECK(tensor_core_dot(a.data(), ones.data(), 256, 14, 0) == 1.0f);
        CHECK(tensor_core_dot(a.data(), ones.data(), 256, 14, 128) == 1.0f + std::ldexp(1.0f, -8));
        CHECK(tensor_core_dot(a.data(), ones.data(), 256, 24, 0) == 1.0f + 255 * std::ldexp(1.0f, -15));
        CHECK(tensor_core_dot(a.data(), ones.data(), 100, 14, 128) == 1.0f);  // K shorter than one block
    }

    // V3 §3.3.2: about 14 bits kept, K = 4096. Without promotion each product is cut to the grid of a sum over all
    // of K; promoted every 128, to that of a 128-term sum, several times finer (measured here: 5.1e-5 against
    // 9.1e-6 at K = 4096, 3.1e-5 against 3.9e-6 at K = 16384).
    TEST_CASE("tensor_core_dot: promotion every 128 cuts the error of a 14-bit sum several times over") {
        const double without_4096 = mean_relative_error(16, 4096, 14, 0, 1);
        const double with_4096 = mean_relative_error(16, 4096, 14, 128, 1);
        const double without_16384 = mean_relative_error(16, 16384, 14, 0, 2);
        const double with_16384 = mean_relative_error(16, 16384, 14, 128, 2);
        INFO("K = 4096: ", without_4096, " without promotion, ", with_4096, " with; K = 16384: ", without_16384,
             " and ", with_16384);
        CHECK(without_4096 > 4.0 * with_4096);
        CHECK(without_16384 > 4.0 * with_16384);
        CHECK(with_16384 < with_4096);  // a block's partial sum keeps the same bits, and the blocks' errors cancel
        CHECK(mean_relative_error(4, 4096, 24, 0, 3) < 1e-6);  // an FP32-wide sum loses next to nothing
    }
}
