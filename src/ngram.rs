//! The matching engine of a lookup draft (prompt-lookup / n-gram decoding): given the token
//! history (prompt + generated so far), propose continuations by finding earlier occurrences of
//! the history's last n tokens and returning what followed them. A zero-cost proposer: no model.
//!
//! Pure data structures: no llama.cpp calls here. It must never propose a token that does not
//! follow an occurrence of the matched suffix in the history it is given, never count the
//! history's own end as a match of itself, and never let a continuation run past the history's
//! end. [`NgramIndex::propose`] costs O(occurrences × max_len), never O(history).

use std::cmp::Reverse;
use std::collections::HashMap;

use crate::backend::Token;
use crate::error::{Error, Result};

/// How the lookup draft matches and how much it proposes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NgramConfig {
    /// Shortest suffix (in tokens) worth matching; >= 1.
    pub min_n: usize,
    /// Longest suffix tried first; >= `min_n`.
    pub max_n: usize,
    /// Longest continuation proposed, in tokens (0 = propose nothing).
    pub max_len: usize,
    /// Most distinct first tokens proposed (0 = propose nothing).
    pub max_branches: usize,
    /// Most recent occurrences of the matched suffix looked at (0 = propose nothing). Bounds the
    /// cost of `propose` on pathologically repetitive histories.
    pub max_occurrences: usize,
}

impl Default for NgramConfig {
    fn default() -> Self {
        NgramConfig { min_n: 2, max_n: 4, max_len: 8, max_branches: 3, max_occurrences: 64 }
    }
}

impl NgramConfig {
    /// Rejects suffix lengths the index cannot use; zero sizes elsewhere are valid ("off").
    pub fn validate(&self) -> Result<()> {
        if self.min_n == 0 {
            return Err(Error::InvalidParam { name: "min_n", reason: "must be >= 1, got 0".into() });
        }
        if self.max_n < self.min_n {
            return Err(Error::InvalidParam {
                name: "max_n",
                reason: format!("must be >= min_n={}, got {}", self.min_n, self.max_n),
            });
        }
        Ok(())
    }

    /// The nearest valid config: `min_n` at least 1, `max_n` at least `min_n`.
    fn normalized(self) -> Self {
        let min_n = self.min_n.max(1);
        NgramConfig { min_n, max_n: self.max_n.max(min_n), ..self }
    }
}

/// One proposed continuation of the history.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Candidate {
    /// The proposed tokens, first token first; never empty.
    pub tokens: Vec<Token>,
    /// How many earlier occurrences of the matched suffix support the first token.
    pub support: usize,
    /// How many earlier occurrences of the matched suffix were looked at (at most
    /// `max_occurrences`, the most recent ones).
    pub occurrences: usize,
    /// Length n of the matched suffix.
    pub match_len: usize,
    /// How far the match really reaches back: the tokens before the history's end that equal
    /// the tokens before the most recent occurrence supporting the first token (at least
    /// `match_len`, at most [`MAX_CONTEXT`]). Text being copied matches far back; a chance
    /// repeat of a common phrase does not.
    pub context_len: usize,
}

/// Longest backward match [`Candidate::context_len`] reports.
pub const MAX_CONTEXT: usize = 64;

/// An incremental index over a growing token history: for each n in `min_n..=max_n`, a map from
/// the n-gram to the positions just after each of its occurrences (ascending). An n-gram is
/// indexed only once a token follows it, so the history's own last n tokens are never a match.
///
/// All positions are kept (memory is O(history × (max_n - min_n + 1))), so rolling back is exact;
/// only `propose` caps how many of them it looks at.
#[derive(Debug, Clone)]
pub struct NgramIndex {
    cfg: NgramConfig,
    /// The history the index describes.
    tokens: Vec<Token>,
    /// `maps[n - min_n]`: n-gram key → positions p (ascending) with `tokens[p-n..p]` the n-gram
    /// and `p < tokens.len()`. Keys are hashes; `propose` checks the tokens, so collisions only
    /// cost time.
    maps: Vec<HashMap<u64, Vec<usize>>>,
}

impl NgramIndex {
    /// An empty index. An invalid config is normalized (see [`NgramConfig::validate`]).
    pub fn new(cfg: NgramConfig) -> Self {
        let cfg = cfg.normalized();
        let maps = (cfg.min_n..=cfg.max_n).map(|_| HashMap::new()).collect();
        NgramIndex { cfg, tokens: Vec::new(), maps }
    }

    /// The config in use (after normalization).
    pub fn config(&self) -> &NgramConfig {
        &self.cfg
    }

    /// The history the index currently describes.
    pub fn history(&self) -> &[Token] {
        &self.tokens
    }

    /// Number of tokens indexed.
    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    /// Whether nothing is indexed.
    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.tokens.clear();
        for map in &mut self.maps {
            map.clear();
        }
    }

    /// Makes the index describe exactly `history`: keeps the common prefix with what was indexed,
    /// drops the rest (truncating, or rebuilding when that is cheaper) and indexes the new tokens.
    /// The index work is O(changed tokens); finding the common prefix is a slice comparison.
    pub fn sync(&mut self, history: &[Token]) {
        let keep = common_prefix_len(&self.tokens, history);
        if keep < self.tokens.len() {
            if keep < self.tokens.len() - keep {
                self.clear();
            } else {
                self.truncate(keep);
            }
        }
        let start = self.tokens.len();
        self.extend(&history[start..]);
    }

    /// Appends tokens to the indexed history.
    pub fn extend(&mut self, new: &[Token]) {
        self.tokens.reserve(new.len());
        for &token in new {
            let p = self.tokens.len();
            self.tokens.push(token);
            // The n-grams ending just before `p` now have a following token.
            for (i, n) in (self.cfg.min_n..=self.cfg.max_n).enumerate() {
                if p < n {
                    break;
                }
                self.maps[i].entry(gram_key(&self.tokens[p - n..p])).or_default().push(p);
            }
        }
    }

    /// Rolls the indexed history back to its first `len` tokens (no-op if it is not longer).
    pub fn truncate(&mut self, len: usize) {
        // Newest first, so each removed position is at the back of its list.
        for p in (len..self.tokens.len()).rev() {
            for (i, n) in (self.cfg.min_n..=self.cfg.max_n).enumerate() {
                if p < n {
                    break;
                }
                let key = gram_key(&self.tokens[p - n..p]);
                if let Some(list) = self.maps[i].get_mut(&key) {
                    debug_assert_eq!(list.last(), Some(&p));
                    list.pop();
                    if list.is_empty() {
                        self.maps[i].remove(&key);
                    }
                }
            }
        }
        self.tokens.truncate(len);
    }

    /// Candidate continuations of `history`, best first.
    ///
    /// Uses the longest n in `max_n..=min_n` whose suffix occurs earlier; looks at its most recent
    /// `max_occurrences` occurrences. Branches are the distinct next tokens, ranked by how many
    /// occurrences support them (ties: most recent occurrence first), at most `max_branches`.
    /// Each branch is extended, up to `max_len` tokens, with the next token best supported by the
    /// branch's occurrences (ties: most recent), keeping only the occurrences that agree, until
    /// none has a further token.
    ///
    /// `history` should be what the index was last synced to; if it is not, every proposal is
    /// still a true continuation within `history`, but some may be missed.
    pub fn propose(&self, history: &[Token]) -> Vec<Candidate> {
        let cfg = &self.cfg;
        if cfg.max_len == 0 || cfg.max_branches == 0 || cfg.max_occurrences == 0 {
            return Vec::new();
        }
        for (i, map) in self.maps.iter().enumerate().rev() {
            let n = cfg.min_n + i;
            // An earlier occurrence ends at some p with n <= p < len.
            if history.len() <= n {
                continue;
            }
            let suffix = &history[history.len() - n..];
            let Some(list) = map.get(&gram_key(suffix)) else { continue };
            let valid = list.partition_point(|&p| p < history.len());
            // Most recent first.
            let starts: Vec<usize> = list[..valid]
                .iter()
                .rev()
                .take(cfg.max_occurrences)
                .copied()
                .filter(|&p| p >= n && history[p - n..p] == *suffix)
                .collect();
            if starts.is_empty() {
                continue;
            }
            return grow_candidates(history, &starts, n, cfg.max_branches, cfg.max_len);
        }
        Vec::new()
    }
}

/// Builds the candidates from the continuation starts of one matched suffix (most recent first).
fn grow_candidates(
    history: &[Token],
    starts: &[usize],
    match_len: usize,
    max_branches: usize,
    max_len: usize,
) -> Vec<Candidate> {
    rank_next(history, starts, 0)
        .into_iter()
        .take(max_branches)
        .map(|(first, mut group)| {
            let support = group.len();
            let context_len = context_len(history, group[0], match_len);
            let mut tokens = vec![first];
            while tokens.len() < max_len {
                let Some((next, agreeing)) = rank_next(history, &group, tokens.len()).into_iter().next() else {
                    break;
                };
                tokens.push(next);
                group = agreeing;
            }
            Candidate { tokens, support, occurrences: starts.len(), match_len, context_len }
        })
        .collect()
}

/// How many tokens before `start` equal the tokens before the history's end (from `known`,
/// already checked, up to [`MAX_CONTEXT`]).
fn context_len(history: &[Token], start: usize, known: usize) -> usize {
    let end = history.len();
    let mut k = known.min(start);
    while k < MAX_CONTEXT && k < start && history[start - 1 - k] == history[end - 1 - k] {
        k += 1;
    }
    k
}

/// Groups the continuation starts (most recent first) by the token `depth` after them, skipping
/// starts whose continuation ends before that; groups ranked by size, then by most recent start.
/// Each group's starts stay most recent first.
fn rank_next(history: &[Token], starts: &[usize], depth: usize) -> Vec<(Token, Vec<usize>)> {
    let mut groups: Vec<(Token, Vec<usize>)> = Vec::new();
    let mut index: HashMap<Token, usize> = HashMap::new();
    for &start in starts {
        let Some(&token) = history.get(start + depth) else { continue };
        match index.get(&token) {
            Some(&g) => groups[g].1.push(start),
            None => {
                index.insert(token, groups.len());
                groups.push((token, vec![start]));
            }
        }
    }
    // Groups are already in order of their most recent start; a stable sort keeps that on ties.
    groups.sort_by_key(|(_, group)| Reverse(group.len()));
    groups
}

/// Length of the longest common prefix of two slices.
fn common_prefix_len(a: &[Token], b: &[Token]) -> usize {
    let n = a.len().min(b.len());
    if a[..n] == b[..n] {
        return n;
    }
    a.iter().zip(b).take_while(|(x, y)| x == y).count()
}

/// A 64-bit key for an n-gram (FNV-1a over the tokens' bytes). Collisions are harmless: matches
/// are checked against the tokens.
fn gram_key(gram: &[Token]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &token in gram {
        for byte in token.to_le_bytes() {
            h ^= u64::from(byte);
            h = h.wrapping_mul(0x0000_0100_0000_01b3);
        }
    }
    h
}

#[cfg(test)]
mod tests {
    use super::*;

    fn index_of(cfg: NgramConfig, history: &[Token]) -> NgramIndex {
        let mut index = NgramIndex::new(cfg);
        index.sync(history);
        index
    }

    fn propose(cfg: NgramConfig, history: &[Token]) -> Vec<Candidate> {
        index_of(cfg, history).propose(history)
    }

    fn tokens(c: &[Candidate]) -> Vec<Vec<Token>> {
        c.iter().map(|c| c.tokens.clone()).collect()
    }

    /// Brute force: all earlier occurrences of the longest matching suffix, by scanning.
    fn naive(cfg: NgramConfig, history: &[Token]) -> Vec<Candidate> {
        let cfg = cfg.normalized();
        if cfg.max_len == 0 || cfg.max_branches == 0 || cfg.max_occurrences == 0 {
            return Vec::new();
        }
        let len = history.len();
        for n in (cfg.min_n..=cfg.max_n).rev() {
            if len <= n {
                continue;
            }
            let suffix = &history[len - n..];
            let starts: Vec<usize> =
                (n..len).rev().filter(|&p| history[p - n..p] == *suffix).take(cfg.max_occurrences).collect();
            if !starts.is_empty() {
                return grow_candidates(history, &starts, n, cfg.max_branches, cfg.max_len);
            }
        }
        Vec::new()
    }

    /// Whether `c.tokens` follows some earlier occurrence of the last `c.match_len` tokens.
    fn follows_an_occurrence(history: &[Token], c: &Candidate) -> bool {
        let n = c.match_len;
        let suffix = &history[history.len() - n..];
        (n..history.len())
            .any(|p| history[p - n..p] == *suffix && history.get(p..p + c.tokens.len()) == Some(c.tokens.as_slice()))
    }

    #[test]
    fn copies_a_repeated_phrase() {
        // "fn add ( a , b ) { a + b } ... fn add ( a" → ", b ) { a + b }"
        let code = [10, 11, 12, 1, 13, 2, 14, 15, 1, 16, 2, 17];
        let mut history = code.to_vec();
        history.extend([90, 91, 92]);
        history.extend(&code[..4]);
        let c = propose(NgramConfig::default(), &history);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].tokens, code[4..12].to_vec());
        assert_eq!((c[0].support, c[0].occurrences, c[0].match_len), (1, 1, 4));
    }

    #[test]
    fn context_len_says_how_far_back_the_match_reaches() {
        // The copied block (10 tokens) is preceded by [7, 8, 9] in both places: the match reaches
        // back over the block's first 6 tokens and those 3, not just the 4-gram.
        let block: Vec<Token> = (100..110).collect();
        let mut history = vec![7, 8, 9];
        history.extend(&block);
        history.extend([1, 2, 3, 4, 5, 7, 8, 9]);
        history.extend(&block[..6]);
        let c = propose(NgramConfig::default(), &history);
        assert_eq!(c[0].tokens[0], 106);
        assert_eq!((c[0].match_len, c[0].context_len), (4, 9));
        // A chance repeat of a 2-gram reaches back 2 tokens.
        let c = propose(NgramConfig::default(), &[1, 2, 3, 4, 9, 2, 3]);
        assert_eq!((c[0].match_len, c[0].context_len), (2, 2));
        // Capped.
        let long: Vec<Token> = (0..200).map(|i| (i % 100) as Token).collect();
        let c = propose(NgramConfig::default(), &long);
        assert_eq!(c[0].context_len, MAX_CONTEXT);
    }

    #[test]
    fn prefers_the_longest_suffix() {
        // Suffix [2, 3]: occurs as [2, 3] → 7 (older, with 1 before it) and [9, 2, 3] → 8 (newer).
        // The 3-gram [1, 2, 3] matches only the older one; a 2-gram match would rank 8 first.
        let history = [1, 2, 3, 7, 0, 9, 2, 3, 8, 0, 1, 2, 3];
        let cfg = NgramConfig { max_len: 1, ..NgramConfig::default() };
        let c = propose(cfg, &history);
        assert_eq!(tokens(&c), vec![vec![7]]);
        assert_eq!(c[0].match_len, 3);
        // With max_n = 2 both occurrences count, the most recent first.
        let c = propose(NgramConfig { max_n: 2, ..cfg }, &history);
        assert_eq!(tokens(&c), vec![vec![8], vec![7]]);
        assert_eq!(c[0].match_len, 2);
    }

    #[test]
    fn ranks_branches_by_support_then_recency() {
        // After [5, 6]: 1 (twice, oldest), 2 (once), 3 (once, most recent).
        let history = [5, 6, 1, 0, 5, 6, 1, 0, 5, 6, 2, 0, 5, 6, 3, 0, 5, 6];
        let cfg = NgramConfig { max_n: 2, max_len: 1, max_branches: 5, ..NgramConfig::default() };
        let c = propose(cfg, &history);
        assert_eq!(tokens(&c), vec![vec![1], vec![3], vec![2]]);
        assert_eq!(c.iter().map(|c| c.support).collect::<Vec<_>>(), vec![2, 1, 1]);
        assert!(c.iter().all(|c| c.occurrences == 4 && c.match_len == 2));
    }

    #[test]
    fn extends_with_the_best_supported_then_most_recent_token() {
        // After [5, 6, 1]: 7 8 (twice), 7 9 (once, most recent) → 1 7 8; ties follow recency.
        let history = [5, 6, 1, 7, 8, 0, 5, 6, 1, 7, 8, 0, 5, 6, 1, 7, 9, 0, 5, 6];
        let cfg = NgramConfig { max_n: 2, max_len: 3, ..NgramConfig::default() };
        let c = propose(cfg, &history);
        assert_eq!(tokens(&c), vec![vec![1, 7, 8]]);
        let history = [5, 6, 1, 7, 8, 0, 5, 6, 1, 7, 9, 0, 5, 6];
        let c = propose(cfg, &history);
        assert_eq!(tokens(&c), vec![vec![1, 7, 9]]);
    }

    #[test]
    fn never_matches_its_own_end() {
        // The suffix occurs only at the end.
        assert!(propose(NgramConfig::default(), &[1, 2, 3, 4, 5]).is_empty());
        assert!(propose(NgramConfig::default(), &[1, 2, 3, 1, 2, 4, 1]).is_empty());
    }

    #[test]
    fn continuation_stops_at_the_history_end() {
        // [1, 2] occurred once, followed only by 3 4 before the current suffix.
        let history = [1, 2, 3, 4, 1, 2];
        let c = propose(NgramConfig::default(), &history);
        assert_eq!(tokens(&c), vec![vec![3, 4, 1, 2]]);
        // Overlapping repetition: a run of one token continues only as far as the history goes.
        let c = propose(NgramConfig::default(), &[7, 7, 7, 7]);
        assert_eq!(c[0].match_len, 3);
        assert_eq!(c[0].tokens, vec![7]);
        let c = propose(NgramConfig { min_n: 1, max_n: 1, ..NgramConfig::default() }, &[7, 7, 7, 7]);
        assert_eq!(c[0].tokens, vec![7, 7, 7]);
        assert_eq!(c[0].occurrences, 3);
    }

    #[test]
    fn empty_and_short_histories_propose_nothing() {
        let cfg = NgramConfig::default();
        assert!(propose(cfg, &[]).is_empty());
        assert!(propose(cfg, &[1]).is_empty());
        assert!(propose(cfg, &[1, 1]).is_empty());
        assert!(!propose(cfg, &[1, 1, 1]).is_empty());
        // An empty index proposes nothing even for a repetitive history.
        assert!(NgramIndex::new(cfg).propose(&[1, 2, 1, 2]).is_empty());
    }

    #[test]
    fn respects_max_len_and_max_branches() {
        let mut history: Vec<Token> = Vec::new();
        for next in [1, 2, 3, 4] {
            history.extend([5, 6, next, 10, 11, 12, 13, 14, 15]);
        }
        history.extend([5, 6]);
        let cfg = NgramConfig { max_len: 4, max_branches: 2, ..NgramConfig::default() };
        let c = propose(cfg, &history);
        assert_eq!(tokens(&c), vec![vec![4, 10, 11, 12], vec![3, 10, 11, 12]]);
        assert!(propose(NgramConfig { max_len: 0, ..cfg }, &history).is_empty());
        assert!(propose(NgramConfig { max_branches: 0, ..cfg }, &history).is_empty());
        assert!(propose(NgramConfig { max_occurrences: 0, ..cfg }, &history).is_empty());
        // max_occurrences keeps the most recent occurrences only.
        let c = propose(NgramConfig { max_occurrences: 1, ..cfg }, &history);
        assert_eq!(tokens(&c), vec![vec![4, 10, 11, 12]]);
        assert_eq!(c[0].occurrences, 1);
    }

    #[test]
    fn sync_follows_appends_rollbacks_and_new_prefixes() {
        let cfg = NgramConfig::default();
        let a = [1, 2, 3, 4, 1, 2, 3, 5, 1, 2];
        let mut index = NgramIndex::new(cfg);
        for end in 0..=a.len() {
            index.sync(&a[..end]);
            assert_eq!(index.history(), &a[..end]);
            assert_eq!(index.propose(&a[..end]), naive(cfg, &a[..end]));
        }
        index.sync(&a[..6]);
        assert_eq!(index.len(), 6);
        assert_eq!(index.propose(&a[..6]), propose(cfg, &a[..6]));
        let b = [9, 2, 3, 4, 9, 2];
        index.sync(&b);
        assert_eq!(index.propose(&b), propose(cfg, &b));
        assert_eq!(tokens(&index.propose(&b)), vec![vec![3, 4, 9, 2]]);
        index.clear();
        assert!(index.is_empty());
        assert!(index.propose(&b).is_empty());
    }

    #[test]
    fn stale_index_never_proposes_what_is_not_there() {
        let cfg = NgramConfig::default();
        let index = index_of(cfg, &[1, 2, 3, 1, 2, 3, 1, 2]);
        // Shorter history: positions past its end are ignored.
        assert!(index.propose(&[1, 2, 3, 1, 2]).iter().all(|c| c.tokens.len() <= 3));
        assert!(index.propose(&[1, 2]).is_empty());
        // Different history: occurrences are checked against it.
        assert!(index.propose(&[1, 2, 4, 4, 1, 2]).iter().all(|c| follows_an_occurrence(&[1, 2, 4, 4, 1, 2], c)));
    }

    #[test]
    fn config_validation_and_normalization() {
        assert!(NgramConfig::default().validate().is_ok());
        assert!(NgramConfig { min_n: 0, ..NgramConfig::default() }.validate().is_err());
        assert!(NgramConfig { min_n: 3, max_n: 2, ..NgramConfig::default() }.validate().is_err());
        let index = NgramIndex::new(NgramConfig { min_n: 0, max_n: 0, ..NgramConfig::default() });
        assert_eq!((index.config().min_n, index.config().max_n), (1, 1));
        assert_eq!(tokens(&index_of(*index.config(), &[4, 5, 4]).propose(&[4, 5, 4])), vec![vec![5, 4]]);
    }

    #[test]
    fn long_repetitive_history_stays_bounded() {
        // 8k copies of one token, synced one token at a time as a generation loop would.
        let history = vec![3 as Token; 8192];
        let cfg = NgramConfig::default();
        let mut index = NgramIndex::new(cfg);
        for end in (0..=history.len()).step_by(7) {
            index.sync(&history[..end]);
        }
        index.sync(&history);
        let c = index.propose(&history);
        assert_eq!(c.len(), 1);
        assert_eq!(c[0].tokens, vec![3; cfg.max_len]);
        assert_eq!((c[0].support, c[0].occurrences, c[0].match_len), (64, 64, 4));
        index.sync(&history[..100]);
        assert_eq!(index.maps, index_of(cfg, &history[..100]).maps);
    }

    #[test]
    fn helpers() {
        assert_eq!(common_prefix_len(&[], &[1]), 0);
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 2]), 2);
        assert_eq!(common_prefix_len(&[1, 2, 3], &[1, 5, 3]), 1);
        assert_ne!(gram_key(&[1, 2]), gram_key(&[2, 1]));
        assert_ne!(gram_key(&[0]), gram_key(&[0, 0]));
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        fn history() -> impl Strategy<Value = Vec<Token>> {
            proptest::collection::vec(0..4 as Token, 0..60)
        }

        fn config() -> impl Strategy<Value = NgramConfig> {
            (1usize..4, 0usize..3, 0usize..7, 0usize..4, 0usize..6).prop_map(
                |(min_n, extra, max_len, max_branches, max_occurrences)| NgramConfig {
                    min_n,
                    max_n: min_n + extra,
                    max_len,
                    max_branches,
                    max_occurrences,
                },
            )
        }

        proptest! {
            #[test]
            fn incremental_sync_equals_rebuild(cfg in config(), a in history(), b in history(), cut in 0usize..60) {
                let mut index = NgramIndex::new(cfg);
                index.sync(&a);
                // Roll back, then a changed continuation (a new turn), then append.
                let cut = cut.min(a.len());
                index.sync(&a[..cut]);
                prop_assert_eq!(index.propose(&a[..cut]), propose(cfg, &a[..cut]));
                let mut c = a[..cut].to_vec();
                c.extend(&b);
                index.sync(&c);
                prop_assert_eq!(index.history(), c.as_slice());
                prop_assert_eq!(index.propose(&c), naive(cfg, &c));
                index.sync(&b);
                prop_assert_eq!(index.propose(&b), naive(cfg, &b));
                let fresh = index_of(cfg, &b);
                prop_assert_eq!(&index.maps, &fresh.maps);
            }

            #[test]
            fn proposals_are_true_continuations(cfg in config(), h in history()) {
                let c = propose(cfg, &h);
                let cfg = cfg.normalized();
                prop_assert!(c.len() <= cfg.max_branches);
                let mut firsts: Vec<Token> = c.iter().map(|c| c.tokens[0]).collect();
                firsts.sort_unstable();
                firsts.dedup();
                prop_assert_eq!(firsts.len(), c.len());
                for w in c.windows(2) {
                    prop_assert!(w[0].support >= w[1].support);
                }
                for cand in &c {
                    prop_assert!(!cand.tokens.is_empty() && cand.tokens.len() <= cfg.max_len);
                    prop_assert!((cfg.min_n..=cfg.max_n).contains(&cand.match_len));
                    prop_assert!(cand.support >= 1 && cand.support <= cand.occurrences);
                    prop_assert!(cand.occurrences <= cfg.max_occurrences);
                    prop_assert!(follows_an_occurrence(&h, cand));
                }
            }
        }
    }
}
