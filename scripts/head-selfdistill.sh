#!/usr/bin/env bash
# The heads experiment, EAGLE-3's data recipe (docs/HEADS.md, "Trained on the target's own
# text"): the target writes the responses (`adaspec data generate`, several prompts per batch),
# the head is initialised and trained on them from scratch, then evaluated on the target's own
# responses to held-out prompts next to the stock 0.5B draft, and benchmarked end to end.
#
# Responses are kept in the repository (data/selfdistill/, a few hundred KB) so a later run
# skips generating them; every other step whose output exists in $OUT is skipped too, and an
# interrupted training resumes from its last checkpoint ($OUT/head.checkpoints/).
# Output in $OUT (default /tmp/adaspec-selfdistill). Knobs: N_GSM, N_HE (train prompts),
# N_HELD (held-out prompts per data set), GEN_TOKENS, STEPS, FFN, VOCAB, TTT, THREADS.
# GEN_GSM / GEN_SHAREGPT_CODE: more prompts answered by the target (below).
# EXTRA: more training files with dataset answers (EAGLE-1/2's data) next to the target's own
# responses, e.g. EXTRA_GSM=250 (GSM8K train records after the generated ones) and
# EXTRA_SHAREGPT=100 (the first ShareGPT conversations of $SHARED_DATA, default ../shared/data).
set -euo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/adaspec-selfdistill}
M=${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}
T=${TARGET:-$M/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}
D=${DRAFT:-$M/qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf}
N_GSM=${N_GSM:-240}
N_HE=${N_HE:-104}
N_HELD=${N_HELD:-20}
GEN_TOKENS=${GEN_TOKENS:-160}
STEPS=${STEPS:-300}
FFN=${FFN:-4096}
VOCAB=${VOCAB:-8192}
TTT=${TTT:-3}
THREADS=${THREADS:-2}
A=./target/release/adaspec
DATA=data/selfdistill/$(basename "$T" .gguf)
mkdir -p "$OUT" "$DATA"
[ -x $A ] || cargo build --release --workspace --all-targets --features adaspec/train

# Prompts: GSM8K train (records 101..) and HumanEval 21..124 for training; GSM8K held-out 1..
# and HumanEval 1..20 (the benchmark's prompts come from these) held out.
head -n "$N_GSM" data/gsm8k/train.jsonl > "$OUT/p-gsm-train.jsonl"
sed -n "21,$((20 + N_HE))p" data/humaneval/dev.jsonl > "$OUT/p-he-train.jsonl"
head -n "$N_HELD" data/gsm8k/heldout.jsonl > "$OUT/p-gsm-held.jsonl"
head -n "$N_HELD" data/humaneval/dev.jsonl > "$OUT/p-he-held.jsonl"
gen() { # prompts.jsonl out.jsonl
    [ -f "$2" ] || $A data generate --target "$T" --input "$1" --chat --max-tokens "$GEN_TOKENS" \
        --parallel 4 --threads "$THREADS" -o "$2"
}
gen "$OUT/p-he-train.jsonl" "$DATA/humaneval-train.jsonl"
gen "$OUT/p-gsm-train.jsonl" "$DATA/gsm8k-train.jsonl"
gen "$OUT/p-he-held.jsonl" "$DATA/humaneval-heldout.jsonl"
gen "$OUT/p-gsm-held.jsonl" "$DATA/gsm8k-heldout.jsonl"
TRAIN="$DATA/gsm8k-train.jsonl $DATA/humaneval-train.jsonl"
# More of the target's own text (EAGLE-3's recipe at a larger scale; `data generate` resumes an
# interrupted run, so this can be spread over sessions): GEN_GSM more GSM8K train prompts
# (records after the first N_GSM; kept in the repository like the others) and GEN_SHAREGPT_CODE
# ShareGPT first questions about code (from $SHARED_DATA; the responses stay in $OUT: ShareGPT
# is not shipped).
GEN_GSM=${GEN_GSM:-0}
GEN_SHAREGPT_CODE=${GEN_SHAREGPT_CODE:-0}
if [ "$GEN_GSM" -gt 0 ]; then
    sed -n "$((N_GSM + 1)),$((N_GSM + GEN_GSM))p" data/gsm8k/train.jsonl > "$OUT/p-gsm-more.jsonl"
    gen "$OUT/p-gsm-more.jsonl" "$DATA/gsm8k-train-$((N_GSM + 1))-$((N_GSM + GEN_GSM)).jsonl"
    TRAIN="$TRAIN $DATA/gsm8k-train-$((N_GSM + 1))-$((N_GSM + GEN_GSM)).jsonl"
fi
# ShareGPT is not shipped in the repository (unclear license): opt-in, from $SHARED_DATA.
SG="${SHARED_DATA:-../shared/data}/sharegpt/train.jsonl"
if [ "$GEN_SHAREGPT_CODE" -gt 0 ]; then
    [ -f "$SG" ] || { echo "GEN_SHAREGPT_CODE needs ShareGPT at $SG (set SHARED_DATA)" >&2; exit 1; }
    python3 - "$SG" "$GEN_SHAREGPT_CODE" > "$OUT/p-sharegpt-code.jsonl" <<'PY'
import json, re, sys
code = re.compile(r"\b(python|function|code|javascript|typescript|sql|java|c\+\+|rust|golang|regex|script|algorithm|class|array|list|string|bash|def )\b", re.I)
n = 0
for line in open(sys.argv[1]):
    c = json.loads(line).get("conversations", [])
    if len(c) >= 2 and c[0].get("from") == "human" and 20 <= len(c[0].get("value", "")) <= 600 \
            and code.search(c[0]["value"]):
        print(json.dumps({"prompt": c[0]["value"]}))
        n += 1
        if n == int(sys.argv[2]):
            break
PY
    gen "$OUT/p-sharegpt-code.jsonl" "$OUT/sharegpt-code-gen.jsonl"
    TRAIN="$TRAIN $OUT/sharegpt-code-gen.jsonl"
fi
EXTRA_GSM=${EXTRA_GSM:-0}
EXTRA_SHAREGPT=${EXTRA_SHAREGPT:-0}
if [ "$EXTRA_GSM" -gt 0 ]; then
    sed -n "$((N_GSM + 1)),$((N_GSM + EXTRA_GSM))p" data/gsm8k/train.jsonl > "$OUT/x-gsm-answers.jsonl"
    TRAIN="$TRAIN $OUT/x-gsm-answers.jsonl"
fi
if [ "$EXTRA_SHAREGPT" -gt 0 ]; then
    [ -f "$SG" ] || { echo "EXTRA_SHAREGPT needs ShareGPT at $SG (set SHARED_DATA)" >&2; exit 1; }
    # Conversations whose first question is short, so that most of --max-len is answer.
    python3 - "$SG" "$EXTRA_SHAREGPT" > "$OUT/x-sharegpt.jsonl" <<'PY'
import json, sys
n = 0
for line in open(sys.argv[1]):
    c = json.loads(line).get("conversations", [])
    if len(c) >= 2 and c[0].get("from") == "human" and len(c[0].get("value", "")) <= 600:
        print(line, end="")
        n += 1
        if n == int(sys.argv[2]):
            break
PY
    TRAIN="$TRAIN $OUT/x-sharegpt.jsonl"
fi

[ -f "$OUT/head0.safetensors" ] || $A head init --target "$T" --data $TRAIN --draft-vocab "$VOCAB" \
    --ffn "$FFN" --type q8_0 -o "$OUT/head0.gguf" --checkpoint "$OUT/head0.safetensors"
if [ ! -f "$OUT/head.safetensors" ]; then
    # Training checkpoints every 25 steps; a later run resumes from the newest one.
    last=$(ls -d "$OUT"/head.checkpoints/step-* 2>/dev/null | sort | tail -1 || true)
    RESUME=(); [ -n "$last" ] && RESUME=(--resume "$last")
    $A head train --target "$T" --init "$OUT/head0.safetensors" --data $TRAIN \
        --max-len 320 --val-fraction 0.05 --steps "$STEPS" --batch 4 --ttt "$TTT" --lr 5e-4 --warmup 20 \
        --eval-every 50 --cache "$OUT/features.safetensors" --threads "$THREADS" --metrics "$OUT/train.jsonl" \
        --checkpoint-every 25 "${RESUME[@]}" \
        -o "$OUT/head.safetensors" --export "$OUT/head-q8_0.gguf" --type q8_0 --json > "$OUT/train-summary.json"
fi
echo "trained: $(head -c 400 "$OUT/train-summary.json")"

# Held-out: the target's own responses to prompts never trained on; the head (TTT steps =
# chain depths) and the 0.5B draft (teacher-forced, the same text).
for ds in humaneval gsm8k; do
    H=$DATA/$ds-heldout.jsonl
    [ -f "$OUT/eval-head-$ds.json" ] || $A head eval --target "$T" --head "$OUT/head.safetensors" --data "$H" \
        --max-len 320 --ttt 4 --threads "$THREADS" --json > "$OUT/eval-head-$ds.json"
    [ -f "$OUT/eval-draft-$ds.json" ] || $A eval --target "$T" --draft "$D" --data "$H" --chat --max-len 320 \
        --continuation-tokens 0 --threads "$THREADS" -o "$OUT/eval-draft-$ds.json" > /dev/null
done
echo "benchmark: OUT=$OUT HEAD=$OUT/head-q8_0.gguf DATASETS='humaneval gsm8k' scripts/head-bench.sh"
