// Why `make sanitize` runs initcheck over the kernels' own tests only: on Hopper, compute-sanitizer's initcheck
// does not see the writes of cuBLASLt's BF16 GEMM kernels, so every kernel that reads a GEMM's output (the norms,
// SwiGLU, the softmax, the cross-entropy) is reported as reading memory never written.
//
// Here C is written by nothing but one GEMM (gemm.cuh's linear_forward), then copied to the host and checked against
// the product computed here, which shows every element written and right. Under
// `compute-sanitizer --tool initcheck`, the FP32 GEMM's copy is clean and the BF16 GEMM's is reported.
#include <cmath>
#include <cstdio>
#include <vector>

#include "kernels/gemm.cuh"

template <typename T>
double worst_error(const char* name) {
    const int M = 384, N = 96, K = 64;
    std::vector<T> a(size_t(M) * K), b(size_t(N) * K);
    for (int i = 0; i < M * K; i++) a[i] = from_float<T>(float(i * 7 % 11) / 11.0f - 0.5f);
    for (int i = 0; i < N * K; i++) b[i] = from_float<T>(float(i * 5 % 13) / 13.0f - 0.5f);
    DeviceBuffer<T> A, B, C(size_t(M) * N);
    A.upload(a), B.upload(b);
    Blas blas;
    linear_forward(blas, nullptr, C.data(), A.data(), B.data(), M, N, K);
    std::vector<T> c(C.count);
    CUDA_CHECK(cudaMemcpy(c.data(), C.data(), C.bytes(), cudaMemcpyDeviceToHost));
    double worst = 0.0;
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double sum = 0.0;
            for (int k = 0; k < K; k++) sum += double(to_float(a[size_t(m) * K + k])) * to_float(b[size_t(n) * K + k]);
            worst = std::fmax(worst, std::fabs(sum - to_float(c[size_t(m) * N + n])));
        }
    std::printf("%s GEMM: largest error against the host product %.3g\n", name, worst);
    return worst;
}

int main() {
    // Bounds of each type's rounding of sums of 64 products below 0.25 in magnitude.
    const bool right = worst_error<float>("FP32") < 1e-5 && worst_error<bf16>("BF16") < 1e-1;
    return right ? 0 : 1;
}
