/* Test host (ffi/tests/hosts.rs): a program that uses its own llama.cpp (linked before
 * libadaspec, shared or static) and libadaspec in one process. It decodes greedily with its own
 * llama.cpp, then with libadaspec, then with its own again; prints the three token lists, which
 * must agree. It also checks that libadaspec leaves the host's process state alone: llama.cpp's
 * log callback the host set still gets the host's own llama.cpp lines and nothing from
 * libadaspec's copy, nothing reaches stderr from libadaspec, signal handlers are unchanged and
 * no thread outlives a call. Usage: two_llamas MODEL.gguf N_TOKENS */
#include <dirent.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "adaspec.h"
#include "llama.h"

static long host_log_lines;

static void host_log(enum ggml_log_level level, const char *text, void *ud) {
    (void)level; (void)text; (void)ud;
    host_log_lines++;
}

static int own_greedy(const char *path, const llama_token *prompt, int n_prompt, int n, llama_token *out) {
    struct llama_model_params mp = llama_model_default_params();
    struct llama_model *model = llama_model_load_from_file(path, mp);
    if (!model) return -1;
    struct llama_context_params cp = llama_context_default_params();
    cp.n_ctx = 256;
    cp.n_batch = 256;
    cp.n_threads = 1;
    cp.n_threads_batch = 1;
    struct llama_context *ctx = llama_init_from_model(model, cp);
    if (!ctx) return -2;
    const struct llama_vocab *vocab = llama_model_get_vocab(model);
    int n_vocab = llama_vocab_n_tokens(vocab);
    llama_token tok[256];
    memcpy(tok, prompt, sizeof(llama_token) * (size_t)n_prompt);
    struct llama_batch batch = llama_batch_get_one(tok, n_prompt);
    for (int i = 0; i < n; i++) {
        if (llama_decode(ctx, batch) != 0) return -3;
        const float *logits = llama_get_logits_ith(ctx, -1);
        llama_token best = 0;
        for (llama_token t = 1; t < n_vocab; t++)
            if (logits[t] > logits[best]) best = t;
        out[i] = best;
        tok[0] = best;
        batch = llama_batch_get_one(tok, 1);
    }
    llama_free(ctx);
    llama_model_free(model);
    return 0;
}

struct collected {
    int32_t tokens[256];
    size_t n;
};

static bool collect(const int32_t *toks, size_t n, const char *piece, size_t len, void *ud) {
    (void)piece; (void)len;
    struct collected *c = ud;
    for (size_t i = 0; i < n && c->n < 256; i++) c->tokens[c->n++] = toks[i];
    return true;
}

static int n_threads_now(void) {
    DIR *d = opendir("/proc/self/task");
    if (!d) return -1;
    int n = 0;
    struct dirent *e;
    while ((e = readdir(d)))
        if (e->d_name[0] != '.') n++;
    closedir(d);
    return n;
}

static const int SIGNALS[] = {SIGINT, SIGTERM, SIGSEGV, SIGABRT, SIGPIPE, SIGCHLD, SIGFPE, SIGBUS, SIGILL, SIGUSR1};
#define N_SIGNALS (sizeof SIGNALS / sizeof SIGNALS[0])

static void handlers(void (*out[])(int)) {
    for (size_t i = 0; i < N_SIGNALS; i++) {
        struct sigaction sa;
        sigaction(SIGNALS[i], NULL, &sa);
        out[i] = sa.sa_handler;
    }
}

static void print_tokens(const char *label, const int32_t *t, size_t n) {
    printf("%s", label);
    for (size_t i = 0; i < n; i++) printf(" %d", t[i]);
    printf("\n");
}

int main(int argc, char **argv) {
    if (argc < 3) {
        fprintf(stderr, "usage: %s MODEL.gguf N_TOKENS\n", argv[0]);
        return 2;
    }
    const char *path = argv[1];
    int n = atoi(argv[2]);
    if (n < 1 || n > 64) n = 16;
    llama_log_set(host_log, NULL);
    llama_backend_init();

    /* The prompt, with the host's own tokenizer. */
    struct llama_model_params mp = llama_model_default_params();
    mp.vocab_only = true;
    struct llama_model *vm = llama_model_load_from_file(path, mp);
    if (!vm) { fprintf(stderr, "host llama.cpp cannot load %s\n", path); return 3; }
    llama_token prompt[64];
    const char *text = "Once upon a time";
    int n_prompt = llama_tokenize(llama_model_get_vocab(vm), text, (int32_t)strlen(text), prompt, 64, true, true);
    llama_model_free(vm);
    if (n_prompt <= 0) { fprintf(stderr, "tokenize failed\n"); return 3; }

    llama_token before[64], after[64];
    if (own_greedy(path, prompt, n_prompt, n, before) != 0) { fprintf(stderr, "host decode failed\n"); return 3; }
    long host_lines = host_log_lines, first_lines = host_log_lines;

    void (*h0[N_SIGNALS])(int), (*h1[N_SIGNALS])(int);
    handlers(h0);
    int threads0 = n_threads_now();

    /* libadaspec, with its own llama.cpp inside. */
    adaspec_model *m = NULL;
    adaspec_model_params amp = adaspec_model_default_params();
    amp.n_threads = 2; /* sessions of this model default to 2 threads */
    if (adaspec_model_load(path, &amp, &m) != ADASPEC_STATUS_OK) { fprintf(stderr, "adaspec: %s\n", adaspec_last_error()); return 4; }
    adaspec_session_params sp = adaspec_session_default_params();
    sp.strategy = ADASPEC_STRATEGY_NONE;
    sp.n_ctx = 256;
    adaspec_session *s = NULL;
    if (adaspec_session_new(m, NULL, &sp, &s) != ADASPEC_STATUS_OK) { fprintf(stderr, "adaspec: %s\n", adaspec_last_error()); return 4; }
    adaspec_generate_params gp = adaspec_generate_default_params();
    gp.max_tokens = n;
    gp.ignore_eog = true;
    struct collected got = {0};
    if (adaspec_session_generate_tokens(s, prompt, (size_t)n_prompt, &gp, collect, &got, NULL) != ADASPEC_STATUS_OK) {
        fprintf(stderr, "adaspec: %s\n", adaspec_last_error());
        return 4;
    }
    int threads1 = n_threads_now();
    handlers(h1);
    adaspec_session_free(s);
    adaspec_model_free(m);
    int threads2 = n_threads_now();
    long adaspec_lines = host_log_lines - host_lines;

    /* The host's llama.cpp again, after libadaspec ran. */
    host_lines = host_log_lines;
    if (own_greedy(path, prompt, n_prompt, n, after) != 0) { fprintf(stderr, "host decode failed\n"); return 3; }
    long host_lines_after = host_log_lines - host_lines;

    print_tokens("host-before", before, (size_t)n);
    print_tokens("adaspec", got.tokens, got.n);
    print_tokens("host-after", after, (size_t)n);
    int same_handlers = memcmp(h0, h1, sizeof h0) == 0;
    printf("log-lines host=%ld adaspec=%ld host-after=%ld\n", first_lines, adaspec_lines, host_lines_after);
    printf("threads before=%d during=%d after-free=%d\n", threads0, threads1, threads2);
    printf("signal-handlers %s\n", same_handlers ? "unchanged" : "changed");
    return 0;
}
