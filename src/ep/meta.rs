//! The per-step messages ranks exchange on the control mesh: a header that keeps every rank on the
//! same step, layer, phase and plan epoch, the dispatched rows' experts and router weights, and
//! the transport's note (IPC handle and offset, or the rows themselves on TCP). Everything decoded
//! here came from the network: lengths are checked before anything is sized by them.

const MAGIC: u32 = 0x4d6f_4550; // "MoEP"

/// Which exchange of a layer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Phase {
    /// Rows to the experts.
    Dispatch = 1,
    /// Outputs back to their sources.
    Combine = 2,
    /// Liveness between steps.
    Heartbeat = 3,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Header {
    pub step: u64,
    pub layer: u32,
    pub phase: Phase,
    /// Which micro-batch of the layer (0, or 0 and 1 when the layer runs as two).
    pub part: u8,
    /// Epoch of the plan this rank routes the step by.
    pub active_epoch: u64,
    /// Newest epoch this rank has loaded and could switch to.
    pub staged_epoch: u64,
}

/// One rank's message to one peer for one exchange.
#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub header: Header,
    /// Dispatch: the experts and router weights of the rows sent to this peer, in send order.
    pub experts: Vec<u32>,
    pub weights: Vec<f32>,
    /// Opaque to this module: what the transport tells the peer.
    pub note: Vec<u8>,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MetaError {
    #[error("message of {0} bytes is shorter than its header")]
    Short(usize),
    #[error("bad magic {0:#x}: not a moe-operator data plane peer")]
    Magic(u32),
    #[error("unknown phase {0}")]
    Phase(u8),
    #[error("message declares {rows} rows and a {note}-byte note but has {len} bytes")]
    Length { rows: u64, note: u64, len: usize },
    #[error("router weight of row {row} is not finite")]
    Weight { row: usize },
}

const HEADER_BYTES: usize = 4 + 8 + 4 + 1 + 1 + 8 + 8 + 4 + 8;

impl Message {
    pub fn encode(&self) -> Vec<u8> {
        let rows = self.experts.len();
        let mut b = Vec::with_capacity(HEADER_BYTES + rows * 8 + self.note.len());
        let h = &self.header;
        b.extend_from_slice(&MAGIC.to_le_bytes());
        b.extend_from_slice(&h.step.to_le_bytes());
        b.extend_from_slice(&h.layer.to_le_bytes());
        b.push(h.phase as u8);
        b.push(h.part);
        b.extend_from_slice(&h.active_epoch.to_le_bytes());
        b.extend_from_slice(&h.staged_epoch.to_le_bytes());
        b.extend_from_slice(&(rows as u32).to_le_bytes());
        b.extend_from_slice(&(self.note.len() as u64).to_le_bytes());
        for &e in &self.experts {
            b.extend_from_slice(&e.to_le_bytes());
        }
        for &w in &self.weights {
            b.extend_from_slice(&w.to_le_bytes());
        }
        b.extend_from_slice(&self.note);
        b
    }

    pub fn decode(b: &[u8]) -> Result<Self, MetaError> {
        if b.len() < HEADER_BYTES {
            return Err(MetaError::Short(b.len()));
        }
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().expect("4 bytes"));
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().expect("8 bytes"));
        let magic = u32_at(0);
        if magic != MAGIC {
            return Err(MetaError::Magic(magic));
        }
        let phase = match b[16] {
            1 => Phase::Dispatch,
            2 => Phase::Combine,
            3 => Phase::Heartbeat,
            p => return Err(MetaError::Phase(p)),
        };
        let header = Header {
            step: u64_at(4),
            layer: u32_at(12),
            phase,
            part: b[17],
            active_epoch: u64_at(18),
            staged_epoch: u64_at(26),
        };
        let rows = u64::from(u32_at(34));
        let note = u64_at(38);
        let body = (b.len() - HEADER_BYTES) as u64;
        if rows.checked_mul(8).and_then(|r| r.checked_add(note)) != Some(body) {
            return Err(MetaError::Length {
                rows,
                note,
                len: b.len(),
            });
        }
        let rows = rows as usize;
        let mut o = HEADER_BYTES;
        let experts: Vec<u32> = (0..rows).map(|i| u32_at(o + 4 * i)).collect();
        o += 4 * rows;
        let weights: Vec<f32> = (0..rows)
            .map(|i| f32::from_bits(u32_at(o + 4 * i)))
            .collect();
        if let Some(row) = weights.iter().position(|w| !w.is_finite()) {
            return Err(MetaError::Weight { row });
        }
        o += 4 * rows;
        Ok(Self {
            header,
            experts,
            weights,
            note: b[o..].to_vec(),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg() -> Message {
        Message {
            header: Header {
                step: 7,
                layer: 3,
                phase: Phase::Dispatch,
                part: 1,
                active_epoch: 2,
                staged_epoch: 3,
            },
            experts: vec![1, 5, 9],
            weights: vec![0.5, 0.25, 0.125],
            note: vec![9, 8, 7, 6],
        }
    }

    #[test]
    fn round_trips() {
        let m = msg();
        assert_eq!(Message::decode(&m.encode()).unwrap(), m);
    }

    #[test]
    fn every_truncation_and_bad_byte_is_an_error_not_a_panic() {
        let b = msg().encode();
        for n in 0..b.len() {
            assert!(Message::decode(&b[..n]).is_err(), "truncated to {n}");
        }
        let mut bad = b.clone();
        bad[0] ^= 1;
        assert!(matches!(Message::decode(&bad), Err(MetaError::Magic(_))));
        let mut bad = b.clone();
        bad[16] = 9;
        assert_eq!(Message::decode(&bad), Err(MetaError::Phase(9)));
        let mut bad = b.clone();
        bad[34..38].copy_from_slice(&u32::MAX.to_le_bytes());
        assert!(matches!(
            Message::decode(&bad),
            Err(MetaError::Length { .. })
        ));
        let mut bad = b;
        let w = HEADER_BYTES + 12;
        bad[w..w + 4].copy_from_slice(&f32::NAN.to_bits().to_le_bytes());
        assert_eq!(Message::decode(&bad), Err(MetaError::Weight { row: 0 }));
    }
}
