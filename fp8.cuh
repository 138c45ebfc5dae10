// fp8.cuh: FP8 training as DeepSeek-V3 §3.3 does it: E4M3 everywhere, fine-grained scales computed online.
//
// E4M3 has 3 mantissa bits and a range of +-448. One scale per tensor would let a single outlier push every other
// value into E4M3's subnormals; V3 §3.3.1 scales small groups instead, each by its own absolute maximum:
//   activations and output gradients: 1x128 tiles, 128 consecutive elements of a row along K;
//   weights:                          128x128 blocks;
// and the weight gradient, whose reduction runs over tokens, needs the activations and gradients quantized along the
// token dimension (V3's 128x1 tiles), which here is a transposed copy quantized in 1x128 tiles.
// A scale is amax / 448, found in the same pass that quantizes (online, no history of past amaxes). A dimension
// that is not a multiple of 128 ends in a partial tile with a scale of its own.
//
// Layouts (row-major): x [M, K] -> q [M, K] and scales [ceil(K/128), M]: the scales of one K-tile are contiguous
// over rows, which is what a GEMM reading a 128-row slab of A for one K-block wants. Weights W [N, K] -> q [N, K]
// and scales [ceil(N/128), ceil(K/128)] (DeepSeek's `weight_scale_inv`), with the transposed copy qT [K, N] and
// its scales [ceil(K/128), ceil(N/128)] for the data gradient.
#pragma once

#include <cuda_fp8.h>

#include "common.cuh"
#include "layers.cuh"

using fp8 = __nv_fp8_e4m3;

constexpr float E4M3_MAX = 448.0f;
constexpr int N_C = 128;  // V3 §3.3: the tile edge of the scales, and the interval of the accumulation fix

// The scale that maps a tile's largest magnitude to E4M3's largest value. An all-zero tile gets 1: its values
// quantize to zero whatever the scale, and a zero scale would make dequantization 0 * inf.
__host__ __device__ inline float tile_scale(float amax) { return amax > 0.0f ? amax / E4M3_MAX : 1.0f; }

// E4M3 of x / scale, rounded to nearest even and saturated at +-448.
__host__ __device__ inline fp8 quantize(float x, float scale) { return fp8(x / scale); }

__host__ __device__ inline int scale_tiles(int n) { return (n + N_C - 1) / N_C; }

// ---------------------------------------------------------------------------------------------------------------
// 1x128 tiles along rows: activations and output gradients for the forward and data-gradient GEMMs
// ---------------------------------------------------------------------------------------------------------------

// One warp per tile: each lane holds 4 of its 128 values, the warp agrees on the amax, every lane writes its 4.
// A NaN or Inf anywhere sets *nonfinite (the step that made it must be skipped: V3 trains without loss scaling,
// so a non-finite value is a diverging step, not an overflow to retry).
template <typename T>
__global__ void quantize_rows_kernel(fp8* q, float* scales, int* nonfinite, const T* x, int M, int K) {
    const int tiles = scale_tiles(K);
    const long tile = long(blockIdx.x) * WARPS_PER_BLOCK + threadIdx.x / 32;
    const int lane = threadIdx.x % 32;
    if (tile >= long(M) * tiles) return;
    const int m = int(tile / tiles), t = int(tile % tiles);
    const long row = long(m) * K;
    float v[N_C / 32], amax = 0.0f;
    bool finite = true;
    for (int i = 0; i < N_C / 32; i++) {
        int k = t * N_C + i * 32 + lane;
        v[i] = k < K ? to_float(x[row + k]) : 0.0f;
        finite &= isfinite(v[i]);
        amax = fmaxf(amax, fabsf(v[i]));
    }
    amax = warp_max(amax);
    if (!__all_sync(0xFFFFFFFFu, finite) && lane == 0) *nonfinite = 1;
    const float scale = tile_scale(amax);
    for (int i = 0; i < N_C / 32; i++) {
        int k = t * N_C + i * 32 + lane;
        if (k < K) q[row + k] = quantize(v[i], scale);
    }
    if (lane == 0) scales[long(t) * M + m] = scale;
}

template <typename T>
void quantize_rows(fp8* q, float* scales, int* nonfinite, const T* x, int M, int K, cudaStream_t s) {
    long tiles = long(M) * scale_tiles(K);
    quantize_rows_kernel<<<ceil_div(tiles, WARPS_PER_BLOCK), WARPS_PER_BLOCK * 32, 0, s>>>(q, scales, nonfinite, x, M,
                                                                                           K);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// 128x1 tiles: the transposed copy for the weight-gradient GEMM, quantized along the token dimension
// ---------------------------------------------------------------------------------------------------------------

// x [R, C] -> qT [C, R] with scales [ceil(R/128), C]: each column's 128-row tiles become 1x128 tiles of a row of
// qT. A block takes 128 rows x 32 columns through shared memory, so that it reads rows and writes rows.
constexpr int TRANSPOSE_COLUMNS = 32;

template <typename T>
__global__ void quantize_transposed_kernel(fp8* qT, float* scales, int* nonfinite, const T* x, int R, int C) {
    __shared__ float tile[N_C][TRANSPOSE_COLUMNS + 1];  // +1: the column-wise reads hit distinct banks
    __shared__ float warp_amax[WARPS_PER_BLOCK][TRANSPOSE_COLUMNS];
    __shared__ float column_scale[TRANSPOSE_COLUMNS];
    const int r0 = blockIdx.y * N_C, c0 = blockIdx.x * TRANSPOSE_COLUMNS;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    float amax = 0.0f;
    bool finite = true;
    for (int r = warp; r < N_C; r += WARPS_PER_BLOCK) {  // lane = column: consecutive lanes read consecutive columns
        bool inside = r0 + r < R && c0 + lane < C;
        float v = inside ? to_float(x[long(r0 + r) * C + c0 + lane]) : 0.0f;
        finite &= isfinite(v);
        amax = fmaxf(amax, fabsf(v));
        tile[r][lane] = v;
    }
    warp_amax[warp][lane] = amax;
    if (!__all_sync(0xFFFFFFFFu, finite) && lane == 0) *nonfinite = 1;
    __syncthreads();
    if (warp == 0) {
        float column_amax = 0.0f;
        for (int w = 0; w < WARPS_PER_BLOCK; w++) column_amax = fmaxf(column_amax, warp_amax[w][lane]);
        column_scale[lane] = tile_scale(column_amax);
        if (c0 + lane < C) scales[long(blockIdx.y) * C + c0 + lane] = column_scale[lane];
    }
    __syncthreads();
    for (int c = warp; c < TRANSPOSE_COLUMNS; c += WARPS_PER_BLOCK) {  // lane = row: a row of qT per warp
        if (c0 + c >= C) continue;
        for (int r = lane; r < N_C; r += 32)
            if (r0 + r < R) qT[long(c0 + c) * R + r0 + r] = quantize(tile[r][c], column_scale[c]);
    }
}

template <typename T>
void quantize_transposed(fp8* qT, float* scales, int* nonfinite, const T* x, int R, int C, cudaStream_t s) {
    dim3 grid(ceil_div(C, TRANSPOSE_COLUMNS), scale_tiles(R));
    quantize_transposed_kernel<<<grid, WARPS_PER_BLOCK * 32, 0, s>>>(qT, scales, nonfinite, x, R, C);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// 128x128 blocks: weights, with the transposed copy the data gradient needs
// ---------------------------------------------------------------------------------------------------------------

// One thread block per 128x128 block of W [N, K] (FP32 master weights): the block's amax, then q [N, K] and
// qT [K, N]. Transposing a quantized block is exact and keeps its scale, so both copies share one scale grid,
// stored once per orientation.
static __global__ void quantize_weight_kernel(fp8* q, fp8* qT, float* scales, float* scalesT, int* nonfinite,
                                              const float* W, int N, int K) {
    __shared__ float warp_amax[WARPS_PER_BLOCK];
    const int nb = blockIdx.y, kb = blockIdx.x, n0 = nb * N_C, k0 = kb * N_C;
    const int lane = threadIdx.x % 32, warp = threadIdx.x / 32;
    const int rows = min(N_C, N - n0), cols = min(N_C, K - k0);
    float amax = 0.0f;
    bool finite = true;
    for (int r = warp; r < rows; r += WARPS_PER_BLOCK)
        for (int c = lane; c < cols; c += 32) {
            float v = W[long(n0 + r) * K + k0 + c];
            finite &= isfinite(v);
            amax = fmaxf(amax, fabsf(v));
        }
    amax = warp_max(amax);
    if (!__all_sync(0xFFFFFFFFu, finite) && lane == 0) *nonfinite = 1;
    if (lane == 0) warp_amax[warp] = amax;
    __syncthreads();
    float block_amax = 0.0f;
    for (int w = 0; w < WARPS_PER_BLOCK; w++) block_amax = fmaxf(block_amax, warp_amax[w]);
    const float scale = tile_scale(block_amax);
    if (threadIdx.x == 0) {
        scales[long(nb) * gridDim.x + kb] = scale;
        scalesT[long(kb) * gridDim.y + nb] = scale;
    }
    for (int r = warp; r < rows; r += WARPS_PER_BLOCK)
        for (int c = lane; c < cols; c += 32)
            q[long(n0 + r) * K + k0 + c] = quantize(W[long(n0 + r) * K + k0 + c], scale);
    for (int c = warp; c < cols; c += WARPS_PER_BLOCK)  // a row of qT per warp: W is read down a column
        for (int r = lane; r < rows; r += 32)
            qT[long(k0 + c) * N + n0 + r] = quantize(W[long(n0 + r) * K + k0 + c], scale);
}

inline void quantize_weight(fp8* q, fp8* qT, float* scales, float* scalesT, int* nonfinite, const float* W, int N,
                            int K, cudaStream_t s) {
    dim3 grid(scale_tiles(K), scale_tiles(N));
    quantize_weight_kernel<<<grid, WARPS_PER_BLOCK * 32, 0, s>>>(q, qT, scales, scalesT, nonfinite, W, N, K);
    CUDA_CHECK_LAUNCH();
}
