#!/usr/bin/env bash
# End-to-end benchmark of a trained head (scripts/head-experiment.sh) on the given Q4_K_M target
# and on an F16 copy of it (cheap verification with tinyBLAS): target alone, the head (auto,
# chains, a tree), the 0.5B draft (auto) and lookups (auto), side by side in one process per
# data set, plus the head's cost per draft step. Resumes: a report that exists is kept.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adaspec-heads}
M=${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}
Q4=${TARGET:-$M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
HEAD=${HEAD:-$OUT/head2-q8_0.gguf}
N=${N:-5}
TOKENS=${TOKENS:-96}
THREADS=${THREADS:-2}
A=./target/release/adaspec
STRATS=${STRATS:-"head=auto/head=chain:1/head=chain:2/head=chain:3/head=tree:2,3,6/auto/lookup=auto"}
# The F16 copy, made once with llama.cpp's quantizer (the matrix benchmark's cache).
F16=$M/converted/$(basename "$Q4" .gguf).as-f16.gguf
if [ ! -f "$F16" ]; then
    $A bench --matrix --target "$Q4" --formats f16 --datasets gsm8k --n-prompts 1 --max-tokens 4 \
        --strategies none --threads "$THREADS" --out "$OUT/convert.json" > /dev/null
fi
for fmt in q4_k_m f16; do
    T=$Q4; [ $fmt = f16 ] && T=$F16
    [ -f "$OUT/cost-$fmt.txt" ] || ./target/release/examples/head_cost "$T" "$HEAD" "$THREADS" 2>/dev/null | grep -v "^llama\|^load" > "$OUT/cost-$fmt.txt"
    for ds in ${DATASETS:-humaneval}; do
        R=$OUT/bench-$fmt-$ds.json
        [ -f "$R" ] && continue
        $A bench --target "$T" --head "$HEAD" --dataset $ds --n-prompts "$N" --max-tokens "$TOKENS" \
            --strategies "$STRATS" --threads "$THREADS" --out "$R" 2>/dev/null | tee "$OUT/bench-$fmt-$ds.txt"
    done
done
