//! The GPU side of the data plane: row buffers in device memory (plain `cuMemAlloc`, so CUDA IPC
//! can export them), the CUDA backend (gather, grouped-GEMM experts, combine, all on the device's
//! stream) and the two GPU transports: CUDA IPC between processes of one host, several on one GPU
//! included, and NCCL grouped send/recv. Hidden states never pass through host memory; the host
//! only uploads small index arrays (row orders) and router weights.
//!
//! Everything here loads the CUDA driver and libnccl at run time; it builds without CUDA and is
//! tested on the GPU machine (`ep::cuda::tests`, ignored elsewhere).

use std::cell::Cell;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use cudarc::driver::sys as cu;
use cudarc::nccl::sys as nccl;

use super::backend::{Backend, BackendError};
use super::mesh::Mesh;
use super::route::Arrivals;
use super::transport::{RowBuf, Transport, TransportError};
use crate::worker::checkpoint::WeightSource;
use crate::worker::compute::ExpertKey;
use crate::worker::cuda::{CudaDevice, CudaExperts, CudaLoader, Rows};

fn check(r: cu::CUresult, what: &str) -> Result<(), String> {
    if r == cu::CUresult::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(format!("{what}: {r:?}"))
    }
}

/// Device memory for rows or index arrays, grown on demand.
pub struct DevRows {
    ptr: u64,
    cap: usize,
    /// The IPC export of the allocation holding `ptr`: (its handle, `ptr`'s offset in it).
    ipc: Cell<Option<(cu::CUipcMemHandle, u64)>>,
    ctx: cu::CUcontext,
}

// SAFETY: the buffer is plain device memory; the context handle is only used to free it.
unsafe impl Send for DevRows {}

impl Default for DevRows {
    fn default() -> Self {
        Self {
            ptr: 0,
            cap: 0,
            ipc: Cell::new(None),
            ctx: std::ptr::null_mut(),
        }
    }
}

impl DevRows {
    pub fn ptr(&self) -> u64 {
        self.ptr
    }

    /// Makes room for `bytes` (in the calling thread's current context), keeping nothing.
    pub fn ensure_bytes(&mut self, bytes: usize) -> Result<(), String> {
        if bytes <= self.cap {
            return Ok(());
        }
        self.free();
        // Whole 2 MiB units: the driver packs smaller allocations together, and a peer cannot
        // map two IPC exports that share one underlying allocation (CUDA_ERROR_ALREADY_MAPPED).
        let want = bytes.max(self.cap * 2).next_multiple_of(2 << 20);
        let mut p = 0;
        // SAFETY: plain allocation in the current context; freed in `free`.
        check(unsafe { cu::cuMemAlloc_v2(&mut p, want) }, "cuMemAlloc")?;
        let mut ctx = std::ptr::null_mut();
        // SAFETY: reads the current context handle.
        check(unsafe { cu::cuCtxGetCurrent(&mut ctx) }, "cuCtxGetCurrent")?;
        self.ptr = p;
        self.cap = want;
        self.ctx = ctx;
        Ok(())
    }

    /// Uploads `data` (stream-ordered; pageable memory is staged before this returns).
    fn upload<T: Copy>(&mut self, data: &[T], stream: cu::CUstream) -> Result<(), String> {
        let bytes = std::mem::size_of_val(data);
        self.ensure_bytes(bytes)?;
        if bytes == 0 {
            return Ok(());
        }
        // SAFETY: the buffer holds `bytes`; `data` is live for the call (pageable: staged).
        check(
            unsafe { cu::cuMemcpyHtoDAsync_v2(self.ptr, data.as_ptr().cast(), bytes, stream) },
            "upload",
        )
    }

    /// The IPC export of this buffer, made once per allocation: the driver may place small
    /// allocations inside one larger one, and a handle names that whole allocation, so peers get
    /// the handle of the base and this buffer's offset in it (mapping it once however many of
    /// this rank's buffers it holds).
    fn ipc_export(&self) -> Result<(cu::CUipcMemHandle, u64), String> {
        if let Some(e) = self.ipc.get() {
            return Ok(e);
        }
        let (mut base, mut size) = (0, 0);
        // SAFETY: queries the allocation holding our pointer.
        check(
            unsafe { cu::cuMemGetAddressRange_v2(&mut base, &mut size, self.ptr) },
            "cuMemGetAddressRange",
        )?;
        let mut h = cu::CUipcMemHandle { reserved: [0; 64] };
        // SAFETY: `base` is the base of a cuMemAlloc allocation of this process.
        check(
            unsafe { cu::cuIpcGetMemHandle(&mut h, base) },
            "cuIpcGetMemHandle",
        )?;
        let e = (h, self.ptr - base);
        self.ipc.set(Some(e));
        Ok(e)
    }

    fn free(&mut self) {
        if self.ptr != 0 {
            // SAFETY: frees our own allocation in the context it was made in.
            unsafe {
                cu::cuCtxSetCurrent(self.ctx);
                cu::cuMemFree_v2(self.ptr);
            }
        }
        self.ptr = 0;
        self.cap = 0;
        self.ipc.set(None);
    }
}

impl Drop for DevRows {
    fn drop(&mut self) {
        self.free();
    }
}

impl RowBuf for DevRows {
    fn ensure(&mut self, elems: usize) -> Result<(), TransportError> {
        self.ensure_bytes(elems * 2).map_err(TransportError::Device)
    }
}

/// The caller's rows on the device: `tokens x hidden` bf16 at `ptr`.
#[derive(Clone, Copy, Debug)]
pub struct DevPtr(pub u64);

pub struct CudaBackend {
    dev: Arc<CudaDevice>,
    loader: CudaLoader,
    hidden: usize,
    xs: DevRows,
    idx: [DevRows; 4],
    marks: Marks,
}

/// The two micro-batches' events (created on first use).
struct Marks([cu::CUevent; 2]);

// SAFETY: the events belong to the rank's context and are used from the thread that holds it.
unsafe impl Send for Marks {}

impl Drop for CudaBackend {
    fn drop(&mut self) {
        let _ = self.dev.context().bind_to_thread();
        for e in self.marks.0 {
            if !e.is_null() {
                // SAFETY: created by cuEventCreate in this context, destroyed once.
                unsafe { cu::cuEventDestroy_v2(e) };
            }
        }
    }
}

impl CudaBackend {
    pub fn new(dev: Arc<CudaDevice>, source: Arc<dyn WeightSource>) -> Self {
        Self {
            hidden: source.shape().hidden_size as usize,
            loader: CudaLoader::new(dev.clone(), source),
            dev,
            xs: DevRows::default(),
            idx: Default::default(),
            marks: Marks([std::ptr::null_mut(); 2]),
        }
    }

    pub fn device(&self) -> &Arc<CudaDevice> {
        &self.dev
    }

    fn stream(&self) -> cu::CUstream {
        self.dev.stream().cu_stream()
    }
}

fn be(e: impl std::fmt::Display) -> BackendError {
    BackendError(e.to_string())
}

impl Backend for CudaBackend {
    type Rows = DevRows;
    type Input<'a> = DevPtr;
    type Output<'a> = DevPtr;
    type Experts = CudaExperts;

    fn hidden(&self) -> usize {
        self.hidden
    }

    fn enter(&mut self) -> Result<(), BackendError> {
        self.dev
            .context()
            .bind_to_thread()
            .map_err(|e| be(format!("{e:?}")))
    }

    fn load(
        &mut self,
        keys: &[ExpertKey],
        previous: Option<&CudaExperts>,
    ) -> Result<CudaExperts, BackendError> {
        let prev = previous.map(|p| {
            use crate::worker::compute::ExpertCompute;
            p.resident()
        });
        self.loader
            .load_set(keys, prev.as_deref().unwrap_or_default())
            .map_err(|e| be(format!("{e:#}")))
    }

    fn gather_input(
        &mut self,
        x: DevPtr,
        _tokens: usize,
        idx: &[u32],
        dst: &mut DevRows,
    ) -> Result<(), BackendError> {
        let st = self.stream();
        self.idx[0].upload(idx, st).map_err(be)?;
        self.dev
            .gather_rows(x.0, self.idx[0].ptr(), dst.ptr(), idx.len(), self.hidden)
            .map_err(be)
    }

    fn ready(&mut self) -> Result<(), BackendError> {
        self.dev
            .stream()
            .synchronize()
            .map_err(|e| be(format!("{e:?}")))
    }

    fn mark(&mut self, slot: usize) -> Result<(), BackendError> {
        let e = &mut self.marks.0[slot];
        if e.is_null() {
            // SAFETY: creates an event in the current context (entered by the caller).
            let r =
                unsafe { cu::cuEventCreate(e, cu::CUevent_flags::CU_EVENT_DISABLE_TIMING as u32) };
            check(r, "creating a micro-batch event").map_err(be)?;
        }
        // SAFETY: records our event on our stream.
        let r = unsafe { cu::cuEventRecord(*e, self.stream()) };
        check(r, "recording a micro-batch event").map_err(be)
    }

    fn wait_mark(&mut self, slot: usize) -> Result<(), BackendError> {
        let e = self.marks.0[slot];
        if e.is_null() {
            return self.ready();
        }
        // SAFETY: waits on an event recorded on our stream.
        let r = unsafe { cu::cuEventSynchronize(e) };
        check(r, "waiting for a micro-batch").map_err(be)
    }

    fn input_rows<'a>(
        &self,
        x: Self::Input<'a>,
        _tokens: usize,
        from: usize,
        _to: usize,
    ) -> Result<Self::Input<'a>, BackendError> {
        Ok(DevPtr(x.0 + (from * self.hidden * 2) as u64))
    }

    fn split_output<'a>(
        &self,
        out: Self::Output<'a>,
        at: usize,
    ) -> (Self::Output<'a>, Self::Output<'a>) {
        (out, DevPtr(out.0 + (at * self.hidden * 2) as u64))
    }

    fn compute(
        &mut self,
        layer: u32,
        experts: &CudaExperts,
        a: &Arrivals,
        recv: &DevRows,
        back: &mut DevRows,
    ) -> Result<(), BackendError> {
        let rows = a.rows();
        if rows == 0 {
            return Ok(());
        }
        let h = self.hidden;
        let st = self.stream();
        let dev = self.dev.clone();
        dev.exclusive(|| {
            self.xs.ensure_bytes(rows * h * 2).map_err(be)?;
            self.idx[1].upload(&a.gather, st).map_err(be)?;
            dev.gather_rows(recv.ptr(), self.idx[1].ptr(), self.xs.ptr(), rows, h)
                .map_err(be)?;
            let (ids, counts): (Vec<u32>, Vec<usize>) = a.groups.iter().copied().unzip();
            let p = experts
                .prepare_input(
                    layer,
                    &ids,
                    &counts,
                    Rows::Device {
                        ptr: self.xs.ptr(),
                        elems: rows * h,
                    },
                    &a.group_weights,
                )
                .map_err(be)?;
            experts.enqueue(&p).map_err(be)?;
            self.idx[2].upload(&a.scatter, st).map_err(be)?;
            dev.gather_rows(experts.output_ptr(), self.idx[2].ptr(), back.ptr(), rows, h)
                .map_err(be)
        })
    }

    fn combine(
        &mut self,
        back: &DevRows,
        pos: &[u32],
        k: usize,
        tokens: usize,
        out: DevPtr,
    ) -> Result<(), BackendError> {
        let st = self.stream();
        self.idx[3].upload(pos, st).map_err(be)?;
        self.dev
            .combine_rows(back.ptr(), self.idx[3].ptr(), k, out.0, tokens, self.hidden)
            .map_err(be)?;
        self.ready()
    }
}

/// CUDA IPC: each rank exports its send buffer; a receiver copies its rows out of every peer's
/// buffer device to device (a pull), on its own stream.
pub struct IpcTransport {
    rank: usize,
    stream: cu::CUstream,
    /// (peer, IPC handle) -> our mapping of that memory. The handle names the driver's memory
    /// object, which the driver reuses for a later allocation after a free, and CUDA refuses to
    /// map one object twice: so mappings are keyed by the handle and kept until this transport
    /// drops (a peer's buffers only grow, doubling, so there are few).
    opened: HashMap<(usize, [u8; 64]), u64>,
}

// SAFETY: the stream handle belongs to the rank's device, used from the rank's thread only.
unsafe impl Send for IpcTransport {}

/// handle, offset of the rows in the handle's memory, bytes.
const IPC_NOTE: usize = 64 + 8 + 8;

impl IpcTransport {
    pub fn new(rank: usize, _world: usize, dev: &CudaDevice) -> Self {
        Self {
            rank,
            stream: dev.stream().cu_stream(),
            opened: HashMap::new(),
        }
    }
}

impl Drop for IpcTransport {
    fn drop(&mut self) {
        for (_, base) in self.opened.drain() {
            // SAFETY: a mapping this transport opened.
            unsafe { cu::cuIpcCloseMemHandle(base) };
        }
    }
}

impl Transport<DevRows> for IpcTransport {
    fn name(&self) -> &'static str {
        "ipc"
    }

    fn needs_ready_rows(&self) -> bool {
        true
    }

    fn announce(
        &mut self,
        send: &DevRows,
        off: &[usize],
        h: usize,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        let total = off[off.len() - 1];
        let (handle, at) = if total > 0 {
            let (hd, at) = send.ipc_export().map_err(TransportError::Device)?;
            (hd.reserved, at)
        } else {
            ([0; 64], 0)
        };
        Ok((0..off.len() - 1)
            .map(|p| {
                let mut b = Vec::with_capacity(IPC_NOTE);
                b.extend(handle.iter().map(|&c| c as u8));
                b.extend_from_slice(&(at + (off[p] * h * 2) as u64).to_le_bytes());
                b.extend_from_slice(&(((off[p + 1] - off[p]) * h * 2) as u64).to_le_bytes());
                b
            })
            .collect())
    }

    fn deliver(
        &mut self,
        notes: Vec<Vec<u8>>,
        send: &DevRows,
        send_off: &[usize],
        recv: &mut DevRows,
        recv_off: &[usize],
        h: usize,
    ) -> Result<(), TransportError> {
        for (p, note) in notes.iter().enumerate() {
            let bytes = (recv_off[p + 1] - recv_off[p]) * h * 2;
            let dst = recv.ptr() + (recv_off[p] * h * 2) as u64;
            if bytes == 0 {
                continue;
            }
            let src = if p == self.rank {
                send.ptr() + (send_off[p] * h * 2) as u64
            } else {
                let bad = |what: String| TransportError::Note { peer: p, what };
                if note.len() != IPC_NOTE {
                    return Err(bad(format!("{} bytes, not {IPC_NOTE}", note.len())));
                }
                let u64_at = |o: usize| u64::from_le_bytes(note[o..o + 8].try_into().expect("8"));
                let (offset, len) = (u64_at(64), u64_at(72));
                if len != bytes as u64 {
                    return Err(bad(format!("{len} bytes of rows, {bytes} expected")));
                }
                let id: [u8; 64] = note[..64].try_into().expect("64");
                let base = match self.opened.entry((p, id)) {
                    std::collections::hash_map::Entry::Occupied(o) => *o.get(),
                    std::collections::hash_map::Entry::Vacant(v) => {
                        let mut handle = cu::CUipcMemHandle { reserved: [0; 64] };
                        for (d, &s) in handle.reserved.iter_mut().zip(&id) {
                            *d = s as _;
                        }
                        let mut base = 0;
                        // SAFETY: the handle came from the peer's cuIpcGetMemHandle.
                        let r = unsafe {
                            cu::cuIpcOpenMemHandle_v2(
                                &mut base,
                                handle,
                                cu::CUipcMem_flags::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS as u32,
                            )
                        };
                        check(r, &format!("opening rank {p}'s IPC handle"))
                            .map_err(TransportError::Device)?;
                        *v.insert(base)
                    }
                };
                base + offset
            };
            // SAFETY: both ranges were sized by their owners for these rows; the peer's rows
            // are complete (it synchronised before announcing) and stay until it hears back.
            let r = unsafe { cu::cuMemcpyDtoDAsync_v2(dst, src, bytes, self.stream) };
            check(r, &format!("copying rank {p}'s rows")).map_err(TransportError::Device)?;
        }
        Ok(())
    }
}

/// NCCL: grouped send/recv on the rank's stream; one rank per GPU (NCCL refuses two ranks of a
/// communicator on one device).
pub struct NcclTransport {
    comm: nccl::ncclComm_t,
    stream: cu::CUstream,
    timeout: Duration,
}

// SAFETY: the communicator is used from the rank's thread only.
unsafe impl Send for NcclTransport {}

fn nccl_ok(r: nccl::ncclResult_t, what: &str) -> Result<(), TransportError> {
    if r == nccl::ncclResult_t::ncclSuccess || r == nccl::ncclResult_t::ncclInProgress {
        Ok(())
    } else {
        Err(TransportError::Nccl(format!("{what}: {r:?}")))
    }
}

impl NcclTransport {
    /// Bootstraps the communicator: rank 0's unique id travels on the control mesh.
    pub fn new(
        mesh: &mut Mesh,
        dev: &CudaDevice,
        timeout: Duration,
    ) -> Result<Self, TransportError> {
        let (rank, world) = (mesh.rank(), mesh.world());
        dev.context()
            .bind_to_thread()
            .map_err(|e| TransportError::Device(format!("{e:?}")))?;
        let mut id = nccl::ncclUniqueId { internal: [0; 128] };
        if rank == 0 {
            // SAFETY: writes the id.
            nccl_ok(unsafe { nccl::ncclGetUniqueId(&mut id) }, "ncclGetUniqueId")?;
        }
        let mine: Vec<u8> = id.internal.iter().map(|&c| c as u8).collect();
        let got = mesh
            .all_to_all(
                (0..world)
                    .map(|_| if rank == 0 { mine.clone() } else { vec![] })
                    .collect(),
            )
            .map_err(|e| TransportError::Nccl(format!("sharing the unique id: {e}")))?;
        if got[0].len() != 128 {
            return Err(TransportError::Nccl(format!(
                "rank 0 sent a {}-byte unique id",
                got[0].len()
            )));
        }
        for (d, &s) in id.internal.iter_mut().zip(&got[0]) {
            *d = s as _;
        }
        let mut comm = std::ptr::null_mut();
        // SAFETY: every rank calls this with the same id and world.
        nccl_ok(
            unsafe { nccl::ncclCommInitRank(&mut comm, world as i32, id, rank as i32) },
            "ncclCommInitRank",
        )?;
        Ok(Self {
            comm,
            stream: dev.stream().cu_stream(),
            timeout,
        })
    }

    /// Waits for the stream with a deadline, checking NCCL's asynchronous errors; aborts the
    /// communicator on either (a hung peer must not hang this rank).
    fn wait(&mut self, what: &str) -> Result<(), TransportError> {
        let start = Instant::now();
        loop {
            // SAFETY: queries our stream.
            let r = unsafe { cu::cuStreamQuery(self.stream) };
            if r == cu::CUresult::CUDA_SUCCESS {
                return Ok(());
            }
            if r != cu::CUresult::CUDA_ERROR_NOT_READY {
                return Err(TransportError::Device(format!("{what}: {r:?}")));
            }
            let mut err = nccl::ncclResult_t::ncclSuccess;
            // SAFETY: reads the communicator's state.
            unsafe { nccl::ncclCommGetAsyncError(self.comm, &mut err) };
            if err != nccl::ncclResult_t::ncclSuccess && err != nccl::ncclResult_t::ncclInProgress {
                unsafe { nccl::ncclCommAbort(self.comm) };
                self.comm = std::ptr::null_mut();
                return Err(TransportError::Nccl(format!("{what}: {err:?}")));
            }
            if start.elapsed() > self.timeout {
                unsafe { nccl::ncclCommAbort(self.comm) };
                self.comm = std::ptr::null_mut();
                return Err(TransportError::Timeout {
                    what: what.into(),
                    after: self.timeout,
                });
            }
            std::hint::spin_loop();
        }
    }
}

impl Drop for NcclTransport {
    fn drop(&mut self) {
        if !self.comm.is_null() {
            // SAFETY: our communicator, not used after this.
            unsafe { nccl::ncclCommDestroy(self.comm) };
        }
    }
}

impl Transport<DevRows> for NcclTransport {
    fn name(&self) -> &'static str {
        "nccl"
    }

    fn needs_ready_rows(&self) -> bool {
        false
    }

    fn announce(
        &mut self,
        _send: &DevRows,
        off: &[usize],
        _h: usize,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        Ok(vec![Vec::new(); off.len() - 1])
    }

    fn deliver(
        &mut self,
        _notes: Vec<Vec<u8>>,
        send: &DevRows,
        send_off: &[usize],
        recv: &mut DevRows,
        recv_off: &[usize],
        h: usize,
    ) -> Result<(), TransportError> {
        if self.comm.is_null() {
            return Err(TransportError::Nccl("the communicator was aborted".into()));
        }
        let st = self.stream as nccl::cudaStream_t;
        let u8t = nccl::ncclDataType_t::ncclUint8;
        // SAFETY: group of send/recv over ranges the rank sized; stream-ordered after the gather.
        unsafe {
            nccl_ok(nccl::ncclGroupStart(), "ncclGroupStart")?;
            for p in 0..send_off.len() - 1 {
                let s = (send_off[p + 1] - send_off[p]) * h * 2;
                if s > 0 {
                    let ptr = (send.ptr() + (send_off[p] * h * 2) as u64) as *const _;
                    nccl_ok(
                        nccl::ncclSend(ptr, s, u8t, p as i32, self.comm, st),
                        "ncclSend",
                    )?;
                }
                let r = (recv_off[p + 1] - recv_off[p]) * h * 2;
                if r > 0 {
                    let ptr = (recv.ptr() + (recv_off[p] * h * 2) as u64) as *mut _;
                    nccl_ok(
                        nccl::ncclRecv(ptr, r, u8t, p as i32, self.comm, st),
                        "ncclRecv",
                    )?;
                }
            }
            nccl_ok(nccl::ncclGroupEnd(), "ncclGroupEnd")?;
        }
        self.wait("grouped send/recv")
    }
}

#[cfg(test)]
mod tests;
