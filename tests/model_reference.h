// The whole model on the CPU in double precision, written as plainly as the paper's equations: the reference the
// GPU forward is checked against, and whose finite differences check the GPU backward.
#pragma once

#include <cmath>
#include <vector>

#include "../model.cuh"

namespace model_ref {

using Vec = std::vector<double>;

// The test model: small enough for a double-precision CPU forward in milliseconds, with every MLA dimension
// distinct so that a mixed-up stride shows. A large init scale drives the nonlinearities away from their linear
// regime.
inline Config tiny_config() {
    Config c;
    c.vocab_size = 128, c.hidden_size = 32, c.intermediate_size = 48, c.num_hidden_layers = 2;
    c.num_attention_heads = 3, c.q_lora_rank = 24, c.kv_lora_rank = 16, c.qk_nope_head_dim = 8;
    c.qk_rope_head_dim = 4, c.v_head_dim = 12, c.max_position_embeddings = 64, c.initializer_range = 0.3f;
    c.rms_norm_eps = 1e-5f;  // unlike the latent norms' fixed 1e-6: a mix-up of the two shows
    return c;
}

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

// MLA for one layer (V3 eqs. 1-11): h [B*T, d] -> o_proj output [B*T, d].
inline Vec mla(const Config& c, const LayerOffsets& P, const double* W, const Vec& h, int B, int T) {
    int N = B * T, d = c.hidden_size, H = c.num_attention_heads, dn = c.qk_nope_head_dim, dr = c.qk_rope_head_dim;
    int dqk = c.qk_head_dim(), dv = c.v_head_dim, dc = c.kv_lora_rank, kva_w = dc + dr;
    Vec cq = rmsnorm(linear(h, N, d, W + P.q_a, c.q_lora_rank), N, c.q_lora_rank, 0, c.q_lora_rank, W + P.q_a_norm,
                     LATENT_NORM_EPS);
    Vec q = linear(cq, N, c.q_lora_rank, W + P.q_b, H * dqk);
    Vec kva = linear(h, N, d, W + P.kv_a, kva_w);
    Vec ckv = rmsnorm(kva, N, kva_w, 0, dc, W + P.kv_a_norm, LATENT_NORM_EPS);
    Vec kvb = linear(ckv, N, dc, W + P.kv_b, H * (dn + dv));
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
                Vec p(i + 1);
                double mx = -1e300, sum = 0.0;
                for (int j = 0; j <= i; j++) {
                    const double* kj = &kvb[size_t(b * T + j) * H * (dn + dv) + hh * (dn + dv)];
                    const double* krj = &kva[size_t(b * T + j) * kva_w + dc];
                    double s = 0.0;
                    for (int e = 0; e < dn; e++) s += qi[e] * kj[e];
                    for (int e = 0; e < dr; e++) s += qi[dn + e] * krj[e];
                    p[j] = s * scale;
                    mx = std::max(mx, p[j]);
                }
                for (int j = 0; j <= i; j++) sum += (p[j] = std::exp(p[j] - mx));
                for (int j = 0; j <= i; j++) {
                    const double* vj = &kvb[size_t(b * T + j) * H * (dn + dv) + hh * (dn + dv) + dn];
                    for (int e = 0; e < dv; e++) o[size_t(b * T + i) * H * dv + hh * dv + e] += p[j] / sum * vj[e];
                }
            }
    return linear(o, N, H * dv, W + P.o, d);
}

inline Vec swiglu_ffn(const Config& c, const LayerOffsets& P, const double* W, const Vec& h, int N) {
    int d = c.hidden_size, I = c.intermediate_size;
    Vec gu = linear(h, N, d, W + P.gate_up, 2 * I);
    Vec a(size_t(N) * I);
    for (int n = 0; n < N; n++)
        for (int i = 0; i < I; i++) {
            double g = gu[size_t(n) * 2 * I + i], u = gu[size_t(n) * 2 * I + I + i];
            a[size_t(n) * I + i] = g / (1.0 + std::exp(-g)) * u;
        }
    return linear(a, N, I, W + P.down, d);
}

// Logits [B*T, V] of the whole model for tokens [B, T], parameters in the flat layout.
inline Vec forward(const Config& c, const Vec& params, const std::vector<int>& tokens, int B, int T) {
    ParamLayout layout(c);
    const double* W = params.data();
    int N = B * T, d = c.hidden_size;
    Vec x(size_t(N) * d);
    for (int n = 0; n < N; n++)
        for (int e = 0; e < d; e++) x[size_t(n) * d + e] = W[layout.embed + size_t(tokens[n]) * d + e];
    for (const LayerOffsets& P : layout.layers) {
        Vec attn = mla(c, P, W, rmsnorm(x, N, d, 0, d, W + P.input_norm, c.rms_norm_eps), B, T);
        for (size_t i = 0; i < x.size(); i++) x[i] += attn[i];
        Vec ffn = swiglu_ffn(c, P, W, rmsnorm(x, N, d, 0, d, W + P.post_norm, c.rms_norm_eps), N);
        for (size_t i = 0; i < x.size(); i++) x[i] += ffn[i];
    }
    return linear(rmsnorm(x, N, d, 0, d, W + layout.final_norm, c.rms_norm_eps), N, d, W + layout.lm_head,
                  c.vocab_size);
}

// Mean cross-entropy over the targets that are not negative.
inline double loss(const Config& c, const Vec& params, const std::vector<int>& tokens, const std::vector<int>& targets,
                   int B, int T) {
    Vec logits = forward(c, params, tokens, B, T);
    int V = c.vocab_size;
    double total = 0.0;
    int counted = 0;
    for (int n = 0; n < B * T; n++) {
        if (targets[n] < 0) continue;
        double mx = -1e300, sum = 0.0;
        for (int v = 0; v < V; v++) mx = std::max(mx, logits[size_t(n) * V + v]);
        for (int v = 0; v < V; v++) sum += std::exp(logits[size_t(n) * V + v] - mx);
        total += std::log(sum) + mx - logits[size_t(n) * V + targets[n]];
        counted++;
    }
    return total / counted;
}

}  // namespace model_ref
