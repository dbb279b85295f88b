//! Drafting strategies and numeric modes, as users name them on the command line and in the
//! C API.

use std::fmt;
use std::str::FromStr;

use crate::error::Error;
use crate::tree::StaticShape;

/// How the draft proposes tokens each round.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub enum Strategy {
    /// Choose chain length, extra branches, or no speculation each round from the measured
    /// cost model and acceptance statistics (default).
    #[default]
    Auto,
    /// Plain decoding with the target alone.
    None,
    /// A chain of this many draft tokens.
    Chain(usize),
    /// EAGLE-2 dynamic tree: top-k children per frontier node, `depth` levels, best `nodes` kept.
    Tree { top_k: usize, depth: usize, nodes: usize },
    /// A fixed tree shape of child-rank paths.
    Static(StaticShape),
}

impl fmt::Display for Strategy {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Strategy::Auto => write!(f, "auto"),
            Strategy::None => write!(f, "none"),
            Strategy::Chain(n) => write!(f, "chain:{n}"),
            Strategy::Tree { top_k, depth, nodes } => write!(f, "tree:{top_k},{depth},{nodes}"),
            Strategy::Static(s) => {
                let p: Vec<String> =
                    s.paths.iter().map(|p| p.iter().map(|x| x.to_string()).collect::<Vec<_>>().join(",")).collect();
                write!(f, "static:{}", p.join(";"))
            }
        }
    }
}

fn bad(value: &str, why: &str) -> Error {
    Error::InvalidParam { name: "strategy", reason: format!("{value:?}: {why}") }
}

impl FromStr for Strategy {
    type Err = Error;

    /// `auto`, `none`, `chain:N` (1..=64), `tree:K,D,N` (K 1..=16, D 1..=16, N 1..=254),
    /// `static:0;1;0,0` (paths of child ranks).
    fn from_str(s: &str) -> Result<Self, Error> {
        let s = s.trim();
        let (kind, arg) = s.split_once(':').unwrap_or((s, ""));
        match kind {
            "auto" if arg.is_empty() => Ok(Strategy::Auto),
            "none" if arg.is_empty() => Ok(Strategy::None),
            "chain" => {
                let n: usize = arg.parse().map_err(|_| bad(s, "expected chain:N"))?;
                if !(1..=64).contains(&n) {
                    return Err(bad(s, "chain length must be 1..=64"));
                }
                Ok(Strategy::Chain(n))
            }
            "tree" => {
                let v: Vec<usize> = arg
                    .split(',')
                    .map(|x| x.trim().parse::<usize>())
                    .collect::<Result<_, _>>()
                    .map_err(|_| bad(s, "expected tree:K,D,N"))?;
                let [top_k, depth, nodes] = v[..] else {
                    return Err(bad(s, "expected tree:K,D,N"));
                };
                if !(1..=16).contains(&top_k) || !(1..=16).contains(&depth) || !(1..=254).contains(&nodes) {
                    return Err(bad(s, "need K in 1..=16, D in 1..=16, N in 1..=254"));
                }
                Ok(Strategy::Tree { top_k, depth, nodes })
            }
            "static" => {
                let shape = StaticShape::parse(arg).map_err(|e| bad(s, &e))?;
                if shape.paths.len() > 254 {
                    return Err(bad(s, "at most 254 nodes"));
                }
                Ok(Strategy::Static(shape))
            }
            _ => Err(bad(s, "expected auto, none, chain:N, tree:K,D,N or static:PATHS")),
        }
    }
}

/// Numeric mode of the target's verification passes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum NumericMode {
    /// Fastest llama.cpp settings (the cheaper of the fast and the reference CPU kernels per
    /// batch size, measured at start-up). Lossless in distribution; greedy output may differ
    /// from target-alone decoding where llama.cpp's batch-dependent rounding flips a near-tie.
    #[default]
    Fast,
    /// Batch-invariant settings (ggml's reference CPU kernels, no weight repacking,
    /// verification batches capped at the largest size measured bit-identical at start-up):
    /// greedy output bit-identical to target-alone decoding in the same mode.
    Exact,
}

impl FromStr for NumericMode {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        match s.trim() {
            "fast" => Ok(NumericMode::Fast),
            "exact" => Ok(NumericMode::Exact),
            other => Err(Error::InvalidParam { name: "mode", reason: format!("{other:?}: expected fast or exact") }),
        }
    }
}

impl fmt::Display for NumericMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            NumericMode::Fast => "fast",
            NumericMode::Exact => "exact",
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_prints_round_trip() {
        for s in ["auto", "none", "chain:4", "tree:4,5,16", "static:0;1;0,0"] {
            let st: Strategy = s.parse().unwrap();
            assert_eq!(st.to_string(), s);
        }
    }

    #[test]
    fn rejects_bad_values() {
        for s in ["chain:0", "chain:x", "tree:1,2", "tree:17,2,3", "static:1,0", "fastest", "auto:3"] {
            assert!(s.parse::<Strategy>().is_err(), "{s}");
        }
        assert!("exactly".parse::<NumericMode>().is_err());
    }
}
