// Parallel training's plans on the host: each process's place from the launcher's environment, the id exchange
// through a file, each rank's rows, the ZeRO-1 shards, and the expert-parallel dispatch simulated over all ranks
// (every row reaches its expert's rank, grouped by expert in a fixed order, and the reverse exchange brings it back).
#include <doctest/doctest.h>

#include <array>
#include <map>
#include <numeric>

#include "../nccl.cuh"

namespace {

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

}  // namespace

TEST_SUITE("nccl") {
    TEST_CASE("the launcher's environment gives the process its rank, the world size and its GPU") {
        Ranks one = ranks_from_environment(table({}));
        CHECK((one.rank == 0 && one.world == 1 && one.local_rank == 0));
        Ranks torchrun = ranks_from_environment(table({{"RANK", "5"}, {"WORLD_SIZE", "8"}, {"LOCAL_RANK", "1"}}));
        CHECK((torchrun.rank == 5 && torchrun.world == 8 && torchrun.local_rank == 1));
        Ranks mpi = ranks_from_environment(table(
            {{"OMPI_COMM_WORLD_RANK", "2"}, {"OMPI_COMM_WORLD_SIZE", "4"}, {"OMPI_COMM_WORLD_LOCAL_RANK", "2"}}));
        CHECK((mpi.rank == 2 && mpi.world == 4 && mpi.local_rank == 2));
        Ranks slurm = ranks_from_environment(table({{"SLURM_PROCID", "3"}, {"SLURM_NTASKS", "16"}, {"SLURM_LOCALID", "3"},
                                                    {"OMPI_COMM_WORLD_SIZE", "2"}, {"OMPI_COMM_WORLD_RANK", "1"},
                                                    {"OMPI_COMM_WORLD_LOCAL_RANK", "1"}}));
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
        const std::string path = (std::filesystem::temp_directory_path() / "test_nccl_share").string();
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
                Rng rng(uint64_t(R * 100 + E));
                std::vector<long> counts(size_t(R) * E);
                for (long& c : counts) c = rng.range(0, 3) == 0 ? 0 : rng.range(0, 40);  // some experts get none
                // each rank's rows, grouped by expert
                std::vector<std::vector<Row>> local(R);
                for (int p = 0; p < R; p++)
                    for (int e = 0; e < E; e++)
                        for (long i = 0; i < counts[size_t(p) * E + e]; i++)
                            local[p].push_back({p, e, long(local[p].size())});
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
                    // the local experts' rows: expert after expert, each from rank 0, 1, ... in their order there
                    std::vector<Row> want;
                    for (int j = 0; j < d.local_experts; j++)
                        for (int p = 0; p < R; p++)
                            for (const Row& row : local[p])
                                if (row.expert == d.first_expert + j) want.push_back(row);
                    CHECK(grouped[r] == want);
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
