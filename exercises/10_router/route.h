// Exercise 10: DeepSeekMoE's group-limited routing on biased scores.
// This file replaces model_ref::route, the CPU reference in tests/model_reference.h that the GPU router of moe.cuh
// is tested against; ranked() is defined above it there. Check it with `make exercise 10`.

// The m.top_k experts chosen for one token from its affinities s (m.n_routed of them) and the balancing bias b:
// the m.topk_group best of the m.n_group groups of consecutive experts, each group scored by the sum of its two
// best s + b; then the best top_k experts by s + b among those groups' experts, best first, ties to the lower index.
inline std::vector<int> route(const MoeConfig& m, const std::vector<double>& s, const double* b) {
    // your code here
    return std::vector<int>(m.top_k, 0);
}
