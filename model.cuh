// model.cuh: the DeepSeek-V3-shaped transformer: config, parameters, the decoder block, forward, backward, AdamW.
//
//   tokens -> embedding -> L x [ RMSNorm -> MLA -> +residual -> RMSNorm -> FFN -> +residual ]
//          -> RMSNorm -> lm_head -> cross-entropy
//   and D multi-token prediction modules on the last hidden state (V3 §2.2, mtp.cuh) -> the same lm_head
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
// the latent cache. The MTP modules reuse the same block.
#pragma once

#include <algorithm>
#include <cmath>
#include <memory>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fp8.cuh"
#include "kernels/attention.cuh"
#include "kernels/gemm.cuh"
#include "kernels/layers.cuh"
#include "kernels/params.h"
#include "moe.cuh"
#include "mtp.cuh"
#include "nccl.cuh"

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
    // D, the depth of multi-token prediction (V3 §2.2): MTP modules after the main model (0: none)
    int num_nextn_predict_layers = 1;

    // Fields that a config.json written before them lacks, and what such a config meant: a model without MTP.
    static constexpr std::pair<const char*, int> absent_means[] = {{"num_nextn_predict_layers", 0}};

    static constexpr int MAX_CONFIG_SIZE = 1 << 15, MAX_CONFIG_LAYERS = 256;

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
        visit("num_nextn_predict_layers", c.num_nextn_predict_layers, Bound::NonNegative);
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
    // An MTP module's block has the FFN of the model's last layer (V3: MoE), so it needs no buffers of a new kind.
    bool mtp_moe() const { return is_moe(num_hidden_layers - 1); }
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
        // Sizes beyond these are no model one GPU trains, and the int arithmetic of shapes multiplies two of them.
        fields([](const char* name, const auto& value, Bound) {
            if constexpr (std::is_same_v<std::decay_t<decltype(value)>, int>)
                if (value > MAX_CONFIG_SIZE)
                    throw std::invalid_argument(std::string("invalid model config: ") + name + " must be at most " +
                                                std::to_string(MAX_CONFIG_SIZE) + " (the product of two sizes must "
                                                "fit an int)");
        });
        auto require = [](bool ok, const char* what) {
            if (!ok) throw std::invalid_argument(std::string("invalid model config: ") + what);
        };
        const long H = num_attention_heads;
        const long widths[] = {H * qk_head_dim(), H * (qk_nope_head_dim + v_head_dim),
                               long(kv_lora_rank) + qk_rope_head_dim, long(n_shared_experts) * moe_intermediate_size};
        for (long width : widths)
            require(width <= MAX_CONFIG_SIZE, "the projections' widths (num_attention_heads x the head dimensions, "
                                              "kv_lora_rank + qk_rope_head_dim, n_shared_experts x "
                                              "moe_intermediate_size) must be at most 32768");
        require(num_hidden_layers <= MAX_CONFIG_LAYERS, "num_hidden_layers must be at most 256");
        require(num_nextn_predict_layers <= MAX_CONFIG_LAYERS, "num_nextn_predict_layers must be at most 256");
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

    // The tensors of the decoder block named p ("model.layers.3."), with a MoE or a dense FFN.
    static Layer declare(ParamLayout& layout, const std::string& p, const Config& c, bool moe, int N) {
        const int d = c.hidden_size, H = c.num_attention_heads;
        Layer L;
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
        L.moe = moe;
        if (moe)
            L.routed = Moe::declare(layout, p + "mlp.", c.moe(), d, N);
        else
            L.mlp = SwiGlu::declare(layout, {p + "mlp."}, d, c.intermediate_size, N);
        return L;
    }

    std::vector<Linear*> linears() {
        std::vector<Linear*> out = {&attn.q_a, &attn.q_b, &attn.kv_a, &attn.kv_b, &attn.o};
        for (SwiGlu* f : moe ? std::vector<SwiGlu*>{&routed.shared, &routed.experts} : std::vector<SwiGlu*>{&mlp})
            out.push_back(&f->gate_up), out.push_back(&f->down);
        return out;
    }
};

// One MTP module (V3 §2.2), stored as DeepSeek's release stores it: at layer index num_hidden_layers + k - 1, its
// norms and projection beside a full decoder block, the embedding and the output head shared with the main model.
struct MtpModule {
    int enorm = -1, hnorm = -1, head_norm = -1;
    Linear eh_proj;  // M_k [d, 2d]
    Layer block;     // TRM_k

    static MtpModule declare(ParamLayout& layout, const std::string& p, const Config& c, int N) {
        const int d = c.hidden_size;
        MtpModule m;
        m.enorm = layout.norm(p + "enorm.weight", d);
        m.hnorm = layout.norm(p + "hnorm.weight", d);
        m.eh_proj = Linear::declare(layout, p + "eh_proj.weight", d, 2 * d, N);
        m.block = Layer::declare(layout, p, c, c.mtp_moe(), N);
        m.head_norm = layout.norm(p + "shared_head.norm.weight", d);
        return m;
    }
};

// Every module's tensors in one parameter layout, as the modules declare them; no device memory. The declaration
// order puts a dense layer's matrices and norm weights where they have always been, so older checkpoints and runs
// keep their meaning; the MTP modules come last. max_tokens: the most tokens a forward pass takes (sizes the FP8
// buffers).
struct Architecture {
    ParamLayout layout;
    int embed = -1, lm_head = -1, final_norm = -1;
    std::vector<Layer> layers;
    std::vector<MtpModule> mtp;
    int first_mtp_tensor = 0;  // the MTP modules' tensors are this one and every one after it

    Architecture(const Config& c, int max_tokens) {
        c.validate();
        const int d = c.hidden_size;
        embed = layout.matrix("model.embed_tokens.weight", c.vocab_size, d);
        for (int l = 0; l < c.num_hidden_layers; l++)
            layers.push_back(Layer::declare(layout, "model.layers." + std::to_string(l) + ".", c, c.is_moe(l),
                                            max_tokens));
        lm_head = layout.matrix("lm_head.weight", c.vocab_size, d);
        final_norm = layout.norm("model.norm.weight", d);
        first_mtp_tensor = int(layout.tensors.size());
        for (int k = 1; k <= c.num_nextn_predict_layers; k++)
            mtp.push_back(MtpModule::declare(
                layout, "model.layers." + std::to_string(c.num_hidden_layers + k - 1) + ".", c, max_tokens));
        layout.finalize();
    }

    // Every projection that runs through Linear (and so in FP8 in FP8 training).
    std::vector<Linear*> linears() {
        std::vector<Linear*> out;
        for (Layer& L : layers)
            for (Linear* l : L.linears()) out.push_back(l);
        for (MtpModule& m : mtp) {
            out.push_back(&m.eh_proj);
            for (Linear* l : m.block.linears()) out.push_back(l);
        }
        return out;
    }

    // Parameters that take part in a GEMM (all but the embedding and the norms) in the main model, or in the MTP
    // modules (the shared output head counted once per module, which runs it again); with active_only, those that
    // an average token uses (a routed expert counts num_experts_per_tok / n_routed_experts of its size).
    double matmul_params(bool active_only, bool of_mtp = false) const {
        double n = 0;
        for (size_t t = 0; t < layout.tensors.size(); t++) {
            const ParamTensor& p = layout.tensors[t];
            const bool counted = of_mtp ? int(t) >= first_mtp_tensor || int(t) == lm_head : int(t) < first_mtp_tensor;
            const double passes = of_mtp && int(t) == lm_head ? double(mtp.size()) : 1.0;
            if (counted && p.shape.size() == 2 && int(t) != embed)
                n += double(p.numel()) * (active_only ? p.active : 1.0) * passes;
        }
        return n;
    }
};

// Model FLOPs per token of a training step (forward + backward = 3x forward, 2 FLOPs per multiply-add): every
// projection a token passes through, plus attention scores and values over a full context of T (the usual
// convention); with_mtp adds the MTP modules'.
inline double train_flops_per_token(const Config& c, int T, bool with_mtp = false) {
    const Architecture arch(c, 0);
    const int blocks = c.num_hidden_layers + (with_mtp ? c.num_nextn_predict_layers : 0);
    const double attn = 2.0 * T * c.num_attention_heads * (c.qk_head_dim() + c.v_head_dim) * blocks;
    const double params = arch.matmul_params(true) + (with_mtp ? arch.matmul_params(true, true) : 0.0);
    return 3.0 * (2.0 * params + attn);
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

// What an MTP module's block reads, for N rows: the tokens k ahead, their embeddings, the RMSNorms of those and of
// h^{k-1}, and the two side by side; training and decoding alike.
template <typename T>
struct MtpInput {
    int* tokens;             // t_{i+k}
    T *e, *e_n, *h_n, *cat;  // Emb(t_{i+k}), RMSNorm of it and of h^{k-1}, and the two side by side [N, 2d]
    float *rstd_e, *rstd_h;
};

// An MTP module's activations for N tokens in training: its input (the tokens from mtp.cuh's shift), the block's
// activations, its head's logits and their gradient.
template <typename T>
struct MtpActs {
    MtpInput<T> in;
    int* targets;     // t_{i+k+1} (-1: none)
    T *h, *h_n_out;   // h^k (the block's output), and its RMSNorm under shared_head.norm
    float *rstd_out, *logits, *losses, *hits;
    T* d_logits;
    BlockActs<T> block;
    long counted = 0;  // targets that count in the last forward pass
};

// What a training step reports: the sum of the token losses, the gradient norm, the balance loss (all MoE layers);
// with MTP, its loss (the mean of the modules' mean cross-entropies, before lambda) and the first module's top-1
// accuracy on the token two ahead.
struct StepScalars {
    float loss_sum, grad_norm, balance_loss, mtp_loss = 0.0f, mtp_accuracy = 0.0f;
};

// T is the storage type of weights and activations: float (precision fp32) or bf16 (precision bf16). Master
// weights and gradients are FP32 in both; the Adam moments are BF16. A model that does not train (GRPO's reference)
// runs forward passes alone: it holds no gradients, no optimizer state, and one set of activations for every layer.
template <typename T>
struct Model : Architecture {
    Config cfg;
    int max_B, max_T;
    bool trains;
    Blas blas;
    cudaStream_t stream = 0;
    Balancing balancing;  // of the MoE layers' experts

    DeviceBuffer<float> master, grads;
    DeviceBuffer<T> weight_copy;  // the T copy of the master weights (unused for T = float)
    T* weights;
    DeviceBuffer<bf16> adam_m, adam_v;

    std::vector<BlockActs<T>> acts;
    std::vector<MtpActs<T>> mtp_acts;
    bool mtp_ran = false;  // whether the MTP modules ran in this step's forward pass (and so train in it)
    T *x_final, *xf;       // residual stream after the last layer, and its RMSNorm
    // scalars: [0] loss sum, [1] squared gradient norm, [2] balance loss, then per MTP module its loss sum and hit
    // count; balance_losses: one per block, the MTP modules' after the layers'
    float *rstd_final, *logits, *losses, *scalars, *balance_losses;
    MlaScratch<T> mla_scratch;
    T *d_resid, *d_h, *d_o, *d_q, *d_cq, *d_cq_pre, *d_kva, *d_ckv, *d_kvb, *d_logits;
    SwiGluActs<T> d_mlp;
    MoeGrads<T> d_moe;
    T *d_cat, *d_e_n, *d_h_n;  // the MTP modules' backward
    float* norm_scratch;
    float* reduce_scratch;
    int *tokens_buf, *targets_buf;
    DeviceArena arena;
    std::unique_ptr<Fp8Scratch> fp8;  // set by enable_fp8: the projections' GEMMs in FP8
    // Data parallel (nccl.cuh), set by distribute: every rank's gradients summed, this rank's ZeRO-1 shard of the
    // parameters updated here; null: this GPU alone.
    Comm* comm = nullptr;
    Shards shards{};
    int rows_mine = 1, rows_total = 1;  // data parallel: this rank's rows of the global batch's
    // Gradient accumulation (accumulate_pass): the share of its batch's rows that a pass takes, and the sums of the
    // passes so far (the gradients, the scalars, the MoE layers' loads).
    float pass_share = 1.0f;
    DeviceBuffer<float> grad_sum, scalar_sum;
    DeviceBuffer<int> load_sum;

    Model(const Config& c, int B, int T_, bool trains_ = true)
        : Architecture(c, B * T_), cfg(c), max_B(B), max_T(T_), trains(trains_) {
        if (T_ > cfg.max_position_embeddings)
            throw std::invalid_argument("sequence length " + std::to_string(T_) + " exceeds max_position_embeddings " +
                                        std::to_string(cfg.max_position_embeddings));
        master.resize(layout.total);
        if (trains) grads.resize(layout.trained), adam_m.resize(layout.trained), adam_v.resize(layout.trained);
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

    int scalar_count() const { return 3 + 2 * cfg.num_nextn_predict_layers; }
    int block_count() const { return cfg.num_hidden_layers + cfg.num_nextn_predict_layers; }

    MtpInput<T> allocate_mtp_input(DeviceArena& arena, int N) const {
        const long n = N, d = cfg.hidden_size;
        MtpInput<T> in;
        in.tokens = arena.take<int>(n), in.e = arena.take<T>(n * d), in.e_n = arena.take<T>(n * d);
        in.h_n = arena.take<T>(n * d), in.cat = arena.take<T>(n * 2 * d);
        in.rstd_e = arena.take<float>(n), in.rstd_h = arena.take<float>(n);
        return in;
    }

    MtpActs<T> allocate_mtp(int N) {
        const long n = N, d = cfg.hidden_size, V = cfg.vocab_size;
        MtpActs<T> A;
        A.in = allocate_mtp_input(arena, N), A.targets = arena.take<int>(n);
        A.h = arena.take<T>(n * d), A.h_n_out = arena.take<T>(n * d), A.rstd_out = arena.take<float>(n);
        A.logits = arena.take<float>(n * V), A.losses = arena.take<float>(n), A.hits = arena.take<float>(n);
        A.d_logits = arena.take<T>(n * V);
        A.block = allocate_block(arena, N, false, !cfg.mtp_moe(), cfg.mtp_moe());
        return A;
    }

    void allocate_activations() {
        const Config& c = cfg;
        const long N = long(max_B) * max_T, d = c.hidden_size, H = c.num_attention_heads;
        const long q_w = H * c.qk_head_dim(), kva_w = c.kv_lora_rank + c.qk_rope_head_dim, o_w = H * c.v_head_dim;
        const long kvb_w = H * (c.qk_nope_head_dim + c.v_head_dim), tt = long(max_B) * H * max_T * max_T;
        if (trains) {
            for (int l = 0; l < c.num_hidden_layers; l++)
                acts.push_back(allocate_block(arena, int(N), false, !c.is_moe(l), c.is_moe(l)));
            for (int k = 0; k < c.num_nextn_predict_layers; k++) mtp_acts.push_back(allocate_mtp(int(N)));
        } else {  // each layer's output is the next one's input, in place (ffn)
            acts.assign(c.num_hidden_layers,
                        allocate_block(arena, int(N), false, c.first_k_dense_replace > 0, c.has_moe()));
        }
        x_final = arena.take<T>(N * d), xf = arena.take<T>(N * d), rstd_final = arena.take<float>(N);
        logits = arena.take<float>(N * c.vocab_size), losses = arena.take<float>(N);
        scalars = arena.take<float>(scalar_count());
        balance_losses = arena.take<float>(block_count());
        CUDA_CHECK(cudaMemset(balance_losses, 0, sizeof(float) * block_count()));
        CUDA_CHECK(cudaMemset(scalars, 0, sizeof(float) * scalar_count()));
        mla_scratch = {arena.take<float>(tt),  arena.take<T>(N * o_w), arena.take<T>(tt),
                       arena.take<T>(N * q_w), arena.take<T>(N * q_w), arena.take<T>(N * o_w)};
        reduce_scratch = arena.take<float>(REDUCE_BLOCKS);
        tokens_buf = arena.take<int>(N), targets_buf = arena.take<int>(N);
        if (!trains) return;
        if (!mtp.empty()) d_cat = arena.take<T>(N * 2 * d), d_e_n = arena.take<T>(N * d), d_h_n = arena.take<T>(N * d);
        long widest = std::max({d, long(c.q_lora_rank), long(c.kv_lora_rank)});
        d_resid = arena.take<T>(N * d), d_h = arena.take<T>(N * d);
        d_o = arena.take<T>(N * o_w), d_q = arena.take<T>(N * q_w), d_cq = arena.take<T>(N * c.q_lora_rank);
        d_cq_pre = arena.take<T>(N * c.q_lora_rank), d_kva = arena.take<T>(N * kva_w);
        d_ckv = arena.take<T>(N * c.kv_lora_rank), d_kvb = arena.take<T>(N * kvb_w);
        d_logits = arena.take<T>(N * c.vocab_size);
        if (c.first_k_dense_replace > 0) d_mlp = layers[0].mlp.template allocate<T>(arena, N);
        if (c.has_moe()) d_moe = layers[c.first_k_dense_replace].routed.template allocate_grads<T>(arena, int(N));
        norm_scratch = arena.take<float>(partial_scratch_size(int(N), int(widest)));
    }

    // Training calls on a model that does not train are the caller's mistake.
    void check_trains(const char* what) const {
        if (!trains) throw std::logic_error(std::string(what) + " on a model built for forward passes alone");
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

    // Data parallel over comm's ranks with ZeRO-1 (nccl.cuh): the master weights and gradients padded to R equal
    // shards, the Adam moments of this rank's shard alone (zero: call before loading a checkpoint). This rank's share
    // of the global batch (its rows over all rows) weighs its sequence-wise balance loss, so that the ranks' sum is
    // the loss of the global batch. With expert_parallel, the routed experts spread over the ranks too.
    void distribute(Comm& c, int rows, int all_rows, bool expert_parallel = false) {
        check_trains("distribute");
        if (expert_parallel) spread_experts(c, long(all_rows) * max_T);
        comm = &c, shards = shards_of(layout.total, c.ranks.world);
        DeviceBuffer<float> padded(size_t(shards.padded()));
        CUDA_CHECK(cudaMemsetAsync(padded.data(), 0, padded.bytes(), stream));
        CUDA_CHECK(cudaMemcpyAsync(padded.data(), master.data(), master.bytes(), cudaMemcpyDeviceToDevice, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        master = std::move(padded);
        if constexpr (std::is_same_v<T, float>) weights = master.data();
        grads.resize(size_t(shards.padded()));
        CUDA_CHECK(cudaMemsetAsync(grads.data(), 0, grads.bytes(), stream));  // the padding stays zero
        adam_m.resize(size_t(shards.per_rank)), adam_v.resize(size_t(shards.per_rank));
        reset_optimizer();
        rows_mine = rows, rows_total = all_rows;
    }

    // Expert parallel (moe.cuh): every MoE layer's routed experts spread over comm's ranks, with the buffers of the
    // rows that the global batch of all_tokens tokens sends them; before enable_fp8, which sizes its own by them.
    void spread_experts(Comm& c, long all_tokens) {
        if (fp8) throw std::logic_error("spread_experts must come before enable_fp8");
        auto spread = [&](Layer& L, BlockActs<T>& A) {
            if (!L.moe) return;
            L.routed.spread_experts(c, all_tokens);
            L.routed.allocate_expert_side(arena, A.moe, all_tokens);
        };
        for (int l = 0; l < cfg.num_hidden_layers; l++) spread(layers[l], acts[l]);
        for (size_t k = 0; k < mtp.size(); k++) spread(mtp[k].block, mtp_acts[k].block);
        if (cfg.has_moe()) layers[cfg.first_k_dense_replace].routed.allocate_expert_side(arena, d_moe, all_tokens);
    }

    // The balancing of this pass's rows: its sequence-wise loss weighed by its share of the batch, so that the ranks'
    // and the passes' losses add up to the global batch's.
    Balancing rank_balancing() const {
        Balancing b = balancing;
        b.alpha *= pass_share * float(rows_mine) / float(rows_total);
        return b;
    }

    // This rank's slice of the trained parameters: [first, first + count) (all of them on one GPU).
    std::pair<long, long> own_parameters() const {
        if (!comm) return {0, layout.trained};
        const long first = shards.begin(comm->ranks.rank);
        return {first, std::max(0L, std::min(shards.end(comm->ranks.rank), layout.trained) - first)};
    }

    // A count over the global batch (targets, tokens): summed over the ranks.
    long over_ranks(long local) { return comm ? comm->sum(local, stream) : local; }
    // Host values of the global batch (a step's statistics), summed over the ranks in place.
    void over_ranks(std::vector<double>& values) {
        if (comm) comm->sum(values.data(), int(values.size()), stream);
    }
    int rank() const { return comm ? comm->ranks.rank : 0; }

    // Scalars of the global batch (loss sums, balance losses, hits) from the ranks' own, where each is made.
    void sum_over_ranks(float* values, int n) {
        if (comm) comm->all_reduce_sum(values, n, stream);
    }

    // The Adam moments of every trained parameter, for a checkpoint (data parallel: every rank calls, the shards are
    // gathered).
    void moments(std::vector<bf16>& m, std::vector<bf16>& v) {
        for (auto [moment, out] : {std::pair{&adam_m, &m}, std::pair{&adam_v, &v}}) {
            if (!comm) {
                *out = moment->download();
                continue;
            }
            DeviceBuffer<bf16> all(size_t(shards.padded()));
            CUDA_CHECK(cudaMemcpyAsync(all.data() + shards.per_rank * comm->ranks.rank, moment->data(), moment->bytes(),
                                       cudaMemcpyDeviceToDevice, stream));
            comm->all_gather(all.data(), shards, stream);
            CUDA_CHECK(cudaStreamSynchronize(stream));
            *out = all.download();
            out->resize(size_t(layout.trained));
        }
    }

    // Sets them from a checkpoint (data parallel: this rank keeps its shard).
    void set_moments(const std::vector<bf16>& m, const std::vector<bf16>& v) {
        for (auto [moment, in] : {std::pair{&adam_m, &m}, std::pair{&adam_v, &v}}) {
            if (!comm) {
                moment->upload(*in);
                continue;
            }
            std::vector<bf16> shard(size_t(shards.per_rank), bf16(0.0f));
            const auto [first, count] = own_parameters();
            std::copy_n(in->begin() + first, count, shard.begin());
            moment->upload(shard);
        }
    }

    // Zero Adam moments: a new optimizer, for fresh weights or a new stage on loaded ones.
    void reset_optimizer() {
        if (!trains) return;
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

    // x_out = x_mid + FFN(RMSNorm(x_mid)) for N tokens in sequences of seq_len: the dense SwiGLU or DeepSeekMoE
    // (in training with its balance loss into *balance_loss).
    void ffn(Layer& L, BlockActs<T>& A, T* x_out, int N, int seq_len, const Ctx<T>& c, float* balance_loss) {
        const int d = cfg.hidden_size;
        rmsnorm_forward(A.h2, A.rstd2, A.x_mid, d, c.w(L.post_norm), N, d, cfg.rms_norm_eps, c.stream);
        if (x_out != A.x_mid)
            CUDA_CHECK(cudaMemcpyAsync(x_out, A.x_mid, sizeof(T) * N * d, cudaMemcpyDeviceToDevice, c.stream));
        if (L.moe)
            L.routed.forward(c, A.moe, x_out, A.h2, N, seq_len, rank_balancing(), balance_loss);
        else
            L.mlp.forward(c, x_out, A.h2, A.mlp, RowGroups::all(N), true);
    }

    // logits [N, V] (FP32) = lm_head RMSNorm(x), under the norm weight `norm` (the final norm, or an MTP module's).
    void head(float* out, T* x_normed, float* rstd, const T* x, int N, const Ctx<T>& c, int norm) {
        const int d = cfg.hidden_size;
        rmsnorm_forward(x_normed, rstd, x, d, c.w(norm), N, d, cfg.rms_norm_eps, c.stream);
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
        mtp_ran = false;
        Ctx<T> cx = ctx(stream, false);
        CUDA_CHECK(cudaMemcpyAsync(tokens_buf, tokens.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
        embedding_forward(acts[0].x_in, tokens_buf, cx.w(embed), N, d, stream);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            T* x_out = l + 1 < c.num_hidden_layers ? acts[l + 1].x_in : x_final;
            layer_forward(layers[l], acts[l], x_out, B, T_, cx, balance_losses + l);
        }
        head(logits, xf, rstd_final, x_final, N, cx, final_norm);
        final_sum_kernel<<<1, REDUCE_THREADS, 0, stream>>>(scalars + 2, balance_losses, c.num_hidden_layers);
        CUDA_CHECK_LAUNCH();
        sum_over_ranks(scalars + 2, 1);
    }

    void layer_forward(Layer& L, BlockActs<T>& A, T* x_out, int B, int T_, const Ctx<T>& c, float* balance_loss) {
        const int N = B * T_;
        attention_inputs(L, A, N, c);
        L.attn.kv_b.forward(c, A.kvb, A.ckv, RowGroups::all(N));
        mla_attention_forward(blas, stream, mla_dims(B, T_), A.o, A.mla, mla_scratch, A.q, A.kva, A.kvb);
        attention_output(L, A, N, c);
        ffn(L, A, x_out, N, T_, c, balance_loss);
    }

    // Per-token losses, their sum in scalars[0], and dlogits, for targets [B*T] on the host (negative: ignored).
    // Returns the number of counted targets.
    long loss(const std::vector<int>& targets) {
        long N = long(targets.size()), counted = over_ranks(count_targets(targets));
        CUDA_CHECK(cudaMemcpyAsync(targets_buf, targets.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
        cross_entropy(losses, d_logits, logits, targets_buf, int(N), cfg.vocab_size,
                      counted ? 1.0f / float(counted) : 0.0f, stream);
        sum_reduce(scalars, reduce_scratch, losses, N, false, stream);
        sum_over_ranks(scalars, 1);
        return counted;
    }

    // ----- backward ---------------------------------------------------------------------------------------------

    // Gradients of the mean loss (plus the balance loss) into grads (overwritten), after forward() and loss().
    void backward(int B, int T_) {
        check_trains("backward");
        const Config& c = cfg;
        int N = B * T_, d = c.hidden_size;
        Ctx<T> cx = ctx(stream, false);
        // The MTP modules run after the main model, so their gradients come first: into the shared head and
        // embedding (which the main model's then add to) and into x_final (d_resid).
        if (mtp_ran)
            mtp_backward(B, T_, cx);
        else
            zero_mtp_grads();
        linear_backward(blas, stream, d_h, cx.g(lm_head), d_logits, xf, cx.w(lm_head), N, c.vocab_size, d, false,
                        mtp_ran);
        rmsnorm_backward(d_resid, cx.g(final_norm), norm_scratch, d_h, x_final, d, cx.w(final_norm), rstd_final, N, d,
                         mtp_ran, false, stream);
        for (int l = c.num_hidden_layers - 1; l >= 0; l--) layer_backward(layers[l], acts[l], B, T_, cx);
        embedding_backward(cx.g(embed), d_resid, tokens_buf, N, c.vocab_size, d, mtp_ran, stream);
    }

    // d_resid holds the gradient of the block's output; on return, that of its input.
    void layer_backward(Layer& L, BlockActs<T>& A, int B, int T_, const Ctx<T>& c) {
        const Config& cf = cfg;
        const int N = B * T_, d = cf.hidden_size, qr = cf.q_lora_rank, dc = cf.kv_lora_rank;
        const int kva_w = dc + cf.qk_rope_head_dim;
        const RowGroups rows = RowGroups::all(N);

        // FFN: x_out = x_mid + FFN(RMSNorm(x_mid))
        if (L.moe)
            L.routed.backward(c, A.moe, d_moe, d_h, d_resid, A.h2, N, rank_balancing());
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

    // ----- multi-token prediction (V3 §2.2, mtp.cuh) -------------------------------------------------------------

    // After forward() and loss() on the same rows: the D MTP modules' forward passes and losses, each module's
    // cross-entropy weighted lambda / D (eq. 25) in the gradient that backward() then takes, modules and model
    // together (V3 §2.2, after eq. 25: L_Main + lambda L_MTP).
    void mtp_forward(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int T_, float lambda) {
        check_trains("mtp_forward");
        const Config& c = cfg;
        const int N = B * T_, V = c.vocab_size, D = int(mtp.size());
        Ctx<T> cx = ctx(stream, false);
        std::vector<int> tokens_k, targets_k;
        const T* h_prev = x_final;  // h^0: the main model's last hidden state, before its final norm
        for (int k = 1; k <= D; k++) {
            MtpModule& M = mtp[k - 1];
            MtpActs<T>& A = mtp_acts[k - 1];
            mtp_shift(inputs, targets, B, T_, k, tokens_k, targets_k);
            A.counted = over_ranks(count_targets(targets_k));
            CUDA_CHECK(cudaMemcpyAsync(A.in.tokens, tokens_k.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
            CUDA_CHECK(cudaMemcpyAsync(A.targets, targets_k.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
            mtp_input(M, A.in, A.block.x_in, h_prev, N, cx);
            layer_forward(M.block, A.block, A.h, B, T_, cx, balance_losses + c.num_hidden_layers + k - 1);
            head(A.logits, A.h_n_out, A.rstd_out, A.h, N, cx, M.head_norm);
            cross_entropy(A.losses, A.d_logits, A.logits, A.targets, N, V,
                          A.counted ? lambda / (float(D) * float(A.counted)) : 0.0f, stream);
            sum_reduce(scalars + 1 + 2 * k, reduce_scratch, A.losses, N, false, stream);
            argmax_hits(A.hits, A.logits, A.targets, N, V, stream);
            sum_reduce(scalars + 2 + 2 * k, reduce_scratch, A.hits, N, false, stream);
            h_prev = A.h;
        }
        final_sum_kernel<<<1, REDUCE_THREADS, 0, stream>>>(scalars + 2, balance_losses, block_count());
        CUDA_CHECK_LAUNCH();
        sum_over_ranks(scalars + 2, 1 + 2 * D);
        mtp_ran = true;
    }

    // x = M_k [RMSNorm(Emb(t_{i+k})); RMSNorm(h)] for N rows (eq. 21), the input of module M's block, from the tokens
    // in.tokens and the hidden states h (x may be h: h is read first).
    void mtp_input(MtpModule& M, MtpInput<T>& in, T* x, const T* h, int N, const Ctx<T>& c) {
        const int d = cfg.hidden_size;
        rmsnorm_forward(in.h_n, in.rstd_h, h, d, c.w(M.hnorm), N, d, cfg.rms_norm_eps, c.stream);
        embedding_forward(in.e, in.tokens, c.w(embed), N, d, c.stream);
        rmsnorm_forward(in.e_n, in.rstd_e, in.e, d, c.w(M.enorm), N, d, cfg.rms_norm_eps, c.stream);
        // [embedding; hidden] as DeepSeek's released weights have it; eq. 21 writes the two the other way round
        copy_columns(in.cat, 2 * d, in.e_n, d, d, N, c.stream);
        copy_columns(in.cat + d, 2 * d, in.h_n, d, d, N, c.stream);
        M.eh_proj.forward(c, x, in.cat, RowGroups::all(N));
    }

    // The modules' backward, deepest first: each leaves the gradient of its input h^{k-1} in d_resid, which the
    // module before it (or the main model, for h^0 = x_final) adds its own to. The first writer of the shared
    // head's and embedding's gradients overwrites them, the others add.
    void mtp_backward(int B, int T_, const Ctx<T>& c) {
        const int N = B * T_, d = cfg.hidden_size, V = cfg.vocab_size, D = int(mtp.size());
        for (int k = D; k >= 1; k--) {
            MtpModule& M = mtp[k - 1];
            MtpActs<T>& A = mtp_acts[k - 1];
            const bool deeper = k < D;  // a deeper module has run: add to what it wrote
            linear_backward(blas, stream, d_h, c.g(lm_head), A.d_logits, A.h_n_out, c.w(lm_head), N, V, d, false,
                            deeper);
            rmsnorm_backward(d_resid, c.g(M.head_norm), norm_scratch, d_h, A.h, d, c.w(M.head_norm), A.rstd_out, N, d,
                             deeper, false, stream);
            layer_backward(M.block, A.block, B, T_, c);
            M.eh_proj.backward(c, d_cat, d_resid, A.in.cat, RowGroups::all(N));
            copy_columns(d_e_n, d, d_cat, 2 * d, d, N, stream);
            copy_columns(d_h_n, d, d_cat + d, 2 * d, d, N, stream);
            rmsnorm_backward(d_h, c.g(M.enorm), norm_scratch, d_e_n, A.in.e, d, c.w(M.enorm), A.in.rstd_e, N, d, false,
                             false, stream);
            embedding_backward(c.g(embed), d_h, A.in.tokens, N, V, d, deeper, stream);
            const T* h_prev = k > 1 ? mtp_acts[k - 2].h : x_final;
            rmsnorm_backward(d_resid, c.g(M.hnorm), norm_scratch, d_h_n, h_prev, d, c.w(M.hnorm), A.in.rstd_h, N, d,
                             false, false, stream);
        }
    }

    // In a step without the MTP loss (GRPO trains the policy alone) the modules' gradients are zero.
    void zero_mtp_grads() {
        for (int t = first_mtp_tensor; t < int(layout.tensors.size()); t++)
            if (layout[t].region != Region::Buffer)
                CUDA_CHECK(cudaMemsetAsync(grads.data() + layout.offset(t), 0, sizeof(float) * layout[t].numel(),
                                           stream));
    }

    // ----- optimizer --------------------------------------------------------------------------------------------

    // Squared global gradient norm into scalars[1], then AdamW with clipping on the trained parameters (step counts
    // from 1), then the router biases by the last forward pass's loads. Data parallel (ZeRO-1): the gradients are
    // summed into each shard's owner, the squared norm from the shards summed over the ranks, a step skipped on one
    // rank skipped on all, each rank updates its shard, every rank moves the biases by the global loads, and the
    // updated shards are gathered.
    void optimizer_step(const AdamW& opt, float max_grad_norm, int step, uint64_t seed) {
        check_trains("optimizer_step");
        int* skip = fp8 ? fp8->nonfinite.data() : nullptr;
        const auto [first, count] = own_parameters();
        if (comm) {
            comm->reduce_scatter_sum(grads.data(), shards, stream);
            if (skip) comm->all_reduce_max(skip, 1, stream);
        }
        sum_reduce(scalars + 1, reduce_scratch, grads.data() + first, count, true, stream);
        sum_over_ranks(scalars + 1, 1);
        if (count > 0)
            adamw_update(master.data() + first, weights + first, adam_m.data(), adam_v.data(), grads.data() + first,
                         scalars + 1, count, layout.decayed, opt, max_grad_norm, step, seed, stream, skip, first);
        auto update_bias = [&](const Layer& L, BlockActs<T>& A) {
            if (!L.moe) return;
            if (comm) L.routed.sum_loads(*comm, A.moe, stream);
            if (balancing.bias_rate > 0.0f)
                L.routed.update_bias(master.data() + layout.offset(L.routed.bias), A.moe.counts, balancing.bias_rate,
                                     skip, scalars + 1, stream);
        };
        for (int l = 0; l < cfg.num_hidden_layers; l++) update_bias(layers[l], acts[l]);
        if (mtp_ran)
            for (size_t k = 0; k < mtp.size(); k++) update_bias(mtp[k].block, mtp_acts[k].block);
        if (comm) {
            comm->all_gather(master.data(), shards, stream);
            refresh_weights();
        } else {
            refresh_fp8_weights();
        }
    }

    // Gradient accumulation, for a batch larger than the buffers: its rows in `passes` passes of forward() and
    // backward(), each pass's balance loss weighed by its rows (begin_pass). After pass `pass`'s backward(), the
    // gradients, the scalars and the MoE layers' loads of the passes so far are summed; after the last, they are the
    // whole batch's, for optimizer_step (up to the order of the sums).
    void begin_pass(int rows, int batch_rows) { pass_share = float(rows) / float(batch_rows); }

    void accumulate_pass(int pass, int passes) {
        check_trains("accumulate_pass");
        if (passes == 1) return;
        const bool last = pass + 1 == passes;
        auto sum = [&](auto* live, auto* kept, long n) {
            if (pass == 0)
                CUDA_CHECK(cudaMemcpyAsync(kept, live, sizeof(*live) * n, cudaMemcpyDeviceToDevice, stream));
            else if (!last)
                add_into(kept, live, n, stream);
            else
                add_into(live, kept, n, stream);
        };
        std::vector<std::pair<const Moe*, MoeActs<T>*>> moe_layers;
        for (int l = 0; l < cfg.num_hidden_layers; l++)
            if (layers[l].moe) moe_layers.push_back({&layers[l].routed, &acts[l].moe});
        if (mtp_ran)
            for (size_t k = 0; k < mtp.size(); k++)
                if (mtp[k].block.moe) moe_layers.push_back({&mtp[k].block.routed, &mtp_acts[k].block.moe});
        const int E = cfg.n_routed_experts;
        if (grad_sum.count != grads.count) grad_sum.resize(grads.count);
        if (scalar_sum.count == 0) scalar_sum.resize(size_t(scalar_count()));
        if (load_sum.count < moe_layers.size() * E) load_sum.resize(moe_layers.size() * E);
        sum(grads.data(), grad_sum.data(), long(grads.count));
        sum(scalars, scalar_sum.data(), scalar_count());
        for (size_t i = 0; i < moe_layers.size(); i++) {
            sum(moe_layers[i].second->counts, load_sum.data() + i * E, E);
            if (last) moe_layers[i].first->loads_to_host(*moe_layers[i].second, stream);
        }
        if (last) pass_share = 1.0f;  // the next batch is one pass unless begin_pass says otherwise
    }

    // One optimizer step on inputs [B, T] and targets [B*T] (negative: no loss), with the MTP modules' loss
    // weighted mtp_lambda (0: they do not run). The loss and gradient norm are read afterwards with
    // read_scalars(), so the host can prepare the next batch meanwhile. Returns the targets counted (every rank's).
    long train_step(const std::vector<int>& inputs, const std::vector<int>& targets, int B, int T_, const AdamW& opt,
                    float max_grad_norm, int step, uint64_t seed, float mtp_lambda) {
        forward(inputs, B, T_);
        const long counted = loss(targets);
        if (mtp_lambda > 0.0f && !mtp.empty()) mtp_forward(inputs, targets, B, T_, mtp_lambda);
        backward(B, T_);
        optimizer_step(opt, max_grad_norm, step, seed);
        return counted;
    }

    // The last step's scalars: one small copy, which waits for the step to finish.
    StepScalars read_scalars() {
        std::vector<float> h(scalar_count());
        CUDA_CHECK(cudaMemcpyAsync(h.data(), scalars, sizeof(float) * h.size(), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        StepScalars out{h[0], sqrtf(h[1]), h[2]};
        if (!mtp_ran) return out;
        for (size_t k = 0; k < mtp.size(); k++)
            out.mtp_loss += h[3 + 2 * k] / float(std::max(mtp_acts[k].counted, 1L)) / float(mtp.size());
        out.mtp_accuracy = h[4] / float(std::max(mtp_acts[0].counted, 1L));
        return out;
    }
};
