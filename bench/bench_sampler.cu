// Sampling speed: P prompts of 32 tokens, each extended by N sampled tokens (no stop token) with the latent KV
// cache, on the default config with random weights. Prints generated tokens/s and the time per decode step.
//   ./build/bench_sampler [P] [N] [precision: bf16|fp32]
#include <cstdio>
#include <string>

#include "../sampler.cuh"

template <typename T>
void run(int P, int N) {
    Config c;
    const int prompt = 32, L = prompt + N;
    Model<T> model(c, 1, L);
    model.init_weights(1);
    Sampler<T> sampler(model, P, L);
    std::vector<std::vector<int>> prompts(P, std::vector<int>(prompt));
    Rng rng(2);
    for (auto& p : prompts)
        for (int& t : p) t = int(rng.range(16, 111));
    SamplingOptions opt;
    opt.max_new = N;
    sampler.generate(prompts, opt);  // warm-up: cuBLASLt plans, caches
    WallTimer clock;
    auto out = sampler.generate(prompts, opt);
    double seconds = clock.seconds();
    long generated = 0;
    for (const auto& o : out) generated += long(o.size());
    int steps = prompt + N;
    std::printf("%8d %8d %12ld %14.0f %14.3f\n", P, N, generated, generated / seconds, seconds / steps * 1e3);
}

int main(int argc, char** argv) {
    int P = argc > 1 ? std::stoi(argv[1]) : 256, N = argc > 2 ? std::stoi(argv[2]) : 256;
    std::string precision = argc > 3 ? argv[3] : "bf16";
    if (!require_gpu()) return 1;
    std::printf("%8s %8s %12s %14s %14s\n", "prompts", "new", "generated", "tokens/s", "ms/step");
    if (precision == "fp32")
        run<float>(P, N);
    else
        run<bf16>(P, N);
    return 0;
}
