// data/tokenizer.h: the character-level tokenizer (16 special ids, '\n' and printable ASCII, 128 ids in all) and
// its export as a Hugging Face tokenizer.json.
//
// Characters rather than BPE pieces: every digit is its own token, so the model sees the column structure of the
// arithmetic tasks directly, and the vocabulary is small enough that the embedding and head stay cheap.
#pragma once

#include <array>
#include <cstdio>
#include <stdexcept>
#include <string>
#include <vector>


namespace data {

enum Special : int { PAD = 0, BOS, EOS, USER, ASSISTANT, THINK, THINK_END, ANSWER, ANSWER_END, SYSTEM };
constexpr int kNumNamedSpecials = 10;  // <|pad|> .. <|system|>; ids 10..15 are reserved
constexpr const char* kNamedSpecials[kNumNamedSpecials] = {"<|pad|>",       "<|bos|>",   "<|eos|>",  "<|user|>",
                                                           "<|assistant|>", "<think>",   "</think>", "<answer>",
                                                           "</answer>",     "<|system|>"};

// The id of the named special token whose text starts at `pos`, or -1. Only the named specials are recognized in
// text: reserved ids must never appear in training data.
inline int named_special_at(const std::string& text, size_t pos) {
    if (pos >= text.size() || text[pos] != '<') return -1;
    for (int id = 0; id < kNumNamedSpecials; ++id)
        if (text.compare(pos, std::char_traits<char>::length(kNamedSpecials[id]), kNamedSpecials[id]) == 0) return id;
    return -1;
}

// The length of the named special token whose text starts at `pos`, or 0.
inline size_t named_special_length(const std::string& text, size_t pos) {
    const int id = named_special_at(text, pos);
    return id < 0 ? 0 : std::char_traits<char>::length(kNamedSpecials[id]);
}

// Writes `text` as a JSON string literal, quotes included.
inline std::string json_quote(const std::string& text) {
    std::string out = "\"";
    for (unsigned char c : text) {
        if (c == '"' || c == '\\') {
            out += '\\';
            out += char(c);
        } else if (c == '\n') {
            out += "\\n";
        } else if (c < 0x20) {
            char escaped[8];
            std::snprintf(escaped, sizeof escaped, "\\u%04x", c);
            out += escaped;
        } else {
            out += char(c);
        }
    }
    return out + "\"";
}

struct Tokenizer {
    static constexpr int vocab_size = 128;  // a multiple of 128, as the model's GEMMs need
    static constexpr int num_named_specials = kNumNamedSpecials;
    static constexpr int first_char_id = 16;  // '\n', then ' ' .. '~'
    static constexpr int num_chars = 1 + 95;

    Tokenizer() {
        byte_to_id_.fill(-1);
        for (int id = 0; id < vocab_size; ++id) strings_[id] = "<|reserved_" + std::to_string(id) + "|>";
        for (int id = 0; id < num_named_specials; ++id) strings_[id] = kNamedSpecials[id];
        set_char('\n', first_char_id);
        for (int c = 32; c <= 126; ++c) set_char(char(c), first_char_id + 1 + (c - 32));
    }

    // Reserved ids exist so that the vocabulary can grow without changing the embedding's shape.
    static bool is_reserved(int id) {
        return (id >= num_named_specials && id < first_char_id) || id >= first_char_id + num_chars;
    }

    std::vector<int> encode(const std::string& text) const {
        std::vector<int> ids;
        ids.reserve(text.size());
        for (size_t pos = 0; pos < text.size();) {
            int special = named_special_at(text, pos);
            if (special >= 0) {
                ids.push_back(special);
                pos += strings_[special].size();
                continue;
            }
            unsigned char byte = text[pos];
            if (byte_to_id_[byte] < 0) {
                char message[96];
                std::snprintf(message, sizeof message, "Tokenizer::encode: byte 0x%02x at offset %zu has no token",
                              byte, pos);
                throw std::invalid_argument(message);
            }
            ids.push_back(byte_to_id_[byte]);
            ++pos;
        }
        return ids;
    }

    std::string decode(const int* ids, size_t n) const {
        std::string text;
        for (size_t i = 0; i < n; ++i) {
            check_id(ids[i], "Tokenizer::decode");
            text += strings_[ids[i]];
        }
        return text;
    }
    std::string decode(const std::vector<int>& ids) const { return decode(ids.data(), ids.size()); }

    const std::string& token_string(int id) const {
        check_id(id, "Tokenizer::token_string");
        return strings_[id];
    }

    // A tokenizer.json for Hugging Face `tokenizers`: every token sits in a BPE vocabulary without merges, so
    // plain text splits into characters; specials and reserved ids are added tokens, matched before the model.
    // No normalizer and no pre-tokenizer: the text reaches the model untouched, spaces and newlines included.
    std::string to_json() const {
        std::string json = "{\n  \"version\": \"1.0\",\n  \"truncation\": null,\n  \"padding\": null,\n";
        json += "  \"added_tokens\": [\n";
        bool first = true;
        for (int id = 0; id < vocab_size; ++id) {
            if (is_char(id)) continue;
            json += first ? "" : ",\n";
            json += "    {\"id\": " + std::to_string(id) + ", \"content\": " + json_quote(strings_[id]) +
                    ", \"single_word\": false, \"lstrip\": false, \"rstrip\": false, \"normalized\": false, "
                    "\"special\": true}";
            first = false;
        }
        json += "\n  ],\n  \"normalizer\": null,\n  \"pre_tokenizer\": null,\n  \"post_processor\": null,\n";
        json += "  \"decoder\": {\"type\": \"Fuse\"},\n";
        json +=
            "  \"model\": {\n    \"type\": \"BPE\",\n    \"dropout\": null,\n    \"unk_token\": null,\n"
            "    \"continuing_subword_prefix\": null,\n    \"end_of_word_suffix\": null,\n"
            "    \"fuse_unk\": false,\n    \"byte_fallback\": false,\n    \"ignore_merges\": false,\n";
        json += "    \"vocab\": {\n";
        for (int id = 0; id < vocab_size; ++id) {
            json += "      " + json_quote(strings_[id]) + ": " + std::to_string(id);
            json += id + 1 < vocab_size ? ",\n" : "\n";
        }
        json += "    },\n    \"merges\": []\n  }\n}\n";
        return json;
    }

   private:
    std::array<std::string, vocab_size> strings_;
    std::array<int, 256> byte_to_id_;  // -1 for bytes without a token

    void set_char(char c, int id) {
        strings_[id] = std::string(1, c);
        byte_to_id_[(unsigned char)c] = id;
    }
    static bool is_char(int id) { return id >= first_char_id && id < first_char_id + num_chars; }

    static void check_id(int id, const char* where) {
        if (id < 0 || id >= vocab_size)
            throw std::invalid_argument(std::string(where) + ": id " + std::to_string(id) + " is outside 0.." +
                                        std::to_string(vocab_size - 1));
    }
};

}  // namespace data
