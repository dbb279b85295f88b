#!/usr/bin/env bash
# Trainer speed against PyTorch on the CPU: one KD optimizer step (forward + backward + AdamW) of
# the pruned Qwen2.5 0.5B draft and of an EAGLE-3 head for the 1.5B target, same shapes and the
# same algorithm in both (examples/train_speed.rs, scripts/train_step_torch.py), with the time
# per phase. Not part of CI. PyTorch comes from PyPI into bench/torch-venv (first run: a large
# download; TORCH_PY=/path/to/python uses another interpreter that has torch).
#   scripts/train-speed.sh [STEPS=6] [BATCH=4] [SEQ=256] [THREADS=2]
# Writes bench/train-speed.json and prints a table.
# On another machine (no cargo, no model): TRAIN_SPEED_BIN=path/to/prebuilt/train_speed and
# VOCAB=151936 (a tiny stand-in model with the target's vocabulary size), TORCH_PY=python3.
# Both implementations are pinned to the same THREADS cores where taskset exists.
set -euo pipefail
cd "$(dirname "$0")/.."
STEPS="${1:-6}"; BATCH="${2:-4}"; SEQ="${3:-256}"; THREADS="${4:-2}"; TOP_K="${TOP_K:-64}"
MODELS="${ADASPEC_MODELS:-$HOME/.cache/adaspec/models}"
BIN="${TRAIN_SPEED_BIN:-}"
if [ -n "${VOCAB:-}" ]; then
  T="$VOCAB"
else
  T="$MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
  scripts/setup.sh pair
fi
PIN=()
if command -v taskset > /dev/null; then PIN=(taskset -c "0-$((THREADS - 1))"); fi
mkdir -p bench
PY="${TORCH_PY:-}"
if [ -z "$PY" ]; then
  PY=bench/torch-venv/bin/python
  if ! "$PY" -c "import torch" 2>/dev/null; then
    echo "[train-speed] installing torch from PyPI into bench/torch-venv" >&2
    python3 -m venv bench/torch-venv
    bench/torch-venv/bin/pip install -q torch
  fi
fi
if [ -z "$BIN" ]; then
  cargo build --release --features train --example train_speed
  BIN=./target/release/examples/train_speed
fi
echo "[train-speed] adaspec (candle), $STEPS steps of $BATCH × $SEQ" >&2
RAYON_NUM_THREADS="$THREADS" "${PIN[@]}" "$BIN" "$T" "$STEPS" "$BATCH" "$SEQ" "$TOP_K" > bench/train-speed-candle.json
echo "[train-speed] PyTorch, same steps" >&2
"${PIN[@]}" "$PY" scripts/train_step_torch.py --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --top-k "$TOP_K" --threads "$THREADS" > bench/train-speed-torch.json
"${PIN[@]}" "$PY" scripts/train_step_torch.py --steps "$STEPS" --batch "$BATCH" --seq "$SEQ" --top-k "$TOP_K" --threads "$THREADS" --sdpa --only draft > bench/train-speed-torch-sdpa.json
python3 - <<'PY'
import json
c = json.load(open("bench/train-speed-candle.json"))
t = json.load(open("bench/train-speed-torch.json"))
ts = json.load(open("bench/train-speed-torch-sdpa.json"))
rows = []
print(f"batch {c['batch']} × {c['seq']} tokens, teacher K {c['top_k']}; medians of the steps after the first\n")
print("| model | implementation | step s | tokens/s | teacher | forward | backward | optimizer | ÷ PyTorch step |")
print("|---|---|---|---|---|---|---|---|---|")
for part in ["draft", "head"]:
    base = t[part]["step_s"]
    for name, r in [("adaspec (candle)", c), (t["impl"], t), (ts["impl"], ts)]:
        if part not in r:
            continue
        x = r[part]
        sh = lambda k: f"{x[k]:.2f} ({100 * x[k] / x['step_s']:.0f}%)"
        print(f"| {part} | {name} | {x['step_s']:.2f} | {x['tokens_per_s']:.0f} | {sh('teacher_s')} | {sh('forward_s')} | {sh('backward_s')} | {sh('optimizer_s')} | {x['step_s'] / base:.2f} |")
        rows.append({"model": part, "impl": name, **x, "ratio_to_torch": x["step_s"] / base})
json.dump({"candle": c, "torch": t, "torch_sdpa": ts, "rows": rows}, open("bench/train-speed.json", "w"), indent=1)
PY
