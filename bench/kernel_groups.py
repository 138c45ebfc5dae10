"""Where a training (or decode) step's GPU time goes: an Nsight Compute CSV of one step, summed by kernel group.

    ncu --clock-control none --profile-from-start off --metrics gpu__time_duration.sum --csv \
        ./build/bench_step --profile > step.csv
    python3 bench/kernel_groups.py step.csv [--top 12]

Prints one row per group (kernels, launches, milliseconds, share of the step's kernel time), then the slowest
kernels. Kernel time excludes the gaps between kernels: compare its total with bench_step's wall time per step.
"""
import argparse
import csv
import collections
import sys

# (group, substrings of the kernel name), first match wins
GROUPS = [
    ("FP8 quantization", ["quantize_"]),
    ("router (forward, backward, W_g)", ["router_"]),
    ("MoE grouping and combine", ["chunk_counts", "dispatch", "gather_rows", "combine", "gather_backward",
                                  "every_expert_dest"]),
    ("MoE balancing", ["balance_sums", "balance_loss", "bias_update"]),
    ("attention core (not its GEMMs)", ["mla_", "causal_softmax", "heads_tokens"]),
    ("RMSNorm", ["rmsnorm", "sum_partials"]),
    ("SwiGLU", ["swiglu"]),
    ("embedding", ["embedding"]),
    ("cross-entropy", ["cross_entropy"]),
    ("AdamW and gradient norm", ["adamw", "partial_sums", "final_sum"]),
    ("decoding: latent-cache attention", ["latent_"]),
    ("decoding: tokens, drafts, verification", ["step_tokens", "sample_kernel", "advance_kernel", "verify_kernel",
                                                "draft_kernel"]),
    ("own FP8 GEMM", ["fp8_gemm"]),
    ("cuBLASLt GEMMs", ["gemm", "nvjet", "xmma", "cutlass", "splitk", "kernel"]),
]

UNIT_TO_MS = {"ns": 1e-6, "nsecond": 1e-6, "us": 1e-3, "usecond": 1e-3, "ms": 1.0, "msecond": 1.0}


def group_of(name):
    lower = name.lower()
    for group, keys in GROUPS:
        if any(k in lower for k in keys):
            return group
    return "other"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("csv")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args()
    with open(args.csv) as f:
        lines = [line for line in f if line.startswith('"')]  # the program's own output precedes the table
    rows = [r for r in csv.DictReader(lines) if r.get("Metric Name") == "gpu__time_duration.sum"]
    if not rows:
        sys.exit("no gpu__time_duration.sum rows in " + args.csv)
    by_group = collections.defaultdict(lambda: [0.0, 0, set()])
    by_kernel = collections.defaultdict(lambda: [0.0, 0])
    for r in rows:
        ms = float(r["Metric Value"].replace(",", "")) * UNIT_TO_MS[r["Metric Unit"]]
        name = r["Kernel Name"]
        g = by_group[group_of(name)]
        g[0] += ms
        g[1] += 1
        g[2].add(name)
        by_kernel[name][0] += ms
        by_kernel[name][1] += 1
    total = sum(g[0] for g in by_group.values())
    print(f"| kernel group | kernels | launches | ms | share |\n| --- | --- | --- | --- | --- |")
    for group, (ms, launches, names) in sorted(by_group.items(), key=lambda kv: -kv[1][0]):
        print(f"| {group} | {len(names)} | {launches} | {ms:.2f} | {100 * ms / total:.1f}% |")
    print(f"| all | {len(by_kernel)} | {len(rows)} | {total:.2f} | 100% |")
    print(f"\nslowest kernels:\n| kernel | launches | ms |\n| --- | --- | --- |")
    for name, (ms, launches) in sorted(by_kernel.items(), key=lambda kv: -kv[1][0])[:args.top]:
        print(f"| {name[:90]} | {launches} | {ms:.2f} |")


if __name__ == "__main__":
    main()
