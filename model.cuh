// model.cuh: the DeepSeek-V3-shaped transformer: config, the flat parameter buffer, forward, backward, AdamW.
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
// The FFN slot is a dense SwiGLU here: down_proj(silu(gate_proj h) * up_proj h).
#pragma once

#include <algorithm>
#include <memory>
#include <string>
#include <vector>

#include "attention.cuh"
#include "fp8.cuh"
#include "gemm.cuh"
#include "layers.cuh"

// Field names follow transformers' DeepseekV3Config, so config.json is read and written without renaming.
// transformers builds q_a_layernorm and kv_a_layernorm with its RMSNorm's default eps, whatever rms_norm_eps says.
constexpr float LATENT_NORM_EPS = 1e-6f;

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

    int qk_head_dim() const { return qk_nope_head_dim + qk_rope_head_dim; }

    // Throws std::invalid_argument naming the first field that cannot work.
    void validate() const {
        auto require = [](bool ok, const char* what) {
            if (!ok) throw std::invalid_argument(std::string("invalid model config: ") + what);
        };
        require(vocab_size > 0 && hidden_size > 0 && intermediate_size > 0, "sizes must be positive");
        require(num_hidden_layers > 0 && num_attention_heads > 0, "layers and heads must be positive");
        require(q_lora_rank > 0, "q_lora_rank must be positive (the low-rank query path)");
        require(kv_lora_rank > 0 && v_head_dim > 0 && qk_nope_head_dim > 0, "MLA dimensions must be positive");
        require(qk_rope_head_dim > 0 && qk_rope_head_dim % 2 == 0, "qk_rope_head_dim must be even and positive");
        require(max_position_embeddings > 0, "max_position_embeddings must be positive");
    }

    // Model FLOPs per token of a training step (forward + backward = 3x forward, 2 FLOPs per multiply-add):
    // every projection, plus attention scores and values over a full context of T (the usual convention).
    double train_flops_per_token(int T) const {
        double attn = 2.0 * T * num_attention_heads * (qk_head_dim() + v_head_dim) * num_hidden_layers;
        return 3.0 * (2.0 * double(matmul_params()) + attn);
    }
    long matmul_params() const;  // parameters that take part in a GEMM (all but embedding and norms)
};

// One tensor of the flat parameter buffer.
struct ParamTensor {
    std::string name;  // the Hugging Face checkpoint name
    std::vector<long> shape;
    long offset;
    long numel() const {
        long n = 1;
        for (long d : shape) n *= d;
        return n;
    }
};

// Offsets of one layer's tensors in the flat buffer.
struct LayerOffsets {
    long input_norm, q_a, q_a_norm, q_b, kv_a, kv_a_norm, kv_b, o, post_norm, gate_up, down;
};

// Where every tensor lives. All matrices come first, then all norm weights, so AdamW decays the first n_decay
// parameters. gate_proj and up_proj are adjacent: together they are one [2I, d] projection.
struct ParamLayout {
    std::vector<ParamTensor> tensors;
    std::vector<LayerOffsets> layers;
    long embed, lm_head, final_norm, n_decay, total = 0;

    explicit ParamLayout(const Config& c) {
        int d = c.hidden_size, H = c.num_attention_heads;
        embed = add("model.embed_tokens.weight", {c.vocab_size, d});
        layers.resize(c.num_hidden_layers);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            std::string p = "model.layers." + std::to_string(l) + ".";
            LayerOffsets& L = layers[l];
            L.q_a = add(p + "self_attn.q_a_proj.weight", {c.q_lora_rank, d});
            L.q_b = add(p + "self_attn.q_b_proj.weight", {long(H) * c.qk_head_dim(), c.q_lora_rank});
            L.kv_a = add(p + "self_attn.kv_a_proj_with_mqa.weight", {c.kv_lora_rank + c.qk_rope_head_dim, d});
            L.kv_b =
                add(p + "self_attn.kv_b_proj.weight", {long(H) * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank});
            L.o = add(p + "self_attn.o_proj.weight", {d, long(H) * c.v_head_dim});
            L.gate_up = add(p + "mlp.gate_proj.weight", {c.intermediate_size, d});
            add(p + "mlp.up_proj.weight", {c.intermediate_size, d});
            L.down = add(p + "mlp.down_proj.weight", {d, c.intermediate_size});
        }
        lm_head = add("lm_head.weight", {c.vocab_size, d});
        n_decay = total;
        for (int l = 0; l < c.num_hidden_layers; l++) {
            std::string p = "model.layers." + std::to_string(l) + ".";
            LayerOffsets& L = layers[l];
            L.input_norm = add(p + "input_layernorm.weight", {d});
            L.q_a_norm = add(p + "self_attn.q_a_layernorm.weight", {c.q_lora_rank});
            L.kv_a_norm = add(p + "self_attn.kv_a_layernorm.weight", {c.kv_lora_rank});
            L.post_norm = add(p + "post_attention_layernorm.weight", {d});
        }
        final_norm = add("model.norm.weight", {d});
    }

   private:
    long add(const std::string& name, std::vector<long> shape) {
        tensors.push_back({name, shape, total});
        total += tensors.back().numel();
        return tensors.back().offset;
    }
};

inline long Config::matmul_params() const {
    ParamLayout layout(*this);
    long n = 0;
    for (const ParamTensor& t : layout.tensors)
        if (t.shape.size() == 2 && t.offset != layout.embed) n += t.numel();
    return n;
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

// The projections of a layer: the Linear layers whose GEMMs FP8 training runs in FP8.
enum Projection { Q_A, Q_B, KV_A, KV_B, O_PROJ, GATE_UP, DOWN, NUM_PROJECTIONS };

struct ProjectionShape {
    long offset;  // of the weight [out, in] in the parameter buffer
    int out, in;
};

inline ProjectionShape projection_shape(const Config& c, const LayerOffsets& P, Projection p) {
    int d = c.hidden_size, H = c.num_attention_heads;
    switch (p) {
        case Q_A:
            return {P.q_a, c.q_lora_rank, d};
        case Q_B:
            return {P.q_b, H * c.qk_head_dim(), c.q_lora_rank};
        case KV_A:
            return {P.kv_a, c.kv_lora_rank + c.qk_rope_head_dim, d};
        case KV_B:
            return {P.kv_b, H * (c.qk_nope_head_dim + c.v_head_dim), c.kv_lora_rank};
        case O_PROJ:
            return {P.o, d, H * c.v_head_dim};
        case GATE_UP:
            return {P.gate_up, 2 * c.intermediate_size, d};
        default:
            return {P.down, d, c.intermediate_size};
    }
}

// FP8 training (V3 §3.3): every projection's weight in FP8, quantized from the master weights after each
// optimizer step; every projection's input kept for the backward pass as x^T in FP8; scratch for the quantized
// operands of one GEMM; and a flag raised when the quantization of an activation or gradient meets a NaN or Inf,
// on which the optimizer skips its update (the weights' quantization has a flag of its own: a non-finite weight
// shows in the loss).
struct Fp8State {
    Fp8Backend backend;
    std::vector<std::vector<Fp8Weight>> weights;  // [layer][projection]
    std::vector<std::vector<Fp8Tensor>> saved;    // [layer][projection]
    Fp8Tensor x_q, dy_q, dy_t;
    DeviceBuffer<int> nonfinite{1}, weights_nonfinite{1};

    Fp8State(const Config& c, const ParamLayout& layout, int tokens, Fp8Backend b)
        : backend(b),
          x_q(fp8_operand(tokens, widest(c, layout))),
          dy_q(fp8_operand(tokens, widest(c, layout))),
          dy_t(fp8_operand(tokens, widest(c, layout))) {
        weights.resize(c.num_hidden_layers), saved.resize(c.num_hidden_layers);
        for (int l = 0; l < c.num_hidden_layers; l++)
            for (int p = 0; p < NUM_PROJECTIONS; p++) {
                ProjectionShape shape = projection_shape(c, layout.layers[l], Projection(p));
                weights[l].emplace_back(shape.out, shape.in);
                saved[l].push_back(fp8_operand(tokens, shape.in));
            }
        CUDA_CHECK(cudaMemset(nonfinite.data(), 0, sizeof(int)));
        CUDA_CHECK(cudaMemset(weights_nonfinite.data(), 0, sizeof(int)));
    }

    static int widest(const Config& c, const ParamLayout& layout) {
        int w = 0;
        for (int p = 0; p < NUM_PROJECTIONS; p++) {
            ProjectionShape shape = projection_shape(c, layout.layers[0], Projection(p));
            w = std::max({w, shape.out, shape.in});
        }
        return w;
    }
};

// Activations of one layer kept for the backward pass.
template <typename T>
struct LayerActs {
    T *x_in, *h1, *cq_pre, *cq, *q, *kva, *ckv, *kvb, *o, *x_mid, *h2, *gu, *a;
    float *rstd1, *rstd_q, *rstd_kv, *rstd2;
    MlaSaved<T> mla;
};

// T is the storage type of weights and activations: float (precision fp32) or bf16 (precision bf16). Master
// weights and gradients are FP32 in both; the Adam moments are BF16.
template <typename T>
struct Model {
    Config cfg;
    ParamLayout layout;
    int max_B, max_T;
    Blas blas;
    cudaStream_t stream = 0;

    DeviceBuffer<float> master, grads;
    DeviceBuffer<T> weight_copy;  // the T copy of the master weights (unused for T = float)
    T* weights;
    DeviceBuffer<bf16> adam_m, adam_v;

    std::vector<LayerActs<T>> acts;
    T *x_final, *xf;                                // residual stream after the last layer, and its RMSNorm
    float *rstd_final, *logits, *losses, *scalars;  // scalars: [0] loss sum, [1] squared grad norm
    MlaScratch<T> mla_scratch;
    T *d_resid, *d_h, *d_gu, *d_a, *d_o, *d_q, *d_cq, *d_cq_pre, *d_kva, *d_ckv, *d_kvb, *d_logits;
    float* norm_scratch;
    float* reduce_scratch;
    int *tokens_buf, *targets_buf;
    DeviceArena arena;
    std::unique_ptr<Fp8State> fp8;  // set by enable_fp8: the projections' GEMMs in FP8

    Model(const Config& c, int B, int T_) : cfg(c), layout(c), max_B(B), max_T(T_) {
        cfg.validate();
        if (T_ > cfg.max_position_embeddings)
            throw std::invalid_argument("sequence length " + std::to_string(T_) + " exceeds max_position_embeddings " +
                                        std::to_string(cfg.max_position_embeddings));
        master.resize(layout.total);
        grads.resize(layout.total);
        adam_m.resize(layout.total);
        adam_v.resize(layout.total);
        if constexpr (std::is_same_v<T, float>) {
            weights = master.data();
        } else {
            weight_copy.resize(layout.total);
            weights = weight_copy.data();
        }
        allocate_activations();
    }

    long num_params() const { return layout.total; }

    void allocate_activations() {
        const Config& c = cfg;
        long N = long(max_B) * max_T, d = c.hidden_size, H = c.num_attention_heads;
        long q_w = H * c.qk_head_dim(), kva_w = c.kv_lora_rank + c.qk_rope_head_dim;
        long kvb_w = H * (c.qk_nope_head_dim + c.v_head_dim), o_w = H * c.v_head_dim, I = c.intermediate_size;
        long tt = long(max_B) * H * max_T * max_T;
        acts.resize(c.num_hidden_layers);
        for (LayerActs<T>& A : acts) {
            A.x_in = arena.take<T>(N * d), A.h1 = arena.take<T>(N * d), A.cq_pre = arena.take<T>(N * c.q_lora_rank);
            A.cq = arena.take<T>(N * c.q_lora_rank), A.q = arena.take<T>(N * q_w), A.kva = arena.take<T>(N * kva_w);
            A.ckv = arena.take<T>(N * c.kv_lora_rank), A.kvb = arena.take<T>(N * kvb_w), A.o = arena.take<T>(N * o_w);
            A.x_mid = arena.take<T>(N * d), A.h2 = arena.take<T>(N * d), A.gu = arena.take<T>(N * 2 * I),
            A.a = arena.take<T>(N * I);
            A.rstd1 = arena.take<float>(N), A.rstd_q = arena.take<float>(N), A.rstd_kv = arena.take<float>(N),
            A.rstd2 = arena.take<float>(N);
            A.mla = {arena.take<T>(N * q_w), arena.take<T>(N * q_w), arena.take<T>(N * o_w), arena.take<T>(tt)};
        }
        x_final = arena.take<T>(N * d), xf = arena.take<T>(N * d), rstd_final = arena.take<float>(N);
        logits = arena.take<float>(N * c.vocab_size), losses = arena.take<float>(N), scalars = arena.take<float>(2);
        mla_scratch = {arena.take<float>(tt),  arena.take<T>(N * o_w), arena.take<T>(tt),
                       arena.take<T>(N * q_w), arena.take<T>(N * q_w), arena.take<T>(N * o_w)};
        long widest = std::max({d, long(c.q_lora_rank), long(c.kv_lora_rank)});
        d_resid = arena.take<T>(N * d), d_h = arena.take<T>(N * d), d_gu = arena.take<T>(N * 2 * I),
        d_a = arena.take<T>(N * I);
        d_o = arena.take<T>(N * o_w), d_q = arena.take<T>(N * q_w), d_cq = arena.take<T>(N * c.q_lora_rank);
        d_cq_pre = arena.take<T>(N * c.q_lora_rank), d_kva = arena.take<T>(N * kva_w),
        d_ckv = arena.take<T>(N * c.kv_lora_rank);
        d_kvb = arena.take<T>(N * kvb_w), d_logits = arena.take<T>(N * c.vocab_size);
        norm_scratch = arena.take<float>(rmsnorm_scratch_size(int(N), int(widest)));
        reduce_scratch = arena.take<float>(REDUCE_BLOCKS);
        tokens_buf = arena.take<int>(N), targets_buf = arena.take<int>(N);
    }

    // ----- parameters -----------------------------------------------------------------------------------------

    // Normal(0, initializer_range) matrices, with the projections into the residual stream (o_proj, down_proj)
    // scaled by 1/sqrt(2L) so the residual's variance does not grow with depth; norm weights 1.
    void init_weights(uint64_t seed) {
        float std = cfg.initializer_range, residual_std = std / sqrtf(2.0f * cfg.num_hidden_layers);
        for (size_t k = 0; k < layout.tensors.size(); k++) {
            const ParamTensor& t = layout.tensors[k];
            float* w = master.data() + t.offset;
            long n = t.numel();
            if (t.shape.size() == 1) {
                fill_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(w, n, 1.0f);
            } else {
                bool residual =
                    t.name.find("o_proj") != std::string::npos || t.name.find("down_proj") != std::string::npos;
                init_normal_kernel<<<elementwise_blocks(n), 256, 0, stream>>>(w, n, residual ? residual_std : std, seed,
                                                                              k);
            }
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
    // embedding, the output head, attention and the norms keep the model's precision.
    void enable_fp8(Fp8Backend backend) {
        fp8 = std::make_unique<Fp8State>(cfg, layout, max_B * max_T, backend);
        refresh_fp8_weights();
    }

    void refresh_fp8_weights() {
        if (!fp8) return;
        for (int l = 0; l < cfg.num_hidden_layers; l++)
            for (int p = 0; p < NUM_PROJECTIONS; p++)
                fp8->weights[l][p].refresh(
                    master.data() + projection_shape(cfg, layout.layers[l], Projection(p)).offset,
                    fp8->weights_nonfinite.data(), stream);
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

    // y = x W^T (+ y) for projection p of layer l, in the model's precision or in FP8.
    void project(int l, Projection p, T* y, const T* x, int N, bool accumulate = false) {
        ProjectionShape shape = projection_shape(cfg, layout.layers[l], p);
        if (fp8)
            fp8_linear_forward(fp8->backend, blas, stream, y, x, fp8->weights[l][p], fp8->x_q, fp8->saved[l][p], N,
                               fp8->nonfinite.data(), accumulate);
        else
            linear_forward(blas, stream, y, x, weights + shape.offset, N, shape.out, shape.in, accumulate);
    }

    // dx (+ dx) and the weight's gradient for projection p of layer l, whose input in the forward pass was x.
    void project_backward(int l, Projection p, T* dx, const T* dy, const T* x, int N, bool accumulate_dx = false) {
        ProjectionShape shape = projection_shape(cfg, layout.layers[l], p);
        float* dW = grads.data() + shape.offset;
        if (fp8)
            fp8_linear_backward(fp8->backend, blas, stream, dx, dW, dy, fp8->saved[l][p], fp8->weights[l][p], fp8->dy_q,
                                fp8->dy_t, N, fp8->nonfinite.data(), accumulate_dx);
        else
            linear_backward(blas, stream, dx, dW, dy, x, weights + shape.offset, N, shape.out, shape.in, accumulate_dx);
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

    // logits [B*T, V] (FP32) for tokens [B, T] (host, row-major).
    void forward(const std::vector<int>& tokens, int B, int T_) {
        check_shape(B, T_);
        if (long(tokens.size()) != long(B) * T_) throw std::invalid_argument("forward: tokens do not fill B x T");
        const Config& c = cfg;
        int N = B * T_, d = c.hidden_size;
        CUDA_CHECK(cudaMemcpyAsync(tokens_buf, tokens.data(), sizeof(int) * N, cudaMemcpyHostToDevice, stream));
        embedding_forward(acts[0].x_in, tokens_buf, weights + layout.embed, N, d, stream);
        for (int l = 0; l < c.num_hidden_layers; l++) {
            T* x_out = l + 1 < c.num_hidden_layers ? acts[l + 1].x_in : x_final;
            layer_forward(l, x_out, B, T_);
        }
        rmsnorm_forward(xf, rstd_final, x_final, d, weights + layout.final_norm, N, d, c.rms_norm_eps, stream);
        matmul(blas, stream, logits, xf, weights + layout.lm_head, Matmul{N, c.vocab_size, d, false, true});
    }

    void layer_forward(int l, T* x_out, int B, int T_) {
        const Config& c = cfg;
        const LayerOffsets& P = layout.layers[l];
        LayerActs<T>& A = acts[l];
        const T* W = weights;
        int N = B * T_, d = c.hidden_size, I = c.intermediate_size;
        int kva_w = c.kv_lora_rank + c.qk_rope_head_dim;
        float eps = c.rms_norm_eps;
        MlaDims m = mla_dims(B, T_);

        rmsnorm_forward(A.h1, A.rstd1, A.x_in, d, W + P.input_norm, N, d, eps, stream);
        project(l, Q_A, A.cq_pre, A.h1, N);
        rmsnorm_forward(A.cq, A.rstd_q, A.cq_pre, c.q_lora_rank, W + P.q_a_norm, N, c.q_lora_rank, LATENT_NORM_EPS,
                        stream);
        project(l, Q_B, A.q, A.cq, N);
        project(l, KV_A, A.kva, A.h1, N);
        rmsnorm_forward(A.ckv, A.rstd_kv, A.kva, kva_w, W + P.kv_a_norm, N, c.kv_lora_rank, LATENT_NORM_EPS, stream);
        project(l, KV_B, A.kvb, A.ckv, N);
        mla_attention_forward(blas, stream, m, A.o, A.mla, mla_scratch, A.q, A.kva, A.kvb);
        CUDA_CHECK(cudaMemcpyAsync(A.x_mid, A.x_in, sizeof(T) * N * d, cudaMemcpyDeviceToDevice, stream));
        project(l, O_PROJ, A.x_mid, A.o, N, true);

        rmsnorm_forward(A.h2, A.rstd2, A.x_mid, d, W + P.post_norm, N, d, eps, stream);
        project(l, GATE_UP, A.gu, A.h2, N);
        swiglu_forward(A.a, A.gu, N, I, stream);
        CUDA_CHECK(cudaMemcpyAsync(x_out, A.x_mid, sizeof(T) * N * d, cudaMemcpyDeviceToDevice, stream));
        project(l, DOWN, x_out, A.a, N, true);
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

    // Gradients of the mean loss into grads (overwritten), after forward() and loss().
    void backward(int B, int T_) {
        const Config& c = cfg;
        int N = B * T_, d = c.hidden_size;
        linear_backward(blas, stream, d_h, grads.data() + layout.lm_head, d_logits, xf, weights + layout.lm_head, N,
                        c.vocab_size, d);
        rmsnorm_backward(d_resid, grads.data() + layout.final_norm, norm_scratch, d_h, x_final, d,
                         weights + layout.final_norm, rstd_final, N, d, false, false, stream);
        for (int l = c.num_hidden_layers - 1; l >= 0; l--) layer_backward(l, B, T_);
        embedding_backward(grads.data() + layout.embed, d_resid, tokens_buf, N, c.vocab_size, d, false, stream);
    }

    // d_resid holds the gradient of the layer's output; on return, that of its input.
    void layer_backward(int l, int B, int T_) {
        const Config& c = cfg;
        const LayerOffsets& P = layout.layers[l];
        LayerActs<T>& A = acts[l];
        const T* W = weights;
        float* G = grads.data();
        int N = B * T_, d = c.hidden_size, I = c.intermediate_size;
        int kva_w = c.kv_lora_rank + c.qk_rope_head_dim, qr = c.q_lora_rank, dc = c.kv_lora_rank;
        MlaDims m = mla_dims(B, T_);

        // FFN: x_out = x_mid + down(swiglu(gate_up(RMSNorm(x_mid))))
        project_backward(l, DOWN, d_a, d_resid, A.a, N);
        swiglu_backward(d_gu, d_a, A.gu, N, I, stream);
        project_backward(l, GATE_UP, d_h, d_gu, A.h2, N);
        rmsnorm_backward(d_resid, G + P.post_norm, norm_scratch, d_h, A.x_mid, d, W + P.post_norm, A.rstd2, N, d, true,
                         false, stream);

        // MLA: x_mid = x_in + o_proj(attention(...))
        project_backward(l, O_PROJ, d_o, d_resid, A.o, N);
        mla_attention_backward(blas, stream, m, d_q, d_kva, d_kvb, A.mla, mla_scratch, d_o);
        project_backward(l, KV_B, d_ckv, d_kvb, A.ckv, N);
        rmsnorm_backward(d_kva, G + P.kv_a_norm, norm_scratch, d_ckv, A.kva, kva_w, W + P.kv_a_norm, A.rstd_kv, N, dc,
                         false, false, stream);
        project_backward(l, Q_B, d_cq, d_q, A.cq, N);
        rmsnorm_backward(d_cq_pre, G + P.q_a_norm, norm_scratch, d_cq, A.cq_pre, qr, W + P.q_a_norm, A.rstd_q, N, qr,
                         false, false, stream);
        project_backward(l, Q_A, d_h, d_cq_pre, A.h1, N);
        project_backward(l, KV_A, d_h, d_kva, A.h1, N, true);
        rmsnorm_backward(d_resid, G + P.input_norm, norm_scratch, d_h, A.x_in, d, W + P.input_norm, A.rstd1, N, d, true,
                         false, stream);
    }

    // ----- optimizer --------------------------------------------------------------------------------------------

    // Squared global gradient norm into scalars[1], then AdamW with clipping; step counts from 1.
    void optimizer_step(const AdamW& opt, float max_grad_norm, int step, uint64_t seed) {
        sum_reduce(scalars + 1, reduce_scratch, grads.data(), layout.total, true, stream);
        adamw_update(master.data(), weights, adam_m.data(), adam_v.data(), grads.data(), scalars + 1, layout.total,
                     layout.n_decay, opt, max_grad_norm, step, seed, stream, fp8 ? fp8->nonfinite.data() : nullptr);
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

    // (loss sum, gradient norm) of the last step: one small copy, which waits for the step to finish.
    std::pair<float, float> read_scalars() {
        float h[2];
        CUDA_CHECK(cudaMemcpyAsync(h, scalars, sizeof(h), cudaMemcpyDeviceToHost, stream));
        CUDA_CHECK(cudaStreamSynchronize(stream));
        return {h[0], sqrtf(h[1])};
    }
};
