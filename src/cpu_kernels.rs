//! Per-context choice of ggml's CPU kernels: the fast ones (llamafile's tinyBLAS, tiled K-quant
//! matmuls, fused ops, split-KV flash attention) or the reference ones, whose results do not
//! depend on how tokens are batched (`docs/KERNELS.md`).
//!
//! ggml-cpu has the switch, `ggml_backend_cpu_set_use_ref(backend, on)`, but llama.cpp keeps
//! each context's CPU backend private. We learn it when the context is created: the CPU
//! device's `init_backend` entry (slot 5 of `struct ggml_backend_device_i`, the first member of
//! `struct ggml_backend_device` in `ggml-backend-impl.h`) is wrapped once per process by a
//! function that records the backend it returns in a thread-local. Before wrapping, the layout
//! is checked against the public API (slot 0 must be the device's `get_name`, slot 3 its
//! `get_type`); after, a recorded backend must belong to the CPU device. If any check fails
//! nothing is patched and [`create_capturing`] returns no backend: callers then cannot switch
//! kernels, and exact mode's start-up self-check caps verification accordingly.

use std::cell::Cell;
use std::ffi::{c_char, c_void, CStr};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

use llama_cpp_sys_2 as sys;

type InitBackend = unsafe extern "C" fn(sys::ggml_backend_dev_t, *const c_char) -> sys::ggml_backend_t;
type GetName = unsafe extern "C" fn(sys::ggml_backend_dev_t) -> *const c_char;
type GetType = unsafe extern "C" fn(sys::ggml_backend_dev_t) -> sys::ggml_backend_dev_type;

/// Slots of `struct ggml_backend_device_i` (llama.cpp as vendored by llama-cpp-sys-2 0.1.161).
const SLOT_GET_NAME: usize = 0;
const SLOT_GET_TYPE: usize = 3;
const SLOT_INIT_BACKEND: usize = 5;

/// The CPU device, once its `init_backend` is wrapped; `None` if the layout check failed.
static HOOK: OnceLock<Option<usize>> = OnceLock::new();
/// The original `init_backend`, stored before the entry is patched (another thread may create
/// a context the moment the patch lands).
static ORIGINAL: AtomicUsize = AtomicUsize::new(0);

thread_local! {
    static CAPTURED: Cell<sys::ggml_backend_t> = const { Cell::new(std::ptr::null_mut()) };
}

unsafe extern "C" fn capture_init(dev: sys::ggml_backend_dev_t, params: *const c_char) -> sys::ggml_backend_t {
    let original = ORIGINAL.load(Ordering::Acquire);
    if original == 0 {
        return std::ptr::null_mut(); // unreachable: stored before the patch
    }
    // SAFETY: the device's original entry (stored by `install`), called with the caller's
    // arguments.
    let backend = unsafe { std::mem::transmute::<usize, InitBackend>(original)(dev, params) };
    // try_with: never panic across the C boundary (a thread being torn down has no TLS).
    let _ = CAPTURED.try_with(|c| c.set(backend));
    backend
}

fn install() -> Option<usize> {
    // SAFETY: the registry call returns a static device or NULL.
    let dev = unsafe { sys::ggml_backend_dev_by_type(sys::GGML_BACKEND_DEVICE_TYPE_CPU) };
    if dev.is_null() {
        return None;
    }
    let slots = dev as *mut *const c_void;
    // SAFETY: `struct ggml_backend_device` starts with its interface, a struct of at least six
    // function pointers; reads of the first six are in bounds. Each is checked before use.
    let (name, ty, init) = unsafe {
        (slots.add(SLOT_GET_NAME).read(), slots.add(SLOT_GET_TYPE).read(), slots.add(SLOT_INIT_BACKEND).read())
    };
    if name.is_null() || ty.is_null() || init.is_null() {
        return None;
    }
    // SAFETY: the public API calls the same entries; if slot 0/3 are get_name/get_type, calling
    // them through the slot gives the same answers.
    let layout_ok = unsafe {
        let get_name: GetName = std::mem::transmute::<*const c_void, GetName>(name);
        let get_type: GetType = std::mem::transmute::<*const c_void, GetType>(ty);
        let ours = get_name(dev);
        let public = sys::ggml_backend_dev_name(dev);
        !ours.is_null()
            && !public.is_null()
            && CStr::from_ptr(ours) == CStr::from_ptr(public)
            && get_type(dev) == sys::ggml_backend_dev_type(dev)
            && get_type(dev) == sys::GGML_BACKEND_DEVICE_TYPE_CPU
    };
    if !layout_ok {
        tracing::warn!("ggml CPU device layout not recognised: kernel choice per context unavailable");
        return None;
    }
    ORIGINAL.store(init as usize, Ordering::Release);
    // SAFETY: the device is a mutable static in ggml-cpu; an aligned pointer store, done once
    // (OnceLock), after the original entry was stored.
    unsafe { slots.add(SLOT_INIT_BACKEND).write_volatile(capture_init as *const c_void) };
    Some(dev as usize)
}

/// Runs `create` (which must create one llama.cpp context on this thread) and returns its
/// result with the CPU backend that context got, if it could be learned.
pub fn create_capturing<T>(create: impl FnOnce() -> T) -> (T, Option<CpuBackend>) {
    let hook = HOOK.get_or_init(install);
    CAPTURED.with(|c| c.set(std::ptr::null_mut()));
    let out = create();
    let backend = CAPTURED.with(|c| c.replace(std::ptr::null_mut()));
    let Some(dev) = hook else {
        return (out, None);
    };
    if backend.is_null() {
        return (out, None);
    }
    // SAFETY: a backend ggml just created; get_device reads its device field.
    let owner = unsafe { sys::ggml_backend_get_device(backend) };
    (out, (owner as usize == *dev).then_some(CpuBackend(backend)))
}

/// A context's CPU backend (owned by the context: valid while it lives).
#[derive(Debug, Clone, Copy)]
pub struct CpuBackend(sys::ggml_backend_t);

// SAFETY: a pointer to a backend owned by one context; used only by that context's owner.
unsafe impl Send for CpuBackend {}

impl CpuBackend {
    /// Reference kernels on (batch-invariant results) or off (fastest kernels).
    pub fn set_reference(&self, on: bool) {
        // SAFETY: a live CPU backend (the owning context outlives this handle's uses).
        unsafe { sys::ggml_backend_cpu_set_use_ref(self.0, on) }
    }
}

/// Whether llama.cpp was built with llamafile's tinyBLAS kernels.
pub fn has_tinyblas() -> bool {
    // SAFETY: a constant query.
    unsafe { sys::ggml_cpu_has_llamafile() != 0 }
}

/// Which kernels a fast-mode context uses for each batch size: on some CPUs and weight types
/// the reference kernels beat the fast ones at small batches (Zen 4, Q8_0 target: B2 1.9× of
/// one token with reference kernels, 2.4× with tinyBLAS), so the start-up probe measures both
/// and keeps the cheaper per size. Sizes past the last measured one (prompt prefill) use the
/// fast kernels.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct KernelPlan {
    /// Index b: whether a batch of b tokens uses the reference kernels.
    reference: Vec<bool>,
}

/// How much cheaper (fraction) the reference kernels must measure at a size to be chosen.
const PLAN_MARGIN: f64 = 0.05;

impl KernelPlan {
    /// Reference kernels for every batch of up to `max` tokens (for measuring them).
    pub fn reference_up_to(max: usize) -> Self {
        KernelPlan { reference: vec![true; max + 1] }
    }

    /// Whether a batch of `batch` tokens uses the reference kernels.
    pub fn reference_for(&self, batch: usize) -> bool {
        self.reference.get(batch).copied().unwrap_or(false)
    }

    /// The cheaper kernels per measured size, from (size, ms) with the fast and the reference
    /// kernels; an unmeasured size inside the measured range takes its nearest smaller
    /// neighbour's choice. One-token decodes keep the fast kernels: that is how llama.cpp
    /// decodes alone, the baseline every speedup is measured against.
    pub fn from_measurements(fast: &[(usize, f64)], reference: &[(usize, f64)]) -> Self {
        let mut choice: Vec<(usize, bool)> = fast
            .iter()
            .filter_map(|&(b, f)| {
                reference.iter().find(|&&(rb, _)| rb == b).map(|&(_, r)| (b, r < f * (1.0 - PLAN_MARGIN)))
            })
            .collect();
        choice.sort_unstable();
        let Some(&(max, _)) = choice.last() else {
            return KernelPlan::default();
        };
        let mut reference = vec![false; max + 1];
        for (b, slot) in reference.iter_mut().enumerate().skip(2) {
            *slot = choice.iter().rev().find(|&&(cb, _)| cb <= b).is_some_and(|&(_, r)| r);
        }
        KernelPlan { reference }
    }

    /// The sizes that use the reference kernels, for reports.
    pub fn reference_sizes(&self) -> Vec<usize> {
        self.reference.iter().enumerate().filter(|&(_, &r)| r).map(|(b, _)| b).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plan_keeps_the_cheaper_kernels_and_fast_past_the_measured_range() {
        let fast = [(1, 25.0), (2, 50.0), (4, 80.0), (8, 120.0)];
        let reference = [(1, 20.0), (2, 40.0), (4, 79.0), (8, 200.0)];
        let p = KernelPlan::from_measurements(&fast, &reference);
        assert!(!p.reference_for(1), "one-token decodes: as llama.cpp runs them");
        assert!(p.reference_for(2));
        assert!(p.reference_for(3), "inside the range: the smaller neighbour's choice");
        assert!(!p.reference_for(4), "within the margin: fast");
        assert!(!p.reference_for(8));
        assert!(!p.reference_for(300), "prefill: fast");
        assert_eq!(p.reference_sizes(), vec![2, 3]);
        assert_eq!(KernelPlan::from_measurements(&[], &[]), KernelPlan::default());
    }
}
