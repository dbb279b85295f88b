//! Layer-pruned drafts: a smaller model made from a bigger one by keeping its embeddings,
//! final norm, LM head and a chosen subset of its blocks (renumbered 0..k in order).
//! Pure weight surgery: never touches files.

use super::error::{Error, Result};
use super::model::{check_weights, Config, Weights};

/// Parses `"0,1,2,23"` into block indices (sorted order is kept as given; duplicates refused).
pub fn parse_layers(s: &str) -> Result<Vec<usize>> {
    let mut out = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let i: usize = part.parse().map_err(|_| Error::InvalidArg {
            name: "--layers",
            reason: format!("{part:?} is not a block index (expected e.g. 0,1,2,23)"),
        })?;
        out.push(i);
    }
    if out.is_empty() {
        return Err(Error::InvalidArg {
            name: "--layers",
            reason: "no block index given (expected e.g. 0,1,2,23)".into(),
        });
    }
    Ok(out)
}

/// `keep` block indices out of `n_layer`, evenly spaced, always including the first and last.
pub fn even_layers(n_layer: usize, keep: usize) -> Result<Vec<usize>> {
    if keep == 0 || keep > n_layer {
        return Err(Error::InvalidArg {
            name: "--keep-layers",
            reason: format!("must be in 1..={n_layer} (the model's block count), got {keep}"),
        });
    }
    if keep == 1 {
        return Ok(vec![0]);
    }
    let last = (n_layer - 1) as f64;
    let mut v: Vec<usize> = (0..keep).map(|i| (i as f64 * last / (keep - 1) as f64).round() as usize).collect();
    v.dedup();
    Ok(v)
}

/// Checks block indices for a model of `n_layer` blocks: non-empty, in range, increasing.
pub fn check_layers(layers: &[usize], n_layer: usize) -> Result<()> {
    if layers.is_empty() {
        return Err(Error::InvalidArg { name: "--layers", reason: "keep at least one block".into() });
    }
    for (k, &i) in layers.iter().enumerate() {
        if i >= n_layer {
            return Err(Error::InvalidArg {
                name: "--layers",
                reason: format!("block {i} does not exist: the model has blocks 0..={}", n_layer.saturating_sub(1)),
            });
        }
        if k > 0 && layers[k - 1] >= i {
            return Err(Error::InvalidArg {
                name: "--layers",
                reason: format!("block indices must be strictly increasing, got {layers:?}"),
            });
        }
    }
    Ok(())
}

/// A draft keeping `layers` (indices into `cfg`'s blocks, strictly increasing) of the model.
pub fn prune(cfg: &Config, weights: &Weights, layers: &[usize]) -> Result<(Config, Weights)> {
    check_weights(cfg, weights, "prune input")?;
    check_layers(layers, cfg.num_hidden_layers)?;
    let mut out = Weights::new();
    for (name, t) in weights {
        if let Some(rest) = name.strip_prefix("blk.") {
            let (idx, tail) = rest.split_once('.').unwrap_or((rest, ""));
            let Ok(old) = idx.parse::<usize>() else {
                continue;
            };
            if let Some(new) = layers.iter().position(|&l| l == old) {
                out.insert(format!("blk.{new}.{tail}"), t.clone());
            }
        } else {
            out.insert(name.clone(), t.clone());
        }
    }
    let mut new_cfg = cfg.clone();
    new_cfg.num_hidden_layers = layers.len();
    check_weights(&new_cfg, &out, "pruned draft")?;
    Ok((new_cfg, out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn even_layers_include_ends() {
        assert_eq!(even_layers(24, 4).unwrap(), vec![0, 8, 15, 23]);
        assert_eq!(even_layers(24, 2).unwrap(), vec![0, 23]);
        assert_eq!(even_layers(3, 3).unwrap(), vec![0, 1, 2]);
        assert_eq!(even_layers(5, 1).unwrap(), vec![0]);
        assert!(even_layers(4, 5).is_err());
        assert!(even_layers(4, 0).is_err());
    }

    #[test]
    fn parse_layers_accepts_lists() {
        assert_eq!(parse_layers("0,1, 2,23").unwrap(), vec![0, 1, 2, 23]);
        assert!(parse_layers("a").is_err());
        assert!(parse_layers("").is_err());
    }
}
