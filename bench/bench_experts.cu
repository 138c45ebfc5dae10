// The routed experts' FP8 GEMMs: a loop of per-expert cuBLASLt calls against our one grouped launch for all experts
// (fp8_gemm_grouped_rows / fp8_gemm_grouped_reduction), at the default model's shapes.
//   ./build/bench_experts [--tokens 32768] [--skew 0.3]
// Each expert's rows are its load padded to a multiple of 128 (as moe.cuh groups them); the loads come from a skewed
// random routing of tokens x top-4 pairs (expert e drawn with weight 1 + skew (e % 4 - 1.5) / 1.5).
// Rows: the forward GEMM and the two backward GEMMs of gate_up_proj [2I, d] and down_proj [d, I] over all experts,
// in the operand layouts fp8_linear_forward and fp8_linear_backward use; ms per call (events around 20 calls on one
// stream: a loop's host launches are inside that time, as they are in a training step).
#include <cstdio>
#include <string>

#include "../fp8.cuh"
#include "../io/options.h"
#include "../kernels/rng.h"
#include "timing.h"

namespace {

enum class Gemm { Forward, DataGrad, WeightGrad };

// The operands of one projection's three GEMMs over all experts, zero codes and unit scales (the speed of an FP8
// GEMM does not depend on the values).
struct Operands {
    int N, K;  // the weight [N, K]
    DeviceBuffer<fp8> x, x_t, dy, dy_t, W, W_t;
    DeviceBuffer<float> x_s, x_t_s, dy_s, dy_t_s, W_s, W_t_s, dW;
    DeviceBuffer<bf16> out;
    Operands(long rows, int E, int n, int k)
        : N(n), K(k), x(rows * k), x_t(rows * k), dy(rows * n), dy_t(rows * n), W(long(E) * n * k),
          W_t(long(E) * n * k), x_s(fp8_operand_scales(int(rows), k)), x_t_s(fp8_operand_scales(int(rows), k)),
          dy_s(fp8_operand_scales(int(rows), n)), dy_t_s(fp8_operand_scales(int(rows), n)),
          W_s(E * block_scale_count(n, k)), W_t_s(E * block_scale_count(k, n)), dW(long(E) * n * k),
          out(rows * std::max(n, k)) {
        for (DeviceBuffer<fp8>* b : {&x, &x_t, &dy, &dy_t, &W, &W_t}) CUDA_CHECK(cudaMemset(b->data(), 0, b->bytes()));
        for (DeviceBuffer<float>* b : {&x_s, &x_t_s, &dy_s, &dy_t_s, &W_s, &W_t_s})
            b->upload(std::vector<float>(b->count, 1.0f));
    }
};

// What fp8_linear ran over row groups before the grouped launch: one cuBLASLt call per expert.
void loop(Gemm which, Blas& blas, const std::vector<int>& offsets, Operands& o) {
    const int E = int(offsets.size()) - 1, N = o.N, K = o.K;
    for (int e = 0; e < E; e++) {
        const long first = offsets[e];
        const int M = offsets[e + 1] - offsets[e];
        if (which == Gemm::Forward)
            fp8_matmul(Fp8Backend::CuBLASLt, blas, 0, o.out.data() + first * N, o.x.data() + first * K,
                       o.W.data() + long(e) * N * K, o.x_s.data() + first * scale_tiles(K),
                       o.W_s.data() + e * block_scale_count(N, K), M, N, K, BScales::Block, false);
        else if (which == Gemm::DataGrad)
            fp8_matmul(Fp8Backend::CuBLASLt, blas, 0, o.out.data() + first * K, o.dy.data() + first * N,
                       o.W_t.data() + long(e) * N * K, o.dy_s.data() + first * scale_tiles(N),
                       o.W_t_s.data() + e * block_scale_count(K, N), M, K, N, BScales::Block, false);
        else
            fp8_matmul(Fp8Backend::CuBLASLt, blas, 0, o.dW.data() + long(e) * N * K, o.dy_t.data() + first * N,
                       o.x_t.data() + first * K, o.dy_t_s.data() + first / N_C * N, o.x_t_s.data() + first / N_C * K,
                       N, K, M, BScales::Row, false);
    }
}

void grouped(Gemm which, const int* offsets, int E, int rows, Operands& o) {
    const int N = o.N, K = o.K;
    if (which == Gemm::Forward)
        fp8_gemm_grouped_rows(o.out.data(), o.x.data(), o.W.data(), o.x_s.data(), o.W_s.data(), offsets, E, rows, N, K,
                              false, 0);
    else if (which == Gemm::DataGrad)
        fp8_gemm_grouped_rows(o.out.data(), o.dy.data(), o.W_t.data(), o.dy_s.data(), o.W_t_s.data(), offsets, E,
                              rows, K, N, false, 0);
    else
        fp8_gemm_grouped_reduction(o.dW.data(), o.dy_t.data(), o.x_t.data(), o.dy_t_s.data(), o.x_t_s.data(), offsets,
                                   E, N, K, 0);
}

// Offsets of the experts' padded rows for tokens x top_k pairs drawn with the skewed weights.
std::vector<int> expert_offsets(int tokens, int top_k, int E, double skew) {
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
    std::vector<int> offsets = {0};
    for (int r : load) offsets.push_back(offsets.back() + ceil_div(r, 128) * 128);
    return offsets;
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
    const std::vector<int> offsets = expert_offsets(tokens, top_k, E, skew);
    const int rows = offsets.back();
    std::printf("rows per expert (padded to 128):");
    for (int e = 0; e < E; e++) std::printf(" %d", offsets[e + 1] - offsets[e]);
    std::printf("\n\n| GEMM | N x K per expert | loop of cuBLASLt calls, ms | one grouped launch, ms |\n"
                "| --- | --- | --- | --- |\n");
    DeviceBuffer<int> device_offsets(offsets.size());
    device_offsets.upload(offsets);
    Blas blas;
    struct Projection {
        const char* name;
        int N, K;
    };
    for (const Projection& p : {Projection{"gate_up_proj", 2 * I, d}, Projection{"down_proj", d, I}}) {
        Operands o(rows, E, p.N, p.K);
        const std::pair<Gemm, const char*> gemms[] = {
            {Gemm::Forward, "y = x W^T"}, {Gemm::DataGrad, "dx = dy W"}, {Gemm::WeightGrad, "dW = dy^T x"}};
        for (const auto& gemm : gemms) {
            const Gemm which = gemm.first;
            const double loop_ms = time_ms([&] { loop(which, blas, offsets, o); });
            const double grouped_ms = time_ms([&] { grouped(which, device_offsets.data(), E, rows, o); });
            std::printf("| %s: %s | %d x %d | %.3f | %.3f |\n", p.name, gemm.second, p.N, p.K, loop_ms, grouped_ms);
        }
    }
    return 0;
}
