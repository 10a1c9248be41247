//! Emulated mode: D expert-parallel ranks on one device. Per batch and MoE layer the rows are
//! routed exactly as `moectl loadgen` routes them, each rank's share runs on the real device, one
//! rank after another, each timed on its own, and the layer takes as long as its slowest rank.
//!
//! Every (layer, expert) of the model is resident once; replicas of an expert on several emulated
//! ranks share that one weight buffer (each rank's call still reads the weights it computes with).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use half::bf16;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;

use super::{Measured, RankShare, StepRecorder};
use crate::loadgen::layer_map;
use crate::loadgen::route::{
    hidden_pool, layer_pickers, LayerRouter, ReplicaPicker, RoutedRow, TopKSampler,
};
use crate::plan::{ExpertPlan, LoadWindow};
use crate::worker::checkpoint::WeightSource;
use crate::worker::compute::{ExpertCompute, ExpertKey, ExpertLoader, RowBatch};
use crate::worker::cpu::CpuLoader;

/// Runs one rank's share of one layer on the device and says how long the device took.
pub trait RankExec {
    /// Seconds the device spent on this share (0 for no rows).
    fn run(&mut self, layer: u32, share: &RankShare, pool: &[bf16]) -> anyhow::Result<f64>;
    /// The device, in words.
    fn device(&self) -> String;
    /// How a rank's time is taken, in words.
    fn timing(&self) -> &'static str;
}

/// Every expert of `layers` as (layer, expert) keys, per layer.
fn layer_keys(source: &dyn WeightSource, layers: &[u32]) -> Vec<(u32, Vec<ExpertKey>)> {
    let e = source.shape().experts;
    layers
        .iter()
        .map(|&l| (l, (0..e).map(|x| (l, x)).collect()))
        .collect()
}

/// CPU backend: the worker's CPU expert compute, wall clock around each rank's call.
pub struct CpuExec {
    sets: HashMap<u32, Arc<dyn ExpertCompute>>,
    hidden: usize,
    threads: usize,
    pub non_finite_outputs: u64,
}

impl CpuExec {
    pub fn new(source: Arc<dyn WeightSource>, layers: &[u32]) -> anyhow::Result<Self> {
        let hidden = source.shape().hidden_size as usize;
        let loader = CpuLoader::new(source.clone());
        let mut sets = HashMap::new();
        for (l, keys) in layer_keys(source.as_ref(), layers) {
            sets.insert(
                l,
                loader
                    .load(&keys, None)
                    .with_context(|| format!("loading layer {l}'s experts on the CPU"))?,
            );
        }
        Ok(Self {
            sets,
            hidden,
            threads: rayon::current_num_threads(),
            non_finite_outputs: 0,
        })
    }
}

impl RankExec for CpuExec {
    fn run(&mut self, layer: u32, share: &RankShare, pool: &[bf16]) -> anyhow::Result<f64> {
        if share.rows() == 0 {
            return Ok(0.0);
        }
        let set = self
            .sets
            .get(&layer)
            .with_context(|| format!("layer {layer} is not loaded"))?;
        let x = share.gather(pool, self.hidden);
        let batch = RowBatch {
            hidden_size: self.hidden,
            experts: &share.row_experts,
            router_weights: &share.weights,
            hidden: &x,
        };
        let t = Instant::now();
        let out = set.forward(layer, &batch)?;
        let secs = t.elapsed().as_secs_f64();
        self.non_finite_outputs += out.iter().filter(|v| !v.is_finite()).count() as u64;
        Ok(secs)
    }

    fn device(&self) -> String {
        format!("cpu ({} threads)", self.threads)
    }

    fn timing(&self) -> &'static str {
        "CPU: wall clock around each rank's forward call"
    }
}

/// CUDA backend: the worker's CUDA expert compute; each rank's share is staged (rows and router
/// weights uploaded), then device events bracket its two grouped GEMMs and activation kernel.
pub struct CudaExec {
    dev: Arc<crate::worker::cuda::CudaDevice>,
    ordinal: usize,
    sets: HashMap<u32, crate::worker::cuda::CudaExperts>,
    hidden: usize,
}

impl CudaExec {
    pub fn new(
        ordinal: usize,
        source: Arc<dyn WeightSource>,
        layers: &[u32],
    ) -> anyhow::Result<Self> {
        let dev = crate::worker::cuda::CudaDevice::new(ordinal)?;
        let hidden = source.shape().hidden_size as usize;
        let mut sets = HashMap::new();
        for (l, keys) in layer_keys(source.as_ref(), layers) {
            let t = Instant::now();
            let set =
                crate::worker::cuda::CudaExperts::from_source(dev.clone(), source.as_ref(), &keys)
                    .with_context(|| format!("loading layer {l}'s experts onto cuda:{ordinal}"))?;
            tracing::info!(
                layer = l,
                experts = keys.len(),
                seconds = t.elapsed().as_secs_f64(),
                "layer resident"
            );
            sets.insert(l, set);
        }
        Ok(Self {
            dev,
            ordinal,
            sets,
            hidden,
        })
    }
}

impl CudaExec {
    pub fn device(&self) -> &Arc<crate::worker::cuda::CudaDevice> {
        &self.dev
    }
}

impl RankExec for CudaExec {
    fn run(&mut self, layer: u32, share: &RankShare, pool: &[bf16]) -> anyhow::Result<f64> {
        use cudarc::driver::sys::CUevent_flags::CU_EVENT_DEFAULT;
        use half::slice::HalfFloatSliceExt;
        if share.rows() == 0 {
            return Ok(0.0);
        }
        let set = self
            .sets
            .get(&layer)
            .with_context(|| format!("layer {layer} is not loaded"))?;
        let bits: &[u16] = pool.reinterpret_cast();
        let x = share.gather(bits, self.hidden);
        let p = set.prepare(layer, &share.experts, &share.counts, &x, &share.weights)?;
        let stream = self.dev.stream();
        let ev = |what: &str| {
            stream.record_event(Some(CU_EVENT_DEFAULT)).map_err(|e| {
                anyhow::anyhow!("cuda:{}: recording the {what} event: {e:?}", self.ordinal)
            })
        };
        let start = ev("start")?;
        set.enqueue(&p)?;
        let end = ev("end")?;
        let ms = start
            .elapsed_ms(&end)
            .map_err(|e| anyhow::anyhow!("cuda:{}: event time: {e:?}", self.ordinal))?;
        Ok(ms as f64 / 1e3)
    }

    fn device(&self) -> String {
        format!(
            "cuda:{} ({}, {})",
            self.ordinal,
            self.dev.name(),
            self.dev.arch()
        )
    }

    fn timing(&self) -> &'static str {
        "CUDA: device events around each rank's grouped GEMMs and activation kernel (row upload excluded, as rows arrive on the GPU by all-to-all in serving)"
    }
}

/// What a run needs besides the plan.
#[derive(Clone, Debug)]
pub struct RunConfig {
    pub batches: usize,
    /// Batches run first and not measured (kernel selection, caches), with their own draws.
    pub warmup: usize,
    pub tokens_per_batch: usize,
    /// Routing seed: the same for every policy, and the same draws as `moectl loadgen --seed`.
    pub seed: u64,
    /// Random hidden vectors rows are drawn from (`moectl loadgen` uses 64).
    pub hidden_pool: usize,
    /// Stop measuring after this many seconds (at least one batch is measured).
    pub max_seconds: Option<f64>,
    /// The step-time dispatch's cost model (`--dispatch step`); None routes by the shares.
    pub dispatch: Option<crate::plan::step_cost::CostModel>,
}

impl RunConfig {
    pub fn new(batches: usize, tokens_per_batch: usize, seed: u64) -> Self {
        Self {
            batches,
            warmup: 1,
            tokens_per_batch,
            seed,
            hidden_pool: 64,
            max_seconds: None,
            dispatch: None,
        }
    }
}

/// Seed of the warm-up draws, apart from the measured ones.
pub const WARMUP_SEED_XOR: u64 = 0x5741_524D_5550_0000;

/// Runs a plan in emulated mode: the routing of `moectl loadgen` (same seed, same draws), each
/// rank's share on `exec`, the slowest rank per layer.
pub fn run_emulated(
    plan: &ExpertPlan,
    window: &LoadWindow,
    cfg: &RunConfig,
    exec: &mut dyn RankExec,
) -> anyhow::Result<Measured> {
    plan.check().map_err(|e| anyhow::anyhow!("plan: {e}"))?;
    let experts = plan.model.experts as usize;
    anyhow::ensure!(
        window.experts() == experts,
        "the trace has {} experts per layer, the model {experts}",
        window.experts()
    );
    let layer_of = layer_map(plan, window)?;
    let d = plan.gpus as usize;
    let hidden = plan.model.hidden_size as usize;
    let top_k = plan.model.top_k as usize;
    let pool_n = cfg.hidden_pool.max(1);
    let pickers: Vec<ReplicaPicker> = layer_pickers(plan, cfg.dispatch);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    // Drawn first, as the load generator does, so that the token draws match it.
    let pool = hidden_pool(&mut rng, pool_n, hidden);
    let mut router = LayerRouter::default();
    let mut rows: Vec<Vec<RoutedRow>> = vec![Vec::new(); d];
    let mut expert_rows = vec![0u64; experts];
    let mut times = vec![0.0f64; d];
    let mut counts = vec![0u64; d];

    let mut batch =
        |rng: &mut ChaCha8Rng, b: usize, rec: Option<&mut StepRecorder>| -> anyhow::Result<()> {
            let mut rec = rec;
            for (li, lp) in plan.layers.iter().enumerate() {
                let sampler = TopKSampler::new(window.row(b % window.batches(), layer_of[li]));
                router.route(
                    rng,
                    &sampler,
                    &pickers[li],
                    top_k,
                    cfg.tokens_per_batch,
                    pool_n as u32,
                    &mut rows,
                    &mut expert_rows,
                );
                for g in 0..d {
                    let share = RankShare::from_rows(&rows[g]);
                    counts[g] = share.rows() as u64;
                    times[g] = exec
                        .run(lp.layer, &share, &pool)
                        .with_context(|| format!("rank {g}, layer {}", lp.layer))?;
                }
                if let Some(r) = rec.as_deref_mut() {
                    r.layer(li, &times, &counts);
                }
            }
            Ok(())
        };

    let mut warm = ChaCha8Rng::seed_from_u64(cfg.seed ^ WARMUP_SEED_XOR);
    for b in 0..cfg.warmup {
        batch(&mut warm, b, None)?;
    }
    let mut rec = StepRecorder::new(plan.layers.iter().map(|l| l.layer).collect(), d);
    let started = Instant::now();
    for b in 0..cfg.batches {
        if b > 0
            && cfg
                .max_seconds
                .is_some_and(|m| started.elapsed().as_secs_f64() > m)
        {
            break;
        }
        batch(&mut rng, b, Some(&mut rec))?;
        rec.end_batch();
    }
    Ok(rec.finish(cfg.tokens_per_batch, started.elapsed().as_secs_f64()))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::load_formats::synthetic_window;
    use crate::plan::planner::{make_plan, Budget, PlanRequest};
    use crate::plan::{Algorithm, Dtype, ModelShape, Topology};
    use rand::SeedableRng;

    #[test]
    fn rank_splitting_conserves_rows_and_respects_the_plan() {
        let window = synthetic_window(2, 16, 3, 512, 4, 0.6, 0.2, 3).unwrap();
        let model = ModelShape {
            layers: 2,
            first_moe_layer: 0,
            experts: 16,
            top_k: 4,
            hidden_size: 8,
            expert_intermediate_size: 8,
            dtype: Dtype::Bf16,
        };
        let plan = make_plan(
            &PlanRequest {
                algorithm: Algorithm::Craft,
                model,
                topology: Topology::new(4, 2).unwrap(),
                budget: Budget::ReplicasPerGpu(3),
                eplb_groups: None,
                craft: Default::default(),
            },
            &window,
            None,
        )
        .unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let mut router = LayerRouter::default();
        let mut rows: Vec<Vec<RoutedRow>> = vec![Vec::new(); 4];
        for (li, lp) in plan.layers.iter().enumerate() {
            let picker = ReplicaPicker::new(&lp.replicas(16));
            let mut expert_rows = vec![0u64; 16];
            router.route(
                &mut rng,
                &TopKSampler::new(window.row(0, li)),
                &picker,
                4,
                100,
                64,
                &mut rows,
                &mut expert_rows,
            );
            let shares: Vec<RankShare> = rows.iter().map(|r| RankShare::from_rows(r)).collect();
            let total: usize = shares.iter().map(RankShare::rows).sum();
            assert_eq!(total, 400);
            assert_eq!(expert_rows.iter().sum::<u64>(), 400);
            for (g, s) in shares.iter().enumerate() {
                assert_eq!(s.counts.iter().sum::<usize>(), s.rows());
                for e in &s.experts {
                    assert!(
                        lp.slots[g].contains(e),
                        "rank {g} got expert {e} it does not hold"
                    );
                }
                // Per expert, the rank's rows add up to what the router counted over all ranks.
                for (e, c) in s.experts.iter().zip(&s.counts) {
                    assert!(*c as u64 <= expert_rows[*e as usize]);
                }
            }
            let mut per_expert = vec![0u64; 16];
            for s in &shares {
                for (e, c) in s.experts.iter().zip(&s.counts) {
                    per_expert[*e as usize] += *c as u64;
                }
            }
            assert_eq!(per_expert, expert_rows);
        }
    }

    /// A device that takes one millisecond per row, and remembers each call's rows.
    #[derive(Default)]
    struct Fake {
        calls: Vec<usize>,
    }

    impl RankExec for Fake {
        fn run(&mut self, _: u32, share: &RankShare, _: &[bf16]) -> anyhow::Result<f64> {
            self.calls.push(share.rows());
            Ok(share.rows() as f64 * 1e-3)
        }
        fn device(&self) -> String {
            "fake".into()
        }
        fn timing(&self) -> &'static str {
            "rows"
        }
    }

    #[test]
    fn layer_time_is_the_slowest_rank() {
        let window = synthetic_window(2, 8, 2, 256, 2, 0.8, 0.0, 5).unwrap();
        let model = ModelShape {
            layers: 2,
            first_moe_layer: 0,
            experts: 8,
            top_k: 2,
            hidden_size: 4,
            expert_intermediate_size: 4,
            dtype: Dtype::Bf16,
        };
        let plan = make_plan(
            &PlanRequest {
                algorithm: Algorithm::None,
                model,
                topology: Topology::new(4, 1).unwrap(),
                budget: Budget::ReplicasPerGpu(0),
                eplb_groups: None,
                craft: Default::default(),
            },
            &window,
            None,
        )
        .unwrap();
        let mut fake = Fake::default();
        let mut cfg = RunConfig::new(3, 100, 9);
        cfg.warmup = 1;
        let m = run_emulated(&plan, &window, &cfg, &mut fake).unwrap();
        assert_eq!(
            fake.calls.len(),
            4 * 2 * 4,
            "4 batches (1 warm-up) x 2 layers x 4 ranks"
        );
        // 3 batches x 2 layers x 100 tokens x top-2; 300 would be every step balanced.
        assert_eq!((m.batches, m.tokens, m.rows), (3, 300, 1200));
        assert_eq!(m.rank_rows.iter().sum::<u64>(), 1200);
        // The warm-up's 8 calls are not counted; each (batch, layer) takes its slowest rank.
        let measured = &fake.calls[8..];
        assert_eq!(measured.iter().sum::<usize>(), 1200);
        let slowest: usize = measured.chunks(4).map(|c| *c.iter().max().unwrap()).sum();
        assert!((m.compute_seconds - slowest as f64 * 1e-3).abs() < 1e-9);
        assert!(
            slowest > 300,
            "a skewed load on no replication is not balanced"
        );
        assert!(m.observed_balancedness < 1.0);
    }
}
