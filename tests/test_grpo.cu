// GRPO: group advantages on the host, and the per-token objective and its gradient on the GPU against a CPU
// reference (the gradient checked by finite differences of the reference loss).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>

#include "../grpo.cuh"
#include "model_reference.h"
#include "reference.h"

namespace {

// J for one token, in double, straight from the formula in grpo.cuh.
double reference_objective(double logp, double logp_old, double logp_ref, double A, const GrpoConfig& cfg) {
    double rho = std::exp(logp - logp_old);
    double clipped = std::min(std::max(rho, 1.0 - cfg.eps_low), 1.0 + cfg.eps_high);
    double k3 = std::exp(logp_ref - logp) - (logp_ref - logp) - 1.0;
    return std::min(rho * A, clipped * A) - cfg.beta * k3;
}

// -w J for one token whose policy is softmax(logits / temperature).
double reference_token_loss(const std::vector<double>& logits, int target, double w, double A, double logp_old,
                            double logp_ref, const GrpoConfig& cfg) {
    double inv_t = 1.0 / cfg.temperature, mx = *std::max_element(logits.begin(), logits.end()) * inv_t, sum = 0.0;
    for (double x : logits) sum += std::exp(x * inv_t - mx);
    double logp = logits[target] * inv_t - mx - std::log(sum);
    return -w * reference_objective(logp, logp_old, logp_ref, A, cfg);
}

}  // namespace

TEST_SUITE("grpo") {
    TEST_CASE("group advantages: normalized within each group, uniform groups counted") {
        std::vector<float> rewards = {1, 0, 0, 1, /* group 2 */ 1, 1, 1, 1, /* group 3 */ 0, 0, 0, 3};
        GroupAdvantages grpo = group_advantages(rewards, 4, true);
        CHECK(grpo.uniform_groups == 1);
        CHECK(grpo.advantage[0] == doctest::Approx(1.0).epsilon(1e-3));  // (1 - 0.5) / 0.5
        CHECK(grpo.advantage[1] == doctest::Approx(-1.0).epsilon(1e-3));
        for (int i = 4; i < 8; i++) CHECK(grpo.advantage[i] == 0.0f);
        CHECK(grpo.advantage[11] ==
              doctest::Approx(2.25 / std::sqrt(1.6875)).epsilon(1e-3));  // mean 0.75, variance 1.6875
        double group_sum = 0.0;
        for (int i = 8; i < 12; i++) group_sum += grpo.advantage[i];
        CHECK(group_sum == doctest::Approx(0.0).epsilon(1e-6));

        GroupAdvantages dr = group_advantages(rewards, 4, false);  // Dr. GRPO: no division by the std
        CHECK(dr.advantage[0] == doctest::Approx(0.5));
        CHECK(dr.advantage[11] == doctest::Approx(2.25));
        CHECK_THROWS_AS(group_advantages(rewards, 5, true), std::invalid_argument);
    }

    // Ratios from e^-0.6 to e^0.6 (inside the clip range and past it on both sides), advantages of both signs,
    // pi_ref above and below pi_theta; the derivative against central differences of the reference, away from the
    // clip's corners where J has none.
    TEST_CASE("grpo token objective: the clipped surrogate, the k3 KL and the derivative, against the reference") {
        GrpoConfig cfg;
        cfg.eps_high = 0.28f, cfg.beta = 0.04f;
        const float logp = -1.5f;
        int clipped = 0, plain = 0;
        for (float log_ratio = -0.6f; log_ratio <= 0.61f; log_ratio += 0.05f)
            for (float A : {-1.3f, -0.2f, 0.7f, 1.5f})
                for (float ref_offset : {-0.4f, 0.0f, 0.3f}) {
                    CAPTURE(log_ratio);
                    CAPTURE(A);
                    CAPTURE(ref_offset);
                    const float logp_old = logp - log_ratio, logp_ref = logp + ref_offset;
                    const TokenObjective t = grpo_token_objective(logp, logp_old, logp_ref, A, cfg);
                    CHECK(t.J == doctest::Approx(reference_objective(logp, logp_old, logp_ref, A, cfg)).epsilon(1e-5));
                    const double k3 = std::exp(double(ref_offset)) - ref_offset - 1.0;
                    CHECK(t.k3 == doctest::Approx(k3).epsilon(1e-5).scale(1.0));
                    const double rho = std::exp(double(log_ratio));
                    const bool past_clip = A > 0 ? rho > 1.0 + cfg.eps_high : rho < 1.0 - cfg.eps_low;
                    CHECK(t.clipped == past_clip);
                    (past_clip ? clipped : plain)++;
                    if (std::fabs(rho - (1.0 + cfg.eps_high)) < 1e-3 || std::fabs(rho - (1.0 - cfg.eps_low)) < 1e-3)
                        continue;
                    const double h = 1e-6;
                    const double fd = (reference_objective(logp + h, logp_old, logp_ref, A, cfg) -
                                       reference_objective(logp - h, logp_old, logp_ref, A, cfg)) /
                                      (2 * h);
                    CHECK(t.dJ_dlogp == doctest::Approx(fd).epsilon(1e-4).scale(1.0));
                }
        CHECK(clipped > 0);
        CHECK(plain > 0);
        cfg.beta = 0.0f;  // no KL term: J is the surrogate alone
        const TokenObjective t = grpo_token_objective(-1.0f, -1.0f, -40.0f, 0.5f, cfg);
        CHECK(t.J == doctest::Approx(0.5));
        CHECK(t.dJ_dlogp == doctest::Approx(0.5));
    }
}

TEST_SUITE("grpo") {
    TEST_CASE("the sample batch: response tokens only, weighted per normalization, uniform groups dropped") {
        std::vector<std::vector<int>> prompts = {{1, 3, 20}, {1, 3, 20}, {1, 3, 21}, {1, 3, 21}};
        std::vector<std::vector<int>> responses = {{5, 30, 6}, {5, 31, 32, 33, 6}, {5, 6}, {5, 40, 6}};
        GroupAdvantages adv = group_advantages({1, 0, 1, 1}, 2, true);  // the second group is uniform
        GrpoOptions o;
        o.group = 2, o.max_new = 10;
        SampleBatch b = grpo_batch(prompts, responses, adv, o, 64);
        REQUIRE(b.S == 4);
        CHECK(b.T == 32);  // the longest sequence (8 tokens) rounded up to 32
        // row 1: prompt [1 3 20], response [5 31 32 33 6]: positions 2..6 predict the response
        for (int t = 0; t < b.T; t++) {
            int target = b.targets[1 * b.T + t];
            CHECK(target == (t >= 2 && t <= 6 ? responses[1][t - 2] : -1));
        }
        CHECK(b.weight[1 * b.T + 2] == doctest::Approx(1.0 / (5 * 4)));  // 1/|o_i| / samples
        CHECK(b.advantage[1 * b.T + 2] == adv.advantage[1]);
        CHECK(b.weighted_tokens == 3 + 5 + 2 + 3);

        o.skip_uniform_groups = true;
        b = grpo_batch(prompts, responses, adv, o, 64);
        CHECK(b.weighted_tokens == 3 + 5);
        CHECK(b.weight[2 * b.T + 2] == 0.0f);
        CHECK(b.weight[0 * b.T + 2] == doctest::Approx(1.0 / (3 * 2)));  // two responses kept

        o.skip_uniform_groups = false, o.norm = Normalization::Token;
        b = grpo_batch(prompts, responses, adv, o, 64);
        CHECK(b.weight[3 * b.T + 2] == doctest::Approx(1.0 / 13));
        o.norm = Normalization::Constant;
        b = grpo_batch(prompts, responses, adv, o, 64);
        CHECK(b.weight[3 * b.T + 2] == doctest::Approx(1.0 / (4 * 10)));
        CHECK(grpo_batch(prompts, responses, adv, o, 6).T == 6);  // sequences cut at the model's length
    }

    TEST_CASE("the sample batch on one of several GPUs: the normalizers count every rank's samples") {
        std::vector<std::vector<int>> prompts = {{1, 3, 20}, {1, 3, 20}};
        std::vector<std::vector<int>> responses = {{5, 30, 6}, {5, 31, 32, 33, 6}};
        GroupAdvantages adv = group_advantages({1, 0}, 2, true);
        GrpoOptions o;
        o.group = 2, o.max_new = 10;
        // three ranks, the other two with samples of their own: 5 kept responses of 17 tokens in 7 sequences
        const std::vector<double> others = {3, 9, 5, 9};
        std::vector<double> seen;
        const OverRanks three_ranks = [&](std::vector<double>& counts) {
            seen = counts;
            REQUIRE(counts.size() == others.size());
            for (size_t i = 0; i < counts.size(); i++) counts[i] += others[i];
        };
        for (Normalization norm : {Normalization::Sequence, Normalization::Token, Normalization::Constant}) {
            CAPTURE(int(norm));
            o.norm = norm;
            const SampleBatch b = grpo_batch(prompts, responses, adv, o, 64, three_ranks);
            CHECK(seen == std::vector<double>{2, 8, 2, 8});  // this rank's: kept, tokens, sequences, weighted tokens
            CHECK(b.weighted_tokens == 8);
            CHECK(b.all_weighted_tokens == 17);
            const double want = norm == Normalization::Sequence ? 1.0 / (5 * 5)
                                : norm == Normalization::Token  ? 1.0 / 17
                                                                : 1.0 / (7 * 10);
            CHECK(b.weight[1 * b.T + 2] == doctest::Approx(want));
        }
    }

    TEST_CASE("GRPO's passes: at most micro-batch sequences, the same number on every rank, none empty") {
        const GrpoPasses one_gpu(256, 256, 256, 32), uneven(256, 256, 256, 100);
        CHECK((one_gpu.passes == 8 && one_gpu.rows == 32));
        CHECK((uneven.passes == 3 && uneven.rows == 86));
        // 5 prompts of 8 samples over 2 ranks: 16 and 24 sequences
        for (int micro_batch : {1, 4, 7, 24, 64}) {
            CAPTURE(micro_batch);
            const int fewest = rows_of_rank(5, Ranks{0, 2, 0}).count() * 8;
            const int most = rows_of_rank(5, Ranks{1, 2, 1}).count() * 8;
            REQUIRE((fewest == 16 && most == 24));
            for (int sequences : {fewest, most}) {
                const GrpoPasses split(sequences, fewest, most, micro_batch);
                CHECK(split.passes == GrpoPasses(fewest, fewest, most, micro_batch).passes);
                if (micro_batch >= 2) CHECK(split.rows <= micro_batch);  // 1: 16 passes for the 24 sequences
                for (int p = 0; p < split.passes; p++) {
                    const RowRange rows = part_of(sequences, p, split.passes);
                    CHECK(rows.count() >= 1);
                    CHECK(rows.count() <= split.rows);
                }
            }
        }
    }
}

TEST_SUITE("gpu") {
    TEST_CASE("GRPO loss and its gradient match the CPU reference") {
        const int N = 37, V = 40;
        Rng rng(31);
        std::vector<float> logits(size_t(N) * V), weight(N), advantage(N), logp_old(N), logp_ref(N);
        std::vector<int> targets(N);
        for (float& x : logits) x = float(3.0 * (rng.uniform() - 0.5));
        GrpoConfig cfg;
        cfg.eps_high = 0.28f, cfg.beta = 0.04f, cfg.temperature = 0.8f;  // the policy is softmax(logits / 0.8)
        std::vector<float> logp(N);
        for (int n = 0; n < N; n++) {
            targets[n] = n % 9 == 4 ? -1 : int(rng.range(0, V - 1));  // some tokens are not part of a response
            double mx = -1e30, sum = 0.0, inv_t = 1.0 / cfg.temperature;
            for (int v = 0; v < V; v++) mx = std::max(mx, logits[size_t(n) * V + v] * inv_t);
            for (int v = 0; v < V; v++) sum += std::exp(logits[size_t(n) * V + v] * inv_t - mx);
            logp[n] = targets[n] < 0 ? 0.0f : float(logits[size_t(n) * V + targets[n]] * inv_t - mx - std::log(sum));
            weight[n] = n % 7 == 3 ? 0.0f : float(0.05 + 0.1 * rng.uniform());
            advantage[n] = float(2.0 * (rng.uniform() - 0.5));
            // ratios from e^-0.6 to e^0.6: inside the clip range and beyond it on both sides
            logp_old[n] = logp[n] + float(1.2 * (rng.uniform() - 0.5));
            logp_ref[n] = logp[n] + float(0.8 * (rng.uniform() - 0.5));
        }
        DeviceBuffer<float> d_logits, d_weight, d_adv, d_old, d_ref;
        DeviceBuffer<int> d_targets;
        d_logits.upload(logits), d_weight.upload(weight), d_adv.upload(advantage);
        d_old.upload(logp_old), d_ref.upload(logp_ref), d_targets.upload(targets);
        DeviceBuffer<float> loss(N), kl(N), clipped(N), d_logp(N), dlogits(size_t(N) * V);
        grpo_loss(loss.data(), kl.data(), clipped.data(), dlogits.data(), d_logits.data(), d_targets.data(),
                  d_weight.data(), d_adv.data(), d_old.data(), d_ref.data(), N, V, cfg, 0);
        token_logprobs(d_logp.data(), d_logits.data(), d_targets.data(), N, V, cfg.temperature, 0);
        std::vector<float> got_loss = loss.download(), got_kl = kl.download(), got_grad = dlogits.download();
        std::vector<float> got_logp = d_logp.download(), got_clipped = clipped.download();

        int n_clipped = 0;
        double grad_num = 0.0, grad_den = 0.0;
        for (int n = 0; n < N; n++) {
            CHECK(got_logp[n] == doctest::Approx(logp[n]).epsilon(1e-5));
            std::vector<double> row(logits.begin() + long(n) * V, logits.begin() + long(n + 1) * V);
            if (targets[n] < 0 || weight[n] == 0.0f) {
                CHECK(got_loss[n] == 0.0f);
                for (int v = 0; v < V; v++) CHECK(got_grad[size_t(n) * V + v] == 0.0f);
                continue;
            }
            double want = reference_token_loss(row, targets[n], weight[n], advantage[n], logp_old[n], logp_ref[n], cfg);
            CHECK(got_loss[n] == doctest::Approx(want).epsilon(1e-4));
            CHECK(got_kl[n] >= 0.0f);  // k3 is never negative
            n_clipped += got_clipped[n] != 0.0f;
            for (int v = 0; v < V; v++) {
                double h = 1e-6, saved = row[v];
                row[v] = saved + h;
                double up =
                    reference_token_loss(row, targets[n], weight[n], advantage[n], logp_old[n], logp_ref[n], cfg);
                row[v] = saved - h;
                double down =
                    reference_token_loss(row, targets[n], weight[n], advantage[n], logp_old[n], logp_ref[n], cfg);
                row[v] = saved;
                double fd = (up - down) / (2 * h), g = got_grad[size_t(n) * V + v];
                grad_num += (g - fd) * (g - fd), grad_den += fd * fd;
            }
        }
        CHECK(n_clipped > 0);  // both branches of the min were exercised
        CHECK(n_clipped < N / 2);
        CHECK(std::sqrt(grad_num / grad_den) < 1e-4);  // FP32 kernel against double finite differences
    }

    // S sequences of T tokens: a prompt of 3 to 5 tokens, then a response whose tokens carry weight 1/(|o| S) and
    // their sequence's advantage.
    SampleBatch random_batch(int S, int T_, int V, Rng& rng) {
        SampleBatch b;
        b.S = S, b.T = T_;
        b.tokens.resize(size_t(S) * T_), b.targets.assign(size_t(S) * T_, -1);
        b.weight.assign(size_t(S) * T_, 0.0f), b.advantage.assign(size_t(S) * T_, 0.0f);
        for (int& t : b.tokens) t = int(rng.range(0, V - 1));
        for (int s = 0; s < S; s++) {
            const int prompt = 3 + s % 3, response = T_ - prompt;
            const float advantage = float(2.0 * (rng.uniform() - 0.5));
            for (int t = prompt - 1; t + 1 < T_; t++) {
                const size_t n = size_t(s) * T_ + t;
                b.targets[n] = b.tokens[n + 1], b.weight[n] = 1.0f / float(response * S), b.advantage[n] = advantage;
                b.weighted_tokens++;
            }
        }
        b.all_weighted_tokens = b.weighted_tokens;
        return b;
    }

    // One update of a batch of 6 sequences in `passes` passes, on DeepSeekMoE with a balance loss strong enough
    // (alpha 0.5) that a pass weighed wrongly shows in the gradients: the gradients, every MoE layer's loads, the
    // objective and the KL.
    struct UpdateResult {
        std::vector<float> grads;
        std::vector<std::vector<int>> loads;
        double objective, kl;
    };

    UpdateResult update_in_passes(int passes) {
        const Config c = model_ref::tiny_moe_config();
        const int S = 6, T_ = 16;
        Rng rng(41);
        const SampleBatch batch = random_batch(S, T_, c.vocab_size, rng);
        const GrpoPasses split(S, S, S, ceil_div(S, passes));
        REQUIRE(split.passes == passes);
        Model<float> policy(c, split.rows, T_), reference(c, split.rows, T_, false);
        policy.init_weights(7), reference.init_weights(8);  // unequal: the KL term is not zero
        policy.balancing.alpha = 0.5f;
        GrpoTrainer<float> trainer(policy, reference, S, T_, split.passes);
        GrpoOptions o;
        o.updates = 1, o.loss.beta = 0.04f;
        GrpoStats stats;
        int optimizer_step = 0;
        trainer.update(batch, o, AdamW{1e-3f}, 1.0f, optimizer_step, 5, stats);
        UpdateResult r{policy.grads.download(), {}, stats.objective, stats.kl};
        for (int l = 0; l < c.num_hidden_layers; l++)
            if (policy.layers[l].moe) r.loads.push_back(policy.layers[l].routed.loads(policy.acts[l].moe));
        return r;
    }

    TEST_CASE("GRPO's update in passes: the gradients, loads and statistics of one pass over the batch") {
        const UpdateResult one = update_in_passes(1);
        REQUIRE(ref::max_abs(one.grads) > 0.0);
        REQUIRE(one.loads.size() == 1);
        for (int passes : {2, 3}) {
            CAPTURE(passes);
            const UpdateResult split = update_in_passes(passes);
            CHECK(ref::rel_error(split.grads, one.grads) <= 1e-5);  // FP32, the passes' sums in another order
            CHECK(split.loads == one.loads);
            CHECK(split.objective == doctest::Approx(one.objective).epsilon(1e-5));
            CHECK(split.kl == doctest::Approx(one.kl).epsilon(1e-5));
        }
    }
}
