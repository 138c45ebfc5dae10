// Multi-token prediction: the modules' inputs and targets, their place in the checkpoint, and on the GPU the
// modules' forward and loss against the CPU reference and their backward against its finite differences.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>

#include "../io/checkpoint.h"
#include "model_reference.h"

namespace {

const ParamTensor* find_tensor(const ParamLayout& layout, const std::string& name) {
    for (const ParamTensor& t : layout.tensors)
        if (t.name == name) return &t;
    return nullptr;
}

}  // namespace

TEST_SUITE("mtp") {
    TEST_CASE("module k embeds the token k ahead and predicts the one after; a row's last k positions have no target") {
        // two rows of T = 5: inputs t_0..t_4, targets t_1..t_5 (one masked)
        const std::vector<int> inputs = {10, 11, 12, 13, 14, 20, 21, 22, 23, 24};
        const std::vector<int> targets = {11, 12, -1, 14, 15, 21, 22, 23, 24, 25};
        std::vector<int> tokens, shifted;
        mtp_shift(inputs, targets, 2, 5, 1, tokens, shifted);
        CHECK(tokens == std::vector<int>{11, 12, 13, 14, 0, 21, 22, 23, 24, 0});
        CHECK(shifted == std::vector<int>{12, -1, 14, 15, -1, 22, 23, 24, 25, -1});
        mtp_shift(inputs, targets, 2, 5, 2, tokens, shifted);
        CHECK(tokens == std::vector<int>{12, 13, 14, 0, 0, 22, 23, 24, 0, 0});
        CHECK(shifted == std::vector<int>{-1, 14, 15, -1, -1, 23, 24, 25, -1, -1});
    }

    TEST_CASE("the MTP loss weight: lambda, then the late lambda after its share of the steps") {
        const MtpWeight w{0.3f, 0.1f, 0.5f};
        CHECK(w.at(1, 100) == 0.3f);
        CHECK(w.at(50, 100) == 0.3f);
        CHECK(w.at(51, 100) == 0.1f);
        CHECK(w.at(100, 100) == 0.1f);
    }

    TEST_CASE("MTP modules sit at layer index num_hidden_layers, after every tensor of the main model") {
        Config c;
        c.num_nextn_predict_layers = 2;
        Architecture with(c, 0);
        c.num_nextn_predict_layers = 0;
        Architecture without(c, 0);
        const int d = c.hidden_size, L = c.num_hidden_layers;
        const std::string p = "model.layers." + std::to_string(L) + ".";
        REQUIRE(find_tensor(with.layout, p + "eh_proj.weight"));
        CHECK(find_tensor(with.layout, p + "eh_proj.weight")->shape == std::vector<long>{d, 2 * d});
        for (const char* norm : {"enorm.weight", "hnorm.weight", "shared_head.norm.weight"}) {
            REQUIRE(find_tensor(with.layout, p + norm));
            CHECK(find_tensor(with.layout, p + norm)->shape == std::vector<long>{d});
        }
        // the block has the last layer's FFN (MoE in the default model), under the layer's own names
        const std::string last = "model.layers." + std::to_string(L - 1) + ".";
        long block = 0, last_layer = 0;
        for (const ParamTensor& t : with.layout.tensors) {
            if (t.name.rfind(p, 0) == 0) block += t.numel();
            if (t.name.rfind(last, 0) == 0) last_layer += t.numel();
        }
        CHECK(block == last_layer + 3 * d + 2L * d * d);  // the block, two norms and eh_proj, the head's norm
        CHECK(find_tensor(with.layout, "model.layers." + std::to_string(L + 1) + ".mlp.experts.15.down_proj.weight"));
        CHECK(with.layout.total == without.layout.total + 2 * block);
        // the main model's matrices keep their offsets: checkpoints and runs from before MTP keep their meaning
        for (const ParamTensor& t : without.layout.tensors)
            if (t.region == Region::Decayed) CHECK(find_tensor(with.layout, t.name)->offset == t.offset);
        CHECK(with.first_mtp_tensor == int(without.layout.tensors.size()));
        // model compute: a module costs its block's matrices (a routed expert as the share of tokens it sees), eh_proj
        // and one more pass of the shared head; the main model's count stays
        double module_params = 0.0;
        for (const ParamTensor& t : with.layout.tensors)
            if (t.name.rfind(p, 0) == 0 && t.shape.size() == 2) module_params += double(t.numel()) * t.active;
        CHECK(with.matmul_params(true, true) == doctest::Approx(2 * (module_params + double(c.vocab_size) * d)));
        CHECK(with.matmul_params(true) == doctest::Approx(without.matmul_params(true)));
    }

    TEST_CASE("config.json carries num_nextn_predict_layers; a config from before MTP has none") {
        Config c;
        c.num_nextn_predict_layers = 2;
        Json j = config_to_json(c);
        CHECK(j.at("num_nextn_predict_layers").as_int() == 2);
        CHECK(config_from_json(j, "config.json").num_nextn_predict_layers == 2);
        Json old = Json::object();
        for (const auto& [key, value] : j.as_object())
            if (key != "num_nextn_predict_layers") old[key] = value;
        CHECK(config_from_json(old, "config.json").num_nextn_predict_layers == 0);
        j["num_nextn_predict_layers"] = -1;
        CHECK_THROWS_WITH_AS(config_from_json(j, "config.json"), doctest::Contains("num_nextn_predict_layers"),
                             std::runtime_error);
    }
}
