// data/corpus.h: the chat format of a problem, the pretraining token stream, the held-out evaluation sets, the
// R1-Zero prompt and the cold-start SFT data.
//
// A document is "<|bos|><|user|>question<|assistant|><think>reasoning</think><answer>answer</answer><|eos|>". The
// pretraining batch is a pure function of (seed, step, row), so a resumed run sees exactly the data it would have
// seen, and any step's batch can be rebuilt to inspect it.
//
// Like a web corpus, the pretraining stream holds the material in two languages (language.h) and mixes them: some
// reasoning is written in the other language than its question, and some switches language midway. The base model
// can then think in either language, and mix them, before any RL (R1 §2.2.4: R1-Zero's chains of thought mixed
// languages). The cold-start data (R1 §2.3.1) is the opposite: readable single-language reasoning with a summary.
#pragma once

#include <cstdint>
#include <set>
#include <stdexcept>
#include <string>
#include <vector>

#include "../kernels/rng.h"
#include "tasks.h"
#include "tokenizer.h"

namespace data {

inline std::string format_prompt(const Problem& p) { return "<|bos|><|user|>" + p.question + "<|assistant|>"; }

// R1-Zero's template (R1 Table 1) asks a base model for the <think> / <answer> format in plain words: "A
// conversation between User and Assistant. [...] The reasoning process and answer are enclosed within <think>
// </think> and <answer> </answer> tags, respectively [...]. User: prompt. Assistant:". Verbatim it would take about
// 400 of the 512 context tokens and write uppercase letters, which are the Alt language here; this is the same
// instruction in the project's own short form, lowercase, with the chat tokens as the speakers' names. The model
// writes from <think> on, as after format_prompt; only that response is scored (the language reward looks at the
// thinking alone), so the template's own En letters never count.
inline std::string r1zero_prompt(const Problem& p) {
    return "<|bos|><|system|>think in <think></think>, then answer in <answer></answer><|user|>" + p.question +
           "<|assistant|>";
}

// The prompt of a problem: the chat format, or the R1-Zero template.
inline std::string prompt_text(const Problem& p, bool r1zero_template) {
    return r1zero_template ? r1zero_prompt(p) : format_prompt(p);
}

inline std::string think_then_answer(const std::string& thinking, const std::string& answer) {
    return "<think>" + thinking + "</think><answer>" + answer + "</answer><|eos|>";
}

// Without reasoning the think block stays, empty: direct answers and reasoned ones share one format, and the
// model's first choice after <|assistant|> is always <think>.
inline std::string format_response(const Problem& p, bool with_reasoning) {
    return think_then_answer(with_reasoning ? p.reasoning : "", p.answer);
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
    // The share of documents answered directly (empty think block): the model learns to answer both ways, and
    // `eval --direct` measures what thinking adds.
    double direct_fraction = 0.1;
    // The share of problems posed in the Alt language (the rest in En).
    double alt_fraction = 0.5;
    // The probability that a document's reasoning is written in the other language than its question.
    double other_language_reasoning = 0.25;
    // The probability that the reasoning switches language at a random step boundary (reasoning of one step
    // cannot switch).
    double code_switch = 0.1;
};

inline void check_fraction(double value, const char* name) {
    if (!(value >= 0 && value <= 1))
        throw std::invalid_argument(std::string("CorpusConfig: ") + name + " must be in [0, 1]");
}

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
    check_fraction(cfg.direct_fraction, "direct_fraction");
    check_fraction(cfg.alt_fraction, "alt_fraction");
    check_fraction(cfg.other_language_reasoning, "other_language_reasoning");
    check_fraction(cfg.code_switch, "code_switch");
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

// One problem of the corpus' mix, in either language: a training problem, or a held-out one (for the held-out
// loss), never mixed.
inline Problem corpus_problem(const CorpusConfig& cfg, Rng& rng, bool heldout) {
    TaskKind kind = draw_kind(cfg, rng);
    int difficulty = int(rng.range(1, cfg.max_difficulty[int(kind)]));
    Language language = rng.uniform() < cfg.alt_fraction ? Language::Alt : Language::En;
    return sample_problem(kind, difficulty, rng, heldout, language);
}

// The problem's reasoning as a web document might write it: in the question's language or the other one, and
// perhaps switching language from a random step (line) on. The answer stays in the question's language.
inline std::string corpus_reasoning(const Problem& p, const CorpusConfig& cfg, Rng& rng) {
    const Language first = rng.uniform() < cfg.other_language_reasoning ? other_language(p.language) : p.language;
    std::vector<std::string> steps = split_lines(p.reasoning);
    size_t switch_at = steps.size();
    if (rng.uniform() < cfg.code_switch && steps.size() > 1) switch_at = size_t(rng.range(1, long(steps.size()) - 1));
    for (size_t i = 0; i < steps.size(); ++i)
        steps[i] = to_language(steps[i], i < switch_at ? first : other_language(first));
    return join(steps, "\n");
}

inline std::string corpus_document(const CorpusConfig& cfg, Rng& rng, bool heldout) {
    Problem p = corpus_problem(cfg, rng, heldout);
    const bool with_reasoning = rng.uniform() >= cfg.direct_fraction;
    return format_prompt(p) + think_then_answer(with_reasoning ? corpus_reasoning(p, cfg, rng) : "", p.answer);
}

// Rows first_row .. first_row + B - 1 of a batch, T+1 ids each (inputs are the first T, targets the last T). A row is
// documents end to end, the last one cut where the row ends; it is drawn from its own generator,
// Rng(rng_hash(seed, step, row), stream), so a data-parallel rank draws its rows of the batch alone.
inline void corpus_batch(const Tokenizer& tok, const CorpusConfig& cfg, long step, int B, int T,
                         std::vector<int32_t>& tokens, bool heldout, int first_row) {
    check_config(cfg);
    const size_t row_length = size_t(T) + 1;
    tokens.resize(size_t(B) * row_length);
    for (int row = 0; row < B; ++row) {
        Rng rng(rng_hash(cfg.seed, uint64_t(step), uint64_t(first_row + row)), heldout ? 1 : 0);
        int32_t* out = tokens.data() + size_t(row) * row_length;
        for (size_t filled = 0; filled < row_length;) {
            std::vector<int> ids = tok.encode(corpus_document(cfg, rng, heldout));
            for (size_t i = 0; i < ids.size() && filled < row_length; ++i) out[filled++] = ids[i];
        }
    }
}

// The pretraining batch of a step (its B rows from first_row): training problems only.
inline void pretrain_batch(const Tokenizer& tok, const CorpusConfig& cfg, long step, int B, int T,
                           std::vector<int32_t>& tokens, int first_row = 0) {
    corpus_batch(tok, cfg, step, B, T, tokens, false, first_row);
}

// Batch k of the held-out loss (its B rows from first_row): the same mix and format, from held-out problems only.
inline void heldout_batch(const Tokenizer& tok, const CorpusConfig& cfg, long k, int B, int T,
                          std::vector<int32_t>& tokens, int first_row = 0) {
    corpus_batch(tok, cfg, k, B, T, tokens, true, first_row);
}

// n held-out problems of one kind and difficulty, deterministic in the seed. They are distinct while the problem
// space allows; the smallest spaces (mul at difficulty 1 has about a hundred held-out problems) repeat some. The
// language changes only how they are written: one seed gives the same problems in En and in Alt.
inline std::vector<Problem> eval_set(TaskKind kind, int difficulty, int n, uint64_t seed,
                                     Language language = Language::En) {
    Rng rng(seed, rng_hash(0x6576616cull, uint64_t(kind), uint64_t(difficulty)));  // a stream of its own ("eval")
    std::vector<Problem> problems;
    std::set<std::string> seen;
    long repeats_left = 100L * n;
    while (int(problems.size()) < n) {
        Problem p = sample_problem(kind, difficulty, rng, true, language);
        if (seen.insert(problem_key(p)).second || repeats_left-- <= 0) problems.push_back(p);
    }
    return problems;
}

// ---------------------------------------------------------------------------------------------------------------
// Cold start (R1 §2.3.1): a few thousand long, readable chains of thought, all in the question's language, each
// closed by a summary, for supervised fine-tuning before RL.
// ---------------------------------------------------------------------------------------------------------------

// "so 12+34=46", "so (3+5)*2-7=9", or the same in Alt ("ZO BC+DE=EG").
inline std::string summary_line(const Problem& p) {
    const std::string statement =
        p.kind == TaskKind::Countdown ? p.answer + "=" + std::to_string(p.target) : p.question + p.answer;
    return to_language("so " + statement, p.language);
}

inline std::string format_cold_start_response(const Problem& p) {
    return think_then_answer(p.reasoning + "\n" + summary_line(p), p.answer);
}

// One supervised example of T tokens: the prompt and the cold-start response, padded with <|pad|>. targets[i] is
// the id of token i+1 where that token is the assistant's, and -1 (no loss) for the prompt and the padding, so the
// model learns to answer, not to ask.
struct SftExample {
    std::vector<int> tokens;
    std::vector<int> targets;
};

inline SftExample sft_example(const Tokenizer& tok, const Problem& p, int T) {
    const size_t prompt_length = tok.encode(format_prompt(p)).size();
    SftExample example;
    example.tokens = tok.encode(format_prompt(p) + format_cold_start_response(p));
    const size_t length = example.tokens.size();
    if (length > size_t(T))
        throw std::invalid_argument("sft_example: " + std::to_string(length) +
                                    " tokens do not fit in T = " + std::to_string(T));
    example.tokens.resize(size_t(T), PAD);
    example.targets.assign(size_t(T), -1);
    for (size_t i = prompt_length; i < length; ++i) example.targets[i - 1] = example.tokens[i];
    return example;
}

// The training problems of a fine-tuning stage (cold start, RL): the corpus' whole mix, or one task at one
// difficulty, of which a `replay` share is drawn from the whole mix instead. RL on one task alone forgets the
// others; rehearsing the mix keeps them.
struct ProblemMix {
    bool whole_corpus = true;
    TaskKind kind = TaskKind::Countdown;
    int difficulty = 1;
    double replay = 0.0;
};

inline Problem draw_problem(const CorpusConfig& cfg, const ProblemMix& mix, Rng& rng) {
    if (mix.whole_corpus || rng.uniform() < mix.replay) return corpus_problem(cfg, rng, false);
    Language language = rng.uniform() < cfg.alt_fraction ? Language::Alt : Language::En;
    return sample_problem(mix.kind, mix.difficulty, rng, false, language);
}

// n training (never held-out) problems of the mix, in the corpus' languages, deterministic in the seed.
inline std::vector<Problem> cold_start_set(int n, const CorpusConfig& cfg, const ProblemMix& mix, uint64_t seed) {
    check_config(cfg);
    Rng rng(seed, 0x636f6c64ull);  // a stream of its own ("cold")
    std::vector<Problem> problems;
    for (int i = 0; i < n; ++i) problems.push_back(draw_problem(cfg, mix, rng));
    return problems;
}

}  // namespace data
