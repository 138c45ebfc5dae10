// model.cuh: the DeepSeek-V3-shaped transformer: config, parameters, the decoder block, forward, backward, AdamW.
//
//   tokens -> embedding -> L x [ RMSNorm -> MLA -> +residual -> RMSNorm -> FFN -> +residual ]
//          -> RMSNorm -> lm_head -> cross-entropy
//
// MLA (V3 §2.1.1) per layer, with the names of the Hugging Face checkpoint:
//   c_q  = RMSNorm(q_a_proj h)                       [N, q_lora_rank]            eq. 6
//   q    = q_b_proj c_q  -> per head [q_nope | q_rope] [N, H*(d_nope + d_rope)] eqs. 7-8
//   kv_a = kv_a_proj_with_mqa h -> [c_kv | k_rope]   [N, kv_lora_rank + d_rope]  eqs. 1, 3
//   kv_b = kv_b_proj RMSNorm(c_kv) -> per head [k_nope | v]                      eqs. 2, 5
//   o    = o_proj attention(q, k, v)                 [N, hidden]                eqs. 10-11
// The FFN slot holds a dense SwiGLU in the first first_k_dense_replace layers and DeepSeekMoE (moe.cuh) after.
//
// The decoder block is written once, in parts that training and the sampler's decode step (sampler.cuh) share:
// attention_inputs (the projections that attention reads), attention_output (o_proj into the residual stream) and
// ffn. Between the first two, training runs attention over whole sequences (kernels/attention.cuh), decoding over
// the latent cache.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <vector>

#include "fp8.cuh"
#include "kernels/attention.cuh"
#include "kernels/gemm.cuh"
#include "kernels/layers.cuh"
#include "kernels/params.h"
#include "moe.cuh"

// transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps, whatever rms_norm_eps says.
constexpr float LATENT_NORM_EPS = 1e-6f;

enum class Bound { Positive, NonNegative };

// Field names follow transformers' DeepseekV3Config, so config.json is read and written without renaming.
struct Config {
    int vocab_size = 128;
    int hidden_size = 384;
    int intermediate_size = 1024;
    int num_hidden_layers = 8;
    int num_attention_heads = 6;
    int q_lora_rank = 256;
    int kv_lora_rank = 128;
    int qk_nope_head_dim = 64;
    int qk_rope_head_dim = 32;
    int v_head_dim = 64;
    int max_position_embeddings = 512;
    float rms_norm_eps = 1e-6f;
    float rope_theta = 10000.0f;
    float initializer_range = 0.02f;
    // DeepSeekMoE in the layers from first_k_dense_replace on (num_hidden_layers: a dense model)
    int first_k_dense_replace = 1;
    int n_routed_experts = 16;
    int n_shared_experts = 1;
    int num_experts_per_tok = 4;
    int n_group = 4;
    int topk_group = 2;
    int moe_intermediate_size = 256;
    float routed_scaling_factor = 2.5f;
    bool norm_topk_prob = true;

    // The one list of the fields: config.json is read, written and checked through it.
    template <typename Self, typename Visit>
    static void each_field(Self& c, Visit&& visit) {
        visit("vocab_size", c.vocab_size, Bound::Positive);
        visit("hidden_size", c.hidden_size, Bound::Positive);
        visit("intermediate_size", c.intermediate_size, Bound::Positive);
        visit("num_hidden_layers", c.num_hidden_layers, Bound::Positive);
        visit("num_attention_heads", c.num_attention_heads, Bound::Positive);
        visit("q_lora_rank", c.q_lora_rank, Bound::Positive);
        visit("kv_lora_rank", c.kv_lora_rank, Bound::Positive);
        visit("qk_nope_head_dim", c.qk_nope_head_dim, Bound::Positive);
        visit("qk_rope_head_dim", c.qk_rope_head_dim, Bound::Positive);
        visit("v_head_dim", c.v_head_dim, Bound::Positive);
        visit("max_position_embeddings", c.max_position_embeddings, Bound::Positive);
        visit("rms_norm_eps", c.rms_norm_eps, Bound::Positive);
        visit("rope_theta", c.rope_theta, Bound::Positive);
        visit("initializer_range", c.initializer_range, Bound::NonNegative);
        visit("first_k_dense_replace", c.first_k_dense_replace, Bound::NonNegative);
        visit("n_routed_experts", c.n_routed_experts, Bound::Positive);
        visit("n_shared_experts", c.n_shared_experts, Bound::Positive);
        visit("num_experts_per_tok", c.num_experts_per_tok, Bound::Positive);
        visit("n_group", c.n_group, Bound::Positive);
        visit("topk_group", c.topk_group, Bound::Positive);
        visit("moe_intermediate_size", c.moe_intermediate_size, Bound::Positive);
        visit("routed_scaling_factor", c.routed_scaling_factor, Bound::Positive);
        visit("norm_topk_prob", c.norm_topk_prob, Bound::NonNegative);
    }
    template <typename Visit>
    void fields(Visit&& visit) {
        each_field(*this, visit);
    }
    template <typename Visit>
    void fields(Visit&& visit) const {
        each_field(*this, visit);
    }

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }
    bool is_moe(int layer) const { return layer >= first_k_dense_replace; }
    bool has_moe() const { return first_k_dense_replace < num_hidden_layers; }
    MoeConfig moe() const {
        return {n_routed_experts, n_shared_experts,    num_experts_per_tok,  n_group,
                topk_group,       moe_intermediate_size, routed_scaling_factor, norm_topk_prob};
    }

    // Throws std::invalid_argument naming the first field that cannot work.
    void validate() const {
        fields([](const char* name, const auto& value, Bound bound) {
            using V = std::decay_t<decltype(value)>;
            if constexpr (!std::is_same_v<V, bool>) {
                bool ok = bound == Bound::Positive ? value > 0 : value >= 0;
                if constexpr (std::is_floating_point_v<V>) ok = ok && std::isfinite(value);
                if (!ok)
                    throw std::invalid_argument(std::string("invalid model config: ") + name + " must be " +
                                                (bound == Bound::Positive ? "positive" : "non-negative") +
                                                (std::is_floating_point_v<V> ? " and finite" : ""));
            }
        });
        auto require = [](bool ok, const char* what) {
            if (!ok) throw std::invalid_argument(std::string("invalid model config: ") + what);
        };
        require(qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even (RoPE rotates pairs)");
        if (!has_moe()) return;
        const int group_size = n_routed_experts / n_group;
        require(hidden_size % 8 == 0, "hidden_size must be a multiple of 8 in a model with MoE layers (the experts' "
                                      "rows move 16 bytes at a time)");
        require(n_routed_experts <= MOE_MAX_EXPERTS, "n_routed_experts must be at most 256");
        require(n_group <= MOE_MAX_GROUPS && n_routed_experts % n_group == 0,
                "n_routed_experts must split into n_group (at most 32) groups of equal size");
        require(n_group == 1 || group_size >= 2, "a group is scored by its two best experts: groups need two");
        require(topk_group <= n_group, "topk_group must not exceed n_group");
        require(num_experts_per_tok <= MOE_MAX_TOP_K && num_experts_per_tok <= topk_group * group_size,
                "num_experts_per_tok must be at most 16 and fit in topk_group groups");
    }
};

// ---------------------------------------------------------------------------------------------------------------
// The parameters, module by module
// ---------------------------------------------------------------------------------------------------------------

// MLA's parameters in one layer.
struct Mla {
    int input_norm = -1, q_a_norm = -1, kv_a_norm = -1;
    Linear q_a, q_b, kv_a, kv_b, o;
};

struct Layer {
    Mla attn;
    int post_norm = -1;
    bool moe = false;
    SwiGlu mlp;  // the FFN of a dense layer
    Moe routed;  // the FFN of a MoE layer
};

// Every module's tensors in one parameter layout, as the modules declare them; no device memory. The declaration
// order puts a dense layer's matrices and norm weights where they have always been, so older checkpoints and runs
// keep their meaning. max_tokens: the most tokens a forward pass takes (sizes the FP8 buffers).
struct Architecture {
    ParamLayout layout;
    int embed = -1, lm_head = -1, final_norm = -1;
    std::vector<Layer> layers;

    Architecture(const Config& c, int max_tokens) {
        c.validate();
        const int d = c.hidden_size, H = c.num_attention_heads, N = max_tokens;
        embed = layout.matrix("model.embed_tokens.weight", c.vocab_size, d);
        layers.resize(c.num_hidden_layers);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            const std::string p = "model.layers." + std::to_string(l) + ".";
            Layer& L = layers[l];
            Mla& a = L.attn;
            a.input_norm = layout.norm(p + "input_layernorm.weight", d);
            a.q_a = Linear::declare(layout, p + "self_attn.q_a_proj.weight", c.q_lora_rank, d, N);
            a.q_a_norm = layout.norm(p + "self_attn.q_a_layernorm.weight", c.q_lora_rank);
            a.q_b = Linear::declare(layout, p + "self_attn.q_b_proj.weight", H * c.qk_head_dim(), c.q_lora_rank, N);
            a.kv_a = Linear::declare(layout, p + "self_attn.kv_a_proj_with_mqa.weight",
                                     c.kv_lora_rank + c.qk_rope_head_dim, d, N);
            a.kv_a_norm = layout.norm(p + "self_attn.kv_a_layernorm.weight", c.kv_lora_rank);
            a.kv_b = Linear::declare(layout, p + "self_attn.kv_b_proj.weight", H * (c.qk_nope_head_dim + c.v_head_dim),
                                     c.kv_lora_rank, N);
            a.o = Linear::declare(layout, p + "self_attn.o_proj.weight", d, H * c.v_head_dim, N, Init::ResidualNormal);
            L.post_norm = layout.norm(p + "post_attention_layernorm.weight", d);
            L.moe = c.is_moe(l);
            if (L.moe)
                L.routed = Moe::declare(layout, p + "mlp.", c.moe(), d, N);
            else
                L.mlp = SwiGlu::declare(layout, {p + "mlp."}, d, c.intermediate_size, N);
        }
        lm_head = layout.matrix("lm_head.weight", c.vocab_size, d);
        final_norm = layout.norm("model.norm.weight", d);
        layout.finalize();
    }

    // Every projection that runs through Linear (and so in FP8 in FP8 training).
    std::vector<Linear*> linears() {
        std::vector<Linear*> out;
        for (Layer& L : layers) {
            for (Linear* l : {&L.attn.q_a, &L.attn.q_b, &L.attn.kv_a, &L.attn.kv_b, &L.attn.o}) out.push_back(l);
            for (SwiGlu* f : L.moe ? std::vector<SwiGlu*>{&L.routed.shared, &L.routed.experts}
                                   : std::vector<SwiGlu*>{&L.mlp})
                out.push_back(&f->gate_up), out.push_back(&f->down);
        }
        return out;
    }

    // Parameters that take part in a GEMM (all but the embedding and the norms), and of those the ones an average
    // token uses (a routed expert counts num_experts_per_tok / n_routed_experts of its size).
    double matmul_params(bool active_only) const {
        double n = 0;
        for (size_t t = 0; t < layout.tensors.size(); t++) {
            const ParamTensor& p = layout.tensors[t];
            if (p.shape.size() == 2 && int(t) != embed) n += double(p.numel()) * (active_only ? p.active : 1.0);
        }
        return n;
    }
};

// Model FLOPs per token of a training step (forward + backward = 3x forward, 2 FLOPs per multiply-add): every
// projection a token passes through, plus attention scores and values over a full context of T (the usual
// convention).
inline double train_flops_per_token(const Config& c, int T) {
    double attn = 2.0 * T * c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim) * c.num_hidden_layers;
    return 3.0 * (2.0 * Architecture(c, 0).matmul_params(true) + attn);
}

static __global__ void init_normal_kernel(float* w, long n, float stddev, uint64_t seed, uint64_t stream) {
    long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) w[i] = stddev * rng_normal(seed, stream, uint64_t(i));
}

static __global__ void fill_kernel(float* w, long n, float value) {
    long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) w[i] = value;
}

template <typename T>
__global__ void convert_kernel(T* out, const float* in, long n) {
    long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) out[i] = from_float<T>(in[i]);
}

// Targets that count: a negative one marks a position without loss (padding, a prompt token).
inline long count_targets(const std::vector<int>& targets) {
    return std::count_if(targets.begin(), targets.end(), [](int t) { return t >= 0; });
}

// Rows [B, T+1] of a token stream -> inputs [B, T] (the first T ids of each row) and targets (the last T).
inline void split_rows(const std::vector<int>& rows, int B, int T, std::vector<int>& inputs,
                       std::vector<int>& targets) {
    inputs.resize(size_t(B) * T), targets.resize(size_t(B) * T);
    for (int b = 0; b < B; b++)
        for (int t = 0; t < T; t++) {
            inputs[size_t(b) * T + t] = rows[size_t(b) * (T + 1) + t];
            targets[size_t(b) * T + t] = rows[size_t(b) * (T + 1) + t + 1];
        }
}

// One decoder block's activations for N tokens. Training keeps one set per layer for the backward pass; the decode
// step reuses one set, with x_in = x_mid (the residual stream updated in place) and no kv_b or attention saves.
template <typename T>
struct BlockActs {
    T *x_in, *h1, *cq_pre, *cq, *q, *kva, *ckv, *kvb, *o, *x_mid, *h2;
    float *rstd1, *rstd_q, *rstd_kv, *rstd2;
    MlaSaved<T> mla;
    SwiGluActs<T> mlp;
    MoeActs<T> moe;
};

// What a training step reports: the sum of the token losses, the gradient norm, the balance loss (all MoE layers).
struct StepScalars {
    float loss_sum, grad_norm, balance_loss;
};

// T is the storage type of weights and activations: float (precision fp32) or bf16 (precision bf16). Master
// weights and gradients are FP32 in both; the Adam moments are BF16.
template <typename T>
struct Model : Architecture {
    Config cfg;
    int max_B, max_T;
    Blas blas;
    cudaStream_t stream = 0;
    Balancing balancing;  // of the MoE layers' experts

    DeviceBuffer<float> master, grads;
    DeviceBuffer<T> weight_copy;  // the T copy of the master weights (unused for T = float)
    T* weights;
    DeviceBuffer<bf16> adam_m, adam_v;

    std::vector<BlockActs<T>> acts;
    T *x_final, *xf;  // residual stream after the last layer, and its RMSNorm
    // scalars: [0] loss sum, [1] squared gradient norm, [2] balance loss; balance_losses: one per layer
    float *rstd_final, *logits, *losses, *scalars, *balance_losses;
    MlaScratch<T> mla_scratch;
    T *d_resid, *d_h, *d_o, *d_q, *d_cq, *d_cq_pre, *d_kva, *d_ckv, *d_kvb, *d_logits;
    SwiGluActs<T> d_mlp;
    MoeGrads<T> d_moe;
    float* norm_scratch;
    float* reduce_scratch;
    int *tokens_buf, *targets_buf;
    int last_tokens = 0;  // of the last forward pass: the expert loads are its
    DeviceArena arena;
    std::unique_ptr<Fp8Scratch> fp8;  // set by enable_fp8: the projections' GEMMs in FP8

    Model(const Config& c, int B, int T_) : Architecture(c, B * T_), cfg(c), max_B(B), max_T(T_) {
        if (T_ > cfg.max_position_embeddings)
            throw std::invalid_argument("sequence length " + std::to_string(T_) + " exceeds max_position_embeddings " +
                                        std::to_string(cfg.max_position_embeddings));
        master.resize(layout.total);
        grads.resize(layout.trained);
        adam_m.resize(layout.trained);
        adam_v.resize(layout.trained);
        if constexpr (std::is_same_v<T, float>) {
            weights = master.data();
        } else {
            weight_copy.resize(layout.total);
            weights = weight_copy.data();
        }
        allocate_activations();
    }

    long num_params() const { return layout.total; }

    // What this model's modules need for a pass on `stream` (the sampler decodes on its own).
    Ctx<T> ctx(cudaStream_t s, bool decoding) {
        return {blas, s, layout, master.data(), weights, grads.data(), decoding ? nullptr : fp8.get(), decoding};
    }

    // Buffers of one block for N tokens: for training (a layer's, kept for its backward pass) or for decoding; with
    // the buffers of a dense FFN, of a MoE layer, or both (the decode step runs every layer on one set).
    BlockActs<T> allocate_block(DeviceArena& arena, int N, bool decoding, bool dense, bool moe) {
        const Config& c = cfg;
        const long n = N, d = c.hidden_size, H = c.num_attention_heads, q_w = H * c.qk_head_dim();
        const long kva_w = c.kv_lora_rank + c.qk_rope_head_dim, o_w = H * c.v_head_dim;
        BlockActs<T> A{};
        A.x_in = arena.take<T>(n * d), A.h1 = arena.take<T>(n * d), A.cq_pre = arena.take<T>(n * c.q_lora_rank);
        A.cq = arena.take<T>(n * c.q_lora_rank), A.q = arena.take<T>(n * q_w), A.kva = arena.take<T>(n * kva_w);
        A.ckv = arena.take<T>(n * c.kv_lora_rank), A.o = arena.take<T>(n * o_w);
        A.rstd1 = arena.take<float>(n);
        if (decoding) {
            A.x_mid = A.x_in, A.h2 = A.h1, A.rstd_q = A.rstd_kv = A.rstd2 = A.rstd1;
        } else {
            A.kvb = arena.take<T>(n * H * (c.qk_nope_head_dim + c.v_head_dim));
            A.x_mid = arena.take<T>(n * d), A.h2 = arena.take<T>(n * d);
            A.rstd_q = arena.take<float>(n), A.rstd_kv = arena.take<float>(n), A.rstd2 = arena.take<float>(n);
            const long tt = long(max_B) * H * max_T * max_T;
            A.mla = {arena.take<T>(n * q_w), arena.take<T>(n * q_w), arena.take<T>(n * o_w), arena.take<T>(tt)};
        }
        if (dense) A.mlp = layers[0].mlp.template allocate<T>(arena, n);
        if (moe) A.moe = layers[c.first_k_dense_replace].routed.template allocate<T>(arena, N, decoding);
        return A;
    }

    void allocate_activations() {
        const Config& c = cfg;
        const long N = long(max_B) * max_T, d = c.hidden_size, H = c.num_attention_heads;
        const long q_w = H * c.qk_head_dim(), kva_w = c.kv_lora_rank + c.qk_rope_head_dim, o_w = H * c.v_head_dim;
        const long kvb_w = H * (c.qk_nope_head_dim + c.v_head_dim), tt = long(max_B) * H * max_T * max_T;
        for (int l = 0; l < c.num_hidden_layers; l++)
            acts.push_back(allocate_block(arena, int(N), false, !c.is_moe(l), c.is_moe(l)));
        x_final = arena.take<T>(N * d), xf = arena.take<T>(N * d), rstd_final = arena.take<float>(N);
        logits = arena.take<float>(N * c.vocab_size), losses = arena.take<float>(N), scalars = arena.take<float>(3);
        balance_losses = arena.take<float>(c.num_hidden_layers);
        CUDA_CHECK(cudaMemset(balance_losses, 0, sizeof(float) * c.num_hidden_layers));
        CUDA_CHECK(cudaMemset(scalars, 0, sizeof(float) * 3));
        mla_scratch = {arena.take<float>(tt),  arena.take<T>(N * o_w), arena.take<T>(tt),
                       arena.take<T>(N * q_w), arena.take<T>(N * q_w), arena.take<T>(N * o_w)};
        long widest = std::max({d, long(c.q_lora_rank), long(c.kv_lora_rank)});
        d_resid = arena.take<T>(N * d), d_h = arena.take<T>(N * d);
        d_o = arena.take<T>(N * o_w), d_q = arena.take<T>(N * q_w), d_cq = arena.take<T>(N * c.q_lora_rank);
        d_cq_pre = arena.take<T>(N * c.q_lora_rank), d_kva = arena.take<T>(N * kva_w);
        d_ckv = arena.take<T>(N * c.kv_lora_rank), d_kvb = arena.take<T>(N * kvb_w);
        d_logits = arena.take<T>(N * c.vocab_size);
        if (c.first_k_dense_replace > 0) d_mlp = layers[0].mlp.template allocate<T>(arena, N);
        if (c.has_moe()) d_moe = layers[c.first_k_dense_replace].routed.template allocate_grads<T>(arena, int(N));
        norm_scratch = arena.take<float>(partial_scratch_size(int(N), int(widest)));
        reduce_scratch = arena.take<float>(REDUCE_BLOCKS);
        tokens_buf = arena.take<int>(N), targets_buf = arena.take<int>(N);
    }

    // ----- parameters -----------------------------------------------------------------------------------------

    // Each tensor as the layout says: Normal(0, initializer_range) matrices, the projections into the residual
    // stream (o_proj, down_proj) scaled by 1/sqrt(2L) so the residual's variance does not grow with depth; norm
    // weights 1; buffers (the router bias) 0.
    void init_weights(uint64_t seed) {
        float std = cfg.initializer_range, residual_std = std / sqrtf(2.0f * cfg.num_hidden_layers);
        for (const ParamTensor& t : layout.tensors) {
            float* w = master.data() + t.offset;
            long n = t.numel();
            if (t.init == Init::Ones || t.init == Init::Zeros)
                fill_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(w, n, t.init == Init::Ones ? 1.0f : 0.0f);
            else
                init_normal_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(
                    w, n, t.init == Init::ResidualNormal ? residual_std : std, seed, t.position);
            CUDA_CHECK_LAUNCH();
        }
        reset_optimizer();
        refresh_weights();
    }

    // Zero Adam moments: a new optimizer, for fresh weights or a new stage on loaded ones.
    void reset_optimizer() {
        CUDA_CHECK(cudaMemsetAsync(adam_m.data(), 0, adam_m.bytes(), stream));
        CUDA_CHECK(cudaMemsetAsync(adam_v.data(), 0, adam_v.bytes(), stream));
    }

    // After the master weights change (init, load): the working copy in T, and the FP8 weights.
    void refresh_weights() {
        if constexpr (!std::is_same_v<T, float>) {
            convert_kernel<<<elementwise_blocks(layout.total), 256, 0, stream>>>(weights, master.data(), layout.total);
            CUDA_CHECK_LAUNCH();
        }
        refresh_fp8_weights();
    }

    // From now on the projections' three GEMMs each run in FP8 (V3 §3.3), through our kernel or cuBLASLt; the
    // embedding, the output head, attention, the router and the norms keep their precision.
    void enable_fp8(Fp8Backend backend) {
        fp8 = ::enable_fp8(backend, linears());
        refresh_fp8_weights();
    }

    void refresh_fp8_weights() {
        if (!fp8) return;
        for (Linear* l : linears())
            l->w8->refresh(master.data() + layout.offset(l->weight), fp8->weights_nonfinite.data(), stream);
    }

    // Whether an FP8 quantization met a NaN or Inf since the last call, so that the optimizer steps since then left
    // the weights as they were; clears the flag.
    bool step_skipped() {
        if (!fp8) return false;
        int flag = 0;
        CUDA_CHECK(cudaMemcpyAsync(&flag, fp8->nonfinite.data(), sizeof(int), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaMemsetAsync(fp8->nonfinite.data(), 0, sizeof(int), stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        return flag != 0;
    }

    // ----- the decoder block, shared with the sampler's decode step -------------------------------------------

    // h1 = RMSNorm(x_in); c_q = RMSNorm(W_dq h1), q = W_uq c_q; kv_a = W_dkv_kr h1 = [c_kv | k_rope], c_kv normed.
    void attention_inputs(Layer& L, BlockActs<T>& A, int N, const Ctx<T>& c) {
        const int d = cfg.hidden_size, qr = cfg.q_lora_rank, dc = cfg.kv_lora_rank, kva_w = dc + cfg.qk_rope_head_dim;
        const RowGroups rows = RowGroups::all(N);
        rmsnorm_forward(A.h1, A.rstd1, A.x_in, d, c.w(L.attn.input_norm), N, d, cfg.rms_norm_eps, c.stream);
        L.attn.q_a.forward(c, A.cq_pre, A.h1, rows);
        rmsnorm_forward(A.cq, A.rstd_q, A.cq_pre, qr, c.w(L.attn.q_a_norm), N, qr, LATENT_NORM_EPS, c.stream);
        L.attn.q_b.forward(c, A.q, A.cq, rows);
        L.attn.kv_a.forward(c, A.kva, A.h1, rows);
        rmsnorm_forward(A.ckv, A.rstd_kv, A.kva, kva_w, c.w(L.attn.kv_a_norm), N, dc, LATENT_NORM_EPS, c.stream);
    }

    // x_mid = x_in + W_o o (eq. 11), o the attention's output.
    void attention_output(Layer& L, BlockActs<T>& A, int N, const Ctx<T>& c) {
        if (A.x_mid != A.x_in)
            CUDA_CHECK(cudaMemcpyAsync(A.x_mid, A.x_in, sizeof(T) * N * cfg.hidden_size, cudaMemcpyDeviceToDevice,
                                       c.stream));
        L.attn.o.forward(c, A.x_mid, A.o, RowGroups::all(N), true);
    }

    // x_out = x_mid + FFN(RMSNorm(x_mid)) for N tokens in sequences of seq_len: the dense SwiGLU or DeepSeekMoE.
    void ffn(int l, BlockActs<T>& A, T* x_out, int N, int seq_len, const Ctx<T>& c) {
        Layer& L = layers[l];
        const int d = cfg.hidden_size;
        rmsnorm_forward(A.h2, A.rstd2, A.x_mid, d, c.w(L.post_norm), N, d, cfg.rms_norm_eps, c.stream);
        if (x_out != A.x_mid)
            CUDA_CHECK(cudaMemcpyAsync(x_out, A.x_mid, sizeof(T) * N * d, cudaMemcpyDeviceToDevice, c.stream));
        if (L.moe)
            L.routed.forward(c, A.moe, x_out, A.h2, N, seq_len, balancing, balance_losses + l);
        else
            L.mlp.forward(c, x_out, A.h2, A.mlp, RowGroups::all(N), true);
    }

    // logits [N, V] (FP32) = lm_head RMSNorm(x).
    void head(float* out, T* x_normed, float* rstd, const T* x, int N, const Ctx<T>& c) {
        const int d = cfg.hidden_size;
        rmsnorm_forward(x_normed, rstd, x, d, c.w(final_norm), N, d, cfg.rms_norm_eps, c.stream);
        matmul(blas, c.stream, out, x_normed, c.w(lm_head), Matmul{N, cfg.vocab_size, d, false, true});
    }

    // ----- forward ----------------------------------------------------------------------------------------------

    MlaDims mla_dims(int B, int T_) const {
        return {B,
                T_,
                cfg.num_attention_heads,
                cfg.qk_nope_head_dim,
                cfg.qk_rope_head_dim,
                cfg.kv_lora_rank,
                cfg.v_head_dim,
                cfg.rope_theta};
    }

    void check_shape(int B, int T_) const {
        if (B < 1 || B > max_B || T_ < 1 || T_ > max_T)
            throw std::invalid_argument("batch " + std::to_string(B) + "x" + std::to_string(T_) +
                                        " exceeds the model's buffers " + std::to_string(max_B) + "x" +
                                        std::to_string(max_T));
    }

    // logits [B*T, V] (FP32) for tokens [B, T] (host, row-major); the balance loss of the MoE layers in scalars[2].
    void forward(const std::vector<int>& tokens, int B, int T_) {
        check_shape(B, T_);
        if (long(tokens.size()) != long(B) * T_) throw std::invalid_argument("forward: tokens do not fill B x T");
        const Config& c = cfg;
        int N = B * T_, d = c.hidden_size;
        last_tokens = N;
        Ctx<T> cx = ctx(stream, false);
        CUDA_CHECK(cudaMemcpyAsync(tokens_buf, tokens.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
        embedding_forward(acts[0].x_in, tokens_buf, cx.w(embed), N, d, stream);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            T* x_out = l + 1 < c.num_hidden_layers ? acts[l + 1].x_in : x_final;
            layer_forward(l, x_out, B, T_, cx);
        }
        head(logits, xf, rstd_final, x_final, N, cx);
        final_sum_kernel<<<1, REDUCE_THREADS, 0, stream>>>(scalars + 2, balance_losses, c.num_hidden_layers);
        CUDA_CHECK_LAUNCH();
    }

    void layer_forward(int l, T* x_out, int B, int T_, const Ctx<T>& c) {
        Layer& L = layers[l];
        BlockActs<T>& A = acts[l];
        const int N = B * T_;
        attention_inputs(L, A, N, c);
        L.attn.kv_b.forward(c, A.kvb, A.ckv, RowGroups::all(N));
        mla_attention_forward(blas, stream, mla_dims(B, T_), A.o, A.mla, mla_scratch, A.q, A.kva, A.kvb);
        attention_output(L, A, N, c);
        ffn(l, A, x_out, N, T_, c);
    }

    // Per-token losses, their sum in scalars[0], and dlogits, for targets [B*T] on the host (negative: ignored).
    // Returns the number of counted targets.
    long loss(const std::vector<int>& targets) {
        long N = long(targets.size()), counted = count_targets(targets);
        CUDA_CHECK(cudaMemcpyAsync(targets_buf, targets.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
        cross_entropy(losses, d_logits, logits, targets_buf, int(N), cfg.vocab_size,
                      counted ? 1.0f / float(counted) : 0.0f, stream);
        sum_reduce(scalars, reduce_scratch, losses, N, false, stream);
        return counted;
    }

    // ----- backward ---------------------------------------------------------------------------------------------

    // Gradients of the mean loss (plus the balance loss) into grads (overwritten), after forward() and loss().
    void backward(int B, int T_) {
        const Config& c = cfg;
        int N = B * T_, d = c.hidden_size;
        Ctx<T> cx = ctx(stream, false);
        linear_backward(blas, stream, d_h, cx.g(lm_head), d_logits, xf, cx.w(lm_head), N, c.vocab_size, d);
        rmsnorm_backward(d_resid, cx.g(final_norm), norm_scratch, d_h, x_final, d, cx.w(final_norm), rstd_final, N, d,
                         false, false, stream);
        for (int l = c.num_hidden_layers - 1; l >= 0; l--) layer_backward(l, B, T_, cx);
        embedding_backward(cx.g(embed), d_resid, tokens_buf, N, c.vocab_size, d, false, stream);
    }

    // d_resid holds the gradient of the layer's output; on return, that of its input.
    void layer_backward(int l, int B, int T_, const Ctx<T>& c) {
        const Config& cf = cfg;
        Layer& L = layers[l];
        BlockActs<T>& A = acts[l];
        const int N = B * T_, d = cf.hidden_size, qr = cf.q_lora_rank, dc = cf.kv_lora_rank;
        const int kva_w = dc + cf.qk_rope_head_dim;
        const RowGroups rows = RowGroups::all(N);

        // FFN: x_out = x_mid + FFN(RMSNorm(x_mid))
        if (L.moe)
            L.routed.backward(c, A.moe, d_moe, d_h, d_resid, A.h2, N, balancing);
        else
            L.mlp.backward(c, d_h, d_resid, A.h2, A.mlp, d_mlp, rows, false);
        rmsnorm_backward(d_resid, c.g(L.post_norm), norm_scratch, d_h, A.x_mid, d, c.w(L.post_norm), A.rstd2, N, d,
                         true, false, stream);

        // MLA: x_mid = x_in + o_proj(attention(...))
        L.attn.o.backward(c, d_o, d_resid, A.o, rows);
        mla_attention_backward(blas, stream, mla_dims(B, T_), d_q, d_kva, d_kvb, A.mla, mla_scratch, d_o);
        L.attn.kv_b.backward(c, d_ckv, d_kvb, A.ckv, rows);
        rmsnorm_backward(d_kva, c.g(L.attn.kv_a_norm), norm_scratch, d_ckv, A.kva, kva_w, c.w(L.attn.kv_a_norm),
                         A.rstd_kv, N, dc, false, false, stream);
        L.attn.q_b.backward(c, d_cq, d_q, A.cq, rows);
        rmsnorm_backward(d_cq_pre, c.g(L.attn.q_a_norm), norm_scratch, d_cq, A.cq_pre, qr, c.w(L.attn.q_a_norm),
                         A.rstd_q, N, qr, false, false, stream);
        L.attn.q_a.backward(c, d_h, d_cq_pre, A.h1, rows);
        L.attn.kv_a.backward(c, d_h, d_kva, A.h1, rows, true);
        rmsnorm_backward(d_resid, c.g(L.attn.input_norm), norm_scratch, d_h, A.x_in, d, c.w(L.attn.input_norm),
                         A.rstd1, N, d, true, false, stream);
    }

    // ----- optimizer --------------------------------------------------------------------------------------------

    // Squared global gradient norm into scalars[1], then AdamW with clipping on the trained parameters (step counts
    // from 1), then the router biases by the last forward pass's loads.
    void optimizer_step(const AdamW& opt, float max_grad_norm, int step, uint64_t seed) {
        sum_reduce(scalars + 1, reduce_scratch, grads.data(), layout.trained, true, stream);
        const int* skip = fp8 ? fp8->nonfinite.data() : nullptr;
        adamw_update(master.data(), weights, adam_m.data(), adam_v.data(), grads.data(), scalars + 1, layout.trained,
                     layout.decayed, opt, max_grad_norm, step, seed, stream, skip);
        if (balancing.bias_rate > 0.0f)
            for (int l = 0; l < cfg.num_hidden_layers; l++)
                if (layers[l].moe)
                    layers[l].routed.update_bias(master.data() + layout.offset(layers[l].routed.bias),
                                                 acts[l].moe.counts, last_tokens, balancing.bias_rate, skip,
                                                 scalars + 1, stream);
        refresh_fp8_weights();
    }

    // One optimizer step on inputs [B, T] and targets [B*T] (negative: no loss). The loss and gradient norm are
    // read afterwards with read_scalars(), so the host can prepare the next batch meanwhile.
    void train_step(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int T_, const AdamW& opt,
                    float max_grad_norm, int step, uint64_t seed) {
        forward(inputs, B, T_);
        loss(targets);
        backward(B, T_);
        optimizer_step(opt, max_grad_norm, step, seed);
    }

    // The last step's scalars: one small copy, which waits for the step to finish.
    StepScalars read_scalars() {
        float h[3];
        CUDA_CHECK(cudaMemcpyAsync(h, scalars, sizeof(h), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        return {h[0], sqrtf(h[1]), h[2]};
    }
};
