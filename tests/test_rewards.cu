// tests/test_rewards.cu: the rule-based rewards (accuracy, format, language consistency) on right, wrong, malformed
// and adversarial responses: repeated and nested tags, empty answers, random bytes, huge inputs.
#include <doctest/doctest.h>

#include <string>
#include <vector>

#include "../data/corpus.h"
#include "../data/rewards.h"
#include "answer_oracle.h"

using namespace rewards;
using data::Language;
using data::Problem;
using data::TaskKind;

namespace {

const Problem kAdd{TaskKind::Add, 1, {12, 34}, 46, "12+34=", "2+4+0=6 -> 6\n1+3+0=4 -> 46", "46"};
const Problem kCountdown{TaskKind::Countdown, 2, {3, 5, 2, 7}, 9, "make 9 from 3 5 2 7", "7+2=9, yes", "7+2"};

// Every weight non-zero, so that each part shows in the total.
const RewardConfig kAllParts{1.0, 0.1, 0.2};
constexpr double kMaxTotal = 1.0 + 0.1 + 0.2;

std::string respond(const std::string& thinking, const std::string& answer) {
    return "<think>" + thinking + "</think><answer>" + answer + "</answer><|eos|>";
}

// What must hold for any response whatever: each part in its range, the total their weighted sum.
void check_bounds(const Reward& r) {
    CHECK((r.accuracy == 0.0 || r.accuracy == 1.0));
    CHECK((r.format == 0.0 || r.format == 1.0));
    CHECK((r.language >= 0.0 && r.language <= 1.0));
    CHECK(r.total == doctest::Approx(1.0 * r.accuracy + 0.1 * r.format + 0.2 * r.language));
    CHECK((r.total >= 0.0 && r.total <= kMaxTotal + 1e-12));
    CHECK((r.accuracy == 0.0 || r.has_answer));
}

Reward score_checked(const Problem& p, const std::string& response) {
    Reward r;
    CHECK_NOTHROW(r = score(p, response, kAllParts));
    check_bounds(r);
    return r;
}

size_t occurrences(const std::string& text, const std::string& piece) {
    size_t count = 0;
    for (size_t at = text.find(piece); at != std::string::npos; at = text.find(piece, at + 1)) ++count;
    return count;
}

std::string random_bytes(Rng& rng, size_t length) {
    std::string bytes(length, '\0');
    for (char& c : bytes) c = char(rng.range(0, 255));
    return bytes;
}

}  // namespace

TEST_SUITE("rewards") {
    TEST_CASE("rewards: a right answer in the right format") {
        Reward r = score(kAdd, respond("2+4+0=6 -> 6\n1+3+0=4 -> 46", "46"), RewardConfig{});
        CHECK(r.accuracy == 1.0);
        CHECK(r.format == 1.0);
        CHECK(r.language == 1.0);
        CHECK(r.total == doctest::Approx(1.1));  // the default leaves language out
        CHECK(r.has_answer);
        CHECK(r.answer == "46");
        CHECK(r.thinking == "2+4+0=6 -> 6\n1+3+0=4 -> 46");
        CHECK(score(kAdd, respond("x", "46"), kAllParts).total == doctest::Approx(kMaxTotal));

        const std::vector<std::string> right = {"<think>a</think><answer>46</answer>",
                                                "<think>a</think> \n <answer>46</answer>",
                                                "<think></think><answer> 46 </answer><|eos|>", respond("a", "EG")};
        for (const std::string& response : right) {
            Reward ok = score_checked(kAdd, response);
            CHECK_MESSAGE(ok.accuracy == 1.0, response);
            CHECK_MESSAGE(ok.format == 1.0, response);
        }
        CHECK(score_checked(kCountdown, respond("", "2+7")).accuracy == 1.0);
        CHECK(score_checked(kCountdown, respond("", "(5-2)*3")).accuracy == 1.0);  // any expression that works
        CHECK(score_checked(kCountdown, respond("", "3*3")).accuracy == 0.0);      // 3 used twice
        CHECK(score_checked(kCountdown, respond("", "H+C")).accuracy == 1.0);

        // Every document of the corpus and every cold-start response earns both.
        data::CorpusConfig cfg;
        Rng rng(3);
        for (int i = 0; i < 500; ++i) {
            Rng same = rng;  // the document's problem is the first thing it draws
            const std::string doc = data::corpus_document(cfg, rng, false);
            const Problem p = data::corpus_problem(cfg, same, false);
            for (const std::string& response :
                 {doc.substr(doc.find("<|assistant|>") + 13), data::format_cold_start_response(p)}) {
                Reward r = score_checked(p, response);
                CHECK(r.format == 1.0);
            }
            CHECK(score_checked(p, data::format_cold_start_response(p)).accuracy == 1.0);
            CHECK(score_checked(p, data::format_cold_start_response(p)).language == 1.0);
        }
    }

    TEST_CASE("rewards: wrong answers, prefixes and extensions of the right one included") {
        for (const char* wrong : {"4", "6", "460", "45", "47", "046x", "46 46", "4 6", "46=46", "EGA", "4G", "-46",
                                  "46.0", "\n46", "46abc", "<|eos|>46"}) {
            Reward r = score_checked(kAdd, respond("a", wrong));
            CHECK_MESSAGE(r.accuracy == 0.0, wrong);
            CHECK(r.has_answer);
            CHECK(r.answer == wrong);
        }
        Problem big{TaskKind::Add, 1, {400, 60}, 460, "400+60=", "", "460"};
        CHECK(score_checked(big, respond("a", "46")).accuracy == 0.0);
        CHECK(score_checked(big, respond("a", "4600")).accuracy == 0.0);
        CHECK(score_checked(big, respond("a", "460")).accuracy == 1.0);
        for (const char* wrong : {"7+2+0", "7", "9", "7+", "7+2)", "3*3", "7+2=9", "7+2, 2+7"})
            CHECK_MESSAGE(score_checked(kCountdown, respond("", wrong)).accuracy == 0.0, wrong);
    }

    TEST_CASE("rewards: repeated, nested or misplaced tags earn no format reward") {
        struct Case {
            std::string response;
            double accuracy;  // one answer block alone is enough for accuracy
        };
        const std::vector<Case> cases = {
            {"<think>a</think><think>b</think><answer>46</answer>", 1},
            {"<think>a</think><answer>46</answer><answer>46</answer>", 0},
            {"<think>a</think><answer>46</answer><think>b</think>", 1},
            {"<think><think>a</think></think><answer>46</answer>", 1},
            {"<think>a<answer>46</answer></think><answer>46</answer>", 0},
            {"<think>a</think><answer><answer>46</answer></answer>", 0},
            {"<think>a<answer>46</answer></think>", 1},
            {"<answer>46</answer><think>a</think>", 1},
            {"<answer>46</answer>", 1},
            {"<think>a<answer>46</answer>", 1},
            {"a</think><answer>46</answer>", 1},
            {"x<think>a</think><answer>46</answer>", 1},
            {" <think>a</think><answer>46</answer>", 1},
            {"<think>a</think>so<answer>46</answer>", 1},
            {"<think>a</think></answer>46<answer>", 0},
            {"</think>a<think><answer>46</answer>", 1},
            {"<think>a<|user|>b</think><answer>46</answer>", 1},
            {"<think>a<|bos|></think><answer>46</answer>", 1},
            {"<think>a</think><answer>46<|eos|></answer>", 0},
            {"<think>a</think><answer>46</answer", 0},
            {"<think>a</think><answer>46", 0},
            {"", 0},
        };
        for (const Case& c : cases) {
            Reward r = score_checked(kAdd, c.response);
            CHECK_MESSAGE(r.format == 0.0, c.response);
            CHECK_MESSAGE(r.accuracy == c.accuracy, c.response);
        }
        // Two think blocks: no thinking to judge, so no language reward either.
        Reward twice = score_checked(kAdd, "<think>a</think><think>b</think><answer>46</answer>");
        CHECK(twice.thinking.empty());
        CHECK(twice.language == 0.0);
        CHECK_FALSE(score_checked(kAdd, "<answer>4</answer><answer>46</answer>").has_answer);
    }

    TEST_CASE("rewards: empty and blank answers earn nothing") {
        for (const Problem& p : {kAdd, kCountdown})
            for (const char* blank : {"", " ", "   ", "\n", " \n "}) {
                Reward r = score_checked(p, respond("a", blank));
                CHECK(r.accuracy == 0.0);
                CHECK(r.format == 0.0);
            }
        Rng rng(4);
        for (TaskKind kind : {TaskKind::Add, TaskKind::Mul, TaskKind::Countdown})
            for (int i = 0; i < 100; ++i) {
                const Problem p = data::make_problem(kind, 1, rng);
                CHECK(score_checked(p, respond(p.reasoning, "")).total == doctest::Approx(0.2));
            }
    }

    TEST_CASE("rewards: after </answer> only <|eos|> may follow") {
        CHECK(score_checked(kAdd, "<think>a</think><answer>46</answer><|eos|>").format == 1.0);
        CHECK(score_checked(kAdd, "<think>a</think><answer>46</answer>").format == 1.0);
        for (const char* tail : {"<|eos|><|eos|>", " ", "\n", "x", "<|pad|>", "<|eos|>x", "<|eos|> ", "<|eos",
                                 "<|user|>12+34=", "<think>"}) {
            Reward r = score_checked(kAdd, "<think>a</think><answer>46</answer>" + std::string(tail));
            CHECK_MESSAGE(r.format == 0.0, tail);
            CHECK_MESSAGE(r.accuracy == 1.0, tail);
        }
    }

    TEST_CASE("rewards: language consistency for both target languages") {
        const Problem en = kAdd, alt = data::in_language(kAdd, Language::Alt);
        const std::string en_thinking = "2+4+0=6 -> 6\n1+3+0=4 -> 46";
        const std::string alt_thinking = data::to_language(en_thinking, Language::Alt);
        const std::string mixed = "12+34=46\nBC+DE=EG";  // 6 En, 6 Alt characters
        const RewardConfig language_only{0.0, 0.0, 1.0};
        CHECK(score(en, respond(en_thinking, "46"), language_only).total == 1.0);
        CHECK(score(en, respond(alt_thinking, "46"), language_only).total == 0.0);
        CHECK(score(alt, respond(alt_thinking, "EG"), language_only).total == 1.0);
        CHECK(score(alt, respond(en_thinking, "EG"), language_only).total == 0.0);
        CHECK(score(en, respond(mixed, "46"), language_only).language == doctest::Approx(0.5));
        CHECK(score(alt, respond(mixed, "46"), language_only).language == doctest::Approx(0.5));
        CHECK(score(en, respond("no " + alt_thinking, "46"), language_only).language == doctest::Approx(1.0 / 11));
        // Accuracy does not care which language the answer is in; consistency has its own reward.
        CHECK(score_checked(alt, respond(alt_thinking, "46")).accuracy == 1.0);
        // Without a well-formed think block there is no thinking to be consistent.
        CHECK(score_checked(en, "<answer>46</answer>").language == 0.0);
        CHECK(score_checked(en, "<think>12</think><think>34</think><answer>46</answer>").language == 0.0);
    }

    TEST_CASE("rewards: the language reward pays only an attempt, and only for words") {
        const RewardConfig r1{1.0, 0.1, 0.2};  // the R1 stage's weights
        for (const char* no_attempt : {"<think></think>", "<think>12+34=46</think>", "<think>12+34=46",
                                       "<think>12+34=46</think><|eos|>"}) {
            const Reward r = score(kAdd, no_attempt, r1);
            CHECK_MESSAGE(r.language == 0.0, no_attempt);
            CHECK_MESSAGE(r.total == 0.0, no_attempt);
        }
        // an empty think block before a wrong answer: the format, and no language
        CHECK(score(kAdd, respond("", "45"), r1).total == doctest::Approx(0.1));
        // so a well-formed wrong attempt with slightly mixed reasoning earns more than thinking without answering
        const Reward wrong = score(kAdd, respond("12+34=46, NOP", "45"), r1);
        CHECK(wrong.language == doctest::Approx(0.75));
        CHECK(wrong.total == doctest::Approx(0.1 + 0.2 * 0.75));
    }

    TEST_CASE("rewards: is_mixed") {
        CHECK_FALSE(is_mixed(""));
        CHECK_FALSE(is_mixed("+ = ->\n<think>"));
        CHECK_FALSE(is_mixed("2+4+0=6 -> 6"));
        CHECK_FALSE(is_mixed("C+E+A=G -> G, NOP"));
        CHECK(is_mixed("2+4+0=6 -> 6\nB+D+A=E -> EG"));
        CHECK_FALSE(is_mixed("123456789A"));  // the minority holds exactly 10%: not above
        CHECK(is_mixed("12345678AB"));        // 20%
        CHECK_FALSE(is_mixed("1234567890123456789A"));
        CHECK(is_mixed("CE+12, YUP"));
        // Code-switched corpus reasoning is mixed; single-language reasoning is not.
        data::CorpusConfig switching;
        switching.other_language_reasoning = 0;
        switching.code_switch = 1;
        Rng rng(6);
        int mixed = 0, total = 0;
        for (int i = 0; i < 500; ++i) {
            const Problem p = data::corpus_problem(switching, rng, false);
            CHECK_FALSE(is_mixed(p.reasoning));
            const std::string reasoning = data::corpus_reasoning(p, switching, rng);
            if (data::split_lines(reasoning).size() < 3) continue;
            ++total;
            mixed += is_mixed(reasoning);
        }
        CHECK(mixed > total * 3 / 4);
    }

    TEST_CASE("rewards: random bytes never crash and score within bounds") {
        Rng rng(7);
        const std::vector<std::string> pieces = {
            "<think>", "</think>", "<answer>", "</answer>", "<|eos|>", "46", "EG",
            " ",       "\n",       "<",        ">",         "/",       "<|", std::string(1, '\0')};
        int formatted = 0, accurate = 0;
        for (int i = 0; i < 10000; ++i) {
            std::string response;
            const long length = i % 10 == 0 ? 0 : rng.range(0, 200);
            if (i % 2 == 0) {
                response = random_bytes(rng, size_t(length));
            } else {  // bytes and tags, so that some responses come near the format
                for (long n = 0; n < length / 8; ++n)
                    response += rng.range(0, 3) == 0 ? random_bytes(rng, size_t(rng.range(0, 4)))
                                                     : pieces[size_t(rng.range(0, long(pieces.size()) - 1))];
            }
            for (const Problem& p : {kAdd, kCountdown}) {
                Reward r = score_checked(p, response);
                formatted += r.format > 0;
                accurate += r.accuracy > 0;
                if (r.accuracy == 0) continue;
                // paid only for the one answer block, and only where the oracle finds that answer right
                CHECK_MESSAGE(occurrences(response, "<answer>") == 1, response);
                CHECK_MESSAGE(occurrences(response, "</answer>") == 1, response);
                const size_t open = response.find("<answer>") + 8, close = response.find("</answer>");
                CHECK_MESSAGE(oracle::verify(p, response.substr(open, close - open)), response);
            }
        }
        CHECK(formatted < 100);
        CHECK(accurate > 0);  // the pieces "46" and "EG" land between answer tags now and then
    }

    TEST_CASE("rewards: a well-formed response with a few random edits keeps the format only if still well formed") {
        Rng rng(9);
        const std::string valid = respond("2+4+0=6 -> 6\n1+3+0=4 -> 46", "46");
        int formatted = 0;
        for (int i = 0; i < 10000; ++i) {
            std::string response = valid;
            for (long edits = rng.range(1, 3); edits > 0; --edits) {
                const size_t at = size_t(rng.range(0, long(response.size())));
                const long kind = rng.range(0, 2);
                if (kind == 0) response.insert(at, 1, char(rng.range(0, 255)));
                if (kind == 1 && at < response.size()) response.erase(at, 1);
                if (kind == 2) response.insert(at, valid.substr(size_t(rng.range(0, 40)), size_t(rng.range(1, 12))));
            }
            Reward r = score_checked(kAdd, response);
            formatted += r.format > 0;
            if (r.format == 0) continue;
            // An independent reading of the format: the tags once each, in order, first at the start.
            for (const char* tag : {"<think>", "</think>", "<answer>", "</answer>"})
                CHECK_MESSAGE(occurrences(response, tag) == 1, response);
            CHECK(response.rfind("<think>", 0) == 0);
            CHECK(response.find("</think>") < response.find("<answer>"));
            CHECK(r.answer.find_first_not_of(" \n") != std::string::npos);
        }
        CHECK(formatted > 1000);  // most edits land in the thinking or the answer and keep the format
    }

    TEST_CASE("rewards: huge inputs, tag-only responses and tags split across repeats") {
        Rng rng(8);
        const std::string five_mb = random_bytes(rng, 5u << 20);
        Reward huge = score_checked(kAdd, five_mb);
        CHECK(huge.total == 0.0);
        CHECK(score_checked(kAdd, respond(std::string(5u << 20, 'a'), "46")).total == 0.0);  // over the cap
        std::string many_tags;
        for (int i = 0; i < 20000; ++i) many_tags += "<think></think><answer>46</answer>";
        CHECK(score_checked(kAdd, many_tags).total == 0.0);

        // Just under the cap, a well-formed response is read in full.
        Reward long_thought = score_checked(kAdd, respond(std::string(kMaxResponseBytes - 64, '1'), "46"));
        CHECK(long_thought.format == 1.0);
        CHECK(long_thought.accuracy == 1.0);
        CHECK(long_thought.language == 1.0);

        // Only tags: there is never a non-blank answer, so nothing is earned but (sometimes) language.
        const std::vector<std::string> tags = {"<think>", "</think>", "<answer>", "</answer>", "<|eos|>"};
        for (int i = 0; i < 2000; ++i) {
            std::string response;
            for (long n = rng.range(0, 12); n > 0; --n) response += tags[size_t(rng.range(0, 4))];
            Reward r = score_checked(kAdd, response);
            CHECK(r.format == 0.0);
            CHECK(r.accuracy == 0.0);
        }
        CHECK(score_checked(kAdd, "<think></think><answer></answer><|eos|>").total == 0.0);  // nothing earns nothing

        // Pieces of tags repeated many times are text, not tags.
        auto repeated = [](const std::string& piece, int times) {
            std::string out;
            for (int i = 0; i < times; ++i) out += piece;
            return out;
        };
        const std::string split_think = repeated("<thi", 50000) + repeated("nk>", 50000);
        Reward split = score_checked(kAdd, split_think + "</think><answer>46</answer>");
        CHECK(split.format == 0.0);  // exactly one "<think>" is there, but not at the start
        CHECK(split.accuracy == 1.0);
        Reward prefixes = score_checked(kAdd, "<think>a</think>" + repeated("<answer", 50000) + ">46</answer>");
        CHECK(prefixes.format == 0.0);  // the text between </think> and the one <answer> is not blank
        CHECK(prefixes.accuracy == 1.0);
        CHECK(score_checked(kAdd, repeated("<think>a</think><answer>4", 20000) + "6</answer>").format == 0.0);
        CHECK(score_checked(kAdd, repeated("</", 100000) + repeated("<|", 100000)).total == 0.0);
    }
}

TEST_SUITE("rewards") {
    // DAPO §3.4 with L_max = 100 and L_cache = 20, worked out by hand; and in the total only where it is weighed.
    TEST_CASE("overlong penalty: 0 up to L_max - L_cache tokens, then down to -1 at L_max, -1 beyond") {
        CHECK(overlong_penalty(0, 100, 20) == 0.0);
        CHECK(overlong_penalty(80, 100, 20) == 0.0);
        CHECK(overlong_penalty(81, 100, 20) == doctest::Approx(-0.05));
        CHECK(overlong_penalty(90, 100, 20) == doctest::Approx(-0.5));
        CHECK(overlong_penalty(99, 100, 20) == doctest::Approx(-0.95));
        CHECK(overlong_penalty(100, 100, 20) == -1.0);
        CHECK(overlong_penalty(250, 100, 20) == -1.0);
        CHECK(overlong_penalty(100, 100, 100) == -1.0);  // the whole length penalized
        CHECK(overlong_penalty(50, 100, 100) == doctest::Approx(-0.5));

        const std::string response = respond("2+4+0=6 -> 6\n1+3+0=4 -> 46", "46");
        RewardConfig cfg;
        CHECK(score(kAdd, response, cfg, 95).total == doctest::Approx(1.1));  // not weighed: no penalty
        cfg.w_overlong = 0.5, cfg.max_tokens = 100, cfg.overlong_cache = 20;
        const Reward r = score(kAdd, response, cfg, 95);
        CHECK(r.overlong == doctest::Approx(-0.75));
        CHECK(r.total == doctest::Approx(1.1 - 0.5 * 0.75));
        CHECK(score(kAdd, response, cfg, 60).total == doctest::Approx(1.1));
    }
}
