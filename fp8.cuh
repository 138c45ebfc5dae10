// fp8.cuh: FP8 training as DeepSeek-V3 §3.3 does it: E4M3 everywhere, fine-grained scales computed online.
//
// E4M3 has 3 mantissa bits and a range of +-448. One scale per tensor would let a single outlier push every other
// value into E4M3's subnormals; V3 §3.3.2 scales small groups instead, each by its own absolute maximum:
//   activations and output gradients: 1x128 tiles, 128 consecutive elements of a row along K;
//   weights:                          128x128 blocks;
// and the weight gradient, whose reduction runs over tokens, needs the activations and gradients quantized along the
// token dimension (V3's 128x1 tiles), which here is a transposed copy quantized in 1x128 tiles.
// A scale is amax / 448 (at least the smallest normal float, see tile_scale), found in the same pass that quantizes
// (online, no history of past amaxes). A dimension that is not a multiple of 128 ends in a partial tile with a scale
// of its own.
//
// Layouts (row-major): x [M, K] -> q [M, K] and scales [ceil(K/128), M]: the scales of one K-tile are contiguous
// over rows, which is what a GEMM reading a 128-row slab of A for one K-block wants. Weights W [N, K] -> q [N, K]
// and scales [ceil(N/128), ceil(K/128)] (DeepSeek's `weight_scale_inv`), each row of scales padded to a multiple
// of 4 (cuBLASLt's layout), with the transposed copy qT [K, N] and its scales [ceil(K/128), ceil(N/128)] for the
// data gradient. These are the layouts cuBLASLt reads, so both GEMM paths take the same tensors.
#pragma once

#include <cuda_fp8.h>

#include <cfloat>
#include <memory>

#include "kernels/common.cuh"
#include "kernels/gemm.cuh"
#include "kernels/gpu.cuh"
#include "kernels/layers.cuh"
#include "kernels/params.h"

using fp8 = __nv_fp8_e4m3;

constexpr float E4M3_MAX = 448.0f;
// V3 §3.3.2: the tile edge of the scales, and the interval of the accumulation fix. One interval is four Hopper wgmma
// instructions of K = 32; and as the scales change every 128 elements of K, each block's partial sum must be
// multiplied by its own scales before it joins another block's: promoting it to FP32 there costs only the
// multiply-add that the dequantization needs anyway.
constexpr int N_C = 128;

// The scale that maps a tile's largest magnitude to E4M3's largest value. An all-zero tile gets 1: its values
// quantize to zero whatever the scale, and a zero scale would make dequantization 0 * inf. A scale is at least
// the smallest normal float, so that its inverse, which quantization multiplies by, is finite (a tile of values
// near 1e-38, as a nearly saturated softmax can leave in a gradient, would otherwise quantize 0 to 0 * inf = NaN).
__host__ __device__ inline float tile_scale(float amax) {
    return amax > 0.0f ? fmaxf(amax / E4M3_MAX, FLT_MIN) : 1.0f;
}

// E4M3 of x / scale, rounded to nearest even and saturated at +-448, is taken as x times the tile's 1 / scale: one
// division per tile instead of one per element. Four such products go into one word, the first in the low byte, by
// two conversions of a pair each (sm_89's cvt.rn.satfinite.e4m3x2).
__device__ __forceinline__ uint32_t e4m3x4(float a, float b, float c, float d) {
    const uint32_t lo = __nv_cvt_float2_to_fp8x2(make_float2(a, b), __NV_SATFINITE, __NV_E4M3);
    const uint32_t hi = __nv_cvt_float2_to_fp8x2(make_float2(c, d), __NV_SATFINITE, __NV_E4M3);
    return lo | hi << 16;
}

__host__ __device__ inline int scale_tiles(int n) { return (n + N_C - 1) / N_C; }

// The row stride of a 128x128 block-scale grid whose rows hold the blocks of `cols` columns.
__host__ __device__ inline int block_scale_stride(int cols) { return (scale_tiles(cols) + 3) / 4 * 4; }

// Scale slots of a weight [rows, cols] in 128x128 blocks.
__host__ __device__ inline long block_scale_count(int rows, int cols) {
    return long(scale_tiles(rows)) * block_scale_stride(cols);
}

// ---------------------------------------------------------------------------------------------------------------
// A 128x128 tile in registers: the shape every quantizer works on
// ---------------------------------------------------------------------------------------------------------------
//
// A block of 16 warps holds one 128x128 tile of a row-major matrix [R, C]: warp w holds rows w, w + 16, ...,
// w + 112 of the tile and lane l columns 4l ... 4l + 3 of each, so that a warp reads and writes whole rows in
// 4-element vectors. Outside the matrix the tile holds zeros, which change no amax. The quantizers read their input
// once and write each output once, in rows. Eight rows a thread keep the block at 62 registers a thread (ptxas
// -v), two blocks on a multiprocessor: while one waits on its loads, the other computes and stores.
constexpr int TILE_THREADS = 512, TILE_WARPS = TILE_THREADS / 32, TILE_ROWS = N_C / TILE_WARPS;

__device__ inline void load_vector4(float (&v)[4], const float* p) {
    float4 f = *reinterpret_cast<const float4*>(p);
    v[0] = f.x, v[1] = f.y, v[2] = f.z, v[3] = f.w;
}

__device__ inline void load_vector4(float (&v)[4], const bf16* p) {
    uint2 u = *reinterpret_cast<const uint2*>(p);
    float2 lo = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.x));
    float2 hi = __bfloat1622float2(*reinterpret_cast<const __nv_bfloat162*>(&u.y));
    v[0] = lo.x, v[1] = lo.y, v[2] = hi.x, v[3] = hi.y;
}

// The first `valid` of p[0..3] (the rest are zero), as one vector load where all four are there and aligned.
template <typename T>
__device__ void load4(float (&v)[4], const T* p, int valid, bool vector) {
    if (valid == 4 && vector) return load_vector4(v, p);
    for (int j = 0; j < 4; j++) v[j] = j < valid ? to_float(p[j]) : 0.0f;
}

// The first `valid` bytes of the word to p, as one 4-byte store where all four go and p is aligned.
__device__ inline void store4(fp8* p, uint32_t word, int valid, bool vector) {
    if (valid == 4 && vector) {
        *reinterpret_cast<uint32_t*>(p) = word;
        return;
    }
    for (int j = 0; j < valid; j++) reinterpret_cast<uint8_t*>(p)[j] = uint8_t(word >> 8 * j);
}

// max(a, |x|), and NaN where either is NaN (PTX max.NaN, sm_80): a tile's amax taken this way also says whether the
// tile holds a NaN or an Inf, without a test per value.
__device__ __forceinline__ float amax_nan(float a, float x) {
    float m;
    asm("max.NaN.f32 %0, %1, %2;" : "=f"(m) : "f"(a), "f"(fabsf(x)));
    return m;
}

// This thread's part of the tile at (r0, c0) of x [R, C]. Inside the matrix the loads have no branch between them,
// so that all 8 are in flight at once: one memory latency per tile, not 8.
template <typename T>
__device__ void load_tile(float (&v)[TILE_ROWS][4], const T* x, int R, int C, int r0, int c0, bool vector) {
    const int c = c0 + 4 * (threadIdx.x % 32);
    const int r = r0 + threadIdx.x / 32;
    if (vector && r0 + N_C <= R && c0 + N_C <= C) {
#pragma unroll
        for (int i = 0; i < TILE_ROWS; i++) load_vector4(v[i], x + long(r + TILE_WARPS * i) * C + c);
    } else {
#pragma unroll
        for (int i = 0; i < TILE_ROWS; i++) {
            const int ri = r + TILE_WARPS * i;
            load4(v[i], x + long(min(ri, R - 1)) * C + c, ri < R ? min(4, max(0, C - c)) : 0, vector);
        }
    }
}

// The tile quantized to q [R, C], this thread's row i by the inverse scale row_inverse(i).
template <typename RowInverse>
__device__ void store_tile(fp8* q, const float (&v)[TILE_ROWS][4], RowInverse row_inverse, int R, int C, int r0, int c0,
                           bool vector) {
    const int c = c0 + 4 * (threadIdx.x % 32);
#pragma unroll
    for (int i = 0; i < TILE_ROWS; i++) {
        const int r = r0 + threadIdx.x / 32 + TILE_WARPS * i;
        if (r >= R) break;
        const float inverse = row_inverse(i);
        store4(q + long(r) * C + c, e4m3x4(v[i][0] * inverse, v[i][1] * inverse, v[i][2] * inverse, v[i][3] * inverse),
               min(4, max(0, C - c)), vector);
    }
}

// A 4x4 block of bytes, transposed: w[m] holds row m (byte j: column j) and becomes column m (byte j: row j).
__device__ __forceinline__ void transpose_bytes(uint32_t (&w)[4]) {
    const uint32_t lo01 = __byte_perm(w[0], w[1], 0x5140), lo23 = __byte_perm(w[2], w[3], 0x5140);
    const uint32_t hi01 = __byte_perm(w[0], w[1], 0x7362), hi23 = __byte_perm(w[2], w[3], 0x7362);
    w[0] = __byte_perm(lo01, lo23, 0x5410), w[1] = __byte_perm(lo01, lo23, 0x7632);
    w[2] = __byte_perm(hi01, hi23, 0x5410), w[3] = __byte_perm(hi01, hi23, 0x7632);
}

// The tile's transpose quantized to qT [C, R], this thread's column j by the inverse scale column_inverse(j). The
// quantized tile is staged in shared memory as it stands (a thread's four columns of a row are one word), then read
// back in 4x4 blocks of bytes that transpose_bytes turns in registers: every shared-memory access, and every store
// where R and qT's alignment allow, is a whole word. The staging rows are 33 words apart, and a warp takes the blocks
// of 8 row groups x 4 column groups, so that the words a warp writes or reads lie in 32 different banks.
constexpr int STAGED_WORDS = N_C / 4 + 1;

template <typename ColumnInverse>
__device__ void store_tile_transposed(fp8* qT, uint32_t (*staged)[STAGED_WORDS], const float (&v)[TILE_ROWS][4],
                                      ColumnInverse column_inverse, int R, int C, int r0, int c0, bool vector) {
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float inverse[4];
#pragma unroll
    for (int j = 0; j < 4; j++) inverse[j] = column_inverse(j);
#pragma unroll
    for (int i = 0; i < TILE_ROWS; i++)
        staged[warp + TILE_WARPS * i][lane] =
            e4m3x4(v[i][0] * inverse[0], v[i][1] * inverse[1], v[i][2] * inverse[2], v[i][3] * inverse[3]);
    __syncthreads();
    constexpr int BLOCKS = (N_C / 4) * (N_C / 4) / TILE_THREADS;  // 4x4 blocks a thread
#pragma unroll
    for (int k = 0; k < BLOCKS; k++) {
        const int warp_blocks = warp + TILE_WARPS * k;  // one of the 32 groups of 8 x 4 blocks
        const int a = warp_blocks % 4 * 8 + lane / 4;   // rows 4a .. 4a + 3 of the tile
        const int b = warp_blocks / 4 * 4 + lane % 4;   // columns 4b .. 4b + 3
        uint32_t w[4];
#pragma unroll
        for (int m = 0; m < 4; m++) w[m] = staged[4 * a + m][b];
        transpose_bytes(w);
        const int r = r0 + 4 * a;
#pragma unroll
        for (int m = 0; m < 4; m++) {
            const int c = c0 + 4 * b + m;
            if (c < C) store4(qT + long(c) * R + r, w[m], min(4, max(0, R - r)), vector);
        }
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Activations and output gradients: 1x128 tiles along rows and 128x1 tiles along columns, in one pass
// ---------------------------------------------------------------------------------------------------------------
//
// x [R, C] (R tokens) -> q [R, C] in 1x128 tiles (scales [ceil(C/128), R]) for the forward and data-gradient GEMMs,
// and qT [C, R] in 1x128 tiles of x^T (scales [ceil(R/128), C]) for the weight-gradient GEMM, whose reduction runs
// over tokens. In the tile a row's amax is its warp's, a column's is found across the warps.
// A NaN or Inf anywhere sets *nonfinite (the step that made it must be skipped: V3 trains without loss scaling,
// so a non-finite value is a diverging step, not an overflow to retry).
//
// The group that row r lies in, for groups + 1 ascending offsets on the device with r below the last.
__device__ __forceinline__ int group_of_row(const int* offsets, int groups, int r) {
    int g = 0;
    while (g + 1 < groups && offsets[g + 1] <= r) g++;
    return g;
}

// With row groups (group_offsets, groups + 1 ascending multiples of 128; the routed experts' rows), each group's rows
// are a matrix of their own: quantized, scaled and transposed on their own, at the group's place in the outputs
// (rows from offset g: q and x at offset_g * C, scales at offset_g * ceil(C/128), qT at offset_g * C as
// [C, rows of g], scalesT at offset_g / 128 * C). As groups start at multiples of 128, no tile spans two of them.
template <typename T>
__global__ void __launch_bounds__(TILE_THREADS)
    quantize_rows_and_transposed_kernel(fp8* q, float* scales, fp8* qT, float* scalesT, int* nonfinite, const T* x,
                                        int R, int C, const int* group_offsets, int groups, bool vector_rows,
                                        bool vector_columns) {
    __shared__ float column_amax[TILE_WARPS][N_C];
    __shared__ float column_inverse[N_C];
    __shared__ uint32_t staged[N_C][STAGED_WORDS];
    int r0 = blockIdx.y * N_C;
    if (group_offsets) {
        if (r0 >= group_offsets[groups]) return;  // past the last group, within the launch's bound
        const int g = group_of_row(group_offsets, groups, r0);
        const long first = group_offsets[g];
        x += first * C, q += first * C, qT += first * C;
        scales += first * scale_tiles(C), scalesT += first / N_C * C;
        r0 -= int(first), R = group_offsets[g + 1] - int(first);
    }
    const int c0 = blockIdx.x * N_C, warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    float v[TILE_ROWS][4];
    load_tile(v, x, R, C, r0, c0, vector_rows);

    // The warp's rows' amaxes; lane i < TILE_ROWS turns row i's into its scale, so that the warp divides once, not
    // once per row, and store_tile takes row i's inverse from lane i.
    bool finite = true;
    float lane_amax = 0.0f;
#pragma unroll
    for (int i = 0; i < TILE_ROWS; i++) {
        float amax = 0.0f;
#pragma unroll
        for (int j = 0; j < 4; j++) amax = amax_nan(amax, v[i][j]);
        finite &= isfinite(amax);
        amax = warp_max(amax);
        if (lane == i) lane_amax = amax;
    }
    const float lane_scale = tile_scale(lane_amax), lane_inverse = 1.0f / lane_scale;
    const int lane_row = r0 + warp + TILE_WARPS * lane;
    if (lane < TILE_ROWS && lane_row < R) scales[long(blockIdx.x) * R + lane_row] = lane_scale;
    for (int j = 0; j < 4; j++) {
        float amax = 0.0f;
        for (int i = 0; i < TILE_ROWS; i++) amax = fmaxf(amax, fabsf(v[i][j]));
        column_amax[warp][4 * lane + j] = amax;
    }
    if (__syncthreads_or(!finite) && threadIdx.x == 0) *nonfinite = 1;
    if (threadIdx.x < N_C) {
        float amax = 0.0f;
        for (int w = 0; w < TILE_WARPS; w++) amax = fmaxf(amax, column_amax[w][threadIdx.x]);
        const float scale = tile_scale(amax);
        column_inverse[threadIdx.x] = 1.0f / scale;
        if (c0 + threadIdx.x < C) scalesT[long(r0 / N_C) * C + c0 + threadIdx.x] = scale;
    }
    __syncthreads();

    store_tile(q, v, [&](int i) { return __shfl_sync(0xFFFFFFFFu, lane_inverse, i); }, R, C, r0, c0, vector_rows);
    store_tile_transposed(qT, staged, v, [&](int j) { return column_inverse[4 * lane + j]; }, R, C, r0, c0,
                          vector_columns);
}

// R rows in all; with group_offsets (on the device), `groups` groups of rows whose sizes are multiples of 128, R
// rows at most.
template <typename T>
void quantize_rows_and_transposed(fp8* q, float* scales, fp8* qT, float* scalesT, int* nonfinite, const T* x, int R,
                                  int C, cudaStream_t s, const int* group_offsets = nullptr, int groups = 1) {
    const bool vector_rows = C % 4 == 0 && pointer_alignment(x) >= 4 * sizeof(T) && pointer_alignment(q) >= 4;
    const bool vector_columns = R % 4 == 0 && pointer_alignment(qT) >= 4;
    dim3 grid(scale_tiles(C), scale_tiles(R));
    quantize_rows_and_transposed_kernel<<<grid, TILE_THREADS, 0, s>>>(q, scales, qT, scalesT, nonfinite, x, R, C,
                                                                      group_offsets, groups, vector_rows,
                                                                      vector_columns);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// 128x128 blocks: weights, with the transposed copy the data gradient needs
// ---------------------------------------------------------------------------------------------------------------

// One thread block per 128x128 block of W [N, K] (FP32 master weights): the block's amax, then q [N, K] and
// qT [K, N]. Transposing a quantized block is exact and keeps its scale, so both copies share one scale grid,
// stored once per orientation. blockIdx.z picks one of several weights of the same shape stored one after the
// other (the routed experts), each with its own scale grids.
static __global__ void __launch_bounds__(TILE_THREADS)
    quantize_weight_kernel(fp8* q, fp8* qT, float* scales, float* scalesT, int* nonfinite, const float* W, int N,
                           int K, bool vector_rows, bool vector_columns) {
    __shared__ float warp_amax[TILE_WARPS];
    __shared__ uint32_t staged[N_C][STAGED_WORDS];
    const long group = blockIdx.z;
    W += group * N * K, q += group * N * K, qT += group * N * K;
    scales += group * block_scale_count(N, K), scalesT += group * block_scale_count(K, N);
    const int nb = blockIdx.y, kb = blockIdx.x, n0 = nb * N_C, k0 = kb * N_C;
    float v[TILE_ROWS][4];
    load_tile(v, W, N, K, n0, k0, vector_rows);
    float amax = 0.0f;
    for (int i = 0; i < TILE_ROWS; i++)
        for (int j = 0; j < 4; j++) amax = amax_nan(amax, v[i][j]);
    const bool finite = isfinite(amax);
    amax = warp_max(amax);
    if (threadIdx.x % 32 == 0) warp_amax[threadIdx.x / 32] = amax;
    if (__syncthreads_or(!finite) && threadIdx.x == 0) *nonfinite = 1;
    float block_amax = 0.0f;
    for (int w = 0; w < TILE_WARPS; w++) block_amax = fmaxf(block_amax, warp_amax[w]);
    const float scale = tile_scale(block_amax);
    if (threadIdx.x == 0) {
        scales[long(nb) * block_scale_stride(K) + kb] = scale;
        scalesT[long(kb) * block_scale_stride(N) + nb] = scale;
        // the last block of a row of scales also zeroes the row's padding
        if (kb == gridDim.x - 1)
            for (int j = kb + 1; j < block_scale_stride(K); j++) scales[long(nb) * block_scale_stride(K) + j] = 0.0f;
        if (nb == gridDim.y - 1)
            for (int j = nb + 1; j < block_scale_stride(N); j++) scalesT[long(kb) * block_scale_stride(N) + j] = 0.0f;
    }
    const float inverse = 1.0f / scale;
    store_tile(q, v, [=](int) { return inverse; }, N, K, n0, k0, vector_rows);
    store_tile_transposed(qT, staged, v, [=](int) { return inverse; }, N, K, n0, k0, vector_columns);
}

// `groups` weights [N, K], one after the other.
inline void quantize_weight(fp8* q, fp8* qT, float* scales, float* scalesT, int* nonfinite, const float* W, int N,
                            int K, cudaStream_t s, int groups = 1) {
    const bool vector_rows = K % 4 == 0 && pointer_alignment(W) >= 16 && pointer_alignment(q) >= 4;
    const bool vector_columns = N % 4 == 0 && pointer_alignment(qT) >= 4;
    dim3 grid(scale_tiles(K), scale_tiles(N), groups);
    quantize_weight_kernel<<<grid, TILE_THREADS, 0, s>>>(q, qT, scales, scalesT, nonfinite, W, N, K, vector_rows,
                                                         vector_columns);
    CUDA_CHECK_LAUNCH();
}

// ---------------------------------------------------------------------------------------------------------------
// The FP8 GEMM with the accumulation fix (V3 §3.3.2)
// ---------------------------------------------------------------------------------------------------------------
//
// C [M, N] = sum over K-blocks b of (A_b B_b^T) * sA[b][m] * sB(n, b): A [M, K] and B [N, K] are E4M3, both
// K-contiguous. The tensor cores multiply one K-block of N_C = 128 elements into a partial sum; then the partial
// sum is promoted: multiplied by the two scales of the block and added to FP32 accumulators in registers, and the
// tensor cores start the next block from zero. Without promotion the tensor cores would carry the sum over all of
// K in their own accumulator, whose limited precision (V3 §3.5.2: about 14 bits on H800) loses more as K grows.
//
// The scales of A are per row and K-block, [ceil(K/128), M]. Those of B are either per 128x128 block
// ([ceil(N/128), ceil(K/128)] with padded rows: a weight) or, like A's, per row and K-block ([ceil(K/128), N]: the
// weight gradient's transposed activations).
//
// This kernel is the portable form, written with mma.sync, the FP8 MMA of sm_89. Hopper runs FP8 on its tensor
// cores only through wgmma (the kernel after this one); there mma.sync on E4M3 is lowered to a conversion and
// FP16 MMAs with a full FP32 accumulator: correct, but slow, and blind to the FP8 accumulator's limit.
enum class BScales { Block, Row };

constexpr int GEMM_TILE = 128;            // rows of A and of B per thread block; also N_C along K
constexpr int GEMM_ROW_BYTES = N_C + 16;  // shared-memory row stride: the padding spreads fragment reads over banks
constexpr int GEMM_WARPS_M = 2, GEMM_WARPS_N = 4;
constexpr int GEMM_WARP_M = GEMM_TILE / GEMM_WARPS_M, GEMM_WARP_N = GEMM_TILE / GEMM_WARPS_N;  // 64 x 32
constexpr int GEMM_MMA_M = GEMM_WARP_M / 16, GEMM_MMA_N = GEMM_WARP_N / 8;                     // 4 x 4 MMAs

// D = A B^T + C for a 16x32 slice of A and an 8x32 slice of B, FP32 accumulators (PTX ISA: mma.m16n8k32 .e4m3).
__device__ __forceinline__ void mma_e4m3(float (&d)[4], const uint32_t (&a)[4], const uint32_t (&b)[2]) {
#if defined(__CUDA_ARCH__) && __CUDA_ARCH__ >= 890
    asm volatile(
        "mma.sync.aligned.m16n8k32.row.col.f32.e4m3.e4m3.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
        "{%0,%1,%2,%3};\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b[0]), "r"(b[1]));
#else
    __trap();  // FP8 tensor cores need sm_89 or newer
#endif
}

// Rows r0.. of a K-block of X [rows, K] into shared memory, 16 bytes per load; what lies past the matrix is zero.
__device__ __forceinline__ void load_fp8_tile(uint8_t* tile, const fp8* X, int rows, int K, int r0, int k0) {
    for (int i = threadIdx.x; i < GEMM_TILE * (N_C / 16); i += blockDim.x) {
        int r = i / (N_C / 16), c = i % (N_C / 16) * 16;
        uint4 v = make_uint4(0, 0, 0, 0);
        if (r0 + r < rows && k0 + c < K) v = *reinterpret_cast<const uint4*>(X + long(r0 + r) * K + k0 + c);
        *reinterpret_cast<uint4*>(tile + r * GEMM_ROW_BYTES + c) = v;
    }
}

// The scales of K-block kb for the tile's 128 rows of A and (per row, or the one block) of B; zero past the edge.
template <BScales b_scales>
__device__ void load_block_scales(float* a_scale, float* b_scale, const float* scale_a, const float* scale_b, int M,
                                  int N, int K, int m0, int n0, int kb) {
    for (int i = threadIdx.x; i < GEMM_TILE; i += blockDim.x) {
        a_scale[i] = m0 + i < M ? scale_a[long(kb) * M + m0 + i] : 0.0f;
        if (b_scales == BScales::Row) b_scale[i] = n0 + i < N ? scale_b[long(kb) * N + n0 + i] : 0.0f;
    }
    if (b_scales == BScales::Block && threadIdx.x == 0)
        b_scale[0] = scale_b[long(n0 / GEMM_TILE) * block_scale_stride(K) + kb];
}

// C [M, N] (+)= A [M, K] B [N, K]^T, with the scales of A and B: the operands of one GEMM.
template <typename OutT>
struct Fp8GemmArgs {
    OutT* C;
    const fp8 *A, *B;
    const float *scale_a, *scale_b;
    int M, N, K;
    bool accumulate;
};

template <typename OutT>
__device__ __forceinline__ void store_output(OutT* C, int row, int col, float v, int M, int N, bool accumulate) {
    if (row < M && col < N)
        C[long(row) * N + col] = from_float<OutT>(v + (accumulate ? to_float(C[long(row) * N + col]) : 0.0f));
}

// The output tile (m0, n0): 8 warps, each 64 rows x 32 columns of it; each thread keeps its part of the promoted sum
// (acc) and of the current block's tensor-core sum (partial). With promote = false the partial sum runs over all
// of K and is scaled once at the end by one block's scales: valid only where the scales do not change along
// K (one scale per tensor), which is how the accumulation study uses it.
template <typename OutT, BScales b_scales, bool promote>
__device__ void sync_mma_tile(const Fp8GemmArgs<OutT>& p, int m0, int n0) {
    __shared__ __align__(16) uint8_t a_tile[GEMM_TILE * GEMM_ROW_BYTES], b_tile[GEMM_TILE * GEMM_ROW_BYTES];
    __shared__ float a_scale[GEMM_TILE], b_scale[GEMM_TILE];
    const auto [C, A, B, scale_a, scale_b, M, N, K, accumulate] = p;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, group = lane / 4, thread_in_group = lane % 4;
    const int wm = warp / GEMM_WARPS_N * GEMM_WARP_M, wn = warp % GEMM_WARPS_N * GEMM_WARP_N;
    float acc[GEMM_MMA_M][GEMM_MMA_N][4] = {}, partial[GEMM_MMA_M][GEMM_MMA_N][4] = {};
    const int blocks = scale_tiles(K);

    for (int kb = 0; kb < blocks; kb++) {
        load_fp8_tile(a_tile, A, M, K, m0, kb * N_C);
        load_fp8_tile(b_tile, B, N, K, n0, kb * N_C);
        if (promote || kb == 0)  // without promotion the first block's scales serve for all of K
            load_block_scales<b_scales>(a_scale, b_scale, scale_a, scale_b, M, N, K, m0, n0, kb);
        __syncthreads();

#pragma unroll
        for (int k = 0; k < N_C; k += 32) {  // four m16n8k32 steps per K-block
            uint32_t a[GEMM_MMA_M][4], b[GEMM_MMA_N][2];
#pragma unroll
            for (int i = 0; i < GEMM_MMA_M; i++) {  // PTX ISA fragment layout for 8-bit A: rows g and g + 8
                const uint8_t* p = a_tile + (wm + i * 16 + group) * GEMM_ROW_BYTES + k + thread_in_group * 4;
                a[i][0] = *reinterpret_cast<const uint32_t*>(p);
                a[i][1] = *reinterpret_cast<const uint32_t*>(p + 8 * GEMM_ROW_BYTES);
                a[i][2] = *reinterpret_cast<const uint32_t*>(p + 16);
                a[i][3] = *reinterpret_cast<const uint32_t*>(p + 8 * GEMM_ROW_BYTES + 16);
            }
#pragma unroll
            for (int j = 0; j < GEMM_MMA_N; j++) {  // B's fragment: column g of B^T is row g of B
                const uint8_t* p = b_tile + (wn + j * 8 + group) * GEMM_ROW_BYTES + k + thread_in_group * 4;
                b[j][0] = *reinterpret_cast<const uint32_t*>(p);
                b[j][1] = *reinterpret_cast<const uint32_t*>(p + 16);
            }
#pragma unroll
            for (int i = 0; i < GEMM_MMA_M; i++)
#pragma unroll
                for (int j = 0; j < GEMM_MMA_N; j++) mma_e4m3(partial[i][j], a[i], b[j]);
        }

        if (promote || kb == blocks - 1) {  // V3 §3.3.2: promote the block's partial sums into FP32, scaled
#pragma unroll
            for (int i = 0; i < GEMM_MMA_M; i++)
#pragma unroll
                for (int j = 0; j < GEMM_MMA_N; j++)
#pragma unroll
                    for (int c = 0; c < 4; c++) {
                        int row = wm + i * 16 + group + (c / 2) * 8, col = wn + j * 8 + thread_in_group * 2 + c % 2;
                        float sb = b_scales == BScales::Block ? b_scale[0] : b_scale[col];
                        acc[i][j][c] += partial[i][j][c] * a_scale[row] * sb;
                        partial[i][j][c] = 0.0f;
                    }
        }
        __syncthreads();  // the tiles are read: the next block may overwrite them
    }

#pragma unroll
    for (int i = 0; i < GEMM_MMA_M; i++)
#pragma unroll
        for (int j = 0; j < GEMM_MMA_N; j++)
#pragma unroll
            for (int c = 0; c < 4; c++)
                store_output(C, m0 + wm + i * 16 + group + (c / 2) * 8, n0 + wn + j * 8 + thread_in_group * 2 + c % 2,
                             acc[i][j][c], M, N, accumulate);
}

// ---------------------------------------------------------------------------------------------------------------
// The same GEMM with wgmma, Hopper's FP8 tensor-core instruction
// ---------------------------------------------------------------------------------------------------------------
//
// wgmma reads A and B from shared memory through descriptors. A K-block of 128 E4M3 values is one 128-byte row,
// which is the width of wgmma's 128-byte swizzled K-major layout (PTX ISA: the canonical layouts): row r is stored
// at r * 128 with its 16-byte chunk c moved to chunk c ^ (r % 8). The tensor cores read 16-byte columns of
// 8 consecutive rows at a time (a core matrix); the swizzle puts those 8 chunks in 8 different bank groups. The
// 8-row groups are 1024 bytes apart (the stride byte offset), and a 1024-byte group must start 1024-aligned.
enum class Fp8Mma { Sync, Wgmma };

constexpr int SWIZZLE_ROWS = 8, SWIZZLE_GROUP_BYTES = SWIZZLE_ROWS * N_C;

__device__ __forceinline__ int swizzled_offset(int row, int byte) {
    return row * N_C + ((byte / 16) ^ (row % SWIZZLE_ROWS)) * 16 + byte % 16;
}

// Global -> shared copies that bypass the registers (cp.async, sm_80), so that the next K-blocks load while the
// tensor cores work on this one. A copy of 0 bytes writes zeros: the tiles past the matrix's edge.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool inside) {
    asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(uint32_t(__cvta_generic_to_shared(dst))),
                 "l"(src), "r"(inside ? 16 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool inside) {
    asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(uint32_t(__cvta_generic_to_shared(dst))),
                 "l"(src), "r"(inside ? 4 : 0)
                 : "memory");
}
__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
    asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// One K-block in flight: the 128-row tiles of A and B, swizzled, and their scales. Its size is a multiple of
// 1024, so every stage's tiles stay 1024-aligned.
struct WgmmaStage {
    uint8_t a[GEMM_TILE * N_C], b[GEMM_TILE * N_C];
    float a_scale[GEMM_TILE], b_scale[GEMM_TILE];
};
static_assert(sizeof(WgmmaStage) % SWIZZLE_GROUP_BYTES == 0, "stages must keep the swizzle's alignment");
constexpr int WGMMA_STAGES = 4;  // K-blocks loading ahead of the tensor cores
constexpr int WGMMA_SMEM_BYTES = WGMMA_STAGES * sizeof(WgmmaStage);

// Starts the copies of K-block kb: 16 bytes per copy, 8 consecutive threads copying one 128-byte row (one
// coalesced read, and a write to 8 distinct bank groups), then the block's scales as load_block_scales reads them.
template <BScales b_scales>
__device__ void load_stage_async(WgmmaStage& st, const fp8* A, const fp8* B, const float* scale_a,
                                 const float* scale_b, int M, int N, int K, int m0, int n0, int kb) {
    const int k0 = kb * N_C;
    for (int i = threadIdx.x; i < GEMM_TILE * (N_C / 16); i += blockDim.x) {
        int r = i / (N_C / 16), c = i % (N_C / 16) * 16;
        bool a_inside = m0 + r < M && k0 + c < K, b_inside = n0 + r < N && k0 + c < K;
        cp_async_16(st.a + swizzled_offset(r, c), a_inside ? A + long(m0 + r) * K + k0 + c : A, a_inside);
        cp_async_16(st.b + swizzled_offset(r, c), b_inside ? B + long(n0 + r) * K + k0 + c : B, b_inside);
    }
    for (int i = threadIdx.x; i < GEMM_TILE; i += blockDim.x) {
        cp_async_4(&st.a_scale[i], m0 + i < M ? scale_a + long(kb) * M + m0 + i : scale_a, m0 + i < M);
        if (b_scales == BScales::Row)
            cp_async_4(&st.b_scale[i], n0 + i < N ? scale_b + long(kb) * N + n0 + i : scale_b, n0 + i < N);
    }
    if (b_scales == BScales::Block && threadIdx.x == 0)
        cp_async_4(&st.b_scale[0], scale_b + long(n0 / GEMM_TILE) * block_scale_stride(K) + kb, true);
}

// Address >> 4, leading byte offset >> 4 (bits 16-29: unused by a swizzled K-major operand, 1 by convention),
// stride byte offset >> 4 (bits 32-45), 128-byte swizzle (mode 1, bits 62-63). A step of 32 along K within the
// row moves the start address by 32 bytes; the hardware applies the swizzle to the address it forms.
__device__ __forceinline__ uint64_t smem_descriptor(const void* p) {
    uint64_t address = __cvta_generic_to_shared(p);
    return ((address & 0x3FFFF) >> 4) | (uint64_t(1) << 16) | (uint64_t(SWIZZLE_GROUP_BYTES >> 4) << 32) |
           (uint64_t(1) << 62);
}

// D (+)= A B^T for a 64x32 slice of A and a 128x32 slice of B in shared memory. Each thread of the warpgroup holds
// 64 of the 64x128 FP32 results, laid out as 16 side-by-side m16n8 fragments per warp. accumulate = false starts
// from zero: the tensor cores' fresh partial sum of a K-block.
__device__ __forceinline__ void wgmma_e4m3_m64n128k32(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                                      bool accumulate) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    asm volatile(
        "{\n"
        ".reg .pred p;\n"
        "setp.ne.b32 p, %66, 0;\n"
        "wgmma.mma_async.sync.aligned.m64n128k32.f32.e4m3.e4m3 {"
        "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
        "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
        "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
        "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
        "}, %64, %65, p, 1, 1;\n"
        "}\n"
        : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]), "+f"(d[7]), "+f"(d[8]),
          "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]), "+f"(d[14]), "+f"(d[15]), "+f"(d[16]),
          "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]), "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]),
          "+f"(d[25]), "+f"(d[26]), "+f"(d[27]), "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]),
          "+f"(d[33]), "+f"(d[34]), "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]),
          "+f"(d[41]), "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
          "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]), "+f"(d[56]),
          "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]), "+f"(d[63])
        : "l"(desc_a), "l"(desc_b), "r"(int(accumulate)));
#else
    __trap();  // a backstop: the one caller, wgmma_tile, is compiled for sm_90a alone
#endif
}

// The output tile leaves through shared memory: a thread's results lie 8 columns apart in 8 rows, and written as
// they are, a warp's store would touch 8 rows in pieces of 8 bytes; staged, the tile is read back in rows and
// written 16 bytes a thread. The stages are free by then and hold the tile as FP32 (with accumulate, the sum with
// C's old value is rounded once, as store_output does it). The stride's 8 extra floats put a warp's 8 rows of
// float2 writes in different banks.
constexpr int STAGED_OUT_STRIDE = GEMM_TILE + 8;
static_assert(GEMM_TILE * STAGED_OUT_STRIDE * sizeof(float) <= WGMMA_SMEM_BYTES, "the stages hold the output tile");

template <typename OutT>
__device__ void store_staged_tile(const Fp8GemmArgs<OutT>& p, const float* staged, int m0, int n0) {
    constexpr int V = 16 / sizeof(OutT);  // values per 16-byte store
    const bool vector = p.N % V == 0 && reinterpret_cast<uintptr_t>(p.C) % 16 == 0;
    for (int i = threadIdx.x; i < GEMM_TILE * GEMM_TILE / V; i += blockDim.x) {
        const int r = i / (GEMM_TILE / V), c = i % (GEMM_TILE / V) * V, row = m0 + r, col = n0 + c;
        if (row >= p.M || col >= p.N) continue;
        const float* v = staged + r * STAGED_OUT_STRIDE + c;
        OutT* out = p.C + long(row) * p.N + col;
        if (vector) {
            alignas(16) OutT pack[V];
            if (p.accumulate) *reinterpret_cast<uint4*>(pack) = *reinterpret_cast<const uint4*>(out);
#pragma unroll
            for (int j = 0; j < V; j++) pack[j] = from_float<OutT>(v[j] + (p.accumulate ? to_float(pack[j]) : 0.0f));
            *reinterpret_cast<uint4*>(out) = *reinterpret_cast<const uint4*>(pack);
        } else {
            for (int j = 0; j < V && col + j < p.N; j++) store_output(p.C, row, col + j, v[j], p.M, p.N, p.accumulate);
        }
    }
}

// The output tile (m0, n0): two warpgroups, each 64 rows of it, and a pipeline of WGMMA_STAGES K-blocks: while the
// tensor cores multiply block kb, blocks kb+1 .. kb+STAGES-1 are being copied in. Per block: four wgmma of K = 32
// into the tensor cores' partial sum, wait for them, and promote (V3 §3.3.2, as in sync_mma_tile). Without
// promotion the partial sum runs over all of K and the last block's scales serve for all of it.
template <typename OutT, BScales b_scales, bool promote>
__device__ void wgmma_tile(const Fp8GemmArgs<OutT>& p, int m0, int n0) {
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)  // wgmma exists on sm_90a alone
    extern __shared__ __align__(1024) uint8_t wgmma_smem[];  // the swizzle's 1024-byte alignment
    WgmmaStage* stages = reinterpret_cast<WgmmaStage*>(wgmma_smem);
    const int warpgroup = threadIdx.x / 128, warp = threadIdx.x % 128 / 32, lane = threadIdx.x % 32;
    const int row0 = warpgroup * 64 + warp * 16 + lane / 4, col0 = lane % 4 * 2;  // of the thread's first result
    float acc[64] = {}, partial[64] = {};
    const int blocks = scale_tiles(p.K);
    auto load = [&](int kb) {
        if (kb < blocks)
            load_stage_async<b_scales>(stages[kb % WGMMA_STAGES], p.A, p.B, p.scale_a, p.scale_b, p.M, p.N, p.K, m0, n0,
                                       kb);
        cp_async_commit();  // an empty group past the end keeps the count that cp_async_wait relies on
    };
    for (int kb = 0; kb < WGMMA_STAGES - 1; kb++) load(kb);

    for (int kb = 0; kb < blocks; kb++) {
        cp_async_wait<WGMMA_STAGES - 2>();                                 // this thread's copies of block kb are in
        asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");  // and visible to wgmma (the async proxy);
        __syncthreads();  // so are everyone's, and block kb-1 is read: its stage takes block kb+STAGES-1
        load(kb + WGMMA_STAGES - 1);
        const WgmmaStage& st = stages[kb % WGMMA_STAGES];

        asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
#pragma unroll
        for (int k = 0; k < N_C / 32; k++)
            wgmma_e4m3_m64n128k32(partial,
                                  smem_descriptor(st.a + warpgroup * 64 * N_C + k * 32),
                                  smem_descriptor(st.b + k * 32), k > 0 || (!promote && kb > 0));
        asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
        asm volatile("wgmma.wait_group.sync.aligned 0;\n" ::: "memory");
#pragma unroll
        for (int i = 0; i < 64; i++) asm volatile("" : "+f"(partial[i])::"memory");  // no read moves above the wait

        if (promote || kb == blocks - 1) {  // V3 §3.3.2: promote the block's partial sums into FP32, scaled
#pragma unroll
            for (int i = 0; i < 64; i++) {
                int row = row0 + i % 4 / 2 * 8, col = i / 4 * 8 + col0 + i % 2;
                acc[i] += partial[i] * st.a_scale[row] * (b_scales == BScales::Block ? st.b_scale[0] : st.b_scale[col]);
            }
        }
    }

    __syncthreads();  // both warpgroups are done with the stages: they hold the output tile now
    float* staged = reinterpret_cast<float*>(wgmma_smem);
#pragma unroll
    for (int i = 0; i < 64; i += 2) {
        const int row = row0 + i % 4 / 2 * 8, col = i / 4 * 8 + col0;
        *reinterpret_cast<float2*>(staged + row * STAGED_OUT_STRIDE + col) = make_float2(acc[i], acc[i + 1]);
    }
    __syncthreads();
    store_staged_tile(p, staged, m0, n0);
#else
    __trap();  // default_fp8_mma picks wgmma only where it was built for sm_90a
#endif
}

// wgmma where the code running on this GPU was built with it (sm_90a), the portable mma.sync kernel elsewhere.
inline Fp8Mma default_fp8_mma() { return gpu_info().wgmma ? Fp8Mma::Wgmma : Fp8Mma::Sync; }

// One launch for the GEMMs of every routed expert (the groups of rows of RowGroups, with their offsets on the
// device, so that the host need not know the groups' sizes):
//   Rows:      C's rows of group g = A's rows of g times B_g^T, B_g the g-th of `groups` weights [N, K] with their
//              128x128 block scales (forward and data gradient). blockIdx.y walks the tiles of all groups' rows;
//              as their sizes are multiples of 128, a tile lies in one group;
//   Reduction: C_g [M, N] = A_g B_g^T where the groups' rows are the reduction, A_g [M, rows of g] and B_g [N, rows
//              of g] transposed operands at the group's place, as quantize_rows_and_transposed leaves them (weight
//              gradient); blockIdx.z is g, and a group without rows gets C_g = 0.
enum class GemmGrouping { None, Rows, Reduction };

// Points p at the operands of the group that the tile (m0 in its rows) lies in; false past the last group's rows.
template <GemmGrouping grouping, typename OutT>
__device__ bool select_group(Fp8GemmArgs<OutT>& p, int& m0, const int* offsets, int groups) {
    if constexpr (grouping == GemmGrouping::Rows) {
        if (m0 >= offsets[groups]) return false;
        const int g = group_of_row(offsets, groups, m0);
        const long first = offsets[g];
        p.M = offsets[g + 1] - int(first), m0 -= int(first);
        p.C += first * p.N, p.A += first * p.K, p.scale_a += first * scale_tiles(p.K);
        p.B += long(g) * p.N * p.K, p.scale_b += g * block_scale_count(p.N, p.K);
    } else if constexpr (grouping == GemmGrouping::Reduction) {
        const int g = blockIdx.z;
        const long first = offsets[g];
        p.K = offsets[g + 1] - int(first);
        p.C += long(g) * p.M * p.N, p.A += first * p.M, p.B += first * p.N;
        p.scale_a += first / N_C * p.M, p.scale_b += first / N_C * p.N;
    }
    return true;
}

template <Fp8Mma mma, GemmGrouping grouping, typename OutT, BScales b_scales, bool promote>
__global__ void __launch_bounds__(256, 1) fp8_gemm_kernel(Fp8GemmArgs<OutT> p, const int* offsets, int groups) {
    int m0 = blockIdx.y * GEMM_TILE;
    if (!select_group<grouping>(p, m0, offsets, groups)) return;
    if constexpr (mma == Fp8Mma::Wgmma)
        wgmma_tile<OutT, b_scales, promote>(p, m0, blockIdx.x * GEMM_TILE);
    else
        sync_mma_tile<OutT, b_scales, promote>(p, m0, blockIdx.x * GEMM_TILE);
}

template <GemmGrouping grouping, typename OutT, BScales b_scales, bool promote>
void launch_fp8_gemm(Fp8Mma mma, const Fp8GemmArgs<OutT>& p, dim3 grid, const int* offsets, int groups,
                     cudaStream_t s) {
    // 16-byte loads of rows of A and B
    if (p.K % 16 != 0 || pointer_alignment(p.A) < 16 || pointer_alignment(p.B) < 16)
        throw std::invalid_argument("fp8_gemm: K = " + std::to_string(p.K) +
                                    " must be a multiple of 16 and A, B 16-byte aligned");
    if (!gpu_info().fp8_mma())
        throw std::invalid_argument("fp8_gemm: FP8 tensor cores need an sm_89 or newer GPU and a build for it");
    if (mma == Fp8Mma::Wgmma && default_fp8_mma() != Fp8Mma::Wgmma)
        throw std::invalid_argument("fp8_gemm: wgmma needs a Hopper GPU and a build for sm_90a");
    if (mma == Fp8Mma::Wgmma) {
        auto kernel = fp8_gemm_kernel<Fp8Mma::Wgmma, grouping, OutT, b_scales, promote>;
        static const bool opted_in = [&] {  // more than the default 48 KB of dynamic shared memory, once
            CUDA_CHECK(cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, WGMMA_SMEM_BYTES));
            return true;
        }();
        (void)opted_in;
        kernel<<<grid, 256, WGMMA_SMEM_BYTES, s>>>(p, offsets, groups);
    } else {
        fp8_gemm_kernel<Fp8Mma::Sync, grouping, OutT, b_scales, promote><<<grid, 256, 0, s>>>(p, offsets, groups);
    }
    CUDA_CHECK_LAUNCH();
}

template <typename OutT, BScales b_scales>
void fp8_gemm(OutT* C, const fp8* A, const fp8* B, const float* scale_a, const float* scale_b, int M, int N, int K,
              bool accumulate, bool promote, cudaStream_t s, Fp8Mma mma = default_fp8_mma()) {
    if (K <= 0) throw std::invalid_argument("fp8_gemm: K = " + std::to_string(K) + " must be positive");
    const Fp8GemmArgs<OutT> p{C, A, B, scale_a, scale_b, M, N, K, accumulate};
    const dim3 grid(ceil_div(N, GEMM_TILE), ceil_div(M, GEMM_TILE));
    if (promote)
        launch_fp8_gemm<GemmGrouping::None, OutT, b_scales, true>(mma, p, grid, nullptr, 0, s);
    else
        launch_fp8_gemm<GemmGrouping::None, OutT, b_scales, false>(mma, p, grid, nullptr, 0, s);
}

// C's rows of group g (+)= A's rows of g times weight g^T ([N, K], 128x128 scales), for `groups` groups of at
// most max_rows rows in all (GemmGrouping::Rows).
template <typename OutT>
void fp8_gemm_grouped_rows(OutT* C, const fp8* A, const fp8* B, const float* scale_a, const float* scale_b,
                           const int* offsets, int groups, int max_rows, int N, int K, bool accumulate, cudaStream_t s,
                           Fp8Mma mma = default_fp8_mma()) {
    const Fp8GemmArgs<OutT> p{C, A, B, scale_a, scale_b, 0, N, K, accumulate};
    const dim3 grid(ceil_div(N, GEMM_TILE), ceil_div(max_rows, GEMM_TILE));
    launch_fp8_gemm<GemmGrouping::Rows, OutT, BScales::Block, true>(mma, p, grid, offsets, groups, s);
}

// C_g [M, N] = A_g B_g^T for every group g, reduced over the group's rows (GemmGrouping::Reduction).
inline void fp8_gemm_grouped_reduction(float* C, const fp8* A, const fp8* B, const float* scale_a,
                                       const float* scale_b, const int* offsets, int groups, int M, int N,
                                       cudaStream_t s, Fp8Mma mma = default_fp8_mma()) {
    const Fp8GemmArgs<float> p{C, A, B, scale_a, scale_b, M, N, 0, false};
    const dim3 grid(ceil_div(N, GEMM_TILE), ceil_div(M, GEMM_TILE), groups);
    launch_fp8_gemm<GemmGrouping::Reduction, float, BScales::Row, true>(mma, p, grid, offsets, groups, s);
}

// The same product through cuBLASLt's FP8 GEMM (block scaling needs CUDA 12.9+ and Hopper). The scale modes
// name the layouts: VEC128_32F is 1x128 ([ceil(K/128), rows]), BLK128x128_32F 128x128 ([ceil(N/128),
// ceil(K/128)]), SCALAR_32F one scale per tensor. The library promotes as V3 does unless fast_accum.
template <typename OutT>
MatmulKey fp8_gemm_key(const OutT* C, const fp8* A, const fp8* B, int M, int N, int K,
                       cublasLtMatmulMatrixScale_t mode_a, cublasLtMatmulMatrixScale_t mode_b, bool fast_accum) {
    MatmulKey key{M,
                  N,
                  K,
                  false,
                  true,
                  CUDA_R_8F_E4M3,
                  cuda_dtype<OutT>(),
                  1,
                  0,
                  0,
                  0,
                  K,
                  K,
                  N,
                  pointer_alignment(A),
                  pointer_alignment(B),
                  pointer_alignment(C)};
    key.scale_mode_a = mode_a, key.scale_mode_b = mode_b, key.fast_accum = fast_accum;
    return key;
}

template <typename OutT>
void fp8_gemm_cublaslt(Blas& blas, cudaStream_t s, OutT* C, const fp8* A, const fp8* B, const float* scale_a,
                       const float* scale_b, int M, int N, int K, cublasLtMatmulMatrixScale_t mode_a,
                       cublasLtMatmulMatrixScale_t mode_b, bool accumulate, bool fast_accum) {
    if (K % 16 != 0)
        throw std::invalid_argument("fp8_gemm_cublaslt: K = " + std::to_string(K) + " is not a multiple of 16");
    const MatmulPlan& p = blas.plan(fp8_gemm_key(C, A, B, M, N, K, mode_a, mode_b, fast_accum), scale_a, scale_b);
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_A_SCALE_POINTER, &scale_b, sizeof(scale_b)));
    CUBLAS_CHECK(
        cublasLtMatmulDescSetAttribute(p.desc, CUBLASLT_MATMUL_DESC_B_SCALE_POINTER, &scale_a, sizeof(scale_a)));
    const float alpha = 1.0f, beta = accumulate ? 1.0f : 0.0f;
    CUBLAS_CHECK(cublasLtMatmul(blas.handle, p.desc, &alpha, B, p.a, A, p.b, &beta, C, p.c, C, p.c, &p.algo,
                                blas.workspace.data(), blas.workspace.bytes(), s));
}

// Whether cuBLASLt has V3's block-scaled FP8 GEMM (1x128 tiles times 128x128 blocks) on this GPU: its heuristic is
// asked once, for a GEMM of one tile. Hopper has it; elsewhere the project's own FP8 kernels run instead.
inline bool cublaslt_block_scaled_fp8() {
    static const bool available = [] {
        const GpuInfo& g = gpu_info();
        if (!g.fp8_mma() || (g.as_sm > 0 && g.capability < 90)) return false;  // as an older GPU: not Hopper's library
        Blas blas;
        DeviceBuffer<fp8> A(128 * 128), B(128 * 128);
        DeviceBuffer<bf16> C(128 * 128);
        DeviceBuffer<float> scales(1);
        try {
            blas.plan(fp8_gemm_key(C.data(), A.data(), B.data(), 128, 128, 128, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                                   CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F, false),
                      scales.data(), scales.data());
            return true;
        } catch (const std::runtime_error&) {  // no algorithm
            return false;
        }
    }();
    return available;
}

// Which implementation runs the FP8 GEMMs of a Linear of one weight; a Linear's groups of rows (the routed experts)
// always run as our grouped launch, which cuBLASLt has no counterpart of.
enum class Fp8Backend { Own, CuBLASLt };

// The backends this GPU runs: cuBLASLt's where it has the block-scaled FP8 GEMM.
inline std::vector<Fp8Backend> fp8_backends() {
    if (cublaslt_block_scaled_fp8()) return {Fp8Backend::Own, Fp8Backend::CuBLASLt};
    return {Fp8Backend::Own};
}

// The FP8 GEMMs a --fp8-gemm name picks: "cublaslt" or "own".
inline Fp8Backend fp8_backend_named(const std::string& name) {
    return name == "cublaslt" ? Fp8Backend::CuBLASLt : Fp8Backend::Own;
}

// What this GPU runs of the precision and FP8 GEMMs asked for ("fp8" | "bf16" | "fp32", "cublaslt" | "own"), with a
// one-line note where it differs: BF16 without FP8 tensor cores, the project's FP8 kernels without cuBLASLt's
// block-scaled GEMM.
inline void fit_precision_to_gpu(std::string& precision, std::string& fp8_gemm) {
    if (precision == "fp8" && !gpu_info().fp8_mma()) {
        std::printf("note: no FP8 tensor cores here (they need an sm_89 or newer GPU and a build for it): "
                    "training in BF16, as --precision bf16\n");
        precision = "bf16";
    } else if (precision == "fp8" && fp8_gemm == "cublaslt" && !cublaslt_block_scaled_fp8()) {
        std::printf("note: cuBLASLt has no block-scaled FP8 GEMM for this GPU: the project's FP8 kernels run every "
                    "FP8 GEMM, as --fp8-gemm own\n");
        fp8_gemm = "own";
    }
}

template <typename OutT>
void fp8_matmul(Fp8Backend backend, Blas& blas, cudaStream_t s, OutT* C, const fp8* A, const fp8* B,
                const float* scale_a, const float* scale_b, int M, int N, int K, BScales b_scales, bool accumulate) {
    if (backend == Fp8Backend::CuBLASLt)
        fp8_gemm_cublaslt(blas, s, C, A, B, scale_a, scale_b, M, N, K, CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                          b_scales == BScales::Block ? CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F
                                                     : CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F,
                          accumulate, false);
    else if (b_scales == BScales::Block)
        fp8_gemm<OutT, BScales::Block>(C, A, B, scale_a, scale_b, M, N, K, accumulate, true, s);
    else
        fp8_gemm<OutT, BScales::Row>(C, A, B, scale_a, scale_b, M, N, K, accumulate, true, s);
}

// ---------------------------------------------------------------------------------------------------------------
// FP8 Linear: y = x W^T with all three GEMMs in FP8 (V3 §3.3.1, Figure 6)
// ---------------------------------------------------------------------------------------------------------------
//
// forward        y [M, N]  = x [M, K]  . W [N, K]^T     A: x in 1x128 tiles,   B: W in 128x128 blocks
// data gradient  dx [M, K] = dy [M, N] . W^T [K, N]^T   A: dy in 1x128 tiles,  B: W^T in 128x128 blocks
// weight grad.   dW [N, K] = dy^T [N, M] . x^T [K, M]^T A: dy^T in 1x128 tiles along the tokens, B: x^T likewise
// The forward pass keeps x for the backward pass as x^T in FP8 (V3 §3.3.3 caches activations in FP8).
//
// A Linear may hold several weights of one shape (the routed experts), each meeting its own group of rows of x.

// E4M3 values and their scales.
struct Fp8Tensor {
    DeviceBuffer<fp8> q;
    DeviceBuffer<float> scales;
    Fp8Tensor(long elements, long scale_count) : q(elements), scales(scale_count) {}
};

// `groups` weights [N, K] stored one after the other, each in FP8 in both orientations, quantized from the FP32
// master copy after every optimizer step.
struct Fp8Weight {
    int N, K, groups;
    Fp8Tensor w, wT;
    Fp8Weight(int n, int k, int g = 1)
        : N(n),
          K(k),
          groups(g),
          w(long(g) * n * k, g * block_scale_count(n, k)),
          wT(long(g) * n * k, g * block_scale_count(k, n)) {}
    const fp8* q(int g) const { return w.q.data() + long(g) * N * K; }
    const float* scales(int g) const { return w.scales.data() + g * block_scale_count(N, K); }
    const fp8* qT(int g) const { return wT.q.data() + long(g) * N * K; }
    const float* scalesT(int g) const { return wT.scales.data() + g * block_scale_count(K, N); }
    void refresh(const float* master, int* nonfinite, cudaStream_t s) {
        quantize_weight(w.q.data(), wT.q.data(), w.scales.data(), wT.scales.data(), nonfinite, master, N, K, s, groups);
    }
};

// Operands quantized along rows ([rows, cols], scales [ceil(cols/128), rows]) or transposed ([cols, rows], scales
// [ceil(rows/128), cols]) hold the same number of values and scale slots at most: one buffer size serves both.
// Rows split into groups whose sizes are multiples of 128 need no more.
inline long fp8_operand_scales(int rows, int cols) {
    return std::max(long(scale_tiles(cols)) * rows, long(scale_tiles(rows)) * cols);
}
inline Fp8Tensor fp8_operand(int rows, int cols) {
    return Fp8Tensor(long(rows) * cols, fp8_operand_scales(rows, cols));
}

// The rows of a Linear's input, in groups: group g, rows [offsets[g], offsets[g + 1]), meets weight first_weight + g
// (the routed experts: group g is the tokens routed to expert g; with expert parallelism, to this rank's g-th). With
// more than one group, every group's size is a multiple of 128, so that no FP8 tile spans two groups, and the offsets
// are on the device: the quantizer and the grouped FP8 GEMMs read them there, launched for `bound` rows, so that the
// host need not wait for the routing (expert parallelism knows them on the host too). The GEMMs in the model's
// precision run group by group, sized on the host: they need the offsets there too.
struct RowGroups {
    std::vector<int> offsets;             // on the host, where it has them
    const int* device_offsets = nullptr;  // on the device, with several groups
    int count = 1;                        // groups
    int bound = 0;                        // rows in all, or at most where only the device has the offsets
    int first_weight = 0;                 // the weight that group 0 meets

    static RowGroups all(int rows) { return {{0, rows}, nullptr, 1, rows}; }
    static RowGroups known(std::vector<int> host, const int* device, int first_weight = 0) {
        const int groups = int(host.size()) - 1, rows = host.back();
        return {std::move(host), device, groups, rows, first_weight};
    }
    static RowGroups on_device(const int* device, int groups, int max_rows) {
        return {{}, device, groups, max_rows};
    }
    int groups() const { return count; }
    int rows() const { return bound; }
    int first(int g) const { return offsets.at(g); }
    int size(int g) const { return offsets.at(g + 1) - offsets.at(g); }
};

// y = x W^T (+ y); x_saved receives x^T in FP8 for the backward pass; x_q is scratch for the forward GEMM's A.
// Groups of rows (the routed experts) run as one grouped launch, sized on the device.
template <typename T>
void fp8_linear_forward(Fp8Backend backend, Blas& blas, cudaStream_t s, T* y, const T* x, const Fp8Weight& W,
                        Fp8Tensor& x_q, Fp8Tensor& x_saved, const RowGroups& rows, int* nonfinite,
                        bool accumulate = false) {
    const int g0 = rows.first_weight;
    quantize_rows_and_transposed(x_q.q.data(), x_q.scales.data(), x_saved.q.data(), x_saved.scales.data(), nonfinite,
                                 x, rows.rows(), W.K, s, rows.device_offsets, rows.groups());
    if (rows.device_offsets)
        fp8_gemm_grouped_rows(y, x_q.q.data(), W.q(g0), x_q.scales.data(), W.scales(g0), rows.device_offsets,
                              rows.groups(), rows.rows(), W.N, W.K, accumulate, s);
    else
        fp8_matmul(backend, blas, s, y, x_q.q.data(), W.q(g0), x_q.scales.data(), W.scales(g0), rows.rows(), W.N, W.K,
                   BScales::Block, accumulate);
}

// dx = dy W (+ dx), dW = dy^T x (FP32), from x^T saved by the forward pass; dy_q and dy_t are scratch. A group
// without rows gets a zero weight gradient. W and dW hold every group's weights, the rows' groups meet those from
// rows.first_weight on.
template <typename T>
void fp8_linear_backward(Fp8Backend backend, Blas& blas, cudaStream_t s, T* dx, float* dW, const T* dy,
                         const Fp8Tensor& x_saved, const Fp8Weight& W, Fp8Tensor& dy_q, Fp8Tensor& dy_t,
                         const RowGroups& rows, int* nonfinite, bool accumulate_dx = false) {
    const int g0 = rows.first_weight;
    dW += long(g0) * W.N * W.K;
    quantize_rows_and_transposed(dy_q.q.data(), dy_q.scales.data(), dy_t.q.data(), dy_t.scales.data(), nonfinite, dy,
                                 rows.rows(), W.N, s, rows.device_offsets, rows.groups());
    if (rows.device_offsets) {
        fp8_gemm_grouped_rows(dx, dy_q.q.data(), W.qT(g0), dy_q.scales.data(), W.scalesT(g0), rows.device_offsets,
                              rows.groups(), rows.rows(), W.K, W.N, accumulate_dx, s);
        fp8_gemm_grouped_reduction(dW, dy_t.q.data(), x_saved.q.data(), dy_t.scales.data(), x_saved.scales.data(),
                                   rows.device_offsets, rows.groups(), W.N, W.K, s);
        return;
    }
    const int M = rows.rows();
    fp8_matmul(backend, blas, s, dx, dy_q.q.data(), W.qT(g0), dy_q.scales.data(), W.scalesT(g0), M, W.K, W.N,
               BScales::Block, accumulate_dx);
    fp8_matmul(backend, blas, s, dW, dy_t.q.data(), x_saved.q.data(), dy_t.scales.data(), x_saved.scales.data(), W.N,
               W.K, M, BScales::Row, false);
}

// ---------------------------------------------------------------------------------------------------------------
// Linear: a projection of the model, as every module holds it
// ---------------------------------------------------------------------------------------------------------------

// The FP8 state that a model's Linears share: the GEMM backend, scratch for the quantized operands of one GEMM,
// and the flags raised when a quantization meets a NaN or Inf: on an activation or a gradient the optimizer skips
// its update; the weights' flag is separate (a non-finite weight shows in the loss).
struct Fp8Scratch {
    Fp8Backend backend;
    Fp8Tensor x_q, dy_q, dy_t;
    DeviceBuffer<int> nonfinite{1}, weights_nonfinite{1};
    // Scratch for operands of up to `elements` values and `scale_slots` scales.
    Fp8Scratch(Fp8Backend b, long elements, long scale_slots)
        : backend(b), x_q(elements, scale_slots), dy_q(elements, scale_slots), dy_t(elements, scale_slots) {
        CUDA_CHECK(cudaMemset(nonfinite.data(), 0, sizeof(int)));
        CUDA_CHECK(cudaMemset(weights_nonfinite.data(), 0, sizeof(int)));
    }
};

// What a module's forward and backward need from the model that holds its parameters.
template <typename T>
struct Ctx {
    Blas& blas;
    cudaStream_t stream;
    const ParamLayout& layout;
    const float* master;  // FP32 master weights: the router computes in FP32 (V3 §3.3 keeps gating out of FP8)
    const T* weights;     // the copy in the model's precision
    float* grads;
    Fp8Scratch* fp8;  // the projections' GEMMs in FP8 (V3 §3.3); null: in the model's precision
    bool decoding;    // the sampler's decode step: no backward follows, and nothing may wait for the host
    const T* w(int tensor) const { return weights + layout.offset(tensor); }
    const float* w32(int tensor) const { return master + layout.offset(tensor); }
    float* g(int tensor) const { return grads + layout.offset(tensor); }
};

// y = x W^T. W [out, in] is a tensor of the parameter layout; with groups > 1, the layout holds `groups` such weights
// one after the other, and group g of the input's rows meets weight g. In FP8 training the three GEMMs run in E4M3
// and the forward pass keeps x^T in FP8 for the backward pass.
struct Linear {
    int weight = -1;  // the tensor of the first weight
    int out = 0, in = 0, groups = 1;
    int max_rows = 0;  // rows of the input at most, for the FP8 buffers
    std::unique_ptr<Fp8Weight> w8;
    std::unique_ptr<Fp8Tensor> x_saved;

    static Linear declare(ParamLayout& layout, const std::string& name, int out, int in, int max_rows,
                          Init init = Init::Normal) {
        Linear l;
        l.weight = layout.matrix(name, out, in, init), l.out = out, l.in = in, l.max_rows = max_rows;
        return l;
    }

    void enable_fp8() {
        w8 = std::make_unique<Fp8Weight>(out, in, groups);
        x_saved = std::make_unique<Fp8Tensor>(fp8_operand(max_rows, in));
    }

    template <typename T>
    void forward(const Ctx<T>& c, T* y, const T* x, const RowGroups& rows, bool accumulate = false) {
        if (c.fp8) {
            fp8_linear_forward(c.fp8->backend, c.blas, c.stream, y, x, *w8, c.fp8->x_q, *x_saved, rows,
                               c.fp8->nonfinite.data(), accumulate);
            return;
        }
        for (int g = 0; g < rows.groups(); g++) {
            const long first = rows.first(g), w = rows.first_weight + g;
            if (rows.size(g) > 0)
                linear_forward(c.blas, c.stream, y + first * out, x + first * in, c.w(weight) + w * out * in,
                               rows.size(g), out, in, accumulate);
        }
    }

    // dx (+ dx) and the weight gradient (written), for the input x of the last forward pass. Weights that none of
    // the rows' groups meet (expert parallel: the experts of the other ranks) get a zero gradient here; their own
    // ranks' gradients reach them in the optimizer's reduce-scatter.
    template <typename T>
    void backward(const Ctx<T>& c, T* dx, const T* dy, const T* x, const RowGroups& rows, bool accumulate_dx = false) {
        auto zero_grads = [&](long first, long count) {
            if (count > 0)
                CUDA_CHECK(cudaMemsetAsync(c.g(weight) + first * out * in, 0, sizeof(float) * count * out * in,
                                           c.stream));
        };
        const long mine_end = rows.first_weight + rows.groups();
        zero_grads(0, rows.first_weight);
        zero_grads(mine_end, groups - mine_end);
        if (c.fp8) {
            fp8_linear_backward(c.fp8->backend, c.blas, c.stream, dx, c.g(weight), dy, *x_saved, *w8, c.fp8->dy_q,
                                c.fp8->dy_t, rows, c.fp8->nonfinite.data(), accumulate_dx);
            return;
        }
        for (int g = 0; g < rows.groups(); g++) {
            const long first = rows.first(g), w = rows.first_weight + g;
            float* dW = c.g(weight) + w * out * in;
            if (rows.size(g) == 0)
                CUDA_CHECK(cudaMemsetAsync(dW, 0, sizeof(float) * out * in, c.stream));
            else
                linear_backward(c.blas, c.stream, dx + first * in, dW, dy + first * out, x + first * in,
                                c.w(weight) + w * out * in, rows.size(g), out, in, accumulate_dx);
        }
    }

    // y [groups, rows, out]: every weight applied to the same rows x [rows, in] (shared_x) or each to its own
    // [groups, rows, in], as one batched GEMM in the model's precision. The decode step runs every routed expert on
    // every token this way: the step's shapes are fixed (it replays as a CUDA graph) and need no routing counts.
    template <typename T>
    void forward_every_group(const Ctx<T>& c, T* y, const T* x, int rows, bool shared_x) {
        matmul(c.blas, c.stream, y, x, c.w(weight),
               Matmul{rows, out, in, false, true, 1.0f, 0.0f, groups, shared_x ? 0 : long(rows) * in, long(out) * in,
                      long(rows) * out});
    }
};

// FP8 for every one of a model's Linears, with scratch that each of their operands fits in.
inline std::unique_ptr<Fp8Scratch> enable_fp8(Fp8Backend backend, const std::vector<Linear*>& linears) {
    long elements = 0, scale_slots = 0;
    for (Linear* l : linears) {
        l->enable_fp8();
        for (int width : {l->in, l->out}) {
            elements = std::max(elements, long(l->max_rows) * width);
            scale_slots = std::max(scale_slots, fp8_operand_scales(l->max_rows, width));
        }
    }
    return std::make_unique<Fp8Scratch>(backend, elements, scale_slots);
}
