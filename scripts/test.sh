#!/usr/bin/env bash
# The full test suite: unit and property tests, tiny generated models through real llama.cpp,
# the real model pair, the C ABI plugin with C/C++ hosts, and the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
cargo build --release --workspace --all-features --all-targets
cargo test --release --workspace --all-features -- --test-threads=1
# The plugin must also build without the trainer (no candle).
cargo build --release -p adaspec-ffi
