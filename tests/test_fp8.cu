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

// n cleared non-finite flags, as the quantization kernels raise them.
DeviceBuffer<int> clear_flags(int n) {
    DeviceBuffer<int> flags(n);
    CUDA_CHECK(cudaMemset(flags.data(), 0, flags.bytes()));
    return flags;
}

// E4M3 values (exactly representable floats) to the device.
DeviceBuffer<fp8> upload_codes(const std::vector<float>& values) {
    std::vector<fp8> stored(values.begin(), values.end());
    DeviceBuffer<fp8> device(stored.size());
    device.upload(stored);
    return device;
}

// Both operands of a GEMM quantized by the CPU references, with the result the reference computes from them.
struct Fp8Problem {
    int M, N, K;
    bool block_scales;
    std::vector<float> qA, qB, sA, sB;
    std::vector<double> C;
};

Fp8Problem fp8_problem(int M, int N, int K, bool block_scales, Rng& rng) {
    Fp8Problem p{M, N, K, block_scales};
    ref::quantize_rows(ref::random_uniform(rng, size_t(M) * K, -4.0, 4.0), M, K, p.qA, p.sA);
    std::vector<float> B = ref::random_uniform(rng, size_t(N) * K, -0.1, 0.1);
    if (block_scales)
        ref::quantize_blocks(B, N, K, p.qB, p.sB);
    else
        ref::quantize_rows(B, N, K, p.qB, p.sB);
    p.C = ref::fp8_gemm(p.qA, p.qB, p.sA, p.sB, M, N, K, block_scales);
    return p;
}

// Both kernels where the GPU runs both (wgmma needs Hopper), else the portable one.
std::vector<Fp8Mma> mma_kinds() {
    if (default_fp8_mma() == Fp8Mma::Wgmma) return {Fp8Mma::Sync, Fp8Mma::Wgmma};
    return {Fp8Mma::Sync};
}

template <typename OutT>
void run_fp8_gemm(const Fp8Problem& p, DeviceBuffer<OutT>& C, bool accumulate, bool promote, Fp8Mma mma) {
    DeviceBuffer<fp8> A = upload_codes(p.qA), B = upload_codes(p.qB);
    DeviceBuffer<float> sA = ref::upload<float>(p.sA), sB = ref::upload<float>(p.sB);
    if (p.block_scales)
        fp8_gemm<OutT, BScales::Block>(C.data(), A.data(), B.data(), sA.data(), sB.data(), p.M, p.N, p.K, accumulate,
                                       promote, stream, mma);
    else
        fp8_gemm<OutT, BScales::Row>(C.data(), A.data(), B.data(), sA.data(), sB.data(), p.M, p.N, p.K, accumulate,
                                     promote, stream, mma);
}

// Values over six decades, so that a tile holds its amax and values deep in E4M3's subnormals; row 1's first tile
// is all zero, and row 2's holds zeros and values near the smallest normal float (a scale below it would have an
// infinite inverse).
std::vector<float> spread_values(Rng& rng, int rows, int cols) {
    std::vector<float> x(size_t(rows) * cols);
    for (float& v : x) v = float((2.0 * rng.uniform() - 1.0) * std::pow(10.0, 6.0 * rng.uniform() - 3.0));
    for (int k = 0; k < std::min(cols, ref::TILE); k++) {
        if (rows > 1) x[size_t(cols) + k] = 0.0f;
        if (rows > 2) x[size_t(2) * cols + k] = k % 2 ? 0.0f : float(k) * 1e-39f;
    }
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

// The CPU references that the kernels are held to, held in turn to cases worked out by hand and to what V3 §3.3.2's
// definitions imply (exercises 7 and 8 ask for them).
TEST_SUITE("fp8-reference") {
    // Row 0: a tile of multiples of 64 whose amax is 896 (scale 2: every value lands on an E4M3 value), then a tile
    // of two values; row 1: an all-zero tile, then a lone -3.
    TEST_CASE("quantize_rows (CPU): each 1x128 tile scaled by its own amax / 448, worked out by hand") {
        const int M = 2, K = 130;
        std::vector<float> x(size_t(M) * K, 0.0f);
        for (int k = 0; k < 128; k++) x[k] = float(k % 9 - 4) * 64.0f;
        x[17] = -896.0f, x[128] = 1e-3f, x[129] = -5e-4f, x[K + 129] = -3.0f;
        std::vector<float> q, scales;
        ref::quantize_rows(x, M, K, q, scales);
        REQUIRE(q.size() == x.size());
        REQUIRE(scales.size() == size_t(2 * M));  // [tiles(K), M]
        CHECK(scales[0] == 2.0f);
        CHECK(scales[1] == 1.0f);  // an all-zero tile
        CHECK(scales[M] == float(double(1e-3f) / 448.0));
        CHECK(scales[M + 1] == float(3.0 / 448.0));
        CHECK(q[0] == -128.0f);
        CHECK(q[17] == -448.0f);
        CHECK(q[8] == 128.0f);
        CHECK(q[128] == 448.0f);
        CHECK(q[129] == -224.0f);
        CHECK(q[K + 129] == -448.0f);
        CHECK(std::all_of(q.begin() + K, q.begin() + K + 128, [](float v) { return v == 0.0f; }));
    }

    TEST_CASE("quantize_rows (CPU): values over six decades come back within half an E4M3 step") {
        Rng rng(90);
        const int M = 5, K = 300;
        const std::vector<float> x = spread_values(rng, M, K);
        std::vector<float> q, scales;
        ref::quantize_rows(x, M, K, q, scales);
        REQUIRE(scales.size() == size_t(ref::tiles(K)) * M);
        std::vector<float> scale_of(x.size());
        for (int m = 0; m < M; m++)
            for (int k = 0; k < K; k++) scale_of[size_t(m) * K + k] = scales[size_t(k / ref::TILE) * M + m];
        check_round_trip(x, q, scale_of);
        // A tile's largest magnitude maps to E4M3's largest value, 448; unless the tile is all zero (scale 1), or so
        // small that amax / 448 would fall below the smallest normal float (row 2's first tile), the scale's floor.
        for (int m = 0; m < M; m++)
            for (int t = 0; t < ref::tiles(K); t++) {
                float largest = 0.0f;
                for (int k = t * ref::TILE; k < std::min(K, (t + 1) * ref::TILE); k++)
                    largest = std::max(largest, std::fabs(q[size_t(m) * K + k]));
                const float scale = scales[size_t(t) * M + m];
                CHECK((largest == 448.0f || (largest == 0.0f && scale == 1.0f) ||
                       (largest < 448.0f && scale == std::numeric_limits<float>::min())));
            }
    }

    // K = 256: two blocks of ones, the second row of B twos. A's tile scales 2 and 3; B's block scales 5 and 7 (one
    // block of rows), or B's row scales per K-block.
    TEST_CASE("fp8_gemm (CPU): each 128-block's partial sum times its two scales, worked out by hand") {
        const int M = 1, N = 2, K = 256;
        std::vector<float> qA(size_t(M) * K, 1.0f), qB(size_t(N) * K, 1.0f);
        std::fill(qB.begin() + K, qB.end(), 2.0f);
        const std::vector<float> sA = {2.0f, 3.0f};  // [tiles(K), M]
        const std::vector<float> blocks = {5.0f, 7.0f, 0.0f, 0.0f};  // [tiles(N), padded_tiles(K)]
        const std::vector<double> C = ref::fp8_gemm(qA, qB, sA, blocks, M, N, K, true);
        CHECK(C == std::vector<double>{128 * 2 * 5 + 128 * 3 * 7, 2 * (128 * 2 * 5 + 128 * 3 * 7)});
        const std::vector<float> rows = {5.0f, 11.0f, 7.0f, 13.0f};  // [tiles(K), N]
        CHECK(ref::fp8_gemm(qA, qB, sA, rows, M, N, K, false) ==
              std::vector<double>{128 * 2 * 5 + 128 * 3 * 7, 128 * 2 * 2 * 11 + 128 * 2 * 3 * 13});
        // K = 130: the second block holds two elements
        const std::vector<double> partial =
            ref::fp8_gemm(std::vector<float>(130, 1.0f), std::vector<float>(130, 1.0f), sA, blocks, 1, 1, 130, true);
        CHECK(partial == std::vector<double>{128 * 2 * 5 + 2 * 3 * 7});
    }

    TEST_CASE("fp8_gemm (CPU): the sum of the dequantized products, for random codes and scales") {
        Rng rng(91);
        for (bool block_scales : {true, false}) {
            CAPTURE(block_scales);
            const int M = 3, N = 130, K = 300;
            const Fp8Problem p = fp8_problem(M, N, K, block_scales, rng);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++) {
                    double want = 0.0, magnitude = 0.0;  // the sum, and that of its terms' magnitudes
                    for (int k = 0; k < K; k++) {
                        const int b = k / ref::TILE;
                        const double sb = block_scales ? p.sB[size_t(n / ref::TILE) * ref::padded_tiles(K) + b]
                                                       : p.sB[size_t(b) * N + n];
                        const double term = double(p.qA[size_t(m) * K + k]) * p.sA[size_t(b) * M + m] *
                                            p.qB[size_t(n) * K + k] * sb;
                        want += term, magnitude += std::fabs(term);
                    }
                    CHECK(std::fabs(p.C[size_t(m) * N + n] - want) <= 1e-12 * magnitude);
                }
        }
    }
}

TEST_SUITE("gpu") {
    // Shapes: a partial last tile each way with 4-element vectors (300 x 300), none (256 x 128), and rows or
    // columns not a multiple of 4, which take the scalar path (37 x 300, 300 x 45).
    TEST_CASE_TEMPLATE("quantize_rows_and_transposed: 1x128 tiles along rows, 128x1 along columns", T, float, bf16) {
        Rng rng(81);
        for (std::pair<int, int> shape : {std::pair{300, 300}, {256, 128}, {37, 300}, {300, 45}}) {
            const int R = shape.first, C = shape.second;
            CAPTURE(R);
            CAPTURE(C);
            std::vector<float> x = ref::round_to<T>(spread_values(rng, R, C));
            DeviceBuffer<T> x_dev = ref::upload<T>(x);
            DeviceBuffer<fp8> q(size_t(R) * C), qT(size_t(R) * C);
            DeviceBuffer<float> scales(size_t(ref::tiles(C)) * R), scalesT(size_t(ref::tiles(R)) * C);
            DeviceBuffer<int> nonfinite = clear_flags(1);
            ref::poison(scales), ref::poison(scalesT);
            quantize_rows_and_transposed(q.data(), scales.data(), qT.data(), scalesT.data(), nonfinite.data(),
                                         x_dev.data(), R, C, stream);
            std::vector<float> want_q, want_scales, want_qT, want_scalesT;
            ref::quantize_rows(x, R, C, want_q, want_scales);
            ref::quantize_rows(ref::transpose(x, R, C), C, R, want_qT, want_scalesT);
            CHECK(codes(q) == want_q);
            CHECK(scales.download() == want_scales);
            CHECK(codes(qT) == want_qT);
            CHECK(scalesT.download() == want_scalesT);
            CHECK(nonfinite.download()[0] == 0);
            CHECK(want_scales[size_t(0) * R + 1] == 1.0f);  // the all-zero tile
            std::vector<float> scale_of(x.size());
            for (int r = 0; r < R; r++)
                for (int c = 0; c < C; c++) scale_of[size_t(r) * C + c] = want_scales[size_t(c / ref::TILE) * R + r];
            check_round_trip(x, want_q, scale_of);
        }
    }

    // 160 x 576: kv_a_proj_with_mqa's rows, q_b_proj's rows as columns, in 4-element vectors; 130 x 258 takes the
    // scalar path both ways.
    TEST_CASE("quantize_weight: 128x128 blocks and the transposed copy, at the model's odd sizes") {
        Rng rng(83);
        for (std::pair<int, int> shape : {std::pair{160, 576}, {130, 258}}) {
            const int N = shape.first, K = shape.second;
            CAPTURE(N);
            CAPTURE(K);
            std::vector<float> W = spread_values(rng, N, K);
            DeviceBuffer<float> W_dev = ref::upload<float>(W);
            DeviceBuffer<fp8> q(size_t(N) * K), qT(size_t(N) * K);
            DeviceBuffer<float> scales(size_t(ref::tiles(N)) * ref::padded_tiles(K)),
                scalesT(size_t(ref::tiles(K)) * ref::padded_tiles(N));
            ref::poison(scales), ref::poison(scalesT);
            DeviceBuffer<int> nonfinite = clear_flags(1);
            quantize_weight(q.data(), qT.data(), scales.data(), scalesT.data(), nonfinite.data(), W_dev.data(), N, K,
                            stream);
            std::vector<float> want_q, want_scales, want_qT, want_scalesT;
            ref::quantize_blocks(W, N, K, want_q, want_scales);
            ref::quantize_blocks(ref::transpose(W, N, K), K, N, want_qT, want_scalesT);
            CHECK(codes(q) == want_q);
            CHECK(codes(qT) == want_qT);
            CHECK(scales.download() == want_scales);
            CHECK(scalesT.download() == want_scalesT);
            CHECK(nonfinite.download()[0] == 0);
        }
    }

    // 5 x 260 has only partial tiles; 256 x 256 only whole ones, which load their rows in vectors.
    TEST_CASE("a NaN or an Inf in any tile is reported") {
        for (std::pair<int, int> shape : {std::pair{5, 260}, {256, 256}})
            for (float bad : {NAN, INFINITY, -INFINITY}) {
                const int M = shape.first, K = shape.second;
                for (size_t at : {size_t(0), size_t(3 * K + 259), size_t(M) * K - 1}) {
                    CAPTURE(M);
                    CAPTURE(bad);
                    CAPTURE(at);
                    std::vector<float> x(size_t(M) * K, 0.5f);
                    x[at] = bad;
                    DeviceBuffer<float> x_dev = ref::upload<float>(x);
                    DeviceBuffer<fp8> q(x.size()), qT(x.size());
                    DeviceBuffer<float> scales(size_t(ref::padded_tiles(K)) * ref::padded_tiles(M) * 128),
                        scalesT(scales.count);
                    DeviceBuffer<int> flags = clear_flags(2);
                    quantize_rows_and_transposed(q.data(), scales.data(), qT.data(), scalesT.data(), flags.data(),
                                                 x_dev.data(), M, K, stream);
                    quantize_weight(q.data(), qT.data(), scales.data(), scalesT.data(), flags.data() + 1, x_dev.data(),
                                    M, K, stream);
                    CHECK(flags.download() == std::vector<int>{1, 1});
                }
            }
    }
}

// The FP8 GEMMs and the FP8 Linear need FP8 tensor cores (tests/main.cu skips this suite on GPUs without them).
TEST_SUITE("fp8") {
    // The tensor cores sum each 128-element block in their own accumulator (V3 §3.5.2: about 14 bits kept on
    // H800), so a result may differ from the exact sum by ~1e-4 of its magnitude per block; 2e-3 leaves a margin
    // and still catches any wrong fragment, scale or tile (those give errors of order 1).
    TEST_CASE_TEMPLATE("fp8_gemm: per-block promotion with 1x128 x 128x128 and 1x128 x 1x128 scales", T, float, bf16) {
        Rng rng(84);
        const double tol = std::is_same<T, float>::value ? 2e-3 : 1e-2;
        // K: 5 blocks, the last one partial (so are the last tiles along M and N); 2 blocks; 1 partial block.
        for (std::pair<int, bool> shape : {std::pair{576, true}, {576, false}, {256, true}, {112, false}}) {
            const int K = shape.first;
            const bool block_scales = shape.second;
            CAPTURE(K);
            CAPTURE(block_scales);
            Fp8Problem p = fp8_problem(200, 160, K, block_scales, rng);
            for (Fp8Mma mma : mma_kinds())
                for (bool accumulate : {false, true}) {
                    CAPTURE(int(mma));
                    CAPTURE(accumulate);
                    ref::Tensor<T> C = ref::output<T>(rng, size_t(p.M) * p.N, accumulate);
                    std::vector<double> want = p.C;
                    if (accumulate)
                        for (size_t i = 0; i < want.size(); i++) want[i] += C.host[i];
                    run_fp8_gemm(p, C.device, accumulate, true, mma);
                    CHECK_CLOSE(ref::download(C.device), want, tol);
                }
        }
    }

    TEST_CASE("fp8_gemm without promotion: the same result where one scale serves all of K") {
        Rng rng(85);
        const int M = 130, N = 136, K = 1024;
        Fp8Problem p{M, N, K, true};
        std::vector<float> A = ref::random_uniform(rng, size_t(M) * K, -4.0, 4.0);
        std::vector<float> B = ref::random_uniform(rng, size_t(N) * K, -4.0, 4.0);
        const float scale = 4.0f / 448.0f;  // one scale per tensor: every tile and block shares it
        for (float x : A) p.qA.push_back(ref::e4m3(x, scale));
        for (float x : B) p.qB.push_back(ref::e4m3(x, scale));
        p.sA.assign(size_t(ref::tiles(K)) * M, scale);
        p.sB.assign(size_t(ref::tiles(N)) * ref::padded_tiles(K), scale);
        p.C = ref::fp8_gemm(p.qA, p.qB, p.sA, p.sB, M, N, K, true);
        for (Fp8Mma mma : mma_kinds())
            for (bool promote : {true, false}) {
                CAPTURE(int(mma));
                CAPTURE(promote);
                DeviceBuffer<float> C(size_t(M) * N);
                ref::poison(C);
                run_fp8_gemm(p, C, false, promote, mma);
                CHECK_CLOSE(ref::download(C), p.C, 2e-3);
            }
    }

    // V3 §3.5.2: Hopper's FP8 wgmma adds products into a partial sum that keeps only about 14 bits aligned to its
    // largest term, so over a long K the bits each addition drops add up. The fix (§3.3.2): every N_c = 128
    // elements of K the kernel moves the partial sum into FP32 registers and restarts from zero. Our kernels, with
    // and without that promotion, against the exact sum of the same E4M3 products (errors relative to sum |a b|, as a
    // sum that cancels would make any error look huge). Measured on an H200: wgmma without promotion 1.6e-5 at
    // K = 4096 and 2.0e-5 at 16384, with it 1.8e-6 and 8.9e-7; the portable mma.sync kernel keeps every bit on Hopper
    // (5e-10 either way), so there the promotion only costs.
    TEST_CASE("fp8_gemm: promotion every 128 elements of K keeps the bits the tensor cores' sum drops") {
        Rng rng(86);
        const int M = 128, N = 128;
        for (int K : {4096, 16384}) {
            Fp8Problem p{M, N, K, true};
            const float scale = 1.0f;  // values in [-4, 4], E4M3 as they are: the scales play no part
            for (float x : ref::random_uniform(rng, size_t(M) * K, -4.0, 4.0)) p.qA.push_back(ref::e4m3(x, scale));
            for (float x : ref::random_uniform(rng, size_t(N) * K, -4.0, 4.0)) p.qB.push_back(ref::e4m3(x, scale));
            p.sA.assign(size_t(ref::tiles(K)) * M, scale);
            p.sB.assign(size_t(ref::tiles(N)) * ref::padded_tiles(K), scale);
            p.C = ref::fp8_gemm(p.qA, p.qB, p.sA, p.sB, M, N, K, true);
            std::vector<double> magnitude(size_t(M) * N, 0.0);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++)
                    for (int k = 0; k < K; k++) {
                        const double product = double(p.qA[size_t(m) * K + k]) * p.qB[size_t(n) * K + k];
                        magnitude[size_t(m) * N + n] += std::fabs(product);
                    }
            for (Fp8Mma mma : mma_kinds()) {
                double error[2] = {0.0, 0.0};  // without, with promotion
                for (bool promote : {false, true}) {
                    DeviceBuffer<float> C(size_t(M) * N);
                    run_fp8_gemm(p, C, false, promote, mma);
                    const std::vector<float> got = ref::download(C);
                    for (size_t i = 0; i < got.size(); i++)
                        error[promote] += std::fabs(got[i] - p.C[i]) / magnitude[i] / double(got.size());
                }
                INFO("K = ", K, ", mma ", int(mma), ": mean relative error without promotion ", error[0],
                     ", with promotion every 128 ", error[1]);
                CHECK(error[1] < 5e-6);  // a 128-element block's partial sum at most
                if (mma == Fp8Mma::Wgmma) CHECK(error[0] > (K == 4096 ? 4.0 : 10.0) * error[1]);
            }
        }
    }

    // One launch for a GEMM per group, as the routed experts run: every group's part of the result is the single
    // GEMM of that group's operands, computed by the reference. Group 1 is empty, the launch covers rows past the
    // last group (which it must leave alone), N and the groups' K end in partial tiles, and bf16 rows of 100 values
    // take the scalar stores.
    TEST_CASE_TEMPLATE("fp8_gemm_grouped_rows: each group's rows times its own weight, one launch", T, float, bf16) {
        Rng rng(88);
        const double tol = std::is_same<T, float>::value ? 2e-3 : 1e-2;
        const std::vector<int> offsets = {0, 256, 256, 384};
        const int groups = 3, R = offsets.back(), max_rows = 640, N = 100, K = 320;
        DeviceBuffer<int> device_offsets(offsets.size());
        device_offsets.upload(offsets);
        std::vector<float> qA, sA, qB, sB;
        std::vector<double> want(size_t(R) * N);
        for (int g = 0; g < groups; g++) {
            const int M = offsets[g + 1] - offsets[g];
            Fp8Problem p = fp8_problem(M, N, K, true, rng);
            qA.insert(qA.end(), p.qA.begin(), p.qA.end()), sA.insert(sA.end(), p.sA.begin(), p.sA.end());
            qB.insert(qB.end(), p.qB.begin(), p.qB.end()), sB.insert(sB.end(), p.sB.begin(), p.sB.end());
            std::copy(p.C.begin(), p.C.end(), want.begin() + size_t(offsets[g]) * N);
        }
        DeviceBuffer<fp8> A = upload_codes(qA), B = upload_codes(qB);
        DeviceBuffer<float> sA_d = ref::upload<float>(sA), sB_d = ref::upload<float>(sB);
        for (Fp8Mma mma : mma_kinds())
            for (bool accumulate : {false, true}) {
                CAPTURE(int(mma));
                CAPTURE(accumulate);
                ref::Tensor<T> C = ref::output<T>(rng, size_t(max_rows) * N, true);
                std::vector<double> expect(C.host.begin(), C.host.end());
                for (size_t i = 0; i < want.size(); i++) expect[i] = want[i] + (accumulate ? expect[i] : 0.0);
                fp8_gemm_grouped_rows(C.device.data(), A.data(), B.data(), sA_d.data(), sB_d.data(),
                                      device_offsets.data(), groups, max_rows, N, K, accumulate, stream, mma);
                CHECK_CLOSE(ref::download(C.device), expect, tol);
            }
    }

    // The weight gradient's form: per group, a product reduced over the group's own rows, whose transposed
    // operands lie at the group's place; an empty group's product is zero.
    TEST_CASE("fp8_gemm_grouped_reduction: each group's product over its own rows, one launch") {
        Rng rng(89);
        const std::vector<int> offsets = {0, 384, 384, 512};
        const int groups = 3, M = 96, N = 200;
        DeviceBuffer<int> device_offsets(offsets.size());
        device_offsets.upload(offsets);
        std::vector<float> qA, sA, qB, sB;
        std::vector<double> want(size_t(groups) * M * N, 0.0);
        for (int g = 0; g < groups; g++) {
            const int rows = offsets[g + 1] - offsets[g];
            if (rows == 0) continue;
            Fp8Problem p = fp8_problem(M, N, rows, false, rng);
            qA.insert(qA.end(), p.qA.begin(), p.qA.end()), sA.insert(sA.end(), p.sA.begin(), p.sA.end());
            qB.insert(qB.end(), p.qB.begin(), p.qB.end()), sB.insert(sB.end(), p.sB.begin(), p.sB.end());
            std::copy(p.C.begin(), p.C.end(), want.begin() + size_t(g) * M * N);
        }
        DeviceBuffer<fp8> A = upload_codes(qA), B = upload_codes(qB);
        DeviceBuffer<float> sA_d = ref::upload<float>(sA), sB_d = ref::upload<float>(sB);
        for (Fp8Mma mma : mma_kinds()) {
            CAPTURE(int(mma));
            DeviceBuffer<float> C(want.size());
            ref::poison(C);
            fp8_gemm_grouped_reduction(C.data(), A.data(), B.data(), sA_d.data(), sB_d.data(), device_offsets.data(),
                                       groups, M, N, stream, mma);
            CHECK_CLOSE(ref::download(C), want, 2e-3);
        }
    }

    // The model's path: the same quantizations and GEMMs as the references compose them; against the exact
    // product in double, the error is that of E4M3 itself (3 mantissa bits: about 2-4% per product, and so of a
    // random sum of them), bounded here by 8%.
    TEST_CASE_TEMPLATE("fp8_linear: forward, data gradient and weight gradient, both backends", T, float, bf16) {
        const double tol = std::is_same<T, float>::value ? 2e-3 : 1e-2;
        Blas blas;
        struct Shape {
            int M, N, K;
            Fp8Backend backend;
        };
        for (Shape shape : {Shape{144, 160, 576, Fp8Backend::Own}, Shape{256, 384, 256, Fp8Backend::Own},
                            Shape{256, 384, 256, Fp8Backend::CuBLASLt}}) {
            const std::vector<Fp8Backend> here = fp8_backends();  // cuBLASLt's where this GPU has it
            if (std::find(here.begin(), here.end(), shape.backend) == here.end()) continue;
            const int M = shape.M, N = shape.N, K = shape.K;
            CAPTURE(M);
            CAPTURE(int(shape.backend));
            Rng rng(87);
            ref::Tensor<T> x = ref::input<T>(rng, size_t(M) * K), dy = ref::input<T>(rng, size_t(M) * N);
            std::vector<float> W_host = ref::random_uniform(rng, size_t(N) * K, -0.1, 0.1);
            DeviceBuffer<float> master = ref::upload<float>(W_host);
            DeviceBuffer<int> nonfinite = clear_flags(1);
            Fp8Weight W(N, K);
            W.refresh(master.data(), nonfinite.data(), stream);
            Fp8Tensor x_q = fp8_operand(M, K), x_saved = fp8_operand(M, K), dy_q = fp8_operand(M, N),
                      dy_t = fp8_operand(M, N);
            DeviceBuffer<T> y(size_t(M) * N), dx(size_t(M) * K);
            DeviceBuffer<float> dW(size_t(N) * K);
            ref::poison(y), ref::poison(dx), ref::poison(dW);
            fp8_linear_forward(shape.backend, blas, stream, y.data(), x.data(), W, x_q, x_saved, RowGroups::all(M),
                               nonfinite.data());
            fp8_linear_backward(shape.backend, blas, stream, dx.data(), dW.data(), dy.data(), x_saved, W, dy_q, dy_t,
                                RowGroups::all(M), nonfinite.data());
            CHECK(nonfinite.download()[0] == 0);

            std::vector<float> qx, sx, qW, sW, qdy, sdy, qWT, sWT, qdyT, sdyT, qxT, sxT;
            ref::quantize_rows(x.host, M, K, qx, sx);
            ref::quantize_blocks(W_host, N, K, qW, sW);
            ref::quantize_rows(dy.host, M, N, qdy, sdy);
            ref::quantize_blocks(ref::transpose(W_host, N, K), K, N, qWT, sWT);
            ref::quantize_rows(ref::transpose(dy.host, M, N), N, M, qdyT, sdyT);
            ref::quantize_rows(ref::transpose(x.host, M, K), K, M, qxT, sxT);
            CHECK_CLOSE(ref::download(y), ref::fp8_gemm(qx, qW, sx, sW, M, N, K, true), tol);
            CHECK_CLOSE(ref::download(dx), ref::fp8_gemm(qdy, qWT, sdy, sWT, M, K, N, true), tol);
            CHECK_CLOSE(ref::download(dW), ref::fp8_gemm(qdyT, qxT, sdyT, sxT, N, K, M, false), 2e-3);

            std::vector<double> y_exact(size_t(M) * N, 0.0);
            for (int m = 0; m < M; m++)
                for (int n = 0; n < N; n++)
                    for (int k = 0; k < K; k++)
                        y_exact[size_t(m) * N + n] += double(x.host[size_t(m) * K + k]) * W_host[size_t(n) * K + k];
            double quantization_error = ref::rel_error(ref::download(y), y_exact);
            INFO("FP8 forward against the exact product: relative error ", quantization_error);
            CHECK(quantization_error < 0.08);
        }
    }
}

// cuBLASLt's block-scaled FP8 GEMM (Hopper): tests/main.cu skips this suite where cuBLASLt has none.
TEST_SUITE("fp8-cublaslt") {
    // cuBLASLt's scale layouts are the ones fp8.cuh writes: the same reference checks both paths.
    TEST_CASE("fp8_gemm_cublaslt: the same products through cuBLASLt") {
        Rng rng(86);
        Blas blas;
        for (bool block_scales : {true, false}) {
            CAPTURE(block_scales);
            Fp8Problem p = fp8_problem(256, 384, 512, block_scales, rng);
            DeviceBuffer<fp8> A = upload_codes(p.qA), B = upload_codes(p.qB);
            DeviceBuffer<float> sA = ref::upload<float>(p.sA), sB = ref::upload<float>(p.sB);
            DeviceBuffer<float> C(size_t(p.M) * p.N);
            ref::poison(C);
            fp8_matmul(Fp8Backend::CuBLASLt, blas, stream, C.data(), A.data(), B.data(), sA.data(), sB.data(), p.M, p.N,
                       p.K, block_scales ? BScales::Block : BScales::Row, false);
            CHECK_CLOSE(ref::download(C), p.C, 2e-3);
        }
    }
}
