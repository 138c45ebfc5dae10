// train.cu: the program. Its stages follow the R1 paper's pipeline: `pretrain` makes the base model from the
// synthetic corpus; `r1zero` runs GRPO straight on it (R1-Zero); `sft` is the cold start and `grpo` the RL that
// follows it (R1); `eval` scores any checkpoint; `logits` serves the transformers parity check.
// `train --help` lists the flags.
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <memory>
#include <sstream>

#include "data/corpus.h"
#include "data/rewards.h"
#include "grpo.cuh"
#include "io/checkpoint.h"
#include "io/eval.h"
#include "io/json.h"
#include "io/options.h"
#include "model.cuh"
#include "sampler.cuh"

namespace fs = std::filesystem;

// The GPU memory in use after a step (its buffers are all allocated by then), and the run's peak so far.
inline void record_memory(Json& record) {
    const double now = gpu_memory_in_use_gb();
    record["memory_gb"] = now, record["peak_memory_gb"] = gpu_memory_peak_gb(now);
}

// Several GPUs: the milliseconds this rank's stream spent in collectives since the previous record (a step's
// communication, waits for the other ranks included).
inline double record_comm(Comm* comm, Json& record) {
    if (!comm) return 0.0;
    const double ms = comm->clock.read_ms();
    record["comm_ms"] = ms;
    return ms;
}

// The corpus of a run: the default mix, drawn from the run's seed.
inline data::CorpusConfig corpus_for(const Options& o) {
    data::CorpusConfig corpus;
    corpus.seed = uint64_t(o.seed);
    return corpus;
}

// The tokenizer's ids index the embedding and the logits: a config with another vocabulary cannot work with it.
inline void check_vocabulary(const Config& cfg, const std::string& source) {
    if (cfg.vocab_size != data::Tokenizer::vocab_size)
        throw std::runtime_error(source + ": vocab_size " + std::to_string(cfg.vocab_size) +
                                 " does not match the tokenizer's " + std::to_string(data::Tokenizer::vocab_size));
}

// A model with the config and weights of checkpoint dir, with buffers for B sequences of T tokens; the prompt
// template it was trained with goes to *prompt_template.
template <typename T>
std::unique_ptr<Model<T>> load_model(const std::string& checkpoint_dir, int B, int T_,
                                     std::string* prompt_template = nullptr, bool trains = true) {
    std::string dir = open_checkpoint(checkpoint_dir);
    Config cfg = load_config(dir + "/config.json");
    check_vocabulary(cfg, dir + "/config.json");
    auto model = std::make_unique<Model<T>>(cfg, B, T_, trains);
    std::string trained_with = load_weights(dir, *model);
    if (prompt_template) *prompt_template = trained_with;
    return model;
}

// --template auto prompts a model the way it was trained: R1-Zero with its instruction, the others in chat form.
inline bool use_r1zero_template(const Options& o, const std::string& checkpoint_template) {
    return (o.template_name == "auto" ? checkpoint_template : o.template_name) == "r1zero";
}

// The problems of sft, r1zero and grpo.
inline data::ProblemMix problem_mix(const Options& o) {
    data::ProblemMix mix;
    mix.whole_corpus = o.task == "mix";
    if (mix.whole_corpus) return mix;
    mix.kind = data::task_from_name(o.task), mix.difficulty = o.difficulty, mix.replay = o.replay;
    if (o.difficulty > data::max_difficulty(mix.kind))
        throw std::invalid_argument("--difficulty " + std::to_string(o.difficulty) + " exceeds " + o.task +
                                    "'s maximum " + std::to_string(data::max_difficulty(mix.kind)));
    return mix;
}

// --balancing: how the experts' loads are kept even (V3 §2.1.2; the conventional auxiliary loss for comparison).
inline Balancing balancing_for(const Options& o) {
    Balancing b;
    b.bias_rate = o.balancing == "aux-free" ? o.bias_rate : 0.0f;
    b.alpha = o.balancing == "aux-free" ? o.balance_alpha : o.balancing == "aux-loss" ? o.aux_alpha : 0.0f;
    b.per_sequence = o.balancing == "aux-free";
    return b;
}

// How the training model runs: --precision fp8 puts the projections' GEMMs in FP8 (V3 §3.3); --balancing.
template <typename T>
void configure(const Options& o, Model<T>& model) {
    if (o.precision == "fp8") model.enable_fp8(fp8_backend_named(o.fp8_gemm));
    model.balancing = balancing_for(o);
}

// A step that met a NaN or Inf in FP8 quantization left the weights as they were: say so, and go on; but a run
// whose steps keep meeting them has diverged, and stops.
struct SkippedSteps {
    static constexpr int kMaxInARow = 10;
    int in_a_row = 0;

    template <typename T>
    bool check(Model<T>& model, int step) {
        if (!model.step_skipped()) return in_a_row = 0, false;
        std::printf("step %d skipped: a NaN or Inf in an FP8 tile; the weights are unchanged\n", step);
        if (++in_a_row == kMaxInARow)
            throw std::runtime_error(std::to_string(kMaxInARow) +
                                     " steps in a row met a NaN or Inf: the run diverged; stopping");
        return true;
    }
};

// Forward-pass model FLOPs per token (a training step costs three of them per token).
inline double forward_flops_per_token(const Config& cfg, int T) { return train_flops_per_token(cfg, T) / 3.0; }

inline AdamW adamw_at(const Options& o, int step) {
    return AdamW{learning_rate(o, step), 0.9f, o.beta2, 1e-8f, o.weight_decay};
}

// lambda of the MTP loss at a step of pretrain or sft (0 for a model without MTP modules: nothing trains them).
inline float mtp_lambda_at(const Options& o, const Config& cfg, int step) {
    if (cfg.num_nextn_predict_layers == 0) return 0.0f;
    return MtpWeight{o.mtp_lambda, o.mtp_lambda_late, o.mtp_late_from}.at(step, o.steps);
}

// The main loss and, where the MTP modules trained in the step, theirs, into a log record and the progress line.
inline std::string record_losses(float loss, float mtp_lambda, const StepScalars& scalars, Json& record) {
    record["loss"] = double(loss);
    if (mtp_lambda <= 0.0f) return "";
    record["mtp_loss"] = double(scalars.mtp_loss), record["mtp_accuracy"] = double(scalars.mtp_accuracy);
    record["mtp_lambda"] = double(mtp_lambda);
    char line[64];
    std::snprintf(line, sizeof line, " | mtp %.4f (top-1 %.1f%%)", scalars.mtp_loss, 100.0 * scalars.mtp_accuracy);
    return line;
}

// The flags that shape a run's data and schedule: a resumed run must be given the same ones.
inline std::string schedule_flags(const Options& o) {
    std::ostringstream s;
    s << "batch=" << o.batch << " seq=" << o.seq << " steps=" << o.steps << " warmup=" << o.warmup << " lr=" << o.lr
      << " min_lr_frac=" << o.min_lr_frac << " weight_decay=" << o.weight_decay << " beta2=" << o.beta2
      << " grad_clip=" << o.grad_clip << " balancing=" << o.balancing << " bias_rate=" << o.bias_rate
      << " balance_alpha=" << o.balance_alpha << " aux_alpha=" << o.aux_alpha << " mtp_lambda=" << o.mtp_lambda
      << " mtp_lambda_late=" << o.mtp_lambda_late << " mtp_late_from=" << o.mtp_late_from;
    if (o.stage == "r1zero" || o.stage == "grpo")
        s << " task=" << o.task << " difficulty=" << o.difficulty << " replay=" << o.replay << " prompts=" << o.prompts
          << " group=" << o.group << " updates=" << o.updates << " max_new=" << o.max_new
          << " temperature=" << o.temperature << " kl=" << o.kl << " clip_low=" << o.clip_low
          << " clip_high=" << o.clip_high << " w_format=" << o.w_format << " w_language=" << o.w_language
          << " dr_grpo=" << o.dr_grpo << " token_norm=" << o.token_norm << " skip_uniform=" << o.skip_uniform;
    if ((o.stage == "r1zero" || o.stage == "grpo") && o.w_overlong > 0.0f)  // checkpoints from before it resume
        s << " w_overlong=" << o.w_overlong << " overlong_cache=" << o.overlong_cache;
    return s.str();
}

// ---------------------------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------------------------

// The MoE layers in the last step's forward pass, into a log record: per layer the experts' loads and the max
// violation, the balance loss, and the range of the router biases. Returns the largest violation of any layer.
template <typename T>
double record_expert_balance(Model<T>& model, const StepScalars& scalars, Json& record) {
    if (!model.cfg.has_moe()) return 0.0;
    Json loads = Json::array(), violations = Json::array();
    double worst = 0.0;
    float bias_min = INFINITY, bias_max = -INFINITY;
    for (int l = 0; l < model.cfg.num_hidden_layers; l++) {
        if (!model.layers[l].moe) continue;
        const std::vector<int> load = model.layers[l].routed.loads(model.acts[l].moe);
        Json row = Json::array();
        for (int x : load) row.push_back(x);
        loads.push_back(row);
        const double v = max_violation(load);
        violations.push_back(v), worst = std::max(worst, v);
        std::vector<float> bias(load.size());
        CUDA_CHECK(cudaMemcpy(bias.data(), model.master.data() + model.layout.offset(model.layers[l].routed.bias),
                              sizeof(float) * bias.size(), cudaMemcpyDeviceToHost));
        for (float b : bias) bias_min = std::min(bias_min, b), bias_max = std::max(bias_max, b);
    }
    record["expert_load"] = loads, record["max_violation"] = violations;
    record["balance_loss"] = double(scalars.balance_loss);
    record["bias_min"] = double(bias_min), record["bias_max"] = double(bias_max);
    return worst;
}

inline std::string format_duration(double seconds) {
    char buf[32];
    int s = int(seconds + 0.5);
    if (s >= 3600)
        std::snprintf(buf, sizeof buf, "%dh%02dm", s / 3600, s / 60 % 60);
    else
        std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
    return buf;
}

inline EvalSettings eval_settings(const Options& o, bool r1zero_template, bool direct = false) {
    EvalSettings e;
    e.problems = o.samples, e.k = o.eval_temperature > 0 ? o.eval_k : 1, e.temperature = o.eval_temperature;
    e.r1zero_template = r1zero_template, e.direct = direct, e.seed = uint64_t(o.seed);
    e.speculative = !o.no_speculative, e.speculative_max_batch = o.speculative_max_batch;
    return e;
}

// "runs/r1/checkpoint" -> "r1": a checkpoint is named by its run.
inline std::string run_name(const std::string& checkpoint) {
    fs::path path = fs::path(folder_name(checkpoint));
    if (path.filename() == "checkpoint" && path.has_parent_path()) path = path.parent_path();
    return path.filename().string();
}

// ---------------------------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------------------------

// Data parallel (nccl.cuh): every rank writes its own copy of a run's files but rank 0's go nowhere.
inline std::string rank_path(const Comm* comm, const std::string& path) {
    return comm && !comm->ranks.is_root() ? "/dev/null" : path;
}

// The optimizer state and step of the checkpoint `ckpt` that --resume continues from, into model: it must have been
// trained with the same flags, or the run would not repeat the uninterrupted one.
template <typename T>
TrainerState resume_state(const Options& o, const std::string& ckpt, Model<T>& model) {
    TrainerState state = load_trainer_state(ckpt, model);
    if (state.seed != uint64_t(o.seed) || state.precision != o.precision || state.schedule != schedule_flags(o))
        throw std::runtime_error(ckpt + " was trained with --seed " + std::to_string(state.seed) + " --precision " +
                                 state.precision + " and " + state.schedule +
                                 ": resume with the same flags, or the run would not repeat itself");
    std::printf("resuming from %s at step %d\n", ckpt.c_str(), state.step);
    return state;
}

// This rank's rows of each batch of --batch rows x --seq tokens (all of them on one GPU); every rank refuses a split
// that FP8 cannot take alike.
inline RowRange rows_of_batch(const Options& o, const Comm* comm) {
    const Ranks ranks = comm ? comm->ranks : Ranks{};
    for (int r = 0; r < ranks.world; r++) {
        const int rows = rows_of_rank(o.batch, Ranks{r, ranks.world, r}).count();
        if (o.precision == "fp8" && long(rows) * o.seq % 16 != 0)
            throw std::invalid_argument("--precision fp8 needs each GPU's rows (" + std::to_string(rows) +
                                        ") x --seq to be a multiple of 16");
    }
    return rows_of_rank(o.batch, ranks);
}

// The collectives are over: rank 0 samples the held-out problems alone (the others' watchdogs stop waiting).
inline bool samples_after_training(const Options& o, Comm* comm) {
    if (comm) comm->watchdog.halt();
    return o.samples > 0 && (!comm || comm->ranks.is_root());
}

// With comm, data parallel: this rank trains on its rows of each batch, ZeRO-1 shares the optimizer.
template <typename T>
int pretrain(const Options& o, Comm* comm) {
    data::Tokenizer tok;
    data::CorpusConfig corpus = corpus_for(o);
    std::string ckpt = o.out + "/checkpoint";
    std::string source = o.resume ? open_checkpoint(ckpt) : o.init.empty() ? "" : open_checkpoint(o.init);
    Config cfg = !source.empty() ? load_config(source + "/config.json")
                                 : (o.config_path.empty() ? Config() : load_config(o.config_path));
    check_vocabulary(cfg, source.empty() ? (o.config_path.empty() ? "the default config" : o.config_path) : source);
    const RowRange rows_mine = rows_of_batch(o, comm);
    Model<T> model(cfg, rows_mine.count(), o.seq);
    if (comm) model.distribute(*comm, rows_mine.count(), o.batch, o.expert_parallel);
    int start = 0;
    if (!source.empty()) load_weights(source, model);
    if (o.resume) {
        start = resume_state(o, ckpt, model).step;
    } else if (source.empty()) {
        model.init_weights(uint64_t(o.seed));
    }
    configure(o, model);
    fs::create_directories(o.out);
    JsonlLog log(rank_path(comm, o.out + "/log.jsonl"), o.resume);

    long tokens_per_step = long(o.batch) * o.seq;
    const bool with_mtp = mtp_lambda_at(o, cfg, 1) > 0.0f || mtp_lambda_at(o, cfg, o.steps) > 0.0f;
    double flops_per_step = train_flops_per_token(cfg, o.seq, with_mtp) * double(tokens_per_step);
    std::printf(
        "model: %.2fM parameters (%.2fM in GEMMs, %.2fM of them active per token; MTP modules %d, %.2fM in GEMMs), "
        "precision %s, %d x %d tokens per step, %.2f TFLOP per step\n",
        model.num_params() / 1e6, model.matmul_params(false) / 1e6, model.matmul_params(true) / 1e6,
        cfg.num_nextn_predict_layers, model.matmul_params(false, true) / 1e6, o.precision.c_str(), o.batch, o.seq,
        flops_per_step / 1e12);

    std::vector<int> rows, next_rows, inputs, targets;
    const int B = rows_mine.count();
    data::pretrain_batch(tok, corpus, start + 1, B, o.seq, rows, rows_mine.begin);
    WallTimer run_clock;
    SkippedSteps skipped_steps;
    double timed_seconds = 0.0;
    for (int step = start + 1; step <= o.steps; step++) {
        WallTimer step_clock;
        AdamW opt = adamw_at(o, step);
        float lr = opt.lr, mtp_lambda = mtp_lambda_at(o, cfg, step);
        split_rows(rows, B, o.seq, inputs, targets);
        model.train_step(inputs, targets, B, o.seq, opt, o.grad_clip, step, uint64_t(o.seed), mtp_lambda);
        if (step < o.steps)  // overlaps the GPU
            data::pretrain_batch(tok, corpus, step + 1, B, o.seq, next_rows, rows_mine.begin);
        const StepScalars scalars = model.read_scalars();
        const float loss = scalars.loss_sum / float(tokens_per_step), grad_norm = scalars.grad_norm;
        const bool skipped = skipped_steps.check(model, step);
        if (!skipped && !std::isfinite(loss)) {
            std::fprintf(stderr, "error: loss is %f at step %d; stopping (the last checkpoint is intact)\n", loss,
                         step);
            return 1;
        }
        rows.swap(next_rows);
        double seconds = step_clock.seconds();
        if (step > start + 1) timed_seconds += seconds;  // the first step pays for cuBLAS planning
        double tokens_per_s = tokens_per_step / seconds;
        double mfu = flops_per_step / seconds / (gpu_info().bf16_peak_flops * (comm ? comm->ranks.world : 1));

        Json record = Json::object();
        record["step"] = step;
        const std::string mtp_line = record_losses(loss, mtp_lambda, scalars, record);
        record["lr"] = double(lr);
        record["grad_norm"] = double(grad_norm), record["tokens_per_s"] = tokens_per_s, record["mfu"] = mfu;
        record["ms"] = seconds * 1e3, record["skipped"] = skipped;
        const double violation = record_expert_balance(model, scalars, record);
        record_memory(record);
        const double comm_ms = record_comm(comm, record);
        log.write(record);
        if (step % o.log_every == 0 || step == start + 1 || step == o.steps) {
            double per_step = step > start + 1 ? timed_seconds / (step - start - 1) : seconds;
            std::printf("step %5d/%d | loss %.4f%s | lr %.2e | grad norm %.3f | %7.0fk tok/s | MFU %4.1f%% | ", step,
                        o.steps, loss, mtp_line.c_str(), lr, grad_norm, tokens_per_s / 1e3, 100.0 * mfu);
            if (cfg.has_moe()) std::printf("max violation %.2f | ", violation);
            if (comm) std::printf("comm %4.1f%% | ", 100.0 * comm_ms / (seconds * 1e3));
            std::printf("ETA %s\n", format_duration(per_step * (o.steps - step)).c_str());
            std::fflush(stdout);
        }
        if (step % o.eval_every == 0 || step == o.steps) {
            float heldout = heldout_loss(model, tok, corpus, o.eval_batches, rows_mine.begin);
            std::printf("step %5d | held-out loss %.4f\n", step, heldout);
            Json eval = Json::object();
            eval["step"] = step, eval["heldout_loss"] = double(heldout);
            log.write(eval);
        }
        if (step % o.ckpt_every == 0 || step == o.steps) {
            save_checkpoint(ckpt, model, {step, uint64_t(o.seed), o.precision, schedule_flags(o), "chat"}, tok);
            std::printf("step %5d | checkpoint %s\n", step, ckpt.c_str());
        }
    }
    if (o.steps > start + 1)
        std::printf("trained %d steps in %s: %.0f tokens/s after the first step\n", o.steps - start,
                    format_duration(run_clock.seconds()).c_str(),
                    tokens_per_step * (o.steps - start - 1) / timed_seconds);
    EvalSettings e = eval_settings(o, false);
    if (samples_after_training(o, comm)) report_eval(evaluate_tasks(model, tok, corpus, e, 2), e, &log);
    return 0;
}

// One column of the eval stage: "runs/r1/checkpoint" prompts the model as it was trained; a suffix ":chat" or
// ":r1zero" names the prompt, ":direct" gives the think block empty so that the model must answer at once.
struct EvalEntry {
    std::string path, name, prompt;  // prompt: "" (as trained, or --template), chat, r1zero or direct
};

inline EvalEntry eval_entry(const std::string& spec) {
    EvalEntry entry{spec, "", ""};
    size_t colon = spec.rfind(':');
    if (colon != std::string::npos) {
        entry.path = spec.substr(0, colon), entry.prompt = spec.substr(colon + 1);
        if (entry.prompt != "chat" && entry.prompt != "r1zero" && entry.prompt != "direct")
            throw std::invalid_argument("eval: '" + spec + "' ends in ':" + entry.prompt +
                                        "'; the suffixes are :chat, :r1zero and :direct");
    }
    entry.name = run_name(entry.path) + (entry.prompt.empty() ? "" : ":" + entry.prompt);
    return entry;
}

// Every checkpoint of --init A,B,... on the same held-out problems, side by side; the tables go to OUT/eval.md.
template <typename T>
int evaluate(const Options& o) {
    data::Tokenizer tok;
    data::CorpusConfig corpus = corpus_for(o);
    std::vector<ModelEval> evals;
    EvalSettings e;
    std::stringstream specs(o.init);
    for (std::string spec; std::getline(specs, spec, ',');) {
        EvalEntry entry = eval_entry(spec);
        std::string trained_with;
        auto model = load_model<T>(entry.path, o.batch, o.seq, &trained_with);
        bool r1zero = entry.prompt.empty() ? use_r1zero_template(o, trained_with) : entry.prompt == "r1zero";
        e = eval_settings(o, r1zero, entry.prompt == "direct");
        std::printf("%s: held-out loss %.4f\n", entry.name.c_str(), heldout_loss(*model, tok, corpus, o.eval_batches));
        evals.push_back({entry.name, evaluate_tasks(*model, tok, corpus, e, 0)});
    }
    std::string tables = comparison_tables(evals, e);
    std::printf("\n%s", tables.c_str());
    fs::create_directories(o.out);
    write_file_atomic(o.out + "/eval.md", tables);
    std::printf("wrote %s/eval.md\n", o.out.c_str());
    return 0;
}

// The compute of a run recorded in RUN/log.jsonl: the train_flops of its last step.
inline double run_flops(const std::string& run) {
    std::ifstream in(run + "/log.jsonl");
    if (!in) throw std::runtime_error("cannot read " + run + "/log.jsonl (--same-flops-as)");
    double flops = 0;
    for (std::string line; std::getline(in, line);) {
        Json record = Json::parse(line);
        if (record.contains("train_flops")) flops = record.at("train_flops").as_number();
    }
    if (!(flops > 0)) throw std::runtime_error(run + "/log.jsonl records no train_flops (--same-flops-as)");
    return flops;
}

// Supervised fine-tuning: the cold start (R1 §2.3.1) on single-language chains of thought with a summary, the
// loss on the assistant's tokens only. With --same-flops-as RUN it takes as many steps as RUN's model compute:
// the supervised baseline of an RL run. With comm, data parallel as pretraining.
template <typename T>
int cold_start(const Options& given, Comm* comm) {
    data::Tokenizer tok;
    data::CorpusConfig corpus = corpus_for(given);
    const RowRange rows_mine = rows_of_batch(given, comm);
    auto loaded = load_model<T>(given.init, rows_mine.count(), given.seq);
    Model<T>& model = *loaded;
    if (comm) model.distribute(*comm, rows_mine.count(), given.batch, given.expert_parallel);
    model.reset_optimizer();
    configure(given, model);
    const bool with_mtp = mtp_lambda_at(given, model.cfg, 1) > 0.0f;
    const double flops_per_step = train_flops_per_token(model.cfg, given.seq, with_mtp) * given.batch * given.seq;
    Options o = given;
    if (!o.same_flops_as.empty()) {
        double flops = run_flops(o.same_flops_as);
        o.steps = std::max(1, int(std::lround(flops / flops_per_step)));
        std::printf("%.3g FLOP of %s = %d steps of %d x %d tokens\n", flops, o.same_flops_as.c_str(), o.steps, o.batch,
                    o.seq);
    }
    std::vector<data::SftExample> examples;
    for (const data::Problem& p : data::cold_start_set(o.sft_examples, corpus, problem_mix(o), uint64_t(o.seed)))
        examples.push_back(data::sft_example(tok, p, o.seq));
    fs::create_directories(o.out);
    JsonlLog log(rank_path(comm, o.out + "/log.jsonl"), false);
    std::vector<int> inputs, targets;
    WallTimer clock;
    SkippedSteps skipped_steps;
    for (int step = 1; step <= o.steps; step++) {
        inputs.clear(), targets.clear();
        for (int b = rows_mine.begin; b < rows_mine.end; b++) {
            const data::SftExample& e = examples[(size_t(step - 1) * o.batch + b) % examples.size()];
            inputs.insert(inputs.end(), e.tokens.begin(), e.tokens.end());
            targets.insert(targets.end(), e.targets.begin(), e.targets.end());
        }
        float lr = learning_rate(o, step), mtp_lambda = mtp_lambda_at(o, model.cfg, step);
        const long counted = model.train_step(inputs, targets, rows_mine.count(), o.seq, adamw_at(o, step),
                                              o.grad_clip, step, uint64_t(o.seed), mtp_lambda);
        const StepScalars scalars = model.read_scalars();
        const float loss = scalars.loss_sum / float(std::max(counted, 1L)), grad_norm = scalars.grad_norm;
        const bool skipped = skipped_steps.check(model, step);
        if (!skipped && (!std::isfinite(loss) || !std::isfinite(grad_norm))) {
            std::fprintf(stderr, "error: loss %f, gradient norm %f at step %d; stopping without a checkpoint\n", loss,
                         grad_norm, step);
            return 1;
        }
        Json record = Json::object();
        record["step"] = step;
        const std::string mtp_line = record_losses(loss, mtp_lambda, scalars, record);
        record["lr"] = double(lr);
        record["grad_norm"] = double(grad_norm), record["train_flops"] = flops_per_step * step;
        record["skipped"] = skipped;
        record_expert_balance(model, scalars, record);
        record_memory(record);
        record_comm(comm, record);
        log.write(record);
        if (step % o.log_every == 0 || step == 1 || step == o.steps)
            std::printf("sft step %5d/%d | loss %.4f%s | lr %.2e | %s\n", step, o.steps, loss, mtp_line.c_str(), lr,
                        format_duration(clock.seconds()).c_str());
    }
    save_checkpoint(o.out + "/checkpoint", model, {o.steps, uint64_t(o.seed), o.precision, schedule_flags(o), "chat"},
                    tok);
    EvalSettings e = eval_settings(o, false);
    if (samples_after_training(o, comm)) report_eval(evaluate_tasks(model, tok, corpus, e, 2), e, &log);
    return 0;
}

// GRPO with rule-based rewards: `r1zero` from the base model with the R1-Zero prompt, `grpo` from the cold-start
// model with the chat prompt. The initial model (--init) is also the frozen reference of the KL term; --resume
// continues the policy from OUT/checkpoint. With comm, data parallel: each rank samples and trains on its share of
// the prompts (grpo.cuh).
template <typename T>
int reinforce(const Options& o, Comm* comm) {
    data::Tokenizer tok;
    data::CorpusConfig corpus = corpus_for(o);
    const Ranks ranks = comm ? comm->ranks : Ranks{};
    const RowRange prompts_mine = rows_of_rank(o.prompts, ranks);
    const int S = prompts_mine.count() * o.group;
    const int fewest = rows_of_rank(o.prompts, Ranks{0, ranks.world, 0}).count() * o.group;  // the first rank's
    const int most = rows_of_rank(o.prompts, Ranks{ranks.world - 1, ranks.world, 0}).count() * o.group;  // the last's
    const GrpoPasses split(S, fewest, most, o.micro_batch);
    const std::string ckpt = o.out + "/checkpoint";
    auto loaded_policy = load_model<T>(o.resume ? ckpt : o.init, split.rows, o.seq);
    auto reference = load_model<T>(o.init, split.rows, o.seq, nullptr, false);
    Model<T>& policy = *loaded_policy;
    if (comm) policy.distribute(*comm, S, o.prompts * o.group, o.expert_parallel);
    const TrainerState resumed = o.resume ? resume_state(o, ckpt, policy) : TrainerState{};
    if (!o.resume) policy.reset_optimizer();
    configure(o, policy);
    GrpoTrainer<T> trainer(policy, *reference, S, o.seq, split.passes);
    GrpoOptions g;
    g.group = o.group, g.updates = o.updates, g.max_new = o.max_new, g.temperature = o.temperature;
    g.loss = GrpoConfig{o.clip_low, o.clip_high, o.kl, o.temperature};
    g.scale_by_std = !o.dr_grpo;
    g.norm = o.dr_grpo ? Normalization::Constant : o.token_norm ? Normalization::Token : Normalization::Sequence;
    g.skip_uniform_groups = o.skip_uniform, g.r1zero_template = o.stage == "r1zero";
    g.speculative = !o.no_speculative, g.speculative_max_batch = o.speculative_max_batch;
    g.reward.w_format = o.w_format, g.reward.w_language = o.w_language, g.reward.w_overlong = o.w_overlong;
    g.reward.max_tokens = o.max_new, g.reward.overlong_cache = o.overlong_cache;
    const data::ProblemMix mix = problem_mix(o);
    const double flops_per_forward_token = forward_flops_per_token(policy.cfg, o.seq);

    fs::create_directories(o.out);
    JsonlLog log(rank_path(comm, o.out + "/log.jsonl"), o.resume);
    int optimizer_step = o.resume ? resumed.optimizer_steps : 0;
    double train_flops = resumed.train_flops;
    WallTimer clock;
    SkippedSteps skipped_steps;
    for (int step = resumed.step + 1; step <= o.steps; step++) {
        Rng rng(uint64_t(o.seed), rng_hash(0x726c, uint64_t(step), 0));
        std::vector<data::Problem> problems;
        for (int i = 0; i < o.prompts; i++) {  // every rank draws them all, and keeps its own
            data::Problem p = data::draw_problem(corpus, mix, rng);
            if (i >= prompts_mine.begin && i < prompts_mine.end) problems.push_back(std::move(p));
        }
        float lr = learning_rate(o, step);
        GrpoStats st =
            trainer.step(problems, g, adamw_at(o, step), o.grad_clip, optimizer_step, uint64_t(o.seed), step);
        const StepScalars scalars = policy.read_scalars();
        const float grad_norm = scalars.grad_norm;
        const bool skipped = skipped_steps.check(policy, step);
        if (!skipped && (!std::isfinite(st.objective) || !std::isfinite(grad_norm))) {
            std::fprintf(stderr, "error: objective %f, gradient norm %f at step %d; stopping without a checkpoint\n",
                         st.objective, grad_norm, step);
            return 1;
        }
        train_flops += st.forward_tokens * flops_per_forward_token;
        Json record = Json::object();
        record["step"] = step, record["reward"] = st.reward, record["accuracy"] = st.accuracy;
        record["format"] = st.format, record["language"] = st.language, record["mixing"] = st.mixing;
        record["response_tokens"] = st.response_tokens, record["objective"] = st.objective, record["kl"] = st.kl;
        record["clip_fraction"] = st.clip_fraction, record["grad_norm"] = double(grad_norm);
        record["uniform_groups"] = st.uniform_groups, record["lr"] = double(lr), record["seconds"] = clock.seconds();
        record["train_flops"] = train_flops, record["skipped"] = skipped;
        char drafts[32] = "";  // speculative rollouts: the share of the MTP module's drafts kept
        if (st.drafts.drafted > 0) {
            record["draft_acceptance"] = st.drafts.rate();
            std::snprintf(drafts, sizeof drafts, " | drafts kept %.2f", st.drafts.rate());
        }
        record_expert_balance(policy, scalars, record);
        record_memory(record);
        record_comm(comm, record);
        log.write(record);
        if (step % o.log_every == 0 || step == 1 || step == o.steps)
            std::printf(
                "%s step %4d/%d | reward %.3f | accuracy %.3f | format %.3f | mixed %.3f | length %5.1f | "
                "kl %.4f | clipped %.3f | uniform groups %d%s | %s\n",
                o.stage.c_str(), step, o.steps, st.reward, st.accuracy, st.format, st.mixing, st.response_tokens, st.kl,
                st.clip_fraction, st.uniform_groups, drafts, format_duration(clock.seconds()).c_str());
        if (step % o.ckpt_every == 0 || step == o.steps)
            save_checkpoint(ckpt, policy,
                            {step, uint64_t(o.seed), o.precision, schedule_flags(o),
                             g.r1zero_template ? "r1zero" : "chat", optimizer_step, train_flops},
                            tok);
    }
    std::printf("%s: %.3g FLOP of model compute in %s\n", o.stage.c_str(), train_flops,
                format_duration(clock.seconds()).c_str());
    EvalSettings e = eval_settings(o, g.r1zero_template);
    if (samples_after_training(o, comm)) report_eval(evaluate_tasks(policy, tok, corpus, e, 2), e, &log);
    return 0;
}

// The demo: a typed problem goes to the model in the format it was trained with (or the one --template names); the
// thinking streams token by token as the model writes it (greedy decoding), then the answer is checked.
template <typename T>
int chat(const Options& o) {
    data::Tokenizer tok;
    std::string trained_with;
    auto model = load_model<T>(o.init, 1, o.seq, &trained_with);
    const bool r1zero_template = use_r1zero_template(o, trained_with);
    Sampler<T> sampler(*model, 1, o.seq);
    SamplingOptions greedy;
    greedy.temperature = 0.0f, greedy.stop_a = data::ANSWER_END, greedy.stop_b = data::EOS;
    greedy.speculative = !o.no_speculative;
    auto answer = [&](const std::string& typed) {
        data::Problem p;
        std::string why;
        if (!data::parse_problem(typed, p, why)) {
            std::printf("cannot read that: %s\n", why.c_str());
            return;
        }
        std::vector<int> prompt;
        try {
            prompt = tok.encode(data::prompt_text(p, r1zero_template));
            sampler.start({prompt});
        } catch (const std::invalid_argument& e) {  // a character outside the vocabulary, a prompt too long
            std::printf("cannot read that: %s\n", e.what());
            return;
        }
        std::vector<int> response;
        for (bool finished = false; !finished;) {  // a step writes one token, or two when the draft is kept
            sampler.decode(1, greedy);
            const std::vector<int> known = sampler.sequence(0, &finished);
            for (size_t t = prompt.size() + response.size(); t < known.size(); t++) {
                response.push_back(known[t]);
                std::printf("%s", tok.decode({known[t]}).c_str());
            }
            std::fflush(stdout);
        }
        rewards::Reward r = rewards::score(p, tok.decode(response), {});
        if (!r.has_answer)
            std::printf("\n(no answer)\n");
        else
            std::printf("\nanswer %s: %s\n", r.answer.c_str(), r.accuracy > 0 ? "correct" : "wrong");
    };
    if (!o.prompt.empty()) {
        answer(o.prompt);
        return 0;
    }
    std::printf("type a problem (123+456, 12*34, make 24 from 3 5 7 2, or in Alt: BCD+EFG), an empty line to quit\n");
    std::string line;
    while (std::printf("> "), std::fflush(stdout), std::getline(std::cin, line) && !line.empty()) answer(line);
    return 0;
}

// OUT/logits.bin: int32 n, int32 vocab, n int32 token ids, n x vocab float32 logits.
template <typename T>
int write_logits(const Options& o) {
    data::Tokenizer tok;
    std::vector<int> tokens = tok.encode(o.text);
    int n = int(tokens.size());
    auto model = load_model<T>(o.init, 1, n);
    const Config& cfg = model->cfg;
    model->forward(tokens, 1, n);
    std::vector<float> logits(size_t(n) * cfg.vocab_size);
    CUDA_CHECK(cudaMemcpy(logits.data(), model->logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost));
    fs::create_directories(o.out);
    std::string bytes;
    int header[2] = {n, cfg.vocab_size};
    bytes.append(reinterpret_cast<const char*>(header), sizeof header);
    bytes.append(reinterpret_cast<const char*>(tokens.data()), tokens.size() * sizeof(int));
    bytes.append(reinterpret_cast<const char*>(logits.data()), logits.size() * sizeof(float));
    write_file_atomic(o.out + "/logits.bin", bytes);
    std::printf("wrote %s/logits.bin: %d tokens x %d logits\n", o.out.c_str(), n, cfg.vocab_size);
    return 0;
}

// One process per GPU (nccl.cuh): where the launcher started several, they meet in the run folder and rank 0
// alone prints. The training stages run data parallel (and expert parallel with --expert-parallel); eval, chat and
// logits run on one GPU.
std::unique_ptr<Comm> join_ranks(const Options& o, const Ranks& ranks) {
    if (ranks.world == 1) return nullptr;
    if (o.stage == "eval" || o.stage == "chat" || o.stage == "logits")
        throw std::invalid_argument("stage " + o.stage + " runs on one GPU (" + std::to_string(ranks.world) +
                                    " processes were started); pretrain, sft, r1zero and grpo run on several");
    if (o.balancing == "aux-loss")  // its batch-wise loss would be each rank's batch, not the global one
        throw std::invalid_argument("--balancing aux-loss runs on one GPU");
    int gpus = 0;
    CUDA_CHECK(cudaGetDeviceCount(&gpus));
    if (ranks.local_rank >= gpus)
        throw std::invalid_argument("local rank " + std::to_string(ranks.local_rank) +
                                    " has no GPU: this machine has " + std::to_string(gpus));
    if (!ranks.is_root() && !std::freopen("/dev/null", "w", stdout))
        throw std::runtime_error("cannot silence the output of rank " + std::to_string(ranks.rank));
    return std::make_unique<Comm>(ranks, o.out, o.nccl_timeout);
}

// V3's FP8 training needs FP8 tensor cores (sm_89 and newer), and cuBLASLt's block-scaled FP8 GEMM exists on Hopper
// alone: on other GPUs the run takes what the GPU has (BF16, or the project's FP8 kernels), and says so. MFU is
// measured against the GPU's own BF16 peak, in every precision.
void fit_to_gpu(Options& o) {
    const GpuInfo& g = gpu_info();
    std::printf("GPU: %s (sm_%d%s, running code built for sm_%d%s), %d SMs, %.0f GB%s, dense BF16 peak %.0f TFLOP/s\n",
                g.name.c_str(), g.capability, g.as_sm ? " by MINI_DEEPSEEK_AS_SM" : "", g.code_arch,
                g.wgmma ? "a" : "", g.sms, g.memory / 1e9,
                g.memory_limited ? " by MINI_DEEPSEEK_GPU_MEMORY_GB" : "",
                g.bf16_peak_flops / 1e12);
    fit_precision_to_gpu(o.precision, o.fp8_gemm);
}

template <typename T>
int run_stage(const Options& o, Comm* comm) {
    if (o.stage == "pretrain") return pretrain<T>(o, comm);
    if (o.stage == "sft") return cold_start<T>(o, comm);
    if (o.stage == "r1zero" || o.stage == "grpo") return reinforce<T>(o, comm);
    if (o.stage == "eval") return evaluate<T>(o);
    if (o.stage == "chat") return chat<T>(o);
    return write_logits<T>(o);
}

int main(int argc, char** argv) {
    Options o;
    try {
        o.parse(argc, argv);
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "error: %s\n%s", e.what(), Options::usage().c_str());
        return 2;
    } catch (const std::exception& e) {  // a path the filesystem refuses, memory
        std::fprintf(stderr, "error: %s\n", e.what());
        return 2;
    }
    if (o.help) {
        std::printf("%s", Options::usage().c_str());
        return 0;
    }
    if (!require_gpu()) return 1;
    Ranks ranks;
    try {
        ranks = ranks_from_environment(std::getenv);
        std::unique_ptr<Comm> comm = join_ranks(o, ranks);
        fit_to_gpu(o);
        const int status = o.precision == "fp32" ? run_stage<float>(o, comm.get()) : run_stage<bf16>(o, comm.get());
        if (gpu_memory_peak_gb() > 0.0)
            std::printf("peak GPU memory in use: %.2f GB of %.0f GB\n", gpu_memory_peak_gb(), gpu_info().memory / 1e9);
        return status;
    } catch (const std::exception& e) {
        if (ranks.world > 1) std::fprintf(stderr, "rank %d: ", ranks.rank);
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
