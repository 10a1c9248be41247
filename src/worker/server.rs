//! The worker's serving core: the plan in force, in-place plan swaps, and the dispatch TCP server.
//!
//! Shape of the data path:
//! - one task per TCP connection (at most `max_connections`) reads frames, decodes them and hands
//!   each request to the lane of its rank; how long a peer may hold a connection, memory or budget
//!   is bounded as described at [`serve_connection`];
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
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{mpsc, oneshot, watch, OwnedSemaphorePermit, Semaphore};

use crate::plan::expert_plan::HashRule;
use crate::plan::{ExpertPlan, ModelShape};
use crate::worker::compute::{ComputeError, ExpertCompute, ExpertKey, ExpertLoader, RowBatch};
use crate::worker::http::HttpConfig;
use crate::worker::metrics::WorkerMetrics;
use crate::worker::protocol::{
    check_frame_len, check_request_head, decode_request, encode_error, peek_request_id,
    write_output, DispatchRequest, ErrorCode, ReadFrameError, DEFAULT_MAX_FRAME_BYTES,
    REQUEST_HEAD_LEN,
};

/// Limits and identity of one worker.
#[derive(Clone, Debug)]
pub struct ServeConfig {
    /// Node index: this worker serves ranks `node * gpus_per_node .. (node + 1) * gpus_per_node`.
    pub node: u32,
    pub gpus_per_node: u32,
    /// The model whose weights this worker holds (its checkpoint's `config.json`, or the start-up
    /// plan's model for synthetic weights): plans for any other shape are refused before they are
    /// accepted. `None` (test backends without weights of their own): the first plan applied fixes it.
    pub model: Option<ModelShape>,
    /// Largest frame body accepted.
    pub max_frame_bytes: usize,
    /// Frame bytes that may be buffered or computing at once, over all connections.
    pub max_inflight_bytes: usize,
    /// Rows batched into one compute step of one rank (a single larger request is not split).
    pub max_batch_rows: usize,
    /// Dispatch connections open at once; further ones get a `busy` reply and are closed.
    pub max_connections: usize,
    /// Time a connection may stay open with no frame started; then it is closed.
    pub idle_timeout: Duration,
    /// Time allowed for a whole frame (the rest of its length prefix, its body, and the wait for
    /// in-flight budget) once its first byte has arrived.
    pub frame_read_timeout: Duration,
    /// Time allowed for writing one reply; a client that does not read is disconnected.
    pub write_timeout: Duration,
    /// How long a replaced plan keeps serving requests the new plan cannot.
    pub previous_plan_grace: Duration,
    /// The metrics and admin HTTP listeners.
    pub http: HttpConfig,
}

impl ServeConfig {
    pub fn new(node: u32, gpus_per_node: u32) -> Self {
        Self {
            node,
            gpus_per_node,
            model: None,
            max_frame_bytes: DEFAULT_MAX_FRAME_BYTES,
            max_inflight_bytes: 1 << 30,
            max_batch_rows: 16384,
            max_connections: 4096,
            idle_timeout: Duration::from_secs(300),
            frame_read_timeout: Duration::from_secs(10),
            write_timeout: Duration::from_secs(10),
            previous_plan_grace: Duration::from_secs(30),
            http: HttpConfig::default(),
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
    /// Open dispatch connections.
    connections: Arc<Semaphore>,
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
        anyhow::ensure!(
            cfg.max_connections > 0,
            "max connections must be at least 1"
        );
        let max_connections = cfg.max_connections.min(Semaphore::MAX_PERMITS);
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
            connections: Arc::new(Semaphore::new(max_connections)),
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

    /// Everything a plan must satisfy before this worker accepts it, checked before anything
    /// sized by the plan is allocated: the document checks of [`check_plan_document`], then the
    /// model against the weights this worker holds, the plan's invariants, every MoE layer present
    /// exactly once, and this worker's ranks in the plan.
    fn validate(&self, plan: ExpertPlan) -> Result<ExpertPlan, ApplyError> {
        let plan = check_plan_document(plan)?;
        let m = &plan.model;
        if let Some(held) = &self.cfg.model {
            // top-k is the router's business: the worker computes whatever rows it is sent.
            let differs = |what: &str, in_plan: String, in_weights: String| {
                ApplyError::Mismatch(format!(
                    "the plan's model has {what} {in_plan} but the weights this worker serves have {in_weights} \
                     (plan model: {}; weights: {}): the plan was made for another model",
                    describe(m),
                    describe(held)
                ))
            };
            for (what, p, h) in [
                ("layers", m.layers as u64, held.layers as u64),
                (
                    "first MoE layer",
                    m.first_moe_layer as u64,
                    held.first_moe_layer as u64,
                ),
                ("experts", m.experts as u64, held.experts as u64),
                ("hidden size", m.hidden_size, held.hidden_size),
                (
                    "expert intermediate size",
                    m.expert_intermediate_size,
                    held.expert_intermediate_size,
                ),
            ] {
                if p != h {
                    return Err(differs(what, p.to_string(), h.to_string()));
                }
            }
            if m.dtype != held.dtype {
                return Err(differs(
                    "dtype",
                    format!("{:?}", m.dtype),
                    format!("{:?}", held.dtype),
                ));
            }
        }
        plan.check()
            .map_err(|e| ApplyError::Invalid(e.to_string()))?;
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
        if let Some(missing) = (m.first_moe_layer..m.layers).find(|l| !seen.contains(l)) {
            return Err(ApplyError::Invalid(format!(
                "MoE layer {missing} has no entry in `layers` ({} of the model's {} MoE layers {}..{} are \
                 planned): every MoE layer needs a placement, or requests for it fail",
                plan.layers.len(),
                m.moe_layers(),
                m.first_moe_layer,
                m.layers
            )));
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

/// The checks a plan document passes before anything else looks at it: the one plan reader's
/// ([`ExpertPlan::checked`]: format version, every size against `plan::limits` before anything
/// is allocated from it, layer order, invariants, and the hash; an empty hash is filled in, for
/// hand-written plans given to `--plan`). The worker's own checks against what it serves come
/// after.
pub fn check_plan_document(plan: ExpertPlan) -> Result<ExpertPlan, ApplyError> {
    plan.checked(HashRule::MayBeEmpty)
        .map_err(|e| ApplyError::Invalid(e.to_string()))
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
                Ok((stream, peer)) => match worker.connections.clone().try_acquire_owned() {
                    Ok(slot) => {
                        tracing::debug!(%peer, "dispatch connection");
                        let w = worker.clone();
                        tokio::spawn(async move {
                            serve_connection(w, stream).await;
                            drop(slot);
                        });
                    }
                    Err(_) => refuse_connection(&worker, stream),
                },
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

/// Over the connection cap: one `busy` reply if the socket takes it at once (never waiting), then
/// close.
fn refuse_connection(worker: &Worker, stream: TcpStream) {
    let max = worker.cfg.max_connections;
    worker.metrics.count_error(ErrorCode::Busy);
    tracing::warn!(
        max,
        "dispatch connection refused: at the connection cap (--max-connections)"
    );
    let reply = encode_error(
        0,
        ErrorCode::Busy,
        &format!("the worker already has {max} dispatch connections open (--max-connections); retry later"),
    );
    let _ = stream.try_write(&reply);
}

/// Read buffer of one connection: small, so that idle connections cost little; a frame body
/// larger than it is read straight into its own buffer.
const READ_BUFFER: usize = 16 << 10;

/// What reading the next request frame of a connection gave.
enum FrameRead {
    /// The peer closed between frames, stayed idle past the idle timeout, or the socket failed.
    End,
    /// A whole frame body, and the in-flight budget it holds.
    Frame(Vec<u8>, OwnedSemaphorePermit),
    /// The frame cannot be served: answer with this error and close.
    Fatal(u64, ErrorCode, String),
}

/// Why [`read_full`] stopped early.
enum Short {
    /// The stream ended after this many bytes.
    Eof(usize),
    /// The deadline passed.
    Late,
    Io,
}

/// Fill `buf` from `rd` before `deadline`.
async fn read_full<R: AsyncRead + Unpin>(
    rd: &mut R,
    buf: &mut [u8],
    deadline: tokio::time::Instant,
) -> Result<(), Short> {
    let mut got = 0;
    let filled = tokio::time::timeout_at(deadline, async {
        while got < buf.len() {
            match rd.read(&mut buf[got..]).await {
                Ok(0) => return Err(Short::Eof(got)),
                Ok(n) => got += n,
                Err(_) => return Err(Short::Io),
            }
        }
        Ok(())
    })
    .await;
    filled.unwrap_or(Err(Short::Late))
}

/// Read one request frame. The steps and what bounds each:
/// 1. wait up to `idle_timeout` for the frame's first byte (nothing is held meanwhile but the
///    connection's small read buffer);
/// 2. from that byte on, the rest of the frame must arrive within `frame_read_timeout`;
/// 3. the length prefix is checked against `max_frame_bytes`, and the first
///    [`REQUEST_HEAD_LEN`] body bytes (magic, kind, shape) must describe exactly that length:
///    a peer must send a real request head before it can claim any budget;
/// 4. only then is the in-flight budget for the whole body taken, at once (never a part while
///    waiting for the rest, so connections cannot deadlock holding parts of it), waiting at most
///    until the frame deadline;
/// 5. the body buffer is allocated under that budget and filled before the same deadline.
///
/// So a peer that sends a length prefix and stops holds no budget at all, and one that sends a
/// head and stops holds its frame's budget for at most `frame_read_timeout`.
async fn read_request_frame<R: AsyncRead + Unpin>(worker: &Worker, rd: &mut R) -> FrameRead {
    let cfg = &worker.cfg;
    let mut prefix = [0u8; 4];
    let first = match tokio::time::timeout(cfg.idle_timeout, rd.read(&mut prefix)).await {
        Ok(Ok(n)) if n > 0 => n,
        Ok(_) => return FrameRead::End,
        Err(_) => {
            tracing::debug!(idle = ?cfg.idle_timeout, "closing an idle dispatch connection");
            return FrameRead::End;
        }
    };
    let deadline = tokio::time::Instant::now() + cfg.frame_read_timeout;
    let late = |what: String| {
        FrameRead::Fatal(
            0,
            ErrorCode::Malformed,
            format!(
                "{what} did not arrive within {:?} of the frame's first byte (--frame-read-timeout-seconds)",
                cfg.frame_read_timeout
            ),
        )
    };
    match read_full(rd, &mut prefix[first..], deadline).await {
        Ok(()) => {}
        Err(Short::Eof(_)) => {
            return FrameRead::Fatal(
                0,
                ErrorCode::Malformed,
                ReadFrameError::TruncatedPrefix.to_string(),
            )
        }
        Err(Short::Late) => return late("the frame length prefix".into()),
        Err(Short::Io) => return FrameRead::End,
    }
    let len = match check_frame_len(prefix, cfg.max_frame_bytes) {
        Ok(len) => len,
        Err(e) => return FrameRead::Fatal(0, ErrorCode::FrameTooLarge, e.to_string()),
    };
    let truncated = |got: usize| {
        FrameRead::Fatal(
            0,
            ErrorCode::Malformed,
            ReadFrameError::Truncated { got, len }.to_string(),
        )
    };
    let head_len = len.min(REQUEST_HEAD_LEN);
    let mut head = [0u8; REQUEST_HEAD_LEN];
    match read_full(rd, &mut head[..head_len], deadline).await {
        Ok(()) => {}
        Err(Short::Eof(got)) => return truncated(got),
        Err(Short::Late) => return late(format!("the {len}-byte frame body")),
        Err(Short::Io) => return FrameRead::End,
    }
    let head = &head[..head_len];
    let id = peek_request_id(head);
    if let Err(e) = check_request_head(head, len) {
        return FrameRead::Fatal(id, ErrorCode::Malformed, e.to_string());
    }
    let acquire = worker
        .inflight
        .clone()
        .acquire_many_owned(worker.permits_for(len));
    let permits = match tokio::time::timeout_at(deadline, acquire).await {
        Ok(Ok(p)) => p,
        Ok(Err(_)) => return FrameRead::End,
        Err(_) => {
            return FrameRead::Fatal(
                id,
                ErrorCode::Busy,
                format!(
                    "the worker's in-flight budget (--max-inflight-bytes {}) stayed full for {:?}; retry",
                    cfg.max_inflight_bytes, cfg.frame_read_timeout
                ),
            )
        }
    };
    let mut body = vec![0u8; len];
    body[..head_len].copy_from_slice(head);
    match read_full(rd, &mut body[head_len..], deadline).await {
        Ok(()) => FrameRead::Frame(body, permits),
        Err(Short::Eof(got)) => truncated(head_len + got),
        Err(Short::Late) => late(format!("the {len}-byte frame body")),
        Err(Short::Io) => FrameRead::End,
    }
}

/// Serve one connection: frames in, replies out, in order. A frame that cannot be read or decoded
/// gets an error reply and ends the connection.
///
/// What one peer can hold, and for how long (see [`read_request_frame`] for the read side):
/// - a connection slot (`max_connections`) and a 16 KiB read buffer, for at most `idle_timeout`
///   between frames and `frame_read_timeout` within one;
/// - a frame's in-flight budget only from the moment its head has arrived until its reply is
///   written: while its body arrives (at most `frame_read_timeout`), while it computes (work being
///   done), and while its reply is written. The reply (up to twice the request's bytes, in f32) is
///   memory the budget stands for, so the budget is released only after the write, which must
///   finish within `write_timeout`: a client that does not read its replies is disconnected then,
///   and the budget returns to the others.
pub async fn serve_connection(worker: Arc<Worker>, stream: TcpStream) {
    let _ = stream.set_nodelay(true);
    let (rd, mut wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(READ_BUFFER, rd);
    let write_timeout = worker.cfg.write_timeout;
    let fatal: Option<(u64, ErrorCode, String)> = loop {
        let (body, permits) = match read_request_frame(&worker, &mut rd).await {
            FrameRead::End => break None,
            FrameRead::Fatal(id, code, message) => break Some((id, code, message)),
            FrameRead::Frame(body, permits) => (body, permits),
        };
        let req = match decode_request(&body) {
            Ok(r) => r,
            Err(e) => break Some((peek_request_id(&body), ErrorCode::Malformed, e.to_string())),
        };
        drop(body);
        let (id, rank, layer, hidden) = (req.request_id, req.rank, req.layer, req.hidden_size);
        let written = match worker.dispatch(req).await {
            // The outputs go out as they are: the frame's head, then their bytes (no reply copy).
            Ok(out) => {
                let sent = write_output(&mut wr, id, rank, layer, hidden, &out);
                tokio::time::timeout(write_timeout, sent).await
            }
            Err((code, message)) => {
                worker.metrics.count_error(code);
                let frame = encode_error(id, code, &message);
                tokio::time::timeout(write_timeout, wr.write_all(&frame)).await
            }
        };
        match written {
            Ok(Ok(())) => {}
            Ok(Err(_)) => break None,
            Err(_) => {
                tracing::info!(
                    timeout = ?write_timeout,
                    "closing a dispatch connection whose client did not take its reply (--write-timeout-seconds)"
                );
                break None;
            }
        }
        drop(permits);
    };
    if let Some((id, code, message)) = fatal {
        worker.metrics.count_error(code);
        tracing::info!(code = code.as_str(), %message, "closing dispatch connection after a bad frame");
        let _ = tokio::time::timeout(write_timeout, async {
            let _ = wr.write_all(&encode_error(id, code, &message)).await;
            let _ = wr.shutdown().await;
        })
        .await;
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
        let _ = tokio::time::timeout(write_timeout, wr.shutdown()).await;
    }
}
