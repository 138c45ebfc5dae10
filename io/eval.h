// eval.h: evaluation: the held-out loss, and answers to held-out problems sampled with the latent KV cache and
// scored by the tasks' verifiers; the tables that put models side by side.
#pragma once

#include <algorithm>
#include <cstdio>
#include <sstream>
#include <string>
#include <vector>

#include "../data/corpus.h"
#include "../data/rewards.h"
#include "../sampler.cuh"
#include "json.h"

// The mean loss over `batches` held-out batches of the model's rows (data parallel: this rank's rows, from
// first_row; the loss is the global batch's).
template <typename T>
float heldout_loss(Model<T>& model, const data::Tokenizer& tok, const data::CorpusConfig& corpus, int batches,
                   int first_row = 0) {
    int B = model.max_B, T_ = model.max_T;
    std::vector<int> rows, inputs, targets;
    double sum = 0.0;
    for (int k = 0; k < batches; k++) {
        data::heldout_batch(tok, corpus, k, B, T_, rows, first_row);
        split_rows(rows, B, T_, inputs, targets);
        model.forward(inputs, B, T_);
        long counted = model.loss(targets);
        sum += model.read_scalars().loss_sum / double(counted);
    }
    return float(sum / batches);
}

// How held-out answers are drawn. R1 §3 scores pass@1, the mean accuracy of k responses sampled at temperature 0.6
// (greedy decoding of reasoning models repeats itself and varies between checkpoints); temperature 0 is greedy.
struct EvalSettings {
    int problems = 64;  // per task, difficulty and language
    int k = 4;          // responses per problem
    float temperature = 0.6f;
    bool r1zero_template = false;
    bool direct = false;            // the think block is given, empty: the model must answer at once
    bool speculative = true;        // drafted by the model's MTP module, where it has one and the batch is small
    int speculative_max_batch = 0;  // the largest batch that drafts (0: the GPU's default, sampler.cuh)
    uint64_t seed = 0;
};

struct EvalRow {
    std::string task, language;
    int difficulty, n = 0;
    double accuracy = 0, format = 0, mixing = 0, response_tokens = 0;
    DraftCounts drafts;  // speculative decoding's drafts, verified and kept
};

// The held-out problems, one row per task, difficulty (1 to one past the trained maximum) and language.
inline std::vector<EvalRow> eval_problems(const data::CorpusConfig& corpus, int n, uint64_t seed,
                                          std::vector<data::Problem>& problems) {
    std::vector<EvalRow> rows;
    for (int k = 0; k < data::kNumTaskKinds; k++) {
        if (corpus.kind_weight[k] == 0) continue;
        data::TaskKind kind = data::TaskKind(k);
        int top = std::min(corpus.max_difficulty[k] + 1, data::max_difficulty(kind));
        for (int level = 1; level <= top; level++)
            for (data::Language lang : {data::Language::En, data::Language::Alt}) {
                std::vector<data::Problem> set = data::eval_set(kind, level, n, seed, lang);
                problems.insert(problems.end(), set.begin(), set.end());
                rows.push_back({data::task_name(kind), data::language_name(lang), level});
            }
    }
    return rows;
}

// k answers to every held-out problem, all sampled as one batch with the latent KV cache and scored by the
// rule-based rewards; prints the first `show` transcripts of each task's easiest level.
template <typename T>
std::vector<EvalRow> evaluate_tasks(Model<T>& model, const data::Tokenizer& tok, const data::CorpusConfig& corpus,
                                    const EvalSettings& e, int show) {
    std::vector<data::Problem> problems;
    std::vector<EvalRow> rows = eval_problems(corpus, e.problems, e.seed, problems);
    const std::string given = e.direct ? "<think></think><answer>" : "";
    std::vector<std::vector<int>> prompts;
    for (const data::Problem& p : problems)
        prompts.insert(prompts.end(), e.k, tok.encode(data::prompt_text(p, e.r1zero_template) + given));
    Sampler<T> sampler(model, int(prompts.size()), model.max_T);
    SamplingOptions sampling;
    sampling.temperature = e.temperature, sampling.seed = rng_hash(e.seed, 0x6576616cull, 0);
    sampling.stop_a = data::ANSWER_END, sampling.stop_b = data::EOS, sampling.max_new = data::kMaxExampleTokens;
    sampling.speculative = e.speculative, sampling.speculative_max_batch = e.speculative_max_batch;
    std::vector<std::vector<int>> responses = sampler.generate(prompts, sampling);
    gpu_memory_peak_gb(gpu_memory_in_use_gb());  // the sampler's buffers are the largest of an evaluation
    const std::vector<DraftCounts> drafts = sampler.draft_counts(int(prompts.size()));
    for (size_t i = 0; i < responses.size(); i++) {
        size_t problem = i / e.k;
        EvalRow& row = rows[problem / e.problems];
        row.drafts += drafts[i];
        std::string text = given + tok.decode(responses[i]);
        rewards::Reward r = rewards::score(problems[problem], text, {});
        row.n++, row.accuracy += r.accuracy, row.format += r.format;
        row.mixing += rewards::is_mixed(r.thinking), row.response_tokens += double(responses[i].size());
        if (row.difficulty == 1 && i % e.k == 0 && int(problem % e.problems) < show)
            std::printf("  [%s/%s] %s\n    -> %s  (%s)\n", row.task.c_str(), row.language.c_str(),
                        problems[problem].question.c_str(), text.c_str(), r.accuracy > 0 ? "correct" : "wrong");
    }
    for (EvalRow& r : rows) r.accuracy /= r.n, r.format /= r.n, r.mixing /= r.n, r.response_tokens /= r.n;
    return rows;
}

// One model's rows, printed per language; each also goes to the log, if there is one.
inline void report_eval(const std::vector<EvalRow>& rows, const EvalSettings& e, JsonlLog* log) {
    std::printf("held-out pass@1 (%d responses per problem at temperature %.2g, %d problems per row)\n", e.k,
                e.temperature, e.problems);
    std::printf("%-10s %4s %10s %9s %8s %8s %12s %15s\n", "task", "lang", "difficulty", "accuracy", "format", "mixed",
                "mean tokens", "drafts accepted");
    for (const EvalRow& r : rows) {
        char drafts[16] = "-";  // plain decoding
        if (r.drafts.drafted > 0) std::snprintf(drafts, sizeof drafts, "%.1f%%", 100 * r.drafts.rate());
        std::printf("%-10s %4s %10d %8.1f%% %7.1f%% %7.1f%% %12.1f %15s\n", r.task.c_str(), r.language.c_str(),
                    r.difficulty, 100 * r.accuracy, 100 * r.format, 100 * r.mixing, r.response_tokens, drafts);
        if (!log) continue;
        Json record = Json::object();
        record["eval"] = r.task, record["language"] = r.language, record["difficulty"] = r.difficulty;
        record["accuracy"] = r.accuracy, record["format"] = r.format, record["mixing"] = r.mixing;
        record["response_tokens"] = r.response_tokens;
        if (r.drafts.drafted > 0) record["draft_acceptance"] = r.drafts.rate();
        log->write(record);
    }
}

struct ModelEval {
    std::string name;
    std::vector<EvalRow> rows;
};

// Models side by side as Markdown tables: pass@1 and mean response length per task and difficulty (the two
// languages pooled), then each model's format rate and share of mixed-language thinking over all rows.
inline std::string comparison_tables(const std::vector<ModelEval>& models, const EvalSettings& e) {
    std::ostringstream out;
    char cell[64];
    auto header = [&](const char* what, const char* second) {
        out << "| " << what << " | " << second << " |";
        for (const ModelEval& m : models) out << " " << m.name << " |";
        out << "\n| --- | --- |";
        for (size_t i = 0; i < models.size(); i++) out << " --- |";
        out << "\n";
    };
    auto pooled = [&](const char* what, auto value, const char* format) {
        header(what, "difficulty");
        const std::vector<EvalRow>& first = models[0].rows;
        for (size_t r = 0; r + 1 < first.size(); r += 2) {  // En and Alt rows of one level are neighbours
            out << "| " << first[r].task << " | " << first[r].difficulty << " |";
            for (const ModelEval& m : models) {
                std::snprintf(cell, sizeof cell, format, (value(m.rows[r]) + value(m.rows[r + 1])) / 2);
                out << " " << cell << " |";
            }
            out << "\n";
        }
        out << "\n";
    };
    out << "Held-out pass@1: the mean accuracy of " << e.k << " responses per problem at temperature " << e.temperature
        << ", " << 2 * e.problems << " problems per row (half En, half Alt).\n\n";
    pooled(
        "accuracy", [](const EvalRow& r) { return 100 * r.accuracy; }, "%.1f%%");
    pooled(
        "response tokens", [](const EvalRow& r) { return r.response_tokens; }, "%.0f");
    bool drafted = false;
    for (const ModelEval& m : models)
        for (const EvalRow& r : m.rows) drafted |= r.drafts.drafted > 0;
    if (drafted)  // speculative decoding: the share of the MTP module's drafts that the model kept
        pooled(
            "drafts accepted", [](const EvalRow& r) { return 100 * r.drafts.rate(); }, "%.1f%%");
    header("over all rows", "");
    auto overall = [&](const char* what, auto value) {
        out << "| " << what << " | |";
        for (const ModelEval& m : models) {
            double sum = 0;
            for (const EvalRow& r : m.rows) sum += value(r);
            std::snprintf(cell, sizeof cell, "%.1f%%", 100 * sum / double(m.rows.size()));
            out << " " << cell << " |";
        }
        out << "\n";
    };
    overall("format", [](const EvalRow& r) { return r.format; });
    overall("mixed-language thinking", [](const EvalRow& r) { return r.mixing; });
    return out.str();
}
