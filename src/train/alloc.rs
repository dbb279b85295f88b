//! The trainer binaries' allocator settings. Their global allocator is mimalloc (candle
//! allocates and frees vocabulary- and weight-sized temporaries every op); by default mimalloc
//! returns freed memory to the OS after a second, so a training step of several seconds
//! faulted all its temporaries in again: half the step in the kernel. Keeping freed memory
//! costs RSS up to the peak a step needs, which the trainer needs anyway.
//!
//! Measured (2-vCPU Zen 4, `examples/train_speed.rs`, batch 4 × 256, medians of steps 2–4):
//! EAGLE-3 head for the 1.5B 11.8 → 7.4 s per step, pruned 0.5B draft 18.3 → 10.4 s.

/// `mi_option_purge_delay` (the same index in mimalloc v2 and v3, `mimalloc.h`).
const MI_OPTION_PURGE_DELAY: libmimalloc_sys::mi_option_t = 15;

/// Makes mimalloc keep freed memory for reuse instead of purging it. For binaries whose
/// global allocator is `mimalloc::MiMalloc`; call first thing in `main`. An explicit
/// `MIMALLOC_PURGE_DELAY` in the environment wins.
pub fn keep_freed_memory() {
    if std::env::var_os("MIMALLOC_PURGE_DELAY").is_some() {
        return;
    }
    // SAFETY: sets one option's value; mimalloc reads options atomically.
    unsafe { libmimalloc_sys::mi_option_set(MI_OPTION_PURGE_DELAY, -1) };
}
