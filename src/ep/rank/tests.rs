use std::sync::Arc;
use std::time::Duration;

use super::*;
use crate::ep::backend::HostBackend;
use crate::ep::mesh::local_group;
use crate::ep::testutil::{plan_seeded, shape, tokens, Tokens};
use crate::ep::transport::TcpRows;
use crate::plan::ModelShape;
use crate::worker::checkpoint::synthetic::HashedWeights;
use crate::worker::checkpoint::WeightSource;

type HostRank = EpRank<HostBackend, TcpRows>;

fn model() -> ModelShape {
    shape(2, 8, 2, 32, 16)
}

fn source(m: &ModelShape) -> Arc<dyn WeightSource> {
    Arc::new(HashedWeights::new(m.clone(), 11))
}

fn group(world: usize, plan: &Arc<ExpertPlan>, m: &ModelShape) -> Vec<HostRank> {
    group_split(world, plan, m, |_| 1)
}

/// A group whose rank `r` runs each layer as `micro(r)` micro-batches.
fn group_split(
    world: usize,
    plan: &Arc<ExpertPlan>,
    m: &ModelShape,
    micro: impl Fn(usize) -> usize,
) -> Vec<HostRank> {
    local_group(world, Duration::from_secs(5))
        .unwrap()
        .into_iter()
        .map(|mesh| {
            let r = mesh.rank();
            let mut rank = EpRank::new(
                mesh,
                HostBackend::new(source(m)),
                TcpRows::new(r),
                plan.clone(),
                1,
            )
            .unwrap();
            rank.set_micro_batches(micro(r));
            rank
        })
        .collect()
}

/// Runs `f` on every rank at once, a thread each (all started before any is waited for: the
/// ranks step together), and returns the results in rank order.
fn each_rank<T: Send>(ranks: Vec<HostRank>, f: impl Fn(HostRank) -> T + Sync) -> Vec<T> {
    let f = &f;
    std::thread::scope(|s| {
        let running: Vec<_> = ranks.into_iter().map(|r| s.spawn(move || f(r))).collect();
        running.into_iter().map(|h| h.join().unwrap()).collect()
    })
}

/// The single-rank result for the same tokens: one rank holds every expert.
fn reference(m: &ModelShape, t: &Tokens, layers: &[u32]) -> Vec<Vec<u16>> {
    let plan = Arc::new(plan_seeded(m.clone(), 1, 0, 3));
    let mut r = group(1, &plan, m).pop().unwrap();
    let h = m.hidden_size as usize;
    layers
        .iter()
        .map(|&l| {
            let mut out = vec![0u16; t.n * h];
            r.forward(l, t.n, m.top_k as usize, &t.x, &t.ids, &t.w, &mut out)
                .unwrap();
            out
        })
        .collect()
}

#[test]
fn several_ranks_over_tcp_equal_one_rank() {
    several_ranks_equal_one_rank(1);
}

#[test]
fn two_micro_batches_equal_one_rank() {
    several_ranks_equal_one_rank(2);
}

fn several_ranks_equal_one_rank(micro: usize) {
    let m = model();
    let world = 3;
    let plan = Arc::new(plan_seeded(m.clone(), world as u32, 2, 5));
    let layers: Vec<u32> = plan.layers.iter().map(|l| l.layer).collect();
    let results = each_rank(group_split(world, &plan, &m, |_| micro), |mut r| {
        // Uneven shares (an odd count splits unevenly), and a rank with no tokens at all.
        let n = [5, 0, 9][r.rank()];
        let t = tokens(100 + r.rank() as u64, n, &m);
        let h = m.hidden_size as usize;
        let mut outs = Vec::new();
        for &l in &layers {
            let mut out = vec![0u16; n * h];
            r.forward(l, n, 2, &t.x, &t.ids, &t.w, &mut out).unwrap();
            outs.push(out);
        }
        (t, outs)
    });
    for (t, outs) in results {
        assert_eq!(outs, reference(&m, &t, &layers));
    }
}

#[test]
fn the_group_switches_plans_at_one_step_whenever_ranks_stage_them() {
    switches_plans_at_one_step(1);
}

#[test]
fn with_two_micro_batches_the_group_switches_plans_at_one_step() {
    switches_plans_at_one_step(2);
}

fn switches_plans_at_one_step(micro: usize) {
    let m = model();
    let world = 3;
    let a = Arc::new(plan_seeded(m.clone(), world as u32, 0, 5));
    let b = Arc::new(plan_seeded(m.clone(), world as u32, 3, 9));
    assert_ne!(a.hash, b.hash);
    let layers: Vec<u32> = a.layers.iter().map(|l| l.layer).collect();
    // Rank r stages plan b before layer `at[r].1` of step `at[r].0`.
    let at = [(1u64, 0usize), (2, 1), (4, 0)];
    let results = each_rank(group_split(world, &a, &m, |_| micro), |mut r| {
        let (stage_step, stage_layer) = at[r.rank()];
        let t = tokens(7 + r.rank() as u64, 6, &m);
        let h = m.hidden_size as usize;
        let mut epochs = Vec::new();
        let mut outs = Vec::new();
        for _ in 0..7 {
            r.begin_step();
            epochs.push(r.active_epoch());
            for (li, &l) in layers.iter().enumerate() {
                if (r.step(), li) == (stage_step, stage_layer) {
                    r.stage(b.clone(), 2).unwrap();
                }
                assert_eq!(
                    r.active_epoch(),
                    epochs[epochs.len() - 1],
                    "mid-step switch"
                );
                let mut out = vec![0u16; 6 * h];
                r.forward(l, 6, 2, &t.x, &t.ids, &t.w, &mut out).unwrap();
                outs.push(out);
            }
        }
        (t, epochs, outs, r.active_plan().hash.clone())
    });
    // Rank 2 stages at step 4 (layer 0): every rank reports it in step 4's first exchange, so
    // the whole group routes by plan b from step 5 on.
    for (t, epochs, outs, hash) in results {
        assert_eq!(epochs, vec![1, 1, 1, 1, 2, 2, 2]);
        assert_eq!(hash, b.hash);
        let want = reference(&m, &t, &layers);
        for (i, o) in outs.iter().enumerate() {
            assert_eq!(
                o,
                &want[i % layers.len()],
                "step {} layer {}",
                i / layers.len() + 1,
                i % layers.len()
            );
        }
    }
}

#[test]
fn a_rank_that_dies_is_named_by_the_others_within_the_step_timeout() {
    let m = model();
    let plan = Arc::new(plan_seeded(m.clone(), 3, 0, 5));
    let mut ranks = group(3, &plan, &m);
    drop(ranks.pop());
    let started = Instant::now();
    let errs = each_rank(ranks, |mut r| {
        let t = tokens(1, 4, &m);
        let mut out = vec![0u16; 4 * m.hidden_size as usize];
        r.forward(0, 4, 2, &t.x, &t.ids, &t.w, &mut out)
            .unwrap_err()
            .to_string()
    });
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "{:?}",
        started.elapsed()
    );
    for (r, e) in errs.iter().enumerate() {
        assert!(e.starts_with(&format!("ep rank {r}: rank 2 ")), "{e}");
    }
}

#[test]
fn ranks_out_of_step_are_told_which_peer_and_where() {
    let m = model();
    let plan = Arc::new(plan_seeded(m.clone(), 2, 0, 5));
    let errs = each_rank(group(2, &plan, &m), |mut r| {
        let t = tokens(1, 4, &m);
        let mut out = vec![0u16; 4 * m.hidden_size as usize];
        let layer = r.rank() as u32; // rank 1 skips layer 0
        r.forward(layer, 4, 2, &t.x, &t.ids, &t.w, &mut out)
            .unwrap_err()
            .to_string()
    });
    assert!(
        errs[0].contains("rank 1 is at step 1 layer 1 Dispatch"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("rank 0 is at step 1 layer 0 Dispatch"),
        "{}",
        errs[1]
    );
}

#[test]
fn ranks_with_different_micro_batch_settings_are_told_not_left_waiting() {
    let m = model();
    let plan = Arc::new(plan_seeded(m.clone(), 2, 0, 5));
    let started = Instant::now();
    let errs = each_rank(group_split(2, &plan, &m, |r| r + 1), |mut r| {
        let t = tokens(1, 4, &m);
        let mut out = vec![0u16; 4 * m.hidden_size as usize];
        r.forward(0, 4, 2, &t.x, &t.ids, &t.w, &mut out)
            .unwrap_err()
            .to_string()
    });
    assert!(started.elapsed() < Duration::from_secs(5));
    assert!(
        errs[0].contains("rank 1 is at step 1 layer 0 Dispatch (micro-batch 1)"),
        "{errs:?}"
    );
    assert!(
        errs[1].contains("rank 0 is at step 1 layer 0 Combine (micro-batch 0)"),
        "{errs:?}"
    );
}

#[test]
fn a_plan_for_another_group_size_is_refused() {
    let m = model();
    let plan = Arc::new(plan_seeded(m.clone(), 4, 0, 5));
    let mesh = local_group(1, Duration::from_secs(1))
        .unwrap()
        .pop()
        .unwrap();
    let e = EpRank::new(mesh, HostBackend::new(source(&m)), TcpRows::new(0), plan, 1)
        .err()
        .unwrap();
    assert!(
        e.to_string()
            .contains("the plan is for 4 GPUs, the group has 1 ranks"),
        "{e}"
    );
}
