// train.cu: the program. `train pretrain` trains the base model on the synthetic reasoning corpus, `train eval`
// scores a checkpoint, `train logits` writes the logits of a text for the transformers parity check.
// `train --help` lists the flags.
#include <cstdio>
#include <filesystem>
#include <fstream>

#include "checkpoint.h"
#include "data/corpus.h"
#include "json.h"
#include "model.cuh"
#include "options.h"

namespace fs = std::filesystem;

constexpr double BF16_PEAK_FLOPS = 989e12;  // H100/H200 SXM dense BF16: the reference for MFU in every precision

// ---------------------------------------------------------------------------------------------------------------
// Evaluation: held-out loss, and greedy decoding scored by the tasks' verifiers
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
float heldout_loss(Model<T>& model, const data::Tokenizer& tok, const data::CorpusConfig& corpus, int batches) {
    int B = model.max_B, T_ = model.max_T;
    std::vector<int> rows, inputs, targets;
    double sum = 0.0;
    for (int k = 0; k < batches; k++) {
        data::heldout_batch(tok, corpus, k, B, T_, rows);
        split_rows(rows, B, T_, inputs, targets);
        model.forward(inputs, B, T_);
        long counted = model.loss(targets);
        sum += model.read_scalars().first / double(counted);
    }
    return float(sum / batches);
}

// The text between the first <answer> and the </answer> after it, or nothing.
inline bool extract_answer(const std::string& response, std::string& answer) {
    size_t open = response.find("<answer>");
    if (open == std::string::npos) return false;
    size_t close = response.find("</answer>", open);
    if (close == std::string::npos) return false;
    answer = response.substr(open + 8, close - open - 8);
    return true;
}

struct TaskScore {
    std::string task;
    int difficulty, n, correct;
    double mean_response_tokens;
};

// Greedy answers to n held-out problems per task and difficulty 1..max_difficulty+1 (one level past training);
// prints the first `show` transcripts of each task's easiest level.
template <typename T>
std::vector<TaskScore> evaluate_tasks(Model<T>& model, const data::Tokenizer& tok, const data::CorpusConfig& corpus,
                                      int n, int show, uint64_t seed) {
    std::vector<TaskScore> scores;
    for (int k = 0; k < data::kNumTaskKinds; k++) {
        if (corpus.kind_weight[k] == 0) continue;
        data::TaskKind kind = data::TaskKind(k);
        int top = std::min(corpus.max_difficulty[k] + 1, data::max_difficulty(kind));
        for (int level = 1; level <= top; level++) {
            std::vector<data::Problem> problems = data::eval_set(kind, level, n, seed);
            TaskScore score{data::task_name(kind), level, n, 0, 0.0};
            for (int first = 0; first < n; first += model.max_B) {
                int count = std::min(model.max_B, n - first);
                std::vector<std::vector<int>> seqs;
                for (int i = 0; i < count; i++) seqs.push_back(tok.encode(data::format_prompt(problems[first + i])));
                std::vector<size_t> prompt_len;
                for (const auto& s : seqs) prompt_len.push_back(s.size());
                model.greedy_extend(seqs, model.max_T, {data::EOS});
                for (int i = 0; i < count; i++) {
                    std::vector<int> response(seqs[i].begin() + long(prompt_len[i]), seqs[i].end());
                    std::string text = tok.decode(response), answer;
                    bool ok = extract_answer(text, answer) && data::verify(problems[first + i], answer);
                    score.correct += ok;
                    score.mean_response_tokens += double(response.size()) / n;
                    if (level == 1 && first + i < show)
                        std::printf("  [%s] %s\n    -> %s  (%s)\n", data::task_name(kind),
                                    problems[first + i].question.c_str(), text.c_str(), ok ? "correct" : "wrong");
                }
            }
            scores.push_back(score);
        }
    }
    std::printf("%-10s %10s %9s %14s\n", "task", "difficulty", "accuracy", "mean tokens");
    for (const TaskScore& s : scores)
        std::printf("%-10s %10d %8.1f%% %14.1f\n", s.task.c_str(), s.difficulty, 100.0 * s.correct / s.n,
                    s.mean_response_tokens);
    return scores;
}

// ---------------------------------------------------------------------------------------------------------------
// Logging
// ---------------------------------------------------------------------------------------------------------------

inline std::string format_duration(double seconds) {
    char buf[32];
    int s = int(seconds + 0.5);
    if (s >= 3600)
        std::snprintf(buf, sizeof buf, "%dh%02dm", s / 3600, s / 60 % 60);
    else
        std::snprintf(buf, sizeof buf, "%dm%02ds", s / 60, s % 60);
    return buf;
}

struct JsonlLog {
    std::ofstream file;
    JsonlLog(const std::string& path, bool append)
        : file(path, append ? std::ios::app : std::ios::trunc) {
        if (!file) throw std::runtime_error("cannot open log file " + path);
    }
    void write(const Json& record) {
        file << record.dump() << "\n";
        file.flush();
    }
};

// ---------------------------------------------------------------------------------------------------------------
// Stages
// ---------------------------------------------------------------------------------------------------------------

template <typename T>
int pretrain(const Options& o) {
    data::Tokenizer tok;
    data::CorpusConfig corpus;
    corpus.seed = uint64_t(o.seed);
    std::string ckpt = o.out + "/checkpoint";
    std::string source = o.resume ? ckpt : o.init;
    Config cfg = !source.empty() ? load_config(source + "/config.json")
                                 : (o.config_path.empty() ? Config() : load_config(o.config_path));
    if (cfg.vocab_size != tok.vocab_size)
        throw std::runtime_error("config vocab_size " + std::to_string(cfg.vocab_size) + " does not match the tokenizer's " +
                                 std::to_string(tok.vocab_size));
    Model<T> model(cfg, o.batch, o.seq);
    int start = 0;
    if (!source.empty()) load_weights(source, model);
    if (o.resume) {
        TrainerState state = load_trainer_state(ckpt, model);
        if (state.seed != uint64_t(o.seed) || state.precision != o.precision)
            throw std::runtime_error(ckpt + " was trained with --seed " + std::to_string(state.seed) + " --precision " +
                                     state.precision + ": resume with the same flags");
        start = state.step;
        std::printf("resuming from %s at step %d\n", ckpt.c_str(), start);
    } else if (source.empty()) {
        model.init_weights(uint64_t(o.seed));
    }
    fs::create_directories(o.out);
    JsonlLog log(o.out + "/log.jsonl", o.resume);

    long tokens_per_step = long(o.batch) * o.seq;
    double flops_per_step = cfg.train_flops_per_token(o.seq) * double(tokens_per_step);
    std::printf("model: %.2fM parameters (%.2fM in GEMMs), precision %s, %d x %d tokens per step, %.2f TFLOP per step\n",
                model.num_params() / 1e6, cfg.matmul_params() / 1e6, o.precision.c_str(), o.batch, o.seq,
                flops_per_step / 1e12);

    std::vector<int> rows, next_rows, inputs, targets;
    data::pretrain_batch(tok, corpus, start + 1, o.batch, o.seq, rows);
    WallTimer run_clock;
    double timed_seconds = 0.0;
    for (int step = start + 1; step <= o.steps; step++) {
        WallTimer step_clock;
        float lr = learning_rate(o, step);
        AdamW opt{lr, 0.9f, o.beta2, 1e-8f, o.weight_decay};
        split_rows(rows, o.batch, o.seq, inputs, targets);
        model.train_step(inputs, targets, o.batch, o.seq, opt, o.grad_clip, step, uint64_t(o.seed));
        if (step < o.steps) data::pretrain_batch(tok, corpus, step + 1, o.batch, o.seq, next_rows);  // overlaps the GPU
        auto [loss_sum, grad_norm] = model.read_scalars();
        float loss = loss_sum / float(tokens_per_step);
        if (!std::isfinite(loss)) {
            std::fprintf(stderr, "error: loss is %f at step %d; stopping (the last checkpoint is intact)\n", loss, step);
            return 1;
        }
        rows.swap(next_rows);
        double seconds = step_clock.seconds();
        if (step > start + 1) timed_seconds += seconds;  // the first step pays for cuBLAS planning
        double tokens_per_s = tokens_per_step / seconds;
        double mfu = flops_per_step / seconds / BF16_PEAK_FLOPS;

        Json record = Json::object();
        record["step"] = step, record["loss"] = double(loss), record["lr"] = double(lr);
        record["grad_norm"] = double(grad_norm), record["tokens_per_s"] = tokens_per_s, record["mfu"] = mfu;
        record["ms"] = seconds * 1e3;
        log.write(record);
        if (step % o.log_every == 0 || step == start + 1 || step == o.steps) {
            double per_step = step > start + 1 ? timed_seconds / (step - start - 1) : seconds;
            std::printf("step %5d/%d | loss %.4f | lr %.2e | grad norm %.3f | %7.0fk tok/s | MFU %4.1f%% | ETA %s\n",
                        step, o.steps, loss, lr, grad_norm, tokens_per_s / 1e3, 100.0 * mfu,
                        format_duration(per_step * (o.steps - step)).c_str());
            std::fflush(stdout);
        }
        if (step % o.eval_every == 0 || step == o.steps) {
            float heldout = heldout_loss(model, tok, corpus, o.eval_batches);
            std::printf("step %5d | held-out loss %.4f\n", step, heldout);
            Json eval = Json::object();
            eval["step"] = step, eval["heldout_loss"] = double(heldout);
            log.write(eval);
        }
        if (step % o.ckpt_every == 0 || step == o.steps) {
            save_checkpoint(ckpt, model, {step, uint64_t(o.seed), o.precision}, tok);
            std::printf("step %5d | checkpoint %s\n", step, ckpt.c_str());
        }
    }
    if (o.steps > start + 1)
        std::printf("trained %d steps in %s: %.0f tokens/s after the first step\n", o.steps - start,
                    format_duration(run_clock.seconds()).c_str(), tokens_per_step * (o.steps - start - 1) / timed_seconds);
    std::printf("greedy answers to held-out problems:\n");
    evaluate_tasks(model, tok, corpus, o.samples, 3, uint64_t(o.seed));
    return 0;
}

template <typename T>
int evaluate(const Options& o) {
    data::Tokenizer tok;
    data::CorpusConfig corpus;
    corpus.seed = uint64_t(o.seed);
    Model<T> model(load_config(o.init + "/config.json"), o.batch, o.seq);
    load_weights(o.init, model);
    std::printf("held-out loss %.4f\n", heldout_loss(model, tok, corpus, o.eval_batches));
    evaluate_tasks(model, tok, corpus, o.samples, 3, uint64_t(o.seed));
    return 0;
}

// OUT/logits.bin: int32 n, int32 vocab, n int32 token ids, n x vocab float32 logits.
template <typename T>
int write_logits(const Options& o) {
    data::Tokenizer tok;
    Config cfg = load_config(o.init + "/config.json");
    std::vector<int> tokens = tok.encode(o.text);
    int n = int(tokens.size());
    Model<T> model(cfg, 1, n);
    load_weights(o.init, model);
    model.forward(tokens, 1, n);
    std::vector<float> logits(size_t(n) * cfg.vocab_size);
    CUDA_CHECK(cudaMemcpy(logits.data(), model.logits, logits.size() * sizeof(float), cudaMemcpyDeviceToHost));
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

template <typename T>
int run_stage(const Options& o) {
    if (o.stage == "pretrain") return pretrain<T>(o);
    if (o.stage == "eval") return evaluate<T>(o);
    return write_logits<T>(o);
}

int main(int argc, char** argv) {
    Options o;
    try {
        o.parse(argc, argv);
    } catch (const std::invalid_argument& e) {
        std::fprintf(stderr, "error: %s\n%s", e.what(), Options::usage().c_str());
        return 2;
    }
    if (o.help) {
        std::printf("%s", Options::usage().c_str());
        return 0;
    }
    if (!gpu_available()) {
        std::fprintf(stderr, "error: no usable CUDA GPU found (cudaGetDeviceCount failed or found none)\n");
        return 1;
    }
    try {
        return o.precision == "fp32" ? run_stage<float>(o) : run_stage<bf16>(o);
    } catch (const std::exception& e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
}
