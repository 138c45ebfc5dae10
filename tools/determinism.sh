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
status=0
for run in first second; do [ -f "$folder/$run/log.jsonl" ] || : > "$folder/$run/log.jsonl"; done  # eval writes none
python3 "$(dirname "$0")/compare_logs.py" same "$folder/first/log.jsonl" "$folder/second/log.jsonl" || status=1
if [ -f "$folder/first/eval.md" ]; then
    if cmp -s "$folder/first/eval.md" "$folder/second/eval.md"; then
        echo "eval table equal"
    else
        echo "eval table DIFFERS"
        status=1
    fi
fi
exit $status
