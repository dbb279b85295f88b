//! Shared test helpers: load the built libadaspec.so with libloading exactly as a C host
//! would, the C structs mirrored in Rust, the tiny model pair, and the engine as reference.
#![allow(dead_code, non_camel_case_types)]

use std::ffi::{c_char, c_void, CStr, CString};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use engine::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};

pub const OK: i32 = 0;
pub const NULL_ARGUMENT: i32 = 1;
pub const INVALID_PARAM: i32 = 2;
pub const STRUCT_SIZE: i32 = 3;
pub const INVALID_UTF8: i32 = 4;
pub const MODEL_FILE: i32 = 5;
pub const INCOMPATIBLE_VOCAB: i32 = 6;
pub const CONTEXT_FULL: i32 = 7;
pub const BUSY: i32 = 8;
pub const BUFFER_TOO_SMALL: i32 = 9;
pub const BACKEND: i32 = 10;
pub const INVALID_HANDLE: i32 = 12;

pub const STRATEGY_AUTO: i32 = 0;
pub const STRATEGY_NONE: i32 = 1;
pub const STRATEGY_CHAIN: i32 = 2;
pub const STRATEGY_TREE: i32 = 3;

pub const STOP_MAX_TOKENS: i32 = 0;
pub const STOP_EOG: i32 = 1;
pub const STOP_STRING: i32 = 2;
pub const STOP_CALLBACK: i32 = 3;

pub enum Model {}
pub enum Session {}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ModelParams {
    pub struct_size: u32,
    pub n_threads: i32,
    pub n_gpu_layers: i32,
    pub use_mmap: bool,
    pub repack: bool,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct SessionParams {
    pub struct_size: u32,
    pub n_ctx: i32,
    pub n_threads: i32,
    pub strategy: i32,
    pub chain_length: i32,
    pub tree_top_k: i32,
    pub tree_depth: i32,
    pub tree_nodes: i32,
    pub mode: i32,
    pub seed: u64,
    pub lookup: i32,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct GenerateParams {
    pub struct_size: u32,
    pub max_tokens: i32,
    pub temperature: f32,
    pub top_k: i32,
    pub top_p: f32,
    pub min_p: f32,
    pub seed: u64,
    pub stop_strings: *const *const c_char,
    pub n_stop_strings: usize,
    pub ignore_eog: bool,
}

#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    pub struct_size: u32,
    pub stop_reason: i32,
    pub n_tokens: u64,
    pub n_prompt_tokens: u64,
    pub n_rounds: u64,
    pub n_draft_proposed: u64,
    pub n_draft_accepted: u64,
    pub max_batch: u64,
    pub acceptance_rate: f64,
    pub tokens_per_pass: f64,
    pub prefill_ms: f64,
    pub draft_ms: f64,
    pub verify_ms: f64,
    pub sample_ms: f64,
    pub total_ms: f64,
    pub tokens_per_second: f64,
}

#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct ChatMessage {
    pub role: *const c_char,
    pub content: *const c_char,
}

pub type Callback = Option<unsafe extern "C" fn(*const i32, usize, *const c_char, usize, *mut c_void) -> bool>;

/// Every export, resolved by name from the shared library.
pub struct Api {
    lib: libloading::Library,
    pub version: unsafe extern "C" fn() -> *const c_char,
    pub abi_version: unsafe extern "C" fn() -> u32,
    pub status_name: unsafe extern "C" fn(i32) -> *const c_char,
    pub last_error: unsafe extern "C" fn() -> *const c_char,
    pub last_error_copy: unsafe extern "C" fn(*mut c_char, usize) -> usize,
    pub model_default_params: unsafe extern "C" fn() -> ModelParams,
    pub session_default_params: unsafe extern "C" fn() -> SessionParams,
    pub generate_default_params: unsafe extern "C" fn() -> GenerateParams,
    pub stats_default: unsafe extern "C" fn() -> Stats,
    pub model_load: unsafe extern "C" fn(*const c_char, *const ModelParams, *mut *mut Model) -> i32,
    pub model_free: unsafe extern "C" fn(*mut Model),
    pub model_n_vocab: unsafe extern "C" fn(*const Model) -> i32,
    pub model_n_ctx_train: unsafe extern "C" fn(*const Model) -> i32,
    pub model_token_is_eog: unsafe extern "C" fn(*const Model, i32) -> bool,
    pub model_check_vocab: unsafe extern "C" fn(*const Model, *const Model) -> i32,
    pub tokenize:
        unsafe extern "C" fn(*const Model, *const c_char, usize, bool, bool, *mut i32, usize, *mut usize) -> i32,
    pub detokenize: unsafe extern "C" fn(*const Model, *const i32, usize, bool, *mut c_char, usize, *mut usize) -> i32,
    pub session_new: unsafe extern "C" fn(*const Model, *const Model, *const SessionParams, *mut *mut Session) -> i32,
    pub session_new_with_head:
        unsafe extern "C" fn(*const Model, *const Model, *const SessionParams, *mut *mut Session) -> i32,
    pub session_new_with_head_file:
        unsafe extern "C" fn(*const Model, *const c_char, *const SessionParams, *mut *mut Session) -> i32,
    pub session_new_with_draft_and_head_file:
        unsafe extern "C" fn(*const Model, *const Model, *const c_char, *const SessionParams, *mut *mut Session) -> i32,
    pub session_free: unsafe extern "C" fn(*mut Session),
    pub session_reset: unsafe extern "C" fn(*mut Session) -> i32,
    pub session_history: unsafe extern "C" fn(*mut Session, *mut i32, usize, *mut usize) -> i32,
    pub session_last_text: unsafe extern "C" fn(*mut Session, *mut c_char, usize, *mut usize) -> i32,
    pub session_generate: unsafe extern "C" fn(
        *mut Session,
        *const c_char,
        *const GenerateParams,
        Callback,
        *mut c_void,
        *mut Stats,
    ) -> i32,
    pub session_generate_tokens: unsafe extern "C" fn(
        *mut Session,
        *const i32,
        usize,
        *const GenerateParams,
        Callback,
        *mut c_void,
        *mut Stats,
    ) -> i32,
    pub session_chat: unsafe extern "C" fn(
        *mut Session,
        *const ChatMessage,
        usize,
        *const GenerateParams,
        Callback,
        *mut c_void,
        *mut Stats,
    ) -> i32,
}

// SAFETY: plain function pointers into a library that stays loaded for the process lifetime.
unsafe impl Sync for Api {}
// SAFETY: as above.
unsafe impl Send for Api {}

/// The names of every export, as the header declares them.
pub const EXPORTS: &[&str] = &[
    "adaspec_version",
    "adaspec_abi_version",
    "adaspec_status_name",
    "adaspec_last_error",
    "adaspec_last_error_copy",
    "adaspec_model_default_params",
    "adaspec_session_default_params",
    "adaspec_generate_default_params",
    "adaspec_stats_default",
    "adaspec_model_load",
    "adaspec_model_free",
    "adaspec_model_n_vocab",
    "adaspec_model_n_ctx_train",
    "adaspec_model_token_is_eog",
    "adaspec_model_check_vocab",
    "adaspec_tokenize",
    "adaspec_detokenize",
    "adaspec_session_new",
    "adaspec_session_new_with_head",
    "adaspec_session_new_with_head_file",
    "adaspec_session_new_with_draft_and_head_file",
    "adaspec_session_free",
    "adaspec_session_reset",
    "adaspec_session_history",
    "adaspec_session_last_text",
    "adaspec_session_generate",
    "adaspec_session_generate_tokens",
    "adaspec_session_chat",
    "adaspec_set_log_callback",
];

/// Workspace root.
pub fn root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("root").to_path_buf()
}

/// The directory holding the built libadaspec.so (target/release), found from the test
/// executable's location (target/release/deps/<test>). `cargo test` does not rebuild a
/// cdylib-only library for integration tests, so this runs `cargo build --release -p
/// adaspec-ffi` once per test process first (cargo does not hold its lock while tests run).
pub fn lib_dir() -> PathBuf {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let exe = std::env::current_exe().expect("current exe");
        let profile_dir = exe.parent().and_then(Path::parent).expect("target/release").to_path_buf();
        let target_dir = profile_dir.parent().expect("target dir");
        if std::env::var_os("ADASPEC_FFI_NO_BUILD").is_none() {
            let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
            let status = std::process::Command::new(cargo)
                .args(["build", "--release", "-p", "adaspec-ffi", "--target-dir"])
                .arg(target_dir)
                .current_dir(root())
                .status()
                .expect("run cargo build");
            assert!(status.success(), "cargo build --release -p adaspec-ffi failed");
        }
        assert!(
            profile_dir.join("libadaspec.so").exists(),
            "libadaspec.so not found in {}; build with cargo build --release -p adaspec-ffi",
            profile_dir.display()
        );
        profile_dir
    })
    .clone()
}

pub fn lib_path() -> PathBuf {
    lib_dir().join("libadaspec.so")
}

macro_rules! sym {
    ($lib:expr, $name:literal) => {
        // SAFETY: the symbol has the signature declared in include/adaspec.h, mirrored in Api.
        *unsafe { $lib.get(concat!($name, "\0").as_bytes()) }.unwrap_or_else(|e| panic!("dlsym {}: {e}", $name))
    };
}

/// The loaded library (once per test process).
pub fn api() -> &'static Api {
    static API: OnceLock<Api> = OnceLock::new();
    API.get_or_init(|| {
        // SAFETY: loading our own library; its initialisers only set up Rust std.
        let lib = unsafe { libloading::Library::new(lib_path()) }.expect("dlopen libadaspec.so");
        Api {
            version: sym!(lib, "adaspec_version"),
            abi_version: sym!(lib, "adaspec_abi_version"),
            status_name: sym!(lib, "adaspec_status_name"),
            last_error: sym!(lib, "adaspec_last_error"),
            last_error_copy: sym!(lib, "adaspec_last_error_copy"),
            model_default_params: sym!(lib, "adaspec_model_default_params"),
            session_default_params: sym!(lib, "adaspec_session_default_params"),
            generate_default_params: sym!(lib, "adaspec_generate_default_params"),
            stats_default: sym!(lib, "adaspec_stats_default"),
            model_load: sym!(lib, "adaspec_model_load"),
            model_free: sym!(lib, "adaspec_model_free"),
            model_n_vocab: sym!(lib, "adaspec_model_n_vocab"),
            model_n_ctx_train: sym!(lib, "adaspec_model_n_ctx_train"),
            model_token_is_eog: sym!(lib, "adaspec_model_token_is_eog"),
            model_check_vocab: sym!(lib, "adaspec_model_check_vocab"),
            tokenize: sym!(lib, "adaspec_tokenize"),
            detokenize: sym!(lib, "adaspec_detokenize"),
            session_new: sym!(lib, "adaspec_session_new"),
            session_new_with_head: sym!(lib, "adaspec_session_new_with_head"),
            session_new_with_head_file: sym!(lib, "adaspec_session_new_with_head_file"),
            session_new_with_draft_and_head_file: sym!(lib, "adaspec_session_new_with_draft_and_head_file"),
            session_free: sym!(lib, "adaspec_session_free"),
            session_reset: sym!(lib, "adaspec_session_reset"),
            session_history: sym!(lib, "adaspec_session_history"),
            session_last_text: sym!(lib, "adaspec_session_last_text"),
            session_generate: sym!(lib, "adaspec_session_generate"),
            session_generate_tokens: sym!(lib, "adaspec_session_generate_tokens"),
            session_chat: sym!(lib, "adaspec_session_chat"),
            lib,
        }
    })
}

impl Api {
    /// The loaded library, for symbols the tests resolve themselves.
    pub fn lib(&self) -> &libloading::Library {
        &self.lib
    }

    pub fn last_error_string(&self) -> String {
        // SAFETY: never NULL, NUL-terminated, valid until the next call on this thread.
        unsafe { CStr::from_ptr((self.last_error)()) }.to_string_lossy().into_owned()
    }

    /// Loads a model, panicking with the library's message on failure.
    pub fn load(&self, path: &Path, params: Option<&ModelParams>) -> *mut Model {
        let c = cstr(path.to_str().expect("utf-8 path"));
        let mut m = std::ptr::null_mut();
        let p = params.map_or(std::ptr::null(), |p| p as *const ModelParams);
        // SAFETY: valid string, params NULL or valid, out pointer valid.
        let s = unsafe { (self.model_load)(c.as_ptr(), p, &mut m) };
        assert_eq!(s, OK, "load {}: {}", path.display(), self.last_error_string());
        m
    }

    pub fn new_session(&self, t: *const Model, d: *const Model, p: &SessionParams) -> *mut Session {
        let mut s = std::ptr::null_mut();
        // SAFETY: live handles, valid params and out pointer.
        let st = unsafe { (self.session_new)(t, d, p, &mut s) };
        assert_eq!(st, OK, "session_new: {}", self.last_error_string());
        s
    }

    pub fn session_params(&self, strategy: i32) -> SessionParams {
        // SAFETY: returns a struct by value.
        let mut p = unsafe { (self.session_default_params)() };
        p.strategy = strategy;
        p.n_ctx = 1024;
        p.n_threads = 2;
        p
    }

    pub fn greedy(&self, max_tokens: i32) -> GenerateParams {
        // SAFETY: returns a struct by value.
        let mut g = unsafe { (self.generate_default_params)() };
        g.max_tokens = max_tokens;
        g.ignore_eog = true;
        g
    }

    /// Generates from text, collecting the streamed tokens and text.
    pub fn generate_text(
        &self,
        s: *mut Session,
        prompt: &str,
        gp: &GenerateParams,
    ) -> Result<(Streamed, Stats), (i32, String)> {
        let c = cstr(prompt);
        let mut out = Streamed::default();
        // SAFETY: returns a struct by value.
        let mut stats = unsafe { (self.stats_default)() };
        // SAFETY: live session, valid prompt/params/stats; the callback gets a Streamed.
        let st = unsafe {
            (self.session_generate)(
                s,
                c.as_ptr(),
                gp,
                Some(collect),
                &mut out as *mut Streamed as *mut c_void,
                &mut stats,
            )
        };
        if st == OK {
            Ok((out, stats))
        } else {
            Err((st, self.last_error_string()))
        }
    }

    pub fn tokenize_str(&self, m: *const Model, text: &str, add_special: bool) -> Vec<i32> {
        let mut n = 0usize;
        // SAFETY: size query with an empty buffer.
        let st = unsafe {
            (self.tokenize)(
                m,
                text.as_ptr() as *const c_char,
                text.len(),
                add_special,
                true,
                std::ptr::null_mut(),
                0,
                &mut n,
            )
        };
        assert!(st == BUFFER_TOO_SMALL || (st == OK && n == 0), "{st}");
        let mut v = vec![0i32; n];
        // SAFETY: buffer of n slots.
        let st = unsafe {
            (self.tokenize)(m, text.as_ptr() as *const c_char, text.len(), add_special, true, v.as_mut_ptr(), n, &mut n)
        };
        assert_eq!(st, OK);
        v
    }
}

/// What a streaming callback collected.
#[derive(Debug, Default, Clone, PartialEq)]
pub struct Streamed {
    pub tokens: Vec<i32>,
    pub text: Vec<u8>,
    pub calls: usize,
}

impl Streamed {
    pub fn text(&self) -> String {
        String::from_utf8(self.text.clone()).expect("utf-8 stream")
    }
}

/// Callback that appends into a `Streamed`.
pub unsafe extern "C" fn collect(
    tokens: *const i32,
    n: usize,
    piece: *const c_char,
    len: usize,
    ud: *mut c_void,
) -> bool {
    // SAFETY: ud is the &mut Streamed the test passed; pointers valid for the call.
    let out = unsafe { &mut *(ud as *mut Streamed) };
    if n > 0 {
        // SAFETY: n readable ids.
        out.tokens.extend_from_slice(unsafe { std::slice::from_raw_parts(tokens, n) });
    }
    // SAFETY: len readable bytes followed by a NUL.
    let bytes = unsafe { std::slice::from_raw_parts(piece as *const u8, len + 1) };
    assert_eq!(bytes[len], 0, "piece not NUL-terminated");
    out.text.extend_from_slice(&bytes[..len]);
    out.calls += 1;
    true
}

pub fn cstr(s: &str) -> CString {
    CString::new(s).expect("no NUL")
}

/// The tiny target/draft GGUF pair of an architecture (written once per process).
pub struct TinyPair {
    pub target: PathBuf,
    pub draft: PathBuf,
    pub dir: PathBuf,
}

pub fn tiny(arch: TinyArch) -> &'static TinyPair {
    static LLAMA: OnceLock<TinyPair> = OnceLock::new();
    static QWEN: OnceLock<TinyPair> = OnceLock::new();
    let cell = match arch {
        TinyArch::Llama => &LLAMA,
        TinyArch::Qwen2 => &QWEN,
    };
    cell.get_or_init(|| {
        // One folder per architecture, shared by test processes: the files are deterministic
        // and written to temporary names then renamed, so concurrent writers agree.
        let dir = std::env::temp_dir().join("adaspec-ffi-tests").join(arch.name());
        let (target, draft) = write_tiny_pair(&dir, arch, DEFAULT_DRAFT_NOISE, 11).expect("write tiny pair");
        TinyPair { target, draft, dir }
    })
}

/// A copy of the tiny target whose vocabulary differs in one token text (same file layout).
pub fn incompatible_copy(src: &Path, dir: &Path) -> PathBuf {
    let mut bytes = std::fs::read(src).expect("read gguf");
    let (from, to) = (b"<|im_end|>", b"<|im_fin|>");
    let mut n = 0;
    let mut i = 0;
    while i + from.len() <= bytes.len() {
        if &bytes[i..i + from.len()] == from {
            bytes[i..i + from.len()].copy_from_slice(to);
            n += 1;
        }
        i += 1;
    }
    assert!(n > 0, "token text not found");
    let out = dir.join("incompatible.gguf");
    std::fs::write(&out, bytes).expect("write");
    out
}

/// The engine, in this process, as the reference for what the C API must return.
pub fn engine_generate(
    target: &Path,
    draft: Option<&Path>,
    strategy: engine::Strategy,
    prompts: &[engine::Prompt],
    gp: &engine::GenerateParams,
) -> Vec<engine::Generation> {
    let t = Arc::new(engine::Model::load(target, &engine::ModelParams::default()).expect("load"));
    let d = draft.map(|d| Arc::new(engine::Model::load(d, &engine::ModelParams::default()).expect("load")));
    let sp = engine::SessionParams {
        n_ctx: 1024,
        n_threads: 2,
        strategy,
        mode: engine::NumericMode::Fast,
        ..Default::default()
    };
    let mut s = engine::Session::new(t, d, sp).expect("session");
    prompts.iter().map(|p| s.generate(p, gp, &mut |_, _| true).expect("generate")).collect()
}

/// `CI` is set to something other than empty, `0` or `false`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// The real model pair. A missing file fails the test with how to fetch it (CI must never pass
/// by skipping); `None` only when the developer opted out with `ADASPEC_SKIP_REAL_MODELS=1`,
/// which prints a notice and is itself refused when `CI` is set.
pub fn real_pair() -> Option<(PathBuf, PathBuf)> {
    let names = [engine::models::DEFAULT_TARGET, engine::models::DEFAULT_DRAFT];
    if std::env::var("ADASPEC_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        assert!(
            !in_ci(),
            "ADASPEC_SKIP_REAL_MODELS=1 is refused when CI is set: CI must run the real-model tests \
             (run scripts/fetch-models.sh to get {names:?})"
        );
        let test = std::thread::current().name().unwrap_or("this test").to_string();
        // Straight to stderr, past the test harness's capture: a skip must be seen.
        let _ = writeln!(
            std::io::stderr(),
            "ADASPEC_SKIP_REAL_MODELS=1: skipping the real-model part of {test} (needs {names:?})"
        );
        return None;
    }
    let dir = engine::models::models_dir();
    for name in names {
        assert!(
            dir.join(name).is_file(),
            "model {name} not found in {}; run scripts/fetch-models.sh (or set ADASPEC_MODELS to the folder \
             that has it; outside CI, ADASPEC_SKIP_REAL_MODELS=1 skips real-model tests)",
            dir.display()
        );
    }
    Some((dir.join(names[0]), dir.join(names[1])))
}

/// A folder next to `out` holding libadaspec.so under its soname (libadaspec.so.0) too, as an
/// installed copy does; hosts link through it.
pub fn soname_dir(out: &Path) -> PathBuf {
    let lib = out.with_extension("lib");
    std::fs::create_dir_all(&lib).expect("lib dir");
    for name in ["libadaspec.so", &format!("libadaspec.so.{}", env!("CARGO_PKG_VERSION_MAJOR"))] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(lib_dir().join("libadaspec.so"), &link).expect("symlink");
    }
    lib
}

/// Compiles the C test host `src` (a path from the repository root) into `out` with `flags`,
/// linked against libadaspec.so through [`soname_dir`] (and an rpath to it). Err: cc's stderr.
pub fn build_linked_c_host(src: &str, out: &Path, flags: &[&str]) -> Result<(), String> {
    let lib = soname_dir(out);
    let o = std::process::Command::new("cc")
        .args(flags)
        .arg("-I")
        .arg(root().join("include"))
        .arg(root().join(src))
        .arg(format!("-L{}", lib.display()))
        .arg("-ladaspec")
        .arg(format!("-Wl,-rpath,{}", lib.display()))
        .arg("-o")
        .arg(out)
        .output()
        .map_err(|e| e.to_string())?;
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stderr).into_owned())
    }
}
