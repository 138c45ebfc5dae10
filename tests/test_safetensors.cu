// Tests of safetensors.h: bit-exact round trips, the on-disk layout, every corruption the loader must refuse, and the
// atomic file and folder replacement.
#include <doctest/doctest.h>
#include <stdlib.h>

#include <cstring>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "../io/safetensors.h"

namespace fs = std::filesystem;

namespace {

// A fresh folder under /tmp, removed with everything in it at the end of the test.
struct TempDir {
    std::string path;
    TempDir() {
        char name[] = "/tmp/test_safetensors_XXXXXX";
        REQUIRE(mkdtemp(name) != nullptr);
        path = name;
    }
    ~TempDir() { fs::remove_all(path); }
    std::string operator/(const std::string& name) const { return path + "/" + name; }
};

std::string read_bytes(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    return std::string(std::istreambuf_iterator<char>(in), std::istreambuf_iterator<char>());
}

void write_bytes(const std::string& path, const std::string& bytes) {
    std::ofstream out(path, std::ios::binary | std::ios::trunc);
    out.write(bytes.data(), long(bytes.size()));
}

// A file in the safetensors layout with any header text, for headers the writer would never produce.
void write_raw_safetensors(const std::string& path, const std::string& header, const std::string& data) {
    std::string length(8, '\0');
    for (int i = 0; i < 8; i++) length[i] = char((header.size() >> (8 * i)) & 0xFF);
    write_bytes(path, length + header + data);
}

struct SampleTensors {
    std::vector<float> weight = {1.0f, -2.5f, 3.25f, 1e-30f, -0.0f, 65504.0f};  // F32 [2, 3]
    std::vector<uint16_t> norm = {0x3F80, 0xBF80, 0x7F80, 0x0001};              // BF16 [4]: 1, -1, inf, denormal
    std::vector<int32_t> ids = {7, -1, 2147483647};                             // I32 [3]

    std::vector<TensorRef> refs() const {
        return {{"model.layers.0.mlp.gate.weight", DType::F32, {2, 3}, weight.data()},
                {"model.norm.weight", DType::BF16, {4}, norm.data()},
                {"token_ids", DType::I32, {3}, ids.data()},
                {"empty", DType::F32, {0, 4}, nullptr}};
    }
    std::string data_section() const {
        return std::string(reinterpret_cast<const char*>(weight.data()), weight.size() * 4) +
               std::string(reinterpret_cast<const char*>(norm.data()), norm.size() * 2) +
               std::string(reinterpret_cast<const char*>(ids.data()), ids.size() * 4);
    }
};

// A valid header for one F32 tensor "w" of shape [2] (8 bytes of data), to be bent in one place per test.
std::string one_tensor_header(const std::string& dtype, const std::string& shape, const std::string& offsets) {
    return R"({"w":{"dtype":")" + dtype + R"(","shape":)" + shape + R"(,"data_offsets":)" + offsets + "}}";
}

}  // namespace

TEST_SUITE("checkpoint") {
    TEST_CASE("safetensors: F32, BF16 and I32 tensors and metadata load back bit-identical") {
        TempDir dir;
        SampleTensors sample;
        std::string path = dir / "model.safetensors";
        write_safetensors(path, sample.refs(), {{"format", "pt"}, {"step", "1200"}});

        SafetensorsFile file = SafetensorsFile::load(path);
        CHECK(file.tensors.size() == 4);
        CHECK(file.metadata.at("format") == "pt");
        CHECK(file.metadata.at("step") == "1200");
        CHECK(file.metadata.at("checksum").size() == 16);

        std::vector<float> weight(6);
        std::vector<uint16_t> norm(4);
        std::vector<int32_t> ids(3);
        file.read("model.layers.0.mlp.gate.weight", DType::F32, {2, 3}, weight.data());
        file.read("model.norm.weight", DType::BF16, {4}, norm.data());
        file.read("token_ids", DType::I32, {3}, ids.data());
        CHECK(std::memcmp(weight.data(), sample.weight.data(), 24) == 0);  // bits, so -0.0 and 1e-30 count too
        CHECK(norm == sample.norm);
        CHECK(ids == sample.ids);
        CHECK(file.entry("empty").nbytes == 0);
        CHECK(file.entry("empty").shape == std::vector<int64_t>{0, 4});
    }

    TEST_CASE("safetensors: the file has the documented layout") {
        TempDir dir;
        SampleTensors sample;
        std::string path = dir / "model.safetensors";
        write_safetensors(path, sample.refs(), {});
        std::string bytes = read_bytes(path);

        uint64_t header_len = 0;
        for (int i = 7; i >= 0; i--) header_len = (header_len << 8) | uint8_t(bytes[i]);
        CHECK(header_len % 8 == 0);
        std::string data = sample.data_section();
        REQUIRE(bytes.size() == 8 + header_len + data.size());
        CHECK(bytes.substr(8 + header_len) == data);

        Json header = Json::parse(bytes.substr(8, header_len));
        CHECK(header.at("__metadata__").at("checksum").as_string().size() == 16);
        const Json& weight = header.at("model.layers.0.mlp.gate.weight");
        CHECK(weight.at("dtype").as_string() == "F32");
        CHECK(weight.at("shape").dump() == "[2,3]");
        CHECK(weight.at("data_offsets").dump() == "[0,24]");
        CHECK(header.at("model.norm.weight").at("dtype").as_string() == "BF16");
        CHECK(header.at("model.norm.weight").at("data_offsets").dump() == "[24,32]");
        CHECK(header.at("token_ids").at("dtype").as_string() == "I32");
        CHECK(header.at("token_ids").at("data_offsets").dump() == "[32,44]");
        CHECK(header.at("empty").at("data_offsets").dump() == "[44,44]");
    }

    TEST_CASE("safetensors: dtype names and sizes") {
        for (DType t : {DType::F32, DType::BF16, DType::F16, DType::I32, DType::I64, DType::U8, DType::F8_E4M3})
            CHECK(dtype_from_name(dtype_name(t)) == t);
        CHECK(dtype_size(DType::F32) == 4);
        CHECK(dtype_size(DType::BF16) == 2);
        CHECK(dtype_size(DType::I64) == 8);
        CHECK(dtype_size(DType::F8_E4M3) == 1);
        CHECK_THROWS_WITH_AS(dtype_from_name("F4"), doctest::Contains("unknown dtype 'F4'"), std::runtime_error);
    }

    TEST_CASE("safetensors: corrupt or malformed files are refused with a message naming the file") {
        TempDir dir;
        SampleTensors sample;
        std::string good = dir / "good.safetensors", bad = dir / "bad.safetensors";
        write_safetensors(good, sample.refs(), {});
        std::string bytes = read_bytes(good);
        auto refused = [&](const std::string& contents, const std::string& message) {
            write_bytes(bad, contents);
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad), doctest::Contains((bad + ": " + message).c_str()),
                                 std::runtime_error);
        };

        SUBCASE("truncated by one byte") { refused(bytes.substr(0, bytes.size() - 1), "truncated"); }
        SUBCASE("a trailing byte") { refused(bytes + "x", "1 bytes after the last tensor"); }
        SUBCASE("a flipped data byte") {
            bytes[bytes.size() - 5] ^= 0x10;
            refused(bytes, "corrupt or edited: checksum mismatch");
        }
        SUBCASE("header length larger than the file") {
            bytes.replace(0, 8, std::string("\0\0\0\0\0\1\0\0", 8));  // 2^40, little-endian
            refused(bytes, "header length 1099511627776 larger than the file");
        }
        SUBCASE("shorter than 8 bytes") { refused("abc", "shorter than 8 bytes"); }
        SUBCASE("garbage header") {
            write_raw_safetensors(bad, "this is no json", "");
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad), doctest::Contains("header is not valid JSON"),
                                 std::runtime_error);
        }
        SUBCASE("unknown dtype") {
            write_raw_safetensors(bad, one_tensor_header("F33", "[2]", "[0,8]"), std::string(8, '\0'));
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad), doctest::Contains("tensor 'w': unknown dtype 'F33'"),
                                 std::runtime_error);
        }
        SUBCASE("offsets not matching the shape") {
            write_raw_safetensors(bad, one_tensor_header("F32", "[3]", "[0,8]"), std::string(8, '\0'));
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad),
                                 doctest::Contains("data_offsets span 8 bytes, but F32 [3] needs 12"),
                                 std::runtime_error);
        }
        SUBCASE("offsets past the data section") {
            write_raw_safetensors(bad, one_tensor_header("F32", "[2]", "[4,12]"), std::string(12, '\0'));
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad),
                                 doctest::Contains("hole in the data section before tensor 'w'"), std::runtime_error);
            write_raw_safetensors(bad, one_tensor_header("F32", "[2]", "[0,8]"), std::string(4, '\0'));
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad), doctest::Contains("truncated"), std::runtime_error);
        }
        SUBCASE("overlapping tensors") {
            std::string header = R"({"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},)"
                                 R"("b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}})";
            write_raw_safetensors(bad, header, std::string(12, '\0'));
            CHECK_THROWS_WITH_AS(SafetensorsFile::load(bad), doctest::Contains("tensors 'a' and 'b' overlap"),
                                 std::runtime_error);
        }
        SUBCASE("missing file") {
            CHECK_THROWS_WITH_AS(
                SafetensorsFile::load(dir / "none.safetensors"),
                doctest::Contains(
                    ("cannot open '" + (dir / "none.safetensors") + "': No such file or directory").c_str()),
                std::runtime_error);
        }
    }

    TEST_CASE("safetensors: the checksum covers the header; an edited or unchecked file of ours is refused") {
        TempDir dir;
        SampleTensors sample;
        std::string path = dir / "state.safetensors";
        write_safetensors(path, sample.refs(), {{"step", "100"}, {"seed", "7"}});
        const std::string bytes = read_bytes(path);
        CHECK_NOTHROW(SafetensorsFile::load(path).require_checksum());
        auto edited = [&](const std::string& from, const std::string& to) {
            std::string b = bytes;
            const size_t at = b.find(from);
            REQUIRE(at != std::string::npos);
            b.replace(at, from.size(), to);  // the same length: the header stays well formed
            write_bytes(path, b);
        };
        edited(R"("step":"100")", R"("step":"350")");
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("corrupt or edited: checksum mismatch"),
                             std::runtime_error);
        edited(R"("shape":[2,3])", R"("shape":[3,2])");  // same bytes, another shape
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("checksum mismatch"), std::runtime_error);
        // a file of an earlier version: its checksum of the data alone is refused with a message that says so
        write_bytes(path, bytes);
        const SafetensorsFile original = SafetensorsFile::load(path);
        safetensors_detail::Fnv1a64 data_only;
        data_only.update(original.bytes.data(), original.bytes.size());
        edited(original.metadata.at("checksum"), data_only.hex());
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("covers the data alone"),
                             std::runtime_error);
        edited(R"("checksum")", R"("checksuX")");  // the check turned off by a renamed key
        SafetensorsFile unchecked = SafetensorsFile::load(path);  // loads as another writer's file would
        CHECK_THROWS_WITH_AS(unchecked.require_checksum(), doctest::Contains("no checksum"), std::runtime_error);
    }

    TEST_CASE("safetensors: a name twice in a header is refused") {
        TempDir dir;
        std::string path = dir / "twice.safetensors";
        write_raw_safetensors(path,
                              R"({"w":{"dtype":"F32","shape":[1],"data_offsets":[0,4]},)"
                              R"("w":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}})",
                              std::string(8, '\0'));
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("tensor 'w' twice"), std::runtime_error);
        write_raw_safetensors(path, R"({"__metadata__":{"step":"1","step":"9"}})", "");
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("metadata key 'step' twice"),
                             std::runtime_error);
        write_raw_safetensors(path, R"({"__metadata__":{"a":"1"},"__metadata__":{"b":"2"}})", "");
        CHECK_THROWS_WITH_AS(SafetensorsFile::load(path), doctest::Contains("__metadata__ twice"), std::runtime_error);
    }

    TEST_CASE("safetensors: a zero-size tensor reads without touching memory") {
        TempDir dir;
        std::string path = dir / "empty.safetensors";
        write_safetensors(path, {{"nothing", DType::F32, {0}, nullptr}}, {});
        SafetensorsFile file = SafetensorsFile::load(path);
        CHECK_NOTHROW(file.read("nothing", DType::F32, {0}, nullptr));
    }

    TEST_CASE("safetensors: a file from another writer, without a checksum, loads") {
        TempDir dir;
        std::string path = dir / "hf.safetensors";
        float values[2] = {0.5f, -4.0f};
        write_raw_safetensors(path, one_tensor_header("F32", "[2]", "[0,8]"),
                              std::string(reinterpret_cast<const char*>(values), 8));
        SafetensorsFile file = SafetensorsFile::load(path);
        float back[2];
        file.read("w", DType::F32, {2}, back);
        CHECK(back[0] == 0.5f);
        CHECK(back[1] == -4.0f);
        CHECK(file.metadata.empty());
    }

    TEST_CASE("safetensors: reading a missing tensor, a wrong shape or a wrong dtype throws") {
        TempDir dir;
        SampleTensors sample;
        std::string path = dir / "model.safetensors";
        write_safetensors(path, sample.refs(), {});
        SafetensorsFile file = SafetensorsFile::load(path);
        std::vector<float> out(6);

        CHECK_THROWS_WITH_AS(file.read("lm_head.weight", DType::F32, {2, 3}, out.data()),
                             doctest::Contains(("tensor 'lm_head.weight' not found in " + path).c_str()),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(file.read("model.layers.0.mlp.gate.weight", DType::F32, {3, 2}, out.data()),
                             doctest::Contains("tensor 'model.layers.0.mlp.gate.weight' has shape [2, 3], "
                                               "expected [3, 2]"),
                             std::runtime_error);
        CHECK_THROWS_WITH_AS(file.read("model.norm.weight", DType::F32, {4}, out.data()),
                             doctest::Contains("tensor 'model.norm.weight' has dtype BF16, expected F32"),
                             std::runtime_error);
    }

    TEST_CASE("safetensors: the writer refuses duplicate tensor names") {
        TempDir dir;
        float x = 1.0f;
        std::vector<TensorRef> twice = {{"w", DType::F32, {1}, &x}, {"w", DType::F32, {1}, &x}};
        CHECK_THROWS_WITH_AS(write_safetensors(dir / "m.safetensors", twice, {}),
                             doctest::Contains("duplicate or reserved tensor name 'w'"), std::runtime_error);
        CHECK_FALSE(fs::exists(dir / "m.safetensors"));
        CHECK_FALSE(fs::exists(dir / "m.safetensors.tmp"));
    }

    TEST_CASE("atomic writes replace the file and leave no temporary behind") {
        TempDir dir;
        std::string config = dir / "config.json";
        write_file_atomic(config, "{\"old\": true}");
        write_file_atomic(config, "{\"new\": true}");
        CHECK(read_bytes(config) == "{\"new\": true}");
        CHECK_FALSE(fs::exists(config + ".tmp"));

        SampleTensors sample;
        std::string model = dir / "model.safetensors";
        write_bytes(model, "stale");
        write_safetensors(model, sample.refs(), {});
        CHECK(SafetensorsFile::load(model).tensors.size() == 4);
        CHECK_FALSE(fs::exists(model + ".tmp"));
        CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 2);

        std::string unreachable = dir / "no_such_folder/config.json";
        CHECK_THROWS_WITH_AS(write_file_atomic(unreachable, "{}"),
                             doctest::Contains(("'" + unreachable + ".tmp': No such file or directory").c_str()),
                             std::runtime_error);
    }

    TEST_CASE("replace_directory_atomic puts the new folder in place of the old one") {
        TempDir dir;
        std::string final_dir = dir / "ckpt", tmp_dir = dir / "ckpt.tmp";
        auto make_checkpoint = [](const std::string& folder, const std::string& content) {
            fs::create_directory(folder);
            write_file_atomic(folder + "/config.json", content);
        };

        make_checkpoint(tmp_dir, "first");
        replace_directory_atomic(tmp_dir, final_dir);  // no previous checkpoint
        CHECK(read_bytes(final_dir + "/config.json") == "first");
        CHECK_FALSE(fs::exists(tmp_dir));

        make_checkpoint(tmp_dir, "second");
        write_file_atomic(tmp_dir + "/extra.txt", "only in the new one");
        make_checkpoint(final_dir + ".old", "stale, from an interrupted swap");
        replace_directory_atomic(tmp_dir, final_dir + "/");
        CHECK(read_bytes(final_dir + "/config.json") == "second");
        CHECK(read_bytes(final_dir + "/extra.txt") == "only in the new one");
        CHECK_FALSE(fs::exists(tmp_dir));
        CHECK_FALSE(fs::exists(final_dir + ".old"));
        CHECK(std::distance(fs::directory_iterator(dir.path), fs::directory_iterator()) == 1);

        CHECK_THROWS_WITH_AS(replace_directory_atomic(dir / "missing", final_dir), doctest::Contains("no folder"),
                             std::runtime_error);
        CHECK(read_bytes(final_dir + "/config.json") == "second");
    }

    TEST_CASE("recover_directory puts back a checkpoint left aside by a save cut short") {
        std::string base = std::filesystem::temp_directory_path() / "mini_deepseek_recover";
        std::filesystem::remove_all(base);
        std::filesystem::create_directories(base + "/ckpt.old");
        write_file_atomic(base + "/ckpt.old/config.json", "{}");
        recover_directory(base + "/ckpt/");
        CHECK(std::filesystem::exists(base + "/ckpt/config.json"));
        CHECK_FALSE(std::filesystem::exists(base + "/ckpt.old"));
        recover_directory(base + "/ckpt");  // nothing to do: the folder is there
        CHECK(std::filesystem::exists(base + "/ckpt/config.json"));
        std::filesystem::remove_all(base);
    }
}
