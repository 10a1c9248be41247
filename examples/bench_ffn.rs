//! Times the CUDA expert FFN (grouped GEMM, SiLU*up*w, grouped GEMM) on generated bf16 weights.
//! Driven by benches/gpu/expert_ffn.py, which times `torch._grouped_mm` on the same row counts.
//!
//! Usage: bench_ffn [--iters N] [--configs H:I:E[:fp8],...] [--tpe 8,64,...]
//! A config ending in `:fp8` keeps the weights in FP8 E4M3 with 128 x 128 block scales (DeepSeek's
//! layout) and runs the FP8 path (mode "Fp8"); its reference is the f64 FFN on the dequantized
//! weights.
//! Prints one JSON object per (config, tokens per expert, GEMM mode) on stdout.

use std::collections::HashMap;
use std::sync::Arc;

use half::bf16;
use half::slice::HalfFloatSliceExt;
use moe_operator::plan::model::{Dtype, ModelShape};
use moe_operator::plan::step_cost::bench_ffn_rows;
use moe_operator::worker::checkpoint::synthetic::{hashed_projection, HashedWeights};
use moe_operator::worker::checkpoint::{ExpertWeights, WeightSource};
use moe_operator::worker::cpu::reference_row;
use moe_operator::worker::cuda::{CudaDevice, CudaExperts, GemmMode};

/// Router weights in [0.1, 1), a deterministic spread.
fn router_weight(r: usize) -> f32 {
    0.1 + 0.9 * (r.wrapping_mul(2_654_435_761) % 1_000_003) as f32 / 1_000_003.0
}

fn arg(args: &[String], name: &str) -> Option<String> {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1).cloned())
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let iters: usize = arg(&args, "--iters")
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(20);
    let configs: Vec<(usize, usize, usize, bool)> = arg(&args, "--configs")
        .unwrap_or_else(|| "2048:768:128,7168:2048:32,4096:14336:8".into())
        .split(',')
        .map(|c| {
            let (c, fp8) = match c.strip_suffix(":fp8") {
                Some(c) => (c, true),
                None => (c, false),
            };
            let v: Vec<usize> = c.split(':').map(|x| x.parse().expect("H:I:E")).collect();
            (v[0], v[1], v[2], fp8)
        })
        .collect();
    let tpes: Vec<usize> = arg(&args, "--tpe")
        .unwrap_or_else(|| "8,64,512,2048".into())
        .split(',')
        .map(|x| x.parse().expect("tokens per expert"))
        .collect();
    let dev = CudaDevice::new(0)?;
    eprintln!("device {} ({})", dev.name(), dev.arch());
    for &(h, i, e, fp8) in &configs {
        let shape = ModelShape {
            layers: 1,
            first_moe_layer: 0,
            experts: e as u32,
            top_k: 1,
            hidden_size: h as u64,
            expert_intermediate_size: i as u64,
            dtype: if fp8 { Dtype::Fp8 } else { Dtype::Bf16 },
        };
        let src = HashedWeights::new(shape, 0);
        let keys: Vec<(u32, u32)> = (0..e as u32).map(|x| (0, x)).collect();
        let t0 = std::time::Instant::now();
        let set = CudaExperts::from_source(dev.clone(), &src, &keys)?;
        eprintln!(
            "H={h} I={i} E={e}: weights generated and uploaded in {:.1}s",
            t0.elapsed().as_secs_f64()
        );
        // Weights of the experts whose rows are checked, generated once per config.
        let mut sampled: HashMap<usize, ExpertWeights> = HashMap::new();
        for &tpe in &tpes {
            let counts = bench_ffn_rows(e, tpe);
            let total: usize = counts.iter().sum();
            let x = hashed_projection(0xabc ^ tpe as u64, total * h, 1.0);
            let w: Vec<f32> = (0..total).map(router_weight).collect();
            let ids: Vec<u32> = (0..e as u32).collect();
            let modes: &[GemmMode] = if fp8 {
                &[GemmMode::Auto]
            } else {
                &[GemmMode::Grouped, GemmMode::PerExpert, GemmMode::Auto]
            };
            anyhow::ensure!(
                set.is_fp8() == fp8,
                "H={h} I={i}: FP8 path {} on this device",
                if fp8 { "unavailable" } else { "taken for bf16" }
            );
            for &mode in modes {
                dev.set_mode(mode);
                let p = set.prepare(0, &ids, &counts, x.reinterpret_cast(), &w)?;
                // Correctness on sampled rows against the f64 reference (first row of some experts).
                set.enqueue(&p)?;
                let out = set.download(total)?;
                let mut off = 0;
                let (mut num, mut den, mut finite) = (0f64, 0f64, true);
                // The fixed modes were checked in earlier runs; the check is slow on big shapes.
                let check = mode == GemmMode::Auto || std::env::var_os("CHECK_ALL").is_some();
                for (ex, &c) in counts.iter().enumerate() {
                    if check && ex % (e / 4).max(1) == 0 {
                        let wts = sampled
                            .entry(ex)
                            .or_insert_with(|| src.expert(0, ex as u32).expect("gen"));
                        let r = off + c - 1;
                        let want = reference_row(wts, &x[r * h..(r + 1) * h], w[r]);
                        let (mut rn, mut rd) = (0f64, 0f64);
                        for (k, v) in want.iter().enumerate() {
                            let g = bf16::from_bits(out[r * h + k]).to_f64();
                            finite &= g.is_finite();
                            rn += (g - v).powi(2);
                            rd += v * v;
                        }
                        if (rn / rd).sqrt() > if fp8 { 0.1 } else { 0.05 } {
                            eprintln!("H={h} I={i} E={e} tpe={tpe} {mode:?}: expert {ex} row {r} (of {c}, from {off}) rel err {:.3}; got[0..4] {:?} want[0..4] {:?}",
                                (rn / rd).sqrt(), &out[r * h..r * h + 4].iter().map(|b| bf16::from_bits(*b).to_f32()).collect::<Vec<_>>(), &want[..4]);
                        }
                        num += rn;
                        den += rd;
                    }
                    off += c;
                }
                let rel = if check { (num / den).sqrt() } else { f64::NAN };
                // Timing: warm-up, then 5 repeats of `iters` back-to-back launches, CUDA events.
                for _ in 0..3 {
                    set.enqueue(&p)?;
                }
                let ctx = dev.context();
                let mut per_call = Vec::new();
                for _ in 0..5 {
                    let a = ctx
                        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    let b = ctx
                        .new_event(Some(cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT))
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    a.record(dev.stream())
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    for _ in 0..iters {
                        set.enqueue(&p)?;
                    }
                    b.record(dev.stream())
                        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    b.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
                    per_call.push(
                        a.elapsed_ms(&b).map_err(|e| anyhow::anyhow!("{e:?}"))? as f64
                            / iters as f64,
                    );
                }
                per_call.sort_by(|a, b| a.total_cmp(b));
                let ms = per_call[2];
                let active = counts.iter().filter(|&&c| c > 0).count();
                let bytes = active * 3 * h * i * if fp8 { 1 } else { 2 } + 2 * total * h * 2;
                let flops = 6.0 * total as f64 * h as f64 * i as f64;
                println!(
                    "{}",
                    serde_json::json!({
                        "hidden": h, "inter": i, "experts": e, "tpe": tpe, "tokens": total,
                        "mode": if fp8 { "Fp8".to_string() } else { format!("{mode:?}") }, "ms": ms, "ms_all": per_call,
                        "tbps": bytes as f64 / (ms * 1e-3) / 1e12,
                        "tflops": flops / (ms * 1e-3) / 1e12,
                        "rel_err": rel, "finite": finite, "counts": counts,
                    })
                );
            }
        }
        drop(set);
    }
    let _ = Arc::strong_count(&dev);
    Ok(())
}
