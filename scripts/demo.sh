#!/usr/bin/env bash
# The main job: speculative generation on the default pair (Qwen2.5-Coder 1.5B target +
# 0.5B draft), streaming the text, then a stats line with the speedup over target alone.
# Extra arguments go to `adaspec generate` (e.g. --strategy chain:3 --mode exact).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh pair
cargo build --release --bin adaspec
exec ./target/release/adaspec generate --chat --max-tokens 128 --compare \
  --prompt "Write a Python function that returns the n-th Fibonacci number, with a docstring." "$@"
