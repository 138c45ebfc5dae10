// sampler.cuh: batched autoregressive sampling with MLA's latent KV cache (V2 §2.1.2-2.1.3, V3 §2.1.1), and
// speculative decoding with the MTP module's draft (V3 §5.4.3).
//
// Only c_kv (after its RMSNorm) and the rotated k_rope are cached: (d_c + d_rope) values per token and layer,
// shared by all heads, instead of H (d_nope + d_rope + d_v) for standard attention. At decode time the
// up-projections are absorbed (V2 §2.1.2): with W_kvb split per head into W_uk_i [d_nope, d_c] and
// W_uv_i [d_v, d_c],
//   score_ij = (W_uk_i^T q_nope_i) . c_kv_j + q_rope_i . k_rope_j      (q_abs_i = W_uk_i^T q_nope_i, one GEMM)
//   o_i      = W_uv_i (sum_j p_ij c_kv_j)                             (attention runs in the latent space)
// so no per-head key or value is ever materialized. This is why RoPE acts on a separate shared key k_rope (decoupled
// RoPE, V2 §2.1.3): a rotation R_j of position j between W_uk_i and c_kv_j would make q_i^T R_i^T R_j W_uk_i depend on
// j, and W_uk_i could no longer be folded into the query once for every position. k_rope is cached rotated.
//
// A decode step feeds R rows per sequence through the model: sequence s's row r sits at position pos[s] + r. A
// prompt goes through the same step, its tokens forced, so prefill and decode share one code path (prompts are
// short next to the answers). Each layer is the training model's decoder block (model.cuh), with this attention
// over the cache between its parts; its MoE layers run every expert on the step's few tokens (moe.cuh says why).
//
// Plain decoding: R = 1, one new token per step. Speculative decoding (R = 2): the MTP module has drafted the token
// after the current one, and one pass of the main model scores both positions (verification). The draft is kept if
// the main model agrees (greedy: it is the argmax; sampling: speculative sampling's rule, arXiv 2211.17192, so the
// tokens are distributed exactly as the main model's), and the second row then yields a bonus token: two tokens for
// one pass. Otherwise the first row's token replaces the draft and the second row's cache entry is written over in
// the next step. The MTP module then runs on the new hidden states and drafts the next token.
//
// Speculation pays while a step's time is bound by latency rather than by work: verification doubles the main
// model's rows and the MTP block adds a layer, so a speculative step costs about 1.4 plain steps for a few hundred
// sequences on an H200 and more as the batch grows (bench_sampler at T = 0.6: 1.29x at 256 sequences, 1.18x at 512,
// 0.97x at 1024, 0.80x at 8192). Batches larger than SPECULATIVE_SEQUENCES_PER_SM per SM decode plainly.
#pragma once

#include "model.cuh"

// The position of the step's row n (R rows a sequence), kept inside the cache for a finished sequence.
__device__ __forceinline__ int row_position(const int* pos, int n, int R, int max_len) {
    return min(pos[n / R] + n % R, max_len - 1);
}

// The step's input tokens: row 0 of a sequence is its token at pos; row 1 (speculative) the next prompt token, or the
// draft (-1: none yet, any token serves: its row is not used).
static __global__ void step_tokens_kernel(int* row_tokens, const int* seqs, const int* pos, const int* draft,
                                          const int* prompt_len, int S, int R, int max_len) {
    const int n = blockIdx.x * blockDim.x + threadIdx.x;
    if (n >= S * R) return;
    const int s = n / R, p = pos[s] + n % R;
    if (n % R == 0 || p < prompt_len[s])
        row_tokens[n] = seqs[long(s) * max_len + min(p, max_len - 1)];
    else
        row_tokens[n] = max(draft[s], 0);
}

// Writes c_kv and the rotated k_rope of each row into the caches [S, max_len, *] at the row's position.
template <typename T>
__global__ void latent_cache_append_kernel(T* cache_ckv, T* cache_kr, const T* ckv, const T* kva, int rows,
                                           const int* pos, int R, int max_len, int d_c, int d_rope, float theta) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x, width = d_c + d_rope / 2;
    if (idx >= rows * width) return;
    int n = idx / width, c = idx % width, p = row_position(pos, n, R, max_len);
    long slot = long(n / R) * max_len + p;
    if (c < d_c) {
        cache_ckv[slot * d_c + c] = ckv[long(n) * d_c + c];
    } else {
        int i = c - d_c;
        const T* kr = kva + long(n) * (d_c + d_rope) + d_c;
        float x0 = to_float(kr[2 * i]), x1 = to_float(kr[2 * i + 1]);
        rope_rotate(x0, x1, p, i, d_rope, theta, false);
        cache_kr[slot * d_rope + 2 * i] = from_float<T>(x0);
        cache_kr[slot * d_rope + 2 * i + 1] = from_float<T>(x1);
    }
}

// Absorbed attention of each row's query over its sequence's positions 0..(the row's), one block per row.
// ctx [rows, H, d_c] = sum_j p_ij c_kv_j. q_rope is rotated here.
template <typename T>
__global__ void latent_attention_decode_kernel(T* ctx, const T* q_abs, const T* q, const T* cache_ckv,
                                               const T* cache_kr, const int* pos, int R, int max_len, MlaDims m) {
    extern __shared__ float smem[];
    const int n = blockIdx.x, s = n / R, p = row_position(pos, n, R, max_len);
    int H = m.H, dc = m.d_c, dr = m.d_rope, L = p + 1;
    float* qa = smem;         // [H, d_c]
    float* qr = qa + H * dc;  // [H, d_rope], rotated
    float* pr = qr + H * dr;  // [H, L] scores, then probabilities
    int warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int i = threadIdx.x; i < H * dc; i += blockDim.x) qa[i] = to_float(q_abs[long(n) * H * dc + i]);
    for (int i = threadIdx.x; i < H * dr / 2; i += blockDim.x) {
        int h = i / (dr / 2), k = i % (dr / 2);
        const T* qh = q + long(n) * H * m.d_qk() + h * m.d_qk() + m.d_nope;
        float x0 = to_float(qh[2 * k]), x1 = to_float(qh[2 * k + 1]);
        rope_rotate(x0, x1, p, k, dr, m.rope_theta, false);
        qr[h * dr + 2 * k] = x0, qr[h * dr + 2 * k + 1] = x1;
    }
    __syncthreads();

    const T* ckv = cache_ckv + long(s) * max_len * dc;
    const T* kr = cache_kr + long(s) * max_len * dr;
    float scale = m.softmax_scale();
    for (int j = warp; j < L; j += warps)  // a warp per cached position: coalesced reads of its row
        for (int h = 0; h < H; h++) {
            float dot = 0.0f;
            for (int e = lane; e < dc; e += 32) dot += qa[h * dc + e] * to_float(ckv[long(j) * dc + e]);
            for (int e = lane; e < dr; e += 32) dot += qr[h * dr + e] * to_float(kr[long(j) * dr + e]);
            dot = warp_sum(dot);
            if (lane == 0) pr[h * L + j] = dot * scale;
        }
    __syncthreads();

    for (int h = warp; h < H; h += warps) {
        float mx = -INFINITY, sum = 0.0f;
        for (int j = lane; j < L; j += 32) mx = fmaxf(mx, pr[h * L + j]);
        mx = warp_max(mx);
        for (int j = lane; j < L; j += 32) sum += (pr[h * L + j] = expf(pr[h * L + j] - mx));
        float inv = 1.0f / warp_sum(sum);
        for (int j = lane; j < L; j += 32) pr[h * L + j] *= inv;
    }
    __syncthreads();

    for (int i = threadIdx.x; i < H * dc; i += blockDim.x) {
        int h = i / dc, e = i % dc;
        float acc = 0.0f;
        for (int j = 0; j < L; j++) acc += pr[h * L + j] * to_float(ckv[long(j) * dc + e]);
        ctx[long(n) * H * dc + i] = from_float<T>(acc);
    }
}

template <typename T>
void latent_cache_append(T* cache_ckv, T* cache_kr, const T* ckv, const T* kva, int rows, const int* pos, int R,
                         int max_len, int d_c, int d_rope, float theta, cudaStream_t stream) {
    const int n = rows * (d_c + d_rope / 2);
    latent_cache_append_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(cache_ckv, cache_kr, ckv, kva, rows, pos, R,
                                                                          max_len, d_c, d_rope, theta);
    CUDA_CHECK_LAUNCH();
}

// The decode kernel's shared memory: a row's absorbed query and rotated q_rope, and the scores of up to max_len
// positions, for every head. Beyond 48 KiB the kernel needs the opt-in attribute (set by the Sampler).
inline size_t latent_decode_smem(const MlaDims& m, int max_len) {
    return sizeof(float) * m.H * (m.d_c + m.d_rope + max_len);
}

// m.N() rows: m = model.mla_dims(rows, 1).
template <typename T>
void latent_attention_decode(T* ctx, const T* q_abs, const T* q, const T* cache_ckv, const T* cache_kr,
                             const int* pos, int R, int max_len, const MlaDims& m, cudaStream_t stream) {
    latent_attention_decode_kernel<<<m.N(), 128, latent_decode_smem(m, max_len), stream>>>(
        ctx, q_abs, q, cache_ckv, cache_kr, pos, R, max_len, m);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// Drawing tokens: a warp per row of logits, every lane ending with the same token
// ---------------------------------------------------------------------------------------------------------------

// The smallest logit among the top_k largest of a row: an element is in the top k when fewer than k elements are
// larger than it (ties at the boundary are all kept). O(V^2 / 32) per warp, nothing for a small vocabulary.
__device__ __forceinline__ float top_k_threshold(const float* row, int V, int top_k, int lane) {
    float threshold = INFINITY;
    for (int v = lane; v < V; v += 32) {
        int larger = 0;
        for (int u = 0; u < V; u++) larger += row[u] > row[v];
        if (larger < top_k) threshold = fminf(threshold, row[v]);
    }
    for (int offset = 16; offset > 0; offset >>= 1)
        threshold = fminf(threshold, __shfl_xor_sync(0xFFFFFFFFu, threshold, offset));
    return threshold;
}

// The token with the largest score(v) + Gumbel noise (none when greedy), the noise drawn from the counter RNG at
// (seed, stream, counter0 + v): the Gumbel-max trick, so the token is a sample of softmax(score). A score of -inf
// is never drawn (unless every one is: then token 0).
template <typename Score>
__device__ int gumbel_argmax(Score score, int V, bool greedy, uint64_t seed, uint64_t stream, uint64_t counter0,
                             int lane) {
    float best = -INFINITY;
    int best_v = 0;
    for (int v = lane; v < V; v += 32) {
        float x = score(v);
        if (x == -INFINITY) continue;
        if (!greedy) x -= logf(-logf(fmaxf(rng_uniform(seed, stream, counter0 + v), 1e-20f)));
        if (x > best || (x == best && v < best_v)) best = x, best_v = v;
    }
    warp_argmax(best, best_v);
    return best_v;
}

// softmax(logits / temperature) over the top_k logits of a row (0: all), as the sampler draws from it.
struct RowDistribution {
    const float* row;
    float threshold, inv_temperature, max, sum;

    __device__ RowDistribution(const float* r, int V, float temperature, int top_k, int lane)
        : row(r), threshold(top_k > 0 && top_k < V ? top_k_threshold(r, V, top_k, lane) : -INFINITY),
          inv_temperature(1.0f / temperature), max(-INFINITY), sum(0.0f) {
        for (int v = lane; v < V; v += 32)
            if (kept(v)) max = fmaxf(max, row[v] * inv_temperature);
        max = warp_max(max);
        for (int v = lane; v < V; v += 32)
            if (kept(v)) sum += expf(row[v] * inv_temperature - max);
        sum = warp_sum(sum);
    }
    __device__ bool kept(int v) const { return row[v] >= threshold; }
    __device__ float prob(int v) const { return kept(v) ? expf(row[v] * inv_temperature - max) / sum : 0.0f; }
};

// A token of a row: greedy (temperature 0) or a sample of softmax(logits / temperature) over the top k.
__device__ __forceinline__ int draw_token(const float* row, int V, float temperature, int top_k, uint64_t seed,
                                          uint64_t stream, uint64_t counter0, int lane) {
    if (temperature <= 0.0f)
        return gumbel_argmax([&](int v) { return row[v]; }, V, true, seed, stream, counter0, lane);
    const float threshold = top_k > 0 && top_k < V ? top_k_threshold(row, V, top_k, lane) : -INFINITY;
    return gumbel_argmax([&](int v) { return row[v] < threshold ? -INFINITY : row[v] / temperature; }, V, false,
                         seed, stream, counter0, lane);
}

// One token per sequence from logits [S, V], drawn with the counter RNG's stream pos[s], so that a (seed,
// position, sequence) always draws the same token.
static __global__ void sample_kernel(int* sampled, const float* logits, int S, int V, float temperature, int top_k,
                                     const uint64_t* seed, const int* pos) {
    int s = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S) return;
    int token = draw_token(logits + long(s) * V, V, temperature, top_k, *seed, uint64_t(pos[s]), uint64_t(s) * V, lane);
    if (lane == 0) sampled[s] = token;
}

// What ends a sequence, and how long its rows are.
struct StopRule {
    int stop_a, stop_b, max_new, max_len;
};

// Puts token at index i of sequence row seq (unless the prompt holds it there); returns whether it ends the sequence:
// a stop token, the max_new-th new token, or the last index of the row.
__device__ __forceinline__ bool emit_token(int* seq, int i, int token, int prompt_len, const StopRule& r) {
    if (i < prompt_len) return false;
    seq[i] = token;
    return token == r.stop_a || token == r.stop_b || i + 1 - prompt_len >= r.max_new || i + 1 >= r.max_len;
}

// Plain decoding: each unfinished sequence moves one position, to the prompt's next token or the sample.
static __global__ void advance_kernel(int* seqs, int* pos, int* done, const int* sampled, const int* prompt_len,
                                      int S, StopRule rule) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S || done[s]) return;
    if (emit_token(seqs + long(s) * rule.max_len, pos[s] + 1, sampled[s], prompt_len[s], rule)) done[s] = 1;
    pos[s]++;
}

// Streams of the counter RNG in a speculative step at position p: a token's draws never share numbers.
enum SpeculativeDraw { DRAW_DRAFT, DRAW_FIRST, DRAW_ACCEPT, DRAW_RESIDUAL, DRAW_BONUS, DRAWS };
__device__ __forceinline__ uint64_t draw_stream(int p, SpeculativeDraw d) { return uint64_t(p) * DRAWS + d; }

// Speculative decoding's verification, a warp per sequence, after the main model's pass over rows [S, 2]: the
// first new token (the prompt's, the kept draft, or its replacement), then, if row 1 saw the right token, the
// second (bonus). Leaves the tokens for the MTP pass (mtp_tokens [S, 2]: t_{p+1}, t_{p+2}) and which of its rows
// drafts next (draft_row). counts [S, 2]: each sequence's drafts verified and drafts kept.
static __global__ void verify_kernel(int* seqs, int* pos, int* done, int* mtp_tokens, int* draft_row, int* counts,
                                     const float* logits, const float* q_logits, const int* draft,
                                     const int* prompt_len, int S, int V, float temperature, int top_k,
                                     const uint64_t* seed, StopRule rule) {
    const int s = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S || done[s]) return;
    const int p = pos[s], plen = prompt_len[s], d = draft[s];
    const bool greedy = temperature <= 0.0f;
    int* seq = seqs + long(s) * rule.max_len;
    const float* row0 = logits + 2L * s * V;
    auto draw = [&](const float* row, SpeculativeDraw what) {
        return draw_token(row, V, temperature, top_k, *seed, draw_stream(p, what), uint64_t(s) * V, lane);
    };
    int first;
    bool row1_saw_it;  // row 1 was fed the token that now stands at p + 1
    if (p + 1 < plen) {
        first = seq[p + 1], row1_saw_it = true;
    } else if (d < 0) {
        first = draw(row0, DRAW_FIRST), row1_saw_it = false;
    } else if (greedy) {
        first = draw(row0, DRAW_FIRST), row1_saw_it = first == d;
    } else {
        // keep the draft with probability min(1, p(d) / q(d)); else draw from max(0, p - q), normalized
        const RowDistribution P(row0, V, temperature, top_k, lane);
        const RowDistribution Q(q_logits + long(s) * V, V, temperature, top_k, lane);
        row1_saw_it = rng_uniform(*seed, draw_stream(p, DRAW_ACCEPT), uint64_t(s)) * Q.prob(d) < P.prob(d);
        if (row1_saw_it) {
            first = d;
        } else {
            first = gumbel_argmax([&](int v) { return logf(fmaxf(P.prob(v) - Q.prob(v), 0.0f)); }, V, false, *seed,
                                  draw_stream(p, DRAW_RESIDUAL), uint64_t(s) * V, lane);
            if (!(P.prob(first) > Q.prob(first))) first = draw(row0, DRAW_RESIDUAL);  // p <= q everywhere: p itself
        }
    }
    if (p + 1 >= plen && d >= 0 && lane == 0) counts[2 * s]++, counts[2 * s + 1] += row1_saw_it;
    bool finished = emit_token(seq, p + 1, first, plen, rule);
    int second = 0, next = p + 1;
    if (row1_saw_it && !finished && p + 2 < rule.max_len) {
        second = p + 2 < plen ? seq[p + 2] : draw(row0 + V, DRAW_BONUS);
        finished = emit_token(seq, p + 2, second, plen, rule), next = p + 2;
    }
    if (lane != 0) return;
    pos[s] = next, done[s] = finished;
    mtp_tokens[2 * s] = first, mtp_tokens[2 * s + 1] = second;
    draft_row[s] = next - p - 1;
}

// After the MTP pass over rows [S, 2]: each sequence's draft of the token after its new position, from the row at
// the position before it (the MTP module at position j predicts t_{j+2}), and the draft's logits for the next
// verification. No draft (-1) where the next token is the prompt's or the sequence is done.
static __global__ void draft_kernel(int* draft, float* q_logits, const float* mtp_logits, const int* draft_row,
                                    const int* pos, const int* done, const int* prompt_len, int S, int V,
                                    float temperature, int top_k, const uint64_t* seed) {
    const int s = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S) return;
    const int p = pos[s];
    if (done[s] || p + 1 < prompt_len[s]) {
        if (lane == 0) draft[s] = -1;
        return;
    }
    const float* row = mtp_logits + (2L * s + draft_row[s]) * V;
    for (int v = lane; v < V; v += 32) q_logits[long(s) * V + v] = row[v];
    const int token =
        draw_token(row, V, temperature, top_k, *seed, draw_stream(p, DRAW_DRAFT), uint64_t(s) * V, lane);
    if (lane == 0) draft[s] = token;
}

struct SamplingOptions {
    float temperature = 1.0f;
    int top_k = 0;
    uint64_t seed = 0;
    int stop_a = -1, stop_b = -1;  // token ids that end a sequence (e.g. </answer> and <|eos|>)
    int max_new = 1 << 30;         // tokens generated per sequence at most
    bool speculative = true;       // draft with the model's MTP module, where it has one
    int speculative_max_batch = 0;  // the largest batch that drafts (0: SPECULATIVE_SEQUENCES_PER_SM per SM)

    bool operator==(const SamplingOptions& o) const {
        return temperature == o.temperature && top_k == o.top_k && stop_a == o.stop_a && stop_b == o.stop_b &&
               max_new == o.max_new && speculative == o.speculative &&
               speculative_max_batch == o.speculative_max_batch;  // the seed lives on the device
    }
};

constexpr int SPECULATIVE_SEQUENCES_PER_SM = 4;  // 528 sequences on an H200, below its crossover (above)

// Whether a batch of S sequences drafts, on a GPU of sm_count SMs, for a model that can draft.
inline bool speculates(int S, const SamplingOptions& opt, int sm_count) {
    const int limit = opt.speculative_max_batch > 0 ? opt.speculative_max_batch
                                                    : SPECULATIVE_SEQUENCES_PER_SM * sm_count;
    return opt.speculative && S <= limit;
}

// Drafts verified and drafts kept: the acceptance rate of speculative decoding.
struct DraftCounts {
    long drafted = 0, accepted = 0;
    double rate() const { return drafted ? double(accepted) / double(drafted) : 0.0; }
    DraftCounts& operator+=(const DraftCounts& o) { return drafted += o.drafted, accepted += o.accepted, *this; }
};

template <typename T>
struct Sampler {
    Model<T>& model;
    int max_S, max_len, max_rows;  // rows per sequence at most: 2 where the model can draft
    int sm_count;
    std::vector<T*> cache_ckv, cache_kr;  // per layer, then the MTP block: [max_S, max_len, d_c], [.., d_rope]
    BlockActs<T> block;                   // the decoder block's buffers for the step's rows; x_in is the residual
    T *q_abs, *ctx, *xf;
    float* logits;  // [S * R, V]
    int *seqs, *pos, *done, *sampled, *prompt_len, *row_tokens;
    int* counts;  // [S, 2]: DraftCounts since start()
    // speculative decoding (null for a model without an MTP module): the MTP pass's input and logits, the drafts
    // and their logits
    MtpInput<T> mtp_in{};
    float *mtp_logits = nullptr, *q_logits = nullptr;
    int *draft = nullptr, *draft_row = nullptr;
    uint64_t* seed;  // in device memory like the positions, so that a new seed needs no new graph
    DeviceArena arena;
    // A decode step is ~15 launches per layer: replaying them as one CUDA graph removes the launch overhead that
    // otherwise dominates a small model's decoding. The positions live in device memory so that one graph
    // serves every step.
    cudaStream_t stream;
    cudaGraphExec_t graph = nullptr;
    uint64_t seed_host = 0;  // the source of the seed's asynchronous copy must outlive it
    int graph_S = 0;
    SamplingOptions graph_opt;

    Sampler(Model<T>& m, int S, int len)
        : model(m), max_S(S), max_len(len), max_rows(m.mtp.empty() ? 1 : 2), sm_count(gpu_info().sms) {
        const Config& c = m.cfg;
        if (len > c.max_position_embeddings)
            throw std::invalid_argument("sampler length " + std::to_string(len) + " exceeds max_position_embeddings");
        const long H = c.num_attention_heads, dc = c.kv_lora_rank, d = c.hidden_size, rows = long(S) * max_rows;
        for (int l = 0; l < c.num_hidden_layers + (max_rows > 1 ? 1 : 0); l++) {
            cache_ckv.push_back(arena.take<T>(long(S) * len * dc));
            cache_kr.push_back(arena.take<T>(long(S) * len * c.qk_rope_head_dim));
        }
        block = m.allocate_block(arena, int(rows), true, c.first_k_dense_replace > 0, c.has_moe());
        q_abs = arena.take<T>(rows * H * dc), ctx = arena.take<T>(rows * H * dc), xf = arena.take<T>(rows * d);
        logits = arena.take<float>(rows * c.vocab_size);
        seqs = arena.take<int>(long(S) * len), pos = arena.take<int>(S), done = arena.take<int>(S);
        sampled = arena.take<int>(S), prompt_len = arena.take<int>(S), row_tokens = arena.take<int>(rows);
        seed = arena.take<uint64_t>(1), counts = arena.take<int>(2L * S);
        if (max_rows > 1) {
            mtp_in = m.allocate_mtp_input(arena, int(rows));
            mtp_logits = arena.take<float>(rows * c.vocab_size), q_logits = arena.take<float>(long(S) * c.vocab_size);
            draft = arena.take<int>(S), draft_row = arena.take<int>(S);
        }
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        size_t smem = latent_decode_smem(m.mla_dims(1, 1), len);
        if (smem > 48 * 1024)
            CUDA_CHECK(cudaFuncSetAttribute(latent_attention_decode_kernel<T>,
                                            cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
    }

    ~Sampler() {
        if (graph) cudaGraphExecDestroy(graph);
        cudaStreamDestroy(stream);
    }
    Sampler(const Sampler&) = delete;
    Sampler& operator=(const Sampler&) = delete;

    // Rows per sequence in a step of S sequences with these options: 2 when speculating.
    int rows_per_sequence(int S, const SamplingOptions& opt) const {
        return max_rows > 1 && speculates(S, opt, sm_count) ? 2 : 1;
    }

    // One block over the step's rows (R per sequence), with attention over this block's latent cache.
    void decode_block(Layer& L, T* ckv_cache, T* kr_cache, int rows, int R, const Ctx<T>& cx) {
        const Config& c = model.cfg;
        const int H = c.num_attention_heads, dc = c.kv_lora_rank, dn = c.qk_nope_head_dim, dqk = c.qk_head_dim();
        const int dv = c.v_head_dim;
        BlockActs<T>& A = block;
        model.attention_inputs(L, A, rows, cx);
        latent_cache_append(ckv_cache, kr_cache, A.ckv, A.kva, rows, pos, R, max_len, dc, c.qk_rope_head_dim,
                            c.rope_theta, stream);
        // q_abs_i = q_nope_i W_uk_i for every head i: one GEMM batched over heads
        const T* W_kvb = cx.w(L.attn.kv_b.weight);
        long w_head = long(dn + dv) * dc;
        matmul(model.blas, stream, q_abs, A.q, W_kvb,
               Matmul{rows, dc, dn, false, false, 1.0f, 0.0f, H, dqk, w_head, dc, H * dqk, dc, H * dc});
        latent_attention_decode(ctx, q_abs, A.q, ckv_cache, kr_cache, pos, R, max_len, model.mla_dims(rows, 1), stream);
        // o_i = ctx_i W_uv_i^T for every head i
        matmul(model.blas, stream, A.o, ctx, W_kvb + long(dn) * dc,
               Matmul{rows, dv, dc, false, true, 1.0f, 0.0f, H, dc, w_head, dv, H * dc, dc, H * dv});
        model.attention_output(L, A, rows, cx);
        model.ffn(L, A, A.x_in, rows, 1, cx, nullptr);
    }

    // The main model over the step's rows: their tokens in row_tokens -> logits [rows, V]; block.x_in keeps the last
    // hidden states.
    void step(int rows, int R) {
        const Config& c = model.cfg;
        const Ctx<T> cx = model.ctx(stream, true);
        embedding_forward(block.x_in, row_tokens, cx.w(model.embed), rows, c.hidden_size, stream);
        for (int l = 0; l < c.num_hidden_layers; l++)
            decode_block(model.layers[l], cache_ckv[l], cache_kr[l], rows, R, cx);
        model.head(logits, xf, block.rstd1, block.x_in, rows, cx, model.final_norm);
    }

    // The MTP module (the first) over rows [S, 2]: the main model's hidden states at positions p and p + 1 (in
    // block.x_in) with the embeddings of the tokens after them -> mtp_logits, as in training (model.cuh).
    void mtp_step(int S) {
        const Config& c = model.cfg;
        const Ctx<T> cx = model.ctx(stream, true);
        const int rows = 2 * S;
        MtpModule& M = model.mtp[0];
        model.mtp_input(M, mtp_in, block.x_in, block.x_in, rows, cx);
        decode_block(M.block, cache_ckv.back(), cache_kr.back(), rows, 2, cx);
        model.head(mtp_logits, xf, block.rstd1, block.x_in, rows, cx, M.head_norm);
    }

    // Loads prompts (each at least one token, shorter than max_len), resets the sequences, sets the sampling seed.
    void start(const std::vector<std::vector<int>>& prompts, uint64_t sampling_seed = 0) {
        int S = int(prompts.size());
        if (S < 1 || S > max_S)
            throw std::invalid_argument("sampler: between 1 and " + std::to_string(max_S) + " prompts");
        std::vector<int> host(size_t(S) * max_len, 0), lens(S);
        for (int s = 0; s < S; s++) {
            if (prompts[s].empty() || int(prompts[s].size()) >= max_len)
                throw std::invalid_argument("sampler: a prompt must hold 1 to " + std::to_string(max_len - 1) +
                                            " tokens");
            std::copy(prompts[s].begin(), prompts[s].end(), host.begin() + long(s) * max_len);
            lens[s] = int(prompts[s].size());
        }
        CUDA_CHECK(cudaStreamSynchronize(model.stream));  // the weights' last update, on the model's stream
        cudaStream_t st = stream;
        seed_host = sampling_seed;
        CUDA_CHECK(cudaMemcpyAsync(seqs, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(prompt_len, lens.data(), S * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(seed, &seed_host, sizeof(uint64_t), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemsetAsync(done, 0, S * sizeof(int), st));
        CUDA_CHECK(cudaMemsetAsync(pos, 0, S * sizeof(int), st));
        CUDA_CHECK(cudaMemsetAsync(counts, 0, 2 * S * sizeof(int), st));
        if (max_rows > 1) CUDA_CHECK(cudaMemsetAsync(draft, 0xFF, S * sizeof(int), st));  // -1: no draft yet
        CUDA_CHECK(cudaStreamSynchronize(st));  // the host vectors above are pageable and local
    }

    // A full decode step: the main model's pass, the new tokens of every unfinished sequence, and (speculative) the
    // MTP module's pass and its drafts.
    void decode(int S, const SamplingOptions& opt) {
        const int R = rows_per_sequence(S, opt), V = model.cfg.vocab_size, warp_blocks = ceil_div(S, WARPS_PER_BLOCK);
        const StopRule rule{opt.stop_a, opt.stop_b, opt.max_new, max_len};
        step_tokens_kernel<<<ceil_div(S * R, 128), 128, 0, stream>>>(row_tokens, seqs, pos, R > 1 ? draft : nullptr,
                                                                    prompt_len, S, R, max_len);
        CUDA_CHECK_LAUNCH();
        step(S * R, R);
        if (R == 1) {
            sample_kernel<<<warp_blocks, WARPS_PER_BLOCK * 32, 0, stream>>>(sampled, logits, S, V, opt.temperature,
                                                                          opt.top_k, seed, pos);
            CUDA_CHECK_LAUNCH();
            advance_kernel<<<ceil_div(S, 128), 128, 0, stream>>>(seqs, pos, done, sampled, prompt_len, S, rule);
            CUDA_CHECK_LAUNCH();
            return;
        }
        verify_kernel<<<warp_blocks, WARPS_PER_BLOCK * 32, 0, stream>>>(
            seqs, pos, done, mtp_in.tokens, draft_row, counts, logits, q_logits, draft, prompt_len, S, V,
            opt.temperature, opt.top_k, seed, rule);
        CUDA_CHECK_LAUNCH();
        mtp_step(S);
        draft_kernel<<<warp_blocks, WARPS_PER_BLOCK * 32, 0, stream>>>(draft, q_logits, mtp_logits, draft_row, pos,
                                                                      done, prompt_len, S, V, opt.temperature,
                                                                      opt.top_k, seed);
        CUDA_CHECK_LAUNCH();
    }

    // The decode step as a graph for S sequences and these options, captured on first use.
    void decode_graph(int S, const SamplingOptions& opt) {
        if (!graph || graph_S != S || !(graph_opt == opt)) {
            if (graph) CUDA_CHECK(cudaGraphExecDestroy(graph));
            cudaGraph_t captured;
            CUDA_CHECK(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
            decode(S, opt);
            CUDA_CHECK(cudaStreamEndCapture(stream, &captured));
            CUDA_CHECK(cudaGraphInstantiate(&graph, captured, 0));
            CUDA_CHECK(cudaGraphDestroy(captured));
            graph_S = S, graph_opt = opt;
        }
        CUDA_CHECK(cudaGraphLaunch(graph, stream));
    }

    // Sequence s as far as it is known (prompt and new tokens, up to its position), and whether it has finished.
    std::vector<int> sequence(int s, bool* finished) {
        int p = 0, is_done = 0;
        CUDA_CHECK(cudaMemcpyAsync(&p, pos + s, sizeof(int), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaMemcpyAsync(&is_done, done + s, sizeof(int), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<int> tokens(size_t(p) + 1);
        CUDA_CHECK(cudaMemcpyAsync(tokens.data(), seqs + long(s) * max_len, tokens.size() * sizeof(int),
                                   cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        *finished = is_done != 0;
        return tokens;
    }

    // Each of the S sequences' drafts since start().
    std::vector<DraftCounts> draft_counts(int S) {
        std::vector<int> h(2 * size_t(S));
        CUDA_CHECK(cudaMemcpyAsync(h.data(), counts, h.size() * sizeof(int), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        std::vector<DraftCounts> out(S);
        for (int s = 0; s < S; s++) out[s] = {h[2 * s], h[2 * s + 1]};
        return out;
    }

    // Samples every prompt until a stop token, max_new tokens or max_len tokens in all; returns the generated tokens
    // of each (stop token included).
    std::vector<std::vector<int>> generate(const std::vector<std::vector<int>>& prompts, const SamplingOptions& opt) {
        int S = int(prompts.size());
        start(prompts, opt.seed);
        cudaStream_t st = stream;
        std::vector<int> done_host(S);
        for (int step = 0; step + 1 < max_len; step++) {  // a step moves every unfinished sequence on
            if (step == 0)
                decode(S, opt);  // the first step plans the GEMMs outside the capture
            else
                decode_graph(S, opt);
            if (step % 16 == 15) {  // a host check now and then, not a sync per step
                CUDA_CHECK(cudaMemcpyAsync(done_host.data(), done, S * sizeof(int), cudaMemcpyDeviceToHost, st));
                CUDA_CHECK(cudaStreamSynchronize(st));
                if (std::all_of(done_host.begin(), done_host.end(), [](int x) { return x != 0; })) break;
            }
        }
        std::vector<int> host(size_t(S) * max_len);
        CUDA_CHECK(cudaMemcpyAsync(host.data(), seqs, host.size() * sizeof(int), cudaMemcpyDeviceToHost, st));
        CUDA_CHECK(cudaStreamSynchronize(st));
        std::vector<std::vector<int>> out(S);
        for (int s = 0; s < S; s++) {
            for (int t = int(prompts[s].size()); t < max_len && int(out[s].size()) < opt.max_new; t++) {
                int token = host[size_t(s) * max_len + t];
                out[s].push_back(token);
                if (token == opt.stop_a || token == opt.stop_b) break;
            }
        }
        return out;
    }
};
