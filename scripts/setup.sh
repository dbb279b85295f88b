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
if ! ls /usr/lib/llvm-*/lib/libclang*.so* >/dev/null 2>&1 && ! ls /usr/lib/x86_64-linux-gnu/libclang*.so* >/dev/null 2>&1; then
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
