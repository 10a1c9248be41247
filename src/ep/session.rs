//! The MoE-layer API an engine calls, over the GPU transports: one [`Session`] per rank, built
//! from a [`SessionConfig`] (JSON through the C ABI, `capi/`), taking device pointers and the
//! caller's stream. The C ABI and the Python binding (`python/moe_ep.py`) are thin layers over
//! this; the benchmark's rank processes (`moectl bench ep-rank`) run the same code.

use std::net::{SocketAddr, ToSocketAddrs};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use serde::{Deserialize, Serialize};

use super::cuda::{CudaBackend, DevPtr, IpcTransport, NcclTransport};
use super::mesh::{Mesh, MeshConfig};
use super::rank::{EpError, EpRank, Timings};
use crate::plan::expert_plan::HashRule;
use crate::plan::ExpertPlan;
use crate::worker::checkpoint::synthetic::HashedWeights;
use crate::worker::checkpoint::{Checkpoint, WeightSource};
use crate::worker::cuda::CudaDevice;

/// What a rank needs to join its group (`docs/data-plane.md`).
#[derive(Clone, Debug, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SessionConfig {
    pub rank: usize,
    pub world: usize,
    /// `host:port` of rank 0's rendezvous listener (resolved until the rendezvous timeout).
    pub rendezvous: String,
    /// Where this rank listens (rank 0: default the rendezvous address; others: 127.0.0.1:0).
    #[serde(default)]
    pub listen: Option<String>,
    /// "ipc" (processes of one host, several per GPU allowed) or "nccl" (one rank per GPU).
    pub transport: String,
    /// CUDA device ordinal.
    #[serde(default)]
    pub device: usize,
    /// The plan JSON (an `ExpertPlan`, as in the plan ConfigMap).
    pub plan: PathBuf,
    /// Epoch of that plan (every rank the same).
    #[serde(default = "one")]
    pub epoch: u64,
    /// A checkpoint directory (config.json and safetensors), or none with `synthetic_weights`.
    #[serde(default)]
    pub checkpoint: Option<PathBuf>,
    #[serde(default)]
    pub synthetic_weights: Option<u64>,
    #[serde(default = "two_minutes")]
    pub rendezvous_timeout_s: f64,
    #[serde(default = "two_minutes")]
    pub step_timeout_s: f64,
    /// 1, or 2 to run each layer as two micro-batches whose exchanges overlap the other's
    /// experts (every rank the same; `docs/data-plane.md` says when it pays).
    #[serde(default = "one_usize")]
    pub micro_batches: usize,
}

fn one_usize() -> usize {
    1
}

fn one() -> u64 {
    1
}

fn two_minutes() -> f64 {
    120.0
}

#[derive(Debug, thiserror::Error)]
pub enum SessionError {
    #[error("config: {0}")]
    Config(String),
    #[error("{0}")]
    Setup(String),
    #[error(transparent)]
    Ep(#[from] EpError),
    #[error("device: {0}")]
    Device(String),
}

enum Ranked {
    Ipc(EpRank<CudaBackend, IpcTransport>),
    Nccl(EpRank<CudaBackend, NcclTransport>),
}

macro_rules! with_rank {
    ($s:expr, $r:ident => $e:expr) => {
        match $s {
            Ranked::Ipc($r) => $e,
            Ranked::Nccl($r) => $e,
        }
    };
}

pub struct Session {
    rank: Ranked,
    dev: Arc<CudaDevice>,
    hidden: usize,
    ids: Vec<i64>,
    weights: Vec<f32>,
}

fn resolve(addr: &str, deadline: Instant) -> Result<SocketAddr, SessionError> {
    loop {
        match addr.to_socket_addrs().map(|mut a| a.next()) {
            Ok(Some(a)) => return Ok(a),
            other if Instant::now() >= deadline => {
                return Err(SessionError::Setup(format!(
                    "rendezvous address {addr:?} did not resolve: {other:?}"
                )))
            }
            _ => std::thread::sleep(Duration::from_millis(200)),
        }
    }
}

impl Session {
    pub fn from_json(json: &str) -> Result<Self, SessionError> {
        let cfg: SessionConfig =
            serde_json::from_str(json).map_err(|e| SessionError::Config(e.to_string()))?;
        Self::new(&cfg)
    }

    pub fn new(cfg: &SessionConfig) -> Result<Self, SessionError> {
        let setup = |what: &str| {
            let what = what.to_string();
            move |e: anyhow::Error| SessionError::Setup(format!("{what}: {e:#}"))
        };
        let plan = ExpertPlan::read_file_checked(&cfg.plan, HashRule::Required)
            .map_err(|e| SessionError::Config(format!("plan {}: {e}", cfg.plan.display())))?;
        let source: Arc<dyn WeightSource> = match (&cfg.checkpoint, cfg.synthetic_weights) {
            (Some(dir), None) => Arc::new(
                Checkpoint::open(dir)
                    .map_err(|e| SessionError::Config(format!("checkpoint: {e}")))?,
            ),
            (None, Some(seed)) => Arc::new(HashedWeights::new(plan.model.clone(), seed)),
            _ => {
                return Err(SessionError::Config(
                    "give exactly one of `checkpoint` and `synthetic_weights`".into(),
                ))
            }
        };
        let dev = CudaDevice::new(cfg.device).map_err(setup("opening the device"))?;
        let rdv_timeout = Duration::from_secs_f64(cfg.rendezvous_timeout_s);
        let deadline = Instant::now() + rdv_timeout;
        let rendezvous = resolve(&cfg.rendezvous, deadline)?;
        let listen = match (&cfg.listen, cfg.rank) {
            (Some(l), _) => resolve(l, deadline)?,
            (None, 0) => rendezvous,
            (None, _) => "127.0.0.1:0".parse().expect("addr"),
        };
        let mut mc = MeshConfig::new(cfg.rank, cfg.world, listen, rendezvous);
        mc.rendezvous_timeout = rdv_timeout;
        mc.step_timeout = Duration::from_secs_f64(cfg.step_timeout_s);
        let rank = cfg.rank;
        let mut mesh = Mesh::join(&mc).map_err(|source| EpError::Mesh { rank, source })?;
        let backend = CudaBackend::new(dev.clone(), source);
        let hidden = plan.model.hidden_size as usize;
        let plan = Arc::new(plan);
        if !(1..=2).contains(&cfg.micro_batches) {
            return Err(SessionError::Config(format!(
                "micro_batches {}: give 1 or 2",
                cfg.micro_batches
            )));
        }
        let mut ranked = match cfg.transport.as_str() {
            "ipc" => Ranked::Ipc(EpRank::new(
                mesh,
                backend,
                IpcTransport::new(cfg.rank, cfg.world, &dev),
                plan,
                cfg.epoch,
            )?),
            "nccl" => {
                let t = NcclTransport::new(&mut mesh, &dev, mc.step_timeout).map_err(|source| {
                    EpError::Transport {
                        rank,
                        transport: "nccl",
                        source,
                    }
                })?;
                Ranked::Nccl(EpRank::new(mesh, backend, t, plan, cfg.epoch)?)
            }
            other => {
                return Err(SessionError::Config(format!(
                    "transport {other:?}: the MoE-layer API takes \"ipc\" or \"nccl\" (host TCP is the CPU workers')"
                )))
            }
        };
        with_rank!(&mut ranked, r => r.set_micro_batches(cfg.micro_batches));
        Ok(Self {
            rank: ranked,
            dev,
            hidden,
            ids: Vec::new(),
            weights: Vec::new(),
        })
    }

    pub fn rank(&self) -> usize {
        with_rank!(&self.rank, r => r.rank())
    }

    pub fn world(&self) -> usize {
        with_rank!(&self.rank, r => r.world())
    }

    pub fn hidden(&self) -> usize {
        self.hidden
    }

    pub fn timings(&self) -> Timings {
        with_rank!(&self.rank, r => r.timings)
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    pub fn begin_step(&mut self) {
        with_rank!(&mut self.rank, r => r.begin_step())
    }

    pub fn stage_plan(&mut self, path: &std::path::Path, epoch: u64) -> Result<(), SessionError> {
        let plan = ExpertPlan::read_file_checked(path, HashRule::Required)
            .map_err(|e| SessionError::Config(format!("plan {}: {e}", path.display())))?;
        with_rank!(&mut self.rank, r => r.stage(Arc::new(plan), epoch))?;
        Ok(())
    }

    /// One MoE layer. `x` and `out` are `tokens x hidden` bf16, `ids` `tokens x top_k` i64 and
    /// `weights` `tokens x top_k` f32, all device pointers; `stream` is the caller's stream (null:
    /// the legacy default stream), waited for before reading. Returns with `out` written.
    ///
    /// # Safety
    /// The pointers address device memory of this session's context, of those sizes, and
    /// `stream` is a live stream of that context (or null).
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn forward_device(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        x: u64,
        ids: u64,
        weights: u64,
        out: u64,
        stream: cu::CUstream,
    ) -> Result<(), SessionError> {
        self.dev
            .context()
            .bind_to_thread()
            .map_err(|e| SessionError::Device(format!("{e:?}")))?;
        let n = tokens * top_k;
        self.ids.resize(n, 0);
        self.weights.resize(n, 0.0);
        // SAFETY: waits for the caller's stream, then copies the router output (small) to the
        // host: routing is decided on the host, hidden states stay on the device.
        unsafe {
            let r = cu::cuStreamSynchronize(stream);
            if r != cu::CUresult::CUDA_SUCCESS {
                return Err(SessionError::Device(format!("caller's stream: {r:?}")));
            }
            if n > 0 {
                for (dst, src, bytes) in [
                    (self.ids.as_mut_ptr().cast(), ids, n * 8),
                    (self.weights.as_mut_ptr().cast(), weights, n * 4),
                ] {
                    let r = cu::cuMemcpyDtoH_v2(dst, src, bytes);
                    if r != cu::CUresult::CUDA_SUCCESS {
                        return Err(SessionError::Device(format!("reading top-k: {r:?}")));
                    }
                }
            }
        }
        let (ids, w) = (&self.ids, &self.weights);
        with_rank!(&mut self.rank, r => r.forward(layer, tokens, top_k, DevPtr(x), ids, w, DevPtr(out)))?;
        Ok(())
    }

    /// Communication only (the transport's benchmark): routes and moves the rows of a layer out
    /// and the same rows back, no expert compute.
    pub fn dispatch_combine(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        x: u64,
        ids: &[i64],
        weights: &[f32],
    ) -> Result<u64, SessionError> {
        Ok(
            with_rank!(&mut self.rank, r => r.dispatch_combine(layer, tokens, top_k, DevPtr(x), ids, weights))?,
        )
    }

    /// Forward with the router output already on the host (the benchmark's ranks).
    #[allow(clippy::too_many_arguments)]
    pub fn forward_host_routing(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        x: u64,
        ids: &[i64],
        weights: &[f32],
        out: u64,
    ) -> Result<(), SessionError> {
        with_rank!(&mut self.rank, r => r.forward(layer, tokens, top_k, DevPtr(x), ids, weights, DevPtr(out)))?;
        Ok(())
    }

    /// A barrier with liveness check between steps.
    pub fn heartbeat(&mut self) -> Result<(), SessionError> {
        with_rank!(&mut self.rank, r => r.heartbeat())?;
        Ok(())
    }
}
