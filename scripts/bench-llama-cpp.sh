#!/usr/bin/env bash
# How does llama.cpp's OWN speculative decoding do on this machine, with our models, prompts
# and CPU flags? Companion to `./target/release/adaspec bench`.
#
# Usage: scripts/bench-llama-cpp.sh [N_PROMPTS=10]
#   env: THREADS=2 N_GEN=128 DMAX=2,3,4,8 PMIN=default,0.75 PMIN_DMAX=4 (draft sizes tried with
#        the non-default p_min) OUT=llama-cpp-bench.json
#        EXTRA_ARGS="--no-repack" (llama.cpp flags added to every run; --no-repack = no weight
#        repacking, like our --mode exact; llama.cpp's default repacks, like --mode fast)
#        MODELS=~/.cache/adaspec/models DATA=data/humaneval/dev.jsonl (the repository's copy;
#        any JSONL file with a "prompt" field)
#
# WHAT RUNS (see scripts/build-llama-tools.sh for why):
#   The vendored llama.cpp (llama-cpp-sys-2 0.1.161) has no example sources, so
#   llama-speculative-simple / llama-speculative / llama-simple cannot be built offline.
#   scripts/build-llama-tools.sh builds target/llama-tools/bin/llama-spec-bench instead:
#   llama-speculative-simple's loop over llama.cpp's own common/speculative.cpp
#   (--spec-type draft-simple: greedy chain drafting by the draft model, stopping early when
#   the draft's top-1 probability < --spec-draft-p-min; llama.cpp's default p_min is 0.0 in
#   this version, i.e. always draft n_max) and common_sampler_sample_and_accept_n
#   (greedy verify of [last, d0..dn-1] in one target batch), linked against the very same
#   llama.cpp static libraries cargo built for our engine (GGML_NATIVE=ON, GGML_LLAMAFILE=ON,
#   OpenMP, Release). Without -md the same loop runs with an empty draft = plain target decoding
#   (one token per llama_decode, like llama-simple). The tree/multi-sequence llama-speculative
#   (p_split, -np) exists only in the stripped examples/speculative/speculative.cpp: not run.
#
# WHAT THE NUMBERS MEAN:
#   tok/s = generated tokens / generation time. Generation time starts after the prompt has
#   been evaluated on the target AND on the draft (t_dec in llama-speculative-simple, which
#   prints "decoded N tokens in T seconds, speed: X t/s"), and ends when 128 tokens (or EOS)
#   are produced. It excludes model loading and prompt processing; prompt time is recorded
#   separately (t_prompt_s, and tok_s_incl_prompt in the JSON). Upstream llama-simple's
#   "decoded ... speed" likewise covers the generation loop only (its loop also decodes the
#   prompt, ours does not), so comparing against adaspec bench's tok/s (generation-only)
#   is like for like. Acceptance = accepted draft tokens / drafted tokens, counting only
#   passes that had a draft (llama-speculative-simple's "accept" line). tok/pass = tokens
#   emitted per target pass. "identical" = greedy output equals the target-alone output.
#   Settings: 2 threads for prompt and generation on target and draft, greedy (--temp 0),
#   -c 4096, flash attention off (our engine's defaults), ChatML prompt exactly as llama.cpp's
#   chatml template renders one user turn. Configs are interleaved per prompt with a rotating
#   order. Timings on a shared 2-core machine are noisy: compare ratios taken in the same run.
set -euo pipefail
ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"

N_PROMPTS="${1:-${N_PROMPTS:-10}}"
MODELS="${MODELS:-$HOME/.cache/adaspec/models}"
DATA="${DATA:-$ROOT/data/humaneval/dev.jsonl}"
TARGET="${TARGET:-$MODELS/qwen2.5-coder-1.5b-instruct-q4_k_m.gguf}"
DRAFT="${DRAFT:-$MODELS/qwen2.5-coder-0.5b-instruct-awq-q4_k_m.gguf}"
for f in "$TARGET" "$DRAFT" "$DATA"; do
    [ -f "$f" ] || { echo "error: missing $f (models: scripts/fetch-models.sh)" >&2; exit 1; }
done

"$ROOT/scripts/build-llama-tools.sh"

exec python3 "$ROOT/scripts/bench_llama_cpp.py" \
    --bin "$ROOT/target/llama-tools/bin/llama-spec-bench" \
    --target "$TARGET" --draft "$DRAFT" --data "$DATA" \
    --prompts "$N_PROMPTS" --n-gen "${N_GEN:-128}" --threads "${THREADS:-2}" \
    --dmax "${DMAX:-2,3,4,8}" --pmin "${PMIN:-default,0.75}" --pmin-dmax "${PMIN_DMAX:-4}" \
    --extra-args="${EXTRA_ARGS:-}" \
    --out "${OUT:-llama-cpp-bench.json}" --workdir "$ROOT/target/llama-tools/prompts"
