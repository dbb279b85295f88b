//! Seeded GGUF mutation run: mutants of a tiny generated model (truncations, byte flips in the
//! header and tensor-info region, extreme counts, string and array lengths, value types,
//! hyperparameters, tensor dimensions, types and offsets) go through `adaspec_model_load` in a
//! C host (ffi/tests/c/load_each.c; a model that loads also gets a session and two generated
//! tokens) and through `adaspec inspect`. No mutant may end either process with a signal or an
//! abort; every refusal must be `ADASPEC_STATUS_MODEL_FILE` with a message.
//!
//! `ADASPEC_FUZZ_MUTANTS` (default 600) and `ADASPEC_FUZZ_SEED` (default 1) choose the run; a
//! longer run: `ADASPEC_FUZZ_MUTANTS=20000 cargo test --release -p adaspec-ffi --test fuzz_gguf`.

mod common;

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use common::*;
use engine::tiny_model::TinyArch;

/// splitmix64: a seeded, dependency-free stream for choosing mutations.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// What a located header field holds.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Kind {
    /// n_tensors or n_kv.
    Count,
    /// Length of a key, string value or tensor name.
    StrLen,
    /// Type tag of a metadata value.
    ValueType,
    /// Element type of an array value.
    ArrType,
    /// Element count of an array value.
    ArrLen,
    /// A scalar metadata value (hyperparameters, token ids, ...).
    Scalar,
    /// A tensor's number of dimensions.
    NDims,
    /// One tensor dimension.
    Dim,
    /// A tensor's ggml type.
    TType,
    /// A tensor's data offset.
    TOffset,
}

#[derive(Clone, Copy, Debug)]
struct Field {
    kind: Kind,
    at: usize,
    width: usize,
}

/// Walks a well-formed GGUF v3 file and lists its header fields; returns them with the offset
/// where the tensor data begins.
fn walk(b: &[u8]) -> (Vec<Field>, usize) {
    let mut fields = Vec::new();
    let u32_at = |p: usize| u32::from_le_bytes(b[p..p + 4].try_into().unwrap());
    let u64_at = |p: usize| u64::from_le_bytes(b[p..p + 8].try_into().unwrap());
    let mut p = 8;
    fields.push(Field { kind: Kind::Count, at: p, width: 8 });
    let n_tensors = u64_at(p) as usize;
    fields.push(Field { kind: Kind::Count, at: p + 8, width: 8 });
    let n_kv = u64_at(p + 8) as usize;
    p += 16;
    let string = |p: &mut usize, fields: &mut Vec<Field>, record: bool| {
        if record {
            fields.push(Field { kind: Kind::StrLen, at: *p, width: 8 });
        }
        let n = u64_at(*p) as usize;
        *p += 8 + n;
    };
    fn scalar_width(t: u32) -> usize {
        match t {
            0 | 1 | 7 => 1,
            2 | 3 => 2,
            4..=6 => 4,
            10..=12 => 8,
            _ => panic!("type {t} has no fixed width"),
        }
    }
    let mut alignment = 32usize;
    for _ in 0..n_kv {
        let key_start = p;
        string(&mut p, &mut fields, true);
        let key = String::from_utf8_lossy(&b[key_start + 8..p]).to_string();
        fields.push(Field { kind: Kind::ValueType, at: p, width: 4 });
        let t = u32_at(p);
        p += 4;
        match t {
            8 => string(&mut p, &mut fields, true),
            9 => {
                fields.push(Field { kind: Kind::ArrType, at: p, width: 4 });
                let et = u32_at(p);
                fields.push(Field { kind: Kind::ArrLen, at: p + 4, width: 8 });
                let n = u64_at(p + 4) as usize;
                p += 12;
                for i in 0..n {
                    if et == 8 {
                        // Record a few string lengths per array, not all 500 token texts.
                        string(&mut p, &mut fields, i < 4 || i + 2 >= n);
                    } else {
                        p += scalar_width(et);
                    }
                }
            }
            _ => {
                let w = scalar_width(t);
                if key == "general.alignment" {
                    alignment = u32_at(p) as usize;
                }
                fields.push(Field { kind: Kind::Scalar, at: p, width: w });
                p += w;
            }
        }
    }
    for _ in 0..n_tensors {
        string(&mut p, &mut fields, true);
        fields.push(Field { kind: Kind::NDims, at: p, width: 4 });
        let nd = u32_at(p) as usize;
        p += 4;
        for _ in 0..nd {
            fields.push(Field { kind: Kind::Dim, at: p, width: 8 });
            p += 8;
        }
        fields.push(Field { kind: Kind::TType, at: p, width: 4 });
        fields.push(Field { kind: Kind::TOffset, at: p + 4, width: 8 });
        p += 12;
    }
    let data = p.div_ceil(alignment) * alignment;
    (fields, data)
}

/// Values that break parsers: zero, one, sign and width boundaries, huge.
fn extreme(rng: &mut Rng, old: u64, width: usize) -> u64 {
    let bits = (width * 8) as u32;
    let max = if bits == 64 { u64::MAX } else { (1u64 << bits) - 1 };
    let choices = [
        0,
        1,
        2,
        3,
        old.wrapping_add(1),
        old.wrapping_sub(1),
        old.wrapping_mul(2),
        old.wrapping_mul(1000),
        old ^ 0x80,
        max,
        max >> 1,
        (max >> 1).wrapping_add(1),
        0xffff,
        0x1_0000,
        0xffff_ffff,
        0x1_0000_0001,
        1 << 40,
        1 << 62,
        rng.next(),
        // f32 NaN, inf, -1.0 and 1e30 for scalar floats
        0x7fc0_0000,
        0x7f80_0000,
        0xbf80_0000,
        0x7149_f2ca,
    ];
    choices[rng.below(choices.len())] & max
}

fn put(b: &mut [u8], f: Field, v: u64) {
    b[f.at..f.at + f.width].copy_from_slice(&v.to_le_bytes()[..f.width]);
}

fn get(b: &[u8], f: Field) -> u64 {
    let mut v = [0u8; 8];
    v[..f.width].copy_from_slice(&b[f.at..f.at + f.width]);
    u64::from_le_bytes(v)
}

/// One mutant of `base` and a one-line description of what was changed.
fn mutate(base: &[u8], fields: &[Field], data: usize, rng: &mut Rng) -> (Vec<u8>, String) {
    let mut b = base.to_vec();
    let n_edits = 1 + (rng.below(4) == 0) as usize;
    let mut what = Vec::new();
    for _ in 0..n_edits {
        match rng.below(10) {
            0 | 1 => {
                // Truncation: mostly inside the header, sometimes inside the tensor data.
                let len = if rng.below(3) == 0 { rng.below(b.len()) } else { rng.below(data) };
                b.truncate(len);
                what.push(format!("truncate to {len}"));
                break;
            }
            2 | 3 => {
                let n = 1 + rng.below(8);
                for _ in 0..n {
                    let at = rng.below(data.min(b.len()));
                    b[at] = if rng.below(2) == 0 { b[at] ^ (1 << rng.below(8)) } else { rng.next() as u8 };
                }
                what.push(format!("{n} byte flips in the header"));
            }
            4 => {
                let f = pick(fields, rng, &[Kind::Scalar]);
                let v = extreme(rng, get(&b, f), f.width);
                put(&mut b, f, v);
                what.push(format!("hyperparameter at {} = {v:#x}", f.at));
            }
            _ => {
                let f = fields[rng.below(fields.len())];
                let v = extreme(rng, get(&b, f), f.width);
                put(&mut b, f, v);
                what.push(format!("{:?} at {} = {v:#x}", f.kind, f.at));
            }
        }
    }
    (b, what.join("; "))
}

fn pick(fields: &[Field], rng: &mut Rng, kinds: &[Kind]) -> Field {
    let of: Vec<Field> = fields.iter().copied().filter(|f| kinds.contains(&f.kind)).collect();
    of[rng.below(of.len())]
}

fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name).ok().and_then(|v| v.parse().ok()).unwrap_or(default)
}

/// The C host, linked against libadaspec.so through a folder that carries its soname.
fn build_loader(dir: &Path) -> PathBuf {
    let bin = dir.join("load_each");
    let flags = ["-std=c99", "-D_POSIX_C_SOURCE=200809L", "-Wall", "-Wextra", "-Werror", "-O1"];
    build_linked_c_host("ffi/tests/c/load_each.c", &bin, &flags).unwrap_or_else(|e| panic!("cc failed: {e}"));
    bin
}

struct Outcome {
    /// (mutant index, exit status, last lines of stderr) of every file a process died on.
    crashes: Vec<(usize, String, String)>,
    /// Done lines by mutant index.
    lines: Vec<Option<String>>,
}

/// Runs the loader over `paths` (heads for `target` when given), restarting after any file it
/// dies on.
fn run_loader(bin: &Path, paths: &[PathBuf], target: Option<&Path>, by_path: bool) -> Outcome {
    let list: String = paths.iter().map(|p| format!("{}\n", p.display())).collect();
    let mut lines = vec![None; paths.len()];
    let mut crashes = Vec::new();
    let mut first = 0usize;
    while first < paths.len() {
        let mut child = Command::new(bin)
            .arg(first.to_string())
            .args(target)
            .args(by_path.then_some("file"))
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn loader");
        child.stdin.take().unwrap().write_all(list.as_bytes()).unwrap();
        let out = child.wait_with_output().expect("wait loader");
        let stdout = String::from_utf8_lossy(&out.stdout);
        let mut last_try = None;
        for l in stdout.lines() {
            let mut it = l.splitn(3, ' ');
            let (tag, i) = (it.next().unwrap_or(""), it.next().and_then(|i| i.parse::<usize>().ok()));
            match (tag, i) {
                ("try", Some(i)) => last_try = Some(i),
                ("done", Some(i)) => {
                    lines[i] = Some(it.next().unwrap_or("").to_string());
                    last_try = None;
                }
                _ => {}
            }
        }
        match last_try {
            Some(i) => {
                let err = String::from_utf8_lossy(&out.stderr);
                let tail: Vec<&str> = err.lines().rev().take(4).collect();
                crashes.push((i, out.status.to_string(), tail.into_iter().rev().collect::<Vec<_>>().join(" | ")));
                first = i + 1;
            }
            None => {
                assert!(out.status.success(), "loader exited with {} between files", out.status);
                break;
            }
        }
    }
    Outcome { crashes, lines }
}

/// The adaspec CLI, built by cargo for this test run.
fn cli() -> PathBuf {
    let exe = lib_dir().join("adaspec");
    if !exe.exists() || std::env::var_os("ADASPEC_FFI_NO_BUILD").is_none() {
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let st = Command::new(cargo)
            .args(["build", "--release", "-p", "adaspec", "--bin", "adaspec"])
            .current_dir(root())
            .status()
            .expect("cargo build");
        assert!(st.success());
    }
    exe
}

/// Every scalar hyperparameter set to each of a few values llama.cpp's loader and graph code
/// meet badly: zero, one, the type's maximum, half of it, a thousandfold, NaN, infinity, -1.0.
fn sweep(base: &[u8], fields: &[Field]) -> Vec<(Vec<u8>, String)> {
    let mut out = Vec::new();
    for f in fields.iter().filter(|f| f.kind == Kind::Scalar && f.width >= 4) {
        let old = get(base, *f);
        let max = if f.width == 8 { u64::MAX } else { (1u64 << (f.width * 8)) - 1 };
        for v in [0, 1, max, max >> 1, old.wrapping_mul(1000), 0x7fc0_0000, 0x7f80_0000, 0xbf80_0000] {
            let mut b = base.to_vec();
            put(&mut b, *f, v & max);
            out.push((b, format!("scalar at {} = {:#x} (sweep)", f.at, v & max)));
        }
    }
    out
}

/// Counts of one run, and every mutant that broke a rule.
#[derive(Default)]
struct Tally {
    loaded: usize,
    refused: usize,
    inspect_refused: usize,
    failures: Vec<String>,
}

/// Loads `mutants` (heads for `target` when given) in the C host and inspects them with the CLI.
#[allow(clippy::too_many_arguments)]
fn check_mutants(
    name: &str,
    mutants: Vec<(Vec<u8>, String)>,
    target: Option<&Path>,
    by_path: bool,
    bin: &Path,
    adaspec: &Path,
    dir: &Path,
    t: &mut Tally,
) {
    const CHUNK: usize = 100;
    let mut mutants = mutants.into_iter().enumerate().peekable();
    while mutants.peek().is_some() {
        let chunk: Vec<(usize, (Vec<u8>, String))> = mutants.by_ref().take(CHUNK).collect();
        let mut paths = Vec::with_capacity(chunk.len());
        for (i, (bytes, _)) in &chunk {
            let p = dir.join(format!("{name}-{i}.gguf"));
            std::fs::write(&p, bytes).unwrap();
            paths.push(p);
        }
        let what = |k: usize| format!("{name} mutant {} ({})", chunk[k].0, chunk[k].1 .1);
        let out = run_loader(bin, &paths, target, by_path);
        for (k, status, tail) in &out.crashes {
            t.failures.push(format!("{}: the host died: {status}: {tail}", what(*k)));
        }
        for (k, line) in out.lines.iter().enumerate() {
            let Some(line) = line else { continue };
            let mut it = line.splitn(3, ' ');
            let load: i32 = it.next().unwrap_or("").parse().unwrap_or(-1);
            let msg = it.nth(1).unwrap_or("").trim();
            match load {
                OK => t.loaded += 1,
                MODEL_FILE if !msg.is_empty() => t.refused += 1,
                // A well-formed head for another target (e.g. a mutated vocabulary size).
                INCOMPATIBLE_VOCAB if by_path && !msg.is_empty() => t.refused += 1,
                _ => t.failures.push(format!("{}: load status {load}, message {msg:?}", what(k))),
            }
        }
        // The CLI's reader (gguf-rs) on the same files.
        for (k, p) in paths.iter().enumerate() {
            let o = Command::new(adaspec).arg("inspect").arg(p).output().expect("run adaspec inspect");
            match o.status.code() {
                Some(0) => {}
                Some(1) if !o.stderr.is_empty() => t.inspect_refused += 1,
                _ => t.failures.push(format!(
                    "{}: adaspec inspect ended with {}: {}",
                    what(k),
                    o.status,
                    String::from_utf8_lossy(&o.stderr).lines().last().unwrap_or("")
                )),
            }
        }
        for p in &paths {
            let _ = std::fs::remove_file(p);
        }
    }
}

#[test]
fn gguf_mutants_are_refused_without_aborts() {
    let n = env_usize("ADASPEC_FUZZ_MUTANTS", 600);
    let seed = env_usize("ADASPEC_FUZZ_SEED", 1) as u64;
    let dir = std::env::temp_dir().join(format!("adaspec-fuzz-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let bin = build_loader(&dir);
    let adaspec = cli();

    // Four files: the tiny llama and qwen2 targets, an eagle3 head for the llama one (loaded
    // through adaspec_session_new_with_head) and an FSPAD head with a reduced vocabulary
    // (loaded by path through adaspec_session_new_with_head_file, drafting a small tree).
    let llama = tiny(TinyArch::Llama);
    let head = dir.join("head.gguf");
    let cfg = engine::tiny_model::TinyModelConfig { arch: TinyArch::Llama, seed: 11, ..Default::default() };
    engine::tiny_model::write_tiny_head(&head, &cfg, &Default::default()).expect("write head");
    let fspad = dir.join("fspad.gguf");
    let hc = engine::tiny_model::TinyHeadConfig { draft_vocab: Some(100), ..Default::default() };
    engine::tiny_model::write_tiny_fspad_head(&fspad, &cfg, engine::fspad::Variant::Fspad, &hc).expect("write head");
    let bases: [(&str, &Path, Option<&Path>, bool); 4] = [
        ("llama", &llama.target, None, false),
        ("qwen2", &tiny(TinyArch::Qwen2).target, None, false),
        ("head", &head, Some(&llama.target), false),
        ("fspad", &fspad, Some(&llama.target), true),
    ];
    let mut rng = Rng(seed);
    let mut t = Tally::default();
    let mut total = 0;
    for (k, (name, path, target, by_path)) in bases.iter().enumerate() {
        let base = std::fs::read(path).unwrap();
        let (fields, data) = walk(&base);
        assert!(fields.len() > 50 && data < base.len(), "{name}: the walker found {} fields", fields.len());
        let mut mutants = sweep(&base, &fields);
        let random = n / 4 + usize::from(k < n % 4);
        mutants.extend((0..random).map(|_| mutate(&base, &fields, data, &mut rng)));
        total += mutants.len();
        check_mutants(name, mutants, *target, *by_path, &bin, &adaspec, &dir, &mut t);
    }
    let _ = std::fs::remove_dir_all(&dir);
    eprintln!(
        "{total} mutants ({n} random, seed {seed}): {} refused by adaspec_model_load, {} loaded and generated; \
         adaspec inspect refused {}",
        t.refused, t.loaded, t.inspect_refused
    );
    assert!(t.failures.is_empty(), "{} of {total} mutants failed:\n{}", t.failures.len(), t.failures.join("\n"));
    assert!(t.refused > total / 2, "only {} of {total} mutants were refused: the mutations are too mild", t.refused);
}
