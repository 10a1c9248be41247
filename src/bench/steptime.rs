//! The pre-registered step-time benchmark (issue "8 of 10"): which policy is "ours", which are
//! the baselines, and how repeated runs over seeds are summarised. Pure: the runner
//! (`moectl bench steptime`) measures, this declares and aggregates.
//!
//! Declared before any measurement, and the same for every seed, regime and shape:
//! - **ours**: CRAFT at a sixth of EPLB's replica memory (`R = floor(L / 6)` for L MoE layers, at
//!   least 1), planned for step time at the regime's tokens per step with the H200 cost model,
//!   and dispatched per batch by that cost model (`Dispatch::Step`);
//! - **none**: one copy of each expert, no replica;
//! - **eplb-fixed**: EPLB with one redundant expert per GPU per layer (`R = L`), fixed equal
//!   shares: what engines ship;
//! - **eplb-dispatch**: the same EPLB plan with our per-batch dispatch;
//! - **craft-fixed**: CRAFT at ours' budget, planned for balancedness, fixed shares (the paper's
//!   method, for reference).

use serde::{Deserialize, Serialize};

use crate::plan::step_cost::Dispatch;
use crate::plan::Algorithm;

/// How a variant's CRAFT plan is scored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Objective {
    Balancedness,
    StepTime,
}

/// One declared policy: algorithm, budget, planning objective and dispatch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Variant {
    pub label: String,
    pub algorithm: Algorithm,
    pub replicas_per_gpu: u32,
    pub objective: Objective,
    pub dispatch: Dispatch,
}

/// Label of the declared policy every target is about.
pub const OURS: &str = "ours";
/// Label of the baseline the targets divide by.
pub const EPLB_FIXED: &str = "eplb-fixed";
pub const EPLB_DISPATCH: &str = "eplb-dispatch";
pub const NONE: &str = "none";

/// Ours' budget: a sixth of EPLB's one redundant expert per GPU per layer, at least one.
pub fn ours_budget(moe_layers: u32) -> u32 {
    (moe_layers / 6).max(1)
}

/// The declared variants for a model of `moe_layers` MoE layers, in run order.
pub fn declared(moe_layers: u32) -> Vec<Variant> {
    let r = ours_budget(moe_layers);
    let v = |label: &str, algorithm, replicas_per_gpu, objective, dispatch| Variant {
        label: label.into(),
        algorithm,
        replicas_per_gpu,
        objective,
        dispatch,
    };
    vec![
        v(
            NONE,
            Algorithm::None,
            0,
            Objective::Balancedness,
            Dispatch::Shares,
        ),
        v(
            EPLB_FIXED,
            Algorithm::Eplb,
            moe_layers,
            Objective::Balancedness,
            Dispatch::Shares,
        ),
        v(
            EPLB_DISPATCH,
            Algorithm::Eplb,
            moe_layers,
            Objective::Balancedness,
            Dispatch::Step,
        ),
        v(
            "craft-fixed",
            Algorithm::Craft,
            r,
            Objective::Balancedness,
            Dispatch::Shares,
        ),
        v(
            OURS,
            Algorithm::Craft,
            r,
            Objective::StepTime,
            Dispatch::Step,
        ),
    ]
}

/// One measured (seed, regime, variant).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Sample {
    pub seed: u64,
    pub regime: String,
    pub label: String,
    pub tokens_per_s: f64,
    pub step_p50_ms: f64,
    pub replica_mib_per_gpu: f64,
    /// The cost model's mean layer step for the same plan, draws and dispatch.
    pub model_layer_ms: Option<f64>,
    pub observed_balancedness: f64,
}

/// Mean and (sample) standard deviation.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct MeanSd {
    pub mean: f64,
    pub sd: f64,
    pub n: usize,
}

impl MeanSd {
    pub fn of(xs: &[f64]) -> Self {
        let n = xs.len();
        if n == 0 {
            return Self::default();
        }
        let mean = xs.iter().sum::<f64>() / n as f64;
        let sd = if n > 1 {
            (xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1) as f64).sqrt()
        } else {
            0.0
        };
        Self { mean, sd, n }
    }
}

/// One variant's line of the summary of a regime.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct SummaryRow {
    pub regime: String,
    pub label: String,
    pub tokens_per_s: MeanSd,
    /// Per seed, this variant's tokens/s over eplb-fixed's, then mean and spread over seeds.
    pub over_eplb_fixed: MeanSd,
    pub over_eplb_dispatch: MeanSd,
    pub over_none: MeanSd,
    /// Lowest per-seed ratio over `none` (the "never below none" target).
    pub min_over_none: f64,
    pub replica_mib_per_gpu: f64,
}

/// Per regime and variant, the mean and spread over seeds of tokens/s and of the per-seed
/// ratios to the baselines (a ratio is taken within a seed, then averaged: the seeds' traces
/// differ in difficulty, the ratios less).
pub fn summarise(samples: &[Sample]) -> Vec<SummaryRow> {
    let mut regimes: Vec<&str> = Vec::new();
    let mut labels: Vec<&str> = Vec::new();
    for s in samples {
        if !regimes.contains(&s.regime.as_str()) {
            regimes.push(&s.regime);
        }
        if !labels.contains(&s.label.as_str()) {
            labels.push(&s.label);
        }
    }
    let find = |seed: u64, regime: &str, label: &str| {
        samples
            .iter()
            .find(|s| s.seed == seed && s.regime == regime && s.label == label)
    };
    let mut rows = Vec::new();
    for regime in &regimes {
        for label in &labels {
            let mine: Vec<&Sample> = samples
                .iter()
                .filter(|s| s.regime == *regime && s.label == *label)
                .collect();
            if mine.is_empty() {
                continue;
            }
            let ratio = |base: &str| -> Vec<f64> {
                mine.iter()
                    .filter_map(|s| {
                        let b = find(s.seed, regime, base)?;
                        (b.tokens_per_s > 0.0).then(|| s.tokens_per_s / b.tokens_per_s)
                    })
                    .collect()
            };
            let over_none = ratio(NONE);
            rows.push(SummaryRow {
                regime: regime.to_string(),
                label: label.to_string(),
                tokens_per_s: MeanSd::of(&mine.iter().map(|s| s.tokens_per_s).collect::<Vec<_>>()),
                over_eplb_fixed: MeanSd::of(&ratio(EPLB_FIXED)),
                over_eplb_dispatch: MeanSd::of(&ratio(EPLB_DISPATCH)),
                min_over_none: over_none.iter().copied().fold(f64::INFINITY, f64::min),
                over_none: MeanSd::of(&over_none),
                replica_mib_per_gpu: mine
                    .iter()
                    .map(|s| s.replica_mib_per_gpu)
                    .fold(0.0, f64::max),
            });
        }
    }
    rows
}

/// The summary as a Markdown table.
pub fn markdown(rows: &[SummaryRow]) -> String {
    let mut s = String::from(
        "| regime | policy | tokens/s (mean ± sd) | / eplb-fixed | / eplb-dispatch | / none (min) | replica MiB/GPU |\n|---|---|---|---|---|---|---|\n",
    );
    let r = |m: &MeanSd| format!("{:.3} ± {:.3}", m.mean, m.sd);
    for row in rows {
        s.push_str(&format!(
            "| {} | {} | {:.0} ± {:.0} | {} | {} | {} ({:.3}) | {:.1} |\n",
            row.regime,
            row.label,
            row.tokens_per_s.mean,
            row.tokens_per_s.sd,
            r(&row.over_eplb_fixed),
            r(&row.over_eplb_dispatch),
            r(&row.over_none),
            row.min_over_none,
            row.replica_mib_per_gpu
        ));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(seed: u64, label: &str, tps: f64) -> Sample {
        Sample {
            seed,
            regime: "decode".into(),
            label: label.into(),
            tokens_per_s: tps,
            step_p50_ms: 0.0,
            replica_mib_per_gpu: 0.0,
            model_layer_ms: None,
            observed_balancedness: 0.0,
        }
    }

    #[test]
    fn declared_policies_are_fixed_and_ours_uses_a_sixth_of_eplb() {
        let v = declared(48);
        let labels: Vec<&str> = v.iter().map(|v| v.label.as_str()).collect();
        assert_eq!(
            labels,
            [NONE, EPLB_FIXED, EPLB_DISPATCH, "craft-fixed", OURS]
        );
        let ours = v.iter().find(|v| v.label == OURS).unwrap();
        assert_eq!(ours.replicas_per_gpu, 8);
        assert_eq!(ours.objective, Objective::StepTime);
        assert_eq!(ours.dispatch, Dispatch::Step);
        let eplb = v.iter().find(|v| v.label == EPLB_FIXED).unwrap();
        assert_eq!(eplb.replicas_per_gpu, 48);
        assert_eq!(eplb.dispatch, Dispatch::Shares);
        // A 4-layer subset cannot take a sixth: one replica per GPU, as a trend only.
        assert_eq!(ours_budget(4), 1);
    }

    #[test]
    fn mean_and_sample_sd() {
        let m = MeanSd::of(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m.mean - 2.5).abs() < 1e-12);
        assert!((m.sd - (5.0f64 / 3.0).sqrt()).abs() < 1e-12);
        assert_eq!(MeanSd::of(&[7.0]).sd, 0.0);
        assert_eq!(MeanSd::of(&[]).n, 0);
    }

    #[test]
    fn ratios_are_taken_within_a_seed() {
        // Seed 2's trace is twice as fast for everyone: ours is 1.2x eplb-fixed in both seeds.
        let s = vec![
            sample(1, NONE, 100.0),
            sample(1, EPLB_FIXED, 100.0),
            sample(1, OURS, 120.0),
            sample(2, NONE, 250.0),
            sample(2, EPLB_FIXED, 200.0),
            sample(2, OURS, 240.0),
        ];
        let rows = summarise(&s);
        let ours = rows.iter().find(|r| r.label == OURS).unwrap();
        assert!((ours.over_eplb_fixed.mean - 1.2).abs() < 1e-12);
        assert!(ours.over_eplb_fixed.sd < 1e-12);
        assert_eq!(ours.over_eplb_fixed.n, 2);
        assert!((ours.min_over_none - 0.96).abs() < 1e-12);
        // No eplb-dispatch sample: no ratio, not a zero.
        assert_eq!(ours.over_eplb_dispatch.n, 0);
        assert!(markdown(&rows).contains("| decode | ours |"));
    }
}
