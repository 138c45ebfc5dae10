// Exercise 9: MLA's absorbed attention over the latent cache, at decode time.
// This file replaces ref::latent_attention_decode, the CPU reference in tests/reference.h that the GPU decode kernel
// of sampler.cuh is tested against; latent_row_position() and rope() are defined above it there. Check it with
// `make exercise 9`.

// The step's rows (m.N() of them, R per sequence): row n is sequence n / R's token at position
// p = latent_row_position(pos, n, R, max_len). For every row and head h: the scores of the absorbed query
// q_abs [rows, H, d_c] against the cached c_kv of positions 0..p plus RoPE(q_rope, p) against the cached (already
// rotated) k_rope, scaled by 1 / sqrt(d_nope + d_rope); their softmax P; and ctx[n, h] = sum_j P_j c_kv_j.
// q [rows, H, d_nope + d_rope] holds q_rope in each head's last d_rope columns; the caches are
// [sequences, max_len, d_c] and [sequences, max_len, d_rope].
inline std::vector<double> latent_attention_decode(const MlaDims& m, const std::vector<float>& q_abs,
                                                   const std::vector<float>& q, const std::vector<float>& cache_ckv,
                                                   const std::vector<float>& cache_kr, const std::vector<int>& pos,
                                                   int R, int max_len) {
    std::vector<double> ctx(size_t(m.N()) * m.H * m.d_c, 0.0);
    // your code here
    return ctx;
}
