// data/language.h: the corpus' two "languages", the mapping between them, and the share of a text written in one.
//
// DeepSeek-R1 (§2.3.1-2.3.2) found that pure RL (R1-Zero) mixes languages in its chains of thought, and that
// cold-start data plus a language-consistency reward (the share of target-language words in the thinking) fixes it.
// To see this in miniature the corpus holds the same material in two languages that can be told apart character
// by character:
//   En:  digits 0-9 and lowercase words ("make 9 from 3 5 2 7", "7+2, yes");
//   Alt: the digits written as the uppercase letters A..J (A = 0 ... J = 9) and uppercase words made only of the
//        letters K..Z ("MOKX J RYOM D F C H", "H+C, YUP"), so a word can never be read as a number.
// Operators, spaces, punctuation, newlines and special tokens belong to neither language.
#pragma once

#include <stdexcept>
#include <string>

#include "tokenizer.h"

namespace data {

enum class Language { En, Alt };
constexpr int kNumLanguages = 2;

inline const char* language_name(Language language) {
    switch (language) {
        case Language::En:
            return "en";
        case Language::Alt:
            return "alt";
    }
    throw std::invalid_argument("language_name: unknown language " + std::to_string(int(language)));
}

inline Language language_from_name(const std::string& name) {
    for (int l = 0; l < kNumLanguages; ++l)
        if (name == language_name(Language(l))) return Language(l);
    throw std::invalid_argument("unknown language '" + name + "' (expected en or alt)");
}

inline Language other_language(Language language) { return language == Language::En ? Language::Alt : Language::En; }

// Every word the tasks write, in both languages.
struct WordPair {
    const char* en;
    const char* alt;
};
constexpr WordPair kVocabulary[] = {{"make", "MOKX"}, {"from", "RYOM"}, {"no", "NOP"}, {"yes", "YUP"}, {"so", "ZO"}};

inline bool is_en_char(unsigned char c) { return (c >= '0' && c <= '9') || (c >= 'a' && c <= 'z'); }
inline bool is_alt_char(unsigned char c) { return c >= 'A' && c <= 'Z'; }

// Letters that make up words, as opposed to digits: a..z in En, K..Z in Alt.
inline bool is_en_word_letter(unsigned char c) { return c >= 'a' && c <= 'z'; }
inline bool is_alt_word_letter(unsigned char c) { return c >= 'K' && c <= 'Z'; }

// The length of the run of word letters of one language that starts at `pos` (0 if none starts there).
inline size_t word_length(const std::string& text, size_t pos) {
    const unsigned char first = text[pos];
    auto same_kind = is_en_word_letter(first) ? is_en_word_letter : is_alt_word_letter;
    size_t end = pos;
    while (end < text.size() && same_kind((unsigned char)text[end])) ++end;
    return end - pos;
}

// Words outside the vocabulary stay as they are: the mapping is total, so it can be applied to model output.
inline std::string word_in(const std::string& word, Language target) {
    for (const WordPair& pair : kVocabulary)
        if (word == pair.en || word == pair.alt) return target == Language::En ? pair.en : pair.alt;
    return word;
}

inline char digit_in(char c, Language target) {
    if (target == Language::Alt && c >= '0' && c <= '9') return char('A' + (c - '0'));
    if (target == Language::En && c >= 'A' && c <= 'J') return char('0' + (c - 'A'));
    return c;
}

// Writes `text` (in either language, or a mix) in `target`: digits and vocabulary words of the other language are
// mapped, everything else, special tokens included, is copied. The round trip En -> Alt -> En is the identity on
// every text the tasks write.
inline std::string to_language(const std::string& text, Language target) {
    std::string out;
    out.reserve(text.size() + text.size() / 2);
    for (size_t pos = 0; pos < text.size();) {
        const unsigned char c = text[pos];
        if (const size_t special = named_special_length(text, pos)) {
            out.append(text, pos, special);
            pos += special;
        } else if (is_en_word_letter(c) || is_alt_word_letter(c)) {
            const size_t length = word_length(text, pos);
            out += word_in(text.substr(pos, length), target);
            pos += length;
        } else {
            out += digit_in(char(c), target);
            ++pos;
        }
    }
    return out;
}

struct LanguageCounts {
    size_t en = 0, alt = 0;
};

// Characters, or words (maximal runs of one language's characters), of each language in `text`; special tokens are
// skipped, so a tag's letters never count as En.
inline LanguageCounts count_language(const std::string& text, bool words) {
    LanguageCounts counts;
    enum Kind { None, En, Alt } previous = None;
    for (size_t pos = 0; pos < text.size();) {
        if (const size_t special = named_special_length(text, pos)) {
            pos += special, previous = None;
            continue;
        }
        const unsigned char c = text[pos++];
        const Kind kind = is_en_char(c) ? En : is_alt_char(c) ? Alt : None;
        if (kind != None && !(words && kind == previous)) ++(kind == En ? counts.en : counts.alt);
        previous = kind;
    }
    return counts;
}
inline LanguageCounts count_language_chars(const std::string& text) { return count_language(text, false); }
inline LanguageCounts count_language_words(const std::string& text) { return count_language(text, true); }

// The share of `target`-language words among the words of `text`: R1 §2.3.2's language-consistency reward, "the
// proportion of target language words in the CoT". 0 for a text without words: no reasoning is not consistent
// reasoning, and paying for it would reward empty thinking.
inline double language_share(const std::string& text, Language target) {
    const LanguageCounts counts = count_language_words(text);
    const size_t total = counts.en + counts.alt;
    if (total == 0) return 0.0;
    return double(target == Language::En ? counts.en : counts.alt) / double(total);
}

}  // namespace data
