//! `kubectl moe` (also `moectl kube`): read MoEDeployments, their plan ConfigMaps and events from
//! the cluster, with the kubeconfig rules kubectl uses (`--kubeconfig`, else `KUBECONFIG`, else
//! `~/.kube/config`; `--context`; `-n`, else the context's namespace), and print them with
//! [`super::kube_view`].
//!
//! Install as a kubectl plugin: kubectl runs any `kubectl-moe` on PATH for `kubectl moe`, and
//! `moectl` answers as the plugin when it is invoked under that name, so a link is enough:
//! `ln -s "$(command -v moectl)" ~/.local/bin/kubectl-moe`.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Parser, Subcommand};
use k8s_openapi::api::core::v1::ConfigMap;
use k8s_openapi::api::events::v1::Event;
use kube::api::ListParams;
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, Config, ResourceExt};

use super::kube_view::{explain_view, plan_view, status_table, EventLine};
use crate::api::MoEDeployment;
use crate::controller::build::{plan_config_map_name, stored_plan, PLAN_KEY};
use crate::plan::ExpertPlan;

/// What `kubectl moe` takes: the connection flags and a verb.
#[derive(Args, Debug)]
pub struct KubeArgs {
    /// Path of the kubeconfig file (default: $KUBECONFIG, else ~/.kube/config).
    #[arg(long, global = true)]
    pub kubeconfig: Option<PathBuf>,
    /// The kubeconfig context to use (default: its current context).
    #[arg(long, global = true)]
    pub context: Option<String>,
    /// Namespace (default: the context's namespace, else `default`).
    #[arg(short, long, global = true)]
    pub namespace: Option<String>,
    #[command(subcommand)]
    pub verb: KubeVerb,
}

#[derive(Subcommand, Debug)]
pub enum KubeVerb {
    /// Every MoEDeployment of the namespace (or all with -A): Ready, plan, R, balancedness,
    /// workers, rollout progress.
    Status {
        /// List MoEDeployments in all namespaces.
        #[arg(short = 'A', long)]
        all_namespaces: bool,
    },
    /// The plan in force (from the NAME-plan ConfigMap): per-layer replicas and balancedness,
    /// replica memory per GPU.
    Plan {
        name: String,
        /// A load trace (any format `moectl plan --load` reads) to replay on the plan for the
        /// per-layer balancedness, e.g. one written by `moectl observe`.
        #[arg(long)]
        load: Option<PathBuf>,
        /// Print the plan's JSON instead of the summary.
        #[arg(long)]
        json: bool,
    },
    /// Conditions with reasons, rollout progress, why the last re-plan did or did not roll out,
    /// and recent events.
    Explain { name: String },
}

/// The parser used when the binary runs as `kubectl-moe`.
#[derive(Parser, Debug)]
#[command(
    name = "kubectl moe",
    version,
    about = "Inspect MoEDeployments: plans, balancedness, rollouts"
)]
pub struct KubectlMoe {
    #[command(flatten)]
    pub args: KubeArgs,
}

/// Whether the process was started as the kubectl plugin (`kubectl-moe`, a link to `moectl`).
pub fn invoked_as_plugin(argv0: &std::ffi::OsStr) -> bool {
    std::path::Path::new(argv0)
        .file_stem()
        .and_then(|s| s.to_str())
        .is_some_and(|s| s == "kubectl-moe" || s == "kubectl_moe")
}

async fn client(a: &KubeArgs) -> anyhow::Result<(Client, String)> {
    let opts = KubeConfigOptions {
        context: a.context.clone(),
        ..Default::default()
    };
    let config = match &a.kubeconfig {
        Some(path) => {
            let kc = Kubeconfig::read_from(path)
                .with_context(|| format!("reading kubeconfig {}", path.display()))?;
            Config::from_custom_kubeconfig(kc, &opts)
                .await
                .with_context(|| format!("loading kubeconfig {}", path.display()))?
        }
        None if a.context.is_some() => Config::from_kubeconfig(&opts)
            .await
            .context("loading the kubeconfig ($KUBECONFIG or ~/.kube/config)")?,
        None => Config::infer()
            .await
            .context("no kubeconfig: set KUBECONFIG, pass --kubeconfig, or run inside a cluster")?,
    };
    let ns = a
        .namespace
        .clone()
        .unwrap_or_else(|| config.default_namespace.clone());
    Ok((Client::try_from(config)?, ns))
}

fn now_s() -> i64 {
    k8s_openapi::jiff::Timestamp::now().as_second()
}

fn event_line(e: &Event) -> EventLine {
    let at = e
        .series
        .as_ref()
        .map(|s| s.last_observed_time.0.as_second())
        .or_else(|| e.event_time.as_ref().map(|t| t.0.as_second()))
        .or_else(|| {
            e.deprecated_last_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
        })
        .or_else(|| {
            e.metadata
                .creation_timestamp
                .as_ref()
                .map(|t| t.0.as_second())
        })
        .unwrap_or(0);
    EventLine {
        at_s: at,
        kind: e.type_.clone().unwrap_or_default(),
        reason: e.reason.clone().unwrap_or_default(),
        note: e.note.clone().unwrap_or_default(),
        count: e
            .series
            .as_ref()
            .map(|s| s.count)
            .or(e.deprecated_count)
            .unwrap_or(1),
    }
}

async fn get_md(api: &Api<MoEDeployment>, ns: &str, name: &str) -> anyhow::Result<MoEDeployment> {
    api.get_opt(name)
        .await
        .with_context(|| format!("reading MoEDeployment {ns}/{name}"))?
        .ok_or_else(|| {
            anyhow::anyhow!(
                "MoEDeployment {ns}/{name} not found: list them with `kubectl moe status -A`"
            )
        })
}

/// Run a verb and return what to print.
pub async fn render(a: &KubeArgs) -> anyhow::Result<String> {
    let (client, ns) = client(a).await?;
    match &a.verb {
        KubeVerb::Status { all_namespaces } => {
            let api: Api<MoEDeployment> = if *all_namespaces {
                Api::all(client)
            } else {
                Api::namespaced(client, &ns)
            };
            let mut items = api
                .list(&ListParams::default())
                .await
                .context("listing MoEDeployments (is the CRD installed?)")?
                .items;
            items.sort_by_key(|m| (m.namespace(), m.name_any()));
            Ok(status_table(&items, *all_namespaces, now_s()))
        }
        KubeVerb::Plan { name, load, json } => {
            let mds: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
            let md = get_md(&mds, &ns, name).await?;
            let cm_name = plan_config_map_name(&md);
            let cm = Api::<ConfigMap>::namespaced(client, &ns)
                .get_opt(&cm_name)
                .await
                .with_context(|| format!("reading ConfigMap {ns}/{cm_name}"))?
                .ok_or_else(|| {
                    anyhow::anyhow!(
                        "ConfigMap {ns}/{cm_name} not found: the operator has not planned {name} yet (see `kubectl moe explain {name}`)"
                    )
                })?;
            let plan: ExpertPlan = stored_plan(&cm)
                .ok_or_else(|| anyhow::anyhow!("ConfigMap {ns}/{cm_name} has no {PLAN_KEY} key"))?
                .map_err(|e| {
                    anyhow::anyhow!("ConfigMap {ns}/{cm_name} key {PLAN_KEY} is not a plan: {e}")
                })?;
            if *json {
                return Ok(format!("{}\n", serde_json::to_string_pretty(&plan)?));
            }
            let eval = match load {
                Some(path) => {
                    let w = crate::plan::load_formats::read_load_file(path)
                        .map_err(|e| anyhow::anyhow!("{e}"))?;
                    Some(
                        crate::plan::balance::evaluate(&plan, &w)
                            .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
                    )
                }
                None => None,
            };
            Ok(plan_view(&md, &plan, eval.as_ref(), now_s()))
        }
        KubeVerb::Explain { name } => {
            let mds: Api<MoEDeployment> = Api::namespaced(client.clone(), &ns);
            let md = get_md(&mds, &ns, name).await?;
            let uid = md.metadata.uid.clone();
            // Events name the object by kind, name and uid; filtering here works on every
            // apiserver version (field selectors on events.k8s.io differ between them).
            let events: Vec<EventLine> = Api::<Event>::namespaced(client, &ns)
                .list(&ListParams::default())
                .await
                .with_context(|| format!("listing events in {ns}"))?
                .items
                .iter()
                .filter(|e| {
                    e.regarding.as_ref().is_some_and(|r| {
                        r.kind.as_deref() == Some("MoEDeployment")
                            && r.name.as_deref() == Some(name.as_str())
                            && (r.uid.is_none() || r.uid == uid)
                    })
                })
                .map(event_line)
                .collect();
            Ok(explain_view(&md, &events, now_s()))
        }
    }
}

pub fn run(a: KubeArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let out = rt.block_on(render(&a))?;
    print!("{out}");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plugin_name_detection() {
        for (argv0, yes) in [
            ("/usr/local/bin/kubectl-moe", true),
            ("kubectl-moe", true),
            ("kubectl_moe", true),
            ("moectl", false),
            ("/x/kubectl-moe-old/moectl", false),
        ] {
            assert_eq!(
                invoked_as_plugin(std::ffi::OsStr::new(argv0)),
                yes,
                "{argv0}"
            );
        }
    }

    #[test]
    fn plugin_flags_parse_like_kubectl() {
        let p = KubectlMoe::try_parse_from(["kubectl-moe", "status", "-A"]).unwrap();
        assert!(matches!(
            p.args.verb,
            KubeVerb::Status {
                all_namespaces: true
            }
        ));
        let p = KubectlMoe::try_parse_from([
            "kubectl-moe",
            "plan",
            "demo",
            "-n",
            "ml",
            "--kubeconfig",
            "/k",
        ])
        .unwrap();
        assert_eq!(p.args.namespace.as_deref(), Some("ml"));
        assert_eq!(p.args.kubeconfig, Some(PathBuf::from("/k")));
        assert!(matches!(p.args.verb, KubeVerb::Plan { ref name, .. } if name == "demo"));
        let p = KubectlMoe::try_parse_from(["kubectl-moe", "-n", "x", "explain", "demo"]).unwrap();
        assert_eq!(p.args.namespace.as_deref(), Some("x"));
        assert!(KubectlMoe::try_parse_from(["kubectl-moe", "explain"]).is_err());
    }
}
