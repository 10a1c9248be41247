//! One expert-parallel rank: a token source and an expert host. Per MoE layer it routes its
//! tokens, dispatches rows to the ranks holding the chosen replicas, computes its own experts'
//! rows and combines the outputs back, with every rank in lock step (two mesh exchanges a layer).
//!
//! Plan epochs: a new plan is staged (its experts loaded next to the active plan's), every step's
//! messages say what each rank has staged, and when every rank has staged the same newer epoch
//! the whole group switches at the start of the next step. All ranks see the same messages, so all
//! decide alike: no step mixes two plans' routing.

use std::sync::Arc;
use std::time::Instant;

use super::backend::{Backend, BackendError};
use super::mesh::{Mesh, MeshError};
use super::meta::{Header, Message, MetaError, Phase};
use super::route::{offsets, Arrivals, Dispatch, RouteError, Router};
use super::transport::{RowBuf, Transport, TransportError};
use crate::plan::ExpertPlan;
use crate::worker::compute::ExpertKey;

#[derive(Debug, thiserror::Error)]
pub enum EpError {
    #[error("ep rank {rank}: {source}")]
    Mesh {
        rank: usize,
        #[source]
        source: MeshError,
    },
    #[error("ep rank {rank}: rank {peer}'s message: {source}")]
    Meta {
        rank: usize,
        peer: usize,
        #[source]
        source: MetaError,
    },
    #[error("ep rank {rank}: rank {peer} is at {theirs}, this rank at {ours}: the ranks are out of step (every rank must call the same layers in the same order)")]
    OutOfStep {
        rank: usize,
        peer: usize,
        theirs: String,
        ours: String,
    },
    #[error("ep rank {rank}: {source}")]
    Route {
        rank: usize,
        #[source]
        source: RouteError,
    },
    #[error("ep rank {rank}: transport {transport}: {source}")]
    Transport {
        rank: usize,
        transport: &'static str,
        #[source]
        source: TransportError,
    },
    #[error("ep rank {rank}: {what}: {source}")]
    Backend {
        rank: usize,
        what: &'static str,
        #[source]
        source: BackendError,
    },
    #[error("ep rank {rank}: plan: {what}")]
    Plan { rank: usize, what: String },
}

/// A plan with its epoch, router and this rank's resident experts.
struct Epoch<X> {
    epoch: u64,
    plan: Arc<ExpertPlan>,
    router: Router,
    experts: X,
    /// Per planned layer: (model layer, which logical experts this rank holds).
    held: Vec<(u32, Vec<bool>)>,
}

/// Time spent in each part of the steps so far (seconds), for benchmarks and metrics.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Timings {
    pub route: f64,
    pub gather: f64,
    pub exchange: f64,
    pub compute: f64,
    pub combine: f64,
    pub layers: u64,
}

/// Fields drop in order: buffers, transport (IPC mappings) and expert sets before the backend
/// whose device they live on, the mesh last.
pub struct EpRank<B: Backend, T: Transport<B::Rows>> {
    rank: usize,
    world: usize,
    send: B::Rows,
    recv: B::Rows,
    back: B::Rows,
    back_recv: B::Rows,
    transport: T,
    active: Epoch<B::Experts>,
    staged: Option<Epoch<B::Experts>>,
    /// Epoch the group switches to at the next step (decided from the step's first exchange).
    switch_to: Option<u64>,
    step: u64,
    /// Whether the current step's first exchange happened (its staged epochs decide switching).
    decided: bool,
    pub timings: Timings,
    backend: B,
    mesh: Mesh,
}

/// The keys a plan gives `rank`, and per layer which experts it holds.
fn resident(plan: &ExpertPlan, rank: usize) -> (Vec<ExpertKey>, Vec<(u32, Vec<bool>)>) {
    let mut keys = Vec::new();
    let mut held = Vec::new();
    for lp in &plan.layers {
        let mut h = vec![false; plan.model.experts as usize];
        if let Some(slots) = lp.slots.get(rank) {
            for &e in slots {
                if let Some(x) = h.get_mut(e as usize) {
                    if !*x {
                        keys.push((lp.layer, e));
                    }
                    *x = true;
                }
            }
        }
        held.push((lp.layer, h));
    }
    (keys, held)
}

impl<B: Backend, T: Transport<B::Rows>> EpRank<B, T> {
    /// A rank of `mesh`'s group serving `plan` as epoch `epoch` (every rank must start with the
    /// same plan and epoch; the first exchange checks it).
    pub fn new(
        mesh: Mesh,
        mut backend: B,
        transport: T,
        plan: Arc<ExpertPlan>,
        epoch: u64,
    ) -> Result<Self, EpError> {
        let (rank, world) = (mesh.rank(), mesh.world());
        backend.enter().map_err(|source| EpError::Backend {
            rank,
            what: "entering the device",
            source,
        })?;
        let active = Self::epoch_of(&mut backend, rank, world, plan, epoch, None)?;
        Ok(Self {
            rank,
            world,
            mesh,
            backend,
            transport,
            active,
            staged: None,
            switch_to: None,
            step: 0,
            decided: false,
            send: Default::default(),
            recv: Default::default(),
            back: Default::default(),
            back_recv: Default::default(),
            timings: Timings::default(),
        })
    }

    fn epoch_of(
        backend: &mut B,
        rank: usize,
        world: usize,
        plan: Arc<ExpertPlan>,
        epoch: u64,
        previous: Option<&B::Experts>,
    ) -> Result<Epoch<B::Experts>, EpError> {
        if plan.gpus as usize != world {
            return Err(EpError::Plan {
                rank,
                what: format!(
                    "the plan is for {} GPUs, the group has {world} ranks",
                    plan.gpus
                ),
            });
        }
        if plan.model.hidden_size as usize != backend.hidden() {
            return Err(EpError::Plan {
                rank,
                what: format!(
                    "the plan's hidden size {} is not the weights' {}",
                    plan.model.hidden_size,
                    backend.hidden()
                ),
            });
        }
        let (keys, held) = resident(&plan, rank);
        let experts = backend
            .load(&keys, previous)
            .map_err(|source| EpError::Backend {
                rank,
                what: "loading the plan's experts",
                source,
            })?;
        Ok(Epoch {
            epoch,
            router: Router::new(&plan),
            plan,
            experts,
            held,
        })
    }

    pub fn rank(&self) -> usize {
        self.rank
    }

    pub fn world(&self) -> usize {
        self.world
    }

    pub fn step(&self) -> u64 {
        self.step
    }

    pub fn active_epoch(&self) -> u64 {
        self.active.epoch
    }

    pub fn active_plan(&self) -> &Arc<ExpertPlan> {
        &self.active.plan
    }

    pub fn backend(&self) -> &B {
        &self.backend
    }

    /// Loads `plan` as `epoch` next to the active plan; the group switches to it once every
    /// rank has staged it. A newer staged plan replaces an older one not yet switched to.
    pub fn stage(&mut self, plan: Arc<ExpertPlan>, epoch: u64) -> Result<(), EpError> {
        if epoch <= self.active.epoch {
            return Err(EpError::Plan {
                rank: self.rank,
                what: format!(
                    "epoch {epoch} is not newer than the active epoch {}",
                    self.active.epoch
                ),
            });
        }
        self.staged = None;
        let rank = self.rank;
        self.backend.enter().map_err(|source| EpError::Backend {
            rank,
            what: "entering the device",
            source,
        })?;
        let e = Self::epoch_of(
            &mut self.backend,
            self.rank,
            self.world,
            plan,
            epoch,
            Some(&self.active.experts),
        )?;
        self.staged = Some(e);
        Ok(())
    }

    /// Starts a step: switches plan if the group decided so in the previous step.
    pub fn begin_step(&mut self) {
        self.step += 1;
        self.decided = false;
        if let Some(e) = self.switch_to.take() {
            match self.staged.take() {
                Some(s) if s.epoch == e => {
                    tracing::info!(rank = self.rank, step = self.step, epoch = e, plan = %s.plan.short_hash(), "switched plan");
                    // The old epoch's experts are dropped here, after the switch.
                    self.active = s;
                }
                other => self.staged = other,
            }
        }
    }

    fn header(&self, layer: u32, phase: Phase) -> Header {
        Header {
            step: self.step,
            layer,
            phase,
            active_epoch: self.active.epoch,
            staged_epoch: self.staged.as_ref().map_or(self.active.epoch, |s| s.epoch),
        }
    }

    /// Sends one message to every rank and checks that every rank is where this one is.
    fn exchange(&mut self, msgs: Vec<Message>) -> Result<Vec<Message>, EpError> {
        let ours = msgs[self.rank].header;
        let bytes = msgs.iter().map(Message::encode).collect();
        let rank = self.rank;
        let got = self
            .mesh
            .all_to_all(bytes)
            .map_err(|source| EpError::Mesh { rank, source })?;
        let mut out = Vec::with_capacity(self.world);
        let mut staged_min = u64::MAX;
        let mut staged_max = 0;
        for (peer, b) in got.iter().enumerate() {
            let m = Message::decode(b).map_err(|source| EpError::Meta { rank, peer, source })?;
            let h = m.header;
            if (h.step, h.layer, h.phase, h.active_epoch)
                != (ours.step, ours.layer, ours.phase, ours.active_epoch)
            {
                let at = |h: &Header| {
                    format!(
                        "step {} layer {} {:?} under plan epoch {}",
                        h.step, h.layer, h.phase, h.active_epoch
                    )
                };
                return Err(EpError::OutOfStep {
                    rank,
                    peer,
                    theirs: at(&h),
                    ours: at(&ours),
                });
            }
            staged_min = staged_min.min(h.staged_epoch);
            staged_max = staged_max.max(h.staged_epoch);
            out.push(m);
        }
        if !self.decided {
            self.decided = true;
            if staged_min == staged_max && staged_min > self.active.epoch {
                self.switch_to = Some(staged_min);
            }
        }
        Ok(out)
    }

    /// Keeps the group's liveness checked while no step runs (a dead peer ends it with an error
    /// naming the rank). Also lets a staged plan be agreed on between steps.
    pub fn heartbeat(&mut self) -> Result<(), EpError> {
        self.begin_step();
        let h = self.header(u32::MAX, Phase::Heartbeat);
        let msgs = (0..self.world)
            .map(|_| Message {
                header: h,
                experts: vec![],
                weights: vec![],
                note: vec![],
            })
            .collect();
        self.exchange(msgs).map(|_| ())
    }

    /// One MoE layer for this rank's `tokens` tokens: `ids` and `weights` are `tokens x top_k`
    /// (the model's router output); `out` gets the combined expert outputs. The arguments are the
    /// engine's call as it comes (the C ABI passes them one to one).
    #[allow(clippy::too_many_arguments)]
    pub fn forward(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        x: B::Input<'_>,
        ids: &[i64],
        weights: &[f32],
        out: B::Output<'_>,
    ) -> Result<(), EpError> {
        self.open_layer()?;
        let t0 = Instant::now();
        let d = self.route(layer, tokens, top_k, ids, weights)?;
        let send_off = d.offsets();
        let t1 = Instant::now();
        let ready = self.transport.needs_ready_rows();
        self.gather(x, tokens, &d, ready)?;
        let t2 = Instant::now();
        let got = self.dispatch_exchange(layer, &d, &send_off)?;
        let mut notes = Vec::with_capacity(self.world);
        let mut from = Vec::with_capacity(self.world);
        for m in got {
            from.push((m.experts, m.weights));
            notes.push(m.note);
        }
        let held = self
            .active
            .held
            .iter()
            .find(|(l, _)| *l == layer)
            .map_or(&[][..], |(_, h)| h.as_slice());
        let a = Arrivals::build(layer, &from, self.active.plan.model.experts, |e| {
            held.get(e as usize).copied().unwrap_or(false)
        })
        .map_err(|source| EpError::Route {
            rank: self.rank,
            source,
        })?;
        let recv_off = offsets(&a.recv_counts);
        self.deliver_rows(notes, &send_off, &recv_off)?;
        let t3 = Instant::now();
        let h = self.backend.hidden();
        self.back
            .ensure(a.rows() * h)
            .map_err(self.transport_error())?;
        self.backend
            .compute(layer, &self.active.experts, &a, &self.recv, &mut self.back)
            .map_err(self.backend_error("computing the experts"))?;
        if ready {
            self.backend
                .ready()
                .map_err(self.backend_error("finishing the expert outputs"))?;
        }
        let t4 = Instant::now();
        self.combine_exchange(layer, Returned::Outputs, &recv_off, &send_off)?;
        let t5 = Instant::now();
        self.backend
            .combine(&self.back_recv, &d.combine, top_k, tokens, out)
            .map_err(self.backend_error("combining the outputs"))?;
        let t6 = Instant::now();
        let s = |a: Instant, b: Instant| (b - a).as_secs_f64();
        let tm = &mut self.timings;
        tm.route += s(t0, t1);
        tm.gather += s(t1, t2);
        tm.exchange += s(t2, t3) + s(t4, t5);
        tm.compute += s(t3, t4);
        tm.combine += s(t5, t6);
        tm.layers += 1;
        Ok(())
    }

    /// Communication only, for the transport's benchmark: routes a layer, moves its rows to the
    /// experts' ranks and the same rows back (no compute, no combine kernel); returns the bytes
    /// this rank sent in both directions. Every move is waited for, so that its time is its own.
    pub fn dispatch_combine(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        x: B::Input<'_>,
        ids: &[i64],
        weights: &[f32],
    ) -> Result<u64, EpError> {
        self.open_layer()?;
        let d = self.route(layer, tokens, top_k, ids, weights)?;
        let send_off = d.offsets();
        self.gather(x, tokens, &d, true)?;
        let got = self.dispatch_exchange(layer, &d, &send_off)?;
        let recv_counts: Vec<usize> = got.iter().map(|m| m.experts.len()).collect();
        let recv_off = offsets(&recv_counts);
        self.deliver_rows(
            got.into_iter().map(|m| m.note).collect(),
            &send_off,
            &recv_off,
        )?;
        self.backend
            .ready()
            .map_err(self.backend_error("finishing the received rows"))?;
        self.combine_exchange(layer, Returned::Received, &recv_off, &send_off)?;
        self.backend
            .ready()
            .map_err(self.backend_error("finishing the returned rows"))?;
        let h = self.backend.hidden();
        Ok(((d.send_tokens.len() + recv_off[self.world]) * h * 2) as u64)
    }

    fn backend_error(&self, what: &'static str) -> impl FnOnce(BackendError) -> EpError {
        let rank = self.rank;
        move |source| EpError::Backend { rank, what, source }
    }

    fn transport_error(&self) -> impl FnOnce(TransportError) -> EpError {
        let (rank, transport) = (self.rank, self.transport.name());
        move |source| EpError::Transport {
            rank,
            transport,
            source,
        }
    }

    /// Opens the step if none is, and enters the device from the caller's thread.
    fn open_layer(&mut self) -> Result<(), EpError> {
        if self.step == 0 {
            self.begin_step();
        }
        self.backend
            .enter()
            .map_err(self.backend_error("entering the device"))
    }

    /// Routes the layer's tokens by the active plan.
    fn route(
        &mut self,
        layer: u32,
        tokens: usize,
        top_k: usize,
        ids: &[i64],
        weights: &[f32],
    ) -> Result<Dispatch, EpError> {
        Dispatch::build(
            &mut self.active.router,
            layer,
            self.world,
            tokens,
            top_k,
            ids,
            weights,
        )
        .map_err(|source| EpError::Route {
            rank: self.rank,
            source,
        })
    }

    /// Gathers the rows to send into the send buffer; with `ready`, waits until they are there.
    fn gather(
        &mut self,
        x: B::Input<'_>,
        tokens: usize,
        d: &Dispatch,
        ready: bool,
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        self.send
            .ensure(d.send_tokens.len() * h)
            .map_err(self.transport_error())?;
        self.backend
            .gather_input(x, tokens, &d.send_tokens, &mut self.send)
            .map_err(self.backend_error("gathering the rows to send"))?;
        if ready {
            self.backend
                .ready()
                .map_err(self.backend_error("finishing the rows to send"))?;
        }
        Ok(())
    }

    /// The dispatch exchange: each peer gets its rows' experts and router weights and the
    /// transport's note; returns what every rank sent this one.
    fn dispatch_exchange(
        &mut self,
        layer: u32,
        d: &Dispatch,
        send_off: &[usize],
    ) -> Result<Vec<Message>, EpError> {
        let h = self.backend.hidden();
        let notes = self
            .transport
            .announce(&self.send, send_off, h)
            .map_err(self.transport_error())?;
        let hd = self.header(layer, Phase::Dispatch);
        let msgs = notes
            .into_iter()
            .enumerate()
            .map(|(p, note)| Message {
                header: hd,
                experts: d.experts[send_off[p]..send_off[p + 1]].to_vec(),
                weights: d.weights[send_off[p]..send_off[p + 1]].to_vec(),
                note,
            })
            .collect();
        self.exchange(msgs)
    }

    /// Moves every peer's dispatched rows into the receive buffer.
    fn deliver_rows(
        &mut self,
        notes: Vec<Vec<u8>>,
        send_off: &[usize],
        recv_off: &[usize],
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        self.recv
            .ensure(recv_off[self.world] * h)
            .map_err(self.transport_error())?;
        self.transport
            .deliver(notes, &self.send, send_off, &mut self.recv, recv_off, h)
            .map_err(self.transport_error())
    }

    /// The combine exchange: `returned` goes back to its sources in the order it came, into
    /// `back_recv` in send order.
    fn combine_exchange(
        &mut self,
        layer: u32,
        returned: Returned,
        recv_off: &[usize],
        send_off: &[usize],
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        let src = match returned {
            Returned::Outputs => &self.back,
            Returned::Received => &self.recv,
        };
        let notes = self
            .transport
            .announce(src, recv_off, h)
            .map_err(self.transport_error())?;
        let hc = self.header(layer, Phase::Combine);
        let msgs = notes
            .into_iter()
            .map(|note| Message {
                header: hc,
                experts: vec![],
                weights: vec![],
                note,
            })
            .collect();
        let got = self.exchange(msgs)?;
        self.back_recv
            .ensure(send_off[self.world] * h)
            .map_err(self.transport_error())?;
        let src = match returned {
            Returned::Outputs => &self.back,
            Returned::Received => &self.recv,
        };
        self.transport
            .deliver(
                got.into_iter().map(|m| m.note).collect(),
                src,
                recv_off,
                &mut self.back_recv,
                send_off,
                h,
            )
            .map_err(self.transport_error())
    }
}

/// Which of a rank's buffers the combine exchange sends back: the experts' outputs, or (the
/// communication-only benchmark) the rows as they arrived.
#[derive(Clone, Copy)]
enum Returned {
    Outputs,
    Received,
}

#[cfg(test)]
mod tests;
