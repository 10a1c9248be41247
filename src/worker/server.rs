//! The worker's serving core: the plan in force, in-place plan swaps, and the dispatch TCP server.
//!
//! Shape of the data path:
//! - one task per TCP connection reads frames (bounded by the maximum frame size, and by an
//!   in-flight byte budget taken before a frame body is read, so memory stays bounded however many
//!   clients push at once), decodes them and hands each request to the lane of its rank;
//! - one lane per local rank (GPU) batches whatever requests are queued for that rank, grouped by
//!   layer (rows of different connections concatenated, up to `max_batch_rows`), and runs them on
//!   the blocking pool so the reactor never waits on compute; a lane has one batch in flight, so
//!   requests arriving meanwhile form the next batch;
//! - the plan in force is an `ArcSwapOption<ActivePlan>`, read once per batch: a swap takes effect
//!   between batches, and a batch that started on the old set finishes on it.
//!
//! Plan swaps are make-before-break: the new experts are loaded while the old set serves, then the
//! pointer is swapped. The replaced set stays available for `previous_plan_grace`, and a request
//! whose experts the new set lacks but the old one holds is served by the old one: routers that
//! still route by the old plan while the rollout moves through the workers lose no request.

use std::collections::HashSet;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock, Weak};
use std::time::{Duration, Instant};

use arc_swap::ArcSwapOption;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, Semaphore};

use crate::plan::{ExpertPlan, ModelShape};
use crate::worker::compute::{ComputeError, ExpertCompute, ExpertKey, ExpertLoader, RowBatch};
use crate::worker::metrics::WorkerMetrics;
use crate::worker::protocol::{
    decode_request, encode_error, encode_output, peek_request_id, read_frame_body, read_frame_len,
    DispatchRequest, ErrorCode, ProtocolError, ReadFrameError, DEFAULT_MAX_FRAME_BYTES,
};

/// Limits and identity of one worker.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Node index: this worker serves ranks `node * gpus_per_node .. (node + 1) * gpus_per_node`.
    pub node: u32,
    pub gpus_per_node: u32,
    /// Largest frame body accepted.
    pub max_frame_bytes: usize,
    /// Frame bytes that may be buffered or computing at once, over all connections.
    pub max_inflight_bytes: usize,
    /// Rows batched into one compute step of one rank (a single larger request is not split).
    pub max_batch_rows: usize,
    /// Time allowed for a frame body to arrive once its length prefix has.
    pub frame_read_timeout: Duration,
    /// How long a replaced plan keeps serving requests the new plan cannot.
    pub previous_plan_grace: Duration,
}

impl ServeConfig {
    pub fn new(node: u32, gpus_per_node: u32) -> Self {
        Self {
            node,
            gpus_per_node,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_inflight_bytes: 1 << 30,
            max_batch_rows: 16384,
            frame_read_timeout: Duration::from_secs(30),
            previous_plan_grace: Duration::from_secs(30),
        }
    }

    /// The global EP ranks this worker serves.
    pub fn ranks(&self) -> Range<u32> {
        self.node * self.gpus_per_node..(self.node + 1) * self.gpus_per_node
    }
}

/// The experts of one local rank under one plan.
pub struct RankSet {
    pub compute: Arc<dyn ExpertCompute>,
    resident: HashSet<ExpertKey>,
}

/// A plan in force with the expert sets it loaded, one per local rank.
pub struct ActivePlan {
    pub plan: Arc<ExpertPlan>,
    /// Increases with every swap.
    pub epoch: u64,
    pub ranks: Vec<RankSet>,
}

impl ActivePlan {
    fn holds(&self, local: usize, layer: u32, experts: &[u32]) -> Result<(), u32> {
        let set = &self.ranks[local].resident;
        match experts.iter().find(|&&e| !set.contains(&(layer, e))) {
            Some(&e) => Err(e),
            None => Ok(()),
        }
    }
}

/// Why a plan was not applied. The old plan stays in force in every case.
#[derive(Debug, thiserror::Error)]
pub enum ApplyError {
    #[error("invalid plan: {0}")]
    Invalid(String),
    #[error("plan does not fit this worker: {0}")]
    Mismatch(String),
    #[error("another plan is being applied on this worker; retry when it is done")]
    Busy,
    #[error("loading the experts of rank {rank} failed: {message}")]
    Load { rank: u32, message: String },
}

impl ApplyError {
    /// The HTTP status the admin API answers with.
    pub fn http_status(&self) -> u16 {
        match self {
            ApplyError::Invalid(_) | ApplyError::Mismatch(_) => 422,
            ApplyError::Busy => 409,
            ApplyError::Load { .. } => 500,
        }
    }
}

/// What a successful `apply_plan` did.
#[derive(Debug, Clone, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct ApplyOutcome {
    pub hash: String,
    pub previous_hash: Option<String>,
    /// False when the plan was already in force.
    pub changed: bool,
    /// Expert replicas resident on this worker under the plan, all ranks together.
    pub resident_experts: usize,
    pub load_seconds: f64,
}

type DispatchResult = Result<Vec<f32>, (ErrorCode, String)>;

struct Job {
    req: DispatchRequest,
    reply: oneshot::Sender<DispatchResult>,
}

/// One worker process: the ranks of one node.
pub struct Worker {
    cfg: ServeConfig,
    loaders: Vec<Arc<dyn ExpertLoader>>,
    active: ArcSwapOption<ActivePlan>,
    previous: ArcSwapOption<ActivePlan>,
    /// The model this worker serves, fixed by the first plan applied.
    model: OnceLock<ModelShape>,
    apply_lock: tokio::sync::Mutex<()>,
    epoch: AtomicU64,
    pub metrics: WorkerMetrics,
    /// In-flight frame bytes, in KiB permits.
    inflight: Arc<Semaphore>,
    inflight_total: u32,
    lanes: Vec<mpsc::Sender<Job>>,
}

impl Worker {
    /// Create the worker and start its compute lanes (must run inside a tokio runtime).
    /// `loaders` has one loader per local rank, or a single one shared by all ranks.
    pub fn start(
        cfg: ServeConfig,
        loaders: Vec<Arc<dyn ExpertLoader>>,
    ) -> anyhow::Result<Arc<Self>> {
        let g = cfg.gpus_per_node as usize;
        anyhow::ensure!(g > 0, "gpus per node must be at least 1");
        anyhow::ensure!(
            loaders.len() == 1 || loaders.len() == g,
            "{} expert loaders for {g} local ranks: give one per rank or a single shared one",
            loaders.len()
        );
        anyhow::ensure!(cfg.max_batch_rows > 0, "max batch rows must be at least 1");
        let inflight_total = (cfg.max_inflight_bytes / 1024)
            .clamp(1, Semaphore::MAX_PERMITS.min(u32::MAX as usize))
            as u32;
        let mut txs = Vec::with_capacity(g);
        let mut rxs = Vec::with_capacity(g);
        for _ in 0..g {
            let (tx, rx) = mpsc::channel(1024);
            txs.push(tx);
            rxs.push(rx);
        }
        let worker = Arc::new(Self {
            cfg,
            loaders,
            active: ArcSwapOption::empty(),
            previous: ArcSwapOption::empty(),
            model: OnceLock::new(),
            apply_lock: tokio::sync::Mutex::new(()),
            epoch: AtomicU64::new(0),
            metrics: WorkerMetrics::new(),
            inflight: Arc::new(Semaphore::new(inflight_total as usize)),
            inflight_total,
            lanes: txs,
        });
        for (local, rx) in rxs.into_iter().enumerate() {
            tokio::spawn(lane(Arc::downgrade(&worker), local, rx));
        }
        Ok(worker)
    }

    pub fn config(&self) -> &ServeConfig {
        &self.cfg
    }

    /// The plan in force, if any.
    pub fn active(&self) -> Option<Arc<ActivePlan>> {
        self.active.load_full()
    }

    pub fn plan_hash(&self) -> Option<String> {
        self.active().map(|a| a.plan.hash.clone())
    }

    /// Ready means routable: a plan applied and its experts loaded.
    pub fn readiness(&self) -> Result<String, String> {
        match self.active() {
            Some(a) => Ok(a.plan.hash.clone()),
            None => Err("not ready: no plan applied yet (weights not loaded)".into()),
        }
    }

    fn loader(&self, local: usize) -> Arc<dyn ExpertLoader> {
        self.loaders[local.min(self.loaders.len() - 1)].clone()
    }

    fn validate(&self, mut plan: ExpertPlan) -> Result<ExpertPlan, ApplyError> {
        plan.check().map_err(ApplyError::Invalid)?;
        let computed = plan.compute_hash();
        if plan.hash.is_empty() {
            plan.hash = computed;
        } else if plan.hash != computed {
            return Err(ApplyError::Invalid(format!(
                "field `hash` is {} but the plan's content hashes to {computed}: the plan was edited after it \
                 was sealed; write it again with `moectl plan` or drop the field",
                plan.hash
            )));
        }
        let g = self.cfg.gpus_per_node;
        let per_node = plan.gpus / plan.nodes;
        let ranks = self.cfg.ranks();
        if per_node != g {
            return Err(ApplyError::Mismatch(format!(
                "the plan puts {per_node} GPUs on each node ({} GPUs on {} nodes) but this worker serves {g} ranks \
                 (--gpus-per-node)",
                plan.gpus, plan.nodes
            )));
        }
        if ranks.end > plan.gpus {
            return Err(ApplyError::Mismatch(format!(
                "this worker is node {} (ranks {}..{}) but the plan has only {} nodes ({} ranks)",
                self.cfg.node, ranks.start, ranks.end, plan.nodes, plan.gpus
            )));
        }
        let m = &plan.model;
        let mut seen = HashSet::new();
        for lp in &plan.layers {
            if lp.layer < m.first_moe_layer || lp.layer >= m.layers {
                return Err(ApplyError::Invalid(format!(
                    "layer {} is not a MoE layer of the model (MoE layers are {}..{})",
                    lp.layer, m.first_moe_layer, m.layers
                )));
            }
            if !seen.insert(lp.layer) {
                return Err(ApplyError::Invalid(format!(
                    "layer {} appears twice in `layers`",
                    lp.layer
                )));
            }
        }
        if let Some(served) = self.model.get() {
            if served != m {
                return Err(ApplyError::Mismatch(format!(
                    "the plan is for another model ({}) than the one this worker serves ({})",
                    describe(m),
                    describe(served)
                )));
            }
        }
        Ok(plan)
    }

    /// Load the experts the plan gives this worker's ranks (reusing the current sets where the
    /// backend can), then swap them in atomically. On any error the current plan stays in force.
    pub async fn apply_plan(
        self: &Arc<Self>,
        plan: ExpertPlan,
    ) -> Result<ApplyOutcome, ApplyError> {
        let _guard = self.apply_lock.try_lock().map_err(|_| ApplyError::Busy)?;
        let plan = Arc::new(self.validate(plan)?);
        let current = self.active.load_full();
        if let Some(cur) = current.as_ref().filter(|c| c.plan.hash == plan.hash) {
            return Ok(ApplyOutcome {
                hash: plan.hash.clone(),
                previous_hash: Some(cur.plan.hash.clone()),
                changed: false,
                resident_experts: cur.ranks.iter().map(|r| r.resident.len()).sum(),
                load_seconds: 0.0,
            });
        }
        let start = Instant::now();
        let mut pending = Vec::new();
        for (local, rank) in self.cfg.ranks().enumerate() {
            let mut wanted = plan.experts_on(rank as usize);
            wanted.sort_unstable();
            wanted.dedup();
            let previous = current.as_ref().map(|c| c.ranks[local].compute.clone());
            let loader = self.loader(local);
            let want = wanted.clone();
            // Ranks load in parallel: with one device per rank they do not contend.
            let handle = tokio::task::spawn_blocking(move || loader.load(&want, previous.as_ref()));
            pending.push((rank, wanted, handle));
        }
        let mut ranks = Vec::with_capacity(pending.len());
        for (rank, wanted, handle) in pending {
            let compute = match handle.await {
                Ok(Ok(c)) => c,
                Ok(Err(e)) => {
                    return Err(ApplyError::Load {
                        rank,
                        message: format!("{e:#}"),
                    })
                }
                Err(e) => {
                    return Err(ApplyError::Load {
                        rank,
                        message: format!("the loader thread failed: {e}"),
                    })
                }
            };
            let resident: HashSet<ExpertKey> = compute.resident().into_iter().collect();
            if let Some((l, e)) = wanted.iter().find(|k| !resident.contains(k)) {
                return Err(ApplyError::Load {
                    rank,
                    message: format!(
                        "backend {} reported success but does not hold layer {l} expert {e}, which the plan gives \
                         this rank",
                        compute.backend()
                    ),
                });
            }
            ranks.push(RankSet { compute, resident });
        }
        let load_seconds = start.elapsed().as_secs_f64();
        let resident_experts = ranks.iter().map(|r| r.resident.len()).sum();
        let epoch = self.epoch.fetch_add(1, Ordering::Relaxed) + 1;
        let _ = self.model.set(plan.model.clone());
        self.metrics.init_counters(&plan.model);
        let hash = plan.hash.clone();
        let next = Arc::new(ActivePlan { plan, epoch, ranks });
        // The old set goes to `previous` first, so that no request finds neither.
        self.previous.store(current.clone());
        self.active.store(Some(next));
        self.metrics.set_plan(&hash, resident_experts);
        if let Some(old) = &current {
            self.retire_later(old.epoch);
        }
        tracing::info!(
            plan = %hash,
            previous = current.as_ref().map(|c| c.plan.hash.as_str()).unwrap_or("none"),
            resident_experts,
            load_seconds,
            "plan applied"
        );
        Ok(ApplyOutcome {
            hash,
            previous_hash: current.map(|c| c.plan.hash.clone()),
            changed: true,
            resident_experts,
            load_seconds,
        })
    }

    /// Drop the replaced plan's expert sets after the grace period (unless replaced again since).
    fn retire_later(self: &Arc<Self>, epoch: u64) {
        let weak = Arc::downgrade(self);
        let grace = self.cfg.previous_plan_grace;
        tokio::spawn(async move {
            tokio::time::sleep(grace).await;
            if let Some(w) = weak.upgrade() {
                let _guard = w.apply_lock.lock().await;
                if w.previous.load_full().is_some_and(|p| p.epoch == epoch) {
                    w.previous.store(None);
                    tracing::debug!(epoch, "replaced plan retired");
                }
            }
        });
    }

    /// Serve one decoded request: check it, queue it on its rank's lane, wait for the outputs.
    pub async fn dispatch(&self, req: DispatchRequest) -> DispatchResult {
        let ranks = self.cfg.ranks();
        if !ranks.contains(&req.rank) {
            return Err((
                ErrorCode::WrongRank,
                format!(
                    "rank {} is not served by this worker (node {}, ranks {}..{})",
                    req.rank, self.cfg.node, ranks.start, ranks.end
                ),
            ));
        }
        let (Some(model), true) = (self.model.get(), self.active.load().is_some()) else {
            return Err((ErrorCode::NotReady, "no plan applied yet".into()));
        };
        if req.hidden_size as u64 != model.hidden_size {
            return Err((
                ErrorCode::HiddenSizeMismatch,
                format!(
                    "hidden size {} but the model's is {}",
                    req.hidden_size, model.hidden_size
                ),
            ));
        }
        if req.rows() == 0 {
            return Ok(Vec::new());
        }
        let local = (req.rank - ranks.start) as usize;
        let (tx, rx) = oneshot::channel();
        if self.lanes[local]
            .send(Job { req, reply: tx })
            .await
            .is_err()
        {
            return Err((ErrorCode::Internal, "the compute lane has stopped".into()));
        }
        rx.await.unwrap_or_else(|_| {
            Err((
                ErrorCode::Internal,
                "the compute thread ended without a reply".into(),
            ))
        })
    }

    fn permits_for(&self, frame_len: usize) -> u32 {
        (frame_len.div_ceil(1024).max(1)).min(self.inflight_total as usize) as u32
    }
}

fn describe(m: &ModelShape) -> String {
    format!(
        "layers {}, first MoE layer {}, {} experts, top-{}, hidden {}, expert intermediate {}, {:?}",
        m.layers, m.first_moe_layer, m.experts, m.top_k, m.hidden_size, m.expert_intermediate_size, m.dtype
    )
}

/// Requests of one layer that run together on one expert set.
struct Group {
    layer: u32,
    active: Arc<ActivePlan>,
    jobs: Vec<Job>,
}

/// The plan set that holds every expert of the request: the current one, else the replaced one
/// still in its grace period.
fn pick_set(
    current: &Option<Arc<ActivePlan>>,
    previous: &Option<Arc<ActivePlan>>,
    local: usize,
    req: &DispatchRequest,
) -> Result<Arc<ActivePlan>, (ErrorCode, String)> {
    let mut missing = None;
    for a in [current, previous].into_iter().flatten() {
        match a.holds(local, req.layer, &req.experts) {
            Ok(()) => return Ok(a.clone()),
            Err(e) => {
                missing.get_or_insert((e, a.plan.hash.clone()));
            }
        }
    }
    match missing {
        Some((e, hash)) => Err((
            ErrorCode::NotResident,
            format!(
                "rank {} does not hold layer {} expert {e} under plan {hash}",
                req.rank, req.layer
            ),
        )),
        None => Err((ErrorCode::NotReady, "no plan applied yet".into())),
    }
}

async fn lane(worker: Weak<Worker>, local: usize, mut rx: mpsc::Receiver<Job>) {
    while let Some(first) = rx.recv().await {
        let Some(w) = worker.upgrade() else { return };
        let mut rows = first.req.rows();
        let mut jobs = vec![first];
        while rows < w.cfg.max_batch_rows {
            match rx.try_recv() {
                Ok(j) => {
                    rows += j.req.rows();
                    jobs.push(j);
                }
                Err(_) => break,
            }
        }
        // One snapshot per batch: a swap lands between batches.
        let current = w.active.load_full();
        let previous = w.previous.load_full();
        let mut groups: Vec<Group> = Vec::new();
        for job in jobs {
            match pick_set(&current, &previous, local, &job.req) {
                Ok(set) => match groups
                    .iter_mut()
                    .find(|g| g.layer == job.req.layer && Arc::ptr_eq(&g.active, &set))
                {
                    Some(g) => g.jobs.push(job),
                    None => groups.push(Group {
                        layer: job.req.layer,
                        active: set,
                        jobs: vec![job],
                    }),
                },
                Err(e) => {
                    let _ = job.reply.send(Err(e));
                }
            }
        }
        if groups.is_empty() {
            continue;
        }
        let w2 = w.clone();
        let done = tokio::task::spawn_blocking(move || {
            for g in groups {
                run_group(&w2.metrics, local, g);
            }
        })
        .await;
        if let Err(e) = done {
            // The jobs' reply senders were dropped with the thread: their connections answer Internal.
            tracing::error!(local_rank = local, error = %e, "compute thread failed");
        }
    }
}

/// Run one group on the blocking pool: concatenate, compute, count, answer.
fn run_group(metrics: &WorkerMetrics, local: usize, g: Group) {
    let compute = &g.active.ranks[local].compute;
    let h = g.jobs[0].req.hidden_size as usize;
    let rows: usize = g.jobs.iter().map(|j| j.req.rows()).sum();
    let start = Instant::now();
    let result = if g.jobs.len() == 1 {
        compute.forward(g.layer, &g.jobs[0].req.as_batch())
    } else {
        let mut experts = Vec::with_capacity(rows);
        let mut weights = Vec::with_capacity(rows);
        let mut hidden = Vec::with_capacity(rows * h);
        for j in &g.jobs {
            experts.extend_from_slice(&j.req.experts);
            weights.extend_from_slice(&j.req.router_weights);
            hidden.extend_from_slice(&j.req.hidden);
        }
        compute.forward(
            g.layer,
            &RowBatch {
                hidden_size: h,
                experts: &experts,
                router_weights: &weights,
                hidden: &hidden,
            },
        )
    };
    let seconds = start.elapsed().as_secs_f64();
    let failure = match result {
        Ok(out) if out.len() == rows * h => {
            metrics.observe_step(seconds);
            if let Some(c) = metrics.counters() {
                for j in &g.jobs {
                    c.add_rows(g.layer, &j.req.experts);
                }
            }
            if g.jobs.len() == 1 {
                let j = g.jobs.into_iter().next().expect("one job");
                let _ = j.reply.send(Ok(out));
            } else {
                let mut at = 0;
                for j in g.jobs {
                    let n = j.req.rows() * h;
                    let _ = j.reply.send(Ok(out[at..at + n].to_vec()));
                    at += n;
                }
            }
            return;
        }
        Ok(out) => (
            ErrorCode::Internal,
            format!(
                "backend {} returned {} values for {rows} rows x hidden {h}",
                compute.backend(),
                out.len()
            ),
        ),
        Err(e @ ComputeError::NotResident { .. }) => (ErrorCode::NotResident, e.to_string()),
        Err(e) => (
            ErrorCode::Compute,
            format!("backend {}: {e}", compute.backend()),
        ),
    };
    tracing::warn!(layer = g.layer, local_rank = local, error = %failure.1, "compute step failed");
    for j in g.jobs {
        let _ = j.reply.send(Err(failure.clone()));
    }
}

/// Accept dispatch connections until `shutdown` changes (or its sender is dropped).
pub async fn serve_dispatch(
    worker: Arc<Worker>,
    listener: TcpListener,
    mut shutdown: watch::Receiver<bool>,
) {
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    tracing::debug!(%peer, "dispatch connection");
                    tokio::spawn(serve_connection(worker.clone(), stream));
                }
                Err(e) => {
                    // Out of file descriptors and the like: back off instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.changed() => break,
        }
    }
}

/// Serve one connection: frames in, replies out, in order. A frame that cannot be read or decoded
/// gets an error reply and ends the connection.
pub async fn serve_connection(worker: Arc<Worker>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 << 10, rd);
    let mut wr = BufWriter::with_capacity(256 << 10, wr);
    let max = worker.cfg.max_frame_bytes;
    let fatal: Option<(u64, ErrorCode, String)> = loop {
        let len = match read_frame_len(&mut rd, max).await {
            Ok(None) => break None,
            Ok(Some(len)) => len,
            Err(ReadFrameError::Io(_)) => break None,
            Err(e @ ReadFrameError::Protocol(ProtocolError::FrameTooLarge { .. })) => {
                break Some((0, ErrorCode::FrameTooLarge, e.to_string()))
            }
            Err(e) => break Some((0, ErrorCode::Malformed, e.to_string())),
        };
        let Ok(permits) = worker
            .inflight
            .clone()
            .acquire_many_owned(worker.permits_for(len))
            .await
        else {
            break None;
        };
        let body = match tokio::time::timeout(
            worker.cfg.frame_read_timeout,
            read_frame_body(&mut rd, len),
        )
        .await
        {
            Ok(Ok(body)) => body,
            Ok(Err(e)) => break Some((0, ErrorCode::Malformed, e.to_string())),
            Err(_) => {
                break Some((
                    0,
                    ErrorCode::Malformed,
                    format!(
                        "the {len}-byte frame body did not arrive within {:?} of its length prefix",
                        worker.cfg.frame_read_timeout
                    ),
                ))
            }
        };
        let req = match decode_request(&body) {
            Ok(r) => r,
            Err(e) => break Some((peek_request_id(&body), ErrorCode::Malformed, e.to_string())),
        };
        drop(body);
        let (id, rank, layer, hidden) = (req.request_id, req.rank, req.layer, req.hidden_size);
        let frame = match worker.dispatch(req).await {
            Ok(out) => encode_output(id, rank, layer, hidden, &out),
            Err((code, message)) => {
                worker.metrics.count_error(code);
                encode_error(id, code, &message)
            }
        };
        if wr.write_all(&frame).await.is_err() || wr.flush().await.is_err() {
            break None;
        }
        drop(permits);
    };
    if let Some((id, code, message)) = fatal {
        worker.metrics.count_error(code);
        tracing::info!(code = code.as_str(), %message, "closing dispatch connection after a bad frame");
        let _ = wr.write_all(&encode_error(id, code, &message)).await;
        let _ = wr.flush().await;
        let _ = wr.shutdown().await;
        // Read a little of what the peer still sends, so that closing with unread data (a TCP
        // reset) does not destroy the error reply before the peer reads it.
        let mut sink = vec![0u8; 64 << 10];
        let _ = tokio::time::timeout(Duration::from_millis(200), async {
            let mut total = 0usize;
            while let Ok(n) = rd.read(&mut sink).await {
                total += n;
                if n == 0 || total > (4 << 20) {
                    break;
                }
            }
        })
        .await;
    } else {
        let _ = wr.shutdown().await;
    }
}
