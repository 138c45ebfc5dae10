// moe.cuh: DeepSeekMoE (V3 §2.1.2, eqs. 12-20), the FFN of every layer from first_k_dense_replace on.
//
//   h'_t    = u_t + sum_{i <= N_s} FFN_i^(s)(u_t) + sum_{i <= N_r} g_{i,t} FFN_i^(r)(u_t)         eq. 12
//   s_{i,t} = sigmoid(u_t^T e_i)                                                                  eq. 15
//   g'_{i,t} = s_{i,t} if s_{i,t} + b_i is among the K_r largest of {s_{j,t} + b_j}, else 0        eqs. 14, 16
//   g_{i,t} = routed_scaling_factor * g'_{i,t} / sum_j g'_{j,t}                                   eq. 13
//
// Every expert is a SwiGLU FFN like a dense layer's, moe_intermediate_size wide; the N_s shared experts see every
// token and are stored as one FFN N_s times as wide (the checkpoint's `mlp.shared_experts`). The bias b only chooses
// the experts: the gates are the unbiased s. The router computes in FP32 (V3 §3.3 keeps the gating out of FP8).
//
// Group-limited routing: the experts fall into n_group contiguous groups; a group's score is the sum of its two best
// biased scores, and only the experts of the topk_group best groups can be chosen (V3 §2.1.2 limits each token to
// 4 nodes this way). Ties go to the lower index, so routing is a function of the scores alone.
//
// Balancing (V3 §2.1.2): auxiliary-loss-free, each expert's bias moves by gamma after every step, down if the expert
// got more than the mean load, up if less; and a complementary sequence-wise balance loss, eqs. 17-20,
//   L_Bal = alpha sum_i f_i P_i,  f_i = N_r / (K_r T) #{t : s_{i,t} in the top K_r of s_t},  P_i = 1/T sum_t s'_{i,t}
// with s'_{i,t} = s_{i,t} / sum_j s_{j,t}, over each sequence of T tokens (the top-K here on s alone, no bias, no
// groups). The same loss over the whole batch with a larger alpha is the conventional auxiliary loss (V2's
// expert-level balance loss), kept for comparison.
//
// In training the (token, expert) pairs are grouped by expert: expert e's tokens are copied to rows
// [offset_e, offset_e + count_e) of one buffer, each group padded with zero rows to a multiple of 128 (so that no
// FP8 tile spans two experts, and the GEMM shapes repeat from step to step), in token order within a group (a stable
// order: runs repeat bit for bit). Each expert's GEMMs run over its rows; the outputs come back to their tokens in a
// fixed order, each weighted by its gate. In FP8 one launch runs a GEMM for every expert, sized on the device from
// the groups' offsets, so the host never waits for the routing; in the model's precision the experts' GEMMs run one
// by one, and the counts come to the host once per layer, to size them, while the shared experts run. The sampler's
// decode step, which replays as a CUDA graph and must not wait for the host, runs every expert on its few tokens
// instead, and combines the chosen ones the same way.
//
// Expert parallel (V3 §3.2; nccl.cuh): with R ranks, rank r runs experts [r E/R, (r+1) E/R) for every rank's tokens.
// After the grouping, each rank's loads reach every rank; each rank sends the rows grouped for a peer's experts (one
// contiguous block, padding included, so that every expert's rows stay whole FP8 tiles on the other side) and
// regroups what it receives by local expert, sources in rank order; the outputs go back the same way before the
// combine, and the backward pass exchanges d_out and d_x alike. The experts' GEMMs then need the loads on the host.
// Every rank still holds every expert's weights (ZeRO-1 gathers them all): what spreads is the experts' compute and
// their activations.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "fp8.cuh"
#include "kernels/layers.cuh"
#include "kernels/params.h"
#include "nccl.cuh"

constexpr int MOE_MAX_EXPERTS = 256, MOE_MAX_GROUPS = 32, MOE_MAX_TOP_K = 16;  // V3: 256 experts, 8 groups, top 8
constexpr int MOE_ROW_ALIGN = N_C;  // each expert's rows padded to whole FP8 tiles

struct MoeConfig {
    int n_routed, n_shared, top_k, n_group, topk_group, expert_dim;
    float routed_scaling_factor;
    bool norm_topk_prob;
    HD int group_size() const { return n_routed / n_group; }
};

// How the experts' loads are kept even (V3 §2.1.2 and §4.5): bias_rate is gamma (0: the bias stays), alpha the weight
// of the balance loss (0: none), computed per sequence (V3's complementary loss) or over the whole batch.
struct Balancing {
    float bias_rate = 0.001f;
    float alpha = 1e-4f;
    bool per_sequence = true;
};

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU FFN: down(silu(gate x) * up x), the dense layers' FFN and every expert
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
struct SwiGluActs {
    T *gu, *a;  // [rows, 2I]: gate x | up x, and [rows, I]: silu(gate x) * up x
};

// gate_proj and up_proj are stored one after the other, so they run as one [2I, d] projection. With groups > 1
// (the routed experts) the layout holds every group's gate and up, then every group's down.
struct SwiGlu {
    Linear gate_up, down;
    int width = 0;  // I

    // One FFN per prefix ("model.layers.3.mlp.", or one per expert), taking inputs of at most max_rows rows.
    static SwiGlu declare(ParamLayout& layout, const std::vector<std::string>& prefixes, int d, int I, int max_rows,
                          double active = 1.0) {
        SwiGlu f;
        const int groups = int(prefixes.size());
        f.width = I;
        f.gate_up = Linear{-1, 2 * I, d, groups, max_rows};
        f.down = Linear{-1, d, I, groups, max_rows};
        for (const std::string& p : prefixes) {
            int gate = layout.matrix(p + "gate_proj.weight", I, d, Init::Normal, active);
            layout.matrix(p + "up_proj.weight", I, d, Init::Normal, active);
            if (f.gate_up.weight < 0) f.gate_up.weight = gate;
        }
        for (const std::string& p : prefixes) {
            int down = layout.matrix(p + "down_proj.weight", d, I, Init::ResidualNormal, active);
            if (f.down.weight < 0) f.down.weight = down;
        }
        return f;
    }

    template <typename T>
    SwiGluActs<T> allocate(DeviceArena& arena, long rows) const {
        return {arena.take<T>(rows * 2 * width), arena.take<T>(rows * width)};
    }

    // y = down(silu(gate x) * up x), added to y if accumulate.
    template <typename T>
    void forward(const Ctx<T>& c, T* y, const T* x, const SwiGluActs<T>& A, const RowGroups& rows, bool accumulate) {
        gate_up.forward(c, A.gu, x, rows);
        swiglu_forward(A.a, A.gu, rows.rows(), width, c.stream);
        down.forward(c, y, A.a, rows, accumulate);
    }

    // dx (+ dx) and the weight gradients, from dy; G is scratch of the activations' sizes.
    template <typename T>
    void backward(const Ctx<T>& c, T* dx, const T* dy, const T* x, const SwiGluActs<T>& A, const SwiGluActs<T>& G,
                  const RowGroups& rows, bool accumulate_dx) {
        down.backward(c, G.a, dy, A.a, rows);
        swiglu_backward(G.gu, G.a, A.gu, rows.rows(), width, c.stream);
        gate_up.backward(c, dx, G.gu, x, rows, accumulate_dx);
    }

    // y [groups, rows, d]: every group's FFN on the same rows x (the decode step's experts).
    template <typename T>
    void forward_every_group(const Ctx<T>& c, T* y, const T* x, const SwiGluActs<T>& A, int rows) {
        gate_up.forward_every_group(c, A.gu, x, rows, true);
        swiglu_forward(A.a, A.gu, long(gate_up.groups) * rows, width, c.stream);
        down.forward_every_group(c, y, A.a, rows, false);
    }
};

// Rows move 16 bytes at a time: PACK<T> values (rows of a MoE model are multiples of 8 values, Config::validate).
template <typename T>
constexpr int PACK = 16 / sizeof(T);

template <typename T>
__device__ __forceinline__ void load_pack(float (&v)[PACK<T>], const T* p) {
    const uint4 raw = *reinterpret_cast<const uint4*>(p);
    const T* x = reinterpret_cast<const T*>(&raw);
#pragma unroll
    for (int i = 0; i < PACK<T>; i++) v[i] = to_float(x[i]);
}

template <typename T>
__device__ __forceinline__ void store_pack(T* p, const float (&v)[PACK<T>]) {
    uint4 raw;
    T* x = reinterpret_cast<T*>(&raw);
#pragma unroll
    for (int i = 0; i < PACK<T>; i++) x[i] = from_float<T>(v[i]);
    *reinterpret_cast<uint4*>(p) = raw;
}

// ---------------------------------------------------------------------------------------------------------------
// Router: scores, group-limited top-K on the biased scores, gates
// ---------------------------------------------------------------------------------------------------------------

// A warp holds a token's experts in registers, lane l the experts l, l + 32, ...: V3's 256 experts in 8 slots.
constexpr int EXPERT_SLOTS = MOE_MAX_EXPERTS / 32;

// The warp's best candidate: candidates first, then the larger value, then the lower index (a NaN value counts as
// -inf, so that even a token with NaN scores gets valid experts). Every lane gets the winner's index. That order is
// the order of one 64-bit key per lane, the value's bits made order-preserving as an unsigned integer above the
// complemented index, so the winner is a warp-wide maximum: five shuffle rounds.
__device__ __forceinline__ int warp_best(bool candidate, float value, int index) {
    if (!(value == value)) value = -INFINITY;
    uint32_t bits = __float_as_uint(value + 0.0f);  // -0 as +0: equal values
    bits = bits >> 31 ? ~bits : bits | 0x80000000u;
    unsigned long long key = candidate ? (unsigned long long)bits << 32 | ~uint32_t(index) : 0ull;
    for (int offset = 16; offset > 0; offset >>= 1) key = max(key, __shfl_xor_sync(0xFFFFFFFFu, key, offset));
    return key ? int(~uint32_t(key)) : index;
}

// The K best experts by value among those in the kept groups, best first; taken marks the chosen slots of this lane.
__device__ __forceinline__ void warp_top_k(int* chosen, const float (&value)[EXPERT_SLOTS], int E, int K,
                                           uint32_t kept_groups, int group_size) {
    const int lane = threadIdx.x % 32;
    uint32_t taken = 0;
    for (int k = 0; k < K; k++) {
        bool found = false;
        float best = -INFINITY;
        int best_e = lane;
#pragma unroll
        for (int i = 0; i < EXPERT_SLOTS; i++) {
            if (32 * i >= E) break;
            const int e = lane + 32 * i;
            const bool candidate = e < E && (kept_groups >> (e / group_size) & 1u) && !(taken >> i & 1u);
            if (candidate && (!found || value[i] > best)) found = true, best = value[i], best_e = e;
        }
        const int e = warp_best(found, best, best_e);
        if (e % 32 == lane) taken |= 1u << (e / 32);
        chosen[k] = e;
    }
}

// The router's logits, a thread per token and slice of ROUTER_SLICE experts: the thread reads its token's row of u
// once, 16 bytes at a time, and sums each logit over the d columns in order, in FP32. The slice's columns of W_g pass
// through shared memory ROUTER_CHUNK at a time, stored by column, so that a column's ROUTER_SLICE weights are four
// 16-byte reads that all the block's threads share.
constexpr int ROUTER_SLICE = 16, ROUTER_CHUNK = 128, ROUTER_THREADS = 64;

// s = sigmoid(u W_g^T) [N, E]; blockIdx.y picks the slice of experts.
template <typename T>
__global__ void __launch_bounds__(ROUTER_THREADS)
    router_scores_kernel(float* scores, const T* u, const float* W_g, int N, int d, int E) {
    __shared__ float4 W_chunk[ROUTER_CHUNK][ROUTER_SLICE / 4];
    const long n = long(blockIdx.x) * ROUTER_THREADS + threadIdx.x;
    const int e0 = blockIdx.y * ROUTER_SLICE;
    float logit[ROUTER_SLICE] = {};
    for (int j0 = 0; j0 < d; j0 += ROUTER_CHUNK) {
        __syncthreads();  // the previous chunk is read
        float* column_major = reinterpret_cast<float*>(W_chunk);
        for (int i = threadIdx.x; i < ROUTER_CHUNK * ROUTER_SLICE; i += ROUTER_THREADS) {
            const int c = i / ROUTER_SLICE, e = e0 + i % ROUTER_SLICE;
            column_major[i] = e < E && j0 + c < d ? W_g[long(e) * d + j0 + c] : 0.0f;
        }
        __syncthreads();
        if (n >= N) continue;
        for (int c = 0; c < min(ROUTER_CHUNK, d - j0); c += PACK<T>) {
            float x[PACK<T>];
            load_pack(x, u + n * d + j0 + c);
#pragma unroll
            for (int v = 0; v < PACK<T>; v++)
#pragma unroll
                for (int q = 0; q < ROUTER_SLICE / 4; q++) {
                    const float4 w = W_chunk[c + v][q];
                    logit[4 * q] += x[v] * w.x;
                    logit[4 * q + 1] += x[v] * w.y;
                    logit[4 * q + 2] += x[v] * w.z;
                    logit[4 * q + 3] += x[v] * w.w;
                }
        }
    }
    if (n >= N) return;
#pragma unroll
    for (int k = 0; k < ROUTER_SLICE; k++)
        if (e0 + k < E) scores[n * E + e0 + k] = 1.0f / (1.0f + expf(-logit[k]));
}

// One warp per token, lane l holding experts l, l + 32, ...: group scores (a lane per group), the topk_group best
// groups, the top K of s + b among their experts. Writes sum_j s_j [N], the chosen experts and their gates [N, K] in
// order of choice, and, where plain_topk is given, the top K of s alone (the balance loss counts those).
static __global__ void router_choose_kernel(float* score_sum, int* expert, float* gate, int* plain_topk,
                                            const float* scores, const float* bias, int N, MoeConfig m) {
    extern __shared__ float router_smem[];  // per warp: s + b [E]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, E = m.n_routed, K = m.top_k;
    const long n = long(blockIdx.x) * WARPS_PER_BLOCK + warp;
    if (n >= N) return;
    float* biased_row = router_smem + warp * E;
    float s[EXPERT_SLOTS], biased[EXPERT_SLOTS], total = 0.0f;
#pragma unroll
    for (int i = 0; i < EXPERT_SLOTS; i++) {
        const int e = lane + 32 * i;
        s[i] = e < E ? scores[n * E + e] : 0.0f;
        biased[i] = e < E ? s[i] + bias[e] : 0.0f;
        if (e < E) biased_row[e] = biased[i];
        total += s[i];
    }
    total = warp_sum(total);
    __syncwarp();

    const int gs = m.group_size();
    float group_score = -INFINITY;  // a group's score: its two best biased scores
    if (lane < m.n_group) {
        float first = -INFINITY, second = -INFINITY;
        for (int e = lane * gs; e < (lane + 1) * gs; e++) {
            if (biased_row[e] > first)
                second = first, first = biased_row[e];
            else if (biased_row[e] > second)
                second = biased_row[e];
        }
        group_score = gs > 1 ? first + second : first;
    }
    uint32_t kept_groups = 0;  // the topk_group best groups; the others' experts are out (-inf, as V3's release)
    for (int r = 0; r < m.topk_group; r++)
        kept_groups |= 1u << warp_best(lane < m.n_group && !(kept_groups >> lane & 1u), group_score, lane);
    int chosen[MOE_MAX_TOP_K];
    warp_top_k(chosen, biased, E, K, kept_groups, gs);
    if (lane == 0) {
        float chosen_sum = 0.0f;
        for (int k = 0; k < K; k++) chosen_sum += scores[n * E + chosen[k]];
        const float scale = m.routed_scaling_factor / (m.norm_topk_prob ? chosen_sum + 1e-20f : 1.0f);
        for (int k = 0; k < K; k++) expert[n * K + k] = chosen[k], gate[n * K + k] = scores[n * E + chosen[k]] * scale;
        score_sum[n] = total;
    }
    if (!plain_topk) return;
    warp_top_k(chosen, s, E, K, 0xFFFFFFFFu, E);
    if (lane == 0)
        for (int k = 0; k < K; k++) plain_topk[n * K + k] = chosen[k];
}

// A warp's gradient of token n's gates and of the balance loss, through the sigmoid, into its logits: ds [E] (shared
// by the warp) and d_logits [N, E], kept for W_g's gradient. The bias has none: it only chose.
//   gates: g_k = c s_k / S with S = sum_j s_j over the chosen (or g_k = c s_k), so ds_k = c (dg_k - sum_j dg_j g_j/c) /
//   S balance: for the token's segment, coef_i = dL/ds'_i; s'_i = s_i / sum_j s_j
__device__ __forceinline__ void router_token_grad(float* ds, float* d_logits, long n, const float* d_gate,
                                                  const float* scores, const float* score_sum, const int* expert,
                                                  const float* coef, int seq_len, const MoeConfig& m) {
    const int lane = threadIdx.x % 32, E = m.n_routed, K = m.top_k;
    const float* s = scores + n * E;
    for (int e = lane; e < E; e += 32) ds[e] = 0.0f;
    __syncwarp();
    if (lane == 0) {
        const int* chosen = expert + n * K;
        const float* dg = d_gate + n * K;
        float S = 0.0f, dot = 0.0f;
        for (int k = 0; k < K; k++) S += s[chosen[k]], dot += dg[k] * s[chosen[k]];
        const float c = m.routed_scaling_factor;
        if (m.norm_topk_prob) {
            S += 1e-20f;
            for (int k = 0; k < K; k++) ds[chosen[k]] += c * (dg[k] / S - dot / (S * S));
        } else {
            for (int k = 0; k < K; k++) ds[chosen[k]] += c * dg[k];
        }
    }
    __syncwarp();
    if (coef) {
        const float* g = coef + n / seq_len * E;
        const float S = score_sum[n];
        float dot = 0.0f;
        for (int i = lane; i < E; i += 32) dot += g[i] * s[i];
        dot = warp_sum(dot) / S;
        for (int j = lane; j < E; j += 32) ds[j] += (g[j] - dot) / S;
    }
    __syncwarp();
    for (int e = lane; e < E; e += 32) {
        ds[e] *= s[e] * (1.0f - s[e]);
        d_logits[n * E + e] = ds[e];
    }
    __syncwarp();
}

// One warp per ROUTER_WARP_TOKENS tokens: their logits' gradients, then du += ds W_g, each value of W_g read once for
// all of them.
constexpr int ROUTER_WARP_TOKENS = 4;

template <typename T>
__global__ void router_backward_kernel(float* d_logits, T* du, const float* d_gate, const float* scores,
                                       const float* score_sum, const int* expert, const float* coef, int seq_len,
                                       const float* W_g, int N, int d, MoeConfig m) {
    extern __shared__ float router_smem[];  // per warp: ds [ROUTER_WARP_TOKENS, E]
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, E = m.n_routed;
    const long n0 = (long(blockIdx.x) * WARPS_PER_BLOCK + warp) * ROUTER_WARP_TOKENS;
    if (n0 >= N) return;
    const int tokens = int(min(long(ROUTER_WARP_TOKENS), N - n0));
    float* ds = router_smem + warp * ROUTER_WARP_TOKENS * E;
    for (int t = 0; t < tokens; t++)
        router_token_grad(ds + t * E, d_logits, n0 + t, d_gate, scores, score_sum, expert, coef, seq_len, m);
    for (int j = lane; j < d; j += 32) {
        float acc[ROUTER_WARP_TOKENS] = {};
        for (int e = 0; e < E; e++) {
            const float w = W_g[long(e) * d + j];
#pragma unroll
            for (int t = 0; t < ROUTER_WARP_TOKENS; t++) acc[t] += ds[t * E + e] * w;
        }
        for (int t = 0; t < tokens; t++)
            du[(n0 + t) * d + j] = from_float<T>(to_float(du[(n0 + t) * d + j]) + acc[t]);
    }
}

// Per block of rows, its partial sums of dW_g [E, d] = d_logits^T u; sum_partials adds the blocks' partial sums in
// order. A thread holds ROUTER_GRAD_COLUMNS columns of ROUTER_GRAD_EXPERTS experts in registers; the block's rows of
// d_logits pass through shared memory, ROUTER_GRAD_ROWS at a time, read back as 4-float vectors that every thread
// shares.
constexpr int ROUTER_GRAD_EXPERTS = 16, ROUTER_GRAD_COLUMNS = 3, ROUTER_GRAD_THREADS = 128, ROUTER_GRAD_ROWS = 64;
constexpr int ROUTER_GRAD_SPAN = ROUTER_GRAD_COLUMNS * ROUTER_GRAD_THREADS;  // the columns of one pass

template <typename T>
__global__ void __launch_bounds__(ROUTER_GRAD_THREADS)
    router_weight_grad_kernel(float* partial, const float* d_logits, const T* u, int N, int E, int d,
                              int rows_per_block) {
    __shared__ float4 staged[ROUTER_GRAD_ROWS][ROUTER_GRAD_EXPERTS / 4];
    const int first = blockIdx.x * rows_per_block, last = min(first + rows_per_block, N);
    for (int j0 = 0; j0 < d; j0 += ROUTER_GRAD_SPAN)
        for (int e0 = 0; e0 < E; e0 += ROUTER_GRAD_EXPERTS) {
            float acc[ROUTER_GRAD_COLUMNS][ROUTER_GRAD_EXPERTS] = {};
            for (int r0 = first; r0 < last; r0 += ROUTER_GRAD_ROWS) {
                const int rows = min(ROUTER_GRAD_ROWS, last - r0);
                __syncthreads();  // the previous rows are read
                float* flat = reinterpret_cast<float*>(staged);
                for (int i = threadIdx.x; i < ROUTER_GRAD_ROWS * ROUTER_GRAD_EXPERTS; i += blockDim.x) {
                    const int r = i / ROUTER_GRAD_EXPERTS, e = e0 + i % ROUTER_GRAD_EXPERTS;
                    flat[i] = r < rows && e < E ? d_logits[long(r0 + r) * E + e] : 0.0f;
                }
                __syncthreads();
#pragma unroll 2
                for (int r = 0; r < rows; r++) {
                    float x[ROUTER_GRAD_COLUMNS];
#pragma unroll
                    for (int c = 0; c < ROUTER_GRAD_COLUMNS; c++) {
                        const int j = j0 + threadIdx.x + c * ROUTER_GRAD_THREADS;
                        x[c] = j < d ? to_float(u[long(r0 + r) * d + j]) : 0.0f;
                    }
#pragma unroll
                    for (int q = 0; q < ROUTER_GRAD_EXPERTS / 4; q++) {
                        const float4 g = staged[r][q];
#pragma unroll
                        for (int c = 0; c < ROUTER_GRAD_COLUMNS; c++) {
                            acc[c][4 * q] += g.x * x[c];
                            acc[c][4 * q + 1] += g.y * x[c];
                            acc[c][4 * q + 2] += g.z * x[c];
                            acc[c][4 * q + 3] += g.w * x[c];
                        }
                    }
                }
            }
#pragma unroll
            for (int c = 0; c < ROUTER_GRAD_COLUMNS; c++) {
                const int j = j0 + threadIdx.x + c * ROUTER_GRAD_THREADS;
#pragma unroll
                for (int k = 0; k < ROUTER_GRAD_EXPERTS; k++)
                    if (j < d && e0 + k < E) partial[(long(blockIdx.x) * E + e0 + k) * d + j] = acc[c][k];
            }
        }
}

// ---------------------------------------------------------------------------------------------------------------
// The sequence-wise balance loss (eqs. 17-20)
// ---------------------------------------------------------------------------------------------------------------

// First, per sequence: its tokens' top-K counts and sums of s'_i, a block per sequence (its warps take a token each
// in turn, lanes the experts; the warps' partial sums added in order).
static __global__ void balance_sums_kernel(int* seq_counts, float* seq_P, const float* scores, const float* score_sum,
                                           const int* plain_topk, int seq_len, int E, int K) {
    __shared__ float warp_P[WARPS_PER_BLOCK][MOE_MAX_EXPERTS];
    __shared__ int warp_count[WARPS_PER_BLOCK][MOE_MAX_EXPERTS];
    const int seq = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float P[EXPERT_SLOTS] = {};
    int count[EXPERT_SLOTS] = {};
    for (long n = long(seq) * seq_len + warp; n < long(seq + 1) * seq_len; n += WARPS_PER_BLOCK) {
        const float S = score_sum[n];
#pragma unroll
        for (int i = 0; i < EXPERT_SLOTS; i++) {
            const int e = lane + 32 * i;
            if (e >= E) continue;
            P[i] += scores[n * E + e] / S;
            for (int k = 0; k < K; k++) count[i] += plain_topk[n * K + k] == e;
        }
    }
#pragma unroll
    for (int i = 0; i < EXPERT_SLOTS; i++)
        if (lane + 32 * i < E) warp_P[warp][lane + 32 * i] = P[i], warp_count[warp][lane + 32 * i] = count[i];
    __syncthreads();
    const int e = threadIdx.x;
    if (e >= E) return;
    float P_e = 0.0f;
    int count_e = 0;
    for (int w = 0; w < WARPS_PER_BLOCK; w++) P_e += warp_P[w][e], count_e += warp_count[w][e];
    seq_P[long(seq) * E + e] = P_e, seq_counts[long(seq) * E + e] = count_e;
}

// Then one block, a thread per (segment, expert i) pair in turn: for each segment of seqs_per_segment sequences (one:
// V3's sequence-wise loss; all: the batch-wise one), f_i and P_i from its sequences' sums in order, coef_i =
// dL/ds'_{i,t} for the backward pass, and the loss, the mean over the segments: each thread's terms in order, then the
// threads' sums in order (the same sum on every run).
static __global__ void balance_loss_kernel(float* loss, float* coef, const int* seq_counts, const float* seq_P,
                                           int sequences, int seqs_per_segment, int seq_len, int E, int K,
                                           float alpha) {
    __shared__ float terms[MOE_MAX_EXPERTS];
    const int segments = sequences / seqs_per_segment;
    const float T = float(seq_len) * float(seqs_per_segment);
    float term = 0.0f;
    for (int i = threadIdx.x; i < segments * E; i += blockDim.x) {
        const int seg = i / E, e = i % E;
        float P = 0.0f;
        int count = 0;
        for (int q = seg * seqs_per_segment; q < (seg + 1) * seqs_per_segment; q++)
            P += seq_P[long(q) * E + e], count += seq_counts[long(q) * E + e];
        const float f = float(E) / (float(K) * T) * float(count);
        coef[long(seg) * E + e] = alpha * f / (T * float(segments));
        term += alpha * f * (P / T) / float(segments);
    }
    terms[threadIdx.x] = term;
    __syncthreads();
    if (threadIdx.x == 0) {
        float sum = 0.0f;
        for (int t = 0; t < blockDim.x; t++) sum += terms[t];
        *loss = sum;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Grouping the tokens by expert, and combining the experts' outputs
// ---------------------------------------------------------------------------------------------------------------

HD int padded_rows(int count) { return (count + MOE_ROW_ALIGN - 1) / MOE_ROW_ALIGN * MOE_ROW_ALIGN; }

// The (token, slot) pairs are grouped in chunks of DISPATCH_CHUNK, a block each: count the chunk's pairs per expert;
// add the counts up into each expert's first row and each chunk's first row for each expert; then each pair takes
// its chunk's row for its expert plus the number of earlier pairs of the chunk with the same expert. Every step is
// integer arithmetic in a fixed order: the same rows on every run, pairs in order within an expert.
constexpr int DISPATCH_CHUNK = 1024;

static __global__ void chunk_counts_kernel(int* chunk_counts, const int* expert, int pairs, int E) {
    __shared__ int counts[MOE_MAX_EXPERTS];
    for (int e = threadIdx.x; e < E; e += blockDim.x) counts[e] = 0;
    __syncthreads();
    const int p = blockIdx.x * DISPATCH_CHUNK + threadIdx.x;
    if (p < pairs) atomicAdd(&counts[expert[p]], 1);  // an integer count: the same whatever the order
    __syncthreads();
    for (int e = threadIdx.x; e < E; e += blockDim.x) chunk_counts[long(blockIdx.x) * E + e] = counts[e];
}

// One block, a thread per expert: the loads, offsets[0..E] (each group padded to whole tiles), chunk_first
// [chunks, E], and source -1 for the padding rows.
static __global__ void dispatch_offsets_kernel(int* counts, int* offsets, int* chunk_first, int* source,
                                               const int* chunk_counts, int chunks, int E, int bound) {
    const int e = threadIdx.x;
    if (e < E) {
        int total = 0;
        for (int c = 0; c < chunks; c++) total += chunk_counts[long(c) * E + e];
        counts[e] = total;
    }
    __syncthreads();
    if (e == 0) {
        int offset = 0;
        for (int j = 0; j < E; j++) offsets[j] = offset, offset += padded_rows(counts[j]);
        offsets[E] = offset;
    }
    __syncthreads();
    for (int row = offsets[E] + e; row < bound; row += blockDim.x) source[row] = -1;  // past the groups: padding too
    if (e >= E) return;
    int row = offsets[e];
    for (int c = 0; c < chunks; c++) chunk_first[long(c) * E + e] = row, row += chunk_counts[long(c) * E + e];
    for (; row < offsets[e + 1]; row++) source[row] = -1;
}

static __global__ void dispatch_kernel(int* dest, int* source, const int* chunk_first, const int* expert, int pairs,
                                       int E) {
    __shared__ int warp_counts[DISPATCH_CHUNK / 32][MOE_MAX_EXPERTS];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, p = blockIdx.x * DISPATCH_CHUNK + threadIdx.x;
    const int e = p < pairs ? expert[p] : -1;
    const unsigned same = __match_any_sync(0xFFFFFFFFu, e);  // the lanes with this lane's expert
    const int rank = __popc(same & ((1u << lane) - 1u));
    for (int j = lane; j < E; j += 32) warp_counts[warp][j] = 0;
    __syncwarp();
    if (e >= 0 && rank == 0) warp_counts[warp][e] = __popc(same);
    __syncthreads();
    if (e < 0) return;
    int before = 0;
    for (int w = 0; w < warp; w++) before += warp_counts[w][e];
    const int row = chunk_first[long(blockIdx.x) * E + e] + before + rank;
    dest[p] = row, source[row] = p;
}

// A thread per 16 bytes of the output rows: which row, and which pack in it.
__device__ __forceinline__ bool row_pack(long& row, int& column, long rows, int d, int pack) {
    const long i = long(blockIdx.x) * blockDim.x + threadIdx.x, packs = d / pack;
    row = i / packs, column = int(i % packs) * pack;
    return row < rows;
}

// x_g [rows, d]: the grouped rows, each its token's u (its pair's token is pair / K), zeros for padding.
template <typename T>
__global__ void gather_rows_kernel(T* __restrict__ x_g, const T* __restrict__ u, const int* __restrict__ source,
                                   long rows, int K, int d) {
    long r;
    int j;
    if (!row_pack(r, j, rows, d, PACK<T>)) return;
    const int pair = source[r];
    const uint4 zero = make_uint4(0, 0, 0, 0);
    *reinterpret_cast<uint4*>(x_g + r * d + j) =
        pair < 0 ? zero : *reinterpret_cast<const uint4*>(u + long(pair / K) * d + j);
}

// y[t] += sum_k g_{t,k} out[dest[t,k]], the K terms in slot order: the same sum on every run.
template <typename T>
__global__ void combine_kernel(T* __restrict__ y, const T* __restrict__ out, const float* __restrict__ gate,
                               const int* __restrict__ dest, int N, int K, int d) {
    long t;
    int j;
    if (!row_pack(t, j, N, d, PACK<T>)) return;
    float acc[PACK<T>], x[PACK<T>];
    load_pack(acc, y + t * d + j);
    for (int k = 0; k < K; k++) {
        const float g = gate[t * K + k];
        load_pack(x, out + long(dest[t * K + k]) * d + j);
#pragma unroll
        for (int i = 0; i < PACK<T>; i++) acc[i] += g * x[i];
    }
    store_pack(y + t * d + j, acc);
}

// The adjoint of combine, a warp per grouped row r holding pair p of token t: d_out[r] = g_p dy[t] and
// dg_p = dy[t] . out[r]; padding rows get zeros.
template <typename T>
__global__ void combine_backward_kernel(T* d_out, float* d_gate, const T* dy, const T* out, const float* gate,
                                        const int* source, int rows, int K, int d) {
    const long r = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const int pair = source[r];
    const long t = pair < 0 ? 0 : pair / K;
    const float g = pair < 0 ? 0.0f : gate[pair];
    float dot = 0.0f, dy_v[PACK<T>], out_v[PACK<T>];
    for (int j = lane * PACK<T>; j < d; j += 32 * PACK<T>) {
        load_pack(dy_v, dy + t * d + j);
        load_pack(out_v, out + r * d + j);
#pragma unroll
        for (int i = 0; i < PACK<T>; i++) dot += dy_v[i] * out_v[i], dy_v[i] *= g;
        store_pack(d_out + r * d + j, dy_v);
    }
    dot = warp_sum(dot);
    if (lane == 0 && pair >= 0) d_gate[pair] = dot;
}

// The adjoint of gather: du[t] = sum_k dx_g[dest[t,k]], in slot order.
template <typename T>
__global__ void gather_backward_kernel(T* __restrict__ du, const T* __restrict__ dx_g, const int* __restrict__ dest,
                                       int N, int K, int d) {
    long t;
    int j;
    if (!row_pack(t, j, N, d, PACK<T>)) return;
    float acc[PACK<T>] = {}, x[PACK<T>];
    for (int k = 0; k < K; k++) {
        load_pack(x, dx_g + long(dest[t * K + k]) * d + j);
#pragma unroll
        for (int i = 0; i < PACK<T>; i++) acc[i] += x[i];
    }
    store_pack(du + t * d + j, acc);
}

// Decoding runs every expert on every token, outputs [E, N, d]: pair (t, k) reads row expert[t,k] * N + t.
static __global__ void every_expert_dest_kernel(int* dest, const int* expert, int N, int K) {
    const int p = blockIdx.x * blockDim.x + threadIdx.x;
    if (p < N * K) dest[p] = expert[p] * N + p / K;
}

// Auxiliary-loss-free balancing: b_i += rate * sign(mean load - load_i), after the optimizer step; nothing where the
// step was skipped (skip, as AdamW reads it). The mean is the loads' own (every token chooses K experts), so that
// loads summed over several GPUs' batches need no count of their tokens.
static __global__ void bias_update_kernel(float* bias, const int* counts, int E, float rate, const int* skip,
                                          const float* grad_norm) {
    if (skip && (*skip || !isfinite(*grad_norm))) return;
    long total = 0;
    for (int e = 0; e < E; e++) total += counts[e];
    const float mean_load = float(total) / float(E);
    for (int e = threadIdx.x; e < E; e += blockDim.x) {
        const float load = float(counts[e]);
        bias[e] += rate * float((load < mean_load) - (load > mean_load));
    }
}

// Launchers of the grouping kernels: a thread per 16 bytes of a row, or a warp per row.
inline int pack_blocks(long rows, int d, int pack) { return ceil_div(rows * (d / pack), 256); }

template <typename T>
void combine(T* y, const T* out, const float* gate, const int* dest, int N, int K, int d, cudaStream_t s) {
    combine_kernel<<<pack_blocks(N, d, PACK<T>), 256, 0, s>>>(y, out, gate, dest, N, K, d);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void combine_backward(T* d_out, float* d_gate, const T* dy, const T* out, const float* gate, const int* source,
                      int rows, int K, int d, cudaStream_t s) {
    combine_backward_kernel<<<ceil_div(rows, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(d_out, d_gate, dy, out,
                                                                                             gate, source, rows, K, d);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void gather_backward(T* du, const T* dx_g, const int* dest, int N, int K, int d, cudaStream_t s) {
    gather_backward_kernel<<<pack_blocks(N, d, PACK<T>), 256, 0, s>>>(du, dx_g, dest, N, K, d);
    CUDA_CHECK_LAUNCH();
}

// The balance of a layer's loads, MaxVio of the auxiliary-loss-free balancing paper (arXiv 2408.15664, which V3
// §2.1.2 follows): max_i load_i / mean load - 1, 0 when even.
inline double max_violation(const std::vector<int>& loads) {
    double total = 0.0, most = 0.0;
    for (int load : loads) total += load, most = std::max(most, double(load));
    return total > 0.0 ? most / (total / double(loads.size())) - 1.0 : 0.0;
}

// ---------------------------------------------------------------------------------------------------------------
// The MoE layer
// ---------------------------------------------------------------------------------------------------------------

// A MoE layer's forward for N tokens, kept for its backward pass.
template <typename T>
struct MoeActs {
    float *scores, *score_sum, *gate;  // s [N, E], sum_j s_j [N], the gates [N, K]
    int *expert, *plain_topk, *dest;   // the chosen experts [N, K], the top K of s alone [N, K], each pair's row
    int *source, *counts, *offsets;    // each row's pair (-1: padding), loads [E], the groups' first rows [E + 1]
    int *chunk_counts, *chunk_first;   // per chunk of pairs and expert: its pairs, and the row of its first
    T *x_g, *out_g;                    // the experts' input and output rows
    SwiGluActs<T> routed, shared;
    int* seq_counts;      // per sequence and expert: its tokens' top-K counts on s alone
    float *seq_P, *coef;  // per sequence and expert: the sum of s'; per segment and expert: dL/ds'
    RowGroups rows;       // the groups of the last forward pass
    // The experts' side: their input and output rows, grouped by this rank's experts; with expert parallelism, the
    // rows that every rank sent them (and the exchange's buffer, its rows peer by peer), else x_g and out_g.
    T *x_e, *out_e, *peer = nullptr;
    RowGroups expert_groups;
    Dispatch plan;  // expert parallel: the last forward pass's exchange
    int *all_counts = nullptr, *host_all_counts = nullptr;  // every rank's loads [R, E], on the device and pinned
    int *expert_offsets = nullptr, *host_expert_offsets = nullptr;  // the offsets of expert_groups [E / R + 1]
    int* host_counts;     // page-locked: where its counts arrive
    cudaEvent_t counts_ready;
    int seq_len = 0;
};

// Scratch of a MoE layer's backward pass, shared by the layers.
template <typename T>
struct MoeGrads {
    T *d_out, *d_x;
    T *d_out_e, *d_x_e;  // on the experts' side (expert parallel; else d_out and d_x)
    SwiGluActs<T> routed, shared;
    float *d_gate, *d_logits, *partial;
};

struct Moe {
    MoeConfig cfg;
    int d = 0;
    int gate = -1, bias = -1;  // the router: W_g [E, d] (`mlp.gate.weight`), b [E] (`e_score_correction_bias`)
    SwiGlu shared, experts;
    Comm* ep = nullptr;  // expert parallel over its ranks (spread_experts); null: every expert here

    // Rows of the grouped buffers for N tokens: every pair, and each expert's padding at most.
    static long grouped_rows(const MoeConfig& m, long N) { return N * m.top_k + long(m.n_routed) * MOE_ROW_ALIGN; }

    static Moe declare(ParamLayout& layout, const std::string& prefix, const MoeConfig& m, int d, int max_tokens) {
        Moe moe;
        moe.cfg = m, moe.d = d;
        moe.gate = layout.matrix(prefix + "gate.weight", m.n_routed, d);
        moe.bias = layout.buffer(prefix + "gate.e_score_correction_bias", m.n_routed);
        moe.shared = SwiGlu::declare(layout, {prefix + "shared_experts."}, d, m.n_shared * m.expert_dim, max_tokens);
        std::vector<std::string> experts;
        for (int e = 0; e < m.n_routed; e++) experts.push_back(prefix + "experts." + std::to_string(e) + ".");
        moe.experts = SwiGlu::declare(layout, experts, d, m.expert_dim, int(grouped_rows(m, max_tokens)),
                                      double(m.top_k) / m.n_routed);
        return moe;
    }

    // Buffers for N tokens; a decoding layer holds every expert's output for every token.
    template <typename T>
    MoeActs<T> allocate(DeviceArena& arena, int N, bool decoding) const {
        const int E = cfg.n_routed, K = cfg.top_k;
        const long rows = decoding ? long(E) * N : grouped_rows(cfg, N);
        MoeActs<T> A;
        A.scores = arena.take<float>(long(N) * E), A.score_sum = arena.take<float>(N);
        A.gate = arena.take<float>(long(N) * K), A.expert = arena.take<int>(long(N) * K);
        A.plain_topk = arena.take<int>(long(N) * K), A.dest = arena.take<int>(long(N) * K);
        A.source = arena.take<int>(rows), A.counts = arena.take<int>(E), A.offsets = arena.take<int>(E + 1);
        const long chunks = ceil_div(long(N) * K, DISPATCH_CHUNK);
        A.chunk_counts = arena.take<int>(chunks * E), A.chunk_first = arena.take<int>(chunks * E);
        A.x_g = decoding ? nullptr : arena.take<T>(rows * d), A.out_g = arena.take<T>(rows * d);
        A.x_e = A.x_g, A.out_e = A.out_g;
        A.routed = experts.allocate<T>(arena, rows), A.shared = shared.allocate<T>(arena, N);
        A.seq_counts = arena.take<int>(long(N) * E), A.seq_P = arena.take<float>(long(N) * E);
        A.coef = arena.take<float>(long(N) * E);
        A.host_counts = arena.take_pinned<int>(E), A.counts_ready = arena.take_event();
        return A;
    }

    template <typename T>
    MoeGrads<T> allocate_grads(DeviceArena& arena, int N) const {
        const long rows = grouped_rows(cfg, N);
        MoeGrads<T> G;
        G.d_out = arena.take<T>(rows * d), G.d_x = arena.take<T>(rows * d);
        G.d_out_e = G.d_out, G.d_x_e = G.d_x;
        G.routed = experts.allocate<T>(arena, rows), G.shared = shared.allocate<T>(arena, N);
        G.d_gate = arena.take<float>(long(N) * cfg.top_k), G.d_logits = arena.take<float>(long(N) * cfg.n_routed);
        G.partial = arena.take<float>(partial_scratch_size(N, cfg.n_routed * d));
        return G;
    }

    // Expert parallel over comm's ranks: this rank runs experts [r E/R, (r+1) E/R) on the rows that every rank routes
    // to them, from a global batch of all_tokens tokens at most (the bound of the experts' side, also of their FP8
    // buffers: call before enable_fp8).
    void spread_experts(Comm& comm, long all_tokens) {
        if (cfg.n_routed % comm.ranks.world != 0)
            throw std::invalid_argument("expert parallelism: " + std::to_string(cfg.n_routed) +
                                        " routed experts do not split evenly over " +
                                        std::to_string(comm.ranks.world) + " GPUs");
        ep = &comm;
        experts.gate_up.max_rows = experts.down.max_rows = int(grouped_rows(cfg, all_tokens));
    }

    // The experts' side of a layer's buffers, after spread_experts: every pair of the global batch and each expert's
    // padding from every rank at most.
    template <typename T>
    void allocate_expert_side(DeviceArena& arena, MoeActs<T>& A, long all_tokens) const {
        const long rows = grouped_rows(cfg, all_tokens), R = ep->ranks.world, local = cfg.n_routed / R;
        A.x_e = arena.take<T>(rows * d), A.out_e = arena.take<T>(rows * d), A.peer = arena.take<T>(rows * d);
        A.routed = experts.allocate<T>(arena, rows);
        A.all_counts = arena.take<int>(R * cfg.n_routed), A.host_all_counts = arena.take_pinned<int>(R * cfg.n_routed);
        A.expert_offsets = arena.take<int>(local + 1), A.host_expert_offsets = arena.take_pinned<int>(local + 1);
    }

    template <typename T>
    void allocate_expert_side(DeviceArena& arena, MoeGrads<T>& G, long all_tokens) const {
        const long rows = grouped_rows(cfg, all_tokens);
        G.d_out_e = arena.take<T>(rows * d), G.d_x_e = arena.take<T>(rows * d);
        G.routed = experts.allocate<T>(arena, rows);
    }

    // s, the chosen experts and their gates for N tokens; with plain, also the top K of s alone.
    template <typename T>
    void route(const Ctx<T>& c, MoeActs<T>& A, const T* u, int N, bool plain) const {
        router_scores_kernel<<<dim3(ceil_div(N, ROUTER_THREADS), ceil_div(cfg.n_routed, ROUTER_SLICE)), ROUTER_THREADS,
                               0, c.stream>>>(A.scores, u, c.w32(gate), N, d, cfg.n_routed);
        CUDA_CHECK_LAUNCH();
        router_choose_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32,
                               sizeof(float) * WARPS_PER_BLOCK * cfg.n_routed, c.stream>>>(
            A.score_sum, A.expert, A.gate, plain ? A.plain_topk : nullptr, A.scores, c.w32(bias), N, cfg);
        CUDA_CHECK_LAUNCH();
    }

    // Each pair's row in the experts' buffer (dest, source, the groups' offsets; source -1 for padding, up to the
    // bound of grouped_rows); the loads start for the host, and the stream goes on meanwhile.
    template <typename T>
    void dispatch(const Ctx<T>& c, MoeActs<T>& A, int N) const {
        const int E = cfg.n_routed, pairs = N * cfg.top_k, chunks = ceil_div(pairs, DISPATCH_CHUNK);
        chunk_counts_kernel<<<chunks, DISPATCH_CHUNK, 0, c.stream>>>(A.chunk_counts, A.expert, pairs, E);
        CUDA_CHECK_LAUNCH();
        dispatch_offsets_kernel<<<1, MOE_MAX_EXPERTS, 0, c.stream>>>(
            A.counts, A.offsets, A.chunk_first, A.source, A.chunk_counts, chunks, E, int(grouped_rows(cfg, N)));
        CUDA_CHECK_LAUNCH();
        dispatch_kernel<<<chunks, DISPATCH_CHUNK, 0, c.stream>>>(A.dest, A.source, A.chunk_first, A.expert, pairs, E);
        CUDA_CHECK_LAUNCH();
        loads_to_host(A, c.stream);
    }

    // The loads on the device start for the host, where loads() waits for them.
    template <typename T>
    void loads_to_host(MoeActs<T>& A, cudaStream_t s) const {
        CUDA_CHECK(cudaMemcpyAsync(A.host_counts, A.counts, sizeof(int) * cfg.n_routed, cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaEventRecord(A.counts_ready, s));
    }

    // The loads of the last forward pass, on the host (waits for them).
    template <typename T>
    std::vector<int> loads(const MoeActs<T>& A) const {
        CUDA_CHECK(cudaEventSynchronize(A.counts_ready));
        return std::vector<int>(A.host_counts, A.host_counts + cfg.n_routed);
    }

    // After dispatch: the groups of rows, and each pair's row of u gathered into them. In FP8 the grouped GEMMs size
    // themselves from the offsets on the device, so nothing waits for the routing; in the model's precision the
    // experts' GEMMs run one by one, sized on the host, which waits for the loads (as expert parallelism does).
    template <typename T>
    void gather(const Ctx<T>& c, MoeActs<T>& A, const T* u, int N) const {
        const int E = cfg.n_routed;
        if (c.fp8 && !ep) {
            A.rows = RowGroups::on_device(A.offsets, E, int(grouped_rows(cfg, N)));
        } else {
            const std::vector<int> counts = loads(A);
            std::vector<int> offsets(E + 1, 0);
            for (int e = 0; e < E; e++) offsets[e + 1] = offsets[e] + padded_rows(counts[e]);
            A.rows = RowGroups::known(offsets, A.offsets);
        }
        gather_rows_kernel<<<pack_blocks(A.rows.rows(), d, PACK<T>), 256, 0, c.stream>>>(A.x_g, u, A.source,
                                                                                         A.rows.rows(), cfg.top_k, d);
        CUDA_CHECK_LAUNCH();
        if (!ep) A.expert_groups = A.rows;
    }

    // Expert parallel: every rank's loads, each padded to whole tiles as its grouped buffer holds them, reach every
    // rank (the host waits for them), and the exchange's plan and the local experts' groups follow.
    template <typename T>
    void plan_exchange(const Ctx<T>& c, MoeActs<T>& A) const {
        const int E = cfg.n_routed, R = ep->ranks.world;
        ep->all_gather(A.counts, A.all_counts, E, c.stream);
        CUDA_CHECK(cudaMemcpyAsync(A.host_all_counts, A.all_counts, sizeof(int) * R * E, cudaMemcpyDeviceToHost,
                                   c.stream));
        CUDA_CHECK(cudaStreamSynchronize(c.stream));
        std::vector<long> padded(size_t(R) * E);
        for (size_t i = 0; i < padded.size(); i++) padded[i] = padded_rows(A.host_all_counts[i]);
        A.plan = dispatch_plan(padded, E, ep->ranks);
        const int local = A.plan.local_experts;
        std::vector<int> offsets(local + 1, 0);
        for (int j = 0; j < local; j++) offsets[j + 1] = offsets[j] + int(A.plan.expert_rows[j]);
        std::copy(offsets.begin(), offsets.end(), A.host_expert_offsets);  // its last copy has ended: synchronized
        CUDA_CHECK(cudaMemcpyAsync(A.expert_offsets, A.host_expert_offsets, sizeof(int) * (local + 1),
                                   cudaMemcpyHostToDevice, c.stream));
        A.expert_groups = RowGroups::known(offsets, A.expert_offsets, A.plan.first_expert);
    }

    // Expert parallel: rows of this rank's grouped buffer (`mine`) to their experts' ranks, regrouped there by local
    // expert (`experts_side`); from_experts is the way back. Without it the two sides are one buffer.
    template <typename T>
    void to_experts(const Ctx<T>& c, const MoeActs<T>& A, const T* mine, T* experts_side) const {
        if (!ep) return;
        const Dispatch& p = A.plan;
        ep->exchange(mine, p.send_count, p.send_offset, A.peer, p.recv_count, p.recv_offset, d, c.stream);
        move_segments(p.regroup, A.peer, experts_side, d, false, c.stream);
    }

    template <typename T>
    void from_experts(const Ctx<T>& c, const MoeActs<T>& A, const T* experts_side, T* mine) const {
        if (!ep) return;
        const Dispatch& p = A.plan;
        move_segments(p.regroup, experts_side, A.peer, d, true, c.stream);
        ep->exchange(A.peer, p.recv_count, p.recv_offset, mine, p.send_count, p.send_offset, d, c.stream);
    }

    template <typename T>
    void group_by_expert(const Ctx<T>& c, MoeActs<T>& A, const T* u, int N) const {
        dispatch(c, A, N);
        gather(c, A, u, N);
    }

    // y += MoE(u) for N tokens in sequences of seq_len; in training also the balance loss into *balance_loss.
    template <typename T>
    void forward(const Ctx<T>& c, MoeActs<T>& A, T* y, const T* u, int N, int seq_len, const Balancing& balancing,
                 float* balance_loss) {
        const int E = cfg.n_routed, K = cfg.top_k;
        const bool balance_loss_on = !c.decoding && balancing.alpha > 0.0f;
        route(c, A, u, N, balance_loss_on);
        if (!c.decoding) dispatch(c, A, N);
        shared.forward(c, y, u, A.shared, RowGroups::all(N), true);  // GPU work while a host waits for the loads
        if (c.decoding) {
            every_expert_dest_kernel<<<elementwise_blocks(long(N) * K), 256, 0, c.stream>>>(A.dest, A.expert, N, K);
            CUDA_CHECK_LAUNCH();
            experts.forward_every_group(c, A.out_g, u, A.routed, N);
        } else {
            if (ep) plan_exchange(c, A);
            gather(c, A, u, N);
            to_experts(c, A, A.x_g, A.x_e);
            experts.forward(c, A.out_e, A.x_e, A.routed, A.expert_groups, false);
            from_experts(c, A, A.out_e, A.out_g);
        }
        combine(y, A.out_g, A.gate, A.dest, N, K, d, c.stream);
        if (c.decoding) return;
        const int sequences = N / seq_len, seqs_per_segment = balancing.per_sequence ? 1 : sequences;
        A.seq_len = seq_len * seqs_per_segment;  // a segment's tokens: token n's coefficients are coef[n / seq_len]
        if (balance_loss_on) {
            balance_sums_kernel<<<sequences, WARPS_PER_BLOCK * 32, 0, c.stream>>>(
                A.seq_counts, A.seq_P, A.scores, A.score_sum, A.plain_topk, seq_len, E, K);
            CUDA_CHECK_LAUNCH();
            balance_loss_kernel<<<1, MOE_MAX_EXPERTS, 0, c.stream>>>(balance_loss, A.coef, A.seq_counts, A.seq_P,
                                                                     sequences, seqs_per_segment, seq_len, E, K,
                                                                     balancing.alpha);
            CUDA_CHECK_LAUNCH();
        } else {
            CUDA_CHECK(cudaMemsetAsync(balance_loss, 0, sizeof(float), c.stream));
        }
    }

    // du = dMoE/du . dy (written), and the gradients of every expert and of W_g, after forward() on the same u
    // (with the balance loss's gradient where it was on).
    template <typename T>
    void backward(const Ctx<T>& c, const MoeActs<T>& A, const MoeGrads<T>& G, T* du, const T* dy, const T* u, int N,
                  const Balancing& balancing) {
        const int E = cfg.n_routed, K = cfg.top_k;
        combine_backward(G.d_out, G.d_gate, dy, A.out_g, A.gate, A.source, A.rows.rows(), K, d, c.stream);
        to_experts(c, A, G.d_out, G.d_out_e);
        experts.backward(c, G.d_x_e, G.d_out_e, A.x_e, A.routed, G.routed, A.expert_groups, false);
        from_experts(c, A, G.d_x_e, G.d_x);
        gather_backward(du, G.d_x, A.dest, N, K, d, c.stream);
        shared.backward(c, du, dy, u, A.shared, G.shared, RowGroups::all(N), true);
        router_backward_kernel<<<ceil_div(N, WARPS_PER_BLOCK * ROUTER_WARP_TOKENS), WARPS_PER_BLOCK * 32,
                                 sizeof(float) * WARPS_PER_BLOCK * ROUTER_WARP_TOKENS * E, c.stream>>>(
            G.d_logits, du, G.d_gate, A.scores, A.score_sum, A.expert, balancing.alpha > 0.0f ? A.coef : nullptr,
            A.seq_len, c.w32(gate), N, d, cfg);
        CUDA_CHECK_LAUNCH();
        const int rows_per_block = partial_rows_per_block(N), blocks = ceil_div(N, rows_per_block);
        router_weight_grad_kernel<<<blocks, ROUTER_GRAD_THREADS, 0, c.stream>>>(G.partial, G.d_logits, u, N, E, d,
                                                                                rows_per_block);
        CUDA_CHECK_LAUNCH();
        sum_partials(c.g(gate), G.partial, blocks, E * d, false, c.stream);
    }

    // Data parallel: the loads of every rank's tokens, in place of this rank's, for the bias update and for loads().
    template <typename T>
    void sum_loads(Comm& comm, MoeActs<T>& A, cudaStream_t s) const {
        comm.all_reduce_sum(A.counts, cfg.n_routed, s);
        loads_to_host(A, s);
    }

    // After the optimizer step: the bias b (FP32, in the master weights) moves by the loads of the last forward
    // pass (data parallel: every rank's).
    void update_bias(float* b, const int* counts, float rate, const int* skip, const float* grad_norm,
                     cudaStream_t s) const {
        bias_update_kernel<<<1, 256, 0, s>>>(b, counts, cfg.n_routed, rate, skip, grad_norm);
        CUDA_CHECK_LAUNCH();
    }
};
