//! The `adaspec` binary: bad inputs print one clear `error:` line and exit non-zero, never a
//! panic; a tiny-model generation works end to end and its JSON is machine-readable.

mod common;

use std::path::PathBuf;
use std::process::Command;

use adaspec::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};

fn bin() -> Command {
    Command::new(env!("CARGO_BIN_EXE_adaspec"))
}

fn tiny() -> (PathBuf, PathBuf, PathBuf) {
    let dir = std::env::temp_dir().join(format!("adaspec-cli-{}", std::process::id()));
    let (t, d) = write_tiny_pair(&dir, TinyArch::Llama, DEFAULT_DRAFT_NOISE, 3).unwrap();
    (dir, t, d)
}

fn assert_clean_error(args: &[&str], expect: &str) {
    let out = bin().args(args).output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "{args:?} should fail");
    assert!(!stderr.contains("panicked"), "{args:?} panicked: {stderr}");
    assert!(stderr.to_lowercase().contains(&expect.to_lowercase()), "{args:?}: expected {expect:?} in {stderr}");
}

#[test]
fn bad_inputs_fail_with_one_clear_line() {
    let (dir, t, d) = tiny();
    let (t, d) = (t.to_str().unwrap(), d.to_str().unwrap());
    let junk = dir.join("junk.gguf");
    std::fs::write(&junk, b"not a gguf at all").unwrap();
    let cut = dir.join("cut.gguf");
    let bytes = std::fs::read(t).unwrap();
    std::fs::write(&cut, &bytes[..bytes.len() / 3]).unwrap();
    let g = |extra: &[&str]| {
        let mut v = vec!["generate", "--prompt", "hi", "--max-tokens", "4"];
        v.extend_from_slice(extra);
        v.into_iter().map(String::from).collect::<Vec<_>>()
    };
    let run = |args: Vec<String>, expect: &str| {
        let a: Vec<&str> = args.iter().map(String::as_str).collect();
        assert_clean_error(&a, expect)
    };
    run(g(&["--target", "/nonexistent.gguf", "--draft", d]), "cannot read model file");
    run(g(&["--target", junk.to_str().unwrap(), "--draft", d]), "not a valid GGUF");
    run(g(&["--target", cut.to_str().unwrap(), "--draft", d]), "gguf");
    run(g(&["--target", t, "--draft", d, "--strategy", "chain:0"]), "strategy");
    run(g(&["--target", t, "--draft", d, "--mode", "fastest"]), "mode");
    run(g(&["--target", t, "--draft", d, "--top-p", "0"]), "top_p");
    run(g(&["--target", t, "--draft", d, "--temp=-1"]), "temperature");
    run(vec!["generate".into(), "--prompt".into(), "x".into(), "--max-tokens".into(), "many".into()], "invalid value");
    // A wrong data set fails before any model is loaded, naming the file.
    run(vec!["bench".into(), "--dataset".into(), "/nonexistent.jsonl".into()], "cannot read /nonexistent.jsonl");
    if let Some(smol) = common::real_model(common::SMOLLM2) {
        run(g(&["--target", t, "--draft", smol.to_str().unwrap()]), "not compatible");
    }
}

#[test]
fn generate_json_on_tiny_models() {
    let (_dir, t, d) = tiny();
    let out = bin()
        .args([
            "generate",
            "--prompt",
            "def f(x):",
            "--max-tokens",
            "24",
            "--strategy",
            "chain:3",
            "--json",
            "--compare",
        ])
        .args(["--target", t.to_str().unwrap(), "--draft", d.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(v["stats"]["tokens"].as_u64().unwrap() > 0);
    assert_eq!(v["target_alone"]["identical"], serde_json::Value::Bool(true));
}
