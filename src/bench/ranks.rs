//! Ranks mode of the policy testbed: one process per rank on a GPU transport (CUDA IPC or NCCL),
//! each a token source and an expert host through the data plane (`crate::ep`), against the
//! emulated (kernels-only) ranks in the same run, on the same token draws and the same plans.
//!
//! Draws: for batch `b` and layer `li` the whole batch's top-k ids and router weights come from a
//! seeded generator ([`draws`]); rank `r` takes tokens [`token_range`]. The emulation replays
//! exactly what the ranks do: each source rank's rows routed by its own replica router, each
//! destination's share timed on the device, the layer taking the slowest rank.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use anyhow::Context;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use serde::{Deserialize, Serialize};

use super::emulate::{RankExec, RunConfig, WARMUP_SEED_XOR};
use super::{fit_window, Measured, RankShare, StepMs, StepRecorder};
use crate::ep::route::{Dispatch, Router};
use crate::ep::session::{Session, SessionConfig};
use crate::loadgen::layer_map;
use crate::loadgen::route::{hidden_pool, router_weights, RoutedRow, TopKSampler};
use crate::plan::expert_plan::HashRule;
use crate::plan::load_formats::read_load_file;
use crate::plan::planner::moe_layer_ids;
use crate::plan::{ExpertPlan, LoadWindow};

/// Hidden vectors the rows are drawn from (as `moectl loadgen`).
const POOL: usize = 64;

/// Rank `rank`'s tokens of a batch of `tokens`.
pub fn token_range(rank: usize, world: usize, tokens: usize) -> Range<usize> {
    tokens * rank / world..tokens * (rank + 1) / world
}

/// The whole batch's router output for batch `b`, layer position `li`: `tokens x top_k` ids
/// drawn from the layer's load and random router weights summing to 1 per token.
pub fn draws(
    window: &LoadWindow,
    row: usize,
    b: usize,
    li: usize,
    seed: u64,
    tokens: usize,
    top_k: usize,
) -> (Vec<i64>, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(
        seed ^ (b as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ ((li as u64) << 40),
    );
    let sampler = TopKSampler::new(window.row(b % window.batches(), row));
    let (mut picks, mut w) = (Vec::new(), Vec::new());
    let mut ids = Vec::with_capacity(tokens * top_k);
    let mut ws = Vec::with_capacity(tokens * top_k);
    for _ in 0..tokens {
        sampler.sample(&mut rng, top_k, &mut picks);
        router_weights(&mut rng, picks.len(), &mut w);
        ids.extend(picks.iter().map(|&e| i64::from(e)));
        ws.extend_from_slice(&w);
    }
    (ids, ws)
}

/// Emulated ranks on the ranks mode's draws: returns the measurement (layer = slowest rank) and
/// the seconds the same shares take one after another (what one device can do at best when all
/// ranks share it).
pub fn run_emulated_sources(
    plan: &ExpertPlan,
    window: &LoadWindow,
    cfg: &RunConfig,
    exec: &mut dyn RankExec,
) -> anyhow::Result<(Measured, f64)> {
    let layer_of = layer_map(plan, window)?;
    let d = plan.gpus as usize;
    let (h, k) = (plan.model.hidden_size as usize, plan.model.top_k as usize);
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed);
    let pool = hidden_pool(&mut rng, POOL, h);
    let mut routers: Vec<Router> = (0..d).map(|_| Router::new(plan)).collect();
    let mut serial = 0.0;
    let mut rec = StepRecorder::new(plan.layers.iter().map(|l| l.layer).collect(), d);
    let started = Instant::now();
    for (seed, count, measured) in [
        (cfg.seed ^ WARMUP_SEED_XOR, cfg.warmup, false),
        (cfg.seed, cfg.batches, true),
    ] {
        for b in 0..count {
            for (li, lp) in plan.layers.iter().enumerate() {
                let (ids, ws) = draws(window, layer_of[li], b, li, seed, cfg.tokens_per_batch, k);
                let mut rows: Vec<Vec<RoutedRow>> = vec![Vec::new(); d];
                for (r, router) in routers.iter_mut().enumerate() {
                    let tr = token_range(r, d, cfg.tokens_per_batch);
                    let n = tr.len();
                    let sd = Dispatch::build(
                        router,
                        lp.layer,
                        d,
                        n,
                        k,
                        &ids[tr.start * k..tr.end * k],
                        &ws[tr.start * k..tr.end * k],
                    )?;
                    let off = sd.offsets();
                    for (dest, rs) in rows.iter_mut().enumerate() {
                        for i in off[dest]..off[dest + 1] {
                            let t = tr.start + sd.send_tokens[i] as usize;
                            rs.push((sd.experts[i], sd.weights[i], (t % POOL) as u32));
                        }
                    }
                }
                let mut times = vec![0.0; d];
                let mut counts = vec![0u64; d];
                for g in 0..d {
                    let share = RankShare::from_rows(&rows[g]);
                    counts[g] = share.rows() as u64;
                    times[g] = exec
                        .run(lp.layer, &share, &pool)
                        .with_context(|| format!("emulated rank {g}, layer {}", lp.layer))?;
                }
                if measured {
                    rec.layer(li, &times, &counts);
                    serial += times.iter().sum::<f64>();
                }
            }
            if measured {
                rec.end_batch();
            }
        }
    }
    Ok((
        rec.finish(cfg.tokens_per_batch, started.elapsed().as_secs_f64()),
        serial,
    ))
}

/// What one rank process runs (`moectl bench ep-rank --job FILE`).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankJob {
    pub session: SessionConfig,
    /// The load trace the draws come from.
    pub load: PathBuf,
    /// Tokens per batch of each run, one after another.
    pub tokens: Vec<usize>,
    pub batches: usize,
    pub warmup: usize,
    pub seed: u64,
    /// Times each layer's communication-only exchange is repeated.
    pub comm_repeats: usize,
    pub report: PathBuf,
}

/// Per-layer averages of one rank's step parts, in milliseconds.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct PartsMs {
    pub route: f64,
    pub gather: f64,
    pub exchange: f64,
    pub compute: f64,
    pub combine: f64,
}

/// One rank's measurements of one run (one tokens-per-batch size).
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankRun {
    pub tokens_per_batch: usize,
    /// Wall seconds of each measured step (all layers).
    pub step_seconds: Vec<f64>,
    pub parts_ms_per_layer: PartsMs,
    /// Dispatch plus combine of one layer without compute, averaged over layers and repeats.
    pub comm_ms_per_layer: f64,
    /// Bytes this rank sent per layer in that exchange (rows out and back).
    pub comm_bytes_per_layer: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RankReport {
    pub rank: usize,
    pub transport: String,
    pub runs: Vec<RankRun>,
}

/// The rank process: joins the group, runs every size's warm-up and measured steps, then the
/// communication-only exchange, and writes its report.
pub fn rank_main(job: &RankJob) -> anyhow::Result<()> {
    let plan = ExpertPlan::read_file_checked(&job.session.plan, HashRule::Required)
        .map_err(|e| anyhow::anyhow!("plan: {e}"))?;
    let trace = read_load_file(&job.load).map_err(|e| anyhow::anyhow!("{e}"))?;
    let (window, _) =
        fit_window(&trace, &moe_layer_ids(&plan.model)).map_err(anyhow::Error::msg)?;
    let layer_of = layer_map(&plan, &window)?;
    let (rank, world) = (job.session.rank, job.session.world);
    let (h, k) = (plan.model.hidden_size as usize, plan.model.top_k as usize);
    let mut s = Session::new(&job.session)?;
    let mut rng = ChaCha8Rng::seed_from_u64(job.seed);
    let pool = hidden_pool(&mut rng, POOL, h);
    let mut runs = Vec::new();
    for &tokens in &job.tokens {
        let tr = token_range(rank, world, tokens);
        let n = tr.len();
        let x_host: Vec<u16> = tr
            .clone()
            .flat_map(|t| {
                pool[(t % POOL) * h..(t % POOL + 1) * h]
                    .iter()
                    .map(|v| v.to_bits())
            })
            .collect();
        let dev = s.device().clone();
        let stream = dev.stream().clone();
        let x = stream
            .clone_htod(&x_host)
            .map_err(|e| anyhow::anyhow!("uploading the rank's tokens: {e:?}"))?;
        let out = stream
            .alloc_zeros::<u16>(n.max(1) * h)
            .map_err(|e| anyhow::anyhow!("allocating the output: {e:?}"))?;
        use cudarc::driver::DevicePtr;
        let (xp, op) = (x.device_ptr(&stream).0, out.device_ptr(&stream).0);
        stream.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        // Draws first (not timed): this rank's slice of every batch and layer.
        let slice = |seed: u64, b: usize| -> Vec<(Vec<i64>, Vec<f32>)> {
            (0..plan.layers.len())
                .map(|li| {
                    let (ids, ws) = draws(&window, layer_of[li], b, li, seed, tokens, k);
                    (
                        ids[tr.start * k..tr.end * k].to_vec(),
                        ws[tr.start * k..tr.end * k].to_vec(),
                    )
                })
                .collect()
        };
        let warm: Vec<_> = (0..job.warmup)
            .map(|b| slice(job.seed ^ WARMUP_SEED_XOR, b))
            .collect();
        let meas: Vec<_> = (0..job.batches).map(|b| slice(job.seed, b)).collect();
        let step = |s: &mut Session, d: &[(Vec<i64>, Vec<f32>)]| -> anyhow::Result<f64> {
            s.begin_step();
            let t = Instant::now();
            for (li, lp) in plan.layers.iter().enumerate() {
                s.forward_host_routing(lp.layer, n, k, xp, &d[li].0, &d[li].1, op)?;
            }
            Ok(t.elapsed().as_secs_f64())
        };
        for d in &warm {
            step(&mut s, d)?;
        }
        let before = s.timings();
        let step_seconds = meas
            .iter()
            .map(|d| step(&mut s, d))
            .collect::<anyhow::Result<Vec<f64>>>()?;
        let after = s.timings();
        let layers = (after.layers - before.layers).max(1) as f64;
        let ms = |a: f64, b: f64| (a - b) * 1e3 / layers;
        let parts = PartsMs {
            route: ms(after.route, before.route),
            gather: ms(after.gather, before.gather),
            exchange: ms(after.exchange, before.exchange),
            compute: ms(after.compute, before.compute),
            combine: ms(after.combine, before.combine),
        };
        let (mut comm, mut bytes, mut calls) = (0.0, 0.0, 0usize);
        let first = meas.first().or(warm.first());
        for _ in 0..job.comm_repeats {
            for (li, lp) in plan.layers.iter().enumerate() {
                let Some(d) = first else { break };
                let t = Instant::now();
                bytes += s.dispatch_combine(lp.layer, n, k, xp, &d[li].0, &d[li].1)? as f64;
                comm += t.elapsed().as_secs_f64();
                calls += 1;
            }
        }
        s.heartbeat()?;
        runs.push(RankRun {
            tokens_per_batch: tokens,
            step_seconds,
            parts_ms_per_layer: parts,
            comm_ms_per_layer: comm * 1e3 / calls.max(1) as f64,
            comm_bytes_per_layer: bytes / calls.max(1) as f64,
        });
    }
    let report = RankReport {
        rank,
        transport: job.session.transport.clone(),
        runs,
    };
    std::fs::write(&job.report, serde_json::to_string_pretty(&report)? + "\n")
        .with_context(|| format!("writing {}", job.report.display()))?;
    Ok(())
}

/// Starts one `moectl bench ep-rank` per rank and waits for all (killing the rest when one fails
/// or the deadline passes).
pub fn run_rank_processes(
    exe: &Path,
    jobs: &[RankJob],
    dir: &Path,
    deadline: Duration,
) -> anyhow::Result<Vec<RankReport>> {
    let mut children: Vec<(usize, Child, PathBuf)> = Vec::new();
    for job in jobs {
        let r = job.session.rank;
        let jf = dir.join(format!("rank-{r}.job.json"));
        std::fs::write(&jf, serde_json::to_string_pretty(job)?)?;
        let log = dir.join(format!("rank-{r}.log"));
        let f = std::fs::File::create(&log)?;
        let child = Command::new(exe)
            .args(["bench", "ep-rank", "--job"])
            .arg(&jf)
            .stdout(f.try_clone()?)
            .stderr(f)
            .spawn()
            .with_context(|| format!("starting {}", exe.display()))?;
        children.push((r, child, log));
    }
    let started = Instant::now();
    let mut failed: Option<String> = None;
    let mut done = vec![false; children.len()];
    while done.iter().any(|d| !d) && failed.is_none() {
        for (i, (r, c, log)) in children.iter_mut().enumerate() {
            if done[i] {
                continue;
            }
            if let Some(st) = c.try_wait()? {
                done[i] = true;
                if !st.success() {
                    let tail = std::fs::read_to_string(&*log).unwrap_or_default();
                    let tail: Vec<&str> = tail.lines().rev().take(15).collect();
                    failed = Some(format!(
                        "rank {r} exited with {st}; its log ({}) ends:\n{}",
                        log.display(),
                        tail.into_iter().rev().collect::<Vec<_>>().join("\n")
                    ));
                }
            }
        }
        if started.elapsed() > deadline {
            failed = Some(format!("the ranks did not finish within {deadline:?}"));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    if let Some(f) = failed {
        for (_, c, _) in children.iter_mut() {
            let _ = c.kill();
            let _ = c.wait();
        }
        anyhow::bail!(f);
    }
    jobs.iter()
        .map(|j| {
            let b = std::fs::read(&j.report)
                .with_context(|| format!("reading {}", j.report.display()))?;
            Ok(serde_json::from_slice(&b)?)
        })
        .collect()
}

/// One policy at one size: emulated against real ranks.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RanksResult {
    pub policy: String,
    pub replicas_per_gpu: u32,
    /// 1, or 2 when each layer ran as two pipelined micro-batches.
    #[serde(default = "one")]
    pub micro_batches: usize,
    pub tokens_per_batch: usize,
    /// Kernels only, layer = slowest rank (each rank as if on its own GPU).
    pub emulated_tokens_per_s: f64,
    /// Kernels only, the ranks' shares one after another on the one device.
    pub serial_tokens_per_s: f64,
    pub ranks_tokens_per_s: f64,
    pub ranks_over_emulated: f64,
    pub ranks_over_serial: f64,
    /// Step (all layers) of the real ranks, rank 0's clock.
    pub step_ms: StepMs,
    /// Rank 0's parts of a layer.
    pub parts_ms_per_layer: PartsMs,
    /// Dispatch plus combine of a layer, no compute (slowest rank).
    pub comm_ms_per_layer: f64,
    /// A device-to-device copy of all ranks' bytes of that exchange, on one stream.
    pub d2d_ms_per_layer: f64,
    pub comm_bytes_per_layer: f64,
}

fn one() -> usize {
    1
}

/// Builds the result line from both modes' measurements.
#[allow(clippy::too_many_arguments)]
pub fn result(
    plan: &ExpertPlan,
    micro_batches: usize,
    tokens: usize,
    emulated: &Measured,
    serial_seconds: f64,
    reports: &[RankReport],
    run: usize,
    d2d_seconds: f64,
) -> RanksResult {
    let r0 = &reports[0].runs[run];
    let mean = |v: &[f64]| v.iter().sum::<f64>() / v.len().max(1) as f64;
    let step = mean(&r0.step_seconds);
    let batches = emulated.batches.max(1) as f64;
    let emu_tps = emulated.tokens as f64 / emulated.compute_seconds.max(1e-12);
    let serial_tps = batches * tokens as f64 / serial_seconds.max(1e-12);
    let ranks_tps = tokens as f64 / step.max(1e-12);
    RanksResult {
        policy: plan.algorithm.to_string(),
        replicas_per_gpu: plan.replicas_per_gpu,
        micro_batches,
        tokens_per_batch: tokens,
        emulated_tokens_per_s: emu_tps,
        serial_tokens_per_s: serial_tps,
        ranks_tokens_per_s: ranks_tps,
        ranks_over_emulated: ranks_tps / emu_tps,
        ranks_over_serial: ranks_tps / serial_tps,
        step_ms: StepMs::of_seconds(&r0.step_seconds),
        parts_ms_per_layer: r0.parts_ms_per_layer.clone(),
        comm_ms_per_layer: reports
            .iter()
            .map(|r| r.runs[run].comm_ms_per_layer)
            .fold(0.0, f64::max),
        d2d_ms_per_layer: d2d_seconds * 1e3,
        comm_bytes_per_layer: reports
            .iter()
            .map(|r| r.runs[run].comm_bytes_per_layer)
            .sum(),
    }
}

/// Markdown table of ranks-mode results.
pub fn markdown(title: &str, rows: &[RanksResult]) -> String {
    let mut s = format!("### {title}\n\n| policy | R | micro-batches | tokens/batch | emulated tok/s | serial tok/s | ranks tok/s | ranks / emulated | ranks / serial | step p50 ms | layer parts ms (route / gather / exchange / compute / combine) | dispatch+combine ms | D2D copy ms | ratio | MiB/layer |\n|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|\n");
    for r in rows {
        let p = &r.parts_ms_per_layer;
        s += &format!(
            "| {} | {} | {} | {} | {:.0} | {:.0} | {:.0} | {:.3}x | {:.3}x | {:.3} | {:.3} / {:.3} / {:.3} / {:.3} / {:.3} | {:.3} | {:.3} | {:.2}x | {:.1} |\n",
            r.policy,
            r.replicas_per_gpu,
            r.micro_batches,
            r.tokens_per_batch,
            r.emulated_tokens_per_s,
            r.serial_tokens_per_s,
            r.ranks_tokens_per_s,
            r.ranks_over_emulated,
            r.ranks_over_serial,
            r.step_ms.p50,
            p.route,
            p.gather,
            p.exchange,
            p.compute,
            p.combine,
            r.comm_ms_per_layer,
            r.d2d_ms_per_layer,
            r.comm_ms_per_layer / r.d2d_ms_per_layer.max(1e-9),
            r.comm_bytes_per_layer / (1u64 << 20) as f64
        );
    }
    s
}

/// Seconds of one device-to-device copy of `bytes` on `dev`'s stream (best of `repeats`).
pub fn d2d_copy_seconds(
    dev: &crate::worker::cuda::CudaDevice,
    bytes: usize,
    repeats: usize,
) -> anyhow::Result<f64> {
    let st = dev.stream();
    let n = bytes.div_ceil(2).max(1);
    let src = st
        .alloc_zeros::<u16>(n)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut dst = st
        .alloc_zeros::<u16>(n)
        .map_err(|e| anyhow::anyhow!("{e:?}"))?;
    let mut best = f64::MAX;
    for _ in 0..repeats.max(1) {
        st.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        let t = Instant::now();
        st.memcpy_dtod(&src, &mut dst)
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        st.synchronize().map_err(|e| anyhow::anyhow!("{e:?}"))?;
        best = best.min(t.elapsed().as_secs_f64());
    }
    Ok(best)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_ranges_cover_the_batch_once() {
        for world in 1..6 {
            for tokens in [0, 1, 7, 256] {
                let mut next = 0;
                for r in 0..world {
                    let tr = token_range(r, world, tokens);
                    assert_eq!(tr.start, next);
                    next = tr.end;
                }
                assert_eq!(next, tokens);
            }
        }
    }

    #[test]
    fn draws_are_seeded_and_distinct_per_token() {
        let w = crate::plan::load_formats::synthetic_window(2, 16, 2, 256, 4, 0.5, 0.2, 1).unwrap();
        let a = draws(&w, 1, 0, 1, 5, 32, 4);
        assert_eq!(a, draws(&w, 1, 0, 1, 5, 32, 4));
        assert_ne!(a, draws(&w, 1, 1, 1, 5, 32, 4));
        for t in 0..32 {
            let ids = &a.0[t * 4..t * 4 + 4];
            let mut u = ids.to_vec();
            u.sort();
            u.dedup();
            assert_eq!(u.len(), 4);
            let s: f32 = a.1[t * 4..t * 4 + 4].iter().sum();
            assert!((s - 1.0).abs() < 1e-5);
        }
    }
}
