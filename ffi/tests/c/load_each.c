/* Test host for the GGUF mutation run (ffi/tests/fuzz_gguf.rs): loads every file named on
 * stdin (one path per line) through adaspec_model_load, as a host would, and for each model
 * that loads, creates a plain session and generates two tokens. With a target GGUF as the
 * second argument, each file is a head instead: the session drafts with it on that target
 * (chains of 2). With "file" as the third argument, each file is a head loaded by path through
 * adaspec_session_new_with_head_file (FSPAD-family heads), its status printed as the load
 * status. Before each file it prints
 * "try <i>", after it "done <i> <load status> <generate status or -> <message>", flushed, so
 * that the parent can tell which file a signal or abort came from and restart after it. A
 * file that takes over 20 s (a hang) ends the process with SIGALRM. */
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include "adaspec.h"

int main(int argc, char **argv) {
    long first = argc > 1 ? atol(argv[1]) : 0;
    adaspec_model *target = NULL;
    if (argc > 2 && adaspec_model_load(argv[2], NULL, &target) != ADASPEC_STATUS_OK) {
        fprintf(stderr, "cannot load the target %s: %s\n", argv[2], adaspec_last_error());
        return 2;
    }
    int by_path = argc > 3 && strcmp(argv[3], "file") == 0;
    char path[4096];
    long i = -1;
    while (fgets(path, sizeof path, stdin)) {
        i++;
        path[strcspn(path, "\n")] = 0;
        if (i < first) continue;
        printf("try %ld\n", i);
        fflush(stdout);
        alarm(20);
        if (by_path && target) {
            adaspec_session_params sp = adaspec_session_default_params();
            sp.strategy = ADASPEC_STRATEGY_TREE;
            sp.tree_top_k = 2;
            sp.tree_depth = 2;
            sp.tree_nodes = 4;
            sp.n_ctx = 64;
            sp.n_threads = 1;
            adaspec_session *s = NULL;
            enum adaspec_status st = adaspec_session_new_with_head_file(target, path, &sp, &s);
            enum adaspec_status gs = st;
            if (st == ADASPEC_STATUS_OK) {
                adaspec_generate_params gp = adaspec_generate_default_params();
                gp.max_tokens = 4;
                gp.ignore_eog = true;
                gs = adaspec_session_generate(s, "ab", &gp, NULL, NULL, NULL);
                adaspec_session_free(s);
            }
            char msg[512];
            adaspec_last_error_copy(msg, sizeof msg);
            for (char *c = msg; *c; c++)
                if (*c == '\n') *c = ' ';
            printf("done %ld %d %d %s\n", i, (int)st, (int)gs, gs == ADASPEC_STATUS_OK ? "" : msg);
            fflush(stdout);
            continue;
        }
        adaspec_model *m = NULL;
        adaspec_model_params mp = adaspec_model_default_params();
        mp.n_threads = 1;
        enum adaspec_status st = adaspec_model_load(path, &mp, &m);
        char msg[512];
        adaspec_last_error_copy(msg, sizeof msg);
        for (char *c = msg; *c; c++)
            if (*c == '\n') *c = ' ';
        if (st != ADASPEC_STATUS_OK) {
            printf("done %ld %d - %s\n", i, (int)st, msg);
            fflush(stdout);
            continue;
        }
        adaspec_session_params sp = adaspec_session_default_params();
        sp.strategy = target ? ADASPEC_STRATEGY_CHAIN : ADASPEC_STRATEGY_NONE;
        sp.chain_length = 2;
        sp.n_ctx = 64;
        sp.n_threads = 1;
        adaspec_session *s = NULL;
        enum adaspec_status gs = target ? adaspec_session_new_with_head(target, m, &sp, &s)
                                        : adaspec_session_new(m, NULL, &sp, &s);
        if (gs == ADASPEC_STATUS_OK) {
            adaspec_generate_params gp = adaspec_generate_default_params();
            gp.max_tokens = 2;
            gp.ignore_eog = true;
            gs = adaspec_session_generate(s, "ab", &gp, NULL, NULL, NULL);
            adaspec_session_free(s);
        }
        adaspec_last_error_copy(msg, sizeof msg);
        for (char *c = msg; *c; c++)
            if (*c == '\n') *c = ' ';
        printf("done %ld %d %d %s\n", i, (int)st, (int)gs, gs == ADASPEC_STATUS_OK ? "" : msg);
        fflush(stdout);
        adaspec_model_free(m);
    }
    adaspec_model_free(target);
    return 0;
}
