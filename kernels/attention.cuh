// attention.cuh: the core of multi-head latent attention (V3 §2.1.1, eqs. 1-11), between the projections.
//
// Inputs are the outputs of MLA's projections for N = B*T tokens:
//   q   [N, H*(d_nope + d_rope)]  = W_uq c_q, per head [q_nope | q_rope]
//   kva [N, d_c + d_rope]         = W_dkv_kr h, [c_kv (before its RMSNorm) | k_rope], k_rope shared by all heads
//   kvb [N, H*(d_nope + d_v)]     = W_ukv RMSNorm(c_kv), per head [k_nope | v]
// The kernels rotate q_rope and k_rope (RoPE, eq. 3 and 8), lay the heads out as batched matrices
//   Q, K [B*H, T, d_nope + d_rope] (k_rope copied to every head), V [B*H, T, d_v],
// and compute o = softmax(Q K^T / sqrt(d_nope + d_rope), causal) V with cuBLASLt batched GEMMs, the
// probabilities P kept for the backward pass. T is at most SOFTMAX_MAX_T = 2048: a warp holds a row of scores.
#pragma once

#include <type_traits>

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

// The angle of RoPE's pair i at position pos: V3's interleaved pairs, angle pos * theta^(-2i/d_rope).
HD void rope_cos_sin(int pos, int i, int d_rope, float theta, float& c, float& s) {
    float inv_freq = 1.0f / powf(theta, float(2 * i) / float(d_rope));
    sincosf(float(pos) * inv_freq, &s, &c);
}

// Rotates the pair (x0, x1) = (x_2i, x_2i+1) by the angle whose cosine and sine are c and s; inverse = true applies
// the transpose rotation (the backward pass).
HD void rope_apply(float& x0, float& x1, float c, float s, bool inverse) {
    if (inverse) s = -s;
    float y0 = x0 * c - x1 * s, y1 = x1 * c + x0 * s;
    x0 = y0, x1 = y1;
}

// RoPE on pair i of a d_rope-wide vector at position pos.
HD void rope_rotate(float& x0, float& x1, int pos, int i, int d_rope, float theta, bool inverse) {
    float c, s;
    rope_cos_sin(pos, i, d_rope, theta, c, s);
    rope_apply(x0, x1, c, s, inverse);
}

// ---------------------------------------------------------------------------------------------------------------
// The layout kernels move P values at a time (16 bytes where the widths allow, see vector_width in common.cuh), a
// chunk per thread, and a block takes MLA_TOKENS tokens: a block per token and a thread per value left the GPU
// scheduling blocks of a few hundred bytes.
// ---------------------------------------------------------------------------------------------------------------

constexpr int MLA_TOKENS = 8, MLA_THREADS = 256;

// Item i of a block's tokens, with per_head chunks of P values per (token, head): its token n (position t), head h,
// first column c of the chunk, the (token, head) pair's index in the token layout, and the row of (sequence, head,
// position) in the head layout.
struct MlaItem {
    int n, t, h, c, slot;  // slot: the token's place among the block's tokens
    long token_head, row;
};
__device__ __forceinline__ MlaItem mla_item(int i, int per_head, int P, const MlaDims& m) {
    MlaItem it;
    it.slot = i / (m.H * per_head), it.n = blockIdx.x * MLA_TOKENS + it.slot;
    it.h = i / per_head % m.H, it.c = i % per_head * P, it.t = it.n % m.T;
    it.token_head = long(it.n) * m.H + it.h;
    it.row = (long(it.n / m.T) * m.H + it.h) * m.T + it.t;
    return it;
}

// The cosine and sine of every rope pair of the block's tokens, [MLA_TOKENS][d_rope/2] in shared memory: computed
// once per block, a chunk's rotation costs a shared-memory read instead of powf and sincosf in a few lanes of a warp.
__device__ __forceinline__ const float2* rope_table(const MlaDims& m) {
    extern __shared__ float2 rope_cs[];
    const int half = m.d_rope / 2;
    for (int j = threadIdx.x; j < MLA_TOKENS * half; j += blockDim.x) {
        float c, s;
        rope_cos_sin((blockIdx.x * MLA_TOKENS + j / half) % m.T, j % half, m.d_rope, m.rope_theta, c, s);
        rope_cs[j] = make_float2(c, s);
    }
    __syncthreads();
    return rope_cs;
}

inline size_t rope_table_bytes(const MlaDims& m) { return MLA_TOKENS * (m.d_rope / 2) * sizeof(float2); }

// Rotates the chunk x of P values that starts at rope column r0, with its token's row cs of rope_table: its pairs
// where P > 1 (r0 is even then), else the one value, whose partner is read from beside it in memory.
template <int P, typename T>
__device__ __forceinline__ void rope_chunk(float (&x)[P], const T* at, int r0, const float2* cs, bool inverse) {
    if constexpr (P == 1) {
        const bool odd = r0 % 2;
        float x0 = odd ? to_float(at[-1]) : x[0], x1 = odd ? x[0] : to_float(at[1]);
        rope_apply(x0, x1, cs[r0 / 2].x, cs[r0 / 2].y, inverse);
        x[0] = odd ? x1 : x0;
    } else {
#pragma unroll
        for (int k = 0; k < P; k += 2) rope_apply(x[k], x[k + 1], cs[(r0 + k) / 2].x, cs[(r0 + k) / 2].y, inverse);
    }
}

// Calls chunk(it, token_cs) for every item of the block's tokens: a (token, head) and a chunk of P values of its
// [Q row | K row | V row], with token_cs its token's row of rope_table. The pack kernel and its adjoint walk the
// same items.
template <int P, typename Chunk>
__device__ __forceinline__ void for_each_qkv_chunk(const MlaDims& m, Chunk chunk) {
    const int per_head = (2 * m.d_qk() + m.d_v) / P;
    const float2* cs = rope_table(m);
    for (int i = threadIdx.x; i < MLA_TOKENS * m.H * per_head; i += blockDim.x) {
        const MlaItem it = mla_item(i, per_head, P, m);
        if (it.n >= m.N()) return;
        chunk(it, cs + it.slot * (m.d_rope / 2));
    }
}

// Q, K and V in the head layout, a (token, head) at a time: its chunks of [Q row | K row | V row]. q_nope, k_nope
// and v are copied; q_rope and k_rope (the latter from kva, shared by the heads) are rotated.
template <typename T, int P>
__global__ void __launch_bounds__(MLA_THREADS)
    mla_pack_kernel(T* __restrict__ Q, T* __restrict__ K, T* __restrict__ V, const T* __restrict__ q,
                    const T* __restrict__ kva, const T* __restrict__ kvb, MlaDims m) {
    const int d_qk = m.d_qk();
    for_each_qkv_chunk<P>(m, [=](const MlaItem& it, const float2* token_cs) {
        const T* qh = q + it.token_head * d_qk;
        const T* kvh = kvb + it.token_head * (m.d_nope + m.d_v);
        int c = it.c;
        float x[P];
        if (c < d_qk) {
            load_chunk(x, qh + c);
            if (c >= m.d_nope) rope_chunk(x, qh + c, c - m.d_nope, token_cs, false);
            store_chunk(Q + it.row * d_qk + c, x);
        } else if ((c -= d_qk) < d_qk) {
            const T* from = c < m.d_nope ? kvh + c : kva + long(it.n) * (m.d_c + m.d_rope) + m.d_c + c - m.d_nope;
            load_chunk(x, from);
            if (c >= m.d_nope) rope_chunk(x, from, c - m.d_nope, token_cs, false);
            store_chunk(K + it.row * d_qk + c, x);
        } else {
            c -= d_qk;
            load_chunk(x, kvh + m.d_nope + c);
            store_chunk(V + it.row * m.d_v + c, x);
        }
    });
}

// The adjoint of mla_pack_kernel for q and kvb: the gradients move back through the layout and the rotation. The
// k_rope chunks are left to mla_unpack_krope_kernel, which sums them over the heads.
template <typename T, int P>
__global__ void __launch_bounds__(MLA_THREADS)
    mla_unpack_qkv_kernel(T* __restrict__ dq, T* __restrict__ dkvb, const T* __restrict__ dQ, const T* __restrict__ dK,
                          const T* __restrict__ dV, MlaDims m) {
    const int d_qk = m.d_qk();
    for_each_qkv_chunk<P>(m, [=](const MlaItem& it, const float2* token_cs) {
        T* dqh = dq + it.token_head * d_qk;
        T* dkvh = dkvb + it.token_head * (m.d_nope + m.d_v);
        int c = it.c;
        float x[P];
        if (c < d_qk) {
            const T* from = dQ + it.row * d_qk + c;
            load_chunk(x, from);
            if (c >= m.d_nope) rope_chunk(x, from, c - m.d_nope, token_cs, true);
            store_chunk(dqh + c, x);
        } else if ((c -= d_qk) < d_qk) {
            if (c >= m.d_nope) return;  // k_rope is left to mla_unpack_krope_kernel
            load_chunk(x, dK + it.row * d_qk + c);
            store_chunk(dkvh + c, x);
        } else {
            c -= d_qk;
            load_chunk(x, dV + it.row * m.d_v + c);
            store_chunk(dkvh + m.d_nope + c, x);
        }
    });
}

// Moves per-head outputs [B*H, T, d_v] to token rows [N, H*d_v] (to_tokens) or back (the backward pass).
template <typename T, int P>
__global__ void __launch_bounds__(MLA_THREADS)
    heads_tokens_kernel(T* __restrict__ dst, const T* __restrict__ src, MlaDims m, bool to_tokens) {
    const int per_head = m.d_v / P;
    for (int i = threadIdx.x; i < MLA_TOKENS * m.H * per_head; i += blockDim.x) {
        const MlaItem it = mla_item(i, per_head, P, m);
        if (it.n >= m.N()) return;
        const long token_at = it.token_head * m.d_v + it.c, head_at = it.row * m.d_v + it.c;
        float x[P];
        load_chunk(x, src + (to_tokens ? head_at : token_at));
        store_chunk(dst + (to_tokens ? token_at : head_at), x);
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

// Causal softmax over rows of S [B*H*T, T] and its backward: a warp per row, which it reads once. Lane l holds the
// row's columns l, l + 32, ... (PER_LANE of them) in registers; those past the causal limit i read as 0.
constexpr int SOFTMAX_MAX_PER_LANE = 64, SOFTMAX_MAX_T = 32 * SOFTMAX_MAX_PER_LANE;

template <int PER_LANE, typename U>
__device__ __forceinline__ void load_causal_row(float (&x)[PER_LANE], const U* row, int i, int lane) {
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) x[k] = lane + 32 * k <= i ? to_float(row[lane + 32 * k]) : 0.0f;
}

template <int PER_LANE, typename T>
__device__ __forceinline__ void store_row(T* row, const float (&x)[PER_LANE], int Tn, int lane) {
#pragma unroll
    for (int k = 0; k < PER_LANE; k++)
        if (lane + 32 * k < Tn) row[lane + 32 * k] = from_float<T>(x[k]);
}

// P_ij = exp(scale S_ij) / sum_{k<=i} exp(scale S_ik), 0 for j > i.
template <typename T, int PER_LANE>
__global__ void causal_softmax_forward_kernel(T* P, const float* S, long rows, int Tn, float scale) {
    const long r = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const int i = int(r % Tn);
    float x[PER_LANE];
    load_causal_row(x, S + r * Tn, i, lane);
    float mx = -INFINITY;
#pragma unroll
    for (int k = 0; k < PER_LANE; k++)
        if (lane + 32 * k <= i) mx = fmaxf(mx, x[k] * scale);
    mx = warp_max(mx);
    float sum = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) {
        x[k] = lane + 32 * k <= i ? expf(x[k] * scale - mx) : 0.0f;
        sum += x[k];
    }
    const float inv = 1.0f / warp_sum(sum);
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) x[k] *= inv;
    store_row(P + r * Tn, x, Tn, lane);
}

// dS_ij = scale P_ij (dP_ij - sum_k P_ik dP_ik): the softmax Jacobian, with the 1/sqrt(d) of the scores folded in.
template <typename T, int PER_LANE>
__global__ void causal_softmax_backward_kernel(T* dS, const float* dP, const T* P, long rows, int Tn, float scale) {
    const long r = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (r >= rows) return;
    const int i = int(r % Tn);
    float p[PER_LANE], dp[PER_LANE];
    load_causal_row(p, P + r * Tn, i, lane);
    load_causal_row(dp, dP + r * Tn, i, lane);
    float dot = 0.0f;
#pragma unroll
    for (int k = 0; k < PER_LANE; k++)
        if (lane + 32 * k <= i) dot += p[k] * dp[k];
    dot = warp_sum(dot);
#pragma unroll
    for (int k = 0; k < PER_LANE; k++) p[k] = lane + 32 * k <= i ? scale * p[k] * (dp[k] - dot) : 0.0f;
    store_row(dS + r * Tn, p, Tn, lane);
}

// ---------------------------------------------------------------------------------------------------------------
// Launchers
// ---------------------------------------------------------------------------------------------------------------

// Calls launch(std::integral_constant<int, PER_LANE>) for rows of Tn scores.
template <typename Launch>
void with_softmax_row(int Tn, Launch launch) {
    if (Tn > SOFTMAX_MAX_T)
        throw std::invalid_argument("attention over " + std::to_string(Tn) + " tokens: at most " +
                                    std::to_string(SOFTMAX_MAX_T) + " (the softmax holds a row in a warp's registers)");
    int per_lane = 1;
    while (32 * per_lane < Tn) per_lane *= 2;
    with_power_of_two<SOFTMAX_MAX_PER_LANE>(per_lane, launch);
    CUDA_CHECK_LAUNCH();
}

inline dim3 mla_grid(const MlaDims& m) { return dim3(ceil_div(m.N(), MLA_TOKENS)); }

template <typename T>
void mla_pack(T* Q, T* K, T* V, const T* q, const T* kva, const T* kvb, const MlaDims& m, cudaStream_t s) {
    const int p = vector_width<T>({m.d_nope, m.d_rope, m.d_v, m.d_c}, {Q, K, V, q, kva, kvb});
    with_power_of_two<16 / sizeof(T)>(p, [&](auto P) {
        mla_pack_kernel<T, P()><<<mla_grid(m), MLA_THREADS, rope_table_bytes(m), s>>>(Q, K, V, q, kva, kvb, m);
    });
    CUDA_CHECK_LAUNCH();
}

// dq, dkvb, and the k_rope columns of dkva, from the gradients of Q, K and V.
template <typename T>
void mla_unpack(T* dq, T* dkva, T* dkvb, const T* dQ, const T* dK, const T* dV, const MlaDims& m, cudaStream_t s) {
    const int p = vector_width<T>({m.d_nope, m.d_rope, m.d_v}, {dq, dkvb, dQ, dK, dV});
    with_power_of_two<16 / sizeof(T)>(p, [&](auto P) {
        mla_unpack_qkv_kernel<T, P()><<<mla_grid(m), MLA_THREADS, rope_table_bytes(m), s>>>(dq, dkvb, dQ, dK, dV, m);
    });
    CUDA_CHECK_LAUNCH();
    mla_unpack_krope_kernel<<<elementwise_blocks(long(m.N()) * m.d_rope / 2), 256, 0, s>>>(dkva, dK, m);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void heads_tokens(T* dst, const T* src, const MlaDims& m, bool to_tokens, cudaStream_t s) {
    with_power_of_two<16 / sizeof(T)>(vector_width<T>({m.d_v}, {dst, src}), [&](auto P) {
        heads_tokens_kernel<T, P()><<<mla_grid(m), MLA_THREADS, 0, s>>>(dst, src, m, to_tokens);
    });
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
    with_softmax_row(m.T, [&](auto PER_LANE) {
        causal_softmax_forward_kernel<T, PER_LANE()><<<ceil_div(rows, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(
            saved.P, scratch.S, rows, m.T, m.softmax_scale());
    });
    // O = P V
    matmul(blas, s, scratch.O, saved.P, saved.V,
           Matmul{m.T, m.d_v, m.T, false, false, 1.0f, 0.0f, int(m.heads()), tt, v_stride, v_stride});
    heads_tokens(o, scratch.O, m, true, s);
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
    heads_tokens(dO, d_o, m, false, s);
    // dP = dO V^T, dV = P^T dO
    matmul(blas, s, dP, dO, saved.V, Matmul{m.T, m.T, m.d_v, false, true, 1.0f, 0.0f, heads, v_stride, v_stride, tt});
    matmul(blas, s, scratch.dV, saved.P, dO,
           Matmul{m.T, m.d_v, m.T, true, false, 1.0f, 0.0f, heads, tt, v_stride, v_stride});
    long rows = m.heads() * m.T;
    with_softmax_row(m.T, [&](auto PER_LANE) {
        causal_softmax_backward_kernel<T, PER_LANE()><<<ceil_div(rows, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(
            scratch.dS, dP, saved.P, rows, m.T, m.softmax_scale());
    });
    // dQ = dS K, dK = dS^T Q
    matmul(blas, s, scratch.dQ, scratch.dS, saved.K,
           Matmul{m.T, m.d_qk(), m.T, false, false, 1.0f, 0.0f, heads, tt, qk_stride, qk_stride});
    matmul(blas, s, scratch.dK, scratch.dS, saved.Q,
           Matmul{m.T, m.d_qk(), m.T, true, false, 1.0f, 0.0f, heads, tt, qk_stride, qk_stride});
    mla_unpack(dq, dkva, dkvb, scratch.dQ, scratch.dK, scratch.dV, m, s);
}
