// data/corpus.h: the chat format of a problem, the pretraining token stream and the held-out evaluation sets.
//
// A document is "<|bos|><|user|>question<|assistant|><think>reasoning</think><answer>answer</answer><|eos|>". The
// pretraining batch is a pure function of (seed, step, row), so a resumed run sees exactly the data it would have
// seen, and any step's batch can be rebuilt to inspect it.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "../common.cuh"
#include "tasks.h"
#include "tokenizer.h"

namespace data {

inline std::string format_prompt(const Problem& p) { return "<|bos|><|user|>" + p.question + "<|assistant|>"; }

// Without reasoning the think block stays, empty: direct answers and reasoned ones share one format, and the
// model's first choice after <|assistant|> is always <think>.
inline std::string format_response(const Problem& p, bool with_reasoning) {
    return "<think>" + (with_reasoning ? p.reasoning : "") + "</think><answer>" + p.answer + "</answer><|eos|>";
}

inline std::string format_example(const Problem& p, bool with_reasoning) {
    return format_prompt(p) + format_response(p, with_reasoning);
}

struct CorpusConfig {
    uint64_t seed = 1234;
    // Per kind (add, mul, countdown): difficulties 1..max are drawn uniformly. The defaults are what a
    // 15M-parameter model learns in a few minutes.
    int max_difficulty[kNumTaskKinds] = {4, 2, 2};
    // Per kind: relative frequency in the mix; 0 leaves a kind out.
    double kind_weight[kNumTaskKinds] = {1.0, 1.0, 1.0};
    // The share of documents answered directly (empty think block).
    double direct_fraction = 0.0;
};

inline void check_config(const CorpusConfig& cfg) {
    double total_weight = 0;
    for (int k = 0; k < kNumTaskKinds; ++k) {
        const int max = cfg.max_difficulty[k];
        if (max < 1 || max > max_difficulty(TaskKind(k)))
            throw std::invalid_argument(std::string("CorpusConfig: max_difficulty for ") + task_name(TaskKind(k)) +
                                        " must be in 1.." + std::to_string(max_difficulty(TaskKind(k))));
        if (!(cfg.kind_weight[k] >= 0)) throw std::invalid_argument("CorpusConfig: kind_weight must be >= 0");
        total_weight += cfg.kind_weight[k];
    }
    if (!(total_weight > 0)) throw std::invalid_argument("CorpusConfig: every kind_weight is 0");
    if (!(cfg.direct_fraction >= 0 && cfg.direct_fraction <= 1))
        throw std::invalid_argument("CorpusConfig: direct_fraction must be in [0, 1]");
}

inline TaskKind draw_kind(const CorpusConfig& cfg, Rng& rng) {
    double total_weight = 0;
    for (double w : cfg.kind_weight) total_weight += w;
    double x = rng.uniform() * total_weight;
    for (int k = 0; k < kNumTaskKinds; ++k) {
        if (x < cfg.kind_weight[k]) return TaskKind(k);
        x -= cfg.kind_weight[k];
    }
    // Rounding can leave x just past the last weight: that draw belongs to the last kind in the mix.
    int k = kNumTaskKinds - 1;
    while (cfg.kind_weight[k] == 0) --k;
    return TaskKind(k);
}

// One problem of the corpus' mix: a training problem, or a held-out one (for the held-out loss), never mixed.
inline Problem corpus_problem(const CorpusConfig& cfg, Rng& rng, bool heldout) {
    TaskKind kind = draw_kind(cfg, rng);
    int difficulty = int(rng.range(1, cfg.max_difficulty[int(kind)]));
    return sample_problem(kind, difficulty, rng, heldout);
}

inline std::string corpus_document(const CorpusConfig& cfg, Rng& rng, bool heldout) {
    Problem p = corpus_problem(cfg, rng, heldout);
    return format_example(p, rng.uniform() >= cfg.direct_fraction);
}

// B rows of T+1 ids (inputs are the first T, targets the last T). A row is documents end to end, the last one cut
// where the row ends; it is drawn from its own generator, Rng(rng_hash(seed, step, row), stream).
inline void corpus_batch(const Tokenizer& tok, const CorpusConfig& cfg, long step, int B, int T,
                         std::vector<int32_t>& tokens, bool heldout) {
    check_config(cfg);
    const size_t row_length = size_t(T) + 1;
    tokens.resize(size_t(B) * row_length);
    for (int row = 0; row < B; ++row) {
        Rng rng(rng_hash(cfg.seed, uint64_t(step), uint64_t(row)), heldout ? 1 : 0);
        int32_t* out = tokens.data() + size_t(row) * row_length;
        for (size_t filled = 0; filled < row_length;) {
            std::vector<int> ids = tok.encode(corpus_document(cfg, rng, heldout));
            for (size_t i = 0; i < ids.size() && filled < row_length; ++i) out[filled++] = ids[i];
        }
    }
}

// The pretraining batch of a step: training problems only.
inline void pretrain_batch(const Tokenizer& tok, const CorpusConfig& cfg, long step, int B, int T,
                           std::vector<int32_t>& tokens) {
    corpus_batch(tok, cfg, step, B, T, tokens, false);
}

// Batch k of the held-out loss: the same mix and format, from held-out problems only.
inline void heldout_batch(const Tokenizer& tok, const CorpusConfig& cfg, long k, int B, int T,
                          std::vector<int32_t>& tokens) {
    corpus_batch(tok, cfg, k, B, T, tokens, true);
}

// n held-out problems of one kind and difficulty, deterministic in the seed. They are distinct while the problem
// space allows; the smallest spaces (mul at difficulty 1 has about a hundred held-out problems) repeat some.
inline std::vector<Problem> eval_set(TaskKind kind, int difficulty, int n, uint64_t seed) {
    Rng rng(seed, rng_hash(0x6576616cull, uint64_t(kind), uint64_t(difficulty)));  // a stream of its own ("eval")
    std::vector<Problem> problems;
    std::set<std::string> seen;
    long repeats_left = 100L * n;
    while (int(problems.size()) < n) {
        Problem p = sample_problem(kind, difficulty, rng, true);
        if (seen.insert(problem_key(p)).second || repeats_left-- <= 0) problems.push_back(p);
    }
    return problems;
}

}  // namespace data
