// layers.cuh: the small kernels of the model, each with its launcher: embedding, RMSNorm, SwiGLU, cross-entropy,
// deterministic reductions and AdamW. The tests hold a plain CPU reference for every one of them.
//
// Storage type T is float (the fp32 precision mode) or bf16; arithmetic is FP32 everywhere. Every reduction runs
// in a fixed order (no floating-point atomics), so a run, and a resumed run, repeat bit for bit.
#pragma once

#include <algorithm>

#include "common.cuh"

constexpr int WARPS_PER_BLOCK = 8;

// ---------------------------------------------------------------------------------------------------------------
// Embedding: x[n] = E[token[n]]
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
__global__ void embedding_forward_kernel(T* __restrict__ x, const int* __restrict__ tokens, const T* __restrict__ E,
                                         int D) {
    const long n = blockIdx.x, token = tokens[n];
#pragma unroll
    for (int k = 0; k < ROW_ITEMS; k++) {
        const int d = row_grid_column(k);
        if (d < D) x[n * D + d] = E[token * D + d];
    }
}

// dE[v] = sum of dx[n] over the tokens n equal to v, summed in token order: deterministic without atomics. A warp
// per vocabulary row and 32 columns scans the tokens 32 at a time, a ballot finding the matches; their rows are
// loaded a few at a time, so that the loads overlap, and added in token order. (A scan per column, one token at a
// time, would wait on a load per token: milliseconds per step for tens of thousands of tokens.)
constexpr int EMBEDDING_SCAN_WORDS = 4;  // ballots per step of the scan: their token loads overlap
constexpr int EMBEDDING_LOADS = 4;       // matched rows loaded before they are added

template <typename T>
__global__ void embedding_backward_kernel(float* dE, const T* dx, const int* tokens, int N, int V, int D,
                                          bool accumulate) {
    const long warp = (long(blockIdx.x) * blockDim.x + threadIdx.x) / 32;
    const int lane = threadIdx.x % 32, tiles = (D + 31) / 32;
    if (warp >= long(V) * tiles) return;
    const int v = int(warp / tiles), d = int(warp % tiles) * 32 + lane;
    const bool column = d < D;
    float sum = accumulate && column ? dE[long(v) * D + d] : 0.0f;
    for (int n0 = 0; n0 < N; n0 += 32 * EMBEDDING_SCAN_WORDS) {
        unsigned match[EMBEDDING_SCAN_WORDS];
#pragma unroll
        for (int w = 0; w < EMBEDDING_SCAN_WORDS; w++) {
            int n = n0 + w * 32 + lane;
            match[w] = __ballot_sync(0xFFFFFFFFu, n < N && tokens[n] == v);
        }
#pragma unroll
        for (int w = 0; w < EMBEDDING_SCAN_WORDS; w++)
            for (unsigned m = match[w]; m != 0;) {  // EMBEDDING_LOADS matched rows at a time: loaded, then added
                float row[EMBEDDING_LOADS];
                int loaded = 0;
#pragma unroll
                for (int j = 0; j < EMBEDDING_LOADS; j++)
                    if (m != 0) {
                        int n = n0 + w * 32 + __ffs(m) - 1;
                        m &= m - 1;
                        row[j] = column ? to_float(dx[long(n) * D + d]) : 0.0f;
                        loaded = j + 1;
                    }
#pragma unroll
                for (int j = 0; j < EMBEDDING_LOADS; j++)
                    if (j < loaded) sum += row[j];
            }
    }
    if (column) dE[long(v) * D + d] = sum;
}

template <typename T>
void embedding_forward(T* x, const int* tokens, const T* E, int N, int D, cudaStream_t s) {
    embedding_forward_kernel<<<row_grid(N, D), ROW_THREADS, 0, s>>>(x, tokens, E, D);
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void embedding_backward(float* dE, const T* dx, const int* tokens, int N, int V, int D, bool accumulate,
                        cudaStream_t s) {
    long warps = long(V) * ((D + 31) / 32);
    embedding_backward_kernel<<<ceil_div(warps, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(dE, dx, tokens, N, V, D,
                                                                                                accumulate);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// Weight gradients summed over tokens (RMSNorm's weight, the router's W_g): each block of a kernel sums its rows
// into a partial sum, and sum_partials adds the blocks' partial sums in a fixed order (deterministic, no atomics).
// ---------------------------------------------------------------------------------------------------------------

// A block takes enough rows that there are at most PARTIAL_BLOCKS of them: enough to fill the GPU, few enough
// partial sums to add up.
constexpr int PARTIAL_BLOCKS = 512, PARTIAL_MIN_ROWS = WARPS_PER_BLOCK;
inline int partial_rows_per_block(int N) { return std::max(PARTIAL_MIN_ROWS, ceil_div(N, PARTIAL_BLOCKS)); }

// Scratch floats for the partial sums of up to N rows of width D.
inline long partial_scratch_size(int N, int D) {
    return long(std::min(ceil_div(N, PARTIAL_MIN_ROWS), PARTIAL_BLOCKS)) * D;
}

// out over 32 columns per block: warp w adds the partial sums w, w + 8, ..., then warp 0 adds the warps' sums in
// order (a fixed order: the same result on every run).
static __global__ void sum_partials_kernel(float* out, const float* partial, int blocks, int D, bool accumulate) {
    __shared__ float warp_sums[WARPS_PER_BLOCK][32];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, d = blockIdx.x * 32 + lane;
    float sum = 0.0f;
    if (d < D)
        for (int b = warp; b < blocks; b += WARPS_PER_BLOCK) sum += partial[long(b) * D + d];
    warp_sums[warp][lane] = sum;
    __syncthreads();
    if (warp > 0 || d >= D) return;
    for (int k = 1; k < WARPS_PER_BLOCK; k++) sum += warp_sums[k][lane];
    out[d] = accumulate ? out[d] + sum : sum;
}

// out [D] (+)= the sum of partial [blocks, D] over its rows.
inline void sum_partials(float* out, const float* partial, int blocks, int D, bool accumulate, cudaStream_t s) {
    sum_partials_kernel<<<ceil_div(D, 32), WARPS_PER_BLOCK * 32, 0, s>>>(out, partial, blocks, D, accumulate);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// RMSNorm: y = w * x / sqrt(mean(x^2) + eps), one warp per row, statistics in FP32.
//
// A warp loads its row once, into registers, P values (16 bytes where D, the stride and the pointers allow) a load:
// all of a lane's loads are in flight together, and the pass after the warp's sum reads registers instead of
// memory. Lane l holds the chunks at columns (k * 32 + l) * P, k < ROW_VALUES / P, of a ROW_SEGMENT-column segment;
// a wider row is taken a segment at a time, and the second pass loads again all but the last segment.
// ---------------------------------------------------------------------------------------------------------------

constexpr int ROW_VALUES = 16, ROW_SEGMENT = 32 * ROW_VALUES;

HD int row_segments(int D) { return (D + ROW_SEGMENT - 1) / ROW_SEGMENT; }

// The lane's chunks of one segment of a row, as stored: BF16 values take half the registers of their floats.
template <typename T, int P>
struct LaneRow {
    Chunk<T, P> chunk[ROW_VALUES / P];
    __device__ __forceinline__ float operator()(int k, int p) const { return to_float(chunk[k].v[p]); }
};

// The column of the lane's chunk k in segment s. P divides D, so a chunk is all inside the row or all past it.
template <int P>
__device__ __forceinline__ int lane_column(int s, int k) {
    return s * ROW_SEGMENT + (k * 32 + threadIdx.x % 32) * P;
}

template <typename T, int P>
__device__ __forceinline__ void load_lane_row(LaneRow<T, P>& r, const T* row, int s, int D) {
#pragma unroll
    for (int k = 0; k < ROW_VALUES / P; k++) {
        const int d = lane_column<P>(s, k);
        if (d < D) r.chunk[k] = *reinterpret_cast<const Chunk<T, P>*>(row + d);
    }
}

template <typename T, int P>
__global__ void rmsnorm_forward_kernel(T* y, float* rstd, const T* x, int x_stride, const T* w, int N, int D,
                                       float eps) {
    const int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, last = row_segments(D) - 1;
    if (n >= N) return;
    const T* xr = x + long(n) * x_stride;
    LaneRow<T, P> xs, ws;
    float ss = 0.0f;
    for (int s = 0; s <= last; s++) {
        load_lane_row(xs, xr, s, D);
        load_lane_row(ws, w, s, D);  // needed only after the sum, but in flight with x's loads
#pragma unroll
        for (int k = 0; k < ROW_VALUES / P; k++) {
            if (lane_column<P>(s, k) >= D) continue;
#pragma unroll
            for (int p = 0; p < P; p++) ss += xs(k, p) * xs(k, p);
        }
    }
    const float r = rsqrtf(warp_sum(ss) / D + eps);
    for (int s = last; s >= 0; s--) {
        if (s < last) {
            load_lane_row(xs, xr, s, D);
            load_lane_row(ws, w, s, D);
        }
#pragma unroll
        for (int k = 0; k < ROW_VALUES / P; k++) {
            const int d = lane_column<P>(s, k);
            if (d >= D) continue;
            float out[P];
#pragma unroll
            for (int p = 0; p < P; p++) out[p] = ws(k, p) * xs(k, p) * r;
            store_chunk(y + long(n) * D + d, out);
        }
    }
    if (threadIdx.x % 32 == 0) rstd[n] = r;
}

// dx = r (w dy - xhat mean(w dy xhat)), xhat = r x. Each block also writes its partial sum of dy * xhat over its
// rows (the weight gradient), which sum_partials adds up in a fixed order: each warp adds its rows in order into its
// own slots in shared memory, then the block adds its warps' sums in order.

// A warp's dw sums in shared memory: lane l's value p of chunk k of segment s at slot (s * ROW_VALUES + k * P + p)
// * 32 + l, so that the 32 lanes, each adding to its own columns, touch 32 consecutive slots (no bank conflicts).
template <int P>
__device__ __forceinline__ int dw_slot(int s, int k, int p) {
    return (s * ROW_VALUES + k * P + p) * 32 + threadIdx.x % 32;
}

// The column whose sum slot i holds: dw_slot's inverse.
template <int P>
__device__ __forceinline__ int dw_slot_column(int i) {
    const int lane = i % 32, q = i / 32, s = q / ROW_VALUES, k = q % ROW_VALUES / P, p = q % P;
    return s * ROW_SEGMENT + (k * 32 + lane) * P + p;
}

// One row: dx (+)= its gradient, and dy * xhat added to the warp's slots dw.
template <typename T, int P>
__device__ void rmsnorm_backward_row(T* dxr, float* dw, const T* dyr, const T* xr, const T* w, float r, int D,
                                     bool accumulate_dx) {
    const int last = row_segments(D) - 1;
    LaneRow<T, P> xs, dys, ws, dxs;
    auto load = [&](int s, bool with_dx) {
        load_lane_row(xs, xr, s, D);
        load_lane_row(dys, dyr, s, D);
        load_lane_row(ws, w, s, D);
        if (with_dx) load_lane_row(dxs, dxr, s, D);
    };
    float dot = 0.0f;
    for (int s = 0; s <= last; s++) {
        load(s, accumulate_dx && s == last);  // dx's loads join the row's where the row is one segment
#pragma unroll
        for (int k = 0; k < ROW_VALUES / P; k++) {
            if (lane_column<P>(s, k) >= D) continue;
#pragma unroll
            for (int p = 0; p < P; p++) dot += ws(k, p) * dys(k, p) * xs(k, p) * r;
        }
    }
    const float mean_dot = warp_sum(dot) / D;
    for (int s = last; s >= 0; s--) {
        if (s < last) load(s, accumulate_dx);
#pragma unroll
        for (int k = 0; k < ROW_VALUES / P; k++) {
            const int d = lane_column<P>(s, k);
            if (d >= D) continue;
            float g[P];
#pragma unroll
            for (int p = 0; p < P; p++) {
                const float xhat = xs(k, p) * r;
                g[p] = r * (ws(k, p) * dys(k, p) - xhat * mean_dot);
                if (accumulate_dx) g[p] = dxs(k, p) + g[p];
                dw[dw_slot<P>(s, k, p)] += dys(k, p) * xhat;
            }
            store_chunk(dxr + d, g);
        }
    }
}

template <typename T, int P>
__global__ void rmsnorm_backward_kernel(T* dx, float* dw_partial, const T* dy, const T* x, int x_stride, const T* w,
                                        const float* rstd, int N, int D, int rows_per_block, bool accumulate_dx) {
    extern __shared__ float warp_dw[];  // [WARPS_PER_BLOCK][slots]
    const int warp = threadIdx.x / 32, slots = row_segments(D) * ROW_SEGMENT;
    float* dw = warp_dw + warp * slots;
    for (int i = threadIdx.x % 32; i < slots; i += 32) dw[i] = 0.0f;  // slot i is lane i % 32's alone: no sync
    const int first = blockIdx.x * rows_per_block;
    for (int n = first + warp; n < min(first + rows_per_block, N); n += WARPS_PER_BLOCK)
        rmsnorm_backward_row<T, P>(dx + long(n) * x_stride, dw, dy + long(n) * D, x + long(n) * x_stride, w, rstd[n], D,
                                   accumulate_dx);
    __syncthreads();
    for (int i = threadIdx.x; i < slots; i += blockDim.x) {
        const int d = dw_slot_column<P>(i);
        if (d >= D) continue;
        float sum = 0.0f;
        for (int k = 0; k < WARPS_PER_BLOCK; k++) sum += warp_dw[k * slots + i];
        dw_partial[long(blockIdx.x) * D + d] = sum;
    }
}

// x may be a column slice of a wider matrix (x_stride >= D): MLA normalizes the first kv_lora_rank columns of
// kv_a in place of a copy. In the backward pass dx has x's row stride, and y and dy are dense.
template <typename T>
void rmsnorm_forward(T* y, float* rstd, const T* x, int x_stride, const T* w, int N, int D, float eps, cudaStream_t s) {
    with_power_of_two<16 / sizeof(T)>(vector_width<T>({D, x_stride}, {y, x, w}), [&](auto P) {
        rmsnorm_forward_kernel<T, P()>
            <<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(y, rstd, x, x_stride, w, N, D, eps);
    });
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void rmsnorm_backward(T* dx, float* dw, float* scratch, const T* dy, const T* x, int x_stride, const T* w,
                      const float* rstd, int N, int D, bool accumulate_dx, bool accumulate_dw, cudaStream_t s) {
    const int rows_per_block = partial_rows_per_block(N), blocks = ceil_div(N, rows_per_block);
    const size_t smem = sizeof(float) * WARPS_PER_BLOCK * row_segments(D) * ROW_SEGMENT;
    with_power_of_two<16 / sizeof(T)>(vector_width<T>({D, x_stride}, {dx, dy, x, w}), [&](auto P) {
        auto kernel = rmsnorm_backward_kernel<T, P()>;
        if (smem > 48 * 1024)  // wide rows need more than the default dynamic shared memory
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, int(smem)));
        kernel<<<blocks, WARPS_PER_BLOCK * 32, smem, s>>>(dx, scratch, dy, x, x_stride, w, rstd, N, D, rows_per_block,
                                                          accumulate_dx);
    });
    CUDA_CHECK_LAUNCH();
    sum_partials(dw, scratch, blocks, D, accumulate_dw, s);
}

// ---------------------------------------------------------------------------------------------------------------
// SwiGLU: a = silu(g) * u, where gu = [g | u] is one GEMM's output [N, 2I] (gate_proj and up_proj are stored
// one after the other, so they run as one projection).
// ---------------------------------------------------------------------------------------------------------------

HD float silu(float x) { return x / (1.0f + expf(-x)); }

// The kernels move P values at a time (16 bytes where I and the pointers allow), SWIGLU_ITEMS chunks a thread, their
// loads in flight together, and a block takes as many rows as that covers: a block per row left half of its threads
// idle at the routed experts' I = 256. A row wider than the block's chunks is the block's alone, in several steps.
constexpr int SWIGLU_THREADS = 256, SWIGLU_ITEMS = 2;

inline int swiglu_rows_per_block(int chunks_per_row) {
    return std::max(1, SWIGLU_THREADS * SWIGLU_ITEMS / chunks_per_row);
}

// The chunks of the block's rows, the last block's rows ending at N.
__device__ __forceinline__ int swiglu_block_chunks(long N, int rows_per_block, int per_row) {
    const long rows_left = N - long(blockIdx.x) * rows_per_block;
    return (rows_left < rows_per_block ? int(rows_left) : rows_per_block) * per_row;
}

// Where chunk i of the block's rows is: its g values in gu (its u values follow I later) and its values in a.
struct SwigluChunk {
    long gu, a;
};
template <int P>
__device__ __forceinline__ SwigluChunk swiglu_chunk(int i, int rows_per_block, int per_row, int I) {
    const long n = long(blockIdx.x) * rows_per_block + i / per_row;
    const int j = i % per_row * P;
    return {n * 2 * I + j, n * I + j};
}

template <typename T, int P>
__global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_forward_kernel(T* __restrict__ a, const T* __restrict__ gu, long N, int I, int rows_per_block) {
    const int per_row = I / P, chunks = swiglu_block_chunks(N, rows_per_block, per_row);
    for (int i0 = threadIdx.x; i0 < chunks; i0 += SWIGLU_ITEMS * SWIGLU_THREADS) {
        SwigluChunk at[SWIGLU_ITEMS];
        float g[SWIGLU_ITEMS][P], u[SWIGLU_ITEMS][P];
#pragma unroll
        for (int k = 0; k < SWIGLU_ITEMS; k++) {
            const int i = i0 + k * SWIGLU_THREADS;
            if (i >= chunks) break;
            at[k] = swiglu_chunk<P>(i, rows_per_block, per_row, I);
            load_chunk(g[k], gu + at[k].gu);
            load_chunk(u[k], gu + at[k].gu + I);
        }
#pragma unroll
        for (int k = 0; k < SWIGLU_ITEMS; k++) {
            if (i0 + k * SWIGLU_THREADS >= chunks) break;
            float out[P];
#pragma unroll
            for (int p = 0; p < P; p++) out[p] = silu(g[k][p]) * u[k][p];
            store_chunk(a + at[k].a, out);
        }
    }
}

template <typename T, int P>
__global__ void __launch_bounds__(SWIGLU_THREADS)
    swiglu_backward_kernel(T* __restrict__ dgu, const T* __restrict__ da, const T* __restrict__ gu, long N, int I,
                           int rows_per_block) {
    const int per_row = I / P, chunks = swiglu_block_chunks(N, rows_per_block, per_row);
    for (int i0 = threadIdx.x; i0 < chunks; i0 += SWIGLU_ITEMS * SWIGLU_THREADS) {
        SwigluChunk at[SWIGLU_ITEMS];
        float g[SWIGLU_ITEMS][P], u[SWIGLU_ITEMS][P], d[SWIGLU_ITEMS][P];
#pragma unroll
        for (int k = 0; k < SWIGLU_ITEMS; k++) {
            const int i = i0 + k * SWIGLU_THREADS;
            if (i >= chunks) break;
            at[k] = swiglu_chunk<P>(i, rows_per_block, per_row, I);
            load_chunk(g[k], gu + at[k].gu);
            load_chunk(u[k], gu + at[k].gu + I);
            load_chunk(d[k], da + at[k].a);
        }
#pragma unroll
        for (int k = 0; k < SWIGLU_ITEMS; k++) {
            if (i0 + k * SWIGLU_THREADS >= chunks) break;
            float dg[P], du[P];
#pragma unroll
            for (int p = 0; p < P; p++) {
                float sig = 1.0f / (1.0f + expf(-g[k][p]));
                dg[p] = d[k][p] * u[k][p] * sig * (1.0f + g[k][p] * (1.0f - sig));
                du[p] = d[k][p] * g[k][p] * sig;
            }
            store_chunk(dgu + at[k].gu, dg);
            store_chunk(dgu + at[k].gu + I, du);
        }
    }
}

template <typename T>
void swiglu_forward(T* a, const T* gu, long N, int I, cudaStream_t s) {
    with_power_of_two<16 / sizeof(T)>(vector_width<T>({I}, {a, gu}), [&](auto P) {
        const int rows = swiglu_rows_per_block(I / P());
        swiglu_forward_kernel<T, P()><<<ceil_div(N, rows), SWIGLU_THREADS, 0, s>>>(a, gu, N, I, rows);
    });
    CUDA_CHECK_LAUNCH();
}

template <typename T>
void swiglu_backward(T* dgu, const T* da, const T* gu, long N, int I, cudaStream_t s) {
    with_power_of_two<16 / sizeof(T)>(vector_width<T>({I}, {dgu, da, gu}), [&](auto P) {
        const int rows = swiglu_rows_per_block(I / P());
        swiglu_backward_kernel<T, P()><<<ceil_div(N, rows), SWIGLU_THREADS, 0, s>>>(dgu, da, gu, N, I, rows);
    });
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// Cross-entropy with its gradient in the same pass, one warp per token. A negative target (padding, a prompt
// token in SFT) contributes neither loss nor gradient. dlogits = scale (softmax - onehot); scale = 1 / #targets.
// ---------------------------------------------------------------------------------------------------------------

// The row's maximum and sum of exp(x - max) over V logits scaled by `scale`, in every lane of the warp.
__device__ __forceinline__ void row_softmax_stats(const float* row, int V, float scale, int lane, float& mx,
                                                  float& sum) {
    mx = -INFINITY, sum = 0.0f;
    for (int v = lane; v < V; v += 32) mx = fmaxf(mx, row[v] * scale);
    mx = warp_max(mx);
    for (int v = lane; v < V; v += 32) sum += expf(row[v] * scale - mx);
    sum = warp_sum(sum);
}

template <typename T>
__global__ void cross_entropy_kernel(float* loss, T* dlogits, const float* logits, const int* targets, int N, int V,
                                     float scale) {
    int n = blockIdx.x * WARPS_PER_BLOCK + threadIdx.x / 32, lane = threadIdx.x % 32;
    if (n >= N) return;
    const float* row = logits + long(n) * V;
    int target = targets[n];
    float mx, sum;
    row_softmax_stats(row, V, 1.0f, lane, mx, sum);
    float g = target < 0 ? 0.0f : scale;
    for (int v = lane; v < V; v += 32)
        dlogits[long(n) * V + v] = from_float<T>(g * (expf(row[v] - mx) / sum - (v == target ? 1.0f : 0.0f)));
    if (lane == 0) loss[n] = target < 0 ? 0.0f : logf(sum) + mx - row[target];
}

template <typename T>
void cross_entropy(float* loss, T* dlogits, const float* logits, const int* targets, int N, int V, float scale,
                   cudaStream_t s) {
    cross_entropy_kernel<<<ceil_div(N, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(loss, dlogits, logits, targets,
                                                                                       N, V, scale);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// Deterministic sums: a fixed grid writes per-block partials, one block adds them in order.
// ---------------------------------------------------------------------------------------------------------------

constexpr int REDUCE_BLOCKS = 264, REDUCE_THREADS = 512;

__device__ __forceinline__ float block_sum(float x) {
    __shared__ float warp_sums[32];
    x = warp_sum(x);
    if (threadIdx.x % 32 == 0) warp_sums[threadIdx.x / 32] = x;
    __syncthreads();
    x = threadIdx.x < blockDim.x / 32 ? warp_sums[threadIdx.x] : 0.0f;
    return warp_sum(x);
}

static __global__ void partial_sums_kernel(float* partial, const float* x, long n, bool squared) {
    float sum = 0.0f;
    for (long i = long(blockIdx.x) * blockDim.x + threadIdx.x; i < n; i += long(gridDim.x) * blockDim.x)
        sum += squared ? x[i] * x[i] : x[i];
    sum = block_sum(sum);
    if (threadIdx.x == 0) partial[blockIdx.x] = sum;
}

static __global__ void final_sum_kernel(float* out, const float* partial, int n) {
    float sum = 0.0f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) sum += partial[i];
    sum = block_sum(sum);
    if (threadIdx.x == 0) *out = sum;
}

// *out = sum of x (or of x^2); scratch holds REDUCE_BLOCKS floats.
inline void sum_reduce(float* out, float* scratch, const float* x, long n, bool squared, cudaStream_t s) {
    partial_sums_kernel<<<REDUCE_BLOCKS, REDUCE_THREADS, 0, s>>>(scratch, x, n, squared);
    CUDA_CHECK_LAUNCH();
    final_sum_kernel<<<1, REDUCE_THREADS, 0, s>>>(out, scratch, REDUCE_BLOCKS);
    CUDA_CHECK_LAUNCH();
}

template <typename U>
__global__ void add_kernel(U* y, const U* x, long n) {
    const long i = long(blockIdx.x) * blockDim.x + threadIdx.x;
    if (i < n) y[i] += x[i];
}

// y += x, elementwise (gradient accumulation: the sums of several passes).
template <typename U>
void add_into(U* y, const U* x, long n, cudaStream_t s) {
    add_kernel<<<elementwise_blocks(n), 256, 0, s>>>(y, x, n);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// AdamW on FP32 master weights with BF16 moments (V3 §3.3.3). The moments are rounded stochastically, so small
// updates are kept on average rather than lost to BF16's 8-bit mantissa. Weight decay applies to the first
// n_decay parameters: the parameter layout puts every matrix before every norm weight.
// ---------------------------------------------------------------------------------------------------------------

struct AdamW {
    float lr, beta1 = 0.9f, beta2 = 0.95f, eps = 1e-8f, weight_decay = 0.1f;
};

// Each thread updates ADAMW_ITEMS parameters, 256 apart, loading all of them before it updates any, so that their
// loads are in flight together (for T = float, weights is master: the stores could not pass the loads).
constexpr int ADAMW_ITEMS = 4;

template <typename T>
__global__ void adamw_kernel(float* master, T* weights, bf16* m, bf16* v, const float* grad, const float* grad_norm,
                             long n, long n_decay, AdamW opt, float max_grad_norm, int step, uint64_t seed,
                             const int* skip, long first) {
    if (skip && (*skip || !isfinite(*grad_norm))) return;
    const float norm = sqrtf(*grad_norm);
    const float clip = (max_grad_norm > 0.0f && norm > max_grad_norm) ? max_grad_norm / norm : 1.0f;
    const long start = long(blockIdx.x) * ADAMW_ITEMS * blockDim.x + threadIdx.x;
    float g[ADAMW_ITEMS], m_old[ADAMW_ITEMS], v_old[ADAMW_ITEMS], p[ADAMW_ITEMS];
#pragma unroll
    for (int k = 0; k < ADAMW_ITEMS; k++) {
        const long i = start + k * blockDim.x;
        if (i >= n) break;
        g[k] = grad[i] * clip, m_old[k] = to_float(m[i]), v_old[k] = to_float(v[i]), p[k] = master[i];
    }
#pragma unroll
    for (int k = 0; k < ADAMW_ITEMS; k++) {
        const long i = start + k * blockDim.x;
        if (i >= n) break;
        float m_new = opt.beta1 * m_old[k] + (1.0f - opt.beta1) * g[k];
        float v_new = opt.beta2 * v_old[k] + (1.0f - opt.beta2) * g[k] * g[k];
        float m_hat = m_new / (1.0f - powf(opt.beta1, float(step)));
        float v_hat = v_new / (1.0f - powf(opt.beta2, float(step)));
        float decay = first + i < n_decay ? opt.weight_decay * p[k] : 0.0f;
        float updated = p[k] - opt.lr * (m_hat / (sqrtf(v_hat) + opt.eps) + decay);
        master[i] = updated;
        weights[i] = from_float<T>(updated);
        uint64_t r = rng_hash(seed, uint64_t(step), uint64_t(first + i));
        m[i] = bf16_stochastic_round(m_new, uint32_t(r));
        v[i] = bf16_stochastic_round(v_new, uint32_t(r >> 32));
    }
}

// grad_norm points at the sum of squared gradients (on the device, so the step needs no host round trip). Where
// skip is given and *skip is set (a non-finite value met in FP8 quantization), or the gradient is not finite,
// nothing changes. A slice of the parameters (ZeRO-1's shard, nccl.cuh) starts at parameter `first`: the pointers
// point at it, and decay and the random rounding go by the whole vector's index, so that a slice's update is the
// whole update's, value for value.
template <typename T>
void adamw_update(float* master, T* weights, bf16* m, bf16* v, const float* grad, const float* grad_norm, long n,
                  long n_decay, const AdamW& opt, float max_grad_norm, int step, uint64_t seed, cudaStream_t s,
                  const int* skip = nullptr, long first = 0) {
    adamw_kernel<<<ceil_div(n, 256 * ADAMW_ITEMS), 256, 0, s>>>(master, weights, m, v, grad, grad_norm, n, n_decay, opt,
                                                                max_grad_norm, step, seed, skip, first);
    CUDA_CHECK_LAUNCH();
}
