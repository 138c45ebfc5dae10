// The whole model on the GPU, dense and with DeepSeekMoE: forward against the CPU reference, backward against
// finite differences of it (the routing held fixed), checkpoints (save -> load -> identical routing and logits,
// corrupt files refused) and bit-identical resume.
#include <doctest/doctest.h>

#include <cstring>
#include <filesystem>
#include <memory>

#include "../io/checkpoint.h"
#include "model_reference.h"
#include "reference.h"

namespace {

using model_ref::tiny_config;
using model_ref::tiny_moe_config;

constexpr int B = 2, T = 11;

// Both test models: every layer dense, and a MoE layer after a dense one.
std::vector<Config> configs() { return {tiny_config(), tiny_moe_config()}; }

std::vector<int> random_tokens(int n, int vocab, uint64_t seed) {
    Rng rng(seed);
    std::vector<int> t(n);
    for (int& x : t) x = int(rng.range(0, vocab - 1));
    return t;
}

// Norm weights drawn around 1 rather than set to 1, so their gradients are checked on a generic point; router
// biases in +-0.2, so that they change choices.
template <typename T_>
std::unique_ptr<Model<T_>> make_model(const Config& c, uint64_t seed, bool trains = true) {
    auto model = std::make_unique<Model<T_>>(c, B, T, trains);
    model->init_weights(seed);
    std::vector<float> w = model->master.download();
    Rng rng(seed, 7);
    for (long i = model->layout.decayed; i < model->layout.trained; i++) w[i] = float(0.5 + rng.uniform());
    for (long i = model->layout.trained; i < model->layout.total; i++) w[i] = float(0.4 * rng.uniform() - 0.2);
    model->master.upload(w);
    model->refresh_weights();
    return model;
}

template <typename T_>
std::vector<float> logits_of(Model<T_>& model, const std::vector<int>& tokens) {
    std::vector<float> out(size_t(B) * T * model.cfg.vocab_size);
    // NaN where the forward pass writes nothing: the comparison with the reference then fails
    CUDA_CHECK(cudaMemset(model.logits, 0xFF, out.size() * sizeof(float)));
    model.forward(tokens, B, T);
    CUDA_CHECK(cudaMemcpy(out.data(), model.logits, out.size() * sizeof(float), cudaMemcpyDeviceToHost));
    return out;
}

double relative_error(const std::vector<float>& got, const model_ref::Vec& want) {
    double num = 0.0, den = 0.0;
    for (size_t i = 0; i < want.size(); i++) num += (got[i] - want[i]) * (got[i] - want[i]), den += want[i] * want[i];
    return std::sqrt(num / den);
}

// The experts a model chose in its last forward pass of B x T tokens, per MoE block (the layers', then the MTP
// modules' where they ran), as the reference takes them.
template <typename T_>
std::vector<model_ref::Routing> routing_of(Model<T_>& model) {
    std::vector<model_ref::Routing> routing;
    const int K = model.cfg.num_experts_per_tok, N = B * T;
    auto add = [&](const Layer& L, const BlockActs<T_>& A) {
        if (!L.moe) return;
        std::vector<int> chosen(size_t(N) * K);
        CUDA_CHECK(cudaMemcpy(chosen.data(), A.moe.expert, chosen.size() * sizeof(int), cudaMemcpyDeviceToHost));
        model_ref::Routing r;
        for (int t = 0; t < N; t++) r.chosen.emplace_back(chosen.begin() + t * K, chosen.begin() + (t + 1) * K);
        routing.push_back(r);
    };
    for (int l = 0; l < model.cfg.num_hidden_layers; l++) add(model.layers[l], model.acts[l]);
    if (model.mtp_ran)
        for (size_t k = 0; k < model.mtp.size(); k++) add(model.mtp[k].block, model.mtp_acts[k].block);
    return routing;
}

// The gradient of every trained tensor against central differences of the reference loss at a few random
// elements: the relative error per tensor must stay below 1e-3.
template <typename LossOf>
void check_gradients(const Model<float>& model, const std::vector<float>& grads, model_ref::Vec params,
                     LossOf loss_of, uint64_t seed) {
    Rng rng(seed);
    for (const ParamTensor& t : model.layout.tensors) {
        if (t.region == Region::Buffer) continue;  // the router bias: no gradient
        double num = 0.0, den = 0.0;
        for (int k = 0; k < 6; k++) {
            long i = t.offset + long(rng.range(0, t.numel() - 1));
            double h = 1e-5, saved = params[i];
            params[i] = saved + h;
            double up = loss_of(params);
            params[i] = saved - h;
            double down = loss_of(params);
            params[i] = saved;
            double fd = (up - down) / (2 * h);
            num += (grads[i] - fd) * (grads[i] - fd), den += fd * fd;
        }
        INFO("tensor ", t.name);
        CHECK(std::sqrt(num / std::max(den, 1e-20)) < 1e-3);
    }
}

std::string temp_dir(const char* name) {
    std::string dir = std::filesystem::temp_directory_path() / name;
    std::filesystem::remove_all(dir);
    return dir;
}

}  // namespace

TEST_SUITE("gpu") {
    TEST_CASE("model forward matches the CPU reference (fp32 and bf16)") {
        for (const Config& c : configs()) {
            CAPTURE(c.first_k_dense_replace);
            std::vector<int> tokens = random_tokens(B * T, c.vocab_size, 1);
            auto model = make_model<float>(c, 11);
            std::vector<float> w = model->master.download();
            model_ref::Vec want = model_ref::forward(c, model_ref::Vec(w.begin(), w.end()), tokens, B, T);
            // FP32 storage and FP32 GEMMs: only summation order differs from the double reference.
            const std::vector<float> logits = logits_of(*model, tokens);
            CHECK(relative_error(logits, want) < 1e-5);
            // A model for forward passes alone (GRPO's reference), its layers on one set of buffers: the same
            // logits, and no training state.
            auto forward_only = make_model<float>(c, 11, false);
            CHECK(logits_of(*forward_only, tokens) == logits);
            CHECK(forward_only->grads.count + forward_only->adam_m.count + forward_only->adam_v.count == 0);
            CHECK_THROWS_AS(forward_only->backward(B, T), std::logic_error);

            auto model16 = make_model<bf16>(c, 11);
            // BF16 storage keeps 8 bits of mantissa at every activation: a few 1e-3 per layer, compounded. A token
            // whose router scores are that close may choose another expert in BF16: the reference follows the
            // BF16 model's choices.
            std::vector<float> logits16 = logits_of(*model16, tokens);
            std::vector<model_ref::Routing> routing = routing_of(*model16);
            model_ref::Vec want16 =
                model_ref::forward(c, model_ref::Vec(w.begin(), w.end()), tokens, B, T, {0.0, true, &routing});
            double err16 = relative_error(logits16, want16);
            CHECK(err16 < 3e-2);
            CHECK(err16 > 1e-5);  // and it really ran in BF16
        }
    }

    TEST_CASE("model backward matches finite differences of the reference loss, balance loss included") {
        for (const Config& c : configs()) {
            CAPTURE(c.first_k_dense_replace);
            std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 2), inputs, targets;
            split_rows(rows, B, T, inputs, targets);
            targets[3] = -1;  // an ignored position takes part in nothing
            auto model = make_model<float>(c, 12);
            model->balancing = Balancing{0.0f, 0.05f, true};
            model->forward(inputs, B, T);
            model->loss(targets);
            model->backward(B, T);
            std::vector<float> grads = model->grads.download(), w = model->master.download();
            model_ref::Vec params(w.begin(), w.end());
            // the routing of the unperturbed model, kept fixed: a choice has no derivative
            std::vector<model_ref::Routing> routing;
            model_ref::MoeOptions record{0.05, true, nullptr, &routing};
            double balance = 0.0;
            model_ref::forward(c, params, inputs, B, T, record, &balance);
            if (c.has_moe()) {
                CHECK(model->read_scalars().balance_loss == doctest::Approx(balance).epsilon(1e-5));
                CHECK(balance > 0.0);
                CHECK(routing_of(*model)[0].chosen == routing[0].chosen);
            }
            model_ref::MoeOptions fixed{0.05, true, &routing};
            // the MTP modules did not run: their gradients are zero, as the reference's are
            auto loss_of = [&](const model_ref::Vec& p) { return model_ref::loss(c, p, inputs, targets, B, T, fixed); };
            check_gradients(*model, grads, params, loss_of, 3);
        }
    }

    TEST_CASE("MTP modules: losses and accuracy match the CPU reference, gradients its finite differences") {
        const float lambda = 0.3f;
        Config moe2 = tiny_moe_config();
        moe2.num_nextn_predict_layers = 2;  // module 2 reads module 1's output
        for (const Config& c : {tiny_config(), moe2}) {
            CAPTURE(c.first_k_dense_replace);
            std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 7), inputs, targets;
            split_rows(rows, B, T, inputs, targets);
            targets[4] = -1, targets[T + 2] = -1;  // masked targets: module 1 predicts nothing at 3 and T + 1
            auto model = make_model<float>(c, 17);
            model->balancing = Balancing{0.0f, 0.05f, true};
            model->forward(inputs, B, T);
            model->loss(targets);
            model->mtp_forward(inputs, targets, B, T, lambda);
            model->backward(B, T);
            const StepScalars got = model->read_scalars();
            std::vector<float> grads = model->grads.download(), w = model->master.download();
            model_ref::Vec params(w.begin(), w.end());

            std::vector<model_ref::Routing> routing;
            model_ref::MoeOptions record{0.05, true, nullptr, &routing};
            double balance = 0.0, hits = 0.0;
            model_ref::Vec hidden;
            model_ref::forward(c, params, inputs, B, T, record, &balance, &hidden);
            std::vector<double> ce = model_ref::mtp_losses(c, params, hidden, inputs, targets, B, T, record, &balance,
                                                           &hits);
            REQUIRE(ce.size() == size_t(c.num_nextn_predict_layers));
            // FP32 storage and GEMMs: the losses to summation order
            const double mean_ce = std::accumulate(ce.begin(), ce.end(), 0.0) / double(ce.size());
            CHECK(got.mtp_loss == doctest::Approx(mean_ce).epsilon(1e-5));
            CHECK(got.mtp_accuracy == doctest::Approx(hits / double(model->mtp_acts[0].counted)));
            CHECK(model->mtp_acts[0].counted == B * (T - 1) - 2);
            CHECK(got.balance_loss == doctest::Approx(balance).epsilon(1e-5));
            if (c.has_moe()) CHECK(routing_of(*model).size() == routing.size());

            model_ref::MoeOptions fixed{0.05, true, &routing};
            auto loss_of = [&](const model_ref::Vec& p) {
                return model_ref::loss(c, p, inputs, targets, B, T, fixed, lambda);
            };
            check_gradients(*model, grads, params, loss_of, 8);
        }
    }

    TEST_CASE("a step without the MTP loss zeroes the modules' gradients and leaves their router biases") {
        Config c = tiny_moe_config();
        std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 9), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        auto model = make_model<float>(c, 18);
        model->train_step(inputs, targets, B, T, AdamW{1e-3f}, 1.0f, 1, 1, 0.3f);  // leaves MTP gradients behind
        const ParamTensor& bias = model->layout[model->mtp[0].block.routed.bias];
        std::vector<float> before = model->master.download();
        model->train_step(inputs, targets, B, T, AdamW{1e-3f}, 1.0f, 2, 1, 0.0f);
        std::vector<float> grads = model->grads.download(), after = model->master.download();
        long nonzero = 0;
        for (int t = model->first_mtp_tensor; t < int(model->layout.tensors.size()); t++) {
            const ParamTensor& p = model->layout[t];
            if (p.region != Region::Buffer)
                nonzero += std::count_if(grads.begin() + p.offset, grads.begin() + p.offset + p.numel(),
                                         [](float g) { return g != 0.0f; });
        }
        CHECK(nonzero == 0);
        CHECK(std::equal(before.begin() + bias.offset, before.begin() + bias.offset + bias.numel(),
                         after.begin() + bias.offset));
        CHECK(model->read_scalars().mtp_loss == 0.0f);
    }

    TEST_CASE("bf16 gradients follow the fp32 ones") {
        for (const Config& c : configs()) {
            CAPTURE(c.first_k_dense_replace);
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
    }

    TEST_CASE("init_weights: every matrix N(0, sigma) from its own stream, o_proj and down_proj / sqrt(2L), norms 1") {
        const Config c = tiny_moe_config();
        Model<float> model(c, B, T);
        const uint64_t seed = 31;
        model.init_weights(seed);
        const std::vector<float> w = model.master.download();
        const double sigma = c.initializer_range, residual = sigma / std::sqrt(2.0 * c.num_hidden_layers);
        for (const ParamTensor& t : model.layout.tensors) {
            CAPTURE(t.name);
            long bad = 0;
            double sum = 0.0, sum_sq = 0.0;
            const double std = t.init == Init::ResidualNormal ? residual : sigma;
            for (long i = 0; i < t.numel(); i++) {
                const double got = w[size_t(t.offset + i)];
                if (t.init == Init::Ones || t.init == Init::Zeros) {
                    bad += got != (t.init == Init::Ones ? 1.0 : 0.0);
                    continue;
                }
                // Box-Muller on the counter RNG's word for (seed, the tensor's place, i), in double: the kernel's
                // float logf and cospif differ from it by far less than the tolerance, a wrong stream or scale by
                // far more.
                const uint64_t h = rng_hash(seed, uint64_t(t.position), uint64_t(i));
                const double u1 = (double((h >> 40) & 0xFFFFFF) + 1.0) / 16777217.0;
                const double u2 = double(h & 0xFFFFFF) / 16777216.0;
                const double z = std::sqrt(-2.0 * std::log(u1)) * std::cos(2.0 * std::acos(-1.0) * u2);
                bad += std::fabs(got / std - z) > 1e-3;
                sum += got, sum_sq += got * got;
            }
            CHECK(bad == 0);
            if (t.init == Init::Normal || t.init == Init::ResidualNormal) {  // and the sample's spread is sigma's
                const double n = double(t.numel()), spread = std::sqrt(sum_sq / n - (sum / n) * (sum / n));
                CHECK(spread == doctest::Approx(std).epsilon(5.0 / std::sqrt(n) + 0.02));
            }
        }
    }

    TEST_CASE("a training step is AdamW on the model's gradients: clipped by their global norm, decay on matrices") {
        const Config c = tiny_moe_config();
        auto model = make_model<float>(c, 16);
        std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 6), inputs, targets;
        split_rows(rows, B, T, inputs, targets);
        const long n = model->layout.trained;
        std::vector<float> want = model->master.download(), m(size_t(n), 0.0f), v(size_t(n), 0.0f);
        want.resize(size_t(n));
        const AdamW opt{1e-2f};
        for (float max_grad_norm : {0.0f, 0.05f}) {  // no clipping, and a limit below the gradients' norm
            CAPTURE(max_grad_norm);
            model->reset_optimizer();
            model->master.upload([&] {
                std::vector<float> w = model->master.download();
                std::copy(want.begin(), want.end(), w.begin());
                return w;
            }());
            model->refresh_weights();
            model->train_step(inputs, targets, B, T, opt, max_grad_norm, 1, 9, 0.3f);
            std::vector<float> grads = model->grads.download(), after = model->master.download();
            grads.resize(size_t(n)), after.resize(size_t(n));
            std::vector<float> expected = want, m_want = m, v_want = v;
            ref::adamw_step(grads, model->layout.decayed, opt, max_grad_norm, 1, 9, expected, m_want, v_want);
            CHECK(std::sqrt(ref::sum(grads, true)) > 0.05);
            CHECK(ref::max_abs_error(after, expected) <= 1e-4 * opt.lr);
        }
    }

    TEST_CASE("training lowers the loss on a fixed batch; the router biases move") {
        for (Config c : configs()) {
            CAPTURE(c.first_k_dense_replace);
            c.initializer_range = 0.02f;
            std::vector<int> rows = random_tokens(B * (T + 1), c.vocab_size, 5), inputs, targets;
            split_rows(rows, B, T, inputs, targets);
            auto model = make_model<bf16>(c, 14);
            std::vector<float> before = model->master.download();
            float first = 0.0f, last = 0.0f;
            for (int step = 1; step <= 50; step++) {
                model->train_step(inputs, targets, B, T, AdamW{1e-2f}, 1.0f, step, 1, 0.3f);
                float loss = model->read_scalars().loss_sum / float(B * T);
                if (step == 1) first = loss;
                last = loss;
            }
            CHECK(last < 0.5f * first);
            std::vector<float> after = model->master.download();
            CHECK(std::equal(before.begin() + model->layout.trained, before.end(),
                             after.begin() + model->layout.trained) == !c.has_moe());
        }
    }

    TEST_CASE("save -> load gives identical routing and logits; bad checkpoints are refused") {
        for (const Config& c : configs()) {
            CAPTURE(c.first_k_dense_replace);
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
            CHECK(load_config(dir + "/config.json").num_nextn_predict_layers == c.num_nextn_predict_layers);
            std::vector<int> targets = random_tokens(B * T, c.vocab_size, 8);
            for (Model<bf16>* m : {model.get(), &loaded}) m->mtp_forward(tokens, targets, B, T, 0.3f);
            CHECK(model->read_scalars().mtp_loss == loaded.read_scalars().mtp_loss);  // the MTP module came back
            if (c.has_moe()) {
                std::vector<int> ra = loaded.layers[1].routed.loads(loaded.acts[1].moe),
                                 rb = model->layers[1].routed.loads(model->acts[1].moe);
                CHECK(ra == rb);
                std::vector<int> ea(size_t(B) * T * c.num_experts_per_tok), eb(ea.size());
                CUDA_CHECK(cudaMemcpy(ea.data(), model->acts[1].moe.expert, ea.size() * 4, cudaMemcpyDeviceToHost));
                CUDA_CHECK(cudaMemcpy(eb.data(), loaded.acts[1].moe.expert, eb.size() * 4, cudaMemcpyDeviceToHost));
                CHECK(ea == eb);
            }

            Config other = c;
            other.intermediate_size = 64;
            Model<bf16> mismatched(other, B, T);
            CHECK_THROWS_WITH_AS(load_weights(dir, mismatched), doctest::Contains("mlp.gate_proj.weight"),
                                 std::runtime_error);

            std::string weights = dir + "/model.safetensors";
            std::filesystem::resize_file(weights, std::filesystem::file_size(weights) - 100);
            CHECK_THROWS_WITH_AS(load_weights(dir, loaded), doctest::Contains("model.safetensors"),
                                 std::runtime_error);
            std::filesystem::remove_all(dir);
        }
    }

    TEST_CASE("a resumed run repeats the uninterrupted run's losses bit for bit") {
        for (Config c : configs()) {
            CAPTURE(c.first_k_dense_replace);
            c.initializer_range = 0.02f;
            std::string dir = temp_dir("mini_deepseek_resume");
            data::Tokenizer tok;
            auto batch = [&](int step) { return random_tokens(B * (T + 1), c.vocab_size, 100 + step); };
            auto run = [&](Model<bf16>& m, int from, int to) {
                std::vector<float> losses;
                for (int step = from; step <= to; step++) {
                    std::vector<int> inputs, targets;
                    split_rows(batch(step), B, T, inputs, targets);
                    m.train_step(inputs, targets, B, T, AdamW{1e-3f}, 1.0f, step, 5, 0.3f);
                    StepScalars s = m.read_scalars();
                    losses.push_back(s.loss_sum), losses.push_back(s.balance_loss), losses.push_back(s.mtp_loss);
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
}
