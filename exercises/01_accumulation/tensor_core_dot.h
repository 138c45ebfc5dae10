// Exercise 1: the FP8 tensor cores' limited accumulation, and V3's promotion every N_C elements of K.
// This file replaces tensor_core_dot in kernels/fp8_accumulator.h; aligned_add, defined just above it there, is
// yours to call. Check it with `make exercise 1`.

// sum_k a_k b_k as an FP8 GEMM's tensor cores compute it: the products added one by one into a partial sum that
// keeps `bits` bits (aligned_add). promote_every = 0: one partial sum over all of K. promote_every = N_C: every N_C
// products, the partial sum is added to an FP32 total and the next partial sum starts from zero.
inline float tensor_core_dot(const float* a, const float* b, int K, int bits, int promote_every) {
    // your code here
    return 0.0f;
}
