// fp8_accumulator.h: a host model of the FP8 tensor cores' accumulator, and of V3's fix for it (V3 §3.3.2,
// "Increasing Accumulation Precision"; §3.5.2). No GPU needed: it shows on any machine what fp8.cuh's kernels do.
//
// On Hopper, an FP8 MMA adds its products into a partial sum that keeps only about 14 bits: each addend is aligned
// to the exponent of the largest term and the bits that fall below the sum's last kept bit are dropped. Over a long
// K the sum grows, its last kept bit rises, and more and more of each small product is lost (DeepSeek measured up
// to 2% relative error at K = 4096). The fix: every N_C = 128 elements of K, add the partial sum into an FP32
// accumulator and start the next partial sum from zero, so that no partial sum grows large enough to drop much.
#pragma once

#include <algorithm>
#include <cmath>

// x cut toward zero to a multiple of quantum (a power of two).
inline double truncate_to(double x, double quantum) { return std::trunc(x / quantum) * quantum; }

// sum + product as the tensor cores add them: both aligned to the larger one's exponent e (|x| < 2^e) and cut to
// its `bits` leading bits, that is to a multiple of 2^(e - bits).
inline double aligned_add(double sum, double product, int bits) {
    if (sum == 0.0 || product == 0.0) return sum + product;  // zero has no exponent to align to
    int e_sum = 0, e_product = 0;
    std::frexp(sum, &e_sum);
    std::frexp(product, &e_product);
    const double quantum = std::ldexp(1.0, std::max(e_sum, e_product) - bits);
    return truncate_to(sum, quantum) + truncate_to(product, quantum);
}

// Exercise 1 (exercises/01_accumulation) asks for this function's body.
#ifdef EXERCISE_TENSOR_CORE_DOT
#include EXERCISE_TENSOR_CORE_DOT
#else
// sum_k a_k b_k as an FP8 GEMM's tensor cores compute it: the products added one by one with aligned_add (a
// `bits`-bit partial sum). promote_every = 0: one partial sum over all of K, as the tensor cores alone do;
// promote_every = N_C: every N_C products the partial sum is added to an FP32 total and restarts from zero.
inline float tensor_core_dot(const float* a, const float* b, int K, int bits, int promote_every) {
    float total = 0.0f;
    double partial = 0.0;
    for (int k = 0; k < K; k++) {
        partial = aligned_add(partial, double(a[k]) * b[k], bits);
        if (promote_every > 0 && (k + 1) % promote_every == 0) total += float(partial), partial = 0.0;
    }
    return total + float(partial);
}
#endif
