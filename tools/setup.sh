#!/usr/bin/env bash
# What a machine with the CUDA toolkit still needs, checked (and where it can be, installed) before a build:
#   tools/setup.sh doctest   the test framework: installed with apt-get where this user may, else the command to run
#   tools/setup.sh nccl      NCCL's header and library, which the training program links
# Exit status 0 when the piece is there; otherwise one line saying what to run, and status 1.
set -u
cxx=${CXX:-c++}
cuda=${CUDA_HOME:-/usr/local/cuda}

compiles() {  # compiles(header, [library]): a program that includes the header (and links the library) builds
    local flags=(-x c++ - -I"$cuda/include")
    if [ -n "${2:-}" ]; then flags+=(-o /dev/null -L"$cuda/lib64" "-l$2"); else flags+=(-fsyntax-only); fi
    printf '#include <%s>\nint main() { return 0; }\n' "$1" | "$cxx" "${flags[@]}" >/dev/null 2>&1
}

install() {  # install(package): apt-get as root, or through sudo without a password; false where neither works
    local run=()
    [ "$(id -u)" -eq 0 ] || { sudo -n true 2>/dev/null && run=(sudo -n); } || return 1
    command -v apt-get >/dev/null || return 1
    echo "installing $1 (apt-get)"
    "${run[@]}" apt-get update -qq >/dev/null && "${run[@]}" apt-get install -y -qq "$1" >/dev/null
}

case "${1:-}" in
doctest)
    compiles doctest/doctest.h && exit 0
    install doctest-dev && compiles doctest/doctest.h && exit 0
    echo "doctest is missing: run 'sudo apt-get install doctest-dev' (or put doctest/doctest.h on the include path)"
    exit 1
    ;;
nccl)
    compiles nccl.h nccl && exit 0
    echo "NCCL is missing: run 'sudo apt-get install libnccl-dev' (or install NCCL where nvcc finds it)"
    exit 1
    ;;
*)
    echo "usage: tools/setup.sh doctest|nccl" >&2
    exit 2
    ;;
esac
