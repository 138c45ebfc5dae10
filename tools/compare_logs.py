"""Two runs' log.jsonl compared record for record, the clock and memory fields aside (tools/determinism.sh, kill_resume.sh).

  python3 tools/compare_logs.py same A B      B's records are A's, in the same order
  python3 tools/compare_logs.py resumed A B   every record of B equals a record of A at its step, and B has every
                                              step of A (a resumed run repeats the steps after its checkpoint)
Exit status 0 when that holds; the first differences are printed.
"""
import json
import sys

MEASURED = {"seconds", "ms", "tokens_per_s", "mfu", "memory_gb", "peak_memory_gb", "comm_ms"}


def records(path):
    with open(path) as f:
        return [{k: v for k, v in json.loads(line).items() if k not in MEASURED} for line in f]


def same(a, b):
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            print("record", i, "differs:", x, y)
            return False
    if len(a) != len(b):
        print("records:", len(a), "against", len(b))
        return False
    return True


def resumed(a, b):
    by_step = {}
    for r in a:
        by_step.setdefault(r.get("step"), []).append(r)
    bad = [r for r in b if r not in by_step.get(r.get("step"), [])]
    for r in bad[:3]:
        print("differs at step", r.get("step"), r)
    missing = sorted(set(by_step) - {r.get("step") for r in b}, key=str)
    if missing:
        print("steps missing from the resumed run:", missing[:10])
    return not bad and not missing


if __name__ == "__main__":
    if len(sys.argv) != 4 or sys.argv[1] not in ("same", "resumed"):
        sys.exit(__doc__)
    a, b = records(sys.argv[2]), records(sys.argv[3])
    ok = (same if sys.argv[1] == "same" else resumed)(a, b)
    print("records %d, %s" % (len(b), "equal" if ok else "DIFFER"))
    sys.exit(0 if ok else 1)
