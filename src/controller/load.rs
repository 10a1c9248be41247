//! From worker scrapes to a [`LoadWindow`]: parse each worker's `/metrics`, turn the
//! `moe_expert_tokens_total{layer,expert}` counters into per-interval deltas (counter resets, i.e.
//! worker restarts, count from zero as Prometheus' `increase()` does), sum them over the workers into
//! one batch per interval, and keep the last `window` batches. Pure: the caller does the HTTP.

use std::collections::{BTreeMap, HashMap, VecDeque};

use crate::plan::LoadWindow;

/// Counter of tokens computed per logical expert (../shared/DESIGN.md, worker metrics).
pub const TOKENS_METRIC: &str = "moe_expert_tokens_total";
/// Info metric naming the plan in force.
pub const PLAN_INFO_METRIC: &str = "moe_worker_plan_info";

/// What one scrape of one worker says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSample {
    /// `(layer, expert) -> tokens` counter values.
    pub tokens: BTreeMap<(u32, u32), f64>,
    /// Hash of `moe_worker_plan_info{hash} 1`, if present.
    pub plan_hash: Option<String>,
}

/// A scrape that cannot be read; the message names the line and what is wrong.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("metrics line {line}: {message}")]
pub struct ParseError {
    pub line: usize,
    pub message: String,
}

/// Parse the labels of one sample: `{a="x",b="y"}` (escapes `\"`, `\\`, `\n`).
fn parse_labels(s: &str) -> Result<BTreeMap<String, String>, String> {
    let mut out = BTreeMap::new();
    let mut chars = s.chars().peekable();
    loop {
        while chars.peek().is_some_and(|c| *c == ',' || c.is_whitespace()) {
            chars.next();
        }
        if chars.peek().is_none() {
            return Ok(out);
        }
        let name: String =
            std::iter::from_fn(|| chars.next_if(|c| c.is_ascii_alphanumeric() || *c == '_'))
                .collect();
        if name.is_empty() || chars.next() != Some('=') || chars.next() != Some('"') {
            return Err(format!("malformed label set {{{s}}}"));
        }
        let mut value = String::new();
        loop {
            match chars.next() {
                Some('"') => break,
                Some('\\') => match chars.next() {
                    Some('n') => value.push('\n'),
                    Some(c) => value.push(c),
                    None => return Err(format!("unterminated label value in {{{s}}}")),
                },
                Some(c) => value.push(c),
                None => return Err(format!("unterminated label value in {{{s}}}")),
            }
        }
        out.insert(name, value);
    }
}

/// Parse a Prometheus text exposition, keeping the two metrics the operator reads.
pub fn parse_worker_metrics(text: &str) -> Result<WorkerSample, ParseError> {
    let mut sample = WorkerSample::default();
    for (i, raw) in text.lines().enumerate() {
        let line = raw.trim();
        let err = |message: String| ParseError {
            line: i + 1,
            message,
        };
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        let (name, rest) = match line.find(['{', ' ']) {
            Some(p) => line.split_at(p),
            None => return Err(err(format!("{line:?} has no value"))),
        };
        let valid_name = name.chars().enumerate().all(|(k, c)| {
            c.is_ascii_alphabetic() || c == '_' || c == ':' || (k > 0 && c.is_ascii_digit())
        });
        if name.is_empty() || !valid_name {
            return Err(err(format!(
                "{name:?} is not a metric name: is this a Prometheus text scrape?"
            )));
        }
        if name != TOKENS_METRIC && name != PLAN_INFO_METRIC {
            continue;
        }
        let (labels, value_part) = if let Some(r) = rest.strip_prefix('{') {
            let end = r.rfind('}').ok_or_else(|| err("unclosed '{'".into()))?;
            (parse_labels(&r[..end]).map_err(err)?, &r[end + 1..])
        } else {
            (BTreeMap::new(), rest)
        };
        let value_text = value_part
            .split_whitespace()
            .next()
            .ok_or_else(|| err(format!("{name} has no value")))?;
        let value: f64 = value_text
            .parse()
            .map_err(|_| err(format!("{name}: value {value_text:?} is not a number")))?;
        if name == PLAN_INFO_METRIC {
            if value == 1.0 {
                let hash = labels
                    .get("hash")
                    .ok_or_else(|| err(format!("{name} without a hash label")))?;
                sample.plan_hash = Some(hash.clone());
            }
            continue;
        }
        let label = |k: &str| -> Result<u32, ParseError> {
            labels
                .get(k)
                .ok_or_else(|| err(format!("{name} without a {k} label")))?
                .parse()
                .map_err(|_| {
                    err(format!(
                        "{name}: label {k}={:?} is not a non-negative integer",
                        labels[k]
                    ))
                })
        };
        if !value.is_finite() || value < 0.0 {
            return Err(err(format!(
                "{name}: counter value {value} is not a finite non-negative number"
            )));
        }
        sample
            .tokens
            .insert((label("layer")?, label("expert")?), value);
    }
    Ok(sample)
}

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

    const SCRAPE: &str = r#"
# HELP moe_expert_tokens_total Tokens computed per logical expert.
# TYPE moe_expert_tokens_total counter
moe_expert_tokens_total{layer="1",expert="0"} 100
moe_expert_tokens_total{expert="1",layer="1"} 50 1732800000000
moe_worker_plan_info{hash="abc\"d"} 1
moe_worker_plan_info{hash="old"} 0
moe_worker_step_seconds_bucket{le="0.1"} 3
"#;

    #[test]
    fn parses_tokens_and_plan_hash() {
        let s = parse_worker_metrics(SCRAPE).unwrap();
        assert_eq!(s.tokens[&(1, 0)], 100.0);
        assert_eq!(s.tokens[&(1, 1)], 50.0);
        assert_eq!(s.tokens.len(), 2);
        assert_eq!(s.plan_hash.as_deref(), Some("abc\"d"));
    }

    #[test]
    fn garbled_scrapes_name_the_line() {
        let cases = [
            (
                "moe_expert_tokens_total{layer=\"1\",expert=\"x\"} 1",
                1,
                "not a non-negative integer",
            ),
            (
                "\nmoe_expert_tokens_total{layer=\"1\"} 1",
                2,
                "without a expert label",
            ),
            (
                "moe_expert_tokens_total{layer=\"1\",expert=\"0\"} many",
                1,
                "not a number",
            ),
            (
                "moe_expert_tokens_total{layer=\"1\",expert=\"0\"} -5",
                1,
                "non-negative",
            ),
            (
                "moe_expert_tokens_total{layer=\"1\",expert=\"0\" 5",
                1,
                "unclosed",
            ),
            ("moe_worker_plan_info{} 1", 1, "without a hash label"),
            ("<html>bad gateway</html>", 1, "not a metric name"),
            ("oops", 1, "no value"),
        ];
        for (text, line, needle) in cases {
            let e = parse_worker_metrics(text).unwrap_err();
            assert_eq!(e.line, line, "{text}: {e}");
            assert!(e.message.contains(needle), "{text}: {e}");
        }
    }

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
