// The model with its projections in FP8 (V3 §3.3): close to the same model in BF16, able to learn, and safe
// against a non-finite value (the step is skipped, the weights stay as they were).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "../model.cuh"

namespace {

constexpr int B = 2, T = 16;  // 32 tokens: the weight gradient's FP8 GEMM reduces over tokens in steps of 16

// A small config whose every projection dimension is a multiple of 16, as FP8 GEMMs need.
Config fp8_config() {
    Config c;
    c.vocab_size = 128, c.hidden_size = 64, c.intermediate_size = 96, c.num_hidden_layers = 2;
    c.num_attention_heads = 2, c.q_lora_rank = 32, c.kv_lora_rank = 32, c.qk_nope_head_dim = 16;
    c.qk_rope_head_dim = 16, c.v_head_dim = 16, c.max_position_embeddings = 64, c.initializer_range = 0.1f;
    return c;
}

std::vector<int> random_tokens(int n, uint64_t seed) {
    Rng rng(seed);
    std::vector<int> t(n);
    for (int& x : t) x = int(rng.range(0, 127));
    return t;
}

std::unique_ptr<Model<bf16>> make_model(bool fp8, uint64_t seed) {
    auto model = std::make_unique<Model<bf16>>(fp8_config(), B, T);
    model->init_weights(seed);
    if (fp8) model->enable_fp8(Fp8Backend::Own);
    return model;
}

double relative_error(const std::vector<float>& got, const std::vector<float>& want) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < want.size(); i++)
        num += double(got[i] - want[i]) * (got[i] - want[i]), den += double(want[i]) * want[i];
    return std::sqrt(num / den);
}

}  // namespace

TEST_SUITE("gpu") {
    // E4M3 rounds each operand of every projection by up to 2^-4: a few percent per GEMM, compounded over the
    // layers. A wrong scale, tile or transpose gives errors of order 1.
    TEST_CASE("fp8 logits and gradients follow the bf16 ones") {
        std::vector<int> rows = random_tokens(B * (T + 1), 21), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto reference = make_model(false, 31), fp8 = make_model(true, 31);
        std::vector<float> logits[2], grads[2];
        int i = 0;
        for (Model<bf16>* m : {reference.get(), fp8.get()}) {
            m->forward(inputs, B, T), m->loss(targets), m->backward(B, T);
            logits[i].resize(size_t(B) * T * m->cfg.vocab_size);
            CUDA_CHECK(
                cudaMemcpy(logits[i].data(), m->logits, logits[i].size() * sizeof(float), cudaMemcpyDeviceToHost));
            grads[i++] = m->grads.download();
        }
        double logit_error = relative_error(logits[1], logits[0]);
        INFO("relative error of fp8 against bf16: logits ", logit_error);
        CHECK(logit_error < 0.1);
        for (int l = 0; l < fp8->cfg.num_hidden_layers; l++)
            for (int p = 0; p < NUM_PROJECTIONS; p++) {  // each projection's weight gradient on its own
                ProjectionShape shape = projection_shape(fp8->cfg, fp8->layout.layers[l], Projection(p));
                auto slice = [&](const std::vector<float>& g) {
                    return std::vector<float>(g.begin() + shape.offset,
                                              g.begin() + shape.offset + long(shape.out) * shape.in);
                };
                double grad_error = relative_error(slice(grads[1]), slice(grads[0]));
                INFO("layer ", l, ", projection ", p, ": relative error of the weight gradient ", grad_error);
                CHECK(grad_error < 0.2);
            }
        CHECK_FALSE(fp8->step_skipped());
    }

    TEST_CASE("fp8 training lowers the loss on a fixed batch") {
        std::vector<int> rows = random_tokens(B * (T + 1), 22), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto model = make_model(true, 32);
        float first = 0.0f, last = 0.0f;
        for (int step = 1; step <= 50; step++) {
            model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, step, 1);
            float loss = model->read_scalars().first / float(B * T);
            if (step == 1) first = loss;
            last = loss;
            CHECK_FALSE(model->step_skipped());
        }
        CHECK(last < 0.5f * first);
    }

    TEST_CASE("a NaN met in fp8 quantization skips the step and changes no weight") {
        std::vector<int> rows = random_tokens(B * (T + 1), 23), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto model = make_model(true, 33);
        std::vector<float> w = model->master.download();
        w[model->layout.embed + size_t(inputs[0]) * model->cfg.hidden_size] = NAN;  // one input token's embedding
        model->master.upload(w);
        model->refresh_weights();
        model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, 1, 1);
        CHECK(model->step_skipped());
        CHECK_FALSE(model->step_skipped());  // the flag clears once read
        std::vector<float> after = model->master.download();
        CHECK(std::memcmp(after.data(), w.data(), w.size() * sizeof(float)) == 0);
        for (const DeviceBuffer<bf16>* moments : {&model->adam_m, &model->adam_v}) {
            std::vector<bf16> m = moments->download();
            CHECK(std::count_if(m.begin(), m.end(), [](bf16 x) { return float(x) != 0.0f; }) == 0);  // still fresh
        }
    }
}
