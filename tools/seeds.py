"""The final tables of several seeds of `make train`, as one table of means and spreads.

    python3 tools/seeds.py RUNS_DIR [RUNS_DIR ...]       (e.g. runs runs/seed1, from make train SEED=1 RUNS=runs/seed1)

Reads RUNS_DIR/eval/eval.md of each run (the accuracy table that `train eval` writes) and prints, for every task,
difficulty and model, the mean accuracy over the runs and its spread (lowest and highest), then, run by run, what R1
(DeepSeek-R1 §2.3: GRPO after the cold start) adds: R1 minus the cold start, and R1 minus the supervised baseline
given the same compute. Runs are compared like for like only if their tables have the same rows and columns in the
same order; otherwise it names the run that differs and exits 1.
"""
import os
import statistics
import sys


def read_accuracy(path):
    """The accuracy table of an eval.md: column names, and {(task, difficulty): [accuracy in %, per column]}."""
    with open(path) as f:
        lines = [line.strip() for line in f]
    start = next((i for i, line in enumerate(lines) if line.startswith("| accuracy |")), None)
    if start is None:
        raise ValueError(f"{path}: no accuracy table")
    columns = [c.strip() for c in lines[start].strip("|").split("|")][2:]
    rows = {}
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        key = (cells[0], cells[1])
        if len(cells) != len(columns) + 2 or key in rows:
            raise ValueError(f"{path}: the row {line} has {len(cells) - 2} values for {len(columns)} columns, "
                             "or repeats an earlier row")
        try:
            rows[key] = [float(c.rstrip("%")) for c in cells[2:]]
        except ValueError:
            raise ValueError(f"{path}: the row {line} holds a value that is not a percentage")
    return columns, rows


def difference(rows, columns, a, b):
    """Per row, column a minus column b."""
    ia, ib = columns.index(a), columns.index(b)
    return {key: values[ia] - values[ib] for key, values in rows.items()}


def main(runs):
    tables = [read_accuracy(os.path.join(run, "eval", "eval.md")) for run in runs]
    columns, rows = tables[0]
    for run, (c, r) in zip(runs, tables):
        if c != columns or r.keys() != rows.keys():
            print(f"error: {run}'s table has other rows or columns than {runs[0]}'s", file=sys.stderr)
            return 1
    missing = [c for c in ("r1", "sft", "sft_more") if c not in columns]
    if missing:
        print(f"error: the tables lack the column(s) {', '.join(missing)}", file=sys.stderr)
        return 1

    def spread(values):
        mean = statistics.fmean(values)
        return f"{mean:.1f}% ({min(values):.1f}-{max(values):.1f})" if len(values) > 1 else f"{mean:.1f}%"

    print(f"Held-out pass@1 over {len(runs)} run{'s' if len(runs) > 1 else ''}: mean (lowest-highest)\n")
    print("| task | difficulty | " + " | ".join(columns) + " |")
    print("| --- | --- | " + " | ".join("---" for _ in columns) + " |")
    for key in rows:
        cells = [spread([t[1][key][i] for t in tables]) for i in range(len(columns))]
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + " |")

    print("\nPer run, in points: R1 - cold start; R1 - the same compute as SFT\n")
    print("| task | difficulty | " + " | ".join(runs) + " | mean |")
    print("| --- | --- | " + " | ".join("---" for _ in runs) + " | --- |")
    for key in rows:
        pairs = [(difference(t[1], t[0], "r1", "sft"), difference(t[1], t[0], "r1", "sft_more")) for t in tables]
        over_sft = [p[0][key] for p in pairs]
        over_baseline = [p[1][key] for p in pairs]
        cells = [f"{a:+.1f}; {b:+.1f}" for a, b in zip(over_sft, over_baseline)]
        mean = f"{statistics.fmean(over_sft):+.1f}; {statistics.fmean(over_baseline):+.1f}"
        print(f"| {key[0]} | {key[1]} | " + " | ".join(cells) + f" | {mean} |")
    return 0


if __name__ == "__main__":
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    if sys.argv[1] in ("-h", "--help"):
        print(__doc__)
        sys.exit(0)
    try:
        sys.exit(main(sys.argv[1:]))
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(1)
