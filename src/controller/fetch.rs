//! The reconcile's reads from the API server: the status, the stored plan, the initial load, the
//! admin token, the worker pods, and (when Prometheus is queried) the credentials and CA that
//! `metrics.prometheus` names. I/O only.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::build::{self, admin_secret_name, plan_config_map_name, LABEL_DEPLOYMENT, TOKEN_KEY};
use super::prometheus::{auth_from_secret, Access};
use super::reconcile::Error;
use crate::api::validate::{AuthRef, CaRef, ValidSpec};
use crate::api::{MoEDeployment, MoEDeploymentStatus};
use crate::plan::ExpertPlan;

/// What the cluster holds for one deployment.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Fetched {
    /// The status in the API server (not the watch cache's, which may predate our last write).
    pub status: MoEDeploymentStatus,
    /// The plan in the plan ConfigMap, when it holds a well-formed, sealed one.
    pub stored_plan: Option<ExpertPlan>,
    /// `spec.initialLoad`'s ConfigMap (`None` inside when it does not exist); read only while no
    /// stored plan fits the spec, since only the first plan comes from it.
    pub initial_load: Option<Option<ConfigMap>>,
    /// The workers' admin token: the Secret's, or a freshly minted one when it had none.
    pub token: String,
    /// The token was minted now.
    pub minted: bool,
    /// The deployment's worker pods (labelled and owned by it).
    pub pods: Vec<Pod>,
}

/// The deployment's status as the API server has it; `None` when the object is gone.
pub async fn status(
    api: &Api<MoEDeployment>,
    name: &str,
) -> Result<Option<MoEDeploymentStatus>, Error> {
    Ok(api
        .get_opt(name)
        .await?
        .map(|md| md.status.unwrap_or_default()))
}

/// Everything else `decide` reads, for a deployment (in namespace `ns`) whose spec is valid.
pub async fn fetch(
    client: &Client,
    md: &MoEDeployment,
    ns: &str,
    spec: &ValidSpec,
    status: MoEDeploymentStatus,
) -> Result<Fetched, Error> {
    let cms: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
    let secrets: Api<Secret> = Api::namespaced(client.clone(), ns);
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);

    // A ConfigMap that does not parse (edited by hand, truncated) holds no plan: a new one is made.
    let stored_plan = cms
        .get_opt(&plan_config_map_name(md))
        .await?
        .and_then(|cm| build::stored_plan(&cm))
        .and_then(Result::ok);
    let fits = stored_plan
        .as_ref()
        .is_some_and(|p| build::check_plan(spec, p).is_ok());
    let initial_load = match (&md.spec.initial_load, fits) {
        (Some(sel), false) => Some(cms.get_opt(&sel.name).await?),
        _ => None,
    };
    let stored_token = secrets
        .get_opt(&admin_secret_name(md))
        .await?
        .and_then(|s| s.data.and_then(|mut d| d.remove(TOKEN_KEY)))
        .and_then(|b| String::from_utf8(b.0).ok())
        .filter(|t| !t.is_empty());
    let minted = stored_token.is_none();
    let token = stored_token.unwrap_or_else(build::new_admin_token);
    let pods = pods
        .list(&ListParams::default().labels(&format!("{LABEL_DEPLOYMENT}={}", md.name_any())))
        .await?
        .items
        .into_iter()
        .filter(|p| {
            p.owner_references()
                .iter()
                .any(|o| Some(&o.uid) == md.metadata.uid.as_ref())
        })
        .collect();
    Ok(Fetched {
        status,
        stored_plan,
        initial_load,
        token,
        minted,
        pods,
    })
}

/// `metrics.prometheus.auth` or `.ca` cannot be used: the field, and what is wrong (never a
/// credential).
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{field}: {message}")]
pub struct AccessError {
    pub field: &'static str,
    pub message: String,
}

/// The credentials and CA bundle `auth` and `ca` name, read with `get` by name from namespace
/// `ns` (the operator lists and watches no Secret; a changed Secret is read at the next query).
pub async fn prometheus_access(
    client: &Client,
    ns: &str,
    auth: Option<&AuthRef>,
    ca: Option<&CaRef>,
) -> Result<Access, AccessError> {
    let mut access = Access::default();
    if let Some(r) = auth {
        let field = r.field();
        let data = secret_data(client, ns, r.secret())
            .await
            .map_err(|message| AccessError { field, message })?;
        access.auth = Some(
            auth_from_secret(r, ns, data.as_ref())
                .map_err(|message| AccessError { field, message })?,
        );
    }
    if let Some(r) = ca {
        let field = r.field();
        let what = r.describe(ns);
        let fail = |problem: String| AccessError {
            field,
            message: format!(
                "{problem}: give the PEM bundle of the CA that signed Prometheus' certificate"
            ),
        };
        let pem = match r {
            CaRef::Secret { name, key } => secret_data(client, ns, name)
                .await
                .map_err(|m| AccessError { field, message: m })?
                .map(|mut d| d.remove(key)),
            CaRef::ConfigMap { name, key } => {
                let api: Api<ConfigMap> = Api::namespaced(client.clone(), ns);
                api.get_opt(name)
                    .await
                    .map_err(|e| AccessError {
                        field,
                        message: format!("reading ConfigMap {ns}/{name}: {e}"),
                    })?
                    .map(|cm| {
                        cm.data
                            .and_then(|mut d| d.remove(key).map(String::into_bytes))
                            .or_else(|| cm.binary_data.and_then(|mut d| d.remove(key).map(|b| b.0)))
                    })
            }
        };
        let pem = match pem {
            None => return Err(fail(format!("{what}: the object does not exist"))),
            Some(None) => return Err(fail(format!("{what}: the object has no such key"))),
            Some(Some(pem)) => pem,
        };
        access = access
            .with_ca_pem(&pem)
            .map_err(|problem| fail(format!("{what} {problem}")))?;
    }
    Ok(access)
}

/// The `data` of Secret `ns/name`, `None` when it does not exist.
async fn secret_data(
    client: &Client,
    ns: &str,
    name: &str,
) -> Result<Option<std::collections::BTreeMap<String, Vec<u8>>>, String> {
    let api: Api<Secret> = Api::namespaced(client.clone(), ns);
    let s = api.get_opt(name).await.map_err(|e| match e {
        kube::Error::Api(s) if s.code == 403 => format!(
            "reading Secret {ns}/{name}: forbidden: the operator's ServiceAccount needs get on secrets in this namespace (the chart's ClusterRole grants it)"
        ),
        e => format!("reading Secret {ns}/{name}: {e}"),
    })?;
    Ok(s.map(|s| {
        s.data
            .unwrap_or_default()
            .into_iter()
            .map(|(k, v)| (k, v.0))
            .collect()
    }))
}
