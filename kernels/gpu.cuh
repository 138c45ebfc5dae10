// gpu.cuh: what the GPU this process runs on can do, read once: its compute capability, the architecture of the
// code that actually runs on it, its memory, and its peak dense BF16 rate (the denominator of MFU).
//
// Two environment variables make a large GPU behave as a smaller one, to try the paths a student's GPU takes:
//   MINI_DEEPSEEK_AS_SM=80         the capabilities of that architecture at most (80: an A100, no FP8 tensor cores);
//   MINI_DEEPSEEK_GPU_MEMORY_GB=24 the memory of a 24 GB card: the rest is taken at start and held.
//
// The code's architecture can be older than the GPU's: a build for compute_80 runs on an sm_89 or sm_90 GPU through
// PTX, compiled without the newer instructions (FP8 mma.sync needs code built for sm_89 or newer, wgmma code built
// for sm_90a). So the choice between kernels asks a probe kernel what it was compiled for, not only the GPU.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <string>

#include "common.cuh"

struct GpuInfo {
    std::string name;
    int capability = 0;  // 10 * major + minor: 80 for an A100, 89 for an RTX 4090, 90 for an H100
    int code_arch = 0;   // __CUDA_ARCH__ / 10 of the kernels running here: 90 for code built for sm_90 or sm_90a
    bool wgmma = false;  // the running code was built for sm_90a, where wgmma exists
    int sms = 0;
    double clock_hz = 0.0;  // the SMs' peak clock
    size_t memory = 0;      // bytes: the card's, or MINI_DEEPSEEK_GPU_MEMORY_GB's
    bool memory_limited = false;  // by MINI_DEEPSEEK_GPU_MEMORY_GB
    int as_sm = 0;                // MINI_DEEPSEEK_AS_SM, 0 where unset

    // FP8 tensor cores (E4M3 mma.sync): Ada, Hopper and newer, running code built for them.
    bool fp8_mma() const { return capability >= 89 && code_arch >= 89; }

    double bf16_peak_flops = 0.0;  // the card's own, whatever MINI_DEEPSEEK_AS_SM says
};

// Dense BF16 tensor-core FLOP/s with FP32 accumulation: the data sheet's figure for the data-centre GPUs that have
// one, otherwise SMs x clock x the FLOPs per clock of one SM of the architecture. On sm_86, sm_89 and sm_120 a
// GeForce card accumulates in FP32 at half the rate of the workstation and data-centre cards (A6000, L40S).
inline double bf16_peak_flops(int capability, int sms, double clock_hz, bool geforce) {
    if (capability == 90 && sms == 132) return 989e12;  // H100 / H200 SXM
    if (capability == 90 && sms == 114) return 756e12;  // H100 PCIe
    if (capability == 80 && sms == 108) return 312e12;  // A100
    const int per_sm_clock = capability >= 100 && capability < 120 ? 8192
                             : capability == 90                    ? 4096
                             : capability == 80                    ? 2048
                             : geforce                             ? 512
                                                                   : 1024;
    return double(sms) * clock_hz * per_sm_clock;
}

static __global__ void code_arch_kernel(int* out) {
#if defined(__CUDA_ARCH__)
    out[0] = __CUDA_ARCH__ / 10;
#endif
#if defined(__CUDA_ARCH_FEAT_SM90_ALL)
    out[1] = 1;
#else
    out[1] = 0;
#endif
}

// A positive number from the environment variable `name`, 0 where it is unset or empty; anything else is refused.
inline double positive_from_environment(const char* name) {
    const char* text = std::getenv(name);
    if (!text || !*text) return 0.0;
    char* end = nullptr;
    const double value = std::strtod(text, &end);
    if (end == text || *end != '\0' || std::isspace(static_cast<unsigned char>(*text)) || !(value > 0.0) ||
        !std::isfinite(value))
        throw std::invalid_argument(std::string(name) + " must be a positive number, got '" + text + "'");
    return value;
}

// The memory beyond `gigabytes` of a GPU of `total` bytes, taken once and held for the life of the process; 0 (and
// nothing held) for 0 gigabytes or as many as the GPU has.
inline size_t hold_memory_beyond(double gigabytes, size_t total) {
    static DeviceBuffer<uint8_t> held;
    const size_t keep = size_t(gigabytes * 1e9);
    if (gigabytes <= 0.0 || keep >= total) return 0;
    size_t free = 0, all = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &all));
    if (free < total - keep)
        throw std::runtime_error("MINI_DEEPSEEK_GPU_MEMORY_GB=" + std::to_string(gigabytes) + ": " +
                                 std::to_string(double(all - free) / 1e9) + " GB of this GPU are in use already");
    held.resize(total - keep);
    return total - keep;
}

inline const GpuInfo& gpu_info() {
    static const GpuInfo info = [] {
        GpuInfo g;
        int device = 0, major = 0, minor = 0, clock_khz = 0;
        CUDA_CHECK(cudaGetDevice(&device));
        CUDA_CHECK(cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, device));
        CUDA_CHECK(cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, device));
        CUDA_CHECK(cudaDeviceGetAttribute(&g.sms, cudaDevAttrMultiProcessorCount, device));
        CUDA_CHECK(cudaDeviceGetAttribute(&clock_khz, cudaDevAttrClockRate, device));
        cudaDeviceProp prop;
        CUDA_CHECK(cudaGetDeviceProperties(&prop, device));
        g.name = prop.name, g.memory = prop.totalGlobalMem;
        g.capability = 10 * major + minor, g.clock_hz = 1e3 * clock_khz;
        const bool geforce = g.name.find("GeForce") != std::string::npos;
        g.bf16_peak_flops = bf16_peak_flops(g.capability, g.sms, g.clock_hz, geforce);
        DeviceBuffer<int> probe(2);
        code_arch_kernel<<<1, 1>>>(probe.data());
        const cudaError_t launched = cudaGetLastError();
        if (launched == cudaErrorNoKernelImageForDevice)
            throw std::runtime_error("this build has no code for " + g.name + " (sm_" + std::to_string(g.capability) +
                                     "): `make clean && make` builds for the GPU of this machine");
        cuda_check(launched, "code_arch_kernel<<<1, 1>>>", __FILE__, __LINE__);
        std::vector<int> found = probe.download();
        g.code_arch = found[0], g.wgmma = found[1] == 1;
        const double as_sm = positive_from_environment("MINI_DEEPSEEK_AS_SM");
        if (as_sm != std::floor(as_sm))
            throw std::invalid_argument("MINI_DEEPSEEK_AS_SM must be an architecture such as 80 or 89");
        g.as_sm = int(as_sm);
        if (g.as_sm > 0) {
            g.capability = std::min(g.capability, g.as_sm), g.code_arch = std::min(g.code_arch, g.as_sm);
            g.wgmma = g.wgmma && g.capability >= 90;
        }
        const size_t held = hold_memory_beyond(positive_from_environment("MINI_DEEPSEEK_GPU_MEMORY_GB"), g.memory);
        g.memory -= held, g.memory_limited = held > 0;
        return g;
    }();
    return info;
}

// The memory in use on this GPU now, by this process and any other (the held memory of a smaller card left out),
// and the most seen by any call: sampled after every training step, whose buffers are all allocated by then.
inline double gpu_memory_in_use_gb() {
    const GpuInfo& g = gpu_info();
    size_t free = 0, total = 0;
    CUDA_CHECK(cudaMemGetInfo(&free, &total));
    return double(g.memory - std::min(free, g.memory)) / 1e9;
}

inline double gpu_memory_peak_gb(double now = 0.0) {
    static double peak = 0.0;
    return peak = std::max(peak, now);
}
