#!/bin/bash
# Starts a command once per GPU of this machine, as torchrun does: RANK, WORLD_SIZE and LOCAL_RANK set for each
# process, and one job token for all of them (the ranks meet through a file that it names). When a process fails,
# the others are stopped (each process group: what a command started too) and the launcher exits with the failed
# process's status.
#   tools/launch.sh N ./build/train pretrain --out runs/pretrain
set -u
if [ $# -lt 2 ] || ! [[ "$1" =~ ^[1-9][0-9]*$ ]]; then
    echo "usage: tools/launch.sh NGPU COMMAND [ARGS...] (NGPU a positive integer)" >&2
    exit 2
fi
n=$1
shift
export WORLD_SIZE=$n MINI_DEEPSEEK_JOB="$(hostname)_$$_$(date +%s)"
pids=()
# a rank's group, and the rank itself in case it has not yet made its group
stop_all() { for pid in "${pids[@]}"; do kill -- "-$pid" "$pid" 2>/dev/null; done; }
trap 'stop_all; exit 130' INT TERM
for ((r = 0; r < n; r++)); do
    RANK=$r LOCAL_RANK=$r setsid "$@" &  # a process group of its own
    pids+=($!)
done
status=0
for ((left = n; left > 0; left--)); do
    wait -n
    s=$?
    if [ $s -ne 0 ] && [ $status -eq 0 ]; then
        status=$s
        echo "launch: a rank exited with status $s; stopping the others" >&2
        stop_all
    fi
done
exit $status
