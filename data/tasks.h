// data/tasks.h: synthetic reasoning tasks (addition, multiplication, countdown) with a difficulty knob, a written
// chain of thought for every problem, exact verifiers for the rule-based rewards, and the held-out split. A problem
// is written in one of the two languages of language.h; the math, its verifier and its held-out status do not
// depend on which.
//
// Each task is hard in one forward pass and easy as a sequence of local steps: long carries in addition and
// multiplication, a search over expressions in countdown. A model that answers directly has to do the whole
// computation between two tokens; one that writes the steps first only ever does one small step per token.
//
// Difficulty mappings:
//   add       1..6: two (d+1)-digit numbers.
//   mul       1..5: a (d+1)-digit number times a ((d+2)/2)-digit one: 2x1, 3x2, 4x2, 5x3, 6x3 digits.
//   countdown 1..4: d+2 numbers from 1..25; the target is made from all but at most two of them (at least two)
//             with + - * and exact /.
#pragma once

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <cstdlib>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "../kernels/rng.h"
#include "language.h"

namespace data {

enum class TaskKind { Add, Mul, Countdown };
constexpr int kNumTaskKinds = 3;

inline const char* task_name(TaskKind kind) {
    switch (kind) {
        case TaskKind::Add:
            return "add";
        case TaskKind::Mul:
            return "mul";
        case TaskKind::Countdown:
            return "countdown";
    }
    throw std::invalid_argument("task_name: unknown task kind " + std::to_string(int(kind)));
}

inline TaskKind task_from_name(const std::string& name) {
    for (int k = 0; k < kNumTaskKinds; ++k)
        if (name == task_name(TaskKind(k))) return TaskKind(k);
    throw std::invalid_argument("unknown task '" + name + "' (expected add, mul or countdown)");
}

// The model's context is 512 tokens; a formatted example (prompt, reasoning, answer, special tokens) at the
// largest difficulty stays under this bound, which leaves room for longer thinking after reinforcement learning.
// The longest are countdown traces at difficulty 4: at most 4 lines of at most 5 steps, about 340 tokens (in either
// language), and a cold-start summary line adds about 30.
constexpr int kMaxExampleTokens = 400;

inline int max_difficulty(TaskKind kind) {
    switch (kind) {
        case TaskKind::Add:
            return 6;
        case TaskKind::Mul:
            return 5;
        case TaskKind::Countdown:
            return 4;
    }
    return 0;
}

struct Problem {
    TaskKind kind;
    int difficulty;
    std::vector<long> numbers;  // the operands, or countdown's given numbers
    long target;                // the sum, the product, or countdown's value to reach
    // The texts, all three written in `language`.
    std::string question;
    std::string reasoning;  // the worked steps that go between <think> and </think>, one a line
    std::string answer;     // the reference answer (countdown: one expression among possibly many)
    Language language = Language::En;
};

inline std::string join(const std::vector<std::string>& parts, const std::string& separator) {
    std::string out;
    for (size_t i = 0; i < parts.size(); ++i) out += (i ? separator : "") + parts[i];
    return out;
}

inline std::vector<std::string> split_lines(const std::string& text) {
    std::vector<std::string> lines;
    size_t start = 0;
    for (size_t end; (end = text.find('\n', start)) != std::string::npos; start = end + 1)
        lines.push_back(text.substr(start, end - start));
    lines.push_back(text.substr(start));
    return lines;
}

inline std::string join_numbers(const std::vector<long>& numbers, const std::string& separator) {
    std::vector<std::string> parts;
    for (long n : numbers) parts.push_back(std::to_string(n));
    return join(parts, separator);
}

// ---------------------------------------------------------------------------------------------------------------
// Addition and multiplication
// ---------------------------------------------------------------------------------------------------------------

inline long power_of_ten(int exponent) {
    long p = 1;
    while (exponent-- > 0) p *= 10;
    return p;
}

inline long random_with_digits(int digits, Rng& rng) {
    return rng.range(power_of_ten(digits - 1), power_of_ten(digits) - 1);
}

// Column addition from the least significant digit, one column a line: "7+5+1=13 -> 34" holds the two digits,
// the carry from the line above, their sum and the result digits so far. Each new digit then depends only on the
// line above and one column of the question, and the answer is a copy of the last line's digits.
inline std::string addition_steps(long a, long b) {
    std::string x = std::to_string(a), y = std::to_string(b);
    const size_t width = std::max(x.size(), y.size());
    x.insert(0, width - x.size(), '0');
    y.insert(0, width - y.size(), '0');
    std::vector<std::string> lines;
    std::string digits;
    int carry = 0;
    auto add_column = [&](int dx, int dy) {
        int sum = dx + dy + carry;
        digits.insert(digits.begin(), char('0' + sum % 10));
        lines.push_back(std::to_string(dx) + "+" + std::to_string(dy) + "+" + std::to_string(carry) + "=" +
                        std::to_string(sum) + " -> " + digits);
        carry = sum / 10;
    };
    for (size_t i = width; i-- > 0;) add_column(x[i] - '0', y[i] - '0');
    if (carry) add_column(0, 0);
    return join(lines, "\n");
}

// Long multiplication: one partial product for each digit of b, written with its place value
// ("4721*30=141630") so the shift is explicit, then a running sum with one addition a line.
inline std::string multiplication_steps(long a, long b) {
    std::vector<std::string> lines;
    std::vector<long> partials;
    long place = 1;
    for (long rest = b; rest > 0; rest /= 10, place *= 10) {
        long factor = (rest % 10) * place;
        partials.push_back(a * factor);
        lines.push_back(std::to_string(a) + "*" + std::to_string(factor) + "=" + std::to_string(a * factor));
    }
    long sum = partials[0];
    for (size_t i = 1; i < partials.size(); ++i) {
        lines.push_back(std::to_string(sum) + "+" + std::to_string(partials[i]) + "=" +
                        std::to_string(sum + partials[i]));
        sum += partials[i];
    }
    return join(lines, "\n");
}

inline Problem make_add(int difficulty, Rng& rng) {
    long a = random_with_digits(difficulty + 1, rng), b = random_with_digits(difficulty + 1, rng);
    std::string question = std::to_string(a) + "+" + std::to_string(b) + "=";
    return {TaskKind::Add, difficulty, {a, b}, a + b, question, addition_steps(a, b), std::to_string(a + b)};
}

inline Problem make_mul(int difficulty, Rng& rng) {
    long a = random_with_digits(difficulty + 1, rng), b = random_with_digits((difficulty + 2) / 2, rng);
    std::string question = std::to_string(a) + "*" + std::to_string(b) + "=";
    return {TaskKind::Mul, difficulty, {a, b}, a * b, question, multiplication_steps(a, b), std::to_string(a * b)};
}

// ---------------------------------------------------------------------------------------------------------------
// Countdown
// ---------------------------------------------------------------------------------------------------------------

constexpr long kCountdownMaxNumber = 25;
// Intermediate values of generated expressions stay at or below this, so every step of a trace is small arithmetic.
constexpr long kCountdownMaxValue = 999;
// A trace tries up to this many wrong expressions before the one that works.
constexpr int kCountdownMaxWrongTries = 3;

// A partial expression: its value, its text with the fewest parentheses, and the precedence of its outermost
// operator, which tells a parent whether the text needs parentheses.
struct Term {
    long value = 0;
    std::string text;
    int precedence = 3;  // 3: a number, 2: * or /, 1: + or -
};

inline int precedence(char op) { return op == '+' || op == '-' ? 1 : 2; }

inline long apply(long a, char op, long b) {
    switch (op) {
        case '+':
            return a + b;
        case '-':
            return a - b;
        case '*':
            return a * b;
        default:
            return a / b;
    }
}

inline Term combine(const Term& left, char op, const Term& right) {
    const int p = precedence(op);
    // At equal precedence only the right operand of - and / needs parentheses: a-(b-c) is not a-b-c.
    const bool wrap_left = left.precedence < p;
    const bool wrap_right = right.precedence < p || (right.precedence == p && (op == '-' || op == '/'));
    auto text = [](const Term& t, bool wrap) { return wrap ? "(" + t.text + ")" : t.text; };
    return {apply(left.value, op, right.value), text(left, wrap_left) + op + text(right, wrap_right), p};
}

// The operations a generated solution may apply to a >= b: results stay positive integers no larger than
// kCountdownMaxValue, and multiplying or dividing by 1 is left out as a wasted step. Never empty: a > b allows -,
// a == b > 1 allows /, a == b == 1 allows +.
inline std::vector<char> allowed_ops(long a, long b) {
    std::vector<char> ops;
    if (a + b <= kCountdownMaxValue) ops.push_back('+');
    if (a > b) ops.push_back('-');
    if (b > 1 && a * b <= kCountdownMaxValue) ops.push_back('*');
    if (b > 1 && a % b == 0) ops.push_back('/');
    return ops;
}

// An expression with the steps that computed it, in order ("3+5=8", "8*2=16").
struct Derivation {
    Term result;
    std::vector<std::string> steps;
};

inline Term take_random(std::vector<Term>& terms, Rng& rng) {
    size_t i = size_t(rng.range(0, long(terms.size()) - 1));
    Term t = terms[i];
    terms.erase(terms.begin() + long(i));
    return t;
}

// A random expression over all of `numbers`, built the way one works on paper: combine two of the remaining
// values, write the step down, repeat until one value is left.
inline Derivation random_derivation(const std::vector<long>& numbers, Rng& rng) {
    std::vector<Term> terms;
    for (long n : numbers) terms.push_back({n, std::to_string(n), 3});
    Derivation derivation;
    while (terms.size() > 1) {
        Term left = take_random(terms, rng), right = take_random(terms, rng);
        if (left.value < right.value) std::swap(left, right);
        std::vector<char> ops = allowed_ops(left.value, right.value);
        char op = ops[size_t(rng.range(0, long(ops.size()) - 1))];
        if ((op == '+' || op == '*') && rng.range(0, 1)) std::swap(left, right);  // both orders read naturally
        Term made = combine(left, op, right);
        derivation.steps.push_back(std::to_string(left.value) + op + std::to_string(right.value) + "=" +
                                   std::to_string(made.value));
        terms.push_back(made);
    }
    derivation.result = terms[0];
    return derivation;
}

// `count` of the numbers, in random order (a partial Fisher-Yates shuffle).
inline std::vector<long> random_subset(std::vector<long> numbers, size_t count, Rng& rng) {
    for (size_t i = 0; i < count; ++i)
        std::swap(numbers[i], numbers[size_t(rng.range(long(i), long(numbers.size()) - 1))]);
    numbers.resize(count);
    return numbers;
}

// An expression over all but at most two of the numbers: with more numbers given, targets then need longer
// expressions, which is what makes a larger difficulty harder.
inline Derivation random_attempt(const std::vector<long>& numbers, Rng& rng) {
    const long count = long(numbers.size());
    const long used = rng.range(std::max(2L, count - 2), count);
    return random_derivation(random_subset(numbers, size_t(used), rng), rng);
}

// The trace is a short search: a few wrong attempts, each worked out step by step and rejected, then the one that
// reaches the target. Sampling more attempts at inference time is then a natural way to think longer.
inline Problem make_countdown(int difficulty, Rng& rng) {
    std::vector<long> numbers(size_t(difficulty + 2));
    Derivation solution;
    do {  // a target equal to a given number would be solved by copying it
        for (long& n : numbers) n = rng.range(1, kCountdownMaxNumber);
        solution = random_attempt(numbers, rng);
    } while (std::count(numbers.begin(), numbers.end(), solution.result.value) > 0);
    const long target = solution.result.value;

    std::vector<std::string> lines;
    const long wrong_tries = rng.range(0, kCountdownMaxWrongTries);
    while (long(lines.size()) < wrong_tries) {
        Derivation attempt = random_attempt(numbers, rng);
        if (attempt.result.value != target) lines.push_back(join(attempt.steps, ", ") + ", no");
    }
    lines.push_back(join(solution.steps, ", ") + ", yes");
    return {TaskKind::Countdown,
            difficulty,
            numbers,
            target,
            "make " + std::to_string(target) + " from " + join_numbers(numbers, " "),
            join(lines, "\n"),
            solution.result.text};
}

// The same problem written in another language.
inline Problem in_language(Problem p, Language language) {
    p.question = to_language(p.question, language);
    p.reasoning = to_language(p.reasoning, language);
    p.answer = to_language(p.answer, language);
    p.language = language;
    return p;
}

// The generators write En; the numbers drawn do not depend on the language, so the same generator state gives the
// same problem in either one.
inline Problem make_problem(TaskKind kind, int difficulty, Rng& rng, Language language = Language::En) {
    if (difficulty < 1 || difficulty > max_difficulty(kind))
        throw std::invalid_argument(std::string("make_problem: difficulty ") + std::to_string(difficulty) +
                                    " is outside 1.." + std::to_string(max_difficulty(kind)) + " for " +
                                    task_name(kind));
    switch (kind) {
        case TaskKind::Add:
            return in_language(make_add(difficulty, rng), language);
        case TaskKind::Mul:
            return in_language(make_mul(difficulty, rng), language);
        default:
            return in_language(make_countdown(difficulty, rng), language);
    }
}

// ---------------------------------------------------------------------------------------------------------------
// Verifiers: they score untrusted model output inside the reward loop, so they return false on anything
// malformed and never throw.
// ---------------------------------------------------------------------------------------------------------------

constexpr size_t kMaxExpressionChars = 256;
constexpr int kMaxExpressionDepth = 32;
// Countdown values beyond this fail the check: no target comes near, and the arithmetic cannot overflow.
constexpr long kMaxExpressionValue = 1000000000000L;

inline std::string strip_spaces(const std::string& text) {
    size_t begin = text.find_first_not_of(' ');
    if (begin == std::string::npos) return "";
    return text.substr(begin, text.find_last_not_of(' ') + 1 - begin);
}

// An optional sign and 1..18 digits, the most a long holds without an overflow check.
inline bool parse_integer(const std::string& text, long& value) {
    const size_t start = !text.empty() && (text[0] == '+' || text[0] == '-') ? 1 : 0;
    if (text.size() == start || text.size() - start > 18) return false;
    value = 0;
    for (size_t i = start; i < text.size(); ++i) {
        if (text[i] < '0' || text[i] > '9') return false;
        value = value * 10 + (text[i] - '0');
    }
    if (text[0] == '-') value = -value;
    return true;
}

// A number as the corpus writes it: 1..18 digits, no sign, no leading zero ("0" itself excepted). The model's answers
// are held to it: "+0046" names 46 but is not how anything writes it, and every variant accepted is one more way for
// a policy to be paid for text that is not the answer.
inline bool parse_written_number(const std::string& text, long& value) {
    if (text.empty() || text.size() > 18 || (text[0] == '0' && text.size() > 1)) return false;
    if (!std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; })) return false;
    return parse_integer(text, value);
}

// Recursive descent over
//   expression := term (('+' | '-') term)*     term := factor (('*' | '/') factor)*
//   factor := number | '(' expression ')'
// where every number must be one of the available ones, each used at most once. A failure (a number not
// available, an inexact division, a value out of range, nesting too deep, text left over, any byte the grammar does
// not allow) sets `failed_`, and every step returns at once after it.
class ExpressionEvaluator {
   public:
    ExpressionEvaluator(const std::string& text, std::vector<long> available)
        : text_(text), available_(std::move(available)) {}

    bool evaluate(long& value) {
        value = expression();
        skip_spaces();
        return !failed_ && pos_ == text_.size();  // the whole text read: a NUL byte is a byte like any other
    }

   private:
    const std::string& text_;
    std::vector<long> available_;
    size_t pos_ = 0;
    int depth_ = 0;
    bool failed_ = false;

    long fail() {
        failed_ = true;
        return 0;
    }

    void skip_spaces() {
        while (pos_ < text_.size() && text_[pos_] == ' ') ++pos_;
    }

    char peek() {
        skip_spaces();
        return pos_ < text_.size() ? text_[pos_] : '\0';
    }

    long expression() {
        long value = term();
        for (char op = peek(); !failed_ && (op == '+' || op == '-'); op = peek()) {
            ++pos_;
            value = checked(value, op, term());
        }
        return value;
    }

    long term() {
        long value = factor();
        for (char op = peek(); !failed_ && (op == '*' || op == '/'); op = peek()) {
            ++pos_;
            value = checked(value, op, factor());
        }
        return value;
    }

    long factor() {
        if (failed_) return 0;
        if (peek() != '(') return number();
        ++pos_;
        if (++depth_ > kMaxExpressionDepth) return fail();
        long value = expression();
        --depth_;
        if (failed_ || peek() != ')') return fail();
        ++pos_;
        return value;
    }

    long number() {
        skip_spaces();
        const size_t start = pos_;
        while (pos_ < text_.size() && text_[pos_] >= '0' && text_[pos_] <= '9') ++pos_;
        long value = 0;
        if (!parse_written_number(text_.substr(start, pos_ - start), value)) return fail();
        auto it = std::find(available_.begin(), available_.end(), value);
        if (it == available_.end()) return fail();
        available_.erase(it);
        return value;
    }

    long checked(long a, char op, long b) {
        if (failed_) return 0;
        if (op == '/' && (b == 0 || a % b != 0)) return fail();
        if (op == '*' && b != 0 && std::labs(a) > kMaxExpressionValue / std::labs(b)) return fail();
        long value = apply(a, op, b);
        return std::labs(value) <= kMaxExpressionValue ? value : fail();
    }
};

// Checks the text the model wrote between <answer> and </answer>. Spaces around it are allowed; add and mul want
// the integer, countdown any expression that reaches the target, not only the reference one. The answer may be in
// either language, whatever the question's (accuracy is about the math; consistency has its own reward), but in one
// only: "4G" is a number in neither.
inline bool verify(const Problem& p, const std::string& answer_text) {
    const LanguageCounts counts = count_language_chars(answer_text);
    if (counts.en > 0 && counts.alt > 0) return false;
    const std::string text = strip_spaces(to_language(answer_text, Language::En));
    long value = 0;
    if (p.kind != TaskKind::Countdown) return parse_written_number(text, value) && value == p.target;
    if (text.empty() || text.size() > kMaxExpressionChars) return false;
    return ExpressionEvaluator(text, p.numbers).evaluate(value) && value == p.target;
}

// ---------------------------------------------------------------------------------------------------------------
// Problems typed by a person (the demo): "123+456", "12*34=", "make 24 from 3 5 7 2", or the same in Alt
// ---------------------------------------------------------------------------------------------------------------

constexpr size_t kMaxTypedChars = 120;
constexpr size_t kMaxTypedDigits = 9;   // operands of a typed sum or product: their result fits a long
constexpr size_t kMaxTypedNumbers = 6;  // countdown numbers

// Whitespace-separated words of a text.
inline std::vector<std::string> words_of(const std::string& text) {
    std::vector<std::string> words;
    std::string word;
    for (char c : text + " ") {
        if (c != ' ') {
            word += c;
        } else if (!word.empty()) {
            words.push_back(word);
            word.clear();
        }
    }
    return words;
}

inline bool typed_number(const std::string& text, long& value) {
    return !text.empty() && text.size() <= kMaxTypedDigits && text[0] != '+' && text[0] != '-' &&
           parse_integer(text, value);
}

// Reads a typed problem into p (question in the model's format and the language it was typed in, numbers, target;
// no reasoning). On failure returns false and says why.
inline bool parse_problem(const std::string& typed, Problem& p, std::string& why) {
    std::string text = strip_spaces(typed);
    if (text.empty() || text.size() > kMaxTypedChars) {
        why = text.empty() ? "the problem is empty"
                           : "the problem is longer than " + std::to_string(kMaxTypedChars) + " characters";
        return false;
    }
    LanguageCounts counts = count_language_chars(text);
    Language language = counts.alt > counts.en ? Language::Alt : Language::En;
    if (language == Language::En)  // "Make 24 from ..." is En: its capital is no Alt digit
        for (char& c : text) c = char(std::tolower(static_cast<unsigned char>(c)));
    std::string en = to_language(text, Language::En);
    if (!en.empty() && en.back() == '=') en.pop_back();
    std::vector<std::string> words = words_of(en);
    p = Problem{};
    p.language = language;
    if (words.size() >= 5 && words[0] == "make" && words[2] == "from") {
        long target = 0;
        if (!typed_number(words[1], target) || target < 1 || words.size() - 3 > kMaxTypedNumbers) {
            why = "countdown takes a target and 2 to " + std::to_string(kMaxTypedNumbers) + " numbers";
            return false;
        }
        for (size_t i = 3; i < words.size(); ++i) {
            long n = 0;
            if (!typed_number(words[i], n) || n < 1) {
                why = "'" + words[i] + "' is not a positive number";
                return false;
            }
            p.numbers.push_back(n);
        }
        p.kind = TaskKind::Countdown, p.target = target;
        p.difficulty = std::min(int(p.numbers.size()) - 2, max_difficulty(TaskKind::Countdown));
        p.question = "make " + std::to_string(target) + " from " + join_numbers(p.numbers, " ");
    } else {
        std::string compact;
        for (char c : en)
            if (c != ' ') compact += c;
        size_t op = compact.find_first_of("+*");
        long a = 0, b = 0;
        if (op == std::string::npos || !typed_number(compact.substr(0, op), a) ||
            !typed_number(compact.substr(op + 1), b)) {
            why = "expected a+b, a*b or 'make T from n1 n2 ...', with numbers of at most " +
                  std::to_string(kMaxTypedDigits) + " digits";
            return false;
        }
        p.kind = compact[op] == '+' ? TaskKind::Add : TaskKind::Mul;
        p.numbers = {a, b}, p.target = p.kind == TaskKind::Add ? a + b : a * b;
        p.difficulty = std::clamp(int(std::to_string(a).size()) - 1, 1, max_difficulty(p.kind));
        p.question = std::to_string(a) + compact[op] + std::to_string(b) + "=";
    }
    p.question = to_language(p.question, language);
    return true;
}

// ---------------------------------------------------------------------------------------------------------------
// Held-out split: a problem is held out by a hash of its canonical key, so training data and evaluation sets can
// never share a problem whatever seeds or difficulties they are drawn with.
// ---------------------------------------------------------------------------------------------------------------

constexpr uint64_t kHeldoutOneIn = 8;

// The numbers are sorted: 12+34 and 34+12 are one problem, and countdown's numbers are a multiset. The key holds no
// text, so a problem and its translation are held out together.
inline std::string problem_key(const Problem& p) {
    std::vector<long> sorted = p.numbers;
    std::sort(sorted.begin(), sorted.end());
    return std::string(task_name(p.kind)) + ":" + join_numbers(sorted, ",") + "=" + std::to_string(p.target);
}

inline uint64_t string_hash(const std::string& text) {
    uint64_t h = 14695981039346656037ull;  // FNV-1a, then a final mix
    for (unsigned char c : text) h = (h ^ c) * 1099511628211ull;
    return splitmix64(h);
}

inline bool is_heldout(const Problem& p) { return string_hash(problem_key(p)) % kHeldoutOneIn == 0; }

inline Problem sample_problem(TaskKind kind, int difficulty, Rng& rng, bool heldout, Language language = Language::En) {
    for (int attempt = 0; attempt < 10000; ++attempt) {
        Problem p = make_problem(kind, difficulty, rng, language);
        if (is_heldout(p) == heldout) return p;
    }
    throw std::runtime_error(std::string("sample_problem: no ") + (heldout ? "held-out" : "training") + " " +
                             task_name(kind) + " problem found at difficulty " + std::to_string(difficulty));
}

}  // namespace data
