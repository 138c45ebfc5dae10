// common.cuh: checked CUDA/cuBLAS calls, device buffers, random normals, timers, BF16 helpers.
//
// Everything else in the project includes this file. A failed CUDA or cuBLAS call prints the call, the file and
// the line, and exits non-zero: there is no recovering from a broken device state in a training program.
//
// The headers hold kernels and are included by several test files: a kernel that is not a template is declared
// static, so each file gets its own copy instead of a duplicate symbol.
#pragma once

#include <cublasLt.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <chrono>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <initializer_list>
#include <memory>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <vector>

#include "rng.h"

// ---------------------------------------------------------------------------------------------------------------
// Checked calls
// ---------------------------------------------------------------------------------------------------------------

inline void cuda_check(cudaError_t err, const char* call, const char* file, int line) {
    if (err == cudaSuccess) return;
    std::fprintf(stderr, "CUDA error %d (%s) in %s at %s:%d\n", int(err), cudaGetErrorString(err), call, file, line);
    std::exit(1);
}

inline void cublas_check(cublasStatus_t status, const char* call, const char* file, int line) {
    if (status == CUBLAS_STATUS_SUCCESS) return;
    std::fprintf(stderr, "cuBLAS error %d (%s) in %s at %s:%d\n", int(status), cublasLtGetStatusString(status), call,
                 file, line);
    std::exit(1);
}

#define CUDA_CHECK(call) cuda_check((call), #call, __FILE__, __LINE__)
#define CUBLAS_CHECK(call) cublas_check((call), #call, __FILE__, __LINE__)
// After every kernel launch: launch errors surface here, not at some later unrelated call.
#define CUDA_CHECK_LAUNCH() cuda_check(cudaGetLastError(), "kernel launch", __FILE__, __LINE__)

// Any error from cudaGetDeviceCount (no driver, driver too old, no device) means "no GPU here".
inline bool gpu_available() {
    int n = 0;
    cudaError_t err = cudaGetDeviceCount(&n);
    if (err != cudaSuccess) {
        cudaGetLastError();  // clear the sticky error so later host-only code is unaffected
        return false;
    }
    return n > 0;
}

// For a program that cannot run without a GPU: whether there is one, the error printed where there is none.
inline bool require_gpu() {
    if (gpu_available()) return true;
    std::fprintf(stderr, "error: no usable CUDA GPU found (cudaGetDeviceCount failed or found none)\n");
    return false;
}

inline int ceil_div(long a, long b) { return int((a + b - 1) / b); }

// ---------------------------------------------------------------------------------------------------------------
// Device buffers
// ---------------------------------------------------------------------------------------------------------------

// An owning device array. Moves, never copies; frees on destruction.
template <typename T>
struct DeviceBuffer {
    T* ptr = nullptr;
    size_t count = 0;

    DeviceBuffer() = default;
    explicit DeviceBuffer(size_t n) { resize(n); }
    DeviceBuffer(const DeviceBuffer&) = delete;
    DeviceBuffer& operator=(const DeviceBuffer&) = delete;
    DeviceBuffer(DeviceBuffer&& o) noexcept : ptr(o.ptr), count(o.count) { o.ptr = nullptr, o.count = 0; }
    DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
        std::swap(ptr, o.ptr);
        std::swap(count, o.count);
        return *this;
    }
    ~DeviceBuffer() {
        if (ptr) cudaFree(ptr);
    }

    void resize(size_t n) {
        if (ptr) CUDA_CHECK(cudaFree(ptr));
        ptr = nullptr;
        count = n;
        if (n) CUDA_CHECK(cudaMalloc(&ptr, n * sizeof(T)));
    }
    size_t bytes() const { return count * sizeof(T); }
    T* data() const { return ptr; }

    void upload(const std::vector<T>& host) {
        if (host.size() != count) resize(host.size());
        CUDA_CHECK(cudaMemcpy(ptr, host.data(), bytes(), cudaMemcpyHostToDevice));
    }
    std::vector<T> download() const {
        std::vector<T> host(count);
        CUDA_CHECK(cudaMemcpy(host.data(), ptr, bytes(), cudaMemcpyDeviceToHost));
        return host;
    }
};

// Page-locked host memory: a cudaMemcpyAsync into it returns at once instead of waiting for the stream.
struct PinnedBuffer {
    void* ptr = nullptr;
    explicit PinnedBuffer(size_t bytes) { CUDA_CHECK(cudaMallocHost(&ptr, bytes)); }
    PinnedBuffer(const PinnedBuffer&) = delete;
    PinnedBuffer& operator=(const PinnedBuffer&) = delete;
    ~PinnedBuffer() { cudaFreeHost(ptr); }
};

// A point in a stream that the host can wait for.
struct Event {
    cudaEvent_t event = nullptr;
    Event() { CUDA_CHECK(cudaEventCreateWithFlags(&event, cudaEventDisableTiming)); }
    Event(const Event&) = delete;
    Event& operator=(const Event&) = delete;
    ~Event() { cudaEventDestroy(event); }
};

// Many device arrays that live as long as their owner: each take<U>(n) is a buffer of its own, freed together;
// likewise page-locked host arrays and events.
struct DeviceArena {
    std::vector<DeviceBuffer<uint8_t>> blocks;
    std::vector<std::unique_ptr<PinnedBuffer>> pinned;
    std::vector<std::unique_ptr<Event>> events;
    template <typename U>
    U* take(long n) {
        blocks.emplace_back(size_t(n) * sizeof(U));
        return reinterpret_cast<U*>(blocks.back().data());
    }
    template <typename U>
    U* take_pinned(long n) {
        pinned.push_back(std::make_unique<PinnedBuffer>(size_t(n) * sizeof(U)));
        return reinterpret_cast<U*>(pinned.back()->ptr);
    }
    cudaEvent_t take_event() {
        events.push_back(std::make_unique<Event>());
        return events.back()->event;
    }
};

// Blocks of 256 threads for one thread per element.
inline int elementwise_blocks(long n) { return ceil_div(n, 256); }

// `width` columns of `rows` rows from src (row stride src_stride) to dst (row stride dst_stride), strides in elements:
// a slice of a wider matrix to a dense one, or back.
template <typename T>
void copy_columns(T* dst, int dst_stride, const T* src, int src_stride, int width, int rows, cudaStream_t s) {
    CUDA_CHECK(cudaMemcpy2DAsync(dst, sizeof(T) * dst_stride, src, sizeof(T) * src_stride, sizeof(T) * width, rows,
                                 cudaMemcpyDeviceToDevice, s));
}

// Elementwise kernels over a [rows, cols] matrix: a row per blockIdx.x, its columns across blockIdx.y, and
// ROW_ITEMS columns per thread, ROW_THREADS apart. A kernel finds its elements without dividing a 64-bit index
// (which costs more than an element's own work), and a thread's loads are in flight together (its pointers are
// __restrict__): one 2-byte element per thread leaves too few bytes in flight to reach HBM's bandwidth.
constexpr int ROW_THREADS = 128, ROW_ITEMS = 4;
inline dim3 row_grid(long rows, int cols) { return dim3(unsigned(rows), ceil_div(cols, ROW_THREADS * ROW_ITEMS)); }
__device__ __forceinline__ int row_grid_column(int item) {
    return (blockIdx.y * ROW_ITEMS + item) * ROW_THREADS + threadIdx.x;
}

// ---------------------------------------------------------------------------------------------------------------
// Random numbers: rng.h's counter-based hash, and normals for weight initialization
// ---------------------------------------------------------------------------------------------------------------

// Standard normal by Box-Muller from two counters.
HD float rng_normal(uint64_t seed, uint64_t stream, uint64_t counter) {
    uint64_t h = rng_hash(seed, stream, counter);
    float u1 = (float((h >> 40) & 0xFFFFFF) + 1.0f) * (1.0f / 16777217.0f);
    float u2 = float(h & 0xFFFFFF) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u1)) * cospif(2.0f * u2);
}

// ---------------------------------------------------------------------------------------------------------------
// Precision helpers: kernels are templated on the storage type T (float or __nv_bfloat16) and compute in FP32.
// ---------------------------------------------------------------------------------------------------------------

using bf16 = __nv_bfloat16;

HD float to_float(float x) { return x; }
HD float to_float(bf16 x) { return __bfloat162float(x); }
template <typename T>
HD T from_float(float x);
template <>
HD float from_float<float>(float x) {
    return x;
}
template <>
HD bf16 from_float<bf16>(float x) {
    return __float2bfloat16_rn(x);
}

// Round an FP32 value to BF16 stochastically (the expected value is exact), driven by a random 16-bit word.
HD bf16 bf16_stochastic_round(float x, uint32_t random16) {
    uint32_t bits;
    memcpy(&bits, &x, 4);
    bits += random16 & 0xFFFFu;
    bits &= 0xFFFF0000u;
    float rounded;
    memcpy(&rounded, &bits, 4);
    return __float2bfloat16_rz(rounded);
}

template <typename T>
constexpr cudaDataType_t cuda_dtype();
template <>
constexpr cudaDataType_t cuda_dtype<float>() {
    return CUDA_R_32F;
}
template <>
constexpr cudaDataType_t cuda_dtype<bf16>() {
    return CUDA_R_16BF;
}

// P consecutive values of a row, moved as one access of P * sizeof(T) bytes (16 at most): the pointer must be
// aligned to it. Wide accesses put more bytes in flight per instruction, which memory-bound kernels need.
template <typename T, int P>
struct alignas(sizeof(T) * P) Chunk {
    T v[P];
};

template <int P, typename T>
__device__ __forceinline__ void load_chunk(float (&x)[P], const T* p) {
    const Chunk<T, P> c = *reinterpret_cast<const Chunk<T, P>*>(p);
#pragma unroll
    for (int k = 0; k < P; k++) x[k] = to_float(c.v[k]);
}

template <int P, typename T>
__device__ __forceinline__ void store_chunk(T* p, const float (&x)[P]) {
    Chunk<T, P> c;
#pragma unroll
    for (int k = 0; k < P; k++) c.v[k] = from_float<T>(x[k]);
    *reinterpret_cast<Chunk<T, P>*>(p) = c;
}

// The largest power of two (256 at most) that the address is a multiple of.
inline uint32_t pointer_alignment(const void* p) {
    uintptr_t address = reinterpret_cast<uintptr_t>(p);
    uint32_t align = 256;
    while (align > 1 && address % align != 0) align /= 2;
    return align;
}

// Values of T per access in a kernel that moves chunks (see Chunk): 16 bytes where every width it steps through (row
// lengths, strides, offsets, in elements) is a multiple of the chunk and every pointer is aligned to it, else the
// largest power of two that they allow.
template <typename T>
int vector_width(std::initializer_list<long> widths, std::initializer_list<const void*> pointers) {
    auto fits = [&](int p) {
        for (const void* ptr : pointers)
            if (pointer_alignment(ptr) < p * sizeof(T)) return false;
        for (long w : widths)
            if (w % p != 0) return false;
        return true;
    };
    int p = 16 / sizeof(T);
    while (p > 1 && !fits(p)) p /= 2;
    return p;
}

// Calls launch(std::integral_constant<int, P>) for p, a power of two up to P_MAX (a chunk's width from vector_width,
// a row's values a lane): the kernel gets it as a template argument, so that an array of P values is registers.
template <int P_MAX, typename Launch>
void with_power_of_two(int p, Launch launch) {
    if constexpr (P_MAX > 1)
        if (p < P_MAX) return with_power_of_two<P_MAX / 2>(p, launch);
    launch(std::integral_constant<int, P_MAX>());
}

__device__ __forceinline__ float warp_sum(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x += __shfl_xor_sync(0xFFFFFFFFu, x, offset);
    return x;
}

__device__ __forceinline__ float warp_max(float x) {
    for (int offset = 16; offset > 0; offset >>= 1) x = fmaxf(x, __shfl_xor_sync(0xFFFFFFFFu, x, offset));
    return x;
}

// The largest value of the warp and its index (the smallest index among equals), in every lane.
__device__ __forceinline__ void warp_argmax(float& best, int& best_index) {
    for (int offset = 16; offset > 0; offset >>= 1) {
        float other = __shfl_xor_sync(0xFFFFFFFFu, best, offset);
        int other_index = __shfl_xor_sync(0xFFFFFFFFu, best_index, offset);
        if (other > best || (other == best && other_index < best_index)) best = other, best_index = other_index;
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Timers
// ---------------------------------------------------------------------------------------------------------------

struct WallTimer {
    std::chrono::steady_clock::time_point start = std::chrono::steady_clock::now();
    double seconds() const { return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count(); }
};
