/*
 * adaspec.h - C ABI of libadaspec: lossless speculative generation on GGUF models
 * (llama.cpp), with a small draft model proposing chains or trees that the target verifies.
 * C99 and C++ compatible. Link with -ladaspec (see `pkg-config --cflags --libs adaspec`) or
 * dlopen("libadaspec.so") and resolve the functions with dlsym.
 *
 * CONVENTIONS
 * - Names are adaspec_<object>_<verb>. Handles (adaspec_model, adaspec_session) are opaque.
 * - Every fallible function returns adaspec_status (stable numbers, never reused; later
 *   versions may add statuses, so treat an unknown one as a failure) and writes
 *   its out-parameters only on ADASPEC_STATUS_OK. The one exception is the size out-param of
 *   buffer functions, which is also written on ADASPEC_STATUS_BUFFER_TOO_SMALL: call once with
 *   an empty buffer (NULL, 0) to learn the needed size.
 * - On failure, adaspec_last_error() (or adaspec_last_error_copy()) gives a thread-local
 *   message naming the function, the argument and the expected value. Every fallible call
 *   clears it first. adaspec_status_name() names a status.
 * - Parameter structs are filled by *_default_params() and passed by pointer; their first
 *   field struct_size lets the ABI grow at the end of each struct. A struct from an older
 *   header (down to ABI version 1's size) gets defaults for the fields it lacks; one from a
 *   newer header is accepted while the fields this library does not know are zero (else
 *   ADASPEC_STATUS_STRUCT_SIZE); adaspec_stats is written up to the smaller of both sizes.
 *   NULL params mean defaults. Enum-valued fields are int32_t; out-of-range values give
 *   ADASPEC_STATUS_INVALID_PARAM. bool fields and arguments treat any non-zero byte as true.
 * - No Rust panic or abort crosses into the host: an internal panic is caught and returned as
 *   ADASPEC_STATUS_PANIC. NULL pointers give ADASPEC_STATUS_NULL_ARGUMENT; a handle that is not
 *   live (freed, never made by this library, or of the other type) gives
 *   ADASPEC_STATUS_INVALID_HANDLE. Inputs llama.cpp would abort the process on are refused
 *   before it sees them: token ids outside the vocabulary, sizes past its limits, and model
 *   files, which are checked first (header, tokenizer, hyperparameters, tensor types and
 *   alignment; see ffi/tests/fuzz_gguf.rs for the mutation run that keeps this honest) and
 *   refused with ADASPEC_STATUS_MODEL_FILE.
 *
 * OWNERSHIP
 * - adaspec_model_load / adaspec_session_new create handles; adaspec_model_free /
 *   adaspec_session_free release them and accept NULL. A session keeps its models alive: a
 *   model may be freed while sessions still use it. One model can serve many sessions.
 * - Handles are numbers the library looks up, never pointers it dereferences: every call
 *   holds its own reference to the object while it runs, so a free racing another call on
 *   the same handle cannot free memory that call uses, and a handle used after its free (or
 *   freed twice) is refused with ADASPEC_STATUS_INVALID_HANDLE (free only sets the last
 *   error). Handle numbers are not reused within a process.
 * - Strings and arrays passed in are only read during the call. Pointers passed to a
 *   callback are valid only during that callback. Strings returned as const char * are static
 *   (adaspec_version, adaspec_status_name) or thread-local (adaspec_last_error).
 *
 * THREADING
 * - Models are read-only after loading and may be used from any number of threads at once.
 * - A session is used by one call at a time. A second concurrent call on the same session
 *   returns ADASPEC_STATUS_BUSY without touching it; so does a call on the generating session
 *   from inside its own streaming callback (generate, reset, history, ...).
 * - adaspec_session_free may be called at any time, from any thread or from the session's own
 *   callback: the handle is dead once it returns; a generation still running stops at its
 *   next commit without calling its callback again (stop reason callback), and the session's
 *   memory goes when that call returns.
 * - Callbacks run on the thread that called generate. They must not throw C++ exceptions or
 *   longjmp out.
 *
 * LOSSLESSNESS
 * - ADASPEC_NUMERIC_MODE_EXACT (target loaded with repack = false): greedy output is
 *   bit-identical to decoding with the target alone in the same mode. The session's target
 *   context runs ggml's reference CPU kernels (batch-invariant; no tinyBLAS, tiled matmuls or
 *   fused ops), and verification runs chains of at most the batch size a start-up self-check
 *   finds bit-identical.
 * - ADASPEC_NUMERIC_MODE_FAST (default): the fastest CPU kernels per batch size (measured at
 *   start-up). Greedy output is the target's own choice at every token as llama.cpp computes
 *   it for the verification batch; where batched and one-token logits round differently at a
 *   near-tie, the text can depart from target-alone decoding.
 * - Sampling (temperature > 0), every strategy and draft (model, head, lookups, both): the
 *   output has exactly the target's (warped) distribution; no draft token is kept or dropped
 *   after it was drawn.
 *
 * PROCESS STATE
 * - Logging: llama.cpp's log lines reach the host only through adaspec_set_log_callback; by
 *   default nothing is printed, and nothing is written to stdout or stderr.
 * - No signal handlers are installed and the environment is left as it was (ggml's CPU
 *   backend sets KMP_BLOCKTIME when it starts; libadaspec removes it again).
 * - Threads: a session computes on n_threads threads, the caller's and n_threads - 1 workers
 *   of ggml's CPU backend. Those are OpenMP (libgomp) threads, which libgomp keeps idle for
 *   reuse after the call (and shares with the host's own OpenMP use); OMP_WAIT_POLICY=passive
 *   stops their short spin after each call. No other threads are started.
 * - libadaspec.so carries its own llama.cpp and exports only adaspec_* symbols, so a host may
 *   use its own llama.cpp (shared or static) in the same process; neither interposes the
 *   other. libadaspec.a bundles llama.cpp too: a host that links its own llama.cpp
 *   statically should link the shared libadaspec.so.
 *
 * EXAMPLE
 *
 *     #include <stdio.h>
 *     #include "adaspec.h"
 *
 *     static bool on_piece(const int32_t *toks, size_t n, const char *piece, size_t len,
 *                          void *user_data) {
 *         (void)toks; (void)n; (void)user_data;
 *         fwrite(piece, 1, len, stdout);
 *         return true;                         // false stops generation
 *     }
 *
 *     int main(void) {
 *         adaspec_model *target = NULL, *draft = NULL;
 *         adaspec_session *session = NULL;
 *         adaspec_model_params mp = adaspec_model_default_params();
 *         adaspec_session_params sp = adaspec_session_default_params();   // strategy: auto
 *         adaspec_generate_params gp = adaspec_generate_default_params(); // greedy
 *         adaspec_stats stats = adaspec_stats_default();
 *         adaspec_chat_message msg = { "user", "Write a haiku about trees." };
 *         gp.max_tokens = 64;
 *         if (adaspec_model_load("target.gguf", &mp, &target) == ADASPEC_STATUS_OK &&
 *             adaspec_model_load("draft.gguf", &mp, &draft) == ADASPEC_STATUS_OK &&
 *             adaspec_session_new(target, draft, &sp, &session) == ADASPEC_STATUS_OK &&
 *             adaspec_session_chat(session, &msg, 1, &gp, on_piece, NULL, &stats)
 *                 == ADASPEC_STATUS_OK)
 *             fprintf(stderr, "\n%.1f tok/s, %.2f tokens per target pass\n",
 *                     stats.tokens_per_second, stats.tokens_per_pass);
 *         else
 *             fprintf(stderr, "error: %s\n", adaspec_last_error());
 *         adaspec_session_free(session);   // all frees accept NULL
 *         adaspec_model_free(draft);
 *         adaspec_model_free(target);
 *         return 0;
 *     }
 */

#ifndef ADASPEC_H
#define ADASPEC_H

/* Generated by cbindgen from ffi/src (ffi/cbindgen.toml). Do not edit by hand. */

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

/* Version of the library this header belongs to; compare with adaspec_version(). */
#define ADASPEC_VERSION "0.1.0"

// ABI version: bumped whenever a struct layout or function signature changes incompatibly.
#define ADASPEC_ABI_VERSION 1

// `adaspec_generate_params.seed` value meaning "use the session's seed".
#define ADASPEC_SEED_FROM_SESSION 18446744073709551615ull

// Result of every fallible call. The numbers are stable and never reused.
typedef enum adaspec_status {
    // Success.
    ADASPEC_STATUS_OK = 0,
    // A required pointer argument was NULL.
    ADASPEC_STATUS_NULL_ARGUMENT = 1,
    // A parameter is out of range (negative size, unknown enum value, bad token id, ...).
    ADASPEC_STATUS_INVALID_PARAM = 2,
    // A parameter struct's `struct_size` does not match a size this library knows.
    ADASPEC_STATUS_STRUCT_SIZE = 3,
    // A string argument is not valid UTF-8.
    ADASPEC_STATUS_INVALID_UTF8 = 4,
    // The model file is missing, unreadable, not GGUF, truncated, or llama.cpp refused it.
    ADASPEC_STATUS_MODEL_FILE = 5,
    // The draft's vocabulary is not compatible with the target's.
    ADASPEC_STATUS_INCOMPATIBLE_VOCAB = 6,
    // The conversation no longer fits into the session's context.
    ADASPEC_STATUS_CONTEXT_FULL = 7,
    // The session is in use: by another thread, or generate was called from its own callback.
    ADASPEC_STATUS_BUSY = 8,
    // The output buffer is too small; the needed size was written to the size out-param.
    ADASPEC_STATUS_BUFFER_TOO_SMALL = 9,
    // llama.cpp failed (context creation, decode), or tokenizer/chat-template failure.
    ADASPEC_STATUS_BACKEND = 10,
    // A Rust panic was caught at the boundary (a bug in adaspec; the message has details).
    ADASPEC_STATUS_PANIC = 11,
    // A model or session handle is not live: freed already, never made by this library, or a
    // handle of the other type.
    ADASPEC_STATUS_INVALID_HANDLE = 12,
} adaspec_status;

// How the draft proposes tokens (`adaspec_session_params.strategy`).
typedef enum adaspec_strategy {
    // Choose plain decoding, a chain or extra branches each round from a measured cost model.
    ADASPEC_STRATEGY_AUTO = 0,
    // Plain decoding with the target alone (the draft, if any, is ignored).
    ADASPEC_STRATEGY_NONE = 1,
    // A chain of `chain_length` draft tokens per round.
    ADASPEC_STRATEGY_CHAIN = 2,
    // EAGLE-2 dynamic tree: `tree_top_k` children per node, `tree_depth` levels,
    // `tree_nodes` best nodes kept.
    ADASPEC_STRATEGY_TREE = 3,
} adaspec_strategy;

// Numeric mode of the target's verification passes (`adaspec_session_params.mode`).
typedef enum adaspec_numeric_mode {
    // Fastest llama.cpp settings; lossless in distribution, greedy text may depart from the
    // target alone where batch-dependent rounding flips a near-tie.
    ADASPEC_NUMERIC_MODE_FAST = 0,
    // Greedy output bit-identical to target-alone decoding in the same mode. Needs the target
    // loaded with `repack = false`.
    ADASPEC_NUMERIC_MODE_EXACT = 1,
} adaspec_numeric_mode;

// Why a generation ended (`adaspec_stats.stop_reason`).
typedef enum adaspec_stop_reason {
    // `max_tokens` reached.
    ADASPEC_STOP_REASON_MAX_TOKENS = 0,
    // The model produced an end-of-generation token.
    ADASPEC_STOP_REASON_EOG = 1,
    // The text reached one of the stop strings.
    ADASPEC_STOP_REASON_STOP_STRING = 2,
    // The streaming callback returned false.
    ADASPEC_STOP_REASON_CALLBACK = 3,
    // The context window filled up (the text so far is returned).
    ADASPEC_STOP_REASON_CONTEXT_FULL = 4,
} adaspec_stop_reason;

// A loaded GGUF model (target, draft or head). Opaque; created by `adaspec_model_load`,
// released by `adaspec_model_free`. Read-only after loading: one model may be used by any
// number of sessions and threads at once.
typedef struct adaspec_model adaspec_model;

// A generation session: target (+ optional draft) contexts, KV caches and conversation.
// Opaque; created by `adaspec_session_new`, released by `adaspec_session_free`. One call at
// a time uses a session (a concurrent call returns `ADASPEC_STATUS_BUSY`).
typedef struct adaspec_session adaspec_session;

// Receives one log line of the llama.cpp inside libadaspec: `level` is 1 (debug), 2 (info),
// 3 (warning) or 4 (error); `text` is NUL-terminated, without the newline, valid only during
// the call. Called on whichever thread logs; it must not call back into libadaspec.
typedef void (*adaspec_log_callback)(int32_t level, const char *text, void *user_data);

// How a model is loaded. Get defaults from `adaspec_model_default_params()`.
typedef struct adaspec_model_params {
    // `sizeof(adaspec_model_params)`.
    uint32_t struct_size;
    // CPU threads of sessions whose target is this model and whose own `n_threads` is 0
    // (0 = all cores; default 0), 0..=1024.
    int32_t n_threads;
    // Layers offloaded to a GPU (0 = CPU only, the default; -1 = all layers; needs a GPU
    // build of the library). Must be >= -1.
    int32_t n_gpu_layers;
    // Memory-map the file instead of reading it (default true).
    bool use_mmap;
    // Let llama.cpp repack weights for faster CPU matmuls (default true). Load the target
    // with false to use `ADASPEC_NUMERIC_MODE_EXACT`.
    bool repack;
} adaspec_model_params;

// Session settings. Get defaults from `adaspec_session_default_params()`.
typedef struct adaspec_session_params {
    // `sizeof(adaspec_session_params)`.
    uint32_t struct_size;
    // KV-cache size in tokens: whole conversation + one draft tree (0 = 4096, the default;
    // otherwise 16..=1048576).
    int32_t n_ctx;
    // CPU threads (0 = the target's `adaspec_model_params.n_threads`, the default), 0..=1024.
    int32_t n_threads;
    // One of `adaspec_strategy` (default `ADASPEC_STRATEGY_AUTO`).
    int32_t strategy;
    // Draft tokens per round for `ADASPEC_STRATEGY_CHAIN`, 1..=64 (default 4).
    int32_t chain_length;
    // Children per node for `ADASPEC_STRATEGY_TREE`, 1..=16 (default 4).
    int32_t tree_top_k;
    // Levels for `ADASPEC_STRATEGY_TREE`, 1..=16 (default 5).
    int32_t tree_depth;
    // Nodes kept for `ADASPEC_STRATEGY_TREE`, 1..=254 (default 16).
    int32_t tree_nodes;
    // One of `adaspec_numeric_mode` (default `ADASPEC_NUMERIC_MODE_FAST`).
    int32_t mode;
    // Default sampling seed of generations that leave their `seed` at
    // `ADASPEC_SEED_FROM_SESSION` (default 0).
    uint64_t seed;
    // Non-zero: `ADASPEC_STRATEGY_AUTO` may add n-gram lookups of the prompt and output (zero-cost
    // drafts) where they pay (default 1). Fixed strategies without a draft model always draft
    // with lookups; with `draft == NULL` and `AUTO`, lookups are the only draft.
    int32_t lookup;
} adaspec_session_params;

// One generation request. Get defaults from `adaspec_generate_default_params()`.
typedef struct adaspec_generate_params {
    // `sizeof(adaspec_generate_params)`.
    uint32_t struct_size;
    // Most tokens to generate (default 128). >= 0.
    int32_t max_tokens;
    // Sampling temperature (0 = greedy, the default). >= 0.
    float temperature;
    // Keep the k most likely tokens (0 = off, the default). >= 0.
    int32_t top_k;
    // Nucleus sampling mass in (0, 1] (1 = off, the default).
    float top_p;
    // Drop tokens below min_p times the top probability, in [0, 1] (0 = off, the default).
    float min_p;
    // Sampling seed (default `ADASPEC_SEED_FROM_SESSION`: the session's seed).
    uint64_t seed;
    // Array of `n_stop_strings` NUL-terminated UTF-8 strings; generation stops when the text
    // contains one (the stop string is not returned). May be NULL when `n_stop_strings` is 0.
    // Only read during the call.
    const char *const *stop_strings;
    // Number of entries in `stop_strings` (default 0, at most 64).
    size_t n_stop_strings;
    // Keep generating past end-of-generation tokens (fixed-length benchmarks; default false).
    bool ignore_eog;
} adaspec_generate_params;

// Counters and timings of one generation, written by the generate functions on success.
// Set `struct_size` (or start from `adaspec_stats_default()`) before passing it.
typedef struct adaspec_stats {
    // `sizeof(adaspec_stats)`.
    uint32_t struct_size;
    // One of `adaspec_stop_reason`.
    int32_t stop_reason;
    // Tokens generated.
    uint64_t n_tokens;
    // Prompt tokens processed in this call (tokens cached from earlier turns excluded).
    uint64_t n_prompt_tokens;
    // Draft-verify rounds (= target verification passes).
    uint64_t n_rounds;
    // Draft tokens sent to the target for verification.
    uint64_t n_draft_proposed;
    // Draft tokens the target accepted.
    uint64_t n_draft_accepted;
    // Largest verification batch used (root + draft tokens).
    uint64_t max_batch;
    // n_draft_accepted / n_draft_proposed (0 without speculation).
    double acceptance_rate;
    // Generated tokens per target pass.
    double tokens_per_pass;
    // Milliseconds spent on prompt processing.
    double prefill_ms;
    // Milliseconds spent drafting.
    double draft_ms;
    // Milliseconds spent in target verification passes.
    double verify_ms;
    // Milliseconds spent sampling/accepting.
    double sample_ms;
    // Milliseconds for the whole call.
    double total_ms;
    // Generated tokens per second, prompt processing excluded.
    double tokens_per_second;
} adaspec_stats;

// Streaming callback, called on the generating thread each time tokens are committed.
// `tokens`/`n_tokens`: the committed token ids (may be NULL with `n_tokens` 0 for a final
// text-only flush). `piece`/`piece_len`: the new text (NUL-terminated, `piece_len` bytes
// without the NUL; text that could still become a stop string is held back until it cannot).
// Both pointers are valid only during the call. Return true to continue, false to stop.
// The callback may call any adaspec function, but calls on the generating session return
// `ADASPEC_STATUS_BUSY`. It must not unwind (C++ exceptions, longjmp) into the library.
typedef bool (*adaspec_token_callback)(const int32_t *tokens,
                                       size_t n_tokens,
                                       const char *piece,
                                       size_t piece_len,
                                       void *user_data);

// One chat message for `adaspec_session_chat`.
typedef struct adaspec_chat_message {
    // "system", "user" or "assistant" (NUL-terminated UTF-8).
    const char *role;
    // The message text (NUL-terminated UTF-8).
    const char *content;
} adaspec_chat_message;

#ifdef __cplusplus
extern "C" {
#endif // __cplusplus

// Returns the static, NUL-terminated name of a status (e.g. "ADASPEC_STATUS_BUSY"), or
// "ADASPEC_STATUS_UNKNOWN" for a number this library does not know. Never NULL.
const char *adaspec_status_name(int32_t status);

// The message of the last failed call on this thread ("" if the last fallible call
// succeeded). Never NULL. The pointer stays valid until the next adaspec call on this thread;
// copy it (or use `adaspec_last_error_copy`) to keep it.
const char *adaspec_last_error(void);

// Copies the last error message of this thread into `buf` (NUL-terminated, truncated to
// `buf_len - 1` bytes). Returns the full message length in bytes without the NUL, so a
// return value >= `buf_len` means it was truncated. `buf` may be NULL when `buf_len` is 0.
size_t adaspec_last_error_copy(char *buf, size_t buf_len);

// Installs `callback` (with `user_data`) for the library's log lines; NULL removes it (the
// default: nothing is logged). Process-wide, for every model and session of this library.
void adaspec_set_log_callback(adaspec_log_callback callback, void *user_data);

// Loads a GGUF model. `params` may be NULL (defaults). On success writes a new handle to
// `*out_model`; release it with `adaspec_model_free`. Fails with
// `ADASPEC_STATUS_MODEL_FILE` for missing, unreadable, non-GGUF or truncated files.
enum adaspec_status adaspec_model_load(const char *path,
                                       const struct adaspec_model_params *params,
                                       struct adaspec_model **out_model);

// Releases a model handle. NULL is ignored; a handle that is not live (freed twice) sets the
// last error and is otherwise ignored. Sessions created from the model keep it alive until
// they are freed, so the order of frees does not matter, and a free racing another call that
// uses the model (another thread creating a session, tokenizing) is safe: that call keeps the
// model until it returns.
void adaspec_model_free(struct adaspec_model *model);

// Size of the model's vocabulary, or -1 when `model` is NULL or not a live handle.
int32_t adaspec_model_n_vocab(const struct adaspec_model *model);

// Context length the model was trained with, or -1 when `model` is NULL or not a live handle.
int32_t adaspec_model_n_ctx_train(const struct adaspec_model *model);

// Whether `token` ends generation (EOS, end-of-turn) for this model; false for NULL, a handle
// that is not live, or an id outside the vocabulary.
bool adaspec_model_token_is_eog(const struct adaspec_model *model, int32_t token);

// Checks, without creating a session, that `draft` can propose tokens for `target`: same
// vocabulary type, sizes within 128, same BOS/EOS, identical token texts. Returns
// `ADASPEC_STATUS_OK` or `ADASPEC_STATUS_INCOMPATIBLE_VOCAB` (the last error names the first
// difference).
enum adaspec_status adaspec_model_check_vocab(const struct adaspec_model *target,
                                              const struct adaspec_model *draft);

// `adaspec_model_params` with every field at its documented default.
struct adaspec_model_params adaspec_model_default_params(void);

// `adaspec_session_params` with every field at its documented default.
struct adaspec_session_params adaspec_session_default_params(void);

// `adaspec_generate_params` with every field at its documented default.
struct adaspec_generate_params adaspec_generate_default_params(void);

// A zeroed `adaspec_stats` with `struct_size` set, ready to pass to a generate function.
struct adaspec_stats adaspec_stats_default(void);

// Creates a session on `target`, speculating with `draft` (NULL: plain decoding with the
// target alone). `params` may be NULL (defaults). Checks vocabulary compatibility
// (`ADASPEC_STATUS_INCOMPATIBLE_VOCAB`). Both models may be shared with other sessions; the
// session keeps them alive. On success writes the handle to `*out_session`; release it with
// `adaspec_session_free`. With `ADASPEC_STRATEGY_AUTO` the call measures decode costs first
// (a fraction of a second on small models).
enum adaspec_status adaspec_session_new(const struct adaspec_model *target,
                                        const struct adaspec_model *draft,
                                        const struct adaspec_session_params *params,
                                        struct adaspec_session **out_session);

// Creates a session on `target` that drafts with a feature-level head: `head` is an `eagle3`
// GGUF (EAGLE-3 layout, e.g. made by `adaspec head init` / `adaspec head train`) loaded with
// `adaspec_model_load`, which reads the target's own hidden states. Checks that the head was
// made for this target (hidden size, layers, vocabulary: `ADASPEC_STATUS_INCOMPATIBLE_VOCAB`;
// a model that is not a head: `ADASPEC_STATUS_MODEL_FILE`). Otherwise as
// `adaspec_session_new`; `head` must not be NULL.
enum adaspec_status adaspec_session_new_with_head(const struct adaspec_model *target,
                                                  const struct adaspec_model *head,
                                                  const struct adaspec_session_params *params,
                                                  struct adaspec_session **out_session);

// Creates a session on `target` that drafts with the head GGUF at `head_path`, loaded by
// this call: an `eagle3` head (as `adaspec_session_new_with_head`) or an FSPAD-family head
// (`fspad` GGUF: FSPAD, its EAGLE-2-style baseline or an ablation, made by
// `adaspec head fspad`), told apart by the file's architecture. FSPAD-family heads run in this
// library (ggml on the CPU) and read the target's final-norm hidden states. Errors as
// `adaspec_session_new_with_head` (an unreadable or malformed file:
// `ADASPEC_STATUS_MODEL_FILE`); `head_path` must not be NULL.
enum adaspec_status adaspec_session_new_with_head_file(const struct adaspec_model *target,
                                                       const char *head_path,
                                                       const struct adaspec_session_params *params,
                                                       struct adaspec_session **out_session);

// Creates a session on `target` holding both a draft model and a head: `draft` as in
// `adaspec_session_new` (must not be NULL), the head GGUF at `head_path` as in
// `adaspec_session_new_with_head_file` (an `eagle3` or an FSPAD-family head). With
// `ADASPEC_STRATEGY_AUTO` every round drafts with whichever of the two its estimates (each
// one's measured cost and acceptance, learned online) say pays more, lookups added where they
// pay; fixed strategies draft with `draft`. Errors as those two functions.
enum adaspec_status adaspec_session_new_with_draft_and_head_file(const struct adaspec_model *target,
                                                                 const struct adaspec_model *draft,
                                                                 const char *head_path,
                                                                 const struct adaspec_session_params *params,
                                                                 struct adaspec_session **out_session);

// Releases a session (its KV caches and its references to the models). NULL is ignored; a
// handle that is not live (freed twice) sets the last error and is otherwise ignored. The
// handle is invalid once this returns. Free may race other calls on the session (another
// thread generating, or the session's own streaming callback): a generation in progress stops
// at its next commit without calling its callback again and returns normally (stop reason
// callback), and the session's memory is released when that call returns.
void adaspec_session_free(struct adaspec_session *session);

// Forgets the conversation and empties the KV caches; the session can start a new one.
// Returns `ADASPEC_STATUS_BUSY` when called from the session's own callback or while
// another thread uses it.
enum adaspec_status adaspec_session_reset(struct adaspec_session *session);

// Copies the session's committed tokens (every prompt and generated token of the
// conversation so far) to `tokens` (room for `n_tokens_max`); the count goes to
// `*n_tokens_out`, also when the buffer is too short (`ADASPEC_STATUS_BUFFER_TOO_SMALL`).
enum adaspec_status adaspec_session_history(struct adaspec_session *session,
                                            int32_t *tokens,
                                            size_t n_tokens_max,
                                            size_t *n_tokens_out);

// Copies the complete text of the session's last successful generation (what the callback
// received, concatenated) plus a NUL to `buf`; `*n_bytes_out` gets the text length without
// the NUL, also when `buf_len` is too short (`ADASPEC_STATUS_BUFFER_TOO_SMALL`).
enum adaspec_status adaspec_session_last_text(struct adaspec_session *session,
                                              char *buf,
                                              size_t buf_len,
                                              size_t *n_bytes_out);

// Appends `prompt` (NUL-terminated UTF-8; special-token texts are parsed; BOS is added at
// the start of a conversation) to the session and generates, streaming to `callback`
// (may be NULL). Multi-turn: the KV cache of earlier turns is kept, only new tokens are
// processed; an empty prompt continues the conversation. `params` may be NULL (defaults).
// `stats_out` may be NULL; its `struct_size` must be set. Returns `ADASPEC_STATUS_BUSY` when
// the session is in use (including calls from this session's own callback).
// A call that fails (any status but OK) leaves the session's history, conversation and
// caches as they were before it; the session stays usable. After a stop string the history
// ends with the tokens of the returned text (generated tokens whose text lies inside it, plus
// the re-tokenized returned part of a token that straddled the stop string). When the
// context fills up, generation ends with `ADASPEC_STOP_REASON_CONTEXT_FULL` and the text so
// far; a prompt that does not fit fails with `ADASPEC_STATUS_CONTEXT_FULL`.
enum adaspec_status adaspec_session_generate(struct adaspec_session *session,
                                             const char *prompt,
                                             const struct adaspec_generate_params *params,
                                             adaspec_token_callback callback,
                                             void *user_data,
                                             struct adaspec_stats *stats_out);

// Like `adaspec_session_generate`, with the prompt given as `n_tokens` token ids (appended
// as they are: no BOS is added). `tokens` may be NULL when `n_tokens` is 0.
enum adaspec_status adaspec_session_generate_tokens(struct adaspec_session *session,
                                                    const int32_t *tokens,
                                                    size_t n_tokens,
                                                    const struct adaspec_generate_params *params,
                                                    adaspec_token_callback callback,
                                                    void *user_data,
                                                    struct adaspec_stats *stats_out);

// Chat turn: appends `n_messages` new messages (usually one "user" message) to the session's
// conversation, formats the whole conversation with the target model's chat template, and
// generates the assistant's reply, which joins the conversation. Earlier turns stay in the
// KV cache. Fails with `ADASPEC_STATUS_BACKEND` when the model has no usable chat template.
enum adaspec_status adaspec_session_chat(struct adaspec_session *session,
                                         const struct adaspec_chat_message *messages,
                                         size_t n_messages,
                                         const struct adaspec_generate_params *params,
                                         adaspec_token_callback callback,
                                         void *user_data,
                                         struct adaspec_stats *stats_out);

// Converts UTF-8 text (`text_len` bytes, no NUL needed) to token ids.
// `add_special` adds BOS (etc.) as the model wants at the start of a sequence;
// `parse_special` turns special-token texts such as "<|im_end|>" into their ids.
// Writes the ids to `tokens` (room for `n_tokens_max`) and their count to `*n_tokens_out`;
// when `n_tokens_max` is too small, returns `ADASPEC_STATUS_BUFFER_TOO_SMALL` with the needed
// count in `*n_tokens_out`. `tokens` may be NULL when `n_tokens_max` is 0.
enum adaspec_status adaspec_tokenize(const struct adaspec_model *model,
                                     const char *text,
                                     size_t text_len,
                                     bool add_special,
                                     bool parse_special,
                                     int32_t *tokens,
                                     size_t n_tokens_max,
                                     size_t *n_tokens_out);

// Renders token ids to text bytes (UTF-8; a cut multi-byte character stays cut).
// `render_special` renders control tokens such as "<|im_end|>" as their text instead of
// nothing. Writes the text plus a terminating NUL to `buf` and the text length (without the
// NUL) to `*n_bytes_out`; `buf_len` must be at least `*n_bytes_out + 1`, otherwise returns
// `ADASPEC_STATUS_BUFFER_TOO_SMALL` with the length in `*n_bytes_out`. `buf` may be NULL
// when `buf_len` is 0. Ids outside the vocabulary give `ADASPEC_STATUS_INVALID_PARAM`.
enum adaspec_status adaspec_detokenize(const struct adaspec_model *model,
                                       const int32_t *tokens,
                                       size_t n_tokens,
                                       bool render_special,
                                       char *buf,
                                       size_t buf_len,
                                       size_t *n_bytes_out);

// The library version as a static NUL-terminated string (the `ADASPEC_VERSION` the library
// was built as, e.g. "0.1.0"). Never NULL.
const char *adaspec_version(void);

// The ABI version of the library. A host compiled against this header should check
// `adaspec_abi_version() == ADASPEC_ABI_VERSION` before calling anything else.
uint32_t adaspec_abi_version(void);

#ifdef __cplusplus
}  // extern "C"
#endif  // __cplusplus

#endif  /* ADASPEC_H */
