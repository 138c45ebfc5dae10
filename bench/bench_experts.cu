// The routed experts' GEMMs: a loop of per-expert cuBLASLt calls (what Linear runs over row groups) against one
// grouped launch for all experts (cuBLAS's cublasGemmGroupedBatchedEx), in BF16, at the default model's shapes.
//   ./build/bench_experts [--tokens 32768] [--skew 0.3]
// Each expert's rows are its load padded to a multiple of 128 (as moe.cuh groups them); the loads come from a skewed
// random routing of tokens x top-4 pairs (expert e drawn with weight 1 + skew (e % 4 - 1.5) / 1.5). cuBLASLt 13.0
// declares no grouped GEMM, and cublasGemmGroupedBatchedEx takes no FP8 block scales, so the FP8 experts can only
// run as the loop; this table says what a grouped launch would be worth where one exists.
// Rows: the forward GEMM and the two backward GEMMs of gate_up_proj [2I, d] and down_proj [d, I] over all experts,
// ms per call (events around 20 calls on one stream; a loop's host launches are inside that time).
#include <cublas_v2.h>

#include <cstdio>
#include <string>

#include "../io/options.h"
#include "../kernels/gemm.cuh"
#include "../kernels/rng.h"
#include "timing.h"

namespace {

void check(cublasStatus_t status, const char* what) {
    if (status != CUBLAS_STATUS_SUCCESS)
        throw std::runtime_error(std::string(what) + ": cuBLAS status " + std::to_string(int(status)));
}

// One GEMM per expert in cuBLAS's column-major terms, C_e [m_e, n_e] = op(A_e) op(B_e), each expert a group of one
// problem: the pointer arrays live on the device, the sizes and scalars on the host.
struct Grouped {
    std::vector<cublasOperation_t> ta, tb;
    std::vector<int> m, n, k, lda, ldb, ldc, ones;
    std::vector<float> alpha, beta;
    DeviceBuffer<const void*> A, B;
    DeviceBuffer<void*> C;
    cudaDataType_t c_type;
    explicit Grouped(int E, cudaDataType_t c)
        : ones(E, 1), alpha(E, 1.0f), beta(E, 0.0f), A(E), B(E), C(E), c_type(c) {}
    void run(cublasHandle_t handle) const {
        check(cublasGemmGroupedBatchedEx(handle, ta.data(), tb.data(), m.data(), n.data(), k.data(), alpha.data(),
                                         A.data(), CUDA_R_16BF, lda.data(), B.data(), CUDA_R_16BF, ldb.data(),
                                         beta.data(), C.data(), c_type, ldc.data(), int(ones.size()), ones.data(),
                                         CUBLAS_COMPUTE_32F),
              "cublasGemmGroupedBatchedEx");
    }
};

// Row-major y = x W^T, dx = dy W, dW = dy^T x (FP32) per expert, W [N, K], x [rows_e, K]: as Grouped problems.
enum class Gemm { Forward, DataGrad, WeightGrad };

Grouped grouped(Gemm which, const std::vector<int>& rows, int N, int K, const bf16* x, const bf16* W, const bf16* dy,
                void* out) {
    const int E = int(rows.size());
    Grouped g(E, which == Gemm::WeightGrad ? CUDA_R_32F : CUDA_R_16BF);
    std::vector<const void*> A(E), B(E);
    std::vector<void*> C(E);
    long first = 0;
    for (int e = 0; e < E; e++) {
        const bf16 *x_e = x + first * K, *dy_e = dy + first * N, *W_e = W + long(e) * N * K;
        const int M = rows[e];
        if (which == Gemm::Forward) {  // y^T [N, M] = W^T' x^T
            g.ta.push_back(CUBLAS_OP_T), g.tb.push_back(CUBLAS_OP_N), g.m.push_back(N), g.n.push_back(M);
            g.k.push_back(K), g.lda.push_back(K), g.ldb.push_back(K), g.ldc.push_back(N);
            A[e] = W_e, B[e] = x_e, C[e] = static_cast<bf16*>(out) + first * N;
        } else if (which == Gemm::DataGrad) {  // dx^T [K, M] = W^T dy^T
            g.ta.push_back(CUBLAS_OP_N), g.tb.push_back(CUBLAS_OP_N), g.m.push_back(K), g.n.push_back(M);
            g.k.push_back(N), g.lda.push_back(K), g.ldb.push_back(N), g.ldc.push_back(K);
            A[e] = W_e, B[e] = dy_e, C[e] = static_cast<bf16*>(out) + first * K;
        } else {  // dW^T [K, N] = x^T dy
            g.ta.push_back(CUBLAS_OP_N), g.tb.push_back(CUBLAS_OP_T), g.m.push_back(K), g.n.push_back(N);
            g.k.push_back(M), g.lda.push_back(K), g.ldb.push_back(N), g.ldc.push_back(K);
            A[e] = x_e, B[e] = dy_e, C[e] = static_cast<float*>(out) + long(e) * N * K;
        }
        first += M;
    }
    g.A.upload(A), g.B.upload(B), g.C.upload(C);
    return g;
}

// The loop: the project's linear_forward / linear_backward's two GEMMs, expert by expert.
void loop(Gemm which, Blas& blas, const std::vector<int>& rows, int N, int K, const bf16* x, const bf16* W,
          const bf16* dy, void* out) {
    long first = 0;
    for (size_t e = 0; e < rows.size(); e++) {
        const bf16 *x_e = x + first * K, *dy_e = dy + first * N, *W_e = W + long(e) * N * K;
        const int M = rows[e];
        if (which == Gemm::Forward)
            matmul(blas, 0, static_cast<bf16*>(out) + first * N, x_e, W_e, Matmul{M, N, K, false, true});
        else if (which == Gemm::DataGrad)
            matmul(blas, 0, static_cast<bf16*>(out) + first * K, dy_e, W_e, Matmul{M, K, N, false, false});
        else
            matmul(blas, 0, static_cast<float*>(out) + long(e) * N * K, dy_e, x_e, Matmul{N, K, M, true, false});
        first += M;
    }
}

// Padded rows per expert for tokens x top_k pairs drawn with the skewed weights.
std::vector<int> expert_rows(int tokens, int top_k, int E, double skew) {
    std::vector<double> cumulative(E);
    double total = 0.0;
    for (int e = 0; e < E; e++) cumulative[e] = total += 1.0 + skew * (e % 4 - 1.5) / 1.5;
    std::vector<int> load(E, 0);
    Rng rng(7);
    for (long p = 0; p < long(tokens) * top_k; p++) {
        const double u = rng.uniform() * total;
        int e = 0;
        while (e + 1 < E && cumulative[e] <= u) e++;
        load[e]++;
    }
    for (int& r : load) r = ceil_div(r, 128) * 128;
    return load;
}

}  // namespace

int main(int argc, char** argv) {
    int tokens = 32768, E = 16, top_k = 4, d = 384, I = 256;
    double skew = 0.3;
    FlagSet flags;
    flags.add("tokens", &tokens, "tokens per step (64 x 512 in bench_step)");
    flags.add("skew", &skew, "how unequal the experts' loads are, 0 to 1");
    try {
        flags.parse(std::vector<std::string>(argv + 1, argv + argc));
        if (tokens < 1 || skew < 0.0 || skew > 1.0) throw std::invalid_argument("--tokens >= 1, --skew in [0, 1]");
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "error: %s\nflags:\n%s", e.what(), flags.help().c_str());
        return 2;
    }
    if (!require_gpu()) return 1;
    const std::vector<int> rows = expert_rows(tokens, top_k, E, skew);
    long total = 0;
    std::printf("rows per expert (padded to 128):");
    for (int r : rows) std::printf(" %d", r), total += r;
    std::printf(
        "\n\n| GEMM | N x K per expert | loop of cuBLASLt calls, ms | one grouped launch, ms |\n| --- | --- | --- | "
        "--- |\n");

    Blas blas;
    cublasHandle_t handle;
    CUBLAS_CHECK(cublasCreate(&handle));
    struct Projection {
        const char* name;
        int N, K;
    };
    for (const Projection& p : {Projection{"gate_up_proj", 2 * I, d}, Projection{"down_proj", d, I}}) {
        DeviceBuffer<bf16> x(total * p.K), W(long(E) * p.N * p.K), dy(total * p.N), y(total * std::max(p.N, p.K));
        DeviceBuffer<float> dW(long(E) * p.N * p.K);
        for (DeviceBuffer<bf16>* b : {&x, &W, &dy, &y}) CUDA_CHECK(cudaMemset(b->data(), 0, b->bytes()));
        const std::pair<Gemm, const char*> gemms[] = {
            {Gemm::Forward, "y = x W^T"}, {Gemm::DataGrad, "dx = dy W"}, {Gemm::WeightGrad, "dW = dy^T x"}};
        for (const auto& gemm : gemms) {
            const Gemm which = gemm.first;
            const char* what = gemm.second;
            void* out = which == Gemm::WeightGrad ? static_cast<void*>(dW.data()) : static_cast<void*>(y.data());
            const double loop_ms =
                time_ms([&] { loop(which, blas, rows, p.N, p.K, x.data(), W.data(), dy.data(), out); });
            const Grouped g = grouped(which, rows, p.N, p.K, x.data(), W.data(), dy.data(), out);
            const double grouped_ms = time_ms([&] { g.run(handle); });
            char grouped_text[32] = "not supported";
            if (grouped_ms >= 0) std::snprintf(grouped_text, sizeof grouped_text, "%.3f", grouped_ms);
            std::printf("| %s: %s | %d x %d | %.3f | %s |\n", p.name, what, p.N, p.K, loop_ms, grouped_text);
        }
    }
    cublasDestroy(handle);
    return 0;
}
