//! Target features for feature-level heads: the hidden states entering chosen target layers,
//! for every token the target processes (prompt processing and each verification batch).
//!
//! Mechanism: llama.cpp's public `cb_eval` callback (`llama_context_params`). The graph scheduler
//! asks it about every node; for the tensors named `l_out-{id-1}` (layer `id - 1`'s output, the
//! input of layer `id`) or `inp_embd` (the input of layer 0) it answers yes, computes the graph up
//! to that node and hands the tensor over, and we copy its rows. This works on any architecture
//! llama.cpp runs with its standard tensor names (qwen2, llama, qwen3, …) and any backend, unlike
//! `llama_set_embeddings_layer_inp`, which is C++-only and wired only in hooked architectures
//! (not qwen2). Cost: the graph is computed in four pieces instead of one and the rows are
//! copied (measured in docs/HEADS.md).
//!
//! Inside the last layer llama.cpp keeps only the output rows, so only layer *inputs* (up to
//! that of the last layer) have every token's row: EAGLE-3's layers {2, L/2, L-3} do.

use std::ffi::{c_void, CStr};
use std::sync::Mutex;

use llama_cpp_sys_2 as sys;

use crate::error::{Error, Result};

/// EAGLE-3's feature layers for a target of `n_layer` layers (HF `hidden_states` indices, i.e.
/// the layers whose *inputs* are read): {2, L/2, L-3}, clamped into 1..L for tiny targets.
pub fn eagle3_layers(n_layer: usize) -> [u32; 3] {
    let top = n_layer.saturating_sub(1);
    let pick = |x: usize| x.min(top) as u32;
    [pick(2), pick(n_layer / 2), pick(n_layer.saturating_sub(3).max(1))]
}

/// Rows of each tapped tensor since the last [`FeatureTap::clear`].
#[derive(Default)]
struct Rows {
    layers: Vec<Vec<f32>>,
    /// A tensor that did not have the expected shape or type (reported by `take`).
    error: Option<String>,
}

/// Collects the features of every decode on the target context it is attached to.
pub struct FeatureTap {
    layer_ids: [u32; 3],
    /// Taps the target's final-norm output (`result_norm`), which holds output rows only.
    final_norm: bool,
    /// Graph tensor name → which of the three slots it fills (a layer may be asked twice).
    names: Vec<(String, Vec<usize>)>,
    n_embd: usize,
    rows: Mutex<Rows>,
}

impl FeatureTap {
    /// A tap for the inputs of `layer_ids` (each below `n_layer`) of a target with hidden
    /// size `n_embd`.
    pub fn new(layer_ids: [u32; 3], n_layer: usize, n_embd: usize) -> Result<FeatureTap> {
        let mut names: Vec<(String, Vec<usize>)> = Vec::new();
        for (slot, &id) in layer_ids.iter().enumerate() {
            if id as usize >= n_layer {
                return Err(Error::InvalidParam {
                    name: "target_layers",
                    reason: format!(
                        "layer {id} of a {n_layer}-layer target: the inputs of layers 0..{n_layer} can be read"
                    ),
                });
            }
            let name = if id == 0 { "inp_embd".to_string() } else { format!("l_out-{}", id - 1) };
            match names.iter_mut().find(|(n, _)| *n == name) {
                Some((_, slots)) => slots.push(slot),
                None => names.push((name, vec![slot])),
            }
        }
        let rows = Rows { layers: vec![Vec::new(); 3], error: None };
        Ok(FeatureTap { layer_ids, final_norm: false, names, n_embd, rows: Mutex::new(rows) })
    }

    /// A tap for the target's last hidden state after its final norm (`result_norm`, the
    /// feature EAGLE-2-style and FSPAD heads read). llama.cpp computes it for output rows
    /// only, so every token whose row is wanted must be decoded as an output
    /// ([`FeatureTap::needs_output_rows`]).
    pub fn final_norm(n_embd: usize) -> FeatureTap {
        let rows = Rows { layers: vec![Vec::new()], error: None };
        FeatureTap {
            layer_ids: [0; 3],
            final_norm: true,
            names: vec![("result_norm".to_string(), vec![0])],
            n_embd,
            rows: Mutex::new(rows),
        }
    }

    /// Rows exist only for tokens decoded as outputs (prompt processing must ask for them).
    pub fn needs_output_rows(&self) -> bool {
        self.final_norm
    }

    /// Floats per gathered row (every tapped tensor's row, concatenated).
    pub fn row_width(&self) -> usize {
        self.n_embd * self.lock().layers.len()
    }

    /// The layers read (their inputs; meaningless for a [`FeatureTap::final_norm`] tap).
    pub fn layer_ids(&self) -> [u32; 3] {
        self.layer_ids
    }

    /// Width of one layer's row.
    pub fn n_embd(&self) -> usize {
        self.n_embd
    }

    /// Forgets collected rows (before a decode whose rows are wanted).
    pub fn clear(&self) {
        let mut r = self.lock();
        for l in r.layers.iter_mut() {
            l.clear();
        }
        r.error = None;
    }

    /// Number of token rows collected (complete in all three layers).
    pub fn n_rows(&self) -> usize {
        let r = self.lock();
        r.layers.iter().map(Vec::len).min().unwrap_or(0) / self.n_embd.max(1)
    }

    /// The concatenated features [low; mid; high] (3·n_embd floats per row; n_embd for a
    /// final-norm tap) of the collected
    /// rows `rows` (indices into the rows since the last clear), appended to `out`.
    pub fn gather(&self, rows: &[usize], out: &mut Vec<f32>) -> Result<()> {
        let r = self.lock();
        if let Some(e) = &r.error {
            return Err(Error::Decode { code: -1, what: format!("target features: {e}") });
        }
        let n = r.layers.iter().map(Vec::len).min().unwrap_or(0) / self.n_embd.max(1);
        let h = self.n_embd;
        for &i in rows {
            if i >= n {
                return Err(Error::Decode {
                    code: -1,
                    what: format!("target features: row {i} requested, {n} collected"),
                });
            }
            for l in &r.layers {
                out.extend_from_slice(&l[i * h..(i + 1) * h]);
            }
        }
        Ok(())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Rows> {
        // A poisoned lock only means a panic elsewhere while holding it; the rows stay usable.
        self.rows.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn slots_of(&self, t: *const sys::ggml_tensor) -> Option<&[usize]> {
        // SAFETY: ggml hands the callback a valid tensor; its name is a NUL-terminated array.
        let name = unsafe { CStr::from_ptr((*t).name.as_ptr()) };
        let name = name.to_bytes();
        self.names.iter().find(|(n, _)| n.as_bytes() == name).map(|(_, s)| s.as_slice())
    }

    fn copy(&self, t: *mut sys::ggml_tensor, slots: &[usize]) {
        // SAFETY: valid tensor (see slots_of).
        let (ty, ne, nb) = unsafe { ((*t).type_, (*t).ne, (*t).nb) };
        let mut r = self.lock();
        if ty != sys::GGML_TYPE_F32 || ne[0] as usize != self.n_embd || nb[1] != ne[0] as usize * 4 || ne[2] != 1 {
            r.error =
                Some(format!("tensor of type {ty} with shape {ne:?} where f32 rows of {} were expected", self.n_embd));
            return;
        }
        let n = ne[0] as usize * ne[1] as usize;
        for &slot in slots {
            let dst = &mut r.layers[slot];
            let start = dst.len();
            dst.resize(start + n, 0.0);
            // SAFETY: the tensor is computed (ask = false), contiguous f32 of n floats (checked
            // above), and dst has room for n floats from `start`.
            unsafe {
                sys::ggml_backend_tensor_get(t, dst[start..].as_mut_ptr().cast::<c_void>(), 0, n * 4);
            }
        }
    }
}

/// The `cb_eval` callback; `user_data` is a `*const FeatureTap` that outlives the context.
pub(crate) unsafe extern "C" fn feature_callback(t: *mut sys::ggml_tensor, ask: bool, user_data: *mut c_void) -> bool {
    if t.is_null() || user_data.is_null() {
        return false;
    }
    // SAFETY: the context holds an Arc of the tap for its whole life (backend::Context).
    let tap = unsafe { &*(user_data as *const FeatureTap) };
    // Never unwind into C; on a panic the rows are left incomplete and `gather` reports it.
    std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| match tap.slots_of(t) {
        None => false,
        Some(_) if ask => true,
        Some(slots) => {
            tap.copy(t, slots);
            true
        }
    }))
    .unwrap_or(!ask)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn eagle3_layers_follow_the_convention() {
        assert_eq!(eagle3_layers(28), [2, 14, 25]);
        assert_eq!(eagle3_layers(32), [2, 16, 29]);
        assert_eq!(eagle3_layers(6), [2, 3, 3]);
        // Tiny targets: clamped below the last layer.
        assert_eq!(eagle3_layers(4), [2, 2, 1]);
    }

    #[test]
    fn tap_rejects_the_last_layer_and_names_tensors() {
        assert!(FeatureTap::new([2, 3, 6], 6, 8).is_err());
        assert!(FeatureTap::new([2, 3, 5], 6, 8).is_ok());
        let t = FeatureTap::new([0, 3, 3], 6, 8).unwrap();
        assert_eq!(t.names, vec![("inp_embd".to_string(), vec![0]), ("l_out-2".to_string(), vec![1, 2])]);
    }
}
