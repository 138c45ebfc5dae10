// rewards.h: the rule-based rewards of DeepSeek-R1 for a sampled response: accuracy and format (R1 §2.2.2), and the
// language-consistency reward that R1 adds after the cold start (§2.3.2). Host code, run on every sample of every
// GRPO step.
//
// R1 uses rules rather than a neural reward model because a learned reward can be hacked and must be retrained;
// rules can be hacked too when they are loose, so these are strict: one <think> block, then one <answer> block,
// each tag exactly once, and the answer checked exactly by the task's verifier (never by substring, so an empty
// answer matches nothing). Any byte sequence gets a reward in linear time, without throwing.
#pragma once

#include <algorithm>
#include <string>

#include "tasks.h"

namespace rewards {

struct RewardConfig {
    double w_accuracy = 1.0;
    // Small beside accuracy, so that no format can pay for a wrong answer; not zero, so that in a group whose
    // answers are all wrong the well-formed samples still stand out and GRPO has an advantage to learn from.
    double w_format = 0.1;
    // R1 adds language consistency only in the RL stage after the cold start (§2.3.2), directly summed with the
    // accuracy reward; 0 leaves it out, as in R1-Zero.
    double w_language = 0.0;
    // DAPO §3.4's soft overlong punishment, added to the rule-based rewards: 0 leaves it out. A response cut off at
    // the sampler's max_tokens has no answer and earns nothing already; this adds a penalty that grows over the last
    // overlong_cache tokens before the cut, so that GRPO also learns which long responses came close to it.
    double w_overlong = 0.0;
    long max_tokens = 0, overlong_cache = 0;
};

struct Reward {
    double accuracy = 0, format = 0, language = 0, overlong = 0, total = 0;
    bool has_answer = false;  // exactly one <answer> and one </answer>, in that order
    std::string answer;       // the text between them
    std::string thinking;     // the text between the one <think> and the one </think>, if there are exactly those
};

// Longer responses score 0 without being read. The model's 512-token context decodes to a few KB at most, so only
// garbage is this long, and the cap bounds the host time a sample can take.
constexpr size_t kMaxResponseBytes = size_t(1) << 20;

// A thinking text mixes languages when the less used one holds more than this share of its language characters.
constexpr double kMixedMinorityShare = 0.1;

// The one block `open` ... `close` of a response: found only when each tag occurs exactly once, open before close.
struct Block {
    bool found = false;
    size_t open = 0;            // where the opening tag starts
    size_t begin = 0, end = 0;  // the content
    size_t after = 0;           // just past the closing tag
};

inline size_t count_tag(const std::string& text, const std::string& tag, size_t& first) {
    size_t count = 0;
    first = std::string::npos;
    for (size_t at = text.find(tag); at != std::string::npos; at = text.find(tag, at + tag.size()))
        if (count++ == 0) first = at;
    return count;
}

inline Block only_block(const std::string& text, const std::string& open, const std::string& close) {
    size_t open_at, close_at;
    Block block;
    if (count_tag(text, open, open_at) != 1 || count_tag(text, close, close_at) != 1) return block;
    if (close_at < open_at + open.size()) return block;
    return {true, open_at, open_at + open.size(), close_at, close_at + close.size()};
}

inline std::string content(const std::string& text, const Block& block) {
    return text.substr(block.begin, block.end - block.begin);
}

inline bool contains_special(const std::string& text, size_t begin, size_t end) {
    for (size_t pos = begin; pos < end; ++pos)
        if (data::named_special_at(text, pos) >= 0) return true;
    return false;
}

inline bool only_whitespace(const std::string& text, size_t begin, size_t end) {
    return std::all_of(text.begin() + long(begin), text.begin() + long(end),
                       [](char c) { return c == ' ' || c == '\n'; });
}

// Exactly "<think>T</think>", optional spaces and newlines, "<answer>A</answer>", then nothing or "<|eos|>". T and A
// hold no special token at all (so no repeated or nested block, and no invented next turn), and A is not blank.
inline bool well_formed(const std::string& response, const Block& think, const Block& answer) {
    if (!think.found || !answer.found || think.open != 0 || answer.open < think.after) return false;
    if (!only_whitespace(response, think.after, answer.open)) return false;
    const size_t tail = response.size() - answer.after;
    if (tail != 0 && response.compare(answer.after, std::string::npos, "<|eos|>") != 0) return false;
    if (contains_special(response, think.begin, think.end) || contains_special(response, answer.begin, answer.end))
        return false;
    return !only_whitespace(response, answer.begin, answer.end);
}

// Exercise 6 (exercises/06_overlong_penalty) asks for this function's body.
#ifdef EXERCISE_OVERLONG_PENALTY
#include EXERCISE_OVERLONG_PENALTY
#else
// DAPO §3.4, eq. 13: 0 up to max_tokens - cache tokens, then linear down to -1 at max_tokens, and -1 beyond.
inline double overlong_penalty(long tokens, long max_tokens, long cache) {
    const long free_tokens = max_tokens - cache;
    if (tokens <= free_tokens) return 0.0;
    if (tokens >= max_tokens) return -1.0;
    return double(free_tokens - tokens) / double(cache);
}
#endif

// Accuracy needs only the answer block, whatever the rest looks like: the format reward judges the rest, and one
// unambiguous answer is all the verifier needs. Two answer blocks count as none, so that hedging never pays.
// tokens: the response's length in tokens, for the overlong penalty (where cfg weighs it).
inline Reward score(const data::Problem& p, const std::string& response, const RewardConfig& cfg = {},
                    long tokens = 0) {
    Reward r;
    if (response.size() > kMaxResponseBytes) return r;
    const Block think = only_block(response, "<think>", "</think>");
    const Block answer = only_block(response, "<answer>", "</answer>");
    if (think.found) r.thinking = content(response, think);
    if (answer.found) {
        r.has_answer = true;
        r.answer = content(response, answer);
        r.accuracy = data::verify(p, r.answer) ? 1.0 : 0.0;
    }
    // R1 §2.3.2 measures the language of the chain of thought of an attempt: a response without an answer earns
    // nothing from it, or in a group whose answers are all wrong, thinking without answering would pay better
    // than a wrong answer (and an empty think block, with no words, earns nothing either).
    if (think.found && answer.found) r.language = data::language_share(r.thinking, p.language);
    r.format = well_formed(response, think, answer) ? 1.0 : 0.0;
    if (cfg.w_overlong > 0.0) r.overlong = overlong_penalty(tokens, cfg.max_tokens, cfg.overlong_cache);
    r.total = cfg.w_accuracy * r.accuracy + cfg.w_format * r.format + cfg.w_language * r.language +
              cfg.w_overlong * r.overlong;
    return r;
}

// For the language-mixing rate: both languages in a chain of thought, the minority one above a small share.
inline bool is_mixed(const std::string& thinking) {
    const data::LanguageCounts counts = data::count_language_chars(thinking);
    const size_t total = counts.en + counts.alt;
    return total > 0 && double(std::min(counts.en, counts.alt)) > kMixedMinorityShare * double(total);
}

}  // namespace rewards
