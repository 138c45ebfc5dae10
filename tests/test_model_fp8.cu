// The model with its projections in FP8 (V3 §3.3), dense and with DeepSeekMoE: close to the same model in BF16, able
// to learn, and safe against a non-finite value (the step is skipped, the weights stay as they were).
#include <doctest/doctest.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <memory>

#include "../model.cuh"
#include "model_reference.h"

namespace {

constexpr int B = 2, T = 16;  // 32 tokens: the weight gradient's FP8 GEMM reduces over tokens in steps of 16

// The small FP8 config (model_reference.h): dense, or with DeepSeekMoE in its second layer.
enum class Ffn { Dense, Moe, EveryExpert };

Config fp8_config(Ffn ffn) {
    Config c = model_ref::fp8_moe_config();
    if (ffn == Ffn::Dense) c.first_k_dense_replace = 2;
    if (ffn == Ffn::EveryExpert)  // every token takes both experts: FP8 and BF16 cannot route differently
        c.n_routed_experts = 2, c.n_group = 1, c.topk_group = 1;
    return c;
}

std::vector<int> random_tokens(int n, uint64_t seed) {
    Rng rng(seed);
    std::vector<int> t(n);
    for (int& x : t) x = int(rng.range(0, 127));
    return t;
}

std::unique_ptr<Model<bf16>> make_model(bool fp8, uint64_t seed, Ffn ffn) {
    auto model = std::make_unique<Model<bf16>>(fp8_config(ffn), B, T);
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

TEST_SUITE("fp8") {
    // E4M3 rounds each operand of every projection by up to 2^-4: a few percent per GEMM, compounded over the
    // layers. A wrong scale, tile or transpose gives errors of order 1. With more experts than a token takes, a token
    // whose router scores are close can choose differently in FP8 and in BF16, and move the logits by far more than
    // rounding: the MoE model here gives every token every expert.
    TEST_CASE("fp8 logits and gradients follow the bf16 ones, MTP module included") {
        for (Ffn ffn : {Ffn::Dense, Ffn::EveryExpert}) {
            CAPTURE(int(ffn));
            std::vector<int> rows = random_tokens(B * (T + 1), 21), inputs, targets;
            split_rows(rows, B, T, inputs, targets);
            auto reference = make_model(false, 31, ffn), fp8 = make_model(true, 31, ffn);
            std::vector<float> logits[2], grads[2];
            int i = 0;
            for (Model<bf16>* m : {reference.get(), fp8.get()}) {
                m->forward(inputs, B, T), m->loss(targets), m->mtp_forward(inputs, targets, B, T, 0.3f);
                m->backward(B, T);
                logits[i].resize(size_t(B) * T * m->cfg.vocab_size);
                CUDA_CHECK(
                    cudaMemcpy(logits[i].data(), m->logits, logits[i].size() * sizeof(float), cudaMemcpyDeviceToHost));
                grads[i++] = m->grads.download();
            }
            // The MoE layer sums three FFNs, the routed ones scaled by routed_scaling_factor (2.5), which scales
            // their rounding errors too.
            double logit_error = relative_error(logits[1], logits[0]);
            INFO("relative error of fp8 against bf16: logits ", logit_error);
            CHECK(logit_error < (ffn == Ffn::Dense ? 0.1 : 0.15));
            for (Linear* l : fp8->linears()) {  // each projection's weight gradient on its own
                const long offset = fp8->layout.offset(l->weight), size = long(l->groups) * l->out * l->in;
                auto slice = [&](const std::vector<float>& g) {
                    return std::vector<float>(g.begin() + offset, g.begin() + offset + size);
                };
                double grad_error = relative_error(slice(grads[1]), slice(grads[0]));
                INFO(fp8->layout[l->weight].name, ": relative error of the weight gradient ", grad_error);
                CHECK(grad_error < 0.2);
            }
            CHECK_FALSE(fp8->step_skipped());
        }
    }

    TEST_CASE("fp8 training lowers the loss on a fixed batch") {
        for (Ffn ffn : {Ffn::Dense, Ffn::Moe}) {
            CAPTURE(int(ffn));
            std::vector<int> rows = random_tokens(B * (T + 1), 22), inputs, targets;
            split_rows(rows, B, T, inputs, targets);
            auto model = make_model(true, 32, ffn);
            float first = 0.0f, last = 0.0f;
            for (int step = 1; step <= 50; step++) {
                model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, step, 1, 0.3f);
                float loss = model->read_scalars().loss_sum / float(B * T);
                if (step == 1) first = loss;
                last = loss;
                CHECK_FALSE(model->step_skipped());
            }
            CHECK(last < 0.5f * first);
        }
    }

    TEST_CASE("a NaN met in fp8 quantization skips the step and changes no weight, router biases included") {
        std::vector<int> rows = random_tokens(B * (T + 1), 23), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto model = make_model(true, 33, Ffn::Moe);
        std::vector<float> w = model->master.download();
        w[model->layout.offset(model->embed) + size_t(inputs[0]) * model->cfg.hidden_size] = NAN;  // one token's
        model->master.upload(w);
        model->refresh_weights();
        model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, 1, 1, 0.3f);
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
