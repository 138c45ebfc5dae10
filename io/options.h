// options.h: the command line of train: a stage, then --flag value pairs, each flag declared once with its help.
// An unknown flag, a missing or malformed value, or an unknown stage is an error that says what was wrong.
#pragma once

#include <algorithm>
#include <cctype>
#include <cmath>
#include <cstdlib>
#include <filesystem>
#include <functional>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

struct Flag {
    std::string name, help;
    bool is_switch;  // a switch takes no value
    std::function<void(const std::string&)> set;
    std::string default_text;
};

// Parses a whole string as a number, or throws naming the flag: no space before it or after it.
template <typename V>
V parse_number(const std::string& flag, const std::string& text) {
    std::istringstream in(text);
    V value;
    in >> value;
    if (text.empty() || std::isspace(static_cast<unsigned char>(text[0])) || in.fail() || !in.eof())
        throw std::invalid_argument("--" + flag + " expects a number, got '" + text + "'");
    return value;
}

class FlagSet {
   public:
    template <typename V>
    void add(const std::string& name, V* target, const std::string& help) {
        std::ostringstream def;
        def << *target;
        flags_.push_back({name, help, false,
                          [name, target](const std::string& v) {
                              if constexpr (std::is_same_v<V, std::string>)
                                  *target = v;
                              else
                                  *target = parse_number<V>(name, v);
                          },
                          def.str()});
    }
    void add_switch(const std::string& name, bool* target, const std::string& help) {
        flags_.push_back({name, help, true, [target](const std::string&) { *target = true; }, ""});
    }

    // Parses args (without the program name and stage); throws std::invalid_argument on any error.
    void parse(const std::vector<std::string>& args) const {
        for (size_t i = 0; i < args.size(); i++) {
            const std::string& arg = args[i];
            if (arg.rfind("--", 0) != 0) throw std::invalid_argument("unexpected argument '" + arg + "'");
            const Flag* flag = find(arg.substr(2));
            if (!flag) throw std::invalid_argument("unknown flag '" + arg + "' (see --help)");
            if (flag->is_switch) {
                flag->set("");
                continue;
            }
            if (i + 1 >= args.size()) throw std::invalid_argument(arg + " needs a value");
            flag->set(args[++i]);
        }
    }

    std::string help() const {
        std::ostringstream out;
        for (const Flag& f : flags_) {
            std::string left = "  --" + f.name + (f.is_switch ? "" : " V");
            out << left << std::string(left.size() < 24 ? 24 - left.size() : 1, ' ') << f.help;
            if (!f.is_switch && !f.default_text.empty()) out << " (default " << f.default_text << ")";
            out << "\n";
        }
        return out.str();
    }

   private:
    const Flag* find(const std::string& name) const {
        for (const Flag& f : flags_)
            if (f.name == name) return &f;
        return nullptr;
    }
    std::vector<Flag> flags_;
};

// Everything train can be told. Model shape comes from the Config defaults or --config (a config.json).
struct Options {
    std::string stage;
    std::string out, init, config_path, precision = "fp8", fp8_gemm = "cublaslt", text, prompt, same_flops_as;
    int steps = 2000, batch = 64, seq = 512, warmup = 100, eval_every = 250, ckpt_every = 500, eval_batches = 4;
    int log_every = 10, samples = 64, eval_k = 4;
    float lr = 2e-3f, min_lr_frac = 0.1f, weight_decay = 0.1f, grad_clip = 1.0f, beta2 = 0.95f;
    long seed = 1234;
    bool resume = false, help = false;
    // DeepSeekMoE's load balancing (V3 §2.1.2)
    std::string balancing = "aux-free";
    float bias_rate = 0.001f, balance_alpha = 1e-4f, aux_alpha = 0.01f;
    // Multi-token prediction (V3 §2.2): the weight of its loss, and speculative decoding with its draft
    // (V3: 0.3 for the first 10T tokens, 0.1 for the last 4.8T)
    float mtp_lambda = 0.3f, mtp_lambda_late = 0.1f, mtp_late_from = 10.0f / 14.8f;
    bool no_speculative = false;
    int speculative_max_batch = 0;
    // Several GPUs (nccl.cuh): how long a rank waits for the others before it gives up, and expert parallelism
    float nccl_timeout = 300.0f;
    bool expert_parallel = false;
    // Cold start and reinforcement learning
    int sft_examples = 4000, prompts = 32, group = 8, updates = 2, max_new = 320, difficulty = 2, micro_batch = 32;
    std::string task = "mix", template_name = "auto";
    float replay = 0.0f, eval_temperature = 0.6f;
    float temperature = 1.0f, kl = 0.0f, clip_low = 0.2f, clip_high = 0.2f, w_format = 0.1f, w_language = 0.0f;
    float w_overlong = 0.0f;
    int overlong_cache = 64;
    bool dr_grpo = false, token_norm = false, skip_uniform = false;

    static const std::vector<std::string>& stages() {
        static const std::vector<std::string> names = {"pretrain", "sft", "r1zero", "grpo", "eval", "chat", "logits"};
        return names;
    }

    FlagSet flags() {
        FlagSet f;
        f.add("out", &out, "run folder: checkpoint/, log.jsonl (default runs/STAGE)");
        f.add("init", &init, "checkpoint folder to start from (needed by every stage but pretrain)");
        f.add("config", &config_path, "config.json with the model shape (default: the demo model)");
        f.add("precision", &precision, "fp8 (bf16 with every projection's GEMMs in FP8) | bf16 | fp32");
        f.add("fp8-gemm", &fp8_gemm,
              "the FP8 GEMMs of --precision fp8 outside the routed experts (ours, grouped): "
              "cublaslt (the faster) | own");
        f.add("steps", &steps, "optimizer steps");
        f.add("batch", &batch, "sequences per step");
        f.add("seq", &seq, "tokens per sequence");
        f.add("lr", &lr, "peak learning rate");
        f.add("min-lr-frac", &min_lr_frac, "final learning rate as a fraction of the peak (cosine)");
        f.add("warmup", &warmup, "linear warm-up steps");
        f.add("weight-decay", &weight_decay, "AdamW decoupled weight decay (matrices only)");
        f.add("beta2", &beta2, "AdamW beta2");
        f.add("grad-clip", &grad_clip, "clip the global gradient norm to this (0: off)");
        f.add("seed", &seed, "seed of initialization, data and rounding");
        f.add("balancing", &balancing,
              "experts' load balancing: aux-free (V3: bias updates and a sequence-wise loss) | aux-loss (a "
              "conventional batch-wise auxiliary loss) | none");
        f.add("bias-rate", &bias_rate, "aux-free: gamma, the router bias update per step (V3: 0.001)");
        f.add("balance-alpha", &balance_alpha, "aux-free: alpha of the sequence-wise balance loss (V3: 0.0001)");
        f.add("aux-alpha", &aux_alpha, "aux-loss: alpha of the batch-wise auxiliary loss");
        f.add("mtp-lambda", &mtp_lambda, "pretrain/sft: weight of the MTP modules' loss (V3: 0.3; 0: not trained)");
        f.add("mtp-lambda-late", &mtp_lambda_late, "pretrain/sft: the MTP loss weight late in training (V3: 0.1)");
        f.add("mtp-late-from", &mtp_late_from,
              "pretrain/sft: the share of the steps after which --mtp-lambda-late holds (V3: 10T of 14.8T tokens)");
        f.add_switch("no-speculative", &no_speculative,
                     "sample one token a step, without the MTP module's draft (speculative decoding is on for models "
                     "with an MTP module)");
        f.add("speculative-max-batch", &speculative_max_batch,
              "the largest batch of sequences that drafts; larger batches decode plainly, as a speculative step then "
              "costs more than it gains (0: 4 sequences per SM of the GPU)");
        f.add("nccl-timeout", &nccl_timeout,
              "several GPUs: seconds a rank waits for the others (to start, or in a step) before all of them stop");
        f.add_switch("expert-parallel", &expert_parallel,
                     "several GPUs: spread the routed experts over them (E / n each) and send each token to its "
                     "experts' GPUs (V3 §3.2); else every GPU runs every expert on its own rows");
        f.add("eval-every", &eval_every, "steps between held-out loss evaluations");
        f.add("eval-batches", &eval_batches, "batches in a held-out loss evaluation");
        f.add("ckpt-every", &ckpt_every, "steps between checkpoints (and one at the end)");
        f.add("log-every", &log_every, "steps between progress lines");
        f.add("samples", &samples, "held-out problems per task, difficulty and language (0: none after training)");
        f.add("eval-k", &eval_k, "responses sampled per held-out problem: accuracy is their mean, pass@1 (R1 §3)");
        f.add("eval-temperature", &eval_temperature,
              "sampling temperature of the held-out answers (0: greedy, one each)");
        f.add("text", &text, "input text of the logits stage");
        f.add("prompt", &prompt, "chat: answer this one problem and exit (else read problems from standard input)");
        f.add("sft-examples", &sft_examples, "sft: cold-start examples (cycled through)");
        f.add("same-flops-as", &same_flops_as, "sft: take as many steps as the model compute of this run folder");
        f.add("task", &task,
              "sft/r1zero/grpo: the problems: mix (the corpus' tasks and difficulties), add, mul or countdown");
        f.add("difficulty", &difficulty, "sft/r1zero/grpo: the difficulty of a named --task");
        f.add("replay", &replay,
              "sft/r1zero/grpo: the share of problems drawn from the whole mix beside a named --task");
        f.add("prompts", &prompts, "r1zero/grpo: prompts per step");
        f.add("group", &group, "r1zero/grpo: samples per prompt (G)");
        f.add("micro-batch", &micro_batch,
              "r1zero/grpo: the most sequences per forward and backward pass; a step's samples take as many passes "
              "as they need, their gradients summed (the same update up to rounding, in less memory)");
        f.add("updates", &updates, "r1zero/grpo: policy updates per batch of samples");
        f.add("max-new", &max_new, "r1zero/grpo: response tokens at most");
        f.add("temperature", &temperature, "r1zero/grpo: sampling temperature");
        f.add("kl", &kl, "r1zero/grpo: weight beta of the k3 KL to the initial policy");
        f.add("clip-low", &clip_low, "r1zero/grpo: ratio clip below 1");
        f.add("clip-high", &clip_high, "r1zero/grpo: ratio clip above 1 (DAPO's clip-higher: 0.28)");
        f.add("w-format", &w_format, "r1zero/grpo: weight of the format reward");
        f.add("w-language", &w_language, "r1zero/grpo: weight of the language-consistency reward");
        f.add("w-overlong", &w_overlong, "r1zero/grpo: weight of DAPO's soft overlong penalty (0: none)");
        f.add("overlong-cache", &overlong_cache, "r1zero/grpo: the last tokens before --max-new that it penalizes");
        f.add("template", &template_name, "prompt template of eval and chat: auto (the checkpoint's) | chat | r1zero");
        f.add_switch("dr-grpo", &dr_grpo, "r1zero/grpo: Dr. GRPO (no std scaling, constant normalizer)");
        f.add_switch("token-norm", &token_norm, "r1zero/grpo: DAPO's token-level normalization");
        f.add_switch("skip-uniform", &skip_uniform, "r1zero/grpo: drop groups whose rewards are all equal (DAPO)");
        f.add_switch("resume", &resume, "pretrain/r1zero/grpo: continue from the checkpoint in --out, bit for bit");
        f.add_switch("help", &help, "print this help");
        return f;
    }

    // argv[1] is the stage (or --help); throws std::invalid_argument on any error.
    void parse(int argc, char** argv) {
        std::vector<std::string> args(argv + 1, argv + argc);
        if (!args.empty() && args[0].rfind("--", 0) != 0) {
            stage = args[0];
            args.erase(args.begin());
        }
        flags().parse(args);
        if (help) return;
        if (out.empty()) out = "runs/" + stage;
        validate();
    }

    void validate() const {
        bool known = false;
        for (const std::string& s : stages()) known |= s == stage;
        std::string names;
        for (const std::string& s : stages()) names += (names.empty() ? "" : ", ") + s;
        if (stage.empty()) throw std::invalid_argument("missing stage (one of: " + names + ")");
        if (!known) throw std::invalid_argument("unknown stage '" + stage + "' (one of: " + names + ")");
        if (precision != "fp32" && precision != "bf16" && precision != "fp8")
            throw std::invalid_argument("--precision must be fp32, bf16 or fp8, got '" + precision + "'");
        if (precision == "fp8" && (long(batch) * seq) % 16 != 0)
            throw std::invalid_argument("--precision fp8 needs --batch x --seq to be a multiple of 16");
        if (fp8_gemm != "own" && fp8_gemm != "cublaslt")
            throw std::invalid_argument("--fp8-gemm must be own or cublaslt, got '" + fp8_gemm + "'");
        auto positive = [](long v, const char* name) {
            if (v <= 0) throw std::invalid_argument(std::string("--") + name + " must be positive");
        };
        positive(steps, "steps"), positive(batch, "batch"), positive(seq, "seq"), positive(eval_every, "eval-every");
        positive(ckpt_every, "ckpt-every"), positive(log_every, "log-every"), positive(eval_batches, "eval-batches");
        if (!(lr > 0.0f && std::isfinite(lr))) throw std::invalid_argument("--lr must be positive and finite");
        if (warmup < 0) throw std::invalid_argument("--warmup must not be negative");
        if (speculative_max_batch < 0) throw std::invalid_argument("--speculative-max-batch must not be negative");
        if (!(nccl_timeout > 0.0f && std::isfinite(nccl_timeout)))
            throw std::invalid_argument("--nccl-timeout must be positive and finite");
        if (!(min_lr_frac >= 0.0f && min_lr_frac <= 1.0f))
            throw std::invalid_argument("--min-lr-frac must be in [0, 1]");
        if (!(beta2 > 0.0f && beta2 < 1.0f)) throw std::invalid_argument("--beta2 must be in (0, 1)");
        if (resume && stage != "pretrain" && stage != "r1zero" && stage != "grpo")
            throw std::invalid_argument("--resume continues pretrain, r1zero and grpo runs");
        if (stage != "pretrain" && init.empty())
            throw std::invalid_argument("stage " + stage + " needs --init CHECKPOINT");
        positive(sft_examples, "sft-examples"), positive(prompts, "prompts"), positive(group, "group");
        positive(micro_batch, "micro-batch");
        if (samples < 0 || (stage == "eval" && samples == 0))
            throw std::invalid_argument("--samples must be positive (0 skips the scoring after training)");
        bool rl = stage == "r1zero" || stage == "grpo";
        if (rl && group < 2)
            throw std::invalid_argument("--group must be at least 2: GRPO compares samples in a group");
        if (rl && !(temperature > 0.0f))
            throw std::invalid_argument("--temperature must be positive for RL: greedy samples of a group are equal");
        std::error_code ec;  // a path the filesystem cannot take fails later, where it is opened, with its message
        if (!init.empty() && std::filesystem::equivalent(init, out + "/checkpoint", ec))
            throw std::invalid_argument("--out " + out + " would overwrite its own --init checkpoint");
        positive(updates, "updates"), positive(max_new, "max-new"), positive(difficulty, "difficulty");
        positive(eval_k, "eval-k");
        if (task != "mix" && task != "add" && task != "mul" && task != "countdown")
            throw std::invalid_argument("--task must be mix, add, mul or countdown, got '" + task + "'");
        if (!(replay >= 0.0f && replay <= 1.0f)) throw std::invalid_argument("--replay must be in [0, 1]");
        if (!(eval_temperature >= 0.0f && std::isfinite(eval_temperature)))
            throw std::invalid_argument("--eval-temperature must be a finite number >= 0");
        if (template_name != "auto" && template_name != "chat" && template_name != "r1zero")
            throw std::invalid_argument("--template must be auto, chat or r1zero, got '" + template_name + "'");
        if (!(temperature >= 0.0f && std::isfinite(temperature)))
            throw std::invalid_argument("--temperature must be a finite number >= 0");
        if (!(clip_low > 0.0f && clip_low < 1.0f)) throw std::invalid_argument("--clip-low must be in (0, 1)");
        if (!(clip_high > 0.0f && clip_high <= 1.0f))  // 1: a ratio up to 2, far past DAPO's 1.28
            throw std::invalid_argument("--clip-high must be in (0, 1]");
        if (!(weight_decay >= 0.0f && weight_decay <= 1.0f))  // decoupled: each step takes lr x weight_decay of w
            throw std::invalid_argument("--weight-decay must be in [0, 1]");
        if (stage == "logits" && text.empty()) throw std::invalid_argument("stage logits needs --text");
        if (balancing != "aux-free" && balancing != "aux-loss" && balancing != "none")
            throw std::invalid_argument("--balancing must be aux-free, aux-loss or none, got '" + balancing + "'");
        for (auto [value, name] : {std::pair{bias_rate, "bias-rate"}, std::pair{balance_alpha, "balance-alpha"},
                                   std::pair{aux_alpha, "aux-alpha"}, std::pair{mtp_lambda, "mtp-lambda"},
                                   std::pair{mtp_lambda_late, "mtp-lambda-late"}, std::pair{kl, "kl"},
                                   std::pair{grad_clip, "grad-clip"}, std::pair{w_format, "w-format"},
                                   std::pair{w_language, "w-language"}, std::pair{w_overlong, "w-overlong"}})
            if (!(value >= 0.0f && std::isfinite(value)))
                throw std::invalid_argument(std::string("--") + name + " must be a finite number >= 0");
        if (w_overlong > 0.0f && !(overlong_cache >= 1 && overlong_cache <= max_new))
            throw std::invalid_argument("--overlong-cache must be between 1 and --max-new");
        if (!(mtp_late_from >= 0.0f && mtp_late_from <= 1.0f))
            throw std::invalid_argument("--mtp-late-from must be in [0, 1]");
    }

    static std::string usage() {
        Options defaults;
        return "usage: train STAGE [--flag value ...]\n"
               "stages:\n"
               "  pretrain  train the base model on the synthetic reasoning corpus\n"
               "  sft       cold start: supervised fine-tuning of --init on single-language chains of thought\n"
               "  r1zero    GRPO straight from the base model --init, with the R1-Zero prompt\n"
               "  grpo      GRPO from the cold-start model --init, with the chat prompt (and --w-language)\n"
               "  eval      held-out accuracy of checkpoints side by side: --init A,B[:chat|:r1zero|:direct],...\n"
               "  chat      the demo: type a problem, watch the model think, see its answer checked\n"
               "  logits    write the logits of --text under --init to OUT/logits.bin (for tests/hf_parity.py)\n"
               "flags:\n" +
               defaults.flags().help();
    }
};

// Learning rate at step (1-based): linear warm-up, then cosine decay to min_lr_frac * lr.
inline float learning_rate(const Options& o, int step) {
    if (step <= o.warmup) return o.lr * float(step) / float(std::max(o.warmup, 1));
    float progress = float(step - o.warmup) / float(std::max(o.steps - o.warmup, 1));
    float cosine = 0.5f * (1.0f + std::cos(3.14159265f * std::min(progress, 1.0f)));
    return o.lr * (o.min_lr_frac + (1.0f - o.min_lr_frac) * cosine);
}
