#!/usr/bin/env bash
# The check of an exercise: the project's tests of the function it asks for, built with the learner's file in place
# of the project's function (or, with --solution, with the project's own), then run. Ends with PASS or FAIL and the
# failing checks.
#   exercises/check.sh N [--solution]
# NVCC and ARCH come from the Makefile (`make exercise N`); each exercise's folder names its function and tests in
# its file `check`: HOOK (the macro that swaps the function), FILE (the learner's file), TESTS, CASES.
set -u
cd "$(dirname "$0")/.."
if ! [[ "${1:-}" =~ ^[0-9]+$ ]] || { [ $# -eq 2 ] && [ "$2" != --solution ]; } || [ $# -gt 2 ]; then
    echo "usage: exercises/check.sh N [--solution]   (or: make exercise N, make exercise N SOLUTION=1)" >&2
    exit 2
fi
number=$(printf '%02d' "$((10#$1))")
folder=$(find exercises -maxdepth 1 -type d -name "${number}_*" | head -n 1)
[ -n "$folder" ] || { echo "no exercise $1: the exercises are $(cd exercises && ls -d [0-9]*_* | tr '\n' ' ')" >&2; exit 2; }
HOOK='' FILE='' TESTS='' CASES=''
source "$folder/check"
name=$(basename "$folder")
what="the file $folder/$FILE"
defines=(-D"$HOOK=\"$folder/$FILE\"")
if [ "${2:-}" = --solution ]; then
    what="the project's own solution" defines=() name="$name.solution"
fi

nvcc=${NVCC:-nvcc}
arch=${ARCH:-$(make -s print-arch)}  # the Makefile's: this machine's GPU, or Hopper
mkdir -p build/exercises
binary=build/exercises/$name
echo "exercise $1 ($folder): building the tests of $CASES with $what"
# shellcheck disable=SC2086
if ! $nvcc -std=c++17 -O1 $arch -I. "${defines[@]}" -o "$binary" tests/main.cu $TESTS -lcublasLt -lnccl; then
    echo "exercise $1: FAIL (it does not compile)"
    exit 1
fi
log=$(mktemp)
"$binary" -tc="$CASES" >"$log" 2>&1
status=$?
grep -E "ERROR|FATAL|CHECK|logged|values:|^  " "$log" | head -n 40
summary=$(grep -E '^\[doctest\] test cases:' "$log")
rm -f "$log"
echo "$summary"
if [ "$status" -eq 0 ] && [[ "$summary" =~ \|[[:space:]]*[1-9][0-9]*\ passed ]]; then
    echo "exercise $1: PASS"
    exit 0
fi
echo "exercise $1: FAIL"
exit 1
