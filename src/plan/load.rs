//! Per-expert token counts over a window of batches, and the parsers for the formats we read.

use serde::{Deserialize, Serialize};

use super::limits::MAX_TOKEN_COUNT;
use super::model::ShapeError;

/// Why counts do not make a [`LoadWindow`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WindowError {
    #[error("a load window needs at least one MoE layer and one expert")]
    Empty { layers: usize, experts: usize },
    #[error("{layers} layers x {experts} experts per batch overflows")]
    Overflow { layers: usize, experts: usize },
    #[error("{counts} counts do not fill whole batches of {layers} layers x {experts} experts")]
    PartialBatch {
        counts: usize,
        layers: usize,
        experts: usize,
    },
    /// `layer` is the model layer id.
    #[error(
        "batch {batch}, layer {layer}, expert {expert}: count {count} is not a finite number in \
         0..={max:e} (plan::limits::MAX_TOKEN_COUNT)",
        max = MAX_TOKEN_COUNT
    )]
    BadCount {
        batch: usize,
        layer: u32,
        expert: usize,
        count: f64,
    },
}

/// Token counts `W[b][l][e]`: tokens routed to expert `e` of MoE layer `l` in batch `b`.
/// An aggregate-only input (no batch axis) is a window with one batch.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LoadWindow {
    /// Model layer index of each MoE layer in the window.
    layer_ids: Vec<u32>,
    experts: usize,
    batches: usize,
    /// Batch-major: `counts[(b * layers + l) * experts + e]`.
    counts: Vec<f64>,
}

impl LoadWindow {
    /// Build a window from batch-major counts. Every count must be finite, non-negative and at most
    /// [`MAX_TOKEN_COUNT`], so that every sum over a window (and every plan's totals) stays finite.
    pub fn new(layer_ids: Vec<u32>, experts: usize, counts: Vec<f64>) -> Result<Self, WindowError> {
        let layers = layer_ids.len();
        if layers == 0 || experts == 0 {
            return Err(WindowError::Empty { layers, experts });
        }
        let per_batch = layers
            .checked_mul(experts)
            .ok_or(WindowError::Overflow { layers, experts })?;
        if counts.is_empty() || !counts.len().is_multiple_of(per_batch) {
            return Err(WindowError::PartialBatch {
                counts: counts.len(),
                layers,
                experts,
            });
        }
        if let Some(i) = counts
            .iter()
            .position(|c| !c.is_finite() || *c < 0.0 || *c > MAX_TOKEN_COUNT)
        {
            return Err(WindowError::BadCount {
                batch: i / per_batch,
                layer: layer_ids[(i % per_batch) / experts],
                expert: i % experts,
                count: counts[i],
            });
        }
        Ok(Self {
            batches: counts.len() / per_batch,
            layer_ids,
            experts,
            counts,
        })
    }

    pub fn layers(&self) -> usize {
        self.layer_ids.len()
    }
    pub fn experts(&self) -> usize {
        self.experts
    }
    pub fn batches(&self) -> usize {
        self.batches
    }
    pub fn layer_ids(&self) -> &[u32] {
        &self.layer_ids
    }

    /// Counts of one batch and layer (by position in the window, not model layer id).
    pub fn row(&self, batch: usize, layer: usize) -> &[f64] {
        let start = (batch * self.layers() + layer) * self.experts;
        &self.counts[start..start + self.experts]
    }

    /// Window totals per expert of one layer.
    pub fn layer_totals(&self, layer: usize) -> Vec<f64> {
        let mut out = vec![0.0; self.experts];
        for b in 0..self.batches {
            for (o, c) in out.iter_mut().zip(self.row(b, layer)) {
                *o += c;
            }
        }
        out
    }

    /// Total routed tokens in the window.
    pub fn total_tokens(&self) -> f64 {
        self.counts.iter().sum()
    }

    /// A window of the batches `range` of this one.
    pub fn slice_batches(&self, range: std::ops::Range<usize>) -> Self {
        let per_batch = self.layers() * self.experts;
        Self {
            layer_ids: self.layer_ids.clone(),
            experts: self.experts,
            batches: range.len(),
            counts: self.counts[range.start * per_batch..range.end * per_batch].to_vec(),
        }
    }
}

impl LoadWindow {
    /// The same window over the model layers `ids` (ascending): layers the window lacks get zero
    /// counts, layers it has keep theirs. Errors if the window has a layer outside `ids`.
    pub fn with_layers(&self, ids: &[u32]) -> Result<Self, ShapeError> {
        if let Some(&layer) = self.layer_ids.iter().find(|id| !ids.contains(id)) {
            return Err(ShapeError::LayerNotMoe {
                layer,
                first: ids.first().copied().unwrap_or(0),
                end: ids.last().map_or(0, |&l| l.saturating_add(1)),
            });
        }
        let e = self.experts;
        let mut counts = vec![0.0; self.batches * ids.len() * e];
        for b in 0..self.batches {
            for (l, id) in self.layer_ids.iter().enumerate() {
                let to = ids.iter().position(|x| x == id).expect("checked above");
                let dst = (b * ids.len() + to) * e;
                counts[dst..dst + e].copy_from_slice(self.row(b, l));
            }
        }
        // Every layer of this (valid) window is among `ids`, so `ids` is not empty, and the counts
        // are this window's or zero.
        Ok(Self::new(ids.to_vec(), e, counts).expect("a valid window widened is valid"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn refusals_carry_the_cell_and_the_shape() {
        let e = LoadWindow::new(vec![3, 5], 2, vec![1.0, 1.0, 1.0, -1.0]).unwrap_err();
        assert_eq!(
            e,
            WindowError::BadCount {
                batch: 0,
                layer: 5,
                expert: 1,
                count: -1.0
            }
        );
        assert_eq!(
            e.to_string(),
            "batch 0, layer 5, expert 1: count -1 is not a finite number in 0..=1e15 \
             (plan::limits::MAX_TOKEN_COUNT)"
        );
        assert_eq!(
            LoadWindow::new(vec![0], 2, vec![1.0; 3]).unwrap_err(),
            WindowError::PartialBatch {
                counts: 3,
                layers: 1,
                experts: 2
            }
        );
        assert_eq!(
            LoadWindow::new(vec![], 2, vec![]).unwrap_err(),
            WindowError::Empty {
                layers: 0,
                experts: 2
            }
        );
        let w = LoadWindow::new(vec![3], 2, vec![1.0, 2.0]).unwrap();
        assert_eq!(
            w.with_layers(&[1, 2]).unwrap_err(),
            ShapeError::LayerNotMoe {
                layer: 3,
                first: 1,
                end: 3
            }
        );
        let wide = w.with_layers(&[2, 3, 4]).unwrap();
        assert_eq!(wide.layer_ids(), &[2, 3, 4]);
        assert_eq!(wide.row(0, 1), &[1.0, 2.0]);
        assert_eq!(wide.total_tokens(), 3.0);
    }
}
