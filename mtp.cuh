// mtp.cuh: multi-token prediction (V3 §2.2): what the MTP modules read and how their loss is weighed.
//
// Module k (1..D) predicts the token k + 1 ahead. At position i it combines the previous depth's hidden state with
// the embedding of the token k ahead and runs one more decoder block (V3 eqs. 21-23):
//   h'_i^k = M_k [RMSNorm(h_i^{k-1}); RMSNorm(Emb(t_{i+k}))]    (h^0: the main model's last hidden state; DeepSeek's
//                                                               released weights put the embedding's half first)
//   h_i^k  = TRM_k(h'_i^k),   P_{i+k+1}^k = OutHead(h_i^k)       (embedding and output head shared with the model)
//   L_MTP  = lambda / D * sum_k CE(P^k, t_{i+k+1})                (eqs. 24-25, over the positions that have one)
// The module's parameters, forward and backward sit with the decoder block they reuse (model.cuh: MtpModule,
// Model::mtp_forward). Speculative decoding with the module's draft is in sampler.cuh.
#pragma once

#include <vector>

#include "kernels/layers.cuh"

// Exercise 3 (exercises/03_mtp_targets) asks for this function's body.
#ifdef EXERCISE_MTP_SHIFT
#include EXERCISE_MTP_SHIFT
#else
// Module k's tokens and targets for rows [B, T] of inputs t_0..t_{T-1} and targets t_1..t_T (a negative target
// has no loss): at position i, the token t_{i+k} to embed and the target t_{i+k+1}. The last k positions of a row
// have no target (their t_{i+k+1} lies past the row) and embed token 0.
inline void mtp_shift(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int T, int k,
                      std::vector<int>& tokens, std::vector<int>& shifted) {
    tokens.assign(size_t(B) * T, 0), shifted.assign(size_t(B) * T, -1);
    for (int b = 0; b < B; b++)
        for (int i = 0; i + k < T; i++) {
            const size_t n = size_t(b) * T + i;
            tokens[n] = inputs[n + k];
            shifted[n] = targets[n + k];
        }
}
#endif

// lambda by training progress: V3 weighs the MTP loss 0.3 for its first 10T tokens and 0.1 for the last 4.8T.
struct MtpWeight {
    float lambda, late_lambda;
    float late_from;  // the share of the steps after which late_lambda holds
    float at(int step, int steps) const { return float(step) > late_from * float(steps) ? late_lambda : lambda; }
};

// hit[n] = 1 where the largest logit of row n is its target (the lower index on ties), else 0.
static __global__ void argmax_hits_kernel(float* hit, const float* logits, const int* targets, int N, int V) {
    const int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    float best = -INFINITY;
    int best_v = 0;
    for (int v = lane; v < V; v += 32)
        if (logits[long(n) * V + v] > best) best = logits[long(n) * V + v], best_v = v;
    warp_argmax(best, best_v);
    if (lane == 0) hit[n] = targets[n] >= 0 && best_v == targets[n] ? 1.0f : 0.0f;
}

inline void argmax_hits(float* hit, const float* logits, const int* targets, int N, int V, cudaStream_t s) {
    argmax_hits_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(hit, logits, targets, N, V);
    CUDA_CHECK_LAUNCH();
}
