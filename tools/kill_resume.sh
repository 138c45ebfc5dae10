#!/usr/bin/env bash
# Kill and resume: a run killed with SIGKILL at random moments (in a step, in a checkpoint write, at start) and
# resumed with --resume each time must repeat the uninterrupted run bit for bit, and must always find a checkpoint
# that loads.
#   tools/kill_resume.sh FOLDER KILLS STAGE [TRAIN FLAGS...]
# runs `build/train STAGE --out FOLDER/whole FLAGS` once, then `--out FOLDER/killed`, killing it up to KILLS times,
# each after a random share of half the uninterrupted run's time, and resuming (or starting again where no
# checkpoint was written yet) until it ends. Then every record of the killed run's log must equal the uninterrupted
# run's record of its step (clock fields aside: a resumed run repeats the steps after its checkpoint, and those
# records too). Exit status 0 when all holds; the last line counts the kills and the resumes.
set -u
if [ $# -lt 3 ] || ! [[ "$2" =~ ^[0-9]+$ ]]; then
    echo "usage: tools/kill_resume.sh FOLDER KILLS STAGE [TRAIN FLAGS...]" >&2
    exit 2
fi
folder=$1 kills=$2 stage=$3
shift 3
train="$(dirname "$0")/../build/train"
rm -rf "$folder/whole" "$folder/killed"
mkdir -p "$folder"

start=$(date +%s.%N)
if ! "$train" "$stage" --out "$folder/whole" "$@" > "$folder/whole.out" 2>&1; then
    echo "the uninterrupted run failed (see $folder/whole.out)"
    exit 1
fi
whole_s=$(awk -v a="$start" -v b="$(date +%s.%N)" 'BEGIN { print b - a }')

killed=0 resumed=0
for ((attempt = 0; ; attempt++)); do
    resume=()
    # a kill between the two renames of a checkpoint write leaves checkpoint.old alone: --resume puts it back
    if [ -d "$folder/killed/checkpoint" ] || [ -d "$folder/killed/checkpoint.old" ]; then
        resume=(--resume)
        resumed=$((resumed + 1))
    fi
    "$train" "$stage" --out "$folder/killed" "${resume[@]}" "$@" >> "$folder/killed.out" 2>&1 &
    pid=$!
    if [ "$killed" -lt "$kills" ]; then
        # within the first half of a whole run's time: a resumed run, which has less to do, seldom ends first
        sleep "$(awk -v s="$whole_s" -v r="$RANDOM" 'BEGIN { printf "%.3f", 0.5 * s * r / 32768 }')"
        if kill -9 "$pid" 2> /dev/null; then
            wait "$pid" 2> /dev/null
            killed=$((killed + 1))
            continue
        fi
    fi
    wait "$pid" || { echo "the run failed after $killed kills (see $folder/killed.out)"; exit 1; }
    break
done

python3 "$(dirname "$0")/compare_logs.py" resumed "$folder/whole/log.jsonl" "$folder/killed/log.jsonl"
status=$?
verdict=$([ $status -eq 0 ] && echo "equals" || echo "DIFFERS FROM")
echo "$stage: $killed kills, $resumed resumes; the killed run's log $verdict the uninterrupted run's"
exit $status
