/*
 * host_dlopen.c - a C host that loads libadaspec at run time with dlopen, resolves every
 * function it uses with dlsym, runs one speculative generation on the two GGUF files given on
 * the command line, streams the text to stdout and prints the stats to stderr.
 *
 * Build:  cc -std=c99 -Wall -Wextra -Werror $(pkg-config --cflags adaspec) \
 *             examples/c/host_dlopen.c -ldl -o host_dlopen
 * Run:    ./host_dlopen [options] TARGET.gguf [DRAFT.gguf]
 *   --lib PATH        library to dlopen (default: $ADASPEC_LIB, else "libadaspec.so")
 *   --prompt TEXT     prompt (default "def fibonacci(n):")
 *   --chat            send the prompt as a user message through the chat template
 *   -n N              max tokens (default 64)
 *   --strategy S      auto | none | chain | tree (default auto)
 *   --draft-len N     chain length for --strategy chain (default 4)
 *   --threads N       CPU threads (default 0 = all cores)
 *   --ctx N           context size (default 0 = 4096)
 *   --ignore-eog      keep generating past end-of-generation tokens
 *   --turns N         repeat the prompt as N conversation turns (multi-turn, default 1)
 * Without DRAFT the target decodes alone. Exit status 0 on success, 1 on any error.
 */
#define _POSIX_C_SOURCE 200809L

#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adaspec.h"

/* The functions this host uses, resolved with dlsym. */
typedef struct api {
    const char *(*version)(void);
    uint32_t (*abi_version)(void);
    const char *(*last_error)(void);
    const char *(*status_name)(int32_t);
    adaspec_model_params (*model_default_params)(void);
    adaspec_session_params (*session_default_params)(void);
    adaspec_generate_params (*generate_default_params)(void);
    adaspec_stats (*stats_default)(void);
    adaspec_status (*model_load)(const char *, const adaspec_model_params *, adaspec_model **);
    void (*model_free)(adaspec_model *);
    adaspec_status (*model_check_vocab)(const adaspec_model *, const adaspec_model *);
    adaspec_status (*session_new)(const adaspec_model *, const adaspec_model *,
                                  const adaspec_session_params *, adaspec_session **);
    void (*session_free)(adaspec_session *);
    adaspec_status (*session_generate)(adaspec_session *, const char *,
                                       const adaspec_generate_params *, adaspec_token_callback,
                                       void *, adaspec_stats *);
    adaspec_status (*session_chat)(adaspec_session *, const adaspec_chat_message *, size_t,
                                   const adaspec_generate_params *, adaspec_token_callback,
                                   void *, adaspec_stats *);
} api;

/* dlsym returns void *; converting it to a function pointer goes through memcpy so that the
 * code stays ISO C (no object-to-function pointer cast). */
static int resolve(void *lib, const char *name, void *fn_slot, size_t fn_size) {
    void *sym = dlsym(lib, name);
    if (sym == NULL) {
        fprintf(stderr, "dlsym(%s): %s\n", name, dlerror());
        return 0;
    }
    memcpy(fn_slot, &sym, fn_size);
    return 1;
}

#define RESOLVE(lib, a, field, name) resolve((lib), (name), &(a)->field, sizeof((a)->field))

static int load_api(void *lib, api *a) {
    return RESOLVE(lib, a, version, "adaspec_version") &&
           RESOLVE(lib, a, abi_version, "adaspec_abi_version") &&
           RESOLVE(lib, a, last_error, "adaspec_last_error") &&
           RESOLVE(lib, a, status_name, "adaspec_status_name") &&
           RESOLVE(lib, a, model_default_params, "adaspec_model_default_params") &&
           RESOLVE(lib, a, session_default_params, "adaspec_session_default_params") &&
           RESOLVE(lib, a, generate_default_params, "adaspec_generate_default_params") &&
           RESOLVE(lib, a, stats_default, "adaspec_stats_default") &&
           RESOLVE(lib, a, model_load, "adaspec_model_load") &&
           RESOLVE(lib, a, model_free, "adaspec_model_free") &&
           RESOLVE(lib, a, model_check_vocab, "adaspec_model_check_vocab") &&
           RESOLVE(lib, a, session_new, "adaspec_session_new") &&
           RESOLVE(lib, a, session_free, "adaspec_session_free") &&
           RESOLVE(lib, a, session_generate, "adaspec_session_generate") &&
           RESOLVE(lib, a, session_chat, "adaspec_session_chat");
}

/* Streaming callback: write each committed piece to stdout as it arrives. */
static bool on_piece(const int32_t *tokens, size_t n_tokens, const char *piece, size_t piece_len,
                     void *user_data) {
    size_t *n_seen = (size_t *)user_data;
    (void)tokens;
    *n_seen += n_tokens;
    if (piece_len > 0) {
        fwrite(piece, 1, piece_len, stdout);
        fflush(stdout);
    }
    return true;
}

static void usage(const char *argv0) {
    fprintf(stderr,
            "usage: %s [--lib PATH] [--prompt TEXT] [--chat] [-n N] [--strategy auto|none|chain|tree]\n"
            "          [--draft-len N] [--threads N] [--ctx N] [--ignore-eog] [--turns N]\n"
            "          TARGET.gguf [DRAFT.gguf]\n",
            argv0);
}

static int parse_int(const char *s, int *out) {
    char *end = NULL;
    long v = strtol(s, &end, 10);
    if (end == s || *end != '\0' || v < -2147483647L || v > 2147483647L) return 0;
    *out = (int)v;
    return 1;
}

int main(int argc, char **argv) {
    const char *lib_path = getenv("ADASPEC_LIB");
    const char *prompt = "def fibonacci(n):";
    const char *target_path = NULL, *draft_path = NULL;
    const char *strategy = "auto";
    int chat = 0, max_tokens = 64, draft_len = 4, threads = 0, n_ctx = 0, ignore_eog = 0, turns = 1;
    int rc = 1, i;
    void *lib = NULL;
    api a;
    adaspec_model *target = NULL, *draft = NULL;
    adaspec_session *session = NULL;

    memset(&a, 0, sizeof a);
    if (lib_path == NULL) lib_path = "libadaspec.so";
    for (i = 1; i < argc; i++) {
        const char *arg = argv[i];
        int need_value = strcmp(arg, "--lib") == 0 || strcmp(arg, "--prompt") == 0 ||
                         strcmp(arg, "-n") == 0 || strcmp(arg, "--strategy") == 0 ||
                         strcmp(arg, "--draft-len") == 0 || strcmp(arg, "--threads") == 0 ||
                         strcmp(arg, "--ctx") == 0 || strcmp(arg, "--turns") == 0;
        if (need_value && i + 1 >= argc) {
            usage(argv[0]);
            return 1;
        }
        if (strcmp(arg, "--lib") == 0) lib_path = argv[++i];
        else if (strcmp(arg, "--prompt") == 0) prompt = argv[++i];
        else if (strcmp(arg, "--strategy") == 0) strategy = argv[++i];
        else if (strcmp(arg, "--chat") == 0) chat = 1;
        else if (strcmp(arg, "--ignore-eog") == 0) ignore_eog = 1;
        else if (strcmp(arg, "-n") == 0) { if (!parse_int(argv[++i], &max_tokens)) { usage(argv[0]); return 1; } }
        else if (strcmp(arg, "--draft-len") == 0) { if (!parse_int(argv[++i], &draft_len)) { usage(argv[0]); return 1; } }
        else if (strcmp(arg, "--threads") == 0) { if (!parse_int(argv[++i], &threads)) { usage(argv[0]); return 1; } }
        else if (strcmp(arg, "--ctx") == 0) { if (!parse_int(argv[++i], &n_ctx)) { usage(argv[0]); return 1; } }
        else if (strcmp(arg, "--turns") == 0) { if (!parse_int(argv[++i], &turns)) { usage(argv[0]); return 1; } }
        else if (arg[0] == '-') { usage(argv[0]); return 1; }
        else if (target_path == NULL) target_path = arg;
        else if (draft_path == NULL) draft_path = arg;
        else { usage(argv[0]); return 1; }
    }
    if (target_path == NULL) {
        usage(argv[0]);
        return 1;
    }

    lib = dlopen(lib_path, RTLD_NOW | RTLD_LOCAL);
    if (lib == NULL) {
        fprintf(stderr, "dlopen(%s): %s\n", lib_path, dlerror());
        return 1;
    }
    if (!load_api(lib, &a)) goto done;
    if (a.abi_version() != ADASPEC_ABI_VERSION) {
        fprintf(stderr, "ABI mismatch: library %u, header %u\n", (unsigned)a.abi_version(),
                (unsigned)ADASPEC_ABI_VERSION);
        goto done;
    }
    fprintf(stderr, "libadaspec %s (header %s)\n", a.version(), ADASPEC_VERSION);

    {
        adaspec_model_params mp = a.model_default_params();
        adaspec_status st;
        mp.n_threads = threads;
        st = a.model_load(target_path, &mp, &target);
        if (st != ADASPEC_STATUS_OK) {
            fprintf(stderr, "target: %s: %s\n", a.status_name(st), a.last_error());
            goto done;
        }
        if (draft_path != NULL) {
            st = a.model_load(draft_path, &mp, &draft);
            if (st != ADASPEC_STATUS_OK) {
                fprintf(stderr, "draft: %s: %s\n", a.status_name(st), a.last_error());
                goto done;
            }
            st = a.model_check_vocab(target, draft);
            if (st != ADASPEC_STATUS_OK) {
                fprintf(stderr, "vocab: %s: %s\n", a.status_name(st), a.last_error());
                goto done;
            }
        }
    }
    {
        adaspec_session_params sp = a.session_default_params();
        adaspec_status st;
        sp.n_ctx = n_ctx;
        sp.n_threads = threads;
        sp.chain_length = draft_len;
        if (strcmp(strategy, "auto") == 0) sp.strategy = ADASPEC_STRATEGY_AUTO;
        else if (strcmp(strategy, "none") == 0) sp.strategy = ADASPEC_STRATEGY_NONE;
        else if (strcmp(strategy, "chain") == 0) sp.strategy = ADASPEC_STRATEGY_CHAIN;
        else if (strcmp(strategy, "tree") == 0) sp.strategy = ADASPEC_STRATEGY_TREE;
        else {
            fprintf(stderr, "unknown strategy %s\n", strategy);
            goto done;
        }
        st = a.session_new(target, draft, &sp, &session);
        if (st != ADASPEC_STATUS_OK) {
            fprintf(stderr, "session: %s: %s\n", a.status_name(st), a.last_error());
            goto done;
        }
    }
    for (i = 0; i < turns; i++) {
        adaspec_generate_params gp = a.generate_default_params();
        adaspec_stats stats = a.stats_default();
        adaspec_status st;
        size_t n_seen = 0;
        gp.max_tokens = max_tokens;
        gp.ignore_eog = ignore_eog;
        if (chat) {
            adaspec_chat_message msg;
            msg.role = "user";
            msg.content = prompt;
            st = a.session_chat(session, &msg, 1, &gp, on_piece, &n_seen, &stats);
        } else {
            st = a.session_generate(session, prompt, &gp, on_piece, &n_seen, &stats);
        }
        if (st != ADASPEC_STATUS_OK) {
            fprintf(stderr, "\ngenerate: %s: %s\n", a.status_name(st), a.last_error());
            goto done;
        }
        fprintf(stderr,
                "\n[turn %d] tokens %llu (streamed %zu), prompt tokens %llu, rounds %llu, "
                "acceptance %.3f, tokens/pass %.2f, draft %.1f ms, verify %.1f ms, "
                "total %.1f ms, %.1f tok/s, stop %d\n",
                i + 1, (unsigned long long)stats.n_tokens, n_seen,
                (unsigned long long)stats.n_prompt_tokens, (unsigned long long)stats.n_rounds,
                stats.acceptance_rate, stats.tokens_per_pass, stats.draft_ms, stats.verify_ms,
                stats.total_ms, stats.tokens_per_second, stats.stop_reason);
    }
    rc = 0;

done:
    if (a.session_free != NULL) a.session_free(session);
    if (a.model_free != NULL) {
        a.model_free(draft);
        a.model_free(target);
    }
    if (lib != NULL && getenv("ADASPEC_NO_DLCLOSE") == NULL) dlclose(lib);
    return rc;
}
