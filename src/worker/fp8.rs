//! FP8 E4M3 with DeepSeek-V3's block scales, host side: the layouts the CUDA FP8 path uses, and
//! the reference quantization its kernels must match.
//!
//! - Weights stay as the checkpoint stores them: E4M3 bytes, row-major `[rows, cols]`, with one
//!   f32 `scale_inv` per 128 x 128 block, `[ceil(rows/128), ceil(cols/128)]` row-major (the weight
//!   is `fp8 * scale_inv`).
//! - Activations are quantized on the fly per row and 128 columns (1 x 128): `scale = amax / 448`
//!   (1 for an all-zero block), `q = round_e4m3(x / scale)`, as DeepSeek's `act_quant`.
//! - Gate and up are stacked into one `[2I, H]` matrix, as in the bf16 path; their block rows
//!   stack with them only when `I` is a multiple of 128, which the FP8 path therefore requires
//!   (DeepSeek-V3: I = 2048). Other shapes are dequantized to bf16 at load, as before.

use super::checkpoint::{f32_to_fp8_e4m3, fp8_e4m3_to_f32};

/// Block edge of the scales, along both dimensions for weights and along K for activations.
pub const BLOCK: usize = 128;
/// Largest finite E4M3 magnitude.
pub const E4M3_MAX: f32 = 448.0;

/// One expert's FP8 weights as resident on the device.
#[derive(Clone, Debug, PartialEq)]
pub struct Fp8Expert {
    pub hidden: usize,
    pub intermediate: usize,
    /// `[2I, H]`: gate rows, then up rows.
    pub gate_up: Vec<u8>,
    /// `[2I/128, H/128]`.
    pub gate_up_scale: Vec<f32>,
    /// `[H, I]`.
    pub down: Vec<u8>,
    /// `[H/128, I/128]`.
    pub down_scale: Vec<f32>,
}

/// Why an expert cannot stay in FP8 (it is then dequantized to bf16 at load).
pub fn fp8_shape_unsupported(hidden: usize, intermediate: usize) -> Option<String> {
    (!hidden.is_multiple_of(BLOCK) || !intermediate.is_multiple_of(BLOCK)).then(|| {
        format!(
            "hidden {hidden} and intermediate {intermediate} must be multiples of {BLOCK} for FP8 compute (gate and up stack by 128-row blocks)"
        )
    })
}

impl Fp8Expert {
    /// Stacks gate and up (each `[I, H]` with `[I/128, H/128]` scales) and keeps down.
    #[allow(clippy::too_many_arguments)]
    pub fn stack(
        hidden: usize,
        intermediate: usize,
        gate: &[u8],
        gate_scale: &[f32],
        up: &[u8],
        up_scale: &[f32],
        down: &[u8],
        down_scale: &[f32],
    ) -> Result<Self, String> {
        if let Some(why) = fp8_shape_unsupported(hidden, intermediate) {
            return Err(why);
        }
        let (hb, ib) = (hidden / BLOCK, intermediate / BLOCK);
        let n = hidden * intermediate;
        for (what, got, want) in [
            ("gate", gate.len(), n),
            ("up", up.len(), n),
            ("down", down.len(), n),
            ("gate scale", gate_scale.len(), ib * hb),
            ("up scale", up_scale.len(), ib * hb),
            ("down scale", down_scale.len(), hb * ib),
        ] {
            if got != want {
                return Err(format!("{what}: {got} elements, expected {want}"));
            }
        }
        Ok(Self {
            hidden,
            intermediate,
            gate_up: [gate, up].concat(),
            gate_up_scale: [gate_scale, up_scale].concat(),
            down: down.to_vec(),
            down_scale: down_scale.to_vec(),
        })
    }

    /// Resident bytes (weights and scales).
    pub fn bytes(&self) -> usize {
        self.gate_up.len()
            + self.down.len()
            + 4 * (self.gate_up_scale.len() + self.down_scale.len())
    }
}

/// Dequantizes a block-scaled `[rows, cols]` weight to f32 (the reference's weights).
pub fn dequantize_weight(q: &[u8], scale: &[f32], rows: usize, cols: usize) -> Vec<f32> {
    let bc = cols.div_ceil(BLOCK);
    (0..rows * cols)
        .map(|k| {
            let (r, c) = (k / cols, k % cols);
            fp8_e4m3_to_f32(q[k]) * scale[(r / BLOCK) * bc + c / BLOCK]
        })
        .collect()
}

/// Activation rows quantized per 1 x 128 block: `q` is `[rows, cols]`, `scale` is
/// `[rows, ceil(cols/128)]` row-major (the host layout; see [`ScaleLayout`] for the device's).
#[derive(Clone, Debug, PartialEq)]
pub struct QuantRows {
    pub rows: usize,
    pub cols: usize,
    pub q: Vec<u8>,
    pub scale: Vec<f32>,
}

/// Quantizes `x` (`[rows, cols]`) per row and 128 columns.
pub fn quantize_rows(x: &[f32], rows: usize, cols: usize) -> QuantRows {
    assert_eq!(x.len(), rows * cols, "quantize_rows: {rows} x {cols}");
    let kb = cols.div_ceil(BLOCK);
    let mut q = vec![0u8; rows * cols];
    let mut scale = vec![1f32; rows * kb];
    for r in 0..rows {
        for b in 0..kb {
            let (lo, hi) = (r * cols + b * BLOCK, r * cols + ((b + 1) * BLOCK).min(cols));
            let amax = x[lo..hi].iter().fold(0f32, |m, v| m.max(v.abs()));
            let s = if amax > 0.0 { amax / E4M3_MAX } else { 1.0 };
            scale[r * kb + b] = s;
            for k in lo..hi {
                q[k] = f32_to_fp8_e4m3(x[k] / s);
            }
        }
    }
    QuantRows {
        rows,
        cols,
        q,
        scale,
    }
}

impl QuantRows {
    pub fn dequantize(&self) -> Vec<f32> {
        let kb = self.cols.div_ceil(BLOCK);
        (0..self.rows * self.cols)
            .map(|k| {
                let (r, c) = (k / self.cols, k % self.cols);
                fp8_e4m3_to_f32(self.q[k]) * self.scale[r * kb + c / BLOCK]
            })
            .collect()
    }
}

/// Where the scale of (row `r`, K-block `b`) lives in a device scale tensor of `rows` rows and
/// `kblocks` K-blocks.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScaleLayout {
    /// `r * kblocks + b` (K-blocks of a row together; the host layout).
    RowMajor,
    /// `b * rows + r` (rows of a K-block together; DeepGEMM's and cuBLASLt's for activations).
    KBlockMajor,
}

impl ScaleLayout {
    pub fn index(self, r: usize, b: usize, rows: usize, kblocks: usize) -> usize {
        match self {
            Self::RowMajor => r * kblocks + b,
            Self::KBlockMajor => b * rows + r,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn activation_blocks_scale_to_the_e4m3_range() {
        // Two rows of 256: block maxima 3.5, 448 * 2, 0 (all zero) and 1e-3.
        let mut x = vec![0f32; 2 * 256];
        for (k, v) in x[..128].iter_mut().enumerate() {
            *v = (k as f32 - 64.0) / 64.0 * 3.5;
        }
        x[128] = -896.0;
        x[129] = 10.0;
        x[256 + 128] = 1e-3;
        let q = quantize_rows(&x, 2, 256);
        assert_eq!(q.scale.len(), 4);
        assert!((q.scale[0] - 3.5 / 448.0).abs() < 1e-9);
        assert!((q.scale[1] - 2.0).abs() < 1e-9);
        assert_eq!(q.scale[2], 1.0, "an all-zero block keeps scale 1");
        // The block maximum maps to +-448 exactly.
        assert_eq!(fp8_e4m3_to_f32(q.q[128]), -448.0);
        let back = q.dequantize();
        // E4M3 keeps 3 mantissa bits: each element within half a step (2^-4 relative) of x, or
        // below the block's subnormal step.
        for (k, (&a, &b)) in x.iter().zip(&back).enumerate() {
            let s = q.scale[(k / 256) * 2 + (k % 256) / 128];
            assert!(
                (a - b).abs() <= a.abs() / 16.0 + s * 2f32.powi(-9),
                "{k}: {a} -> {b}"
            );
        }
        assert_eq!(back[256 + 128], 1e-3);
    }

    #[test]
    fn weights_dequantize_by_their_128_block() {
        // [256, 128]: two block rows with scales 0.5 and 4.
        let q: Vec<u8> = (0..256 * 128)
            .map(|k| f32_to_fp8_e4m3((k % 7) as f32))
            .collect();
        let w = dequantize_weight(&q, &[0.5, 4.0], 256, 128);
        assert_eq!(w[3], 1.5);
        assert_eq!(w[128 * 128 + 1], 4.0 * ((128 * 128 + 1) % 7) as f32);
    }

    #[test]
    fn stacking_needs_whole_blocks_and_checks_every_size() {
        let (h, i) = (256usize, 128usize);
        let w = vec![0x38u8; h * i];
        let s = vec![1f32; 2];
        let e = Fp8Expert::stack(h, i, &w, &s, &w, &s, &w, &s).unwrap();
        assert_eq!(e.gate_up.len(), 2 * h * i);
        assert_eq!(e.gate_up_scale.len(), 4);
        assert_eq!(e.bytes(), 3 * h * i + 4 * 6);
        let err = Fp8Expert::stack(h, i, &w, &s[..1], &w, &s, &w, &s).unwrap_err();
        assert!(err.contains("gate scale"), "{err}");
        assert!(fp8_shape_unsupported(7168, 2048).is_none());
        assert!(fp8_shape_unsupported(2048, 768).is_none());
        assert!(fp8_shape_unsupported(320, 200)
            .unwrap()
            .contains("multiples of 128"));
    }

    #[test]
    fn scale_layouts_index_every_entry_once() {
        for layout in [ScaleLayout::RowMajor, ScaleLayout::KBlockMajor] {
            let mut seen = [false; 12];
            for r in 0..4 {
                for b in 0..3 {
                    let i = layout.index(r, b, 4, 3);
                    assert!(!seen[i], "{layout:?}");
                    seen[i] = true;
                }
            }
            assert!(seen.iter().all(|s| *s));
        }
        assert_eq!(ScaleLayout::KBlockMajor.index(1, 2, 4, 3), 9);
    }
}
