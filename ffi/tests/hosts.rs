//! The example hosts, built and run from Rust: the C host (dlopen + dlsym) and the C++ host
//! (linked), compiled with -Wall -Wextra -Werror; their streamed stdout must equal the
//! engine's output for the same inputs. The C host also runs under a memory checker
//! (valgrind memcheck where it can execute this build, AddressSanitizer + LeakSanitizer
//! otherwise), and both hosts build against an installed copy through pkg-config.

mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use common::*;
use engine::tiny_model::TinyArch;

/// A scratch folder removed when the test ends.
struct Scratch(PathBuf);

impl Scratch {
    fn new(name: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("adaspec-ffi-hosts-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn run_ok(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed ({}):\nstdout: {}\nstderr: {}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

const C_FLAGS: &[&str] = &["-std=c99", "-Wall", "-Wextra", "-Werror", "-pedantic"];
const CXX_FLAGS: &[&str] = &["-std=c++17", "-Wall", "-Wextra", "-Werror", "-pedantic"];

fn build_c_host(out: &Path, extra: &[&str]) {
    let src = root().join("examples/c/host_dlopen.c");
    let inc = root().join("include");
    run_ok(Command::new("cc").args(C_FLAGS).args(extra).arg("-I").arg(&inc).arg(&src).arg("-ldl").arg("-o").arg(out));
}

fn build_cpp_host(out: &Path) {
    let src = root().join("examples/cpp/host_link.cpp");
    let inc = root().join("include");
    let lib = soname_dir(out);
    run_ok(
        Command::new("c++")
            .args(CXX_FLAGS)
            .arg("-I")
            .arg(&inc)
            .arg(&src)
            .arg(format!("-L{}", lib.display()))
            .arg("-ladaspec")
            .arg(format!("-Wl,-rpath,{}", lib.display()))
            .arg("-o")
            .arg(out),
    );
}

fn engine_text(
    p: &TinyPair,
    draft: bool,
    strategy: engine::Strategy,
    prompts: Vec<engine::Prompt>,
    max_tokens: usize,
) -> String {
    let gp = engine::GenerateParams { max_tokens, ignore_eog: true, ..Default::default() };
    engine_generate(&p.target, draft.then_some(p.draft.as_path()), strategy, &prompts, &gp)
        .into_iter()
        .map(|g| g.text)
        .collect()
}

fn c_host(bin: &Path, lib: &Path, p: &TinyPair, args: &[&str], draft: bool) -> Command {
    let mut cmd = Command::new(bin);
    cmd.arg("--lib").arg(lib).args(["--threads", "2", "--ctx", "1024", "--ignore-eog"]).args(args).arg(&p.target);
    if draft {
        cmd.arg(&p.draft);
    }
    cmd
}

#[test]
fn c_host_builds_warning_free_and_streams_the_engine_output() {
    let s = Scratch::new("c");
    let bin = s.0.join("host_dlopen");
    build_c_host(&bin, &[]);
    let p = tiny(TinyArch::Llama);
    let lib = lib_path();
    let prompt = "def fibonacci(n):\n    return";

    // Speculative chain, text prompt.
    let out = run_ok(&mut c_host(&bin, &lib, p, &["--strategy", "chain", "-n", "48", "--prompt", prompt], true));
    let want = engine_text(p, true, engine::Strategy::Chain(4), vec![engine::Prompt::Text(prompt.into())], 48);
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("tokens 48") && err.contains("tokens/pass") && err.contains("libadaspec 0.1.0"), "{err}");

    // Target alone through the same host: the same text (lossless).
    let plain = run_ok(&mut c_host(&bin, &lib, p, &["-n", "48", "--prompt", prompt], false));
    assert_eq!(plain.stdout, out.stdout);

    // Chat template, two turns, dynamic tree and auto.
    let q = tiny(TinyArch::Qwen2);
    let msgs = || vec![engine::ChatMessage::new("user", "Write a loop.")];
    let want = engine_text(
        q,
        true,
        engine::Strategy::Tree { top_k: 4, depth: 5, nodes: 16 },
        vec![engine::Prompt::Chat(msgs()), engine::Prompt::Chat(msgs())],
        24,
    );
    for strategy in ["tree", "auto"] {
        let out = run_ok(&mut c_host(
            &bin,
            &lib,
            q,
            &["--strategy", strategy, "--chat", "--turns", "2", "-n", "24", "--prompt", "Write a loop."],
            true,
        ));
        assert_eq!(String::from_utf8_lossy(&out.stdout), want, "{strategy}");
        assert!(String::from_utf8_lossy(&out.stderr).contains("[turn 2]"));
    }

    // Errors reach the host as statuses and messages, never as a crash.
    let missing = s.0.join("missing.gguf");
    let out = Command::new(&bin).arg("--lib").arg(&lib).arg(&missing).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ADASPEC_STATUS_MODEL_FILE") && err.contains("missing.gguf"), "{err}");
    let out = Command::new(&bin).arg("--lib").arg(s.0.join("nope.so")).arg(&p.target).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let out = c_host(&bin, &lib, p, &["--strategy", "chain", "--draft-len", "0"], true).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("chain_length"));
}

#[test]
fn cpp_host_links_and_streams_the_engine_output() {
    let s = Scratch::new("cpp");
    let bin = s.0.join("host_link");
    build_cpp_host(&bin);
    let p = tiny(TinyArch::Llama);
    let prompt = "Once upon a time";
    let out = run_ok(
        Command::new(&bin)
            .args(["--turns", "2", "-n", "20", "--threads", "2", "--ctx", "1024", "--strategy", "chain"])
            .args(["--prompt", prompt])
            .arg(&p.target)
            .arg(&p.draft),
    );
    let want = engine_text(
        p,
        true,
        engine::Strategy::Chain(4),
        vec![engine::Prompt::Text(prompt.into()), engine::Prompt::Text(prompt.into())],
        20,
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("[turn 2]") && err.contains("conversation:"), "{err}");
    // Bad input: a clean error and exit status, not an abort.
    let out = Command::new(&bin).arg(s.0.join("missing.gguf")).output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stderr).contains("ADASPEC_STATUS_MODEL_FILE"));
}

/// valgrind cannot decode AVX-512, which this build uses when the CPU has it
/// (`-C target-cpu=native`); probe instead of guessing.
fn valgrind_runs(bin: &Path, lib: &Path, p: &TinyPair) -> bool {
    let Ok(out) = Command::new("valgrind").arg("--version").output() else {
        eprintln!("valgrind not installed");
        return false;
    };
    if !out.status.success() {
        return false;
    }
    let probe = Command::new("valgrind")
        .args(["-q", "--error-exitcode=0"])
        .arg(bin)
        .arg("--lib")
        .arg(lib)
        .args(["-n", "1", "--threads", "1", "--ctx", "64"])
        .arg(&p.target)
        .output();
    match probe {
        Ok(o) => {
            let err = String::from_utf8_lossy(&o.stderr);
            if err.contains("unhandled instruction") || err.contains("SIGILL") {
                eprintln!(
                    "valgrind cannot execute this build of libadaspec (instructions it does not decode, \
                     e.g. AVX-512 from -C target-cpu=native); set ADASPEC_VALGRIND_LIB to a library built \
                     with RUSTFLAGS='-C target-cpu=x86-64-v3' to run memcheck; using AddressSanitizer"
                );
                false
            } else {
                true
            }
        }
        Err(_) => false,
    }
}

#[test]
fn c_host_is_clean_under_a_memory_checker() {
    let s = Scratch::new("memcheck");
    let p = tiny(TinyArch::Llama);
    let args =
        ["--ignore-eog", "--strategy", "chain", "-n", "6", "--threads", "2", "--ctx", "256", "--prompt", "def f(x):"];
    let want = engine_text(p, true, engine::Strategy::Chain(4), vec![engine::Prompt::Text("def f(x):".into())], 6);

    // valgrind memcheck, when it can run the library.
    let bin = s.0.join("host_dlopen");
    build_c_host(&bin, &["-g"]);
    let lib = std::env::var_os("ADASPEC_VALGRIND_LIB").map(PathBuf::from).unwrap_or_else(lib_path);
    let mut checked = false;
    if valgrind_runs(&bin, &lib, p) {
        let log = s.0.join("valgrind.log");
        let out = Command::new("valgrind")
            .args(["--tool=memcheck", "--leak-check=full", "--errors-for-leak-kinds=definite"])
            .args(["--error-exitcode=99", "--track-origins=no"])
            .arg(format!("--log-file={}", log.display()))
            .arg(&bin)
            .arg("--lib")
            .arg(&lib)
            .args(args)
            .arg(&p.target)
            .arg(&p.draft)
            .env("ADASPEC_NO_DLCLOSE", "1")
            .output()
            .expect("run valgrind");
        let report = std::fs::read_to_string(&log).unwrap_or_default();
        assert!(out.status.success(), "valgrind found errors ({}):\n{report}", out.status);
        assert!(report.contains("ERROR SUMMARY: 0 errors"), "{report}");
        assert!(!report.contains("Invalid read") && !report.contains("Invalid write"), "{report}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        eprintln!("valgrind memcheck: clean");
        checked = true;
    }

    // AddressSanitizer + LeakSanitizer: the host instrumented, every malloc/free of the
    // process (Rust and llama.cpp included) tracked; leaks reported at exit.
    let asan = s.0.join("host_dlopen_asan");
    let cc_has_asan = Command::new("cc")
        .args(C_FLAGS)
        .args(["-g", "-fsanitize=address", "-fno-omit-frame-pointer"])
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join("examples/c/host_dlopen.c"))
        .arg("-ldl")
        .arg("-o")
        .arg(&asan)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    if cc_has_asan {
        let out = Command::new(&asan)
            .arg("--lib")
            .arg(lib_path())
            .args(args)
            .arg(&p.target)
            .arg(&p.draft)
            .env("ADASPEC_NO_DLCLOSE", "1")
            .env("ASAN_OPTIONS", "detect_leaks=1:exitcode=98:abort_on_error=0")
            .output()
            .expect("run asan host");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(out.status.success(), "AddressSanitizer/LeakSanitizer report ({}):\n{err}", out.status);
        assert!(!err.contains("ERROR: AddressSanitizer") && !err.contains("ERROR: LeakSanitizer"), "{err}");
        assert_eq!(String::from_utf8_lossy(&out.stdout), want);
        eprintln!("AddressSanitizer + LeakSanitizer: clean");
        checked = true;
    }
    assert!(checked, "neither valgrind nor AddressSanitizer could run");
}

/// ffi/tests/c/stress_threads.c, linked against libadaspec.so, with `extra` compiler flags.
fn build_stress_host(out: &Path, extra: &[&str]) -> Result<(), String> {
    let mut flags = vec!["-std=c11", "-Wall", "-Wextra", "-Werror", "-pedantic", "-g", "-pthread"];
    flags.extend_from_slice(extra);
    build_linked_c_host("ffi/tests/c/stress_threads.c", out, &flags)
}

/// Parses the stress host's "ok <calls> <busy> <stale>" line.
fn stress_counts(out: &Output) -> (u64, u64, u64) {
    let line = String::from_utf8_lossy(&out.stdout);
    let v: Vec<u64> = line.split_whitespace().skip(1).filter_map(|x| x.parse().ok()).collect();
    assert_eq!(v.len(), 3, "stress host printed {line:?}");
    (v[0], v[1], v[2])
}

/// Threads calling generate, reset and free on shared session handles (and on handles other
/// threads freed meanwhile): AddressSanitizer (the host instrumented, every malloc/free of the
/// process tracked, leaks checked) and, where it can run this build, valgrind memcheck (every
/// access of the library checked) find nothing; stale handles are refused; the environment
/// is left as it was.
#[test]
fn threads_freeing_shared_sessions_are_clean_under_asan_and_valgrind() {
    let s = Scratch::new("stress");
    let p = tiny(TinyArch::Llama);
    let mut checked = false;
    let asan = s.0.join("stress_asan");
    match build_stress_host(&asan, &["-fsanitize=address", "-fno-omit-frame-pointer"]) {
        Ok(()) => {
            let out = Command::new(&asan)
                .arg(&p.target)
                .args(["8", "300"])
                .env_remove("KMP_BLOCKTIME")
                .env("ASAN_OPTIONS", "detect_leaks=1:exitcode=98:abort_on_error=0")
                .output()
                .expect("run stress host");
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(out.status.success(), "stress host under AddressSanitizer ({}):\n{err}", out.status);
            assert!(!err.contains("ERROR: AddressSanitizer") && !err.contains("ERROR: LeakSanitizer"), "{err}");
            let (calls, busy, stale) = stress_counts(&out);
            eprintln!("AddressSanitizer: {calls} calls, {busy} BUSY, {stale} on freed handles: clean");
            assert!(busy > 0 && stale > 0, "the run raced nothing: {calls} calls, {busy} busy, {stale} stale");
            checked = true;
        }
        Err(e) => eprintln!("cc cannot build with AddressSanitizer: {e}"),
    }
    let plain = s.0.join("stress");
    build_stress_host(&plain, &[]).expect("build the stress host");
    let lib = std::env::var_os("ADASPEC_VALGRIND_LIB").map(PathBuf::from);
    let mut vg = Command::new("valgrind");
    vg.args(["--tool=memcheck", "--error-exitcode=99", "--leak-check=full", "--errors-for-leak-kinds=definite"]);
    vg.arg(&plain).arg(&p.target).args(["4", "30"]).env_remove("KMP_BLOCKTIME");
    if let Some(lib) = &lib {
        // The host finds libadaspec.so.0 through LD_LIBRARY_PATH before its runpath.
        let dir = s.0.join("valgrind-lib");
        std::fs::create_dir_all(&dir).expect("dir");
        std::os::unix::fs::symlink(lib, dir.join(format!("libadaspec.so.{}", env!("CARGO_PKG_VERSION_MAJOR"))))
            .expect("symlink");
        vg.env("LD_LIBRARY_PATH", &dir);
    }
    match vg.output() {
        Ok(out) => {
            let err = String::from_utf8_lossy(&out.stderr);
            if err.contains("unhandled instruction") || err.contains("SIGILL") {
                eprintln!(
                    "valgrind cannot execute this build (AVX-512 from -C target-cpu=native); set \
                     ADASPEC_VALGRIND_LIB to a libadaspec.so built for x86-64-v3 to run memcheck"
                );
            } else {
                assert!(out.status.success(), "valgrind memcheck ({}):\n{err}", out.status);
                assert!(err.contains("ERROR SUMMARY: 0 errors"), "{err}");
                let (calls, busy, stale) = stress_counts(&out);
                eprintln!("valgrind memcheck: {calls} calls, {busy} BUSY, {stale} on freed handles: clean");
                checked = true;
            }
        }
        Err(e) => eprintln!("valgrind not runnable: {e}"),
    }
    assert!(checked, "neither AddressSanitizer nor valgrind could check the stress host");
}

/// The llama.cpp build (headers and static archives) llama-cpp-sys-2 made for this target
/// folder: the newest, when features made several.
fn llama_cpp_build() -> PathBuf {
    let build = lib_dir().join("build");
    let mut outs: Vec<(std::time::SystemTime, PathBuf)> = std::fs::read_dir(&build)
        .expect("target/release/build")
        .filter_map(|e| e.ok())
        .filter(|e| e.file_name().to_string_lossy().starts_with("llama-cpp-sys-2-"))
        .map(|e| e.path().join("out"))
        .filter(|o| o.join("lib/libllama.a").exists() && o.join("include/llama.h").exists())
        .map(|o| (std::fs::metadata(o.join("lib/libllama.a")).and_then(|m| m.modified()).unwrap(), o))
        .collect();
    outs.sort();
    outs.pop().map(|(_, o)| o).expect("no llama-cpp-sys-2 build with lib/libllama.a under target/release/build")
}

const LLAMA_ARCHIVES: &[&str] = &["libllama.a", "libggml.a", "libggml-cpu.a", "libggml-base.a"];

/// Parses two_llamas.c's report into its labelled lines.
fn report(out: &Output) -> std::collections::HashMap<String, String> {
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_once(' ').map(|(k, v)| (k.to_string(), v.to_string())))
        .collect()
}

/// A host with its own llama.cpp (the same sources, linked as a shared libllama.so loaded
/// before libadaspec, and statically into the executable) and libadaspec.so in one process:
/// the host's greedy tokens before and after libadaspec ran equal libadaspec's, the host's
/// llama.cpp log callback keeps getting its own llama.cpp's lines and none of libadaspec's
/// (neither copy interposes the other), nothing is written to stderr, signal handlers stay as
/// they were and no threads beyond the session's n_threads remain.
#[test]
fn a_host_with_its_own_llama_cpp_uses_both() {
    let s = Scratch::new("two-llamas");
    let p = tiny(TinyArch::Llama);
    let llama = llama_cpp_build();
    let archives: Vec<PathBuf> = LLAMA_ARCHIVES.iter().map(|a| llama.join("lib").join(a)).collect();
    let own = s.0.join("own");
    std::fs::create_dir_all(&own).unwrap();
    // libllama.so from the archives (they hold position-independent code: libadaspec.so is
    // linked from them too). ggml's CPU backend uses OpenMP.
    run_ok(
        Command::new("c++")
            .args(["-shared", "-o"])
            .arg(own.join("libllama.so"))
            .arg("-Wl,--whole-archive")
            .args(&archives)
            .args(["-Wl,--no-whole-archive", "-lgomp", "-lpthread"]),
    );
    let src = root().join("ffi/tests/c/two_llamas.c");
    let adaspec = soname_dir(&s.0.join("adaspec"));
    let cflags = ["-std=c11", "-Wall", "-Wextra", "-Werror", "-D_DEFAULT_SOURCE"];
    let inc = |c: &mut Command| {
        c.arg("-I").arg(root().join("include")).arg("-I").arg(llama.join("include"));
    };
    let shared = s.0.join("two_llamas_shared");
    let mut c = Command::new("cc");
    c.args(cflags);
    inc(&mut c);
    c.arg(&src).arg(format!("-L{}", own.display())).arg("-lllama");
    c.arg(format!("-L{}", adaspec.display())).arg("-ladaspec");
    c.arg(format!("-Wl,-rpath,{}:{}", own.display(), adaspec.display())).arg("-o").arg(&shared);
    run_ok(&mut c);
    let stat = s.0.join("two_llamas_static");
    let obj = s.0.join("two_llamas.o");
    let mut c = Command::new("cc");
    c.args(cflags).arg("-c");
    inc(&mut c);
    run_ok(c.arg(&src).arg("-o").arg(&obj));
    run_ok(
        Command::new("c++")
            .arg(&obj)
            .arg("-Wl,--start-group")
            .args(&archives)
            .arg("-Wl,--end-group")
            .arg(format!("-L{}", adaspec.display()))
            .arg("-ladaspec")
            .arg(format!("-Wl,-rpath,{}", adaspec.display()))
            .args(["-lgomp", "-lpthread", "-o"])
            .arg(&stat),
    );
    for (name, bin) in [("shared libllama.so", &shared), ("static llama.cpp", &stat)] {
        let out = run_ok(Command::new(bin).arg(&p.target).arg("12"));
        let r = report(&out);
        let get = |k: &str| r.get(k).unwrap_or_else(|| panic!("{name}: no {k} line in {r:?}")).clone();
        let before = get("host-before");
        assert_eq!(before.split_whitespace().count(), 12, "{name}: {before}");
        assert_eq!(get("adaspec"), before, "{name}: libadaspec's tokens differ from the host's llama.cpp");
        assert_eq!(get("host-after"), before, "{name}: the host's llama.cpp changed after libadaspec ran");
        let logs: Vec<i64> =
            get("log-lines").split_whitespace().map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
        assert!(logs[0] > 0 && logs[2] > 0, "{name}: the host's log callback stopped getting its lines: {logs:?}");
        assert_eq!(logs[1], 0, "{name}: libadaspec's llama.cpp logged to the host's callback");
        let threads: Vec<i64> =
            get("threads").split_whitespace().map(|kv| kv.split('=').nth(1).unwrap().parse().unwrap()).collect();
        assert_eq!(threads[0], 1, "{name}: {threads:?}");
        assert!(threads[1] <= 2 && threads[2] <= 2, "{name}: more threads than n_threads = 2: {threads:?}");
        assert_eq!(get("signal-handlers"), "unchanged", "{name}");
        assert!(out.stderr.is_empty(), "{name}: stderr: {}", String::from_utf8_lossy(&out.stderr));
        eprintln!("{name}: tokens agree, logs {logs:?}, threads {threads:?}");
    }
}

#[test]
fn install_script_and_pkg_config() {
    let s = Scratch::new("install");
    let prefix = s.0.join("prefix");
    let target_dir = lib_dir().parent().expect("target dir").to_path_buf();
    run_ok(
        Command::new("bash")
            .arg(root().join("scripts/install.sh"))
            .arg("--no-build")
            .arg("--prefix")
            .arg(&prefix)
            .arg("--target-dir")
            .arg(&target_dir),
    );
    for f in ["lib/libadaspec.so", "lib/libadaspec.a", "include/adaspec.h", "lib/pkgconfig/adaspec.pc"] {
        assert!(prefix.join(f).is_file(), "{f} not installed");
    }
    // Versioned file, soname and the symlink chain .so -> .so.MAJOR -> .so.X.Y.Z.
    let (version, major) = (env!("CARGO_PKG_VERSION"), env!("CARGO_PKG_VERSION_MAJOR"));
    let lib = prefix.join("lib");
    assert_eq!(std::fs::read_link(lib.join("libadaspec.so")).unwrap(), Path::new(&format!("libadaspec.so.{major}")));
    assert_eq!(
        std::fs::read_link(lib.join(format!("libadaspec.so.{major}"))).unwrap(),
        Path::new(&format!("libadaspec.so.{version}"))
    );
    let dynamic = run_ok(Command::new("readelf").arg("-d").arg(lib.join(format!("libadaspec.so.{version}"))));
    let dynamic = String::from_utf8_lossy(&dynamic.stdout);
    assert!(dynamic.contains(&format!("Library soname: [libadaspec.so.{major}]")), "{dynamic}");
    let pc_path = prefix.join("lib/pkgconfig");
    let pkg = |args: &[&str]| -> Vec<String> {
        let out = run_ok(Command::new("pkg-config").args(args).arg("adaspec").env("PKG_CONFIG_PATH", &pc_path));
        String::from_utf8(out.stdout).expect("utf-8").split_whitespace().map(str::to_string).collect()
    };
    assert_eq!(pkg(&["--modversion"]), vec![env!("CARGO_PKG_VERSION").to_string()]);
    let flags = pkg(&["--cflags", "--libs"]);
    assert!(flags.iter().any(|f| f == "-ladaspec"), "{flags:?}");

    let p = tiny(TinyArch::Llama);
    let prompt = "The quick brown fox";
    let want = engine_text(p, true, engine::Strategy::Chain(4), vec![engine::Prompt::Text(prompt.into())], 16);
    let run_args = ["--strategy", "chain", "-n", "16", "--threads", "2", "--ctx", "1024", "--prompt", prompt];

    // The C host against the installed header/library, flags from pkg-config.
    let c_bin = s.0.join("host_dlopen");
    run_ok(
        Command::new("cc")
            .args(C_FLAGS)
            .arg(root().join("examples/c/host_dlopen.c"))
            .args(&flags)
            .arg("-ldl")
            .arg("-o")
            .arg(&c_bin),
    );
    let out = run_ok(
        Command::new(&c_bin)
            .arg("--lib")
            .arg(prefix.join("lib/libadaspec.so"))
            .arg("--ignore-eog")
            .args(run_args)
            .arg(&p.target)
            .arg(&p.draft),
    );
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);

    // The C++ host linked against the installed shared library.
    let cpp_bin = s.0.join("host_link");
    run_ok(
        Command::new("c++")
            .args(CXX_FLAGS)
            .arg(root().join("examples/cpp/host_link.cpp"))
            .args(&flags)
            .arg(format!("-Wl,-rpath,{}", prefix.join("lib").display()))
            .arg("-o")
            .arg(&cpp_bin),
    );
    let out = run_ok(Command::new(&cpp_bin).args(run_args).arg(&p.target).arg(&p.draft));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);

    // And statically, against libadaspec.a with pkg-config's --static flags.
    let static_libs: Vec<String> = pkg(&["--static", "--libs"])
        .into_iter()
        .map(|f| if f == "-ladaspec" { prefix.join("lib/libadaspec.a").display().to_string() } else { f })
        .collect();
    let static_bin = s.0.join("host_link_static");
    run_ok(
        Command::new("c++")
            .args(CXX_FLAGS)
            .arg(root().join("examples/cpp/host_link.cpp"))
            .args(pkg(&["--cflags"]))
            .args(&static_libs)
            .arg("-o")
            .arg(&static_bin),
    );
    let out = run_ok(Command::new(&static_bin).args(run_args).arg(&p.target).arg(&p.draft));
    assert_eq!(String::from_utf8_lossy(&out.stdout), want);
}

/// The worked example in the header comment compiles as C99 and as C++.
#[test]
fn header_example_compiles() {
    let s = Scratch::new("example");
    let header = std::fs::read_to_string(root().join("include/adaspec.h")).expect("header");
    let start = header.find(" * EXAMPLE").expect("EXAMPLE section");
    let end = start + header[start..].find(" */").expect("end of comment");
    let code: String = header[start..end]
        .lines()
        .skip(1)
        .map(|l| l.strip_prefix(" *").unwrap_or(l))
        .map(|l| l.strip_prefix("     ").unwrap_or(l.trim_start()))
        .collect::<Vec<_>>()
        .join("\n");
    assert!(code.contains("int main(void)"), "{code}");
    let c = s.0.join("example.c");
    std::fs::write(&c, &code).expect("write example");
    let inc = root().join("include");
    run_ok(Command::new("cc").args(C_FLAGS).arg("-fsyntax-only").arg("-I").arg(&inc).arg(&c));
    let cpp = s.0.join("example.cpp");
    std::fs::write(&cpp, &code).expect("write example");
    run_ok(Command::new("c++").args(CXX_FLAGS).arg("-fsyntax-only").arg("-I").arg(&inc).arg(&cpp));
}

/// The shared library exports the C API and nothing else: the llama.cpp it carries stays
/// hidden, so a host that links its own llama.cpp never gets ours interposed (or the reverse).
#[test]
fn only_adaspec_symbols_are_exported() {
    let lib = lib_path();
    let out = run_ok(Command::new("nm").args(["-D", "--defined-only"]).arg(&lib));
    let names: Vec<String> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split_whitespace().nth(2).map(str::to_string))
        .collect();
    let foreign: Vec<&String> = names.iter().filter(|n| !n.starts_with("adaspec_")).collect();
    assert!(
        foreign.is_empty(),
        "libadaspec.so exports {} other symbols, e.g. {:?}",
        foreign.len(),
        &foreign[..foreign.len().min(8)]
    );
    let mut exported: Vec<&str> = names.iter().map(String::as_str).collect();
    exported.sort_unstable();
    let mut declared: Vec<&str> = EXPORTS.to_vec();
    declared.sort_unstable();
    assert_eq!(exported, declared, "exports differ from the C API");
}
