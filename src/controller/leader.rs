//! Leader election on a `coordination.k8s.io/v1` Lease: get, create or take over with the
//! resourceVersion as the optimistic lock, renew every `renew` while leading, look every `retry`
//! while standing by. Only the leader runs the controller; losing the Lease stops this process's
//! controller (the caller exits so that a restart starts as a standby). A leader that shuts down
//! [`release`]s the Lease once its controller has stopped, so a standby takes over within one
//! `retry` instead of waiting out `duration`.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta};
use k8s_openapi::jiff::Timestamp;
use kube::api::PostParams;
use kube::{Api, Client};
use tokio::time::Instant;

/// Lease timing.
#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
    pub renew: Duration,
    /// How often a standby looks whether the Lease is free.
    pub retry: Duration,
}

/// Whether `spec` is free for `identity` at `now_s`: unheld, held by us, or expired.
pub fn may_take(spec: Option<&LeaseSpec>, identity: &str, now_s: f64) -> bool {
    let Some(s) = spec else { return true };
    match s.holder_identity.as_deref() {
        None | Some("") => true,
        Some(h) if h == identity => true,
        Some(_) => {
            let renewed = s
                .renew_time
                .as_ref()
                .or(s.acquire_time.as_ref())
                .map(|t| t.0.as_millisecond() as f64 / 1000.0)
                .unwrap_or(0.0);
            let dur = f64::from(s.lease_duration_seconds.unwrap_or(15));
            now_s > renewed + dur
        }
    }
}

fn now_s() -> f64 {
    Timestamp::now().as_millisecond() as f64 / 1000.0
}

/// One attempt to acquire or renew. `Ok(true)`: we hold the Lease now.
pub async fn try_acquire(api: &Api<Lease>, cfg: &LeaseConfig) -> Result<bool, kube::Error> {
    let now = MicroTime(Timestamp::now());
    match api.get_opt(&cfg.name).await? {
        None => {
            let lease = Lease {
                metadata: ObjectMeta {
                    name: Some(cfg.name.clone()),
                    namespace: Some(cfg.namespace.clone()),
                    ..Default::default()
                },
                spec: Some(LeaseSpec {
                    holder_identity: Some(cfg.identity.clone()),
                    lease_duration_seconds: Some(cfg.duration.as_secs() as i32),
                    acquire_time: Some(now.clone()),
                    renew_time: Some(now),
                    lease_transitions: Some(0),
                    ..Default::default()
                }),
            };
            match api.create(&PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
        Some(mut lease) => {
            if !may_take(lease.spec.as_ref(), &cfg.identity, now_s()) {
                return Ok(false);
            }
            let spec = lease.spec.get_or_insert_with(Default::default);
            if spec.holder_identity.as_deref() != Some(cfg.identity.as_str()) {
                spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                spec.acquire_time = Some(now.clone());
                spec.holder_identity = Some(cfg.identity.clone());
            }
            spec.lease_duration_seconds = Some(cfg.duration.as_secs() as i32);
            spec.renew_time = Some(now);
            // replace carries metadata.resourceVersion: a concurrent writer makes this a 409.
            match api.replace(&cfg.name, &PostParams::default(), &lease).await {
                Ok(_) => Ok(true),
                Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                Err(e) => Err(e),
            }
        }
    }
}

/// Wait until this process holds the Lease. Returns when the winning request was sent: the Lease
/// counts from then. `answered` is called after every attempt the API server answered (the
/// replica knows its role then: readiness hangs on that, not on leading).
pub async fn acquire(client: Client, cfg: &LeaseConfig, answered: impl Fn()) -> Instant {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    loop {
        let sent = Instant::now();
        // A request that hangs must not hold a standby back from a free Lease forever.
        let r = tokio::time::timeout(cfg.duration, try_acquire(&api, cfg)).await;
        if matches!(r, Ok(Ok(_))) {
            answered();
        }
        match r {
            Ok(Ok(true)) => return sent,
            Ok(Ok(false)) => tracing::debug!(lease = %cfg.name, "standby: the Lease is held"),
            Ok(Err(e)) => tracing::warn!(error = %e, lease = %cfg.name, "Lease request failed"),
            Err(_) => tracing::warn!(lease = %cfg.name, "Lease request timed out"),
        }
        tokio::time::sleep(cfg.retry).await;
    }
}

/// How long the next renewal may take, given the time since the last successful one was sent:
/// until the Lease would expire, less a margin for stopping. `None` when that time is up, and the
/// leader must stop acting now, before another replica may take the Lease.
pub fn renew_deadline(since_last_renewal: Duration, cfg: &LeaseConfig) -> Option<Duration> {
    let margin = cfg.renew / 2;
    cfg.duration
        .checked_sub(since_last_renewal)?
        .checked_sub(margin)
        .filter(|d| !d.is_zero())
}

/// Renew every `renew` while leading, from `acquired` (when the winning request was sent). Returns
/// when another holder took the Lease, or when no renewal could complete before the Lease would
/// expire (each request runs under that deadline, so a frozen API server cannot keep a stale
/// leader acting); the caller then stops acting at once.
pub async fn hold(client: Client, cfg: LeaseConfig, acquired: Instant) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let mut last_ok = acquired;
    loop {
        tokio::time::sleep(cfg.renew).await;
        let Some(deadline) = renew_deadline(last_ok.elapsed(), &cfg) else {
            tracing::error!(lease = %cfg.name, "could not renew the Lease in time");
            return;
        };
        let sent = Instant::now();
        match tokio::time::timeout(deadline, try_acquire(&api, &cfg)).await {
            Ok(Ok(true)) => last_ok = sent,
            Ok(Ok(false)) => {
                tracing::error!(lease = %cfg.name, "lost the Lease to another holder");
                return;
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "renewing the Lease failed"),
            Err(_) => tracing::warn!(?deadline, "renewing the Lease timed out"),
        }
        if renew_deadline(last_ok.elapsed() + cfg.renew, &cfg).is_none() {
            // The next attempt would start too late to matter: stop now.
            tracing::error!(lease = %cfg.name, "could not renew the Lease in time");
            return;
        }
    }
}

/// The Lease as a leader leaves it: no holder, so [`may_take`] lets any replica take it at once
/// (client-go's ReleaseOnCancel does the same). None when `identity` does not hold it: a Lease
/// someone else took is not ours to clear.
pub fn released(spec: Option<&LeaseSpec>, identity: &str, now: MicroTime) -> Option<LeaseSpec> {
    let s = spec?;
    if s.holder_identity.as_deref() != Some(identity) {
        return None;
    }
    Some(LeaseSpec {
        holder_identity: None,
        lease_duration_seconds: Some(1),
        acquire_time: Some(now.clone()),
        renew_time: Some(now),
        ..s.clone()
    })
}

/// Give the Lease up (call only once this process has stopped acting). Optimistic like the rest:
/// a Lease that changed hands meanwhile is left alone. Runs under `cfg.renew`; on failure the Lease
/// simply expires after `duration`.
pub async fn release(client: Client, cfg: &LeaseConfig) {
    let api: Api<Lease> = Api::namespaced(client, &cfg.namespace);
    let attempt = async {
        let Some(mut lease) = api.get_opt(&cfg.name).await? else {
            return Ok::<bool, kube::Error>(false);
        };
        let Some(spec) = released(
            lease.spec.as_ref(),
            &cfg.identity,
            MicroTime(Timestamp::now()),
        ) else {
            return Ok(false);
        };
        lease.spec = Some(spec);
        api.replace(&cfg.name, &PostParams::default(), &lease)
            .await
            .map(|_| true)
    };
    match tokio::time::timeout(cfg.renew, attempt).await {
        Ok(Ok(true)) => tracing::info!(lease = %cfg.name, "released the Lease"),
        Ok(Ok(false)) => {
            tracing::info!(lease = %cfg.name, "the Lease is not ours: nothing to release")
        }
        Ok(Err(e)) => {
            tracing::warn!(error = %e, lease = %cfg.name, "releasing the Lease failed; it expires on its own")
        }
        Err(_) => {
            tracing::warn!(lease = %cfg.name, "releasing the Lease timed out; it expires on its own")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(holder: &str, renewed_s: i64, dur: i32) -> LeaseSpec {
        LeaseSpec {
            holder_identity: Some(holder.into()),
            renew_time: Some(MicroTime(Timestamp::from_second(renewed_s).unwrap())),
            lease_duration_seconds: Some(dur),
            ..Default::default()
        }
    }

    #[test]
    fn renewals_run_under_the_time_left_on_the_lease() {
        let cfg = LeaseConfig {
            namespace: "n".into(),
            name: "l".into(),
            identity: "a".into(),
            duration: Duration::from_secs(15),
            renew: Duration::from_secs(5),
            retry: Duration::from_secs(2),
        };
        let s = Duration::from_secs;
        assert_eq!(
            renew_deadline(s(5), &cfg),
            Some(Duration::from_millis(7500))
        );
        assert_eq!(
            renew_deadline(s(12), &cfg),
            Some(Duration::from_millis(500))
        );
        assert_eq!(renew_deadline(Duration::from_millis(12_500), &cfg), None);
        assert_eq!(renew_deadline(s(40), &cfg), None);
    }

    #[test]
    fn free_own_or_expired_leases_may_be_taken() {
        assert!(may_take(None, "a", 100.0));
        assert!(may_take(Some(&LeaseSpec::default()), "a", 100.0));
        assert!(may_take(Some(&spec("a", 95, 15)), "a", 100.0));
        assert!(!may_take(Some(&spec("b", 95, 15)), "a", 100.0));
        assert!(may_take(Some(&spec("b", 80, 15)), "a", 100.0));
    }

    #[test]
    fn a_released_lease_is_free_at_once_and_only_the_holder_releases() {
        let now = MicroTime(Timestamp::from_second(100).unwrap());
        let mut held = spec("a", 99, 15);
        held.lease_transitions = Some(3);
        let r = released(Some(&held), "a", now.clone()).expect("a holds it");
        assert_eq!(r.holder_identity, None);
        assert_eq!(r.lease_transitions, Some(3));
        // Not expired (renewed just now), yet free for the standby.
        assert!(may_take(Some(&r), "b", 100.0));
        assert_eq!(released(Some(&held), "b", now.clone()), None);
        assert_eq!(released(None, "a", now), None);
    }
}
