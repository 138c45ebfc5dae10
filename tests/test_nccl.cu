// Parallel training's plans on the host: each process's place from the launcher's environment, the id exchange
// through a file, each rank's rows, the ZeRO-1 shards, and the expert-parallel dispatch simulated over all ranks
// (every row reaches its expert's rank, grouped by expert in a fixed order, and the reverse exchange brings it back).
// On the GPU, the same through NCCL: one rank on one GPU, and a rank per GPU (a thread each) where there are more.
#include <doctest/doctest.h>
#include <sys/wait.h>

#include <array>
#include <cstring>
#include <fstream>
#include <map>
#include <numeric>
#include <set>

#include "../model.cuh"
#include "../nccl.cuh"
#include "model_reference.h"

namespace {

// A path of its own for this run of the tests (two runs at once must not meet through an id file).
std::string scratch_path(const std::string& name) {
    return (std::filesystem::temp_directory_path() / (name + "." + std::to_string(getpid()))).string();
}

Environment table(std::map<std::string, std::string> vars) {
    return [vars = std::move(vars)](const char* name) -> const char* {
        auto it = vars.find(name);
        return it == vars.end() ? nullptr : it->second.c_str();
    };
}

std::string launch_error(std::map<std::string, std::string> vars) {
    try {
        ranks_from_environment(table(std::move(vars)));
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "";
}

// A rank's rows of one MoE layer, grouped by expert as the local grouping leaves them: each row is named by
// (source rank, position), position counting the rank's rows in expert order.
struct Row {
    int rank, expert;
    long position;
    bool operator==(const Row& o) const { return rank == o.rank && expert == o.expert && position == o.position; }
};

// Each rank's rows for one MoE layer, grouped by expert, from every rank's counts per expert.
std::vector<std::vector<Row>> rows_by_expert(const std::vector<long>& counts, int R, int E) {
    std::vector<std::vector<Row>> local(R);
    for (int p = 0; p < R; p++)
        for (int e = 0; e < E; e++)
            for (long i = 0; i < counts[size_t(p) * E + e]; i++) local[p].push_back({p, e, long(local[p].size())});
    return local;
}

// The rows that rank r's local experts must get: expert after expert, each from rank 0, 1, ... in their order there.
std::vector<Row> rows_for_experts(const std::vector<std::vector<Row>>& local, const Dispatch& d) {
    std::vector<Row> want;
    for (int j = 0; j < d.local_experts; j++)
        for (const std::vector<Row>& rows : local)
            for (const Row& row : rows)
                if (row.expert == d.first_expert + j) want.push_back(row);
    return want;
}

std::vector<long> random_counts(int R, int E, uint64_t seed) {
    Rng rng(seed);
    std::vector<long> counts(size_t(R) * E);
    for (long& c : counts) c = rng.range(0, 3) == 0 ? 0 : rng.range(0, 40);  // some experts get none
    return counts;
}

// A row on the GPU: WIDTH floats, (rank * 10000 + position) * WIDTH + k, exact in FP32.
constexpr int WIDTH = 4;

std::vector<float> encode(const std::vector<Row>& rows) {
    std::vector<float> out;
    for (const Row& row : rows)
        for (int k = 0; k < WIDTH; k++) out.push_back(float((row.rank * 10000 + row.position) * WIDTH + k));
    return out;
}

template <typename T>
std::vector<T> download_vector(const T* p, size_t n) {
    std::vector<T> h(n);
    if (n) CUDA_CHECK(cudaMemcpy(h.data(), p, n * sizeof(T), cudaMemcpyDeviceToHost));
    return h;
}

// Each rank's part of the collectives test, on its own GPU and communicator; returns the failures it saw (doctest's
// checks are made on the main thread).
std::vector<std::string> collectives_on_rank(Comm& comm) {
    const Ranks& ranks = comm.ranks;
    std::vector<std::string> failures;
    auto expect = [&](bool ok, const std::string& what) {
        if (!ok) failures.push_back("rank " + std::to_string(ranks.rank) + ": " + what);
    };
    cudaStream_t s;
    CUDA_CHECK(cudaStreamCreate(&s));
    const int R = ranks.world, r = ranks.rank, E = 2 * R;
    // the clock has timed every collective since its last read, and starts again
    auto expect_timed = [&](size_t collectives, const std::string& what) {
        expect(comm.clock.intervals() == collectives, what + ": " + std::to_string(comm.clock.intervals()) +
                                                          " collectives timed, not " + std::to_string(collectives));
        const double ms = comm.clock.read_ms();
        expect(R == 1 ? ms >= 0.0 : ms > 0.0, what + ": " + std::to_string(ms) + " ms in collectives");
        expect(comm.clock.intervals() == 0 && comm.clock.read_ms() == 0.0, what + ": the clock starts again");
    };
    comm.clock.read_ms();

    // ZeRO-1: reduce-scatter sums each shard into its owner, all-gather hands every shard to every rank
    const Shards sh = shards_of(1000, R);
    std::vector<float> values(size_t(sh.padded()));
    for (size_t i = 0; i < values.size(); i++) values[i] = float((r + 1) * long(i % 4096));
    DeviceBuffer<float> buffer(values.size());
    buffer.upload(values);
    comm.reduce_scatter_sum(buffer.data(), sh, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<float> summed = buffer.download();
    for (long i = sh.per_rank * r; i < sh.per_rank * (r + 1); i++)
        expect(summed[size_t(i)] == float(R * (R + 1) / 2 * (i % 4096)), "reduce-scatter at " + std::to_string(i));
    for (long i = sh.per_rank * r; i < sh.per_rank * (r + 1); i++) summed[size_t(i)] = float(i) + 0.5f;
    buffer.upload(summed);
    comm.all_gather(buffer.data(), sh, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<float> gathered = buffer.download();
    for (size_t i = 0; i < gathered.size(); i++)
        expect(gathered[i] == float(i) + 0.5f, "all-gather at " + std::to_string(i));

    DeviceBuffer<int> flag(1);
    flag.upload(std::vector<int>{r + 1});
    comm.all_reduce_sum(flag.data(), 1, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    expect(flag.download()[0] == R * (R + 1) / 2, "all-reduce sum");
    flag.upload(std::vector<int>{r == R - 1 ? 7 : 0});
    comm.all_reduce_max(flag.data(), 1, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    expect(flag.download()[0] == 7, "all-reduce max");
    std::vector<double> host = {double(r), 0.25, double(1L << 40) + r};  // host values, counts exact past 2^32
    comm.sum(host.data(), int(host.size()), s);
    expect(host == std::vector<double>{R * (R - 1) / 2.0, 0.25 * R, double(R) * double(1L << 40) + R * (R - 1) / 2.0},
           "the host values' sums");
    expect(comm.sum(long(r + 1), s) == R * (R + 1) / 2, "a host count's sum");
    expect_timed(6, "the shards' collectives and the sums");
    const size_t many = CommClock::MAX_MARKS;  // twice as many marks as the clock holds before it sums
    for (size_t i = 0; i < many; i++) comm.all_reduce_sum(flag.data(), 1, s);
    expect(comm.clock.marks.size() <= CommClock::MAX_MARKS, "the clock reuses its marks");
    expect_timed(many, "many collectives between two reads");

    // Expert parallel: the counts all-gathered, the rows dispatched and regrouped, then combined back
    const std::vector<long> all_counts = random_counts(R, E, 17);
    std::vector<int> mine(all_counts.begin() + long(r) * E, all_counts.begin() + long(r + 1) * E);
    DeviceBuffer<int> counts_mine(E), counts_all(size_t(R) * E);
    counts_mine.upload(mine);
    comm.all_gather(counts_mine.data(), counts_all.data(), E, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    const std::vector<int> gathered_counts = counts_all.download();
    expect(std::equal(gathered_counts.begin(), gathered_counts.end(), all_counts.begin()), "counts all-gather");

    const std::vector<std::vector<Row>> local = rows_by_expert(all_counts, R, E);
    const Dispatch d = dispatch_plan(all_counts, E, ranks);
    const std::vector<float> sent = encode(local[r]);
    // every buffer at its size before the first exchange: no allocation while a peer's NCCL kernels wait
    DeviceBuffer<float> send(sent.size()), recv(size_t(d.received()) * WIDTH), grouped(size_t(d.received()) * WIDTH);
    send.upload(sent);
    comm.exchange(send.data(), d.send_count, d.send_offset, recv.data(), d.recv_count, d.recv_offset, WIDTH, s);
    move_segments(d.regroup, recv.data(), grouped.data(), WIDTH, false, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    const std::vector<float> want = encode(rows_for_experts(local, d));
    expect(download_vector(grouped.data(), want.size()) == want, "the local experts' rows");

    // the combine: each expert's rows, changed, back to where they came from
    std::vector<float> outputs = download_vector(grouped.data(), want.size());
    for (float& x : outputs) x = -x;
    grouped.upload(outputs);
    move_segments(d.regroup, grouped.data(), recv.data(), WIDTH, true, s);
    comm.exchange(recv.data(), d.recv_count, d.recv_offset, send.data(), d.send_count, d.send_offset, WIDTH, s);
    CUDA_CHECK(cudaStreamSynchronize(s));
    std::vector<float> back = download_vector(send.data(), sent.size());
    for (float& x : back) x = -x;
    expect(back == sent, "the combine brings every row back in place");
    expect_timed(3, "expert parallel's counts, dispatch and combine");
    CUDA_CHECK(cudaStreamDestroy(s));
    return failures;
}

// on_rank(comm) on `gpus` GPUs, a rank per GPU and thread, each with its communicator (they meet in a scratch
// folder named `name`); every rank's result, GPU 0 current again.
template <typename Result>
std::vector<Result> on_every_gpu(int gpus, const std::string& name, const std::function<Result(Comm&)>& on_rank) {
    const std::string folder = scratch_path(name);
    std::vector<Result> results(gpus);
    std::vector<std::thread> threads;
    for (int r = 0; r < gpus; r++)
        threads.emplace_back([&, r] {
            Comm comm(Ranks{r, gpus, r}, folder, 60.0);
            results[r] = on_rank(comm);
        });
    for (std::thread& t : threads) t.join();
    CUDA_CHECK(cudaSetDevice(0));
    return results;
}

// The largest number of ranks, up to `gpus`, that the tiny models' 8 routed experts split evenly over.
int expert_ranks(int gpus) {
    int R = std::min(gpus, 8);
    while (8 % R != 0) R--;
    return R;
}

// The collectives test on `gpus` GPUs.
void check_collectives(int gpus) {
    const auto failures = on_every_gpu<std::vector<std::string>>(gpus, "test_nccl_comm", collectives_on_rank);
    for (const auto& rank : failures) {
        CHECK(rank.size() == 0);
        for (size_t i = 0; i < std::min<size_t>(rank.size(), 5); i++) MESSAGE(rank[i]);
    }
}

// What a few optimizer steps of the tiny MoE model with its MTP module leave: every step's loss, gradient norm,
// balance loss and MTP loss, the master weights and the Adam moments.
struct Trained {
    std::vector<float> scalars, master;
    std::vector<bf16> m, v;
};

constexpr int DP_ROWS = 8, DP_T = 16, DP_STEPS = 3;  // FP8: every rank's tokens a multiple of 16

// How train_tiny trains: the tiny MoE model in FP32, or a MoE model whose sizes FP8 takes in BF16 with FP8 GEMMs;
// data parallel alone or with the experts spread over the ranks.
struct TinyRun {
    bool fp8 = false, expert_parallel = false;
};

// Trains on the global batches of DP_ROWS rows; with comm, this rank's rows of each, data parallel.
template <typename T>
Trained train_tiny(Comm* comm, TinyRun run = {}) {
    const Config c = run.fp8 ? model_ref::fp8_moe_config() : model_ref::tiny_moe_config();
    const RowRange rows = rows_of_rank(DP_ROWS, comm ? comm->ranks : Ranks{});
    Model<T> model(c, rows.count(), DP_T);
    model.init_weights(21);
    if (comm) model.distribute(*comm, rows.count(), DP_ROWS, run.expert_parallel);
    if (run.fp8) model.enable_fp8(Fp8Backend::Own);
    Trained out;
    for (int step = 1; step <= DP_STEPS; step++) {
        Rng rng(uint64_t(100 + step));
        std::vector<int> global(size_t(DP_ROWS) * (DP_T + 1)), inputs, targets;
        for (int& t : global) t = int(rng.range(0, c.vocab_size - 1));
        const long row_length = DP_T + 1;
        std::vector<int> mine(global.begin() + rows.begin * row_length, global.begin() + rows.end * row_length);
        split_rows(mine, rows.count(), DP_T, inputs, targets);
        model.train_step(inputs, targets, rows.count(), DP_T, AdamW{1e-2f}, 1.0f, step, 7, 0.3f);
        const StepScalars s = model.read_scalars();
        out.scalars.insert(out.scalars.end(), {s.loss_sum, s.grad_norm, s.balance_loss, s.mtp_loss});
    }
    out.master = model.master.download();
    out.master.resize(size_t(model.layout.total));
    model.moments(out.m, out.v);
    return out;
}

void check_identical(const Trained& got, const Trained& want) {
    CHECK(got.scalars == want.scalars);
    CHECK(got.master == want.master);
    REQUIRE(got.m.size() == want.m.size());
    CHECK(std::memcmp(got.m.data(), want.m.data(), want.m.size() * sizeof(bf16)) == 0);
    CHECK(std::memcmp(got.v.data(), want.v.data(), want.v.size() * sizeof(bf16)) == 0);
}

double relative_change_error(const std::vector<float>& got, const std::vector<float>& want,
                             const std::vector<float>& start) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < want.size(); i++) {
        const double d = double(got[i]) - want[i], change = double(want[i]) - start[i];
        num += d * d, den += change * change;
    }
    return std::sqrt(num / std::max(den, 1e-30));
}

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE("NCCL with one rank: the shards' collectives, the counts' all-gather, dispatch and combine, each timed") {
        check_collectives(1);
    }

    TEST_CASE("data parallel through NCCL with one rank trains exactly as one GPU alone") {
        const std::string folder = scratch_path("test_nccl_dp1");
        Comm comm(Ranks{}, folder, 60.0);
        check_identical(train_tiny<float>(&comm), train_tiny<float>(nullptr));
    }

    TEST_CASE("expert parallel through NCCL with one rank trains exactly as one GPU alone") {
        Comm comm(Ranks{}, scratch_path("test_nccl_ep1"), 60.0);
        check_identical(train_tiny<float>(&comm, {false, true}), train_tiny<float>(nullptr));
    }
}

TEST_SUITE("fp8") {
    TEST_CASE("expert parallel through NCCL with one rank trains exactly as one GPU alone in FP8") {
        Comm comm(Ranks{}, scratch_path("test_nccl_ep1_fp8"), 60.0);
        check_identical(train_tiny<bf16>(&comm, {true, true}), train_tiny<bf16>(nullptr, {true, false}));
    }
}

TEST_SUITE("multi-gpu") {
    TEST_CASE("NCCL with a rank per GPU: the shards' collectives, the counts' all-gather, dispatch and combine, "
              "each timed") {
        int gpus = 0;
        CUDA_CHECK(cudaGetDeviceCount(&gpus));
        check_collectives(gpus);
    }

    TEST_CASE("data parallel over every GPU trains as one GPU on the whole batch, up to the order of sums") {
        int gpus = 0;
        CUDA_CHECK(cudaGetDeviceCount(&gpus));
        TinyRun run;
        SUBCASE("data parallel") { gpus = std::min(gpus, DP_ROWS); }
        SUBCASE("data and expert parallel") { gpus = expert_ranks(gpus), run.expert_parallel = true; }
        const Trained alone = train_tiny<float>(nullptr);
        Model<float> start(model_ref::tiny_moe_config(), 1, DP_T);
        start.init_weights(21);
        const std::vector<float> initial = start.master.download();
        const std::vector<Trained> ranks = on_every_gpu<Trained>(
            gpus, "test_nccl_dp", [run](Comm& comm) { return train_tiny<float>(&comm, run); });
        for (const Trained& got : ranks) {  // every rank holds the same model
            CHECK(got.master == ranks[0].master);
            for (size_t i = 0; i < alone.scalars.size(); i++)
                CHECK(got.scalars[i] == doctest::Approx(alone.scalars[i]).epsilon(1e-4));
            CHECK(relative_change_error(got.master, alone.master, initial) < 1e-3);
        }
    }
}

TEST_SUITE("nccl") {
    TEST_CASE("the launcher's environment gives the process its rank, the world size and its GPU") {
        Ranks one = ranks_from_environment(table({}));
        CHECK((one.rank == 0 && one.world == 1 && one.local_rank == 0));
        Ranks torchrun = ranks_from_environment(table({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}}));
        CHECK((torchrun.rank == 5 && torchrun.world == 8 && torchrun.local_rank == 1));
        Ranks mpi = ranks_from_environment(table(
            {{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}}));
        CHECK((mpi.rank == 2 && mpi.world == 4 && mpi.local_rank == 2));
        Ranks slurm = ranks_from_environment(
            table({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "3"}, {"OMPI_COMM_WORLD_SIZE", "2"},
                   {"OMPI_COMM_WORLD_RANK", "1"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}));
        CHECK(slurm.world == 2);  // OpenMPI's variables come before Slurm's
        CHECK(launch_error({{"RANK", "1"}, {"WORLD_SIZE", "2"}}).find("LOCAL_RANK is not set") != std::string::npos);
        CHECK(launch_error({{"RANK", "2"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}).find("is not below") !=
              std::string::npos);
        CHECK(launch_error({{"RANK", "x"}, {"WORLD_SIZE", "2"}, {"LOCAL_RANK", "0"}}).find("RANK='x'") !=
              std::string::npos);
        CHECK(launch_error({{"RANK", "0"}, {"WORLD_SIZE", "0"}, {"LOCAL_RANK", "0"}}).find("at least 1") !=
              std::string::npos);
        CHECK(job_token(table({{"TORCHELASTIC_RUN_ID", "a/b 7"}})) == "a_b_7");
        CHECK(job_token(table({})).empty());
    }

    TEST_CASE("rank 0's bytes reach the other ranks through a file; a rank without rank 0 gives up in time") {
        const std::string path = scratch_path("test_nccl_share");
        std::filesystem::remove(path);
        const int R = 4;
        std::vector<std::array<char, 128>> got(R);
        std::vector<std::thread> ranks;
        for (int r = 0; r < R; r++)
            ranks.emplace_back([&, r] {
                std::array<char, 128>& bytes = got[r];
                if (r == 0) {  // the others are waiting by now
                    for (int i = 0; i < 128; i++) bytes[i] = char(i * 7 + 1);
                    std::this_thread::sleep_for(std::chrono::milliseconds(100));
                }
                share_through_file(path, Ranks{r, R, r}, bytes.data(), bytes.size(), 10.0);
            });
        for (std::thread& t : ranks) t.join();
        for (int r = 1; r < R; r++) CHECK(got[r] == got[0]);
        CHECK(got[0][5] == char(36));
        std::filesystem::remove(path);
        char byte = 0;
        std::string error;
        try {
            share_through_file(path, Ranks{1, 2, 1}, &byte, 1, 0.2);
        } catch (const std::runtime_error& e) {
            error = e.what();
        }
        CHECK(error.find("waited 0 s for rank 0's") != std::string::npos);
    }

    TEST_CASE("tools/launch.sh starts a process per rank, and stops them all when one fails") {
        const std::filesystem::path root = std::filesystem::path(__FILE__).parent_path().parent_path();
        const std::string script = (root / "tools/launch.sh").string();
        const std::string out = scratch_path("test_nccl_launch");
        std::filesystem::remove(out);
        auto launch = [&](const std::string& body) {
            const std::string command = "bash " + script + " 3 bash -c '" + body + "' 2>/dev/null";
            const int status = std::system(command.c_str());
            return WIFEXITED(status) ? WEXITSTATUS(status) : -1;
        };
        CHECK(launch("echo $RANK $WORLD_SIZE $LOCAL_RANK $MINI_DEEPSEEK_JOB >> " + out) == 0);
        std::ifstream in(out);
        std::multiset<std::string> seen;
        std::set<std::string> jobs;
        for (std::string rank, world, local, job; in >> rank >> world >> local >> job;)
            seen.insert(rank + world + local), jobs.insert(job);
        CHECK(seen == std::multiset<std::string>{"030", "131", "232"});
        CHECK(jobs.size() == 1);
        const auto start = std::chrono::steady_clock::now();
        CHECK(launch("[ $RANK != 1 ] || exit 3; sleep 30") == 3);
        CHECK(std::chrono::steady_clock::now() - start < std::chrono::seconds(10));
        CHECK(launch("true") == 0);
        std::filesystem::remove(out);
    }

    TEST_CASE("the ranks' rows partition the global batch in order, as evenly as it allows") {
        for (int B : {1, 7, 64, 65})
            for (int R : {1, 2, 3, 8}) {
                CAPTURE(B);
                CAPTURE(R);
                if (B < R) {
                    CHECK_THROWS_AS(rows_of_rank(B, Ranks{0, R, 0}), std::invalid_argument);
                    continue;
                }
                int next = 0;
                for (int r = 0; r < R; r++) {
                    RowRange rows = rows_of_rank(B, Ranks{r, R, r});
                    CHECK(rows.begin == next);
                    CHECK(rows.count() >= B / R);
                    CHECK(rows.count() <= B / R + 1);
                    next = rows.end;
                }
                CHECK(next == B);
            }
    }

    TEST_CASE("ZeRO-1's shards: equal, aligned, covering the values once, the padding at the end") {
        for (long n : {1L, 127L, 128L, 1000L, 46720000L})
            for (int R : {1, 2, 3, 8}) {
                CAPTURE(n);
                CAPTURE(R);
                Shards s = shards_of(n, R);
                CHECK(s.per_rank % SHARD_ALIGN == 0);
                CHECK(s.padded() >= n);
                CHECK(s.padded() - n < R * SHARD_ALIGN + s.per_rank);
                long covered = 0;
                for (int r = 0; r < R; r++) {
                    CHECK(s.begin(r) == covered);
                    CHECK(s.end(r) - s.begin(r) <= s.per_rank);
                    covered = s.end(r);
                }
                CHECK(covered == n);
                if (R == 1) CHECK(s.end(0) == n);
            }
    }

    TEST_CASE("expert-parallel dispatch: every row reaches its expert's rank, grouped by expert, and comes back") {
        for (int R : {1, 2, 4})
            for (int E : {4, 8, 16}) {
                if (E % R != 0) continue;
                CAPTURE(R);
                CAPTURE(E);
                const std::vector<long> counts = random_counts(R, E, uint64_t(R * 100 + E));
                const std::vector<std::vector<Row>> local = rows_by_expert(counts, R, E);
                std::vector<Dispatch> plans;
                for (int r = 0; r < R; r++) plans.push_back(dispatch_plan(counts, E, Ranks{r, R, r}));
                // the exchange: rank r's receive block from peer p is peer p's send block to r
                std::vector<std::vector<Row>> received(R), grouped(R);
                for (int r = 0; r < R; r++) {
                    received[r].resize(size_t(plans[r].received()));
                    for (int p = 0; p < R; p++) {
                        REQUIRE(plans[r].recv_count[p] == plans[p].send_count[r]);
                        std::copy_n(local[p].begin() + plans[p].send_offset[r], plans[r].recv_count[p],
                                    received[r].begin() + plans[r].recv_offset[p]);
                    }
                    grouped[r].resize(received[r].size());
                    for (const Segment& s : plans[r].regroup)
                        std::copy_n(received[r].begin() + s.from, s.rows, grouped[r].begin() + s.to);
                }
                long total = 0;
                for (int r = 0; r < R; r++) {
                    const Dispatch& d = plans[r];
                    CHECK(d.sent() == long(local[r].size()));
                    CHECK(grouped[r] == rows_for_experts(local, d));
                    long rows = 0;
                    for (int j = 0; j < d.local_experts; j++) rows += d.expert_rows[j];
                    CHECK(rows == long(grouped[r].size()));
                    total += rows;
                }
                long all = std::accumulate(counts.begin(), counts.end(), 0L);
                CHECK(total == all);
                // the combine: regroup reversed, then each block back to its source rank, where it lands in place
                for (int p = 0; p < R; p++) {
                    std::vector<Row> back(local[p].size(), Row{-1, -1, -1});
                    for (int r = 0; r < R; r++) {
                        std::vector<Row> peer_major(grouped[r].size());
                        for (const Segment& s : plans[r].regroup)
                            std::copy_n(grouped[r].begin() + s.to, s.rows, peer_major.begin() + s.from);
                        std::copy_n(peer_major.begin() + plans[r].recv_offset[p], plans[r].recv_count[p],
                                    back.begin() + plans[p].send_offset[r]);
                    }
                    CHECK(back == local[p]);
                }
            }
        CHECK_THROWS_AS(dispatch_plan(std::vector<long>(3 * 16), 16, Ranks{0, 3, 0}), std::invalid_argument);
    }
}
