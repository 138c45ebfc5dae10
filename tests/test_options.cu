// Host tests of the command line, the learning-rate schedule and config.json.
#include <doctest/doctest.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <limits>

#include "../io/checkpoint.h"
#include "../io/options.h"

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
        CHECK(parse_error({"eval", "--init", "x", "--speculative-max-batch", "-1"}).find("must not be negative") !=
              std::string::npos);
        CHECK(parse_error({"pretrain", "--nccl-timeout", "0"}).find("--nccl-timeout must be positive") !=
              std::string::npos);
        CHECK(parse_error({"pretrain", "extra"}).find("unexpected argument 'extra'") != std::string::npos);
        CHECK(parse_error({"eval"}).find("needs --init") != std::string::npos);
        CHECK(parse_error({"logits", "--init", "x"}).find("needs --text") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps", " 5"}).find("expects a number, got ' 5'") != std::string::npos);
        CHECK(parse_error({"pretrain", "--steps", "5 "}).find("expects a number, got '5 '") != std::string::npos);
    }

    TEST_CASE("settings that make no sense are refused, each with its range") {
        const std::vector<std::pair<std::vector<std::string>, std::string>> cases = {
            {{"--grad-clip", "-5"}, "--grad-clip must be a finite number >= 0"},
            {{"--grad-clip", "inf"}, "--grad-clip expects a number, got 'inf'"},
            {{"--weight-decay", "-1"}, "--weight-decay must be in [0, 1]"},
            {{"--w-format", "-100"}, "--w-format must be a finite number >= 0"},
            {{"--w-language", "-0.5"}, "--w-language must be a finite number >= 0"},
            {{"--clip-high", "1e30"}, "--clip-high must be in (0, 1]"},
            {{"--clip-low", "1"}, "--clip-low must be in (0, 1)"},
            {{"--kl", "-1"}, "--kl must be a finite number >= 0"},
            {{"--lr", "nan"}, "--lr expects a number, got 'nan'"},
            {{"--temperature", "-1"}, "--temperature must be positive for RL"},
        };
        for (const auto& c : cases) {
            std::vector<std::string> args = {"grpo", "--init", "x"};
            args.insert(args.end(), c.first.begin(), c.first.end());
            CHECK_MESSAGE(parse_error(args).find(c.second) != std::string::npos, c.first[0], " ", c.first[1]);
        }
        CHECK(parse_error({"grpo", "--init", "x", "--grad-clip", "0", "--clip-high", "0.28"}).empty());
    }

    TEST_CASE("paths the filesystem refuses are no crash: an error later, where they are opened") {
        const std::string long_name(300, 'a');
        CHECK(parse_error({"sft", "--init", long_name}).empty());
        CHECK(parse_error({"sft", "--init", "x", "--out", "/tmp/" + long_name + "/y"}).empty());
        const auto loop = std::filesystem::temp_directory_path() / "mini_deepseek_loop";
        std::filesystem::remove(loop);
        std::filesystem::create_symlink(loop, loop);
        CHECK(parse_error({"sft", "--init", loop.string(), "--out", loop.string()}).empty());
        std::filesystem::remove(loop);
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
    TEST_CASE("config.json round trip of every field, with the names transformers reads") {
        Config c;
        c.hidden_size = 256, c.num_hidden_layers = 3, c.rms_norm_eps = 1e-5f, c.first_k_dense_replace = 2;
        c.routed_scaling_factor = 1.5f, c.norm_topk_prob = false, c.n_group = 2;
        Json j = Json::parse(config_to_json(c).dump(2));
        CHECK(j.at("model_type").as_string() == "deepseek_v3");
        CHECK(j.at("first_k_dense_replace").as_int() == 2);
        CHECK(j.at("n_routed_experts").as_int() == 16);
        CHECK_FALSE(j.at("norm_topk_prob").as_bool());
        CHECK(j.at("rope_interleave").as_bool());
        Config back = config_from_json(j, "config.json");
        int fields = 0;
        back.fields([&](const char* name, const auto& value, Bound) {
            c.fields([&](const char* other, const auto& original, Bound) {
                if constexpr (std::is_same_v<decltype(value), decltype(original)>)
                    if (std::string(name) == other) {
                        INFO(name);
                        CHECK(value == original);
                        fields++;
                    }
            });
        });
        CHECK(fields == 24);
    }

    TEST_CASE("a config.json that does not fit is an error naming the file and the field") {
        auto error_of = [](const std::string& field, Json value) {
            Json j = config_to_json(Config());
            j[field] = value;
            try {
                config_from_json(j, "a/config.json");
            } catch (const std::runtime_error& e) {
                return std::string(e.what());
            }
            return std::string("no error");
        };
        Json j = config_to_json(Config());
        j["model_type"] = "llama";
        CHECK_THROWS_WITH_AS(config_from_json(j, "a/config.json"), doctest::Contains("a/config.json: model_type"),
                             std::runtime_error);
        CHECK(error_of("qk_rope_head_dim", 7).find("qk_rope_head_dim must be even") != std::string::npos);
        CHECK(error_of("q_lora_rank", Json()).find("q_lora_rank is null") != std::string::npos);
        CHECK(error_of("rms_norm_eps", -1.0).find("rms_norm_eps must be positive") != std::string::npos);
        CHECK(error_of("rope_theta", 1e300).find("rope_theta must be positive and finite") != std::string::npos);
        CHECK(error_of("initializer_range", -0.02).find("initializer_range must be non-negative") !=
              std::string::npos);
        CHECK(error_of("n_group", 3).find("n_group") != std::string::npos);
        CHECK(error_of("n_group", 16).find("groups need two") != std::string::npos);
        CHECK(error_of("topk_group", 5).find("topk_group") != std::string::npos);
        CHECK(error_of("num_experts_per_tok", 9).find("num_experts_per_tok") != std::string::npos);
        CHECK(error_of("n_routed_experts", 512).find("at most 256") != std::string::npos);
        CHECK(error_of("first_k_dense_replace", 8) == "no error");  // a dense model needs no valid MoE fields
        CHECK(error_of("kv_lora_rank", 2147483647).find("kv_lora_rank must be at most 32768") != std::string::npos);
        CHECK(error_of("hidden_size", 40000).find("hidden_size must be at most") != std::string::npos);
        CHECK(error_of("num_hidden_layers", 2147483647).find("num_hidden_layers must be at most") != std::string::npos);
        CHECK(error_of("num_hidden_layers", 1000).find("num_hidden_layers must be at most 256") != std::string::npos);
        CHECK(error_of("num_nextn_predict_layers", 1000).find("at most 256") != std::string::npos);
        CHECK(error_of("n_shared_experts", 32768).find("widths") != std::string::npos);  // 2 x width overflowed
        CHECK(error_of("num_attention_heads", 4096).find("widths") != std::string::npos);
        CHECK(error_of("rms_norm_eps", std::numeric_limits<double>::infinity()).find("rms_norm_eps must be") !=
              std::string::npos);
        CHECK(error_of("rope_theta", 0.0).find("rope_theta must be positive") != std::string::npos);
        Json partial = Json::parse(R"({"model_type": "deepseek_v3", "vocab_size": 128})");
        CHECK_THROWS_WITH_AS(config_from_json(partial, "c"), doctest::Contains("missing key"), std::runtime_error);

        std::string path = std::filesystem::temp_directory_path() / "mini_deepseek_bad_config.json";
        write_file_atomic(path, "{\"model_type\": ");
        CHECK_THROWS_WITH_AS(load_config(path), doctest::Contains(path.c_str()), std::runtime_error);
        std::remove(path.c_str());
        CHECK_THROWS_WITH_AS(load_config("/nonexistent/config.json"), doctest::Contains("cannot open"),
                             std::runtime_error);
    }

    TEST_CASE("a checkpoint's counts are read strictly") {
        CHECK(parse_count("25", 100) == 25);
        CHECK(parse_count("0", 100) == 0);
        CHECK(parse_count("18446744073709551615", std::numeric_limits<uint64_t>::max()) == UINT64_MAX);
        for (const char* bad : {"25x", "-25", " 25", "25 ", "", "+25", "0x19", "2.5"})
            CHECK_THROWS_AS(parse_count(bad, 100), std::invalid_argument);
        CHECK_THROWS_AS(parse_count("101", 100), std::invalid_argument);
        CHECK_THROWS_AS(parse_count("18446744073709551616", std::numeric_limits<uint64_t>::max()),
                        std::invalid_argument);
        CHECK_THROWS_AS(parse_count("2147483648", uint64_t(std::numeric_limits<int>::max())), std::invalid_argument);
        // a double (RL's model compute so far) reads back to the same bits
        Rng rng(5);
        for (int i = 0; i < 1000; i++) {
            const double x = std::ldexp(rng.uniform(), int(rng.range(-60, 60)));
            CHECK(parse_exact(exact_text(x)) == x);
        }
        for (const char* bad : {"1e999", "nan", " 1", "1 ", "", "1x"})
            CHECK_THROWS_AS(parse_exact(bad), std::invalid_argument);
    }

    TEST_CASE("parameter layout: Hugging Face names; matrices, then norm weights, then the router biases") {
        Config c;
        Architecture arch(c, 0);
        const ParamLayout& layout = arch.layout;
        long previous_end = 0;
        Region previous = Region::Decayed;
        std::vector<const ParamTensor*> by_offset;
        for (const ParamTensor& t : layout.tensors) by_offset.push_back(&t);
        std::sort(by_offset.begin(), by_offset.end(), [](auto a, auto b) { return a->offset < b->offset; });
        for (const ParamTensor* t : by_offset) {  // the regions in order, no gap, no overlap
            CHECK(t->offset == previous_end);
            CHECK(int(t->region) >= int(previous));
            CHECK((t->region == Region::Decayed) == (t->shape.size() == 2));
            CHECK((t->region == Region::Buffer) == (t->name.find("e_score_correction_bias") != std::string::npos));
            previous_end = t->offset + t->numel(), previous = t->region;
        }
        CHECK(layout.total == previous_end);
        // V3-shaped default: 40.8M parameters in the main model, 16.1M of them used by a token; 46.7M with its MTP
        // module (tests/test_mtp.cu checks the module's share)
        CHECK(layout.total == 46718720);
        Config main_only = c;
        main_only.num_nextn_predict_layers = 0;
        CHECK(Architecture(main_only, 0).layout.total == 40848880);
        CHECK(arch.matmul_params(true) == doctest::Approx(16017408.0));  // in GEMMs: all but embedding and norms
        CHECK(layout.tensors.front().name == "model.embed_tokens.weight");
        auto find = [&](const std::string& name) {
            for (const ParamTensor& t : layout.tensors)
                if (t.name == name) return &t;
            FAIL("no tensor " << name);
            return &layout.tensors.front();
        };
        CHECK(find("model.layers.7.self_attn.kv_a_proj_with_mqa.weight")->shape == std::vector<long>{160, 384});
        CHECK(find("model.layers.0.mlp.gate_proj.weight")->shape == std::vector<long>{1024, 384});
        CHECK(find("model.layers.1.mlp.gate.weight")->shape == std::vector<long>{16, 384});
        CHECK(find("model.layers.1.mlp.shared_experts.down_proj.weight")->shape == std::vector<long>{384, 256});
        CHECK(find("model.layers.7.mlp.experts.15.up_proj.weight")->shape == std::vector<long>{256, 384});
        // gate_proj and up_proj of an FFN are adjacent (one [2I, d] GEMM computes both), and the experts follow
        // each other: a Linear of 16 weights
        const ParamTensor* gate0 = find("model.layers.1.mlp.experts.0.gate_proj.weight");
        CHECK(find("model.layers.1.mlp.experts.0.up_proj.weight")->offset == gate0->offset + 256 * 384);
        CHECK(find("model.layers.1.mlp.experts.1.gate_proj.weight")->offset == gate0->offset + 2 * 256 * 384);
        CHECK(find("model.layers.1.mlp.experts.3.down_proj.weight")->offset ==
              find("model.layers.1.mlp.experts.0.down_proj.weight")->offset + 3 * 384 * 256);
        CHECK(arch.layers[1].routed.experts.gate_up.weight == int(gate0 - layout.tensors.data()));
        CHECK(find("model.layers.1.mlp.experts.0.gate_proj.weight")->active == doctest::Approx(0.25));
    }

    TEST_CASE("a dense config keeps the layout of the dense model's checkpoints") {
        Config c;
        c.first_k_dense_replace = c.num_hidden_layers, c.num_nextn_predict_layers = 0;  // as they were, without MTP
        Architecture arch(c, 0);
        // embed, then per layer q_a, q_b, kv_a, kv_b, o_proj, gate, up, down, then lm_head; then the norms
        std::vector<std::string> order;
        std::vector<const ParamTensor*> by_offset;
        for (const ParamTensor& t : arch.layout.tensors) by_offset.push_back(&t);
        std::sort(by_offset.begin(), by_offset.end(), [](auto a, auto b) { return a->offset < b->offset; });
        for (const ParamTensor* t : by_offset) order.push_back(t->name);
        CHECK(order[1] == "model.layers.0.self_attn.q_a_proj.weight");
        CHECK(order[6] == "model.layers.0.mlp.gate_proj.weight");
        CHECK(order[8] == "model.layers.0.mlp.down_proj.weight");
        CHECK(order[65] == "lm_head.weight");
        CHECK(order[66] == "model.layers.0.input_layernorm.weight");
        CHECK(order.back() == "model.norm.weight");
        for (size_t i = 0; i < by_offset.size(); i++) CHECK(by_offset[i]->position == int(i));
    }
}

TEST_SUITE("options") {
    TEST_CASE("the environment variables that shrink the GPU take positive numbers only") {
        const char* name = "MINI_DEEPSEEK_TEST_NUMBER";
        unsetenv(name);
        CHECK(positive_from_environment(name) == 0.0);
        setenv(name, "", 1);
        CHECK(positive_from_environment(name) == 0.0);
        setenv(name, "24", 1);
        CHECK(positive_from_environment(name) == 24.0);
        for (const char* bad : {"0", "-8", "24GB", " 24", "nan", "inf"}) {
            CAPTURE(bad);
            setenv(name, bad, 1);
            CHECK_THROWS_AS(positive_from_environment(name), std::invalid_argument);
        }
        unsetenv(name);
    }

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
        CHECK(parse_error({"eval", "--init", "x", "--eval-temperature", "-1"}).find("must be a finite number >= 0") !=
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
