//! llama.cpp's own speculative decoding as a peer in our benchmark: `llama-spec-bench`
//! (built by `scripts/build-llama-tools.sh` from the vendored llama.cpp's
//! `common/speculative.cpp`, linked against the same static libraries as our engine) run as a
//! subprocess on the same target, draft, prompt text and thread count.

use std::path::{Path, PathBuf};
use std::process::Command;

use crate::backend::Token;
use crate::error::{Error, Result};

/// One llama.cpp configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PeerVariant {
    /// Target alone (llama.cpp's plain decoding loop).
    Target,
    /// `--spec-type draft-simple --spec-draft-n-max K`: greedy chains from the draft model.
    DraftSimple(usize),
    /// `--spec-type ngram-mod`: llama.cpp's n-gram lookup drafter (no draft model).
    NgramMod,
}

impl std::fmt::Display for PeerVariant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            PeerVariant::Target => write!(f, "llama.cpp target"),
            PeerVariant::DraftSimple(k) => write!(f, "llama.cpp draft-simple:{k}"),
            PeerVariant::NgramMod => write!(f, "llama.cpp ngram-mod"),
        }
    }
}

impl std::str::FromStr for PeerVariant {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        let bad =
            || Error::InvalidParam { name: "peer", reason: format!("{s:?}: expected draft-simple:K or ngram-mod") };
        match s.split_once(':') {
            Some(("draft-simple", k)) => {
                k.parse().ok().filter(|&k| k > 0).map(PeerVariant::DraftSimple).ok_or_else(bad)
            }
            None if s == "ngram-mod" => Ok(PeerVariant::NgramMod),
            None if s == "target" => Ok(PeerVariant::Target),
            _ => Err(bad()),
        }
    }
}

/// What one llama.cpp run produced.
#[derive(Debug, Clone)]
pub struct PeerRun {
    pub tokens: Vec<Token>,
    pub tokens_per_second: f64,
    pub tokens_per_pass: f64,
    pub acceptance_rate: f64,
}

/// How to run the peer.
#[derive(Debug, Clone)]
pub struct Peer {
    pub bin: PathBuf,
    pub variants: Vec<PeerVariant>,
    pub threads: i32,
    pub n_ctx: u32,
    pub workdir: PathBuf,
}

impl Peer {
    /// Runs `variant` on `prompt_text` (already rendered: chat template applied), generating
    /// `n_gen` tokens greedily (llama.cpp stops at end-of-generation).
    pub fn run(
        &self,
        variant: &PeerVariant,
        target: &Path,
        draft: &Path,
        prompt_text: &str,
        n_gen: usize,
    ) -> Result<PeerRun> {
        let io = |path: &Path| {
            let path = path.to_path_buf();
            move |source| Error::Io { path, source }
        };
        std::fs::create_dir_all(&self.workdir).map_err(io(&self.workdir))?;
        let prompt_file = self.workdir.join(format!("prompt-{}.txt", std::process::id()));
        // llama.cpp's `-f` drops one trailing newline of the file (common/arg.cpp); add one so
        // that it reads exactly `prompt_text` (a chat prompt ends with "assistant\n").
        std::fs::write(&prompt_file, format!("{prompt_text}\n")).map_err(io(&prompt_file))?;
        let t = self.threads.to_string();
        let mut cmd = Command::new(&self.bin);
        cmd.arg("-m").arg(target).arg("-f").arg(&prompt_file).arg("--no-escape");
        cmd.args(["-n", &n_gen.to_string(), "-t", &t, "-tb", &t, "-c", &self.n_ctx.to_string()]);
        cmd.args(["-fa", "off", "--temp", "0", "--seed", "42", "-ngl", "0"]);
        match variant {
            PeerVariant::Target => {}
            PeerVariant::DraftSimple(k) => {
                cmd.arg("-md").arg(draft).args(["-td", &t, "-tbd", &t, "-ngld", "0"]);
                cmd.args(["--spec-type", "draft-simple", "--spec-draft-n-max", &k.to_string()]);
            }
            PeerVariant::NgramMod => {
                cmd.args(["--spec-type", "ngram-mod"]);
            }
        }
        let out = cmd.output().map_err(|e| Error::InvalidParam {
            name: "peer",
            reason: format!("cannot run {}: {e} (build it with scripts/build-llama-tools.sh)", self.bin.display()),
        })?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        let line = stdout.lines().find_map(|l| l.strip_prefix("LLAMA_SPEC_BENCH "));
        let Some(line) = line.filter(|_| out.status.success()) else {
            let err = String::from_utf8_lossy(&out.stderr);
            let tail: String = err.chars().rev().take(600).collect::<Vec<_>>().into_iter().rev().collect();
            return Err(Error::InvalidParam {
                name: "peer",
                reason: format!("{variant} failed ({}): {tail}", out.status),
            });
        };
        parse_line(line).ok_or_else(|| Error::InvalidParam {
            name: "peer",
            reason: format!("unreadable result line from {}: {line}", self.bin.display()),
        })
    }
}

/// Parses `key=value ...` of the `LLAMA_SPEC_BENCH` line.
fn parse_line(line: &str) -> Option<PeerRun> {
    let kv: std::collections::HashMap<&str, &str> = line.split_whitespace().filter_map(|f| f.split_once('=')).collect();
    let num = |k: &str| kv.get(k).and_then(|v| v.parse::<f64>().ok());
    let (n_gen, t_gen) = (num("n_gen")?, num("t_gen_s")?);
    let (drafted, accepted, passes) = (num("n_drafted")?, num("n_accept")?, num("n_passes")?);
    let tokens = kv
        .get("tokens")?
        .split(',')
        .filter(|x| !x.is_empty())
        .map(str::parse)
        .collect::<std::result::Result<_, _>>()
        .ok()?;
    Some(PeerRun {
        tokens,
        tokens_per_second: if t_gen > 0.0 { n_gen / t_gen } else { 0.0 },
        tokens_per_pass: if passes > 0.0 { n_gen / passes } else { 0.0 },
        acceptance_rate: if drafted > 0.0 { accepted / drafted } else { 0.0 },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_result_line() {
        let r = parse_line("mode=spec n_draft_max=3 p_min=0.000 n_prompt=40 t_prompt_s=0.5 n_gen=8 t_gen_s=0.25 n_drafted=6 n_accept=3 n_passes=4 tokens=1,2,3,4,5,6,7,8").unwrap();
        assert_eq!(r.tokens, vec![1, 2, 3, 4, 5, 6, 7, 8]);
        assert!((r.tokens_per_second - 32.0).abs() < 1e-9);
        assert!((r.tokens_per_pass - 2.0).abs() < 1e-9);
        assert!((r.acceptance_rate - 0.5).abs() < 1e-9);
        assert!(parse_line("mode=spec n_gen=x").is_none());
    }

    #[test]
    fn variants_parse() {
        assert_eq!("draft-simple:3".parse::<PeerVariant>().unwrap(), PeerVariant::DraftSimple(3));
        assert_eq!("ngram-mod".parse::<PeerVariant>().unwrap(), PeerVariant::NgramMod);
        assert!("draft-simple:0".parse::<PeerVariant>().is_err());
        assert!("eagle".parse::<PeerVariant>().is_err());
    }
}
