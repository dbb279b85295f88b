//! Draft trees: the nodes a draft proposes, their sequence-id sets for llama.cpp's unified KV
//! cache (SPEC §2), static shapes, and the EAGLE-2 style top-N selection that keeps ancestors.
//! Pure data structures: no llama.cpp calls here.

use std::sync::Arc;

use crate::backend::Token;

/// How a child token was proposed; verification must know it to stay lossless (SPEC §3).
#[derive(Debug, Clone)]
pub enum Proposal {
    /// Chosen deterministically (argmax / top-k of the draft): q is one-hot.
    Deterministic,
    /// Drawn from this (warped) draft distribution.
    Sampled(Arc<Vec<f32>>),
}

/// Who proposed a node; acceptance is calibrated per origin.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Origin {
    /// The draft model's (or head's) choice of this rank at its parent (0 = its best token).
    Draft(usize),
    /// The i-th token (0 = first) of an n-gram lookup's continuation.
    Lookup(usize),
}

/// One node. Node 0 is the root: the last committed token, which the target has not seen yet.
#[derive(Debug, Clone)]
pub struct TreeNode {
    pub token: Token,
    /// Parent index (the root's parent is itself, index 0).
    pub parent: usize,
    /// Root has depth 0; its children depth 1.
    pub depth: usize,
    /// log q(token | path) under the draft.
    pub logq: f32,
    /// Sum of logq along the path: EAGLE-2's node score.
    pub score: f32,
    /// Estimated probability that the target accepts this node given its parent was accepted.
    pub accept_p: f32,
    /// The proposer's confidence, known before the token was chosen: q(token) for a
    /// deterministic child, max q for a sampled one, the share of agreeing matches for a
    /// lookup. Acceptance is calibrated against it.
    pub conf: f32,
    pub proposal: Proposal,
    pub origin: Origin,
    /// The draft-cache sequence id identifying this node's cell: 0 for the root, -1 until the
    /// draft has decoded the node (then its KV is in the draft cache). Stable when the tree is re-indexed by [`DraftTree::restrict`].
    pub draft_seq: i32,
}

/// A rooted tree of draft tokens, stored parents-before-children.
#[derive(Debug, Clone)]
pub struct DraftTree {
    pub nodes: Vec<TreeNode>,
}

impl DraftTree {
    /// A tree holding only the root token.
    pub fn new(root: Token) -> Self {
        DraftTree {
            nodes: vec![TreeNode {
                token: root,
                parent: 0,
                depth: 0,
                logq: 0.0,
                score: 0.0,
                accept_p: 1.0,
                conf: 1.0,
                proposal: Proposal::Deterministic,
                origin: Origin::Draft(0),
                draft_seq: 0,
            }],
        }
    }

    /// Number of nodes including the root.
    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    /// True when only the root is present.
    pub fn is_empty(&self) -> bool {
        self.nodes.len() <= 1
    }

    /// Number of draft (non-root) nodes.
    pub fn n_draft(&self) -> usize {
        self.nodes.len() - 1
    }

    /// Adds a child and returns its index (confidence q(token), rank 0; set the other fields
    /// on the returned node where they differ).
    pub fn add(&mut self, parent: usize, token: Token, logq: f32, accept_p: f32, proposal: Proposal) -> usize {
        let (depth, score) = (self.nodes[parent].depth + 1, self.nodes[parent].score + logq);
        self.nodes.push(TreeNode {
            token,
            parent,
            depth,
            logq,
            score,
            accept_p,
            conf: logq.exp(),
            proposal,
            origin: Origin::Draft(0),
            draft_seq: -1,
        });
        self.nodes.len() - 1
    }

    /// The child of `parent` carrying `token`, if any.
    pub fn child_with(&self, parent: usize, token: Token) -> Option<usize> {
        (1..self.nodes.len()).find(|&j| self.nodes[j].parent == parent && self.nodes[j].token == token)
    }

    /// Children of `i`, in insertion order (the order verification tries them).
    pub fn children(&self, i: usize) -> Vec<usize> {
        (1..self.nodes.len()).filter(|&j| self.nodes[j].parent == i).collect()
    }

    /// Node indices from the root's first child down to `i` (empty for the root).
    pub fn path(&self, mut i: usize) -> Vec<usize> {
        let mut p = Vec::new();
        while i != 0 {
            p.push(i);
            i = self.nodes[i].parent;
        }
        p.reverse();
        p
    }

    /// Greatest depth.
    pub fn depth(&self) -> usize {
        self.nodes.iter().map(|n| n.depth).max().unwrap_or(0)
    }

    /// Whether every node has at most one child.
    pub fn is_chain(&self) -> bool {
        let mut kids = vec![0usize; self.nodes.len()];
        for n in &self.nodes[1..] {
            kids[n.parent] += 1;
        }
        kids.iter().all(|&k| k <= 1)
    }

    /// Leaves (nodes without children), in index order.
    pub fn leaves(&self) -> Vec<usize> {
        let mut has_child = vec![false; self.nodes.len()];
        for n in &self.nodes[1..] {
            has_child[n.parent] = true;
        }
        (0..self.nodes.len()).filter(|&i| !has_child[i]).collect()
    }

    /// Sequence-id set of every node: leaf k gets id k; a node carries the ids of all leaves
    /// below it, so a query attends exactly to its ancestors (SPEC §2).
    pub fn seq_sets(&self) -> Vec<Vec<i32>> {
        let mut sets: Vec<Vec<i32>> = vec![Vec::new(); self.nodes.len()];
        for (k, &leaf) in self.leaves().iter().enumerate() {
            let mut i = leaf;
            loop {
                sets[i].push(k as i32);
                if i == 0 {
                    break;
                }
                i = self.nodes[i].parent;
            }
        }
        for s in &mut sets {
            s.sort_unstable();
        }
        sets
    }

    /// Expected number of accepted draft tokens, Σ over nodes of Π accept_p along the path.
    pub fn expected_accepted(&self) -> f32 {
        let mut reach = vec![1f32; self.nodes.len()];
        let mut total = 0.0;
        for i in 1..self.nodes.len() {
            reach[i] = reach[self.nodes[i].parent] * self.nodes[i].accept_p;
            total += reach[i];
        }
        total
    }

    /// The subtree made of `keep` plus all their ancestors, re-indexed parents-first.
    /// A node whose parent is not kept can never be kept (no dangling nodes).
    pub fn restrict(&self, keep: &[usize]) -> DraftTree {
        let mut wanted = vec![false; self.nodes.len()];
        wanted[0] = true;
        for &k in keep {
            let mut i = k;
            while !wanted[i] {
                wanted[i] = true;
                i = self.nodes[i].parent;
            }
        }
        let mut map = vec![usize::MAX; self.nodes.len()];
        let mut out = DraftTree { nodes: Vec::new() };
        for (i, n) in self.nodes.iter().enumerate() {
            if wanted[i] {
                let mut m = n.clone();
                m.parent = if i == 0 { 0 } else { map[n.parent] };
                map[i] = out.nodes.len();
                out.nodes.push(m);
            }
        }
        out
    }

    /// EAGLE-2 re-ranking: keep the `n` best draft nodes by score, plus their ancestors.
    pub fn top_n(&self, n: usize) -> DraftTree {
        let mut order: Vec<usize> = (1..self.nodes.len()).collect();
        order.sort_by(|&a, &b| self.nodes[b].score.total_cmp(&self.nodes[a].score).then(a.cmp(&b)));
        // Scores fall along a path, so ancestors rank first except on ties; add nodes whose
        // ancestors fit in the budget.
        let mut chosen: Vec<usize> = Vec::new();
        let mut taken = vec![false; self.nodes.len()];
        taken[0] = true;
        for &i in &order {
            if chosen.len() >= n {
                break;
            }
            let missing: Vec<usize> = self.path(i).into_iter().filter(|&j| !taken[j]).collect();
            if chosen.len() + missing.len() <= n {
                for j in missing {
                    taken[j] = true;
                    chosen.push(j);
                }
            }
        }
        self.restrict(&chosen)
    }
}

/// A static tree shape as paths of child ranks, e.g. `[[0], [1], [0, 0]]`: the best and
/// second-best child of the root, and the best child of the best child.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StaticShape {
    pub paths: Vec<Vec<usize>>,
}

impl StaticShape {
    /// Parses `0;1;0,0;0,0,0` (paths separated by `;`, ranks by `,`). Every path's parent
    /// path must also be present.
    pub fn parse(s: &str) -> Result<Self, String> {
        let mut paths: Vec<Vec<usize>> = Vec::new();
        for part in s.split(';').map(str::trim).filter(|p| !p.is_empty()) {
            let p: Result<Vec<usize>, _> = part.split(',').map(|x| x.trim().parse::<usize>()).collect();
            paths.push(p.map_err(|_| format!("bad path {part:?}: expected ranks like 0,1"))?);
        }
        if paths.is_empty() {
            return Err("empty static tree".into());
        }
        for p in &paths {
            if p.len() > 1 && !paths.contains(&p[..p.len() - 1].to_vec()) {
                return Err(format!("path {p:?} has no parent path {:?}", &p[..p.len() - 1]));
            }
        }
        paths.sort_by(|a, b| a.len().cmp(&b.len()).then(a.cmp(b)));
        paths.dedup();
        Ok(StaticShape { paths })
    }

    /// Largest child rank used anywhere (+1): how many children to take per expansion.
    pub fn max_width(&self) -> usize {
        self.paths.iter().flat_map(|p| p.iter().copied()).max().map_or(1, |m| m + 1)
    }

    /// Depth of the deepest path.
    pub fn depth(&self) -> usize {
        self.paths.iter().map(Vec::len).max().unwrap_or(0)
    }

    /// Paths no other path extends (the tree's leaves).
    pub fn leaves(&self) -> usize {
        self.paths.iter().filter(|p| !self.paths.iter().any(|q| q.len() == p.len() + 1 && q.starts_with(p))).count()
    }
}

impl TreeNode {
    /// Whether the draft model has decoded this node (its KV is in the draft cache).
    pub fn draft_decoded(&self) -> bool {
        self.draft_seq >= 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample_tree() -> DraftTree {
        // root -> a(1) -> c(3)
        //      -> b(2)
        let mut t = DraftTree::new(100);
        let a = t.add(0, 1, -0.1, 0.9, Proposal::Deterministic);
        let _b = t.add(0, 2, -2.0, 0.1, Proposal::Deterministic);
        t.add(a, 3, -0.2, 0.8, Proposal::Deterministic);
        t
    }

    #[test]
    fn seq_sets_cover_ancestors() {
        let t = sample_tree();
        let sets = t.seq_sets();
        assert_eq!(t.leaves(), vec![2, 3]);
        assert_eq!(sets[0], vec![0, 1]);
        assert_eq!(sets[1], vec![1]); // a is above leaf c (leaf #1)
        assert_eq!(sets[2], vec![0]);
        assert_eq!(sets[3], vec![1]);
        // every node's set is a subset of its parent's
        for i in 1..t.len() {
            let p = &sets[t.nodes[i].parent];
            assert!(sets[i].iter().all(|s| p.contains(s)));
        }
    }

    #[test]
    fn positions_follow_depth() {
        let t = sample_tree();
        assert_eq!(t.nodes.iter().map(|n| n.depth).collect::<Vec<_>>(), vec![0, 1, 1, 2]);
    }

    #[test]
    fn top_n_keeps_ancestors() {
        let mut t = sample_tree();
        // A deep node with a high score but whose parent ranks low must bring its parent.
        let c = 3;
        let d = t.add(c, 4, 0.0, 0.5, Proposal::Deterministic);
        t.nodes[d].score = 10.0;
        let s = t.top_n(1);
        assert_eq!(s.n_draft(), 1);
        assert!(s.nodes.iter().all(|n| n.token != 4), "node without its ancestors kept");
        let s = t.top_n(3);
        let toks: Vec<Token> = s.nodes.iter().map(|n| n.token).collect();
        assert_eq!(toks, vec![100, 1, 3, 4]);
        for i in 1..s.len() {
            assert!(s.nodes[i].parent < i);
        }
    }

    #[test]
    fn expected_accepted_multiplies_along_paths() {
        let t = sample_tree();
        let e = t.expected_accepted();
        assert!((e - (0.9 + 0.1 + 0.9 * 0.8)).abs() < 1e-6);
    }

    #[test]
    fn static_shape_parses_and_validates() {
        let s = StaticShape::parse("0;1;0,0;0,1").unwrap();
        assert_eq!(s.max_width(), 2);
        assert_eq!(s.depth(), 2);
        assert!(StaticShape::parse("0;1,0").is_err());
        assert!(StaticShape::parse("x").is_err());
    }

    mod props {
        use super::*;
        use proptest::prelude::*;

        proptest! {
            #[test]
            fn random_trees_are_consistent(parents in proptest::collection::vec(0usize..1000, 1..40), n in 1usize..40) {
                let mut t = DraftTree::new(0);
                for (i, p) in parents.iter().enumerate() {
                    let parent = p % (i + 1);
                    t.add(parent, (i + 1) as Token, -((p % 7) as f32) * 0.3, 0.5, Proposal::Deterministic);
                }
                let s = t.top_n(n);
                prop_assert!(s.n_draft() <= n);
                for i in 1..s.len() {
                    prop_assert!(s.nodes[i].parent < i);
                    prop_assert_eq!(s.nodes[i].depth, s.nodes[s.nodes[i].parent].depth + 1);
                }
                let sets = s.seq_sets();
                prop_assert_eq!(sets[0].len(), s.leaves().len());
                for i in 1..s.len() {
                    prop_assert!(!sets[i].is_empty());
                    let p = &sets[s.nodes[i].parent];
                    prop_assert!(sets[i].iter().all(|x| p.contains(x)));
                }
                // two nodes at the same depth never share a seq id (they would see each other)
                for i in 1..s.len() { for j in 1..s.len() {
                    if i != j && s.nodes[i].depth == s.nodes[j].depth {
                        prop_assert!(sets[i].iter().all(|x| !sets[j].contains(x)));
                    }
                }}
            }
        }
    }
}
