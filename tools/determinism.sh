#!/usr/bin/env bash
# Determinism: a stage run twice with the same flags writes the same log bit for bit (clock fields aside), and the
# same eval table.
#   tools/determinism.sh FOLDER STAGE [TRAIN FLAGS...]
# runs `build/train STAGE --out FOLDER/first FLAGS` and `--out FOLDER/second`, compares, exits 0 when equal.
set -u
if [ $# -lt 2 ]; then
    echo "usage: tools/determinism.sh FOLDER STAGE [TRAIN FLAGS...]" >&2
    exit 2
fi
folder=$1 stage=$2
shift 2
train="$(dirname "$0")/../build/train"
mkdir -p "$folder"
for run in first second; do
    rm -rf "${folder:?}/$run"
    "$train" "$stage" --out "$folder/$run" "$@" > "$folder/$run.out" 2>&1 || { echo "$stage: run $run failed"; exit 1; }
done
python3 - "$folder/first" "$folder/second" <<'PY'
import json, os, sys
clock = {"seconds", "ms", "tokens_per_s", "mfu"}
def log(run):
    path = os.path.join(run, "log.jsonl")
    if not os.path.exists(path): return []
    return [{k: v for k, v in json.loads(line).items() if k not in clock} for line in open(path)]
def table(run):
    path = os.path.join(run, "eval.md")
    return open(path).read() if os.path.exists(path) else None
a, b = sys.argv[1], sys.argv[2]
same_log, same_table = log(a) == log(b), table(a) == table(b)
print("records %d, log %s, eval table %s" % (len(log(a)), "equal" if same_log else "DIFFERS",
      "absent" if table(a) is None else "equal" if same_table else "DIFFERS"))
sys.exit(0 if same_log and same_table else 1)
PY
