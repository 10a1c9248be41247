//! `moectl calibrate` and `--step-tokens`: the cost model fitted to the recorded H200 run, and the
//! predicted step next to balancedness, with the decode/prefill difference the model exists for.

use std::process::Command;

mod common;

fn moectl(args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_moectl"))
        .args(args)
        .current_dir(common::repo())
        .output()
        .expect("moectl runs");
    assert!(
        out.status.success(),
        "moectl {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn calibrate_fits_the_recorded_run_and_compare_predicts_step_time() {
    let dir = tempfile::tempdir().unwrap();
    let model = dir.path().join("h200.json");
    let said = moectl(&[
        "calibrate",
        "--bench-json",
        "benches/results/worker-gpu-2026-12-04-2124.json",
        "-o",
        model.to_str().unwrap(),
    ]);
    assert!(said.starts_with("launch "), "{said}");
    let c: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&model).unwrap()).unwrap();
    assert_eq!(c["bytesPerS"].as_f64(), Some(4.22e12), "{c}");

    let trace = dir.path().join("trace.json");
    moectl(&[
        "bench",
        "trace",
        "--layers",
        "4",
        "--experts",
        "32",
        "--batches",
        "4",
        "--top-k",
        "4",
        "--seed",
        "3",
        "-o",
        trace.to_str().unwrap(),
    ]);
    let step = |tokens: &str, dispatch: &str| -> Vec<(String, u32, f64)> {
        let out = moectl(&[
            "compare",
            "--load",
            trace.to_str().unwrap(),
            "--gpus",
            "4",
            "--top-k",
            "4",
            "--hidden-size",
            "2048",
            "--intermediate-size",
            "768",
            "--budgets",
            "0,8",
            "--algos",
            "none,craft",
            "--step-tokens",
            tokens,
            "--cost-model",
            model.to_str().unwrap(),
            "--dispatch",
            dispatch,
            "--json",
        ]);
        let rows: Vec<serde_json::Value> = serde_json::from_str(&out).unwrap();
        rows.iter()
            .map(|r| {
                (
                    r["algorithm"].as_str().unwrap().to_string(),
                    r["replicasPerGpu"].as_u64().unwrap() as u32,
                    r["stepMs"].as_f64().expect("stepMs with --step-tokens"),
                )
            })
            .collect()
    };
    let at = |rows: &[(String, u32, f64)], a: &str, r: u32| {
        rows.iter().find(|x| x.0 == a && x.1 == r).unwrap().2
    };
    // Decode (8 tokens per expert): weight reads dominate, a replica reads weights again.
    let decode = step("64", "shares");
    assert!(
        at(&decode, "craft", 8) > at(&decode, "craft", 0),
        "{decode:?}"
    );
    // Prefill: rows dominate, replicas shorten the slowest GPU.
    let prefill = step("65536", "shares");
    assert!(
        at(&prefill, "craft", 8) < at(&prefill, "none", 0),
        "{prefill:?}"
    );
    // The per-batch dispatch predicts no longer a step than the plan's fixed shares, and the
    // same for a plan without replicas.
    for tokens in ["64", "65536"] {
        let (fixed, dispatched) = (step(tokens, "shares"), step(tokens, "step"));
        assert!(at(&dispatched, "craft", 8) <= at(&fixed, "craft", 8) * (1.0 + 1e-9));
        assert!((at(&dispatched, "none", 0) - at(&fixed, "none", 0)).abs() < 1e-9);
    }

    // Planning for step time: `--budget auto` buys no replica for decode (every one costs
    // step time there) and the same replicas as balancedness for prefill.
    let r_of = |objective: &str, tokens: &str| -> u64 {
        let out = dir.path().join(format!("{objective}-{tokens}.json"));
        moectl(&[
            "plan",
            "--load",
            trace.to_str().unwrap(),
            "--gpus",
            "4",
            "--top-k",
            "4",
            "--hidden-size",
            "2048",
            "--intermediate-size",
            "768",
            "--budget",
            "auto",
            "--objective",
            objective,
            "--step-tokens",
            tokens,
            "-o",
            out.to_str().unwrap(),
        ]);
        let plan: serde_json::Value =
            serde_json::from_str(&std::fs::read_to_string(out).unwrap()).unwrap();
        plan["replicasPerGpu"].as_u64().unwrap()
    };
    let by_balance = r_of("balancedness", "64");
    assert!(by_balance > 0);
    assert_eq!(r_of("step-time", "64"), 0);
    assert!(r_of("step-time", "65536") > 0);

    let err = Command::new(env!("CARGO_BIN_EXE_moectl"))
        .args([
            "compare",
            "--load",
            trace.to_str().unwrap(),
            "--gpus",
            "4",
            "--top-k",
            "4",
        ])
        .args(["--step-tokens", "0"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(String::from_utf8_lossy(&err.stderr).contains("--step-tokens 0"));
    let err = Command::new(env!("CARGO_BIN_EXE_moectl"))
        .args([
            "plan",
            "--load",
            trace.to_str().unwrap(),
            "--gpus",
            "4",
            "--top-k",
            "4",
        ])
        .args(["--objective", "step-time", "-o", "/dev/null"])
        .output()
        .unwrap();
    assert!(!err.status.success());
    assert!(
        String::from_utf8_lossy(&err.stderr).contains("needs --step-tokens"),
        "{}",
        String::from_utf8_lossy(&err.stderr)
    );
}

/// `moectl bench steptime` on the CPU with tiny shapes: every declared policy runs on every seed,
/// the per-seed reports are `moectl serving`'s format, and the summary's ratios are taken within
/// a seed (eplb-fixed over itself is exactly 1 with no spread).
#[test]
fn steptime_bench_runs_the_declared_policies_on_every_seed() {
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("st");
    let said = moectl(&[
        "bench",
        "steptime",
        "--preset",
        "qwen3-30b-a3b",
        "--layers",
        "2",
        "--hidden-size",
        "16",
        "--intermediate-size",
        "8",
        "--experts",
        "16",
        "--top-k",
        "2",
        "--gpus",
        "4",
        "--nodes",
        "2",
        "--seeds",
        "3,4",
        "--regime",
        "decode",
        "--batches",
        "1",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(said.contains("| decode | ours |"), "{said}");
    let s: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(out.join("summary.json")).unwrap()).unwrap();
    let samples = s["samples"].as_array().unwrap();
    assert_eq!(samples.len(), 2 * 5, "{s}");
    let eplb = s["summary"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["label"] == "eplb-fixed")
        .unwrap();
    assert_eq!(eplb["overEplbFixed"]["mean"].as_f64(), Some(1.0));
    assert_eq!(eplb["overEplbFixed"]["n"].as_u64(), Some(2));
    for seed in [3, 4] {
        let r: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(out.join(format!("seed{seed}-decode.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(r["schema"], "moe-bench-policies/v1");
        let labels: Vec<&str> = r["policies"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["policy"].as_str().unwrap())
            .collect();
        assert_eq!(
            labels,
            ["none", "eplb-fixed", "eplb-dispatch", "craft-fixed", "ours"]
        );
    }
}
