// Tests of fp8.cuh: every quantization kernel against its CPU reference (tests/fp8_reference.h), bit for bit: the
// scales are one division each and E4M3 rounding is exact arithmetic, so the GPU and the CPU agree exactly. At the
// model's own odd sizes (160 = 128 + 32 and 576 = 4.5 x 128) the last tiles are partial.
#include "../fp8.cuh"
#include "fp8_reference.h"
#include "reference.h"

namespace {

using ref::stream;

std::vector<float> codes(const DeviceBuffer<fp8>& q) {
    std::vector<fp8> stored = q.download();
    return std::vector<float>(stored.begin(), stored.end());
}

// Values over six decades, so that a tile holds its amax and values deep in E4M3's subnormals; row 1's first tile
// is all zero.
std::vector<float> spread_values(Rng& rng, int rows, int cols) {
    std::vector<float> x(size_t(rows) * cols);
    for (float& v : x) v = float((2.0 * rng.uniform() - 1.0) * std::pow(10.0, 6.0 * rng.uniform() - 3.0));
    if (rows > 1)
        for (int k = 0; k < std::min(cols, ref::TILE); k++) x[size_t(cols) + k] = 0.0f;
    return x;
}

// Dequantized values are within half an E4M3 step of the input: 2^-4 relative for normal values, 2^-10 of the
// scale in the subnormal range (E4M3's smallest step is 2^-9).
void check_round_trip(const std::vector<float>& x, const std::vector<float>& q, const std::vector<float>& scale_of) {
    int bad = 0;
    for (size_t i = 0; i < x.size(); i++) {
        double err = std::fabs(double(q[i]) * scale_of[i] - x[i]);
        bad += err > std::max(std::ldexp(std::fabs(double(x[i])), -4), std::ldexp(double(scale_of[i]), -10)) * 1.0001;
    }
    CHECK(bad == 0);
}

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE_TEMPLATE("quantize_rows: 1x128 tiles with online scales, partial last tile", T, float, bf16) {
        const int M = 37, K = 300;
        Rng rng(81);
        std::vector<float> x = ref::round_to<T>(spread_values(rng, M, K));
        DeviceBuffer<T> x_dev = ref::upload<T>(x);
        DeviceBuffer<fp8> q(size_t(M) * K);
        DeviceBuffer<float> scales(size_t(ref::tiles(K)) * M);
        DeviceBuffer<int> nonfinite(1);
        CUDA_CHECK(cudaMemset(nonfinite.data(), 0, sizeof(int)));
        ref::poison(scales);
        quantize_rows(q.data(), scales.data(), nonfinite.data(), x_dev.data(), M, K, stream);
        std::vector<float> want_q, want_scales;
        ref::quantize_rows(x, M, K, want_q, want_scales);
        CHECK(codes(q) == want_q);
        CHECK(scales.download() == want_scales);
        CHECK(nonfinite.download()[0] == 0);
        CHECK(want_scales[size_t(0) * M + 1] == 1.0f);  // the all-zero tile
        std::vector<float> scale_of(x.size());
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) scale_of[size_t(m) * K + k] = want_scales[size_t(k / ref::TILE) * M + m];
        check_round_trip(x, want_q, scale_of);
    }

    TEST_CASE("quantize_transposed: 128x1 tiles along the token dimension, written transposed") {
        const int R = 300, C = 45;  // tokens, features
        Rng rng(82);
        std::vector<float> x = ref::round_to<bf16>(spread_values(rng, R, C));
        DeviceBuffer<bf16> x_dev = ref::upload<bf16>(x);
        DeviceBuffer<fp8> qT(size_t(R) * C);
        DeviceBuffer<float> scales(size_t(ref::tiles(R)) * C);
        DeviceBuffer<int> nonfinite(1);
        CUDA_CHECK(cudaMemset(nonfinite.data(), 0, sizeof(int)));
        ref::poison(scales);
        quantize_transposed(qT.data(), scales.data(), nonfinite.data(), x_dev.data(), R, C, stream);
        std::vector<float> want_q, want_scales;
        ref::quantize_rows(ref::transpose(x, R, C), C, R, want_q, want_scales);
        CHECK(codes(qT) == want_q);
        CHECK(scales.download() == want_scales);
        CHECK(nonfinite.download()[0] == 0);
    }

    TEST_CASE("quantize_weight: 128x128 blocks and the transposed copy, at the model's odd sizes") {
        const int N = 160, K = 576;  // kv_a_proj_with_mqa's rows, q_b_proj's rows as columns
        Rng rng(83);
        std::vector<float> W = spread_values(rng, N, K);
        DeviceBuffer<float> W_dev = ref::upload<float>(W);
        DeviceBuffer<fp8> q(size_t(N) * K), qT(size_t(N) * K);
        const int NB = ref::tiles(N), KB = ref::tiles(K);
        DeviceBuffer<float> scales(size_t(NB) * KB), scalesT(size_t(NB) * KB);
        DeviceBuffer<int> nonfinite(1);
        CUDA_CHECK(cudaMemset(nonfinite.data(), 0, sizeof(int)));
        quantize_weight(q.data(), qT.data(), scales.data(), scalesT.data(), nonfinite.data(), W_dev.data(), N, K,
                        stream);
        std::vector<float> want_q, want_scales;
        ref::quantize_blocks(W, N, K, want_q, want_scales);
        CHECK(codes(q) == want_q);
        CHECK(codes(qT) == ref::transpose(want_q, N, K));
        CHECK(scales.download() == want_scales);
        CHECK(scalesT.download() == ref::transpose(want_scales, NB, KB));
        CHECK(nonfinite.download()[0] == 0);
    }

    TEST_CASE("a NaN or an Inf in any tile is reported") {
        const int M = 5, K = 260;
        for (float bad : {NAN, INFINITY, -INFINITY}) {
            for (size_t at : {size_t(0), size_t(3 * K + 259)}) {
                CAPTURE(bad);
                CAPTURE(at);
                std::vector<float> x(size_t(M) * K, 0.5f);
                x[at] = bad;
                DeviceBuffer<float> x_dev = ref::upload<float>(x);
                DeviceBuffer<fp8> q(x.size()), qT(x.size());
                DeviceBuffer<float> scales(size_t(ref::tiles(K)) * ref::tiles(M) * 128), scalesT(scales.count);
                DeviceBuffer<int> flags(3);
                CUDA_CHECK(cudaMemset(flags.data(), 0, 3 * sizeof(int)));
                quantize_rows(q.data(), scales.data(), flags.data(), x_dev.data(), M, K, stream);
                quantize_transposed(qT.data(), scales.data(), flags.data() + 1, x_dev.data(), M, K, stream);
                quantize_weight(q.data(), qT.data(), scales.data(), scalesT.data(), flags.data() + 2, x_dev.data(), M,
                                K, stream);
                CHECK(flags.download() == std::vector<int>{1, 1, 1});
            }
        }
    }
}
