// json.h: a minimal JSON value with a strict parser and a writer, for config.json, tokenizer.json, safetensors
// headers and the JSONL training log.
//
// Numbers are doubles, as in JavaScript; integers up to 2^53 survive a round trip exactly and are written without
// a decimal point, so tensor offsets and token ids stay integers on disk. Objects keep their insertion order, so a
// written config reads in the order it was built.
#pragma once

#include <cmath>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <stdexcept>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

struct Json {
    enum class Type { Null, Bool, Number, String, Array, Object };
    using Array = std::vector<Json>;
    using Object = std::vector<std::pair<std::string, Json>>;

    Json() = default;
    Json(bool b) : type_(Type::Bool), boolean_(b) {}
    template <typename Integer, typename = std::enable_if_t<std::is_integral_v<Integer>>>
    Json(Integer x) : type_(Type::Number), number_(double(x)), integer_(true) {}
    Json(double x) : type_(Type::Number), number_(x) {}
    Json(const char* s) : type_(Type::String), string_(s) {}
    Json(std::string s) : type_(Type::String), string_(std::move(s)) {}

    static Json array() {
        Json j;
        j.type_ = Type::Array;
        return j;
    }
    static Json object() {
        Json j;
        j.type_ = Type::Object;
        return j;
    }

    static Json parse(const std::string& text);
    std::string dump(int indent = -1) const {
        std::string out;
        dump_to(out, indent, 0);
        return out;
    }

    // A null value becomes an array or object on first use, so nested values can be built in place:
    // config["rope_scaling"]["factor"] = 40.
    void push_back(Json value) {
        if (type_ == Type::Null) type_ = Type::Array;
        require(Type::Array);
        array_.push_back(std::move(value));
    }
    Json& operator[](const std::string& key) {
        if (type_ == Type::Null) type_ = Type::Object;
        require(Type::Object);
        for (auto& [k, v] : object_)
            if (k == key) return v;
        object_.emplace_back(key, Json());
        return object_.back().second;
    }

    const Json& at(const std::string& key) const {
        if (const Json* v = find(key)) return *v;
        throw std::runtime_error("json: missing key '" + key + "'");
    }
    bool contains(const std::string& key) const { return find(key) != nullptr; }

    bool is_null() const { return type_ == Type::Null; }
    Type type() const { return type_; }

    bool as_bool() const {
        require(Type::Bool);
        return boolean_;
    }
    double as_number() const {
        require(Type::Number);
        return number_;
    }
    const std::string& as_string() const {
        require(Type::String);
        return string_;
    }
    const Array& as_array() const {
        require(Type::Array);
        return array_;
    }
    const Object& as_object() const {
        require(Type::Object);
        return object_;
    }
    long as_long() const { return long(as_integer(-9007199254740992.0, 9007199254740992.0)); }
    int as_int() const { return int(as_integer(-2147483648.0, 2147483647.0)); }

    bool operator==(const Json& o) const {
        if (type_ != o.type_) return false;
        switch (type_) {
            case Type::Null:
                return true;
            case Type::Bool:
                return boolean_ == o.boolean_;
            case Type::Number:
                return number_ == o.number_;
            case Type::String:
                return string_ == o.string_;
            case Type::Array:
                return array_ == o.array_;
            case Type::Object:
                return object_ == o.object_;
        }
        return false;
    }
    bool operator!=(const Json& o) const { return !(*this == o); }

    static const char* type_name(Type t) {
        static const char* names[] = {"null", "bool", "number", "string", "array", "object"};
        return names[int(t)];
    }

   private:
    struct Parser;

    Type type_ = Type::Null;
    bool boolean_ = false;
    double number_ = 0;
    bool integer_ = false;  // written without a fraction; a double keeps one ("1.0"), as typed readers expect
    std::string string_;
    Array array_;
    Object object_;

    void require(Type expected) const {
        if (type_ != expected)
            throw std::runtime_error(std::string("json: expected ") + type_name(expected) + ", found " +
                                     type_name(type_));
    }

    double as_integer(double lo, double hi) const {
        double x = as_number();
        if (x != std::trunc(x) || x < lo || x > hi)
            throw std::runtime_error("json: expected an integer in [" + format_number(lo) + ", " + format_number(hi) +
                                     "], found " + format_number(x));
        return x;
    }

    const Json* find(const std::string& key) const {
        require(Type::Object);
        for (const auto& [k, v] : object_)
            if (k == key) return &v;
        return nullptr;
    }

    // Integers (exact in a double up to 2^53) are written as integers. Other values take the fewest significant
    // digits that read back to the same double (0.1 stays "0.1", not "0.10000000000000001"), and a whole-valued
    // double keeps a fraction ("1.0"): strict readers such as transformers' configs tell 1 from 1.0.
    static std::string format_number(double x, bool integer = true) {
        char buf[40];
        if (!std::isfinite(x)) return "null";  // JSON has no NaN or infinity; null keeps a log line parseable
        bool whole = x == std::trunc(x) && std::fabs(x) <= 9007199254740992.0;
        if (whole) {
            std::snprintf(buf, sizeof buf, integer ? "%lld" : "%lld.0", (long long)x);
            return buf;
        }
        for (int digits = 15; digits <= 17; digits++) {
            std::snprintf(buf, sizeof buf, "%.*g", digits, x);
            if (std::strtod(buf, nullptr) == x) break;
        }
        return buf;
    }

    static void dump_string(std::string& out, const std::string& s) {
        out += '"';
        for (char c : s) {
            switch (c) {
                case '"':
                    out += "\\\"";
                    break;
                case '\\':
                    out += "\\\\";
                    break;
                case '\b':
                    out += "\\b";
                    break;
                case '\f':
                    out += "\\f";
                    break;
                case '\n':
                    out += "\\n";
                    break;
                case '\r':
                    out += "\\r";
                    break;
                case '\t':
                    out += "\\t";
                    break;
                default:
                    if (static_cast<unsigned char>(c) < 0x20) {
                        char buf[8];
                        std::snprintf(buf, sizeof buf, "\\u%04x", c);
                        out += buf;
                    } else {
                        out += c;  // UTF-8 bytes pass through unchanged
                    }
            }
        }
        out += '"';
    }

    static void new_line(std::string& out, int indent, int level) {
        if (indent < 0) return;
        out += '\n';
        out.append(size_t(indent) * level, ' ');
    }

    void dump_to(std::string& out, int indent, int level) const {
        switch (type_) {
            case Type::Null:
                out += "null";
                break;
            case Type::Bool:
                out += boolean_ ? "true" : "false";
                break;
            case Type::Number:
                out += format_number(number_, integer_);
                break;
            case Type::String:
                dump_string(out, string_);
                break;
            case Type::Array:
                out += '[';
                for (size_t i = 0; i < array_.size(); i++) {
                    if (i) out += ',';
                    new_line(out, indent, level + 1);
                    array_[i].dump_to(out, indent, level + 1);
                }
                if (!array_.empty()) new_line(out, indent, level);
                out += ']';
                break;
            case Type::Object:
                out += '{';
                for (size_t i = 0; i < object_.size(); i++) {
                    if (i) out += ',';
                    new_line(out, indent, level + 1);
                    dump_string(out, object_[i].first);
                    out += indent < 0 ? ":" : ": ";
                    object_[i].second.dump_to(out, indent, level + 1);
                }
                if (!object_.empty()) new_line(out, indent, level);
                out += '}';
                break;
        }
    }
};

// A recursive-descent parser of RFC 8259 JSON. Every error names the problem and the byte offset where it was
// found, so a hand-edited config points at its own mistake.
struct Json::Parser {
    static constexpr int max_depth = 64;  // deeper input is malformed here, and must not overflow the stack

    const std::string& text;
    size_t pos = 0;
    int depth = 0;

    [[noreturn]] void fail(const std::string& problem, size_t at) const {
        throw std::runtime_error("json: " + problem + " at byte " + std::to_string(at));
    }

    [[noreturn]] void fail_unexpected() const {
        if (pos >= text.size()) fail("unexpected end of input", pos);
        fail(std::string("unexpected character '") + text[pos] + "'", pos);
    }

    void skip_whitespace() {
        while (pos < text.size() && (text[pos] == ' ' || text[pos] == '\t' || text[pos] == '\n' || text[pos] == '\r'))
            pos++;
    }

    bool consume(char c) {
        skip_whitespace();
        if (pos < text.size() && text[pos] == c) {
            pos++;
            return true;
        }
        return false;
    }

    void expect(char c) {
        if (!consume(c)) fail_unexpected();
    }

    Json parse_document() {
        Json value = parse_value();
        skip_whitespace();
        if (pos != text.size()) fail("trailing characters after the value", pos);
        return value;
    }

    Json parse_value() {
        skip_whitespace();
        if (pos >= text.size()) fail_unexpected();
        char c = text[pos];
        if (c == '{' || c == '[') return parse_container(c);
        if (c == '"') return Json(parse_string());
        if (c == '-' || (c >= '0' && c <= '9')) return parse_number();
        if (consume_word("true")) return Json(true);
        if (consume_word("false")) return Json(false);
        if (consume_word("null")) return Json();
        fail_unexpected();
    }

    bool consume_word(const std::string& word) {
        if (text.compare(pos, word.size(), word) != 0) return false;
        pos += word.size();
        return true;
    }

    Json parse_container(char open) {
        if (++depth > max_depth) fail("nesting deeper than " + std::to_string(max_depth), pos);
        pos++;
        Json result = open == '[' ? parse_array_items() : parse_object_members();
        depth--;
        return result;
    }

    Json parse_array_items() {
        Json array = Json::array();
        if (consume(']')) return array;
        do {
            array.array_.push_back(parse_value());
        } while (consume(','));
        expect(']');
        return array;
    }

    // Duplicate keys are kept as written (RFC 8259 leaves them undefined); lookups find the first.
    Json parse_object_members() {
        Json object = Json::object();
        if (consume('}')) return object;
        do {
            skip_whitespace();
            if (pos >= text.size() || text[pos] != '"') fail_unexpected();
            std::string key = parse_string();
            expect(':');
            object.object_.emplace_back(std::move(key), parse_value());
        } while (consume(','));
        expect('}');
        return object;
    }

    Json parse_number() {
        size_t start = pos;
        auto digits = [&] {
            size_t first = pos;
            while (pos < text.size() && text[pos] >= '0' && text[pos] <= '9') pos++;
            if (pos == first) fail("expected a digit in number", pos);
        };
        if (text[pos] == '-') pos++;
        if (pos < text.size() && text[pos] == '0')
            pos++;  // a leading zero stands alone: "012" is not JSON
        else
            digits();
        if (pos < text.size() && text[pos] == '.') pos++, digits();
        if (pos < text.size() && (text[pos] == 'e' || text[pos] == 'E')) {
            pos++;
            if (pos < text.size() && (text[pos] == '+' || text[pos] == '-')) pos++;
            digits();
        }
        std::string literal = text.substr(start, pos - start);
        Json number(std::strtod(literal.c_str(), nullptr));
        number.integer_ = literal.find_first_of(".eE") == std::string::npos;
        return number;
    }

    uint32_t parse_hex4() {
        if (pos + 4 > text.size()) fail("truncated \\u escape", pos);
        uint32_t value = 0;
        for (int i = 0; i < 4; i++, pos++) {
            char c = text[pos];
            int digit = c >= '0' && c <= '9'   ? c - '0'
                        : c >= 'a' && c <= 'f' ? c - 'a' + 10
                        : c >= 'A' && c <= 'F' ? c - 'A' + 10
                                               : -1;
            if (digit < 0) fail("bad hex digit in \\u escape", pos);
            value = value * 16 + uint32_t(digit);
        }
        return value;
    }

    // Code points beyond the BMP arrive as a UTF-16 surrogate pair: "\ud83d\ude00".
    uint32_t parse_code_point() {
        size_t start = pos - 2;
        uint32_t high = parse_hex4();
        if (high >= 0xDC00 && high <= 0xDFFF) fail("unpaired low surrogate in \\u escape", start);
        if (high < 0xD800 || high > 0xDBFF) return high;
        if (text.compare(pos, 2, "\\u") != 0) fail("unpaired high surrogate in \\u escape", start);
        pos += 2;
        uint32_t low = parse_hex4();
        if (low < 0xDC00 || low > 0xDFFF) fail("unpaired high surrogate in \\u escape", start);
        return 0x10000 + ((high - 0xD800) << 10) + (low - 0xDC00);
    }

    static void append_utf8(std::string& out, uint32_t cp) {
        if (cp < 0x80) {
            out += char(cp);
        } else if (cp < 0x800) {
            out += char(0xC0 | (cp >> 6));
            out += char(0x80 | (cp & 0x3F));
        } else if (cp < 0x10000) {
            out += char(0xE0 | (cp >> 12));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        } else {
            out += char(0xF0 | (cp >> 18));
            out += char(0x80 | ((cp >> 12) & 0x3F));
            out += char(0x80 | ((cp >> 6) & 0x3F));
            out += char(0x80 | (cp & 0x3F));
        }
    }

    std::string parse_string() {
        size_t start = pos++;
        std::string out;
        while (true) {
            if (pos >= text.size()) fail("unterminated string starting", start);
            char c = text[pos++];
            if (c == '"') return out;
            if (static_cast<unsigned char>(c) < 0x20) fail("unescaped control character in string", pos - 1);
            if (c != '\\') {
                out += c;
                continue;
            }
            if (pos >= text.size()) fail("unterminated string starting", start);
            char e = text[pos++];
            switch (e) {
                case '"':
                    out += '"';
                    break;
                case '\\':
                    out += '\\';
                    break;
                case '/':
                    out += '/';
                    break;
                case 'b':
                    out += '\b';
                    break;
                case 'f':
                    out += '\f';
                    break;
                case 'n':
                    out += '\n';
                    break;
                case 'r':
                    out += '\r';
                    break;
                case 't':
                    out += '\t';
                    break;
                case 'u':
                    append_utf8(out, parse_code_point());
                    break;
                default:
                    fail(std::string("bad escape '\\") + e + "'", pos - 2);
            }
        }
    }
};

inline Json Json::parse(const std::string& text) { return Parser{text}.parse_document(); }

// A log of one JSON object per line, flushed as each is written, so that a crash loses no finished record.
struct JsonlLog {
    std::ofstream file;
    // Appending (a resumed run), a last line cut short by a kill mid-write is dropped first, so that every line
    // stays one record.
    JsonlLog(const std::string& path, bool append) {
        if (append) drop_partial_line(path);
        file.open(path, append ? std::ios::app : std::ios::trunc);
        if (!file) throw std::runtime_error("cannot open log file " + path);
    }
    static void drop_partial_line(const std::string& path) {
        std::ifstream in(path, std::ios::binary);
        if (!in) return;
        const std::string text((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
        if (text.empty() || text.back() == '\n') return;
        const size_t last = text.rfind('\n');
        std::filesystem::resize_file(path, last == std::string::npos ? 0 : last + 1);
    }
    void write(const Json& record) {
        file << record.dump() << "\n";
        file.flush();
    }
};
