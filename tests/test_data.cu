// tests/test_data.cu: the tokenizer and its tokenizer.json, the two languages, the tasks and their verifiers, the
// held-out split, the pretraining stream, the R1-Zero prompt and the cold-start SFT data.
#include <doctest/doctest.h>

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstring>
#include <iterator>
#include <set>
#include <string>
#include <vector>

#include "../data/corpus.h"
#include "answer_oracle.h"

using namespace data;

namespace {

// A strict check of JSON syntax (objects, arrays, strings with their escapes, literals; numbers loosely), enough
// to know that a generated tokenizer.json parses.
struct JsonChecker {
    const std::string& text;
    size_t pos = 0;

    bool document() { return value() && pos == text.size(); }

    void skip_whitespace() {
        while (pos < text.size() && std::strchr(" \n\r\t", text[pos]) && text[pos] != '\0') ++pos;
    }
    bool literal(const char* word) {
        size_t n = std::strlen(word);
        if (text.compare(pos, n, word) != 0) return false;
        pos += n;
        return true;
    }
    bool string() {
        if (pos >= text.size() || text[pos] != '"') return false;
        for (++pos; pos < text.size(); ++pos) {
            unsigned char c = text[pos];
            if (c == '"') return ++pos, true;
            if (c < 0x20) return false;
            if (c != '\\') continue;
            if (++pos >= text.size()) return false;
            if (text[pos] == 'u') {
                for (int i = 0; i < 4; ++i)
                    if (++pos >= text.size() || !std::isxdigit((unsigned char)text[pos])) return false;
            } else if (text[pos] == '\0' || !std::strchr("\"\\/bfnrt", text[pos])) {
                return false;
            }
        }
        return false;
    }
    bool number() {
        size_t start = pos;
        while (pos < text.size() && (std::isdigit((unsigned char)text[pos]) || std::strchr("-+.eE", text[pos]))) ++pos;
        return pos > start;
    }
    bool members(char close, bool keyed) {
        ++pos;
        skip_whitespace();
        if (pos < text.size() && text[pos] == close) return ++pos, true;
        for (;;) {
            if (keyed) {
                skip_whitespace();
                if (!string()) return false;
                skip_whitespace();
                if (pos >= text.size() || text[pos++] != ':') return false;
            }
            if (!value() || pos >= text.size()) return false;
            char c = text[pos++];
            if (c == close) return true;
            if (c != ',') return false;
        }
    }
    bool value() {
        skip_whitespace();
        if (pos >= text.size()) return false;
        char c = text[pos];
        bool ok = c == '{'   ? members('}', true)
                  : c == '[' ? members(']', false)
                  : c == '"' ? string()
                             : literal("true") || literal("false") || literal("null") || number();
        skip_whitespace();
        return ok;
    }
};

int char_id(char c) {
    Tokenizer tok;
    std::vector<int> ids = tok.encode(std::string(1, c));
    REQUIRE(ids.size() == 1);
    return ids[0];
}

std::string random_text(Rng& rng, size_t length) {
    std::string text;
    for (size_t i = 0; i < length; ++i) text += rng.range(0, 20) == 0 ? '\n' : char(rng.range(32, 126));
    return text;
}

size_t count_occurrences(const std::string& text, const std::string& piece) {
    size_t count = 0;
    for (size_t at = text.find(piece); at != std::string::npos; at = text.find(piece, at + 1)) ++count;
    return count;
}

bool ends_with(const std::string& text, const std::string& suffix) {
    return text.size() >= suffix.size() && text.compare(text.size() - suffix.size(), suffix.size(), suffix) == 0;
}

std::string between(const std::string& text, const std::string& open, const std::string& close) {
    size_t begin = text.find(open);
    REQUIRE(begin != std::string::npos);
    begin += open.size();
    size_t end = text.find(close, begin);
    REQUIRE(end != std::string::npos);
    return text.substr(begin, end - begin);
}

// The decimal digits of 2^64 + n: a number that wraps around to n in 64-bit arithmetic.
std::string two_to_the_64_plus(long n) {
    std::string digits = "18446744073709551616";
    int carry = 0;
    for (size_t i = digits.size(); i-- > 0;) {
        int sum = digits[i] - '0' + int(n % 10) + carry;
        digits[i] = char('0' + sum % 10);
        carry = sum / 10;
        n /= 10;
    }
    return digits;
}

// The language a whole text is written in; the text must use one only (or none: then En).
Language only_language(const std::string& text) {
    const LanguageCounts counts = count_language_chars(text);
    REQUIRE_MESSAGE((counts.en == 0 || counts.alt == 0), text);
    return counts.alt > 0 ? Language::Alt : Language::En;
}

// En text has no uppercase letter; Alt text no digit and no lowercase letter outside the special tokens.
bool has_uppercase(const std::string& text) {
    return std::any_of(text.begin(), text.end(), [](char c) { return std::isupper((unsigned char)c); });
}

bool is_pure_alt(const std::string& text) { return count_language_chars(text).en == 0; }

// Rebuilds the problem from a document's question alone (in either language) and checks the document's answer
// with it: the answer in the stream must be right, not only well placed, and in the question's language.
void check_document(const std::string& doc) {
    REQUIRE(doc.rfind("<|bos|><|user|>", 0) == 0);
    REQUIRE(ends_with(doc, "</answer><|eos|>"));
    const std::string written = between(doc, "<|user|>", "<|assistant|>");
    REQUIRE(doc.find("<|assistant|><think>") != std::string::npos);
    const std::string answer = between(doc, "</think><answer>", "</answer>");
    CHECK_MESSAGE(only_language(answer) == only_language(written), doc);
    const std::string question = to_language(written, Language::En);
    Problem p{};
    if (question.rfind("make ", 0) == 0) {
        p.kind = TaskKind::Countdown;
        size_t from = question.find(" from ");
        REQUIRE(from != std::string::npos);
        p.target = std::stol(question.substr(5, from - 5));
        for (size_t at = from + 6; at < question.size();) {
            size_t end = question.find(' ', at);
            if (end == std::string::npos) end = question.size();
            p.numbers.push_back(std::stol(question.substr(at, end - at)));
            at = end + 1;
        }
    } else {
        REQUIRE(ends_with(question, "="));
        size_t op = question.find_first_of("+*");
        REQUIRE(op != std::string::npos);
        long a = std::stol(question.substr(0, op)), b = std::stol(question.substr(op + 1));
        p.kind = question[op] == '+' ? TaskKind::Add : TaskKind::Mul;
        p.target = question[op] == '+' ? a + b : a * b;
    }
    CHECK_MESSAGE(verify(p, answer), doc);
}

// The complete documents of a decoded row (the last one is usually cut by the row's end).
std::vector<std::string> complete_documents(const std::string& row_text) {
    std::vector<std::string> docs;
    for (size_t start = row_text.find("<|bos|>"); start != std::string::npos;) {
        size_t end = row_text.find("<|eos|>", start);
        if (end == std::string::npos) break;
        end += std::strlen("<|eos|>");
        docs.push_back(row_text.substr(start, end - start));
        start = row_text.find("<|bos|>", end);
    }
    return docs;
}

const TaskKind kAllKinds[] = {TaskKind::Add, TaskKind::Mul, TaskKind::Countdown};

}  // namespace

TEST_SUITE("data") {
    TEST_CASE("tokenizer: id layout") {
        Tokenizer tok;
        const char* named[] = {"<|pad|>", "<|bos|>",  "<|eos|>",  "<|user|>",  "<|assistant|>",
                               "<think>", "</think>", "<answer>", "</answer>", "<|system|>"};
        for (int id = 0; id < 10; ++id) CHECK(tok.token_string(id) == named[id]);
        CHECK(tok.token_string(THINK) == "<think>");
        CHECK(tok.token_string(SYSTEM) == "<|system|>");
        CHECK(tok.token_string(16) == "\n");
        CHECK(tok.token_string(17) == " ");
        CHECK(tok.token_string(111) == "~");
        CHECK(char_id('0') == 33);
        CHECK(tok.token_string(10) == "<|reserved_10|>");
        CHECK(tok.token_string(127) == "<|reserved_127|>");
        std::set<std::string> distinct;
        int reserved = 0;
        for (int id = 0; id < Tokenizer::vocab_size; ++id) {
            distinct.insert(tok.token_string(id));
            reserved += Tokenizer::is_reserved(id);
            CHECK(Tokenizer::is_reserved(id) == (tok.token_string(id).rfind("<|reserved_", 0) == 0));
        }
        CHECK(distinct.size() == 128);
        CHECK(reserved == 6 + 16);
    }

    TEST_CASE("tokenizer: round trips") {
        Tokenizer tok;
        Rng rng(11);
        for (int i = 0; i < 300; ++i) {
            std::string text = random_text(rng, size_t(rng.range(0, 80)));
            std::vector<int> ids = tok.encode(text);
            CHECK(tok.decode(ids) == text);
            CHECK(tok.decode(ids.data(), ids.size()) == text);
            CHECK(ids.size() == text.size());
            for (int id : ids) CHECK((id >= 16 && !Tokenizer::is_reserved(id)));
        }
        CHECK(tok.encode("<think>12</think>") == std::vector<int>{THINK, char_id('1'), char_id('2'), THINK_END});
        const std::string doc =
            "<|bos|><|user|>12+34=<|assistant|><think>2+4+0=6 -> 6\n1+3+0=4 -> 46</think>"
            "<answer>46</answer><|eos|>";
        std::vector<int> ids = tok.encode(doc);
        CHECK(tok.decode(ids) == doc);
        CHECK(ids.front() == BOS);
        CHECK(ids.back() == EOS);
        CHECK(std::count(ids.begin(), ids.end(), ANSWER) == 1);
        // Pieces of specials and reserved names stay characters.
        CHECK(tok.encode("<thin").size() == 5);
        CHECK(tok.encode("<|reserved_10|>").size() == std::strlen("<|reserved_10|>"));
        CHECK(tok.encode("</think").size() == 7);
        CHECK(tok.decode(std::vector<int>{10}) == "<|reserved_10|>");
    }

    TEST_CASE("tokenizer: bad input throws with a useful message") {
        Tokenizer tok;
        auto message_of_encode = [&](const std::string& text) {
            try {
                tok.encode(text);
            } catch (const std::invalid_argument& e) {
                return std::string(e.what());
            }
            return std::string("no exception");
        };
        std::string tab = message_of_encode("ab\tc");
        CHECK(tab.find("0x09") != std::string::npos);
        CHECK(tab.find("offset 2") != std::string::npos);
        std::string accent = message_of_encode("x\xc3\xa9");
        CHECK(accent.find("0xc3") != std::string::npos);
        CHECK(accent.find("offset 1") != std::string::npos);
        CHECK(message_of_encode(std::string("a\0b", 3)).find("0x00") != std::string::npos);
        CHECK_THROWS_AS(tok.encode("\r\n"), std::invalid_argument);
        CHECK_THROWS_AS(tok.encode("\x7f"), std::invalid_argument);
        CHECK_THROWS_AS(tok.decode(std::vector<int>{5, 128}), std::invalid_argument);
        CHECK_THROWS_AS(tok.decode(std::vector<int>{-1}), std::invalid_argument);
        CHECK_THROWS_WITH_AS(tok.decode(std::vector<int>{300}), doctest::Contains("300"), std::invalid_argument);
        CHECK_THROWS_AS(tok.token_string(128), std::invalid_argument);
    }

    TEST_CASE("tokenizer: tokenizer.json") {
        Tokenizer tok;
        const std::string json = tok.to_json();
        CHECK(JsonChecker{json}.document());
        CHECK(json.find("\"version\": \"1.0\"") != std::string::npos);
        CHECK(json.find("\"type\": \"BPE\"") != std::string::npos);
        CHECK(json.find("\"merges\": []") != std::string::npos);
        CHECK(json.find("\"pre_tokenizer\": null") != std::string::npos);
        CHECK(json.find("\"normalizer\": null") != std::string::npos);
        // The characters JSON escapes: newline, quote, backslash.
        CHECK(json.find("\"\\n\": 16,") != std::string::npos);
        CHECK(json.find("\" \": 17,") != std::string::npos);
        CHECK(json.find("\"\\\"\": 19,") != std::string::npos);
        CHECK(json.find("\"\\\\\": 77,") != std::string::npos);
        CHECK(json.find("\"~\": 111,") != std::string::npos);
        CHECK(json.find("\"<|reserved_127|>\": 127\n") != std::string::npos);
        CHECK(json.find("{\"id\": 5, \"content\": \"<think>\"") != std::string::npos);
        CHECK(json.find("{\"id\": 112, \"content\": \"<|reserved_112|>\"") != std::string::npos);
        CHECK(count_occurrences(json, "\"special\": true") == 32);
        CHECK(count_occurrences(json, "{\"id\": ") == 32);
        for (int id = 0; id < Tokenizer::vocab_size; ++id)
            CHECK(json.find(json_quote(tok.token_string(id)) + ": " + std::to_string(id)) != std::string::npos);
        CHECK(json_quote("a\"b\\c\nd\x01") == "\"a\\\"b\\\\c\\nd\\u0001\"");
    }

    TEST_CASE("tasks: names and difficulties") {
        for (TaskKind kind : kAllKinds) {
            CHECK(task_from_name(task_name(kind)) == kind);
            Rng rng(1);
            CHECK_THROWS_AS(make_problem(kind, 0, rng), std::invalid_argument);
            CHECK_THROWS_AS(make_problem(kind, max_difficulty(kind) + 1, rng), std::invalid_argument);
        }
        CHECK(std::string(task_name(TaskKind::Countdown)) == "countdown");
        CHECK_THROWS_AS(task_from_name("division"), std::invalid_argument);
    }

    TEST_CASE("tasks: every problem has the promised shape and its own answer verifies") {
        for (TaskKind kind : kAllKinds) {
            for (int d = 1; d <= max_difficulty(kind); ++d) {
                Rng rng(2, uint64_t(d));
                for (int i = 0; i < 100; ++i) {
                    Problem p = make_problem(kind, d, rng);
                    CAPTURE(p.question);
                    CHECK(p.kind == kind);
                    CHECK(p.difficulty == d);
                    CHECK(verify(p, p.answer));
                    CHECK(verify(p, "  " + p.answer + " "));
                    std::vector<std::string> lines = split_lines(p.reasoning);
                    if (kind == TaskKind::Countdown) {
                        CHECK(p.numbers.size() == size_t(d + 2));
                        for (long n : p.numbers) CHECK((n >= 1 && n <= kCountdownMaxNumber));
                        CHECK(p.target > 0);
                        CHECK(std::count(p.numbers.begin(), p.numbers.end(), p.target) == 0);
                        CHECK(ends_with(lines.back(), "=" + std::to_string(p.target) + ", yes"));
                        for (size_t l = 0; l + 1 < lines.size(); ++l) CHECK(ends_with(lines[l], ", no"));
                        CHECK(lines.size() <= size_t(kCountdownMaxWrongTries + 1));
                    } else {
                        const int second_digits = kind == TaskKind::Add ? d + 1 : (d + 2) / 2;
                        CHECK(std::to_string(p.numbers[0]).size() == size_t(d + 1));
                        CHECK(std::to_string(p.numbers[1]).size() == size_t(second_digits));
                        const long a = p.numbers[0], b = p.numbers[1];
                        const long expected = kind == TaskKind::Add ? a + b : a * b;
                        CHECK(p.target == expected);
                        CHECK(p.answer == std::to_string(expected));
                        CHECK(ends_with(lines.back(), (kind == TaskKind::Add ? " -> " : "=") + p.answer));
                    }
                }
            }
        }
    }

    TEST_CASE("tasks: the reasoning shows each step") {
        Problem add{TaskKind::Add, 2, {478, 356}, 834, "478+356=", addition_steps(478, 356), "834"};
        CHECK(add.reasoning == "8+6+0=14 -> 4\n7+5+1=13 -> 34\n4+3+1=8 -> 834");
        CHECK(addition_steps(95, 17) == "5+7+0=12 -> 2\n9+1+1=11 -> 12\n0+0+1=1 -> 112");
        CHECK(multiplication_steps(4721, 36) == "4721*6=28326\n4721*30=141630\n28326+141630=169956");
        CHECK(multiplication_steps(12, 7) == "12*7=84");
        Term sum = combine({3, "3", 3}, '+', {5, "5", 3});
        Term product = combine(sum, '*', {2, "2", 3});
        CHECK(combine(product, '-', {7, "7", 3}).text == "(3+5)*2-7");
        CHECK(combine({9, "9", 3}, '-', combine({5, "5", 3}, '-', {2, "2", 3})).text == "9-(5-2)");
        CHECK(combine({8, "8", 3}, '/', combine({4, "4", 3}, '/', {2, "2", 3})).text == "8/(4/2)");
    }

    TEST_CASE("tasks: wrong answers are rejected and never throw") {
        Rng bytes(5);
        for (TaskKind kind : kAllKinds) {
            for (int d = 1; d <= max_difficulty(kind); ++d) {
                Rng rng(3, uint64_t(d));
                for (int i = 0; i < 20; ++i) {
                    Problem p = make_problem(kind, d, rng);
                    std::vector<std::string> wrong = {"",
                                                      "   ",
                                                      "12abc",
                                                      "--3",
                                                      "+-3",
                                                      "1 2",
                                                      "0x10",
                                                      "nan",
                                                      "99999999999999999999999",
                                                      std::string(10000, '('),
                                                      std::string(10000, '9'),
                                                      p.answer + p.answer + "=",
                                                      "<answer>" + p.answer};
                    if (kind == TaskKind::Countdown) {
                        wrong.insert(wrong.end(),
                                     {p.answer + "+", "(" + p.answer, p.answer + ")", "()", p.answer + "+1000",
                                      "(" + p.answer + ")*" + p.answer, std::to_string(p.target)});
                    } else {
                        wrong.insert(wrong.end(), {std::to_string(p.target + 1), std::to_string(p.target - 1),
                                                   "-" + p.answer, p.answer + "0", p.answer + ".", p.answer + "+0",
                                                   "1" + p.answer, two_to_the_64_plus(p.target)});
                    }
                    for (int r = 0; r < 5; ++r) {
                        std::string noise(size_t(rng.range(1, 30)), ' ');
                        for (char& c : noise) c = char(bytes.range(0, 255));
                        noise[size_t(bytes.range(0, long(noise.size()) - 1))] = char(0x80 + bytes.range(0, 127));
                        wrong.push_back(noise);
                    }
                    // Every wrong answer stays wrong in Alt, and a right one written half in each language is wrong.
                    for (size_t w = 0, n = wrong.size(); w < n; ++w)
                        wrong.push_back(to_language(wrong[w], Language::Alt));
                    std::string mixed = p.answer;
                    const size_t last_digit = mixed.find_last_of("0123456789");
                    mixed[last_digit] = to_language(mixed.substr(last_digit, 1), Language::Alt)[0];
                    wrong.push_back(mixed);
                    for (const std::string& answer : wrong) {
                        bool accepted = true;
                        CHECK_NOTHROW(accepted = verify(p, answer));
                        CHECK_MESSAGE(!accepted, p.question, " accepted ", answer.substr(0, 40));
                    }
                }
            }
        }
    }

    TEST_CASE("add and mul: the answer is the number as written, without sign or leading zeros") {
        const Problem add{TaskKind::Add, 1, {12, 34}, 46, "12+34=", "", "46"};
        CHECK(verify(add, "46"));
        CHECK(verify(add, " EG "));  // Alt
        for (const char* wrong : {"046", "0046", "+46", "+0046", "-46", "4 6", "46.0", "46\n", "AEG"})
            CHECK_MESSAGE(!verify(add, wrong), wrong);
        CHECK_FALSE(verify(add, std::string("46\0", 3)));
        const Problem zero{TaskKind::Mul, 1, {0, 34}, 0, "0*34=", "", "0"};
        CHECK(verify(zero, "0"));
        CHECK_FALSE(verify(zero, "00"));
        CHECK_FALSE(verify(zero, "-0"));
    }

    TEST_CASE("countdown: the verifier accepts any correct expression and nothing else") {
        Problem p{TaskKind::Countdown, 2, {3, 5, 2, 7}, 9, "make 9 from 3 5 2 7", "", "(3+5)*2-7"};
        for (const char* right : {"(3+5)*2-7", "7+2", "2+7", " 5 + 7 - 3 ", "3*(5-2)", "((7))+((2))", "7*2-5"})
            CHECK_MESSAGE(verify(p, right), right);
        for (const char* wrong : {"3*3",                     // 3 used twice
                                  "9",                       // not a given number
                                  "18/2", "7+2+0", "7/2*3",  // 7/2 is not exact, even though 3*3 = 9
                                  "5+7-3=9", "7+2)", "(7+2", "7++2", "7 2", "-7+16", "7+2 x", "(7+2)()", "3*5-2-7+3",
                                  "99999999999999999999+1", "07+2", "7+02", "7+2\n", "7+2\t"})
            CHECK_MESSAGE(!verify(p, wrong), wrong);
        // any byte the grammar does not allow makes the answer wrong, a NUL byte too: the text is read to its end
        CHECK_FALSE(verify(p, std::string("7+2\0*99999+25+25", 17)));
        CHECK_FALSE(verify(p, std::string("7+2\0", 4)));

        Problem zero{TaskKind::Countdown, 2, {4, 4, 9, 2}, 9, "make 9 from 4 4 9 2", "", "9"};
        CHECK_FALSE(verify(zero, "9/(4-4)"));
        CHECK_FALSE(verify(zero, "(4+4)/2+9-4"));  // uses 4 three times
        CHECK(verify(zero, "4/4*9"));

        auto nested = [](int depth) {
            return std::string(size_t(depth), '(') + "7" + std::string(size_t(depth), ')') + "+2";
        };
        CHECK(verify(p, nested(10)));
        CHECK(verify(p, "7" + std::string(200, ' ') + "+2"));
        CHECK_FALSE(verify(p, "7" + std::string(kMaxExpressionChars, ' ') + "+2"));  // too long to read
        CHECK_FALSE(verify(p, nested(kMaxExpressionDepth + 1)));

        // Random texts over the expression's bytes (and a few it does not allow): each verdict the oracle's, which
        // evaluates the rules another way (tests/answer_oracle.h).
        Rng rng(9);
        const std::string alphabet = std::string("0123456789+-*/() 7273\nA", 24) + std::string(1, '\0');
        int accepted = 0, disagreements = 0;
        for (int i = 0; i < 20000; ++i) {
            std::string text(size_t(rng.range(0, 16)), ' ');
            for (char& c : text) c = alphabet[size_t(rng.range(0, long(alphabet.size()) - 1))];
            bool ok = false;
            CHECK_NOTHROW(ok = verify(p, text));
            accepted += ok;
            if (ok != oracle::verify(p, text) && disagreements++ < 5)
                FAIL_CHECK("verify and the oracle differ on '", text, "'");
        }
        CHECK(disagreements == 0);
        CHECK(accepted > 0);  // some random texts do reach 9 from 3 5 2 7
    }

    TEST_CASE("held-out split: evaluation problems never appear in training") {
        std::set<std::string> eval_keys;
        for (TaskKind kind : kAllKinds)
            for (int d = 1; d <= 2; ++d)
                for (const Problem& p : eval_set(kind, d, 64, 42)) {
                    CHECK(is_heldout(p));
                    eval_keys.insert(problem_key(p));
                }
        CorpusConfig cfg;
        cfg.max_difficulty[0] = cfg.max_difficulty[1] = cfg.max_difficulty[2] = 2;
        Rng rng(77);
        int collisions = 0;
        for (int i = 0; i < 10000; ++i) {
            Problem p = corpus_problem(cfg, rng, false);
            collisions += eval_keys.count(problem_key(p)) > 0 || is_heldout(p);
        }
        CHECK(collisions == 0);
        for (int i = 0; i < 1000; ++i) CHECK(is_heldout(corpus_problem(cfg, rng, true)));

        int heldout = 0;
        for (int i = 0; i < 8000; ++i) heldout += is_heldout(make_problem(TaskKind::Add, 3, rng));
        CHECK((heldout > 800 && heldout < 1200));  // about 1 in 8
        Problem swapped{TaskKind::Add, 1, {34, 12}, 46, "34+12=", "", "46"};
        Problem original{TaskKind::Add, 1, {12, 34}, 46, "12+34=", "", "46"};
        CHECK(problem_key(swapped) == problem_key(original));
    }

    TEST_CASE("held-out split: evaluation sets are deterministic and distinct") {
        auto keys = [](const std::vector<Problem>& problems) {
            std::vector<std::string> out;
            for (const Problem& p : problems) out.push_back(problem_key(p));
            return out;
        };
        std::vector<std::string> first = keys(eval_set(TaskKind::Countdown, 2, 100, 7));
        CHECK(first == keys(eval_set(TaskKind::Countdown, 2, 100, 7)));
        CHECK(first != keys(eval_set(TaskKind::Countdown, 2, 100, 8)));
        CHECK(first != keys(eval_set(TaskKind::Countdown, 3, 100, 7)));
        CHECK(std::set<std::string>(first.begin(), first.end()).size() == 100);
        std::vector<std::string> add = keys(eval_set(TaskKind::Add, 1, 200, 7));
        CHECK(std::set<std::string>(add.begin(), add.end()).size() == 200);
        // mul at difficulty 1 has about a hundred held-out problems: the set still fills, with repeats.
        std::vector<Problem> small = eval_set(TaskKind::Mul, 1, 150, 7);
        CHECK(small.size() == 150);
        for (const Problem& p : small) CHECK(is_heldout(p));
        // The same problems, written in Alt.
        std::vector<Problem> alt = eval_set(TaskKind::Countdown, 2, 100, 7, Language::Alt);
        CHECK(keys(alt) == first);
        for (const Problem& p : alt) CHECK((p.language == Language::Alt && is_pure_alt(p.question)));
    }

    TEST_CASE("pretrain_batch: deterministic, valid, and made of whole formatted documents") {
        Tokenizer tok;
        CorpusConfig cfg;
        cfg.direct_fraction = 0.0;  // every document reasons; the direct ones are checked below
        const int B = 4, T = 300;
        std::vector<int32_t> batch, again, next;
        pretrain_batch(tok, cfg, 5, B, T, batch);
        pretrain_batch(tok, cfg, 5, B, T, again);
        pretrain_batch(tok, cfg, 6, B, T, next);
        REQUIRE(batch.size() == size_t(B) * (T + 1));
        CHECK(batch == again);
        CHECK(batch != next);
        std::vector<int32_t> heldout;
        heldout_batch(tok, cfg, 5, B, T, heldout);
        CHECK(heldout.size() == batch.size());
        CHECK(heldout != batch);
        // a data-parallel rank's rows 1..2 of the batch are the batch's rows 1..2
        std::vector<int32_t> middle, middle_heldout;
        pretrain_batch(tok, cfg, 5, 2, T, middle, 1);
        CHECK(middle == std::vector<int32_t>(batch.begin() + (T + 1), batch.begin() + 3 * (T + 1)));
        heldout_batch(tok, cfg, 5, 2, T, middle_heldout, 1);
        CHECK(middle_heldout == std::vector<int32_t>(heldout.begin() + (T + 1), heldout.begin() + 3 * (T + 1)));
        for (int32_t id : batch) CHECK((id >= 0 && id < Tokenizer::vocab_size && !Tokenizer::is_reserved(id)));

        std::set<std::string> rows;
        for (int row = 0; row < B; ++row) {
            const int32_t* ids = batch.data() + size_t(row) * (T + 1);
            CHECK(ids[0] == BOS);
            std::vector<int> row_ids(ids, ids + T + 1);
            std::string text = tok.decode(row_ids);
            rows.insert(text);
            Rng rng(rng_hash(cfg.seed, 5, uint64_t(row)));
            CHECK(text.rfind(corpus_document(cfg, rng, false), 0) == 0);  // the row is regenerated from its own seed
            std::vector<std::string> docs = complete_documents(text);
            CHECK(docs.size() >= 1);
            for (const std::string& doc : docs) {
                check_document(doc);
                CHECK(doc.find("<think></think>") == std::string::npos);
            }
        }
        CHECK(rows.size() == size_t(B));

        CorpusConfig direct;
        direct.direct_fraction = 1.0;
        direct.kind_weight[0] = direct.kind_weight[1] = 0;
        pretrain_batch(tok, direct, 0, 2, T, batch);
        std::vector<int> row_ids(batch.begin(), batch.begin() + T + 1);
        for (const std::string& doc : complete_documents(tok.decode(row_ids))) {
            check_document(doc);
            CHECK(to_language(between(doc, "<|user|>", "<|assistant|>"), Language::En).rfind("make ", 0) == 0);
            CHECK(doc.find("<think></think><answer>") != std::string::npos);
        }

        CorpusConfig bad;
        bad.max_difficulty[1] = max_difficulty(TaskKind::Mul) + 1;
        CHECK_THROWS_AS(pretrain_batch(tok, bad, 0, 1, T, batch), std::invalid_argument);
    }

    TEST_CASE("formatted examples fit the context at the largest difficulty, in both languages") {
        Tokenizer tok;
        for (TaskKind kind : kAllKinds) {
            for (Language language : {Language::En, Language::Alt}) {
                Rng rng(13, uint64_t(kind));
                size_t longest = 0;
                for (int i = 0; i < 500; ++i) {
                    Problem p = make_problem(kind, max_difficulty(kind), rng, language);
                    std::string example = format_example(p, true);
                    CHECK(example == format_prompt(p) + format_response(p, true));
                    CHECK(format_response(p, false) == "<think></think><answer>" + p.answer + "</answer><|eos|>");
                    for (const std::string& text : {example, format_prompt(p) + format_cold_start_response(p),
                                                    r1zero_prompt(p) + format_response(p, true)})
                        longest = std::max({longest, text.size(), tok.encode(text).size()});
                }
                CHECK(longest <= size_t(kMaxExampleTokens));
            }
        }
    }

    TEST_CASE("language: names, vocabulary and the mapping") {
        for (Language language : {Language::En, Language::Alt}) {
            CHECK(language_from_name(language_name(language)) == language);
            CHECK(other_language(other_language(language)) == language);
        }
        CHECK(other_language(Language::En) == Language::Alt);
        CHECK_THROWS_AS(language_from_name("fr"), std::invalid_argument);
        std::set<std::string> words;
        for (const WordPair& word : kVocabulary) {
            const std::string en = word.en, alt = word.alt;
            for (char c : en) CHECK(is_en_word_letter((unsigned char)c));
            for (char c : alt) CHECK(is_alt_word_letter((unsigned char)c));
            words.insert({en, alt});
            CHECK(to_language(en, Language::Alt) == alt);
            CHECK(to_language(alt, Language::En) == en);
            CHECK(to_language(en, Language::En) == en);
            CHECK(to_language(alt, Language::Alt) == alt);
        }
        CHECK(words.size() == 2 * std::size(kVocabulary));
        for (int d = 0; d < 10; ++d) {
            const std::string en(1, char('0' + d)), alt(1, char('A' + d));
            CHECK(to_language(en, Language::Alt) == alt);
            CHECK(to_language(alt, Language::En) == en);
        }
        CHECK(to_language("make 25 from 6 15 19 12", Language::Alt) == "MOKX CF RYOM G BF BJ BC");
        CHECK(to_language("<think>19-6=13, no</think><answer>19-6+12</answer><|eos|>", Language::Alt) ==
              "<think>BJ-G=BD, NOP</think><answer>BJ-G+BC</answer><|eos|>");
        CHECK(to_language("NOPB", Language::En) == "no1");              // a word, then a digit
        CHECK(to_language("B2 NOP yes", Language::En) == "12 no yes");  // mixed text comes out in one language
        CHECK(to_language("B2 NOP yes", Language::Alt) == "BC NOP YUP");
        CHECK(to_language("maybe QQ 7", Language::Alt) == "maybe QQ H");  // unknown words are kept
        CHECK(to_language("", Language::Alt).empty());
    }

    TEST_CASE("language: language_share, the share of words, of pure, mixed and empty texts") {
        CHECK(language_share("12+34=46", Language::En) == 1.0);
        CHECK(language_share("12+34=46", Language::Alt) == 0.0);
        CHECK(language_share("BC+DE=EG, YUP", Language::Alt) == 1.0);
        CHECK(language_share("BC+DE=EG, YUP", Language::En) == 0.0);
        CHECK(language_share("BC+34", Language::Alt) == doctest::Approx(0.5));
        CHECK(language_share("6+15=21, NOP", Language::En) == doctest::Approx(3.0 / 4));  // 5 of 8 characters
        CHECK(language_share("", Language::En) == 0.0);  // no words: nothing consistent to pay for
        CHECK(language_share("", Language::Alt) == 0.0);
        CHECK(language_share(" +-*/()=,\n", Language::Alt) == 0.0);
        // Special tokens belong to neither language; a broken tag is plain text.
        CHECK(language_share("<think>AB</think><|eos|><|assistant|>", Language::Alt) == 1.0);
        CHECK(count_language_chars("<thinkAB").en == 5);
        CHECK(count_language_chars("<thinkAB").alt == 2);
        CHECK(count_language_words("<thinkAB").en == 1);
        CHECK(count_language_words("<thinkAB").alt == 1);
        CHECK(count_language_words("B2 NOP yes<|eos|>yes").en == 3);  // a special token ends a word
    }

    TEST_CASE("language: every problem round-trips between En and Alt and verifies in both") {
        for (TaskKind kind : kAllKinds) {
            for (int d = 1; d <= max_difficulty(kind); ++d) {
                Rng en_rng(21, uint64_t(d)), alt_rng(21, uint64_t(d));
                for (int i = 0; i < 50; ++i) {
                    const Problem en = make_problem(kind, d, en_rng);
                    const Problem alt = make_problem(kind, d, alt_rng, Language::Alt);
                    CAPTURE(alt.question);
                    CHECK(en.language == Language::En);
                    CHECK(alt.language == Language::Alt);
                    CHECK(alt.numbers == en.numbers);
                    CHECK(alt.target == en.target);
                    CHECK(problem_key(alt) == problem_key(en));
                    CHECK(is_heldout(alt) == is_heldout(en));
                    for (auto text : {&Problem::question, &Problem::reasoning, &Problem::answer}) {
                        CHECK(alt.*text == to_language(en.*text, Language::Alt));
                        CHECK(to_language(alt.*text, Language::En) == en.*text);
                        CHECK(only_language(en.*text) == Language::En);
                        CHECK(only_language(alt.*text) == Language::Alt);
                    }
                    for (const std::string& text :
                         {format_example(en, true), format_cold_start_response(en), r1zero_prompt(en)})
                        CHECK_FALSE(has_uppercase(text));
                    CHECK(is_pure_alt(format_example(alt, true)));
                    CHECK(is_pure_alt(format_cold_start_response(alt)));
                    for (const Problem& p : {en, alt})
                        for (const std::string& answer : {en.answer, alt.answer}) CHECK(verify(p, answer));
                }
            }
        }
        Problem add{TaskKind::Add, 1, {12, 34}, 46, "12+34=", "", "46"};
        CHECK(verify(add, "EG"));
        CHECK(verify(add, " EG "));
        CHECK_FALSE(verify(add, "4G"));
        CHECK_FALSE(verify(add, "E6"));
        CHECK_FALSE(verify(add, "EGA"));
        CHECK_FALSE(verify(add, "E G"));
        Problem countdown{TaskKind::Countdown, 2, {3, 5, 2, 7}, 9, "make 9 from 3 5 2 7", "", "7+2"};
        CHECK(verify(countdown, "H+C"));
        CHECK(verify(countdown, "D*(F-C)"));
        CHECK_FALSE(verify(countdown, "H+2"));
        CHECK_FALSE(verify(countdown, "J"));
    }

    TEST_CASE("corpus: the languages mix as configured") {
        CorpusConfig cfg;
        Rng rng(31);
        const int n = 8000;
        int alt_questions = 0, other_language_reasoning = 0, multi_step = 0, switched = 0;
        for (int i = 0; i < n; ++i) {
            const std::string doc = corpus_document(cfg, rng, false);
            check_document(doc);
            const Language question = only_language(between(doc, "<|user|>", "<|assistant|>"));
            std::vector<Language> steps;
            for (const std::string& step : split_lines(between(doc, "<think>", "</think>")))
                steps.push_back(only_language(step));
            int changes = 0;
            for (size_t s = 1; s < steps.size(); ++s) changes += steps[s] != steps[s - 1];
            CHECK(changes <= 1);
            alt_questions += question == Language::Alt;
            other_language_reasoning += steps.front() != question;
            multi_step += steps.size() > 1;
            switched += changes;
        }
        // Each tolerance is over 5 standard deviations of the measured share.
        CHECK(std::fabs(double(alt_questions) / n - cfg.alt_fraction) < 0.03);
        CHECK(std::fabs(double(other_language_reasoning) / n - cfg.other_language_reasoning) < 0.025);
        CHECK(std::fabs(double(switched) / multi_step - cfg.code_switch) < 0.02);

        CorpusConfig en_only;
        en_only.alt_fraction = en_only.other_language_reasoning = en_only.code_switch = 0;
        CorpusConfig alt_only = en_only;
        alt_only.alt_fraction = 1;
        CorpusConfig translated = en_only;
        translated.other_language_reasoning = 1;
        for (int i = 0; i < 300; ++i) {
            CHECK_FALSE(has_uppercase(corpus_document(en_only, rng, false)));
            CHECK(is_pure_alt(corpus_document(alt_only, rng, true)));
            const std::string doc = corpus_document(translated, rng, false);
            CHECK_FALSE(has_uppercase(between(doc, "<|user|>", "<|assistant|>")));
            CHECK(is_pure_alt(between(doc, "<think>", "</think>")));
            CHECK_FALSE(has_uppercase(between(doc, "<answer>", "</answer>")));
        }

        Tokenizer tok;
        std::vector<int32_t> batch;
        for (auto fraction :
             {&CorpusConfig::alt_fraction, &CorpusConfig::other_language_reasoning, &CorpusConfig::code_switch})
            for (double bad : {-0.1, 1.5, std::nan("")}) {
                CorpusConfig broken;
                broken.*fraction = bad;
                CHECK_THROWS_AS(pretrain_batch(tok, broken, 0, 1, 16, batch), std::invalid_argument);
            }
    }

    TEST_CASE("r1zero_prompt: the R1-Zero instruction in the project's short form") {
        Tokenizer tok;
        Rng rng(41);
        for (Language language : {Language::En, Language::Alt}) {
            const Problem p = make_problem(TaskKind::Countdown, 2, rng, language);
            const std::string prompt = r1zero_prompt(p);
            CHECK(prompt.rfind("<|bos|><|system|>", 0) == 0);
            CHECK(ends_with(prompt, "<|user|>" + p.question + "<|assistant|>"));
            const std::string instruction = between(prompt, "<|system|>", "<|user|>");
            CHECK_FALSE(has_uppercase(instruction));
            CHECK(instruction.find("<think></think>") != std::string::npos);
            CHECK(instruction.find("<answer></answer>") != std::string::npos);
            const std::vector<int> ids = tok.encode(prompt);
            CHECK(ids.back() == ASSISTANT);
            CHECK(ids.size() < 100);
        }
    }

    TEST_CASE("cold start: single-language reasoning with a summary") {
        Problem add{TaskKind::Add, 1, {12, 34}, 46, "12+34=", addition_steps(12, 34), "46"};
        CHECK(format_cold_start_response(add) ==
              "<think>2+4+0=6 -> 6\n1+3+0=4 -> 46\nso 12+34=46</think><answer>46</answer><|eos|>");
        CHECK(format_cold_start_response(in_language(add, Language::Alt)) ==
              "<think>C+E+A=G -> G\nB+D+A=E -> EG\nZO BC+DE=EG</think><answer>EG</answer><|eos|>");
        Problem countdown{TaskKind::Countdown,     2,    {3, 5, 2, 7}, 9, "make 9 from 3 5 2 7",
                          "3+5=8, no\n7+2=9, yes", "7+2"};
        CHECK(format_cold_start_response(countdown) ==
              "<think>3+5=8, no\n7+2=9, yes\nso 7+2=9</think><answer>7+2</answer><|eos|>");
        CHECK(format_cold_start_response(in_language(countdown, Language::Alt)) ==
              "<think>D+F=I, NOP\nH+C=J, YUP\nZO H+C=J</think><answer>H+C</answer><|eos|>");

        CorpusConfig cfg;
        cfg.max_difficulty[0] = cfg.max_difficulty[1] = cfg.max_difficulty[2] = 2;
        const std::vector<Problem> set = cold_start_set(2000, cfg, {}, 5);
        REQUIRE(set.size() == 2000);
        int alt = 0;
        for (const Problem& p : set) {
            CHECK_FALSE(is_heldout(p));
            alt += p.language == Language::Alt;
            const std::string response = format_cold_start_response(p);
            check_document(format_prompt(p) + response);
            CHECK(only_language(response) == p.language);
            CHECK(only_language(p.question) == p.language);
            CHECK(ends_with(between(response, "<think>", "</think>"), "\n" + summary_line(p)));
        }
        CHECK((alt > 900 && alt < 1100));
        auto keys = [](const std::vector<Problem>& problems) {
            std::vector<std::string> out;
            for (const Problem& p : problems) out.push_back(problem_key(p) + language_name(p.language));
            return out;
        };
        CHECK(keys(cold_start_set(100, cfg, {}, 5)) == keys(std::vector<Problem>(set.begin(), set.begin() + 100)));
        CHECK(keys(cold_start_set(100, cfg, {}, 6)) != keys(cold_start_set(100, cfg, {}, 5)));
    }

    TEST_CASE("draw_problem: one task at one difficulty, with a share of the whole mix replayed") {
        CorpusConfig cfg;
        ProblemMix mix{false, TaskKind::Countdown, 3, 0.25};
        Rng rng(77);
        int named = 0, alt = 0;
        const int n = 4000;
        for (int i = 0; i < n; ++i) {
            const Problem p = draw_problem(cfg, mix, rng);
            CHECK_FALSE(is_heldout(p));
            alt += p.language == Language::Alt;
            if (p.kind == TaskKind::Countdown && p.difficulty == 3) {
                named++;
                continue;
            }
            CHECK(p.difficulty <= cfg.max_difficulty[int(p.kind)]);  // a replayed problem of the corpus' mix
        }
        CHECK((named > 0.72 * n && named < 0.78 * n));
        CHECK((alt > 0.45 * n && alt < 0.55 * n));
        mix.replay = 0.0;
        for (int i = 0; i < 200; ++i) CHECK(draw_problem(cfg, mix, rng).difficulty == 3);
    }

    TEST_CASE("sft_example: targets only on the assistant's tokens, padded to T") {
        Tokenizer tok;
        Rng rng(51);
        for (Language language : {Language::En, Language::Alt}) {
            const Problem p = make_problem(TaskKind::Countdown, 2, rng, language);
            const std::vector<int> prompt = tok.encode(format_prompt(p));
            const std::vector<int> full = tok.encode(format_prompt(p) + format_cold_start_response(p));
            const int T = 256;
            REQUIRE(full.size() < size_t(T));
            const SftExample example = sft_example(tok, p, T);
            REQUIRE(example.tokens.size() == size_t(T));
            REQUIRE(example.targets.size() == size_t(T));
            for (size_t i = 0; i < size_t(T); ++i) {
                CHECK(example.tokens[i] == (i < full.size() ? full[i] : int(PAD)));
                const bool assistant_next = i + 1 >= prompt.size() && i + 1 < full.size();
                CHECK(example.targets[i] == (assistant_next ? full[i + 1] : -1));
            }
            CHECK(example.targets[prompt.size() - 2] == -1);
            CHECK(example.targets[prompt.size() - 1] == THINK);
            CHECK(example.targets[full.size() - 2] == EOS);
            CHECK(example.targets[full.size() - 1] == -1);
            const long counted =
                std::count_if(example.targets.begin(), example.targets.end(), [](int t) { return t >= 0; });
            CHECK(counted == long(full.size() - prompt.size()));

            const SftExample exact = sft_example(tok, p, int(full.size()));
            CHECK(exact.tokens == full);
            CHECK(exact.targets.back() == -1);
            CHECK_THROWS_AS(sft_example(tok, p, int(full.size()) - 1), std::invalid_argument);
        }
    }

    TEST_CASE("typed problems: both languages, canonical questions, clear refusals") {
        Problem p;
        std::string why;
        REQUIRE(parse_problem(" 123 + 456 = ", p, why));
        CHECK(p.kind == TaskKind::Add);
        CHECK(p.question == "123+456=");
        CHECK(p.target == 579);
        CHECK(verify(p, "579"));
        REQUIRE(parse_problem("BC*DE", p, why));  // Alt: 12*34
        CHECK(p.kind == TaskKind::Mul);
        CHECK(p.language == Language::Alt);
        CHECK(p.question == "BC*DE=");
        CHECK(p.target == 408);
        CHECK(verify(p, "EAI"));
        REQUIRE(parse_problem("Make 24 from 3 5 7 2", p, why));
        CHECK(p.kind == TaskKind::Countdown);
        CHECK(p.question == "make 24 from 3 5 7 2");
        CHECK(p.difficulty == 2);
        CHECK(verify(p, "(7-5+2)*3+12") == false);  // 12 is not given
        CHECK(verify(p, "(5+7)*2"));
        REQUIRE(parse_problem(to_language("make 24 from 3 5 7 2", Language::Alt), p, why));
        CHECK(p.language == Language::Alt);
        CHECK(verify(p, "(F+H)*C"));

        for (const char* bad : {"", "   ", "hello", "12+", "+12", "12-3", "1234567890+1", "make x from 1 2",
                                "make 10 from 1 2 3 4 5 6 7", "make 10 from 0 2", "12+3+4"}) {
            INFO("input: '", bad, "'");
            CHECK_FALSE(parse_problem(bad, p, why));
            CHECK(!why.empty());
            why.clear();
        }
        CHECK_FALSE(parse_problem(std::string(500, '1'), p, why));
        CHECK(why.find("longer than") != std::string::npos);
    }
}
