//! The reconcile's writes: record the decision's Events, server-side apply the owned objects
//! (the plan ConfigMap first, so replaced pods start on it), carry out the rollout step (delete,
//! create, push; a group restart deletes every worker pod) and write the status, last, so that a
//! group restart is recorded only once its deletes went through. I/O only; what to write is
//! `decide`'s.

use std::time::Duration;

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret, Service};
use k8s_openapi::api::policy::v1::PodDisruptionBudget;
use kube::api::{DeleteParams, DynamicObject, Patch, PatchParams};
use kube::runtime::events::{Event, EventType};
use kube::{Api, Resource, ResourceExt};
use serde::de::DeserializeOwned;
use serde::Serialize;
use tracing::Instrument;

use super::build::{self, FIELD_MANAGER};
use super::decide::{Decision, DeleteCause, Note, Rollout};
use super::groups::{GroupStep, Role};
use super::observe::pod_ip;
use super::reconcile::{wall_s, Context, Error};
use super::rollout::{
    ANNOTATION_PUSH_REJECTED, ANNOTATION_PUSH_REJECTED_SINCE, ANNOTATION_TARGET_PLAN,
    ANNOTATION_TARGET_SINCE,
};
use crate::api::{reason, MoEDeployment, MoEDeploymentStatus};
use crate::worker::wire::HttpError;

/// How long one plan `PUT` may take (the worker answers once the plan is loaded).
const PUSH_REQUEST_TIMEOUT: Duration = Duration::from_secs(60);

/// Carry out a decision about `md` (namespace `ns`, key `ns/name` for the gauges); `pods` are the
/// worker pods the decision was made on (the step names their ranks).
pub async fn apply(
    ctx: &Context,
    md: &MoEDeployment,
    ns: &str,
    key: &str,
    pods: &[Pod],
    decision: &Decision,
) -> Result<(), Error> {
    for n in &decision.events {
        event_about(ctx, md, None, n).await;
    }
    ctx.metrics.set_balancedness(key, decision.balancedness);
    if let Some(r) = &decision.rollout {
        apply_objects(ctx, md, ns, r).await?;
        execute(ctx, md, &Api::namespaced(ctx.client.clone(), ns), pods, r).await?;
        ctx.metrics
            .set_rollout(key, r.steps.updated(), r.desired_workers);
    }
    if let Some(status) = &decision.status {
        patch_status(
            &Api::namespaced(ctx.client.clone(), ns),
            &md.name_any(),
            status,
        )
        .await?;
        ctx.metrics.set_conditions(key, &status.conditions);
    }
    Ok(())
}

async fn apply_objects(
    ctx: &Context,
    md: &MoEDeployment,
    ns: &str,
    r: &Rollout,
) -> Result<(), Error> {
    let client = ctx.client.clone();
    let d = &r.desired;
    server_side_apply(
        &Api::<ConfigMap>::namespaced(client.clone(), ns),
        &d.plan_config_map,
    )
    .await?;
    server_side_apply(
        &Api::<Secret>::namespaced(client.clone(), ns),
        &d.admin_secret,
    )
    .await?;
    let services = Api::<Service>::namespaced(client.clone(), ns);
    server_side_apply(&services, &d.service).await?;
    // A Service per live group; a removed group's goes with its pods (by name: the operator
    // never lists Services).
    for s in &r.steps.groups {
        match (s.role, d.group_services.get(s.group as usize)) {
            (Role::Removed, _) => {
                let name = build::group_service_name(md, s.group);
                delete_if_present(&services, &name).await?;
            }
            (_, Some(svc)) => {
                server_side_apply(&services, svc).await?;
            }
            (_, None) => {}
        }
    }
    server_side_apply(
        &Api::<PodDisruptionBudget>::namespaced(client.clone(), ns),
        &d.pdb,
    )
    .await?;
    // Each live group's PodGroup (a removed group's stays, without pods, until the
    // MoEDeployment goes: the operator has no right to delete PodGroups).
    let api: Api<DynamicObject> = Api::namespaced_with(client, ns, &build::pod_group_resource());
    for s in r.steps.groups.iter().filter(|s| s.role != Role::Removed) {
        if let Some(pg) = d.pod_groups.get(s.group as usize) {
            api.patch(
                &pg.name_any(),
                &PatchParams::apply(FIELD_MANAGER).force(),
                &Patch::Apply(pg),
            )
            .await?;
        }
    }
    Ok(())
}

/// Delete an object by name; one already gone is no error.
async fn delete_if_present<K>(api: &Api<K>, name: &str) -> Result<(), Error>
where
    K: Resource + Clone + DeserializeOwned + std::fmt::Debug,
{
    match api.delete(name, &DeleteParams::default()).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

/// Server-side apply under the operator's field manager, taking ownership of conflicting fields.
async fn server_side_apply<K>(api: &Api<K>, obj: &K) -> Result<K, Error>
where
    K: Resource + Clone + Serialize + DeserializeOwned + std::fmt::Debug,
{
    let name = obj
        .meta()
        .name
        .clone()
        .ok_or(Error::MissingMetadata("metadata.name"))?;
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    Ok(api.patch(&name, &pp, &Patch::Apply(obj)).await?)
}

/// An Event about `md`, concerning one of its pods when `related` is set. The pod is the Event's
/// related object: the recorder folds Events with the same reason and objects into one series and
/// keeps only the first note, so without it "pushed to worker-1" would count as a repeat of
/// "pushed to worker-0".
async fn event_about(ctx: &Context, md: &MoEDeployment, related: Option<&Pod>, n: &Note) {
    let ev = Event {
        type_: if n.warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: n.reason.into(),
        note: Some(n.message.chars().take(1000).collect()),
        action: "Reconcile".into(),
        secondary: related.map(|p| p.object_ref(&())),
    };
    if let Err(e) = ctx.recorder.publish(&ev, &md.object_ref(&())).await {
        tracing::warn!(error = %e, reason = n.reason, "publishing event failed");
    }
}

async fn pod_event(
    ctx: &Context,
    md: &MoEDeployment,
    pod: &Pod,
    warning: bool,
    reason: &'static str,
    message: String,
) {
    let n = Note {
        warning,
        reason,
        message,
    };
    event_about(ctx, md, Some(pod), &n).await
}

/// Annotate a pod with `key: hash` and `since_key: now` (seconds since the epoch): the rollout
/// reads both back to know what a push is about and when it began.
async fn annotate_since(
    pods_api: &Api<Pod>,
    p: &Pod,
    key: &str,
    hash: &str,
    since_key: &str,
) -> Result<(), Error> {
    let patch = serde_json::json!({"metadata": {"annotations": {
        key: hash,
        since_key: format!("{:.0}", wall_s()),
    }}});
    let pp = PatchParams::default();
    pods_api
        .patch(&p.name_any(), &pp, &Patch::Merge(&patch))
        .await?;
    Ok(())
}

/// The pods of one rank of one group (normally one); a pod without a group label is group 0's.
fn by_rank(pods: &[Pod], group: u32, rank: u32) -> Vec<&Pod> {
    let want = rank.to_string();
    pods.iter()
        .filter(|p| {
            let l = p.labels();
            l.get(build::LABEL_NODE_RANK) == Some(&want)
                && l.get(build::LABEL_GROUP)
                    .map_or(0, |g| g.parse().unwrap_or(u32::MAX))
                    == group
        })
        .collect()
}

/// Every group's step, in group order.
async fn execute(
    ctx: &Context,
    md: &MoEDeployment,
    pods_api: &Api<Pod>,
    pods: &[Pod],
    r: &Rollout,
) -> Result<(), Error> {
    for name in &r.relabel {
        let patch = serde_json::json!({"metadata": {"labels": {build::LABEL_GROUP: "0"}}});
        pods_api
            .patch(name, &PatchParams::default(), &Patch::Merge(&patch))
            .await?;
    }
    for s in &r.steps.groups {
        execute_group(ctx, md, pods_api, pods, r, s).await?;
    }
    Ok(())
}

/// One group's step, in the order `rollout::Step` prescribes: delete, create, push.
async fn execute_group(
    ctx: &Context,
    md: &MoEDeployment,
    pods_api: &Api<Pod>,
    pods: &[Pod],
    r: &Rollout,
    gs: &GroupStep,
) -> Result<(), Error> {
    let (step, plan, group) = (&gs.step, &r.plan, gs.group);
    let by_rank = |pods, rank| by_rank(pods, group, rank);
    for &rank in &step.expired {
        for p in by_rank(pods, rank) {
            let message = format!(
                "{} did not take plan {} in place (refused, or in flight past {:?}): replacing it",
                p.name_any(),
                plan.short_hash(),
                ctx.push_timeout
            );
            pod_event(ctx, md, p, true, reason::PLAN_PUSH_EXPIRED, message).await;
        }
    }
    // A group restart (a failed EP rank) is a step whose deletes are every worker pod; the
    // rollout of the next reconciles recreates them like any missing pod.
    for &rank in &step.delete {
        for p in by_rank(pods, rank)
            .into_iter()
            .filter(|p| p.metadata.deletion_timestamp.is_none())
        {
            pods_api
                .delete(&p.name_any(), &DeleteParams::default())
                .await?;
            let message = match &r.group_restart {
                None if r.cause == DeleteCause::Suspend => format!(
                    "deleted {} (node rank {rank}): spec.suspend is true",
                    p.name_any()
                ),
                None if r.cause == DeleteCause::GangRelease => format!(
                    "deleted {} (node rank {rank}): the worker group was not scheduled whole in time (scheduling.gang: Guard)",
                    p.name_any()
                ),
                Some(f) => format!(
                    "deleted {} (node rank {rank}) to restart the worker group after EP rank {} failed in {}",
                    p.name_any(),
                    f.rank,
                    f.pod
                ),
                None if gs.role == Role::Removed => format!(
                    "deleted {} (group {group}, node rank {rank}): the group is no longer wanted (spec.replicas {})",
                    p.name_any(),
                    md.spec.replicas
                ),
                None => format!("deleted {} (rank {rank}) to replace it", p.name_any()),
            };
            pod_event(ctx, md, p, false, reason::WORKER_REPLACED, message).await;
        }
    }
    for &rank in &step.create {
        if let Some(p) = r.desired.pod(group, rank) {
            let created = server_side_apply(pods_api, p).await?;
            let message = format!("created {}", p.name_any());
            pod_event(ctx, md, &created, false, reason::WORKER_CREATED, message).await;
        }
    }
    let json = serde_json::to_vec(plan)?;
    for &rank in step.push.iter().chain(step.in_flight.iter()) {
        for p in by_rank(pods, rank) {
            push(ctx, md, pods_api, p, r, &json, step.push.contains(&rank)).await?;
        }
    }
    Ok(())
}

/// Push the plan to one pod (a new push when `first`, else a re-send of one in flight).
async fn push(
    ctx: &Context,
    md: &MoEDeployment,
    pods_api: &Api<Pod>,
    p: &Pod,
    r: &Rollout,
    json: &[u8],
    first: bool,
) -> Result<(), Error> {
    let plan = &r.plan;
    let Some(ip) = pod_ip(p) else { return Ok(()) };
    if first {
        // Record the target before the PUT so a restarted operator knows a push is on, and when
        // it began, so that a push that never completes expires.
        annotate_since(
            pods_api,
            p,
            ANNOTATION_TARGET_PLAN,
            &plan.hash,
            ANNOTATION_TARGET_SINCE,
        )
        .await?;
    }
    let span = tracing::info_span!("push", pod = %p.name_any(), plan = %plan.short_hash());
    match ctx
        .workers
        .put_plan(&ip, r.admin_port, &r.token, json, PUSH_REQUEST_TIMEOUT)
        .instrument(span.clone())
        .await
    {
        Ok(()) => {
            tracing::info!(parent: &span, "plan pushed");
            if first {
                let message = format!("plan {} pushed to {}", plan.short_hash(), p.name_any());
                pod_event(ctx, md, p, false, reason::PLAN_PUSHED, message).await;
            }
        }
        Err(e) => {
            tracing::warn!(parent: &span, error = %e, "plan push failed");
            let refused = matches!(
                e,
                HttpError::Status {
                    status: 401 | 403,
                    ..
                }
            );
            let first_refusal = p.annotations().get(ANNOTATION_PUSH_REJECTED) != Some(&plan.hash);
            if refused && first_refusal {
                // The worker holds another admin token (the Secret was re-created). It re-reads
                // its token file, which the kubelet updates within about a minute; past the
                // refusal grace the rollout replaces it.
                let (key, since) = (ANNOTATION_PUSH_REJECTED, ANNOTATION_PUSH_REJECTED_SINCE);
                annotate_since(pods_api, p, key, &plan.hash, since).await?;
            }
            let why = if refused {
                reason::PLAN_PUSH_REFUSED
            } else {
                reason::PLAN_PUSH_FAILED
            };
            pod_event(ctx, md, p, true, why, format!("{}: {e}", p.name_any())).await;
        }
    }
    Ok(())
}

async fn patch_status(
    api: &Api<MoEDeployment>,
    name: &str,
    status: &MoEDeploymentStatus,
) -> Result<(), Error> {
    let patch = serde_json::json!({
        "apiVersion": "moe.craft.dev/v1alpha1",
        "kind": "MoEDeployment",
        "status": status,
    });
    let pp = PatchParams::apply(FIELD_MANAGER).force();
    api.patch_status(name, &pp, &Patch::Apply(&patch)).await?;
    Ok(())
}
