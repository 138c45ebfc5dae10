// grpo.cuh: Group Relative Policy Optimization (DeepSeekMath §4.1; R1 §2.2.1), the objective and its gradient.
//
// For each prompt, G responses o_1..o_G are sampled and scored; every token of response i gets the advantage
//   A_i = (r_i - mean(r)) / (std(r) + eps)                     (Dr. GRPO: A_i = r_i - mean(r))
// and the policy maximizes, per token t of o_i, with rho = pi_theta(o_it) / pi_old(o_it),
//   J_it = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it,
//   KL_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1       (the k3 estimator: unbiased, always >= 0)
// averaged per response (1/|o_i|, GRPO), over all tokens of the batch (DAPO), or with a constant normalizer
// (Dr. GRPO). No value network: the group's mean reward stands in for the value V(q) that PPO's critic learns, a
// Monte Carlo estimate from G samples of the same prompt; a baseline that does not depend on the sampled response
// leaves the gradient's expectation as it was and cuts its variance.
//
// Dr. GRPO's two changes remove two biases: dividing by |o_i| shrinks each token's step in a long response, which
// favours short correct answers and lets wrong ones grow long (length bias), and dividing by the group's std gives
// the most weight to prompts whose rewards are nearly all equal, the too easy and the too hard (difficulty bias).
//
// Data parallel (nccl.cuh): each rank samples, scores and trains on its own prompts, a prompt's whole group on one
// rank, so that the advantages need nothing from the others; the normalizers count over every rank's responses, and
// the gradients meet in the optimizer step.
#pragma once

#include <cmath>
#include <functional>
#include <vector>

#include "data/corpus.h"
#include "data/rewards.h"
#include "kernels/layers.cuh"
#include "sampler.cuh"

// ---------------------------------------------------------------------------------------------------------------
// Host: advantages from rewards
// ---------------------------------------------------------------------------------------------------------------

struct GroupAdvantages {
    std::vector<float> advantage;  // per response
    int uniform_groups = 0;        // groups whose rewards are all equal: no signal (DAPO resamples or skips them)
};

// Exercise 2 (exercises/02_grpo_advantages) asks for this function's body.
#ifdef EXERCISE_GROUP_ADVANTAGES
#include EXERCISE_GROUP_ADVANTAGES
#else
// rewards: n_groups * G values, group by group. scale_by_std = false is Dr. GRPO's unbiased form.
inline GroupAdvantages group_advantages(const std::vector<float>& rewards, int G, bool scale_by_std,
                                        float eps = 1e-4f) {
    if (G < 1 || rewards.size() % G != 0) throw std::invalid_argument("group_advantages: rewards are not whole groups");
    GroupAdvantages out;
    out.advantage.resize(rewards.size());
    for (size_t g = 0; g < rewards.size(); g += G) {
        double mean = 0.0, var = 0.0;
        for (int i = 0; i < G; i++) mean += rewards[g + i];
        mean /= G;
        for (int i = 0; i < G; i++) var += (rewards[g + i] - mean) * (rewards[g + i] - mean);
        double std = std::sqrt(var / G);
        out.uniform_groups += std == 0.0;
        for (int i = 0; i < G; i++)
            out.advantage[g + i] = float((rewards[g + i] - mean) / (scale_by_std ? std + eps : 1.0));
    }
    return out;
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Device: per-token log-probabilities, and the GRPO loss with its gradient with respect to the logits
// ---------------------------------------------------------------------------------------------------------------

// log softmax(logits / temperature)[target] per token, one warp per token; 0 where target < 0. The policy that
// sampled at temperature tau is softmax(logits / tau): its log-probabilities are the ones the ratio needs.
static __global__ void token_logprob_kernel(float* logp, const float* logits, const int* targets, int N, int V,
                                            float inv_temperature) {
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* row = logits + long(n) * V;
    float mx, sum;
    row_softmax_stats(row, V, inv_temperature, lane, mx, sum);
    if (lane == 0) logp[n] = targets[n] < 0 ? 0.0f : row[targets[n]] * inv_temperature - mx - logf(sum);
}

inline void token_logprobs(float* logp, const float* logits, const int* targets, int N, int V, float temperature,
                           cudaStream_t s) {
    token_logprob_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(logp, logits, targets, N, V,
                                                                                       1.0f / temperature);
    CUDA_CHECK_LAUNCH();
}

struct GrpoConfig {
    float eps_low = 0.2f, eps_high = 0.2f;  // DAPO's clip-higher: eps_high = 0.28
    float beta = 0.0f;                      // KL weight (R1-Zero: 0.001; DeepSeekMath: 0.04)
    float temperature = 1.0f;               // of the sampling: the policy is softmax(logits / temperature)
};

// |log(pi_ref / pi_theta)| beyond this is clamped: the k3 estimate stays finite (e^30 is far past any useful KL)
// and 0 * inf never turns a gradient into NaN.
constexpr float MAX_LOG_RATIO = 30.0f;

// GRPO's objective at one token of a response with advantage A (R1 §2.2.1, eq. 1, per token), with
// rho = pi_theta / pi_old from the log-probabilities, and its derivative with respect to log pi_theta.
struct TokenObjective {
    float J;         // min(rho A, clip(rho, 1 - eps_low, 1 + eps_high) A) - beta k3
    float dJ_dlogp;  // rho A where the plain term is the min (the clipped one is flat), - beta (1 - pi_ref / pi_theta)
    float k3;        // pi_ref / pi_theta - log(pi_ref / pi_theta) - 1
    bool clipped;    // the min took the clipped term
};

// Exercise 5 (exercises/05_grpo_objective) asks for this function's body.
#ifdef EXERCISE_GRPO_TOKEN_OBJECTIVE
#include EXERCISE_GRPO_TOKEN_OBJECTIVE
#else
HD TokenObjective grpo_token_objective(float logp, float logp_old, float logp_ref, float A, const GrpoConfig& cfg) {
    const float rho = expf(fminf(logp - logp_old, MAX_LOG_RATIO));
    const float rho_clipped = fminf(fmaxf(rho, 1.0f - cfg.eps_low), 1.0f + cfg.eps_high);
    TokenObjective t;
    t.clipped = rho_clipped * A < rho * A;
    const float log_ref_ratio = fminf(fmaxf(logp_ref - logp, -MAX_LOG_RATIO), MAX_LOG_RATIO);
    const float ref_ratio = expf(log_ref_ratio);
    t.k3 = ref_ratio - log_ref_ratio - 1.0f;
    const bool with_kl = cfg.beta > 0.0f;  // beta = 0: no KL term at all, whatever k3 is
    t.J = (t.clipped ? rho_clipped * A : rho * A) - (with_kl ? cfg.beta * t.k3 : 0.0f);
    t.dJ_dlogp = (t.clipped ? 0.0f : rho * A) - (with_kl ? cfg.beta * (1.0f - ref_ratio) : 0.0f);
    return t;
}
#endif

// Per token n: weight[n] (advantage-free normalizer, 0 for tokens that are not part of a response), advantage[n],
// logp_old[n], logp_ref[n]. Writes the loss term -weight * J, the k3 KL and whether the ratio was clipped, and
// dlogits = dL/dlogp * dlogp/dlogits = dL/dlogp (onehot(target) - softmax) / temperature.
template <typename T>
__global__ void grpo_loss_kernel(float* loss, float* kl, float* clipped, T* dlogits, const float* logits,
                                 const int* targets, const float* weight, const float* advantage, const float* logp_old,
                                 const float* logp_ref, int N, int V, GrpoConfig cfg) {
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* row = logits + long(n) * V;
    int target = targets[n];
    float inv_t = 1.0f / cfg.temperature, mx, sum;
    row_softmax_stats(row, V, inv_t, lane, mx, sum);
    float w = target < 0 ? 0.0f : weight[n];
    float dlogp = 0.0f;
    if (w != 0.0f) {
        const float logp = row[target] * inv_t - mx - logf(sum);
        const TokenObjective t = grpo_token_objective(logp, logp_old[n], logp_ref[n], advantage[n], cfg);
        dlogp = -w * t.dJ_dlogp;
        if (lane == 0) loss[n] = -w * t.J, kl[n] = t.k3, clipped[n] = t.clipped;
    } else if (lane == 0) {
        loss[n] = 0.0f, kl[n] = 0.0f, clipped[n] = 0.0f;
    }
    for (int v = lane; v < V; v += 32) {
        float p = expf(row[v] * inv_t - mx) / sum;
        dlogits[long(n) * V + v] = from_float<T>(dlogp * inv_t * ((v == target ? 1.0f : 0.0f) - p));
    }
}

template <typename T>
void grpo_loss(float* loss, float* kl, float* clipped, T* dlogits, const float* logits, const int* targets,
               const float* weight, const float* advantage, const float* logp_old, const float* logp_ref, int N, int V,
               const GrpoConfig& cfg, cudaStream_t s) {
    grpo_loss_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(
        loss, kl, clipped, dlogits, logits, targets, weight, advantage, logp_old, logp_ref, N, V, cfg);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// One GRPO step: sample G responses per prompt, score them by rule, and update the policy on its own samples
// ---------------------------------------------------------------------------------------------------------------

enum class Normalization {
    Sequence,  // GRPO: 1/|o_i| per response, then the mean over responses
    Token,     // DAPO: every response token of the batch weighs the same
    Constant,  // Dr. GRPO: one constant, samples * max_new, for every token
};

struct GrpoOptions {
    int group = 8;      // G samples per prompt
    int updates = 2;    // policy updates per batch of samples (pi_old: the trainer's forward pass before the first)
    int max_new = 320;  // response tokens at most
    float temperature = 1.0f;
    GrpoConfig loss;
    bool scale_by_std = true;  // false: Dr. GRPO's unscaled advantages
    Normalization norm = Normalization::Sequence;
    bool skip_uniform_groups = false;  // DAPO's dynamic sampling, as a filter: equal-reward groups drop out
    bool r1zero_template = false;      // R1-Zero's instruction prompt instead of the chat prompt
    bool speculative = true;           // rollouts drafted by the MTP module (the same distribution, fewer passes)
    int speculative_max_batch = 0;     // the largest batch that drafts (0: the GPU's default, sampler.cuh)
    rewards::RewardConfig reward;
};

struct GrpoStats {
    double reward = 0, accuracy = 0, format = 0, language = 0, mixing = 0, response_tokens = 0;
    double objective = 0, kl = 0, clip_fraction = 0;  // of the last update, over the tokens that carry weight
    int samples = 0, uniform_groups = 0;
    DraftCounts drafts;  // of the rollouts' speculative decoding
    // Tokens through the model in forward-pass units (a backward pass counts twice): sampling, the reference and
    // old-policy log-probabilities, and each update. The compute of a step is this times the forward FLOPs/token.
    double forward_tokens = 0;
};

// The prompts, responses and per-token arrays of one batch of samples, laid out [S, T] for the training forward.
struct SampleBatch {
    int S = 0, T = 0;
    long weighted_tokens = 0, all_weighted_tokens = 0;  // response tokens that carry weight: this rank's, every rank's
    std::vector<int> tokens, targets;
    std::vector<float> weight, advantage;
};

// Counts of this rank's samples -> the counts over every rank's, in place (data parallel; else nothing to do).
using OverRanks = std::function<void(std::vector<double>&)>;

// Token rows of prompt + response (T at most max_T), targets on the response tokens only, each weighted by its
// normalizer (the responses, tokens and sequences counted over_ranks); with skip_uniform_groups, the responses of
// equal-reward groups carry no weight.
inline SampleBatch grpo_batch(const std::vector<std::vector<int>>& prompts,
                              const std::vector<std::vector<int>>& responses, const GroupAdvantages& adv,
                              const GrpoOptions& o, int max_T,
                              const OverRanks& over_ranks = [](std::vector<double>&) {}) {
    SampleBatch b;
    b.S = int(prompts.size());
    size_t longest = 0, response_tokens = 0, kept = 0;
    for (int s = 0; s < b.S; s++) longest = std::max(longest, prompts[s].size() + responses[s].size());
    b.T = std::min(ceil_div(long(longest), 32) * 32, max_T);
    std::vector<char> keep(b.S, 1);
    for (int s = 0; s < b.S; s++) {
        if (o.skip_uniform_groups) {
            int g0 = s / o.group * o.group;
            bool uniform = true;
            for (int i = g0; i < g0 + o.group; i++) uniform &= adv.advantage[i] == adv.advantage[g0];
            keep[s] = !uniform;
        }
        kept += keep[s];
        response_tokens += keep[s] * responses[s].size();
        const long in_row = std::min(long(prompts[s].size() + responses[s].size()), long(b.T));
        b.weighted_tokens += keep[s] * std::max(0L, in_row - long(prompts[s].size()));
    }
    std::vector<double> counts = {double(kept), double(response_tokens), double(b.S), double(b.weighted_tokens)};
    over_ranks(counts);
    const double all_kept = counts[0], all_response_tokens = counts[1], sequences = counts[2];
    b.all_weighted_tokens = long(counts[3]);
    b.tokens.assign(size_t(b.S) * b.T, data::PAD), b.targets.assign(size_t(b.S) * b.T, -1);
    b.weight.assign(size_t(b.S) * b.T, 0.0f), b.advantage.assign(size_t(b.S) * b.T, 0.0f);
    for (int s = 0; s < b.S; s++) {
        std::vector<int> seq = prompts[s];
        seq.insert(seq.end(), responses[s].begin(), responses[s].end());
        seq.resize(std::min(seq.size(), size_t(b.T)));
        std::copy(seq.begin(), seq.end(), b.tokens.begin() + long(s) * b.T);
        double w = o.norm == Normalization::Sequence ? 1.0 / (double(responses[s].size()) * all_kept)
                   : o.norm == Normalization::Token  ? 1.0 / all_response_tokens
                                                     : 1.0 / (sequences * o.max_new);
        for (size_t t = prompts[s].size() - 1; t + 1 < seq.size(); t++) {
            size_t n = size_t(s) * b.T + t;
            b.targets[n] = seq[t + 1];
            b.weight[n] = keep[s] ? float(w) : 0.0f;
            b.advantage[n] = adv.advantage[s];
        }
    }
    return b;
}

// The batch of a step, max_sequences samples, goes through the policy and the reference in passes of at most
// micro_batch sequences (gradient accumulation): their buffers, the activations of every layer for each token, are
// then a pass's and not a batch's (256 sequences of 512 tokens would take tens of GB). Every rank takes the same
// number of passes, which expert parallelism's exchanges need: as many as the rank with the most sequences needs, but
// no more than the rank with the fewest has sequences (no pass is empty).
struct GrpoPasses {
    int passes, rows;  // per step; the most sequences in a pass of this rank

    GrpoPasses(int max_sequences, int fewest_of_a_rank, int most_of_a_rank, int micro_batch)
        : passes(std::min(ceil_div(most_of_a_rank, micro_batch), fewest_of_a_rank)),
          rows(ceil_div(max_sequences, passes)) {}
};

template <typename T>
struct GrpoTrainer {
    Model<T>& policy;
    Model<T>& reference;  // frozen, forward passes alone: the KL anchor
    Sampler<T> sampler;
    const int passes;
    data::Tokenizer tok;
    DeviceBuffer<int> targets;
    DeviceBuffer<float> weight, advantage, logp_old, logp_ref, token_loss, token_kl, token_clipped, sums{3};

    // The sampler holds max_sequences x max_len tokens (prompt and response); policy and reference a pass's rows.
    GrpoTrainer(Model<T>& p, Model<T>& ref, int max_sequences, int max_len, int passes_)
        : policy(p), reference(ref), sampler(p, max_sequences, max_len), passes(passes_) {}

    // Samples G responses per problem, scores them, updates the policy `updates` times on them. Data parallel: the
    // problems are this rank's, the statistics every rank's.
    GrpoStats step(const std::vector<data::Problem>& problems, const GrpoOptions& o, const AdamW& opt,
                   float max_grad_norm, int& optimizer_step, uint64_t seed, int rl_step) {
        std::vector<std::vector<int>> prompts;
        for (const data::Problem& p : problems)
            prompts.insert(prompts.end(), o.group, tok.encode(data::prompt_text(p, o.r1zero_template)));
        SamplingOptions sampling;
        sampling.temperature = o.loss.temperature;
        sampling.seed = rng_hash(seed, 0x67727030ull + uint64_t(policy.rank()), uint64_t(rl_step));  // a rank's own
        sampling.stop_a = data::ANSWER_END, sampling.stop_b = data::EOS, sampling.max_new = o.max_new;
        sampling.speculative = o.speculative, sampling.speculative_max_batch = o.speculative_max_batch;
        std::vector<std::vector<int>> responses = sampler.generate(prompts, sampling);

        GrpoStats stats;
        for (const DraftCounts& d : sampler.draft_counts(int(prompts.size()))) stats.drafts += d;
        std::vector<float> totals(responses.size());
        for (size_t i = 0; i < responses.size(); i++) {
            const data::Problem& p = problems[i / o.group];
            rewards::Reward r = rewards::score(p, tok.decode(responses[i]), o.reward, long(responses[i].size()));
            totals[i] = float(r.total);
            stats.reward += r.total, stats.accuracy += r.accuracy, stats.format += r.format;
            stats.language += r.language, stats.mixing += rewards::is_mixed(r.thinking);
            stats.response_tokens += double(responses[i].size());
        }
        GroupAdvantages adv = group_advantages(totals, o.group, o.scale_by_std);
        stats.samples = int(responses.size()), stats.uniform_groups = adv.uniform_groups;
        for (size_t i = 0; i < responses.size(); i++)
            stats.forward_tokens += double(prompts[i].size() + responses[i].size());
        const OverRanks over_ranks = [this](std::vector<double>& v) { policy.over_ranks(v); };
        SampleBatch batch = grpo_batch(prompts, responses, adv, o, policy.max_T, over_ranks);
        if (batch.all_weighted_tokens > 0) {  // every rank updates, or none
            update(batch, o, opt, max_grad_norm, optimizer_step, seed, stats);
            // reference and old-policy forwards, the first update's backward, a forward and backward per further one
            stats.forward_tokens += double(batch.S) * batch.T * (1 + 1 + 2 + 3 * (o.updates - 1));
        }
        sum_over_ranks(stats);
        return stats;
    }

    // Every rank's statistics (this rank's sums in): the counts summed, the means over every rank's samples.
    void sum_over_ranks(GrpoStats& st) {
        std::vector<double> v = {st.reward, st.accuracy, st.format, st.language, st.mixing, st.response_tokens,
                                 st.forward_tokens, double(st.samples), double(st.uniform_groups),
                                 double(st.drafts.drafted), double(st.drafts.accepted)};
        policy.over_ranks(v);
        st.samples = int(v[7]), st.uniform_groups = int(v[8]), st.forward_tokens = v[6];
        st.drafts = {long(v[9]), long(v[10])};
        double* rates[] = {&st.reward, &st.accuracy, &st.format, &st.language, &st.mixing, &st.response_tokens};
        for (int i = 0; i < 6; i++) *rates[i] = v[i] / st.samples;
    }

    static std::vector<int> pass_tokens(const SampleBatch& b, RowRange rows) {
        return std::vector<int>(b.tokens.begin() + long(rows.begin) * b.T, b.tokens.begin() + long(rows.end) * b.T);
    }

    void update(const SampleBatch& b, const GrpoOptions& o, const AdamW& opt, float max_grad_norm, int& optimizer_step,
                uint64_t seed, GrpoStats& stats) {
        long N = long(b.S) * b.T;
        int V = policy.cfg.vocab_size;
        cudaStream_t s = policy.stream;
        targets.upload(b.targets), weight.upload(b.weight), advantage.upload(b.advantage);
        for (DeviceBuffer<float>* buf : {&logp_old, &logp_ref, &token_loss, &token_kl, &token_clipped})
            if (long(buf->count) < N) buf->resize(N);
        for (int p = 0; p < passes; p++) {
            const RowRange rows = part_of(b.S, p, passes);
            const long at = long(rows.begin) * b.T, count = long(rows.count()) * b.T;
            reference.forward(pass_tokens(b, rows), rows.count(), b.T);
            token_logprobs(logp_ref.data() + at, reference.logits, targets.data() + at, int(count), V,
                           o.loss.temperature, reference.stream);
        }
        CUDA_CHECK(cudaStreamSynchronize(reference.stream));
        // In the first update logp_old comes from the same forward pass as the loss: rho = 1, the clip never acts,
        // and the step is the policy gradient A grad log pi. Clipping holds the policy near pi_old only from the
        // second update on.
        for (int u = 0; u < o.updates; u++) {
            for (int p = 0; p < passes; p++) {
                const RowRange rows = part_of(b.S, p, passes);
                const long at = long(rows.begin) * b.T, count = long(rows.count()) * b.T;
                policy.begin_pass(rows.count(), b.S);
                policy.forward(pass_tokens(b, rows), rows.count(), b.T);
                if (u == 0)
                    token_logprobs(logp_old.data() + at, policy.logits, targets.data() + at, int(count), V,
                                   o.loss.temperature, s);
                grpo_loss(token_loss.data() + at, token_kl.data() + at, token_clipped.data() + at, policy.d_logits,
                          policy.logits, targets.data() + at, weight.data() + at, advantage.data() + at,
                          logp_old.data() + at, logp_ref.data() + at, int(count), V, o.loss, s);
                policy.backward(rows.count(), b.T);
                policy.accumulate_pass(p, passes);
            }
            policy.optimizer_step(opt, max_grad_norm, ++optimizer_step, seed);
        }
        sum_reduce(sums.data(), policy.reduce_scratch, token_loss.data(), N, false, s);
        sum_reduce(sums.data() + 1, policy.reduce_scratch, token_kl.data(), N, false, s);
        sum_reduce(sums.data() + 2, policy.reduce_scratch, token_clipped.data(), N, false, s);
        const std::vector<float> h = sums.download();
        std::vector<double> every_rank(h.begin(), h.end());
        policy.over_ranks(every_rank);
        stats.objective = -every_rank[0];
        stats.kl = every_rank[1] / double(b.all_weighted_tokens);
        stats.clip_fraction = every_rank[2] / double(b.all_weighted_tokens);
    }
};
