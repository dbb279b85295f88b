//! The cost model behind `auto`: target decode time as a function of batch size and draft time
//! per step, measured at start-up and updated online, plus calibrated acceptance estimates.
//! On CPUs the batch cost curve is far from flat and not even monotone (a 4-token batch can be
//! cheaper than 3), so it is measured, never assumed.

use std::collections::HashMap;
use std::sync::Mutex;

use crate::cpu_kernels::KernelPlan;
use crate::tree::Origin;

/// Weight of a new measurement in the curve's overall scale (the machine got busier or
/// quieter: every batch size moves together).
const SCALE_EMA: f64 = 0.1;
/// Weight of a new measurement in its own batch size's point (the curve's shape).
const POINT_EMA: f64 = 0.01;

/// Measured milliseconds per decode call by batch size: a shape (per-size points) times an
/// overall scale. Online measurements mostly move the scale, so noise that slows every decode
/// (another process, a frequency change) never makes one size look cheap next to stale
/// neighbours; they move their own point slowly.
#[derive(Debug, Clone, serde::Serialize)]
pub struct BatchCost {
    ms: Vec<Option<f64>>,
    scale: f64,
}

impl Default for BatchCost {
    fn default() -> Self {
        BatchCost { ms: Vec::new(), scale: 1.0 }
    }
}

impl BatchCost {
    /// Records a measurement: the first one of a size sets its point, later ones move the
    /// scale and (less) the point.
    pub fn observe(&mut self, batch: usize, ms: f64) {
        if batch == 0 || !ms.is_finite() || ms < 0.0 {
            return;
        }
        if self.ms.len() <= batch {
            self.ms.resize(batch + 1, None);
        }
        match self.ms[batch] {
            None => self.ms[batch] = Some(ms / self.scale),
            Some(old) => {
                let ratio = ms / (old * self.scale).max(1e-9);
                self.scale *= 1.0 + SCALE_EMA * (ratio.clamp(0.25, 4.0) - 1.0);
                self.ms[batch] = Some(old * (1.0 - POINT_EMA) + (ms / self.scale) * POINT_EMA);
            }
        }
    }

    /// Estimated ms for a batch: measured, else interpolated between measured neighbours,
    /// else extrapolated linearly from the largest two; times the scale.
    pub fn estimate(&self, batch: usize) -> f64 {
        self.shape(batch) * self.scale
    }

    fn shape(&self, batch: usize) -> f64 {
        let batch = batch.max(1);
        if let Some(Some(v)) = self.ms.get(batch) {
            return *v;
        }
        let known: Vec<(usize, f64)> = self.ms.iter().enumerate().filter_map(|(b, v)| v.map(|v| (b, v))).collect();
        match known.len() {
            0 => batch as f64,
            1 => known[0].1 * (batch as f64 / known[0].0 as f64).max(1.0),
            _ => {
                let lo = known.iter().rev().find(|(b, _)| *b < batch);
                let hi = known.iter().find(|(b, _)| *b > batch);
                match (lo, hi) {
                    (Some(&(b0, v0)), Some(&(b1, v1))) => v0 + (v1 - v0) * (batch - b0) as f64 / (b1 - b0) as f64,
                    (None, Some(&(_, v1))) => v1,
                    (Some(_), None) => {
                        let (b0, v0) = known[known.len() - 2];
                        let (b1, v1) = known[known.len() - 1];
                        let slope = ((v1 - v0) / (b1 - b0) as f64).max(0.0);
                        v1 + slope * (batch - b1) as f64
                    }
                    (None, None) => batch as f64,
                }
            }
        }
    }

    /// Whether anything was measured.
    pub fn is_empty(&self) -> bool {
        self.ms.iter().all(Option::is_none)
    }

    /// The measured points (scaled), for reporting.
    pub fn points(&self) -> Vec<(usize, f64)> {
        self.ms.iter().enumerate().filter_map(|(b, v)| v.map(|v| (b, v * self.scale))).collect()
    }
}

/// Acceptance calibration: how often the target accepted a draft token whose draft
/// probability fell in each bucket, with a prior that trusts the draft's own probability.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Calibration {
    accepted: [f64; 10],
    total: [f64; 10],
}

impl Default for Calibration {
    fn default() -> Self {
        Self { accepted: [0.0; 10], total: [0.0; 10] }
    }
}

/// Pseudo-observations given to the prior.
const PRIOR_WEIGHT: f64 = 4.0;

impl Calibration {
    fn bucket(q: f32) -> usize {
        ((q.clamp(0.0, 0.9999) * 10.0) as usize).min(9)
    }

    /// Records whether a token proposed with draft probability `q` was accepted.
    pub fn observe(&mut self, q: f32, accepted: bool) {
        let b = Self::bucket(q);
        // Slowly forget so the estimate follows topic changes.
        self.accepted[b] *= 0.995;
        self.total[b] *= 0.995;
        self.total[b] += 1.0;
        if accepted {
            self.accepted[b] += 1.0;
        }
    }

    /// Observations so far (decayed like the counts).
    pub fn count(&self) -> f64 {
        self.total.iter().sum()
    }

    /// Overall acceptance so far (every bucket pooled), with the prior `prior` weighted as
    /// [`PRIOR_WEIGHT`] observations: the a-priori acceptance of the next proposal.
    pub fn mean(&self, prior: f32) -> f32 {
        let (a, t): (f64, f64) = (self.accepted.iter().sum(), self.total.iter().sum());
        ((a + PRIOR_WEIGHT * prior as f64) / (t + PRIOR_WEIGHT)) as f32
    }

    /// Estimated acceptance probability for draft probability `q`.
    pub fn estimate(&self, q: f32) -> f32 {
        self.estimate_with_prior(q, q)
    }

    /// Estimated acceptance for confidence `q`, its bucket starting from `prior`.
    pub fn estimate_with_prior(&self, q: f32, prior: f32) -> f32 {
        let b = Self::bucket(q);
        let prior = prior.clamp(0.0, 1.0) as f64;
        ((self.accepted[b] + PRIOR_WEIGHT * prior) / (self.total[b] + PRIOR_WEIGHT)) as f32
    }
}

/// Everything `auto` knows about this machine and this draft.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct CostModel {
    /// Target decode ms by batch size.
    pub target: BatchCost,
    /// Draft decode ms by batch size.
    pub draft: BatchCost,
    /// Wall ms per draft step measured on drafting rounds (decayed sums of ms and of steps):
    /// a round drafting g tokens runs g or g + 1 steps (the root's catch-up, then each token
    /// a further one was asked for), each with its decode, sampling and bookkeeping.
    pub draft_round_ms: f64,
    pub draft_round_steps: f64,
    /// Acceptance of the draft's first-choice children.
    pub first_choice: Calibration,
    /// Acceptance of second-choice (sibling) children.
    pub second_choice: Calibration,
    /// Acceptance of the first token of n-gram lookups, by the share of matches agreeing on it.
    pub lookup: Calibration,
    /// Acceptance of lookup tokens 2..=LOOKUP_DEEP given the earlier ones were accepted
    /// (copied text tends to go on being copied).
    pub lookup_next: Calibration,
    /// The same past the first [`LOOKUP_DEEP`] tokens: a copy that got this far is far more
    /// likely to go on than one that just started, so long branches are priced by their own
    /// acceptance, not by the short ones'.
    pub lookup_deep: Calibration,
}

/// Lookup tokens judged by `lookup` and `lookup_next`; later ones by `lookup_deep`.
pub const LOOKUP_DEEP: usize = 8;

/// Weight kept by the per-step draft cost sums per drafting round.
const DRAFT_STEP_DECAY: f64 = 0.9;

impl CostModel {
    /// Records a drafting round: `steps` draft decodes (the root's catch-up included) in `ms`
    /// of wall time.
    pub fn observe_draft_round(&mut self, steps: usize, ms: f64) {
        if !ms.is_finite() || ms < 0.0 {
            return;
        }
        self.draft_round_ms = self.draft_round_ms * DRAFT_STEP_DECAY + ms;
        self.draft_round_steps = self.draft_round_steps * DRAFT_STEP_DECAY + steps as f64;
    }

    /// Wall ms of one draft step: measured on this session's drafting rounds once there are a
    /// few, blended with the start-up probe's one-token decode before.
    pub fn draft_step_ms(&self) -> f64 {
        let probe = self.draft.estimate(1);
        // The probe counts as two steps of evidence.
        (self.draft_round_ms + 2.0 * probe) / (self.draft_round_steps + 2.0)
    }

    /// The calibration that learns the acceptance of nodes of this origin.
    pub fn calibration(&self, origin: Origin) -> &Calibration {
        match origin {
            Origin::Draft(0) => &self.first_choice,
            Origin::Draft(_) => &self.second_choice,
            Origin::Lookup(0) => &self.lookup,
            Origin::Lookup(j) if j < LOOKUP_DEEP => &self.lookup_next,
            Origin::Lookup(_) => &self.lookup_deep,
        }
    }

    /// Mutable [`CostModel::calibration`].
    pub fn calibration_mut(&mut self, origin: Origin) -> &mut Calibration {
        match origin {
            Origin::Draft(0) => &mut self.first_choice,
            Origin::Draft(_) => &mut self.second_choice,
            Origin::Lookup(0) => &mut self.lookup,
            Origin::Lookup(j) if j < LOOKUP_DEEP => &mut self.lookup_next,
            Origin::Lookup(_) => &mut self.lookup_deep,
        }
    }

    /// Estimated acceptance of a node of `origin` with confidence `conf`. A draft model's
    /// confidence is its own probability, a good prior for its bucket; a lookup's confidence
    /// (its class: how far back the match reaches, whether the matches agree) is a rough guess,
    /// so its buckets start halfway between it and what all lookups of that kind achieved.
    pub fn estimate(&self, origin: Origin, conf: f32) -> f32 {
        let c = self.calibration(origin);
        match origin {
            Origin::Draft(_) => c.estimate(conf),
            Origin::Lookup(_) => c.estimate_with_prior(conf, 0.5 * (conf + c.mean(conf))),
        }
    }
}

/// What the cost model knows of one drafting model (a draft model or a head): its decode
/// curve, its per-step wall time on drafting rounds and the calibration of its proposals. A
/// session with two drafting models keeps the other one's here and swaps it in
/// ([`CostModel::swap_model`]) when `auto` plans with it.
#[derive(Debug, Clone, Default)]
pub struct ModelCosts {
    draft: BatchCost,
    draft_round_ms: f64,
    draft_round_steps: f64,
    first_choice: Calibration,
    second_choice: Calibration,
}

impl ModelCosts {
    /// A model's costs before any drafting round: its measured decode curve.
    pub fn new(draft: BatchCost) -> Self {
        ModelCosts { draft, ..Default::default() }
    }
}

impl CostModel {
    /// Exchanges the drafting model's part of this cost model with `other`.
    pub fn swap_model(&mut self, other: &mut ModelCosts) {
        std::mem::swap(&mut self.draft, &mut other.draft);
        std::mem::swap(&mut self.draft_round_ms, &mut other.draft_round_ms);
        std::mem::swap(&mut self.draft_round_steps, &mut other.draft_round_steps);
        std::mem::swap(&mut self.first_choice, &mut other.first_choice);
        std::mem::swap(&mut self.second_choice, &mut other.second_choice);
    }
}

impl CostModel {
    /// Expected tokens per millisecond of a round that drafts for `draft_ms` and verifies a
    /// batch of `verify_batch` tokens yielding `1 + expected_accepted` tokens.
    pub fn rate(&self, expected_accepted: f32, draft_ms: f64, verify_batch: usize) -> f64 {
        (1.0 + expected_accepted as f64) / (draft_ms + self.target.estimate(verify_batch)).max(1e-6)
    }
}

/// Values shared by all sessions of a process, keyed by setup (a poisoned lock reads as empty).
pub(crate) struct ProcessMap<T>(Mutex<Option<HashMap<String, T>>>);

impl<T: Clone> ProcessMap<T> {
    pub(crate) const fn new() -> Self {
        ProcessMap(Mutex::new(None))
    }

    pub(crate) fn get(&self, key: &str) -> Option<T> {
        self.0.lock().ok()?.as_ref()?.get(key).cloned()
    }

    pub(crate) fn insert(&self, key: &str, value: T) {
        if let Ok(mut m) = self.0.lock() {
            m.get_or_insert_with(HashMap::new).insert(key.to_string(), value);
        }
    }
}

/// Start-up measurements shared by all sessions of a process, keyed by model file, threads and
/// settings, so a benchmark or a host with many sessions measures once.
/// Each holds the curve and the kernel choice per batch size that produced it.
static MEASURED: ProcessMap<(BatchCost, KernelPlan)> = ProcessMap::new();

/// Returns a cached start-up measurement.
pub fn cached(key: &str) -> Option<(BatchCost, KernelPlan)> {
    MEASURED.get(key)
}

/// Stores a start-up measurement.
pub fn store(key: &str, cost: &BatchCost, plan: &KernelPlan) {
    MEASURED.insert(key, (cost.clone(), plan.clone()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interpolates_and_extrapolates() {
        let mut c = BatchCost::default();
        c.observe(1, 76.0);
        c.observe(4, 116.0);
        c.observe(8, 223.0);
        assert_eq!(c.estimate(1), 76.0);
        assert!((c.estimate(2) - (76.0 + 40.0 / 3.0)).abs() < 1e-9);
        assert!(c.estimate(16) > 223.0);
        c.observe(1, 86.0);
        assert!(c.estimate(1) > 76.0 && c.estimate(1) < 86.0);
    }

    #[test]
    fn a_slower_machine_moves_the_whole_curve() {
        let mut c = BatchCost::default();
        c.observe(1, 20.0);
        c.observe(2, 36.0);
        for _ in 0..60 {
            c.observe(1, 40.0); // everything got twice as slow; only size 1 is seen
        }
        assert!((c.estimate(1) - 40.0).abs() < 2.0, "{}", c.estimate(1));
        // The unseen size keeps its ratio to size 1 instead of looking cheap.
        let ratio = c.estimate(2) / c.estimate(1);
        assert!(ratio > 1.6 && ratio <= 1.8, "ratio {ratio}"); // measured 1.8 before the slowdown
    }

    #[test]
    fn lookup_buckets_start_from_what_lookups_achieved() {
        let mut m = CostModel::default();
        for _ in 0..40 {
            m.calibration_mut(Origin::Lookup(0)).observe(0.5, false);
        }
        // A bucket never seen (0.75) starts halfway between the pooled rate and 0.75...
        let e = m.estimate(Origin::Lookup(0), 0.75);
        assert!(e > 0.35 && e < 0.45, "{e}");
        // ...while a draft model's probability stays the prior of its bucket.
        assert!((m.estimate(Origin::Draft(0), 0.75) - 0.75).abs() < 1e-6);
    }

    #[test]
    fn calibration_moves_from_prior_to_data() {
        let mut cal = Calibration::default();
        assert!((cal.estimate(0.95) - 0.95).abs() < 1e-6);
        for _ in 0..200 {
            cal.observe(0.95, false);
        }
        assert!(cal.estimate(0.95) < 0.2);
        assert!((cal.estimate(0.15) - 0.15).abs() < 1e-6);
    }
}
