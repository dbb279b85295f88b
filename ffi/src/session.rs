//! Session exports: create/free, generate (text, token ids, chat messages) with streaming,
//! stats, multi-turn history, reset.
//!
//! A session is used by one call at a time. Every call that touches the engine session
//! holds its own reference to the handle (see handles.rs) and takes the session's in-use flag;
//! a call that finds it taken (another thread, or the session's own streaming callback calling
//! back in) returns `ADASPEC_STATUS_BUSY` and never touches the session. This module must never
//! hand the engine session to two calls at once.

use std::cell::UnsafeCell;
use std::ffi::{c_char, c_void};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use engine::{ChatMessage, GenerateParams, Prompt, SamplingParams, SessionParams, StopReason, Strategy};

use crate::handles::{adaspec_model, adaspec_session, model_clone, session_clone, session_into_raw, session_release};
use crate::params::{
    adaspec_chat_message, adaspec_generate_params, adaspec_numeric_mode, adaspec_session_params, adaspec_stats,
    adaspec_stop_reason, adaspec_strategy, check_struct_size, read_params, read_slice, read_str, write_buffer,
    write_out, ADASPEC_SEED_FROM_SESSION,
};
use crate::status::{adaspec_status, boundary, boundary_value, set_last_error, FfiError, FfiResult};

/// Streaming callback, called on the generating thread each time tokens are committed.
/// `tokens`/`n_tokens`: the committed token ids (may be NULL with `n_tokens` 0 for a final
/// text-only flush). `piece`/`piece_len`: the new text (NUL-terminated, `piece_len` bytes
/// without the NUL; text that could still become a stop string is held back until it cannot).
/// Both pointers are valid only during the call. Return true to continue, false to stop.
/// The callback may call any adaspec function, but calls on the generating session return
/// `ADASPEC_STATUS_BUSY`. It must not unwind (C++ exceptions, longjmp) into the library.
pub type adaspec_token_callback = Option<
    unsafe extern "C" fn(
        tokens: *const i32,
        n_tokens: usize,
        piece: *const c_char,
        piece_len: usize,
        user_data: *mut c_void,
    ) -> bool,
>;

/// Most stop strings one request may carry.
const MAX_STOP_STRINGS: usize = 64;

struct Inner {
    session: engine::Session,
    seed: u64,
    last_text: Vec<u8>,
    /// Set while the engine runs; still set after a caught panic, when the session's state is
    /// unknown until `adaspec_session_reset`.
    poisoned: bool,
}

/// What a session handle points to.
pub(crate) struct SessionHandle {
    inner: UnsafeCell<Inner>,
    in_use: AtomicBool,
    /// Set by `adaspec_session_free`: a generation still running stops at its next commit
    /// without calling the host's callback again.
    freed: AtomicBool,
}

// SAFETY: `inner` is only reached through `InUse`, which the atomic flag grants to one caller
// at a time; the engine session itself is Send.
unsafe impl Sync for SessionHandle {}

/// Exclusive access to a session for the duration of one call.
struct InUse<'a>(&'a SessionHandle);

impl SessionHandle {
    fn acquire(&self) -> FfiResult<InUse<'_>> {
        self.in_use.compare_exchange(false, true, Ordering::Acquire, Ordering::Relaxed).map(|_| InUse(self)).map_err(
            |_| {
                FfiError::new(
                    adaspec_status::Busy,
                    "the session is in use (by another thread, or this is a call from its own streaming callback)",
                )
            },
        )
    }
}

impl InUse<'_> {
    fn inner(&mut self) -> &mut Inner {
        // SAFETY: holding the in-use flag gives this guard exclusive access to `inner`; the
        // returned borrow cannot outlive the guard.
        unsafe { &mut *self.0.inner.get() }
    }
}

impl Drop for InUse<'_> {
    fn drop(&mut self) {
        self.0.in_use.store(false, Ordering::Release);
    }
}

fn session_params(p: &adaspec_session_params) -> FfiResult<(SessionParams, u64)> {
    if p.n_ctx < 0 {
        return Err(FfiError::param("params->n_ctx", format!("{} is negative", p.n_ctx)));
    }
    if p.n_threads < 0 {
        return Err(FfiError::param("params->n_threads", format!("{} is negative", p.n_threads)));
    }
    let in_range = |name: &str, v: i32, lo: i32, hi: i32| -> FfiResult<usize> {
        if v < lo || v > hi {
            Err(FfiError::param(name, format!("{v} is outside {lo}..={hi}")))
        } else {
            Ok(v as usize)
        }
    };
    let strategy = match p.strategy {
        x if x == adaspec_strategy::Auto as i32 => Strategy::Auto,
        x if x == adaspec_strategy::None as i32 => Strategy::None,
        x if x == adaspec_strategy::Chain as i32 => {
            Strategy::Chain(in_range("params->chain_length", p.chain_length, 1, 64)?)
        }
        x if x == adaspec_strategy::Tree as i32 => Strategy::Tree {
            top_k: in_range("params->tree_top_k", p.tree_top_k, 1, 16)?,
            depth: in_range("params->tree_depth", p.tree_depth, 1, 16)?,
            nodes: in_range("params->tree_nodes", p.tree_nodes, 1, 254)?,
        },
        other => {
            return Err(FfiError::param("params->strategy", format!("{other} is not an adaspec_strategy (0..=3)")));
        }
    };
    let mode = match p.mode {
        x if x == adaspec_numeric_mode::Fast as i32 => engine::NumericMode::Fast,
        x if x == adaspec_numeric_mode::Exact as i32 => engine::NumericMode::Exact,
        other => {
            return Err(FfiError::param("params->mode", format!("{other} is not an adaspec_numeric_mode (0 or 1)")));
        }
    };
    let n_ctx = if p.n_ctx == 0 { 4096 } else { p.n_ctx as u32 };
    Ok((
        SessionParams { n_ctx, n_threads: p.n_threads, strategy, mode, lookup: p.lookup != 0, share_learning: true },
        p.seed,
    ))
}

/// Creates a session on `target`, speculating with `draft` (NULL: plain decoding with the
/// target alone). `params` may be NULL (defaults). Checks vocabulary compatibility
/// (`ADASPEC_STATUS_INCOMPATIBLE_VOCAB`). Both models may be shared with other sessions; the
/// session keeps them alive. On success writes the handle to `*out_session`; release it with
/// `adaspec_session_free`. With `ADASPEC_STRATEGY_AUTO` the call measures decode costs first
/// (a fraction of a second on small models).
#[no_mangle]
pub extern "C" fn adaspec_session_new(
    target: *const adaspec_model,
    draft: *const adaspec_model,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> adaspec_status {
    boundary("adaspec_session_new", || new_session(target, draft, false, params, out_session))
}

/// Creates a session on `target` that drafts with a feature-level head: `head` is an `eagle3`
/// GGUF (EAGLE-3 layout, e.g. made by `adaspec head init` / `adaspec head train`) loaded with
/// `adaspec_model_load`, which reads the target's own hidden states. Checks that the head was
/// made for this target (hidden size, layers, vocabulary: `ADASPEC_STATUS_INCOMPATIBLE_VOCAB`;
/// a model that is not a head: `ADASPEC_STATUS_MODEL_FILE`). Otherwise as
/// `adaspec_session_new`; `head` must not be NULL.
#[no_mangle]
pub extern "C" fn adaspec_session_new_with_head(
    target: *const adaspec_model,
    head: *const adaspec_model,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> adaspec_status {
    boundary("adaspec_session_new_with_head", || {
        check_null!(head);
        new_session(target, head, true, params, out_session)
    })
}

/// Creates a session on `target` that drafts with the head GGUF at `head_path`, loaded by
/// this call: an `eagle3` head (as `adaspec_session_new_with_head`) or an FSPAD-family head
/// (`fspad` GGUF: FSPAD, its EAGLE-2-style baseline or an ablation, made by
/// `adaspec head fspad`), told apart by the file's architecture. FSPAD-family heads run in this
/// library (ggml on the CPU) and read the target's final-norm hidden states. Errors as
/// `adaspec_session_new_with_head` (an unreadable or malformed file:
/// `ADASPEC_STATUS_MODEL_FILE`); `head_path` must not be NULL.
#[no_mangle]
pub extern "C" fn adaspec_session_new_with_head_file(
    target: *const adaspec_model,
    head_path: *const c_char,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> adaspec_status {
    boundary("adaspec_session_new_with_head_file", || head_file_session(target, None, head_path, params, out_session))
}

/// Creates a session on `target` holding both a draft model and a head: `draft` as in
/// `adaspec_session_new` (must not be NULL), the head GGUF at `head_path` as in
/// `adaspec_session_new_with_head_file` (an `eagle3` or an FSPAD-family head). With
/// `ADASPEC_STRATEGY_AUTO` every round drafts with whichever of the two its estimates (each
/// one's measured cost and acceptance, learned online) say pays more, lookups added where they
/// pay; fixed strategies draft with `draft`. Errors as those two functions.
#[no_mangle]
pub extern "C" fn adaspec_session_new_with_draft_and_head_file(
    target: *const adaspec_model,
    draft: *const adaspec_model,
    head_path: *const c_char,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> adaspec_status {
    boundary("adaspec_session_new_with_draft_and_head_file", || {
        check_null!(draft);
        head_file_session(target, Some(draft), head_path, params, out_session)
    })
}

/// A session with the head GGUF at `head_path`, and a draft model beside it where `draft` is
/// given (checked non-NULL by the caller).
fn head_file_session(
    target: *const adaspec_model,
    draft: Option<*const adaspec_model>,
    head_path: *const c_char,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> FfiResult<()> {
    check_null!(out_session);
    // SAFETY: NULL-checked inside; the host passes a NUL-terminated string.
    let path = unsafe { read_str(head_path, "head_path") }?;
    let t = model_clone(target, "target")?;
    let d = match draft {
        Some(d) => Some(model_clone(d, "draft")?),
        None => None,
    };
    // SAFETY: NULL or a host-owned struct, size-checked inside.
    let p = unsafe { read_params(params, "params") }?;
    let (mut sp, seed) = session_params(&p)?;
    if sp.n_threads == 0 {
        sp.n_threads = t.n_threads;
    }
    let head = engine::session::HeadFile::load(std::path::Path::new(path), t.model.params())?;
    let session = match d {
        Some(d) => engine::Session::with_draft_and_head(t.model.clone(), d.model.clone(), head, sp)?,
        None => engine::Session::with_head_file(t.model.clone(), head, sp)?,
    };
    publish(session, seed, out_session);
    Ok(())
}

fn new_session(
    target: *const adaspec_model,
    other: *const adaspec_model,
    is_head: bool,
    params: *const adaspec_session_params,
    out_session: *mut *mut adaspec_session,
) -> FfiResult<()> {
    check_null!(out_session);
    let t = model_clone(target, "target")?;
    let d = if other.is_null() { None } else { Some(model_clone(other, if is_head { "head" } else { "draft" })?) };
    // SAFETY: NULL or a host-owned struct, size-checked inside.
    let p = unsafe { read_params(params, "params") }?;
    let (mut sp, seed) = session_params(&p)?;
    if sp.n_threads == 0 {
        sp.n_threads = t.n_threads;
    }
    let session = match (d, is_head) {
        (Some(h), true) => engine::Session::with_head(t.model.clone(), h.model.clone(), sp)?,
        (d, _) => engine::Session::new(t.model.clone(), d.map(|d| d.model.clone()), sp)?,
    };
    publish(session, seed, out_session);
    Ok(())
}

/// Registers `session` and writes its handle to `*out_session` (checked non-NULL by the caller).
fn publish(session: engine::Session, seed: u64, out_session: *mut *mut adaspec_session) {
    let handle = Arc::new(SessionHandle {
        inner: UnsafeCell::new(Inner { session, seed, last_text: Vec::new(), poisoned: false }),
        in_use: AtomicBool::new(false),
        freed: AtomicBool::new(false),
    });
    // SAFETY: NULL-checked by the caller; written only on success.
    unsafe { *out_session = session_into_raw(handle) };
}

/// Releases a session (its KV caches and its references to the models). NULL is ignored; a
/// handle that is not live (freed twice) sets the last error and is otherwise ignored. The
/// handle is invalid once this returns. Free may race other calls on the session (another
/// thread generating, or the session's own streaming callback): a generation in progress stops
/// at its next commit without calling its callback again and returns normally (stop reason
/// callback), and the session's memory is released when that call returns.
#[no_mangle]
pub extern "C" fn adaspec_session_free(session: *mut adaspec_session) {
    boundary_value("adaspec_session_free", (), || {
        if session.is_null() {
            return;
        }
        match session_release(session) {
            Ok(h) => h.freed.store(true, Ordering::Release),
            Err(e) => set_last_error(&format!("adaspec_session_free: {}", e.message)),
        }
    })
}

/// Forgets the conversation and empties the KV caches; the session can start a new one.
/// Returns `ADASPEC_STATUS_BUSY` when called from the session's own callback or while
/// another thread uses it.
#[no_mangle]
pub extern "C" fn adaspec_session_reset(session: *mut adaspec_session) -> adaspec_status {
    boundary("adaspec_session_reset", || {
        let h = session_clone(session, "session")?;
        let mut guard = h.acquire()?;
        let inner = guard.inner();
        inner.session.reset();
        inner.last_text.clear();
        inner.poisoned = false;
        Ok(())
    })
}

/// Copies the session's committed tokens (every prompt and generated token of the
/// conversation so far) to `tokens` (room for `n_tokens_max`); the count goes to
/// `*n_tokens_out`, also when the buffer is too short (`ADASPEC_STATUS_BUFFER_TOO_SMALL`).
#[no_mangle]
pub extern "C" fn adaspec_session_history(
    session: *mut adaspec_session,
    tokens: *mut i32,
    n_tokens_max: usize,
    n_tokens_out: *mut usize,
) -> adaspec_status {
    boundary("adaspec_session_history", || {
        check_null!(n_tokens_out);
        let h = session_clone(session, "session")?;
        let mut guard = h.acquire()?;
        let history = guard.inner().session.history();
        // SAFETY: `tokens` has `n_tokens_max` writable slots (host contract).
        unsafe { write_buffer(history, tokens, n_tokens_max, n_tokens_out, "tokens") }
    })
}

/// Copies the complete text of the session's last successful generation (what the callback
/// received, concatenated) plus a NUL to `buf`; `*n_bytes_out` gets the text length without
/// the NUL, also when `buf_len` is too short (`ADASPEC_STATUS_BUFFER_TOO_SMALL`).
#[no_mangle]
pub extern "C" fn adaspec_session_last_text(
    session: *mut adaspec_session,
    buf: *mut c_char,
    buf_len: usize,
    n_bytes_out: *mut usize,
) -> adaspec_status {
    boundary("adaspec_session_last_text", || {
        check_null!(n_bytes_out);
        let h = session_clone(session, "session")?;
        let mut guard = h.acquire()?;
        let mut bytes = guard.inner().last_text.clone();
        let text_len = bytes.len();
        bytes.push(0);
        let mut needed = 0usize;
        // SAFETY: `buf` has `buf_len` writable bytes (host contract).
        let r = unsafe { write_buffer(&bytes, buf as *mut u8, buf_len, &mut needed, "buf") };
        // SAFETY: checked non-NULL above.
        unsafe { *n_bytes_out = text_len };
        r
    })
}

fn generate_params(p: &adaspec_generate_params, session_seed: u64) -> FfiResult<GenerateParams> {
    if p.max_tokens < 0 {
        return Err(FfiError::param("params->max_tokens", format!("{} is negative", p.max_tokens)));
    }
    if p.top_k < 0 {
        return Err(FfiError::param("params->top_k", format!("{} is negative", p.top_k)));
    }
    if !(p.temperature.is_finite() && p.temperature >= 0.0) {
        return Err(FfiError::param("params->temperature", format!("{} is not a finite value >= 0", p.temperature)));
    }
    if p.n_stop_strings > MAX_STOP_STRINGS {
        return Err(FfiError::param(
            "params->n_stop_strings",
            format!("{} is above {MAX_STOP_STRINGS}", p.n_stop_strings),
        ));
    }
    // SAFETY: NULL only with count 0, else `n_stop_strings` readable pointers (host contract).
    let ptrs = unsafe { read_slice(p.stop_strings, p.n_stop_strings, "params->stop_strings") }?;
    let mut stop = Vec::with_capacity(ptrs.len());
    for (i, &s) in ptrs.iter().enumerate() {
        let name = format!("params->stop_strings[{i}]");
        // SAFETY: NULL (checked inside) or a NUL-terminated string (host contract).
        let s = unsafe { read_str(s, &name) }?;
        if s.is_empty() {
            return Err(FfiError::param(&name, "is empty"));
        }
        stop.push(s.to_string());
    }
    let seed = if p.seed == ADASPEC_SEED_FROM_SESSION { session_seed } else { p.seed };
    Ok(GenerateParams {
        max_tokens: p.max_tokens as usize,
        sampling: SamplingParams {
            temperature: p.temperature,
            top_k: p.top_k as usize,
            top_p: p.top_p,
            min_p: p.min_p,
            seed,
        },
        stop,
        ignore_eog: p.ignore_eog.get(),
    })
}

fn stats_to_c(g: &engine::Generation) -> adaspec_stats {
    let s = &g.stats;
    let stop = match g.stop_reason {
        StopReason::MaxTokens => adaspec_stop_reason::MaxTokens,
        StopReason::Eog => adaspec_stop_reason::Eog,
        StopReason::StopString => adaspec_stop_reason::StopString,
        StopReason::Callback => adaspec_stop_reason::Callback,
        StopReason::ContextFull => adaspec_stop_reason::ContextFull,
    };
    adaspec_stats {
        struct_size: std::mem::size_of::<adaspec_stats>() as u32,
        stop_reason: stop as i32,
        n_tokens: s.tokens as u64,
        n_prompt_tokens: s.prompt_tokens as u64,
        n_rounds: s.rounds as u64,
        n_draft_proposed: s.draft_proposed as u64,
        n_draft_accepted: s.draft_accepted as u64,
        max_batch: s.max_batch as u64,
        acceptance_rate: s.acceptance_rate,
        tokens_per_pass: s.tokens_per_pass,
        prefill_ms: s.prefill_ms,
        draft_ms: s.draft_ms,
        verify_ms: s.verify_ms,
        sample_ms: s.sample_ms,
        total_ms: s.total_ms,
        tokens_per_second: s.tokens_per_second,
    }
}

/// The shared body of the three generate exports. `make_prompt` runs after the session is
/// acquired so that argument errors and BUSY are reported in a fixed order.
fn generate(
    session: *mut adaspec_session,
    make_prompt: impl FnOnce() -> FfiResult<Prompt>,
    params: *const adaspec_generate_params,
    callback: adaspec_token_callback,
    user_data: *mut c_void,
    stats_out: *mut adaspec_stats,
) -> FfiResult<()> {
    let h = session_clone(session, "session")?;
    let stats_size = if stats_out.is_null() {
        0
    } else {
        // SAFETY: non-NULL, host-owned struct starting with struct_size.
        unsafe { check_struct_size(stats_out as *const adaspec_stats, "stats_out") }?
    };
    // SAFETY: NULL or a host-owned struct, size-checked inside.
    let p = unsafe { read_params(params, "params") }?;
    let prompt = make_prompt()?;
    let mut guard = h.acquire()?;
    let inner = guard.inner();
    if inner.poisoned {
        return Err(FfiError::new(
            adaspec_status::Backend,
            "the session's state is unknown after an internal error; call adaspec_session_reset",
        ));
    }
    let gp = generate_params(&p, inner.seed)?;
    let freed = &h.freed;
    let mut on_commit = |tokens: &[i32], piece: &str| -> bool {
        if freed.load(Ordering::Acquire) {
            return false;
        }
        let Some(cb) = callback else { return true };
        let mut text = Vec::with_capacity(piece.len() + 1);
        text.extend_from_slice(piece.as_bytes());
        text.push(0);
        let tok_ptr = if tokens.is_empty() { std::ptr::null() } else { tokens.as_ptr() };
        // SAFETY: the host's callback with pointers valid for the duration of the call, as
        // documented on adaspec_token_callback.
        unsafe { cb(tok_ptr, tokens.len(), text.as_ptr() as *const c_char, piece.len(), user_data) }
    };
    inner.poisoned = true;
    let result = inner.session.generate(&prompt, &gp, &mut on_commit);
    inner.poisoned = false;
    let generation = result?;
    inner.last_text = generation.text.clone().into_bytes();
    if !stats_out.is_null() {
        // SAFETY: non-NULL, size-checked above; written only on success.
        unsafe { write_out(stats_out, &stats_to_c(&generation), stats_size) };
    }
    Ok(())
}

/// Appends `prompt` (NUL-terminated UTF-8; special-token texts are parsed; BOS is added at
/// the start of a conversation) to the session and generates, streaming to `callback`
/// (may be NULL). Multi-turn: the KV cache of earlier turns is kept, only new tokens are
/// processed; an empty prompt continues the conversation. `params` may be NULL (defaults).
/// `stats_out` may be NULL; its `struct_size` must be set. Returns `ADASPEC_STATUS_BUSY` when
/// the session is in use (including calls from this session's own callback).
/// A call that fails (any status but OK) leaves the session's history, conversation and
/// caches as they were before it; the session stays usable. After a stop string the history
/// ends with the tokens of the returned text (generated tokens whose text lies inside it, plus
/// the re-tokenized returned part of a token that straddled the stop string). When the
/// context fills up, generation ends with `ADASPEC_STOP_REASON_CONTEXT_FULL` and the text so
/// far; a prompt that does not fit fails with `ADASPEC_STATUS_CONTEXT_FULL`.
#[no_mangle]
pub extern "C" fn adaspec_session_generate(
    session: *mut adaspec_session,
    prompt: *const c_char,
    params: *const adaspec_generate_params,
    callback: adaspec_token_callback,
    user_data: *mut c_void,
    stats_out: *mut adaspec_stats,
) -> adaspec_status {
    boundary("adaspec_session_generate", || {
        let make = || {
            // SAFETY: NULL (checked inside) or a NUL-terminated string (host contract).
            let text = unsafe { read_str(prompt, "prompt") }?;
            Ok(Prompt::Text(text.to_string()))
        };
        generate(session, make, params, callback, user_data, stats_out)
    })
}

/// Like `adaspec_session_generate`, with the prompt given as `n_tokens` token ids (appended
/// as they are: no BOS is added). `tokens` may be NULL when `n_tokens` is 0.
#[no_mangle]
pub extern "C" fn adaspec_session_generate_tokens(
    session: *mut adaspec_session,
    tokens: *const i32,
    n_tokens: usize,
    params: *const adaspec_generate_params,
    callback: adaspec_token_callback,
    user_data: *mut c_void,
    stats_out: *mut adaspec_stats,
) -> adaspec_status {
    boundary("adaspec_session_generate_tokens", || {
        let make = || {
            // SAFETY: NULL only with count 0, else `n_tokens` readable ids (host contract).
            let ids = unsafe { read_slice(tokens, n_tokens, "tokens") }?;
            Ok(Prompt::Tokens(ids.to_vec()))
        };
        generate(session, make, params, callback, user_data, stats_out)
    })
}

/// Chat turn: appends `n_messages` new messages (usually one "user" message) to the session's
/// conversation, formats the whole conversation with the target model's chat template, and
/// generates the assistant's reply, which joins the conversation. Earlier turns stay in the
/// KV cache. Fails with `ADASPEC_STATUS_BACKEND` when the model has no usable chat template.
#[no_mangle]
pub extern "C" fn adaspec_session_chat(
    session: *mut adaspec_session,
    messages: *const adaspec_chat_message,
    n_messages: usize,
    params: *const adaspec_generate_params,
    callback: adaspec_token_callback,
    user_data: *mut c_void,
    stats_out: *mut adaspec_stats,
) -> adaspec_status {
    boundary("adaspec_session_chat", || {
        let make = || {
            if n_messages == 0 {
                return Err(FfiError::param("n_messages", "is 0"));
            }
            // SAFETY: NULL (checked inside) or `n_messages` readable structs (host contract).
            let msgs = unsafe { read_slice(messages, n_messages, "messages") }?;
            let mut out = Vec::with_capacity(msgs.len());
            for (i, m) in msgs.iter().enumerate() {
                // SAFETY: NULL (checked inside) or NUL-terminated strings (host contract).
                let role = unsafe { read_str(m.role, &format!("messages[{i}].role")) }?;
                // SAFETY: as above.
                let content = unsafe { read_str(m.content, &format!("messages[{i}].content")) }?;
                out.push(ChatMessage::new(role, content));
            }
            Ok(Prompt::Chat(out))
        };
        generate(session, make, params, callback, user_data, stats_out)
    })
}
