#!/usr/bin/env bash
# The heads experiment on the real pair (docs/HEADS.md): an EAGLE-3-layout head for the
# Qwen2.5-Coder 1.5B Q4_K_M target, trained on the target's own features within a CPU budget,
# then benchmarked end to end against target alone, the 0.5B draft and lookups.
# Resumes: every step whose output exists is skipped. Output in $OUT (default /tmp/adaspec-heads).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adaspec-heads}
M=${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}
T=${TARGET:-$M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
SHARED=${SHARED_DATA:-../shared/data}
STEPS=${STEPS:-300}
FFN=${FFN:-4096}
VOCAB=${VOCAB:-8192}
THREADS=${THREADS:-2}
A=./target/release/adaspec
mkdir -p "$OUT"
[ -x $A ] || cargo build --release --features train
# Training data: GSM8K train (in the repo) and HumanEval problems 21.. (the benchmark uses the
# first ones): dataset answers (as EAGLE-1/2 and FSPAD train), never the held-out prompts.
[ -f "$OUT/humaneval-train.jsonl" ] || tail -n +21 data/humaneval/dev.jsonl > "$OUT/humaneval-train.jsonl"
DATA="data/gsm8k/train.jsonl $OUT/humaneval-train.jsonl"
[ -f "$OUT/head0.safetensors" ] || $A head init --target "$T" --data $DATA $SHARED/gsm8k/dev.jsonl \
    --draft-vocab "$VOCAB" --ffn "$FFN" --type q8_0 -o "$OUT/head0.gguf" --checkpoint "$OUT/head0.safetensors"
[ -f "$OUT/head.safetensors" ] || $A head train --target "$T" --init "$OUT/head0.safetensors" --data $DATA \
    --max-len 256 --max-examples 600 --steps "$STEPS" --batch 4 --ttt 3 --lr 5e-4 --warmup 20 --eval-every 50 \
    --cache "$OUT/features.safetensors" --threads "$THREADS" --metrics "$OUT/train.jsonl" \
    -o "$OUT/head.safetensors" --export "$OUT/head-q8_0.gguf" --type q8_0 --json > "$OUT/train-summary.json"
echo "trained: $(cat "$OUT/train-summary.json" | head -c 400)"
