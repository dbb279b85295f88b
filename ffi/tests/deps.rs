//! The library a C host links carries the engine only: none of the CLI's crates (clap, the
//! log subscriber), none of the trainer's (candle, safetensors, indicatif), no test fixtures.

use std::path::Path;
use std::process::Command;

#[test]
fn the_plugin_links_no_cli_trainer_or_test_crates() {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().expect("workspace root");
    let out = Command::new(cargo)
        .current_dir(root)
        .args(["tree", "--offline", "-p", "adaspec-ffi", "-e", "normal", "--prefix", "none", "-f", "{p} {f}"])
        .output()
        .expect("run cargo tree");
    assert!(out.status.success(), "cargo tree failed: {}", String::from_utf8_lossy(&out.stderr));
    let tree = String::from_utf8_lossy(&out.stdout);
    assert!(tree.lines().any(|l| l.starts_with("adaspec v")), "the engine is missing from:\n{tree}");
    for banned in
        ["clap ", "tracing-subscriber ", "candle-core ", "safetensors ", "indicatif ", "llama-cpp-2 ", "proptest "]
    {
        assert!(!tree.lines().any(|l| l.starts_with(banned)), "the plugin depends on {banned}:\n{tree}");
    }
    let engine = tree.lines().find(|l| l.starts_with("adaspec v")).unwrap_or_default();
    for feature in ["cli", "fixtures", "train"] {
        assert!(!engine.split([' ', ',']).any(|f| f == feature), "engine built with feature {feature}: {engine}");
    }
}
