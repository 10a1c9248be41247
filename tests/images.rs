//! The container images agree with what runs them. scripts/images.sh builds them from
//! images/NAME.json (the image config: user, entrypoint, cmd, ports); scripts/images-test.sh runs
//! them. Here, without building: the worker image exposes the ports the CRD defaults give the
//! workers, runs as the numeric non-root user the worker pods' `runAsNonRoot` needs, and its
//! ENTRYPOINT is the program the operator's pods name. The operator image exposes the ports the
//! chart and the binary use, runs as the chart's user, and its ENTRYPOINT + CMD are what the
//! chart's container (no `command`, `args` replacing CMD) and the local control plane's image
//! mapping expect. The CUDA wheels are the versions the worker's cudarc features are built for.

mod common;

use std::collections::BTreeSet;

use moe_operator::api::{DataPlaneSpec, MoEDeployment, WorkerPorts};
use serde_json::Value;

/// An image's config as images/NAME.json gives it to scripts/images.sh.
#[derive(Debug, Default)]
struct Image {
    expose: BTreeSet<i32>,
    user: Option<String>,
    entrypoint: Vec<String>,
    cmd: Vec<String>,
}

fn image(name: &str) -> Image {
    let path = common::repo().join("images").join(format!("{name}.json"));
    let text = std::fs::read_to_string(&path)
        .unwrap_or_else(|e| panic!("reading {}: {e}", path.display()));
    let v: Value =
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(v["name"], name, "{}: name", path.display());
    let strings = |k: &str| -> Vec<String> {
        v[k].as_array()
            .unwrap_or_else(|| panic!("{}: {k} is not a list", path.display()))
            .iter()
            .map(|s| s.as_str().unwrap().to_string())
            .collect()
    };
    Image {
        expose: v["expose"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p.as_i64().unwrap() as i32)
            .collect(),
        user: v["user"].as_str().map(str::to_string),
        entrypoint: strings("entrypoint"),
        cmd: strings("cmd"),
    }
}

/// `uid:gid` of a numeric USER; None for a name (the kubelet cannot check a name is non-root).
fn numeric_user(user: &str) -> Option<(i64, i64)> {
    let (u, g) = user.split_once(':').unwrap_or((user, user));
    Some((u.parse().ok()?, g.parse().ok()?))
}

/// The chart's operator Deployment, rendered with the default values.
fn chart_deployment() -> Value {
    common::chart::render(&[])
        .into_iter()
        .find(|d| d["kind"] == "Deployment")
        .expect("the chart renders a Deployment")
}

#[test]
fn worker_image_matches_the_crd_defaults_and_the_worker_pods() {
    let img = image("moe-worker");
    let ports = WorkerPorts::default();
    let want: BTreeSet<i32> = [
        ports.dispatch,
        ports.metrics,
        ports.admin,
        DataPlaneSpec::default().port,
    ]
    .into();
    assert_eq!(
        img.expose, want,
        "images/moe-worker.json expose: the defaults of spec.worker.ports and spec.dataPlane.port"
    );

    // A worker pod as the operator builds it from the sample.
    let text = std::fs::read_to_string(common::repo().join("examples/demo.yaml")).unwrap();
    let mut md: MoEDeployment = serde_yaml::from_str(&text).unwrap();
    md.metadata.uid = Some("u".into());
    let policy = moe_operator::api::pod_policy::PodPolicy {
        host_path_prefixes: vec!["/var/lib/moe".into()],
        ..Default::default()
    };
    let spec = moe_operator::api::validate::validate(&md.spec, &policy)
        .expect("examples/demo.yaml validates");
    let pod = moe_operator::controller::build::worker_pod(&md, &spec, 0, "h").unwrap();
    let pod_spec = pod.spec.unwrap();
    let c = &pod_spec.containers[0];
    for p in c.ports.iter().flatten() {
        assert!(
            img.expose.contains(&p.container_port),
            "the worker container's port {:?} {} is not EXPOSEd",
            p.name,
            p.container_port
        );
    }
    // runAsNonRoot without runAsUser: the kubelet takes the image's USER and refuses to start
    // unless it is a numeric, non-zero uid.
    let psc = pod_spec.security_context.unwrap();
    assert_eq!(psc.run_as_non_root, Some(true));
    let run_as_user = psc
        .run_as_user
        .or(c.security_context.as_ref().and_then(|s| s.run_as_user));
    if run_as_user.is_none() {
        let user = img
            .user
            .as_deref()
            .expect("images/moe-worker.json sets user");
        let (uid, gid) = numeric_user(user).unwrap_or_else(|| {
            panic!("images/moe-worker.json user {user:?} must be numeric uid:gid")
        });
        assert!(uid > 0 && gid > 0, "USER {user} is root");
    }
    // The pod names the program; the image has it where PATH finds it.
    let command = c.command.clone().unwrap_or_default();
    assert_eq!(img.entrypoint.len(), 1, "{:?}", img.entrypoint);
    let entry = std::path::Path::new(&img.entrypoint[0]);
    assert_eq!(
        entry.file_name().unwrap().to_str(),
        command.first().map(String::as_str),
        "the worker pods run {command:?}; the image's ENTRYPOINT is {entry:?}"
    );
    assert_eq!(
        entry.parent().unwrap(),
        std::path::Path::new("/usr/local/bin"),
        "the pods find {command:?} on the default PATH"
    );
}

#[test]
fn operator_image_matches_the_chart_and_the_binary() {
    let img = image("moe-operator");
    let values: Value = serde_yaml::from_str(
        &std::fs::read_to_string(common::repo().join("charts/moe-operator/values.yaml")).unwrap(),
    )
    .unwrap();
    let chart_ports: BTreeSet<i32> = [
        values["metrics"]["port"].as_i64().unwrap() as i32,
        values["health"]["port"].as_i64().unwrap() as i32,
    ]
    .into();
    assert_eq!(
        img.expose, chart_ports,
        "images/moe-operator.json expose: the chart's metrics.port and health.port"
    );
    // The binary's own defaults, from its --help.
    let help = std::process::Command::new(env!("CARGO_BIN_EXE_moe-operator"))
        .args(["run", "--help"])
        .output()
        .expect("moe-operator run --help");
    let help = String::from_utf8_lossy(&help.stdout);
    for port in &img.expose {
        assert!(
            help.contains(&format!("[default: 0.0.0.0:{port}]")),
            "moe-operator run does not listen on {port} by default:\n{help}"
        );
    }

    let d = chart_deployment();
    let pod = &d["spec"]["template"]["spec"];
    let sc = &pod["securityContext"];
    let user = img
        .user
        .as_deref()
        .expect("images/moe-operator.json sets user");
    assert_eq!(
        numeric_user(user),
        Some((
            sc["runAsUser"].as_i64().unwrap(),
            sc["runAsGroup"].as_i64().unwrap()
        )),
        "USER {user} against the chart's podSecurityContext {sc}"
    );
    assert_eq!(sc["runAsNonRoot"], true);
    let c = &pod["containers"][0];
    // No command: the image's ENTRYPOINT runs, with the chart's args in place of CMD.
    assert!(c.get("command").is_none(), "{c}");
    assert_eq!(
        c["args"][0].as_str(),
        img.cmd.first().map(String::as_str),
        "the chart's args replace CMD {:?}; both start with the subcommand",
        img.cmd
    );
    let ports: BTreeSet<i32> = c["ports"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["containerPort"].as_i64().unwrap() as i32)
        .collect();
    assert_eq!(ports, img.expose);
    // The image and the local control plane's stand-in for it (e2e/cluster.sh maps the chart's
    // image repository to the program the ENTRYPOINT runs).
    let repo = values["image"]["repository"].as_str().unwrap();
    assert_eq!(img.entrypoint.len(), 1, "{:?}", img.entrypoint);
    let program = std::path::Path::new(&img.entrypoint[0])
        .file_name()
        .unwrap()
        .to_str()
        .unwrap()
        .to_string();
    assert_eq!(program, "moe-operator");
    let cluster_sh = std::fs::read_to_string(common::repo().join("e2e/cluster.sh")).unwrap();
    assert!(
        cluster_sh.contains(&format!("{repo}={program}")),
        "e2e/cluster.sh does not map {repo} to {program}"
    );
}

/// `name==version` pins of images/cuda-wheels.txt.
fn wheel_pins() -> Vec<(String, String)> {
    let text = std::fs::read_to_string(common::repo().join("images/cuda-wheels.txt")).unwrap();
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let pin = l.split_whitespace().next().unwrap();
            assert!(
                l.contains("--hash=sha256:"),
                "{pin} is not pinned by sha256"
            );
            let (n, v) = pin.split_once("==").expect("name==version");
            (n.to_string(), v.to_string())
        })
        .collect()
}

#[test]
fn cuda_wheels_match_the_cudarc_features() {
    // cudarc's `cuda-MMmmm` and `nccl-0MMmm` features pick the API the worker is built against.
    let manifest = std::fs::read_to_string(common::repo().join("Cargo.toml")).unwrap();
    let cudarc = manifest
        .lines()
        .find(|l| l.starts_with("cudarc"))
        .expect("cudarc in Cargo.toml");
    let feature = |prefix: &str| -> String {
        cudarc
            .split('"')
            .find_map(|f| f.strip_prefix(prefix))
            .unwrap_or_else(|| panic!("no {prefix}* feature: {cudarc}"))
            .to_string()
    };
    let cuda = feature("cuda-"); // e.g. 13000
    let cuda = format!(
        "{}.{}.",
        &cuda[..2],
        cuda[2..4].trim_start_matches('0').max("0")
    );
    let nccl = feature("nccl-"); // e.g. 02028
    let nccl = format!(
        "{}.{}.",
        nccl[..2].trim_start_matches('0'),
        nccl[2..].trim_start_matches('0')
    );
    let pins = wheel_pins();
    let version = |name: &str| -> &str {
        &pins
            .iter()
            .find(|(n, _)| n == name)
            .unwrap_or_else(|| panic!("images/cuda-wheels.txt lacks {name}"))
            .1
    };
    for w in ["nvidia-cublas", "nvidia-cuda-nvrtc"] {
        assert!(
            version(w).starts_with(&cuda),
            "{w} {} is not CUDA {cuda}x, which cudarc is built for",
            version(w)
        );
    }
    assert!(
        version("nvidia-nccl-cu13").starts_with(&nccl),
        "nvidia-nccl-cu13 {} is not NCCL {nccl}x, which cudarc is built for",
        version("nvidia-nccl-cu13")
    );
    // Every library the worker image takes is in one of them (by its directory in the wheels).
    let libs =
        std::fs::read_to_string(common::repo().join("images/moe-worker-cuda-libs.txt")).unwrap();
    for l in libs
        .lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
    {
        assert!(
            l.starts_with("nvidia/cu13/lib/") || l.starts_with("nvidia/nccl/lib/"),
            "{l}"
        );
    }
}
