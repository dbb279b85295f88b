/* Test host (ffi/tests/hosts.rs): threads share session handles and call generate, reset and
 * free on them at random, replacing freed sessions with new ones, as a careless host might.
 * Every call must return OK, BUSY or INVALID_HANDLE (a handle another thread freed); run under
 * AddressSanitizer or valgrind, no access may be invalid. Prints "ok <calls> <busy> <stale>".
 * Also checks that the library leaves the environment alone (ggml's CPU backend sets
 * KMP_BLOCKTIME; libadaspec takes it back out).
 * Usage: stress_threads TARGET.gguf [threads] [iterations] */
#include <pthread.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>

#include "adaspec.h"

#define SLOTS 3

static adaspec_model *target;
static _Atomic(adaspec_session *) slots[SLOTS];
static atomic_long n_calls, n_busy, n_stale, n_bad;
static int iterations = 40;

static bool count_piece(const int32_t *toks, size_t n, const char *piece, size_t len, void *ud) {
    (void)toks; (void)n; (void)piece; (void)len;
    (*(long *)ud)++;
    return true;
}

static adaspec_session *new_session(void) {
    adaspec_session_params sp = adaspec_session_default_params();
    sp.strategy = ADASPEC_STRATEGY_NONE;
    sp.n_ctx = 256;
    sp.n_threads = 1;
    adaspec_session *s = NULL;
    if (adaspec_session_new(target, NULL, &sp, &s) != ADASPEC_STATUS_OK) {
        fprintf(stderr, "session_new: %s\n", adaspec_last_error());
        exit(3);
    }
    return s;
}

static void check(enum adaspec_status st, const char *what) {
    atomic_fetch_add(&n_calls, 1);
    if (st == ADASPEC_STATUS_BUSY) atomic_fetch_add(&n_busy, 1);
    else if (st == ADASPEC_STATUS_INVALID_HANDLE) atomic_fetch_add(&n_stale, 1);
    else if (st != ADASPEC_STATUS_OK && st != ADASPEC_STATUS_CONTEXT_FULL) {
        fprintf(stderr, "%s: unexpected %s: %s\n", what, adaspec_status_name(st), adaspec_last_error());
        atomic_fetch_add(&n_bad, 1);
    }
}

static void *worker(void *arg) {
    unsigned seed = (unsigned)(size_t)arg * 2654435761u + 1;
    long pieces = 0;
    adaspec_generate_params gp = adaspec_generate_default_params();
    gp.max_tokens = 3;
    gp.ignore_eog = true;
    adaspec_session *s = NULL;
    for (int i = 0; i < iterations; i++) {
        seed = seed * 1103515245u + 12345u;
        int slot = (int)((seed >> 8) % SLOTS);
        /* Keep using a handle for a few calls, so that some of them come after another thread
         * freed it. */
        if (s == NULL || (seed >> 24) % 4 == 0) s = atomic_load(&slots[slot]);
        switch ((seed >> 16) % 6) {
        case 0: {
            /* Free and replace: other threads may still hold the old handle. */
            adaspec_session *fresh = new_session();
            adaspec_session *old = atomic_exchange(&slots[slot], fresh);
            adaspec_session_free(old);
            atomic_fetch_add(&n_calls, 1);
            break;
        }
        case 1:
            check(adaspec_session_reset(s), "reset");
            break;
        default:
            check(adaspec_session_generate(s, "Once upon a time", &gp, count_piece, &pieces, NULL), "generate");
        }
    }
    return NULL;
}

int main(int argc, char **argv) {
    if (argc < 2) {
        fprintf(stderr, "usage: %s TARGET.gguf [threads] [iterations]\n", argv[0]);
        return 2;
    }
    int threads = argc > 2 ? atoi(argv[2]) : 6;
    int env_before = getenv("KMP_BLOCKTIME") != NULL;
    if (argc > 3) iterations = atoi(argv[3]);
    adaspec_model_params mp = adaspec_model_default_params();
    if (adaspec_model_load(argv[1], &mp, &target) != ADASPEC_STATUS_OK) {
        fprintf(stderr, "load: %s\n", adaspec_last_error());
        return 3;
    }
    for (int i = 0; i < SLOTS; i++) atomic_store(&slots[i], new_session());
    pthread_t tid[64];
    if (threads < 1 || threads > 64) threads = 6;
    for (int i = 0; i < threads; i++) pthread_create(&tid[i], NULL, worker, (void *)(size_t)(i + 1));
    for (int i = 0; i < threads; i++) pthread_join(tid[i], NULL);
    for (int i = 0; i < SLOTS; i++) adaspec_session_free(atomic_load(&slots[i]));
    adaspec_model_free(target);
    if ((getenv("KMP_BLOCKTIME") != NULL) != env_before) {
        fprintf(stderr, "the library changed the environment: KMP_BLOCKTIME=%s\n", getenv("KMP_BLOCKTIME"));
        return 1;
    }
    printf("ok %ld %ld %ld\n", atomic_load(&n_calls), atomic_load(&n_busy), atomic_load(&n_stale));
    return atomic_load(&n_bad) == 0 ? 0 : 1;
}
