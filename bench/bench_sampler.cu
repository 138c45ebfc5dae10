// Sampling speed, plain decoding against speculative decoding with the MTP module's draft (V3 §5.4.3), in one run:
// P prompts, each extended by N tokens with the latent KV cache. With --init, a trained checkpoint answers problems
// of the pretraining mix in the prompt form it was trained with, as GRPO's rollouts do; without, the default
// config's random weights continue random prompts of 32 tokens (their drafts are mostly wrong). --stop ends an
// answer at </answer> or <|eos|> as the rollouts do; else every sequence gets N tokens.
//   ./build/bench_sampler [--init CKPT] [--prompts 256] [--new 256] [--stop] [--temperature T] [--precision bf16|fp32]
// Prints, per temperature (0, 0.6 and 1, or --temperature): generated tokens, tokens/s and the share of drafts kept,
// plain and speculative. The speculative arm drafts at any batch size (the sampler's own limit lifted): a sweep over
// --prompts finds the batch size beyond which speculation stops paying (SPECULATIVE_SEQUENCES_PER_SM). With
// --profile plain|speculative, one decode step at temperature 1, 64 steps into the sequences, runs between
// cudaProfilerStart and cudaProfilerStop instead, for
//   ncu --profile-from-start off --metrics gpu__time_duration.sum --csv ./build/bench_sampler --profile speculative
#include <cuda_profiler_api.h>

#include <cstdio>
#include <string>

#include "../data/corpus.h"
#include "../io/checkpoint.h"
#include "../sampler.cuh"
#include "command_line.h"

struct BenchOptions {
    std::string init, precision = "bf16", profile;
    int prompts = 256, new_tokens = 256;
    float temperature = -1.0f;  // negative: 0, 0.6 and 1
    bool stop = false;
};

std::vector<std::vector<int>> bench_prompts(const BenchOptions& o, const std::string& prompt_template, int vocab) {
    std::vector<std::vector<int>> prompts;
    Rng rng(2);
    data::Tokenizer tok;
    data::CorpusConfig corpus;
    for (int i = 0; i < o.prompts; i++) {
        if (o.init.empty()) {
            prompts.emplace_back(32);
            for (int& t : prompts.back()) t = int(rng.range(16, vocab - 1));
        } else {
            const data::Problem p = data::draw_problem(corpus, data::ProblemMix{}, rng);
            prompts.push_back(tok.encode(data::prompt_text(p, prompt_template == "r1zero")));
        }
    }
    return prompts;
}

template <typename T>
void run(const BenchOptions& o) {
    const Config c = o.init.empty() ? Config() : load_config(open_checkpoint(o.init) + "/config.json");
    Model<T> model(c, 1, c.max_position_embeddings);
    std::string prompt_template = "chat";
    if (o.init.empty())
        model.init_weights(1);
    else
        prompt_template = load_weights(open_checkpoint(o.init), model);
    const std::vector<std::vector<int>> prompts = bench_prompts(o, prompt_template, c.vocab_size);
    size_t longest = 0;
    for (const auto& p : prompts) longest = std::max(longest, p.size());
    Sampler<T> sampler(model, o.prompts, int(longest) + o.new_tokens);
    if (!o.profile.empty()) {
        SamplingOptions opt;
        opt.speculative = o.profile == "speculative", opt.speculative_max_batch = o.prompts;
        sampler.start(prompts, 3);
        for (int step = 0; step < 64; step++) sampler.decode(o.prompts, opt);
        CUDA_CHECK(cudaStreamSynchronize(sampler.stream));
        CUDA_CHECK(cudaProfilerStart());
        sampler.decode(o.prompts, opt);
        CUDA_CHECK(cudaStreamSynchronize(sampler.stream));
        CUDA_CHECK(cudaProfilerStop());
        return;
    }
    std::printf("%-12s %11s %10s %12s %12s %14s %8s\n", "decoding", "temperature", "generated", "tokens/s",
                "drafts kept", "tokens/pass", "speed-up");
    const std::vector<float> temperatures =
        o.temperature < 0.0f ? std::vector<float>{0.0f, 0.6f, 1.0f} : std::vector<float>{o.temperature};
    for (float temperature : temperatures) {
        double plain_rate = 0.0;
        for (bool speculative : {false, true}) {
            SamplingOptions opt;
            opt.temperature = temperature, opt.speculative = speculative, opt.max_new = o.new_tokens, opt.seed = 3;
            opt.speculative_max_batch = o.prompts;
            if (o.stop) opt.stop_a = data::ANSWER_END, opt.stop_b = data::EOS;
            sampler.generate(prompts, opt);  // warm-up: cuBLASLt plans, the graph
            WallTimer clock;
            auto out = sampler.generate(prompts, opt);
            const double seconds = clock.seconds();
            long generated = 0;
            for (const auto& x : out) generated += long(x.size());
            DraftCounts drafts;
            for (const DraftCounts& d : sampler.draft_counts(o.prompts)) drafts += d;
            const double rate = generated / seconds;
            if (!speculative) plain_rate = rate;
            char kept[16] = "-", per_pass[16] = "1.00";
            if (speculative) {
                std::snprintf(kept, sizeof kept, "%.1f%%", 100.0 * drafts.rate());
                std::snprintf(per_pass, sizeof per_pass, "%.2f", 1.0 + drafts.rate());  // a kept draft adds a token
            }
            std::printf("%-12s %11.1f %10ld %12.0f %12s %14s %7.2fx\n", speculative ? "speculative" : "plain",
                        temperature, generated, rate, kept, per_pass, rate / plain_rate);
        }
    }
}

int main(int argc, char** argv) {
    BenchOptions o;
    FlagSet flags;
    flags.add("init", &o.init, "checkpoint to sample from (default: random weights of the default config)");
    flags.add("prompts", &o.prompts, "sequences sampled together");
    flags.add("new", &o.new_tokens, "tokens generated per sequence at most");
    flags.add("precision", &o.precision, "bf16 | fp32");
    flags.add("temperature", &o.temperature, "the one sampling temperature to time (default: 0, 0.6 and 1)");
    flags.add_switch("stop", &o.stop, "end an answer at </answer> or <|eos|>, as GRPO's rollouts do");
    flags.add("profile", &o.profile, "plain | speculative: one decode step between cudaProfilerStart and Stop");
    auto check = [&] {
        if (o.precision != "bf16" && o.precision != "fp32") throw std::invalid_argument("--precision: bf16 or fp32");
        if (o.prompts < 1 || o.new_tokens < 1) throw std::invalid_argument("--prompts, --new: >= 1");
        if (!o.profile.empty() && o.profile != "plain" && o.profile != "speculative")
            throw std::invalid_argument("--profile: plain or speculative");
    };
    return benchmark_main(argc, argv, flags, check, [&] {
        if (o.precision == "fp32")
            run<float>(o);
        else
            run<bf16>(o);
    });
}
