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
use super::route::{check_lengths, offsets, Arrivals, Dispatch, RouteError, Router};
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
    /// One set of buffers per micro-batch: peers read a part's rows while the other part's are
    /// written.
    bufs: [Bufs<B::Rows>; 2],
    /// 1, or 2 to run a layer as two micro-batches (see [`EpRank::set_micro_batches`]).
    micro_batches: usize,
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

/// A micro-batch's buffers: its rows to send, the rows that arrived, their outputs, and the
/// outputs of its own rows back from the experts' ranks.
#[derive(Default)]
struct Bufs<R> {
    send: R,
    recv: R,
    back: R,
    back_recv: R,
}

/// One micro-batch of a layer in flight: its routing and where its rows arrived.
struct Part {
    tokens: std::ops::Range<usize>,
    d: Dispatch,
    send_off: Vec<usize>,
    recv_off: Vec<usize>,
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
            bufs: Default::default(),
            micro_batches: 1,
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

    /// Runs each layer of 2 or more tokens as two micro-batches (`n` = 2) or as one (`n` = 1):
    /// with two, one half's exchange on the mesh overlaps the other half's experts on the device.
    /// Every rank of a group must use the same setting (the headers refuse a mix).
    pub fn set_micro_batches(&mut self, n: usize) {
        self.micro_batches = n.clamp(1, 2);
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

    fn header(&self, layer: u32, phase: Phase, part: usize) -> Header {
        Header {
            step: self.step,
            layer,
            phase,
            part: part as u8,
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
            if (h.step, h.layer, h.phase, h.part, h.active_epoch)
                != (
                    ours.step,
                    ours.layer,
                    ours.phase,
                    ours.part,
                    ours.active_epoch,
                )
            {
                let at = |h: &Header| {
                    format!(
                        "step {} layer {} {:?} (micro-batch {}) under plan epoch {}",
                        h.step, h.layer, h.phase, h.part, h.active_epoch
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
        let h = self.header(u32::MAX, Phase::Heartbeat, 0);
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
    ///
    /// With two micro-batches the halves are pipelined: the second half's dispatch exchange runs
    /// on the mesh while the first half's experts run on the device, and the first half's combine
    /// exchange while the second's run.
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
        // Every rank runs the same number of parts, whatever its token count (a rank with no
        // tokens still takes part in every exchange).
        let halves = self.micro_batches > 1;
        if halves {
            check_lengths(tokens, top_k, ids, weights).map_err(|source| EpError::Route {
                rank: self.rank,
                source,
            })?;
        }
        let cuts: Vec<std::ops::Range<usize>> = if halves {
            vec![0..tokens / 2, tokens / 2..tokens]
        } else {
            std::iter::once(0..tokens).collect()
        };
        let mut parts = Vec::with_capacity(cuts.len());
        for r in cuts {
            let (ids, weights) = if halves {
                let c = r.start * top_k..r.end * top_k;
                (&ids[c.clone()], &weights[c])
            } else {
                (ids, weights)
            };
            let d = self.route(layer, r.len(), top_k, ids, weights)?;
            parts.push(Part {
                send_off: d.offsets(),
                d,
                tokens: r,
                recv_off: Vec::new(),
            });
        }
        let t1 = Instant::now();
        let ready = self.transport.needs_ready_rows();
        for (i, p) in parts.iter().enumerate() {
            let xi = if halves {
                self.backend
                    .input_rows(x, tokens, p.tokens.start, p.tokens.end)
                    .map_err(self.backend_error("taking a micro-batch's rows"))?
            } else {
                x
            };
            self.gather(i, xi, p.tokens.len(), &p.d)?;
        }
        if ready {
            self.backend
                .ready()
                .map_err(self.backend_error("finishing the rows to send"))?;
        }
        let t2 = Instant::now();
        let (mut exchange, mut compute, mut combine) = (0.0, 0.0, 0.0);
        let s = |a: Instant| a.elapsed().as_secs_f64();
        for (i, p) in parts.iter_mut().enumerate() {
            let t = Instant::now();
            let a = self.dispatch_and_deliver(layer, i, p)?;
            exchange += s(t);
            let t = Instant::now();
            let h = self.backend.hidden();
            let te = self.transport_error();
            let b = &mut self.bufs[i];
            b.back.ensure(a.rows() * h).map_err(te)?;
            self.backend
                .compute(layer, &self.active.experts, &a, &b.recv, &mut b.back)
                .map_err(self.backend_error("computing the experts"))?;
            if halves {
                self.backend
                    .mark(i)
                    .map_err(self.backend_error("marking the expert outputs"))?;
            }
            compute += s(t);
        }
        let outs = if halves {
            let (a, b) = self.backend.split_output(out, parts[0].tokens.len());
            vec![a, b]
        } else {
            vec![out]
        };
        for (i, (p, o)) in parts.iter().zip(outs).enumerate() {
            let t = Instant::now();
            if ready {
                let r = if halves {
                    self.backend.wait_mark(i)
                } else {
                    self.backend.ready()
                };
                r.map_err(self.backend_error("finishing the expert outputs"))?;
            }
            compute += s(t);
            let t = Instant::now();
            self.combine_exchange(layer, i, Returned::Outputs, &p.recv_off, &p.send_off)?;
            exchange += s(t);
            let t = Instant::now();
            self.backend
                .combine(
                    &self.bufs[i].back_recv,
                    &p.d.combine,
                    top_k,
                    p.tokens.len(),
                    o,
                )
                .map_err(self.backend_error("combining the outputs"))?;
            combine += s(t);
        }
        let tm = &mut self.timings;
        tm.route += (t1 - t0).as_secs_f64();
        tm.gather += (t2 - t1).as_secs_f64();
        tm.exchange += exchange;
        tm.compute += compute;
        tm.combine += combine;
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
        self.gather(0, x, tokens, &d)?;
        self.backend
            .ready()
            .map_err(self.backend_error("finishing the rows to send"))?;
        let got = self.dispatch_exchange(layer, 0, &d, &send_off)?;
        let recv_counts: Vec<usize> = got.iter().map(|m| m.experts.len()).collect();
        let recv_off = offsets(&recv_counts);
        self.deliver_rows(
            0,
            got.into_iter().map(|m| m.note).collect(),
            &send_off,
            &recv_off,
        )?;
        self.backend
            .ready()
            .map_err(self.backend_error("finishing the received rows"))?;
        self.combine_exchange(layer, 0, Returned::Received, &recv_off, &send_off)?;
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

    /// Gathers micro-batch `part`'s rows to send into its send buffer (enqueued; the caller
    /// waits when the transport needs the rows complete).
    fn gather(
        &mut self,
        part: usize,
        x: B::Input<'_>,
        tokens: usize,
        d: &Dispatch,
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        let te = self.transport_error();
        let send = &mut self.bufs[part].send;
        send.ensure(d.send_tokens.len() * h).map_err(te)?;
        self.backend
            .gather_input(x, tokens, &d.send_tokens, send)
            .map_err(self.backend_error("gathering the rows to send"))
    }

    /// A micro-batch's dispatch exchange, then its rows moved into its receive buffer; returns
    /// where they arrived (and fills the part's receive offsets).
    fn dispatch_and_deliver(
        &mut self,
        layer: u32,
        part: usize,
        p: &mut Part,
    ) -> Result<Arrivals, EpError> {
        let got = self.dispatch_exchange(layer, part, &p.d, &p.send_off)?;
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
        p.recv_off = offsets(&a.recv_counts);
        self.deliver_rows(part, notes, &p.send_off, &p.recv_off)?;
        Ok(a)
    }

    /// The dispatch exchange: each peer gets its rows' experts and router weights and the
    /// transport's note; returns what every rank sent this one.
    fn dispatch_exchange(
        &mut self,
        layer: u32,
        part: usize,
        d: &Dispatch,
        send_off: &[usize],
    ) -> Result<Vec<Message>, EpError> {
        let h = self.backend.hidden();
        let notes = self
            .transport
            .announce(&self.bufs[part].send, send_off, h)
            .map_err(self.transport_error())?;
        let hd = self.header(layer, Phase::Dispatch, part);
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

    /// Moves every peer's dispatched rows into the part's receive buffer.
    fn deliver_rows(
        &mut self,
        part: usize,
        notes: Vec<Vec<u8>>,
        send_off: &[usize],
        recv_off: &[usize],
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        let te = self.transport_error();
        let b = &mut self.bufs[part];
        b.recv.ensure(recv_off[self.world] * h).map_err(te)?;
        self.transport
            .deliver(notes, &b.send, send_off, &mut b.recv, recv_off, h)
            .map_err(self.transport_error())
    }

    /// The combine exchange: `returned` goes back to its sources in the order it came, into
    /// the part's `back_recv` in send order.
    fn combine_exchange(
        &mut self,
        layer: u32,
        part: usize,
        returned: Returned,
        recv_off: &[usize],
        send_off: &[usize],
    ) -> Result<(), EpError> {
        let h = self.backend.hidden();
        let notes = {
            let b = &self.bufs[part];
            let src = match returned {
                Returned::Outputs => &b.back,
                Returned::Received => &b.recv,
            };
            self.transport
                .announce(src, recv_off, h)
                .map_err(self.transport_error())?
        };
        let hc = self.header(layer, Phase::Combine, part);
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
        let te = self.transport_error();
        let b = &mut self.bufs[part];
        b.back_recv.ensure(send_off[self.world] * h).map_err(te)?;
        let src = match returned {
            Returned::Outputs => &b.back,
            Returned::Received => &b.recv,
        };
        self.transport
            .deliver(
                got.into_iter().map(|m| m.note).collect(),
                src,
                recv_off,
                &mut b.back_recv,
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
