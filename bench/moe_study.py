"""DeepSeekMoE on the default config: the balancing study (V3 §2.1.2, §4.5) and MoE against dense.

    python3 bench/moe_study.py [--steps 2000] [--seed 1234] [--out runs/study] [--samples 16] [--train ./build/train]

Pretrains, with the same steps, seed and data: the MoE model with auxiliary-loss-free balancing (V3: bias updates and
the sequence-wise loss), with a conventional batch-wise auxiliary loss only, and with neither; and the dense model of
the same active compute (bench/dense_config.json: every FFN as wide as the MoE layer's shared and four routed experts
together). Prints, per run, the final held-out loss, the load balance (each step's largest max violation over the
layers, averaged over the second half of the run, and at the last step) and tokens/s; then the held-out task accuracy
of the aux-free MoE model beside the dense one (`train eval`, pass@1 with --samples problems per row).
"""
import argparse
import json
import os
import subprocess
import sys

RUNS = [
    ("moe, aux-loss-free (V3)", "aux-free", ["--balancing", "aux-free"]),
    ("moe, auxiliary loss only", "aux-loss", ["--balancing", "aux-loss"]),
    ("moe, no balancing", "none", ["--balancing", "none"]),
    ("dense, same active compute", "dense", ["--config", "bench/dense_config.json"]),
]


def summarize(log_path):
    with open(log_path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    steps = [r for r in records if "loss" in r and "step" in r]
    heldout = [r["heldout_loss"] for r in records if "heldout_loss" in r]
    violation = [max(r["max_violation"]) for r in steps if "max_violation" in r]
    half = violation[len(violation) // 2:]
    tokens = sorted(r["tokens_per_s"] for r in steps[1:])
    return {
        "heldout": heldout[-1] if heldout else float("nan"),
        "violation_mean": sum(half) / len(half) if half else None,
        "violation_last": violation[-1] if violation else None,
        "tokens_per_s": tokens[len(tokens) // 2] if tokens else float("nan"),
    }


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=2000)
    parser.add_argument("--seed", type=int, default=1234)
    parser.add_argument("--out", default="runs/study")
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--train", default="./build/train")
    args = parser.parse_args()
    rows = []
    for title, name, flags in RUNS:
        out = os.path.join(args.out, name)
        command = [args.train, "pretrain", "--out", out, "--steps", str(args.steps), "--seed", str(args.seed),
                   "--samples", "0", "--log-every", str(max(1, args.steps // 4))] + flags
        print(" ".join(command), flush=True)
        subprocess.run(command, check=True, stdout=sys.stdout)
        rows.append((title, summarize(os.path.join(out, "log.jsonl"))))
    print(f"\n{args.steps} steps, seed {args.seed}\n")
    print("| run | held-out loss | max violation, 2nd half mean | at the end | tokens/s |")
    print("| --- | --- | --- | --- | --- |")
    for title, s in rows:
        mean = "" if s["violation_mean"] is None else f"{s['violation_mean']:.3f}"
        last = "" if s["violation_last"] is None else f"{s['violation_last']:.3f}"
        print(f"| {title} | {s['heldout']:.4f} | {mean} | {last} | {s['tokens_per_s'] / 1e6:.3f}M |", flush=True)
    models = ",".join(os.path.join(args.out, n, "checkpoint") for n in ("aux-free", "dense"))
    subprocess.run([args.train, "eval", "--init", models, "--out", os.path.join(args.out, "eval"), "--samples",
                    str(args.samples), "--seed", str(args.seed)], check=True, stdout=subprocess.DEVNULL)
    with open(os.path.join(args.out, "eval", "eval.md")) as f:
        print("\n" + f.read())


if __name__ == "__main__":
    main()
