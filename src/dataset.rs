//! Prompts for `adaspec bench` and the tests: the data sets shipped in the repository's `data/`
//! folder (see data/README.md for licenses and splits), or any JSONL file whose records have a
//! `prompt`, `question`, `text`, `turns` or `conversations` field.
//!
//! Built-in names: `humaneval` (data/humaneval/dev.jsonl), `gsm8k` (the held-out split,
//! data/gsm8k/heldout.jsonl), `mt_bench` (data/mt_bench/questions.jsonl, first turns) and
//! `humaneval_edit` (editing prompts built from HumanEval's canonical solutions, see
//! [`humaneval_edit_prompt`]).
//!
//! Resolution never depends on the working directory: the built-in sets are compiled into the
//! library with `include_str!` (about 250 KB). That is the one option that works the same for
//! `cargo run`, for every test binary and for a binary copied or installed anywhere else; a path
//! relative to the executable breaks once only the binary is installed, and `CARGO_MANIFEST_DIR`
//! breaks once the source tree moves. `$ADASPEC_DATA=DIR` replaces the built-in copies with the
//! files of a folder laid out like `data/` (a missing file there is an error, never a silent
//! fallback). Any other name is a path to a JSONL file.
//!
//! The GSM8K training split (data/gsm8k/train.jsonl) is not built in: what is built in is for
//! evaluation, and this module must never hand a held-out set to anything as training data.

use std::borrow::Cow;
use std::fmt;
use std::path::{Path, PathBuf};

use crate::error::{Error, Result};

const HUMANEVAL_FILE: &str = "humaneval/dev.jsonl";
const GSM8K_HELDOUT_FILE: &str = "gsm8k/heldout.jsonl";
const MT_BENCH_FILE: &str = "mt_bench/questions.jsonl";

/// The embedded copies, keyed by their path under `data/`.
const EMBEDDED: [(&str, &str); 3] = [
    (HUMANEVAL_FILE, include_str!("../data/humaneval/dev.jsonl")),
    (GSM8K_HELDOUT_FILE, include_str!("../data/gsm8k/heldout.jsonl")),
    (MT_BENCH_FILE, include_str!("../data/mt_bench/questions.jsonl")),
];

/// The data-set names that are not file paths (`mt-bench` is accepted for `mt_bench`).
pub const BUILTIN: [&str; 4] = ["humaneval", "humaneval_edit", "gsm8k", "mt_bench"];

/// The instructions of `humaneval_edit`, used in turn (record `i` gets `i % 4`). Each asks for
/// the whole function back, so most of the answer is copied from the prompt.
pub const EDIT_INSTRUCTIONS: [&str; 4] = [
    "Rewrite this function with clearer variable names and return the full code.",
    "Add type hints and a docstring to this function; return the whole function.",
    "Fix any bug in this function and return the corrected full code.",
    "Add a comment to every line of this function and return the full code.",
];

/// Where a data set's records are read from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Source {
    /// Compiled into the binary from the repository's `data/<file>`.
    Embedded(&'static str),
    /// A file on disk: a built-in set's file under `$ADASPEC_DATA`, or the path given as name.
    File(PathBuf),
}

impl fmt::Display for Source {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Source::Embedded(file) => write!(f, "data/{file} (built in)"),
            Source::File(p) => write!(f, "{}", p.display()),
        }
    }
}

/// `$ADASPEC_DATA` when it is set and not empty: a folder laid out like the repository's
/// `data/` whose files replace the built-in copies. `None`: the built-in copies are used.
pub fn data_dir() -> Option<PathBuf> {
    std::env::var_os("ADASPEC_DATA").filter(|d| !d.is_empty()).map(PathBuf::from)
}

/// Where the records of `name` come from (for `humaneval_edit`: HumanEval's records).
pub fn dataset_source(name: &str) -> Source {
    source_in(name, data_dir().as_deref())
}

/// The file `name` is read from, or `None` when it is a built-in set read from the binary.
pub fn dataset_path(name: &str) -> Option<PathBuf> {
    match dataset_source(name) {
        Source::File(p) => Some(p),
        Source::Embedded(_) => None,
    }
}

/// Reads up to `n` prompts of data set `name` (a built-in name or a JSONL path). For
/// conversations and MT-bench it is the first user turn. Errors name the file and the line.
pub fn load_prompts(name: &str, n: usize) -> Result<Vec<String>> {
    load_prompts_in(name, n, data_dir().as_deref())
}

/// Prompt `i` of `humaneval_edit`: `code` (a HumanEval record's `prompt` followed by its
/// `canonical_solution`) in a fenced block after instruction `i % 4` of [`EDIT_INSTRUCTIONS`].
pub fn humaneval_edit_prompt(i: usize, code: &str) -> String {
    let instruction = EDIT_INSTRUCTIONS[i % EDIT_INSTRUCTIONS.len()];
    format!("{instruction}\n\n```python\n{}\n```", code.trim_start_matches('\n').trim_end())
}

/// The built-in set's file under `data/`, or `None` for a path.
fn builtin_file(name: &str) -> Option<&'static str> {
    match name {
        "humaneval" | "humaneval_edit" => Some(HUMANEVAL_FILE),
        "gsm8k" => Some(GSM8K_HELDOUT_FILE),
        "mt_bench" | "mt-bench" => Some(MT_BENCH_FILE),
        _ => None,
    }
}

fn source_in(name: &str, dir: Option<&Path>) -> Source {
    match (builtin_file(name), dir) {
        (Some(file), Some(dir)) => Source::File(dir.join(file)),
        (Some(file), None) => Source::Embedded(file),
        (None, _) => Source::File(PathBuf::from(name)),
    }
}

fn dataset_error(reason: String) -> Error {
    Error::InvalidParam { name: "dataset", reason }
}

fn read_source(name: &str, source: &Source) -> Result<Cow<'static, str>> {
    match source {
        Source::Embedded(file) => EMBEDDED
            .iter()
            .find(|(f, _)| f == file)
            .map(|(_, text)| Cow::Borrowed(*text))
            .ok_or_else(|| dataset_error(format!("no built-in copy of data/{file}"))),
        Source::File(path) => std::fs::read_to_string(path).map(Cow::Owned).map_err(|e| {
            let hint = if builtin_file(name).is_some() {
                "; $ADASPEC_DATA is set, so it must be a folder laid out like the repository's data/ \
                 (see data/README.md), or unset it to use the built-in copy"
                    .to_string()
            } else {
                format!(" (not a built-in data set either: {})", BUILTIN.join(", "))
            };
            dataset_error(format!("cannot read {}: {e}{hint}", path.display()))
        }),
    }
}

/// The first string among a record's prompt-like fields.
fn prompt_field(v: &serde_json::Value) -> Option<String> {
    let s = |x: &serde_json::Value| x.as_str().map(str::to_string);
    ["prompt", "question", "text"]
        .iter()
        .find_map(|k| v.get(*k).and_then(s))
        .or_else(|| v.get("turns").and_then(|t| t.get(0)).and_then(s))
        .or_else(|| v.get("conversations").and_then(|c| c.get(0)).and_then(|m| m.get("value")).and_then(s))
}

/// A HumanEval record's function: `prompt` followed by `canonical_solution`.
fn humaneval_function(v: &serde_json::Value) -> Option<String> {
    let prompt = v.get("prompt")?.as_str()?;
    let solution = v.get("canonical_solution")?.as_str()?;
    Some(format!("{prompt}{solution}"))
}

fn load_prompts_in(name: &str, n: usize, dir: Option<&Path>) -> Result<Vec<String>> {
    if n == 0 {
        return Err(Error::InvalidParam { name: "n_prompts", reason: "at least 1 prompt is needed, got 0".into() });
    }
    let source = source_in(name, dir);
    let text = read_source(name, &source)?;
    let edit = name == "humaneval_edit";
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        if out.len() >= n {
            break;
        }
        if line.trim().is_empty() {
            continue;
        }
        let v: serde_json::Value =
            serde_json::from_str(line).map_err(|e| dataset_error(format!("{source}:{}: {e}", i + 1)))?;
        let prompt = if edit {
            let code = humaneval_function(&v).ok_or_else(|| {
                dataset_error(format!(
                    "{source}:{}: humaneval_edit needs string fields `prompt` and `canonical_solution`",
                    i + 1
                ))
            })?;
            humaneval_edit_prompt(out.len(), &code)
        } else {
            prompt_field(&v).ok_or_else(|| {
                dataset_error(format!(
                    "{source}:{}: no string field prompt, question, text, turns[0] or conversations[0].value",
                    i + 1
                ))
            })?
        };
        out.push(prompt);
    }
    if out.is_empty() {
        return Err(dataset_error(format!("{source} has no prompts")));
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tmp(tag: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!("adaspec-dataset-{}-{tag}", std::process::id()));
        let _ = std::fs::remove_dir_all(&d);
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn built_in_sets_are_embedded_and_complete() {
        let all = |name| load_prompts_in(name, usize::MAX, None).unwrap();
        assert_eq!(all("humaneval").len(), 124);
        assert_eq!(all("gsm8k").len(), 100);
        assert_eq!(all("mt_bench").len(), 64);
        assert_eq!(all("mt-bench"), all("mt_bench"));
        assert_eq!(all("humaneval_edit").len(), 124);
        assert!(all("humaneval")[0].contains("def has_close_elements"));
        assert!(all("gsm8k")[0].starts_with("Janet"));
        assert_eq!(load_prompts_in("gsm8k", 3, None).unwrap().len(), 3);
        for name in BUILTIN {
            assert!(matches!(source_in(name, None), Source::Embedded(_)), "{name}");
        }
    }

    #[test]
    fn humaneval_edit_pastes_the_whole_function_and_rotates_instructions() {
        let edits = load_prompts_in("humaneval_edit", 8, None).unwrap();
        let first: serde_json::Value = serde_json::from_str(EMBEDDED[0].1.lines().next().unwrap()).unwrap();
        let code = humaneval_function(&first).unwrap();
        // The prompt holds the signature, docstring and body verbatim.
        assert!(edits[0].contains(code.trim_end()), "{}", edits[0]);
        assert!(edits[0].contains("return False"));
        for (i, p) in edits.iter().enumerate() {
            assert!(p.starts_with(EDIT_INSTRUCTIONS[i % 4]), "{i}: {p}");
            assert!(p.ends_with("\n```"));
        }
        assert_eq!(edits, load_prompts_in("humaneval_edit", 8, None).unwrap(), "deterministic");
        assert_eq!(
            humaneval_edit_prompt(5, "\ndef f():\n    return 1\n\n"),
            format!("{}\n\n```python\ndef f():\n    return 1\n```", EDIT_INSTRUCTIONS[1])
        );
    }

    #[test]
    fn gsm8k_held_out_questions_are_not_in_the_training_split() {
        let train = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/data/gsm8k/train.jsonl")).unwrap();
        let train: std::collections::HashSet<String> = train
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap()["question"].as_str().unwrap().to_string())
            .collect();
        assert_eq!(train.len(), 900);
        for q in load_prompts_in("gsm8k", usize::MAX, None).unwrap() {
            assert!(!train.contains(&q), "held-out question in train.jsonl: {q}");
        }
    }

    #[test]
    fn adaspec_data_folder_replaces_the_built_in_copies() {
        let dir = tmp("override");
        std::fs::create_dir_all(dir.join("gsm8k")).unwrap();
        std::fs::write(dir.join("gsm8k/heldout.jsonl"), "{\"question\": \"q1\"}\n{\"question\": \"q2\"}\n").unwrap();
        assert_eq!(source_in("gsm8k", Some(&dir)), Source::File(dir.join("gsm8k/heldout.jsonl")));
        assert_eq!(load_prompts_in("gsm8k", 10, Some(&dir)).unwrap(), ["q1", "q2"]);
        // No silent fallback to the built-in copy when the folder lacks the file.
        let e = load_prompts_in("humaneval", 1, Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("humaneval/dev.jsonl") && e.contains("ADASPEC_DATA"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn files_work_and_errors_name_the_file_and_line() {
        let dir = tmp("files");
        let good = dir.join("good.jsonl");
        std::fs::write(
            &good,
            "{\"prompt\": \"a\"}\n\n{\"turns\": [\"b\", \"b2\"]}\n{\"conversations\": [{\"from\": \"human\", \"value\": \"c\"}]}\n",
        )
        .unwrap();
        let g = good.to_str().unwrap();
        assert_eq!(load_prompts_in(g, 10, None).unwrap(), ["a", "b", "c"]);
        assert_eq!(dataset_source(g), Source::File(good.clone()));

        let bad_json = dir.join("bad.jsonl");
        std::fs::write(&bad_json, "{\"prompt\": \"a\"}\n\n{not json\n").unwrap();
        let e = load_prompts_in(bad_json.to_str().unwrap(), 10, None).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:3:", bad_json.display())), "{e}");

        let no_field = dir.join("nofield.jsonl");
        std::fs::write(&no_field, "{\"prompt\": \"a\"}\n{\"answer\": \"x\"}\n").unwrap();
        let e = load_prompts_in(no_field.to_str().unwrap(), 10, None).unwrap_err().to_string();
        assert!(e.contains(&format!("{}:2: no string field", no_field.display())), "{e}");
        // Only the requested records are parsed.
        assert_eq!(load_prompts_in(no_field.to_str().unwrap(), 1, None).unwrap(), ["a"]);

        let empty = dir.join("empty.jsonl");
        std::fs::write(&empty, "\n").unwrap();
        let e = load_prompts_in(empty.to_str().unwrap(), 10, None).unwrap_err().to_string();
        assert!(e.contains("has no prompts"), "{e}");

        let e = load_prompts_in("no-such-set", 1, None).unwrap_err().to_string();
        assert!(e.contains("cannot read no-such-set") && e.contains("humaneval_edit"), "{e}");
        let e = load_prompts_in("gsm8k", 0, None).unwrap_err().to_string();
        assert!(e.contains("n_prompts"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn humaneval_edit_names_the_line_of_a_record_without_a_solution() {
        let dir = tmp("edit");
        std::fs::create_dir_all(dir.join("humaneval")).unwrap();
        std::fs::write(
            dir.join("humaneval/dev.jsonl"),
            "{\"prompt\": \"def f():\\n\", \"canonical_solution\": \"    return 1\\n\"}\n{\"prompt\": \"def g():\\n\"}\n",
        )
        .unwrap();
        assert_eq!(
            load_prompts_in("humaneval_edit", 1, Some(&dir)).unwrap(),
            [humaneval_edit_prompt(0, "def f():\n    return 1\n")]
        );
        let e = load_prompts_in("humaneval_edit", 2, Some(&dir)).unwrap_err().to_string();
        assert!(e.contains("humaneval/dev.jsonl:2:") && e.contains("canonical_solution"), "{e}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
