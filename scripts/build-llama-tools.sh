#!/usr/bin/env bash
# Build llama.cpp's own speculative-decoding baseline for scripts/bench-llama-cpp.sh.
#
# Usage: scripts/build-llama-tools.sh            (idempotent: skips what is already built)
#        LLAMA_TOOLS_LIBS=cmake scripts/build-llama-tools.sh   (force a fresh cmake build of the libs)
#        LLAMA_TOOLS_FORCE=1 scripts/build-llama-tools.sh      (rebuild the driver)
#
# WHY NOT llama-speculative-simple / llama-speculative / llama-simple?
#   The llama.cpp tree vendored by llama-cpp-sys-2 0.1.161 ships examples/*/ and tools/*/
#   with README.md files ONLY: the .cpp sources of llama-speculative-simple,
#   llama-speculative, llama-simple, llama-cli, llama-server, ... are stripped from the crate.
#   They cannot be built without downloading llama.cpp, which this project does not do.
#   What IS vendored is llama.cpp's `common` library, which holds llama.cpp's actual
#   speculative-decoding implementation (common/speculative.cpp: draft-model drafting with
#   p_min / n_max, the same code llama-speculative-simple and llama-server call) and its
#   verification (common/sampling.cpp: common_sampler_sample_and_accept_n).
#   So this script builds ONE small program, target/llama-tools/bin/llama-spec-bench, whose
#   main loop is llama-speculative-simple's loop (upstream examples/speculative-simple at the
#   API of this llama.cpp version: prompt on target+draft, then repeat draft ->
#   target batch [id_last, d0..dn-1] -> common_speculative_process -> sample_and_accept_n ->
#   seq_rm), written here against the vendored headers. Without -md it runs the same loop with
#   an empty draft, i.e. plain one-token-per-pass target decoding (what llama-simple does).
#   Arguments are parsed by llama.cpp's own common_params_parse (LLAMA_EXAMPLE_SPECULATIVE), so
#   the flags are llama-speculative-simple's: -m -md --spec-type draft-simple
#   --spec-draft-n-max N --spec-draft-p-min P -t -td -n -c -f --temp ...
#   `--spec-type draft-eagle3 -md HEAD.gguf` runs llama.cpp's own EAGLE-3 drafting (targets whose
#   architecture registers llama.cpp's layer-input hooks, e.g. llama; not qwen2). The result
#   line lists every round's draft (`drafts=`: tokens by ',', rounds by ';'), which
#   tests/heads.rs compares with adaspec's head chains.
#   The tree/multi-sequence example (llama-speculative, -np/p_split) lives only in the stripped
#   examples/speculative/speculative.cpp, so it is NOT reproduced.
#   If a future crate ships examples/speculative-simple/speculative-simple.cpp, this script
#   builds the real llama-speculative-simple / llama-speculative / llama-simple instead
#   (untested path: the current crate has no such sources).
#
# LIBRARIES / CPU FLAGS
#   Default (LLAMA_TOOLS_LIBS=auto): link against the static libs cargo already built for our
#   engine (target/release/build/llama-cpp-sys-2-*/out, the newest one whose CMakeCache says
#   GGML_NATIVE=ON, GGML_LLAMAFILE=ON, GGML_OPENMP=ON, Release, static). That is the very same
#   llama.cpp object code our engine runs, so CPU flags are identical by construction.
#   Otherwise (none found, or LLAMA_TOOLS_LIBS=cmake): cmake-build llama + llama-common from the
#   vendored source (found with `cargo metadata`) into target/llama-tools/build with
#   -DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON -DGGML_OPENMP=ON -DLLAMA_CURL=OFF
#   -DBUILD_SHARED_LIBS=OFF -DCMAKE_BUILD_TYPE=Release, `--target llama-common -j2`
#   (~30+ min on 2 cores).
set -euo pipefail

ROOT="$(cd "$(dirname "$0")/.." && pwd)"
cd "$ROOT"
OUT="$ROOT/target/llama-tools"
BIN="$OUT/bin"
mkdir -p "$OUT/src" "$BIN"
JOBS="${JOBS:-2}"

LLAMA_SYS_DIR="$(cargo metadata --format-version 1 2>/dev/null | python3 -c '
import json, os, sys
m = json.load(sys.stdin)
p = [p for p in m["packages"] if p["name"] == "llama-cpp-sys-2"]
print(os.path.dirname(p[0]["manifest_path"]) if p else "")
')"
SRC="$LLAMA_SYS_DIR/llama.cpp"
[ -f "$SRC/CMakeLists.txt" ] || { echo "error: vendored llama.cpp not found (cargo metadata gave '$LLAMA_SYS_DIR'); run 'cargo fetch' first" >&2; exit 1; }
echo "llama.cpp source: $SRC"

CMAKE_FLAGS=(-DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DGGML_LLAMAFILE=ON -DGGML_OPENMP=ON
             -DLLAMA_CURL=OFF -DLLAMA_OPENSSL=OFF -DBUILD_SHARED_LIBS=OFF -DLLAMA_BUILD_COMMON=ON
             -DLLAMA_BUILD_TESTS=OFF -DLLAMA_BUILD_SERVER=OFF -DLLAMA_BUILD_APP=OFF)

# ---------------------------------------------------------------- real examples, if ever vendored
if [ -f "$SRC/examples/speculative-simple/speculative-simple.cpp" ]; then
    if [ -x "$OUT/build/bin/llama-speculative-simple" ] && [ -z "${LLAMA_TOOLS_FORCE:-}" ]; then
        echo "llama.cpp examples already built in $OUT/build/bin"; exit 0
    fi
    cmake -S "$SRC" -B "$OUT/build" "${CMAKE_FLAGS[@]}" -DLLAMA_BUILD_EXAMPLES=ON -DLLAMA_BUILD_TOOLS=OFF
    cmake --build "$OUT/build" --config Release -j"$JOBS" \
        --target llama-speculative-simple llama-speculative llama-simple
    ln -sf "$OUT/build/bin/"llama-* "$BIN/"
    exit 0
fi
echo "note: $SRC/examples/* hold only README.md (sources stripped from the crate);"
echo "      building llama-spec-bench from llama.cpp's vendored common/speculative.cpp instead."

# ---------------------------------------------------------------- libraries
find_cargo_libs() {
    local best="" best_t=0 d c t
    for d in "$ROOT"/target/release/build/llama-cpp-sys-2-*/out; do
        c="$d/build/CMakeCache.txt"
        [ -f "$d/lib/libllama.a" ] && [ -f "$d/lib/libllama-common.a" ] && [ -f "$c" ] || continue
        grep -q '^GGML_NATIVE:BOOL=ON' "$c" && grep -q '^GGML_LLAMAFILE:BOOL=ON' "$c" &&
            grep -q '^GGML_OPENMP:BOOL=ON' "$c" && grep -q '^CMAKE_BUILD_TYPE:STRING=Release' "$c" &&
            grep -q '^BUILD_SHARED_LIBS:BOOL=OFF' "$c" || continue
        # must be built from this very source tree
        grep -q "$SRC" "$c" || continue
        t=$(stat -c %Y "$d/lib/libllama.a")
        if [ "$t" -gt "$best_t" ]; then best="$d/build"; best_t=$t; fi
    done
    echo "$best"
}

LIBS_MODE="${LLAMA_TOOLS_LIBS:-auto}"
LIBDIR=""
if [ "$LIBS_MODE" = auto ]; then
    LIBDIR="$(find_cargo_libs)"
    [ -n "$LIBDIR" ] && echo "reusing cargo's llama.cpp build (same objects as our engine): $LIBDIR"
fi
if [ -z "$LIBDIR" ]; then
    LIBDIR="$OUT/build"
    if [ ! -f "$LIBDIR/common/libllama-common.a" ] || [ ! -f "$LIBDIR/src/libllama.a" ]; then
        echo "cmake-building llama + llama-common into $LIBDIR (-j$JOBS) ..."
        cmake -S "$SRC" -B "$LIBDIR" "${CMAKE_FLAGS[@]}" -DLLAMA_BUILD_EXAMPLES=OFF -DLLAMA_BUILD_TOOLS=OFF
        cmake --build "$LIBDIR" --config Release -j"$JOBS" --target llama-common
    fi
fi
grep -E '^(GGML_NATIVE|GGML_LLAMAFILE|GGML_OPENMP|CMAKE_BUILD_TYPE|BUILD_SHARED_LIBS):' "$LIBDIR/CMakeCache.txt" | sed 's/^/  /'

# ---------------------------------------------------------------- driver
DRIVER_SRC="$OUT/src/llama-spec-bench.cpp"
cat > "$DRIVER_SRC.new" <<'CPP'
// llama-spec-bench: llama-speculative-simple's decoding loop (greedy draft-model speculation
// from llama.cpp's common/speculative.cpp, verification by common_sampler_sample_and_accept_n).
// Generated by scripts/build-llama-tools.sh; see the header there.
#include "arg.h"
#include "common.h"
#include "llama.h"
#include "log.h"
#include "sampling.h"
#include "speculative.h"

#include <algorithm>
#include <clocale>
#include <cstdio>
#include <string>
#include <vector>

static int fail(const char * msg) { fprintf(stderr, "llama-spec-bench: error: %s\n", msg); return 1; }

int main(int argc, char ** argv) {
    std::setlocale(LC_NUMERIC, "C");
    common_params params;
    common_init();
    if (!common_params_parse(argc, argv, params, LLAMA_EXAMPLE_SPECULATIVE)) return 1;
    if (params.n_predict <= 0) return fail("-n must be > 0");

    // a draft model (draft-simple), or a drafter that needs none (ngram-mod, ngram-*)
    const bool use_dft  = params.speculative.has_dft();
    const bool use_spec = use_dft || std::any_of(params.speculative.types.begin(), params.speculative.types.end(),
                                                 [](auto t) { return t != COMMON_SPECULATIVE_TYPE_NONE; });
    if (use_spec) {
        const auto lim = common_speculative_get_output_limits(
            params.n_batch, params.n_parallel, common_speculative_n_max(&params.speculative));
        params.n_outputs_max         = lim.total;
        params.n_outputs_max_per_seq = lim.per_seq;
    }

    llama_backend_init();
    llama_numa_init(params.numa);

    auto init_tgt = common_init_from_params(params);
    llama_model   * model_tgt = init_tgt->model();
    llama_context * ctx_tgt   = init_tgt->context();
    if (!model_tgt || !ctx_tgt) return fail("failed to load the target model");
    const llama_vocab * vocab = llama_model_get_vocab(model_tgt);

    common_speculative_init_result_ptr spec_init;
    llama_context * ctx_dft = nullptr;
    if (use_dft) {
        common_params params_dft = common_base_params_to_speculative(params);
        spec_init = common_speculative_init_from_params(params_dft, model_tgt, ctx_tgt);
        params.speculative.draft.ctx_tgt = ctx_tgt;
        params.speculative.draft.ctx_dft = spec_init->context();
        ctx_dft = params.speculative.draft.ctx_dft;
    }
    // llama-speculative-simple falls back to state checkpoints for recurrent models; this
    // driver only supports KV-cache models that can drop a tail (Qwen2.5 can).
    if (common_context_can_seq_rm(ctx_tgt) != COMMON_CONTEXT_SEQ_RM_TYPE_PART ||
        (ctx_dft && common_context_can_seq_rm(ctx_dft) != COMMON_CONTEXT_SEQ_RM_TYPE_PART)) {
        return fail("context cannot remove partial sequences (recurrent model?) - unsupported");
    }

    const llama_tokens inp = common_tokenize(ctx_tgt, params.prompt, true, true);
    if (inp.empty() || llama_n_batch(ctx_tgt) < (uint32_t) inp.size() ||
        llama_n_ctx(ctx_tgt) < (uint32_t) (inp.size() + params.n_predict + 8)) {
        return fail("prompt empty or larger than n_batch / n_ctx");
    }
    const llama_seq_id seq = 0;

    // ---- prompt: target (no logits) and draft, all but the last token
    const int64_t t_enc0 = ggml_time_us();
    common_sampler_ptr smpl(common_sampler_init(model_tgt, params.sampling));
    common_speculative * spec = nullptr;
    if (use_spec) {
        spec = common_speculative_init(params.speculative, 1);
        if (!spec) return fail("failed to initialize speculative decoding");
    }
    {
        common_batch bp(ctx_tgt);
        for (size_t i = 0; i + 1 < inp.size(); ++i) bp.add(inp[i], (llama_pos) i, seq, false);
        if (bp.size() > 0 && llama_process(ctx_tgt, LLAMA_PROCESS_TYPE_DECODE, bp.get()) != 0) return fail("prompt decode");
        if (spec && !common_speculative_process(spec, bp)) return fail("draft prompt");
    }
    llama_token  id_last = inp.back();
    llama_tokens prompt_tgt(inp.begin(), inp.end() - 1);
    int n_past = (int) inp.size() - 1;
    if (spec) common_speculative_begin(spec, seq, prompt_tgt);
    const int64_t t_enc1 = ggml_time_us();

    // ---- generation
    common_batch bt(ctx_tgt);
    llama_tokens draft, out;
    std::string drafts; // every round's draft: tokens by ',', rounds by ';'
    int n_predict = 0, n_drafted = 0, n_accept = 0, n_passes = 0;
    const int64_t t_dec0 = ggml_time_us();
    while (true) {
        draft.clear();
        // cap the draft so that one pass never produces more than the remaining budget
        const int n_draft_max = std::max(0, std::min((int) llama_n_ctx(ctx_tgt) - n_past - 2,
                                                     params.n_predict - n_predict - 1));
        if (spec && n_draft_max > 0) {
            auto & dp = common_speculative_get_draft_params(spec, seq);
            dp.drafting = true;
            dp.n_max    = n_draft_max;
            dp.pos0     = n_past;
            dp.id_last  = id_last;
            dp.prompt   = &prompt_tgt;
            dp.result   = &draft;
            common_speculative_draft(spec);
            // the draft context keeps only what the target has accepted
            llama_memory_seq_rm(llama_get_memory(ctx_dft), seq, n_past, -1);
        }
        if (n_passes > 0) drafts += ';';
        for (size_t i = 0; i < draft.size(); ++i) drafts += (i ? "," : "") + std::to_string(draft[i]);

        bt.clear();
        bt.add(id_last, n_past, seq, true);
        for (size_t i = 0; i < draft.size(); ++i) bt.add(draft[i], n_past + 1 + (llama_pos) i, seq, true);
        if (llama_process(ctx_tgt, LLAMA_PROCESS_TYPE_DECODE, bt.get()) != 0) return fail("target decode");
        if (spec && !common_speculative_process(spec, bt)) return fail("draft process");
        ++n_passes;

        const llama_tokens ids = common_sampler_sample_and_accept_n(smpl.get(), ctx_tgt, draft);
        if (spec) common_speculative_accept(spec, seq, (uint16_t) (ids.size() - 1));

        n_past    += (int) ids.size();
        n_drafted += (int) draft.size();
        n_accept  += (int) ids.size() - 1;
        n_predict += (int) ids.size();

        bool eos = false;
        for (llama_token id : ids) {
            prompt_tgt.push_back(id_last);
            id_last = id;
            out.push_back(id);
            if (llama_vocab_is_eog(vocab, id)) { eos = true; break; }
        }
        llama_memory_seq_rm(llama_get_memory(ctx_tgt), seq, n_past, -1);
        if (ctx_dft) llama_memory_seq_rm(llama_get_memory(ctx_dft), seq, n_past, -1);
        if (eos || n_predict >= params.n_predict) break;
    }
    const int64_t t_dec1 = ggml_time_us();

    const double t_enc = (t_enc1 - t_enc0) / 1e6, t_dec = (t_dec1 - t_dec0) / 1e6;
    std::string text, toks;
    for (llama_token id : out) {
        text += common_token_to_piece(ctx_tgt, id);
        toks += (toks.empty() ? "" : ",") + std::to_string(id);
    }
    fprintf(stderr, "\n%s\n\n", text.c_str());
    fprintf(stderr, "encoded %4d tokens in %8.3f seconds, speed: %8.3f t/s\n", (int) inp.size(), t_enc, inp.size() / t_enc);
    fprintf(stderr, "decoded %4d tokens in %8.3f seconds, speed: %8.3f t/s\n", n_predict, t_dec, n_predict / t_dec);
    fprintf(stderr, "n_draft   = %d\nn_drafted = %d\nn_accept  = %d\naccept    = %.3f%%\n",
            use_spec ? params.speculative.draft.n_max : 0, n_drafted, n_accept,
            n_drafted ? 100.0 * n_accept / n_drafted : 0.0);
    if (spec) common_speculative_print_stats(spec);
    common_perf_print(ctx_tgt, smpl.get());
    fflush(stderr);
    // one machine-readable line on stdout
    printf("LLAMA_SPEC_BENCH mode=%s n_draft_max=%d p_min=%.3f n_prompt=%d t_prompt_s=%.6f n_gen=%d t_gen_s=%.6f "
           "n_drafted=%d n_accept=%d n_passes=%d drafts=%s tokens=%s\n",
           use_spec ? "spec" : "target", use_spec ? params.speculative.draft.n_max : 0,
           use_spec ? params.speculative.draft.p_min : 0.0f, (int) inp.size(), t_enc, n_predict, t_dec,
           n_drafted, n_accept, n_passes, drafts.c_str(), toks.c_str());
    fflush(stdout);

    if (spec) common_speculative_free(spec);
    llama_backend_free();
    return 0;
}
CPP
if [ -f "$DRIVER_SRC" ] && cmp -s "$DRIVER_SRC" "$DRIVER_SRC.new"; then rm "$DRIVER_SRC.new"; else mv "$DRIVER_SRC.new" "$DRIVER_SRC"; fi

EXE="$BIN/llama-spec-bench"
STAMP="$OUT/llama-spec-bench.libdir"
if [ -x "$EXE" ] && [ -z "${LLAMA_TOOLS_FORCE:-}" ] && [ "$EXE" -nt "$DRIVER_SRC" ] &&
   [ "$(cat "$STAMP" 2>/dev/null)" = "$LIBDIR" ] && [ "$EXE" -nt "$LIBDIR/src/libllama.a" ]; then
    echo "up to date: $EXE"; exit 0
fi

# all static libs of the build (llama-common, llama-common-base, llama, ggml*, vendored helpers)
mapfile -t ALIBS < <(find "$LIBDIR" -name '*.a' -not -path '*/CMakeFiles/*' | sort)
EXTRA=()
grep -q '^LLAMA_OPENSSL:BOOL=ON' "$LIBDIR/CMakeCache.txt" && grep -q 'OPENSSL_SSL_LIBRARY:FILEPATH=/' "$LIBDIR/CMakeCache.txt" && EXTRA+=(-lssl -lcrypto)
echo "compiling $EXE"
c++ -std=c++17 -O2 -DNDEBUG \
    -I"$SRC/include" -I"$SRC/common" -I"$SRC/ggml/include" -I"$SRC/vendor" -I"$LIBDIR/common" \
    "$DRIVER_SRC" -o "$EXE" \
    -Wl,--start-group "${ALIBS[@]}" -Wl,--end-group \
    -fopenmp -lpthread -ldl -lm "${EXTRA[@]}"
echo "$LIBDIR" > "$STAMP"
echo "built: $EXE"
