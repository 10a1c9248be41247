//! Rollouts by EP group (`spec.replicas`): which groups serve, surge or go, and which group's
//! pod-level step ([`super::rollout::next_step`]) may go ahead now. Pure, and a function of the
//! cluster's state only (the pods and their group labels), so an operator restart resumes where
//! the cluster says it is.
//!
//! Rules:
//! - Groups `0..replicas` serve. A group is *ready* when every rank has exactly one pod, Ready,
//!   not terminating, with no push in flight.
//! - A step that takes a ready worker off the serving path (a delete of a Ready pod, a plan push)
//!   makes its group unready. It goes ahead only while the ready groups stay at or above
//!   `replicas - maxUnavailableGroups` (a group already unready costs nothing): groups are updated
//!   in group order, `maxUnavailableGroups` at a time, InPlace pushes and Recreate replacements
//!   alike. Creating missing pods is never held back.
//! - Surge (`maxSurge`): while a serving group must be replaced (its pod spec changed, or Recreate
//!   and an old plan; an InPlace push too when `maxUnavailableGroups` is 0), up to `maxSurge`
//!   extra groups `replicas..` are started on the new spec and count as ready groups once they
//!   are; they stay until every serving group is ready and current, then go.
//! - Any other group with pods (a scale-in, a surge no longer needed) is removed: every pod
//!   deleted in one step, like a suspend.

use std::collections::BTreeMap;

use super::rollout::{
    group_serving, needs_replacement, next_step, outdated, RolloutGoal, Step, WorkerState,
};

/// What a group is to the rollout.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Role {
    /// `0..replicas`.
    Serving,
    /// An extra group on the new spec while serving groups are replaced.
    Surge,
    /// Pods of a group no longer wanted: deleted.
    Removed,
}

/// The limits of a rollout by group.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupsGoal {
    pub replicas: u32,
    pub max_unavailable_groups: u32,
    pub max_surge: u32,
    /// The pod-level goal of each group `0..replicas + maxSurge`, indexed by group (the groups'
    /// pod specs differ in their names and rendezvous).
    pub pods: Vec<RolloutGoal>,
}

/// One group's part of the step.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupStep {
    pub group: u32,
    pub role: Role,
    pub step: Step,
    /// Every rank of the group is ready (before this step).
    pub ready: bool,
}

/// The step of every group that has pods or should.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct GroupsStep {
    /// In group order.
    pub groups: Vec<GroupStep>,
    /// Serving and surge groups whose every rank is ready (before this step).
    pub ready_groups: u32,
    /// Groups with at least one pod not terminating.
    pub live_groups: u32,
    /// Every serving group ready on the desired spec and plan, and no other pod left.
    pub done: bool,
}

impl GroupsStep {
    /// The step of group `g`, if it has one.
    pub fn group(&self, g: u32) -> Option<&GroupStep> {
        self.groups.iter().find(|s| s.group == g)
    }

    pub fn group_mut(&mut self, g: u32) -> Option<&mut GroupStep> {
        self.groups.iter_mut().find(|s| s.group == g)
    }

    /// Workers of the serving groups ready on the desired spec and plan.
    pub fn updated(&self) -> u32 {
        self.serving().map(|s| s.step.updated).sum()
    }

    fn serving(&self) -> impl Iterator<Item = &GroupStep> {
        self.groups.iter().filter(|s| s.role == Role::Serving)
    }

    /// Nothing to do now but wait.
    pub fn is_wait(&self) -> bool {
        !self.done && self.groups.iter().all(|s| s.step.is_wait() || s.step.done)
    }

    /// What the rollout waits for, at most `max` ranks named; ranks of a group other than 0
    /// are named `group/rank`.
    pub fn waiting_summary(&self, max: usize) -> String {
        let waiting: Vec<String> = self
            .groups
            .iter()
            .flat_map(|s| {
                s.step.waiting.iter().map(move |(r, why)| match s.group {
                    0 => format!("rank {r} {why}"),
                    g => format!("group {g} rank {r} {why}"),
                })
            })
            .collect();
        let mut parts: Vec<String> = waiting.iter().take(max).cloned().collect();
        if waiting.len() > max {
            parts.push(format!("{} more", waiting.len() - max));
        }
        parts.join("; ")
    }

    /// Every pod of every group deleted at once (`spec.suspend`).
    pub fn remove_all(workers: &[WorkerState]) -> Self {
        let by_group = by_group(workers);
        let groups: Vec<GroupStep> = by_group
            .iter()
            .map(|(&group, ws)| GroupStep {
                group,
                role: Role::Removed,
                step: removal(ws),
                ready: false,
            })
            .collect();
        let left = !workers.is_empty();
        GroupsStep {
            live_groups: live_groups(&by_group),
            groups,
            ready_groups: 0,
            done: !left,
        }
    }
}

fn by_group(workers: &[WorkerState]) -> BTreeMap<u32, Vec<WorkerState>> {
    let mut m: BTreeMap<u32, Vec<WorkerState>> = BTreeMap::new();
    for w in workers {
        m.entry(w.group).or_default().push(w.clone());
    }
    m
}

fn live_groups(by_group: &BTreeMap<u32, Vec<WorkerState>>) -> u32 {
    by_group
        .values()
        .filter(|ws| ws.iter().any(|w| !w.terminating))
        .count() as u32
}

/// A group's removal: every pod not already terminating deleted.
fn removal(workers: &[WorkerState]) -> Step {
    let mut delete: Vec<u32> = workers
        .iter()
        .filter(|w| !w.terminating)
        .map(|w| w.rank)
        .collect();
    delete.sort_unstable();
    delete.dedup();
    let mut waiting: Vec<(u32, &'static str)> =
        workers.iter().map(|w| (w.rank, "being removed")).collect();
    waiting.sort_unstable();
    waiting.dedup();
    Step {
        delete,
        waiting,
        done: workers.is_empty(),
        ..Default::default()
    }
}

/// Why a rank waits while its group's update is held back.
pub const WAITING_FOR_GROUPS: &str = "outdated; waiting for the maxUnavailableGroups budget";

/// The next step of every group from cluster state alone.
pub fn next_groups(goal: &GroupsGoal, workers: &[WorkerState]) -> GroupsStep {
    let by_group = by_group(workers);
    let none: Vec<WorkerState> = Vec::new();
    let of = |g: u32| by_group.get(&g).unwrap_or(&none);
    let pod_goal = |g: u32| goal.pods.get(g as usize);

    // The serving groups' own steps, and what they need.
    let mut steps: Vec<GroupStep> = Vec::new();
    let mut to_replace = 0u32;
    let mut serving_done = true;
    for g in 0..goal.replicas {
        let Some(pg) = pod_goal(g) else { continue };
        let ws = of(g);
        let step = next_step(pg, ws);
        // A surge group stands in for a group being replaced; for an in-place push only when
        // no group may be out of service at all (a push is quick, a group's start is not).
        if needs_replacement(pg, ws) || (goal.max_unavailable_groups == 0 && outdated(pg, ws)) {
            to_replace += 1;
        }
        serving_done &= step.done;
        steps.push(GroupStep {
            group: g,
            role: Role::Serving,
            ready: group_serving(pg, ws),
            step,
        });
    }
    // Surge groups: started while a serving group must be replaced, kept until every serving
    // group is done, so that a replacement still starting is covered.
    let wanted_surge = goal.max_surge.min(to_replace);
    for g in goal.replicas..goal.replicas + goal.max_surge {
        let Some(pg) = pod_goal(g) else { continue };
        let ws = of(g);
        let exists = !ws.is_empty();
        if g - goal.replicas < wanted_surge || (exists && !serving_done) {
            steps.push(GroupStep {
                group: g,
                role: Role::Surge,
                ready: group_serving(pg, ws),
                step: next_step(pg, ws),
            });
        }
    }
    // Everything else goes.
    for (&g, ws) in &by_group {
        if steps.iter().all(|s| s.group != g) {
            steps.push(GroupStep {
                group: g,
                role: Role::Removed,
                ready: false,
                step: removal(ws),
            });
        }
    }
    steps.sort_by_key(|s| s.group);

    let ready_groups = steps
        .iter()
        .filter(|s| s.role != Role::Removed && s.ready)
        .count() as u32;
    // The budget: a ready group whose step takes a worker off the serving path goes ahead only
    // while the ready groups stay at or above the floor.
    let floor = goal.replicas.saturating_sub(goal.max_unavailable_groups);
    let mut ready = ready_groups;
    for s in steps.iter_mut().filter(|s| s.role != Role::Removed) {
        let ws = of(s.group);
        if !s.ready || !disrupts(&s.step, ws) {
            continue;
        }
        if ready > floor {
            ready -= 1;
        } else {
            hold(&mut s.step, ws);
        }
    }
    let done = serving_done && steps.iter().all(|s| s.role == Role::Serving);
    GroupsStep {
        groups: steps,
        ready_groups,
        live_groups: live_groups(&by_group),
        done,
    }
}

/// Ranks whose live pod is Ready: what a delete would take off the serving path.
fn ready_ranks(workers: &[WorkerState]) -> Vec<u32> {
    workers
        .iter()
        .filter(|w| !w.terminating && w.ready)
        .map(|w| w.rank)
        .collect()
}

/// Whether the step takes a serving worker off the serving path.
fn disrupts(step: &Step, workers: &[WorkerState]) -> bool {
    let ready = ready_ranks(workers);
    !step.push.is_empty() || step.delete.iter().any(|r| ready.contains(r))
}

/// Hold a group's update back: no push, no delete of a Ready pod (extra ranks and pods already
/// down still go, and missing pods are still created).
fn hold(step: &mut Step, workers: &[WorkerState]) {
    let ready = ready_ranks(workers);
    let mut held: Vec<u32> = std::mem::take(&mut step.push);
    step.delete.retain(|r| {
        let keep = !ready.contains(r);
        if !keep {
            held.push(*r);
        }
        keep
    });
    for (r, why) in step.waiting.iter_mut() {
        if held.contains(r) {
            *why = WAITING_FOR_GROUPS;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::RolloutStrategy;

    const NODES: u32 = 2;

    fn pod_goal(group: u32, strategy: RolloutStrategy) -> RolloutGoal {
        RolloutGoal {
            plan_hash: "new".into(),
            spec_hashes: (0..NODES).map(|r| format!("spec{group}/{r}")).collect(),
            strategy,
            max_unavailable: NODES,
            push_timeout_s: 600,
            refusal_grace_s: 120,
            now_s: 10_000,
        }
    }

    fn goal(replicas: u32, mug: u32, surge: u32, strategy: RolloutStrategy) -> GroupsGoal {
        GroupsGoal {
            replicas,
            max_unavailable_groups: mug,
            max_surge: surge,
            pods: (0..replicas + surge)
                .map(|g| pod_goal(g, strategy))
                .collect(),
        }
    }

    fn worker(group: u32, rank: u32, spec: &str, plan: &str) -> WorkerState {
        WorkerState {
            group,
            rank,
            terminating: false,
            ready: true,
            plan_hash: Some(plan.into()),
            spec_hash: Some(format!("{spec}{group}/{rank}")),
            target_plan_hash: None,
            push_since_s: None,
            push_rejected: None,
            push_rejected_since_s: None,
        }
    }

    fn group(g: u32, spec: &str, plan: &str) -> Vec<WorkerState> {
        (0..NODES).map(|r| worker(g, r, spec, plan)).collect()
    }

    fn groups(n: u32, spec: &str, plan: &str) -> Vec<WorkerState> {
        (0..n).flat_map(|g| group(g, spec, plan)).collect()
    }

    /// Carry out a step the way the cluster would: deletes terminate then vanish, creates start
    /// not ready then become ready, pushes land. One call is one reconcile, then one tick of
    /// the cluster (pods that were already terminating vanish, new ones become ready).
    fn tick(goal: &GroupsGoal, ws: &mut Vec<WorkerState>, s: &GroupsStep) {
        ws.retain(|w| !w.terminating);
        for w in ws.iter_mut() {
            w.ready = true;
            if w.target_plan_hash.is_some() {
                w.plan_hash = w.target_plan_hash.clone();
            }
        }
        for gs in &s.groups {
            for w in ws.iter_mut().filter(|w| w.group == gs.group) {
                if gs.step.delete.contains(&w.rank) {
                    w.terminating = true;
                    w.ready = false;
                }
                if gs.step.push.contains(&w.rank) {
                    w.target_plan_hash = Some("new".into());
                    w.ready = false;
                }
            }
            for &r in &gs.step.create {
                let mut w = worker(gs.group, r, "spec", "new");
                w.spec_hash = Some(goal.pods[gs.group as usize].spec_hashes[r as usize].clone());
                w.ready = false;
                ws.push(w);
            }
        }
    }

    fn ready_groups(goal: &GroupsGoal, ws: &[WorkerState]) -> u32 {
        (0..goal.pods.len() as u32)
            .filter(|&g| {
                let of: Vec<_> = ws.iter().filter(|w| w.group == g).cloned().collect();
                group_serving(&goal.pods[g as usize], &of)
            })
            .count() as u32
    }

    /// Run a rollout to its end, checking the floor after every step and tick.
    fn run(goal: &GroupsGoal, mut ws: Vec<WorkerState>) -> (Vec<WorkerState>, u32) {
        let floor = goal.replicas.saturating_sub(goal.max_unavailable_groups);
        for round in 0..200 {
            let s = next_groups(goal, &ws);
            if s.done {
                return (ws, round);
            }
            tick(goal, &mut ws, &s);
            let ready = ready_groups(goal, &ws);
            assert!(
                ready >= floor,
                "round {round}: {ready} ready groups < {floor}: {s:?}"
            );
        }
        panic!("no end: {ws:?}");
    }

    #[test]
    fn a_scale_out_creates_whole_groups_and_touches_no_other() {
        let g = goal(3, 1, 0, RolloutStrategy::InPlace);
        let ws = groups(1, "spec", "new");
        let s = next_groups(&g, &ws);
        assert_eq!(s.group(0).unwrap().step, next_step(&g.pods[0], &ws));
        assert!(s.group(0).unwrap().step.delete.is_empty());
        assert_eq!(s.group(1).unwrap().step.create, [0, 1]);
        assert_eq!(s.group(2).unwrap().step.create, [0, 1]);
        assert_eq!((s.ready_groups, s.live_groups, s.done), (1, 1, false));
    }

    #[test]
    fn a_scale_in_removes_the_highest_groups_whole() {
        let g = goal(2, 1, 0, RolloutStrategy::InPlace);
        let ws = groups(3, "spec", "new");
        let s = next_groups(&g, &ws);
        let r = s.group(2).unwrap();
        assert_eq!(
            (r.role, r.step.delete.as_slice()),
            (Role::Removed, &[0, 1][..])
        );
        for k in 0..2 {
            let st = &s.group(k).unwrap().step;
            assert!(st.done && st.delete.is_empty(), "group {k}: {st:?}");
        }
        assert!(!s.done);
        let (_, rounds) = run(&g, ws);
        assert!(rounds <= 2);
    }

    #[test]
    fn zero_replicas_removes_every_group_and_is_then_done() {
        let g = goal(0, 1, 0, RolloutStrategy::InPlace);
        let s = next_groups(&g, &groups(2, "spec", "new"));
        assert_eq!(s.groups.len(), 2);
        assert!(s.groups.iter().all(|s| s.role == Role::Removed));
        assert!(next_groups(&g, &[]).done);
    }

    #[test]
    fn in_place_pushes_go_group_by_group() {
        let g = goal(3, 1, 0, RolloutStrategy::InPlace);
        let ws = groups(3, "spec", "old");
        let s = next_groups(&g, &ws);
        assert_eq!(s.group(0).unwrap().step.push, [0, 1]);
        for k in [1, 2] {
            let st = &s.group(k).unwrap().step;
            assert!(st.push.is_empty(), "group {k} waits: {st:?}");
            assert!(st.waiting.iter().all(|(_, w)| *w == WAITING_FOR_GROUPS));
        }
        let (ws, _) = run(&g, ws);
        assert!(ws.iter().all(|w| w.plan_hash.as_deref() == Some("new")));
    }

    #[test]
    fn recreate_replaces_one_group_at_a_time_above_the_floor() {
        for mug in [1, 2] {
            let g = goal(3, mug, 0, RolloutStrategy::Recreate);
            let ws = groups(3, "old", "old");
            let s = next_groups(&g, &ws);
            let replacing = s
                .groups
                .iter()
                .filter(|s| !s.step.delete.is_empty())
                .count() as u32;
            assert_eq!(replacing, mug);
            let (ws, _) = run(&g, ws);
            assert_eq!(ws.len() as u32, 3 * NODES);
        }
    }

    #[test]
    fn a_surge_group_comes_first_and_goes_last() {
        // maxUnavailableGroups 0: nothing may go until the surge group serves.
        let g = goal(3, 0, 1, RolloutStrategy::Recreate);
        let ws = groups(3, "old", "old");
        let s = next_groups(&g, &ws);
        let surge = s.group(3).unwrap();
        assert_eq!(
            (surge.role, surge.step.create.as_slice()),
            (Role::Surge, &[0, 1][..])
        );
        assert!((0..3).all(|k| s.group(k).unwrap().step.delete.is_empty()));
        let (ws, _) = run(&g, ws);
        assert!(ws.iter().all(|w| w.group < 3), "the surge group is gone");
        assert!(next_groups(&g, &ws).done);
    }

    #[test]
    fn an_in_place_push_starts_no_surge_group_unless_no_group_may_go() {
        let ws = groups(2, "spec", "old");
        let s = next_groups(&goal(2, 1, 1, RolloutStrategy::InPlace), &ws);
        assert!(s.group(2).is_none(), "a push needs no surge group: {s:?}");
        assert_eq!(s.group(0).unwrap().step.push, [0, 1]);
        let g = goal(2, 0, 1, RolloutStrategy::InPlace);
        let s = next_groups(&g, &ws);
        assert_eq!(s.group(2).unwrap().step.create, [0, 1]);
        assert!(s.group(0).unwrap().step.push.is_empty());
        let (ws, _) = run(&g, ws);
        assert!(ws
            .iter()
            .all(|w| w.group < 2 && w.plan_hash.as_deref() == Some("new")));
    }

    #[test]
    fn a_surge_group_stays_while_a_replaced_group_starts() {
        let g = goal(2, 0, 1, RolloutStrategy::Recreate);
        // Group 0 replaced and starting, group 1 current, the surge group serving.
        let mut ws = groups(2, "spec", "new");
        for w in ws.iter_mut().filter(|w| w.group == 0) {
            w.ready = false;
        }
        ws.extend(group(2, "spec", "new"));
        let s = next_groups(&g, &ws);
        assert_eq!(s.group(2).unwrap().role, Role::Surge);
        assert!(s.group(2).unwrap().step.delete.is_empty());
        for w in ws.iter_mut() {
            w.ready = true;
        }
        let s = next_groups(&g, &ws);
        assert_eq!(s.group(2).unwrap().role, Role::Removed);
    }

    #[test]
    fn a_restarted_operator_resumes_from_the_pods() {
        // Half-way: group 0 replaced, group 1 terminating, group 2 old. The same decision as
        // from any other operator: group 1 comes back, group 2 waits for it.
        let g = goal(3, 1, 0, RolloutStrategy::Recreate);
        let mut ws = group(0, "spec", "new");
        let mut g1 = group(1, "old", "old");
        for w in g1.iter_mut() {
            w.terminating = true;
            w.ready = false;
        }
        ws.extend(g1);
        ws.extend(group(2, "old", "old"));
        let s = next_groups(&g, &ws);
        assert!(s.group(2).unwrap().step.delete.is_empty());
        assert_eq!(s.ready_groups, 2);
        run(&g, ws);
    }

    proptest::proptest! {
        #[test]
        fn ready_groups_never_drop_below_the_floor(
            replicas in 1u32..5,
            mug in 0u32..3,
            surge in 0u32..3,
            recreate in proptest::bool::ANY,
            old_spec in proptest::bool::ANY,
        ) {
            proptest::prop_assume!(mug + surge >= 1);
            let strategy = if recreate { RolloutStrategy::Recreate } else { RolloutStrategy::InPlace };
            let g = goal(replicas, mug, surge, strategy);
            let spec = if old_spec { "old" } else { "spec" };
            let (ws, _) = run(&g, groups(replicas, spec, "old"));
            proptest::prop_assert_eq!(ws.len() as u32, replicas * NODES);
        }
    }
}
