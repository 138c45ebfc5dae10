// The FP8 accumulation problem of DeepSeek-V3 §3.3.2, shown on the host (no GPU needed).
//
// V3 §3.5.2: the tensor cores of an H800 add FP8 products into an accumulator that keeps only about 14 bits of the
// partial sum aligned to its largest term. Over a long inner dimension K the bits dropped at every addition add
// up (V3 measured up to ~2% relative error at K = 4096). The fix (§3.3.2): every N_c = 128 elements of K, move the
// partial sum out of the tensor core into an FP32 register, multiply it by the block scales there, and start the
// next block from zero. The emulation below is that story in a few lines: a dot product of E4M3 values with a
// 14-bit accumulator, with and without promotion, against the exact FP64 sum of the same E4M3 values.
#include <cuda_fp8.h>
#include <doctest/doctest.h>

#include <cmath>
#include <vector>

#include "../kernels/common.cuh"

namespace {

constexpr int ACCUMULATOR_BITS = 14;  // V3 §3.5.2
constexpr int N_C = 128;              // V3 §3.3.2: promotion interval

// a + b as the limited accumulator holds it: aligned to the larger of the two, only `bits` bits kept (the
// alignment shifts the smaller term right and drops what falls off: truncation toward zero).
double limited_add(double a, double b, int bits) {
    double larger = std::max(std::fabs(a), std::fabs(b));
    if (larger == 0.0) return 0.0;
    double quantum = std::ldexp(1.0, std::ilogb(larger) - bits + 1);
    return std::trunc((a + b) / quantum) * quantum;
}

// sum_k x_k y_k with the limited accumulator; with promotion, every n_c products the partial sum is added to an
// FP32 accumulator and the limited one restarts from zero.
double emulated_dot(const std::vector<float>& x, const std::vector<float>& y, bool promote) {
    float promoted = 0.0f;
    double partial = 0.0;
    for (size_t k = 0; k < x.size(); k++) {
        partial = limited_add(partial, double(x[k]) * double(y[k]), ACCUMULATOR_BITS);  // E4M3 products are exact
        if (promote && (k + 1) % N_C == 0) promoted += float(partial), partial = 0.0;
    }
    return double(promoted) + partial;
}

// Random values in [-4, 4], rounded to E4M3 (as after quantization with a per-tile scale).
std::vector<float> random_e4m3(size_t n, Rng& rng) {
    std::vector<float> v(n);
    for (float& x : v) x = float(__nv_fp8_e4m3(float(8.0 * rng.uniform() - 4.0)));
    return v;
}

// Mean error of `trials` dot products of length K against the exact sum of the same E4M3 values, relative to
// sum_k |x_k y_k| (relative to the sum itself, a sum that cancels to near zero would make any error look huge).
double mean_relative_error(int K, bool promote, int trials, uint64_t seed) {
    Rng rng(seed);
    double total = 0.0;
    for (int t = 0; t < trials; t++) {
        std::vector<float> x = random_e4m3(K, rng), y = random_e4m3(K, rng);
        double exact = 0.0, magnitude = 0.0;
        for (int k = 0; k < K; k++) exact += double(x[k]) * y[k], magnitude += std::fabs(double(x[k]) * y[k]);
        total += std::fabs(emulated_dot(x, y, promote) - exact) / magnitude;
    }
    return total / trials;
}

}  // namespace

TEST_SUITE("fp8") {
    TEST_CASE("E4M3 keeps 3 mantissa bits and saturates at 448") {
        CHECK(float(__nv_fp8_e4m3(1.0625f)) == 1.0f);  // 1 + 2^-4 is halfway between 1 and 1.125: to even
        CHECK(float(__nv_fp8_e4m3(1.1f)) == 1.125f);
        CHECK(float(__nv_fp8_e4m3(448.0f)) == 448.0f);
        CHECK(float(__nv_fp8_e4m3(1000.0f)) == 448.0f);
        CHECK(float(__nv_fp8_e4m3(-3.3f)) == -3.25f);
    }

    TEST_CASE("a 14-bit accumulator drops bits that promotion every 128 elements keeps") {
        double without = mean_relative_error(4096, false, 20, 1), with = mean_relative_error(4096, true, 20, 1);
        INFO("relative error at K = 4096: without promotion ", without, ", with promotion every 128: ", with);
        CHECK(without > 1e-4);         // thousands of times FP32's own rounding error (about 6e-8)
        CHECK(without > 10.0 * with);  // promotion cuts it by more than an order of magnitude
        // and the gap widens with K: without promotion the error grows, with it the error stays put
        double without_long = mean_relative_error(16384, false, 5, 2),
               with_long = mean_relative_error(16384, true, 5, 2);
        CHECK(without_long > 2.0 * without);
        CHECK(with_long < 4.0 * with);
    }
}
