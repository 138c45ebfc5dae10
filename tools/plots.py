"""The R1 paper's training curves in miniature, from the runs' log.jsonl files.

    python3 tools/plots.py [RUNS_DIR]       (default: runs)

Reads RUNS_DIR/r1zero/log.jsonl and RUNS_DIR/r1/log.jsonl (whichever exist) and writes RUNS_DIR/rl_curves.png:
reward, accuracy, mean response length and the share of thinking that mixes languages, against the RL step, for
R1-Zero (GRPO on the base model) beside R1 (GRPO after the cold start). Needs matplotlib; without it, says so and
exits 0, since plots are optional.
"""
import json
import os
import sys

RUNS = {"r1zero": "R1-Zero (GRPO on the base model)", "r1": "R1 (cold start, then GRPO)"}
PANELS = [("reward", "reward"), ("accuracy", "training accuracy"), ("response_tokens", "response length (tokens)"),
          ("mixing", "thinking that mixes languages")]


def read_log(path):
    """The per-step records of an RL log (the evaluation rows at its end have no reward)."""
    with open(path) as f:
        records = [json.loads(line) for line in f if line.strip()]
    return [r for r in records if "reward" in r]


def smooth(values, window=5):
    out = []
    for i in range(len(values)):
        chunk = values[max(0, i - window + 1):i + 1]
        out.append(sum(chunk) / len(chunk))
    return out


def main():
    runs_dir = sys.argv[1] if len(sys.argv) > 1 else "runs"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed; skipping the plots")
        return
    logs = {name: read_log(os.path.join(runs_dir, name, "log.jsonl")) for name in RUNS
            if os.path.exists(os.path.join(runs_dir, name, "log.jsonl"))}
    if not logs:
        print(f"plots: no RL logs under {runs_dir}")
        return
    fig, axes = plt.subplots(1, len(PANELS), figsize=(4.2 * len(PANELS), 3.4))
    for ax, (key, title) in zip(axes, PANELS):
        for name, records in logs.items():
            steps = [r["step"] for r in records]
            values = [r[key] for r in records]
            line, = ax.plot(steps, values, alpha=0.25)
            ax.plot(steps, smooth(values), color=line.get_color(), label=RUNS[name])
        ax.set_title(title)
        ax.set_xlabel("RL step")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    out = os.path.join(runs_dir, "rl_curves.png")
    fig.savefig(out, dpi=110)
    print(f"plots: wrote {out}")


if __name__ == "__main__":
    main()
