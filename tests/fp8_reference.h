// tests/fp8_reference.h: plain CPU references for fp8.cuh. A reference scales a tile by its own absolute maximum,
// written out from V3 §3.3.2's definition; it shares with the code under test only the E4M3 rounding of
// cuda_fp8.h (the FP8 counterpart of common.cuh's BF16 rounding).
#pragma once

#include <cuda_fp8.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

namespace ref {

constexpr int TILE = 128;
constexpr double E4M3_LARGEST = 448.0;

inline int tiles(int n) { return (n + TILE - 1) / TILE; }

// A row of 128x128 block scales is padded to a multiple of 4 entries, zeros (cuBLASLt's layout).
inline int padded_tiles(int n) { return (tiles(n) + 3) / 4 * 4; }

// amax / 448 but at least the smallest normal float, or 1 for an all-zero tile.
inline float scale_of(double amax) {
    return amax > 0.0 ? std::max(float(amax / E4M3_LARGEST), std::numeric_limits<float>::min()) : 1.0f;
}

// The E4M3 value (as a float) of x in units of scale, as x times the FP32 inverse of the scale.
inline float e4m3(float x, float scale) { return float(__nv_fp8_e4m3(x * (1.0f / scale))); }

// Exercise 7 (exercises/07_quantizer) asks for this function's body.
#ifdef EXERCISE_QUANTIZE_ROWS
#include EXERCISE_QUANTIZE_ROWS
#else
// x [M, K] in 1x128 tiles along each row: q [M, K] (E4M3 values as floats), scales [tiles(K), M].
inline void quantize_rows(const std::vector<float>& x, int M, int K, std::vector<float>& q,
                          std::vector<float>& scales) {
    q.assign(size_t(M) * K, 0.0f), scales.assign(size_t(tiles(K)) * M, 0.0f);
    for (int m = 0; m < M; m++)
        for (int t = 0; t < tiles(K); t++) {
            double amax = 0.0;
            for (int k = t * TILE; k < std::min(K, (t + 1) * TILE); k++)
                amax = std::max(amax, std::fabs(double(x[size_t(m) * K + k])));
            float scale = scale_of(amax);
            scales[size_t(t) * M + m] = scale;
            for (int k = t * TILE; k < std::min(K, (t + 1) * TILE); k++)
                q[size_t(m) * K + k] = e4m3(x[size_t(m) * K + k], scale);
        }
}
#endif

inline std::vector<float> transpose(const std::vector<float>& x, int R, int C) {
    std::vector<float> t(x.size());
    for (int r = 0; r < R; r++)
        for (int c = 0; c < C; c++) t[size_t(c) * R + r] = x[size_t(r) * C + c];
    return t;
}

// W [N, K] in 128x128 blocks: q [N, K], scales [tiles(N), padded_tiles(K)].
inline void quantize_blocks(const std::vector<float>& W, int N, int K, std::vector<float>& q,
                            std::vector<float>& scales) {
    q.assign(W.size(), 0.0f), scales.assign(size_t(tiles(N)) * padded_tiles(K), 0.0f);
    for (int nb = 0; nb < tiles(N); nb++)
        for (int kb = 0; kb < tiles(K); kb++) {
            double amax = 0.0;
            for (int n = nb * TILE; n < std::min(N, (nb + 1) * TILE); n++)
                for (int k = kb * TILE; k < std::min(K, (kb + 1) * TILE); k++)
                    amax = std::max(amax, std::fabs(double(W[size_t(n) * K + k])));
            float scale = scale_of(amax);
            scales[size_t(nb) * padded_tiles(K) + kb] = scale;
            for (int n = nb * TILE; n < std::min(N, (nb + 1) * TILE); n++)
                for (int k = kb * TILE; k < std::min(K, (kb + 1) * TILE); k++)
                    q[size_t(n) * K + k] = e4m3(W[size_t(n) * K + k], scale);
        }
}

// Exercise 8 (exercises/08_fp8_gemm) asks for this function's body.
#ifdef EXERCISE_FP8_GEMM
#include EXERCISE_FP8_GEMM
#else
// C [M, N] = sum over K-blocks b of (sum over k in b of qA[m][k] qB[n][k]) * sA[b][m] * sB(n, b), in double;
// sB is [tiles(N), padded_tiles(K)] for a weight (block_scales) or [tiles(K), N] like sA.
inline std::vector<double> fp8_gemm(const std::vector<float>& qA, const std::vector<float>& qB,
                                    const std::vector<float>& sA, const std::vector<float>& sB, int M, int N, int K,
                                    bool block_scales) {
    std::vector<double> C(size_t(M) * N, 0.0);
    for (int m = 0; m < M; m++)
        for (int n = 0; n < N; n++)
            for (int b = 0; b < tiles(K); b++) {
                double partial = 0.0;
                for (int k = b * TILE; k < std::min(K, (b + 1) * TILE); k++)
                    partial += double(qA[size_t(m) * K + k]) * qB[size_t(n) * K + k];
                double scale_b = block_scales ? sB[size_t(n / TILE) * padded_tiles(K) + b] : sB[size_t(b) * N + n];
                C[size_t(m) * N + n] += partial * sA[size_t(b) * M + m] * scale_b;
            }
    return C;
}
#endif

}  // namespace ref
