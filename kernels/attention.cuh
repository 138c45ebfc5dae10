// attention.cuh: the core of multi-head latent attention (V3 §2.1.1, eqs. 1-11), between the projections.
//
// Inputs are the outputs of MLA's projections for N = B*T tokens:
//   q   [N, H*(d_nope + d_rope)]  = W_uq c_q, per head [q_nope | q_rope]
//   kva [N, d_c + d_rope]         = W_dkv_kr h, [c_kv (before its RMSNorm) | k_rope], k_rope shared by all heads
//   kvb [N, H*(d_nope + d_v)]     = W_ukv RMSNorm(c_kv), per head [k_nope | v]
// The kernels rotate q_rope and k_rope (RoPE, eq. 3 and 8), lay the heads out as batched matrices
//   Q, K [B*H, T, d_nope + d_rope] (k_rope copied to every head), V [B*H, T, d_v],
// and compute o = softmax(Q K^T / sqrt(d_nope + d_rope), causal) V with cuBLASLt batched GEMMs, the
// probabilities P kept for the backward pass.
#pragma once

#include "gemm.cuh"
#include "layers.cuh"

struct MlaDims {
    int B, T, H, d_nope, d_rope, d_c, d_v;
    float rope_theta;
    HD int d_qk() const { return d_nope + d_rope; }
    HD int N() const { return B * T; }
    HD long heads() const { return long(B) * H; }
    HD float softmax_scale() const { return 1.0f / sqrtf(float(d_qk())); }
};

// RoPE on the pair (x0, x1) = (x_2i, x_2i+1) of a d_rope-wide vector at position pos: V3's interleaved pairs,
// angle pos * theta^(-2i/d_rope). inverse = true applies the transpose rotation (the backward pass).
HD void rope_rotate(float& x0, float& x1, int pos, int i, int d_rope, float theta, bool inverse) {
    float inv_freq = 1.0f / powf(theta, float(2 * i) / float(d_rope));
    float s, c;
    sincosf(float(pos) * inv_freq, &s, &c);
    if (inverse) s = -s;
    float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
    x0 = y0, x1 = y1;
}

// Element c of head h of token n: a nope column of q and k, a rotated rope pair, or a v column.
template <typename T>
__device__ __forceinline__ void mla_pack_element(T* __restrict__ Q, T* __restrict__ K, T* __restrict__ V,
                                                 const T* __restrict__ q, const T* __restrict__ kva,
                                                 const T* __restrict__ kvb, const MlaDims& m, int n, int h, int c) {
    int half = m.d_rope / 2, b = n / m.T, t = n % m.T;
    long row = (long(b) * m.H + h) * m.T + t;
    const T* qh = q + long(n) * m.H * m.d_qk() + h * m.d_qk();
    const T* kvh = kvb + long(n) * m.H * (m.d_nope + m.d_v) + h * (m.d_nope + m.d_v);
    T* Qr = Q + row * m.d_qk();
    T* Kr = K + row * m.d_qk();
    if (c < m.d_nope) {
        Qr[c] = qh[c];
        Kr[c] = kvh[c];
    } else if (c < m.d_nope + half) {
        int i = c - m.d_nope, j = m.d_nope + 2 * i;
        float q0 = to_float(qh[j]), q1 = to_float(qh[j + 1]);
        const T* kr = kva + long(n) * (m.d_c + m.d_rope) + m.d_c + 2 * i;
        float k0 = to_float(kr[0]), k1 = to_float(kr[1]);
        rope_rotate(q0, q1, t, i, m.d_rope, m.rope_theta, false);
        rope_rotate(k0, k1, t, i, m.d_rope, m.rope_theta, false);
        Qr[j] = from_float<T>(q0), Qr[j + 1] = from_float<T>(q1);
        Kr[j] = from_float<T>(k0), Kr[j + 1] = from_float<T>(k1);
    } else {
        int e = c - m.d_nope - half;
        V[row * m.d_v + e] = kvh[m.d_nope + e];
    }
}

// A row of row_grid per token, an item per (head, nope column, rope pair or v column): builds Q, K and V.
template <typename T>
__global__ void mla_pack_kernel(T* __restrict__ Q, T* __restrict__ K, T* __restrict__ V, const T* __restrict__ q,
                                const T* __restrict__ kva, const T* __restrict__ kvb, MlaDims m) {
    const int half = m.d_rope / 2, width = m.d_nope + half + m.d_v, n = blockIdx.x;
#pragma unroll
    for (int item = 0; item < ROW_ITEMS; item++) {
        const int column = row_grid_column(item);
        if (column >= m.H * width) break;
        mla_pack_element(Q, K, V, q, kva, kvb, m, n, column / width, column % width);
    }
}

// The adjoint of mla_pack_element for q and kvb: gradients flow back through the layout and the rotation.
template <typename T>
__device__ __forceinline__ void mla_unpack_element(T* __restrict__ dq, T* __restrict__ dkvb, const T* __restrict__ dQ,
                                                   const T* __restrict__ dK, const T* __restrict__ dV,
                                                   const MlaDims& m, int n, int h, int c) {
    int half = m.d_rope / 2, b = n / m.T, t = n % m.T;
    long row = (long(b) * m.H + h) * m.T + t;
    T* dqh = dq + long(n) * m.H * m.d_qk() + h * m.d_qk();
    T* dkvh = dkvb + long(n) * m.H * (m.d_nope + m.d_v) + h * (m.d_nope + m.d_v);
    if (c < m.d_nope) {
        dqh[c] = dQ[row * m.d_qk() + c];
        dkvh[c] = dK[row * m.d_qk() + c];
    } else if (c < m.d_nope + half) {
        int i = c - m.d_nope, j = m.d_nope + 2 * i;
        float g0 = to_float(dQ[row * m.d_qk() + j]), g1 = to_float(dQ[row * m.d_qk() + j + 1]);
        rope_rotate(g0, g1, t, i, m.d_rope, m.rope_theta, true);
        dqh[j] = from_float<T>(g0), dqh[j + 1] = from_float<T>(g1);
    } else {
        int e = c - m.d_nope - half;
        dkvh[m.d_nope + e] = dV[row * m.d_v + e];
    }
}

template <typename T>
__global__ void mla_unpack_qkv_kernel(T* __restrict__ dq, T* __restrict__ dkvb, const T* __restrict__ dQ,
                                      const T* __restrict__ dK, const T* __restrict__ dV, MlaDims m) {
    const int width = m.d_nope + m.d_rope / 2 + m.d_v, n = blockIdx.x;
#pragma unroll
    for (int item = 0; item < ROW_ITEMS; item++) {
        const int column = row_grid_column(item);
        if (column >= m.H * width) break;
        mla_unpack_element(dq, dkvb, dQ, dK, dV, m, n, column / width, column % width);
    }
}

// k_rope is shared by the heads, so its gradient is the sum over heads, taken in head order.
template <typename T>
__global__ void mla_unpack_krope_kernel(T* dkva, const T* dK, MlaDims m) {
    int half = m.d_rope / 2;
    long idx = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (idx >= long(m.N()) * half) return;
    int i = int(idx % half), n = int(idx / half);
    int b = n / m.T, t = n % m.T, j = m.d_nope + 2 * i;
    float g0 = 0.0f, g1 = 0.0f;
    for (int h = 0; h < m.H; h++) {
        const T* dKr = dK + ((long(b) * m.H + h) * m.T + t) * m.d_qk();
        g0 += to_float(dKr[j]), g1 += to_float(dKr[j + 1]);
    }
    rope_rotate(g0, g1, t, i, m.d_rope, m.rope_theta, true);
    T* out = dkva + long(n) * (m.d_c + m.d_rope) + m.d_c + 2 * i;
    out[0] = from_float<T>(g0), out[1] = from_float<T>(g1);
}

// Causal softmax over rows of S [B*H*T, T]: P_ij = exp(scale S_ij) / sum_{k<=i} exp(scale S_ik), 0 for j > i.
template <typename T>
__global__ void causal_softmax_forward_kernel(T* P, const float* S, long rows, int Tn, float scale) {
    long r = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    int i = int(r % Tn);
    const float* s = S + r * Tn;
    float mx = -INFINITY;
    for (int j = lane; j <= i; j += 32) mx = fmaxf(mx, s[j] * scale);
    mx = warp_max(mx);
    float sum = 0.0f;
    for (int j = lane; j <= i; j += 32) sum += expf(s[j] * scale - mx);
    float inv = 1.0f / warp_sum(sum);
    for (int j = lane; j < Tn; j += 32) P[r * Tn + j] = from_float<T>(j <= i ? expf(s[j] * scale - mx) * inv : 0.0f);
}

// dS_ij = scale P_ij (dP_ij - sum_k P_ik dP_ik): the softmax Jacobian, with the 1/sqrt(d) of the scores folded in.
template <typename T>
__global__ void causal_softmax_backward_kernel(T* dS, const float* dP, const T* P, long rows, int Tn, float scale) {
    long r = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    int lane = threadIdx.x % 32;
    if (r >= rows) return;
    int i = int(r % Tn);
    const float* dp = dP + r * Tn;
    const T* p = P + r * Tn;
    float dot = 0.0f;
    for (int j = lane; j <= i; j += 32) dot += to_float(p[j]) * dp[j];
    dot = warp_sum(dot);
    for (int j = lane; j < Tn; j += 32)
        dS[r * Tn + j] = from_float<T>(j <= i ? scale * to_float(p[j]) * (dp[j] - dot) : 0.0f);
}

// Moves per-head outputs [B*H, T, d_v] to token rows [N, H*d_v] (to_tokens) or back (the backward pass).
template <typename T>
__global__ void heads_tokens_kernel(T* __restrict__ dst, const T* __restrict__ src, MlaDims m, bool to_tokens) {
    const int n = blockIdx.x;
#pragma unroll
    for (int item = 0; item < ROW_ITEMS; item++) {
        const int column = row_grid_column(item), h = column / m.d_v, e = column % m.d_v;
        if (column >= m.H * m.d_v) break;
        long idx = long(n) * m.H * m.d_v + column;
        long head_idx = ((long(n / m.T) * m.H + h) * m.T + n % m.T) * m.d_v + e;
        if (to_tokens)
            dst[idx] = src[head_idx];
        else
            dst[head_idx] = src[idx];
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
void mla_pack(T* Q, T* K, T* V, const T* q, const T* kva, const T* kvb, const MlaDims& m, cudaStream_t s) {
    mla_pack_kernel<<<row_grid(m.N(), m.H * (m.d_nope + m.d_rope / 2 + m.d_v)), ROW_THREADS, 0, s>>>(Q, K, V, q,
                                                                                                        kva, kvb, m);
    CUDA_CHECK_LAUNCH();
}

// dq, dkvb, and the k_rope columns of dkva, from the gradients of Q, K and V.
template <typename T>
void mla_unpack(T* dq, T* dkva, T* dkvb, const T* dQ, const T* dK, const T* dV, const MlaDims& m, cudaStream_t s) {
    mla_unpack_qkv_kernel<<<row_grid(m.N(), m.H * (m.d_nope + m.d_rope / 2 + m.d_v)), ROW_THREADS, 0, s>>>(
        dq, dkvb, dQ, dK, dV, m);
    CUDA_CHECK_LAUNCH();
    mla_unpack_krope_kernel<<<elementwise_blocks(long(m.N()) * m.d_rope / 2), 256, 0, s>>>(dkva, dK, m);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
struct MlaSaved {  // what the backward pass needs, per layer
    T *Q, *K, *V, *P;
};

template <typename T>
struct MlaScratch {  // reused by every layer: S doubles as dP, O as dO
    float* S;
    T *O, *dS, *dQ, *dK, *dV;
};

// o [N, H*d_v] = attention(q, kva, kvb); fills saved.{Q,K,V,P}.
template <typename T>
void mla_attention_forward(Blas& blas, cudaStream_t s, const MlaDims& m, T* o, const MlaSaved<T>& saved,
                           const MlaScratch<T>& scratch, const T* q, const T* kva, const T* kvb) {
    mla_pack(saved.Q, saved.K, saved.V, q, kva, kvb, m, s);
    long tt = long(m.T) * m.T;
    long qk_stride = long(m.T) * m.d_qk(), v_stride = long(m.T) * m.d_v;
    // S = Q K^T, per (sequence, head)
    matmul(blas, s, scratch.S, saved.Q, saved.K,
           Matmul{m.T, m.T, m.d_qk(), false, true, 1.0f, 0.0f, int(m.heads()), qk_stride, qk_stride, tt});
    long rows = m.heads() * m.T;
    causal_softmax_forward_kernel<<<ceil_div(rows, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(
        saved.P, scratch.S, rows, m.T, m.softmax_scale());
    CUDA_CHECK_LAUNCH();
    // O = P V
    matmul(blas, s, scratch.O, saved.P, saved.V,
           Matmul{m.T, m.d_v, m.T, false, false, 1.0f, 0.0f, int(m.heads()), tt, v_stride, v_stride});
    heads_tokens_kernel<<<row_grid(m.N(), m.H * m.d_v), ROW_THREADS, 0, s>>>(o, scratch.O, m, true);
    CUDA_CHECK_LAUNCH();
}

// From do [N, H*d_v]: dq, dkvb, and the k_rope columns of dkva (its c_kv columns come from the RMSNorm).
template <typename T>
void mla_attention_backward(Blas& blas, cudaStream_t s, const MlaDims& m, T* dq, T* dkva, T* dkvb,
                            const MlaSaved<T>& saved, const MlaScratch<T>& scratch, const T* d_o) {
    long tt = long(m.T) * m.T;
    long qk_stride = long(m.T) * m.d_qk(), v_stride = long(m.T) * m.d_v;
    int heads = int(m.heads());
    T* dO = scratch.O;
    float* dP = scratch.S;
    heads_tokens_kernel<<<row_grid(m.N(), m.H * m.d_v), ROW_THREADS, 0, s>>>(dO, d_o, m, false);
    CUDA_CHECK_LAUNCH();
    // dP = dO V^T, dV = P^T dO
    matmul(blas, s, dP, dO, saved.V, Matmul{m.T, m.T, m.d_v, false, true, 1.0f, 0.0f, heads, v_stride, v_stride, tt});
    matmul(blas, s, scratch.dV, saved.P, dO,
           Matmul{m.T, m.d_v, m.T, true, false, 1.0f, 0.0f, heads, tt, v_stride, v_stride});
    long rows = m.heads() * m.T;
    causal_softmax_backward_kernel<<<ceil_div(rows, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(
        scratch.dS, dP, saved.P, rows, m.T, m.softmax_scale());
    CUDA_CHECK_LAUNCH();
    // dQ = dS K, dK = dS^T Q
    matmul(blas, s, scratch.dQ, scratch.dS, saved.K,
           Matmul{m.T, m.d_qk(), m.T, false, false, 1.0f, 0.0f, heads, tt, qk_stride, qk_stride});
    matmul(blas, s, scratch.dK, scratch.dS, saved.Q,
           Matmul{m.T, m.d_qk(), m.T, true, false, 1.0f, 0.0f, heads, tt, qk_stride, qk_stride});
    mla_unpack(dq, dkva, dkvb, scratch.dQ, scratch.dK, scratch.dV, m, s);
}
