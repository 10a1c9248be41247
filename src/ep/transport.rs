//! One interface for moving a layer's rows between ranks, whatever carries them.
//!
//! An exchange is two calls around the step's message exchange on the control mesh: `announce`
//! says what each peer must learn about this rank's send rows (carried in the step's message),
//! `deliver` moves every peer's rows into this rank's receive buffer. Rows leave in runs by
//! destination (`send_offsets`) and arrive in runs by source (`recv_offsets`), both `world + 1`
//! prefix sums in rows. The TCP transport carries the rows in the note itself; CUDA IPC carries a
//! memory handle and an offset, and the receiver copies device to device; NCCL carries nothing
//! and moves the rows with grouped send/recv on the rank's stream.

/// A rank's row buffer: host memory or device memory, grown on demand.
pub trait RowBuf: Default + Send {
    /// Makes room for `elems` bf16 values, keeping nothing (every exchange rewrites it).
    fn ensure(&mut self, elems: usize) -> Result<(), TransportError>;
}

impl RowBuf for Vec<u16> {
    fn ensure(&mut self, elems: usize) -> Result<(), TransportError> {
        if self.len() < elems {
            self.resize(elems, 0);
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TransportError {
    #[error("rank {peer}'s note: {what}")]
    Note { peer: usize, what: String },
    #[error("device: {0}")]
    Device(String),
    #[error("nccl: {0}")]
    Nccl(String),
    #[error("{what} did not complete within {after:?}")]
    Timeout {
        what: String,
        after: std::time::Duration,
    },
}

pub trait Transport<R: RowBuf>: Send {
    /// "tcp", "ipc", "nccl".
    fn name(&self) -> &'static str;
    /// Whether the send rows must be complete (device work finished) before `announce`'s notes
    /// leave: the receiver reads them as soon as it has the note.
    fn needs_ready_rows(&self) -> bool;
    /// Per peer (this rank's own entry included), the note to carry in the step's message.
    fn announce(
        &mut self,
        send: &R,
        send_offsets: &[usize],
        row_elems: usize,
    ) -> Result<Vec<Vec<u8>>, TransportError>;
    /// Moves every peer's rows into `recv` (already holding `recv_offsets[world]` rows), given
    /// the notes the peers announced to this rank.
    fn deliver(
        &mut self,
        notes: Vec<Vec<u8>>,
        send: &R,
        send_offsets: &[usize],
        recv: &mut R,
        recv_offsets: &[usize],
        row_elems: usize,
    ) -> Result<(), TransportError>;
}

/// Rows in host memory, carried in the mesh's TCP messages: the CPU workers' transport.
pub struct TcpRows {
    rank: usize,
}

impl TcpRows {
    pub fn new(rank: usize) -> Self {
        Self { rank }
    }
}

impl Transport<Vec<u16>> for TcpRows {
    fn name(&self) -> &'static str {
        "tcp"
    }

    fn needs_ready_rows(&self) -> bool {
        false
    }

    fn announce(
        &mut self,
        send: &Vec<u16>,
        off: &[usize],
        h: usize,
    ) -> Result<Vec<Vec<u8>>, TransportError> {
        Ok((0..off.len() - 1)
            .map(|p| {
                if p == self.rank {
                    return Vec::new();
                }
                let rows = &send[off[p] * h..off[p + 1] * h];
                let mut b = Vec::with_capacity(rows.len() * 2);
                for v in rows {
                    b.extend_from_slice(&v.to_le_bytes());
                }
                b
            })
            .collect())
    }

    fn deliver(
        &mut self,
        notes: Vec<Vec<u8>>,
        send: &Vec<u16>,
        send_off: &[usize],
        recv: &mut Vec<u16>,
        recv_off: &[usize],
        h: usize,
    ) -> Result<(), TransportError> {
        for (p, note) in notes.into_iter().enumerate() {
            let dst = &mut recv[recv_off[p] * h..recv_off[p + 1] * h];
            if p == self.rank {
                dst.copy_from_slice(&send[send_off[p] * h..send_off[p + 1] * h]);
                continue;
            }
            if note.len() != dst.len() * 2 {
                return Err(TransportError::Note {
                    peer: p,
                    what: format!(
                        "{} bytes of rows for {} rows of {h} values",
                        note.len(),
                        recv_off[p + 1] - recv_off[p]
                    ),
                });
            }
            for (d, s) in dst.iter_mut().zip(note.chunks_exact(2)) {
                *d = u16::from_le_bytes([s[0], s[1]]);
            }
        }
        Ok(())
    }
}
