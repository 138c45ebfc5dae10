// Exercise 8: the FP8 GEMM with fine-grained scales and promotion every 128 elements of K.
// This file replaces ref::fp8_gemm, the CPU reference in tests/fp8_reference.h that the GPU FP8 GEMMs of fp8.cuh
// (ours and cuBLASLt's) are tested against; TILE, tiles() and padded_tiles() are defined above it there. Check it
// with `make exercise 8`.

// C [M, N] = A B^T from E4M3 codes (as floats) qA [M, K] and qB [N, K] and their scales: sA [tiles(K), M], one per
// 1x128 tile of A; sB one per 128x128 block of B, [tiles(N), padded_tiles(K)] (block_scales), or one per 1x128 tile
// of B's rows, [tiles(K), N] (not block_scales). Compute in double.
inline std::vector<double> fp8_gemm(const std::vector<float>& qA, const std::vector<float>& qB,
                                    const std::vector<float>& sA, const std::vector<float>& sB, int M, int N, int K,
                                    bool block_scales) {
    std::vector<double> C(size_t(M) * N, 0.0);
    // your code here
    return C;
}
