//! Checks a GGUF file before llama.cpp loads it, refusing what llama.cpp would abort the
//! process on (a `GGML_ASSERT`) rather than report: every rule here was found by the GGUF
//! mutation run (ffi/tests/fuzz_gguf.rs) or read off an assert in llama.cpp's loader.
//!
//! The metadata is read with llama.cpp's own GGUF parser (`gguf_init_from_file` with
//! `no_alloc`), which returns NULL, not aborts, on a malformed header, truncated tables,
//! overflowing counts, unknown types or misplaced tensor offsets; the checks below are the
//! semantic ones it leaves to the model loader. Keys are read only when they have the type
//! llama.cpp expects; a key of another type makes the loader throw, which is reported.

use std::collections::HashMap;
use std::ffi::{CStr, CString};
use std::io::Read;
use std::path::Path;

use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};

/// llama.cpp's `LLAMA_MAX_LAYERS` (llama-hparams.h).
const MAX_LAYERS: u32 = 512;
/// llama.cpp's `LLAMA_MAX_EXPERTS` (llama-hparams.h).
const MAX_EXPERTS: u32 = 1024;
/// ggml's `GGML_MAX_DIMS`: `gguf_get_tensor_ne` returns this many dimensions.
const GGML_MAX_DIMS: usize = 4;
/// ggml's `TENSOR_ALIGNMENT`: a memory-mapped file's tensor data must start at a multiple.
const TENSOR_ALIGNMENT: usize = 32;
/// The rope scaling names llama.cpp knows (`LLAMA_ROPE_SCALING_TYPES` in llama-model.cpp).
const ROPE_SCALING_TYPES: &[&str] = &["none", "linear", "yarn", "longrope"];
/// Architectures whose graph asserts that the rope covers the whole head (`n_embd_head ==
/// n_rot`); printed by scripts/rope-full-archs.py from the vendored llama.cpp.
const FULL_ROPE_ARCHS: &[&str] = &[
    "apertus",
    "arcee",
    "arctic",
    "baichuan",
    "chameleon",
    "codeshell",
    "cogvlm",
    "cohere2moe",
    "dbrx",
    "deci",
    "deepseek",
    "dots1",
    "dream",
    "ernie4_5",
    "ernie4_5-moe",
    "exaone",
    "exaone-
    moe",
    "exaone4",
    "falcon",
    "granite",
    "granite_swa",
    "graniteswitch",
    "grok",
    "grovemoe",
    "hunyuan-moe",
    "hunyuan_vl",
    "hy_v3",
    "internlm2",
    "jais2",
    "llada",
    "llada-moe",
    "llama",
    "llama4",
    "maincoder",
    "mellum",
    "minimax-01",
    "minimax-m2",
    "mistral3",
    "nemotron",
    "olmo",
    "olmo2",
    "olmoe",
    "orion",
    "paddleocr",
    "pangu-embedded",
    "plamo",
    "pockettts",
    "qwen2",
    "qwen2moe",
    "qwen2vl",
    "qwen3",
    "qwen3moe",
    "qwen3vl",
    "qwen3vlmoe",
    "rnd1",
    "seed_oss",
    "smallthinker",
    "smollm3",
    "starcoder2",
    "talkie",
    "xverse",
];

fn invalid(path: &Path, reason: impl Into<String>) -> Error {
    Error::InvalidGguf { path: path.to_path_buf(), reason: reason.into() }
}

/// A regular file that starts with the GGUF magic and a version llama.cpp reads.
pub fn check_header(path: &Path) -> Result<()> {
    let io = |e: std::io::Error| Error::ModelFile { path: path.to_path_buf(), reason: e.to_string() };
    let meta = std::fs::metadata(path).map_err(io)?;
    if !meta.is_file() {
        return Err(Error::ModelFile { path: path.to_path_buf(), reason: "not a regular file".into() });
    }
    let mut magic = [0u8; 8];
    let n = std::fs::File::open(path).map_err(io)?.read(&mut magic).map_err(io)?;
    if n < 8 || &magic[..4] != b"GGUF" {
        return Err(invalid(path, "missing GGUF magic (is this a GGUF model file?)"));
    }
    let version = u32::from_le_bytes([magic[4], magic[5], magic[6], magic[7]]);
    if !(2..=3).contains(&version) {
        return Err(invalid(path, format!("unsupported GGUF version {version}")));
    }
    Ok(())
}

/// The file's path as a C string (no NUL bytes).
pub fn c_path(path: &Path) -> Result<CString> {
    CString::new(path.to_string_lossy().as_bytes())
        .map_err(|_| Error::ModelFile { path: path.to_path_buf(), reason: "path contains a NUL byte".into() })
}

/// Everything [`check_header`] checks, then the metadata: the tokenizer, the hyperparameters
/// and (for a memory-mapped load) the tensor data alignment.
pub fn check(path: &Path, c_path: &CStr, mmap: bool) -> Result<()> {
    check_header(path)?;
    let meta = Metadata::read(path, c_path)?;
    meta.check_tokenizer(path)?;
    meta.check_hparams(path)?;
    meta.check_vectors(path)?;
    if mmap {
        meta.check_alignment(path)?;
    }
    Ok(())
}

/// A parsed GGUF header (metadata only), freed on drop.
struct Metadata {
    ctx: *mut sys::gguf_context,
    keys: HashMap<String, i64>,
}

impl Drop for Metadata {
    fn drop(&mut self) {
        // SAFETY: ctx came from gguf_init_from_file and is freed once.
        unsafe { sys::gguf_free(self.ctx) };
    }
}

impl Metadata {
    fn read(path: &Path, c_path: &CStr) -> Result<Metadata> {
        let params = sys::gguf_init_params { no_alloc: true, ctx: std::ptr::null_mut() };
        crate::backend::take_llama_error();
        // SAFETY: NUL-terminated path; with no_alloc and a NULL ctx only metadata is read.
        let ctx = unsafe { sys::gguf_init_from_file(c_path.as_ptr(), params) };
        if ctx.is_null() {
            return Err(invalid(path, format!("unreadable header: {}", crate::backend::take_llama_error())));
        }
        let mut meta = Metadata { ctx, keys: HashMap::new() };
        // SAFETY: valid ctx; indices below gguf_get_n_kv; keys are NUL-terminated.
        let n = unsafe { sys::gguf_get_n_kv(ctx) };
        for i in 0..n {
            // SAFETY: as above.
            let key = unsafe { CStr::from_ptr(sys::gguf_get_key(ctx, i)) };
            meta.keys.insert(key.to_string_lossy().into_owned(), i);
        }
        Ok(meta)
    }

    fn kv_type(&self, id: i64) -> sys::gguf_type {
        // SAFETY: id is a valid key index.
        unsafe { sys::gguf_get_kv_type(self.ctx, id) }
    }

    fn string(&self, key: &str) -> Option<String> {
        let &id = self.keys.get(key)?;
        if self.kv_type(id) != sys::GGUF_TYPE_STRING {
            return None;
        }
        // SAFETY: a string value of a valid key; NUL-terminated.
        Some(unsafe { CStr::from_ptr(sys::gguf_get_val_str(self.ctx, id)) }.to_string_lossy().into_owned())
    }

    /// A u32 value, or the largest element of a u32 array (per-layer keys).
    fn u32_max(&self, key: &str) -> Option<u32> {
        let &id = self.keys.get(key)?;
        match self.kv_type(id) {
            // SAFETY: type checked.
            sys::GGUF_TYPE_UINT32 => Some(unsafe { sys::gguf_get_val_u32(self.ctx, id) }),
            sys::GGUF_TYPE_ARRAY => self.u32_array(id).map(|a| a.into_iter().max().unwrap_or(0)),
            _ => None,
        }
    }

    fn u32_array(&self, id: i64) -> Option<Vec<u32>> {
        // SAFETY: valid array key; the data holds gguf_get_arr_n elements of its type.
        unsafe {
            if sys::gguf_get_arr_type(self.ctx, id) != sys::GGUF_TYPE_UINT32 {
                return None;
            }
            let n = sys::gguf_get_arr_n(self.ctx, id);
            let p = sys::gguf_get_arr_data(self.ctx, id) as *const u32;
            Some(if n == 0 || p.is_null() { Vec::new() } else { std::slice::from_raw_parts(p, n).to_vec() })
        }
    }

    /// Every f32/f64 value, scalar or array element, of a key.
    fn floats(&self, id: i64) -> Vec<f64> {
        // SAFETY: types checked before each read; arrays hold gguf_get_arr_n elements.
        unsafe {
            match self.kv_type(id) {
                sys::GGUF_TYPE_FLOAT32 => vec![sys::gguf_get_val_f32(self.ctx, id) as f64],
                sys::GGUF_TYPE_FLOAT64 => vec![sys::gguf_get_val_f64(self.ctx, id)],
                sys::GGUF_TYPE_ARRAY => {
                    let n = sys::gguf_get_arr_n(self.ctx, id);
                    let p = sys::gguf_get_arr_data(self.ctx, id);
                    if n == 0 || p.is_null() {
                        return Vec::new();
                    }
                    match sys::gguf_get_arr_type(self.ctx, id) {
                        sys::GGUF_TYPE_FLOAT32 => {
                            std::slice::from_raw_parts(p as *const f32, n).iter().map(|&v| v as f64).collect()
                        }
                        sys::GGUF_TYPE_FLOAT64 => std::slice::from_raw_parts(p as *const f64, n).to_vec(),
                        _ => Vec::new(),
                    }
                }
                _ => Vec::new(),
            }
        }
    }

    /// Token texts must be unique: llama-vocab.cpp asserts `id_to_token.size() ==
    /// token_to_id.size()`.
    fn check_tokenizer(&self, path: &Path) -> Result<()> {
        let Some(&id) = self.keys.get("tokenizer.ggml.tokens") else { return Ok(()) };
        // SAFETY: valid key; array type checked before the strings are read.
        unsafe {
            if self.kv_type(id) != sys::GGUF_TYPE_ARRAY || sys::gguf_get_arr_type(self.ctx, id) != sys::GGUF_TYPE_STRING
            {
                return Ok(());
            }
            let n = sys::gguf_get_arr_n(self.ctx, id);
            let mut seen: HashMap<&[u8], usize> = HashMap::with_capacity(n);
            for i in 0..n {
                let p = sys::gguf_get_arr_str(self.ctx, id, i);
                let text: &[u8] = if p.is_null() { &[] } else { CStr::from_ptr(p).to_bytes() };
                if let Some(first) = seen.insert(text, i) {
                    return Err(invalid(
                        path,
                        format!(
                            "tokenizer.ggml.tokens holds the token text {:?} twice (ids {first} and {i}); llama.cpp cannot load such a vocabulary",
                            String::from_utf8_lossy(text)
                        ),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The hyperparameters llama.cpp's `load_hparams` asserts on, and every float
    /// hyperparameter finite (epsilons also non-negative: ggml's norm ops assert `eps >= 0`).
    fn check_hparams(&self, path: &Path) -> Result<()> {
        let Some(arch) = self.string("general.architecture") else { return Ok(()) };
        let key = |k: &str| format!("{arch}.{k}");
        let bad = |k: &str, why: String| Err(invalid(path, format!("{}: {why}", key(k))));
        let n_layer = self.u32_max(&key("block_count"));
        if let Some(n) = n_layer {
            if !(1..=MAX_LAYERS).contains(&n) {
                return bad("block_count", format!("{n} is outside 1..={MAX_LAYERS}"));
            }
        }
        let n_layer = n_layer.unwrap_or(0);
        if let Some(n) = self.u32_max(&key("nextn_predict_layers")) {
            if n > n_layer {
                return bad("nextn_predict_layers", format!("{n} is above block_count {n_layer}"));
            }
        }
        let n_expert = self.u32_max(&key("expert_count")).unwrap_or(0);
        let used = self.u32_max(&key("expert_used_count")).unwrap_or(0);
        let groups = self.u32_max(&key("expert_group_count")).unwrap_or(0);
        let group_used = self.u32_max(&key("expert_group_used_count")).unwrap_or(0);
        if n_expert > MAX_EXPERTS {
            return bad("expert_count", format!("{n_expert} is above {MAX_EXPERTS}"));
        }
        let experts_ok = if n_expert > 0 {
            used > 0
                && used <= n_expert
                && groups < n_expert
                && (groups <= 1 || (n_expert % groups == 0 && group_used > 0 && group_used < groups))
        } else {
            used == 0 && groups == 0
        };
        if !experts_ok {
            return bad(
                "expert_count",
                format!(
                    "{n_expert} experts with {used} used, {groups} groups and {group_used} groups used is not a valid mixture"
                ),
            );
        }
        if let Some(t) = self.string(&key("rope.scaling.type")) {
            if !ROPE_SCALING_TYPES.contains(&t.as_str()) {
                return bad("rope.scaling.type", format!("{t:?} is not one of {ROPE_SCALING_TYPES:?}"));
            }
        }
        // The rope: ggml's rope op asserts an even dimension count no larger than the head and
        // loops forever on 0; many graphs assert that it covers the whole head.
        let n_head = self.u32_max(&key("attention.head_count")).unwrap_or(0);
        let n_embd = self.u32_max(&key("embedding_length")).unwrap_or(0);
        if let Some(default_dim) = n_embd.checked_div(n_head) {
            let head_dim = self.u32_max(&key("attention.key_length")).unwrap_or(default_dim);
            for k in ["rope.dimension_count", "rope.dimension_count_swa"] {
                let Some(n_rot) = self.u32_max(&key(k)) else { continue };
                if n_rot == 0 || n_rot % 2 != 0 || n_rot > head_dim {
                    return bad(k, format!("{n_rot} is not an even count in 2..={head_dim} (the head size)"));
                }
                if n_rot != head_dim && FULL_ROPE_ARCHS.contains(&arch.as_str()) {
                    return bad(k, format!("{n_rot} differs from the head size {head_dim}, which {arch} ropes whole"));
                }
            }
        }
        let prefix = format!("{arch}.");
        for (k, &id) in &self.keys {
            let Some(name) = k.strip_prefix(&prefix) else { continue };
            for v in self.floats(id) {
                if !v.is_finite() {
                    return bad(name, format!("{v} is not a finite number"));
                }
                if name.contains("epsilon") && v < 0.0 {
                    return bad(name, format!("{v} is negative"));
                }
            }
        }
        Ok(())
    }

    /// One-dimensional float tensors (norm weights, biases) enter ggml's element-wise ops as
    /// the second operand, which the CPU backend only takes in F32 (it aborts on others); every
    /// GGUF converter and llama.cpp's quantizer keep them F32. (The header parser already
    /// ensures each tensor's size matches its type, except for the last one's.)
    fn check_vectors(&self, path: &Path) -> Result<()> {
        // SAFETY: valid ctx; tensor indices below gguf_get_n_tensors; ne has GGML_MAX_DIMS
        // elements; names are NUL-terminated.
        unsafe {
            for i in 0..sys::gguf_get_n_tensors(self.ctx) {
                let ne = std::slice::from_raw_parts(sys::gguf_get_tensor_ne(self.ctx, i), GGML_MAX_DIMS);
                let t = sys::gguf_get_tensor_type(self.ctx, i);
                let integer = [sys::GGML_TYPE_I8, sys::GGML_TYPE_I16, sys::GGML_TYPE_I32, sys::GGML_TYPE_I64];
                if ne[1..].iter().all(|&n| n == 1) && t != sys::GGML_TYPE_F32 && !integer.contains(&t) {
                    let name = CStr::from_ptr(sys::gguf_get_tensor_name(self.ctx, i)).to_string_lossy();
                    let type_name = CStr::from_ptr(sys::ggml_type_name(t)).to_string_lossy();
                    return Err(invalid(
                        path,
                        format!("tensor {name:?} is a vector of type {type_name}; llama.cpp's CPU backend needs f32 vectors"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// With mmap, ggml wraps the mapped file's tensor data as CPU buffers, asserting that they
    /// start at multiples of 32 bytes (a `general.alignment` below 32 can break that).
    fn check_alignment(&self, path: &Path) -> Result<()> {
        // SAFETY: valid ctx; tensor indices below gguf_get_n_tensors.
        let (data, n) = unsafe { (sys::gguf_get_data_offset(self.ctx), sys::gguf_get_n_tensors(self.ctx)) };
        for i in 0..n {
            // SAFETY: as above.
            let at = data.saturating_add(unsafe { sys::gguf_get_tensor_offset(self.ctx, i) });
            if at % TENSOR_ALIGNMENT != 0 {
                return Err(invalid(
                    path,
                    format!(
                        "tensor {i}'s data starts at byte {at}, not a multiple of {TENSOR_ALIGNMENT} (general.alignment \
                         too small); llama.cpp cannot memory-map it (load without mmap)"
                    ),
                ));
            }
        }
        Ok(())
    }
}
