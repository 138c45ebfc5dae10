// answer_oracle.h: whether an answer is right, from the rules of the tasks (data/tasks.h's comments) computed another
// way than data::verify computes it: a whitelist of bytes, a tokenizer, a shunting-yard evaluator in 128-bit integers
// that checks the numbers used. The tests and the fuzzer hold the verifier to it, both ways.
#pragma once

#include <algorithm>
#include <string>
#include <vector>

#include "../data/tasks.h"

namespace oracle {

// The answer in En digits, or "" with ok = false where a byte is not an operator, a space, a digit of one language.
inline std::string digits(const std::string& answer, bool& ok) {
    bool en = false, alt = false;
    std::string out;
    for (unsigned char c : answer) {
        if (c >= '0' && c <= '9') en = true, out += char(c);
        else if (c >= 'A' && c <= 'J') alt = true, out += char('0' + (c - 'A'));
        else if (c == ' ' || c == '+' || c == '-' || c == '*' || c == '/' || c == '(' || c == ')') out += char(c);
        else return ok = false, "";
    }
    ok = !(en && alt);
    return out;
}

// Tokens of an expression: numbers as written (no leading zero), operators, parentheses; spaces between them only.
inline bool tokens_of(const std::string& text, std::vector<std::string>& tokens) {
    for (size_t i = 0; i < text.size();) {
        if (text[i] == ' ') {
            i++;
            continue;
        }
        if (text[i] >= '0' && text[i] <= '9') {
            size_t j = i;
            while (j < text.size() && text[j] >= '0' && text[j] <= '9') j++;
            if ((text[i] == '0' && j - i > 1) || j - i > 18) return false;
            tokens.push_back(text.substr(i, j - i));
            i = j;
        } else {
            tokens.push_back(std::string(1, text[i++]));
        }
    }
    return true;
}

// Shunting-yard into postfix, then a stack evaluation in 128-bit integers: every number one of the given ones (each
// at most once), every division exact, every value within 10^12 in magnitude, parentheses at most 32 deep.
inline bool countdown(const std::string& text, std::vector<long> available, long target) {
    std::vector<std::string> tokens, output, ops;
    if (!tokens_of(text, tokens) || tokens.empty()) return false;
    auto precedence = [](const std::string& op) { return op == "+" || op == "-" ? 1 : 2; };
    int depth = 0;
    bool expect_operand = true;
    for (const std::string& t : tokens) {
        const bool number = t[0] >= '0' && t[0] <= '9';
        if (number || t == "(") {
            if (!expect_operand) return false;
            if (number) output.push_back(t), expect_operand = false;
            else if (++depth > data::kMaxExpressionDepth) return false;
            else ops.push_back(t);
        } else if (t == ")") {
            if (expect_operand || depth == 0) return false;
            while (ops.back() != "(") output.push_back(ops.back()), ops.pop_back();
            ops.pop_back(), depth--;
        } else {
            if (expect_operand) return false;
            while (!ops.empty() && ops.back() != "(" && precedence(ops.back()) >= precedence(t))
                output.push_back(ops.back()), ops.pop_back();
            ops.push_back(t), expect_operand = true;
        }
    }
    if (expect_operand || depth != 0) return false;
    while (!ops.empty()) output.push_back(ops.back()), ops.pop_back();
    std::vector<__int128> stack;
    const __int128 bound = data::kMaxExpressionValue;
    for (const std::string& t : output) {
        if (t[0] >= '0' && t[0] <= '9') {
            const long v = std::stol(t);
            auto it = std::find(available.begin(), available.end(), v);
            if (it == available.end()) return false;
            available.erase(it);
            stack.push_back(v);
            continue;
        }
        const __int128 b = stack.back();
        stack.pop_back();
        const __int128 a = stack.back();
        stack.pop_back();
        __int128 v;
        if (t == "+") v = a + b;
        else if (t == "-") v = a - b;
        else if (t == "*") v = a * b;
        else if (b == 0 || a % b != 0) return false;
        else v = a / b;
        if (v > bound || v < -bound) return false;
        stack.push_back(v);
    }
    return stack.size() == 1 && stack[0] == target;
}

// Add and mul: the number as written, spaces around it allowed.
inline bool number(const std::string& text, long target) {
    std::vector<std::string> tokens;
    if (!tokens_of(text, tokens) || tokens.size() != 1 || !(tokens[0][0] >= '0' && tokens[0][0] <= '9'))
        return false;
    return std::stol(tokens[0]) == target;
}

inline bool verify(const data::Problem& p, const std::string& answer) {
    bool ok = false;
    const std::string text = digits(answer, ok);
    if (!ok) return false;
    const size_t first = text.find_first_not_of(' '), last = text.find_last_not_of(' ');
    if (first == std::string::npos) return false;
    if (p.kind != data::TaskKind::Countdown) return number(text, p.target);
    if (last + 1 - first > data::kMaxExpressionChars) return false;
    return countdown(text, p.numbers, p.target);
}

}  // namespace oracle
