// host_link.cpp - a C++ host that links libadaspec normally: RAII handles, a lambda as the
// streaming callback, multi-turn generation that keeps the KV cache, tokenize/detokenize with
// the needed-size convention.
//
// Build:  c++ -std=c++17 -Wall -Wextra -Werror examples/cpp/host_link.cpp
//             $(pkg-config --cflags --libs adaspec) -o host_link   (one line)
// Run:    ./host_link [--prompt TEXT] [-n N] [--turns N] [--chat] [--strategy auto|none|chain|tree]
//                     [--threads N] [--ctx N] TARGET.gguf [DRAFT.gguf]
// Streams the generated text to stdout; stats go to stderr.

#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <functional>
#include <memory>
#include <stdexcept>
#include <string>
#include <vector>

#include "adaspec.h"

namespace {

struct ModelDeleter {
    void operator()(adaspec_model *m) const { adaspec_model_free(m); }
};
struct SessionDeleter {
    void operator()(adaspec_session *s) const { adaspec_session_free(s); }
};
using Model = std::unique_ptr<adaspec_model, ModelDeleter>;
using Session = std::unique_ptr<adaspec_session, SessionDeleter>;

// Turns a status into an exception carrying the library's message (exceptions never cross
// into the library: they are thrown here, after the call returned).
void check(adaspec_status st, const char *what) {
    if (st != ADASPEC_STATUS_OK) {
        throw std::runtime_error(std::string(what) + ": " + adaspec_status_name(st) + ": " +
                                 adaspec_last_error());
    }
}

Model load(const std::string &path) {
    adaspec_model_params mp = adaspec_model_default_params();
    adaspec_model *m = nullptr;
    check(adaspec_model_load(path.c_str(), &mp, &m), path.c_str());
    return Model(m);
}

using OnPiece = std::function<bool(const int32_t *, size_t, const char *, size_t)>;

// C trampoline: user_data is the std::function. It must not throw into the library.
extern "C" bool trampoline(const int32_t *tokens, size_t n_tokens, const char *piece,
                           size_t piece_len, void *user_data) {
    try {
        return (*static_cast<OnPiece *>(user_data))(tokens, n_tokens, piece, piece_len);
    } catch (...) {
        return false;  // stop generation instead of unwinding through C
    }
}

std::vector<int32_t> tokenize(const adaspec_model *m, const std::string &text) {
    size_t n = 0;
    adaspec_status st =
        adaspec_tokenize(m, text.data(), text.size(), true, true, nullptr, 0, &n);
    if (st != ADASPEC_STATUS_BUFFER_TOO_SMALL && st != ADASPEC_STATUS_OK) check(st, "tokenize");
    std::vector<int32_t> ids(n);
    check(adaspec_tokenize(m, text.data(), text.size(), true, true, ids.data(), ids.size(), &n),
          "tokenize");
    return ids;
}

std::string detokenize(const adaspec_model *m, const std::vector<int32_t> &ids) {
    size_t n = 0;
    adaspec_status st = adaspec_detokenize(m, ids.data(), ids.size(), false, nullptr, 0, &n);
    if (st != ADASPEC_STATUS_BUFFER_TOO_SMALL && st != ADASPEC_STATUS_OK) check(st, "detokenize");
    std::vector<char> buf(n + 1);
    check(adaspec_detokenize(m, ids.data(), ids.size(), false, buf.data(), buf.size(), &n),
          "detokenize");
    return std::string(buf.data(), n);
}

}  // namespace

int main(int argc, char **argv) {
    std::string prompt = "def fibonacci(n):", strategy = "auto";
    std::vector<std::string> paths;
    int max_tokens = 64, turns = 1, threads = 0, n_ctx = 0;
    bool chat = false;
    for (int i = 1; i < argc; i++) {
        std::string a = argv[i];
        bool has_value = i + 1 < argc;
        if (a == "--prompt" && has_value) prompt = argv[++i];
        else if (a == "-n" && has_value) max_tokens = std::atoi(argv[++i]);
        else if (a == "--turns" && has_value) turns = std::atoi(argv[++i]);
        else if (a == "--threads" && has_value) threads = std::atoi(argv[++i]);
        else if (a == "--ctx" && has_value) n_ctx = std::atoi(argv[++i]);
        else if (a == "--strategy" && has_value) strategy = argv[++i];
        else if (a == "--chat") chat = true;
        else if (!a.empty() && a[0] != '-') paths.push_back(a);
        else {
            std::fprintf(stderr, "unknown argument %s\n", a.c_str());
            return 1;
        }
    }
    if (paths.empty() || paths.size() > 2) {
        std::fprintf(stderr,
                     "usage: %s [--prompt TEXT] [-n N] [--turns N] [--chat] "
                     "[--strategy auto|none|chain|tree] [--threads N] [--ctx N] "
                     "TARGET.gguf [DRAFT.gguf]\n",
                     argv[0]);
        return 1;
    }
    try {
        if (adaspec_abi_version() != ADASPEC_ABI_VERSION) throw std::runtime_error("ABI mismatch");
        Model target = load(paths[0]);
        Model draft = paths.size() > 1 ? load(paths[1]) : Model();
        if (draft) check(adaspec_model_check_vocab(target.get(), draft.get()), "vocab");

        // Round trip through the tokenizer helpers.
        std::vector<int32_t> ids = tokenize(target.get(), prompt);
        std::fprintf(stderr, "prompt: %zu tokens, detokenized %zu bytes\n", ids.size(),
                     detokenize(target.get(), ids).size());

        adaspec_session_params sp = adaspec_session_default_params();
        sp.n_threads = threads;  // out-of-range values come back as ADASPEC_STATUS_INVALID_PARAM
        sp.n_ctx = n_ctx;
        if (strategy == "none") sp.strategy = ADASPEC_STRATEGY_NONE;
        else if (strategy == "chain") sp.strategy = ADASPEC_STRATEGY_CHAIN;
        else if (strategy == "tree") sp.strategy = ADASPEC_STRATEGY_TREE;
        else sp.strategy = ADASPEC_STRATEGY_AUTO;
        adaspec_session *raw = nullptr;
        check(adaspec_session_new(target.get(), draft.get(), &sp, &raw), "session");
        Session session(raw);

        adaspec_generate_params gp = adaspec_generate_default_params();
        gp.max_tokens = max_tokens;
        gp.ignore_eog = true;
        size_t streamed = 0;
        OnPiece on_piece = [&](const int32_t *, size_t n, const char *piece, size_t len) {
            streamed += n;
            std::fwrite(piece, 1, len, stdout);
            std::fflush(stdout);
            return true;
        };
        for (int turn = 0; turn < turns; turn++) {
            adaspec_stats stats = adaspec_stats_default();
            if (chat) {
                adaspec_chat_message msg{"user", prompt.c_str()};
                check(adaspec_session_chat(session.get(), &msg, 1, &gp, trampoline, &on_piece,
                                           &stats),
                      "chat");
            } else {
                check(adaspec_session_generate(session.get(), prompt.c_str(), &gp, trampoline,
                                               &on_piece, &stats),
                      "generate");
            }
            std::fprintf(stderr,
                         "\n[turn %d] tokens %llu, prompt tokens %llu, tokens/pass %.2f, "
                         "acceptance %.3f, %.1f tok/s\n",
                         turn + 1, static_cast<unsigned long long>(stats.n_tokens),
                         static_cast<unsigned long long>(stats.n_prompt_tokens),
                         stats.tokens_per_pass, stats.acceptance_rate, stats.tokens_per_second);
        }
        size_t n_history = 0;
        adaspec_status st = adaspec_session_history(session.get(), nullptr, 0, &n_history);
        if (st != ADASPEC_STATUS_OK && st != ADASPEC_STATUS_BUFFER_TOO_SMALL) check(st, "history");
        std::fprintf(stderr, "conversation: %zu tokens, %zu streamed\n", n_history, streamed);
    } catch (const std::exception &e) {
        std::fprintf(stderr, "error: %s\n", e.what());
        return 1;
    }
    return 0;
}
