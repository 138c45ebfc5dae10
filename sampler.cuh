// sampler.cuh: batched autoregressive sampling with MLA's latent KV cache (V2 §2.1.1-2.1.2, V3 §2.1.1).
//
// Only c_kv (after its RMSNorm) and the rotated k_rope are cached: (d_c + d_rope) values per token and layer,
// shared by all heads, instead of H (d_nope + d_rope + d_v) for standard attention. At decode time the
// up-projections are absorbed (V2 §2.1.2): with W_kvb split per head into W_uk_i [d_nope, d_c] and
// W_uv_i [d_v, d_c],
//   score_ij = (W_uk_i^T q_nope_i) . c_kv_j + q_rope_i . k_rope_j      (q_abs_i = W_uk_i^T q_nope_i, one GEMM)
//   o_i      = W_uv_i (sum_j p_ij c_kv_j)                             (attention runs in the latent space)
// so no per-head key or value is ever materialized.
//
// All sequences advance one position per step in lockstep. A prompt is fed through the same decode step, its
// tokens forced one by one, so prefill and decode share one code path (prompts are short next to the answers).
// Each layer is the training model's decoder block (model.cuh), with this attention over the cache between its
// parts; its MoE layers run every expert on the step's few tokens (moe.cuh says why).
#pragma once

#include "model.cuh"

// Writes c_kv and the rotated k_rope of position pos into the caches [S, max_len, *].
template <typename T>
__global__ void latent_cache_append_kernel(T* cache_ckv, T* cache_kr, const T* ckv, const T* kva, int S,
                                           const int* position, int max_len, int d_c, int d_rope, float theta) {
    int idx = blockIdx.x * blockDim.x + threadIdx.x, width = d_c + d_rope / 2, pos = *position;
    if (idx >= S * width) return;
    int s = idx / width, c = idx % width;
    long row = long(s) * max_len + pos;
    if (c < d_c) {
        cache_ckv[row * d_c + c] = ckv[long(s) * d_c + c];
    } else {
        int i = c - d_c;
        const T* kr = kva + long(s) * (d_c + d_rope) + d_c;
        float x0 = to_float(kr[2 * i]), x1 = to_float(kr[2 * i + 1]);
        rope_rotate(x0, x1, pos, i, d_rope, theta, false);
        cache_kr[row * d_rope + 2 * i] = from_float<T>(x0);
        cache_kr[row * d_rope + 2 * i + 1] = from_float<T>(x1);
    }
}

// Absorbed attention of one new query per sequence over positions 0..pos, one block per sequence (the cache of
// a sequence is read by all its heads). ctx [S, H, d_c] = sum_j p_ij c_kv_j. q_rope is rotated here.
template <typename T>
__global__ void latent_attention_decode_kernel(T* ctx, const T* q_abs, const T* q, const T* cache_ckv,
                                               const T* cache_kr, const int* position, int max_len, MlaDims m) {
    extern __shared__ float smem[];
    int pos = *position, H = m.H, dc = m.d_c, dr = m.d_rope, L = pos + 1;
    float* qa = smem;         // [H, d_c]
    float* qr = qa + H * dc;  // [H, d_rope], rotated
    float* p = qr + H * dr;   // [H, L] scores, then probabilities
    int s = blockIdx.x, warp = threadIdx.x / 32, lane = threadIdx.x % 32, warps = blockDim.x / 32;
    for (int i = threadIdx.x; i < H * dc; i += blockDim.x) qa[i] = to_float(q_abs[long(s) * H * dc + i]);
    for (int i = threadIdx.x; i < H * dr / 2; i += blockDim.x) {
        int h = i / (dr / 2), k = i % (dr / 2);
        const T* qh = q + long(s) * H * m.d_qk() + h * m.d_qk() + m.d_nope;
        float x0 = to_float(qh[2 * k]), x1 = to_float(qh[2 * k + 1]);
        rope_rotate(x0, x1, pos, k, dr, m.rope_theta, false);
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
            if (lane == 0) p[h * L + j] = dot * scale;
        }
    __syncthreads();

    for (int h = warp; h < H; h += warps) {
        float mx = -INFINITY, sum = 0.0f;
        for (int j = lane; j < L; j += 32) mx = fmaxf(mx, p[h * L + j]);
        mx = warp_max(mx);
        for (int j = lane; j < L; j += 32) sum += (p[h * L + j] = expf(p[h * L + j] - mx));
        float inv = 1.0f / warp_sum(sum);
        for (int j = lane; j < L; j += 32) p[h * L + j] *= inv;
    }
    __syncthreads();

    for (int i = threadIdx.x; i < H * dc; i += blockDim.x) {
        int h = i / dc, e = i % dc;
        float acc = 0.0f;
        for (int j = 0; j < L; j++) acc += p[h * L + j] * to_float(ckv[long(j) * dc + e]);
        ctx[long(s) * H * dc + i] = from_float<T>(acc);
    }
}

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

// One token per sequence from logits [S, V]: greedy when temperature is 0, else a sample of
// softmax(logits / temperature) restricted to the top_k logits (0: all), drawn by the Gumbel-max trick with the
// counter RNG, so a (seed, step, sequence) always draws the same token. One warp per sequence.
static __global__ void sample_kernel(int* sampled, const float* logits, int S, int V, float temperature, int top_k,
                                     const uint64_t* seed, const int* step) {
    int s = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (s >= S) return;
    const float* row = logits + long(s) * V;
    bool greedy = temperature <= 0.0f;
    float threshold = !greedy && top_k > 0 && top_k < V ? top_k_threshold(row, V, top_k, lane) : -INFINITY;
    float best = -INFINITY;
    int best_v = 0;  // a valid token even for a row of NaN or -inf logits
    for (int v = lane; v < V; v += 32) {
        if (row[v] < threshold) continue;
        float score = row[v];
        if (!greedy) {
            float u = rng_uniform(*seed, uint64_t(*step), uint64_t(s) * V + v);
            score = score / temperature - logf(-logf(fmaxf(u, 1e-20f)));
        }
        if (score > best || (score == best && v < best_v)) best = score, best_v = v;
    }
    warp_argmax(best, best_v);
    if (lane == 0) sampled[s] = best_v;
}

// After the step at position pos: the token at pos + 1 is the prompt's while the prompt lasts, else the sample
// (padding, id 0, once a sequence has finished). A sampled stop token, or the max_new-th token, finishes it.
static __global__ void advance_kernel(int* seqs, int* current, int* done, const int* sampled, const int* prompt_len,
                                      int S, const int* position, int max_len, int max_new, int stop_a, int stop_b) {
    int s = blockIdx.x * blockDim.x + threadIdx.x;
    if (s >= S) return;
    int next = *position + 1;
    int token;
    if (next < prompt_len[s]) {
        token = seqs[long(s) * max_len + next];
    } else {
        token = done[s] ? 0 : sampled[s];
        seqs[long(s) * max_len + next] = token;
        bool full = next + 1 - prompt_len[s] >= max_new;
        if (!done[s] && (token == stop_a || token == stop_b || full)) done[s] = 1;
    }
    current[s] = token;
}

static __global__ void next_position_kernel(int* position) { ++*position; }

struct SamplingOptions {
    float temperature = 1.0f;
    int top_k = 0;
    uint64_t seed = 0;
    int stop_a = -1, stop_b = -1;  // token ids that end a sequence (e.g. </answer> and <|eos|>)
    int max_new = 1 << 30;         // tokens generated per sequence at most
};

template <typename T>
struct Sampler {
    Model<T>& model;
    int max_S, max_len;
    std::vector<T*> cache_ckv, cache_kr;  // per layer: [max_S, max_len, d_c], [max_S, max_len, d_rope]
    BlockActs<T> block;                   // the decoder block's buffers for S tokens; block.x_in is the residual
    T *q_abs, *ctx, *xf;
    float* logits;
    int *seqs, *current, *done, *sampled, *prompt_len, *position;
    uint64_t* seed;  // in device memory like the position, so that a new seed needs no new graph
    DeviceArena arena;
    // A decode step is ~15 launches per layer: replaying them as one CUDA graph removes the launch overhead that
    // otherwise dominates a small model's decoding. The position lives in device memory so that one graph
    // serves every step.
    cudaStream_t stream;
    cudaGraphExec_t graph = nullptr;
    uint64_t seed_host = 0;  // the source of the seed's asynchronous copy must outlive it
    int graph_S = 0;
    SamplingOptions graph_opt;

    Sampler(Model<T>& m, int S, int len) : model(m), max_S(S), max_len(len) {
        const Config& c = m.cfg;
        if (len > c.max_position_embeddings)
            throw std::invalid_argument("sampler length " + std::to_string(len) + " exceeds max_position_embeddings");
        long H = c.num_attention_heads, dc = c.kv_lora_rank;
        for (int l = 0; l < c.num_hidden_layers; l++) {
            cache_ckv.push_back(arena.take<T>(long(S) * len * dc));
            cache_kr.push_back(arena.take<T>(long(S) * len * c.qk_rope_head_dim));
        }
        block = m.allocate_block(arena, S, true, c.first_k_dense_replace > 0, c.has_moe());
        q_abs = arena.take<T>(S * H * dc), ctx = arena.take<T>(S * H * dc), xf = arena.take<T>(S * c.hidden_size);
        logits = arena.take<float>(long(S) * c.vocab_size);
        seqs = arena.take<int>(long(S) * len), current = arena.take<int>(S), done = arena.take<int>(S),
        sampled = arena.take<int>(S);
        prompt_len = arena.take<int>(S), position = arena.take<int>(1), seed = arena.take<uint64_t>(1);
        CUDA_CHECK(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
        size_t smem = attention_smem(len);
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

    size_t attention_smem(int L) const {
        const Config& c = model.cfg;
        return sizeof(float) * c.num_attention_heads * (c.kv_lora_rank + c.qk_rope_head_dim + L);
    }

    // One decode step for S sequences at the position in device memory: their tokens in `current` -> logits [S, V].
    // Each layer is the training forward's block, with attention over the latent cache between its parts.
    void step(int S) {
        const Config& c = model.cfg;
        const Ctx<T> cx = model.ctx(stream, true);
        cudaStream_t st = stream;
        const int H = c.num_attention_heads, dc = c.kv_lora_rank, dn = c.qk_nope_head_dim, dqk = c.qk_head_dim();
        const int dv = c.v_head_dim;
        BlockActs<T>& A = block;
        embedding_forward(A.x_in, current, cx.w(model.embed), S, c.hidden_size, st);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            Layer& L = model.layers[l];
            model.attention_inputs(L, A, S, cx);
            int append_n = S * (dc + c.qk_rope_head_dim / 2);
            latent_cache_append_kernel<<<elementwise_blocks(append_n), 256, 0, st>>>(
                cache_ckv[l], cache_kr[l], A.ckv, A.kva, S, position, max_len, dc, c.qk_rope_head_dim, c.rope_theta);
            CUDA_CHECK_LAUNCH();
            // q_abs_i = q_nope_i W_uk_i for every head i: one GEMM batched over heads
            const T* W_kvb = cx.w(L.attn.kv_b.weight);
            long w_head = long(dn + dv) * dc;
            matmul(model.blas, st, q_abs, A.q, W_kvb,
                   Matmul{S, dc, dn, false, false, 1.0f, 0.0f, H, dqk, w_head, dc, H * dqk, dc, H * dc});
            latent_attention_decode_kernel<<<S, 128, attention_smem(max_len), st>>>(
                ctx, q_abs, A.q, cache_ckv[l], cache_kr[l], position, max_len, model.mla_dims(S, 1));
            CUDA_CHECK_LAUNCH();
            // o_i = ctx_i W_uv_i^T for every head i
            matmul(model.blas, st, A.o, ctx, W_kvb + long(dn) * dc,
                   Matmul{S, dv, dc, false, true, 1.0f, 0.0f, H, dc, w_head, dv, H * dc, dc, H * dv});
            model.attention_output(L, A, S, cx);
            model.ffn(l, A, A.x_in, S, 1, cx);
        }
        model.head(logits, xf, A.rstd1, A.x_in, S, cx);
    }

    // Loads prompts (each at least one token, shorter than max_len), resets the sequences, sets the sampling seed.
    void start(const std::vector<std::vector<int>>& prompts, uint64_t sampling_seed = 0) {
        int S = int(prompts.size());
        if (S < 1 || S > max_S)
            throw std::invalid_argument("sampler: between 1 and " + std::to_string(max_S) + " prompts");
        std::vector<int> host(size_t(S) * max_len, 0), lens(S), first(S);
        for (int s = 0; s < S; s++) {
            if (prompts[s].empty() || int(prompts[s].size()) >= max_len)
                throw std::invalid_argument("sampler: a prompt must hold 1 to " + std::to_string(max_len - 1) +
                                            " tokens");
            std::copy(prompts[s].begin(), prompts[s].end(), host.begin() + long(s) * max_len);
            lens[s] = int(prompts[s].size()), first[s] = prompts[s][0];
        }
        CUDA_CHECK(cudaStreamSynchronize(model.stream));  // the weights' last update, on the model's stream
        cudaStream_t st = stream;
        seed_host = sampling_seed;
        CUDA_CHECK(cudaMemcpyAsync(seqs, host.data(), host.size() * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(prompt_len, lens.data(), S * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(current, first.data(), S * sizeof(int), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemcpyAsync(seed, &seed_host, sizeof(uint64_t), cudaMemcpyHostToDevice, st));
        CUDA_CHECK(cudaMemsetAsync(done, 0, S * sizeof(int), st));
        CUDA_CHECK(cudaMemsetAsync(position, 0, sizeof(int), st));
        CUDA_CHECK(cudaStreamSynchronize(st));  // the host vectors above are pageable and local
    }

    // A full decode step: forward, sample, choose each next token, move to the next position.
    void decode(int S, const SamplingOptions& opt) {
        step(S);
        sample_kernel<<<ceil_div(S, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, stream>>>(
            sampled, logits, S, model.cfg.vocab_size, opt.temperature, opt.top_k, seed, position);
        CUDA_CHECK_LAUNCH();
        advance_kernel<<<ceil_div(S, 128), 128, 0, stream>>>(seqs, current, done, sampled, prompt_len, S, position,
                                                             max_len, opt.max_new, opt.stop_a, opt.stop_b);
        CUDA_CHECK_LAUNCH();
        next_position_kernel<<<1, 1, 0, stream>>>(position);
        CUDA_CHECK_LAUNCH();
    }

    // The decode step as a graph for S sequences and these options, captured on first use.
    void decode_graph(int S, const SamplingOptions& opt) {
        bool same = graph && graph_S == S && graph_opt.temperature == opt.temperature && graph_opt.top_k == opt.top_k &&
                    graph_opt.stop_a == opt.stop_a && graph_opt.stop_b == opt.stop_b &&
                    graph_opt.max_new == opt.max_new;
        if (!same) {
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

    // Samples every prompt until a stop token or max_len tokens in all; returns the generated tokens of each
    // (stop token included).
    std::vector<std::vector<int>> generate(const std::vector<std::vector<int>>& prompts, const SamplingOptions& opt) {
        int S = int(prompts.size());
        start(prompts, opt.seed);
        cudaStream_t st = stream;
        std::vector<int> done_host(S);
        for (int pos = 0; pos + 1 < max_len; pos++) {
            if (pos == 0)
                decode(S, opt);  // the first step plans the GEMMs outside the capture
            else
                decode_graph(S, opt);
            if (pos % 16 == 15) {  // a host check now and then, not a sync per token
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
