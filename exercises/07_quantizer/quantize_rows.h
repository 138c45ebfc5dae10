// Exercise 7: V3's fine-grained quantization of activations, 1x128 tiles with online scales.
// This file replaces ref::quantize_rows, the CPU reference in tests/fp8_reference.h that the GPU quantizer of fp8.cuh
// is tested against; TILE, tiles(), scale_of() and e4m3() are defined above it there. Check it with
// `make exercise 7`.

// x [M, K] in 1x128 tiles along each row (the last tile of a row may be shorter): q [M, K] holds each value's E4M3
// code (as a float), scales [tiles(K), M] each tile's scale, the scales of one tile index contiguous over the rows.
inline void quantize_rows(const std::vector<float>& x, int M, int K, std::vector<float>& q,
                          std::vector<float>& scales) {
    q.assign(size_t(M) * K, 0.0f), scales.assign(size_t(tiles(K)) * M, 0.0f);
    // your code here
}
