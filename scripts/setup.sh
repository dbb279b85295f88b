#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and test adaspec (cmake, libclang for
# bindgen, a C/C++ toolchain, pkg-config, valgrind) and fetches the models. Idempotent.
# Usage: scripts/setup.sh [pair|smollm2|all|none]   (models to fetch; default all)
set -euo pipefail
cd "$(dirname "$0")/.."

need=()
command -v cmake >/dev/null 2>&1 || need+=(cmake)
command -v cc >/dev/null 2>&1 || need+=(build-essential)
command -v c++ >/dev/null 2>&1 || need+=(g++)
command -v pkg-config >/dev/null 2>&1 || need+=(pkg-config)
command -v valgrind >/dev/null 2>&1 || need+=(valgrind)
# bindgen needs libclang's C API (libclang.so / libclang-NN.so); libclang-cpp.so, which some
# images carry without it, does not do.
has_libclang() {
  local f
  for f in /usr/lib/llvm-*/lib/libclang.so* /usr/lib/llvm-*/lib/libclang-[0-9]*.so* \
    /usr/lib/*-linux-gnu/libclang.so* /usr/lib/*-linux-gnu/libclang-[0-9]*.so*; do
    [ -e "$f" ] && return 0
  done
  return 1
}
if ! has_libclang; then
  need+=(libclang-dev clang)
fi
if [ ${#need[@]} -gt 0 ]; then
  echo "[setup] installing: ${need[*]}"
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
if ! command -v cargo >/dev/null 2>&1; then
  echo "[setup] error: cargo not found; install Rust (https://rustup.rs) first" >&2
  exit 1
fi

what="${1:-all}"
if [ "$what" != "none" ]; then
  scripts/fetch-models.sh "$what"
fi
