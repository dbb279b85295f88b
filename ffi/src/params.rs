//! Parameter and result structs of the C ABI, their defaults, and their validation.
//!
//! Every struct starts with `struct_size`, which the host sets to `sizeof(the struct)` (the
//! `*_default_params()` functions do it), so later versions can append fields: a struct from
//! an older header (down to ABI v1's size) gets defaults for the fields it lacks; one from a
//! newer header is accepted while the fields this library does not know are zero; out-structs
//! are written up to min(host size, library size). Enum-typed fields are `int32_t`
//! so that an out-of-range value from C is a status, never undefined behaviour.
//! This module must never trust a field it has not range-checked.

use std::ffi::{c_char, CStr};

use crate::status::{adaspec_status, FfiError, FfiResult};

/// A C `bool` as this library reads it: one byte, any non-zero value true. A Rust `bool`
/// read from C memory holding anything but 0 or 1 would be undefined behaviour. The header
/// spells it `bool` (same size and alignment).
#[repr(transparent)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct CBool(u8);

impl CBool {
    pub const TRUE: CBool = CBool(1);
    pub const FALSE: CBool = CBool(0);

    /// Non-zero is true.
    pub fn get(self) -> bool {
        self.0 != 0
    }
}

/// ABI version: bumped whenever a struct layout or function signature changes incompatibly.
pub const ADASPEC_ABI_VERSION: u32 = 1;

/// `adaspec_generate_params.seed` value meaning "use the session's seed".
pub const ADASPEC_SEED_FROM_SESSION: u64 = 0xFFFF_FFFF_FFFF_FFFF;

/// How the draft proposes tokens (`adaspec_session_params.strategy`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum adaspec_strategy {
    /// Choose plain decoding, a chain or extra branches each round from a measured cost model.
    Auto = 0,
    /// Plain decoding with the target alone (the draft, if any, is ignored).
    None = 1,
    /// A chain of `chain_length` draft tokens per round.
    Chain = 2,
    /// EAGLE-2 dynamic tree: `tree_top_k` children per node, `tree_depth` levels,
    /// `tree_nodes` best nodes kept.
    Tree = 3,
}

/// Numeric mode of the target's verification passes (`adaspec_session_params.mode`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum adaspec_numeric_mode {
    /// Fastest llama.cpp settings; lossless in distribution, greedy text may depart from the
    /// target alone where batch-dependent rounding flips a near-tie.
    Fast = 0,
    /// Greedy output bit-identical to target-alone decoding in the same mode. Needs the target
    /// loaded with `repack = false`.
    Exact = 1,
}

/// Why a generation ended (`adaspec_stats.stop_reason`).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum adaspec_stop_reason {
    /// `max_tokens` reached.
    MaxTokens = 0,
    /// The model produced an end-of-generation token.
    Eog = 1,
    /// The text reached one of the stop strings.
    StopString = 2,
    /// The streaming callback returned false.
    Callback = 3,
    /// The context window filled up (the text so far is returned).
    ContextFull = 4,
}

/// How a model is loaded. Get defaults from `adaspec_model_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct adaspec_model_params {
    /// `sizeof(adaspec_model_params)`.
    pub struct_size: u32,
    /// CPU threads of sessions whose target is this model and whose own `n_threads` is 0
    /// (0 = all cores; default 0), 0..=1024.
    pub n_threads: i32,
    /// Layers offloaded to a GPU (0 = CPU only, the default; -1 = all layers; needs a GPU
    /// build of the library). Must be >= -1.
    pub n_gpu_layers: i32,
    /// Memory-map the file instead of reading it (default true).
    pub use_mmap: CBool,
    /// Let llama.cpp repack weights for faster CPU matmuls (default true). Load the target
    /// with false to use `ADASPEC_NUMERIC_MODE_EXACT`.
    pub repack: CBool,
}

/// Session settings. Get defaults from `adaspec_session_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct adaspec_session_params {
    /// `sizeof(adaspec_session_params)`.
    pub struct_size: u32,
    /// KV-cache size in tokens: whole conversation + one draft tree (0 = 4096, the default;
    /// otherwise 16..=1048576).
    pub n_ctx: i32,
    /// CPU threads (0 = the target's `adaspec_model_params.n_threads`, the default), 0..=1024.
    pub n_threads: i32,
    /// One of `adaspec_strategy` (default `ADASPEC_STRATEGY_AUTO`).
    pub strategy: i32,
    /// Draft tokens per round for `ADASPEC_STRATEGY_CHAIN`, 1..=64 (default 4).
    pub chain_length: i32,
    /// Children per node for `ADASPEC_STRATEGY_TREE`, 1..=16 (default 4).
    pub tree_top_k: i32,
    /// Levels for `ADASPEC_STRATEGY_TREE`, 1..=16 (default 5).
    pub tree_depth: i32,
    /// Nodes kept for `ADASPEC_STRATEGY_TREE`, 1..=254 (default 16).
    pub tree_nodes: i32,
    /// One of `adaspec_numeric_mode` (default `ADASPEC_NUMERIC_MODE_FAST`).
    pub mode: i32,
    /// Default sampling seed of generations that leave their `seed` at
    /// `ADASPEC_SEED_FROM_SESSION` (default 0).
    pub seed: u64,
    /// Non-zero: `ADASPEC_STRATEGY_AUTO` may add n-gram lookups of the prompt and output (zero-cost
    /// drafts) where they pay (default 1). Fixed strategies without a draft model always draft
    /// with lookups; with `draft == NULL` and `AUTO`, lookups are the only draft.
    pub lookup: i32,
}

/// One generation request. Get defaults from `adaspec_generate_default_params()`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct adaspec_generate_params {
    /// `sizeof(adaspec_generate_params)`.
    pub struct_size: u32,
    /// Most tokens to generate (default 128). >= 0.
    pub max_tokens: i32,
    /// Sampling temperature (0 = greedy, the default). >= 0.
    pub temperature: f32,
    /// Keep the k most likely tokens (0 = off, the default). >= 0.
    pub top_k: i32,
    /// Nucleus sampling mass in (0, 1] (1 = off, the default).
    pub top_p: f32,
    /// Drop tokens below min_p times the top probability, in [0, 1] (0 = off, the default).
    pub min_p: f32,
    /// Sampling seed (default `ADASPEC_SEED_FROM_SESSION`: the session's seed).
    pub seed: u64,
    /// Array of `n_stop_strings` NUL-terminated UTF-8 strings; generation stops when the text
    /// contains one (the stop string is not returned). May be NULL when `n_stop_strings` is 0.
    /// Only read during the call.
    pub stop_strings: *const *const c_char,
    /// Number of entries in `stop_strings` (default 0, at most 64).
    pub n_stop_strings: usize,
    /// Keep generating past end-of-generation tokens (fixed-length benchmarks; default false).
    pub ignore_eog: CBool,
}

/// Counters and timings of one generation, written by the generate functions on success.
/// Set `struct_size` (or start from `adaspec_stats_default()`) before passing it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct adaspec_stats {
    /// `sizeof(adaspec_stats)`.
    pub struct_size: u32,
    /// One of `adaspec_stop_reason`.
    pub stop_reason: i32,
    /// Tokens generated.
    pub n_tokens: u64,
    /// Prompt tokens processed in this call (tokens cached from earlier turns excluded).
    pub n_prompt_tokens: u64,
    /// Draft-verify rounds (= target verification passes).
    pub n_rounds: u64,
    /// Draft tokens sent to the target for verification.
    pub n_draft_proposed: u64,
    /// Draft tokens the target accepted.
    pub n_draft_accepted: u64,
    /// Largest verification batch used (root + draft tokens).
    pub max_batch: u64,
    /// n_draft_accepted / n_draft_proposed (0 without speculation).
    pub acceptance_rate: f64,
    /// Generated tokens per target pass.
    pub tokens_per_pass: f64,
    /// Milliseconds spent on prompt processing.
    pub prefill_ms: f64,
    /// Milliseconds spent drafting.
    pub draft_ms: f64,
    /// Milliseconds spent in target verification passes.
    pub verify_ms: f64,
    /// Milliseconds spent sampling/accepting.
    pub sample_ms: f64,
    /// Milliseconds for the whole call.
    pub total_ms: f64,
    /// Generated tokens per second, prompt processing excluded.
    pub tokens_per_second: f64,
}

/// One chat message for `adaspec_session_chat`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct adaspec_chat_message {
    /// "system", "user" or "assistant" (NUL-terminated UTF-8).
    pub role: *const c_char,
    /// The message text (NUL-terminated UTF-8).
    pub content: *const c_char,
}

impl Default for adaspec_model_params {
    fn default() -> Self {
        adaspec_model_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            n_threads: 0,
            n_gpu_layers: 0,
            use_mmap: CBool::TRUE,
            repack: CBool::TRUE,
        }
    }
}

impl Default for adaspec_session_params {
    fn default() -> Self {
        adaspec_session_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            n_ctx: 0,
            n_threads: 0,
            strategy: adaspec_strategy::Auto as i32,
            chain_length: 4,
            tree_top_k: 4,
            tree_depth: 5,
            tree_nodes: 16,
            mode: adaspec_numeric_mode::Fast as i32,
            seed: 0,
            lookup: 1,
        }
    }
}

impl Default for adaspec_generate_params {
    fn default() -> Self {
        adaspec_generate_params {
            struct_size: std::mem::size_of::<Self>() as u32,
            max_tokens: 128,
            temperature: 0.0,
            top_k: 0,
            top_p: 1.0,
            min_p: 0.0,
            seed: ADASPEC_SEED_FROM_SESSION,
            stop_strings: std::ptr::null(),
            n_stop_strings: 0,
            ignore_eog: CBool::FALSE,
        }
    }
}

impl Default for adaspec_stats {
    fn default() -> Self {
        adaspec_stats {
            struct_size: std::mem::size_of::<Self>() as u32,
            stop_reason: adaspec_stop_reason::MaxTokens as i32,
            n_tokens: 0,
            n_prompt_tokens: 0,
            n_rounds: 0,
            n_draft_proposed: 0,
            n_draft_accepted: 0,
            max_batch: 0,
            acceptance_rate: 0.0,
            tokens_per_pass: 0.0,
            prefill_ms: 0.0,
            draft_ms: 0.0,
            verify_ms: 0.0,
            sample_ms: 0.0,
            total_ms: 0.0,
            tokens_per_second: 0.0,
        }
    }
}

/// A struct of the C ABI: it starts with a `u32 struct_size`, and grows only at its end.
pub(crate) trait AbiStruct: Copy + Default {
    /// The smallest size this library ever shipped (ABI version 1): hosts built against any
    /// header from that one to this library's may pass it.
    const V1_SIZE: usize;
}

impl AbiStruct for adaspec_model_params {
    const V1_SIZE: usize = std::mem::size_of::<Self>();
}

impl AbiStruct for adaspec_session_params {
    // v1 ended with `seed`; `lookup` came after.
    const V1_SIZE: usize = std::mem::offset_of!(adaspec_session_params, lookup);
}

impl AbiStruct for adaspec_generate_params {
    const V1_SIZE: usize = std::mem::size_of::<Self>();
}

impl AbiStruct for adaspec_stats {
    const V1_SIZE: usize = std::mem::size_of::<Self>();
}

/// Checks the `struct_size` a host wrote at the start of a struct and returns how many bytes
/// of it this library reads or writes: min(the host's size, this library's size). Sizes from
/// ABI v1's up are accepted, larger ones too (a newer header; see `read_params` for its tail).
///
/// # Safety
/// `p` must point to at least 4 readable bytes.
pub(crate) unsafe fn check_struct_size<T: AbiStruct>(p: *const T, arg: &str) -> FfiResult<usize> {
    // SAFETY: every params struct starts with a u32 struct_size (caller contract).
    let size = unsafe { std::ptr::read_unaligned(p as *const u32) } as usize;
    let ours = std::mem::size_of::<T>();
    if size < T::V1_SIZE {
        return Err(FfiError::new(
            adaspec_status::StructSize,
            format!("`{arg}->struct_size` is {size}, expected at least {} (this library's is {ours}, ABI version {ADASPEC_ABI_VERSION}); start from the *_default_params() function of the header", T::V1_SIZE),
        ));
    }
    Ok(size.min(ours))
}

/// Reads a params struct from C: NULL means defaults; otherwise the host's `struct_size`
/// bytes are copied over the defaults (fields an older header lacks keep their defaults), and
/// a newer header's extra fields must be zero.
///
/// # Safety
/// `p` must be NULL or point to a readable, initialised struct of its `struct_size` bytes.
pub(crate) unsafe fn read_params<T: AbiStruct>(p: *const T, arg: &str) -> FfiResult<T> {
    let mut out = T::default();
    if p.is_null() {
        return Ok(out);
    }
    // SAFETY: non-NULL and readable (caller contract).
    let n = unsafe { check_struct_size(p, arg)? };
    // SAFETY: readable (caller contract): the first 4 bytes are the u32 struct_size.
    let size = unsafe { std::ptr::read_unaligned(p as *const u32) } as usize;
    if size > n {
        // A newer header's fields: fine while unset (zero), refused when the host set one
        // this library cannot honour (the rule of Linux's extensible-struct system calls).
        // SAFETY: the host's struct holds `size` readable bytes (caller contract).
        let tail = unsafe { std::slice::from_raw_parts((p as *const u8).add(n), size - n) };
        if tail.iter().any(|&b| b != 0) {
            return Err(FfiError::new(
                adaspec_status::StructSize,
                format!("`{arg}` sets fields past byte {n}, which this library (ABI version {ADASPEC_ABI_VERSION}) does not know"),
            ));
        }
    }
    // SAFETY: the host's struct holds at least n bytes (its struct_size), `out` holds
    // size_of::<T>() >= n; the regions do not overlap. Every field is an integer or float, so
    // any bytes are a valid value (booleans are read as bytes: `CBool`).
    unsafe { std::ptr::copy_nonoverlapping(p as *const u8, &mut out as *mut T as *mut u8, n) };
    let size_field = std::mem::size_of::<T>() as u32;
    // SAFETY: `out` starts with its u32 struct_size.
    unsafe { std::ptr::write_unaligned(&mut out as *mut T as *mut u32, size_field) };
    Ok(out)
}

/// Writes an out-struct to C: the first min(host size, library size) bytes, the host's
/// `struct_size` left as it was.
///
/// # Safety
/// `p` must point to a writable struct of its `struct_size` bytes, already size-checked.
pub(crate) unsafe fn write_out<T: AbiStruct>(p: *mut T, value: &T, n: usize) {
    let n = n.min(std::mem::size_of::<T>());
    // SAFETY: (caller contract) `p` holds at least n writable bytes; skip the leading u32 so
    // the host's struct_size stays.
    unsafe { std::ptr::copy_nonoverlapping((value as *const T as *const u8).add(4), (p as *mut u8).add(4), n - 4) };
}

/// Reads a NUL-terminated UTF-8 string argument.
///
/// # Safety
/// `p` must be NULL or a NUL-terminated string that lives for `'a`.
pub(crate) unsafe fn read_str<'a>(p: *const c_char, arg: &str) -> FfiResult<&'a str> {
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: non-NULL, NUL-terminated (caller contract).
    let c = unsafe { CStr::from_ptr(p) };
    c.to_str()
        .map_err(|e| FfiError::new(adaspec_status::InvalidUtf8, format!("argument `{arg}` is not valid UTF-8: {e}")))
}

/// Builds a slice from a C pointer + length; NULL is allowed only for length 0.
///
/// # Safety
/// `p` must be NULL or point to `len` readable `T`s that live for `'a`.
pub(crate) unsafe fn read_slice<'a, T>(p: *const T, len: usize, arg: &str) -> FfiResult<&'a [T]> {
    if len == 0 {
        return Ok(&[]);
    }
    if p.is_null() {
        return Err(FfiError::null(arg));
    }
    if len > isize::MAX as usize / std::mem::size_of::<T>().max(1) {
        return Err(FfiError::param(arg, format!("length {len} is too large")));
    }
    // SAFETY: non-NULL, `len` readable elements (caller contract), size checked above.
    Ok(unsafe { std::slice::from_raw_parts(p, len) })
}

/// Writes `data` to a caller buffer of `cap` elements; `n_out` receives `data.len()` both on
/// success and when the buffer is too short (then nothing else is written).
///
/// # Safety
/// `buf` must be NULL or have `cap` writable elements; `n_out` must be NULL or writable.
pub(crate) unsafe fn write_buffer<T: Copy>(
    data: &[T],
    buf: *mut T,
    cap: usize,
    n_out: *mut usize,
    arg: &str,
) -> FfiResult<()> {
    if !n_out.is_null() {
        // SAFETY: writable (caller contract).
        unsafe { *n_out = data.len() };
    }
    if data.len() > cap {
        return Err(FfiError::new(
            adaspec_status::BufferTooSmall,
            format!("`{arg}` holds {cap} elements, {} needed", data.len()),
        ));
    }
    if data.is_empty() {
        return Ok(());
    }
    if buf.is_null() {
        return Err(FfiError::null(arg));
    }
    // SAFETY: `buf` has `cap >= data.len()` writable elements (caller contract).
    unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf, data.len()) };
    Ok(())
}

/// `adaspec_model_params` with every field at its documented default.
#[no_mangle]
pub extern "C" fn adaspec_model_default_params() -> adaspec_model_params {
    crate::status::boundary_value(
        "adaspec_model_default_params",
        adaspec_model_params::default(),
        adaspec_model_params::default,
    )
}

/// `adaspec_session_params` with every field at its documented default.
#[no_mangle]
pub extern "C" fn adaspec_session_default_params() -> adaspec_session_params {
    crate::status::boundary_value(
        "adaspec_session_default_params",
        adaspec_session_params::default(),
        adaspec_session_params::default,
    )
}

/// `adaspec_generate_params` with every field at its documented default.
#[no_mangle]
pub extern "C" fn adaspec_generate_default_params() -> adaspec_generate_params {
    crate::status::boundary_value(
        "adaspec_generate_default_params",
        adaspec_generate_params::default(),
        adaspec_generate_params::default,
    )
}

/// A zeroed `adaspec_stats` with `struct_size` set, ready to pass to a generate function.
#[no_mangle]
pub extern "C" fn adaspec_stats_default() -> adaspec_stats {
    crate::status::boundary_value("adaspec_stats_default", adaspec_stats::default(), adaspec_stats::default)
}
