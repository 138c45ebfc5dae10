"""The papers' training curves in miniature, from the runs' log.jsonl files.

    python3 tools/plots.py [RUNS_DIR]       (default: runs)

Reads RUNS_DIR/r1zero/log.jsonl and RUNS_DIR/r1/log.jsonl (whichever exist) and writes RUNS_DIR/rl_curves.png:
reward, accuracy, mean response length and the share of thinking that mixes languages, against the RL step, for
R1-Zero (GRPO on the base model) beside R1 (GRPO after the cold start). From RUNS_DIR/pretrain/log.jsonl of a MoE
model it writes RUNS_DIR/expert_load.png: each MoE layer's expert loads (load / mean load) and max violation against
the step. Needs matplotlib; without it, says so and exits 0, since plots are optional.
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


def expert_load_plot(plt, runs_dir):
    """Per MoE layer, each expert's load over its mean, and the layer's max violation, against the step."""
    path = os.path.join(runs_dir, "pretrain", "log.jsonl")
    if not os.path.exists(path):
        return
    with open(path) as f:
        records = [r for r in (json.loads(line) for line in f if line.strip()) if "expert_load" in r]
    if not records:
        return
    steps = [r["step"] for r in records]
    layers = len(records[0]["expert_load"])
    columns = 4
    rows = (layers + 1 + columns - 1) // columns
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 3.0 * rows), squeeze=False)
    panels = axes.flatten()
    for layer in range(layers):
        ax = panels[layer]
        loads = [r["expert_load"][layer] for r in records]
        for e in range(len(loads[0])):
            share = [load[e] * len(load) / max(sum(load), 1) for load in loads]
            ax.plot(steps, smooth(share, 20), linewidth=0.8)
        ax.set_title(f"MoE layer {layer + 1}: load / mean, per expert", fontsize=9)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    ax = panels[layers]
    for layer in range(layers):
        ax.plot(steps, smooth([r["max_violation"][layer] for r in records], 20), label=f"layer {layer + 1}")
    ax.set_title("max violation (max load / mean - 1)", fontsize=9)
    ax.set_xlabel("step")
    ax.legend(fontsize=6)
    ax.grid(alpha=0.3)
    for extra in panels[layers + 1:]:
        extra.axis("off")
    fig.tight_layout()
    out = os.path.join(runs_dir, "expert_load.png")
    fig.savefig(out, dpi=100)
    print(f"plots: wrote {out}")


def main():
    runs_dir = sys.argv[1] if len(sys.argv) > 1 else "runs"
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("plots: matplotlib is not installed; skipping the plots")
        return
    expert_load_plot(plt, runs_dir)
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
