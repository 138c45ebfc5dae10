// FP8 GEMMs on the GPU: speed, and the accumulation error that promotion fixes (V3 §3.3.2).
//   ./build/bench_fp8
// Table 1: TFLOP/s of our FP8 kernels (promotion every 128; wgmma and the portable mma.sync one), cuBLASLt's
// block-scaled FP8 (1x128 x 128x128) and cuBLASLt BF16, at the shapes of the default model's forward GEMMs for
// one training step (64 x 512 tokens) and at 4096^3 and 8192^3. Table 2: relative error against an FP64 product
// of the same E4M3 values (per-tensor scale, values in [-4, 4], 128 x 128 outputs) as K grows, with and without
// promotion, our wgmma kernel beside cuBLASLt.
#include <cstdio>
#include <string>

#include "../fp8.cuh"
#include "timing.h"

namespace {

std::vector<fp8> random_e4m3(size_t n, Rng& rng) {
    std::vector<fp8> v(n);
    for (fp8& x : v) x = fp8(float(8.0 * rng.uniform() - 4.0));
    return v;
}

template <typename T>
DeviceBuffer<T> upload(const std::vector<T>& host) {
    DeviceBuffer<T> d(host.size());
    d.upload(host);
    return d;
}

std::string tflops(double ms, double flops) {
    if (ms < 0) return "n/a";
    char buf[32];
    std::snprintf(buf, sizeof buf, "%.0f", flops / (ms * 1e-3) / 1e12);
    return buf;
}

void speed(Blas& blas, const char* name, int M, int N, int K) {
    Rng rng(uint64_t(M) * 31 + N * 7 + K);
    DeviceBuffer<fp8> A = upload(random_e4m3(size_t(M) * K, rng)), B = upload(random_e4m3(size_t(N) * K, rng));
    DeviceBuffer<float> sA(size_t(scale_tiles(K)) * M), sB(block_scale_count(N, K));
    sA.upload(std::vector<float>(sA.count, 1.0f)), sB.upload(std::vector<float>(sB.count, 1.0f));
    DeviceBuffer<bf16> C(size_t(M) * N), Ab(size_t(M) * K), Bb(size_t(N) * K);
    CUDA_CHECK(cudaMemset(Ab.data(), 0, Ab.bytes()));
    CUDA_CHECK(cudaMemset(Bb.data(), 0, Bb.bytes()));
    double flops = 2.0 * M * N * K;
    auto ours = [&](Fp8Mma mma) {
        return time_ms([&] {
            fp8_gemm<bf16, BScales::Block>(C.data(), A.data(), B.data(), sA.data(), sB.data(), M, N, K, false, true,
                                           nullptr, mma);
        });
    };
    double wgmma = ours(Fp8Mma::Wgmma), sync = ours(Fp8Mma::Sync);
    double lt = time_ms([&] {
        fp8_matmul(Fp8Backend::CuBLASLt, blas, nullptr, C.data(), A.data(), B.data(), sA.data(), sB.data(), M, N, K,
                   BScales::Block, false);
    });
    double bf = time_ms([&] { matmul(blas, nullptr, C.data(), Ab.data(), Bb.data(), Matmul{M, N, K, false, true}); });
    std::printf("| %s | %d, %d, %d | %s | %s | %s | %s |\n", name, M, N, K, tflops(wgmma, flops).c_str(),
                tflops(sync, flops).c_str(), tflops(lt, flops).c_str(), tflops(bf, flops).c_str());
}

struct Errors {
    double rel, max;  // ||got - ref|| / ||ref||, max |got - ref| / max |ref|
};

Errors errors(const std::vector<float>& got, const std::vector<double>& ref) {
    double d2 = 0, r2 = 0, dmax = 0, rmax = 0;
    for (size_t i = 0; i < ref.size(); i++) {
        double d = got[i] - ref[i];
        d2 += d * d, r2 += ref[i] * ref[i];
        dmax = std::max(dmax, std::fabs(d)), rmax = std::max(rmax, std::fabs(ref[i]));
    }
    return {std::sqrt(d2 / r2), dmax / rmax};
}

void accumulation(Blas& blas, int K) {
    const int M = 128, N = 128;
    Rng rng{uint64_t(K)};
    std::vector<fp8> a = random_e4m3(size_t(M) * K, rng), b = random_e4m3(size_t(N) * K, rng);
    std::vector<double> ref(size_t(M) * N, 0.0);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double sum = 0.0;
            for (int k = 0; k < K; k++)
                sum += double(float(a[size_t(m) * K + k])) * double(float(b[size_t(n) * K + k]));
            ref[size_t(m) * N + n] = sum;
        }
    DeviceBuffer<fp8> A = upload(a), B = upload(b);
    DeviceBuffer<float> sA(size_t(scale_tiles(K)) * M), sB(block_scale_count(N, K)), one(1);
    sA.upload(std::vector<float>(sA.count, 1.0f)), sB.upload(std::vector<float>(sB.count, 1.0f));
    one.upload({1.0f});
    DeviceBuffer<float> C(size_t(M) * N);
    auto run = [&](const std::function<void()>& call) {
        try {
            call();
            return errors(C.download(), ref);
        } catch (const std::exception&) {
            return Errors{-1, -1};
        }
    };
    Errors ours = run([&] {
        fp8_gemm<float, BScales::Block>(C.data(), A.data(), B.data(), sA.data(), sB.data(), M, N, K, false, true,
                                        nullptr);
    });
    Errors ours_off = run([&] {
        fp8_gemm<float, BScales::Block>(C.data(), A.data(), B.data(), sA.data(), sB.data(), M, N, K, false, false,
                                        nullptr);
    });
    auto lt = [&](bool fast) {
        return run([&] {
            fp8_gemm_cublaslt(blas, nullptr, C.data(), A.data(), B.data(), one.data(), one.data(), M, N, K,
                              CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, CUBLASLT_MATMUL_MATRIX_SCALE_SCALAR_32F, false,
                              fast);
        });
    };
    Errors lt_on = lt(false), lt_fast = lt(true);
    std::printf("| %d | %.1e (%.1e) | %.1e (%.1e) | %.1e (%.1e) | %.1e (%.1e) |\n", K, ours.rel, ours.max, ours_off.rel,
                ours_off.max, lt_on.rel, lt_on.max, lt_fast.rel, lt_fast.max);
}

}  // namespace

int main() {
    if (!require_gpu()) return 1;
    Blas blas;
    const int tokens = 64 * 512;
    std::printf("TFLOP/s (n/a: no algorithm for the shape)\n\n");
    std::printf("| GEMM | M, N, K | ours, wgmma | ours, mma.sync | cuBLASLt FP8 1x128 x 128x128 | cuBLASLt BF16 |\n");
    std::printf("| --- | --- | --- | --- | --- | --- |\n");
    speed(blas, "q_a_proj", tokens, 256, 384);
    speed(blas, "q_b_proj", tokens, 576, 256);
    speed(blas, "kv_a_proj_with_mqa", tokens, 160, 384);
    speed(blas, "o_proj", tokens, 384, 384);
    speed(blas, "gate_up_proj", tokens, 2048, 384);
    speed(blas, "down_proj", tokens, 384, 1024);
    speed(blas, "square", 4096, 4096, 4096);
    speed(blas, "square", 8192, 8192, 8192);
    std::printf("\nRelative error against FP64 (max error / max |ref| in brackets; negative: not supported)\n\n");
    std::printf("| K | ours, promotion every 128 | ours, no promotion | cuBLASLt | cuBLASLt, fast accumulation |\n");
    std::printf("| --- | --- | --- | --- | --- |\n");
    for (int K : {512, 1024, 4096, 16384, 65536}) accumulation(blas, K);
    return 0;
}
