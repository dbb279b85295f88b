#!/usr/bin/env bash
# Issue 5's experiment at CPU scale: a layer-pruned Qwen2.5-Coder 0.5B draft distilled against
# the 1.5B target with forward KL (the DistillSpec baseline, which is also AdaSPEC's stage-1
# reference) and with AdaSPEC (stage 2, top-k token selection), at equal optimizer steps; then
# α on held-out GSM8K questions that no stage trained on, and `adaspec bench` of the trained
# drafts against the stock 0.5B draft and target alone.
#
# Every size is an environment variable (defaults: the run reported in README.md):
#   N_HELD   held-out GSM8K questions (first lines of data/gsm8k/heldout.jsonl) [100]
#   N_GSM    GSM8K training examples with their human answers                  [176]
#   N_GEN    further GSM8K questions answered by the target (data generate)    [64]
#            (training and generation questions: data/gsm8k/train.jsonl, lines 1..N_GSM and
#            the N_GEN after them; none of them is in the held-out file)
#   HELDOUT, TRAIN  other held-out / training files; or DATA=ONE.jsonl, split in order into
#            N_HELD held-out, N_GSM training and N_GEN generation lines
#   LAYERS   blocks of the 0.5B kept in the pruned draft                       [0,1,2,3,4,5,6,7,8,9,10,11,22,23]
#   TRAIN_BLOCKS  blocks (indices in the pruned draft) that are trained        [8,9,10,11,12,13]
#                 (embeddings and LM head stay frozen: with the 0.5B's untied 151,936-row head,
#                 training it would double the cost of a step)
#   STEPS    optimizer steps per stage; BATCH sequences per step               [60; 4]
#   N_EVAL   held-out sequences for α; N_BENCH prompts × BENCH_TOKENS in bench  [40; 5 × 96]
# Results: $OUT/summary.json plus every stage's files. Re-running skips finished stages.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-bench/adaspec-exp}"
N_HELD="${N_HELD:-100}"; N_GSM="${N_GSM:-176}"; N_GEN="${N_GEN:-64}"
LAYERS="${LAYERS:-0,1,2,3,4,5,6,7,8,9,10,11,22,23}"
TRAIN_BLOCKS="${TRAIN_BLOCKS:-8,9,10,11,12,13}"
STEPS="${STEPS:-60}"; BATCH="${BATCH:-4}"; K="${K:-0.4}"; LR="${LR:-3e-4}"
N_EVAL="${N_EVAL:-40}"; N_BENCH="${N_BENCH:-5}"; BENCH_TOKENS="${BENCH_TOKENS:-96}"
THREADS="${THREADS:-2}"
HELDOUT="${HELDOUT:-data/gsm8k/heldout.jsonl}"
TRAIN="${TRAIN:-data/gsm8k/train.jsonl}"
DATA="${DATA:-}"
MODELS="${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}"
T="$MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
D="$MODELS/qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf"

scripts/setup.sh pair
cargo build --release --features train --bin adaspec --bin adaspec-export
A=./target/release/adaspec
X=./target/release/adaspec-export
mkdir -p "$OUT"
log() { echo "[experiment $(date +%H:%M:%S)] $*"; }

# Splits: held-out questions (evaluation only), then disjoint training and generation questions.
# With the shipped files these are GSM8K records 1..100, 101..276 and 277..340 (data/README.md).
need() { # file lines
  [ -f "$1" ] || { echo "error: missing $1" >&2; exit 1; }
  local n; n=$(wc -l < "$1")
  [ "$n" -ge "$2" ] || { echo "error: $1 has $n lines, $2 needed" >&2; exit 1; }
}
if [ -n "$DATA" ]; then
  need "$DATA" $((N_HELD + N_GSM + N_GEN))
  sed -n "1,${N_HELD}p" "$DATA" > "$OUT/heldout.jsonl"
  sed -n "$((N_HELD + 1)),$((N_HELD + N_GSM))p" "$DATA" > "$OUT/gsm-train.jsonl"
  sed -n "$((N_HELD + N_GSM + 1)),$((N_HELD + N_GSM + N_GEN))p" "$DATA" > "$OUT/gen-prompts.jsonl"
else
  need "$HELDOUT" "$N_HELD"
  need "$TRAIN" $((N_GSM + N_GEN))
  sed -n "1,${N_HELD}p" "$HELDOUT" > "$OUT/heldout.jsonl"
  sed -n "1,${N_GSM}p" "$TRAIN" > "$OUT/gsm-train.jsonl"
  sed -n "$((N_GSM + 1)),$((N_GSM + N_GEN))p" "$TRAIN" > "$OUT/gen-prompts.jsonl"
fi

if [ ! -s "$OUT/gen.jsonl" ]; then
  log "target answers $N_GEN training questions (greedy, chat template)"
  $A data generate --target "$T" --input "$OUT/gen-prompts.jsonl" --chat --max-tokens 192 \
    --threads "$THREADS" -o "$OUT/gen.jsonl"
fi
if [ ! -s "$OUT/init/model.safetensors" ]; then
  log "pruned draft: blocks $LAYERS of the 0.5B"
  $A draft init --from "$D" --layers "$LAYERS" -o "$OUT/init/model.safetensors"
fi
if [ ! -s "$OUT/run/adaspec/model.safetensors" ]; then
  log "stage 1 (FKL: baseline and reference) and stage 2 (AdaSPEC, k=$K), $STEPS steps each"
  $A train adaspec --target "$T" --draft "$OUT/init/model.safetensors" \
    --data "$OUT/gsm-train.jsonl" "$OUT/gen.jsonl" --val-data "$OUT/heldout.jsonl" --max-val 16 \
    --chat --max-len 384 --steps "$STEPS" --batch-size "$BATCH" --lr "$LR" --k "$K" \
    --freeze-embeddings --freeze-lm-head --train-blocks "$TRAIN_BLOCKS" --eval-every 20 \
    --teacher sparse --teacher-top-k 64 --threads "$THREADS" -o "$OUT/run" --json > "$OUT/train.json"
fi

ev() { # name draft
  if [ ! -s "$OUT/eval-$1.json" ]; then
    log "α of $1 on $N_EVAL held-out questions"
    $A eval --target "$T" --draft "$2" --data "$OUT/heldout.jsonl" --max-examples "$N_EVAL" \
      --continuation-tokens 48 --chat --threads "$THREADS" -o "$OUT/eval-$1.json" > /dev/null
  fi
}
ev stock "$D"
# The untrained pruned draft's α is in run/*/metrics.jsonl (validation at step 0); EVAL_INIT=1
# measures it here too.
if [ "${EVAL_INIT:-0}" = 1 ]; then ev pruned-init "$OUT/init/model.safetensors"; fi
ev fkl "$OUT/run/reference/model.safetensors"
ev adaspec "$OUT/run/adaspec/model.safetensors"

for m in reference adaspec; do
  if [ ! -s "$OUT/draft-$m.gguf" ]; then
    $X --gguf -i "$OUT/run/$m/model.safetensors" --tokenizer-from "$T" -o "$OUT/draft-$m.gguf" --type q8_0
  fi
done

# End to end: each run measures target alone and the drafts side by side, interleaved per prompt.
for d in stock:"$D" fkl:"$OUT/draft-reference.gguf" adaspec:"$OUT/draft-adaspec.gguf"; do
  name="${d%%:*}"; path="${d#*:}"
  if [ ! -s "$OUT/bench-$name.json" ]; then
    log "bench: target alone vs draft $name"
    $A bench --target "$T" --draft "$path" --dataset "$OUT/heldout.jsonl" --n-prompts "$N_BENCH" \
      --max-tokens "$BENCH_TOKENS" --threads "$THREADS" --strategies "auto/chain:2/chain:3" \
      --out "$OUT/bench-$name.json" | tee "$OUT/bench-$name.txt"
  fi
done
# One table of everything: α (argmax agreement) and τ(γ=4) on held-out answers and on the
# target's own continuations, training time, and bench ratios vs target alone.
python3 - "$OUT" <<'PY' | tee "$OUT/summary.md"
import json, sys, os
out = sys.argv[1]
def load(n):
    p = os.path.join(out, n)
    return json.load(open(p)) if os.path.exists(p) else None
print("| draft | α answers | α target cont. | 1−TV cont. | τ(γ=4) cont. |")
print("|---|---|---|---|---|")
summary = {"eval": {}, "bench": {}}
for name in ["stock", "pruned-init", "fkl", "adaspec"]:
    e = load(f"eval-{name}.json")
    if not e:
        continue
    a, c = e["dataset"], e["target_continuations"]
    tau = {r["gamma"]: r["measured"] for r in c["tau"]}
    summary["eval"][name] = {"alpha_answers": a["alpha"], "alpha_continuations": c["alpha"],
                             "expected_acceptance_continuations": c["expected_acceptance"], "tau4": tau.get(4)}
    print(f"| {name} | {a['alpha']:.3f} | {c['alpha']:.3f} | {c['expected_acceptance']:.3f} | {tau.get(4, float('nan')):.2f} |")
print()
print("| draft | strategy | tok/s | vs target alone | acceptance | tokens/pass | identical |")
print("|---|---|---|---|---|---|---|")
for name in ["stock", "fkl", "adaspec"]:
    b = load(f"bench-{name}.json")
    if not b:
        continue
    summary["bench"][name] = b["summaries"]
    for r in b["summaries"]:
        print(f"| {name} | {r['strategy']} | {r['median_tokens_per_second']:.2f} | {r['median_speedup']:.2f}x | "
              f"{r['mean_acceptance']:.2f} | {r['mean_tokens_per_pass']:.2f} | {r['identical']}/{r['prompts']} |")
json.dump(summary, open(os.path.join(out, "summary.json"), "w"), indent=1)
PY
log "done: $OUT"
