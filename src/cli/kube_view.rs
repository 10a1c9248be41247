//! What `kubectl moe` prints, as pure functions of the objects it read (MoEDeployments, the plan
//! from the `NAME-plan` ConfigMap, events) and the current time, so the layout is unit-tested on
//! fixed objects. The I/O lives in [`super::kubectl`].

use k8s_openapi::apimachinery::pkg::apis::meta::v1::Condition;

use crate::api::units::parse_duration;
use crate::api::{condition, reason, MoEDeployment, ReplicationPolicy};
use crate::plan::balance::Evaluation;
use crate::plan::ExpertPlan;

use crate::text::{age, human_bytes, span, table};

/// One event about a MoEDeployment, reduced to what is printed.
#[derive(Clone, Debug, PartialEq)]
pub struct EventLine {
    /// Seconds since the epoch of the last occurrence.
    pub at_s: i64,
    /// `Normal` or `Warning`.
    pub kind: String,
    pub reason: String,
    pub note: String,
    pub count: i32,
}

/// Reasons of the operator's events that mark a plan being adopted.
const PLAN_ADOPTED: &str = reason::PLAN_IMPROVED;
const INITIAL_PLAN: &str = reason::INITIAL_PLAN;

fn opt3(x: Option<f64>) -> String {
    x.map(crate::api::balancedness_text)
        .unwrap_or_else(|| "-".into())
}

fn cond<'a>(md: &'a MoEDeployment, kind: &str) -> Option<&'a Condition> {
    md.status
        .as_ref()?
        .conditions
        .iter()
        .find(|c| c.type_ == kind)
}

fn created_s(md: &MoEDeployment) -> Option<i64> {
    md.metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0.as_second())
}

/// `updated/total`, with `(rolling)` while workers are still moving to the target plan.
fn rollout_cell(md: &MoEDeployment) -> String {
    match md.status.as_ref().and_then(|s| s.rollout.as_ref()) {
        None => "-".into(),
        Some(r) if r.updated >= r.total => format!("{}/{}", r.updated, r.total),
        Some(r) => format!("{}/{} (rolling)", r.updated, r.total),
    }
}

/// `kubectl moe status`: one line per MoEDeployment.
pub fn status_table(items: &[MoEDeployment], all_namespaces: bool, now_s: i64) -> String {
    if items.is_empty() {
        return "No MoEDeployments found.\n".into();
    }
    let mut header = vec![
        "NAME",
        "READY",
        "PLAN",
        "ALGO",
        "R",
        "BALANCEDNESS",
        "PREDICTED",
        "WORKERS",
        "ROLLOUT",
        "AGE",
    ];
    if all_namespaces {
        header.insert(0, "NAMESPACE");
    }
    let rows: Vec<Vec<String>> = items
        .iter()
        .map(|md| {
            let st = md.status.clone().unwrap_or_default();
            let ready = match (cond(md, condition::DEGRADED), cond(md, condition::READY)) {
                (Some(d), _) if d.status == "True" => format!("False ({})", d.reason),
                (_, Some(r)) if r.status == "False" && r.reason == reason::SUSPENDED => {
                    format!("False ({})", r.reason)
                }
                (_, Some(r)) => r.status.clone(),
                _ => "-".into(),
            };
            let plan = st.plan.as_ref();
            let mut row = vec![
                md.metadata.name.clone().unwrap_or_default(),
                ready,
                plan.map(|p| p.short_hash.clone())
                    .unwrap_or_else(|| "-".into()),
                plan.map(|p| p.algorithm.clone())
                    .unwrap_or_else(|| "-".into()),
                plan.map(|p| p.replicas_per_gpu.to_string())
                    .unwrap_or_else(|| "-".into()),
                opt3(st.observed.as_ref().and_then(|o| o.balancedness)),
                opt3(plan.and_then(|p| p.predicted_balancedness)),
                st.workers
                    .as_ref()
                    .map(|w| format!("{}/{}", w.ready, w.desired))
                    .unwrap_or_else(|| "-".into()),
                rollout_cell(md),
                age(created_s(md), now_s),
            ];
            if all_namespaces {
                row.insert(0, md.metadata.namespace.clone().unwrap_or_default());
            }
            row
        })
        .collect();
    table(&header, &rows)
}

/// `e0x3 e5x2 ...`: the experts of a layer with more than one replica, most replicated first.
fn replicated_experts(counts: &[usize], limit: usize) -> String {
    let mut hot: Vec<(usize, usize)> = counts
        .iter()
        .enumerate()
        .filter(|(_, &c)| c > 1)
        .map(|(e, &c)| (e, c))
        .collect();
    if hot.is_empty() {
        return "-".into();
    }
    hot.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
    let mut s: Vec<String> = hot
        .iter()
        .take(limit)
        .map(|(e, c)| format!("e{e}x{c}"))
        .collect();
    if hot.len() > limit {
        s.push(format!("+{} more", hot.len() - limit));
    }
    s.join(" ")
}

/// `kubectl moe plan NAME`: the plan in force, per layer and per GPU. `eval` is the plan replayed
/// on a load the user supplied (`--load`), which gives the per-layer balancedness.
pub fn plan_view(
    md: &MoEDeployment,
    plan: &ExpertPlan,
    eval: Option<&Evaluation>,
    now_s: i64,
) -> String {
    let ns = md.metadata.namespace.clone().unwrap_or_default();
    let name = md.metadata.name.clone().unwrap_or_default();
    let st = md.status.clone().unwrap_or_default();
    let m = &plan.model;
    let e = m.experts as usize;
    let d = plan.gpus.max(1) as usize;
    let mut out = String::new();
    let since = st
        .plan
        .as_ref()
        .filter(|p| p.hash == plan.hash)
        .and_then(|p| p.computed_at.as_ref())
        .map(|t| t.0.as_second());
    out.push_str(&format!(
        "Plan {} ({}) of {ns}/{name}, computed {} ago (ConfigMap {name}-plan)\n",
        plan.short_hash(),
        plan.algorithm,
        age(since, now_s)
    ));
    if let Some(p) = st.plan.as_ref().filter(|p| p.hash != plan.hash) {
        out.push_str(&format!(
            "  note: status names plan {}, the ConfigMap holds {}: a new plan is being written\n",
            p.short_hash,
            plan.short_hash()
        ));
    }
    if plan.compute_hash() != plan.hash {
        out.push_str("  warning: the ConfigMap's plan does not match its own hash (edited by hand?); workers refuse it\n");
    }
    out.push_str(&format!(
        "  Model:      {} MoE layers ({}..{}) x {} experts, top-{}, hidden {}, expert intermediate {}, {}\n",
        plan.layers.len(),
        m.first_moe_layer,
        m.layers.saturating_sub(1),
        m.experts,
        m.top_k,
        m.hidden_size,
        m.expert_intermediate_size,
        format!("{:?}", m.dtype).to_lowercase()
    ));
    out.push_str(&format!(
        "  Topology:   {} GPUs on {} nodes\n",
        plan.gpus, plan.nodes
    ));
    out.push_str(&format!(
        "  Replicas:   R = {} extra slots per GPU over all layers; {} per expert; replica memory {} per GPU\n",
        plan.replicas_per_gpu,
        human_bytes(plan.bytes_per_expert),
        human_bytes(plan.replica_bytes_per_gpu)
    ));
    match &plan.stats {
        Some(s) => out.push_str(&format!(
            "  Predicted:  balancedness {:.3} (vLLM form {:.3}) on the window it was planned on: {} batches, {:.0} tokens\n",
            s.balancedness, s.balancedness_vllm, s.window_batches, s.window_tokens
        )),
        None => out.push_str("  Predicted:  - (planned before any load was measured: placement only)\n"),
    }
    if let Some(o) = st.observed.as_ref() {
        out.push_str(&format!(
            "  Observed:   balancedness {} over the last {} batches ({} tokens)\n",
            opt3(o.balancedness),
            o.window_batches,
            o.tokens
        ));
    }
    if let Some(ev) = eval {
        out.push_str(&format!(
            "  Replayed:   balancedness {:.3} on the given load ({} batches)\n",
            ev.balancedness, ev.batches
        ));
    }
    out.push('\n');

    let mut rows = Vec::new();
    let mut gpu_slots = vec![0usize; d];
    for lp in &plan.layers {
        let mut counts = vec![0usize; e];
        for slots in &lp.slots {
            for &x in slots {
                if let Some(c) = counts.get_mut(x as usize) {
                    *c += 1;
                }
            }
        }
        for (g, slots) in lp.slots.iter().enumerate() {
            if let Some(s) = gpu_slots.get_mut(g) {
                *s += slots.len();
            }
        }
        let per_gpu: Vec<usize> = lp.slots.iter().map(Vec::len).collect();
        let (lo, hi) = (
            per_gpu.iter().copied().min().unwrap_or(0),
            per_gpu.iter().copied().max().unwrap_or(0),
        );
        // A replayed load if one was given, else the plan's own prediction on its window.
        let bal = match eval {
            Some(ev) => ev
                .layers
                .iter()
                .find(|l| l.layer == lp.layer)
                .map(|l| l.balancedness),
            None => plan.stats.as_ref().and_then(|s| {
                s.per_layer
                    .iter()
                    .find(|l| l.layer == lp.layer)
                    .map(|l| l.balancedness)
            }),
        }
        .map(|b| format!("{b:.3}"))
        .unwrap_or_else(|| "-".into());
        rows.push(vec![
            lp.layer.to_string(),
            lp.physical_experts().saturating_sub(e).to_string(),
            if lo == hi {
                lo.to_string()
            } else {
                format!("{lo}-{hi}")
            },
            bal,
            replicated_experts(&counts, 6),
        ]);
    }
    out.push_str("Per layer:\n");
    out.push_str(&indent(&table(
        &[
            "LAYER",
            "EXTRA REPLICAS",
            "SLOTS/GPU",
            "BALANCEDNESS",
            "REPLICATED EXPERTS",
        ],
        &rows,
    )));
    let predicted = plan.stats.as_ref().is_some_and(|s| !s.per_layer.is_empty());
    match (eval.is_some(), predicted) {
        (true, _) => out.push_str("  (per-layer balancedness: on the load given with --load)\n"),
        (false, true) => out.push_str("  (per-layer balancedness: predicted on the window the plan was made from; replay another load with --load TRACE, e.g. one from `moectl observe`)\n"),
        (false, false) => out.push_str("  (per-layer balancedness: replay a load on this plan with --load TRACE, e.g. one from `moectl observe`)\n"),
    }
    out.push('\n');

    let even = (plan.layers.len() * e) as f64 / d as f64;
    let gpn = (plan.gpus / plan.nodes.max(1)).max(1) as usize;
    let rows: Vec<Vec<String>> = gpu_slots
        .iter()
        .enumerate()
        .map(|(g, &s)| {
            let extra = s as f64 - even;
            vec![
                g.to_string(),
                (g / gpn).to_string(),
                s.to_string(),
                if extra.fract().abs() < 1e-9 {
                    format!("{extra:+.0}")
                } else {
                    format!("{extra:+.1}")
                },
                human_bytes(s as u64 * plan.bytes_per_expert),
                human_bytes((extra.max(0.0) * plan.bytes_per_expert as f64) as u64),
            ]
        })
        .collect();
    out.push_str("Per GPU:\n");
    out.push_str(&indent(&table(
        &[
            "GPU",
            "NODE",
            "SLOTS",
            "VS EVEN",
            "EXPERT MEMORY",
            "ABOVE EVEN",
        ],
        &rows,
    )));
    out
}

fn indent(s: &str) -> String {
    s.lines().map(|l| format!("  {l}\n")).collect()
}

/// Why the last re-plan was or was not rolled out, from the spec, status and events. The operator
/// records adopted plans as events; a candidate it kept is only in its debug log, so for that case
/// this states the threshold the candidate had to reach.
pub fn replan_reasons(md: &MoEDeployment, events: &[EventLine], now_s: i64) -> Vec<String> {
    let spec = &md.spec;
    let st = md.status.clone().unwrap_or_default();
    let mut out = Vec::new();
    if spec.replication.policy == ReplicationPolicy::None {
        out.push("replication.policy is None: the contiguous plan is never re-planned.".into());
        return out;
    }
    if let Some(d) = cond(md, condition::DEGRADED).filter(|c| c.status == "True") {
        out.push(format!(
            "the spec is invalid ({}): nothing is planned or rolled out until it is fixed: {}",
            d.reason, d.message
        ));
        return out;
    }
    let mut sorted: Vec<&EventLine> = events.iter().collect();
    sorted.sort_by_key(|e| e.at_s);
    let last_adopted = sorted
        .iter()
        .rev()
        .find(|e| e.reason == PLAN_ADOPTED || e.reason == INITIAL_PLAN);
    match last_adopted {
        Some(e) if e.reason == PLAN_ADOPTED => out.push(format!(
            "last re-plan rolled out {} ago: {}",
            age(Some(e.at_s), now_s),
            e.note
        )),
        Some(e) => out.push(format!(
            "only the initial plan so far ({} ago): {}",
            age(Some(e.at_s), now_s),
            e.note
        )),
        None => out.push("no plan events found (events expire after an hour by default)".into()),
    }
    if let Some(m) = cond(md, condition::METRICS_AVAILABLE).filter(|c| c.status != "True") {
        out.push(format!(
            "load is not being measured ({}): {}; the plan in force stays until it is",
            m.reason, m.message
        ));
    }
    let interval = spec.metrics.interval.clone();
    let observed = st.observed.as_ref().filter(|o| o.tokens > 0);
    let Some(o) = observed else {
        out.push(format!(
            "no load measured yet: a re-plan needs traffic over at least one metrics interval ({interval}) after the first scrape"
        ));
        return out;
    };
    let min = spec.replication.min_improvement;
    if let Some(b) = o.balancedness {
        let need = b + min;
        if need > 1.0 + 1e-12 {
            out.push(format!(
                "the plan in force scores {b:.3} on the last window; with minImprovement {min} a candidate would need {need:.3}, above the maximum 1.0, so no re-plan can roll out"
            ));
        } else {
            out.push(format!(
                "every {interval} the operator plans on the last window; a candidate rolls out only if its predicted balancedness reaches {need:.3} (the plan in force scores {b:.3}, minImprovement {min}); kept candidates are in the operator's debug log"
            ));
        }
    }
    let computed = st
        .plan
        .as_ref()
        .and_then(|p| p.computed_at.as_ref())
        .map(|t| t.0.as_second());
    if let (Some(at), Ok(cd)) = (computed, parse_duration(&spec.replication.cooldown)) {
        let left = at as f64 + cd.as_secs_f64() - now_s as f64;
        if left > 0.0 {
            out.push(format!(
                "cooling down: no new plan rolls out for another {} (cooldown {} since the plan in force was adopted)",
                span(left),
                spec.replication.cooldown
            ));
        } else {
            out.push(format!(
                "cooldown {} has passed since the plan in force was adopted {} ago",
                spec.replication.cooldown,
                age(Some(at), now_s)
            ));
        }
    }
    out
}

/// `kubectl moe explain NAME`: conditions, plan, rollout, why (not) re-planned, recent events.
pub fn explain_view(md: &MoEDeployment, events: &[EventLine], now_s: i64) -> String {
    let ns = md.metadata.namespace.clone().unwrap_or_default();
    let name = md.metadata.name.clone().unwrap_or_default();
    let st = md.status.clone().unwrap_or_default();
    let mut out = format!(
        "MoEDeployment {ns}/{name}: generation {}, observed {}, age {}\n",
        md.metadata
            .generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        st.observed_generation
            .map(|g| g.to_string())
            .unwrap_or_else(|| "-".into()),
        age(created_s(md), now_s)
    );
    if st.observed_generation.is_some() && st.observed_generation < md.metadata.generation {
        out.push_str("  the operator has not yet acted on the latest spec change\n");
    }
    out.push_str("\nConditions:\n");
    if st.conditions.is_empty() {
        out.push_str("  none yet: is the operator running and watching this namespace?\n");
    } else {
        let rows: Vec<Vec<String>> = st
            .conditions
            .iter()
            .map(|c| {
                vec![
                    c.type_.clone(),
                    c.status.clone(),
                    c.reason.clone(),
                    age(Some(c.last_transition_time.0.as_second()), now_s),
                    c.message.clone(),
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &["TYPE", "STATUS", "REASON", "SINCE", "MESSAGE"],
            &rows,
        )));
    }
    out.push('\n');
    match st.plan.as_ref() {
        Some(p) => out.push_str(&format!(
            "Plan:      {} ({}), R={} ({} replica memory per GPU), predicted balancedness {}{}, adopted {} ago\n",
            p.short_hash,
            p.algorithm,
            p.replicas_per_gpu,
            human_bytes(p.replica_bytes_per_gpu.max(0) as u64),
            opt3(p.predicted_balancedness),
            p.previous_balancedness
                .map(|b| format!(" (the plan it replaced: {b:.3} on the same window)"))
                .unwrap_or_default(),
            age(p.computed_at.as_ref().map(|t| t.0.as_second()), now_s)
        )),
        None => out.push_str("Plan:      none yet\n"),
    }
    match st.observed.as_ref() {
        Some(o) => out.push_str(&format!(
            "Observed:  balancedness {} of the plan in force over the last {} batches ({} tokens)\n",
            opt3(o.balancedness),
            o.window_batches,
            o.tokens
        )),
        None => out.push_str("Observed:  no load measured yet\n"),
    }
    match st.workers.as_ref() {
        Some(w) => out.push_str(&format!(
            "Workers:   {}/{} ready, {} on the current plan\n",
            w.ready, w.desired, w.on_current_plan
        )),
        None => out.push_str("Workers:   -\n"),
    }
    match st.rollout.as_ref() {
        Some(r) => out.push_str(&format!(
            "Rollout:   {}/{} workers on {} ({}), strategy {:?}, maxUnavailable {}\n",
            r.updated,
            r.total,
            &r.target_hash[..r.target_hash.len().min(12)],
            if r.updated >= r.total {
                "complete"
            } else {
                "in progress"
            },
            md.spec.rollout.strategy,
            md.spec.rollout.max_unavailable
        )),
        None => out.push_str("Rollout:   -\n"),
    }
    out.push_str("\nRe-plan:\n");
    for r in replan_reasons(md, events, now_s) {
        out.push_str(&format!("  - {r}\n"));
    }
    out.push_str("\nEvents (newest last):\n");
    if events.is_empty() {
        out.push_str("  none\n");
    } else {
        let mut sorted: Vec<&EventLine> = events.iter().collect();
        sorted.sort_by_key(|e| e.at_s);
        let skip = sorted.len().saturating_sub(10);
        let rows: Vec<Vec<String>> = sorted[skip..]
            .iter()
            .map(|e| {
                vec![
                    age(Some(e.at_s), now_s),
                    e.kind.clone(),
                    e.reason.clone(),
                    if e.count > 1 {
                        format!("(x{}) {}", e.count, e.note)
                    } else {
                        e.note.clone()
                    },
                ]
            })
            .collect();
        out.push_str(&indent(&table(
            &["AGE", "TYPE", "REASON", "MESSAGE"],
            &rows,
        )));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{ObservedLoad, PlanStatus, RolloutStatus, WorkersStatus};
    use crate::plan::{Algorithm, LayerPlan, ModelShape};
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
    use k8s_openapi::jiff::Timestamp;

    const NOW: i64 = 1_800_000_000;

    fn t(s: i64) -> Time {
        Time(Timestamp::from_second(s).unwrap())
    }

    fn c(kind: &str, status: &str, reason: &str, msg: &str, at: i64) -> Condition {
        Condition {
            type_: kind.into(),
            status: status.into(),
            reason: reason.into(),
            message: msg.into(),
            last_transition_time: t(at),
            observed_generation: Some(2),
        }
    }

    fn md(name: &str) -> MoEDeployment {
        let mut md: MoEDeployment = serde_json::from_value(serde_json::json!({
            "apiVersion": "moe.craft.dev/v1alpha1",
            "kind": "MoEDeployment",
            "metadata": {"name": name, "namespace": "ml", "generation": 2},
            "spec": {
                "model": {"layers": 2, "experts": 4, "topK": 2, "hiddenSize": 64,
                          "expertIntermediateSize": 32, "checkpoint": {"path": "/m"}},
                "topology": {"nodes": 1, "gpusPerNode": 2},
                "replication": {"policy": "Craft", "budget": {"replicasPerGpu": 1},
                                "minImprovement": 0.02, "cooldown": "5m"},
                "metrics": {"source": "Workers", "interval": "30s"},
                "worker": {"image": "w"}
            }
        }))
        .unwrap();
        md.metadata.creation_timestamp = Some(t(NOW - 3 * 3600));
        md.status = Some(crate::api::MoEDeploymentStatus {
            observed_generation: Some(2),
            conditions: vec![
                c(
                    "Ready",
                    "True",
                    "WorkersReady",
                    "1/1 workers ready on plan 0123456789ab",
                    NOW - 90,
                ),
                c(
                    "MetricsAvailable",
                    "True",
                    "Scraped",
                    "1 worker(s) answered",
                    NOW - 600,
                ),
            ],
            plan: Some(PlanStatus {
                hash: "0123456789abcdef".into(),
                short_hash: "0123456789ab".into(),
                algorithm: "craft".into(),
                replicas_per_gpu: 1,
                replica_bytes_per_gpu: 12288,
                predicted_balancedness: Some(0.95),
                previous_balancedness: Some(0.6),
                computed_at: Some(t(NOW - 120)),
            }),
            observed: Some(ObservedLoad::new(Some(0.9), 5120, 10)),
            workers: Some(WorkersStatus {
                desired: 1,
                ready: 1,
                on_current_plan: 1,
                summary: "1/1".into(),
            }),
            rollout: Some(RolloutStatus {
                target_hash: "0123456789abcdef".into(),
                updated: 1,
                total: 1,
            }),
            rank_failure: None,
            gang: None,
            ..Default::default()
        });
        md
    }

    fn plan() -> ExpertPlan {
        ExpertPlan {
            format_version: 1,
            algorithm: Algorithm::Craft,
            model: ModelShape {
                layers: 2,
                first_moe_layer: 0,
                experts: 4,
                top_k: 2,
                hidden_size: 64,
                expert_intermediate_size: 32,
                dtype: crate::plan::Dtype::Bf16,
            },
            gpus: 2,
            nodes: 1,
            replicas_per_gpu: 1,
            bytes_per_expert: 12288,
            replica_bytes_per_gpu: 12288,
            layers: vec![
                LayerPlan {
                    layer: 0,
                    slots: vec![vec![0, 1, 0], vec![2, 3, 0]],
                    shares: vec![vec![0.4, 1.0, 0.3], vec![1.0, 1.0, 0.3]],
                },
                LayerPlan {
                    layer: 1,
                    slots: vec![vec![0, 1], vec![2, 3]],
                    shares: vec![vec![1.0, 1.0], vec![1.0, 1.0]],
                },
            ],
            stats: None,
            transition: None,
            hash: String::new(),
        }
        .seal()
    }

    #[test]
    fn ages_and_spans() {
        assert_eq!(age(Some(NOW - 5), NOW), "5s");
        assert_eq!(age(Some(NOW - 600), NOW), "10m");
        assert_eq!(age(Some(NOW - 3 * 3600), NOW), "3h");
        assert_eq!(age(Some(NOW - 3 * 86400), NOW), "3d");
        assert_eq!(age(None, NOW), "-");
        assert_eq!(age(Some(NOW + 3600), NOW), "-");
        assert_eq!(span(90.0), "1m30s");
        assert_eq!(span(3700.0), "1h1m");
        assert_eq!(span(45.4), "45s");
    }

    #[test]
    fn status_lines_up_columns() {
        let mut rolling = md("b-rolling");
        let st = rolling.status.as_mut().unwrap();
        st.rollout = Some(RolloutStatus {
            target_hash: "ff".into(),
            updated: 0,
            total: 1,
        });
        st.conditions = vec![c("Degraded", "True", "InvalidSpec", "x", NOW)];
        let mut fresh = md("c-fresh");
        fresh.status = None;
        let s = status_table(&[md("a"), rolling, fresh], true, NOW);
        let lines: Vec<&str> = s.lines().collect();
        assert_eq!(lines.len(), 4, "{s}");
        assert_eq!(
            lines[0],
            "NAMESPACE   NAME        READY                 PLAN           ALGO    R   BALANCEDNESS   PREDICTED   WORKERS   ROLLOUT         AGE"
        );
        assert_eq!(
            lines[1],
            "ml          a           True                  0123456789ab   craft   1   0.900          0.950       1/1       1/1             3h"
        );
        assert!(
            lines[2].contains("False (InvalidSpec)") && lines[2].contains("0/1 (rolling)"),
            "{s}"
        );
        assert!(
            lines[3].starts_with("ml          c-fresh     -                     -"),
            "{s}"
        );
        // A suspended deployment says so.
        let mut sus = md("s");
        sus.status.as_mut().unwrap().conditions =
            vec![c("Ready", "False", "Suspended", "spec.suspend", NOW)];
        assert!(status_table(&[sus], false, NOW).contains("False (Suspended)"));
        // Without -A there is no namespace column.
        assert!(status_table(&[md("a")], false, NOW).starts_with("NAME   READY"));
        assert_eq!(status_table(&[], false, NOW), "No MoEDeployments found.\n");
    }

    #[test]
    fn plan_view_shows_layers_gpus_and_memory() {
        let p = plan();
        let mut m = md("tiny");
        m.status.as_mut().unwrap().plan.as_mut().unwrap().hash = p.hash.clone();
        let s = plan_view(&m, &p, None, NOW);
        assert!(
            s.starts_with(&format!(
                "Plan {} (craft) of ml/tiny, computed 2m ago",
                p.short_hash()
            )),
            "{s}"
        );
        assert!(s.contains("R = 1 extra slots per GPU over all layers; 12.00 KiB per expert; replica memory 12.00 KiB per GPU"), "{s}");
        assert!(s.contains("Predicted:  - (planned before any load"), "{s}");
        // Layer 0: two extra replicas of expert 0 (3 copies), 3 slots on each GPU.
        assert!(
            s.contains("  0       2                3           -              e0x3\n"),
            "{s}"
        );
        assert!(
            s.contains("  1       0                2           -              -\n"),
            "{s}"
        );
        assert!(s.contains("--load TRACE"), "{s}");
        // Per GPU: 5 slots against an even 4, 60 KiB of experts, 12 KiB above even.
        assert!(
            s.contains("  0     0      5       +1        60.00 KiB       12.00 KiB\n"),
            "{s}"
        );
        assert!(!s.contains("warning"), "{s}");
        // A plan that does not match its hash is flagged; a status naming another plan is noted.
        let mut bad = p.clone();
        bad.replicas_per_gpu = 7;
        let s = plan_view(&md("tiny"), &bad, None, NOW);
        assert!(s.contains("does not match its own hash"), "{s}");
        assert!(s.contains("a new plan is being written"), "{s}");
    }

    #[test]
    fn plan_view_replays_a_load_per_layer() {
        let p = plan();
        let w = crate::plan::LoadWindow::new(
            vec![0, 1],
            4,
            vec![100.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0, 10.0],
        )
        .unwrap();
        let ev = crate::plan::balance::evaluate(&p, &w).unwrap();
        let s = plan_view(&md("tiny"), &p, Some(&ev), NOW);
        let l1 = ev
            .layers
            .iter()
            .find(|l| l.layer == 1)
            .unwrap()
            .balancedness;
        assert!((l1 - 1.0).abs() < 1e-9, "layer 1 is even: {l1}");
        assert!(
            s.contains("  1       0                2           1.000          -\n"),
            "{s}"
        );
        assert!(
            s.contains(&format!("Replayed:   balancedness {:.3}", ev.balancedness)),
            "{s}"
        );
        assert!(!s.contains("--load TRACE"), "{s}");
    }

    #[test]
    fn plan_view_shows_the_predicted_per_layer_balancedness_without_a_load() {
        let mut p = plan();
        p.stats = Some(crate::plan::expert_plan::PlanStats {
            balancedness: 0.8,
            balancedness_vllm: 0.85,
            window_batches: 4,
            window_tokens: 800.0,
            per_layer: vec![crate::plan::expert_plan::LayerBalance {
                layer: 0,
                balancedness: 0.75,
            }],
        });
        let p = p.seal();
        let s = plan_view(&md("tiny"), &p, None, NOW);
        assert!(s.contains("Predicted:  balancedness 0.800"), "{s}");
        assert!(
            s.contains("  0       2                3           0.750          e0x3\n"),
            "{s}"
        );
        // A layer the window did not cover shows no figure.
        assert!(
            s.contains("  1       0                2           -              -\n"),
            "{s}"
        );
        assert!(
            s.contains("predicted on the window the plan was made from"),
            "{s}"
        );
    }

    fn ev(at: i64, kind: &str, reason: &str, note: &str) -> EventLine {
        EventLine {
            at_s: at,
            kind: kind.into(),
            reason: reason.into(),
            note: note.into(),
            count: 1,
        }
    }

    #[test]
    fn explain_says_why_a_replan_did_or_did_not_roll_out() {
        let events = vec![
            ev(
                NOW - 120,
                "Normal",
                "PlanImproved",
                "plan 0123456789ab (craft, R=1): predicted balancedness 0.950 over 0.600",
            ),
            ev(
                NOW - 3000,
                "Normal",
                "InitialPlan",
                "plan aaaa (placement) before any load is measured",
            ),
            ev(NOW - 100, "Normal", "PlanPushed", "pushed to tiny-worker-0"),
        ];
        let m = md("tiny");
        let r = replan_reasons(&m, &events, NOW);
        assert!(
            r[0].starts_with("last re-plan rolled out 2m ago: plan 0123456789ab"),
            "{r:?}"
        );
        assert!(
            r.iter().any(|x| x
                .contains("reaches 0.920 (the plan in force scores 0.900, minImprovement 0.02)")),
            "{r:?}"
        );
        assert!(r.iter().any(|x| x == "cooling down: no new plan rolls out for another 3m (cooldown 5m since the plan in force was adopted)"), "{r:?}");

        let s = explain_view(&m, &events, NOW);
        assert!(
            s.starts_with("MoEDeployment ml/tiny: generation 2, observed 2, age 3h\n"),
            "{s}"
        );
        assert!(s.contains("  Ready              True     WorkersReady   90s     1/1 workers ready on plan 0123456789ab\n"), "{s}");
        assert!(s.contains("predicted balancedness 0.950 (the plan it replaced: 0.600 on the same window), adopted 2m ago"), "{s}");
        assert!(s.contains("Rollout:   1/1 workers on 0123456789ab (complete), strategy InPlace, maxUnavailable 1"), "{s}");
        // Events oldest first.
        let i = s.find("InitialPlan").unwrap();
        let j = s.find("PlanPushed").unwrap();
        assert!(i < j, "{s}");

        // Near-perfect balance: no candidate can clear minImprovement.
        let mut m2 = md("tiny");
        m2.status
            .as_mut()
            .unwrap()
            .observed
            .as_mut()
            .unwrap()
            .balancedness = Some(0.99);
        m2.status
            .as_mut()
            .unwrap()
            .plan
            .as_mut()
            .unwrap()
            .computed_at = Some(t(NOW - 3600));
        let r = replan_reasons(&m2, &events[1..], NOW);
        assert!(r[0].starts_with("only the initial plan so far"), "{r:?}");
        assert!(
            r.iter().any(|x| x.contains("above the maximum 1.0")),
            "{r:?}"
        );
        assert!(
            r.iter().any(|x| x.contains("cooldown 5m has passed")),
            "{r:?}"
        );

        // No load, metrics down.
        let mut m3 = md("tiny");
        let st = m3.status.as_mut().unwrap();
        st.observed = None;
        st.conditions.push(c(
            "MetricsAvailable",
            "False",
            "Unreachable",
            "connect refused",
            NOW,
        ));
        st.conditions.remove(1);
        let r = replan_reasons(&m3, &[], NOW);
        assert!(
            r.iter()
                .any(|x| x.starts_with("load is not being measured (Unreachable)")),
            "{r:?}"
        );
        assert!(
            r.last().unwrap().starts_with("no load measured yet"),
            "{r:?}"
        );

        // Invalid spec and policy None stop early.
        let mut m4 = md("tiny");
        m4.status.as_mut().unwrap().conditions = vec![c(
            "Degraded",
            "True",
            "InvalidSpec",
            "spec.metrics.interval: too short",
            NOW,
        )];
        assert_eq!(replan_reasons(&m4, &events, NOW).len(), 1);
        let mut m5 = md("tiny");
        m5.spec.replication.policy = ReplicationPolicy::None;
        assert!(replan_reasons(&m5, &events, NOW)[0].contains("never re-planned"));
    }
}
