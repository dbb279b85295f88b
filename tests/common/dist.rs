//! Distribution tests: Pearson's chi-square of observed token pairs against a target's exact
//! joint distribution.

use std::collections::HashMap;

use adaspec::Token;

/// Pearson's chi-square of the observed joint against `expected` (cells with expected count
/// below 5 pooled) and the critical value at p = 1e-4 for its degrees of freedom.
pub fn chi_square(
    counts: &HashMap<(Token, Token), usize>,
    expected: &HashMap<(Token, Token), f64>,
    n: usize,
) -> (f64, f64) {
    let mut stat = 0.0;
    let (mut pool_obs, mut pool_exp, mut cells) = (0.0, 0.0, 0usize);
    for (k, &p) in expected {
        let e = p * n as f64;
        let o = *counts.get(k).unwrap_or(&0) as f64;
        if e < 5.0 {
            pool_obs += o;
            pool_exp += e;
        } else {
            stat += (o - e).powi(2) / e;
            cells += 1;
        }
    }
    // Outcomes the target cannot produce are an error by themselves.
    let impossible: usize = counts.iter().filter(|(k, _)| !expected.contains_key(k)).map(|(_, c)| c).sum();
    assert_eq!(impossible, 0, "generated token pairs the target's warp gives probability 0");
    if pool_exp > 0.0 {
        stat += (pool_obs - pool_exp).powi(2) / pool_exp.max(1e-9);
        cells += 1;
    }
    let df = (cells.max(2) - 1) as f64;
    // Wilson–Hilferty approximation of the chi-square quantile; z(1 - 1e-4) = 3.719.
    let z = 3.719;
    let crit = df * (1.0 - 2.0 / (9.0 * df) + z * (2.0 / (9.0 * df)).sqrt()).powi(3);
    (stat, crit)
}
