// grpo.cuh: Group Relative Policy Optimization (DeepSeekMath §4.1; R1 §2.2.1), the objective and its gradient.
//
// For each prompt, G responses o_1..o_G are sampled and scored; every token of response i gets the advantage
//   A_i = (r_i - mean(r)) / (std(r) + eps)                     (Dr. GRPO: A_i = r_i - mean(r))
// and the policy maximizes, per token t of o_i, with rho = pi_theta(o_it) / pi_old(o_it),
//   J_it = min(rho A_i, clip(rho, 1 - eps_low, 1 + eps_high) A_i) - beta KL_it,
//   KL_it = pi_ref / pi_theta - log(pi_ref / pi_theta) - 1       (the k3 estimator: unbiased, always >= 0)
// averaged per response (1/|o_i|, GRPO), over all tokens of the batch (DAPO), or with a constant normalizer
// (Dr. GRPO). No value network: the group is the baseline.
#pragma once

#include <cmath>
#include <vector>

#include "layers.cuh"

// ---------------------------------------------------------------------------------------------------------------
// Host: advantages from rewards
// ---------------------------------------------------------------------------------------------------------------

struct GroupAdvantages {
    std::vector<float> advantage;  // per response
    int uniform_groups = 0;        // groups whose rewards are all equal: no signal (DAPO resamples or skips them)
};

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

// ---------------------------------------------------------------------------------------------------------------
// Device: per-token log-probabilities, and the GRPO loss with its gradient with respect to the logits
// ---------------------------------------------------------------------------------------------------------------

// log softmax(logits)[target] per token, one warp per token; 0 where target < 0.
static __global__ void token_logprob_kernel(float* logp, const float* logits, const int* targets, int N, int V) {
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* row = logits + long(n) * V;
    float mx = -INFINITY, sum = 0.0f;
    for (int v = lane; v < V; v += 32) mx = fmaxf(mx, row[v]);
    mx = warp_max(mx);
    for (int v = lane; v < V; v += 32) sum += expf(row[v] - mx);
    sum = warp_sum(sum);
    if (lane == 0) logp[n] = targets[n] < 0 ? 0.0f : row[targets[n]] - mx - logf(sum);
}

inline void token_logprobs(float* logp, const float* logits, const int* targets, int N, int V, cudaStream_t s) {
    token_logprob_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(logp, logits, targets, N, V);
    CUDA_CHECK_LAUNCH();
}

struct GrpoConfig {
    float eps_low = 0.2f, eps_high = 0.2f;  // DAPO's clip-higher: eps_high = 0.28
    float beta = 0.0f;                      // KL weight (R1-Zero: 0.001; DeepSeekMath: 0.04)
};

// Per token n: weight[n] (advantage-free normalizer, 0 for tokens that are not part of a response), advantage[n],
// logp_old[n], logp_ref[n]. Writes the loss term -weight * J, the k3 KL and whether the ratio was clipped, and
// dlogits = dL/dlogp * (onehot(target) - softmax).
template <typename T>
__global__ void grpo_loss_kernel(float* loss, float* kl, float* clipped, T* dlogits, const float* logits,
                                 const int* targets, const float* weight, const float* advantage,
                                 const float* logp_old, const float* logp_ref, int N, int V, GrpoConfig cfg) {
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* row = logits + long(n) * V;
    int target = targets[n];
    float mx = -INFINITY, sum = 0.0f;
    for (int v = lane; v < V; v += 32) mx = fmaxf(mx, row[v]);
    mx = warp_max(mx);
    for (int v = lane; v < V; v += 32) sum += expf(row[v] - mx);
    sum = warp_sum(sum);
    float w = target < 0 ? 0.0f : weight[n];
    float dlogp = 0.0f;
    if (w != 0.0f) {
        float logp = row[target] - mx - logf(sum), A = advantage[n];
        float rho = expf(logp - logp_old[n]);
        float rho_clipped = fminf(fmaxf(rho, 1.0f - cfg.eps_low), 1.0f + cfg.eps_high);
        bool use_clipped = rho_clipped * A < rho * A;  // the min picks the clipped term, whose gradient is 0
        float surrogate = use_clipped ? rho_clipped * A : rho * A;
        float ref_ratio = expf(logp_ref[n] - logp);
        float k3 = ref_ratio - (logp_ref[n] - logp) - 1.0f;
        // dJ/dlogp: rho A through the unclipped term, and -beta (1 - pi_ref / pi_theta) through the KL.
        float dJ = (use_clipped ? 0.0f : rho * A) - cfg.beta * (1.0f - ref_ratio);
        dlogp = -w * dJ;
        if (lane == 0) loss[n] = -w * (surrogate - cfg.beta * k3), kl[n] = k3, clipped[n] = use_clipped;
    } else if (lane == 0) {
        loss[n] = 0.0f, kl[n] = 0.0f, clipped[n] = 0.0f;
    }
    for (int v = lane; v < V; v += 32) {
        float p = expf(row[v] - mx) / sum;
        dlogits[long(n) * V + v] = from_float<T>(dlogp * ((v == target ? 1.0f : 0.0f) - p));
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
