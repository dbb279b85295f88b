//! `adaspec bench --matrix` end to end on a tiny generated pair through real llama.cpp: target
//! copies converted with llama.cpp's quantizer (and reused from the cache), a measured curve
//! and ceiling per format, every cell lossless against target alone, auto compared with the
//! best fixed strategy, and a report that serializes.

use std::path::PathBuf;

use adaspec::backend::FileType;
use adaspec::bench::matrix::{format_matrix, run_matrix, target_file, MatrixConfig};
use adaspec::bench::BenchConfig;
use adaspec::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};
use adaspec::NumericMode;

fn dir(tag: &str) -> PathBuf {
    std::env::temp_dir().join(format!("adaspec-matrix-{tag}-{}", std::process::id()))
}

#[test]
fn the_matrix_converts_measures_and_stays_lossless() {
    let d = dir("run");
    let (target, draft) = write_tiny_pair(&d, TinyArch::Qwen2, DEFAULT_DRAFT_NOISE, 9).unwrap();
    let cache = d.join("converted");
    let cfg = MatrixConfig {
        target: target.clone(),
        draft,
        formats: vec![FileType::F16, FileType::Q8_0],
        datasets: vec!["humaneval".into(), "humaneval_edit".into()],
        n_prompts: 2,
        bench: BenchConfig {
            prompts: Vec::new(),
            strategies: ["auto", "chain:2", "lookup=chain:4"].iter().map(|v| v.parse().unwrap()).collect(),
            max_tokens: 24,
            chat: false,
            threads: 2,
            mode: NumericMode::Fast,
            n_ctx: 1024,
            ignore_eog: true,
            head: None,
            cold_start: false,
            repeat: 1,
        },
        cache_dir: cache.clone(),
        peer: None,
    };
    let mut partials = 0;
    let r = run_matrix(&cfg, &mut |_| {}, &mut |_| partials += 1).unwrap();
    assert_eq!(partials, 4, "a partial report after every cell");
    assert_eq!(r.formats.len(), 2);
    assert_eq!(r.cells.len(), 4);
    for (f, want) in r.formats.iter().zip(["F16", "Q8_0"]) {
        let path = PathBuf::from(&f.path);
        assert!(path.starts_with(&cache), "{} is not a converted copy", f.path);
        let types = adaspec::inspect::inspect(&path).unwrap().tensor_types;
        assert!(types.contains_key(want), "{}: tensor types {types:?} lack {want}", f.path);
        assert_eq!(f.curve_ms.len(), adaspec::bench::matrix::CURVE_SIZES.len());
        assert!(f.ceiling >= 1.0 && f.curve_ms.iter().all(|&(_, ms)| ms > 0.0), "{f:?}");
    }
    for c in &r.cells {
        assert_eq!(c.ours.len(), 3);
        for e in &c.ours {
            assert_eq!(e.identical, e.prompts, "{:?} {}: {} departs from target alone", c.format, c.dataset, e.name);
            assert!(e.of_ceiling > 0.0);
        }
        assert!(c.auto_vs_best_fixed.is_some() && c.best_fixed.is_some());
        assert!(c.target_tokens_per_second > 0.0);
    }
    let table = format_matrix(&r);
    assert!(table.contains("f16") && table.contains("humaneval_edit") && table.contains("auto/best"), "{table}");
    let json = serde_json::to_string(&r).unwrap();
    assert!(json.contains("\"ceiling\""));

    // The copies are made once.
    let f16 = PathBuf::from(&r.formats[0].path);
    let before = std::fs::metadata(&f16).unwrap().modified().unwrap();
    assert_eq!(target_file(&target, FileType::F16, &cache, 2).unwrap(), f16);
    assert_eq!(std::fs::metadata(&f16).unwrap().modified().unwrap(), before);
    let _ = std::fs::remove_dir_all(&d);
}

#[test]
fn a_given_file_of_the_format_is_used_as_is_and_bad_sources_are_errors() {
    let d = dir("given");
    std::fs::create_dir_all(&d).unwrap();
    let named = d.join("model-q8_0.gguf");
    std::fs::write(&named, b"not read").unwrap();
    assert_eq!(target_file(&named, FileType::Q8_0, &d, 1).unwrap(), named);
    let err = target_file(&named, FileType::F16, &d.join("c"), 1).unwrap_err().to_string();
    assert!(err.contains("GGUF"), "{err}");
    assert!(!d.join("c").join("model-q8_0.as-f16.gguf").exists());
    let _ = std::fs::remove_dir_all(&d);
}
