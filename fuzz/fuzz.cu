// fuzz.cu: random and mutated inputs for everything that reads text or bytes from outside: the answer verifier
// (against tests/answer_oracle.h, written from the rules, not from the code), the rewards, the typed-problem parser, JSON,
// safetensors, the command line and config.json. Built with AddressSanitizer and UndefinedBehaviorSanitizer
// (make fuzz), so a memory error or an overflow stops the run; a wrong answer accepted, a right one refused, an
// exception of the wrong type or a broken invariant is counted and printed, and makes the exit status 1.
//   build/fuzz [SECONDS_PER_TARGET] [SEED] [INPUTS]   (default 5 s each, seed 1; with INPUTS, that many each)
#include <unistd.h>

#include <chrono>
#include <cstdio>
#include <fstream>
#include <limits>
#include <string>
#include <vector>

#include "data/corpus.h"
#include "data/rewards.h"
#include "io/checkpoint.h"
#include "io/options.h"
#include "tests/answer_oracle.h"

namespace {

// ---------------------------------------------------------------------------------------------------------------
// Inputs
// ---------------------------------------------------------------------------------------------------------------

template <typename Container>
const auto& pick(const Container& items, Rng& rng) {
    return items[size_t(rng.range(0, long(std::size(items)) - 1))];
}

// A random change to text: a byte inserted (often one of the alphabet's), deleted, replaced, or a piece repeated.
std::string mutate(std::string text, Rng& rng, const std::string& alphabet) {
    for (long n = rng.range(1, 4); n > 0; n--) {
        const size_t at = size_t(rng.range(0, long(text.size())));
        const char c = rng.range(0, 3) == 0 ? char(rng.range(0, 255)) : pick(alphabet, rng);
        const long how = rng.range(0, 3);
        if (how == 0) text.insert(at, 1, c);
        if (how == 1 && at < text.size()) text.erase(at, 1);
        if (how == 2 && at < text.size()) text[at] = c;
        if (how == 3) text.insert(at, text.substr(at, size_t(rng.range(0, 8))));
    }
    return text;
}

// An expression over some of the given numbers, at random, so that a fair share of them reaches the target.
std::string random_expression(const std::vector<long>& numbers, Rng& rng, int depth = 0) {
    if (depth > 2 || rng.range(0, 2) == 0) return std::to_string(pick(numbers, rng));
    const std::string ops = "+-*/";
    std::string e = random_expression(numbers, rng, depth + 1) + pick(ops, rng) +
                    random_expression(numbers, rng, depth + 1);
    return rng.range(0, 2) == 0 ? "(" + e + ")" : e;
}

const std::string kExpressionBytes = std::string("0123456789+-*/() ABCDEJKZ\n\t", 27) + std::string(1, '\0');

data::Problem random_problem(Rng& rng) {
    const data::TaskKind kinds[] = {data::TaskKind::Add, data::TaskKind::Mul, data::TaskKind::Countdown};
    const data::TaskKind kind = pick(kinds, rng);
    const data::Language language = rng.range(0, 1) ? data::Language::En : data::Language::Alt;
    return data::sample_problem(kind, int(rng.range(1, data::max_difficulty(kind))), rng, false, language);
}

// An answer to p: the reference one, another expression, in either language, often mutated.
std::string random_answer(const data::Problem& p, Rng& rng) {
    std::string answer = p.kind == data::TaskKind::Countdown && rng.range(0, 1)
                             ? random_expression(p.numbers, rng)
                             : data::to_language(p.answer, data::Language::En);
    if (rng.range(0, 3) == 0) answer = data::to_language(answer, data::Language::Alt);
    if (rng.range(0, 2) == 0) answer = std::string(size_t(rng.range(0, 2)), ' ') + answer + " ";
    return rng.range(0, 2) ? mutate(answer, rng, kExpressionBytes) : answer;
}

// ---------------------------------------------------------------------------------------------------------------
// The targets: each takes one input from rng and returns "" or what went wrong
// ---------------------------------------------------------------------------------------------------------------

struct Target {
    const char* name;
    long runs = 0, accepted = 0, failures = 0;
};

std::string fuzz_verify(Rng& rng, long& accepted) {
    const data::Problem p = random_problem(rng);
    const std::string answer = random_answer(p, rng);
    const bool got = data::verify(p, answer), want = oracle::verify(p, answer);
    accepted += got;
    if (got == want) return "";
    return std::string(got ? "accepted" : "refused") + " '" + answer + "' for " + p.question;
}

std::string fuzz_rewards(Rng& rng, long& accepted) {
    const data::Problem p = random_problem(rng);
    const char* pieces[] = {"<think>", "</think>", "<answer>", "</answer>", "<|eos|>", "\n", " ", "12+34", "BC", "yes"};
    std::string response;
    for (long n = rng.range(0, 10); n > 0; n--)
        response += rng.range(0, 4) ? pick(pieces, rng) : random_answer(p, rng);
    if (rng.range(0, 1)) response = "<think>" + p.reasoning + "</think><answer>" + random_answer(p, rng) + "</answer>";
    if (rng.range(0, 2) == 0) response = mutate(response, rng, "<>/|thinkanswereos");
    const rewards::Reward r = rewards::score(p, response, {1.0, 0.1, 0.2});
    accepted += r.accuracy > 0;
    // the oracle's answer: the text between the one "<answer>" and the one "</answer>" after it
    auto count = [&](const std::string& tag) {
        long n = 0;
        for (size_t at = response.find(tag); at != std::string::npos; at = response.find(tag, at + 1)) n++;
        return n;
    };
    const size_t open = response.find("<answer>"), close = response.find("</answer>");
    const bool one_answer = count("<answer>") == 1 && count("</answer>") == 1 && close >= open + 8;
    const bool right = one_answer && oracle::verify(p, response.substr(open + 8, close - open - 8));
    if ((r.accuracy > 0) != right) return "accuracy " + std::to_string(r.accuracy) + " for '" + response + "'";
    if (!(r.total >= 0.0 && r.total <= 1.3 + 1e-12)) return "total out of range for '" + response + "'";
    if (r.language > 0 && !one_answer) return "language paid without an answer: '" + response + "'";
    return "";
}

std::string fuzz_parser(Rng& rng, long& accepted) {
    const char* starts[] = {"123+456", "12*34=", "make 24 from 3 5 7 2", "BCD+EFG", "MOKX CE RYOM D F H C", "7+"};
    const std::string typed = mutate(pick(starts, rng), rng, "0123456789+*= makefromMOKXRYOMABCDEFGHIJ");
    data::Problem p;
    std::string why;
    bool ok = false;
    try {
        ok = data::parse_problem(typed, p, why);
    } catch (const std::exception& e) {
        return std::string("threw ") + e.what() + " for '" + typed + "'";
    }
    accepted += ok;
    if (!ok) return why.empty() ? "refused '" + typed + "' without a reason" : "";
    if (p.question.empty() || p.numbers.empty()) return "accepted '" + typed + "' as an empty problem";
    if (p.kind == data::TaskKind::Add && p.numbers.size() == 2 && p.target != p.numbers[0] + p.numbers[1])
        return "wrong sum for '" + typed + "'";
    if (p.kind == data::TaskKind::Mul && p.numbers.size() == 2 && p.target != p.numbers[0] * p.numbers[1])
        return "wrong product for '" + typed + "'";
    return "";
}

std::string fuzz_json(Rng& rng, long& accepted) {
    const char* docs[] = {R"({"a": [1, 2.5e3, -0.0, true, null], "b": {"c": "d\u00e9\n"}})", R"([[[[]]], {}, ""])",
                          R"({"model_type": "deepseek_v3", "hidden_size": 256})", R"("\ud83d\ude00")"};
    const std::string text = mutate(pick(docs, rng), rng, "{}[]\",:0123456789.eE+-tfnul\\u ");
    Json j;
    try {
        j = Json::parse(text);
    } catch (const std::runtime_error&) {
        return "";
    } catch (const std::exception& e) {
        return std::string("threw a ") + typeid(e).name() + " for '" + text + "'";
    }
    accepted++;
    const std::string once = j.dump();
    try {
        if (Json::parse(once).dump() != once) return "dump -> parse -> dump changed '" + text + "'";
    } catch (const std::exception& e) {
        return "its own dump does not parse: '" + once + "'";
    }
    return "";
}

// A safetensors file's bytes, mutated, through the loader: loaded or refused with a runtime_error, nothing else.
std::string fuzz_safetensors(Rng& rng, long& accepted, const std::string& path, const std::vector<std::string>& seeds) {
    std::string bytes = pick(seeds, rng);
    for (long n = rng.range(1, 3); n > 0 && !bytes.empty(); n--) {
        const size_t at = size_t(rng.range(0, long(bytes.size()) - 1));
        if (rng.range(0, 1)) bytes[at] = char(rng.range(0, 255));
        else bytes = rng.range(0, 1) ? bytes.substr(0, at) : mutate(bytes, rng, "{}[]\":,0123456789FBI");
    }
    std::ofstream(path, std::ios::binary | std::ios::trunc).write(bytes.data(), std::streamsize(bytes.size()));
    try {
        SafetensorsFile file = SafetensorsFile::load(path);
        accepted++;
        for (const auto& [name, e] : file.tensors) {
            std::vector<uint8_t> out(e.nbytes);
            file.read(name, e.dtype, e.shape, out.data());
        }
    } catch (const std::runtime_error&) {
    } catch (const std::exception& e) {
        return std::string("threw a ") + typeid(e).name() + ": " + e.what();
    }
    return "";
}

std::string fuzz_options(Rng& rng, long& accepted) {
    const char* words[] = {"pretrain", "sft", "grpo", "eval", "--steps", "--lr", "--grad-clip", "--init", "--out",
                           "--resume", "--clip-high", "--batch", "--seq", "--precision", "fp8", "--task", "countdown",
                           "5", "-5", "1e30", "nan", " 5", "0", "x", "", "--help", "--weight-decay", "0.1"};
    std::vector<std::string> args;
    for (long n = rng.range(0, 8); n > 0; n--) {
        std::string w = pick(words, rng);
        args.push_back(rng.range(0, 4) ? w : mutate(w, rng, "-0123456789.e"));
    }
    std::vector<char*> argv = {const_cast<char*>("train")};
    for (std::string& a : args) argv.push_back(a.data());
    Options o;
    try {
        o.parse(int(argv.size()), argv.data());
    } catch (const std::invalid_argument&) {
        return "";
    } catch (const std::exception& e) {
        return std::string("threw a ") + typeid(e).name() + ": " + e.what();
    }
    accepted++;
    if (!o.help && !(o.lr > 0 && std::isfinite(o.lr) && o.grad_clip >= 0 && o.steps > 0 && o.batch > 0))
        return "accepted settings that make no sense";
    return "";
}

std::string fuzz_config(Rng& rng, long& accepted) {
    Json j = config_to_json(Config());
    std::vector<std::string> keys;
    for (const auto& [key, value] : j.as_object()) keys.push_back(key);
    const double choices[] = {0.0, -1.0, 1.0, 7.0, 1e300, 2147483647.0, 4294967296.0, 32768.0, 32769.0, 0.5,
                              std::numeric_limits<double>::infinity()};
    for (long n = rng.range(1, 3); n > 0; n--)
        j[pick(keys, rng)] =
            rng.range(0, 5) ? Json(pick(choices, rng)) : Json(std::string("x"));
    try {
        const Config c = config_from_json(j, "fuzz/config.json");
        accepted++;
        const Architecture arch(c, 64);  // the layout's sizes, where an overflow would show
        if (arch.layout.total <= 0) return "a config with no parameters";
    } catch (const std::runtime_error&) {
    } catch (const std::invalid_argument&) {
    } catch (const std::exception& e) {
        return std::string("threw a ") + typeid(e).name() + ": " + e.what();
    }
    return "";
}

}  // namespace

int main(int argc, char** argv) {
    const double seconds = argc > 1 ? std::atof(argv[1]) : 5.0;
    const uint64_t seed = argc > 2 ? std::strtoull(argv[2], nullptr, 10) : 1;
    const long inputs = argc > 3 ? std::atol(argv[3]) : 0;
    const std::string path = "/tmp/fuzz_safetensors." + std::to_string(getpid());
    std::vector<std::string> safetensors_seeds;
    {
        std::vector<float> w = {1.0f, -2.0f, 3.0f, 4.0f};
        write_safetensors(path, {{"w", DType::F32, {2, 2}, w.data()}, {"e", DType::F32, {0}, nullptr}},
                          {{"step", "3"}});
        std::ifstream in(path, std::ios::binary);
        safetensors_seeds.push_back(std::string(std::istreambuf_iterator<char>(in), {}));
        const std::string header = R"({"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}})";
        std::string foreign(8, '\0');
        for (int i = 0; i < 8; i++) foreign[i] = char((header.size() >> (8 * i)) & 0xFF);
        safetensors_seeds.push_back(foreign + header + std::string(8, '\1'));  // another writer's: no checksum
    }
    std::vector<Target> targets = {{"verify (countdown, add, mul) against the oracle"}, {"rewards"}, {"typed problems"},
                                   {"json"}, {"safetensors"}, {"command line"}, {"config.json"}};
    int status = 0;
    std::printf("%-50s %12s %12s %9s\n", "target", "inputs", "accepted", "failures");
    for (size_t t = 0; t < targets.size(); t++) {
        Target& target = targets[t];
        Rng rng(seed, t);
        const auto start = std::chrono::steady_clock::now();
        auto more = [&] {
            if (inputs > 0) return target.runs < inputs;
            return std::chrono::duration<double>(std::chrono::steady_clock::now() - start).count() < seconds;
        };
        while (more()) {
            for (int i = 0; i < 100; i++) {
                long& accepted = target.accepted;
                std::string problem;
                switch (t) {
                    case 0: problem = fuzz_verify(rng, accepted); break;
                    case 1: problem = fuzz_rewards(rng, accepted); break;
                    case 2: problem = fuzz_parser(rng, accepted); break;
                    case 3: problem = fuzz_json(rng, accepted); break;
                    case 4: problem = fuzz_safetensors(rng, accepted, path, safetensors_seeds); break;
                    case 5: problem = fuzz_options(rng, accepted); break;
                    default: problem = fuzz_config(rng, accepted); break;
                }
                target.runs++;
                if (problem.empty()) continue;
                if (target.failures++ < 5) std::printf("  %s: %s\n", target.name, problem.c_str()), std::fflush(stdout);
            }
        }
        std::printf("%-50s %12ld %12ld %9ld\n", target.name, target.runs, target.accepted, target.failures);
        std::fflush(stdout);
        status |= target.failures > 0;
    }
    std::remove(path.c_str());
    return status;
}
