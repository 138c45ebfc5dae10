// tests/reference.h: plain CPU references for the kernels of gemm.cuh, layers.cuh and attention.cuh, and the helpers
// the GPU tests share (random inputs, transfers in FP32 or BF16 storage, poisoning, error measures).
//
// A reference is a loop in double written to be read beside the paper's formula rather than beside the kernel. It
// shares only plain parameter structs (AdamW, MlaDims) and common.cuh's RNG and BF16 rounding with the code under
// test. Inputs are std::vector<float> (values a kernel can hold); the attention references take double, so that
// finite differences through them are accurate.
#pragma once

#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../kernels/attention.cuh"

TYPE_TO_STRING_AS("bf16", bf16);

// The result is close to the reference as a whole (normwise) and in its worst element (relative to the largest
// reference value). A NaN anywhere in the result fails both.
#define CHECK_CLOSE(got, want, tol)                                       \
    do {                                                                  \
        CHECK(ref::rel_error(got, want) <= (tol));                        \
        CHECK(ref::max_abs_error(got, want) <= (tol)*ref::max_abs(want)); \
    } while (0)

namespace ref {

// ---------------------------------------------------------------------------------------------------------------
// Test data, transfers and error measures
// ---------------------------------------------------------------------------------------------------------------

// The tests run on the legacy default stream, so each download (a synchronous cudaMemcpy) waits for the kernels.
constexpr cudaStream_t stream = nullptr;

// Relative tolerance of a result stored in T, against a reference fed the same (rounded) inputs. An FP32 result
// (GEMMs in FP32 compute, no TF32) is off by a few roundings of 6e-8, grown over sums of at most a few hundred
// terms: 1e-5 leaves a wide margin. A BF16 result carries its own rounding (2^-9 = 2e-3) and often that of a BF16
// intermediate or two: 1e-2.
template <typename T>
constexpr double tolerance() {
    return std::is_same<T, float>::value ? 1e-5 : 1e-2;
}

inline std::vector<float> random_uniform(Rng& rng, size_t n, double lo = -1.0, double hi = 1.0) {
    std::vector<float> x(n);
    for (float& v : x) v = float(lo + (hi - lo) * rng.uniform());
    return x;
}

// The values storage type T holds for x: a BF16 kernel sees its inputs rounded, and a fair reference sees them too.
template <typename T>
std::vector<float> round_to(std::vector<float> x) {
    for (float& v : x) v = to_float(from_float<T>(v));
    return x;
}

inline std::vector<double> to_double(const std::vector<float>& x) { return std::vector<double>(x.begin(), x.end()); }

template <typename T>
DeviceBuffer<T> upload(const std::vector<float>& host) {
    std::vector<T> stored(host.size());
    for (size_t i = 0; i < host.size(); i++) stored[i] = from_float<T>(host[i]);
    DeviceBuffer<T> device(host.size());
    device.upload(stored);
    return device;
}

template <typename T>
std::vector<float> download(const DeviceBuffer<T>& device) {
    std::vector<T> stored = device.download();
    std::vector<float> host(stored.size());
    for (size_t i = 0; i < stored.size(); i++) host[i] = to_float(stored[i]);
    return host;
}

// Every byte 0xFF is a NaN in FP32 and in BF16: an element a kernel fails to write cannot pass a comparison.
template <typename T>
void poison(DeviceBuffer<T>& device) {
    CUDA_CHECK(cudaMemset(device.data(), 0xFF, device.bytes()));
}

// Values on the host (as float, what the reference reads and updates) and their device copy in storage type T.
template <typename T>
struct Tensor {
    std::vector<float> host;
    DeviceBuffer<T> device;
    T* data() const { return device.data(); }
};

// A random input, rounded to T.
template <typename T>
Tensor<T> input(Rng& rng, size_t n, double lo = -1.0, double hi = 1.0) {
    Tensor<T> x{round_to<T>(random_uniform(rng, n, lo, hi)), {}};
    x.device = upload<T>(x.host);
    return x;
}

// An output: random initial values where the kernel adds to it, poison on the device where it must overwrite it.
template <typename T>
Tensor<T> output(Rng& rng, size_t n, bool accumulate) {
    Tensor<T> y = input<T>(rng, n);
    if (!accumulate) poison(y.device);
    return y;
}

// ||got - want|| / ||want||: the error of a result as a whole.
template <typename A, typename B>
double rel_error(const std::vector<A>& got, const std::vector<B>& want) {
    if (got.size() != want.size()) return INFINITY;
    double diff = 0.0, norm = 0.0;
    for (size_t i = 0; i < got.size(); i++) {
        double d = double(got[i]) - double(want[i]);
        diff += d * d;
        norm += double(want[i]) * double(want[i]);
    }
    return diff == 0.0 ? 0.0 : std::sqrt(diff / norm);
}

// max |got_i - want_i|, NaN as soon as one element is NaN.
template <typename A, typename B>
double max_abs_error(const std::vector<A>& got, const std::vector<B>& want) {
    if (got.size() != want.size()) return INFINITY;
    double worst = 0.0;
    for (size_t i = 0; i < got.size(); i++) {
        double d = std::fabs(double(got[i]) - double(want[i]));
        if (std::isnan(d)) return d;
        worst = std::max(worst, d);
    }
    return worst;
}

template <typename A>
double max_abs(const std::vector<A>& x) {
    double m = 0.0;
    for (A v : x) m = std::max(m, std::fabs(double(v)));
    return m;
}

template <typename A, typename B>
double dot(const std::vector<A>& a, const std::vector<B>& b) {
    double s = 0.0;
    for (size_t i = 0; i < a.size(); i++) s += double(a[i]) * double(b[i]);
    return s;
}

// The elements of x where mask[i] == keep: the part of a buffer a kernel writes, or the part it must leave alone.
template <typename A>
std::vector<A> where(const std::vector<A>& x, const std::vector<bool>& mask, bool keep = true) {
    std::vector<A> part;
    for (size_t i = 0; i < x.size(); i++)
        if (mask[i] == keep) part.push_back(x[i]);
    return part;
}

// Marks the columns [first, last) of a [rows, stride] matrix.
inline std::vector<bool> column_mask(int rows, int stride, int first, int last) {
    std::vector<bool> mask(size_t(rows) * stride);
    for (int r = 0; r < rows; r++)
        for (int c = first; c < last; c++) mask[size_t(r) * stride + c] = true;
    return mask;
}

// Central differences, dL/dx_i ~ (L(x + h e_i) - L(x - h e_i)) / 2h: truncation error O(h^2), rounding error
// O(eps / h); h = 1e-5 balances the two in double.
template <typename Loss>
std::vector<double> numerical_gradient(const Loss& loss, std::vector<double> x, double h = 1e-5) {
    std::vector<double> grad(x.size());
    for (size_t i = 0; i < x.size(); i++) {
        double xi = x[i];
        x[i] = xi + h;
        double up = loss(x);
        x[i] = xi - h;
        double down = loss(x);
        x[i] = xi;
        grad[i] = (up - down) / (2.0 * h);
    }
    return grad;
}

// ---------------------------------------------------------------------------------------------------------------
// Matrix products
// ---------------------------------------------------------------------------------------------------------------

// C = alpha op(A) op(B) + beta C for one row-major matrix with leading dimensions: op(A) [M,K] is A, or A^T of an A
// stored [K,M]; op(B) [K,N] is B, or B^T of a B stored [N,K]. As in BLAS, C is not read when beta = 0.
inline void matmul(float* C, const float* A, const float* B, int M, int N, int K, bool trans_a, bool trans_b, int lda,
                   int ldb, int ldc, double alpha, double beta) {
    for (int i = 0; i < M; i++)
        for (int j = 0; j < N; j++) {
            double acc = 0.0;
            for (int k = 0; k < K; k++) {
                double a = trans_a ? A[long(k) * lda + i] : A[long(i) * lda + k];
                double b = trans_b ? B[long(j) * ldb + k] : B[long(k) * ldb + j];
                acc += a * b;
            }
            float& c = C[long(i) * ldc + j];
            c = float(alpha * acc + (beta == 0.0 ? 0.0 : beta * c));
        }
}

// Linear layer y = x W^T (+ y): x [M,K], W [N,K] (PyTorch's [out, in]), y [M,N].
inline void linear_forward(const std::vector<float>& x, const std::vector<float>& W, int M, int N, int K,
                           std::vector<float>& y, bool accumulate) {
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++) {
            double acc = accumulate ? y[long(m) * N + n] : 0.0;
            for (int k = 0; k < K; k++) acc += double(x[long(m) * K + k]) * W[long(n) * K + k];
            y[long(m) * N + n] = float(acc);
        }
}

// Its gradients: dx = dy W (+ dx), dW = dy^T x (+ dW).
inline void linear_backward(const std::vector<float>& dy, const std::vector<float>& x, const std::vector<float>& W,
                            int M, int N, int K, std::vector<float>& dx, std::vector<float>& dW, bool accumulate_dx,
                            bool accumulate_dw) {
    for (int m = 0; m < M; m++)
        for (int k = 0; k < K; k++) {
            double acc = accumulate_dx ? dx[long(m) * K + k] : 0.0;
            for (int n = 0; n < N; n++) acc += double(dy[long(m) * N + n]) * W[long(n) * K + k];
            dx[long(m) * K + k] = float(acc);
        }
    for (int n = 0; n < N; n++)
        for (int k = 0; k < K; k++) {
            double acc = accumulate_dw ? dW[long(n) * K + k] : 0.0;
            for (int m = 0; m < M; m++) acc += double(dy[long(m) * N + n]) * x[long(m) * K + k];
            dW[long(n) * K + k] = float(acc);
        }
}

// ---------------------------------------------------------------------------------------------------------------
// Layers
// ---------------------------------------------------------------------------------------------------------------

// x[n] = E[token n]; E [V, D].
inline std::vector<float> embedding_forward(const std::vector<float>& E, const std::vector<int>& tokens, int D) {
    std::vector<float> x(tokens.size() * D);
    for (size_t n = 0; n < tokens.size(); n++)
        for (int d = 0; d < D; d++) x[n * D + d] = E[size_t(tokens[n]) * D + d];
    return x;
}

// dE[v] = sum of dx[n] over the tokens n equal to v (+ dE).
inline void embedding_backward(const std::vector<float>& dx, const std::vector<int>& tokens, int D,
                               std::vector<float>& dE, bool accumulate) {
    std::vector<double> sum(dE.size(), 0.0);
    for (size_t n = 0; n < tokens.size(); n++)
        for (int d = 0; d < D; d++) sum[size_t(tokens[n]) * D + d] += dx[n * D + d];
    for (size_t i = 0; i < dE.size(); i++) dE[i] = float((accumulate ? dE[i] : 0.0) + sum[i]);
}

// y = w * x / sqrt(mean(x^2) + eps) over N rows of width D, row n of x starting at x[n * stride]; y [N, D] is dense.
// rstd[n] = 1 / sqrt(mean(x_n^2) + eps), the statistic the backward pass reuses.
inline void rmsnorm_forward(const std::vector<float>& x, int N, int D, int stride, const std::vector<float>& w,
                            double eps, std::vector<float>& y, std::vector<float>& rstd) {
    for (int n = 0; n < N; n++) {
        const float* xr = &x[size_t(n) * stride];
        double ss = 0.0;
        for (int d = 0; d < D; d++) ss += double(xr[d]) * xr[d];
        double r = 1.0 / std::sqrt(ss / D + eps);
        for (int d = 0; d < D; d++) y[size_t(n) * D + d] = float(w[d] * xr[d] * r);
        rstd[n] = float(r);
    }
}

// The chain rule through y_d = w_d x_d r(x), with dr/dx_k = -x_k r^3 / D:
//   dx_k = sum_d dy_d w_d (delta_dk r - x_d x_k r^3 / D),   dw_d = sum_n dy_d x_d r.
// dx has x's row stride and only its first D columns are written (added to if accumulate_dx).
inline void rmsnorm_backward(const std::vector<float>& x, int N, int D, int stride, const std::vector<float>& w,
                             double eps, const std::vector<float>& dy, std::vector<float>& dx, std::vector<float>& dw,
                             bool accumulate_dx, bool accumulate_dw) {
    std::vector<double> dw_sum(D, 0.0);
    for (int n = 0; n < N; n++) {
        const float* xr = &x[size_t(n) * stride];
        const float* dyr = &dy[size_t(n) * D];
        double ss = 0.0;
        for (int d = 0; d < D; d++) ss += double(xr[d]) * xr[d];
        double r = 1.0 / std::sqrt(ss / D + eps);
        for (int k = 0; k < D; k++) {
            double g = 0.0;
            for (int d = 0; d < D; d++)
                g += double(dyr[d]) * w[d] * ((d == k ? r : 0.0) - double(xr[d]) * xr[k] * r * r * r / D);
            float& out = dx[size_t(n) * stride + k];
            out = float((accumulate_dx ? out : 0.0) + g);
        }
        for (int d = 0; d < D; d++) dw_sum[d] += double(dyr[d]) * xr[d] * r;
    }
    for (int d = 0; d < D; d++) dw[d] = float((accumulate_dw ? dw[d] : 0.0) + dw_sum[d]);
}

inline double sigmoid(double x) { return 1.0 / (1.0 + std::exp(-x)); }

// a = silu(g) * u with gu [N, 2I] = [g | u] per row; silu(g) = g sigmoid(g).
inline std::vector<float> swiglu_forward(const std::vector<float>& gu, int N, int I) {
    std::vector<float> a(size_t(N) * I);
    for (int n = 0; n < N; n++)
        for (int j = 0; j < I; j++) {
            double g = gu[size_t(n) * 2 * I + j], u = gu[size_t(n) * 2 * I + I + j];
            a[size_t(n) * I + j] = float(g * sigmoid(g) * u);
        }
    return a;
}

// dgu = [da u silu'(g) | da silu(g)], silu'(g) = sigmoid(g) (1 + g (1 - sigmoid(g))).
inline std::vector<float> swiglu_backward(const std::vector<float>& gu, const std::vector<float>& da, int N, int I) {
    std::vector<float> dgu(size_t(N) * 2 * I);
    for (int n = 0; n < N; n++)
        for (int j = 0; j < I; j++) {
            double g = gu[size_t(n) * 2 * I + j], u = gu[size_t(n) * 2 * I + I + j], d = da[size_t(n) * I + j];
            double s = sigmoid(g);
            dgu[size_t(n) * 2 * I + j] = float(d * u * s * (1.0 + g * (1.0 - s)));
            dgu[size_t(n) * 2 * I + I + j] = float(d * g * s);
        }
    return dgu;
}

// loss_n = log sum_v exp(logits_nv) - logits_n[target_n] and dlogits_n = scale (softmax(logits_n) - onehot(target_n)),
// both zero for a negative (ignored) target.
inline void cross_entropy(const std::vector<float>& logits, const std::vector<int>& targets, int V, double scale,
                          std::vector<float>& loss, std::vector<float>& dlogits) {
    for (size_t n = 0; n < targets.size(); n++) {
        const float* row = &logits[n * V];
        int target = targets[n];
        double sum = 0.0;
        for (int v = 0; v < V; v++) sum += std::exp(double(row[v]));
        loss[n] = target < 0 ? 0.0f : float(std::log(sum) - row[target]);
        for (int v = 0; v < V; v++)
            dlogits[n * V + v] = target < 0 ? 0.0f : float(scale * (std::exp(double(row[v])) / sum - (v == target)));
    }
}

inline double sum(const std::vector<float>& x, bool squared) {
    double s = 0.0;
    for (float v : x) s += squared ? double(v) * v : v;
    return s;
}

// One AdamW step (decoupled weight decay on the first n_decay parameters) after clipping the gradient to a global
// norm of max_grad_norm (0: no clipping), on FP32 master weights. The moments m and v hold BF16 values (V3 §3.3.3)
// and are rounded stochastically with the kernel's random words, rng_hash(seed, step, i) (low half for m, high half
// for v), so the two agree exactly unless their FP32 values before rounding differ in the last bit.
inline void adamw_step(const std::vector<float>& grad, long n_decay, const AdamW& opt, double max_grad_norm, int step,
                       uint64_t seed, std::vector<float>& master, std::vector<float>& m, std::vector<float>& v) {
    double norm = std::sqrt(sum(grad, true));
    double clip = (max_grad_norm > 0.0 && norm > max_grad_norm) ? max_grad_norm / norm : 1.0;
    for (size_t i = 0; i < grad.size(); i++) {
        double g = grad[i] * clip;
        double m_new = opt.beta1 * double(m[i]) + (1.0 - opt.beta1) * g;
        double v_new = opt.beta2 * double(v[i]) + (1.0 - opt.beta2) * g * g;
        double m_hat = m_new / (1.0 - std::pow(double(opt.beta1), step));
        double v_hat = v_new / (1.0 - std::pow(double(opt.beta2), step));
        double p = master[i];
        double decay = long(i) < n_decay ? opt.weight_decay * p : 0.0;
        master[i] = float(p - opt.lr * (m_hat / (std::sqrt(v_hat) + opt.eps) + decay));
        uint64_t r = rng_hash(seed, uint64_t(step), uint64_t(i));
        m[i] = to_float(bf16_stochastic_round(float(m_new), uint32_t(r)));
        v[i] = to_float(bf16_stochastic_round(float(v_new), uint32_t(r >> 32)));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Multi-head latent attention (V3 §2.1.1), on the layouts of attention.cuh
// ---------------------------------------------------------------------------------------------------------------

// RoPE with V3's interleaved pairs: (x_2i, x_2i+1) of a d_rope-wide vector turns by the angle pos * theta^(-2i/d_rope).
inline void rope(double* x, int d_rope, int pos, double theta) {
    for (int i = 0; i < d_rope / 2; i++) {
        double angle = pos * std::pow(theta, -2.0 * i / d_rope);
        double c = std::cos(angle), s = std::sin(angle), x0 = x[2 * i], x1 = x[2 * i + 1];
        x[2 * i] = x0 * c - x1 * s;
        x[2 * i + 1] = x0 * s + x1 * c;
    }
}

// The heads as batched matrices: Q, K [B*H, T, d_qk], V [B*H, T, d_v]. Head h of token (b, t) has the query
// [q_nope | RoPE(q_rope)] from q, the key [k_nope | RoPE(k_rope)] with k_nope from kvb and the token's one k_rope
// from kva (shared by every head, eqs. 3-4), and the value v from kvb.
struct MlaHeads {
    std::vector<double> Q, K, V;
};

inline MlaHeads mla_pack(const MlaDims& m, const std::vector<double>& q, const std::vector<double>& kva,
                         const std::vector<double>& kvb) {
    int dqk = m.d_qk(), dkv = m.d_nope + m.d_v, dkva = m.d_c + m.d_rope;
    long rows = m.heads() * m.T;
    MlaHeads out{std::vector<double>(rows * dqk), std::vector<double>(rows * dqk), std::vector<double>(rows * m.d_v)};
    for (int b = 0; b < m.B; b++)
        for (int t = 0; t < m.T; t++)
            for (int h = 0; h < m.H; h++) {
                long n = long(b) * m.T + t, row = (long(b) * m.H + h) * m.T + t;
                const double* qh = &q[(n * m.H + h) * dqk];
                const double* kvh = &kvb[(n * m.H + h) * dkv];
                double* Qr = &out.Q[row * dqk];
                double* Kr = &out.K[row * dqk];
                for (int c = 0; c < dqk; c++) Qr[c] = qh[c];
                for (int c = 0; c < m.d_nope; c++) Kr[c] = kvh[c];
                for (int c = 0; c < m.d_rope; c++) Kr[m.d_nope + c] = kva[n * dkva + m.d_c + c];
                rope(Qr + m.d_nope, m.d_rope, t, m.rope_theta);
                rope(Kr + m.d_nope, m.d_rope, t, m.rope_theta);
                for (int e = 0; e < m.d_v; e++) out.V[row * m.d_v + e] = kvh[m.d_nope + e];
            }
    return out;
}

// o [N, H*d_v]: for each sequence and head, o_t = sum_{j <= t} P_tj v_j with P_tj = softmax_j(q_t . k_j / sqrt(d_qk))
// over the causal prefix (eqs. 9-10). If P is given it receives the probabilities [B*H, T, T], zero above the
// diagonal.
inline std::vector<double> mla_attention_forward(const MlaDims& m, const std::vector<double>& q,
                                                 const std::vector<double>& kva, const std::vector<double>& kvb,
                                                 std::vector<double>* P = nullptr) {
    MlaHeads x = mla_pack(m, q, kva, kvb);
    int dqk = m.d_qk();
    double scale = 1.0 / std::sqrt(double(dqk));
    std::vector<double> o(size_t(m.N()) * m.H * m.d_v), p(m.T);
    if (P) P->assign(m.heads() * m.T * m.T, 0.0);
    for (int b = 0; b < m.B; b++)
        for (int h = 0; h < m.H; h++) {
            long head = long(b) * m.H + h;
            for (int t = 0; t < m.T; t++) {
                const double* qt = &x.Q[(head * m.T + t) * dqk];
                double sum = 0.0;
                for (int j = 0; j <= t; j++) {
                    const double* kj = &x.K[(head * m.T + j) * dqk];
                    double s = 0.0;
                    for (int c = 0; c < dqk; c++) s += qt[c] * kj[c];
                    p[j] = std::exp(s * scale);
                    sum += p[j];
                }
                for (int j = 0; j <= t; j++) p[j] /= sum;
                for (int e = 0; e < m.d_v; e++) {
                    double acc = 0.0;
                    for (int j = 0; j <= t; j++) acc += p[j] * x.V[(head * m.T + j) * m.d_v + e];
                    o[((long(b) * m.T + t) * m.H + h) * m.d_v + e] = acc;
                }
                if (P)
                    for (int j = 0; j <= t; j++) (*P)[(head * m.T + t) * m.T + j] = p[j];
            }
        }
    return o;
}


// ---------------------------------------------------------------------------------------------------------------
// Decoding with the latent cache (sampler.cuh; V2 §2.1.2: the up-projections absorbed)
// ---------------------------------------------------------------------------------------------------------------

// Row n of a step (R rows a sequence) is sequence n / R's token at position pos + n % R, kept inside the cache.
inline int latent_row_position(const std::vector<int>& pos, int n, int R, int max_len) {
    return std::min(pos[n / R] + n % R, max_len - 1);
}

// Each row's c_kv [rows, d_c] and its k_rope (kva's last d_rope columns), rotated to the row's position, go to the
// caches [S, max_len, d_c] and [S, max_len, d_rope] at that position.
inline void latent_cache_append(std::vector<float>& cache_ckv, std::vector<float>& cache_kr,
                                const std::vector<float>& ckv, const std::vector<float>& kva, int rows,
                                const std::vector<int>& pos, int R, int max_len, int d_c, int d_rope, double theta) {
    for (int n = 0; n < rows; n++) {
        const int p = latent_row_position(pos, n, R, max_len);
        const long slot = long(n / R) * max_len + p;
        for (int c = 0; c < d_c; c++) cache_ckv[slot * d_c + c] = ckv[long(n) * d_c + c];
        std::vector<double> k_rope(kva.begin() + long(n) * (d_c + d_rope) + d_c,
                                   kva.begin() + long(n + 1) * (d_c + d_rope));
        rope(k_rope.data(), d_rope, p, theta);
        for (int c = 0; c < d_rope; c++) cache_kr[slot * d_rope + c] = float(k_rope[c]);
    }
}

// Exercise 9 (exercises/09_latent_decode) asks for this function's body.
#ifdef EXERCISE_LATENT_DECODE
#include EXERCISE_LATENT_DECODE
#else
// ctx [rows, H, d_c]: for row n at position p and head h, sum_{j <= p} P_j c_kv_j with P = softmax_j of
// (q_abs_h . c_kv_j + RoPE(q_rope_h, p) . k_rope_j) / sqrt(d_qk), where q_abs [rows, H, d_c] = W_uk^T q_nope and
// q [rows, H, d_qk] holds q_rope in each head's last d_rope columns: the score of MLA's eq. 10 without forming a key.
inline std::vector<double> latent_attention_decode(const MlaDims& m, const std::vector<float>& q_abs,
                                                   const std::vector<float>& q, const std::vector<float>& cache_ckv,
                                                   const std::vector<float>& cache_kr, const std::vector<int>& pos,
                                                   int R, int max_len) {
    const int H = m.H, dc = m.d_c, dr = m.d_rope, dqk = m.d_qk(), rows = m.N();
    const double scale = 1.0 / std::sqrt(double(dqk));
    std::vector<double> ctx(size_t(rows) * H * dc, 0.0);
    for (int n = 0; n < rows; n++) {
        const int p = latent_row_position(pos, n, R, max_len);
        const long first = long(n / R) * max_len;
        for (int h = 0; h < H; h++) {
            const float* qa = &q_abs[(long(n) * H + h) * dc];
            std::vector<double> q_rope(q.begin() + (long(n) * H + h) * dqk + m.d_nope,
                                       q.begin() + (long(n) * H + h + 1) * dqk);
            rope(q_rope.data(), dr, p, m.rope_theta);
            std::vector<double> P(p + 1);
            double largest = -INFINITY, sum = 0.0;
            for (int j = 0; j <= p; j++) {
                double score = 0.0;
                for (int e = 0; e < dc; e++) score += double(qa[e]) * cache_ckv[(first + j) * dc + e];
                for (int e = 0; e < dr; e++) score += q_rope[e] * cache_kr[(first + j) * dr + e];
                P[j] = score * scale;
                largest = std::max(largest, P[j]);
            }
            for (double& x : P) sum += (x = std::exp(x - largest));
            for (int j = 0; j <= p; j++)
                for (int e = 0; e < dc; e++)
                    ctx[(long(n) * H + h) * dc + e] += P[j] / sum * cache_ckv[(first + j) * dc + e];
        }
    }
    return ctx;
}
#endif

}  // namespace ref
