// rng.h: the counter-based random numbers of the whole project, in plain C++ so that data/ builds without CUDA.
//
// A value is a pure function of (seed, stream, counter): any element of any step can be regenerated on the host
// or on the GPU without carrying state, and a resumed run draws exactly the numbers it would have drawn.
#pragma once

#include <cstdint>

// Functions that kernels call too: host and device under nvcc, plain inline functions elsewhere.
#ifndef HD
#ifdef __CUDACC__
#define HD __host__ __device__ __forceinline__
#else
#define HD inline
#endif
#endif

HD uint64_t splitmix64(uint64_t x) {
    x += 0x9E3779B97F4A7C15ull;
    x = (x ^ (x >> 30)) * 0xBF58476D1CE4E5B9ull;
    x = (x ^ (x >> 27)) * 0x94D049BB133111EBull;
    return x ^ (x >> 31);
}

HD uint64_t rng_hash(uint64_t seed, uint64_t stream, uint64_t counter) {
    return splitmix64(splitmix64(seed ^ splitmix64(stream)) + counter);
}

// Uniform in [0, 1) with 24 random bits.
HD float rng_uniform(uint64_t seed, uint64_t stream, uint64_t counter) {
    return float(rng_hash(seed, stream, counter) >> 40) * (1.0f / 16777216.0f);
}

// A sequential host generator over the same hash, for code that draws one number after another (data synthesis).
struct Rng {
    uint64_t seed, stream, counter = 0;
    Rng(uint64_t seed_, uint64_t stream_ = 0) : seed(seed_), stream(stream_) {}
    uint64_t next() { return rng_hash(seed, stream, counter++); }
    // Uniform integer in [lo, hi], inclusive.
    long range(long lo, long hi) { return lo + long(next() % uint64_t(hi - lo + 1)); }
    double uniform() { return double(next() >> 11) * (1.0 / 9007199254740992.0); }
};
