//! The reconcile's reads from the API server: the status, the stored plan, the initial load, the
//! admin token and the worker pods. I/O only.

use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::ListParams;
use kube::{Api, Client, ResourceExt};

use super::build::{self, admin_secret_name, plan_config_map_name, LABEL_DEPLOYMENT, TOKEN_KEY};
use super::reconcile::Error;
use crate::api::validate::ValidSpec;
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
