//! Tokenize / detokenize exports. Both follow the buffer convention: the needed size is
//! written to the size out-param on success and when the buffer is too short
//! (`ADASPEC_STATUS_BUFFER_TOO_SMALL`), so a host can call once with an empty buffer to size it.

use std::ffi::c_char;

use crate::handles::{adaspec_model, model_clone};
use crate::params::{read_slice, write_buffer, CBool};
use crate::status::{adaspec_status, boundary, FfiError};

/// Converts UTF-8 text (`text_len` bytes, no NUL needed) to token ids.
/// `add_special` adds BOS (etc.) as the model wants at the start of a sequence;
/// `parse_special` turns special-token texts such as "<|im_end|>" into their ids.
/// Writes the ids to `tokens` (room for `n_tokens_max`) and their count to `*n_tokens_out`;
/// when `n_tokens_max` is too small, returns `ADASPEC_STATUS_BUFFER_TOO_SMALL` with the needed
/// count in `*n_tokens_out`. `tokens` may be NULL when `n_tokens_max` is 0.
#[no_mangle]
pub extern "C" fn adaspec_tokenize(
    model: *const adaspec_model,
    text: *const c_char,
    text_len: usize,
    add_special: CBool,
    parse_special: CBool,
    tokens: *mut i32,
    n_tokens_max: usize,
    n_tokens_out: *mut usize,
) -> adaspec_status {
    boundary("adaspec_tokenize", || {
        check_null!(n_tokens_out);
        let m = model_clone(model, "model")?;
        // SAFETY: NULL only with length 0, else `text_len` readable bytes (host contract).
        let bytes = unsafe { read_slice(text as *const u8, text_len, "text") }?;
        let text = std::str::from_utf8(bytes).map_err(|e| {
            FfiError::new(adaspec_status::InvalidUtf8, format!("argument `text` is not valid UTF-8: {e}"))
        })?;
        let ids = m.model.tokenize(text, add_special.get(), parse_special.get())?;
        // SAFETY: `tokens` has `n_tokens_max` writable slots; `n_tokens_out` checked non-NULL.
        unsafe { write_buffer(&ids, tokens, n_tokens_max, n_tokens_out, "tokens") }
    })
}

/// Renders token ids to text bytes (UTF-8; a cut multi-byte character stays cut).
/// `render_special` renders control tokens such as "<|im_end|>" as their text instead of
/// nothing. Writes the text plus a terminating NUL to `buf` and the text length (without the
/// NUL) to `*n_bytes_out`; `buf_len` must be at least `*n_bytes_out + 1`, otherwise returns
/// `ADASPEC_STATUS_BUFFER_TOO_SMALL` with the length in `*n_bytes_out`. `buf` may be NULL
/// when `buf_len` is 0. Ids outside the vocabulary give `ADASPEC_STATUS_INVALID_PARAM`.
#[no_mangle]
pub extern "C" fn adaspec_detokenize(
    model: *const adaspec_model,
    tokens: *const i32,
    n_tokens: usize,
    render_special: CBool,
    buf: *mut c_char,
    buf_len: usize,
    n_bytes_out: *mut usize,
) -> adaspec_status {
    boundary("adaspec_detokenize", || {
        check_null!(n_bytes_out);
        let m = model_clone(model, "model")?;
        // SAFETY: NULL only with length 0, else `n_tokens` readable ids (host contract).
        let ids = unsafe { read_slice(tokens, n_tokens, "tokens") }?;
        let n_vocab = m.model.n_vocab();
        if let Some(bad) = ids.iter().find(|&&t| t < 0 || t as usize >= n_vocab) {
            return Err(FfiError::param("tokens", format!("token id {bad} outside the vocabulary (0..{n_vocab})")));
        }
        let mut bytes: Vec<u8> =
            ids.iter().flat_map(|&t| m.model.token_to_piece_ext(t, render_special.get())).collect();
        let text_len = bytes.len();
        bytes.push(0);
        let mut needed = 0usize;
        // SAFETY: `buf` has `buf_len` writable bytes (host contract); `needed` is local.
        let r = unsafe { write_buffer(&bytes, buf as *mut u8, buf_len, &mut needed, "buf") };
        // SAFETY: checked non-NULL above.
        unsafe { *n_bytes_out = text_len };
        r
    })
}
