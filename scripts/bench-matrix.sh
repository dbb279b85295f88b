#!/usr/bin/env bash
# The CPU benchmark matrix of the README ("Where speculation pays on a CPU"): target formats
# (the given Q4_K_M and Q8_0/F16 copies made once with llama.cpp's quantizer) × data sets,
# ours (auto and fixed strategies) against target alone and llama.cpp's own speculative
# decoding (draft-simple, ngram-mod) in the same run.
#
# Usage: scripts/bench-matrix.sh [N_PROMPTS=2]
#   env: THREADS=2 MAX_TOKENS=64 FORMATS=f16,q8_0,q4_k_m DATASETS=humaneval,gsm8k,mt_bench,humaneval_edit
#        STRATEGIES=auto/chain:2/chain:3/lookup=chain:8/lookup=chain:32 PEER=draft-simple:3,ngram-mod
#        OUT=bench-matrix.json MODE=fast REPEAT=1 (runs per configuration and prompt; fastest counts)
#   The defaults are the README's run (about 35 minutes on 2 vCPUs).
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
N="${1:-${N_PROMPTS:-2}}"
cargo build --release --bin adaspec
"$ROOT/scripts/build-llama-tools.sh"
exec "$ROOT/target/release/adaspec" bench --matrix \
    --threads "${THREADS:-2}" --n-prompts "$N" --max-tokens "${MAX_TOKENS:-64}" \
    --formats "${FORMATS:-f16,q8_0,q4_k_m}" --datasets "${DATASETS:-humaneval,gsm8k,mt_bench,humaneval_edit}" \
    --strategies "${STRATEGIES:-auto/chain:2/chain:3/lookup=chain:8/lookup=chain:32}" \
    --mode "${MODE:-fast}" --repeat "${REPEAT:-1}" \
    --peer "$ROOT/target/llama-tools/bin/llama-spec-bench" --peer-variants "${PEER:-draft-simple:3,ngram-mod}" \
    --out "${OUT:-bench-matrix.json}"
