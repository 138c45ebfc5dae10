// The sampler: absorbed latent-cache decoding against the full forward pass, determinism, and the sampling
// kernel's distribution against a CPU reference.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include "../sampler.cuh"
#include "model_reference.h"

namespace {

using model_ref::tiny_config;

std::vector<std::vector<int>> random_prompts(const std::vector<int>& lengths, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<std::vector<int>> prompts;
    for (int n : lengths) {
        prompts.emplace_back(n);
        for (int& t : prompts.back()) t = int(rng.range(0, vocab - 1));
    }
    return prompts;
}

std::vector<float> download(const float* p, size_t n) {
    std::vector<float> h(n);
    CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(float), cudaMemcpyDeviceToHost));
    return h;
}

// Steps the sampler greedily through max_len positions, keeping each step's logits [S, V]; then checks them
// against the full (training) forward pass over each final sequence.
template <typename T>
double decode_vs_forward_error(uint64_t seed, const Config& c) {
    const int L = 20, V = c.vocab_size;
    Model<T> model(c, 1, L);
    model.init_weights(seed);
    Sampler<T> sampler(model, 3, L);
    std::vector<std::vector<int>> prompts = random_prompts({1, 4, 7}, V, seed);
    int S = int(prompts.size());
    sampler.start(prompts);
    std::vector<std::vector<float>> step_logits;
    SamplingOptions greedy;
    greedy.temperature = 0.0f;
    for (int pos = 0; pos + 1 < L; pos++) {
        sampler.decode(S, greedy);
        CUDA_CHECK(cudaStreamSynchronize(sampler.stream));
        step_logits.push_back(download(sampler.logits, size_t(S) * V));
    }
    std::vector<int> seqs(size_t(S) * L);
    CUDA_CHECK(cudaMemcpy(seqs.data(), sampler.seqs, seqs.size() * sizeof(int), cudaMemcpyDeviceToHost));
    // generate() replays the step as a CUDA graph: it must write the same greedy tokens
    std::vector<std::vector<int>> replayed = sampler.generate(prompts, greedy);
    for (int s = 0; s < S; s++)
        CHECK(std::equal(replayed[s].begin(), replayed[s].end(), seqs.begin() + long(s) * L + long(prompts[s].size()),
                         seqs.begin() + long(s + 1) * L));
    double num = 0.0, den = 0.0;
    for (int s = 0; s < S; s++) {
        std::vector<int> tokens(seqs.begin() + long(s) * L, seqs.begin() + long(s + 1) * L);
        CHECK(std::equal(prompts[s].begin(), prompts[s].end(), tokens.begin()));  // prompts were forced
        model.forward(tokens, 1, L);
        std::vector<float> full = download(model.logits, size_t(L) * V);
        for (int pos = 0; pos + 1 < L; pos++)
            for (int v = 0; v < V; v++) {
                double want = full[size_t(pos) * V + v], got = step_logits[pos][size_t(s) * V + v];
                num += (got - want) * (got - want), den += want * want;
            }
        // every generated token is the greedy choice of the step's logits
        for (int pos = int(prompts[s].size()) - 1; pos + 1 < L; pos++) {
            const float* row = &step_logits[pos][size_t(s) * V];
            CHECK(tokens[pos + 1] == int(std::max_element(row, row + V) - row));
        }
    }
    return std::sqrt(num / den);
}

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE("latent-cache decoding gives the full forward pass's logits, dense and with DeepSeekMoE") {
        for (const Config& c : {tiny_config(), model_ref::tiny_moe_config()}) {
            CAPTURE(c.first_k_dense_replace);
            // FP32: the absorbed products (q W_uk^T) c_kv only reorder the sums of q (W_uk c_kv); decoding runs
            // every expert on its tokens where training runs each expert on its own rows.
            CHECK(decode_vs_forward_error<float>(21, c) < 2e-5);
            // BF16: the two paths round at different points (q_abs and ctx are stored in BF16).
            CHECK(decode_vs_forward_error<bf16>(22, c) < 5e-2);
        }
    }

    TEST_CASE("sampling is deterministic for a seed and stops at stop tokens") {
        Config c = tiny_config();
        c.initializer_range = 0.02f;  // near-uniform logits: many different tokens get drawn
        const int L = 64;
        Model<bf16> model(c, 1, L);
        model.init_weights(5);
        Sampler<bf16> sampler(model, 8, L);
        std::vector<std::vector<int>> prompts = random_prompts({2, 3, 5, 1, 4, 6, 2, 3}, c.vocab_size, 6);
        SamplingOptions opt;
        opt.seed = 11, opt.stop_a = 7, opt.stop_b = 9;
        auto a = sampler.generate(prompts, opt), b = sampler.generate(prompts, opt);
        CHECK(a == b);
        opt.seed = 12;
        CHECK(sampler.generate(prompts, opt) != a);
        bool stopped = false;
        for (size_t s = 0; s < a.size(); s++) {
            REQUIRE(!a[s].empty());
            CHECK(a[s].size() + prompts[s].size() <= size_t(L));
            for (size_t t = 0; t + 1 < a[s].size(); t++) CHECK((a[s][t] != 7 && a[s][t] != 9));
            int last = a[s].back();
            if (last == 7 || last == 9)
                stopped = true;
            else
                CHECK(a[s].size() + prompts[s].size() == size_t(L));
        }
        CHECK(stopped);

        opt.stop_a = opt.stop_b = -1, opt.max_new = 5;  // no stop token: every sequence ends at max_new
        for (const auto& out : sampler.generate(prompts, opt)) CHECK(out.size() == 5);
    }

    TEST_CASE("the sampling kernel draws from softmax(logits / temperature) over the top k") {
        const int V = 128, S = 1, draws = 4000;
        std::vector<float> row(V);
        Rng rng(9);
        for (float& x : row) x = float(rng.uniform() * 4.0);
        DeviceBuffer<float> logits(V);
        logits.upload(row);
        DeviceBuffer<int> token(1), step_buf(1);
        DeviceBuffer<uint64_t> seed(1);
        seed.upload({3});
        auto draw_counts = [&](float temperature, int top_k) {
            std::map<int, int> counts;
            for (int step = 0; step < draws; step++) {
                step_buf.upload({step});
                sample_kernel<<<1, WARPS_PER_BLOCK * 32>>>(token.data(), logits.data(), S, V, temperature, top_k,
                                                           seed.data(), step_buf.data());
                CUDA_CHECK_LAUNCH();
                counts[token.download()[0]]++;
            }
            return counts;
        };
        std::vector<int> order(V);
        for (int v = 0; v < V; v++) order[v] = v;
        std::sort(order.begin(), order.end(), [&](int x, int y) { return row[x] > row[y]; });

        auto greedy = draw_counts(0.0f, 0);
        CHECK(greedy.size() == 1);
        CHECK(greedy.begin()->first == order[0]);

        const int k = 4;
        const float temperature = 0.7f;
        auto counts = draw_counts(temperature, k);
        double z = 0.0;
        for (int i = 0; i < k; i++) z += std::exp(row[order[i]] / temperature);
        for (const auto& [v, n] : counts) {
            bool in_top_k = std::find(order.begin(), order.begin() + k, v) != order.begin() + k;
            CHECK(in_top_k);
        }
        for (int i = 0; i < k; i++) {
            double p = std::exp(row[order[i]] / temperature) / z, expected = p * draws;
            double sigma = std::sqrt(draws * p * (1 - p));
            INFO("token ", order[i], " p ", p);
            CHECK(std::fabs(counts[order[i]] - expected) < 5 * sigma + 1);  // 5 standard deviations
        }
    }
}
