// safetensors.h: the Hugging Face safetensors format (read and write) and crash-safe file and folder replacement.
//
// Layout of a file: 8 bytes little-endian N, then N bytes of JSON header (padded with spaces to a multiple of 8),
// then the data section. The header maps each tensor name to {"dtype", "shape", "data_offsets": [begin, end]}, offsets
// relative to the data section, tensors packed without gaps; "__metadata__" maps strings to strings.
// Files written here carry a "checksum" metadata entry (FNV-1a 64 of everything the header says and of the data
// section), so a corrupted or edited checkpoint fails on load instead of training on garbage or resuming at a step
// someone typed. Files without one (from other writers) load unchecked; where a file must be ours (a trainer state,
// a checkpoint's weights) the caller requires the checksum, so that deleting it turns nothing off.
//
// Every write goes to a temporary name, is fsynced, then renamed over the target: a crash at any moment leaves the
// old complete file or the new complete file, never a half-written one.
#pragma once

#include <fcntl.h>
#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <filesystem>
#include <map>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#include "json.h"

enum class DType { F32, BF16, F16, I32, I64, U8, F8_E4M3 };

inline size_t dtype_size(DType t) {
    switch (t) {
        case DType::F32:
            return 4;
        case DType::BF16:
            return 2;
        case DType::F16:
            return 2;
        case DType::I32:
            return 4;
        case DType::I64:
            return 8;
        case DType::U8:
            return 1;
        case DType::F8_E4M3:
            return 1;
    }
    throw std::runtime_error("dtype_size: invalid DType");
}

inline const char* dtype_name(DType t) {
    switch (t) {
        case DType::F32:
            return "F32";
        case DType::BF16:
            return "BF16";
        case DType::F16:
            return "F16";
        case DType::I32:
            return "I32";
        case DType::I64:
            return "I64";
        case DType::U8:
            return "U8";
        case DType::F8_E4M3:
            return "F8_E4M3";
    }
    throw std::runtime_error("dtype_name: invalid DType");
}

inline DType dtype_from_name(const std::string& name) {
    for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I32, DType::I64, DType::U8, DType::F8_E4M3})
        if (name == dtype_name(t)) return t;
    throw std::runtime_error("unknown dtype '" + name + "'");
}

inline std::string shape_string(const std::vector<int64_t>& shape) {
    std::string s = "[";
    for (size_t i = 0; i < shape.size(); i++) s += (i ? ", " : "") + std::to_string(shape[i]);
    return s + "]";
}

// Bytes of a tensor; throws on a negative dimension or a size that overflows (a hostile or corrupt header).
inline size_t tensor_bytes(DType dtype, const std::vector<int64_t>& shape) {
    size_t bytes = dtype_size(dtype);
    for (int64_t dim : shape) {
        if (dim < 0) throw std::runtime_error("negative dimension in shape " + shape_string(shape));
        if (dim != 0 && bytes > SIZE_MAX / size_t(dim))
            throw std::runtime_error("shape too large: " + shape_string(shape));
        bytes *= size_t(dim);
    }
    return bytes;
}

// Where a tensor lies in the data section, as a header describes it.
struct TensorEntry {
    DType dtype;
    std::vector<int64_t> shape;
    size_t offset, nbytes;
};

// A tensor to write: it points at host memory holding product(shape) * dtype_size(dtype) bytes.
struct TensorRef {
    std::string name;
    DType dtype;
    std::vector<int64_t> shape;
    const void* data;
};

namespace safetensors_detail {

[[noreturn]] inline void fail_io(const std::string& what, const std::string& path) {
    throw std::runtime_error(what + " '" + path + "': " + std::strerror(errno));
}

// FNV-1a, 64 bits: a few lines, no tables, and any flipped byte changes the result.
struct Fnv1a64 {
    uint64_t hash = 0xcbf29ce484222325ull;
    void update(const void* data, size_t n) {
        const uint8_t* p = static_cast<const uint8_t*>(data);
        for (size_t i = 0; i < n; i++) hash = (hash ^ p[i]) * 0x100000001b3ull;
    }
    std::string hex() const {
        char buf[17];
        std::snprintf(buf, sizeof buf, "%016llx", (unsigned long long)hash);
        return buf;
    }
};

// The checksum's start: the count of metadata entries and tensors, then every metadata entry but the checksum and
// every tensor's name, dtype, shape and place, in name order, each piece after its length; the data section follows.
// So no byte of a header that means anything can change unseen, whatever the header's spacing or key order.
inline Fnv1a64 header_digest(const std::map<std::string, TensorEntry>& tensors,
                             const std::map<std::string, std::string>& metadata) {
    Fnv1a64 h;
    auto piece = [&](const void* p, size_t n) {
        const uint64_t length = n;
        h.update(&length, sizeof length);
        h.update(p, n);
    };
    auto text = [&](const std::string& s) { piece(s.data(), s.size()); };
    const uint64_t counts[2] = {metadata.size() - metadata.count("checksum"), tensors.size()};
    piece(counts, sizeof counts);
    for (const auto& [key, value] : metadata)
        if (key != "checksum") text(key), text(value);
    for (const auto& [name, e] : tensors) {
        text(name), text(dtype_name(e.dtype));
        piece(e.shape.data(), e.shape.size() * sizeof(int64_t));
        const uint64_t place[2] = {e.offset, e.nbytes};
        piece(place, sizeof place);
    }
    return h;
}

inline std::string parent_directory(const std::string& path) {
    std::string parent = std::filesystem::path(path).parent_path().string();
    return parent.empty() ? "." : parent;
}

// Closes a POSIX file descriptor when it goes out of scope, also on the way out of an exception.
struct FileDescriptor {
    int fd;
    explicit FileDescriptor(int fd_) : fd(fd_) {}
    FileDescriptor(const FileDescriptor&) = delete;
    FileDescriptor& operator=(const FileDescriptor&) = delete;
    ~FileDescriptor() {
        if (fd >= 0) ::close(fd);
    }
};

// A rename is durable only once the directory holding the new entry is fsynced.
inline void fsync_directory(const std::string& dir) {
    FileDescriptor d(::open(dir.c_str(), O_RDONLY | O_DIRECTORY | O_CLOEXEC));
    if (d.fd < 0) fail_io("cannot open directory", dir);
    if (::fsync(d.fd) != 0) fail_io("cannot fsync directory", dir);
}

inline void read_exact(int fd, void* out, size_t n, const std::string& path) {
    char* p = static_cast<char*>(out);
    while (n > 0) {
        ssize_t got = ::read(fd, p, n);
        if (got < 0 && errno == EINTR) continue;
        if (got == 0) errno = EIO;  // the file shrank while being read
        if (got <= 0) fail_io("cannot read", path);
        p += got;
        n -= size_t(got);
    }
}

// Writes `path + ".tmp"`; commit() makes it durable and renames it over `path`. Destroyed without a commit (an
// exception on the way), it removes the temporary file and leaves `path` untouched.
class AtomicFileWriter {
   public:
    explicit AtomicFileWriter(std::string path) : path_(std::move(path)), tmp_path_(path_ + ".tmp") {
        fd_ = ::open(tmp_path_.c_str(), O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0644);
        if (fd_ < 0) fail_io("cannot create", tmp_path_);
    }
    AtomicFileWriter(const AtomicFileWriter&) = delete;
    AtomicFileWriter& operator=(const AtomicFileWriter&) = delete;
    ~AtomicFileWriter() {
        if (fd_ < 0) return;
        ::close(fd_);
        ::unlink(tmp_path_.c_str());
    }

    void write(const void* data, size_t n) {
        const char* p = static_cast<const char*>(data);
        while (n > 0) {  // write() may take fewer bytes than asked, or be interrupted by a signal
            ssize_t written = ::write(fd_, p, n);
            if (written < 0 && errno == EINTR) continue;
            if (written < 0) fail_io("cannot write", tmp_path_);
            p += written;
            n -= size_t(written);
        }
    }
    void write(const std::string& s) { write(s.data(), s.size()); }

    void commit() {
        if (::fsync(fd_) != 0) fail_io("cannot fsync", tmp_path_);
        if (::close(std::exchange(fd_, -1)) != 0) discard_and_fail("cannot close", tmp_path_);
        if (::rename(tmp_path_.c_str(), path_.c_str()) != 0)
            discard_and_fail("cannot rename '" + tmp_path_ + "' to", path_);
        fsync_directory(parent_directory(path_));
    }

   private:
    std::string path_, tmp_path_;
    int fd_ = -1;

    [[noreturn]] void discard_and_fail(const std::string& what, const std::string& path) const {
        int saved = errno;  // unlink must not overwrite the error being reported
        ::unlink(tmp_path_.c_str());
        errno = saved;
        fail_io(what, path);
    }
};

inline std::string little_endian_u64(uint64_t x) {
    std::string bytes(8, '\0');
    for (int i = 0; i < 8; i++) bytes[i] = char((x >> (8 * i)) & 0xFF);
    return bytes;
}

inline uint64_t read_little_endian_u64(const uint8_t* bytes) {
    uint64_t x = 0;
    for (int i = 7; i >= 0; i--) x = (x << 8) | bytes[i];
    return x;
}

// The data section's start stays 8-byte aligned, as the format asks, by padding the header with spaces.
inline std::string build_header(const std::vector<TensorRef>& tensors,
                                const std::map<std::string, std::string>& metadata) {
    Json header = Json::object();
    Json& meta = header["__metadata__"];
    meta = Json::object();
    for (const auto& [key, value] : metadata) meta[key] = value;
    size_t offset = 0;
    for (const TensorRef& t : tensors) {
        if (t.name == "__metadata__" || header.contains(t.name))
            throw std::runtime_error("write_safetensors: duplicate or reserved tensor name '" + t.name + "'");
        size_t bytes = tensor_bytes(t.dtype, t.shape);
        Json& entry = header[t.name];
        entry["dtype"] = dtype_name(t.dtype);
        entry["shape"] = Json::array();
        for (int64_t dim : t.shape) entry["shape"].push_back(dim);
        entry["data_offsets"].push_back(offset);
        entry["data_offsets"].push_back(offset + bytes);
        offset += bytes;
    }
    std::string text = header.dump();
    text.append((8 - text.size() % 8) % 8, ' ');
    return text;
}

}  // namespace safetensors_detail

// Writes the tensors (in the given order, tightly packed) and the metadata to `path`, atomically. The metadata
// gains a "checksum" entry computed here, replacing any passed in, so it always describes the file written.
inline void write_safetensors(const std::string& path, const std::vector<TensorRef>& tensors,
                              std::map<std::string, std::string> metadata) {
    using namespace safetensors_detail;
    metadata.erase("checksum");
    std::string header = build_header(tensors, metadata);  // refuses duplicate names
    std::map<std::string, TensorEntry> entries;
    size_t offset = 0;
    for (const TensorRef& t : tensors) {
        const size_t bytes = tensor_bytes(t.dtype, t.shape);
        entries[t.name] = {t.dtype, t.shape, offset, bytes};
        offset += bytes;
    }
    Fnv1a64 checksum = header_digest(entries, metadata);
    for (const TensorRef& t : tensors) checksum.update(t.data, tensor_bytes(t.dtype, t.shape));
    metadata["checksum"] = checksum.hex();
    header = build_header(tensors, metadata);

    AtomicFileWriter file(path);
    file.write(little_endian_u64(header.size()));
    file.write(header);
    for (const TensorRef& t : tensors) file.write(t.data, tensor_bytes(t.dtype, t.shape));
    file.commit();
}

// A loaded safetensors file: the parsed header and the whole data section in memory.
struct SafetensorsFile {
    using Entry = TensorEntry;  // its offset within `bytes`
    std::string path;
    std::map<std::string, Entry> tensors;
    std::map<std::string, std::string> metadata;
    std::vector<uint8_t> bytes;  // the whole data section

    static SafetensorsFile load(const std::string& path) {
        using namespace safetensors_detail;
        SafetensorsFile file;
        file.path = path;
        FileDescriptor in(::open(path.c_str(), O_RDONLY | O_CLOEXEC));
        if (in.fd < 0) fail_io("cannot open", path);
        struct stat st;
        if (::fstat(in.fd, &st) != 0) fail_io("cannot stat", path);
        uint64_t file_size = uint64_t(st.st_size);
        if (file_size < 8) file.fail("shorter than 8 bytes, not a safetensors file");

        uint8_t length_bytes[8];
        read_exact(in.fd, length_bytes, 8, path);
        uint64_t header_len = read_little_endian_u64(length_bytes);
        if (header_len > file_size - 8)
            file.fail("header length " + std::to_string(header_len) + " larger than the file (" +
                      std::to_string(file_size) + " bytes)");
        std::string header(header_len, '\0');
        read_exact(in.fd, header.data(), header_len, path);
        file.parse_header(header);

        file.bytes.resize(file_size - 8 - header_len);
        read_exact(in.fd, file.bytes.data(), file.bytes.size(), path);
        file.check_layout();
        file.check_checksum();
        return file;
    }

    const Entry& entry(const std::string& name) const {
        auto it = tensors.find(name);
        if (it == tensors.end()) throw std::runtime_error("tensor '" + name + "' not found in " + path);
        return it->second;
    }

    // Copies a tensor into `out` after checking that it has the dtype and shape the caller expects.
    void read(const std::string& name, DType dtype, const std::vector<int64_t>& shape, void* out) const {
        const Entry& e = entry(name);
        if (e.dtype != dtype)
            fail("tensor '" + name + "' has dtype " + dtype_name(e.dtype) + ", expected " + dtype_name(dtype));
        if (e.shape != shape)
            fail("tensor '" + name + "' has shape " + shape_string(e.shape) + ", expected " + shape_string(shape));
        if (e.nbytes > 0) std::memcpy(out, bytes.data() + e.offset, e.nbytes);
    }

    // For a file that must be ours: without its checksum it could have been edited unseen.
    void require_checksum() const {
        if (!metadata.count("checksum")) fail("no checksum: not a file this program wrote, or its header was edited");
    }

   private:
    [[noreturn]] void fail(const std::string& problem) const { throw std::runtime_error(path + ": " + problem); }

    void parse_header(const std::string& text) {
        Json header;
        try {
            header = Json::parse(text);
        } catch (const std::runtime_error& e) {
            fail(std::string("header is not valid JSON: ") + e.what());
        }
        try {  // a name twice is refused: a reader that took the first and one that took the last would disagree
            bool metadata_seen = false;
            for (const auto& [name, value] : header.as_object()) {
                if (name == "__metadata__") {
                    if (std::exchange(metadata_seen, true)) throw std::runtime_error("__metadata__ twice");
                    for (const auto& [key, v] : value.as_object())
                        if (!metadata.emplace(key, v.as_string()).second)
                            throw std::runtime_error("metadata key '" + key + "' twice");
                } else if (!tensors.emplace(name, parse_entry(name, value)).second) {
                    throw std::runtime_error("tensor '" + name + "' twice");
                }
            }
        } catch (const std::runtime_error& e) {
            fail(std::string("bad header: ") + e.what());
        }
    }

    static Entry parse_entry(const std::string& name, const Json& value) {
        try {
            Entry e;
            e.dtype = dtype_from_name(value.at("dtype").as_string());
            for (const Json& dim : value.at("shape").as_array()) e.shape.push_back(dim.as_long());
            const Json::Array& offsets = value.at("data_offsets").as_array();
            if (offsets.size() != 2) throw std::runtime_error("data_offsets must hold [begin, end]");
            long begin = offsets[0].as_long(), end = offsets[1].as_long();
            if (begin < 0 || end < begin) throw std::runtime_error("data_offsets out of order");
            e.offset = size_t(begin);
            e.nbytes = size_t(end - begin);
            size_t expected = tensor_bytes(e.dtype, e.shape);
            if (e.nbytes != expected)
                throw std::runtime_error("data_offsets span " + std::to_string(e.nbytes) + " bytes, but " +
                                         dtype_name(e.dtype) + " " + shape_string(e.shape) + " needs " +
                                         std::to_string(expected));
            return e;
        } catch (const std::runtime_error& err) {
            throw std::runtime_error("tensor '" + name + "': " + err.what());
        }
    }

    // The tensors must tile the data section exactly: from byte 0, each starting where the previous ended, the
    // last ending at the end of the file. Anything else is an overlap, a hole, a truncated or an overlong file.
    void check_layout() const {
        std::vector<std::pair<std::string, const Entry*>> by_offset;
        for (const auto& [name, e] : tensors) by_offset.emplace_back(name, &e);
        auto span = [](const auto& named) { return std::make_pair(named.second->offset, named.second->nbytes); };
        std::sort(by_offset.begin(), by_offset.end(), [&](const auto& a, const auto& b) { return span(a) < span(b); });
        size_t end = 0;
        for (size_t i = 0; i < by_offset.size(); i++) {
            const Entry& e = *by_offset[i].second;
            if (e.offset < end)
                fail("tensors '" + by_offset[i - 1].first + "' and '" + by_offset[i].first + "' overlap");
            if (e.offset > end) fail("hole in the data section before tensor '" + by_offset[i].first + "'");
            end = e.offset + e.nbytes;
        }
        if (end > bytes.size())
            fail("truncated: the header describes " + std::to_string(end) + " data bytes, the file holds " +
                 std::to_string(bytes.size()));
        if (end < bytes.size()) fail(std::to_string(bytes.size() - end) + " bytes after the last tensor");
    }

    void check_checksum() const {
        auto it = metadata.find("checksum");
        if (it == metadata.end()) return;
        safetensors_detail::Fnv1a64 checksum = safetensors_detail::header_digest(tensors, metadata), data_only;
        checksum.update(bytes.data(), bytes.size());
        if (checksum.hex() == it->second) return;
        data_only.update(bytes.data(), bytes.size());
        if (data_only.hex() == it->second)
            fail("its checksum covers the data alone, as earlier versions of this program wrote it, so its header "
                 "cannot be trusted; train it again");
        fail("corrupt or edited: checksum mismatch (recorded " + it->second + ", computed " + checksum.hex() + ")");
    }
};

// Writes `content` to `path` with the same temporary file, fsync and rename as the tensors (config.json,
// tokenizer.json, trainer state).
inline void write_file_atomic(const std::string& path, const std::string& content) {
    safetensors_detail::AtomicFileWriter file(path);
    file.write(content);
    file.commit();
}

// Puts a checkpoint folder written completely under `tmp_dir` in place of `final_dir`. The old folder is renamed
// aside to `final_dir + ".old"` first and deleted last, so after a crash at any point the disk holds the old
// checkpoint or the new one, complete, under one of those names (and a stale ".old" is cleared on the next call).
inline void replace_directory_atomic(const std::string& tmp_dir, const std::string& final_dir) {
    namespace fs = std::filesystem;
    auto check = [](const std::error_code& ec, const std::string& what, const std::string& path) {
        if (ec) throw std::runtime_error(what + " '" + path + "': " + ec.message());
    };
    fs::path final_path = fs::path(final_dir);
    if (!final_path.has_filename()) final_path = final_path.parent_path();  // "ckpt/" names the folder "ckpt"
    std::string final_name = final_path.string(), aside = final_name + ".old";
    std::error_code ec;

    if (!fs::is_directory(tmp_dir, ec))
        throw std::runtime_error("replace_directory_atomic: no folder '" + tmp_dir + "'");
    safetensors_detail::fsync_directory(tmp_dir);
    if (fs::exists(final_path, ec)) {
        fs::remove_all(aside, ec);
        check(ec, "cannot remove", aside);
        fs::rename(final_path, aside, ec);
        check(ec, "cannot rename '" + final_name + "' to", aside);
    }
    fs::rename(tmp_dir, final_path, ec);
    check(ec, "cannot rename '" + tmp_dir + "' to", final_name);
    safetensors_detail::fsync_directory(safetensors_detail::parent_directory(final_name));
    fs::remove_all(aside, ec);
    check(ec, "cannot remove", aside);
}

// After a crash between the two renames of replace_directory_atomic, final_dir is missing and final_dir + ".old"
// holds the last complete checkpoint: put it back under its name, so that loading and resuming find it.
inline void recover_directory(const std::string& final_dir) {
    namespace fs = std::filesystem;
    fs::path final_path = fs::path(final_dir);
    if (!final_path.has_filename()) final_path = final_path.parent_path();
    std::string aside = final_path.string() + ".old";
    std::error_code ec;
    if (fs::exists(final_path, ec) || !fs::is_directory(aside, ec)) return;
    fs::rename(aside, final_path, ec);
    if (ec && !fs::exists(final_path))  // another rank of a data-parallel run may have put it back first
        throw std::runtime_error("cannot rename '" + aside + "' back to '" + final_path.string() +
                                 "': " + ec.message());
}
