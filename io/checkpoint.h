// checkpoint.h: a checkpoint is a folder that transformers' DeepseekV3ForCausalLM.from_pretrained loads:
//   model.safetensors   FP32 master weights under the Hugging Face tensor names
//   config.json         model_type deepseek_v3, the fields of DeepseekV3Config
//   tokenizer.json      the character tokenizer in the tokenizers library's format
// and, beside them, what a resumed run needs to continue bit for bit:
//   trainer_state.safetensors   the BF16 Adam moments of the trained parameters; metadata: step, seed, precision
// (the router biases of auxiliary-loss-free balancing are part of the model: `mlp.gate.e_score_correction_bias`).
// The folder is written under a temporary name and renamed into place, so a crash leaves the old checkpoint or the
// new one, never half of one. Every file is checked when read: a truncated, corrupt or mismatched checkpoint is an
// error that names the file and what is wrong.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <limits>
#include <sstream>
#include <type_traits>

#include "../data/tokenizer.h"
#include "json.h"
#include "../model.cuh"
#include "safetensors.h"

// config.json: the fields of Config, then what transformers needs to build the same model.
inline Json config_to_json(const Config& c) {
    Json j = Json::object();
    j["architectures"] = Json::array();
    j["architectures"].push_back("DeepseekV3ForCausalLM");
    j["model_type"] = "deepseek_v3";
    c.fields([&](const char* name, const auto& value, Bound) {
        using V = std::decay_t<decltype(value)>;
        if constexpr (std::is_floating_point_v<V>)
            j[name] = double(value);
        else
            j[name] = value;
    });
    j["num_key_value_heads"] = c.num_attention_heads;
    j["rope_parameters"] = Json::object();
    j["rope_parameters"]["rope_type"] = "default";
    j["rope_parameters"]["rope_theta"] = double(c.rope_theta);
    j["rope_interleave"] = true;
    j["hidden_act"] = "silu";
    j["attention_bias"] = false;
    j["attention_dropout"] = 0.0;
    j["tie_word_embeddings"] = false;
    j["pad_token_id"] = int(data::PAD);
    j["bos_token_id"] = int(data::BOS);
    j["eos_token_id"] = int(data::EOS);
    j["torch_dtype"] = "float32";
    return j;
}

// Reads every field of Config; `source` names the file in error messages.
inline Config config_from_json(const Json& j, const std::string& source) {
    try {
        if (j.at("model_type").as_string() != "deepseek_v3")
            throw std::runtime_error("model_type is '" + j.at("model_type").as_string() + "', not deepseek_v3");
        Config c;
        c.fields([&](const char* name, auto& value, Bound) {
            using V = std::decay_t<decltype(value)>;
            for (const auto& [field, meant] : Config::absent_means)
                if (std::string(name) == field && !j.contains(name)) {
                    value = V(meant);
                    return;
                }
            const Json& field = j.at(name);
            if (field.is_null()) throw std::runtime_error(std::string(name) + " is null");
            if constexpr (std::is_same_v<V, bool>)
                value = field.as_bool();
            else if constexpr (std::is_floating_point_v<V>)
                value = V(field.as_number());
            else
                value = field.as_int();
        });
        // Settings this model does not implement would load and then compute something else: refuse them.
        if (j.contains("rope_scaling") && !j.at("rope_scaling").is_null())
            throw std::runtime_error("rope_scaling is not supported (plain RoPE only)");
        if (j.contains("rope_parameters") && j.at("rope_parameters").contains("rope_type") &&
            j.at("rope_parameters").at("rope_type").as_string() != "default")
            throw std::runtime_error("rope_type '" + j.at("rope_parameters").at("rope_type").as_string() +
                                     "' is not supported (plain RoPE only)");
        if (j.contains("hidden_act") && j.at("hidden_act").as_string() != "silu")
            throw std::runtime_error("hidden_act '" + j.at("hidden_act").as_string() +
                                     "' is not supported (silu only)");
        c.validate();
        return c;
    } catch (const std::exception& e) {
        throw std::runtime_error(source + ": " + e.what());
    }
}

inline std::string read_text_file(const std::string& path) {
    std::ifstream in(path, std::ios::binary);
    if (!in) throw std::runtime_error("cannot open " + path);
    std::ostringstream text;
    text << in.rdbuf();
    return text.str();
}

inline Config load_config(const std::string& path) {
    Json j;
    try {
        j = Json::parse(read_text_file(path));
    } catch (const std::runtime_error& e) {
        throw std::runtime_error(path + ": " + e.what());
    }
    return config_from_json(j, path);
}

struct TrainerState {
    int step = 0;
    uint64_t seed = 0;
    std::string precision;
    std::string schedule;                  // the flags that shape the data and the learning rate
    std::string prompt_template = "chat";  // how the model was trained to be prompted: chat | r1zero
    int optimizer_steps = -1;  // AdamW's count where it is not `step` (RL: `updates` a step, none without samples)
    double train_flops = 0.0;  // RL: the model compute so far, which its log counts up
};

// A double written so that it reads back to the same bits, and read back strictly.
inline std::string exact_text(double x) {
    char text[32];
    std::snprintf(text, sizeof text, "%.17g", x);
    return text;
}
inline double parse_exact(const std::string& text) {
    char* end = nullptr;
    const double x = std::strtod(text.c_str(), &end);
    if (text.empty() || std::isspace(static_cast<unsigned char>(text[0])) || *end != '\0' || !std::isfinite(x))
        throw std::invalid_argument("'" + text + "' is not a finite number");
    return x;
}

inline std::vector<int64_t> shape64(const std::vector<long>& shape) { return {shape.begin(), shape.end()}; }

// A checkpoint folder's name without trailing slashes, so that "dir.tmp" and "dir.old" are its siblings.
inline std::string folder_name(std::string dir) {
    while (dir.size() > 1 && dir.back() == '/') dir.pop_back();
    return dir;
}

// The folder of a checkpoint to read, first put back in place if a save was cut short between its two renames.
inline std::string open_checkpoint(const std::string& dir) {
    std::string folder = folder_name(dir);
    recover_directory(folder);
    return folder;
}

// Data parallel: every rank calls it (the Adam moments are gathered from the ranks' shards), rank 0 writes.
template <typename T>
void save_checkpoint(const std::string& checkpoint_dir, Model<T>& model, const TrainerState& state,
                     const data::Tokenizer& tok) {
    namespace fs = std::filesystem;
    std::vector<bf16> m, v;
    model.moments(m, v);
    if (model.comm && !model.comm->ranks.is_root()) return;
    std::vector<float> master = model.master.download();
    std::string dir = folder_name(checkpoint_dir), tmp = dir + ".tmp";
    fs::remove_all(tmp);
    fs::create_directories(tmp);

    std::vector<TensorRef> weights;
    for (const ParamTensor& t : model.layout.tensors)
        weights.push_back({t.name, DType::F32, shape64(t.shape), master.data() + t.offset});
    write_safetensors(tmp + "/model.safetensors", weights,
                      {{"format", "pt"}, {"prompt_template", state.prompt_template}});
    write_file_atomic(tmp + "/config.json", config_to_json(model.cfg).dump(2) + "\n");
    write_file_atomic(tmp + "/tokenizer.json", tok.to_json());

    int64_t n = model.layout.trained;
    write_safetensors(tmp + "/trainer_state.safetensors",
                      {{"adam_m", DType::BF16, {n}, m.data()}, {"adam_v", DType::BF16, {n}, v.data()}},
                      {{"step", std::to_string(state.step)},
                       {"seed", std::to_string(state.seed)},
                       {"precision", state.precision},
                       {"schedule", state.schedule},
                       {"optimizer_steps", std::to_string(state.optimizer_steps < 0 ? state.step
                                                                                    : state.optimizer_steps)},
                       {"train_flops", exact_text(state.train_flops)}});
    replace_directory_atomic(tmp, dir);
}

// The model's weights from dir/model.safetensors: every tensor of the layout, FP32, shapes as the config says,
// and nothing else. Returns the prompt template the model was trained with (chat where the file does not say).
template <typename T>
std::string load_weights(const std::string& dir, Model<T>& model) {
    std::string path = dir + "/model.safetensors";
    SafetensorsFile file = SafetensorsFile::load(path);
    if (file.metadata.count("prompt_template")) file.require_checksum();  // ours: its checksum cannot be left out
    std::vector<float> master(model.layout.total);
    for (const ParamTensor& t : model.layout.tensors)
        file.read(t.name, DType::F32, shape64(t.shape), master.data() + t.offset);
    if (file.tensors.size() != model.layout.tensors.size())
        throw std::runtime_error(path + ": holds " + std::to_string(file.tensors.size()) +
                                 " tensors, the config needs " + std::to_string(model.layout.tensors.size()));
    CUDA_CHECK(cudaMemcpy(model.master.data(), master.data(), sizeof(float) * master.size(), cudaMemcpyHostToDevice));
    model.refresh_weights();
    auto it = file.metadata.find("prompt_template");
    if (it == file.metadata.end()) return "chat";
    if (it->second != "chat" && it->second != "r1zero")
        throw std::runtime_error(path + ": unknown prompt_template '" + it->second + "'");
    return it->second;
}

// A whole decimal count, digits only, at most `max`: "25x", "-25", " 25" and "" are errors, not 25, -25 or 0.
inline uint64_t parse_count(const std::string& text, uint64_t max) {
    const bool digits = std::all_of(text.begin(), text.end(), [](char c) { return c >= '0' && c <= '9'; });
    if (text.empty() || !digits) throw std::invalid_argument("'" + text + "' is not a count");
    unsigned long long value = 0;
    for (char c : text) {
        if (value > (max - uint64_t(c - '0')) / 10) throw std::invalid_argument("'" + text + "' is too large");
        value = value * 10 + uint64_t(c - '0');
    }
    return value;
}

template <typename T>
TrainerState load_trainer_state(const std::string& dir, Model<T>& model) {
    std::string path = dir + "/trainer_state.safetensors";
    SafetensorsFile file = SafetensorsFile::load(path);
    file.require_checksum();
    int64_t n = model.layout.trained;
    std::vector<bf16> m(n), v(n);
    file.read("adam_m", DType::BF16, {n}, m.data());
    file.read("adam_v", DType::BF16, {n}, v.data());
    TrainerState state;
    try {
        state.step = int(parse_count(file.metadata.at("step"), uint64_t(std::numeric_limits<int>::max())));
        state.seed = parse_count(file.metadata.at("seed"), std::numeric_limits<uint64_t>::max());
        state.precision = file.metadata.at("precision");
        state.schedule = file.metadata.at("schedule");
        auto it = file.metadata.find("optimizer_steps");  // absent from checkpoints that took a step per step
        state.optimizer_steps = it == file.metadata.end() ? state.step : int(parse_count(it->second, INT32_MAX));
        it = file.metadata.find("train_flops");
        state.train_flops = it == file.metadata.end() ? 0.0 : parse_exact(it->second);
    } catch (const std::exception&) {
        throw std::runtime_error(path + ": missing or malformed step, seed, precision, schedule, optimizer_steps or "
                                 "train_flops metadata");
    }
    model.set_moments(m, v);
    return state;
}
