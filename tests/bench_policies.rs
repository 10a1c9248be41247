//! `moectl bench policies` on a tiny shape, in emulated mode (CPU) and in workers mode (real local
//! CPU `moe-worker` processes): every policy is reported, replica memory is ordered, throughput is
//! measured, every routed row is computed, and both modes see the same token draws.

use clap::Parser;
use moe_operator::cli::bench::{policies, PoliciesArgs};
use serde_json::Value;

#[derive(Parser)]
struct Cli {
    #[command(flatten)]
    args: PoliciesArgs,
}

fn args(dir: &std::path::Path, mode: &str, extra: &[&str]) -> PoliciesArgs {
    let trace = dir.join("trace.json");
    if !trace.exists() {
        let w = moe_operator::plan::load_formats::synthetic_window(3, 16, 4, 256, 2, 0.5, 0.3, 7)
            .unwrap();
        std::fs::write(
            &trace,
            moe_operator::plan::load_formats::to_trace_json(&w, None),
        )
        .unwrap();
    }
    let out = dir.join(format!("{mode}.json"));
    let mut argv: Vec<String> = [
        "bench",
        "--load",
        trace.to_str().unwrap(),
        "--hidden-size",
        "64",
        "--intermediate-size",
        "32",
        "--top-k",
        "2",
        "--gpus",
        "4",
        "--nodes",
        "2",
        "--budgets",
        "1,2",
        "--tokens",
        "48",
        "--batches",
        "3",
        "--seed",
        "11",
        "--mode",
        mode,
        "--out",
        out.to_str().unwrap(),
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    if extra.contains(&"--regime") {
        // --regime and --tokens exclude each other.
        let at = argv.iter().position(|a| a == "--tokens").unwrap();
        argv.drain(at..at + 2);
    }
    argv.extend(extra.iter().map(|s| s.to_string()));
    Cli::try_parse_from(argv).unwrap().args
}

fn check(path: &std::path::Path, mode: &str) -> Value {
    let v: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    assert_eq!(v["schema"], "moe-bench-policies/v1");
    assert_eq!(v["mode"], mode);
    assert_eq!(
        (v["gpus"].as_u64(), v["nodes"].as_u64()),
        (Some(4), Some(2))
    );
    assert_eq!(v["tokens_per_batch"], 48);
    assert_eq!(v["batches"], 3);
    assert_eq!(v["model"]["experts"], 16);
    let p = v["policies"].as_array().unwrap();
    let names: Vec<&str> = p.iter().map(|x| x["policy"].as_str().unwrap()).collect();
    assert_eq!(names, ["none", "placement", "eplb", "craft", "craft"]);
    let r: Vec<u64> = p
        .iter()
        .map(|x| x["replicas_per_gpu"].as_u64().unwrap())
        .collect();
    assert_eq!(r, [0, 0, 3, 1, 2], "EPLB: one per GPU per layer (3 layers)");
    let bytes: Vec<u64> = p
        .iter()
        .map(|x| x["replica_bytes_per_gpu"].as_u64().unwrap())
        .collect();
    let per_expert = 3 * 64 * 32 * 2;
    assert_eq!(bytes, [0, 0, 3 * per_expert, per_expert, 2 * per_expert]);
    assert!(bytes[0] == 0 && bytes[3] <= bytes[4] && bytes[4] <= bytes[2]);
    for x in p {
        assert!(x["tokens_per_s"].as_f64().unwrap() > 0.0, "{x}");
        // The step-time model's layer step beside the measured one.
        assert!(x["model_layer_ms"].as_f64().is_some_and(|m| m > 0.0), "{x}");
        let s = &x["step_ms"];
        let (p50, p90, p99) = (
            s["p50"].as_f64().unwrap(),
            s["p90"].as_f64().unwrap(),
            s["p99"].as_f64().unwrap(),
        );
        assert!(0.0 < p50 && p50 <= p90 && p90 <= p99, "{s}");
        for k in ["observed_balancedness", "predicted_balancedness"] {
            let b = x[k].as_f64().unwrap();
            assert!(0.0 < b && b <= 1.0, "{k} {b}");
        }
        // Every routed row was computed: tokens x top-k per layer and batch.
        assert_eq!(x["rows"], 3 * 48 * 2 * 3, "{x}");
        assert_eq!(x["batches"], 3);
    }
    v
}

#[test]
fn emulated_and_workers_modes_report_every_policy_on_the_same_draws() {
    let dir = tempfile::tempdir().unwrap();
    let em = policies(&args(dir.path(), "emulated", &[])).unwrap();
    assert_eq!(em.len(), 1);
    let e = check(&dir.path().join("emulated.json"), "emulated");
    assert!(e["mode_note"]
        .as_str()
        .unwrap()
        .starts_with("emulated: 4 ranks on one device, layer time = slowest rank"));

    let work = dir.path().join("workers");
    let w = args(
        dir.path(),
        "workers",
        &[
            "--worker-bin",
            env!("CARGO_BIN_EXE_moe-worker"),
            "--work-dir",
            work.to_str().unwrap(),
        ],
    );
    policies(&w).unwrap();
    let wv = check(&dir.path().join("workers.json"), "workers");
    // Same seed, same routing code: both modes route the same rows to the same ranks.
    for (a, b) in e["policies"]
        .as_array()
        .unwrap()
        .iter()
        .zip(wv["policies"].as_array().unwrap())
    {
        assert_eq!(a["plan_hash"], b["plan_hash"]);
        let (oa, ob) = (
            a["observed_balancedness"].as_f64().unwrap(),
            b["observed_balancedness"].as_f64().unwrap(),
        );
        assert!((oa - ob).abs() < 1e-12, "{oa} vs {ob}");
    }
}

#[test]
fn several_regimes_write_one_file_each_and_bad_input_is_named() {
    let dir = tempfile::tempdir().unwrap();
    let mut a = args(dir.path(), "emulated", &["--regime", "decode,prefill"]);
    assert!(a.tokens.is_empty());
    a.batches = 1;
    a.warmup = 0;
    let reports = policies(&a).unwrap();
    // 16 experts, top-2: 16 x 16 / 2 and 256 x 16 / 2 tokens per batch.
    assert_eq!(
        reports
            .iter()
            .map(|r| r.tokens_per_batch)
            .collect::<Vec<_>>(),
        [128, 2048]
    );
    for l in ["decode", "prefill"] {
        let v: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.path().join(format!("emulated-{l}.json"))).unwrap(),
        )
        .unwrap();
        assert_eq!(v["regime"], l);
        assert_eq!(v["policies"].as_array().unwrap().len(), 5);
    }

    let mut bad = args(dir.path(), "emulated", &[]);
    bad.preset = Some("qwen3-30b-a3b".into());
    bad.hidden_size = None;
    bad.intermediate_size = None;
    bad.top_k = None;
    let e = policies(&bad).unwrap_err().to_string();
    assert!(e.contains("16 experts per layer but the model 128"), "{e}");
}
