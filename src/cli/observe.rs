//! `moectl observe`: scrape workers' `/metrics` at an interval and write the per-interval expert
//! load as a trace, the same window the operator builds from the same counters.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::controller::load::ScrapeWindow;
use crate::plan::load_formats::to_trace_json;
use crate::worker::wire::parse_worker_metrics;

#[derive(Args, Debug)]
pub struct ObserveArgs {
    /// Metrics addresses of the workers: HOST:PORT,HOST:PORT,...
    #[arg(long, value_delimiter = ',', required = true)]
    pub metrics: Vec<String>,
    /// The model's MoE layer ids, e.g. 0,1,2.
    #[arg(long, value_delimiter = ',', required = true)]
    pub layers: Vec<u32>,
    #[arg(long)]
    pub experts: u32,
    /// Seconds between scrapes.
    #[arg(long, default_value_t = 1.0)]
    pub interval: f64,
    /// Intervals to measure (scrapes = intervals + 1).
    #[arg(long, default_value_t = 5)]
    pub intervals: usize,
    #[arg(long, short)]
    pub out: PathBuf,
}

/// `GET path` over plain HTTP/1.0; the body, or an error naming the address and status.
pub async fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut s = tokio::time::timeout(Duration::from_secs(5), tokio::net::TcpStream::connect(addr))
        .await
        .with_context(|| format!("{addr}: connect timed out"))?
        .with_context(|| format!("{addr}: connect"))?;
    s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n").as_bytes())
        .await?;
    let mut buf = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut buf))
        .await
        .with_context(|| format!("{addr}{path}: read timed out"))??;
    let text = String::from_utf8_lossy(&buf);
    let (head, body) = text
        .split_once("\r\n\r\n")
        .ok_or_else(|| anyhow::anyhow!("{addr}{path}: not an HTTP response"))?;
    let status = head.lines().next().unwrap_or_default();
    if !status.contains(" 200 ") {
        anyhow::bail!("{addr}{path}: {status}");
    }
    Ok(body.to_string())
}

pub fn observe(a: ObserveArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut window = ScrapeWindow::new(a.layers.clone(), a.experts, a.intervals.max(1));
    rt.block_on(async {
        for i in 0..=a.intervals {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs_f64(a.interval.max(0.05))).await;
            }
            let mut scrapes = Vec::new();
            for addr in &a.metrics {
                let body = http_get(addr, "/metrics").await?;
                let sample =
                    parse_worker_metrics(&body).map_err(|e| anyhow::anyhow!("{addr}: {e}"))?;
                scrapes.push((addr.clone(), sample));
            }
            window.record(&scrapes).map_err(anyhow::Error::msg)?;
        }
        anyhow::Ok(())
    })?;
    let w = window
        .load_window()
        .ok_or_else(|| anyhow::anyhow!("no interval measured: use --intervals 1 or more"))?;
    std::fs::write(&a.out, to_trace_json(&w, Some("moectl observe")))
        .with_context(|| format!("writing {}", a.out.display()))?;
    println!(
        "observed {} tokens over {} intervals into {}",
        w.total_tokens(),
        w.batches(),
        a.out.display()
    );
    Ok(())
}
