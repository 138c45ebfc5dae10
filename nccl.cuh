// nccl.cuh: training on several GPUs, one process per GPU, NCCL for every collective (V3 §3.2 trains with data and
// expert parallelism; the plans here hold for any number of ranks R).
//
// Launch. The processes find their places from the launcher's environment (torchrun's RANK / WORLD_SIZE /
// LOCAL_RANK, OpenMPI's or Slurm's variables), use GPU LOCAL_RANK, and meet through a file: rank 0 writes the NCCL
// unique id into the run folder and the others read it (no MPI needed to build or run). Several machines need the
// folder on a shared filesystem.
//
// Data parallel with ZeRO-1 (arXiv 1910.02054, stage 1): rank r takes rows [B r / R, B (r+1) / R) of the global batch
// (every row is a function of seed, step and row, so the ranks' rows together are the single-GPU batch); the FP32
// gradients are reduce-scattered, rank r owns shard r of the trained parameters and keeps the Adam moments of that
// shard alone, updates it, and the updated shards are all-gathered into every rank's weights.
//
// Expert parallel: expert e lives on rank e / (E / R). After routing, every rank learns every rank's count of rows per
// expert (an all-gather of E counts), sends each peer the rows of that peer's experts (its rows are already grouped
// by expert, so they are contiguous), and regroups what it receives by local expert, sources in rank order: a fixed
// order, whatever the timing. The combine is the same exchange reversed.
#pragma once

#include <nccl.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cctype>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <exception>
#include <filesystem>
#include <fstream>
#include <functional>
#include <stdexcept>
#include <string>
#include <thread>
#include <vector>

#include "kernels/common.cuh"

// ---------------------------------------------------------------------------------------------------------------
// The process's place: from the launcher's environment
// ---------------------------------------------------------------------------------------------------------------

struct Ranks {
    int rank = 0, world = 1, local_rank = 0;
    bool is_root() const { return rank == 0; }
};

using Environment = std::function<const char*(const char*)>;  // getenv, or a table in the tests

// The first launcher whose variables are set names the process's place: torchrun's (and tools/launch.sh's), then
// OpenMPI's, then Slurm's; none of them: one process. A family set in part, or a value that is not a rank, is an
// error that names the variable.
inline Ranks ranks_from_environment(const Environment& env) {
    struct Family {
        const char *rank, *world, *local_rank;
    };
    const Family families[] = {{"RANK", "WORLD_SIZE", "LOCAL_RANK"},
                               {"OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "OMPI_COMM_WORLD_LOCAL_RANK"},
                               {"SLURM_PROCID", "SLURM_NTASKS", "SLURM_LOCALID"}};
    auto number = [&](const char* name) {
        const char* text = env(name);
        if (!text) throw std::invalid_argument(std::string("launch: ") + name + " is not set");
        char* end = nullptr;
        long v = std::strtol(text, &end, 10);
        if (*text == '\0' || *end != '\0' || v < 0 || v > (1 << 20))
            throw std::invalid_argument(std::string("launch: ") + name + "='" + text + "' is not a rank or a count");
        return int(v);
    };
    for (const Family& f : families) {
        if (!env(f.rank) && !env(f.world) && !env(f.local_rank)) continue;
        Ranks r{number(f.rank), number(f.world), number(f.local_rank)};
        if (r.world < 1) throw std::invalid_argument(std::string("launch: ") + f.world + " must be at least 1");
        if (r.rank >= r.world)
            throw std::invalid_argument(std::string("launch: ") + f.rank + "=" + std::to_string(r.rank) +
                                        " is not below " + f.world + "=" + std::to_string(r.world));
        return r;
    }
    return Ranks{};
}

// A token the launcher gives every process of one job alike, so that a job never reads an id file an earlier job left
// behind: "" where the launcher gives none.
inline std::string job_token(const Environment& env) {
    for (const char* name : {"TORCHELASTIC_RUN_ID", "MINI_DEEPSEEK_JOB", "OMPI_MCA_ess_base_jobid", "SLURM_JOB_ID"})
        if (const char* v = env(name)) {
            std::string token = v;
            for (char& ch : token)
                if (!std::isalnum(static_cast<unsigned char>(ch))) ch = '_';
            return token;
        }
    return "";
}

// Rank 0 writes n bytes to path through a temporary file and a rename (no rank reads half of them); every other rank
// waits for the file, up to timeout_s, and reads them. Rank 0 removes the file once every rank has joined (Comm), so
// an old one is left only by a start that failed; without a job token a rank could read it and time out.
inline void share_through_file(const std::string& path, const Ranks& ranks, void* bytes, size_t n, double timeout_s) {
    namespace fs = std::filesystem;
    if (ranks.is_root()) {
        const std::string tmp = path + ".tmp";
        {
            std::ofstream out(tmp, std::ios::binary | std::ios::trunc);
            out.write(static_cast<const char*>(bytes), std::streamsize(n));
            if (!out) throw std::runtime_error("launch: cannot write " + tmp);
        }
        fs::rename(tmp, path);
        return;
    }
    const auto start = std::chrono::steady_clock::now();
    for (;;) {
        std::error_code ec;
        if (fs::exists(path, ec) && fs::file_size(path, ec) == n) {
            std::ifstream in(path, std::ios::binary);
            in.read(static_cast<char*>(bytes), std::streamsize(n));
            if (in.gcount() == std::streamsize(n)) return;
        }
        const double waited = std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count();
        if (waited > timeout_s)
            throw std::runtime_error("launch: rank " + std::to_string(ranks.rank) + " waited " +
                                     std::to_string(int(timeout_s)) + " s for rank 0's " + path +
                                     " (did rank 0 start, with the same --out?)");
        std::this_thread::sleep_for(std::chrono::milliseconds(20));
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Data parallel: each rank's rows, each rank's shard
// ---------------------------------------------------------------------------------------------------------------

// Rows [begin, end) of a global batch of B rows that rank r reads: as even as B allows, in rank order.
struct RowRange {
    int begin, end;
    int count() const { return end - begin; }
};

// Part `part` of n rows cut into `parts` near-even parts, in order.
inline RowRange part_of(int n, int part, int parts) {
    return {int(long(n) * part / parts), int(long(n) * (part + 1) / parts)};
}

inline RowRange rows_of_rank(int B, const Ranks& r) {
    if (B < r.world)
        throw std::invalid_argument("a batch of " + std::to_string(B) + " rows cannot give each of " +
                                    std::to_string(r.world) + " GPUs a row");
    return part_of(B, r.rank, r.world);
}

// ZeRO-1's shards of n values: R equal shards of `per_rank` values (NCCL's reduce-scatter and all-gather move equal
// counts), a multiple of SHARD_ALIGN so that every shard of an FP32 buffer starts on a 512-byte boundary; the buffers
// are padded to R * per_rank, and the last shards may hold padding alone.
constexpr long SHARD_ALIGN = 128;

struct Shards {
    long n, per_rank;
    int world;
    long padded() const { return per_rank * world; }
    long begin(int r) const { return std::min(n, per_rank * r); }  // rank r's values [begin, end) of the n
    long end(int r) const { return std::min(n, per_rank * (r + 1)); }
};

// Exercise 4 (exercises/04_zero1_shards) asks for this function's body.
#ifdef EXERCISE_SHARDS_OF
#include EXERCISE_SHARDS_OF
#else
inline Shards shards_of(long n, int world) {
    const long per_rank = (n + world - 1) / world;
    return {n, (per_rank + SHARD_ALIGN - 1) / SHARD_ALIGN * SHARD_ALIGN, world};
}
#endif

// ---------------------------------------------------------------------------------------------------------------
// Expert parallel: the dispatch plan
// ---------------------------------------------------------------------------------------------------------------

// A contiguous run of rows moved from one buffer's offset to another's.
struct Segment {
    long from, to, rows;
};

// What rank r sends and receives for one MoE layer, from every rank's rows per expert (counts[p * E + e]: rank p's
// rows routed to expert e, the layout of an all-gather of each rank's E counts).
struct Dispatch {
    int world = 1, experts = 0, local_experts = 0, first_expert = 0;
    std::vector<long> send_count, send_offset;  // [R]: from this rank's rows, grouped by expert
    std::vector<long> recv_count, recv_offset;  // [R]: into the receive buffer, peer after peer
    std::vector<long> expert_rows;              // [E / R]: rows of each local expert, from every rank
    std::vector<Segment> regroup;  // receive buffer (peer-major) -> the local experts' rows (expert-major)
    long sent() const { return send_offset.back() + send_count.back(); }
    long received() const { return recv_offset.back() + recv_count.back(); }
};

inline int expert_owner(int e, int experts, int world) { return e / (experts / world); }

inline Dispatch dispatch_plan(const std::vector<long>& counts, int experts, const Ranks& r) {
    const int R = r.world;
    if (experts % R != 0)
        throw std::invalid_argument("expert parallelism: " + std::to_string(experts) + " routed experts do not split "
                                    "evenly over " + std::to_string(R) + " GPUs");
    if (counts.size() != size_t(R) * experts) throw std::invalid_argument("dispatch_plan: counts must be [R, E]");
    Dispatch d;
    d.world = R, d.experts = experts, d.local_experts = experts / R, d.first_expert = r.rank * d.local_experts;
    d.send_count.assign(R, 0), d.send_offset.assign(R, 0), d.recv_count.assign(R, 0), d.recv_offset.assign(R, 0);
    d.expert_rows.assign(d.local_experts, 0);
    auto count = [&](int p, int e) { return counts[size_t(p) * experts + e]; };
    for (int e = 0; e < experts; e++) d.send_count[expert_owner(e, experts, R)] += count(r.rank, e);
    for (int p = 0; p < R; p++)
        for (int j = 0; j < d.local_experts; j++) {
            d.recv_count[p] += count(p, d.first_expert + j);
            d.expert_rows[j] += count(p, d.first_expert + j);
        }
    for (int p = 1; p < R; p++) {
        d.send_offset[p] = d.send_offset[p - 1] + d.send_count[p - 1];
        d.recv_offset[p] = d.recv_offset[p - 1] + d.recv_count[p - 1];
    }
    // Peer p's block of the receive buffer holds its rows for the local experts in expert order; the local experts'
    // buffer holds expert j's rows from rank 0, then rank 1, ...
    long to = 0;
    for (int j = 0; j < d.local_experts; j++)
        for (int p = 0; p < R; p++) {
            long from = d.recv_offset[p];
            for (int i = 0; i < j; i++) from += count(p, d.first_expert + i);
            const long rows = count(p, d.first_expert + j);
            if (rows > 0) d.regroup.push_back({from, to, rows});
            to += rows;
        }
    return d;
}

// ---------------------------------------------------------------------------------------------------------------
// The communicator
// ---------------------------------------------------------------------------------------------------------------

inline void nccl_check(ncclResult_t result, const char* call, const char* file, int line) {
    if (result == ncclSuccess) return;
    std::fprintf(stderr, "NCCL error %d (%s: %s) in %s at %s:%d\n", int(result), ncclGetErrorString(result),
                 ncclGetLastError(nullptr), call, file, line);
    std::exit(1);
}
#define NCCL_CHECK(call) nccl_check((call), #call, __FILE__, __LINE__)

template <typename T>
ncclDataType_t nccl_type();
template <>
inline ncclDataType_t nccl_type<float>() { return ncclFloat32; }
template <>
inline ncclDataType_t nccl_type<bf16>() { return ncclBfloat16; }
template <>
inline ncclDataType_t nccl_type<int>() { return ncclInt32; }
template <>
inline ncclDataType_t nccl_type<long>() { return ncclInt64; }
template <>
inline ncclDataType_t nccl_type<double>() { return ncclFloat64; }

// A rank that stops hearing from the others must not wait forever: a thread watches the communicator's asynchronous
// error (a peer's network connection lost) and the time since the last sign of progress (a peer dead on NVLink
// gives no error, only silence), and past either it names the rank and the cause and ends the process with status 1
// at once (aborting the communicator could itself wait for the peers); the launcher then ends the others.
struct Watchdog {
    std::atomic<double> last_progress{0.0};
    std::atomic<bool> stop{false};
    std::thread thread;

    static double now() {
        return std::chrono::duration<double>(std::chrono::steady_clock::now().time_since_epoch()).count();
    }
    void start(ncclComm_t comm, int rank, double timeout_s) {
        last_progress = now();
        thread = std::thread([this, comm, rank, timeout_s] {
            while (!stop) {
                std::this_thread::sleep_for(std::chrono::milliseconds(200));
                ncclResult_t async = ncclSuccess;
                const bool error = ncclCommGetAsyncError(comm, &async) != ncclSuccess || async != ncclSuccess;
                const double silent = now() - last_progress;
                if (!error && silent < timeout_s) continue;
                if (error)
                    std::fprintf(stderr, "error: rank %d: NCCL failed (%s); exiting\n", rank,
                                 ncclGetErrorString(async));
                else
                    std::fprintf(stderr, "error: rank %d: no progress for %.0f s (a rank died or hangs); exiting\n",
                                 rank, silent);
                std::_Exit(1);
            }
        });
    }
    void progress() { last_progress = now(); }
    void halt() {
        stop = true;
        if (thread.joinable()) thread.join();
    }
    ~Watchdog() { halt(); }
};

// The time a rank's stream spends in collectives, waiting for its peers included: a timing event before and after
// each, summed when read. Collectives run on the compute stream, so over a step this is the step's communication
// time, what a profile's NCCL kernels add up to.
struct CommClock {
    static constexpr size_t MAX_MARKS = 1024;  // past these, for a caller that seldom reads, the sum so far is kept
    std::vector<cudaEvent_t> marks;            // each collective's start and end, in turn
    size_t used = 0, folded_intervals = 0;
    double folded_ms = 0.0;

    CommClock() = default;
    CommClock(const CommClock&) = delete;
    CommClock& operator=(const CommClock&) = delete;
    ~CommClock() {
        for (cudaEvent_t e : marks) cudaEventDestroy(e);
    }
    void mark(cudaStream_t s) {
        if (used == MAX_MARKS) fold();
        if (used == marks.size()) {
            marks.emplace_back();
            CUDA_CHECK(cudaEventCreate(&marks.back()));
        }
        CUDA_CHECK(cudaEventRecord(marks[used++], s));
    }
    size_t intervals() const { return folded_intervals + used / 2; }
    // Milliseconds in collectives since the last read (waits for the last one to end).
    double read_ms() {
        fold();
        const double ms = folded_ms;
        folded_ms = 0.0, folded_intervals = 0;
        return ms;
    }
    // The marked intervals into folded_ms, and the marks free again.
    void fold() {
        if (used > 0) CUDA_CHECK(cudaEventSynchronize(marks[used - 1]));
        for (size_t i = 0; i + 1 < used; i += 2) {
            float interval = 0.0f;
            CUDA_CHECK(cudaEventElapsedTime(&interval, marks[i], marks[i + 1]));
            folded_ms += interval;
        }
        folded_intervals += used / 2, used = 0;
    }
};

// One NCCL communicator over every rank, its GPU chosen by the local rank. Collectives run on the caller's stream.
struct Comm {
    Ranks ranks;
    ncclComm_t comm = nullptr;
    Watchdog watchdog;
    CommClock clock;
    static constexpr int HOST_SUMS = 32;
    DeviceBuffer<double> host_sums;  // sum()'s, on this rank's GPU

    // The ranks meet through the file `folder`/nccl_id.<job token>; timeout_s bounds the wait for the others, at the
    // start and at every step after.
    Comm(const Ranks& r, const std::string& folder, double timeout_s) : ranks(r) {
        CUDA_CHECK(cudaSetDevice(r.local_rank));
        host_sums.resize(HOST_SUMS);
        ncclUniqueId id;
        if (r.is_root()) NCCL_CHECK(ncclGetUniqueId(&id));
        const std::string token = job_token(std::getenv);
        const std::string path = folder + "/nccl_id" + (token.empty() ? "" : "." + token);
        std::filesystem::create_directories(folder);
        share_through_file(path, r, &id, sizeof id, timeout_s);
        std::atomic<bool> joined{false};
        std::thread deadline([&] {  // ncclCommInitRank waits for every rank: bounded here
            const double start = Watchdog::now();
            while (!joined && Watchdog::now() - start < timeout_s)
                std::this_thread::sleep_for(std::chrono::milliseconds(100));
            if (joined) return;
            std::fprintf(stderr, "error: rank %d: not every one of the %d ranks joined within %.0f s\n", r.rank,
                         r.world, timeout_s);
            std::_Exit(1);
        });
        NCCL_CHECK(ncclCommInitRank(&comm, r.world, id, r.rank));
        joined = true;
        deadline.join();
        if (r.is_root()) std::filesystem::remove(path);  // every rank has read it: init returned
        watchdog.start(comm, r.rank, timeout_s);
    }
    Comm(const Comm&) = delete;
    Comm& operator=(const Comm&) = delete;
    ~Comm() {
        watchdog.halt();
        if (std::uncaught_exceptions() > 0)
            ncclCommAbort(comm);  // this rank is failing: its peers may never reach the collective a destroy waits on
        else
            ncclCommDestroy(comm);
    }

    // A collective launched on s, inside the clock's marks.
    template <typename Launch>
    void timed(cudaStream_t s, Launch launch) {
        clock.mark(s);
        launch();
        clock.mark(s);
    }
    template <typename T>
    void all_reduce_sum(T* values, long n, cudaStream_t s) {
        timed(s, [&] { NCCL_CHECK(ncclAllReduce(values, values, size_t(n), nccl_type<T>(), ncclSum, comm, s)); });
    }
    template <typename T>
    void all_reduce_max(T* values, long n, cudaStream_t s) {
        timed(s, [&] { NCCL_CHECK(ncclAllReduce(values, values, size_t(n), nccl_type<T>(), ncclMax, comm, s)); });
    }
    // The sums over the ranks of n host values in place (a count of targets, a step's statistics; counts stay exact
    // below 2^53): waits for the stream. Every step makes one, so its return is the watchdog's sign of progress.
    void sum(double* values, int n, cudaStream_t s) {
        if (n > HOST_SUMS) throw std::logic_error("Comm::sum takes at most 32 values");
        CUDA_CHECK(cudaMemcpyAsync(host_sums.data(), values, sizeof(double) * n, cudaMemcpyHostToDevice, s));
        all_reduce_sum(host_sums.data(), n, s);
        CUDA_CHECK(cudaMemcpyAsync(values, host_sums.data(), sizeof(double) * n, cudaMemcpyDeviceToHost, s));
        CUDA_CHECK(cudaStreamSynchronize(s));
        watchdog.progress();
    }
    long sum(long value, cudaStream_t s) {
        double v = double(value);
        sum(&v, 1, s);
        return long(v);
    }
    // In place, over a buffer of shards.padded() values: this rank's shard becomes the sum of every rank's.
    void reduce_scatter_sum(float* values, const Shards& sh, cudaStream_t s) {
        timed(s, [&] {
            NCCL_CHECK(ncclReduceScatter(values, values + sh.per_rank * ranks.rank, size_t(sh.per_rank), ncclFloat32,
                                         ncclSum, comm, s));
        });
    }
    // In place: every rank's shard into every rank's buffer.
    template <typename T>
    void all_gather(T* values, const Shards& sh, cudaStream_t s) {
        timed(s, [&] {
            NCCL_CHECK(ncclAllGather(values + sh.per_rank * ranks.rank, values, size_t(sh.per_rank), nccl_type<T>(),
                                     comm, s));
        });
    }
    // Every rank's n values, rank after rank, into all [R * n].
    template <typename T>
    void all_gather(const T* mine, T* all, long n, cudaStream_t s) {
        timed(s, [&] { NCCL_CHECK(ncclAllGather(mine, all, size_t(n), nccl_type<T>(), comm, s)); });
    }
    // Rows of `width` values: send_count[p] rows from send + send_offset[p] to each peer p, recv_count[p] rows from
    // each into recv + recv_offset[p]; grouped, so that no pair of ranks waits on the other's order.
    template <typename T>
    void exchange(const T* send, const std::vector<long>& send_count, const std::vector<long>& send_offset, T* recv,
                  const std::vector<long>& recv_count, const std::vector<long>& recv_offset, long width,
                  cudaStream_t s) {
        timed(s, [&] {
            NCCL_CHECK(ncclGroupStart());
            for (int p = 0; p < ranks.world; p++) {
                if (send_count[p] > 0)
                    NCCL_CHECK(ncclSend(send + send_offset[p] * width, size_t(send_count[p] * width), nccl_type<T>(),
                                        p, comm, s));
                if (recv_count[p] > 0)
                    NCCL_CHECK(ncclRecv(recv + recv_offset[p] * width, size_t(recv_count[p] * width), nccl_type<T>(),
                                        p, comm, s));
            }
            NCCL_CHECK(ncclGroupEnd());
        });
    }
};

// Copies each segment's rows of `width` values from `from` to `to` (backward: from each segment's `to` to its
// `from`, the combine's direction).
template <typename T>
void move_segments(const std::vector<Segment>& segments, const T* from, T* to, long width, bool backward,
                   cudaStream_t s) {
    for (const Segment& g : segments) {
        const long src = backward ? g.to : g.from, dst = backward ? g.from : g.to;
        CUDA_CHECK(cudaMemcpyAsync(to + dst * width, from + src * width, sizeof(T) * g.rows * width,
                                   cudaMemcpyDeviceToDevice, s));
    }
}
