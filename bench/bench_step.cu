// Training speed: optimizer steps on B x T random tokens, the model of a config (default: the V3-shaped MoE model)
// in a precision. Prints ms per step and tokens/s (the median of the timed steps, each step waited for), and when
// the host's train_step call returned (the median): a step whose host returns near its end is bound by the host's
// launches and waits, and shorter kernels do not shorten it. With
// --profile, one more step runs between cudaProfilerStart and cudaProfilerStop, for
//   ncu --profile-from-start off --metrics gpu__time_duration.sum --csv ./build/bench_step --profile
//   ./build/bench_step [--config FILE.json] [--precision fp8|bf16|fp32] [--fp8-gemm cublaslt|own] [--batch 64]
//                      [--seq 512] [--steps 20] [--warmup 3] [--mtp-lambda 0.3]
// As in train, a GPU without FP8 tensor cores runs in BF16, and one without cuBLASLt's block-scaled GEMM runs ours.
// The MTP modules train as in `make train` (--mtp-lambda 0: the main model alone, as the PyTorch twin has it).
// The routed experts' GEMMs change shape with the expert loads, and each new shape costs a cuBLASLt heuristic query
// on the host; a long run has met its shapes, so many warm-up steps time the steady state of training.
#include <cuda_profiler_api.h>

#include <algorithm>
#include <cstdio>
#include <string>

#include "../io/checkpoint.h"
#include "../model.cuh"
#include "command_line.h"

struct BenchOptions {
    std::string config, precision = "fp8", fp8_gemm = "cublaslt";
    int batch = 64, seq = 512, steps = 20, warmup = 3;
    float mtp_lambda = 0.3f;
    bool profile = false;
};

template <typename T>
void run(const Config& c, const BenchOptions& o) {
    Model<T> model(c, o.batch, o.seq);
    model.init_weights(1);
    if (o.precision == "fp8") model.enable_fp8(fp8_backend_named(o.fp8_gemm));
    Rng rng(2);
    std::vector<int> rows(size_t(o.batch) * (o.seq + 1)), inputs, targets;
    for (int& t : rows) t = int(rng.range(16, c.vocab_size - 1));
    split_rows(rows, o.batch, o.seq, inputs, targets);
    std::vector<double> ms, host_ms;
    size_t warm_plans = 0;
    for (int step = 1; step <= o.warmup + o.steps; step++) {  // warm-up steps: cuBLASLt plans, allocations
        WallTimer clock;
        model.train_step(inputs, targets, o.batch, o.seq, AdamW{1e-3f}, 1.0f, step, 1, o.mtp_lambda);
        const double host = clock.seconds() * 1e3;
        model.read_scalars();
        if (step > o.warmup) ms.push_back(clock.seconds() * 1e3), host_ms.push_back(host);
        if (step == o.warmup) warm_plans = model.blas.plans.size();
    }
    std::sort(ms.begin(), ms.end());
    std::sort(host_ms.begin(), host_ms.end());
    const double median = ms[ms.size() / 2];
    std::printf("%-8s %-10s %8.2f %12.0f   (%d x %d tokens, %.2fM parameters, %.2fM in GEMMs per token, MTP %s)\n",
                c.has_moe() ? "moe" : "dense", o.precision.c_str(), median, o.batch * o.seq / median * 1e3, o.batch,
                o.seq, model.num_params() / 1e6, model.matmul_params(true) / 1e6,
                o.mtp_lambda > 0 && c.num_nextn_predict_layers > 0 ? "trained" : "off");
    std::printf(
        "         %d warm-up steps, %d timed; cuBLASLt plans: %zu after the warm-up, %zu new in the timed steps\n",
        o.warmup, o.steps, warm_plans, model.blas.plans.size() - warm_plans);
    std::printf("         the host's train_step call returned after %.2f ms of the step\n", host_ms[host_ms.size() / 2]);
    if (!o.profile) return;
    CUDA_CHECK(cudaProfilerStart());
    model.train_step(inputs, targets, o.batch, o.seq, AdamW{1e-3f}, 1.0f, o.warmup + o.steps + 1, 1, o.mtp_lambda);
    model.read_scalars();
    CUDA_CHECK(cudaProfilerStop());
}

int main(int argc, char** argv) {
    BenchOptions o;
    FlagSet flags;
    flags.add("config", &o.config, "config.json of the model (default: the V3-shaped MoE model)");
    flags.add("precision", &o.precision, "fp8 | bf16 | fp32");
    flags.add("fp8-gemm", &o.fp8_gemm, "the FP8 GEMMs outside the routed experts: cublaslt | own");
    flags.add("batch", &o.batch, "sequences per step");
    flags.add("seq", &o.seq, "tokens per sequence");
    flags.add("steps", &o.steps, "timed steps");
    flags.add("warmup", &o.warmup, "steps before the timed ones");
    flags.add("mtp-lambda", &o.mtp_lambda, "weight of the MTP loss (0: the MTP modules do not run)");
    flags.add_switch("profile", &o.profile, "one more step between cudaProfilerStart and cudaProfilerStop");
    auto check = [&] {
        if (o.precision != "fp8" && o.precision != "bf16" && o.precision != "fp32")
            throw std::invalid_argument("--precision must be fp8, bf16 or fp32");
        if (o.fp8_gemm != "cublaslt" && o.fp8_gemm != "own")
            throw std::invalid_argument("--fp8-gemm must be cublaslt or own");
        if (o.steps < 1 || o.batch < 1 || o.seq < 1 || o.warmup < 1)
            throw std::invalid_argument("--steps, --batch, --seq, --warmup: >= 1");
    };
    return benchmark_main(argc, argv, flags, check, [&] {
        Config c = o.config.empty() ? Config() : load_config(o.config);
        fit_precision_to_gpu(o.precision, o.fp8_gemm);
        if (o.precision == "fp32")
            run<float>(c, o);
        else
            run<bf16>(c, o);
    });
}
