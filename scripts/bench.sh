#!/usr/bin/env bash
# Reproduces the README's benchmark tables: target alone vs every strategy, interleaved per
# prompt in one process, greedy, 128 tokens, chat template, 2 threads, on the default pair.
# Results: bench/<dataset>-<mode>.{txt,json}. Takes ~25 minutes on a 2-core machine.
# Usage: scripts/bench.sh [N_PROMPTS] [THREADS]
set -euo pipefail
cd "$(dirname "$0")/.."
N="${1:-10}"; T="${2:-2}"
scripts/setup.sh pair
cargo build --release --bin adaspec
mkdir -p bench
STRATS="auto/chain:1/chain:2/chain:3/chain:4/tree:2,4,8/tree:4,5,16"
for ds in humaneval gsm8k mt_bench; do
  ./target/release/adaspec bench --dataset "$ds" --n-prompts "$N" --max-tokens 128 --threads "$T" \
    --strategies "$STRATS" --out "bench/$ds-fast.json" | tee "bench/$ds-fast.txt"
done
./target/release/adaspec bench --dataset humaneval --n-prompts "$N" --max-tokens 128 --threads "$T" \
  --mode exact --strategies "auto/chain:1/chain:2/chain:3/chain:6" --out bench/humaneval-exact.json | tee bench/humaneval-exact.txt
