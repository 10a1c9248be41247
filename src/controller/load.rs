//! From worker scrapes to a [`LoadWindow`]: take each worker's [`WorkerSample`] (its `/metrics`
//! read by `worker::wire`), turn the `moe_expert_tokens_total{layer,expert}` counters into
//! per-interval deltas (counter resets, i.e. worker restarts, count from zero as Prometheus'
//! `increase()` does), sum them over the workers into one batch per interval, and keep the last
//! `window` batches. Pure: the caller does the HTTP.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::plan::LoadWindow;
use crate::worker::wire::WorkerSample;

/// Increase of a counter between two readings; a drop means the worker restarted and counts
/// from zero again.
pub fn counter_increase(previous: f64, current: f64) -> f64 {
    if current >= previous {
        current - previous
    } else {
        current
    }
}

/// The sliding load window built from successive scrapes of all workers.
#[derive(Clone, Debug)]
pub struct ScrapeWindow {
    layer_ids: Vec<u32>,
    experts: u32,
    capacity: usize,
    /// Last counter readings, per worker (pod name or rank).
    last: HashMap<String, BTreeMap<(u32, u32), f64>>,
    /// One `layers x experts` batch per interval, oldest first.
    batches: VecDeque<Vec<f64>>,
}

impl ScrapeWindow {
    /// `layer_ids`: the model's MoE layer indices; `capacity`: batches kept (the spec's window).
    pub fn new(layer_ids: Vec<u32>, experts: u32, capacity: usize) -> Self {
        Self {
            layer_ids,
            experts,
            capacity: capacity.max(1),
            last: HashMap::new(),
            batches: VecDeque::new(),
        }
    }

    /// Record one interval's scrapes (the workers that answered). A worker's first scrape only
    /// sets its baseline. Samples for layers or experts outside the model are an error naming
    /// them: the worker runs another model or plan than the spec.
    pub fn record(&mut self, scrapes: &[(String, WorkerSample)]) -> Result<(), String> {
        let experts = self.experts as usize;
        let mut batch = vec![0.0; self.layer_ids.len() * experts];
        let mut any = false;
        for (worker, sample) in scrapes {
            for &(layer, expert) in sample.tokens.keys() {
                if expert >= self.experts || !self.layer_ids.contains(&layer) {
                    return Err(format!(
                        "worker {worker} reports tokens for layer {layer} expert {expert}, outside the model's MoE layers {:?} and {} experts",
                        self.layer_ids, self.experts
                    ));
                }
            }
            if let Some(prev) = self.last.get(worker) {
                any = true;
                for (&(layer, expert), &cur) in &sample.tokens {
                    let l = self.layer_ids.iter().position(|&x| x == layer).unwrap_or(0);
                    let before = prev.get(&(layer, expert)).copied().unwrap_or(0.0);
                    batch[l * experts + expert as usize] += counter_increase(before, cur);
                }
            }
            self.last.insert(worker.clone(), sample.tokens.clone());
        }
        if any {
            self.batches.push_back(batch);
            while self.batches.len() > self.capacity {
                self.batches.pop_front();
            }
        }
        Ok(())
    }

    /// Record one interval's load given directly as per-expert amounts (a Prometheus query such
    /// as `sum by (layer, expert) (increase(moe_expert_tokens_total[1m]))`: Prometheus already
    /// turned the counters into increases, resets included), as one batch. Samples outside the
    /// model are refused as in [`Self::record`]. Returns whether the batch holds any tokens.
    pub fn push_amounts(&mut self, source: &str, sample: &WorkerSample) -> Result<bool, String> {
        let experts = self.experts as usize;
        let mut batch = vec![0.0; self.layer_ids.len() * experts];
        for (&(layer, expert), &v) in &sample.tokens {
            let l = self.layer_ids.iter().position(|&x| x == layer);
            let Some(l) = l.filter(|_| expert < self.experts) else {
                return Err(format!(
                    "{source} reports tokens for layer {layer} expert {expert}, outside the model's MoE layers {:?} and {} experts",
                    self.layer_ids, self.experts
                ));
            };
            if !v.is_finite() || v < 0.0 {
                return Err(format!(
                    "{source}: layer {layer} expert {expert} has {v} tokens: the query must give non-negative amounts (increase or rate of the counter)"
                ));
            }
            batch[l * experts + expert as usize] += v;
        }
        let any = batch.iter().any(|&x| x > 0.0);
        self.batches.push_back(batch);
        while self.batches.len() > self.capacity {
            self.batches.pop_front();
        }
        Ok(any)
    }

    /// Forget workers that are gone (deleted pods), so a replacement with the same name starts
    /// from a fresh baseline.
    pub fn retain_workers(&mut self, alive: impl Fn(&str) -> bool) {
        self.last.retain(|w, _| alive(w));
    }

    pub fn batches(&self) -> usize {
        self.batches.len()
    }

    /// The window as the planner reads it; `None` until one interval has been measured.
    pub fn load_window(&self) -> Option<LoadWindow> {
        if self.batches.is_empty() {
            return None;
        }
        let counts = self.batches.iter().flatten().copied().collect();
        LoadWindow::new(self.layer_ids.clone(), self.experts as usize, counts).ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(pairs: &[((u32, u32), f64)]) -> WorkerSample {
        WorkerSample {
            tokens: pairs.iter().copied().collect(),
            plan_hash: None,
        }
    }

    #[test]
    fn deltas_sum_over_workers_and_survive_restarts() {
        let mut w = ScrapeWindow::new(vec![1, 2], 2, 2);
        w.record(&[
            ("a".into(), sample(&[((1, 0), 10.0)])),
            ("b".into(), sample(&[((2, 1), 5.0)])),
        ])
        .unwrap();
        assert_eq!(w.batches(), 0, "the first scrape only sets baselines");
        assert!(w.load_window().is_none());
        w.record(&[
            ("a".into(), sample(&[((1, 0), 30.0)])),
            ("b".into(), sample(&[((2, 1), 8.0), ((1, 0), 4.0)])),
        ])
        .unwrap();
        let lw = w.load_window().unwrap();
        assert_eq!((lw.batches(), lw.layers(), lw.experts()), (1, 2, 2));
        assert_eq!(lw.row(0, 0), [24.0, 0.0]); // 20 from a, 4 new on b
        assert_eq!(lw.row(0, 1), [0.0, 3.0]);
        // Worker a restarts: its counter drops to 7, which counts as 7 new tokens.
        w.record(&[("a".into(), sample(&[((1, 0), 7.0)]))]).unwrap();
        assert_eq!(w.load_window().unwrap().row(1, 0), [7.0, 0.0]);
        // The window keeps the last 2 batches.
        w.record(&[("a".into(), sample(&[((1, 0), 9.0)]))]).unwrap();
        let lw = w.load_window().unwrap();
        assert_eq!(lw.batches(), 2);
        assert_eq!(lw.row(1, 0), [2.0, 0.0]);
        assert_eq!(lw.total_tokens(), 9.0);
    }

    #[test]
    fn samples_outside_the_model_are_refused() {
        let mut w = ScrapeWindow::new(vec![1], 2, 4);
        let e = w
            .record(&[("a".into(), sample(&[((1, 2), 1.0)]))])
            .unwrap_err();
        assert!(e.contains("layer 1 expert 2"), "{e}");
        let e = w
            .record(&[("a".into(), sample(&[((0, 0), 1.0)]))])
            .unwrap_err();
        assert!(e.contains("layer 0"), "{e}");
    }

    #[test]
    fn prometheus_amounts_are_batches_as_given() {
        let mut w = ScrapeWindow::new(vec![3, 4], 2, 2);
        assert!(w
            .push_amounts("p", &sample(&[((3, 1), 5.5), ((4, 0), 2.0)]))
            .unwrap());
        let lw = w.load_window().unwrap();
        assert_eq!(
            (lw.batches(), lw.row(0, 0), lw.row(0, 1)),
            (1, &[0.0, 5.5][..], &[2.0, 0.0][..])
        );
        // An empty answer (no traffic) is an empty batch, not an error.
        assert!(!w.push_amounts("p", &sample(&[])).unwrap());
        assert!(w.push_amounts("p", &sample(&[((3, 0), 1.0)])).unwrap());
        assert_eq!(w.batches(), 2, "capacity");
        let e = w.push_amounts("p", &sample(&[((5, 0), 1.0)])).unwrap_err();
        assert!(e.contains("layer 5"), "{e}");
        let e = w.push_amounts("p", &sample(&[((3, 0), -1.0)])).unwrap_err();
        assert!(e.contains("non-negative"), "{e}");
    }

    #[test]
    fn replaced_workers_start_from_a_new_baseline() {
        let mut w = ScrapeWindow::new(vec![0], 1, 4);
        w.record(&[("a".into(), sample(&[((0, 0), 100.0)]))])
            .unwrap();
        w.retain_workers(|_| false);
        w.record(&[("a".into(), sample(&[((0, 0), 500.0)]))])
            .unwrap();
        assert_eq!(
            w.batches(),
            0,
            "a forgotten worker's next scrape is a baseline, not 400 tokens"
        );
    }
}
