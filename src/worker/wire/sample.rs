//! A worker's `/metrics` read back: the [`TOKENS_METRIC`] counters per (layer, expert) and the
//! plan hash of [`PLAN_INFO_METRIC`]. Pure; the [`super::WorkerClient`] does the HTTP, and the
//! operator's `ScrapeWindow` (controller::load) turns successive samples into a load window.

use std::collections::BTreeMap;

use super::{EXPERT_LABEL, LAYER_LABEL, PLAN_HASH_LABEL, PLAN_INFO_METRIC, TOKENS_METRIC};

/// What one scrape of one worker says.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct WorkerSample {
    /// `(layer, expert) -> tokens` counter values.
    pub tokens: BTreeMap<(u32, u32), f64>,
    /// Hash of `moe_worker_plan_info{hash} 1` ([`PLAN_INFO_METRIC`]), if present.
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
                    .get(PLAN_HASH_LABEL)
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
            .insert((label(LAYER_LABEL)?, label(EXPERT_LABEL)?), value);
    }
    Ok(sample)
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
}
