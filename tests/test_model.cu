// The whole model on the GPU: forward against the CPU reference, backward against finite differences of it,
// checkpoints (save -> load -> identical logits, corrupt files refused) and bit-identical resume.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <memory>

#include "../checkpoint.h"
#include "model_reference.h"

namespace {

using model_ref::tiny_config;

constexpr int B = 2, T = 11;

std::vector<int> random_tokens(int n, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int> t(n);
    for (int& x : t) x = int(rng.range(0, vocab - 1));
    return t;
}

// Norm weights drawn around 1 rather than set to 1, so their gradients are checked on a generic point.
template <typename T_>
std::unique_ptr<Model<T_>> make_model(const Config& c, uint64_t seed) {
    auto model = std::make_unique<Model<T_>>(c, B, T);
    model->init_weights(seed);
    std::vector<float> w = model->master.download();
    Rng rng(seed, 7);
    for (long i = model->layout.n_decay; i < model->layout.total; i++) w[i] = float(0.5 + rng.uniform());
    model->master.upload(w);
    model->refresh_weights();
    return model;
}

template <typename T_>
std::vector<float> logits_of(Model<T_>& model, const std::vector<int>& tokens) {
    model.forward(tokens, B, T);
    std::vector<float> out(size_t(B) * T * model.cfg.vocab_size);
    CUDA_CHECK(cudaMemcpy(out.data(), model.logits, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
}

double relative_error(const std::vector<float>& got, const model_ref::Vec& want) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < want.size(); i++) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
    return std::sqrt(num / den);
}

std::string temp_dir(const char* name) {
    std::string dir = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(dir);
    return dir;
}

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE("model forward matches the CPU reference (fp32 and bf16)") {
        Config c = tiny_config();
        std::vector<int> tokens = random_tokens(B * T, c.vocab_size, 1);
        auto model = make_model<float>(c, 11);
        std::vector<float> w = model->master.download();
        model_ref::Vec want = model_ref::forward(c, model_ref::Vec(w.begin(), w.end()), tokens, B, T);
        // FP32 storage and FP32 GEMMs: only summation order differs from the double reference.
        CHECK(relative_error(logits_of(*model, tokens), want) < 1e-5);

        auto model16 = make_model<bf16>(c, 11);
        // BF16 storage keeps 8 bits of mantissa at every activation: a few 1e-3 per layer, compounded.
        double err16 = relative_error(logits_of(*model16, tokens), want);
        CHECK(err16 < 3e-2);
        CHECK(err16 > 1e-5);  // and it really ran in BF16
    }

    TEST_CASE("model backward matches finite differences of the reference loss") {
        Config c = tiny_config();
        std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 2), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        targets[3] = -1;  // an ignored position takes part in nothing
        auto model = make_model<float>(c, 12);
        model->forward(inputs, B, T);
        model->loss(targets);
        model->backward(B, T);
        std::vector<float> grads = model->grads.download(), w = model->master.download();
        model_ref::Vec params(w.begin(), w.end());

        Rng rng(3);
        for (const ParamTensor& t : model->layout.tensors) {
            double num = 0.0, den = 0.0;
            for (int k = 0; k < 6; k++) {
                long i = t.offset + long(rng.range(0, t.numel() - 1));
                double h = 1e-5, saved = params[i];
                params[i] = saved + h;
                double up = model_ref::loss(c, params, inputs, targets, B, T);
                params[i] = saved - h;
                double down = model_ref::loss(c, params, inputs, targets, B, T);
                params[i] = saved;
                double fd = (up - down) / (2 * h);
                num += (grads[i] - fd) * (grads[i] - fd), den += fd * fd;
            }
            INFO("tensor ", t.name);
            CHECK(std::sqrt(num / std::max(den, 1e-20)) < 1e-3);
        }
    }

    TEST_CASE("bf16 gradients follow the fp32 ones") {
        Config c = tiny_config();
        std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 4), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto m32 = make_model<float>(c, 13);
        auto m16 = make_model<bf16>(c, 13);
        m32->forward(inputs, B, T), m32->loss(targets), m32->backward(B, T);
        m16->forward(inputs, B, T), m16->loss(targets), m16->backward(B, T);
        std::vector<float> g32 = m32->grads.download(), g16 = m16->grads.download();
        model_ref::Vec want(g32.begin(), g32.end());
        CHECK(relative_error(g16, want) < 5e-2);
    }

    TEST_CASE("training lowers the loss on a fixed batch") {
        Config c = tiny_config();
        c.initializer_range = 0.02f;
        std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 5), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto model = make_model<bf16>(c, 14);
        float first = 0.0f, last = 0.0f;
        for (int step = 1; step <= 50; step++) {
            model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, step, 1);
            float loss = model->read_scalars().first / float(B * T);
            if (step == 1) first = loss;
            last = loss;
        }
        CHECK(last < 0.5f * first);
    }

    TEST_CASE("save -> load gives identical logits; bad checkpoints are refused") {
        Config c = tiny_config();
        std::vector<int> tokens = random_tokens(B * T, c.vocab_size, 6);
        std::string dir = temp_dir("mini_deepseek_ckpt");
        data::Tokenizer tok;
        auto model = make_model<bf16>(c, 15);
        save_checkpoint(dir, *model, {7, 99, "bf16", "", "r1zero"}, tok);
        CHECK_FALSE(std::filesystem::exists(dir + ".tmp"));
        Model<bf16> loaded(load_config(dir + "/config.json"), B, T);
        CHECK(load_weights(dir, loaded) == "r1zero");
        TrainerState state = load_trainer_state(dir, loaded);
        CHECK(state.step == 7);
        CHECK(state.seed == 99);
        std::vector<float> a = logits_of(*model, tokens), b = logits_of(loaded, tokens);
        CHECK(std::memcmp(a.data(), b.data(), a.size() * sizeof(float)) == 0);

        Config other = c;
        other.intermediate_size = 64;
        Model<bf16> mismatched(other, B, T);
        CHECK_THROWS_WITH_AS(load_weights(dir, mismatched), doctest::Contains("mlp.gate_proj.weight"),
                             std::runtime_error);

        std::string weights = dir + "/model.safetensors";
        std::filesystem::resize_file(weights, std::filesystem::file_size(weights) - 100);
        CHECK_THROWS_WITH_AS(load_weights(dir, loaded), doctest::Contains("model.safetensors"), std::runtime_error);
        std::filesystem::remove_all(dir);
    }

    TEST_CASE("a resumed run repeats the uninterrupted run's losses bit for bit") {
        Config c = tiny_config();
        c.initializer_range = 0.02f;
        std::string dir = temp_dir("mini_deepseek_resume");
        data::Tokenizer tok;
        auto batch = [&](int step) { return random_tokens(B * (T + 1), c.vocab_size, 100 + step); };
        auto run = [&](Model<bf16>& m, int from, int to) {
            std::vector<float> losses;
            for (int step = from; step <= to; step++) {
                std::vector<int> inputs, targets;
                split_rows(batch(step), B, T, inputs, targets);
                m.train_step(inputs, targets, B, T, AdamW{1e-3f}, 1.0f, step, 5);
                losses.push_back(m.read_scalars().first);
            }
            return losses;
        };
        auto straight = make_model<bf16>(c, 16);
        run(*straight, 1, 3);
        save_checkpoint(dir, *straight, {3, 5, "bf16"}, tok);
        std::vector<float> expected = run(*straight, 4, 6);

        Model<bf16> resumed(load_config(dir + "/config.json"), B, T);
        load_weights(dir, resumed);
        int step = load_trainer_state(dir, resumed).step;
        std::vector<float> got = run(resumed, step + 1, 6);
        REQUIRE(got.size() == expected.size());
        CHECK(std::memcmp(got.data(), expected.data(), got.size() * sizeof(float)) == 0);
        std::filesystem::remove_all(dir);
    }
}
