// command_line.h: a benchmark's command line, handled as train handles its own: the flags parsed and checked (a bad
// one prints the flags and exits 2), a GPU required (exit 1 without one), an error of the run printed (exit 1).
#pragma once

#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>

#include "../io/options.h"
#include "../kernels/common.cuh"

// check() throws std::invalid_argument for values the flags may not take together; run() is the benchmark.
template <typename Check, typename Run>
int benchmark_main(int argc, char** argv, FlagSet& flags, Check check, Run run) {
    try {
        flags.parse(std::vector<std::string>(argv + 1, argv + argc));
        check();
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "error: %s\nflags:\n%s", e.what(), flags.help().c_str());
        return 2;
    }
    if (!require_gpu()) return 1;
    try {
        run();
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
