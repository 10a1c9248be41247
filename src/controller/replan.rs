//! When a newly computed plan is worth rolling out: it must beat the plan in force by at least
//! `minImprovement` in predicted balancedness on the same window, and the cooldown since the last
//! rollout must have passed. Pure; times are seconds on any monotonic or wall clock.

use crate::api::reason;

/// Why a candidate plan is or is not rolled out (also the Event's reason).
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    /// No plan in force yet (or it does not fit the spec any more): roll out.
    Initial,
    /// Roll out: the gain reaches the threshold and the cooldown has passed.
    RollOut { gain: f64 },
    /// Keep the current plan: the gain is below `minImprovement`.
    GainTooSmall { gain: f64 },
    /// Keep the current plan until `remaining_s` more seconds have passed.
    CoolingDown { gain: f64, remaining_s: f64 },
    /// The candidate is the plan in force.
    Unchanged,
}

impl Decision {
    pub fn rolls_out(&self) -> bool {
        matches!(self, Decision::Initial | Decision::RollOut { .. })
    }

    /// What the operator made of the candidate, for its metric.
    pub fn verdict(&self) -> Verdict {
        let outcome = if self.rolls_out() {
            Outcome::Applied
        } else {
            Outcome::Kept
        };
        Verdict {
            outcome,
            reason: self.reason(),
        }
    }

    /// CamelCase reason for Events and conditions.
    pub fn reason(&self) -> &'static str {
        match self {
            Decision::Initial => reason::INITIAL_PLAN,
            Decision::RollOut { .. } => reason::PLAN_IMPROVED,
            Decision::GainTooSmall { .. } => reason::GAIN_BELOW_MIN_IMPROVEMENT,
            Decision::CoolingDown { .. } => reason::COOLING_DOWN,
            Decision::Unchanged => reason::PLAN_UNCHANGED,
        }
    }
}

/// What became of a plan decision: `moe_operator_replan_decisions_total{outcome, reason}`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The plan became the plan in force (stored, then rolled out).
    Applied,
    /// The plan in force stays: the candidate is no better, or the cooldown runs.
    Kept,
    /// No plan could be made or stored (the planner failed, the plan is too large to store);
    /// the plan in force stays.
    Rejected,
}

impl Outcome {
    /// The metric's `outcome` label.
    pub fn label(self) -> &'static str {
        match self {
            Outcome::Applied => "applied",
            Outcome::Kept => "kept",
            Outcome::Rejected => "rejected",
        }
    }
}

/// An outcome and its reason (the CamelCase reason of the Event, from a fixed set, so the
/// metric's labels stay bounded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Verdict {
    pub outcome: Outcome,
    pub reason: &'static str,
}

impl Verdict {
    pub fn rejected(reason: &'static str) -> Self {
        Verdict {
            outcome: Outcome::Rejected,
            reason,
        }
    }
}

/// The plan in force, as far as the decision needs it.
#[derive(Clone, Debug, PartialEq)]
pub struct Current<'a> {
    pub hash: &'a str,
    /// Its predicted balancedness replayed on the candidate's window.
    pub balancedness: f64,
    /// When it was rolled out.
    pub rolled_out_at_s: f64,
}

/// Decide on a candidate with hash `hash` and predicted balancedness `candidate`.
pub fn decide(
    current: Option<&Current<'_>>,
    hash: &str,
    candidate: f64,
    min_improvement: f64,
    cooldown_s: f64,
    now_s: f64,
) -> Decision {
    let Some(cur) = current else {
        return Decision::Initial;
    };
    if cur.hash == hash {
        return Decision::Unchanged;
    }
    let gain = candidate - cur.balancedness;
    // A tiny epsilon so that a gain of exactly minImprovement (after float noise) counts.
    if gain + 1e-12 < min_improvement || gain <= 0.0 {
        return Decision::GainTooSmall { gain };
    }
    let since = now_s - cur.rolled_out_at_s;
    if since < cooldown_s {
        return Decision::CoolingDown {
            gain,
            remaining_s: cooldown_s - since,
        };
    }
    Decision::RollOut { gain }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn table() {
        let cur = Current {
            hash: "h0",
            balancedness: 0.80,
            rolled_out_at_s: 1000.0,
        };
        let cases: Vec<(Option<&Current>, &str, f64, f64, Decision)> = vec![
            (None, "h1", 0.5, 2000.0, Decision::Initial),
            (Some(&cur), "h0", 0.95, 2000.0, Decision::Unchanged),
            (
                Some(&cur),
                "h1",
                0.81,
                2000.0,
                Decision::GainTooSmall { gain: 0.81 - 0.80 },
            ),
            (
                Some(&cur),
                "h1",
                0.75,
                2000.0,
                Decision::GainTooSmall { gain: 0.75 - 0.80 },
            ),
            (
                Some(&cur),
                "h1",
                0.90,
                1100.0,
                Decision::CoolingDown {
                    gain: 0.90 - 0.80,
                    remaining_s: 200.0,
                },
            ),
            (
                Some(&cur),
                "h1",
                0.82,
                1300.0,
                Decision::RollOut { gain: 0.82 - 0.80 },
            ),
        ];
        for (current, hash, cand, now, want) in cases {
            let got = decide(current, hash, cand, 0.02, 300.0, now);
            assert_eq!(got, want, "candidate {cand} at {now}");
        }
        assert!(Decision::Initial.rolls_out() && !Decision::Unchanged.rolls_out());
        let v = Decision::CoolingDown {
            gain: 0.1,
            remaining_s: 1.0,
        }
        .verdict();
        assert_eq!((v.outcome.label(), v.reason), ("kept", "CoolingDown"));
        let v = Decision::RollOut { gain: 0.1 }.verdict();
        assert_eq!((v.outcome.label(), v.reason), ("applied", "PlanImproved"));
    }

    #[test]
    fn zero_threshold_still_needs_a_gain() {
        let cur = Current {
            hash: "h0",
            balancedness: 0.9,
            rolled_out_at_s: 0.0,
        };
        assert!(!decide(Some(&cur), "h1", 0.9, 0.0, 0.0, 10.0).rolls_out());
        assert!(decide(Some(&cur), "h1", 0.91, 0.0, 0.0, 10.0).rolls_out());
    }
}
