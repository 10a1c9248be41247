//! The engine layouts we write, read by a second, independent reading of the engines' loader
//! rules: `e2e/engine-standin.py --check-only` (Python, written from SGLang's and vLLM's loaders),
//! beside our own `plan::engines::check_layout`. Plans of every policy on skewed load, for both
//! engines, must pass both; each refusal of our checker must be a refusal of the stand-in too.

use std::path::Path;
use std::process::Command;

use moe_operator::plan::craft::CraftOptions;
use moe_operator::plan::engines::{check_layout, export, Engine};
use moe_operator::plan::planner::{make_plan, Budget, PlanRequest};
use moe_operator::plan::{Algorithm, Dtype, LoadWindow, ModelShape, Topology};

mod common;

const LAYERS: u32 = 6;
const FIRST_MOE: u32 = 2;
const EXPERTS: u32 = 16;
const GPUS: u32 = 4;

fn model() -> ModelShape {
    ModelShape {
        layers: LAYERS,
        first_moe_layer: FIRST_MOE,
        experts: EXPERTS,
        top_k: 2,
        hidden_size: 64,
        expert_intermediate_size: 32,
        dtype: Dtype::Bf16,
    }
}

/// 4 MoE layers of 16 experts, a different hot set per layer and batch.
fn skewed() -> LoadWindow {
    let (layers, experts, batches) = (4usize, EXPERTS as usize, 6usize);
    let counts = (0..batches * layers * experts)
        .map(|i| {
            let (e, l, b) = (i % experts, (i / experts) % layers, i / (experts * layers));
            1.0 + 300.0 / (1.0 + ((e * 5 + l * 7 + b) % experts) as f64)
        })
        .collect();
    LoadWindow::new((FIRST_MOE..LAYERS).collect(), experts, counts).unwrap()
}

/// Runs the stand-in's loader on `file` as `engine` would be started for it.
fn standin(engine: Engine, file: &Path, redundant: u32) -> Result<String, String> {
    let mut cmd = Command::new("python3");
    cmd.arg(common::repo().join("e2e/engine-standin.py"))
        .arg("--check-only")
        .args(["--standin-layers", &LAYERS.to_string()])
        .args(["--standin-first-moe-layer", &FIRST_MOE.to_string()])
        .args(["--standin-experts", &EXPERTS.to_string()]);
    match engine {
        Engine::Sglang => cmd
            .args(["--init-expert-location", file.to_str().unwrap()])
            .args(["--ep-num-redundant-experts", &redundant.to_string()])
            .args(["--ep-size", &GPUS.to_string()]),
        Engine::Vllm => cmd
            .arg("--eplb-config")
            .arg(
                serde_json::json!({
                    "initial_expert_map_path": file,
                    "num_redundant_experts": redundant,
                })
                .to_string(),
            )
            .args(["--standin-ep-size", &GPUS.to_string()]),
    };
    let out = cmd.output().expect("python3 runs the stand-in");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    if out.status.success() {
        Ok(text)
    } else {
        Err(text)
    }
}

#[test]
fn every_policys_layout_passes_both_readings_of_the_loaders() {
    let dir = tempfile::tempdir().unwrap();
    let w = skewed();
    let plans = [
        (Algorithm::Craft, Budget::ReplicasPerGpu(3)),
        (Algorithm::Craft, Budget::ReplicasPerGpu(9)),
        (Algorithm::Eplb, Budget::ReplicasPerGpu(4)),
        (Algorithm::Placement, Budget::ReplicasPerGpu(0)),
    ];
    let mut checked = 0;
    for (algorithm, budget) in plans {
        let req = PlanRequest {
            algorithm,
            model: model(),
            topology: Topology::new(GPUS as usize, 1).unwrap(),
            budget,
            eplb_groups: None,
            craft: CraftOptions::default(),
        };
        let plan = make_plan(&req, &w, None).unwrap();
        for engine in [Engine::Sglang, Engine::Vllm] {
            let (file, report) = export(engine, &plan, None).unwrap();
            check_layout(engine, &plan.model, GPUS, &file).unwrap();
            let path = dir
                .path()
                .join(format!("{algorithm:?}-{budget:?}-{engine}.json"));
            std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
            let said = standin(engine, &path, report.redundant_experts)
                .unwrap_or_else(|e| panic!("{algorithm:?} {budget:?} {engine}: refused: {e}"));
            assert!(
                said.contains(&format!("{} redundant", report.redundant_experts)),
                "{said}"
            );
            // Started for another redundant count, the engine refuses the same file.
            assert!(standin(engine, &path, report.redundant_experts + GPUS).is_err());
            checked += 1;
        }
    }
    assert_eq!(checked, 8);
}

#[test]
fn what_our_checker_refuses_the_standin_refuses() {
    let dir = tempfile::tempdir().unwrap();
    let m = model();
    let full = |rows: usize, row: Vec<u32>| vec![row; rows];
    let ok: Vec<u32> = (0..EXPERTS).collect();
    let mut missing = ok.clone();
    missing[3] = 0;
    let mut out_of_range = ok.clone();
    out_of_range[3] = EXPERTS;
    let cases: Vec<(Engine, serde_json::Value, u32)> = vec![
        // Rows one short of the decoder layers.
        (
            Engine::Sglang,
            serde_json::json!({"physical_to_logical_map": full(LAYERS as usize - 1, ok.clone())}),
            0,
        ),
        // A key besides the map.
        (
            Engine::Sglang,
            serde_json::json!({"physical_to_logical_map": full(LAYERS as usize, ok.clone()), "x": 1}),
            0,
        ),
        // Logical expert 3 missing in every layer.
        (Engine::Vllm, serde_json::json!(full(4, missing.clone())), 0),
        (Engine::Vllm, serde_json::json!(full(4, out_of_range)), 0),
        // 18 physical experts over 4 ranks.
        (
            Engine::Vllm,
            serde_json::json!(full(4, ok.iter().copied().chain([0, 1]).collect())),
            2,
        ),
        // Three rows for four MoE layers.
        (Engine::Vllm, serde_json::json!(full(3, ok.clone())), 0),
    ];
    for (i, (engine, file, redundant)) in cases.into_iter().enumerate() {
        let ours = check_layout(engine, &m, GPUS, &file);
        assert!(ours.is_err(), "case {i}: our checker accepts {file}");
        let path = dir.path().join(format!("bad-{i}.json"));
        std::fs::write(&path, serde_json::to_vec(&file).unwrap()).unwrap();
        let theirs = standin(engine, &path, redundant);
        assert!(
            theirs
                .as_ref()
                .is_err_and(|e| e.contains("refused the layout")),
            "case {i}: the stand-in accepts what we refuse ({}): {theirs:?}",
            ours.unwrap_err()
        );
    }
}
