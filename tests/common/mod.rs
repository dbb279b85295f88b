//! Helpers shared by the integration tests: where the real models are, and the rule for when
//! they are missing. A missing real model fails the test with how to fetch it, so that CI can
//! never pass by skipping; the only way around is the explicit opt-out
//! `ADASPEC_SKIP_REAL_MODELS=1`, which prints a notice and is itself refused when `CI` is set.
#![allow(dead_code)]

pub mod dist;
pub mod gen;

use std::io::Write;
use std::path::PathBuf;

use adaspec::models::models_dir;

/// The small llama-architecture model (vocabulary of 49,152: incompatible with the Qwen pair).
pub const SMOLLM2: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";

/// `CI` is set to something other than empty, `0` or `false`.
fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "0" && !v.eq_ignore_ascii_case("false"))
}

/// Whether the developer opted out of real-model tests (`ADASPEC_SKIP_REAL_MODELS=1`);
/// panics when that is asked for under CI.
fn skip_requested(names: &[&str]) -> bool {
    if !std::env::var("ADASPEC_SKIP_REAL_MODELS").is_ok_and(|v| v == "1") {
        return false;
    }
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
    true
}

/// The paths of real models `names` in [`models_dir`]. Panics when one is missing, naming it and
/// the folder; `None` only when the developer opted out with `ADASPEC_SKIP_REAL_MODELS=1`.
pub fn real_models<const N: usize>(names: [&str; N]) -> Option<[PathBuf; N]> {
    if skip_requested(&names) {
        return None;
    }
    let dir = models_dir();
    let paths = names.map(|n| dir.join(n));
    for (name, path) in names.iter().zip(&paths) {
        assert!(
            path.is_file(),
            "model {name} not found in {}; run scripts/fetch-models.sh (or set ADASPEC_MODELS to the folder \
             that has it; outside CI, ADASPEC_SKIP_REAL_MODELS=1 skips real-model tests)",
            dir.display()
        );
    }
    Some(paths)
}

/// One real model; see [`real_models`].
pub fn real_model(name: &str) -> Option<PathBuf> {
    real_models([name]).map(|[p]| p)
}
