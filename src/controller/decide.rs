//! The reconcile's decision: from what was fetched and observed, the plan in force, the objects
//! to apply, the rollout's next step, the Events to record and the status. Pure (no I/O, no
//! clock, no randomness: the time and the minted token come in), so every decision the operator
//! makes is tested here without a cluster.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, ConfigMapKeySelector};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use kube::ResourceExt;

use super::build::{self, Desired, ANNOTATION_SPEC_HASH, LABEL_GROUP};
use super::fetch::Fetched;
use super::gang::{self, Guard, Placement};
use super::groups::{next_groups, GroupsGoal, GroupsStep, Role};
use super::initial_load::initial_load_window;
use super::observe::Observed;
use super::ranks::{self, RankFailure};
use super::reconcile::Error;
use super::replan::{self, Current, Verdict};
use super::rollout::{RolloutGoal, Step, WorkerState};
use super::status::{groups_status, plan_status, set_condition, workers_status};
use super::weights;
use crate::api::pod_policy::{check_pod, PodPolicy};
use crate::api::validate::{FieldError, LoadSource, ValidSpec};
use crate::api::{
    condition, reason, Gang, GangStatus, MoEDeployment, MoEDeploymentStatus, ObservedLoad,
    ReplicationPolicy, RolloutStatus, WorkersStatus,
};
use crate::plan::balance::evaluate;
use crate::plan::planner::{make_plan, moe_layer_ids};
use crate::plan::step_cost::step_time;
use crate::plan::{Algorithm, ExpertPlan, LoadWindow};

/// How long a worker may refuse pushes for holding another admin token before it is replaced:
/// the kubelet brings a re-created Secret to the mounted file within about a minute (its sync
/// period plus cache), and the worker re-reads the file when it changes.
pub const PUSH_REFUSAL_GRACE: Duration = Duration::from_secs(120);
/// Requeue while a rollout or start-up is in progress.
pub const BUSY_REQUEUE: Duration = Duration::from_secs(2);
/// When to look again at a deployment held back by its spec or its plan's size (the spec is
/// watched, so a fix is seen at once; this only bounds the wait on anything else).
pub const HELD_RETRY: Duration = Duration::from_secs(300);
/// When to look again at a missing initial load: its ConfigMap is not watched.
pub const INITIAL_LOAD_RETRY: Duration = Duration::from_secs(30);

/// An Event to record about the deployment.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Note {
    pub warning: bool,
    pub reason: &'static str,
    pub message: String,
}

impl Note {
    fn normal(reason: &'static str, message: String) -> Self {
        Note {
            warning: false,
            reason,
            message,
        }
    }
    fn warning(reason: &'static str, message: String) -> Self {
        Note {
            warning: true,
            reason,
            message,
        }
    }
}

/// Why a step deletes pods, for the Events that say so.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeleteCause {
    /// Replacing outdated pods (a Recreate rollout, an expired push, extra ranks).
    Replace,
    /// `spec.suspend`: every worker goes, none comes back until it is false again.
    Suspend,
    /// The gang guard releases a group it could not schedule whole.
    GangRelease,
}

/// The rollout to carry out: the objects to apply, then each group's deletes, creates and pushes.
#[derive(Clone, Debug, PartialEq)]
pub struct Rollout {
    pub desired: Desired,
    pub plan: ExpertPlan,
    /// The step of every group that has pods or should (`groups::next_groups`).
    pub steps: GroupsStep,
    /// Worker pods of the serving groups (`replicas x nodes`), for the rollout gauge.
    pub desired_workers: u32,
    /// Worker pods made before groups existed, to be labelled group 0 (so that group 0's
    /// Service selects them); the label is not part of the pod spec, so they stay.
    pub relabel: Vec<String>,
    pub cause: DeleteCause,
    /// The rank failure the step restarts a worker group for (its deletes are every pod of the
    /// group of the failed rank).
    pub group_restart: Option<RankFailure>,
    /// The admin token the pushes carry, and the port they go to.
    pub token: String,
    pub admin_port: u16,
}

#[cfg(test)]
impl Rollout {
    /// Group 0's step (a default one, done when the whole rollout is, when group 0 has none).
    pub(crate) fn step0(&self) -> Step {
        self.steps
            .group(0)
            .map(|s| s.step.clone())
            .unwrap_or_else(|| Step {
                done: self.steps.done,
                ..Default::default()
            })
    }
}

/// What one reconcile does.
#[derive(Clone, Debug, PartialEq)]
pub struct Decision {
    /// Events, in order, before anything is applied.
    pub events: Vec<Note>,
    /// Nothing to apply when the deployment is held back.
    pub rollout: Option<Rollout>,
    /// The status to write, when it changed.
    pub status: Option<MoEDeploymentStatus>,
    /// The plan's predicted balancedness, for the operator's gauge.
    pub balancedness: Option<f64>,
    /// The plan decisions made this time (a first plan, a re-plan), for the operator's counter.
    pub replans: Vec<Verdict>,
    pub requeue: Duration,
}

/// What `decide` reads.
pub struct Inputs<'a> {
    pub md: &'a MoEDeployment,
    pub spec: &'a ValidSpec,
    pub fetched: &'a Fetched,
    pub observed: &'a Observed,
    pub pod_policy: &'a PodPolicy,
    /// How long an in-place push may stay in flight before its pod is replaced.
    pub push_timeout: Duration,
    /// Now, for conditions, and the same instant in seconds since the Unix epoch.
    pub now: &'a Time,
    pub now_s: f64,
}

/// Why a deployment is held back: nothing is applied or rolled.
struct Held {
    /// The Degraded and Ready conditions' reason and the Warning Event's.
    reason: &'static str,
    message: String,
    retry: Duration,
}

/// Hold the deployment back: Degraded=True and Ready=False with the reason and message, and a
/// Warning Event when that changes the status. `plan` is the plan chosen before the hold, if any
/// (the gauge reports its balancedness).
fn hold(
    md: &MoEDeployment,
    old: &MoEDeploymentStatus,
    mut status: MoEDeploymentStatus,
    mut events: Vec<Note>,
    held: Held,
    plan: Option<&ExpertPlan>,
    now: &Time,
) -> Decision {
    let gen = md.metadata.generation;
    for kind in [condition::DEGRADED, condition::READY] {
        let degraded = kind == condition::DEGRADED;
        set_condition(
            &mut status.conditions,
            kind,
            degraded,
            held.reason,
            &held.message,
            gen,
            now,
        );
    }
    status.observed_generation = gen;
    let changed = status != *old;
    if changed {
        events.push(Note::warning(held.reason, held.message));
    }
    Decision {
        events,
        rollout: None,
        status: changed.then_some(status),
        balancedness: plan.and_then(gauge),
        replans: Vec::new(),
        requeue: held.retry,
    }
}

/// A spec that failed validation: reported, never acted on, never Ready.
pub fn invalid(
    md: &MoEDeployment,
    status: &MoEDeploymentStatus,
    errors: &[FieldError],
    now: &Time,
) -> Decision {
    let message = errors
        .iter()
        .map(|e| e.to_string())
        .collect::<Vec<_>>()
        .join("; ");
    let held = Held {
        reason: reason::INVALID_SPEC,
        message,
        retry: HELD_RETRY,
    };
    hold(md, status, status.clone(), Vec::new(), held, None, now)
}

/// Degraded reasons of a load source the spec configures wrongly ([`super::observe::MetricsFailure::degrades`]).
const SOURCE_DEGRADED_REASONS: [&str; 3] = [
    reason::PROMETHEUS_CREDENTIALS_INVALID,
    reason::PROMETHEUS_AUTH_REFUSED,
    reason::PROMETHEUS_TLS_FAILED,
];

/// Decide one reconcile of a deployment with a valid spec.
pub fn decide(inp: &Inputs<'_>) -> Result<Decision, Error> {
    let (md, spec, fetched) = (inp.md, inp.spec, inp.fetched);
    let gen = md.metadata.generation;
    let old = &fetched.status;
    let mut status = old.clone();
    let mut events = Vec::new();

    let current = fetched
        .stored_plan
        .clone()
        .filter(|p| build::check_plan(spec, p).is_ok());
    // No plan yet and an initial load in the spec: the first plan comes from it. A trace that
    // cannot be read holds the deployment back rather than silently planning without it.
    let initial_window = match (&current, &md.spec.initial_load) {
        (None, Some(sel)) => match initial_window(md, spec, sel, fetched) {
            Ok(w) => w,
            Err(message) => {
                let held = Held {
                    reason: reason::INITIAL_LOAD_UNAVAILABLE,
                    message,
                    retry: INITIAL_LOAD_RETRY,
                };
                return Ok(hold(md, old, status, events, held, None, inp.now));
            }
        },
        _ => None,
    };
    if fetched.minted && !fetched.pods.is_empty() {
        // Never rotate silently: running workers hold the old token until they re-read the
        // Secret's file; a worker that refuses a push with it is replaced (PlanPushRefused).
        events.push(Note::warning(
            reason::ADMIN_TOKEN_ROTATED,
            format!(
                "Secret {} was missing: minted a new admin token; workers re-read it from their \
                 mounted Secret, and those that refuse a plan push with it are replaced",
                build::admin_secret_name(md)
            ),
        ));
    }
    metrics_condition(inp, &mut status);

    let (plan, mut replans) = choose_plan(inp, current, initial_window, &mut status, &mut events)?;
    set_condition(
        &mut status.conditions,
        condition::PLAN_READY,
        true,
        reason::PLANNED,
        &format!("plan {} ({})", plan.short_hash(), plan.algorithm),
        gen,
        inp.now,
    );

    // The objects, as they should be. A plan that cannot be stored (too large for its
    // ConfigMap) holds the deployment back with the limit named; the pods keep the plan they have.
    let desired = match build::build(md, spec, &plan, &fetched.token) {
        Ok(d) => d,
        Err(e @ (build::BuildError::PlanTooLarge(_) | build::BuildError::EngineLayout(_))) => {
            let held = Held {
                reason: reason::PLAN_TOO_LARGE,
                message: e.to_string(),
                retry: HELD_RETRY,
            };
            // The plan just chosen cannot be stored: it does not come into force. Its verdict
            // becomes a rejection, its announcement is withdrawn, and the status keeps the plan
            // in force (none before the first).
            let stored = fetched.stored_plan.as_ref();
            if stored.is_none_or(|p| p.hash != plan.hash) {
                if let Some(v) = replans
                    .iter_mut()
                    .rfind(|v| v.outcome == replan::Outcome::Applied)
                {
                    *v = Verdict::rejected(reason::PLAN_TOO_LARGE);
                }
                events.retain(|n| {
                    n.reason != reason::PLAN_IMPROVED && n.reason != reason::INITIAL_PLAN
                });
                status.plan = old.plan.clone();
            }
            let mut d = hold(md, old, status, events, held, stored, inp.now);
            d.replans = replans;
            return Ok(d);
        }
        Err(e) => return Err(e.into()),
    };
    // The backstop of the pod policy: whatever a spec field maps onto a pod, a pod that asks for
    // what the cluster admin did not allow is never applied.
    let refused: Vec<String> = desired
        .pods
        .iter()
        .flat_map(|p| check_pod(p, inp.pod_policy))
        .collect();
    if !refused.is_empty() {
        let held = Held {
            reason: reason::POD_POLICY,
            message: refused.join("; "),
            retry: HELD_RETRY,
        };
        let mut d = hold(md, old, status, events, held, Some(&plan), inp.now);
        d.replans = replans;
        return Ok(d);
    }
    if md.spec.suspend {
        let mut d = suspend(inp, desired, plan, status, events);
        d.replans = replans;
        return Ok(d);
    }
    let was_suspended = old
        .conditions
        .iter()
        .any(|c| c.type_ == condition::SUSPENDED && c.status == "True");
    if was_suspended {
        events.push(Note::normal(
            reason::RESUMED,
            format!(
                "spec.suspend is false: bringing back {} worker(s) on plan {}",
                spec.nodes,
                plan.short_hash()
            ),
        ));
    }
    // The condition appears with the first suspension and stays (False, Resumed) after it.
    if status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::SUSPENDED)
    {
        set_condition(
            &mut status.conditions,
            condition::SUSPENDED,
            false,
            reason::RESUMED,
            "the workers were brought back after spec.suspend",
            gen,
            inp.now,
        );
    }
    let mut d = roll(inp, desired, plan, status, events);
    d.replans = replans;
    Ok(d)
}

/// `spec.suspend`: the owned objects stay as they are (the plan's ConfigMap keeps the plan the
/// workers come back on), every worker pod is deleted in one step (all at once, so no rank sees
/// a peer go and fails: there is no group restart), none is created, and the status says so.
fn suspend(
    inp: &Inputs<'_>,
    desired: Desired,
    plan: ExpertPlan,
    mut status: MoEDeploymentStatus,
    mut events: Vec<Note>,
) -> Decision {
    let (md, spec, fetched) = (inp.md, inp.spec, inp.fetched);
    let gen = md.metadata.generation;
    let workers: Vec<WorkerState> = fetched
        .pods
        .iter()
        .filter_map(|p| WorkerState::from_pod(p, None))
        .collect();
    let live = workers.iter().filter(|w| !w.terminating).count();
    let left = workers.len();
    let steps = GroupsStep::remove_all(&workers);
    let message = if left == 0 {
        format!("spec.suspend: no workers; plan {} kept", plan.short_hash())
    } else {
        format!(
            "spec.suspend: {left} worker pod(s) going away; plan {} kept",
            plan.short_hash()
        )
    };
    let was = status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::SUSPENDED && c.status == "True");
    if !was {
        events.push(Note::normal(
            reason::SUSPENDED,
            format!(
                "spec.suspend is true: deleting {} worker pod(s); plan {} is kept for the resume",
                live,
                plan.short_hash()
            ),
        ));
    }
    let cs = &mut status.conditions;
    set_condition(
        cs,
        condition::SUSPENDED,
        true,
        reason::SUSPENDED,
        &message,
        gen,
        inp.now,
    );
    set_condition(
        cs,
        condition::READY,
        false,
        reason::SUSPENDED,
        &message,
        gen,
        inp.now,
    );
    set_condition(
        cs,
        condition::PROGRESSING,
        left > 0,
        reason::SUSPENDED,
        &message,
        gen,
        inp.now,
    );
    set_condition(
        cs,
        condition::DEGRADED,
        false,
        reason::SPEC_VALID,
        "",
        gen,
        inp.now,
    );
    let ready = workers.iter().filter(|w| w.ready && !w.terminating).count() as i32;
    status.workers = Some(WorkersStatus {
        desired: 0,
        ready,
        on_current_plan: 0,
        summary: format!("{ready}/0"),
    });
    groups_status(md, &mut status, &steps, spec.replicas);
    status.observed_generation = gen;
    Decision {
        events,
        status: (status != fetched.status).then_some(status),
        rollout: Some(Rollout {
            desired,
            plan: plan.clone(),
            steps,
            desired_workers: 0,
            relabel: Vec::new(),
            cause: DeleteCause::Suspend,
            group_restart: None,
            token: fetched.token.clone(),
            admin_port: spec.ports.admin,
        }),
        balancedness: gauge(&plan),
        requeue: if left > 0 { BUSY_REQUEUE } else { HELD_RETRY },
        replans: Vec::new(),
    }
}

/// The plan's predicted balancedness, which the operator's gauge reports.
fn gauge(plan: &ExpertPlan) -> Option<f64> {
    plan.stats.as_ref().map(|s| s.balancedness)
}

/// The initial load's window: `Ok(None)` when it is optional and absent; `Err` names what is
/// wrong with it.
fn initial_window(
    md: &MoEDeployment,
    spec: &ValidSpec,
    sel: &ConfigMapKeySelector,
    fetched: &Fetched,
) -> Result<Option<LoadWindow>, String> {
    let cm: Option<&ConfigMap> = fetched.initial_load.as_ref().and_then(Option::as_ref);
    let has_key = |c: &ConfigMap| {
        c.data.as_ref().is_some_and(|d| d.contains_key(&sel.key))
            || c.binary_data
                .as_ref()
                .is_some_and(|d| d.contains_key(&sel.key))
    };
    let optional_missing = sel.optional == Some(true) && !cm.is_some_and(has_key);
    let ns = md.namespace().unwrap_or_default();
    match initial_load_window(&ns, &sel.name, &sel.key, cm, &spec.shape) {
        Ok(w) => Ok(Some(w)),
        Err(_) if optional_missing => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

/// MetricsAvailable from this reconcile's readings. Between two Prometheus queries the last
/// answer stands: a reconcile that did not query must not turn a failure back to True.
fn metrics_condition(inp: &Inputs<'_>, status: &mut MoEDeploymentStatus) {
    let obs = inp.observed;
    let gen = inp.md.metadata.generation;
    if let Some(first) = obs.failures.first() {
        let message = obs
            .failures
            .iter()
            .map(|f| format!("{} ({})", f.message, f.reason))
            .collect::<Vec<_>>()
            .join("; ");
        let kind = condition::METRICS_AVAILABLE;
        set_condition(
            &mut status.conditions,
            kind,
            false,
            first.reason,
            &message,
            gen,
            inp.now,
        );
    } else if obs.fresh {
        let answered = obs.scraped.len();
        let message = match inp.spec.load_source {
            LoadSource::Prometheus { .. } if inp.spec.engine.is_some() => {
                "load from Prometheus (the engine's metrics)".to_string()
            }
            LoadSource::Prometheus { .. } => {
                format!("load from Prometheus; {answered} worker(s) answered")
            }
            LoadSource::Workers => format!("{answered} worker(s) answered"),
        };
        let kind = condition::METRICS_AVAILABLE;
        set_condition(
            &mut status.conditions,
            kind,
            true,
            reason::SCRAPED,
            &message,
            gen,
            inp.now,
        );
    }
}

/// The plan in force: the stored one, or a first one; then a better one from the window when it
/// is worth rolling out. Updates `status.plan` and records the Events; returns the plan and the
/// decisions announced (each once, with its Event).
fn choose_plan(
    inp: &Inputs<'_>,
    current: Option<ExpertPlan>,
    initial: Option<LoadWindow>,
    status: &mut MoEDeploymentStatus,
    events: &mut Vec<Note>,
) -> Result<(ExpertPlan, Vec<Verdict>), Error> {
    let (md, spec) = (inp.md, inp.spec);
    let mut verdicts = Vec::new();
    let plan = match current {
        Some(p) => p,
        None => {
            let (p, from) = match (initial, &md.spec.initial_load) {
                (Some(w), Some(sel)) => (
                    make_plan(&spec.plan_request(spec.algorithm()), &w, None)?,
                    format!(
                        "from the initial load in ConfigMap {}/{} key {:?}",
                        md.namespace().unwrap_or_default(),
                        sel.name,
                        sel.key
                    ),
                ),
                _ => (
                    initial_plan(spec)?,
                    "before any load is measured".to_string(),
                ),
            };
            // Announced once: a deployment held back before its plan is stored (pod policy,
            // size) plans the same first plan on every retry.
            if status.plan.as_ref().is_none_or(|s| s.hash != p.hash) {
                events.push(Note::normal(
                    reason::INITIAL_PLAN,
                    format!(
                        "plan {} ({}, R={}) {from}",
                        p.short_hash(),
                        p.algorithm,
                        p.replicas_per_gpu
                    ),
                ));
                status.plan = Some(plan_status(&p, None, Some(inp.now.clone())));
                verdicts.push(replan::Decision::Initial.verdict());
            }
            p
        }
    };
    // Suspended: the plan in force stays, so the workers come back on it (nothing is measured
    // meanwhile anyway).
    let plan = if md.spec.suspend {
        plan
    } else {
        match replan(inp, &plan, status, events) {
            Some((v, candidate)) => {
                verdicts.push(v);
                candidate.unwrap_or(plan)
            }
            None => plan,
        }
    };
    if status.plan.as_ref().map(|p| p.hash.as_str()) != Some(plan.hash.as_str()) {
        status.plan = Some(plan_status(&plan, None, Some(inp.now.clone())));
    }
    Ok((plan, verdicts))
}

/// The plan before any load is measured and without `spec.initialLoad`: placement only on a zero
/// load (contiguous for policy None).
pub fn initial_plan(spec: &ValidSpec) -> Result<ExpertPlan, Error> {
    let alg = match spec.policy {
        ReplicationPolicy::None => Algorithm::None,
        _ => Algorithm::Placement,
    };
    let req = spec.plan_request(alg);
    let ids = moe_layer_ids(&req.model);
    let e = req.model.experts as usize;
    let zero = LoadWindow::new(ids.clone(), e, vec![0.0; ids.len() * e]).map_err(Error::Window)?;
    Ok(make_plan(&req, &zero, None)?)
}

/// A better plan from the window, when it beats `plan` by `minImprovement` and the cooldown has
/// passed. Records the observed balancedness either way. `None` when there was nothing to
/// re-plan on (no new load); else the verdict, with the candidate when it rolls out.
fn replan(
    inp: &Inputs<'_>,
    plan: &ExpertPlan,
    status: &mut MoEDeploymentStatus,
    events: &mut Vec<Note>,
) -> Option<(Verdict, Option<ExpertPlan>)> {
    let spec = inp.spec;
    let w = inp.observed.window.as_ref()?;
    if spec.policy == ReplicationPolicy::None
        || !inp.observed.window_changed
        || w.total_tokens() <= 0.0
    {
        return None;
    }
    let candidate = match make_plan(&spec.plan_request(spec.algorithm()), w, Some(plan)) {
        Ok(c) => c,
        Err(e) => {
            events.push(Note::warning(reason::PLAN_FAILED, e.to_string()));
            return Some((Verdict::rejected(reason::PLAN_FAILED), None));
        }
    };
    let cur_b = evaluate(plan, w).map(|e| e.balancedness).unwrap_or(0.0);
    let cand_b = evaluate(&candidate, w)
        .map(|e| e.balancedness)
        .unwrap_or(0.0);
    // With a step-time objective the hysteresis is on the fraction of predicted step time the
    // candidate saves (the plan in force scores 0); otherwise on balancedness.
    let step = spec.step_time.as_ref().map(|obj| {
        let s = |p: &ExpertPlan| {
            step_time(p, w, &obj.cost, obj.tokens_per_step)
                .map(|e| e.step_s)
                .unwrap_or(f64::INFINITY)
        };
        (s(plan), s(&candidate))
    });
    let (cur_score, cand_score) = match step {
        Some((cur, cand)) if cur.is_finite() && cur > 0.0 => (0.0, (cur - cand) / cur),
        Some(_) => (0.0, 0.0),
        None => (cur_b, cand_b),
    };
    status.observed = Some(ObservedLoad::new(
        Some(cur_b),
        w.total_tokens() as i64,
        w.batches() as i64,
    ));
    let rolled_out_at_s = status
        .plan
        .as_ref()
        .and_then(|p| p.computed_at.as_ref())
        .map(|t| t.0.as_second() as f64)
        .unwrap_or(0.0);
    let current = Current {
        hash: &plan.hash,
        balancedness: cur_score,
        rolled_out_at_s,
    };
    let d = replan::decide(
        Some(&current),
        &candidate.hash,
        cand_score,
        spec.min_improvement,
        spec.cooldown.as_secs_f64(),
        inp.now_s,
    );
    if !d.rolls_out() {
        tracing::debug!(reason = d.reason(), "plan kept");
        return Some((d.verdict(), None));
    }
    let step_note = match step {
        Some((cur, cand)) => format!(
            ", predicted MoE step {:.3} ms over {:.3} ms",
            cand * 1e3,
            cur * 1e3
        ),
        None => String::new(),
    };
    events.push(Note::normal(
        d.reason(),
        format!(
            "plan {} ({}, R={}): predicted balancedness {:.3} over {:.3} of plan {}{step_note}",
            candidate.short_hash(),
            candidate.algorithm,
            candidate.replicas_per_gpu,
            cand_b,
            cur_b,
            plan.short_hash()
        ),
    ));
    status.plan = Some(plan_status(&candidate, Some(cur_b), Some(inp.now.clone())));
    Some((d.verdict(), Some(candidate)))
}

/// The rank failure to restart a worker group for now: the newest one the pods show, when it has
/// not been restarted for yet (`status.rankFailure`). Records it and announces it; returns it
/// with the group of the pod it failed in.
fn rank_failure(
    inp: &Inputs<'_>,
    status: &mut MoEDeploymentStatus,
    events: &mut Vec<Note>,
    workers: &[(String, WorkerState)],
) -> Option<(u32, RankFailure)> {
    let f = ranks::newest_failure(&inp.fetched.pods)
        .filter(|f| f.is_new(status.rank_failure.as_ref()))?;
    let group = workers
        .iter()
        .find(|(name, _)| *name == f.pod)
        .map(|(_, w)| w.group)
        .unwrap_or(0);
    let pods = workers
        .iter()
        .filter(|(_, w)| w.group == group && !w.terminating)
        .count();
    let which = match group {
        0 if inp.spec.replicas <= 1 => "the worker group".to_string(),
        g => format!("worker group {g}"),
    };
    events.push(Note::warning(
        reason::RANK_FAILED,
        format!(
            "EP rank {} failed in pod {} (container {}): {}; restarting {which} ({pods} pod(s) deleted, then recreated)",
            f.rank, f.pod, f.container, f.message
        ),
    ));
    status.rank_failure = Some(f.record(inp.now));
    Some((group, f))
}

/// The Degraded message of the recorded rank failure.
fn rank_failed_message(status: &MoEDeploymentStatus) -> String {
    status
        .rank_failure
        .as_ref()
        .map(|f| {
            format!(
                "EP rank {} failed in pod {}: {}; the worker group was restarted",
                f.rank, f.pod, f.message
            )
        })
        .unwrap_or_default()
}

/// Whether the Degraded condition is True for `why`.
fn is_degraded_for(status: &MoEDeploymentStatus, why: &str) -> bool {
    status
        .conditions
        .iter()
        .any(|c| c.type_ == condition::DEGRADED && c.status == "True" && c.reason == why)
}

/// The EP group of a worker pod (`moe.craft.dev/group`; 0 without it).
fn pod_group_index(p: &k8s_openapi::api::core::v1::Pod) -> u32 {
    p.labels()
        .get(LABEL_GROUP)
        .and_then(|g| g.parse().ok())
        .unwrap_or(0)
}

/// The rollout's next step on the cluster's state, and the status that reports it.
fn roll(
    inp: &Inputs<'_>,
    desired: Desired,
    plan: ExpertPlan,
    mut status: MoEDeploymentStatus,
    mut events: Vec<Note>,
) -> Decision {
    let (md, spec, fetched) = (inp.md, inp.spec, inp.fetched);
    let gen = md.metadata.generation;
    // Readiness is the pod's Ready condition (the kubelet probes `/readyz`); a scrape that fails
    // (a changed metrics port, a network blip) says nothing about serving.
    let named: Vec<(String, WorkerState)> = fetched
        .pods
        .iter()
        .filter_map(|p| {
            let s = inp.observed.scraped.get(&p.name_any());
            WorkerState::from_pod(p, s.and_then(|s| s.plan_hash.as_deref()))
                .map(|w| (p.name_any(), w))
        })
        .collect();
    let workers: Vec<WorkerState> = named.iter().map(|(_, w)| w.clone()).collect();
    let nodes = spec.nodes;
    let pod_goal = |group: u32| RolloutGoal {
        plan_hash: plan.hash.clone(),
        spec_hashes: desired
            .pods
            .iter()
            .skip((group * nodes) as usize)
            .take(nodes as usize)
            .map(|p| {
                p.annotations()
                    .get(ANNOTATION_SPEC_HASH)
                    .cloned()
                    .unwrap_or_default()
            })
            .collect(),
        strategy: spec.strategy,
        max_unavailable: spec.max_unavailable,
        push_timeout_s: i64::try_from(inp.push_timeout.as_secs()).unwrap_or(i64::MAX),
        refusal_grace_s: PUSH_REFUSAL_GRACE.as_secs() as i64,
        now_s: inp.now_s as i64,
    };
    let goal = GroupsGoal {
        replicas: spec.replicas,
        max_unavailable_groups: spec.max_unavailable_groups,
        max_surge: spec.max_surge,
        pods: (0..spec.replicas + spec.max_surge).map(pod_goal).collect(),
    };
    let mut steps = next_groups(&goal, &workers);
    // A failed rank restarts its whole group instead of the group's step (docs/data-plane.md);
    // a group already being removed just goes.
    let group_restart = rank_failure(inp, &mut status, &mut events, &named);
    if let Some((g, _)) = &group_restart {
        if let Some(s) = steps.group_mut(*g).filter(|s| s.role != Role::Removed) {
            let of: Vec<WorkerState> = workers.iter().filter(|w| w.group == *g).cloned().collect();
            s.step = ranks::restart_step(&of, nodes);
        }
    }
    let restarted = group_restart.as_ref().map(|(g, _)| *g);
    let group_restart = group_restart.map(|(_, f)| f);
    // The gang guard, group by group: a group not scheduled whole in time is released (every
    // pod deleted), and nothing is created while the guard backs off. Groups that serve are
    // whole and left alone.
    let mut cause = DeleteCause::Replace;
    let mut unschedulable: Option<String> = None;
    if spec.gang.gang == Gang::Guard {
        let mut all_placed = true;
        for s in steps
            .groups
            .iter_mut()
            .filter(|s| s.role != Role::Removed && !s.ready && Some(s.group) != restarted)
        {
            let placements: Vec<Placement> = fetched
                .pods
                .iter()
                .filter(|p| pod_group_index(p) == s.group)
                .filter_map(Placement::from_pod)
                .collect();
            let guard = Guard {
                nodes,
                gpus_per_node: spec.gpus_per_node,
                timeout_s: spec.gang.timeout.as_secs() as i64,
                now_s: inp.now_s as i64,
                released_at_s: status.gang.as_ref().map(|g| g.released_at.0.as_second()),
            };
            let step = &mut s.step;
            match guard.check(&placements) {
                // A new attempt after a release stays Unschedulable until the group is whole.
                gang::Verdict::Whole | gang::Verdict::Waiting => {
                    let placed = placements
                        .iter()
                        .filter(|p| !p.terminating && p.placed && p.rank < nodes)
                        .count();
                    if (placed as u32) < nodes {
                        all_placed = false;
                        if let Some(g) = &status.gang {
                            unschedulable.get_or_insert(format!("{}; trying again", g.message));
                        }
                    }
                }
                gang::Verdict::Release { ranks, message } => {
                    all_placed = false;
                    let unscheduled = placements
                        .iter()
                        .filter(|p| !p.terminating && !p.placed && p.rank < nodes)
                        .count() as i32;
                    let message = match s.group {
                        0 if spec.replicas <= 1 => message,
                        g => format!("group {g}: {message}"),
                    };
                    events.push(Note::warning(reason::UNSCHEDULABLE, message.clone()));
                    status.gang = Some(GangStatus {
                        released_at: inp.now.clone(),
                        unscheduled_pods: unscheduled,
                        missing_gpus: i64::from(unscheduled) * i64::from(spec.gpus_per_node),
                        message: message.clone(),
                    });
                    *step = Step {
                        delete: ranks,
                        ..Default::default()
                    };
                    cause = DeleteCause::GangRelease;
                    unschedulable = Some(message);
                }
                gang::Verdict::Unschedulable { message } => {
                    all_placed = false;
                    if !is_degraded_for(&status, reason::UNSCHEDULABLE) && unschedulable.is_none() {
                        events.push(Note::warning(reason::UNSCHEDULABLE, message.clone()));
                    }
                    unschedulable.get_or_insert(message);
                }
                gang::Verdict::BackingOff { message, .. } => {
                    all_placed = false;
                    step.create.clear();
                    step.done = false;
                    let last = status
                        .gang
                        .as_ref()
                        .map(|g| g.message.clone())
                        .unwrap_or_default();
                    unschedulable.get_or_insert(format!("{last}; {message}"));
                }
            }
        }
        if all_placed {
            status.gang = None;
        }
    }
    // A restart or a release may have replaced a group's step.
    steps.done &= steps.groups.iter().all(|s| s.step.done);
    let desired_workers = spec.replicas * nodes;
    let relabel: Vec<String> = fetched
        .pods
        .iter()
        .filter(|p| {
            p.metadata.deletion_timestamp.is_none() && !p.labels().contains_key(LABEL_GROUP)
        })
        .map(|p| p.name_any())
        .collect();
    status.workers = Some(workers_status(
        nodes,
        spec.replicas,
        &workers,
        steps.updated(),
    ));
    groups_status(md, &mut status, &steps, spec.replicas);
    status.rollout = Some(RolloutStatus {
        target_hash: plan.hash.clone(),
        updated: steps.updated() as i32,
        total: desired_workers as i32,
    });
    let mut message = format!(
        "{}/{} workers ready on plan {}",
        steps.updated(),
        desired_workers,
        plan.short_hash()
    );
    if spec.replicas != 1 || steps.groups.len() > 1 {
        message.push_str(&format!(
            ", {}/{} EP groups ready",
            steps.ready_groups, spec.replicas
        ));
    }
    let waiting = steps.waiting_summary(8);
    if !waiting.is_empty() && !steps.done {
        message.push_str(&format!("; waiting for: {waiting}"));
    }
    // Degraded for a failed rank from its restart until the group is back: the operator is not
    // holding the deployment back (it restarts the group), but it cannot serve meanwhile.
    let rank_failed = !steps.done
        && (group_restart.is_some()
            || status.conditions.iter().any(|c| {
                c.type_ == condition::DEGRADED
                    && c.status == "True"
                    && c.reason == reason::RANK_FAILED
            }));
    let (ready_reason, progress_reason) = if steps.done {
        (reason::WORKERS_READY, reason::ROLLOUT_COMPLETE)
    } else if rank_failed {
        (reason::RANK_FAILED, reason::ROLLING_OUT)
    } else {
        (reason::ROLLING_OUT, reason::ROLLING_OUT)
    };
    let rank_message = rank_failed_message(&status);
    // A pod that cannot fetch its checkpoint (model.checkpoint.s3) never becomes ready; say why.
    let fetch_failure = weights::fetch_failures(&fetched.pods).into_iter().next();
    let (ready_reason, message) = match &fetch_failure {
        Some(f) if !steps.done && !rank_failed => (
            reason::WEIGHTS_FETCH_FAILED,
            format!("{message}; {}", f.condition_message()),
        ),
        _ => (ready_reason, message),
    };
    let cs = &mut status.conditions;
    let degraded = condition::DEGRADED;
    let (ready_reason, message) = match &unschedulable {
        Some(m) if !steps.done => (reason::UNSCHEDULABLE, m.clone()),
        _ => (ready_reason, message),
    };
    // The load source as the spec configures it does not work (credentials, CA): Degraded with
    // the field to fix, while the workers keep serving the plan in force. Between two readings
    // of the source the last one's verdict stands.
    let misconfigured = inp.observed.failures.iter().find(|f| f.degrades);
    let degraded_now = |reason: &str, message: &str| {
        cs.iter().any(|c| {
            c.type_ == degraded
                && c.status == "True"
                && c.reason == reason
                && (message.is_empty() || c.message == message)
        })
    };
    let source_verdict_stands =
        !inp.observed.fresh && SOURCE_DEGRADED_REASONS.iter().any(|r| degraded_now(r, ""));
    if let (Some(m), false) = (&unschedulable, rank_failed) {
        set_condition(cs, degraded, true, reason::UNSCHEDULABLE, m, gen, inp.now);
    } else if rank_failed {
        set_condition(
            cs,
            degraded,
            true,
            reason::RANK_FAILED,
            &rank_message,
            gen,
            inp.now,
        );
    } else if let Some(f) = &fetch_failure {
        let m = f.condition_message();
        if !degraded_now(reason::WEIGHTS_FETCH_FAILED, &m) {
            events.push(Note::warning(reason::WEIGHTS_FETCH_FAILED, m.clone()));
        }
        set_condition(
            cs,
            degraded,
            true,
            reason::WEIGHTS_FETCH_FAILED,
            &m,
            gen,
            inp.now,
        );
    } else if let Some(f) = misconfigured {
        if !degraded_now(f.reason, &f.message) {
            events.push(Note::warning(f.reason, f.message.clone()));
        }
        set_condition(cs, degraded, true, f.reason, &f.message, gen, inp.now);
    } else if !source_verdict_stands {
        // Not Degraded: set here, past every hold, so a held deployment's Degraded condition does
        // not flip to False and back (a new transition time, a status write) on each retry.
        set_condition(cs, degraded, false, reason::SPEC_VALID, "", gen, inp.now);
    }
    set_condition(
        cs,
        condition::READY,
        steps.done,
        ready_reason,
        &message,
        gen,
        inp.now,
    );
    let progressing = !steps.done;
    set_condition(
        cs,
        condition::PROGRESSING,
        progressing,
        progress_reason,
        &message,
        gen,
        inp.now,
    );
    status.observed_generation = gen;
    let requeue = if steps.done {
        spec.interval
    } else {
        BUSY_REQUEUE.min(spec.interval)
    };
    let balancedness = gauge(&plan);
    Decision {
        events,
        status: (status != fetched.status).then_some(status),
        rollout: Some(Rollout {
            desired,
            plan,
            steps,
            desired_workers,
            relabel,
            cause,
            group_restart,
            token: fetched.token.clone(),
            admin_port: spec.ports.admin,
        }),
        balancedness,
        replans: Vec::new(),
        requeue,
    }
}

#[cfg(test)]
mod tests;
