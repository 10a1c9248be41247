use std::sync::Arc;

use super::synthetic::synthetic_projection;
use super::*;

fn shape(dtype: Dtype, first: u32) -> ModelShape {
    ModelShape {
        layers: 3,
        first_moe_layer: first,
        experts: 4,
        top_k: 2,
        hidden_size: 160,
        expert_intermediate_size: 96,
        dtype,
    }
}

#[test]
fn parses_real_configs() {
    // Fields as in the published config.json files (other fields omitted).
    let ds = r#"{"model_type":"deepseek_v3","num_hidden_layers":61,"hidden_size":7168,
        "intermediate_size":18432,"moe_intermediate_size":2048,"n_routed_experts":256,
        "n_shared_experts":1,"num_experts_per_tok":8,"first_k_dense_replace":3,"moe_layer_freq":1,
        "quantization_config":{"activation_scheme":"dynamic","fmt":"e4m3","quant_method":"fp8",
        "weight_block_size":[128,128]}}"#;
    let c = parse_config(ds).unwrap();
    assert_eq!(c.family, Family::DeepseekV3);
    assert_eq!(
        c.shape,
        ModelShape {
            layers: 61,
            first_moe_layer: 3,
            experts: 256,
            top_k: 8,
            hidden_size: 7168,
            expert_intermediate_size: 2048,
            dtype: Dtype::Fp8
        }
    );
    let mx = r#"{"model_type":"mixtral","num_hidden_layers":32,"hidden_size":4096,
        "intermediate_size":14336,"num_local_experts":8,"num_experts_per_tok":2}"#;
    let c = parse_config(mx).unwrap();
    assert_eq!(
        (c.family, c.shape.experts, c.shape.expert_intermediate_size),
        (Family::Mixtral, 8, 14336)
    );
    let qw = r#"{"model_type":"qwen3_moe","num_hidden_layers":48,"hidden_size":2048,
        "intermediate_size":6144,"moe_intermediate_size":768,"num_experts":128,
        "num_experts_per_tok":8,"decoder_sparse_step":1,"mlp_only_layers":[]}"#;
    let c = parse_config(qw).unwrap();
    assert_eq!(
        (
            c.family,
            c.shape.experts,
            c.shape.expert_intermediate_size,
            c.shape.first_moe_layer
        ),
        (Family::Qwen3Moe, 128, 768, 0)
    );
    assert_eq!(c.shape.dtype, Dtype::Bf16);
    // transformers 5 saves Qwen3-MoE's expert count under the common name.
    let v5 = qw.replace("\"num_experts\"", "\"num_local_experts\"");
    assert_eq!(parse_config(&v5).unwrap().shape.experts, 128);
}

#[test]
fn config_errors_name_the_field() {
    let e = parse_config(r#"{"model_type":"mixtral","num_hidden_layers":2,"hidden_size":8,"num_local_experts":8,"num_experts_per_tok":2}"#).unwrap_err();
    assert!(e.contains("intermediate_size"), "{e}");
    let e = parse_config(r#"{"model_type":"llama"}"#).unwrap_err();
    assert!(e.contains("llama"), "{e}");
    let e = parse_config(r#"{"model_type":"qwen3_moe","num_hidden_layers":4,"hidden_size":8,"moe_intermediate_size":8,"num_experts":4,"num_experts_per_tok":2,"mlp_only_layers":[2]}"#).unwrap_err();
    assert!(e.contains("mlp_only_layers"), "{e}");
    let e = parse_config(r#"{"model_type":"deepseek_v3","num_hidden_layers":4,"hidden_size":8,"moe_intermediate_size":8,"n_routed_experts":4,"num_experts_per_tok":2,"quantization_config":{"quant_method":"fp8","weight_block_size":[64,64]}}"#).unwrap_err();
    assert!(e.contains("weight_block_size"), "{e}");
}

fn check_layout(family: Family, dtype: Dtype, first: u32, shards: usize, stacked: bool) {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(dtype, first);
    write_synthetic_checkpoint(dir.path(), family, &s, shards, 7, stacked).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    assert_eq!(ck.config().shape, s);
    assert_eq!(ck.config().family, family);
    let (h, i) = (160, 96);
    for layer in first..3 {
        for e in [0u32, 3] {
            let w = ck.expert(layer, e).unwrap();
            let want = [
                (&w.gate, synthetic_projection(7, layer, e, 0, i, h)),
                (&w.up, synthetic_projection(7, layer, e, 1, i, h)),
                (&w.down, synthetic_projection(7, layer, e, 2, h, i)),
            ];
            for (got, want) in want {
                assert_eq!(got.len(), want.len());
                for (g, x) in got.iter().zip(&want) {
                    let g = g.to_f32();
                    match dtype {
                        Dtype::Bf16 => assert_eq!(g, bf16::from_f32(*x).to_f32()),
                        // E4M3 keeps 3 mantissa bits (relative step 1/8, error <= 1/16), and
                        // values far below the block max fall to subnormals (absolute step).
                        Dtype::Fp8 => assert!(
                            (g - x).abs() <= x.abs() / 15.0 + 0.01,
                            "{family:?} layer {layer} expert {e}: {g} vs {x}"
                        ),
                    }
                }
            }
        }
    }
    let err = ck.expert(first + 5, 0).unwrap_err().to_string();
    assert!(err.contains("MoE layers"), "{err}");
    let err = ck.expert(first, 4).unwrap_err().to_string();
    assert!(err.contains("4 routed experts"), "{err}");
}

#[test]
fn loads_mixtral_sharded() {
    check_layout(Family::Mixtral, Dtype::Bf16, 0, 3, false);
}

#[test]
fn loads_qwen3_single_file_with_dense_prefix() {
    check_layout(Family::Qwen3Moe, Dtype::Bf16, 1, 1, false);
}

#[test]
fn loads_qwen3_stacked() {
    check_layout(Family::Qwen3Moe, Dtype::Bf16, 0, 2, true);
}

#[test]
fn loads_deepseek_fp8() {
    check_layout(Family::DeepseekV3, Dtype::Fp8, 1, 2, false);
}

fn rewrite_config(dir: &Path, f: impl FnOnce(&mut serde_json::Value)) {
    let p = dir.join("config.json");
    let mut v: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
    f(&mut v);
    std::fs::write(&p, v.to_string()).unwrap();
}

#[test]
fn failures_name_tensor_and_file() {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(Dtype::Bf16, 0);
    write_synthetic_checkpoint(dir.path(), Family::Qwen3Moe, &s, 2, 1, false).unwrap();

    // More experts in config.json than in the files: a missing tensor, named with the index.
    rewrite_config(dir.path(), |v| v["num_experts"] = 6.into());
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .expert(1, 5)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.1.mlp.experts.5.gate_proj.weight")
            && err.contains("model.safetensors.index.json"),
        "{err}"
    );

    // Wrong hidden size: a shape error naming tensor, file and both shapes.
    rewrite_config(dir.path(), |v| {
        v["num_experts"] = 4.into();
        v["hidden_size"] = 128.into();
    });
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .expert(0, 0)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("model.layers.0.mlp.experts.0.gate_proj.weight")
            && err.contains("model-00001-of-00002.safetensors")
            && err.contains("[96, 160]"),
        "{err}"
    );

    // FP8 expected, bf16 found.
    rewrite_config(dir.path(), |v| {
        v["hidden_size"] = 160.into();
        v["model_type"] = "deepseek_v3".into();
        v["n_routed_experts"] = 4.into();
        v["quantization_config"] = serde_json::json!({"quant_method": "fp8", "fmt": "e4m3"});
    });
    let err = Checkpoint::open(dir.path())
        .unwrap()
        .expert(2, 1)
        .unwrap_err()
        .to_string();
    assert!(
        err.contains("F8_E4M3")
            && err.contains("BF16")
            && err.contains("model-00002-of-00002.safetensors"),
        "{err}"
    );

    // A truncated shard is refused at open, naming the file.
    let shard = dir.path().join("model-00002-of-00002.safetensors");
    let len = std::fs::metadata(&shard).unwrap().len();
    std::fs::OpenOptions::new()
        .write(true)
        .open(&shard)
        .unwrap()
        .set_len(len - 10)
        .unwrap();
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("model-00002-of-00002.safetensors") && err.contains("shorter"),
        "{err}"
    );

    // No weights at all.
    let empty = tempfile::tempdir().unwrap();
    std::fs::copy(
        dir.path().join("config.json"),
        empty.path().join("config.json"),
    )
    .unwrap();
    let err = Checkpoint::open(empty.path()).err().unwrap().to_string();
    assert!(err.contains("model.safetensors"), "{err}");
}

#[test]
fn generation_is_deterministic_and_validates_args() {
    let (a, b) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let s = shape(Dtype::Fp8, 1);
    write_synthetic_checkpoint(a.path(), Family::DeepseekV3, &s, 2, 3, false).unwrap();
    write_synthetic_checkpoint(b.path(), Family::DeepseekV3, &s, 2, 3, false).unwrap();
    for f in [
        "config.json",
        "model.safetensors.index.json",
        "model-00001-of-00002.safetensors",
    ] {
        assert_eq!(
            std::fs::read(a.path().join(f)).unwrap(),
            std::fs::read(b.path().join(f)).unwrap(),
            "{f}"
        );
    }
    let c = tempfile::tempdir().unwrap();
    let err = write_synthetic_checkpoint(
        c.path(),
        Family::Mixtral,
        &shape(Dtype::Bf16, 0),
        9,
        0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--shards"), "{err}");
    let err = write_synthetic_checkpoint(
        c.path(),
        Family::Mixtral,
        &shape(Dtype::Bf16, 1),
        1,
        0,
        false,
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("first-moe-layer"), "{err}");
}

/// Load throughput of `Checkpoint::expert` on a warm page cache, sequential and on all cores, for
/// the three layouts. Not a check (timings vary with the machine): run by hand with
/// `cargo test --release --lib worker::checkpoint::tests::load_speed -- --ignored --nocapture`
/// (`MOE_LOAD_SPEED_EXPERTS` sets the experts per layer, default 16; 2 layers, H 2048, I 768).
#[test]
#[ignore]
fn load_speed() {
    use rayon::prelude::*;
    let experts: u32 = std::env::var("MOE_LOAD_SPEED_EXPERTS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(16);
    for (family, dtype, stacked) in [
        (Family::Qwen3Moe, Dtype::Bf16, false),
        (Family::Qwen3Moe, Dtype::Bf16, true),
        (Family::DeepseekV3, Dtype::Fp8, false),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let s = ModelShape {
            layers: 2,
            first_moe_layer: 0,
            experts,
            top_k: 2,
            hidden_size: 2048,
            expert_intermediate_size: 768,
            dtype,
        };
        write_synthetic_checkpoint(dir.path(), family, &s, 2, 5, stacked).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        let keys: Vec<(u32, u32)> = (0..2)
            .flat_map(|l| (0..experts).map(move |e| (l, e)))
            .collect();
        // Bytes handed out (bf16 weights), the same for every layout.
        let bytes = keys.len() as f64 * 3.0 * 2048.0 * 768.0 * 2.0;
        for round in 0..2 {
            let t = std::time::Instant::now();
            for &(l, e) in &keys {
                std::hint::black_box(ck.expert(l, e).unwrap());
            }
            let seq = t.elapsed().as_secs_f64();
            let t = std::time::Instant::now();
            keys.par_iter().for_each(|&(l, e)| {
                std::hint::black_box(ck.expert(l, e).unwrap());
            });
            let par = t.elapsed().as_secs_f64();
            eprintln!(
                "load_speed {family:?} stacked={stacked} round {round}: {} experts, {:.0} MB of bf16: sequential {:.3} s ({:.2} GB/s), {} threads {:.3} s ({:.2} GB/s)",
                keys.len(),
                bytes / 1e6,
                seq,
                bytes / seq / 1e9,
                rayon::current_num_threads(),
                par,
                bytes / par / 1e9
            );
        }
    }
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

/// Issue 19: shards truncated under a running worker, then a plan swap. With memory-mapped shards
/// the next read of a page past the new end raised SIGBUS and killed the process (this test
/// process, on the old code); now it is an error naming the file and the tensor.
#[test]
fn shard_truncated_after_open_is_an_error_not_a_crash() {
    for stacked in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let s = shape(Dtype::Bf16, 0);
        write_synthetic_checkpoint(dir.path(), Family::Qwen3Moe, &s, 3, 4, stacked).unwrap();
        let ck = Checkpoint::open(dir.path()).unwrap();
        ck.expert(2, 3).unwrap();
        // Layer 2 lives in the third shard: cut it to just past its header, then to nothing.
        let shard = dir.path().join("model-00003-of-00003.safetensors");
        let bytes = std::fs::read(&shard).unwrap();
        let header = 8 + u64::from_le_bytes(bytes[..8].try_into().unwrap());
        for len in [header + 100, 0] {
            truncate(&shard, len);
            for expert in [0u32, 3] {
                let err = ck.expert(2, expert).unwrap_err().to_string();
                let tensor = if stacked {
                    "model.layers.2.mlp.experts.gate_up_proj".to_string()
                } else {
                    format!("model.layers.2.mlp.experts.{expert}.gate_proj.weight")
                };
                assert!(
                    err.contains("model-00003-of-00003.safetensors")
                        && err.contains(&tensor)
                        && err.contains("truncated or replaced"),
                    "stacked {stacked}, len {len}: {err}"
                );
            }
            // The other shards are untouched and still load, through a backend loader too.
            ck.expert(0, 1).unwrap();
        }
        let src: Arc<dyn WeightSource> = Arc::new(ck);
        let loader = crate::worker::cpu::CpuLoader::new(src);
        use crate::worker::compute::ExpertLoader;
        let err = loader
            .load(&[(0, 0), (2, 1)], None)
            .err()
            .expect("a truncated shard fails the load")
            .to_string();
        assert!(err.contains("model-00003-of-00003.safetensors"), "{err}");
    }
}

/// The same for the FP8 layout (weights and their scales), and for a read at the shard level.
#[test]
fn fp8_shard_truncated_after_open_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(Dtype::Fp8, 0);
    write_synthetic_checkpoint(dir.path(), Family::DeepseekV3, &s, 1, 4, false).unwrap();
    let ck = Checkpoint::open(dir.path()).unwrap();
    let f = &ck.files[0];
    let mut buf = vec![0u8; 64];
    truncate(&f.path, 10);
    let err = f.read_at("t", 0, &mut buf).unwrap_err().to_string();
    assert!(
        err.contains("`t`") && err.contains("model.safetensors"),
        "{err}"
    );
    let err = ck.expert(1, 0).unwrap_err().to_string();
    assert!(
        err.contains("model.layers.1.mlp.experts.0.gate_proj.weight"),
        "{err}"
    );
}

#[test]
fn config_sizes_are_bounded_by_plan_limits() {
    let base = r#"{"model_type":"mixtral","num_hidden_layers":2,"hidden_size":HS,"intermediate_size":IS,"num_local_experts":NE,"num_experts_per_tok":2}"#;
    let cfg = |h: &str, i: &str, e: &str| base.replace("HS", h).replace("IS", i).replace("NE", e);
    assert!(parse_config(&cfg("4096", "14336", "8")).is_ok());
    let e = parse_config(&cfg("4294967296", "14336", "8")).unwrap_err();
    assert!(e.contains("hidden_size") && e.contains("65536"), "{e}");
    let e = parse_config(&cfg("4096", "1099511627776", "8")).unwrap_err();
    assert!(e.contains("intermediate") && e.contains("131072"), "{e}");
    let e = parse_config(&cfg("4096", "14336", "4294967295")).unwrap_err();
    assert!(e.contains("experts") && e.contains("1024"), "{e}");
}

#[test]
fn oversized_config_and_index_are_refused_before_reading() {
    let dir = tempfile::tempdir().unwrap();
    let s = shape(Dtype::Bf16, 0);
    write_synthetic_checkpoint(dir.path(), Family::Mixtral, &s, 2, 0, false).unwrap();
    let idx = dir.path().join("model.safetensors.index.json");
    truncate(&idx, MAX_INDEX_BYTES + 1);
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(err.contains("index.json") && err.contains("limit"), "{err}");
    truncate(&dir.path().join("config.json"), MAX_CONFIG_BYTES + 1);
    let err = Checkpoint::open(dir.path()).err().unwrap().to_string();
    assert!(
        err.contains("config.json") && err.contains("limit"),
        "{err}"
    );
}
