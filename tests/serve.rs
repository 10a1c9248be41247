//! Worker serving, metrics, admin API and loadgen, end to end on loopback.
//!
//! The compute backend here is a test double for the `ExpertCompute` seam: a small exact f32 FFN
//! with deterministic weights (the real CPU/CUDA backends plug in through the same traits).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use half::bf16;
use moe_operator::loadgen::{run_loadgen, LoadgenConfig, LoadgenReport};
use moe_operator::plan::expert_plan::PLAN_FORMAT_VERSION;
use moe_operator::plan::{Algorithm, Dtype, ExpertPlan, LayerPlan, LoadWindow, ModelShape};
use moe_operator::worker::compute::{
    ComputeError, ExpertCompute, ExpertKey, ExpertLoader, RowBatch,
};
use moe_operator::worker::protocol::{
    decode_reply, read_frame, DispatchRequest, ErrorCode, ExpertOutput, Reply,
};
use moe_operator::worker::runtime::{start, WorkerHandle, WorkerOptions};
use moe_operator::worker::server::ServeConfig;
use moe_operator::worker::wire::{
    parse_worker_metrics, REQUEST_ERRORS_FAMILY, RESIDENT_EXPERTS_METRIC, STEP_SECONDS_METRIC,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

#[cfg(unix)]
mod log_support;

const TOKEN: &str = "test-admin-token";
const HIDDEN: usize = 16;
const INTER: usize = 32;

// ---------------------------------------------------------------- test backend

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

/// Deterministic weight in [-0.25, 0.25).
fn weight(layer: u32, expert: u32, which: u64, i: usize) -> f32 {
    let h = splitmix(((layer as u64) << 48) ^ ((expert as u64) << 32) ^ (which << 28) ^ i as u64);
    ((h >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.5
}

struct ExpertWeights {
    gate: Vec<f32>, // INTER x HIDDEN
    up: Vec<f32>,   // INTER x HIDDEN
    down: Vec<f32>, // HIDDEN x INTER
}

impl ExpertWeights {
    fn new(layer: u32, expert: u32) -> Self {
        let m = |which| {
            (0..INTER * HIDDEN)
                .map(|i| weight(layer, expert, which, i))
                .collect()
        };
        Self {
            gate: m(1),
            up: m(2),
            down: m(3),
        }
    }
}

/// Exact f32 expert FFN: `w * down(silu(gate(x)) * up(x))`.
struct ExactFfn {
    experts: HashMap<ExpertKey, ExpertWeights>,
    /// Time every forward call takes on top of the arithmetic (to make requests queue up).
    step_delay: Duration,
}

impl ExpertCompute for ExactFfn {
    fn forward(&self, layer: u32, batch: &RowBatch<'_>) -> Result<Vec<f32>, ComputeError> {
        let h = batch.hidden_size;
        if h != HIDDEN || batch.hidden.len() != batch.experts.len() * h {
            return Err(ComputeError::Shape(format!(
                "hidden {h}, {} values",
                batch.hidden.len()
            )));
        }
        std::thread::sleep(self.step_delay);
        let mut out = vec![0f32; batch.experts.len() * h];
        for (r, (&e, &w)) in batch.experts.iter().zip(batch.router_weights).enumerate() {
            let wts = self
                .experts
                .get(&(layer, e))
                .ok_or(ComputeError::NotResident { layer, expert: e })?;
            let x: Vec<f32> = batch.hidden[r * h..(r + 1) * h]
                .iter()
                .map(|v| v.to_f32())
                .collect();
            let mut act = vec![0f32; INTER];
            for (i, a) in act.iter_mut().enumerate() {
                let g: f32 = (0..h).map(|j| wts.gate[i * h + j] * x[j]).sum();
                let u: f32 = (0..h).map(|j| wts.up[i * h + j] * x[j]).sum();
                *a = g / (1.0 + (-g).exp()) * u;
            }
            for (o, row) in out[r * h..(r + 1) * h]
                .iter_mut()
                .zip(wts.down.chunks_exact(INTER))
            {
                *o = w * row.iter().zip(&act).map(|(d, a)| d * a).sum::<f32>();
            }
        }
        Ok(out)
    }

    fn resident(&self) -> Vec<ExpertKey> {
        self.experts.keys().copied().collect()
    }

    fn backend(&self) -> String {
        "test-exact-f32".into()
    }
}

#[derive(Default)]
struct TestLoader {
    fail: AtomicBool,
    delay_ms: AtomicU64,
    step_delay_ms: AtomicU64,
    loads: AtomicU64,
}

impl ExpertLoader for TestLoader {
    fn load(
        &self,
        wanted: &[ExpertKey],
        _previous: Option<&Arc<dyn ExpertCompute>>,
    ) -> anyhow::Result<Arc<dyn ExpertCompute>> {
        self.loads.fetch_add(1, Ordering::Relaxed);
        std::thread::sleep(Duration::from_millis(self.delay_ms.load(Ordering::Relaxed)));
        if self.fail.load(Ordering::Relaxed) {
            let (l, e) = wanted.first().copied().unwrap_or((0, 0));
            anyhow::bail!(
                "tensor model.layers.{l}.mlp.experts.{e}.gate_proj.weight not found in model.safetensors (test loader set to fail)"
            );
        }
        Ok(Arc::new(ExactFfn {
            experts: wanted
                .iter()
                .map(|&(l, e)| ((l, e), ExpertWeights::new(l, e)))
                .collect(),
            step_delay: Duration::from_millis(self.step_delay_ms.load(Ordering::Relaxed)),
        }))
    }
}

// ---------------------------------------------------------------- plans and traces

fn model() -> ModelShape {
    ModelShape {
        layers: 3,
        first_moe_layer: 1,
        experts: 8,
        top_k: 2,
        hidden_size: HIDDEN as u64,
        expert_intermediate_size: INTER as u64,
        dtype: Dtype::Bf16,
    }
}

/// 4 GPUs on 2 nodes, MoE layers 1 and 2, the same slots in both layers.
fn plan(slots: Vec<Vec<u32>>, shares: Vec<Vec<f64>>) -> ExpertPlan {
    let m = model();
    let extra = slots.iter().map(Vec::len).max().unwrap() as u32 - 2;
    ExpertPlan {
        format_version: PLAN_FORMAT_VERSION,
        algorithm: if extra > 0 {
            Algorithm::Craft
        } else {
            Algorithm::None
        },
        bytes_per_expert: m.bytes_per_expert(),
        replica_bytes_per_gpu: 2 * extra as u64 * m.bytes_per_expert(),
        model: m,
        gpus: 4,
        nodes: 2,
        replicas_per_gpu: 2 * extra,
        layers: [1, 2]
            .map(|layer| LayerPlan {
                layer,
                slots: slots.clone(),
                shares: shares.clone(),
            })
            .to_vec(),
        stats: None,
        transition: None,
        hash: String::new(),
    }
    .seal()
}

/// Contiguous: GPU g holds experts 2g and 2g+1.
fn plan_a() -> ExpertPlan {
    plan(
        (0..4).map(|g| vec![2 * g, 2 * g + 1]).collect(),
        vec![vec![1.0, 1.0]; 4],
    )
}

/// With replicas: GPU g also holds a copy of expert 2(g+1) mod 8, which it shares half and half.
fn plan_b() -> ExpertPlan {
    plan(
        (0..4)
            .map(|g| vec![2 * g, 2 * g + 1, 2 * ((g + 1) % 4)])
            .collect(),
        vec![vec![0.5, 1.0, 0.5]; 4],
    )
}

/// Moved: GPU g holds experts 2g+1 and 2g+2 mod 8 (expert 0 moves from GPU 0 to GPU 3).
fn plan_c() -> ExpertPlan {
    plan(
        (0..4).map(|g| vec![2 * g + 1, (2 * g + 2) % 8]).collect(),
        vec![vec![1.0, 1.0]; 4],
    )
}

/// Four batches of skewed counts for layers 1 and 2.
fn window() -> LoadWindow {
    let mut counts = Vec::new();
    for b in 0..4 {
        for l in 0..2 {
            for e in 0..8u32 {
                counts.push(
                    ((e * 7 + b * 3 + l * 5) % 11 + 1) as f64 * if e == 0 { 4.0 } else { 1.0 },
                );
            }
        }
    }
    LoadWindow::new(vec![1, 2], 8, counts).unwrap()
}

// ---------------------------------------------------------------- harness

fn loopback() -> SocketAddr {
    "127.0.0.1:0".parse().unwrap()
}

async fn start_worker(
    node: u32,
    loader: Arc<TestLoader>,
    initial: Option<ExpertPlan>,
    tune: impl FnOnce(&mut ServeConfig),
) -> WorkerHandle {
    let mut serve = ServeConfig::new(node, 2);
    tune(&mut serve);
    start(
        WorkerOptions {
            serve,
            listen: loopback(),
            metrics_listen: loopback(),
            admin_listen: loopback(),
            admin_token: TOKEN.into(),
            initial_plan: initial,
        },
        vec![loader],
    )
    .await
    .expect("worker starts")
}

fn dechunk(body: &str) -> String {
    let mut out = String::new();
    let mut rest = body;
    while let Some((size, tail)) = rest.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 {
            break;
        }
        out.push_str(&tail[..n]);
        rest = &tail[n + 2..];
    }
    out
}

/// A minimal HTTP/1.1 client (one request per connection).
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = TcpStream::connect(addr).await.unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n",
        body.len()
    );
    if let Some(t) = token {
        req.push_str(&format!("Authorization: Bearer {t}\r\n"));
    }
    req.push_str("\r\n");
    req.push_str(body);
    s.write_all(req.as_bytes()).await.unwrap();
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).await.unwrap();
    let text = String::from_utf8(buf).unwrap();
    let status: u16 = text[9..12].parse().unwrap();
    let (head, body) = text.split_once("\r\n\r\n").unwrap();
    let body = if head
        .to_ascii_lowercase()
        .contains("transfer-encoding: chunked")
    {
        dechunk(body)
    } else {
        body.to_string()
    };
    (status, body)
}

async fn put_plan(w: &WorkerHandle, p: &ExpertPlan) -> (u16, serde_json::Value) {
    let (status, body) = http(
        w.admin_addr,
        "PUT",
        "/v1/plan",
        Some(TOKEN),
        &serde_json::to_string(p).unwrap(),
    )
    .await;
    (
        status,
        serde_json::from_str(&body).unwrap_or(serde_json::Value::String(body)),
    )
}

async fn plan_in_force(w: &WorkerHandle) -> String {
    let (status, body) = http(w.admin_addr, "GET", "/v1/plan", Some(TOKEN), "").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).unwrap();
    v["hash"].as_str().unwrap().to_string()
}

/// The token counters of one scrape, read as the operator reads them: (layer, expert) -> count.
fn expert_tokens(metrics: &str) -> HashMap<(u32, u32), u64> {
    parse_worker_metrics(metrics)
        .unwrap()
        .tokens
        .into_iter()
        .map(|(k, v)| (k, v as u64))
        .collect()
}

/// The plan in force that one scrape reports.
fn plan_hash(metrics: &str) -> Option<String> {
    parse_worker_metrics(metrics).unwrap().plan_hash
}

fn request(id: u64, rank: u32, layer: u32, experts: &[u32]) -> DispatchRequest {
    DispatchRequest {
        request_id: id,
        rank,
        layer,
        hidden_size: HIDDEN as u32,
        experts: experts.to_vec(),
        router_weights: experts
            .iter()
            .enumerate()
            .map(|(i, _)| 0.25 + i as f32 * 0.125)
            .collect(),
        hidden: (0..experts.len() * HIDDEN)
            .map(|i| bf16::from_f32(((i as f32 + id as f32) * 0.61).sin()))
            .collect(),
    }
}

async fn call(s: &mut TcpStream, frame: &[u8]) -> Reply {
    s.write_all(frame).await.unwrap();
    let body = read_frame(s, 1 << 30).await.unwrap().expect("a reply");
    decode_reply(&body).unwrap()
}

fn expect_output(r: Reply) -> ExpertOutput {
    match r {
        Reply::Output(o) => o,
        Reply::Error(e) => panic!("expected outputs, got error {:?}: {}", e.code, e.message),
    }
}

fn expect_error(r: Reply, code: ErrorCode) -> String {
    match r {
        Reply::Error(e) => {
            assert_eq!(e.code, code, "{}", e.message);
            e.message
        }
        Reply::Output(_) => panic!("expected error {code:?}, got outputs"),
    }
}

async fn assert_closed(s: &mut TcpStream) {
    let mut buf = [0u8; 16];
    let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
        .await
        .expect("the worker closes the connection")
        .unwrap_or(0);
    assert_eq!(n, 0, "connection still open");
}

fn loadgen_cfg(
    p: ExpertPlan,
    workers: &[&WorkerHandle],
    batches: usize,
    tokens: usize,
    seed: u64,
) -> LoadgenConfig {
    let mut cfg = LoadgenConfig::new(
        p,
        workers
            .iter()
            .map(|w| w.dispatch_addr.to_string())
            .collect(),
        window(),
    );
    cfg.batches = batches;
    cfg.tokens_per_batch = tokens;
    cfg.seed = seed;
    cfg
}

fn assert_clean(r: &LoadgenReport) {
    assert_eq!(r.failed_requests, 0, "errors: {:?}", r.errors);
    assert_eq!(r.non_finite_outputs, 0);
}

// ---------------------------------------------------------------- tests

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn readiness_follows_the_plan_and_admin_needs_the_token() {
    let w = start_worker(0, Arc::new(TestLoader::default()), None, |_| {}).await;
    assert_eq!(
        http(w.metrics_addr, "GET", "/healthz", None, "").await.0,
        200
    );
    let (status, body) = http(w.metrics_addr, "GET", "/readyz", None, "").await;
    assert_eq!(status, 503, "{body}");
    assert_eq!(http(w.admin_addr, "GET", "/readyz", None, "").await.0, 503);
    assert_eq!(
        http(w.admin_addr, "GET", "/v1/plan", Some(TOKEN), "")
            .await
            .0,
        404
    );

    // Before a plan, dispatch answers NotReady and keeps the connection.
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    expect_error(
        call(&mut s, &request(1, 0, 1, &[0]).encode()).await,
        ErrorCode::NotReady,
    );

    let a = plan_a();
    let body = serde_json::to_string(&a).unwrap();
    assert_eq!(
        http(w.admin_addr, "PUT", "/v1/plan", None, &body).await.0,
        401
    );
    assert_eq!(
        http(w.admin_addr, "PUT", "/v1/plan", Some("wrong"), &body)
            .await
            .0,
        401
    );
    assert_eq!(http(w.admin_addr, "GET", "/v1/plan", None, "").await.0, 401);
    let (status, garbage) = http(
        w.admin_addr,
        "PUT",
        "/v1/plan",
        Some(TOKEN),
        "{\"not\": \"a plan\"}",
    )
    .await;
    assert_eq!(status, 400, "{garbage}");
    assert!(garbage.contains("error"), "{garbage}");
    assert_eq!(
        http(w.metrics_addr, "GET", "/readyz", None, "").await.0,
        503
    );

    let (status, outcome) = put_plan(&w, &a).await;
    assert_eq!(status, 200, "{outcome}");
    assert_eq!(outcome["changed"], true);
    assert_eq!(outcome["residentExperts"], 8); // 2 ranks x 2 layers x 2 experts
    let (status, body) = http(w.metrics_addr, "GET", "/readyz", None, "").await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(plan_in_force(&w).await, a.hash);
    let (_, again) = put_plan(&w, &a).await;
    assert_eq!(again["changed"], false);

    expect_output(call(&mut s, &request(2, 0, 1, &[0, 1]).encode()).await);
    let (_, metrics) = http(w.metrics_addr, "GET", "/metrics", None, "").await;
    assert_eq!(plan_hash(&metrics), Some(a.hash.clone()), "{metrics}");
    assert!(
        metrics.contains(&format!("{RESIDENT_EXPERTS_METRIC} 8")),
        "{metrics}"
    );
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plans_that_do_not_fit_are_refused_and_the_old_one_stays() {
    let w = start_worker(1, Arc::new(TestLoader::default()), Some(plan_a()), |_| {}).await;
    let a = plan_a();

    let mut other_model = plan_a();
    other_model.model.hidden_size = 32;
    other_model.bytes_per_expert = other_model.model.bytes_per_expert();
    let (status, body) = put_plan(&w, &other_model.seal()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("another model"),
        "{body}"
    );

    // 4 GPUs on one node: this worker serves 2 ranks per node.
    let mut one_big_node = plan_a();
    one_big_node.nodes = 1;
    let (status, body) = put_plan(&w, &one_big_node.seal()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"]
            .as_str()
            .unwrap()
            .contains("GPUs on each node"),
        "{body}"
    );

    // Node 1 serves ranks 2..4; a 2-GPU plan has no such ranks.
    let mut one_node = plan_a();
    one_node.nodes = 1;
    one_node.gpus = 2;
    for l in &mut one_node.layers {
        l.slots = vec![vec![0, 1, 2, 3, 4, 5, 6, 7], vec![]];
        l.shares = vec![vec![1.0; 8], vec![]];
    }
    let (status, body) = put_plan(&w, &one_node.seal()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("only 1 nodes"),
        "{body}"
    );

    let mut tampered = plan_b();
    tampered.layers[0].shares[0][0] = 0.25;
    tampered.layers[0].shares[3][2] = 0.75;
    let (status, body) = put_plan(&w, &tampered).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("hashes to"),
        "{body}"
    );

    let mut invalid = plan_b();
    invalid.layers[1].shares[0][0] = 0.9;
    let (status, body) = put_plan(&w, &invalid.seal()).await;
    assert_eq!(status, 422, "{body}");
    assert!(body["error"].as_str().unwrap().contains("sum to"), "{body}");

    let mut dense = plan_a();
    dense.layers[0].layer = 0;
    let (status, body) = put_plan(&w, &dense.seal()).await;
    assert_eq!(status, 422, "{body}");
    assert!(
        body["error"].as_str().unwrap().contains("not a MoE layer"),
        "{body}"
    );

    assert_eq!(plan_in_force(&w).await, a.hash);
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_failed_load_leaves_the_old_plan_serving() {
    let loader = Arc::new(TestLoader::default());
    let w0 = start_worker(0, loader.clone(), Some(plan_a()), |_| {}).await;
    let w1 = start_worker(1, loader.clone(), Some(plan_a()), |_| {}).await;
    loader.fail.store(true, Ordering::Relaxed);
    let (status, body) = put_plan(&w0, &plan_b()).await;
    assert_eq!(status, 500, "{body}");
    let msg = body["error"].as_str().unwrap();
    assert!(
        msg.contains("gate_proj.weight") && msg.contains("rank 0"),
        "{msg}"
    );
    assert_eq!(plan_in_force(&w0).await, plan_a().hash);
    assert_eq!(
        http(w0.metrics_addr, "GET", "/readyz", None, "").await.0,
        200
    );
    let report = run_loadgen(&loadgen_cfg(plan_a(), &[&w0, &w1], 5, 32, 1))
        .await
        .unwrap();
    assert_clean(&report);
    w0.shutdown().await;
    w1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn outputs_are_the_backend_outputs_and_request_errors_keep_the_connection() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |_| {}).await;
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    // Rank 1 holds experts 2 and 3 in plan A.
    let req = request(7, 1, 2, &[3, 2, 3, 2, 2]);
    let out = expect_output(call(&mut s, &req.encode()).await);
    assert_eq!(
        (
            out.request_id,
            out.rank,
            out.layer,
            out.rows,
            out.hidden_size
        ),
        (7, 1, 2, 5, HIDDEN as u32)
    );
    let reference = ExactFfn {
        experts: [(2, 2), (2, 3)]
            .map(|(l, e)| ((l, e), ExpertWeights::new(l, e)))
            .into_iter()
            .collect(),
        step_delay: Duration::ZERO,
    };
    let expected = reference.forward(2, &req.as_batch()).unwrap();
    assert_eq!(out.output, expected, "outputs travel as exact f32");
    assert!(
        expected.iter().any(|v| v.abs() > 1e-4),
        "the reference is not trivially zero"
    );

    let msg = expect_error(
        call(&mut s, &request(8, 1, 2, &[2, 0]).encode()).await,
        ErrorCode::NotResident,
    );
    assert!(msg.contains("expert 0"), "{msg}");
    let msg = expect_error(
        call(&mut s, &request(9, 3, 1, &[6]).encode()).await,
        ErrorCode::WrongRank,
    );
    assert!(msg.contains("ranks 0..2"), "{msg}");
    let mut wrong_hidden = request(10, 0, 1, &[0]);
    wrong_hidden.hidden_size = 8;
    wrong_hidden.hidden.truncate(8);
    expect_error(
        call(&mut s, &wrong_hidden.encode()).await,
        ErrorCode::HiddenSizeMismatch,
    );
    expect_error(
        call(&mut s, &request(11, 0, 0, &[0]).encode()).await,
        ErrorCode::NotResident,
    );
    // Zero rows: an empty answer.
    assert_eq!(
        expect_output(call(&mut s, &request(12, 0, 1, &[]).encode()).await).rows,
        0
    );
    // The connection still serves.
    expect_output(call(&mut s, &request(13, 0, 1, &[1, 0]).encode()).await);

    // Pipelined requests are answered in order.
    let mut pipelined = Vec::new();
    for id in 20..30 {
        pipelined.extend(request(id, (id % 2) as u32, 1, &[(id % 2 * 2) as u32]).encode());
    }
    s.write_all(&pipelined).await.unwrap();
    for id in 20..30 {
        let body = read_frame(&mut s, 1 << 30).await.unwrap().unwrap();
        assert_eq!(expect_output(decode_reply(&body).unwrap()).request_id, id);
    }
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn malformed_truncated_and_oversized_frames_close_only_their_connection() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.max_frame_bytes = 1 << 20;
        c.frame_read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut good = TcpStream::connect(w.dispatch_addr).await.unwrap();
    expect_output(call(&mut good, &request(1, 0, 1, &[0]).encode()).await);

    // Garbage with a plausible length.
    let mut bad = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let mut frame = 40u32.to_le_bytes().to_vec();
    frame.extend([0xAB; 40]);
    let msg = expect_error(call(&mut bad, &frame).await, ErrorCode::Malformed);
    assert!(msg.contains("magic"), "{msg}");
    assert_closed(&mut bad).await;

    // A valid header with a corrupted row count.
    let mut bad = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let mut frame = request(5, 0, 1, &[0, 1]).encode();
    frame[4 + 16 + 8] = 3;
    let msg = expect_error(call(&mut bad, &frame).await, ErrorCode::Malformed);
    assert!(msg.contains("payload bytes"), "{msg}");
    assert_closed(&mut bad).await;

    // Oversized: refused from the length prefix alone.
    let mut big = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let msg = expect_error(
        call(&mut big, &(2u32 << 20).to_le_bytes()).await,
        ErrorCode::FrameTooLarge,
    );
    assert!(msg.contains("exceeds"), "{msg}");
    assert_closed(&mut big).await;

    // Truncated: the client stops sending in the middle of a frame.
    let mut cut = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let frame = request(6, 0, 1, &[0, 1]).encode();
    cut.write_all(&frame[..frame.len() / 2]).await.unwrap();
    cut.shutdown().await.unwrap();
    let body = read_frame(&mut cut, 1 << 30).await.unwrap().unwrap();
    let msg = expect_error(decode_reply(&body).unwrap(), ErrorCode::Malformed);
    assert!(msg.contains("truncated"), "{msg}");

    // Stalled: the body never comes; the read timeout frees the connection's budget.
    let mut stalled = TcpStream::connect(w.dispatch_addr).await.unwrap();
    stalled.write_all(&frame[..10]).await.unwrap();
    let body = read_frame(&mut stalled, 1 << 30).await.unwrap().unwrap();
    let msg = expect_error(decode_reply(&body).unwrap(), ErrorCode::Malformed);
    assert!(msg.contains("did not arrive"), "{msg}");

    // The first connection was never disturbed.
    expect_output(call(&mut good, &request(2, 1, 2, &[2, 3]).encode()).await);
    let (_, metrics) = http(w.metrics_addr, "GET", "/metrics", None, "").await;
    assert!(
        metrics.contains(&format!(
            "{REQUEST_ERRORS_FAMILY}_total{{code=\"malformed\"}} 4"
        )),
        "{metrics}"
    );
    assert!(
        metrics.contains(&format!(
            "{REQUEST_ERRORS_FAMILY}_total{{code=\"frame_too_large\"}} 1"
        )),
        "{metrics}"
    );
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn metrics_count_exactly_the_rows_sent() {
    let loader = Arc::new(TestLoader::default());
    let b = plan_b();
    let w0 = start_worker(0, loader.clone(), Some(b.clone()), |_| {}).await;
    let w1 = start_worker(1, loader.clone(), Some(b.clone()), |_| {}).await;
    let report = run_loadgen(&loadgen_cfg(b.clone(), &[&w0, &w1], 20, 64, 3))
        .await
        .unwrap();
    assert_clean(&report);
    assert_eq!(report.tokens, 20 * 64);
    assert_eq!(
        report.rows,
        20 * 64 * 2 * 2,
        "batches x tokens x top-k x layers"
    );
    assert_eq!(report.layers.len(), 2);
    assert!(report.balancedness > 0.0 && report.balancedness <= 1.0);
    assert!(report.step_seconds.p50 <= report.step_seconds.p99);

    let mut scraped: HashMap<(u32, u32), u64> = HashMap::new();
    for w in [&w0, &w1] {
        let (status, text) = http(w.metrics_addr, "GET", "/metrics", None, "").await;
        assert_eq!(status, 200);
        assert_eq!(plan_hash(&text), Some(b.hash.clone()), "{text}");
        assert!(
            text.contains(&format!("{RESIDENT_EXPERTS_METRIC} 12")),
            "{text}"
        ); // 2 ranks x 2 layers x 3
        for (k, v) in expert_tokens(&text) {
            *scraped.entry(k).or_default() += v;
        }
    }
    let mut expected = HashMap::new();
    for (li, layer) in [1u32, 2].into_iter().enumerate() {
        for (e, &n) in report.expert_rows[li].iter().enumerate() {
            if n > 0 {
                expected.insert((layer, e as u32), n);
            }
        }
    }
    assert!(!expected.is_empty());
    assert_eq!(scraped, expected);

    // The rows of a replicated expert went to both of its GPUs (one per worker here: expert 4 lives
    // on GPU 2 and, as a replica, on GPU 1).
    let (_, t0) = http(w0.metrics_addr, "GET", "/metrics", None, "").await;
    let (_, t1) = http(w1.metrics_addr, "GET", "/metrics", None, "").await;
    assert!(expert_tokens(&t0).get(&(1, 4)).copied().unwrap_or(0) > 0);
    assert!(expert_tokens(&t1).get(&(1, 4)).copied().unwrap_or(0) > 0);
    w0.shutdown().await;
    w1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plan_swap_under_continuous_load_fails_no_request() {
    let loader = Arc::new(TestLoader::default());
    let w0 = start_worker(0, loader.clone(), Some(plan_a()), |_| {}).await;
    let w1 = start_worker(1, loader.clone(), Some(plan_a()), |_| {}).await;
    // Slow loads, so that the old plan serves for a while during each swap.
    loader.delay_ms.store(300, Ordering::Relaxed);

    // The old router runs until told to stop, however fast this machine is.
    let stop = Arc::new(AtomicBool::new(false));
    let mut old_cfg = loadgen_cfg(plan_a(), &[&w0, &w1], usize::MAX, 16, 11);
    old_cfg.stop = Some(stop.clone());
    let old_router = tokio::spawn(async move { run_loadgen(&old_cfg).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    // Roll plan C (expert 0 moves GPU) through the workers one at a time, as the operator does.
    let c = plan_c();
    for w in [&w0, &w1] {
        let (status, body) = put_plan(w, &c).await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["changed"], true);
        assert!(body["loadSeconds"].as_f64().unwrap() >= 0.29, "{body}");
    }
    // Routers switch to the new plan while old ones are still in flight.
    let new = run_loadgen(&loadgen_cfg(c.clone(), &[&w0, &w1], 100, 16, 12))
        .await
        .unwrap();
    stop.store(true, Ordering::Relaxed);
    let old = old_router.await.unwrap().unwrap();
    assert_clean(&old);
    assert_clean(&new);
    assert_eq!(new.batches, 100);
    // The old router kept sending through both swaps (each load takes 300 ms).
    assert!(old.wall_seconds > 0.8, "{}", old.table());
    assert!(old.batches > 10, "{}", old.table());
    for w in [&w0, &w1] {
        assert_eq!(plan_in_force(w).await, c.hash);
    }
    w0.shutdown().await;
    w1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_replaced_plan_serves_old_routes_only_during_its_grace() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.previous_plan_grace = Duration::from_millis(300);
    })
    .await;
    let (status, body) = put_plan(&w, &plan_c()).await;
    assert_eq!(status, 200, "{body}");
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    // Expert 0 left GPU 0 in plan C; plan A's set still answers for it.
    expect_output(call(&mut s, &request(1, 0, 1, &[0]).encode()).await);
    expect_output(call(&mut s, &request(2, 0, 1, &[2, 1]).encode()).await); // plan C's own experts
    tokio::time::sleep(Duration::from_millis(800)).await;
    let msg = expect_error(
        call(&mut s, &request(3, 0, 1, &[0]).encode()).await,
        ErrorCode::NotResident,
    );
    assert!(msg.contains(&plan_c().hash), "{msg}");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn loadgen_checks_its_inputs_and_is_reproducible() {
    let loader = Arc::new(TestLoader::default());
    let w0 = start_worker(0, loader.clone(), Some(plan_b()), |_| {}).await;
    let w1 = start_worker(1, loader.clone(), Some(plan_b()), |_| {}).await;
    let err = run_loadgen(&loadgen_cfg(plan_b(), &[&w0], 1, 8, 0))
        .await
        .unwrap_err();
    assert!(
        err.to_string().contains("one --workers address per node"),
        "{err}"
    );
    let mut cfg = loadgen_cfg(plan_b(), &[&w0, &w1], 1, 8, 0);
    cfg.window = LoadWindow::new(vec![1, 2], 4, vec![1.0; 8]).unwrap();
    assert!(run_loadgen(&cfg)
        .await
        .unwrap_err()
        .to_string()
        .contains("experts per layer"));

    let a = run_loadgen(&loadgen_cfg(plan_b(), &[&w0, &w1], 6, 32, 5))
        .await
        .unwrap();
    let b = run_loadgen(&loadgen_cfg(plan_b(), &[&w0, &w1], 6, 32, 5))
        .await
        .unwrap();
    assert_eq!(a.expert_rows, b.expert_rows);
    assert_eq!(a.balancedness, b.balancedness);
    let json = serde_json::to_string(&a).unwrap();
    let back: LoadgenReport = serde_json::from_str(&json).unwrap();
    assert_eq!(
        (&back.expert_rows, back.rows, &back.plan_hash),
        (&a.expert_rows, a.rows, &a.plan_hash)
    );
    assert!((back.balancedness - a.balancedness).abs() < 1e-12);
    assert!(a.table().contains("balancedness"));
    // Expert 0 carries 4x weight in the trace, so it gets more rows than expert 1 in layer 1.
    assert!(
        a.expert_rows[0][0] > a.expert_rows[0][1],
        "{:?}",
        a.expert_rows
    );
    w0.shutdown().await;
    w1.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_requests_for_one_rank_are_batched_and_split_back_exactly() {
    let loader = Arc::new(TestLoader::default());
    // Each compute step takes 50 ms, so requests arriving meanwhile queue up and form one batch.
    loader.step_delay_ms.store(50, Ordering::Relaxed);
    let w = start_worker(0, loader, Some(plan_a()), |c| {
        // A budget of a few frames: the connections also wait for each other here.
        c.max_inflight_bytes = 8 << 10;
    })
    .await;
    let reference = ExactFfn {
        experts: [(1, 0), (1, 1)]
            .map(|(l, e)| ((l, e), ExpertWeights::new(l, e)))
            .into_iter()
            .collect(),
        step_delay: Duration::ZERO,
    };
    let reference = Arc::new(reference);
    let mut tasks = Vec::new();
    for c in 0..12u64 {
        let addr = w.dispatch_addr;
        let reference = reference.clone();
        tasks.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            for i in 0..3u64 {
                let id = c * 100 + i;
                let experts: Vec<u32> = (0..=(id % 5) as u32).map(|r| (r + c as u32) % 2).collect();
                let req = request(id, 0, 1, &experts);
                let out = expect_output(call(&mut s, &req.encode()).await);
                assert_eq!(out.request_id, id);
                assert_eq!(out.output, reference.forward(1, &req.as_batch()).unwrap());
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let (_, text) = http(w.metrics_addr, "GET", "/metrics", None, "").await;
    let count = format!("{STEP_SECONDS_METRIC}_count ");
    let steps: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix(count.as_str()))
        .expect("step count")
        .trim()
        .parse()
        .unwrap();
    assert!(
        steps < 36,
        "36 requests took {steps} steps: nothing was batched"
    );
    w.shutdown().await;
}

#[test]
fn the_worker_binary_explains_a_missing_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-worker"))
        .args([
            "--gpus-per-node",
            "2",
            "--device",
            "cpu",
            "--listen",
            "127.0.0.1:0",
        ])
        .args([
            "--metrics-listen",
            "127.0.0.1:0",
            "--admin-listen",
            "127.0.0.1:0",
        ])
        .arg("--admin-token-file")
        .arg(&token)
        .env_remove("MOE_NODE_RANK")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("--checkpoint is required"), "{err}");

    let out = std::process::Command::new(env!("CARGO_BIN_EXE_moe-worker"))
        .args(["--gpus-per-node", "2"])
        .env_remove("MOE_ADMIN_TOKEN")
        .env_remove("MOE_ADMIN_TOKEN_FILE")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("needs a bearer token"), "{err}");
}

/// Transport-only backend for measuring the router and protocol: output = weight * x.
struct ScaleBackend {
    resident: Vec<ExpertKey>,
}

impl ExpertCompute for ScaleBackend {
    fn forward(&self, _layer: u32, batch: &RowBatch<'_>) -> Result<Vec<f32>, ComputeError> {
        let h = batch.hidden_size;
        let mut out = vec![0f32; batch.hidden.len()];
        for ((o, x), &w) in out
            .chunks_exact_mut(h)
            .zip(batch.hidden.chunks_exact(h))
            .zip(batch.router_weights)
        {
            for (o, v) in o.iter_mut().zip(x) {
                *o = w * v.to_f32();
            }
        }
        Ok(out)
    }
    fn resident(&self) -> Vec<ExpertKey> {
        self.resident.clone()
    }
    fn backend(&self) -> String {
        "test-scale".into()
    }
}

struct ScaleLoader;

impl ExpertLoader for ScaleLoader {
    fn load(
        &self,
        wanted: &[ExpertKey],
        _previous: Option<&Arc<dyn ExpertCompute>>,
    ) -> anyhow::Result<Arc<dyn ExpertCompute>> {
        Ok(Arc::new(ScaleBackend {
            resident: wanted.to_vec(),
        }))
    }
}

/// Router + protocol throughput on loopback at a Qwen3-30B-A3B-like shape (hidden 2048, 128
/// experts, top-8), 4 ranks on 2 workers, with a backend that does no FFN work.
/// `cargo test --test serve -- --ignored --nocapture loopback_transport_throughput`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "measurement, prints a report"]
async fn loopback_transport_throughput() {
    let (layers, experts, hidden) = (4u32, 128u32, 2048u64);
    let m = ModelShape {
        layers,
        first_moe_layer: 0,
        experts,
        top_k: 8,
        hidden_size: hidden,
        expert_intermediate_size: 768,
        dtype: Dtype::Bf16,
    };
    let per_gpu = experts / 4;
    let p = ExpertPlan {
        format_version: PLAN_FORMAT_VERSION,
        algorithm: Algorithm::None,
        bytes_per_expert: m.bytes_per_expert(),
        replica_bytes_per_gpu: 0,
        model: m,
        gpus: 4,
        nodes: 2,
        replicas_per_gpu: 0,
        layers: (0..layers)
            .map(|layer| LayerPlan {
                layer,
                slots: (0..4)
                    .map(|g| (g * per_gpu..(g + 1) * per_gpu).collect())
                    .collect(),
                shares: vec![vec![1.0; per_gpu as usize]; 4],
            })
            .collect(),
        stats: None,
        transition: None,
        hash: String::new(),
    }
    .seal();
    let mut workers = Vec::new();
    for node in 0..2 {
        let mut serve = ServeConfig::new(node, 2);
        serve.max_frame_bytes = 1 << 30;
        workers.push(
            start(
                WorkerOptions {
                    serve,
                    listen: loopback(),
                    metrics_listen: loopback(),
                    admin_listen: loopback(),
                    admin_token: TOKEN.into(),
                    initial_plan: Some(p.clone()),
                },
                vec![Arc::new(ScaleLoader)],
            )
            .await
            .unwrap(),
        );
    }
    let counts: Vec<f64> = (0..layers * experts)
        .map(|i| 1.0 + (i % 17) as f64)
        .collect();
    let window = LoadWindow::new((0..layers).collect(), experts as usize, counts).unwrap();
    for tokens in [64, 512] {
        let mut cfg = LoadgenConfig::new(
            p.clone(),
            workers
                .iter()
                .map(|w| w.dispatch_addr.to_string())
                .collect(),
            window.clone(),
        );
        cfg.batches = 20;
        cfg.tokens_per_batch = tokens;
        let r = run_loadgen(&cfg).await.unwrap();
        assert_clean(&r);
        println!("{}", r.table());
    }
    for w in workers {
        w.shutdown().await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn random_and_mutated_frames_never_take_the_worker_down() {
    use rand::{Rng, SeedableRng};
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.max_frame_bytes = 1 << 16;
        c.frame_read_timeout = Duration::from_millis(200);
    })
    .await;
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(99);
    let valid = request(1, 1, 2, &[2, 3, 3]).encode();
    for case in 0..150 {
        let mut bytes = if case % 2 == 0 {
            // Random bytes behind a random (often huge) length prefix.
            let n = rng.random_range(0..200);
            (0..n).map(|_| rng.random::<u8>()).collect::<Vec<u8>>()
        } else {
            // A valid frame with a few bytes flipped (the length prefix included at times).
            let mut f = valid.clone();
            for _ in 0..rng.random_range(1..4) {
                let i = rng.random_range(0..f.len());
                f[i] ^= rng.random_range(1..=255u8);
            }
            f
        };
        if case % 7 == 0 {
            bytes.truncate(rng.random_range(0..bytes.len().max(1)));
        }
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        let _ = s.write_all(&bytes).await;
        let _ = s.shutdown().await;
        // Whatever comes back must be well-formed replies, then the end of the stream.
        let read = tokio::time::timeout(Duration::from_secs(5), async {
            while let Ok(Some(body)) = read_frame(&mut s, 1 << 20).await {
                decode_reply(&body).expect("the worker only sends well-formed replies");
            }
        })
        .await;
        assert!(
            read.is_ok(),
            "case {case}: the worker neither answered nor closed"
        );
    }
    // Still serving, and the outputs still right.
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let out = expect_output(call(&mut s, &valid).await);
    assert_eq!(out.rows, 3);
    w.shutdown().await;
}

// ---------------------------------------------------------------- hardening (issue 19)

/// A request head (header and shape) claiming `rows` rows of `HIDDEN` values, with no row after it.
fn request_head(id: u64, rank: u32, rows: u32) -> Vec<u8> {
    let mut frame = request(id, rank, 1, &[0]).encode();
    frame.truncate(4 + 32);
    let len = 32 + rows as usize * (8 + 2 * HIDDEN);
    frame[..4].copy_from_slice(&(len as u32).to_le_bytes());
    frame[4 + 24..4 + 28].copy_from_slice(&rows.to_le_bytes());
    frame
}

/// Time one valid request takes on a fresh connection (panics past `limit`).
async fn timed_request(w: &WorkerHandle, rank: u32, limit: Duration) -> Duration {
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let layer = 1;
    let expert = 2 * rank;
    let reply = tokio::time::timeout(
        limit,
        call(&mut s, &request(99, rank, layer, &[expert]).encode()),
    )
    .await
    .unwrap_or_else(|_| panic!("a valid request waited more than {limit:?}"));
    expect_output(reply);
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn slow_loris_prefixes_do_not_delay_a_valid_request() {
    // As on main: 16 connections each send a 64 MiB length prefix and nothing else, which took
    // the whole default 1 GiB in-flight budget until the frame timeout.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.frame_read_timeout = Duration::from_secs(5);
    })
    .await;
    let mut loris = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        s.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
        loris.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let waited = timed_request(&w, 0, Duration::from_secs(2)).await;
    assert!(waited < Duration::from_secs(1), "waited {waited:?}");

    // Heads that claim 64 MiB each and stop: they hold the budget for at most the frame timeout.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.frame_read_timeout = Duration::from_millis(600);
        c.max_inflight_bytes = 128 << 20;
    })
    .await;
    let rows = ((64 << 20) - 32) / (8 + 2 * HIDDEN as u32);
    let mut heads = Vec::new();
    for i in 0..4 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        s.write_all(&request_head(i, 0, rows)).await.unwrap();
        heads.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let waited = timed_request(&w, 1, Duration::from_secs(3)).await;
    assert!(waited < Duration::from_millis(1500), "waited {waited:?}");
    for mut s in heads {
        let body = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut s, 1 << 20))
            .await
            .expect("a stalled frame is answered")
            .unwrap()
            .unwrap();
        // Past its deadline a head either waited for budget (busy) or for its body (malformed).
        match decode_reply(&body).unwrap() {
            Reply::Error(e) if e.code == ErrorCode::Busy => {
                assert!(e.message.contains("stayed full"), "{}", e.message)
            }
            r => {
                let msg = expect_error(r, ErrorCode::Malformed);
                assert!(msg.contains("did not arrive"), "{msg}");
            }
        }
    }
    drop(loris);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_client_that_never_reads_does_not_stall_other_ranks() {
    // The budget holds about one 1000-row frame (40 KB): on main, a client whose replies pile up
    // unread held it for good, and every other rank's requests waited behind it.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.max_inflight_bytes = 48 << 10;
        c.write_timeout = Duration::from_millis(500);
    })
    .await;
    let experts: Vec<u32> = (0..1000).map(|r| r % 2).collect();
    let big = request(1, 0, 1, &experts).encode();
    let mut pipelined = Vec::new();
    for _ in 0..400 {
        pipelined.extend_from_slice(&big); // 16 MB of requests, 26 MB of replies never read
    }
    let mut hog = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(20), hog.write_all(&pipelined)).await;
        hog
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let other: Vec<u32> = (0..1000).map(|r| 2 + r % 2).collect();
    for i in 0..3 {
        let reply = tokio::time::timeout(
            Duration::from_secs(5),
            call(&mut s, &request(10 + i, 1, 1, &other).encode()),
        )
        .await
        .expect("rank 1 is served while rank 0's client does not read");
        expect_output(reply);
    }
    let waited = start.elapsed();
    assert!(waited < Duration::from_secs(3), "waited {waited:?}");
    let _hog = writer.await.unwrap();
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn idle_connections_and_half_frames_are_closed_after_their_timeouts() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.frame_read_timeout = Duration::from_millis(400);
        c.idle_timeout = Duration::from_millis(800);
    })
    .await;
    // 100 connections holding 2 bytes of a length prefix: on main they stayed open for good.
    let start = std::time::Instant::now();
    let mut halves = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        s.write_all(&[1, 0]).await.unwrap();
        halves.push(s);
    }
    let mut idle = TcpStream::connect(w.dispatch_addr).await.unwrap();
    for s in &mut halves {
        let body = tokio::time::timeout(Duration::from_secs(3), read_frame(s, 1 << 20))
            .await
            .expect("a half-sent prefix is answered and closed")
            .unwrap()
            .unwrap();
        let msg = expect_error(decode_reply(&body).unwrap(), ErrorCode::Malformed);
        assert!(msg.contains("did not arrive"), "{msg}");
        assert_closed(s).await;
    }
    assert!(
        start.elapsed() < Duration::from_secs(3),
        "{:?}",
        start.elapsed()
    );
    // A connection that never sends is closed without a reply after the idle timeout, and one that
    // keeps sending frames is not.
    let mut busy = TcpStream::connect(w.dispatch_addr).await.unwrap();
    for i in 0..4 {
        tokio::time::sleep(Duration::from_millis(300)).await;
        expect_output(call(&mut busy, &request(i, 0, 1, &[0]).encode()).await);
    }
    assert_closed(&mut idle).await;
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn connections_over_the_cap_get_busy_and_are_closed() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.max_connections = 3;
    })
    .await;
    let mut open = Vec::new();
    for i in 0..3 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        expect_output(call(&mut s, &request(i, 0, 1, &[0]).encode()).await);
        open.push(s);
    }
    let mut extra = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let body = tokio::time::timeout(Duration::from_secs(3), read_frame(&mut extra, 1 << 20))
        .await
        .unwrap()
        .unwrap()
        .unwrap();
    let msg = expect_error(decode_reply(&body).unwrap(), ErrorCode::Busy);
    assert!(msg.contains("--max-connections"), "{msg}");
    assert_closed(&mut extra).await;
    drop(open.pop());
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut again = TcpStream::connect(w.dispatch_addr).await.unwrap();
    expect_output(call(&mut again, &request(9, 1, 1, &[2]).encode()).await);
    w.shutdown().await;
}

/// Send an HTTP head (and no body) and read the status line, within `limit`.
async fn status_of_head(addr: SocketAddr, head: &str, limit: Duration) -> Option<u16> {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(head.as_bytes()).await.unwrap();
    let mut buf = vec![0u8; 4096];
    let mut got = 0;
    tokio::time::timeout(limit, async {
        while got < 12 {
            match s.read(&mut buf[got..]).await {
                Ok(0) | Err(_) => break,
                Ok(n) => got += n,
            }
        }
    })
    .await
    .ok()?;
    std::str::from_utf8(&buf[9..12]).ok()?.parse().ok()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plan_bodies_are_read_only_after_the_token_and_up_to_the_limit() {
    let w = start_worker(0, Arc::new(TestLoader::default()), None, |c| {
        c.http.max_plan_bytes = 1 << 20;
        c.http.body_timeout = Duration::from_millis(400);
    })
    .await;
    let head = |token: Option<&str>, len: usize| {
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        format!("PUT /v1/plan HTTP/1.1\r\nHost: w\r\n{auth}Content-Type: application/json\r\nContent-Length: {len}\r\n\r\n")
    };
    // On main the 60 MiB body was awaited (and buffered) before the token was looked at.
    let limit = Duration::from_secs(2);
    assert_eq!(
        status_of_head(w.admin_addr, &head(None, 60 << 20), limit).await,
        Some(401)
    );
    assert_eq!(
        status_of_head(w.admin_addr, &head(Some("wrong"), 60 << 20), limit).await,
        Some(401)
    );
    // With the token, a declared length over the limit is refused before the body is read, and a
    // body that does not come is given up after the body timeout.
    assert_eq!(
        status_of_head(w.admin_addr, &head(Some(TOKEN), 60 << 20), limit).await,
        Some(413)
    );
    assert_eq!(
        status_of_head(w.admin_addr, &head(Some(TOKEN), 1000), limit).await,
        Some(408)
    );
    // A chunked body past the limit is cut off at the limit (read while the client still sends).
    let mut s = TcpStream::connect(w.admin_addr).await.unwrap();
    s.write_all(
        format!("PUT /v1/plan HTTP/1.1\r\nHost: w\r\nAuthorization: Bearer {TOKEN}\r\nTransfer-Encoding: chunked\r\n\r\n")
            .as_bytes(),
    )
    .await
    .unwrap();
    let (mut rd, mut wr) = s.into_split();
    let writer = tokio::spawn(async move {
        let chunk = format!("{:x}\r\n{}\r\n", 256 << 10, " ".repeat(256 << 10));
        for _ in 0..5 {
            if wr.write_all(chunk.as_bytes()).await.is_err() {
                break;
            }
        }
        wr
    });
    let mut buf = vec![0u8; 64];
    let n = tokio::time::timeout(limit, rd.read(&mut buf))
        .await
        .expect("an answer")
        .unwrap();
    assert_eq!(std::str::from_utf8(&buf[9..12.min(n)]).unwrap(), "413");
    drop(writer.await);
    // Still serving plans.
    let (status, body) = put_plan(&w, &plan_a()).await;
    assert_eq!(status, 200, "{body}");
    w.shutdown().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn half_sent_http_heads_are_closed_and_do_not_hold_up_shutdown() {
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.http.header_timeout = Duration::from_millis(400);
    })
    .await;
    let mut halves = Vec::new();
    for addr in [w.admin_addr, w.metrics_addr] {
        for _ in 0..10 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"PUT /v1/plan HTTP/1.1\r\nHost: w\r\nContent-Le")
                .await
                .unwrap();
            halves.push(s);
        }
    }
    let start = std::time::Instant::now();
    for s in &mut halves {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(Duration::from_secs(3), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        assert!(closed.is_ok(), "a half-sent head stayed open");
    }
    assert!(start.elapsed() < Duration::from_secs(3));
    assert_eq!(
        http(w.metrics_addr, "GET", "/readyz", None, "").await.0,
        200
    );
    w.shutdown().await;

    // With a long head timeout, shutdown still ends after its drain: on main 20 half-sent heads
    // kept the worker from exiting.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.http.header_timeout = Duration::from_secs(60);
        c.http.shutdown_drain = Duration::from_millis(300);
    })
    .await;
    let mut halves = Vec::new();
    for addr in [w.admin_addr, w.metrics_addr] {
        for _ in 0..10 {
            let mut s = TcpStream::connect(addr).await.unwrap();
            s.write_all(b"GET /metrics HTTP/1.1\r\nHo").await.unwrap();
            halves.push(s);
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let start = std::time::Instant::now();
    tokio::time::timeout(Duration::from_secs(5), w.shutdown())
        .await
        .expect("shutdown ends after the drain");
    assert!(
        start.elapsed() < Duration::from_secs(2),
        "{:?}",
        start.elapsed()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn plans_are_checked_against_the_served_model_before_they_are_accepted() {
    let w = start_worker(0, Arc::new(TestLoader::default()), None, |c| {
        c.model = Some(model());
    })
    .await;
    let refused = |p: ExpertPlan, needle: &'static str| {
        let w = &w;
        async move {
            let (status, body) = put_plan(w, &p).await;
            assert_eq!(status, 422, "{body}");
            let msg = body["error"].as_str().unwrap().to_string();
            assert!(msg.contains(needle), "{msg}");
        }
    };
    // No layer at all: on main, 200 and ready, then every request failed.
    let mut empty = plan_a();
    empty.layers.clear();
    refused(empty.seal(), "`layers` is empty").await;
    let mut missing = plan_a();
    missing.layers.pop();
    refused(missing.seal(), "MoE layer 2 has no entry").await;
    // The first plan applied used to fix the model; now the weights do.
    let mut wide = plan_a();
    wide.model.hidden_size = 32;
    wide.bytes_per_expert = wide.model.bytes_per_expert();
    refused(wide.seal(), "hidden size 32").await;
    let mut fp8 = plan_a();
    fp8.model.dtype = Dtype::Fp8;
    refused(fp8.seal(), "dtype").await;
    // Claimed sizes are bounded before anything is allocated by them (main aborted here).
    let mut huge = plan_a();
    huge.model.experts = u32::MAX;
    refused(huge.seal(), "model.experts").await;
    let mut many_gpus = plan_a();
    many_gpus.gpus = u32::MAX - 1;
    refused(many_gpus.seal(), "gpus").await;
    let mut future = plan_a();
    future.format_version = 99;
    refused(future.seal(), "formatVersion").await;
    // Edited after sealing (within every limit, so only the hash can tell).
    let mut tampered = plan_a().seal();
    tampered.replicas_per_gpu += 1;
    refused(tampered, "hashes to").await;
    assert_eq!(
        http(w.metrics_addr, "GET", "/readyz", None, "").await.0,
        503
    );
    let (status, body) = put_plan(&w, &plan_a()).await;
    assert_eq!(status, 200, "{body}");
    w.shutdown().await;

    // The start-up plan goes through the same checks.
    let mut empty = plan_a();
    empty.layers.clear();
    let mut serve = ServeConfig::new(0, 2);
    serve.model = Some(model());
    let e = start(
        WorkerOptions {
            serve,
            listen: loopback(),
            metrics_listen: loopback(),
            admin_listen: loopback(),
            admin_token: TOKEN.into(),
            initial_plan: Some(empty.seal()),
        },
        vec![Arc::new(TestLoader::default())],
    )
    .await
    .err()
    .expect("a start-up plan without layers is refused");
    assert!(format!("{e:#}").contains("`layers` is empty"), "{e:#}");
}

#[test]
fn plan_files_are_bounded_and_checked_before_use() {
    use moe_operator::worker::runtime::read_plan;
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("plan.json");
    let mut huge = plan_a();
    huge.model.experts = u32::MAX;
    std::fs::write(&path, serde_json::to_vec(&huge.seal()).unwrap()).unwrap();
    let e = format!("{:#}", read_plan(&path).unwrap_err());
    assert!(
        e.contains("model.experts") && e.contains("plan.json"),
        "{e}"
    );
    let mut future = plan_a();
    future.format_version = 2;
    std::fs::write(&path, serde_json::to_vec(&future.seal()).unwrap()).unwrap();
    let e = format!("{:#}", read_plan(&path).unwrap_err());
    assert!(e.contains("formatVersion"), "{e}");
    std::fs::write(&path, serde_json::to_vec(&plan_a()).unwrap()).unwrap();
    assert_eq!(read_plan(&path).unwrap().hash, plan_a().hash);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_rotated_token_file_is_honoured_without_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("token");
    std::fs::write(&path, "old-token\n").unwrap();
    let file = path.clone();
    let w = start_worker(
        0,
        Arc::new(TestLoader::default()),
        Some(plan_a()),
        move |c| {
            c.http.admin_token_file = Some(file);
            c.http.token_recheck = Duration::from_millis(200);
        },
    )
    .await;
    let get = |token: &'static str| http(w.admin_addr, "GET", "/v1/plan", Some(token), "");
    assert_eq!(get("old-token").await.0, 200);
    // The kubelet updates a mounted Secret by writing a new file and renaming it into place.
    let tmp = dir.path().join("..token.tmp");
    std::fs::write(&tmp, "new-token\n").unwrap();
    std::fs::rename(&tmp, &path).unwrap();
    // A failed check looks at the file again at once (on main the new token got 401 for good).
    tokio::time::sleep(Duration::from_millis(30)).await;
    assert_eq!(get("new-token").await.0, 200);
    assert_eq!(get("old-token").await.0, 401);
    // An empty or missing file keeps the last good token.
    std::fs::write(&path, "").unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(get("new-token").await.0, 200);
    std::fs::remove_file(&path).unwrap();
    tokio::time::sleep(Duration::from_millis(250)).await;
    assert_eq!(get("new-token").await.0, 200);
    w.shutdown().await;
}

#[cfg(unix)]
#[test]
fn the_worker_binary_exits_soon_after_sigterm_with_half_sent_heads_open() {
    use std::io::Write;
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(&plan_a()).unwrap()).unwrap();
    let addresses = dir.path().join("addresses.json");
    // MOE_WORKER_BIN: a copy of the binary, where several checkouts share one target directory.
    let bin = std::env::var("MOE_WORKER_BIN").unwrap_or(env!("CARGO_BIN_EXE_moe-worker").into());
    let mut child = std::process::Command::new(bin)
        .args(["--device", "cpu", "--synthetic-weights", "1", "--node", "0"])
        .arg("--plan")
        .arg(&plan_file)
        .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
        .args([
            "--admin-listen",
            "127.0.0.1:0",
            "--shutdown-drain-seconds",
            "1",
        ])
        .arg("--admin-token-file")
        .arg(&token)
        .arg("--addresses-file")
        .arg(&addresses)
        .env_remove("MOE_NODE_RANK")
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let start = std::time::Instant::now();
    let addrs = loop {
        if let Some(a) = moe_operator::worker::runtime::BoundAddresses::read(&addresses).unwrap() {
            break a;
        }
        if let Some(status) = child.try_wait().unwrap() {
            panic!("the worker exited early: {status}");
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the worker did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    let mut halves = Vec::new();
    for addr in [addrs.admin, addrs.metrics] {
        for _ in 0..10 {
            let mut s = std::net::TcpStream::connect(addr).unwrap();
            s.write_all(b"PUT /v1/plan HTTP/1.1\r\nHost: w\r\n")
                .unwrap();
            halves.push(s);
        }
    }
    std::thread::sleep(Duration::from_millis(200));
    // SAFETY: kill only sends a signal to the child this test started.
    assert_eq!(unsafe { libc::kill(child.id() as i32, libc::SIGTERM) }, 0);
    let term = std::time::Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().unwrap() {
            break s;
        }
        if term.elapsed() > Duration::from_secs(15) {
            let _ = child.kill();
            panic!("the worker was still running 15 s after SIGTERM");
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "{status}");
    assert!(
        term.elapsed() < Duration::from_secs(6),
        "{:?}",
        term.elapsed()
    );
}

fn rss_mib() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

/// The issue-19 probes, with the figures printed (default limits unless noted). Uses only what
/// the worker had before the hardening, so that it runs on both.
/// `cargo test --test serve -- --ignored --nocapture issue19_probes`
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
#[ignore = "measurement, prints the figures"]
async fn issue19_probes() {
    let cap = Duration::from_secs(60);
    // P1: 16 connections send a 64 MiB length prefix only; how long does a valid request wait?
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |_| {}).await;
    let mut loris = Vec::new();
    for _ in 0..16 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        s.write_all(&(64u32 << 20).to_le_bytes()).await.unwrap();
        loris.push(s);
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let r = tokio::time::timeout(cap, call(&mut s, &request(1, 0, 1, &[0]).encode())).await;
    println!(
        "P1 valid request behind 16 x 64 MiB prefixes: {:?} (answered: {})",
        start.elapsed(),
        r.is_ok()
    );
    drop(loris);

    // P2: a client pipelines 1000-row requests and never reads; budget of about one frame.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |c| {
        c.max_inflight_bytes = 48 << 10;
    })
    .await;
    let experts: Vec<u32> = (0..1000).map(|r| r % 2).collect();
    let big = request(1, 0, 1, &experts).encode();
    let pipelined: Vec<u8> = (0..400).flat_map(|_| big.iter().copied()).collect();
    let mut hog = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let writer = tokio::spawn(async move {
        let _ = tokio::time::timeout(Duration::from_secs(70), hog.write_all(&pipelined)).await;
        hog
    });
    tokio::time::sleep(Duration::from_millis(300)).await;
    let start = std::time::Instant::now();
    let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
    let other: Vec<u32> = (0..1000).map(|r| 2 + r % 2).collect();
    let r = tokio::time::timeout(cap, call(&mut s, &request(2, 1, 1, &other).encode())).await;
    println!(
        "P2 rank-1 request while rank 0's client does not read: {:?} (answered: {})",
        start.elapsed(),
        r.is_ok()
    );
    writer.abort();

    // P3: 100 connections holding 2 bytes: how long until the worker closes them?
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |_| {}).await;
    let start = std::time::Instant::now();
    let mut halves = Vec::new();
    for _ in 0..100 {
        let mut s = TcpStream::connect(w.dispatch_addr).await.unwrap();
        s.write_all(&[1, 0]).await.unwrap();
        halves.push(s);
    }
    let mut open = 0;
    for s in &mut halves {
        let mut buf = [0u8; 256];
        let closed = tokio::time::timeout(cap.saturating_sub(start.elapsed()), async {
            loop {
                match s.read(&mut buf).await {
                    Ok(0) | Err(_) => break,
                    Ok(_) => {}
                }
            }
        })
        .await;
        open += closed.is_err() as usize;
    }
    println!(
        "P3 100 connections holding 2 bytes: {open} still open after {:?}",
        start.elapsed()
    );

    // P4: 8 unauthenticated 60 MiB PUTs (bodies sent whole); resident memory before and after.
    let w = start_worker(0, Arc::new(TestLoader::default()), Some(plan_a()), |_| {}).await;
    let before = rss_mib();
    let body = Arc::new(vec![b' '; 60 << 20]);
    let before_body = before;
    let before = rss_mib();
    let mut puts = Vec::new();
    for _ in 0..8 {
        let addr = w.admin_addr;
        let body = body.clone();
        puts.push(tokio::spawn(async move {
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "PUT /v1/plan HTTP/1.1\r\nHost: w\r\nContent-Length: {}\r\n\r\n",
                60 << 20
            );
            let _ = s.write_all(head.as_bytes()).await;
            let _ = tokio::time::timeout(Duration::from_secs(30), s.write_all(&body)).await;
            let mut buf = vec![0u8; 256];
            let _ = tokio::time::timeout(Duration::from_secs(30), s.read(&mut buf)).await;
        }));
    }
    let mut peak = before;
    while puts.iter().any(|p| !p.is_finished()) {
        peak = peak.max(rss_mib());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    tokio::time::sleep(Duration::from_secs(2)).await;
    println!(
        "P4 8 unauthenticated 60 MiB PUTs: RSS {before:.0} MiB before ({before_body:.0} MiB before the clients' one shared 60 MiB body), peak {peak:.0} MiB, {:.0} MiB 2 s after",
        rss_mib()
    );
}

/// `host:port` of a port free on `ip` whose next port is free too (a worker of two ranks listens
/// on both).
#[cfg(unix)]
fn two_free_ports(ip: &str) -> u16 {
    loop {
        let a = std::net::TcpListener::bind((ip, 0)).unwrap();
        let p = a.local_addr().unwrap().port();
        if p < u16::MAX && std::net::TcpListener::bind((ip, p + 1)).is_ok() {
            return p;
        }
    }
}

/// A blocking `GET /metrics` of a worker.
#[cfg(unix)]
fn scrape(addr: SocketAddr) -> String {
    use std::io::{Read, Write};
    let Ok(mut s) = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(2)) else {
        return String::new();
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(5)));
    let _ = s.write_all(b"GET /metrics HTTP/1.1\r\nHost: w\r\nConnection: close\r\n\r\n");
    let mut text = String::new();
    let _ = s.read_to_string(&mut text);
    text
}

/// Two `moe-worker` processes of one EP group (2 nodes x 2 ranks, tcp) on loopback: both form the
/// group (the log line and `moe_ep_group_formed 1`); SIGKILL one, and the other writes
/// `ep rank <r>: rank <2 or 3> went away ...` to its termination log and exits with status 1.
#[cfg(unix)]
#[test]
fn the_worker_binary_runs_its_ep_ranks_and_exits_when_a_peer_dies() {
    let dir = tempfile::tempdir().unwrap();
    let token = dir.path().join("token");
    std::fs::write(&token, "t0ken\n").unwrap();
    let plan_file = dir.path().join("plan.json");
    std::fs::write(&plan_file, serde_json::to_vec(&plan_a()).unwrap()).unwrap();
    let ips = ["127.0.0.3", "127.0.0.4"];
    let ports = ips.map(two_free_ports);
    let rendezvous = format!("{}:{}", ips[0], ports[0]);
    let bin = std::env::var("MOE_WORKER_BIN").unwrap_or(env!("CARGO_BIN_EXE_moe-worker").into());
    let file = |n: usize, what: &str| dir.path().join(format!("worker-{n}.{what}"));
    // Node 1 first: its ranks wait for rank 0.
    let mut children: Vec<std::process::Child> = [1usize, 0]
        .into_iter()
        .map(|n| {
            let log = std::fs::File::create(file(n, "log")).unwrap();
            std::process::Command::new(&bin)
                .args(["--device", "cpu", "--synthetic-weights", "1"])
                .args(["--node", &n.to_string()])
                .arg("--plan")
                .arg(&plan_file)
                .args(["--listen", "127.0.0.1:0", "--metrics-listen", "127.0.0.1:0"])
                .args(["--admin-listen", "127.0.0.1:0"])
                .arg("--admin-token-file")
                .arg(&token)
                .arg("--addresses-file")
                .arg(file(n, "addresses"))
                .env_remove("MOE_NODE_RANK")
                .env_remove("MOE_RANK")
                .env("MOE_EP_WORLD_SIZE", "4")
                .env("MOE_EP_RENDEZVOUS", &rendezvous)
                .env("MOE_EP_LISTEN", format!("{}:{}", ips[n], ports[n]))
                .env("MOE_EP_TRANSPORT", "tcp")
                .env("MOE_EP_RENDEZVOUS_TIMEOUT_SECONDS", "30")
                .env("MOE_TERMINATION_LOG", file(n, "termination-log"))
                .env("RUST_LOG", "info")
                .stderr(log)
                .spawn()
                .unwrap()
        })
        .collect();
    children.reverse(); // children[n] is node n
    struct Reap(Vec<std::process::Child>);
    impl Drop for Reap {
        fn drop(&mut self) {
            for c in &mut self.0 {
                let _ = c.kill();
                let _ = c.wait();
            }
        }
    }
    let mut children = Reap(children);
    let start = std::time::Instant::now();
    let mut metrics: Vec<Option<SocketAddr>> = vec![None, None];
    loop {
        let mut formed = 0;
        for (n, m) in metrics.iter_mut().enumerate() {
            if m.is_none() {
                *m = moe_operator::worker::runtime::BoundAddresses::read(&file(n, "addresses"))
                    .unwrap()
                    .map(|a| a.metrics);
            }
            if let Some(a) = *m {
                if scrape(a).contains("\nmoe_ep_group_formed 1\n") {
                    formed += 1;
                }
            }
            if let Some(status) = children.0[n].try_wait().unwrap() {
                panic!(
                    "worker {n} exited early: {status}: {}",
                    std::fs::read_to_string(file(n, "log")).unwrap_or_default()
                );
            }
        }
        if formed == 2 {
            break;
        }
        assert!(
            start.elapsed() < Duration::from_secs(60),
            "the group did not form; logs:\n{}\n{}",
            std::fs::read_to_string(file(0, "log")).unwrap_or_default(),
            std::fs::read_to_string(file(1, "log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    for n in 0..2 {
        let log = log_support::strip_ansi(&std::fs::read_to_string(file(n, "log")).unwrap());
        let line = log
            .lines()
            .find(|l| l.contains("ep group formed"))
            .unwrap_or_else(|| panic!("worker {n} never logged 'ep group formed':\n{log}"));
        let ranks = if n == 0 { "0..2" } else { "2..4" };
        assert!(line.contains(&format!("ranks={ranks}")), "{line}");
    }

    // SIGKILL node 1 (ranks 2 and 3): node 0 names it and exits 1.
    children.0[1].kill().unwrap();
    children.0[1].wait().unwrap();
    let killed = std::time::Instant::now();
    let status = loop {
        if let Some(s) = children.0[0].try_wait().unwrap() {
            break s;
        }
        assert!(
            killed.elapsed() < Duration::from_secs(20),
            "worker 0 still runs 20 s after its peer died:\n{}",
            std::fs::read_to_string(file(0, "log")).unwrap_or_default()
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert_eq!(status.code(), Some(1), "{status}");
    let msg = std::fs::read_to_string(file(0, "termination-log")).unwrap();
    let first = msg.lines().next().unwrap_or_default();
    assert!(
        (first.starts_with("ep rank 0: ") || first.starts_with("ep rank 1: "))
            && (first.contains("rank 2 went away") || first.contains("rank 3 went away")),
        "{msg}"
    );
    let log = log_support::strip_ansi(&std::fs::read_to_string(file(0, "log")).unwrap());
    assert!(log.contains("ERROR") && log.contains(first), "{log}");
}
