//! The C ABI exercised through libloading, as a C host sees it: every export, its results on
//! tiny generated models against the engine's own output, and every misuse case (NULL
//! pointers, bad files, wrong struct sizes, out-of-range params, short buffers, re-entry from
//! a callback, concurrent use of one session).

mod common;

use std::ffi::{c_char, c_void, CStr, CString};
use std::ptr::{null, null_mut};
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};

use common::*;
use engine::tiny_model::TinyArch;

fn sentinel_model() -> *mut Model {
    0x1234 as *mut Model
}

#[test]
fn every_export_resolves_and_version_agrees() {
    let api = api();
    // SAFETY: libloading resolution of each documented name.
    let lib = unsafe { libloading::Library::new(lib_path()) }.expect("dlopen");
    for name in EXPORTS {
        // SAFETY: only checks presence.
        let sym: Result<libloading::Symbol<*const c_void>, _> = unsafe { lib.get(name.as_bytes()) };
        assert!(sym.is_ok(), "{name} not exported");
    }
    // SAFETY: static strings.
    let v = unsafe { CStr::from_ptr((api.version)()) }.to_str().unwrap().to_string();
    assert_eq!(v, env!("CARGO_PKG_VERSION"));
    let header = std::fs::read_to_string(root().join("include/adaspec.h")).unwrap();
    assert!(header.contains(&format!("#define ADASPEC_VERSION \"{v}\"")));
    // SAFETY: plain call.
    let abi = unsafe { (api.abi_version)() };
    assert!(header.contains(&format!("#define ADASPEC_ABI_VERSION {abi}")));
    let cargo = std::fs::read_to_string(root().join("Cargo.toml")).unwrap();
    assert!(cargo.contains(&format!("version = \"{v}\"")), "root Cargo.toml version differs");
    // Status names.
    for (n, name) in [
        (0, "ADASPEC_STATUS_OK"),
        (8, "ADASPEC_STATUS_BUSY"),
        (11, "ADASPEC_STATUS_PANIC"),
        (12, "ADASPEC_STATUS_INVALID_HANDLE"),
        (13, "ADASPEC_STATUS_UNKNOWN"),
    ] {
        // SAFETY: never NULL, static.
        let s = unsafe { CStr::from_ptr((api.status_name)(n)) }.to_str().unwrap().to_string();
        assert_eq!(s, name);
        assert!(n == 13 || header.contains(&format!("{name} = {n},")), "{name} = {n} not in header");
    }
}

#[test]
fn default_params_have_struct_size_and_documented_defaults() {
    let api = api();
    // SAFETY: by-value returns.
    let (mp, sp, gp, st) = unsafe {
        (
            (api.model_default_params)(),
            (api.session_default_params)(),
            (api.generate_default_params)(),
            (api.stats_default)(),
        )
    };
    assert_eq!(mp.struct_size as usize, std::mem::size_of::<ModelParams>());
    assert_eq!(sp.struct_size as usize, std::mem::size_of::<SessionParams>());
    assert_eq!(gp.struct_size as usize, std::mem::size_of::<GenerateParams>());
    assert_eq!(st.struct_size as usize, std::mem::size_of::<Stats>());
    assert!(mp.use_mmap && mp.repack && mp.n_gpu_layers == 0 && mp.n_threads == 0);
    assert_eq!((sp.n_ctx, sp.strategy, sp.chain_length, sp.mode), (0, STRATEGY_AUTO, 4, 0));
    assert_eq!((gp.max_tokens, gp.temperature, gp.top_p, gp.seed), (128, 0.0, 1.0, u64::MAX));
    assert!(gp.stop_strings.is_null() && gp.n_stop_strings == 0 && !gp.ignore_eog);
}

#[test]
fn last_error_is_thread_local_cleared_and_copyable() {
    let api = api();
    let mut m = sentinel_model();
    // SAFETY: NULL path on purpose.
    let st = unsafe { (api.model_load)(null(), null(), &mut m) };
    assert_eq!(st, NULL_ARGUMENT);
    assert_eq!(m, sentinel_model(), "out-param written on failure");
    let msg = api.last_error_string();
    assert!(msg.contains("adaspec_model_load") && msg.contains("`path`"), "{msg}");
    // Copy: size query, truncation, full copy.
    // SAFETY: NULL/0 size query, then buffers of the stated sizes.
    let n = unsafe { (api.last_error_copy)(null_mut(), 0) };
    assert_eq!(n, msg.len());
    let mut small = [1 as c_char; 5];
    // SAFETY: 5-byte buffer.
    assert_eq!(unsafe { (api.last_error_copy)(small.as_mut_ptr(), 5) }, msg.len());
    // SAFETY: NUL-terminated within the buffer.
    assert_eq!(unsafe { CStr::from_ptr(small.as_ptr()) }.to_str().unwrap(), &msg[..4]);
    // Another thread has its own (empty) message.
    let other = std::thread::spawn(|| api.last_error_string()).join().unwrap();
    assert_eq!(other, "");
    // A successful fallible call clears it.
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    assert_eq!(api.last_error_string(), "");
    // SAFETY: live handle.
    unsafe { (api.model_free)(t) };
}

#[test]
fn model_load_reports_bad_inputs() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let dir = p.dir.join("bad");
    std::fs::create_dir_all(&dir).unwrap();
    let not_gguf = dir.join("not.gguf");
    std::fs::write(&not_gguf, b"this is not a model at all").unwrap();
    let truncated = dir.join("truncated.gguf");
    let bytes = std::fs::read(&p.target).unwrap();
    std::fs::write(&truncated, &bytes[..bytes.len() / 3]).unwrap();
    let header_only = dir.join("header.gguf");
    std::fs::write(&header_only, &bytes[..64]).unwrap();
    for (path, want) in [
        (dir.join("missing.gguf"), MODEL_FILE),
        (dir.clone(), MODEL_FILE),
        (not_gguf, MODEL_FILE),
        (truncated, MODEL_FILE),
        (header_only, MODEL_FILE),
    ] {
        let c = cstr(path.to_str().unwrap());
        let mut m = sentinel_model();
        // SAFETY: valid arguments; the file is bad.
        let st = unsafe { (api.model_load)(c.as_ptr(), null(), &mut m) };
        assert_eq!(st, want, "{}: {}", path.display(), api.last_error_string());
        assert_eq!(m, sentinel_model());
        assert!(
            api.last_error_string().contains(path.file_name().unwrap().to_str().unwrap()),
            "{}",
            api.last_error_string()
        );
    }
    let good = cstr(p.target.to_str().unwrap());
    // NULL out-param.
    // SAFETY: NULL out on purpose.
    assert_eq!(unsafe { (api.model_load)(good.as_ptr(), null(), null_mut()) }, NULL_ARGUMENT);
    // Invalid UTF-8 path.
    let bad_utf8 = [0xffu8, 0xfe, b'x', 0];
    let mut m = null_mut();
    // SAFETY: NUL-terminated bytes.
    assert_eq!(unsafe { (api.model_load)(bad_utf8.as_ptr() as *const c_char, null(), &mut m) }, INVALID_UTF8);
    // Params: wrong struct_size (smaller than ABI v1, zero), negative threads, bad gpu layers
    // (larger sizes: struct_sizes_grow_both_ways).
    // SAFETY: by-value return.
    let base = unsafe { (api.model_default_params)() };
    let cases: Vec<(ModelParams, i32)> = vec![
        (ModelParams { struct_size: 0, ..base }, STRUCT_SIZE),
        (ModelParams { struct_size: base.struct_size - 4, ..base }, STRUCT_SIZE),
        (ModelParams { n_threads: -1, ..base }, INVALID_PARAM),
        (ModelParams { n_threads: i32::MAX, ..base }, INVALID_PARAM),
        (ModelParams { n_gpu_layers: -2, ..base }, INVALID_PARAM),
    ];
    for (mp, want) in cases {
        let mut m = sentinel_model();
        // SAFETY: valid pointers; bad field values.
        let st = unsafe { (api.model_load)(good.as_ptr(), &mp, &mut m) };
        assert_eq!(st, want, "{mp:?}: {}", api.last_error_string());
        assert_eq!(m, sentinel_model());
    }
    // Good load with explicit params, properties, free; NULL free.
    let mp = ModelParams { n_threads: 2, use_mmap: false, repack: false, n_gpu_layers: -1, ..base };
    let t = api.load(&p.target, Some(&mp));
    // SAFETY: live handle and NULLs.
    unsafe {
        assert_eq!((api.model_n_vocab)(t), engine::tiny_model::tiny_vocab().tokens.len() as i32);
        assert_eq!((api.model_n_ctx_train)(t), 4096);
        assert_eq!((api.model_n_vocab)(null()), -1);
        assert_eq!((api.model_n_ctx_train)(null()), -1);
        let eos = engine::tiny_model::tiny_vocab().eos;
        assert!((api.model_token_is_eog)(t, eos as i32));
        assert!(!(api.model_token_is_eog)(t, 5));
        assert!(!(api.model_token_is_eog)(t, -1));
        assert!(!(api.model_token_is_eog)(t, 1 << 30));
        assert!(!(api.model_token_is_eog)(null(), 0));
        (api.model_free)(t);
        (api.model_free)(null_mut());
    }
}

#[test]
fn vocab_check_without_a_session() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let bad_path = incompatible_copy(&p.target, &p.dir);
    let (t, d, bad) = (api.load(&p.target, None), api.load(&p.draft, None), api.load(&bad_path, None));
    let q = tiny(TinyArch::Qwen2);
    let qd = api.load(&q.draft, None);
    // SAFETY: live handles and NULLs.
    unsafe {
        assert_eq!((api.model_check_vocab)(t, d), OK);
        assert_eq!((api.model_check_vocab)(t, qd), OK, "same tokenizer across tiny archs");
        assert_eq!((api.model_check_vocab)(t, bad), INCOMPATIBLE_VOCAB);
        let msg = api.last_error_string();
        assert!(msg.contains("differs") && msg.contains("im_fin"), "{msg}");
        assert_eq!((api.model_check_vocab)(null(), d), NULL_ARGUMENT);
        assert_eq!((api.model_check_vocab)(t, null()), NULL_ARGUMENT);
        // A session with an incompatible draft fails the same way.
        let sp = api.session_params(STRATEGY_CHAIN);
        let mut s = null_mut();
        assert_eq!((api.session_new)(t, bad, &sp, &mut s), INCOMPATIBLE_VOCAB);
        assert!(s.is_null());
        for m in [t, d, bad, qd] {
            (api.model_free)(m);
        }
    }
}

#[test]
fn tokenize_and_detokenize_follow_the_buffer_convention() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    let reference = engine::Model::load(&p.target, &engine::ModelParams::default()).unwrap();
    let text = "def add(a, b):\n    return a + b<|im_end|>";
    let ids = api.tokenize_str(t, text, true);
    assert_eq!(ids, reference.tokenize(text, true, true).unwrap());
    // SAFETY: every call below passes buffers of the stated sizes (or NULL with 0).
    unsafe {
        // Short buffer: needed size reported, nothing else.
        let mut n = 0usize;
        let mut small = [7i32; 2];
        let st =
            (api.tokenize)(t, text.as_ptr() as *const c_char, text.len(), true, true, small.as_mut_ptr(), 2, &mut n);
        assert_eq!((st, n), (BUFFER_TOO_SMALL, ids.len()));
        assert_eq!(small, [7, 7]);
        // Empty text: zero tokens, OK with a NULL buffer.
        let st = (api.tokenize)(t, null(), 0, false, false, null_mut(), 0, &mut n);
        assert_eq!((st, n), (OK, 0));
        // Misuse.
        assert_eq!(
            (api.tokenize)(null(), text.as_ptr() as *const c_char, text.len(), true, true, null_mut(), 0, &mut n),
            NULL_ARGUMENT
        );
        assert_eq!((api.tokenize)(t, null(), 3, true, true, null_mut(), 0, &mut n), NULL_ARGUMENT);
        assert_eq!(
            (api.tokenize)(t, text.as_ptr() as *const c_char, text.len(), true, true, null_mut(), 0, null_mut()),
            NULL_ARGUMENT
        );
        assert_eq!(
            (api.tokenize)(t, text.as_ptr() as *const c_char, text.len(), true, true, null_mut(), 100, &mut n),
            NULL_ARGUMENT
        );
        let bad = [b'a', 0xc3];
        assert_eq!(
            (api.tokenize)(t, bad.as_ptr() as *const c_char, 2, true, true, null_mut(), 0, &mut n),
            INVALID_UTF8
        );

        // Detokenize: size query, short buffer, exact buffer, special rendering.
        let body_vec = api.tokenize_str(t, text, false);
        let body = &body_vec[..];
        let st = (api.detokenize)(t, body.as_ptr(), body.len(), false, null_mut(), 0, &mut n);
        let plain = reference.detokenize(body);
        assert_eq!((st, n), (BUFFER_TOO_SMALL, plain.len()));
        let mut buf = vec![b'x' as c_char; n];
        let st = (api.detokenize)(t, body.as_ptr(), body.len(), false, buf.as_mut_ptr(), n, &mut n);
        assert_eq!((st, n), (BUFFER_TOO_SMALL, plain.len()), "no room for the NUL");
        assert!(buf.iter().all(|&c| c == b'x' as c_char), "buffer written on failure");
        let mut buf = vec![0 as c_char; n + 1];
        let st = (api.detokenize)(t, body.as_ptr(), body.len(), false, buf.as_mut_ptr(), buf.len(), &mut n);
        assert_eq!(st, OK);
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), plain);
        assert_eq!(plain, "def add(a, b):\n    return a + b");
        let mut buf = vec![0 as c_char; 256];
        let st = (api.detokenize)(t, body.as_ptr(), body.len(), true, buf.as_mut_ptr(), buf.len(), &mut n);
        assert_eq!(st, OK);
        assert_eq!(CStr::from_ptr(buf.as_ptr()).to_str().unwrap(), text);
        // Misuse.
        let bad_ids = [1, -3];
        assert_eq!((api.detokenize)(t, bad_ids.as_ptr(), 2, false, buf.as_mut_ptr(), 256, &mut n), INVALID_PARAM);
        assert!(api.last_error_string().contains("-3"));
        let bad_ids = [1, 1 << 20];
        assert_eq!((api.detokenize)(t, bad_ids.as_ptr(), 2, false, buf.as_mut_ptr(), 256, &mut n), INVALID_PARAM);
        assert_eq!((api.detokenize)(t, null(), 2, false, buf.as_mut_ptr(), 256, &mut n), NULL_ARGUMENT);
        assert_eq!((api.detokenize)(null(), body.as_ptr(), 1, false, buf.as_mut_ptr(), 256, &mut n), NULL_ARGUMENT);
        assert_eq!((api.detokenize)(t, body.as_ptr(), 1, false, buf.as_mut_ptr(), 256, null_mut()), NULL_ARGUMENT);
        assert_eq!((api.detokenize)(t, body.as_ptr(), body.len(), false, null_mut(), 256, &mut n), NULL_ARGUMENT);
        let st = (api.detokenize)(t, null(), 0, false, buf.as_mut_ptr(), 1, &mut n);
        assert_eq!((st, n, buf[0]), (OK, 0, 0));
        // Oversized lengths are rejected before anything is read.
        let st = (api.tokenize)(t, text.as_ptr() as *const c_char, usize::MAX, true, true, null_mut(), 0, &mut n);
        assert_eq!(st, INVALID_PARAM);
        let st = (api.detokenize)(t, body.as_ptr(), usize::MAX / 2, false, null_mut(), 0, &mut n);
        assert_eq!(st, INVALID_PARAM);
        assert!(api.last_error_string().contains("too large"));
        // An oversized output buffer is fine.
        let mut big = vec![0i32; 4096];
        let st = (api.tokenize)(
            t,
            text.as_ptr() as *const c_char,
            text.len(),
            true,
            true,
            big.as_mut_ptr(),
            big.len(),
            &mut n,
        );
        assert_eq!((st, n), (OK, ids.len()));
        assert_eq!(&big[..n], &ids[..]);
        (api.model_free)(t);
    }
}

#[test]
fn session_new_rejects_bad_params() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    let base = api.session_params(STRATEGY_CHAIN);
    let cases: Vec<(SessionParams, i32)> = vec![
        (SessionParams { struct_size: 4, ..base }, STRUCT_SIZE),
        (SessionParams { struct_size: 44, ..base }, STRUCT_SIZE), // below ABI v1's 48
        (SessionParams { n_ctx: -1, ..base }, INVALID_PARAM),
        (SessionParams { n_ctx: 8, ..base }, INVALID_PARAM),
        (SessionParams { n_threads: -4, ..base }, INVALID_PARAM),
        (SessionParams { n_threads: 100_000, ..base }, INVALID_PARAM),
        (SessionParams { n_ctx: i32::MAX, ..base }, INVALID_PARAM),
        (SessionParams { strategy: 9, ..base }, INVALID_PARAM),
        (SessionParams { strategy: -1, ..base }, INVALID_PARAM),
        (SessionParams { chain_length: 0, ..base }, INVALID_PARAM),
        (SessionParams { chain_length: -5, ..base }, INVALID_PARAM),
        (SessionParams { chain_length: 65, ..base }, INVALID_PARAM),
        (SessionParams { strategy: STRATEGY_TREE, tree_top_k: 0, ..base }, INVALID_PARAM),
        (SessionParams { strategy: STRATEGY_TREE, tree_depth: 17, ..base }, INVALID_PARAM),
        (SessionParams { strategy: STRATEGY_TREE, tree_nodes: 255, ..base }, INVALID_PARAM),
        (SessionParams { mode: 2, ..base }, INVALID_PARAM),
    ];
    // Exact mode needs the target loaded with repack = false (on AMX CPUs nothing is repacked).
    let mut cases = cases;
    if engine::backend::repacking_available() {
        cases.push((SessionParams { mode: 1, ..base }, INVALID_PARAM));
    }
    for (sp, want) in cases {
        let mut s = 0x99 as *mut Session;
        // SAFETY: live handles; bad params on purpose.
        let st = unsafe { (api.session_new)(t, d, &sp, &mut s) };
        assert_eq!(st, want, "{sp:?}: {}", api.last_error_string());
        assert_eq!(s, 0x99 as *mut Session, "out-param written on failure");
        assert!(!api.last_error_string().is_empty());
    }
    // SAFETY: NULL arguments on purpose; then valid calls.
    unsafe {
        let mut s = null_mut();
        assert_eq!((api.session_new)(null(), d, &base, &mut s), NULL_ARGUMENT);
        assert_eq!((api.session_new)(t, d, &base, null_mut()), NULL_ARGUMENT);
        // NULL params = defaults; NULL draft = plain decoding.
        assert_eq!((api.session_new)(t, null(), null(), &mut s), OK, "{}", api.last_error_string());
        (api.session_free)(s);
        (api.session_free)(null_mut());
        // The same model may serve several sessions, and may be freed before them.
        let s1 = api.new_session(t, d, &base);
        let s2 = api.new_session(t, d, &api.session_params(STRATEGY_TREE));
        let s3 = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
        (api.model_free)(t);
        (api.model_free)(d);
        let gp = api.greedy(24);
        let a = api.generate_text(s1, "Once upon a time", &gp).unwrap().0;
        let b = api.generate_text(s2, "Once upon a time", &gp).unwrap().0;
        let c = api.generate_text(s3, "Once upon a time", &gp).unwrap().0;
        assert_eq!(a.tokens, c.tokens);
        assert_eq!(b.tokens, c.tokens);
        for s in [s1, s2, s3] {
            (api.session_free)(s);
        }
    }
}

/// Streamed tokens and text through the C API equal the engine's own output, and greedy
/// speculative output equals target-alone output, for every strategy and both tiny archs.
#[test]
fn generation_matches_engine_and_is_lossless() {
    let api = api();
    let prompts = ["def fibonacci(n):\n    return", "The quick brown fox jumps over", "Once upon a time,"];
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let p = tiny(arch);
        let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
        let plain = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
        let mut tree = api.session_params(STRATEGY_TREE);
        (tree.tree_top_k, tree.tree_depth, tree.tree_nodes) = (3, 4, 12);
        let mut chain = api.session_params(STRATEGY_CHAIN);
        chain.chain_length = 3;
        let mut no_lookup = api.session_params(STRATEGY_AUTO);
        no_lookup.lookup = 0;
        let mut spec: Vec<*mut Session> = [chain, tree, api.session_params(STRATEGY_AUTO), no_lookup]
            .iter()
            .map(|sp| api.new_session(t, d, sp))
            .collect();
        // No draft model: n-gram lookups are the only draft (auto, and a lookup chain).
        spec.push(api.new_session(t, null(), &api.session_params(STRATEGY_AUTO)));
        spec.push(api.new_session(t, null(), &chain));
        let gp = api.greedy(96);
        let engine_ref = engine_generate(
            &p.target,
            None,
            engine::Strategy::None,
            &[engine::Prompt::Text(prompts[0].to_string())],
            &engine::GenerateParams { max_tokens: 96, ignore_eog: true, ..Default::default() },
        );
        for (i, prompt) in prompts.iter().enumerate() {
            // SAFETY: live sessions.
            unsafe {
                assert_eq!((api.session_reset)(plain), OK);
                for &s in &spec {
                    assert_eq!((api.session_reset)(s), OK);
                }
            }
            let (want, want_stats) = api.generate_text(plain, prompt, &gp).unwrap();
            assert_eq!(want.tokens.len(), 96);
            assert_eq!(want_stats.n_tokens, 96);
            assert_eq!(want_stats.stop_reason, STOP_MAX_TOKENS);
            assert_eq!(want_stats.n_rounds, 96, "plain decoding: one pass per token");
            if i == 0 {
                assert_eq!(want.tokens, engine_ref[0].tokens, "{arch:?}: C API differs from the engine");
                assert_eq!(want.text(), engine_ref[0].text);
            }
            for &s in &spec {
                let (got, stats) = api.generate_text(s, prompt, &gp).unwrap();
                assert_eq!(got.tokens, want.tokens, "{arch:?} {prompt:?}: speculative output differs");
                assert_eq!(got.text, want.text);
                assert_eq!(stats.n_tokens, 96);
                assert!(stats.n_rounds <= 96 && stats.n_rounds > 0);
                assert!(stats.n_draft_accepted <= stats.n_draft_proposed);
                assert!((0.0..=1.0).contains(&stats.acceptance_rate));
                assert!(stats.tokens_per_pass >= 1.0 && stats.total_ms > 0.0 && stats.tokens_per_second > 0.0);
                // last_text: the whole streamed text.
                let mut n = 0usize;
                // SAFETY: size query then a buffer of n + 1.
                unsafe {
                    assert_eq!((api.session_last_text)(s, null_mut(), 0, &mut n), BUFFER_TOO_SMALL);
                    assert_eq!(n, got.text.len());
                    let mut buf = vec![0 as c_char; n + 1];
                    assert_eq!((api.session_last_text)(s, buf.as_mut_ptr(), n + 1, &mut n), OK);
                    assert_eq!(buf[n], 0);
                    let bytes: Vec<u8> = buf[..n].iter().map(|&c| c as u8).collect();
                    assert_eq!(bytes, got.text);
                }
            }
        }
        // SAFETY: live handles.
        unsafe {
            for s in spec.into_iter().chain([plain]) {
                (api.session_free)(s);
            }
            (api.model_free)(t);
            (api.model_free)(d);
        }
    }
}

#[test]
fn token_prompts_chat_and_multi_turn_keep_the_kv_cache() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    let s = api.new_session(t, d, &api.session_params(STRATEGY_CHAIN));
    let mut gp = api.greedy(20);
    // Two text turns against the engine doing the same two turns.
    let turns = ["def add(a, b):", "\n# and now subtract\n"];
    let want = engine_generate(
        &p.target,
        Some(&p.draft),
        engine::Strategy::Chain(4),
        &turns.iter().map(|s| engine::Prompt::Text(s.to_string())).collect::<Vec<_>>(),
        &engine::GenerateParams { max_tokens: 20, ignore_eog: true, ..Default::default() },
    );
    let (a, sa) = api.generate_text(s, turns[0], &gp).unwrap();
    let (b, sb) = api.generate_text(s, turns[1], &gp).unwrap();
    assert_eq!(a.tokens, want[0].tokens);
    assert_eq!(b.tokens, want[1].tokens);
    assert_eq!(b.text(), want[1].text);
    let turn2_tokens = api.tokenize_str(t, turns[1], false);
    assert_eq!(sa.n_prompt_tokens as usize, api.tokenize_str(t, turns[0], true).len());
    assert_eq!(sb.n_prompt_tokens as usize, turn2_tokens.len(), "turn 2 re-processed earlier turns");
    // History holds both turns.
    let mut n = 0usize;
    // SAFETY: size query and a sized buffer; NULL misuse.
    let history = unsafe {
        assert_eq!((api.session_history)(s, null_mut(), 0, &mut n), BUFFER_TOO_SMALL);
        let mut h = vec![0i32; n];
        assert_eq!((api.session_history)(s, h.as_mut_ptr(), n, &mut n), OK);
        assert_eq!((api.session_history)(null_mut(), h.as_mut_ptr(), n, &mut n), NULL_ARGUMENT);
        assert_eq!((api.session_history)(s, h.as_mut_ptr(), n, null_mut()), NULL_ARGUMENT);
        assert_eq!((api.session_history)(s, null_mut(), n, &mut n), NULL_ARGUMENT);
        h
    };
    assert_eq!(n, sa.n_prompt_tokens as usize + 20 + turn2_tokens.len() + 20);
    assert_eq!(&history[history.len() - 20..], &b.tokens[..]);
    // An empty prompt continues the conversation.
    let (c, sc) = api.generate_text(s, "", &gp).unwrap();
    assert_eq!((c.tokens.len(), sc.n_prompt_tokens), (20, 0));

    // Reset, then token-id prompt equals the same text prompt.
    // SAFETY: live session; token buffer of the stated size.
    unsafe {
        assert_eq!((api.session_reset)(s), OK);
        assert_eq!((api.session_history)(s, null_mut(), 0, &mut n), OK);
        assert_eq!(n, 0);
        assert_eq!((api.session_reset)(null_mut()), NULL_ARGUMENT);
        let ids = api.tokenize_str(t, turns[0], true);
        let mut out = Streamed::default();
        let mut st = (api.stats_default)();
        let r = (api.session_generate_tokens)(
            s,
            ids.as_ptr(),
            ids.len(),
            &gp,
            Some(collect),
            &mut out as *mut _ as *mut c_void,
            &mut st,
        );
        assert_eq!(r, OK, "{}", api.last_error_string());
        assert_eq!(out.tokens, a.tokens);
        // Bad ids, NULL with a count.
        let bad = [1, 99999];
        assert_eq!((api.session_generate_tokens)(s, bad.as_ptr(), 2, &gp, None, null_mut(), null_mut()), INVALID_PARAM);
        assert_eq!((api.session_generate_tokens)(s, null(), 2, &gp, None, null_mut(), null_mut()), NULL_ARGUMENT);
        // A fresh session with no history and no prompt.
        let s2 = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
        assert_eq!((api.session_generate_tokens)(s2, null(), 0, &gp, None, null_mut(), null_mut()), INVALID_PARAM);
        (api.session_free)(s2);
    }

    // Chat: the engine's chat output, two turns, with the KV cache kept.
    gp.max_tokens = 16;
    let msgs1 = [("system", "You are terse."), ("user", "Say hi.")];
    let msgs2 = [("user", "Again.")];
    let want = engine_generate(
        &p.target,
        Some(&p.draft),
        engine::Strategy::Chain(4),
        &[
            engine::Prompt::Chat(msgs1.iter().map(|(r, c)| engine::ChatMessage::new(*r, *c)).collect()),
            engine::Prompt::Chat(msgs2.iter().map(|(r, c)| engine::ChatMessage::new(*r, *c)).collect()),
        ],
        &engine::GenerateParams { max_tokens: 16, ignore_eog: true, ..Default::default() },
    );
    // SAFETY: live session, message arrays valid for the calls.
    unsafe {
        assert_eq!((api.session_reset)(s), OK);
        for (msgs, want) in [(&msgs1[..], &want[0]), (&msgs2[..], &want[1])] {
            let owned: Vec<_> = msgs.iter().map(|(r, c)| (cstr(r), cstr(c))).collect();
            let cm: Vec<ChatMessage> =
                owned.iter().map(|(r, c)| ChatMessage { role: r.as_ptr(), content: c.as_ptr() }).collect();
            let mut out = Streamed::default();
            let mut st = (api.stats_default)();
            let r = (api.session_chat)(
                s,
                cm.as_ptr(),
                cm.len(),
                &gp,
                Some(collect),
                &mut out as *mut _ as *mut c_void,
                &mut st,
            );
            assert_eq!(r, OK, "{}", api.last_error_string());
            assert_eq!(out.tokens, want.tokens);
            assert_eq!(out.text(), want.text);
        }
        // Chat misuse.
        let role = cstr("user");
        let bad = [ChatMessage { role: role.as_ptr(), content: null() }];
        assert_eq!((api.session_chat)(s, bad.as_ptr(), 1, &gp, None, null_mut(), null_mut()), NULL_ARGUMENT);
        assert!(api.last_error_string().contains("messages[0].content"));
        assert_eq!((api.session_chat)(s, bad.as_ptr(), 0, &gp, None, null_mut(), null_mut()), INVALID_PARAM);
        assert_eq!((api.session_chat)(s, null(), 1, &gp, None, null_mut(), null_mut()), NULL_ARGUMENT);
        let bad_utf8 = [0xffu8, 0];
        let bad = [ChatMessage { role: role.as_ptr(), content: bad_utf8.as_ptr() as *const c_char }];
        assert_eq!((api.session_chat)(s, bad.as_ptr(), 1, &gp, None, null_mut(), null_mut()), INVALID_UTF8);
        (api.session_free)(s);
        (api.model_free)(t);
        (api.model_free)(d);
    }
}

#[test]
fn generate_rejects_bad_arguments_without_touching_the_session() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    let s = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let base = api.greedy(8);
    let prompt = cstr("hello");
    let empty = cstr("");
    let stop_ptrs = [empty.as_ptr()];
    let null_ptrs: [*const c_char; 1] = [null()];
    let cases: Vec<(GenerateParams, i32)> = vec![
        (GenerateParams { struct_size: 0, ..base }, STRUCT_SIZE),
        (GenerateParams { struct_size: base.struct_size - 4, ..base }, STRUCT_SIZE),
        (GenerateParams { max_tokens: -1, ..base }, INVALID_PARAM),
        (GenerateParams { top_k: -2, ..base }, INVALID_PARAM),
        (GenerateParams { temperature: -0.5, ..base }, INVALID_PARAM),
        (GenerateParams { temperature: f32::NAN, ..base }, INVALID_PARAM),
        (GenerateParams { top_p: 1.5, ..base }, INVALID_PARAM),
        (GenerateParams { top_p: 0.0, ..base }, INVALID_PARAM),
        (GenerateParams { min_p: -1.0, ..base }, INVALID_PARAM),
        (GenerateParams { n_stop_strings: 2, ..base }, NULL_ARGUMENT),
        (GenerateParams { n_stop_strings: 65, stop_strings: stop_ptrs.as_ptr(), ..base }, INVALID_PARAM),
        (GenerateParams { n_stop_strings: 1, stop_strings: null_ptrs.as_ptr(), ..base }, NULL_ARGUMENT),
        (GenerateParams { n_stop_strings: 1, stop_strings: stop_ptrs.as_ptr(), ..base }, INVALID_PARAM),
    ];
    for (gp, want) in cases {
        // SAFETY: by-value return.
        let mut stats = unsafe { (api.stats_default)() };
        stats.n_tokens = 777;
        // SAFETY: valid session/prompt; bad params on purpose (array pointers valid).
        let st = unsafe { (api.session_generate)(s, prompt.as_ptr(), &gp, None, null_mut(), &mut stats) };
        assert_eq!(st, want, "{gp:?}: {}", api.last_error_string());
        assert_eq!(stats.n_tokens, 777, "stats written on failure");
    }
    // SAFETY: NULLs and bad sizes on purpose.
    unsafe {
        assert_eq!(
            (api.session_generate)(null_mut(), prompt.as_ptr(), &base, None, null_mut(), null_mut()),
            NULL_ARGUMENT
        );
        assert_eq!((api.session_generate)(s, null(), &base, None, null_mut(), null_mut()), NULL_ARGUMENT);
        let bad = [b'h', 0xc0, 0];
        assert_eq!(
            (api.session_generate)(s, bad.as_ptr() as *const c_char, &base, None, null_mut(), null_mut()),
            INVALID_UTF8
        );
        let mut stats = Stats { struct_size: 8, ..Default::default() };
        assert_eq!((api.session_generate)(s, prompt.as_ptr(), &base, None, null_mut(), &mut stats), STRUCT_SIZE);
        let mut n = 1usize;
        assert_eq!((api.session_history)(s, null_mut(), 0, &mut n), OK);
        assert_eq!(n, 0, "a rejected call changed the session");
        // NULL params (defaults) and NULL callback and stats are fine.
        assert_eq!(
            (api.session_generate)(s, prompt.as_ptr(), null(), None, null_mut(), null_mut()),
            OK,
            "{}",
            api.last_error_string()
        );
        // max_tokens 0 generates nothing.
        let mut stats = (api.stats_default)();
        let zero = GenerateParams { max_tokens: 0, ..base };
        assert_eq!((api.session_generate)(s, prompt.as_ptr(), &zero, None, null_mut(), &mut stats), OK);
        assert_eq!(stats.n_tokens, 0);
        (api.session_free)(s);
    }
    // Context full: a small context and a long prompt.
    let mut sp = api.session_params(STRATEGY_NONE);
    sp.n_ctx = 32;
    let small = api.new_session(t, null(), &sp);
    let long = "word ".repeat(200);
    let r = api.generate_text(small, &long, &base);
    assert_eq!(r.as_ref().err().map(|e| e.0), Some(CONTEXT_FULL), "{r:?}");
    assert!(r.unwrap_err().1.contains("context"));
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(small);
        (api.model_free)(t);
    }
}

#[test]
fn stop_strings_callback_stop_and_seeded_sampling() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    let s = api.new_session(t, d, &api.session_params(STRATEGY_CHAIN));
    let prompt = "The quick brown fox";
    let (full, _) = api.generate_text(s, prompt, &api.greedy(64)).unwrap();
    let text = full.text();
    // A stop string from the middle of the greedy text.
    let chars: Vec<char> = text.chars().collect();
    let stop: String = chars[chars.len() / 2..chars.len() / 2 + 3].iter().collect();
    let cut = text.find(&stop).unwrap();
    let stop_c = cstr(&stop);
    let stops = [stop_c.as_ptr()];
    let mut gp = api.greedy(64);
    gp.stop_strings = stops.as_ptr();
    gp.n_stop_strings = 1;
    // SAFETY: live session.
    unsafe { assert_eq!((api.session_reset)(s), OK) };
    let (got, st) = api.generate_text(s, prompt, &gp).unwrap();
    assert_eq!(st.stop_reason, STOP_STRING);
    assert_eq!(got.text(), text[..cut], "stop string {stop:?}");

    // A callback returning false stops after its first call.
    unsafe extern "C" fn stop_now(_: *const i32, n: usize, _: *const c_char, _: usize, ud: *mut c_void) -> bool {
        // SAFETY: ud is the counter the test passed.
        unsafe { (*(ud as *mut usize)) += n };
        false
    }
    let mut count = 0usize;
    let pc = cstr(prompt);
    // SAFETY: live handles; ud is a usize counter.
    unsafe {
        assert_eq!((api.session_reset)(s), OK);
        let mut stats = (api.stats_default)();
        let g = api.greedy(64);
        let r = (api.session_generate)(
            s,
            pc.as_ptr(),
            &g,
            Some(stop_now),
            &mut count as *mut usize as *mut c_void,
            &mut stats,
        );
        assert_eq!(r, OK);
        assert_eq!(stats.stop_reason, STOP_CALLBACK);
        assert_eq!(stats.n_tokens as usize, count);
        assert!((1..64).contains(&count));
    }

    // Sampling: same seed, same output; equals the engine with the same seed and chain.
    let mut sg = api.greedy(40);
    (sg.temperature, sg.top_k, sg.top_p, sg.seed) = (0.9, 40, 0.95, 1234);
    let mut outs = Vec::new();
    for _ in 0..2 {
        // SAFETY: live session.
        unsafe { assert_eq!((api.session_reset)(s), OK) };
        outs.push(api.generate_text(s, prompt, &sg).unwrap().0);
    }
    assert_eq!(outs[0], outs[1]);
    let want = engine_generate(
        &p.target,
        Some(&p.draft),
        engine::Strategy::Chain(4),
        &[engine::Prompt::Text(prompt.into())],
        &engine::GenerateParams {
            max_tokens: 40,
            ignore_eog: true,
            sampling: engine::SamplingParams { temperature: 0.9, top_k: 40, top_p: 0.95, min_p: 0.0, seed: 1234 },
            ..Default::default()
        },
    );
    assert_eq!(outs[0].tokens, want[0].tokens);
    // The session seed is used when the request says ADASPEC_SEED_FROM_SESSION.
    let mut sp = api.session_params(STRATEGY_CHAIN);
    sp.seed = 1234;
    let s2 = api.new_session(t, d, &sp);
    sg.seed = u64::MAX;
    assert_eq!(api.generate_text(s2, prompt, &sg).unwrap().0.tokens, want[0].tokens);
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(s2);
        (api.session_free)(s);
        (api.model_free)(t);
        (api.model_free)(d);
    }
}

struct Reentry {
    session: *mut Session,
    prompt: *const c_char,
    statuses: Vec<i32>,
    calls: usize,
    after_free: i32,
}

unsafe extern "C" fn reenter(_: *const i32, _: usize, _: *const c_char, _: usize, ud: *mut c_void) -> bool {
    let api = api();
    // SAFETY: ud is the Reentry the test passed.
    let r = unsafe { &mut *(ud as *mut Reentry) };
    r.calls += 1;
    let mut n = 0usize;
    // SAFETY: the session is live (it is generating); each call must return BUSY. Then the
    // callback frees its own session: the generation must stop without calling back again.
    unsafe {
        r.statuses.push((api.session_generate)(r.session, r.prompt, null(), None, null_mut(), null_mut()));
        r.statuses.push((api.session_generate_tokens)(r.session, null(), 0, null(), None, null_mut(), null_mut()));
        r.statuses.push((api.session_reset)(r.session));
        r.statuses.push((api.session_history)(r.session, null_mut(), 0, &mut n));
        r.statuses.push((api.session_last_text)(r.session, null_mut(), 0, &mut n));
        (api.session_free)(r.session);
        r.after_free = (api.session_reset)(r.session);
    }
    true
}

#[test]
fn reentry_from_the_callback_is_busy_and_free_there_stops_generation() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    let s = api.new_session(t, d, &api.session_params(STRATEGY_CHAIN));
    let prompt = cstr("Once upon a time");
    let mut r = Reentry { session: s, prompt: prompt.as_ptr(), statuses: Vec::new(), calls: 0, after_free: OK };
    let gp = api.greedy(12);
    // SAFETY: returns a struct by value.
    let mut stats = unsafe { (api.stats_default)() };
    // SAFETY: live session; ud is the Reentry.
    let st = unsafe {
        (api.session_generate)(
            s,
            prompt.as_ptr(),
            &gp,
            Some(reenter),
            &mut r as *mut Reentry as *mut c_void,
            &mut stats,
        )
    };
    assert_eq!(st, OK, "{}", api.last_error_string());
    assert_eq!(r.statuses.len(), 5);
    assert!(r.statuses.iter().all(|&x| x == BUSY), "{:?}", r.statuses);
    assert_eq!(r.calls, 1, "the callback was called after its session was freed");
    assert_eq!(stats.stop_reason, STOP_CALLBACK);
    assert_eq!(r.after_free, INVALID_HANDLE);
    // The handle is gone: every call refuses it, a second free only sets the last error.
    // SAFETY: a freed handle, which the library must refuse without reading it.
    unsafe {
        assert_eq!((api.session_reset)(s), INVALID_HANDLE);
        assert!(api.last_error_string().contains("not a live session handle"), "{}", api.last_error_string());
        (api.session_free)(s);
    }
    assert!(api.last_error_string().contains("not a live session handle"), "{}", api.last_error_string());
    let fresh = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let (b, _) = api.generate_text(fresh, "Once upon a time", &gp).unwrap();
    assert_eq!(b.tokens.len(), 12);
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(fresh);
        (api.model_free)(t);
        (api.model_free)(d);
    }
}

#[test]
fn handles_that_are_not_live_are_refused() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    let s = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let gp = api.greedy(2);
    let text = cstr("hi");
    let mut n = 0usize;
    // SAFETY: every handle below is either live or one the library must refuse unread: a model
    // handle where a session is expected and the other way round, numbers it never made, a
    // freed model.
    unsafe {
        for bad in [t as *mut Session, 0x1234 as *mut Session, usize::MAX as *mut Session, 8 as *mut Session] {
            assert_eq!((api.session_generate)(bad, text.as_ptr(), &gp, None, null_mut(), null_mut()), INVALID_HANDLE);
            assert_eq!((api.session_reset)(bad), INVALID_HANDLE);
            assert_eq!((api.session_history)(bad, null_mut(), 0, &mut n), INVALID_HANDLE);
        }
        for bad in [s as *mut Model, sentinel_model(), 8 as *mut Model] {
            assert_eq!((api.model_n_vocab)(bad), -1);
            assert!(!(api.model_token_is_eog)(bad, 0));
            let mut out = null_mut();
            assert_eq!((api.session_new)(bad, null(), null(), &mut out), INVALID_HANDLE);
            assert!(out.is_null());
            assert!(api.last_error_string().contains("not a live model handle"), "{}", api.last_error_string());
        }
        // A session keeps its target alive after the model handle is freed; the handle is dead.
        (api.model_free)(t);
        assert_eq!((api.model_n_vocab)(t), -1);
        let mut out = null_mut();
        assert_eq!((api.session_new)(t, null(), null(), &mut out), INVALID_HANDLE);
        (api.model_free)(t);
        assert!(api.last_error_string().contains("not a live model handle"), "{}", api.last_error_string());
        let (got, _) = api.generate_text(s, "hi", &gp).unwrap();
        assert_eq!(got.tokens.len(), 2);
        (api.session_free)(s);
    }
}

/// Threads share session handles and call generate, reset and free on them at random, as a
/// careless host might: every call returns a status (OK, BUSY or INVALID_HANDLE once freed),
/// none crashes, and every session that was freed is gone.
#[test]
fn free_racing_generate_and_reset_on_other_threads_is_safe() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    for round in 0..6 {
        let sessions: Vec<usize> =
            (0..3).map(|_| api.new_session(t, null(), &api.session_params(STRATEGY_NONE)) as usize).collect();
        let shared = std::sync::Arc::new(sessions);
        let workers: Vec<_> = (0..6)
            .map(|w| {
                let shared = shared.clone();
                std::thread::spawn(move || {
                    let api = common::api();
                    let text = cstr("Once upon a time");
                    let gp = api.greedy(3);
                    let mut seen = Vec::new();
                    for i in 0..12 {
                        let s = shared[(w + i) % shared.len()] as *mut Session;
                        // SAFETY: live or freed handles; the library refuses freed ones unread.
                        let st = unsafe {
                            match (w + i + round) % 5 {
                                0 if w % 3 == 0 => {
                                    (api.session_free)(s);
                                    OK
                                }
                                1 => (api.session_reset)(s),
                                _ => (api.session_generate)(s, text.as_ptr(), &gp, None, null_mut(), null_mut()),
                            }
                        };
                        seen.push(st);
                    }
                    seen
                })
            })
            .collect();
        for w in workers {
            for st in w.join().expect("worker panicked") {
                assert!([OK, BUSY, INVALID_HANDLE, CONTEXT_FULL].contains(&st), "status {st}");
            }
        }
        for &s in shared.iter() {
            // SAFETY: as above; frees the survivors (a second free only sets the last error).
            unsafe { (api.session_free)(s as *mut Session) };
        }
    }
    // SAFETY: live handle.
    unsafe { (api.model_free)(t) };
}

static STARTED: AtomicBool = AtomicBool::new(false);
static TRIED: AtomicBool = AtomicBool::new(false);
static OTHER_STATUS: AtomicI32 = AtomicI32::new(-1);

unsafe extern "C" fn wait_for_other(_: *const i32, _: usize, _: *const c_char, _: usize, _: *mut c_void) -> bool {
    STARTED.store(true, Ordering::SeqCst);
    let t0 = std::time::Instant::now();
    while !TRIED.load(Ordering::SeqCst) && t0.elapsed().as_secs() < 60 {
        std::thread::sleep(std::time::Duration::from_millis(1));
    }
    true
}

#[test]
fn one_session_one_thread_at_a_time() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let t = api.load(&p.target, None);
    let s = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let addr = s as usize;
    let other = std::thread::spawn(move || {
        while !STARTED.load(Ordering::SeqCst) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let prompt = cstr("hi");
        // SAFETY: the session is live; it is busy generating on the main thread.
        let st = unsafe {
            (api.session_generate)(addr as *mut Session, prompt.as_ptr(), null(), None, null_mut(), null_mut())
        };
        OTHER_STATUS.store(st, Ordering::SeqCst);
        let msg = api.last_error_string();
        TRIED.store(true, Ordering::SeqCst);
        msg
    });
    let prompt = cstr("Once upon a time");
    let gp = api.greedy(4);
    // SAFETY: live session.
    let st = unsafe { (api.session_generate)(s, prompt.as_ptr(), &gp, Some(wait_for_other), null_mut(), null_mut()) };
    let msg = other.join().unwrap();
    assert_eq!(st, OK);
    assert_eq!(OTHER_STATUS.load(Ordering::SeqCst), BUSY, "{msg}");
    assert!(msg.contains("in use"), "{msg}");
    // Afterwards another thread may use it.
    let st = std::thread::spawn(move || {
        let prompt = cstr(" more");
        // SAFETY: live, idle session.
        unsafe { (api.session_generate)(addr as *mut Session, prompt.as_ptr(), null(), None, null_mut(), null_mut()) }
    })
    .join()
    .unwrap();
    assert_eq!(st, OK);
    // Models are shared read-only across threads: tokenize concurrently.
    let ta = t as usize;
    let hs: Vec<_> = (0..4)
        .map(|i| std::thread::spawn(move || api.tokenize_str(ta as *const Model, &format!("thread {i} text"), true)))
        .collect();
    for h in hs {
        assert!(!h.join().unwrap().is_empty());
    }
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(s);
        (api.model_free)(t);
    }
}

/// The real pair: greedy speculative output through the C API equals target-alone output
/// (exact numeric mode), ~32 tokens.
#[test]
fn real_pair_greedy_is_lossless_through_the_c_api() {
    let Some((tp, dp)) = real_pair() else {
        return;
    };
    let api = api();
    // SAFETY: by-value return.
    let mut mp = unsafe { (api.model_default_params)() };
    mp.repack = false;
    let (t, d) = (api.load(&tp, Some(&mp)), api.load(&dp, Some(&mp)));
    // SAFETY: live handles.
    assert_eq!(unsafe { (api.model_check_vocab)(t, d) }, OK, "{}", api.last_error_string());
    let mut sp = api.session_params(STRATEGY_NONE);
    sp.mode = 1;
    sp.n_ctx = 512;
    let plain = api.new_session(t, null(), &sp);
    sp.strategy = STRATEGY_CHAIN;
    let spec = api.new_session(t, d, &sp);
    let prompt = "def quicksort(arr):\n";
    let gp = api.greedy(32);
    let (want, _) = api.generate_text(plain, prompt, &gp).unwrap();
    let (got, stats) = api.generate_text(spec, prompt, &gp).unwrap();
    assert_eq!(got.tokens, want.tokens, "{:?} vs {:?}", got.text(), want.text());
    assert!(stats.n_draft_accepted > 0, "the 0.5B draft accepted nothing: {stats:?}");
    eprintln!("real pair: {:.2} tokens/pass, acceptance {:.2}", stats.tokens_per_pass, stats.acceptance_rate);
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(plain);
        (api.session_free)(spec);
        (api.model_free)(t);
        (api.model_free)(d);
    }
}

#[test]
fn a_failed_generation_leaves_the_session_usable() {
    let api = api();
    let p = tiny(TinyArch::Qwen2);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    let mut sp = api.session_params(STRATEGY_CHAIN);
    (sp.chain_length, sp.n_ctx) = (3, 128);
    let (s, fresh) = (api.new_session(t, d, &sp), api.new_session(t, d, &sp));
    let gp = api.greedy(16);
    api.generate_text(s, "Hello", &gp).unwrap();
    api.generate_text(fresh, "Hello", &gp).unwrap();
    let (status, msg) = api.generate_text(s, &"word ".repeat(300), &gp).expect_err("prompt too long");
    assert_eq!(status, CONTEXT_FULL, "{msg}");
    // The failed call changed nothing: the session goes on exactly as one that never saw it.
    let (a, _) = api.generate_text(s, " again", &gp).unwrap();
    let (b, _) = api.generate_text(fresh, " again", &gp).unwrap();
    assert_eq!(a.tokens, b.tokens);
    // SAFETY: live handles, freed once.
    unsafe {
        (api.session_free)(s);
        (api.session_free)(fresh);
        (api.model_free)(t);
        (api.model_free)(d);
    }
}

/// `value`'s bytes in a buffer of `size` bytes (zero-padded or cut), `struct_size` = `size`,
/// and `tail` written over the bytes past the struct: a struct as another header version sees it.
fn as_version<T: Copy>(value: &T, size: usize, tail: u8) -> Vec<u8> {
    let n = std::mem::size_of::<T>();
    // SAFETY: reading a plain-data struct's bytes.
    let bytes = unsafe { std::slice::from_raw_parts(value as *const T as *const u8, n) };
    let mut v = vec![tail; size.max(n)];
    v[..n.min(size)].copy_from_slice(&bytes[..n.min(size)]);
    v.truncate(size);
    v[..4].copy_from_slice(&(size as u32).to_ne_bytes());
    v
}

#[test]
fn struct_sizes_grow_both_ways() {
    let api = api();
    let p = tiny(TinyArch::Qwen2);
    let t = api.load(&p.target, None);
    let base = api.session_params(STRATEGY_AUTO);
    let ours = std::mem::size_of::<SessionParams>();
    let v1 = std::mem::offset_of!(SessionParams, lookup); // ABI v1 ended with `seed`
    let try_new = |bytes: &[u8]| {
        let mut s = null_mut();
        // SAFETY: live handle; `bytes` holds struct_size readable bytes.
        let st = unsafe { (api.session_new)(t, null(), bytes.as_ptr() as *const SessionParams, &mut s) };
        if st == OK {
            // SAFETY: live handle.
            unsafe { (api.session_free)(s) };
        }
        (st, api.last_error_string())
    };
    // A host built with the v1 header: no `lookup` field; it gets the default.
    assert_eq!(try_new(&as_version(&base, v1, 0)).0, OK);
    // A host built with a newer header: unknown fields zero are fine, set ones are refused.
    assert_eq!(try_new(&as_version(&base, ours + 16, 0)).0, OK);
    let (st, msg) = try_new(&as_version(&base, ours + 16, 7));
    assert_eq!(st, STRUCT_SIZE, "{msg}");
    assert!(msg.contains("does not know"), "{msg}");
    assert_eq!(try_new(&as_version(&base, v1 - 4, 0)).0, STRUCT_SIZE);

    // Out-struct from a newer header: written up to this library's size, the rest untouched.
    let s = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    // SAFETY: by-value return.
    let stats = unsafe { (api.stats_default)() };
    let big = std::mem::size_of::<Stats>() + 24;
    let mut buf = as_version(&stats, big, 0xAB);
    let gp = api.greedy(4);
    let prompt = cstr("hello");
    // SAFETY: live session; `buf` holds struct_size writable bytes.
    let st =
        unsafe { (api.session_generate)(s, prompt.as_ptr(), &gp, None, null_mut(), buf.as_mut_ptr() as *mut Stats) };
    assert_eq!(st, OK, "{}", api.last_error_string());
    assert_eq!(u32::from_ne_bytes(buf[..4].try_into().unwrap()) as usize, big, "struct_size overwritten");
    assert!(buf[std::mem::size_of::<Stats>()..].iter().all(|&b| b == 0xAB), "wrote past this library's struct");
    // SAFETY: the prefix is a Stats written by the library.
    let got: Stats = unsafe { std::ptr::read_unaligned(buf.as_ptr() as *const Stats) };
    assert_eq!(got.n_tokens, 4);
    // SAFETY: live handles.
    unsafe {
        (api.session_free)(s);
        (api.model_free)(t);
    }
}

#[test]
fn booleans_are_read_as_bytes() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    // SAFETY: by-value return.
    let base = unsafe { (api.model_default_params)() };
    let with_repack = |byte: u8| {
        let mut bytes = as_version(&base, std::mem::size_of::<ModelParams>(), 0);
        let at = std::mem::offset_of!(ModelParams, repack);
        bytes[at] = byte;
        let at = std::mem::offset_of!(ModelParams, use_mmap);
        bytes[at] = 0xFF;
        let path = cstr(p.target.to_str().unwrap());
        let mut m = null_mut();
        // SAFETY: valid path; `bytes` is a whole ModelParams.
        let st = unsafe { (api.model_load)(path.as_ptr(), bytes.as_ptr() as *const ModelParams, &mut m) };
        assert_eq!(st, OK, "{}", api.last_error_string());
        m
    };
    let mut exact = api.session_params(STRATEGY_CHAIN);
    exact.mode = 1; // needs repack = false
                    // On AMX CPUs the library never repacks (llama.cpp #20824), so exact mode takes every
                    // model and only "no crash, no UB" is observable.
    let refused = if engine::backend::repacking_available() { INVALID_PARAM } else { OK };
    for (byte, want) in [(0x00u8, OK), (0x01, refused), (0x02, refused), (0xFF, refused)] {
        let t = with_repack(byte);
        let mut s = null_mut();
        // SAFETY: live handle, valid params.
        let st = unsafe { (api.session_new)(t, null(), &exact, &mut s) };
        assert_eq!(st, want, "repack byte {byte:#04x} must read as {}", byte != 0);
        // SAFETY: live handles (s may be NULL).
        unsafe {
            (api.session_free)(s);
            (api.model_free)(t);
        }
    }
}

static LOG_LINES: AtomicI32 = AtomicI32::new(0);

unsafe extern "C" fn count_lines(level: i32, text: *const c_char, user_data: *mut c_void) {
    assert!((1..=5).contains(&level) || level == 0, "level {level}");
    // SAFETY: a NUL-terminated line valid during the call (header contract).
    let line = unsafe { CStr::from_ptr(text) };
    assert!(!line.to_bytes().ends_with(b"\n"));
    assert_eq!(user_data as usize, 0x5eed);
    LOG_LINES.fetch_add(1, Ordering::SeqCst);
}

#[test]
fn log_lines_reach_the_host_only_through_its_callback() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    // SAFETY: our own library; the symbol has the header's signature.
    let set: libloading::Symbol<
        unsafe extern "C" fn(Option<unsafe extern "C" fn(i32, *const c_char, *mut c_void)>, *mut c_void),
    > = unsafe { api.lib().get(b"adaspec_set_log_callback\0") }.expect("dlsym adaspec_set_log_callback");
    // SAFETY: a 'static callback; user_data is only passed back.
    unsafe { set(Some(count_lines), 0x5eed as *mut c_void) };
    let t = api.load(&p.target, None);
    let seen = LOG_LINES.load(Ordering::SeqCst);
    assert!(seen > 0, "loading a model logged nothing to the callback");
    // SAFETY: removing the callback; then a load must not call it.
    unsafe { set(None, null_mut()) };
    let t2 = api.load(&p.target, None);
    assert_eq!(LOG_LINES.load(Ordering::SeqCst), seen, "the callback ran after it was removed");
    // SAFETY: live handles.
    unsafe {
        (api.model_free)(t);
        (api.model_free)(t2);
    }
}

/// A tokenizer whose token texts repeat makes llama.cpp abort the process
/// (`GGML_ASSERT(id_to_token.size() == token_to_id.size())`); the library refuses it first.
#[test]
fn a_vocabulary_with_duplicate_tokens_is_refused_not_fatal() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let mut bytes = std::fs::read(&p.target).expect("read tiny model");
    // Two different tokens with texts of the same length: overwrite the second's text with
    // the first's, in place (GGUF strings are a u64 length and the bytes).
    let vocab = &engine::tiny_model::tiny_vocab().tokens;
    let find = |hay: &[u8], text: &str| -> Option<usize> {
        let mut needle = (text.len() as u64).to_le_bytes().to_vec();
        needle.extend_from_slice(text.as_bytes());
        hay.windows(needle.len()).position(|w| w == needle).map(|i| i + 8)
    };
    let (a, b) = vocab
        .iter()
        .enumerate()
        .filter(|(_, t)| t.len() >= 4)
        .find_map(|(i, a)| vocab[i + 1..].iter().find(|b| b.len() == a.len()).map(|b| (a.clone(), b.clone())))
        .expect("two tokens of equal length");
    let at = find(&bytes, &b).expect("token text in the file");
    bytes[at..at + a.len()].copy_from_slice(a.as_bytes());
    let dir = std::env::temp_dir().join(format!("adaspec-dup-vocab-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("dup.gguf");
    std::fs::write(&path, &bytes).unwrap();
    let c = cstr(path.to_str().unwrap());
    let mut m = null_mut();
    // SAFETY: valid path and out pointer.
    let st = unsafe { (api.model_load)(c.as_ptr(), null(), &mut m) };
    let msg = api.last_error_string();
    assert_eq!(st, MODEL_FILE, "{msg}");
    assert!(msg.contains("twice"), "{msg}");
    assert!(m.is_null());
    let _ = std::fs::remove_dir_all(&dir);
}

#[test]
fn a_head_session_is_lossless_and_misuse_is_reported() {
    let api = api();
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let p = tiny(arch);
        // A random-weight eagle3 head for the tiny target (its layers, hidden size, tokenizer).
        let head_path = p.dir.join("head.gguf");
        let cfg = engine::tiny_model::TinyModelConfig { arch, seed: 11, ..Default::default() };
        engine::tiny_model::write_tiny_head(&head_path, &cfg, &Default::default()).expect("write head");
        let (t, h, d) = (api.load(&p.target, None), api.load(&head_path, None), api.load(&p.draft, None));
        let plain = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
        let mut chain = api.session_params(STRATEGY_CHAIN);
        chain.chain_length = 3;
        let mut tree = api.session_params(STRATEGY_TREE);
        (tree.tree_top_k, tree.tree_depth, tree.tree_nodes) = (3, 3, 10);
        let gp = api.greedy(64);
        let (want, _) = api.generate_text(plain, "The quick brown fox jumps over", &gp).unwrap();
        for sp in [chain, tree] {
            let mut s = null_mut();
            // SAFETY: live handles, valid params and out pointer.
            let st = unsafe { (api.session_new_with_head)(t, h, &sp, &mut s) };
            assert_eq!(st, OK, "{}", api.last_error_string());
            let (got, stats) = api.generate_text(s, "The quick brown fox jumps over", &gp).unwrap();
            assert_eq!(got.tokens, want.tokens, "{arch:?}: head session differs from target alone");
            assert!(stats.n_draft_proposed > 0, "{arch:?}: the head proposed nothing");
            // SAFETY: live session, freed once.
            unsafe { (api.session_free)(s) };
        }
        let mut s = null_mut();
        // SAFETY: each call gets valid or NULL pointers as documented.
        unsafe {
            assert_eq!((api.session_new_with_head)(t, null(), &chain, &mut s), NULL_ARGUMENT);
            assert!(api.last_error_string().contains("head"), "{}", api.last_error_string());
            // A plain model is not a head.
            assert_eq!((api.session_new_with_head)(t, d, &chain, &mut s), MODEL_FILE);
            assert!(api.last_error_string().contains("eagle3"), "{}", api.last_error_string());
            // A head is not a model that decodes on its own: refused as target or draft.
            assert_eq!((api.session_new_with_head)(h, h, &chain, &mut s), INVALID_PARAM);
            assert!(api.last_error_string().contains("eagle3 head"), "{}", api.last_error_string());
            assert_eq!((api.session_new)(t, h, &chain, &mut s), INVALID_PARAM);
            assert!(api.last_error_string().contains("eagle3 head"), "{}", api.last_error_string());
            // A head made for another target (hidden size 32, not 64).
            let other_path = p.dir.join("head-other.gguf");
            let other_cfg = engine::tiny_model::TinyModelConfig { n_embd: 32, n_head: 2, n_head_kv: 1, ..cfg.clone() };
            engine::tiny_model::write_tiny_head(&other_path, &other_cfg, &Default::default()).expect("write head");
            let other = api.load(&other_path, None);
            assert_eq!((api.session_new_with_head)(t, other, &chain, &mut s), INCOMPATIBLE_VOCAB);
            assert!(api.last_error_string().contains("hidden size"), "{}", api.last_error_string());
            assert!(s.is_null());
            (api.session_free)(plain);
            for m in [t, h, d, other] {
                (api.model_free)(m);
            }
        }
    }
}

/// FSPAD-family heads through the C ABI: `adaspec_session_new_with_head_file` loads an `fspad`
/// head (or an `eagle3` one) by path; greedy output equals target alone for each variant, also
/// beside a draft model (`adaspec_session_new_with_draft_and_head_file`), and bad paths and
/// files are a status with a message.
#[test]
fn an_fspad_head_session_is_lossless_and_bad_files_are_reported() {
    use engine::fspad::Variant;
    let api = api();
    let p = tiny(TinyArch::Qwen2);
    let cfg = engine::tiny_model::TinyModelConfig { arch: TinyArch::Qwen2, seed: 11, ..Default::default() };
    let t = api.load(&p.target, None);
    let plain = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let gp = api.greedy(48);
    let (want, _) = api.generate_text(plain, "The quick brown fox jumps over", &gp).unwrap();
    let mut tree = api.session_params(STRATEGY_TREE);
    (tree.tree_top_k, tree.tree_depth, tree.tree_nodes) = (3, 3, 10);
    for v in Variant::ALL {
        let path = p.dir.join(format!("fspad-{}.gguf", v.name()));
        engine::tiny_model::write_tiny_fspad_head(&path, &cfg, v, &Default::default()).expect("write head");
        let c = cstr(path.to_str().unwrap());
        let mut s = null_mut();
        // SAFETY: live target, valid path, params and out pointer.
        let st = unsafe { (api.session_new_with_head_file)(t, c.as_ptr(), &tree, &mut s) };
        assert_eq!(st, OK, "{v}: {}", api.last_error_string());
        let (got, stats) = api.generate_text(s, "The quick brown fox jumps over", &gp).unwrap();
        assert_eq!(got.tokens, want.tokens, "{v}: head session differs from target alone");
        assert!(stats.n_draft_proposed > 0, "{v}: the head proposed nothing");
        // SAFETY: live session, freed once.
        unsafe { (api.session_free)(s) };
        // The same head beside a draft model: `auto` picks one per round, the chain uses the
        // draft model; the output stays the target's.
        let d = api.load(&p.draft, None);
        for sp in [api.session_params(STRATEGY_AUTO), api.session_params(STRATEGY_CHAIN)] {
            let mut s = null_mut();
            // SAFETY: live target and draft, valid path, params and out pointer.
            let st = unsafe { (api.session_new_with_draft_and_head_file)(t, d, c.as_ptr(), &sp, &mut s) };
            assert_eq!(st, OK, "{v} with a draft: {}", api.last_error_string());
            let (got, _) = api.generate_text(s, "The quick brown fox jumps over", &gp).unwrap();
            assert_eq!(got.tokens, want.tokens, "{v} with a draft: differs from target alone");
            // SAFETY: live session, freed once.
            unsafe { (api.session_free)(s) };
        }
        let mut s = null_mut();
        // SAFETY: a NULL draft is refused with a status.
        unsafe {
            let st = (api.session_new_with_draft_and_head_file)(t, null(), c.as_ptr(), &tree, &mut s);
            assert_eq!(st, NULL_ARGUMENT);
            assert!(s.is_null());
            (api.model_free)(d);
        }
    }
    let mut s = null_mut();
    let missing = cstr(p.dir.join("no-such-head.gguf").to_str().unwrap());
    let not_gguf = p.dir.join("not-a-head.gguf");
    std::fs::write(&not_gguf, b"GGUF\x03\0\0\0 truncated").unwrap();
    let not_gguf = cstr(not_gguf.to_str().unwrap());
    // SAFETY: each call gets valid or NULL pointers as documented.
    unsafe {
        assert_eq!((api.session_new_with_head_file)(t, null(), &tree, &mut s), NULL_ARGUMENT);
        assert_eq!((api.session_new_with_head_file)(t, missing.as_ptr(), &tree, &mut s), MODEL_FILE);
        assert_eq!((api.session_new_with_head_file)(t, not_gguf.as_ptr(), &tree, &mut s), MODEL_FILE);
        assert!(!api.last_error_string().is_empty());
        assert!(s.is_null());
        (api.session_free)(plain);
        (api.model_free)(t);
    }
}

/// Inputs at and past llama.cpp's limits: the largest accepted sizes work, token ids outside
/// the vocabulary, prompts longer than the context, unbounded lengths and huge or many stop
/// strings get a status (never an abort, which would end this test process).
#[test]
fn extreme_inputs_get_a_status_not_an_abort() {
    let api = api();
    let p = tiny(TinyArch::Llama);
    let (t, d) = (api.load(&p.target, None), api.load(&p.draft, None));
    // SAFETY: live model handle.
    let n_vocab = unsafe { (api.model_n_vocab)(t) };
    // The largest strategies the session accepts (255 sequences at most in llama.cpp).
    let mut chain = api.session_params(STRATEGY_CHAIN);
    chain.chain_length = 64;
    let mut tree = api.session_params(STRATEGY_TREE);
    (tree.tree_top_k, tree.tree_depth, tree.tree_nodes) = (16, 16, 254);
    let mut many_threads = api.session_params(STRATEGY_NONE);
    many_threads.n_threads = 64;
    let plain = api.new_session(t, null(), &api.session_params(STRATEGY_NONE));
    let gp = api.greedy(20);
    let (want, _) = api.generate_text(plain, "Once upon a time", &gp).unwrap();
    for sp in [chain, tree, many_threads] {
        let s = api.new_session(t, d, &sp);
        let (got, _) = api.generate_text(s, "Once upon a time", &gp).unwrap();
        assert_eq!(got.tokens, want.tokens, "{sp:?}");
        // SAFETY: live session.
        unsafe { (api.session_free)(s) };
    }
    // SAFETY: live handles; every pointer argument is valid for its count.
    unsafe {
        let s = api.new_session(t, d, &api.session_params(STRATEGY_CHAIN));
        for bad in [-1, n_vocab, i32::MAX, i32::MIN] {
            let ids = [1, 2, bad, 3];
            let st = (api.session_generate_tokens)(s, ids.as_ptr(), ids.len(), &gp, None, null_mut(), null_mut());
            assert_eq!(st, INVALID_PARAM, "token id {bad}: {}", api.last_error_string());
            assert!(api.last_error_string().contains("outside the vocabulary"), "{}", api.last_error_string());
        }
        // A prompt longer than the context (1024).
        let long: Vec<i32> = (0..5000).map(|i| 1 + i % (n_vocab - 1)).collect();
        let st = (api.session_generate_tokens)(s, long.as_ptr(), long.len(), &gp, None, null_mut(), null_mut());
        assert_eq!(st, CONTEXT_FULL, "{}", api.last_error_string());
        // Unbounded generation ends at the context.
        let mut small = api.session_params(STRATEGY_CHAIN);
        small.n_ctx = 64;
        let s2 = api.new_session(t, d, &small);
        let mut stats = (api.stats_default)();
        let endless = GenerateParams { max_tokens: i32::MAX, top_k: i32::MAX, ..api.greedy(0) };
        let text = cstr("Once upon a time");
        let st = (api.session_generate)(s2, text.as_ptr(), &endless, None, null_mut(), &mut stats);
        assert_eq!(st, OK, "{}", api.last_error_string());
        assert_eq!(stats.stop_reason, 4, "stop reason {} (want context full)", stats.stop_reason);
        // 64 stop strings, one of them a megabyte long.
        let huge = cstr(&"x".repeat(1 << 20));
        let stops: Vec<CString> = (0..63).map(|i| cstr(&format!("never-{i}"))).collect();
        let mut ptrs: Vec<*const c_char> = stops.iter().map(|c| c.as_ptr()).collect();
        ptrs.push(huge.as_ptr());
        let with_stops = GenerateParams { stop_strings: ptrs.as_ptr(), n_stop_strings: ptrs.len(), ..gp };
        (api.session_reset)(s);
        let st = (api.session_generate)(s, text.as_ptr(), &with_stops, None, null_mut(), null_mut());
        assert_eq!(st, OK, "{}", api.last_error_string());
        for h in [s, s2, plain] {
            (api.session_free)(h);
        }
        (api.model_free)(t);
        (api.model_free)(d);
    }
}
