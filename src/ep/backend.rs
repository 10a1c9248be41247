//! Where a rank's rows live and its experts compute: host memory and the CPU expert kernels, or
//! device memory and the CUDA ones (`ep::cuda`). The rank's step logic is the same for both.

use std::sync::Arc;

use half::slice::HalfBitsSliceExt;

use super::route::Arrivals;
use super::transport::RowBuf;
use crate::worker::checkpoint::WeightSource;
use crate::worker::compute::{ExpertCompute, ExpertKey, ExpertLoader, RowBatch};
use crate::worker::cpu::CpuLoader;

#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct BackendError(pub String);

pub trait Backend: Send {
    type Rows: RowBuf;
    /// The caller's input rows (`tokens x hidden` bf16).
    type Input<'a>: Copy;
    /// Where the combined outputs go (`tokens x hidden` bf16).
    type Output<'a>;
    /// A resident expert set (one plan epoch's).
    type Experts: Send;

    fn hidden(&self) -> usize;
    /// Called at the start of every entry from the caller's thread (the CUDA backend makes its
    /// context current there).
    fn enter(&mut self) -> Result<(), BackendError> {
        Ok(())
    }
    /// Loads `keys`, reusing what `previous` holds (make-before-break: both stay resident until
    /// the previous set is dropped).
    fn load(
        &mut self,
        keys: &[ExpertKey],
        previous: Option<&Self::Experts>,
    ) -> Result<Self::Experts, BackendError>;
    /// `dst[i] = x[idx[i]]` (rows).
    fn gather_input(
        &mut self,
        x: Self::Input<'_>,
        tokens: usize,
        idx: &[u32],
        dst: &mut Self::Rows,
    ) -> Result<(), BackendError>;
    /// Waits until the rows written so far are complete (device work finished).
    fn ready(&mut self) -> Result<(), BackendError>;
    /// Marks how far the device work enqueued so far goes, as mark `slot` (0 or 1): a layer run
    /// as two micro-batches waits for the first one's outputs while the second computes.
    fn mark(&mut self, _slot: usize) -> Result<(), BackendError> {
        Ok(())
    }
    /// Waits until the work up to mark `slot` is complete.
    fn wait_mark(&mut self, _slot: usize) -> Result<(), BackendError> {
        self.ready()
    }
    /// Tokens `from..to` of an input of `tokens` tokens.
    fn input_rows<'a>(
        &self,
        x: Self::Input<'a>,
        tokens: usize,
        from: usize,
        to: usize,
    ) -> Result<Self::Input<'a>, BackendError>;
    /// An output split at token `at`.
    fn split_output<'a>(
        &self,
        out: Self::Output<'a>,
        at: usize,
    ) -> (Self::Output<'a>, Self::Output<'a>);
    /// For every arrived row `i`, `back[i]` = its router-weighted expert output.
    fn compute(
        &mut self,
        layer: u32,
        experts: &Self::Experts,
        arrivals: &Arrivals,
        recv: &Self::Rows,
        back: &mut Self::Rows,
    ) -> Result<(), BackendError>;
    /// `out[t] = sum over j of back[pos[t * k + j]]`, then waits for it to be written.
    fn combine(
        &mut self,
        back: &Self::Rows,
        pos: &[u32],
        top_k: usize,
        tokens: usize,
        out: Self::Output<'_>,
    ) -> Result<(), BackendError>;
}

/// Host memory and the worker's CPU expert compute.
pub struct HostBackend {
    hidden: usize,
    loader: CpuLoader,
}

impl HostBackend {
    pub fn new(source: Arc<dyn WeightSource>) -> Self {
        Self {
            hidden: source.shape().hidden_size as usize,
            loader: CpuLoader::new(source),
        }
    }
}

impl Backend for HostBackend {
    type Rows = Vec<u16>;
    type Input<'a> = &'a [u16];
    type Output<'a> = &'a mut [u16];
    type Experts = Arc<dyn ExpertCompute>;

    fn hidden(&self) -> usize {
        self.hidden
    }

    fn load(
        &mut self,
        keys: &[ExpertKey],
        previous: Option<&Self::Experts>,
    ) -> Result<Self::Experts, BackendError> {
        self.loader
            .load(keys, previous)
            .map_err(|e| BackendError(format!("{e:#}")))
    }

    fn gather_input(
        &mut self,
        x: &[u16],
        tokens: usize,
        idx: &[u32],
        dst: &mut Vec<u16>,
    ) -> Result<(), BackendError> {
        let h = self.hidden;
        if x.len() != tokens * h {
            return Err(BackendError(format!(
                "input holds {} values, not {tokens} tokens x hidden {h}",
                x.len()
            )));
        }
        dst.clear();
        for &t in idx {
            let t = t as usize;
            dst.extend_from_slice(&x[t * h..(t + 1) * h]);
        }
        Ok(())
    }

    fn ready(&mut self) -> Result<(), BackendError> {
        Ok(())
    }

    fn input_rows<'a>(
        &self,
        x: Self::Input<'a>,
        tokens: usize,
        from: usize,
        to: usize,
    ) -> Result<Self::Input<'a>, BackendError> {
        let h = self.hidden;
        if x.len() != tokens * h || from > to || to > tokens {
            return Err(BackendError(format!(
                "input holds {} values, not {tokens} tokens x hidden {h}",
                x.len()
            )));
        }
        Ok(&x[from * h..to * h])
    }

    fn split_output<'a>(
        &self,
        out: Self::Output<'a>,
        at: usize,
    ) -> (Self::Output<'a>, Self::Output<'a>) {
        let at = (at * self.hidden).min(out.len());
        out.split_at_mut(at)
    }

    fn compute(
        &mut self,
        layer: u32,
        experts: &Self::Experts,
        a: &Arrivals,
        recv: &Vec<u16>,
        back: &mut Vec<u16>,
    ) -> Result<(), BackendError> {
        let h = self.hidden;
        let rows = a.rows();
        back.clear();
        if rows == 0 {
            return Ok(());
        }
        let batch = RowBatch {
            hidden_size: h,
            experts: &a.experts,
            router_weights: &a.weights,
            hidden: recv[..rows * h].reinterpret_cast(),
        };
        let y = experts
            .forward(layer, &batch)
            .map_err(|e| BackendError(e.to_string()))?;
        back.extend(y.iter().map(|&v| half::bf16::from_f32(v).to_bits()));
        Ok(())
    }

    fn combine(
        &mut self,
        back: &Vec<u16>,
        pos: &[u32],
        k: usize,
        tokens: usize,
        out: &mut [u16],
    ) -> Result<(), BackendError> {
        let h = self.hidden;
        if out.len() != tokens * h || pos.len() != tokens * k {
            return Err(BackendError(format!(
                "output holds {} values for {tokens} tokens x hidden {h}",
                out.len()
            )));
        }
        let mut acc = vec![0f32; h];
        for t in 0..tokens {
            acc.iter_mut().for_each(|a| *a = 0.0);
            for &p in &pos[t * k..(t + 1) * k] {
                let row = &back[p as usize * h..(p as usize + 1) * h];
                for (a, &v) in acc.iter_mut().zip(row) {
                    *a += half::bf16::from_bits(v).to_f32();
                }
            }
            for (o, &a) in out[t * h..(t + 1) * h].iter_mut().zip(&acc) {
                *o = half::bf16::from_f32(a).to_bits();
            }
        }
        Ok(())
    }
}
