#!/usr/bin/env bash
# The full test suite: unit and property tests, tiny generated models through real llama.cpp,
# the real model pair, the C ABI plugin with C/C++ hosts, and the trainer.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh all
# The plugin must build without the trainer (no candle): build it first, on its own.
cargo build --release -p adaspec-ffi
cargo build --release --workspace --features adaspec/train --all-targets
# One test binary at a time: several real-model tests each load a 1.5B model.
cargo test --release --workspace --features adaspec/train -- --test-threads=1
