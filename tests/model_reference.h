// The whole model on the CPU in double precision, written as plainly as the papers' equations: the reference the
// GPU forward is checked against, and whose finite differences check the GPU backward. Tensors are found by their
// checkpoint names, not through the model's modules, so that a misplaced tensor in the layout shows.
#pragma once

#include <algorithm>
#include <cmath>
#include <numeric>
#include <stdexcept>
#include <string>
#include <vector>

#include "../model.cuh"

namespace model_ref {

using Vec = std::vector<double>;

// The test model: small enough for a double-precision CPU forward in milliseconds, with every MLA dimension
// distinct so that a mixed-up stride shows. A large init scale drives the nonlinearities away from their linear
// regime. Dense in every layer.
inline Config tiny_config() {
    Config c;
    c.vocab_size = 128, c.hidden_size = 32, c.intermediate_size = 48, c.num_hidden_layers = 2;
    c.num_attention_heads = 3, c.q_lora_rank = 24, c.kv_lora_rank = 16, c.qk_nope_head_dim = 8;
    c.qk_rope_head_dim = 4, c.v_head_dim = 12, c.max_position_embeddings = 64, c.initializer_range = 0.3f;
    c.rms_norm_eps = 1e-5f;  // unlike the latent norms' fixed 1e-6: a mix-up of the two shows
    c.first_k_dense_replace = c.num_hidden_layers;
    return c;
}

// The same with DeepSeekMoE in the second layer: 8 experts in 4 groups, 2 groups kept, top 2, an expert width of
// its own, two shared experts (one FFN twice as wide).
inline Config tiny_moe_config() {
    Config c = tiny_config();
    c.first_k_dense_replace = 1, c.n_routed_experts = 8, c.n_shared_experts = 2, c.num_experts_per_tok = 2;
    c.n_group = 4, c.topk_group = 2, c.moe_intermediate_size = 20, c.routed_scaling_factor = 2.5f;
    return c;
}

// A MoE model whose every projection dimension is a multiple of 16, as FP8 GEMMs need: DeepSeekMoE in its second
// layer, 8 experts in 4 groups, 2 groups kept, top 2.
inline Config fp8_moe_config() {
    Config c;
    c.vocab_size = 128, c.hidden_size = 64, c.intermediate_size = 96, c.num_hidden_layers = 2;
    c.num_attention_heads = 2, c.q_lora_rank = 32, c.kv_lora_rank = 32, c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 16, c.v_head_dim = 16, c.max_position_embeddings = 64, c.initializer_range = 0.1f;
    c.first_k_dense_replace = 1;
    c.n_routed_experts = 8, c.n_shared_experts = 1, c.num_experts_per_tok = 2, c.n_group = 4, c.topk_group = 2;
    c.moe_intermediate_size = 32;
    return c;
}

// Parameters in the flat layout, read by tensor name.
struct Params {
    const ParamLayout& layout;
    const Vec& values;
    const double* operator()(const std::string& name) const {
        for (const ParamTensor& t : layout.tensors)
            if (t.name == name) return values.data() + t.offset;
        throw std::runtime_error("no tensor " + name);
    }
};

// y [M, N] = x [M, K] W^T, W [N, K] row-major.
inline Vec linear(const Vec& x, int M, int K, const double* W, int N) {
    Vec y(size_t(M) * N, 0.0);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double s = 0.0;
            for (int k = 0; k < K; k++) s += x[size_t(m) * K + k] * W[size_t(n) * K + k];
            y[size_t(m) * N + n] = s;
        }
    return y;
}

// RMSNorm of the columns [col0, col0 + D) of x [M, stride].
inline Vec rmsnorm(const Vec& x, int M, int stride, int col0, int D, const double* w, double eps) {
    Vec y(size_t(M) * D);
    for (int m = 0; m < M; m++) {
        double ss = 0.0;
        for (int d = 0; d < D; d++) ss += x[size_t(m) * stride + col0 + d] * x[size_t(m) * stride + col0 + d];
        double r = 1.0 / std::sqrt(ss / D + eps);
        for (int d = 0; d < D; d++) y[size_t(m) * D + d] = w[d] * x[size_t(m) * stride + col0 + d] * r;
    }
    return y;
}

// V3's RoPE: the pair (x[2i], x[2i+1]) rotated by pos * theta^(-2i/d).
inline void rope(double* x, int d, int pos, double theta) {
    for (int i = 0; i < d / 2; i++) {
        double angle = pos * std::pow(theta, -2.0 * i / d), c = std::cos(angle), s = std::sin(angle);
        double x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x1 * c + x0 * s;
    }
}

// MLA for one layer (V3 eqs. 1-11): h [B*T, d] -> o_proj output [B*T, d]; p is the layer's name prefix.
inline Vec mla(const Config& c, const Params& W, const std::string& p, const Vec& h, int B, int T) {
    int N = B * T, d = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
    int dqk = c.qk_head_dim(), dv = c.v_head_dim, dc = c.kv_lora_rank, kva_w = dc + dr;
    Vec cq = rmsnorm(linear(h, N, d, W(p + "self_attn.q_a_proj.weight"), c.q_lora_rank), N, c.q_lora_rank, 0,
                     c.q_lora_rank, W(p + "self_attn.q_a_layernorm.weight"), LATENT_NORM_EPS);
    Vec q = linear(cq, N, c.q_lora_rank, W(p + "self_attn.q_b_proj.weight"), H * dqk);
    Vec kva = linear(h, N, d, W(p + "self_attn.kv_a_proj_with_mqa.weight"), kva_w);
    Vec ckv = rmsnorm(kva, N, kva_w, 0, dc, W(p + "self_attn.kv_a_layernorm.weight"), LATENT_NORM_EPS);
    Vec kvb = linear(ckv, N, dc, W(p + "self_attn.kv_b_proj.weight"), H * (dn + dv));
    for (int n = 0; n < N; n++) {
        for (int hh = 0; hh < H; hh++) rope(&q[size_t(n) * H * dqk + hh * dqk + dn], dr, n % T, c.rope_theta);
        rope(&kva[size_t(n) * kva_w + dc], dr, n % T, c.rope_theta);
    }
    Vec o(size_t(N) * H * dv, 0.0);
    double scale = 1.0 / std::sqrt(double(dqk));
    for (int b = 0; b < B; b++)
        for (int hh = 0; hh < H; hh++)
            for (int i = 0; i < T; i++) {
                const double* qi = &q[size_t(b * T + i) * H * dqk + hh * dqk];
                Vec p_row(i + 1);
                double mx = -1e300, sum = 0.0;
                for (int j = 0; j <= i; j++) {
                    const double* kj = &kvb[size_t(b * T + j) * H * (dn + dv) + hh * (dn + dv)];
                    const double* krj = &kva[size_t(b * T + j) * kva_w + dc];
                    double s = 0.0;
                    for (int e = 0; e < dn; e++) s += qi[e] * kj[e];
                    for (int e = 0; e < dr; e++) s += qi[dn + e] * krj[e];
                    p_row[j] = s * scale;
                    mx = std::max(mx, p_row[j]);
                }
                for (int j = 0; j <= i; j++) sum += (p_row[j] = std::exp(p_row[j] - mx));
                for (int j = 0; j <= i; j++) {
                    const double* vj = &kvb[size_t(b * T + j) * H * (dn + dv) + hh * (dn + dv) + dn];
                    for (int e = 0; e < dv; e++) o[size_t(b * T + i) * H * dv + hh * dv + e] += p_row[j] / sum * vj[e];
                }
            }
    return linear(o, N, H * dv, W(p + "self_attn.o_proj.weight"), d);
}

// down(silu(gate h) * up h) for the FFN named p ("model.layers.0.mlp.", an expert's "...experts.3.").
inline Vec swiglu_ffn(const Params& W, const std::string& p, const Vec& h, int N, int d, int I) {
    Vec g = linear(h, N, d, W(p + "gate_proj.weight"), I), u = linear(h, N, d, W(p + "up_proj.weight"), I);
    Vec a(size_t(N) * I);
    for (size_t i = 0; i < a.size(); i++) a[i] = g[i] / (1.0 + std::exp(-g[i])) * u[i];
    return linear(a, N, I, W(p + "down_proj.weight"), d);
}

// ---------------------------------------------------------------------------------------------------------------
// DeepSeekMoE (V3 eqs. 12-20)
// ---------------------------------------------------------------------------------------------------------------

// Indices 0..n-1 by value, largest first; ties by the lower index.
inline std::vector<int> ranked(const std::vector<double>& value) {
    std::vector<int> order(value.size());
    std::iota(order.begin(), order.end(), 0);
    std::stable_sort(order.begin(), order.end(), [&](int a, int b) { return value[a] > value[b]; });
    return order;
}

// Exercise 10 (exercises/10_router) asks for this function's body.
#ifdef EXERCISE_ROUTE
#include EXERCISE_ROUTE
#else
// The chosen experts of one token from its scores s and the bias b: the best topk_group groups by the sum of their
// two best s + b, then the best K experts by s + b among those groups' experts.
inline std::vector<int> route(const MoeConfig& m, const std::vector<double>& s, const double* b) {
    const int E = m.n_routed, gs = E / m.n_group;
    std::vector<double> biased(E), group_score(m.n_group);
    for (int e = 0; e < E; e++) biased[e] = s[e] + b[e];
    for (int g = 0; g < m.n_group; g++) {
        std::vector<double> members(biased.begin() + g * gs, biased.begin() + (g + 1) * gs);
        std::sort(members.rbegin(), members.rend());
        group_score[g] = members[0] + (gs > 1 ? members[1] : 0.0);
    }
    std::vector<int> groups = ranked(group_score);
    std::vector<double> candidate(E, -1e300);
    for (int r = 0; r < m.topk_group; r++)
        for (int e = groups[r] * gs; e < (groups[r] + 1) * gs; e++) candidate[e] = biased[e];
    std::vector<int> order = ranked(candidate);
    return std::vector<int>(order.begin(), order.begin() + m.top_k);
}
#endif

// The discrete choices of one MoE layer, per token: its chosen experts, and the top K of s alone (which the balance
// loss counts). Finite differences keep them fixed: a choice has no derivative.
struct Routing {
    std::vector<std::vector<int>> chosen, plain;
};

struct MoeOptions {
    double alpha = 0.0;         // weight of the balance loss
    bool per_sequence = true;   // its segments: each sequence, or the whole batch
    const std::vector<Routing>* fixed = nullptr;  // use these choices (one per MoE layer) instead of choosing
    std::vector<Routing>* record = nullptr;       // keep the choices made
};

// A MoE layer's output for u [N, d] (p: "model.layers.1.mlp."), adding its balance loss to *balance_loss.
inline Vec moe(const Config& c, const Params& W, const std::string& p, const Vec& u, int B, int T, Routing& r,
               bool choose, const MoeOptions& opt, double* balance_loss) {
    const MoeConfig m = c.moe();
    const int N = B * T, d = c.hidden_size, E = m.n_routed, K = m.top_k;
    Vec y = swiglu_ffn(W, p + "shared_experts.", u, N, d, m.n_shared * m.expert_dim);
    Vec logits = linear(u, N, d, W(p + "gate.weight"), E);
    std::vector<std::vector<double>> s(N, std::vector<double>(E));
    if (choose) r.chosen.assign(N, {}), r.plain.assign(N, {});
    for (int t = 0; t < N; t++) {
        for (int e = 0; e < E; e++) s[t][e] = 1.0 / (1.0 + std::exp(-logits[size_t(t) * E + e]));
        if (choose) {
            r.chosen[t] = route(m, s[t], W(p + "gate.e_score_correction_bias"));
            std::vector<int> plain = ranked(s[t]);
            r.plain[t].assign(plain.begin(), plain.begin() + K);
        }
        double sum = 0.0;
        for (int e : r.chosen[t]) sum += s[t][e];
        Vec u_t(u.begin() + size_t(t) * d, u.begin() + size_t(t + 1) * d);
        for (int e : r.chosen[t]) {
            double g = m.routed_scaling_factor * s[t][e] / (m.norm_topk_prob ? sum + 1e-20 : 1.0);
            Vec out = swiglu_ffn(W, p + "experts." + std::to_string(e) + ".", u_t, 1, d, m.expert_dim);
            for (int j = 0; j < d; j++) y[size_t(t) * d + j] += g * out[j];
        }
    }
    if (opt.alpha > 0.0 && balance_loss) {  // eqs. 17-20, averaged over the segments
        const int seg_len = opt.per_sequence ? T : N, segments = N / seg_len;
        for (int seg = 0; seg < segments; seg++)
            for (int i = 0; i < E; i++) {
                double f = 0.0, P = 0.0;
                for (int t = seg * seg_len; t < (seg + 1) * seg_len; t++) {
                    f += std::count(r.plain[t].begin(), r.plain[t].end(), i);
                    P += s[t][i] / std::accumulate(s[t].begin(), s[t].end(), 0.0);
                }
                f *= double(E) / (K * seg_len), P /= seg_len;
                *balance_loss += opt.alpha * f * P / segments;
            }
    }
    return y;
}

// One decoder block on the residual stream x [B*T, d], in place: MLA, then the dense FFN or MoE (its routing taken
// from or recorded into opt, as the block's turn among the MoE blocks says).
inline void block(const Config& c, const Params& W, const std::string& p, bool is_moe, Vec& x, int B, int T,
                  const MoeOptions& opt, int& moe_block, double* balance_loss) {
    const int N = B * T, d = c.hidden_size;
    Vec attn = mla(c, W, p, rmsnorm(x, N, d, 0, d, W(p + "input_layernorm.weight"), c.rms_norm_eps), B, T);
    for (size_t i = 0; i < x.size(); i++) x[i] += attn[i];
    Vec h = rmsnorm(x, N, d, 0, d, W(p + "post_attention_layernorm.weight"), c.rms_norm_eps), ffn;
    if (is_moe) {
        Routing r = opt.fixed ? (*opt.fixed)[moe_block] : Routing{};
        ffn = moe(c, W, p + "mlp.", h, B, T, r, !opt.fixed, opt, balance_loss);
        if (opt.record) opt.record->push_back(r);
        moe_block++;
    } else {
        ffn = swiglu_ffn(W, p + "mlp.", h, N, d, c.intermediate_size);
    }
    for (size_t i = 0; i < x.size(); i++) x[i] += ffn[i];
}

// Logits [B*T, V] of the whole model for tokens [B, T], parameters in the flat layout; the MoE layers' balance
// loss added to *balance_loss, the last hidden state (before the final norm) into *hidden if given.
inline Vec forward(const Config& c, const Vec& params, const std::vector<int>& tokens, int B, int T,
                   const MoeOptions& opt = {}, double* balance_loss = nullptr, Vec* hidden = nullptr) {
    Architecture arch(c, 0);
    Params W{arch.layout, params};
    int N = B * T, d = c.hidden_size;
    Vec x(size_t(N) * d);
    for (int n = 0; n < N; n++)
        for (int e = 0; e < d; e++) x[size_t(n) * d + e] = W("model.embed_tokens.weight")[size_t(tokens[n]) * d + e];
    if (opt.record) opt.record->clear();
    int moe_block = 0;
    for (int l = 0; l < c.num_hidden_layers; l++)
        block(c, W, "model.layers." + std::to_string(l) + ".", c.is_moe(l), x, B, T, opt, moe_block, balance_loss);
    if (hidden) *hidden = x;
    return linear(rmsnorm(x, N, d, 0, d, W("model.norm.weight"), c.rms_norm_eps), N, d, W("lm_head.weight"),
                  c.vocab_size);
}

// Mean cross-entropy of logits [N, V] over the targets that are not negative; the argmax hits into *hits if given.
inline double mean_cross_entropy(const Vec& logits, const std::vector<int>& targets, int V, double* hits = nullptr) {
    double total = 0.0;
    int counted = 0;
    if (hits) *hits = 0.0;
    for (size_t n = 0; n < targets.size(); n++) {
        if (targets[n] < 0) continue;
        const double* row = &logits[n * V];
        double mx = *std::max_element(row, row + V), sum = 0.0;
        for (int v = 0; v < V; v++) sum += std::exp(row[v] - mx);
        total += std::log(sum) + mx - row[targets[n]];
        if (hits) *hits += int(std::max_element(row, row + V) - row) == targets[n];
        counted++;
    }
    return total / counted;
}

// The MTP modules (V3 eqs. 21-25) after a forward pass whose last hidden state is h [B*T, d]: module k at layer
// index num_hidden_layers + k - 1 reads Emb(t_{i+k}) and h^{k-1}_i and predicts t_{i+k+1}, where the rows have one.
// Returns each module's mean cross-entropy (the first module's argmax hits into *hits); the MoE blocks' balance
// loss is added to *balance_loss, their routing taken from or recorded into opt after the main model's.
inline std::vector<double> mtp_losses(const Config& c, const Vec& params, Vec h, const std::vector<int>& inputs,
                                      const std::vector<int>& targets, int B, int T, const MoeOptions& opt = {},
                                      double* balance_loss = nullptr, double* hits = nullptr) {
    Architecture arch(c, 0);
    Params W{arch.layout, params};
    const int N = B * T, d = c.hidden_size;
    int moe_block = 0;
    for (int l = 0; l < c.num_hidden_layers; l++) moe_block += c.is_moe(l);
    std::vector<double> losses;
    for (int k = 1; k <= c.num_nextn_predict_layers; k++) {
        const std::string p = "model.layers." + std::to_string(c.num_hidden_layers + k - 1) + ".";
        const double* E = W("model.embed_tokens.weight");
        Vec e(size_t(N) * d, 0.0);
        std::vector<int> ahead(N, -1);
        for (int b = 0; b < B; b++)
            for (int i = 0; i < T; i++) {
                const int n = b * T + i, token = i + k < T ? inputs[n + k] : 0;
                ahead[n] = i + k < T ? targets[n + k] : -1;
                std::copy(E + size_t(token) * d, E + size_t(token + 1) * d, e.begin() + size_t(n) * d);
            }
        Vec e_n = rmsnorm(e, N, d, 0, d, W(p + "enorm.weight"), c.rms_norm_eps);
        Vec h_n = rmsnorm(h, N, d, 0, d, W(p + "hnorm.weight"), c.rms_norm_eps);
        Vec cat(size_t(N) * 2 * d);
        for (int n = 0; n < N; n++) {
            auto row = cat.begin() + size_t(n) * 2 * d;
            std::copy(e_n.begin() + size_t(n) * d, e_n.begin() + size_t(n + 1) * d, row);
            std::copy(h_n.begin() + size_t(n) * d, h_n.begin() + size_t(n + 1) * d, row + d);
        }
        h = linear(cat, N, 2 * d, W(p + "eh_proj.weight"), d);
        block(c, W, p, c.mtp_moe(), h, B, T, opt, moe_block, balance_loss);
        Vec logits = linear(rmsnorm(h, N, d, 0, d, W(p + "shared_head.norm.weight"), c.rms_norm_eps), N, d,
                            W("lm_head.weight"), c.vocab_size);
        losses.push_back(mean_cross_entropy(logits, ahead, c.vocab_size, k == 1 ? hits : nullptr));
    }
    return losses;
}

// Mean cross-entropy over the targets that are not negative, plus the balance loss; with mtp_lambda > 0, plus
// lambda times the MTP modules' mean loss (eq. 25), their balance losses included.
inline double loss(const Config& c, const Vec& params, const std::vector<int>& tokens, const std::vector<int>& targets,
                   int B, int T, const MoeOptions& opt = {}, double mtp_lambda = 0.0) {
    double balance = 0.0;
    Vec hidden;
    Vec logits = forward(c, params, tokens, B, T, opt, &balance, &hidden);
    double total = mean_cross_entropy(logits, targets, c.vocab_size) + balance;
    if (mtp_lambda > 0.0) {
        double mtp_balance = 0.0;
        std::vector<double> ce = mtp_losses(c, params, hidden, tokens, targets, B, T, opt, &mtp_balance);
        total += mtp_balance + mtp_lambda * std::accumulate(ce.begin(), ce.end(), 0.0) / double(ce.size());
    }
    return total;
}

}  // namespace model_ref
