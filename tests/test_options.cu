// Host tests of the command line, the learning-rate schedule and config.json.
#include <doctest/doctest.h>

#include <cstdio>
#include <filesystem>

#include "../checkpoint.h"
#include "../options.h"

namespace {

Options parse(std::vector<std::string> args) {
    std::vector<char*> argv = {const_cast<char*>("train")};
    for (std::string& a : args) argv.push_back(a.data());
    Options o;
    o.parse(int(argv.size()), argv.data());
    return o;
}

std::string parse_error(std::vector<std::string> args) {
    try {
        parse(args);
    } catch (const std::invalid_argument& e) {
        return e.what();
    }
    return "";
}

}  // namespace

TEST_SUITE("options") {
    TEST_CASE("flags set their fields") {
        Options o =
            parse({"pretrain", "--steps", "30", "--lr", "0.001", "--precision", "fp32", "--resume", "--out", "x"});
        CHECK(o.stage == "pretrain");
        CHECK(o.steps == 30);
        CHECK(o.lr == doctest::Approx(0.001));
        CHECK(o.precision == "fp32");
        CHECK(o.resume);
        CHECK(o.out == "x");
    }

    TEST_CASE("bad command lines are errors that say what is wrong") {
        CHECK(parse_error({}).find("missing stage") != std::string::npos);
        CHECK(parse_error({"fly"}).find("unknown stage 'fly'") != std::string::npos);
        CHECK(parse_error({"pretrain", "--stepz", "3"}).find("unknown flag '--stepz'") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps"}).find("--steps needs a value") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps", "ten"}).find("expects a number, got 'ten'") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps", "10x"}).find("expects a number") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps", "0"}).find("--steps must be positive") != std::string::npos);
        CHECK(parse_error({"pretrain", "--precision", "fp16"}).find("fp32, bf16 or fp8") != std::string::npos);
        CHECK(parse_error({"pretrain", "--lr", "-1"}).find("--lr must be positive") != std::string::npos);
        CHECK(parse_error({"pretrain", "extra"}).find("unexpected argument 'extra'") != std::string::npos);
        CHECK(parse_error({"eval"}).find("needs --init") != std::string::npos);
        CHECK(parse_error({"logits", "--init", "x"}).find("needs --text") != std::string::npos);
    }

    TEST_CASE("--help needs no stage and the usage lists every flag") {
        CHECK(parse({"--help"}).help);
        std::string usage = Options::usage();
        for (const char* flag : {"--steps", "--lr", "--precision", "--resume", "--out", "--init"})
            CHECK(usage.find(flag) != std::string::npos);
    }

    TEST_CASE("learning rate: linear warm-up, cosine decay to the floor") {
        Options o;
        o.lr = 1.0f, o.warmup = 10, o.steps = 110, o.min_lr_frac = 0.1f;
        CHECK(learning_rate(o, 1) == doctest::Approx(0.1));
        CHECK(learning_rate(o, 10) == doctest::Approx(1.0));
        CHECK(learning_rate(o, 60) == doctest::Approx(0.55));
        CHECK(learning_rate(o, 110) == doctest::Approx(0.1));
        for (int s = 11; s < 110; s++) CHECK(learning_rate(o, s + 1) <= learning_rate(o, s));
    }
}

TEST_SUITE("checkpoint") {
    TEST_CASE("config.json round trip, with the names transformers reads") {
        Config c;
        c.hidden_size = 256, c.num_hidden_layers = 3, c.rms_norm_eps = 1e-5f;
        Json j = Json::parse(config_to_json(c).dump(2));
        CHECK(j.at("model_type").as_string() == "deepseek_v3");
        CHECK(j.at("first_k_dense_replace").as_int() == 3);
        CHECK(j.at("rope_interleave").as_bool());
        Config back = config_from_json(j, "config.json");
        CHECK(back.hidden_size == 256);
        CHECK(back.num_hidden_layers == 3);
        CHECK(back.rms_norm_eps == doctest::Approx(1e-5));
        CHECK(back.qk_rope_head_dim == c.qk_rope_head_dim);
    }

    TEST_CASE("a config.json that does not fit is an error naming the file") {
        Json j = config_to_json(Config());
        j["model_type"] = "llama";
        CHECK_THROWS_WITH_AS(config_from_json(j, "a/config.json"), doctest::Contains("a/config.json: model_type"),
                             std::runtime_error);
        j = config_to_json(Config());
        j["qk_rope_head_dim"] = 7;
        CHECK_THROWS_WITH_AS(config_from_json(j, "c"), doctest::Contains("qk_rope_head_dim"), std::runtime_error);
        j = config_to_json(Config());
        j["first_k_dense_replace"] = 1;
        CHECK_THROWS_WITH_AS(config_from_json(j, "c"), doctest::Contains("MoE"), std::runtime_error);
        Json partial = Json::parse(R"({"model_type": "deepseek_v3", "vocab_size": 128})");
        CHECK_THROWS_WITH_AS(config_from_json(partial, "c"), doctest::Contains("missing key"), std::runtime_error);

        std::string path = std::filesystem::temp_directory_path() / "mini_deepseek_bad_config.json";
        write_file_atomic(path, "{\"model_type\": ");
        CHECK_THROWS_WITH_AS(load_config(path), doctest::Contains(path.c_str()), std::runtime_error);
        std::remove(path.c_str());
        CHECK_THROWS_WITH_AS(load_config("/nonexistent/config.json"), doctest::Contains("cannot open"),
                             std::runtime_error);
    }

    TEST_CASE("parameter layout: Hugging Face names, matrices before norms") {
        Config c;
        ParamLayout layout(c);
        long expected = 2L * c.vocab_size * c.hidden_size + c.hidden_size;
        for (const ParamTensor& t : layout.tensors) {
            if (t.shape.size() == 2) CHECK(t.offset < layout.n_decay);
            if (t.shape.size() == 1) CHECK(t.offset >= layout.n_decay);
        }
        long per_layer = 0;
        per_layer += long(c.q_lora_rank) * c.hidden_size + c.q_lora_rank;
        per_layer += long(c.num_attention_heads) * c.qk_head_dim() * c.q_lora_rank;
        per_layer += long(c.kv_lora_rank + c.qk_rope_head_dim) * c.hidden_size + c.kv_lora_rank;
        per_layer += long(c.num_attention_heads) * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank;
        per_layer += long(c.hidden_size) * c.num_attention_heads * c.v_head_dim;
        per_layer += 3L * c.intermediate_size * c.hidden_size + 2L * c.hidden_size;
        CHECK(layout.total == expected + per_layer * c.num_hidden_layers);
        CHECK(layout.tensors.front().name == "model.embed_tokens.weight");
        bool found = false;
        for (const ParamTensor& t : layout.tensors)
            found |= t.name == "model.layers.7.self_attn.kv_a_proj_with_mqa.weight" && t.shape[0] == 160 &&
                     t.shape[1] == 384;
        CHECK(found);
        // gate_proj and up_proj are adjacent: one [2I, d] GEMM computes both
        CHECK(layout.layers[0].gate_up + long(c.intermediate_size) * c.hidden_size ==
              layout.layers[0].down - long(c.intermediate_size) * c.hidden_size);
    }
}

TEST_SUITE("options") {
    TEST_CASE("each stage writes to its own folder unless told otherwise, and RL flags that cannot learn are refused") {
        CHECK(parse({"pretrain"}).out == "runs/pretrain");
        CHECK(parse({"sft", "--init", "runs/pretrain/checkpoint"}).out == "runs/sft");
        CHECK(parse({"r1zero", "--init", "x", "--out", "y"}).out == "y");
        CHECK(parse_error({"r1zero", "--init", "x", "--group", "1"}).find("--group must be at least 2") !=
              std::string::npos);
        CHECK(parse_error({"grpo", "--init", "x", "--temperature", "0"}).find("--temperature must be positive") !=
              std::string::npos);
        CHECK(parse_error({"pretrain", "--samples", "-1"}).find("--samples must be positive") != std::string::npos);
        CHECK(parse_error({"eval", "--init", "x", "--samples", "0"}).find("--samples must be positive") !=
              std::string::npos);
        CHECK(parse({"grpo", "--init", "x", "--samples", "0"}).samples == 0);
        CHECK(
            parse_error({"grpo", "--init", "x", "--task", "chess"}).find("--task must be mix, add, mul or countdown") !=
            std::string::npos);
        CHECK(parse_error({"grpo", "--init", "x", "--replay", "1.5"}).find("--replay must be in [0, 1]") !=
              std::string::npos);
        CHECK(parse_error({"eval", "--init", "x", "--eval-temperature", "-1"}).find("must not be negative") !=
              std::string::npos);
        CHECK(parse_error({"chat", "--init", "x", "--template", "zero"}).find("--template must be auto") !=
              std::string::npos);
        CHECK(parse({"pretrain"}).precision == "fp8");  // V3 §3.3: FP8 unless asked otherwise
        CHECK(parse({"pretrain"}).fp8_gemm == "cublaslt");
        CHECK(parse({"pretrain", "--precision", "fp8", "--fp8-gemm", "own"}).fp8_gemm == "own");
        CHECK(parse_error({"pretrain", "--precision", "fp8", "--fp8-gemm", "cutlass"}).find("own or cublaslt") !=
              std::string::npos);
    }

    TEST_CASE("a stage may not overwrite the checkpoint it starts from") {
        std::string dir = std::filesystem::temp_directory_path() / "mini_deepseek_self_init";
        std::filesystem::create_directories(dir + "/checkpoint");
        CHECK(parse_error({"sft", "--init", dir + "/checkpoint", "--out", dir}).find("overwrite") != std::string::npos);
        std::filesystem::remove_all(dir);
    }
}
