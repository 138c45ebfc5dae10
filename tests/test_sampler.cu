// The sampler: the latent cache's kernels against their CPU references, absorbed latent-cache decoding against the
// full forward pass, determinism, the sampling kernel's distribution against a CPU reference, and speculative
// decoding with the MTP draft: greedy it writes plain decoding's tokens, sampling it draws from the main model's
// distribution.
#include <doctest/doctest.h>

#include <cmath>
#include <map>

#include "../sampler.cuh"
#include "model_reference.h"
#include "reference.h"

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
    greedy.temperature = 0.0f, greedy.speculative = false;  // a row of logits per sequence and step
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

// A tiny model whose MTP module has learned with it, for a few hundred steps, that every row counts up by one
// (mod V) from its own start: the module's drafts are then mostly right. With untrained_mtp, the MTP modules'
// weights are put back to a random initialization: their drafts are then mostly wrong.
std::vector<float> counting_model_weights(Config c, bool untrained_mtp) {
    const int B = 16, T = 24;
    c.initializer_range = 0.02f;
    Model<float> model(c, B, T);
    model.init_weights(3);
    Rng rng(4);
    std::vector<int> rows(size_t(B) * (T + 1)), inputs, targets;
    for (int step = 1; step <= 300; step++) {
        for (int b = 0; b < B; b++) {
            const int start = int(rng.range(0, c.vocab_size - 1));
            for (int t = 0; t <= T; t++) rows[size_t(b) * (T + 1) + t] = (start + t) % c.vocab_size;
        }
        split_rows(rows, B, T, inputs, targets);
        model.train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, step, 1, 0.3f);
    }
    std::vector<float> trained = model.master.download();
    if (!untrained_mtp) return trained;
    model.init_weights(5);
    const std::vector<float> random = model.master.download();
    for (int t = model.first_mtp_tensor; t < int(model.layout.tensors.size()); t++) {
        const ParamTensor& p = model.layout[t];
        std::copy(random.begin() + p.offset, random.begin() + p.offset + p.numel(), trained.begin() + p.offset);
    }
    return trained;
}

// Greedy decoding of the prompts, plain and speculative (drafting for batches up to max_batch, by default the
// whole batch whatever the GPU); the drafts kept and verified.
template <typename T_>
void greedy_both_ways(const Config& c, const std::vector<float>& weights, const std::vector<std::vector<int>>& prompts,
                      int L, std::vector<std::vector<int>> out[2], DraftCounts& drafts, int max_batch = 0) {
    Model<T_> model(c, 1, L);
    model.master.upload(weights);
    model.refresh_weights();
    Sampler<T_> sampler(model, int(prompts.size()), L);
    SamplingOptions greedy;
    greedy.temperature = 0.0f, greedy.speculative_max_batch = max_batch > 0 ? max_batch : int(prompts.size());
    for (int speculative : {0, 1}) {
        greedy.speculative = speculative;
        out[speculative] = sampler.generate(prompts, greedy);
    }
    for (const DraftCounts& d : sampler.draft_counts(int(prompts.size()))) drafts += d;
}

// softmax(logits / temperature) over the top_k logits (0: all; ties at the boundary kept), in double: what the
// sampler draws from.
std::vector<double> sampling_distribution(const float* row, int V, float temperature, int top_k) {
    std::vector<float> sorted(row, row + V);
    std::sort(sorted.rbegin(), sorted.rend());
    const float threshold = top_k > 0 && top_k < V ? sorted[top_k - 1] : -INFINITY;
    std::vector<double> p(V, 0.0);
    double z = 0.0;
    for (int v = 0; v < V; v++)
        if (row[v] >= threshold) z += p[v] = std::exp((double(row[v]) - sorted[0]) / temperature);
    for (double& x : p) x /= z;
    return p;
}

// Pearson's statistic of counts against probabilities p over n draws, cells expecting fewer than 5 pooled into one;
// its degrees of freedom into *dof. A count in a cell of probability 0 makes it infinite.
double chi_square(const std::vector<long>& counts, const std::vector<double>& p, long n, int* dof) {
    double stat = 0.0, pooled_expected = 0.0, pooled_count = 0.0;
    int cells = 0;
    for (size_t i = 0; i < p.size(); i++) {
        if (p[i] == 0.0 && counts[i] > 0) return INFINITY;
        double expected = p[i] * double(n);
        if (expected < 5.0) {
            pooled_expected += expected, pooled_count += double(counts[i]);
            continue;
        }
        stat += (counts[i] - expected) * (counts[i] - expected) / expected, cells++;
    }
    if (pooled_expected > 0.0)
        stat += (pooled_count - pooled_expected) * (pooled_count - pooled_expected) / pooled_expected, cells++;
    *dof = cells - 1;
    return stat;
}

}  // namespace

TEST_SUITE("sampler") {
    // V2 §2.1.2's absorption, in double (exercise 9 asks for the reference): scores of the absorbed query
    // q_abs = W_uk^T q_nope against the cached c_kv, then W_uv applied to the probability-weighted c_kv, give what
    // attention over explicit keys k = [W_uk c_kv ; k_rope] and values v = W_uv c_kv gives. One sequence at
    // position 3 (four cached positions), two heads.
    TEST_CASE("latent attention decode (CPU): absorbed scores and values equal attention over explicit keys") {
        const int max_len = 6, p = 3, dn = 3, dr = 4, dc = 5, dv = 2, H = 2;
        const MlaDims m{1, 1, H, dn, dr, dc, dv, 10000.0f};
        Rng rng(41);
        const std::vector<float> cache_ckv = ref::random_uniform(rng, size_t(max_len) * dc);
        const std::vector<float> cache_kr = ref::random_uniform(rng, size_t(max_len) * dr);  // rotated already
        const std::vector<float> W_uk = ref::random_uniform(rng, size_t(H) * dn * dc);       // [H, dn, dc]
        const std::vector<float> W_uv = ref::random_uniform(rng, size_t(H) * dv * dc);       // [H, dv, dc]
        const std::vector<float> q = ref::random_uniform(rng, size_t(H) * (dn + dr));        // [H, dn + dr]
        std::vector<float> q_abs(size_t(H) * dc, 0.0f);
        for (int h = 0; h < H; h++)
            for (int e = 0; e < dc; e++) {
                double sum = 0.0;
                for (int i = 0; i < dn; i++) sum += double(q[h * (dn + dr) + i]) * W_uk[(h * dn + i) * dc + e];
                q_abs[h * dc + e] = float(sum);
            }
        const std::vector<double> ctx =
            ref::latent_attention_decode(m, q_abs, q, cache_ckv, cache_kr, std::vector<int>{p}, 1, max_len);
        REQUIRE(ctx.size() == size_t(H) * dc);
        for (int h = 0; h < H; h++) {
            std::vector<double> q_rope(q.begin() + h * (dn + dr) + dn, q.begin() + (h + 1) * (dn + dr));
            ref::rope(q_rope.data(), dr, p, m.rope_theta);
            std::vector<double> P(p + 1), o_explicit(dv, 0.0);
            double sum = 0.0;
            for (int j = 0; j <= p; j++) {
                double score = 0.0;
                for (int i = 0; i < dn; i++) {
                    double k = 0.0;  // the explicit key's nope part: W_uk c_kv_j
                    for (int e = 0; e < dc; e++) k += double(W_uk[(h * dn + i) * dc + e]) * cache_ckv[j * dc + e];
                    score += double(q[h * (dn + dr) + i]) * k;
                }
                for (int i = 0; i < dr; i++) score += q_rope[i] * cache_kr[j * dr + i];
                sum += P[j] = std::exp(score / std::sqrt(double(dn + dr)));
            }
            for (int j = 0; j <= p; j++)
                for (int i = 0; i < dv; i++)
                    for (int e = 0; e < dc; e++)
                        o_explicit[i] += P[j] / sum * W_uv[(h * dv + i) * dc + e] * cache_ckv[j * dc + e];
            for (int i = 0; i < dv; i++) {
                double o_absorbed = 0.0;
                for (int e = 0; e < dc; e++) o_absorbed += W_uv[(h * dv + i) * dc + e] * ctx[h * dc + e];
                CHECK(o_absorbed == doctest::Approx(o_explicit[i]).epsilon(1e-6));
            }
        }
    }

    TEST_CASE("speculative decoding drafts for batches up to 4 sequences per SM, or up to the batch limit given") {
        SamplingOptions opt;
        CHECK(speculates(528, opt, 132));
        CHECK_FALSE(speculates(529, opt, 132));
        CHECK(speculates(1, opt, 1));
        CHECK_FALSE(speculates(5, opt, 1));
        opt.speculative_max_batch = 4096;
        CHECK(speculates(4096, opt, 132));
        CHECK_FALSE(speculates(4097, opt, 132));
        opt.speculative = false;
        CHECK_FALSE(speculates(1, opt, 132));
    }
}

TEST_SUITE("gpu") {
    // Three sequences of two rows each (a speculative step), at positions 0-1 (the first token), 3-4 and 7-8 (the
    // cache's last slot); the cache holds random earlier entries. Every slot the step does not write must come back
    // as it was. Heads of d_c = 40 and d_rope = 36 values take more than one pass of a warp's lanes.
    TEST_CASE_TEMPLATE("latent decode kernels: the cache append and the absorbed attention against the CPU", T, float,
                       bf16) {
        const int S = 3, R = 2, rows = S * R, max_len = 9;
        const MlaDims m{rows, 1, 3, 8, 36, 40, 8, 10000.0f};
        const int dc = m.d_c, dr = m.d_rope;
        const std::vector<int> pos = {0, 3, 7};
        DeviceBuffer<int> pos_device;
        pos_device.upload(pos);
        Rng rng(31);
        ref::Tensor<T> cache_ckv = ref::input<T>(rng, size_t(S) * max_len * dc);
        ref::Tensor<T> cache_kr = ref::input<T>(rng, size_t(S) * max_len * dr);
        ref::Tensor<T> ckv = ref::input<T>(rng, size_t(rows) * dc), kva = ref::input<T>(rng, size_t(rows) * (dc + dr));
        latent_cache_append(cache_ckv.data(), cache_kr.data(), ckv.data(), kva.data(), rows, pos_device.data(), R,
                            max_len, dc, dr, m.rope_theta, ref::stream);
        std::vector<float> ckv_before = cache_ckv.host, kr_before = cache_kr.host;
        ref::latent_cache_append(cache_ckv.host, cache_kr.host, ckv.host, kva.host, rows, pos, R, max_len, dc, dr,
                                 m.rope_theta);
        std::vector<bool> written(size_t(S) * max_len, false);
        for (int n = 0; n < rows; n++)
            written[size_t(n / R) * max_len + ref::latent_row_position(pos, n, R, max_len)] = true;
        std::vector<bool> ckv_written, kr_written;
        for (bool w : written) ckv_written.insert(ckv_written.end(), dc, w), kr_written.insert(kr_written.end(), dr, w);
        const std::vector<float> got_ckv = ref::download(cache_ckv.device), got_kr = ref::download(cache_kr.device);
        CHECK(ref::where(got_ckv, ckv_written) == ref::where(cache_ckv.host, ckv_written));  // a copy is exact
        CHECK_CLOSE(ref::where(got_kr, kr_written), ref::where(cache_kr.host, kr_written), ref::tolerance<T>());
        CHECK(ref::where(got_ckv, ckv_written, false) == ref::where(ckv_before, ckv_written, false));
        CHECK(ref::where(got_kr, kr_written, false) == ref::where(kr_before, kr_written, false));

        // The attention reads the GPU's cache, as decoding does: the reference gets the same (rounded) values.
        ref::Tensor<T> q_abs = ref::input<T>(rng, size_t(rows) * m.H * dc, -2.0, 2.0);
        ref::Tensor<T> q = ref::input<T>(rng, size_t(rows) * m.H * m.d_qk(), -2.0, 2.0);
        ref::Tensor<T> ctx = ref::output<T>(rng, size_t(rows) * m.H * dc, false);
        latent_attention_decode(ctx.data(), q_abs.data(), q.data(), cache_ckv.data(), cache_kr.data(),
                                pos_device.data(), R, max_len, m, ref::stream);
        CHECK_CLOSE(ref::download(ctx.device),
                    ref::latent_attention_decode(m, q_abs.host, q.host, got_ckv, got_kr, pos, R, max_len),
                    ref::tolerance<T>());
    }

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

    TEST_CASE("speculative greedy decoding writes plain greedy decoding's tokens, with good drafts and with bad ones") {
        for (const Config& c : {tiny_config(), model_ref::tiny_moe_config()})
            for (bool untrained_mtp : {false, true}) {
                CAPTURE(c.first_k_dense_replace);
                CAPTURE(untrained_mtp);
                const std::vector<float> weights = counting_model_weights(c, untrained_mtp);
                const int L = 40;
                std::vector<std::vector<int>> prompts = random_prompts({1, 2, 3, 4, 5, 1, 2, 3}, c.vocab_size, 7);
                Rng rng(8);
                for (int i = 0; i < 40; i++) {  // counting prompts of 1 to 8 tokens
                    const int start = int(rng.range(0, c.vocab_size - 1)), n = 1 + i % 8;
                    prompts.emplace_back();
                    for (int t = 0; t < n; t++) prompts.back().push_back((start + t) % c.vocab_size);
                }
                std::vector<std::vector<int>> f32[2], b16[2];
                DraftCounts d32, d16;
                greedy_both_ways<float>(c, weights, prompts, L, f32, d32);
                greedy_both_ways<bf16>(c, weights, prompts, L, b16, d16);
                CHECK(f32[1] == f32[0]);
                CHECK(b16[1] == b16[0]);
                for (const DraftCounts& d : {d32, d16}) {  // a trained module's drafts are mostly kept, others not
                    INFO("drafts ", d.drafted, " kept ", d.accepted);
                    CHECK(d.drafted > 500);
                    CHECK((untrained_mtp ? d.rate() < 0.2 : d.rate() > 0.8));
                }
            }
    }

    TEST_CASE("a batch larger than the speculative batch limit decodes plainly") {
        const Config c = tiny_config();
        const std::vector<float> weights = counting_model_weights(c, false);
        const std::vector<std::vector<int>> prompts = random_prompts({1, 2, 3, 4, 5, 6, 7, 8}, c.vocab_size, 9);
        const int S = int(prompts.size());
        for (int max_batch : {S - 1, S}) {
            CAPTURE(max_batch);
            std::vector<std::vector<int>> out[2];
            DraftCounts drafts;
            greedy_both_ways<float>(c, weights, prompts, 40, out, drafts, max_batch);
            CHECK(out[1] == out[0]);
            CHECK((max_batch < S ? drafts.drafted == 0 : drafts.drafted > 100));
        }
    }

    TEST_CASE("speculative sampling draws every token from the main model's distribution") {
        Config c = tiny_config();
        c.vocab_size = 8;  // every sequence of three new tokens is a cell of the test: 512
        const int V = c.vocab_size, S = 4096, seeds = 8;
        Model<float> model(c, V * V, 3);
        model.init_weights(31);
        // the exact distribution of (t1, t2, t3) after the prompt token 5, from the training forward pass over
        // every [5, t1, t2]
        std::vector<int> tokens;
        for (int t1 = 0; t1 < V; t1++)
            for (int t2 = 0; t2 < V; t2++) tokens.insert(tokens.end(), {5, t1, t2});
        model.forward(tokens, V * V, 3);
        const std::vector<float> logits = download(model.logits, size_t(V) * V * 3 * V);
        Sampler<float> sampler(model, S, 4);
        for (const std::pair<float, int>& setting : {std::pair{1.0f, 0}, std::pair{0.6f, 3}}) {
            const float temperature = setting.first;
            const int top_k = setting.second;
            CAPTURE(temperature);
            std::vector<double> p(V * V * V);
            for (int t1 = 0; t1 < V; t1++)
                for (int t2 = 0; t2 < V; t2++) {
                    const float* rows = &logits[size_t(t1 * V + t2) * 3 * V];
                    std::vector<double> p1 = sampling_distribution(rows, V, temperature, top_k),
                                        p2 = sampling_distribution(rows + V, V, temperature, top_k),
                                        p3 = sampling_distribution(rows + 2 * V, V, temperature, top_k);
                    for (int t3 = 0; t3 < V; t3++) p[(t1 * V + t2) * V + t3] = p1[t1] * p2[t2] * p3[t3];
                }
            for (int speculative : {0, 1}) {
                CAPTURE(speculative);
                SamplingOptions opt;
                opt.temperature = temperature, opt.top_k = top_k, opt.speculative = speculative;
                opt.speculative_max_batch = S;
                std::vector<long> counts(p.size(), 0);
                DraftCounts drafts;
                for (int seed = 1; seed <= seeds; seed++) {
                    opt.seed = uint64_t(seed);
                    for (const std::vector<int>& out : sampler.generate(std::vector<std::vector<int>>(S, {5}), opt)) {
                        REQUIRE(out.size() == 3);
                        counts[(out[0] * V + out[1]) * V + out[2]]++;
                    }
                    for (const DraftCounts& d : sampler.draft_counts(S)) drafts += d;
                }
                int dof = 0;
                const double stat = chi_square(counts, p, long(S) * seeds, &dof);
                INFO("chi-square ", stat, " with ", dof, " degrees of freedom");
                CHECK(stat < dof + 6.0 * std::sqrt(2.0 * dof));  // p < 1e-6 or so
                if (speculative) {  // the random MTP module's drafts: some kept, some replaced
                    INFO("drafts ", drafts.drafted, " kept ", drafts.accepted);
                    CHECK(drafts.drafted > 0);
                    CHECK(drafts.rate() > 0.05);
                    CHECK(drafts.rate() < 0.95);
                }
            }
        }
    }
}
