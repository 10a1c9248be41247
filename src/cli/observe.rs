//! `moectl observe`: scrape workers' `/metrics` at an interval and write the per-interval expert
//! load as a trace, the same window the operator builds from the same counters.

use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;

use crate::controller::load::ScrapeWindow;
use crate::plan::load_formats::to_trace_json;
use crate::worker::wire::WorkerClient;

/// Deadline of one scrape.
const SCRAPE_TIMEOUT: Duration = Duration::from_secs(10);

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

/// `HOST:PORT` (`[v6]:PORT` for IPv6) split into host and port.
fn host_port(addr: &str) -> anyhow::Result<(&str, u16)> {
    addr.rsplit_once(':')
        .and_then(|(h, p)| Some((h, p.parse().ok()?)))
        .filter(|(h, _)| !h.is_empty())
        .ok_or_else(|| anyhow::anyhow!("--metrics {addr:?}: give HOST:PORT"))
}

pub fn observe(a: ObserveArgs) -> anyhow::Result<()> {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let mut window = ScrapeWindow::new(a.layers.clone(), a.experts, a.intervals.max(1));
    let targets = a
        .metrics
        .iter()
        .map(|addr| host_port(addr))
        .collect::<anyhow::Result<Vec<_>>>()?;
    let client = WorkerClient::new();
    rt.block_on(async {
        for i in 0..=a.intervals {
            if i > 0 {
                tokio::time::sleep(Duration::from_secs_f64(a.interval.max(0.05))).await;
            }
            let mut scrapes = Vec::new();
            for (addr, (host, port)) in a.metrics.iter().zip(&targets) {
                let sample = client.scrape(host, *port, SCRAPE_TIMEOUT).await?;
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn metrics_addresses() {
        assert_eq!(host_port("10.0.0.1:9401").unwrap(), ("10.0.0.1", 9401));
        assert_eq!(host_port("[fd00::1]:9401").unwrap(), ("[fd00::1]", 9401));
        assert_eq!(host_port("w-0.ns:80").unwrap(), ("w-0.ns", 80));
        for bad in ["10.0.0.1", ":9401", "h:port", "h:70000"] {
            assert!(host_port(bad).is_err(), "{bad}");
        }
    }
}
