//! FP8 expert FFN on the device (issue "7 of 10"): weights stay E4M3 with DeepSeek's 128 x 128
//! block scales; activation rows are quantized per 1 x 128 block by our kernel; each expert's two
//! GEMMs run in cuBLASLt with `BLK128x128_32F` scales on the weights and `VEC128_32F` on the
//! activations, f32 accumulation and bf16 output, spread over the device's streams.
//!
//! cuBLASLt 13.1 runs these scale modes on sm_90: `benches/gpu/fp8_scale_probe.cu` found the
//! layouts it expects (weights' scales K-block fastest, the checkpoint's own `scale_inv` order;
//! activations' scales token fastest, `[K/128][rows]` per matrix), with a relative error of 1.7e-3
//! against an f64 reference (H200, 2026-12-05). So each expert's activation scales are one
//! `[K/128][rows]` block of their own, starting 64-byte aligned.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::cublaslt::sys as lt;
use cudarc::driver::{CudaFunction, CudaSlice, CudaStream, DevicePtr, LaunchConfig, PushKernelArg};

use super::{dev_err, ComputeError, CudaDevice, CudaExperts, Prepared, Scratch};
use crate::worker::fp8::BLOCK;

/// The activation quantizer. E4M3 conversion through PTX (sm_89 and later), so no CUDA header is
/// needed; compiled only when an FP8 set is loaded.
pub(super) const FP8_KERNELS: &str = r#"
// One block of 64 threads per row; thread t quantizes columns 2t and 2t+1 of each 128-column
// block: scale = amax / 448 (1 for an all-zero block), q = e4m3(x / scale), round to nearest
// even, saturating. grp[3r..3r+3] = (first row of r's expert, its rows, its scales' offset).
extern "C" __global__ void quant_rows_fp8(const unsigned short* __restrict__ x,
                                          unsigned char* __restrict__ q,
                                          float* __restrict__ s,
                                          const unsigned* __restrict__ grp, int k) {
    int r = blockIdx.x, t = threadIdx.x;
    unsigned off = grp[3 * r], cnt = grp[3 * r + 1], base = grp[3 * r + 2];
    int kb = k / 128;
    const unsigned* xr = (const unsigned*)(x + (long)r * k);
    unsigned short* qr = (unsigned short*)(q + (long)r * k);
    __shared__ float wmax[2];
    for (int b = 0; b < kb; b++) {
        unsigned two = xr[b * 64 + t];
        float lo = __uint_as_float(two << 16), hi = __uint_as_float(two & 0xffff0000u);
        float m = fmaxf(fabsf(lo), fabsf(hi));
        for (int o = 16; o > 0; o >>= 1) m = fmaxf(m, __shfl_xor_sync(0xffffffffu, m, o));
        if ((t & 31) == 0) wmax[t >> 5] = m;
        __syncthreads();
        float amax = fmaxf(wmax[0], wmax[1]);
        __syncthreads();
        float sc = amax > 0.f ? amax / 448.f : 1.f;
        unsigned short pk;
        asm("cvt.rn.satfinite.e4m3x2.f32 %0, %1, %2;" : "=h"(pk) : "f"(hi / sc), "f"(lo / sc));
        qr[b * 64 + t] = pk;
        if (t == 0) s[(long)base + (long)b * cnt + (r - off)] = sc;
    }
}
"#;

/// cuBLASLt's handle, the FP8 kernels, one workspace per stream, and the algorithms found per
/// GEMM shape. Built on first use.
pub(super) struct Fp8State {
    handle: LtHandle,
    quant: CudaFunction,
    /// Main stream first, then the side streams.
    workspaces: Vec<CudaSlice<u8>>,
    algos: Mutex<HashMap<(i32, i32, i32), lt::cublasLtMatmulAlgo_t>>,
    scratch: Mutex<Fp8Scratch>,
}

struct LtHandle(lt::cublasLtHandle_t);
// SAFETY: a cuBLASLt handle may be used from any thread (cuBLASLt is thread safe per handle for
// matmul calls; descriptors here are per call).
unsafe impl Send for LtHandle {}
unsafe impl Sync for LtHandle {}

impl Drop for LtHandle {
    fn drop(&mut self) {
        // SAFETY: created by create_handle, destroyed once.
        let _ = unsafe { cudarc::cublaslt::result::destroy_handle(self.0) };
    }
}

#[derive(Default)]
struct Fp8Scratch {
    xpad: Option<CudaSlice<u16>>,
    wpad: Option<CudaSlice<f32>>,
    ypad: Option<CudaSlice<u16>>,
    apad: Option<CudaSlice<u16>>,
    opad: Option<CudaSlice<u16>>,
    idx_in: Option<CudaSlice<u32>>,
    idx_out: Option<CudaSlice<u32>>,
    xq: Option<CudaSlice<u8>>,
    xs: Option<CudaSlice<f32>>,
    aq: Option<CudaSlice<u8>>,
    ascale: Option<CudaSlice<f32>>,
    grp_x: Option<CudaSlice<u32>>,
    grp_a: Option<CudaSlice<u32>>,
}

const WORKSPACE_BYTES: usize = 32 << 20;

fn lt_ok(s: lt::cublasStatus_t, what: &str) -> Result<(), ComputeError> {
    if s == lt::cublasStatus_t::CUBLAS_STATUS_SUCCESS {
        Ok(())
    } else {
        Err(ComputeError::Device(format!("{what}: {s:?}")))
    }
}

/// Whether this device can run the FP8 path: cuBLASLt loads and the GPU has FP8 tensor cores.
pub(super) fn fp8_capable(dev: &CudaDevice) -> bool {
    // SAFETY: only probes for the library.
    let lib = unsafe { lt::is_culib_present() };
    let sm: u32 = dev.arch.trim_start_matches("sm_").parse().unwrap_or(0);
    lib && sm >= 89
}

impl CudaDevice {
    pub(super) fn fp8_state(&self) -> Result<&Fp8State, ComputeError> {
        static INIT: Mutex<()> = Mutex::new(());
        if let Some(s) = self.fp8.get() {
            return Ok(s);
        }
        let _one = INIT.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = self.fp8.get() {
            return Ok(s);
        }
        let module = Self::load_kernels(&self.ctx, &self.arch, FP8_KERNELS)
            .map_err(|e| ComputeError::Device(format!("FP8 kernels: {e}")))?;
        let quant = module
            .load_function("quant_rows_fp8")
            .map_err(dev_err("quant_rows_fp8"))?;
        let handle = cudarc::cublaslt::result::create_handle()
            .map_err(|e| ComputeError::Device(format!("cuBLASLt handle: {e:?}")))?;
        let mut workspaces = Vec::new();
        for st in std::iter::once(&self.stream).chain(self.side.iter().map(|(s, _)| s)) {
            workspaces.push(
                st.alloc_zeros::<u8>(WORKSPACE_BYTES)
                    .map_err(dev_err("cuBLASLt workspace"))?,
            );
        }
        let _ = self.fp8.set(Fp8State {
            handle: LtHandle(handle),
            quant,
            workspaces,
            algos: Mutex::new(HashMap::new()),
            scratch: Mutex::new(Fp8Scratch::default()),
        });
        Ok(self.fp8.get().expect("set above"))
    }
}

/// Grows `buf` to at least `n` elements (never shrinks).
fn grow<T: cudarc::driver::DeviceRepr + cudarc::driver::ValidAsZeroBits>(
    st: &Arc<CudaStream>,
    buf: &mut Option<CudaSlice<T>>,
    n: usize,
) -> Result<(), ComputeError> {
    if buf.as_ref().is_some_and(|b| b.len() >= n) {
        return Ok(());
    }
    *buf = None;
    *buf = Some(
        st.alloc_zeros::<T>(n.max(1))
            .map_err(dev_err("FP8 scratch"))?,
    );
    Ok(())
}

/// Per row: (first row of its expert, the expert's rows, offset of the expert's scales), each
/// expert's scales `[k/128][rows]` starting on a 16-float boundary; and the scales' total length.
pub(super) fn row_groups(counts: &[usize], k: usize) -> (Vec<u32>, usize) {
    let kb = k / BLOCK;
    let mut grp = Vec::with_capacity(counts.iter().sum::<usize>() * 3);
    let (mut off, mut base) = (0usize, 0usize);
    for &c in counts {
        for _ in 0..c {
            grp.extend_from_slice(&[off as u32, c as u32, base as u32]);
        }
        off += c;
        base += (c * kb).next_multiple_of(16);
    }
    (grp, base.max(1))
}

/// Row granularity of the FP8 GEMMs: every multiple of 8 measured has an algorithm.
pub(super) const ROW_QUANTUM: usize = 8;

/// Rows in cuBLASLt's FP8 granularity: each expert's count rounded up to [`ROW_QUANTUM`].
pub(super) struct PaddedRows {
    pub padded: Vec<usize>,
    /// Per padded row, the batch row it copies (an expert's last row fills its padding).
    pub idx_in: Vec<u32>,
    /// Per batch row, its padded row.
    pub idx_out: Vec<u32>,
}

pub(super) fn padded_rows(counts: &[usize]) -> PaddedRows {
    let mut r = PaddedRows {
        padded: Vec::with_capacity(counts.len()),
        idx_in: Vec::new(),
        idx_out: Vec::new(),
    };
    let (mut off, mut poff) = (0usize, 0usize);
    for &c in counts {
        let c4 = c.next_multiple_of(ROW_QUANTUM);
        r.padded.push(c4);
        for j in 0..c4 {
            r.idx_in.push((off + j.min(c.saturating_sub(1))) as u32);
        }
        for j in 0..c {
            r.idx_out.push((poff + j) as u32);
        }
        off += c;
        poff += c4;
    }
    r
}

/// One GEMM `D[n x m] = B[n x k] · A[m x k]ᵀ` (row-major; column-major `D = Aᵀ B`) with block
/// scales, on `stream`.
struct LtGemm {
    m: i32,
    n: i32,
    k: i32,
    a: u64,
    a_scale: u64,
    b: u64,
    b_scale: u64,
    d: u64,
}

impl Fp8State {
    fn gemm(&self, g: &LtGemm, stream: &CudaStream, workspace: u64) -> Result<(), ComputeError> {
        use cudarc::cublaslt::result as r;
        let desc = r::create_matmul_desc(
            lt::cublasComputeType_t::CUBLAS_COMPUTE_32F,
            lt::cudaDataType_t::CUDA_R_32F,
        )
        .map_err(|e| ComputeError::Device(format!("matmul desc: {e:?}")))?;
        let layouts = [
            (lt::cudaDataType_t::CUDA_R_8F_E4M3, g.k, g.m),
            (lt::cudaDataType_t::CUDA_R_8F_E4M3, g.k, g.n),
            (lt::cudaDataType_t::CUDA_R_16BF, g.m, g.n),
        ];
        let mut made = Vec::with_capacity(3);
        let result = (|| -> Result<(), ComputeError> {
            for (ty, rows, cols) in layouts {
                made.push(
                    r::create_matrix_layout(ty, rows as u64, cols as u64, rows as i64)
                        .map_err(|e| ComputeError::Device(format!("matrix layout: {e:?}")))?,
                );
            }
            let set = |attr, v: &[u8]| {
                // SAFETY: desc is live; v points at the attribute's value of its size.
                unsafe { r::set_matmul_desc_attribute(desc, attr, v.as_ptr() as *const _, v.len()) }
                    .map_err(|e| ComputeError::Device(format!("matmul attribute {attr:?}: {e:?}")))
            };
            use lt::cublasLtMatmulDescAttributes_t as A;
            let t = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_T as i32;
            let n = cudarc::cublas::sys::cublasOperation_t::CUBLAS_OP_N as i32;
            set(A::CUBLASLT_MATMUL_DESC_TRANSA, &t.to_ne_bytes())?;
            set(A::CUBLASLT_MATMUL_DESC_TRANSB, &n.to_ne_bytes())?;
            let blk =
                lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_BLK128x128_32F as u32;
            let vec =
                lt::cublasLtMatmulMatrixScale_t::CUBLASLT_MATMUL_MATRIX_SCALE_VEC128_32F as u32;
            set(A::CUBLASLT_MATMUL_DESC_A_SCALE_MODE, &blk.to_ne_bytes())?;
            set(A::CUBLASLT_MATMUL_DESC_B_SCALE_MODE, &vec.to_ne_bytes())?;
            set(
                A::CUBLASLT_MATMUL_DESC_A_SCALE_POINTER,
                &g.a_scale.to_ne_bytes(),
            )?;
            set(
                A::CUBLASLT_MATMUL_DESC_B_SCALE_POINTER,
                &g.b_scale.to_ne_bytes(),
            )?;
            let key = (g.m, g.n, g.k);
            let known = self
                .algos
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .get(&key)
                .copied();
            let algo = match known {
                Some(a) => a,
                None => {
                    let a = self.heuristic(desc, &made)?;
                    self.algos
                        .lock()
                        .unwrap_or_else(|e| e.into_inner())
                        .insert(key, a);
                    a
                }
            };
            let (one, zero) = (1.0f32, 0.0f32);
            // SAFETY: every pointer addresses a live device buffer of the sizes these layouts
            // give (the caller's scratch and the expert's weights); the workspace is this
            // stream's own.
            let s = unsafe {
                lt::cublasLtMatmul(
                    self.handle.0,
                    desc,
                    &one as *const f32 as *const _,
                    g.a as *const _,
                    made[0],
                    g.b as *const _,
                    made[1],
                    &zero as *const f32 as *const _,
                    g.d as *const _,
                    made[2],
                    g.d as *mut _,
                    made[2],
                    &algo,
                    workspace as *mut _,
                    WORKSPACE_BYTES,
                    stream.cu_stream() as lt::cudaStream_t,
                )
            };
            lt_ok(s, "cublasLtMatmul (FP8, block scales)")
        })();
        for l in made {
            // SAFETY: created above, destroyed once.
            let _ = unsafe { r::destroy_matrix_layout(l) };
        }
        // SAFETY: created above, destroyed once.
        let _ = unsafe { r::destroy_matmul_desc(desc) };
        result
    }

    fn heuristic(
        &self,
        desc: lt::cublasLtMatmulDesc_t,
        l: &[lt::cublasLtMatrixLayout_t],
    ) -> Result<lt::cublasLtMatmulAlgo_t, ComputeError> {
        use cudarc::cublaslt::result as r;
        let pref = r::create_matmul_pref()
            .map_err(|e| ComputeError::Device(format!("matmul preference: {e:?}")))?;
        let out = (|| {
            use lt::cublasLtMatmulPreferenceAttributes_t as P;
            let set = |attr, v: u64| {
                // SAFETY: pref is live; v is the attribute's u64 value.
                unsafe { r::set_matmul_pref_attribute(pref, attr, &v as *const u64 as *const _, 8) }
                    .map_err(|e| ComputeError::Device(format!("preference {attr:?}: {e:?}")))
            };
            set(
                P::CUBLASLT_MATMUL_PREF_MAX_WORKSPACE_BYTES,
                WORKSPACE_BYTES as u64,
            )?;
            // Per-expert slices start on 16-byte boundaries, not 256 (the default assumption).
            for a in [
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_A_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_B_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_C_BYTES,
                P::CUBLASLT_MATMUL_PREF_MIN_ALIGNMENT_D_BYTES,
            ] {
                // The attribute is u32.
                let v = 16u32;
                // SAFETY: as above, with a u32 value.
                unsafe { r::set_matmul_pref_attribute(pref, a, &v as *const u32 as *const _, 4) }
                    .map_err(|e| ComputeError::Device(format!("preference {a:?}: {e:?}")))?;
            }
            // SAFETY: a zeroed heuristic result is a valid out-parameter.
            let mut res: lt::cublasLtMatmulHeuristicResult_t = unsafe { std::mem::zeroed() };
            let mut found = 0i32;
            // SAFETY: all descriptors are live; res holds one result.
            let s = unsafe {
                lt::cublasLtMatmulAlgoGetHeuristic(
                    self.handle.0,
                    desc,
                    l[0],
                    l[1],
                    l[2],
                    l[2],
                    pref,
                    1,
                    &mut res,
                    &mut found,
                )
            };
            lt_ok(s, "cublasLtMatmulAlgoGetHeuristic (FP8, block scales)")?;
            if found == 0 {
                return Err(ComputeError::Device(
                    "cuBLASLt has no FP8 block-scaled algorithm for this shape".into(),
                ));
            }
            Ok(res.algo)
        })();
        // SAFETY: created above, destroyed once.
        let _ = unsafe { r::destroy_matmul_pref(pref) };
        out
    }
}

impl CudaExperts {
    /// The FP8 FFN of a prepared batch. cuBLASLt's block-scaled GEMMs do not take every row count
    /// (`benches/gpu/fp8_scale_probe.cu` on the H200: 1, 2, 3, 5, 13, 17 and 33 rows have no
    /// algorithm; 8, 16, 24, 32, 64, 100, 128 and 1000 do; and 4 rows gave a wrong result), so
    /// each expert's rows are padded to a multiple of [`ROW_QUANTUM`] by repeating its last row: gather into padded rows, quantize, GEMM 1 per
    /// expert, the activation kernel, quantize, GEMM 2 per expert, gather the real rows back to
    /// the output. Asynchronous, like the bf16 path.
    pub(super) fn run_fp8(&self, p: &Prepared, sc: &Scratch) -> Result<(), ComputeError> {
        let dev = &self.dev;
        let st = &dev.stream;
        let f = dev.fp8_state()?;
        let (h, i) = (self.hidden, self.inter);
        let counts: Vec<usize> = p.fp8.iter().map(|g| g.2).collect();
        let pad = padded_rows(&counts);
        let prows = pad.padded.iter().sum::<usize>();
        let (gx, xs_len) = row_groups(&pad.padded, h);
        let (ga, as_len) = row_groups(&pad.padded, i);
        let mut fs = f.scratch.lock().unwrap_or_else(|e| e.into_inner());
        grow(st, &mut fs.xpad, prows * h)?;
        grow(st, &mut fs.wpad, prows)?;
        grow(st, &mut fs.ypad, prows * 2 * i)?;
        grow(st, &mut fs.apad, prows * i)?;
        grow(st, &mut fs.opad, prows * h)?;
        grow(st, &mut fs.xq, prows * h)?;
        grow(st, &mut fs.xs, xs_len)?;
        grow(st, &mut fs.aq, prows * i)?;
        grow(st, &mut fs.ascale, as_len)?;
        grow(st, &mut fs.grp_x, gx.len())?;
        grow(st, &mut fs.grp_a, ga.len())?;
        grow(st, &mut fs.idx_in, prows)?;
        grow(st, &mut fs.idx_out, p.total_rows)?;
        let fs = &mut *fs;
        for (host, buf) in [
            (&gx, &mut fs.grp_x),
            (&ga, &mut fs.grp_a),
            (&pad.idx_in, &mut fs.idx_in),
            (&pad.idx_out, &mut fs.idx_out),
        ] {
            st.memcpy_htod(host, buf.as_mut().expect("grown"))
                .map_err(dev_err("upload FP8 row tables"))?;
        }
        let p8 = |s: &Option<CudaSlice<u8>>| s.as_ref().expect("grown").device_ptr(st).0;
        let p16 = |s: &Option<CudaSlice<u16>>| s.as_ref().expect("grown").device_ptr(st).0;
        let p32 = |s: &Option<CudaSlice<f32>>| s.as_ref().expect("grown").device_ptr(st).0;
        let pu = |s: &Option<CudaSlice<u32>>| s.as_ref().expect("grown").device_ptr(st).0;
        let (pxq, pxs, paq, pas) = (p8(&fs.xq), p32(&fs.xs), p8(&fs.aq), p32(&fs.ascale));
        let (pxp, pwp, pyp, pap, pop) = (
            p16(&fs.xpad),
            p32(&fs.wpad),
            p16(&fs.ypad),
            p16(&fs.apad),
            p16(&fs.opad),
        );
        let pw = sc.w.as_ref().expect("prepared").device_ptr(st).0;
        let pout = sc.out.as_ref().expect("prepared").device_ptr(st).0;
        let quant = |src: u64, q: u64, s: u64, grp: u64, k: usize| -> Result<(), ComputeError> {
            let cfg = LaunchConfig {
                grid_dim: (prows as u32, 1, 1),
                block_dim: (64, 1, 1),
                shared_mem_bytes: 0,
            };
            let k = k as i32;
            let mut l = st.launch_builder(&f.quant);
            l.arg(&src).arg(&q).arg(&s).arg(&grp).arg(&k);
            // SAFETY: src holds prows x k bf16, q prows x k bytes, s the row groups' scales, grp
            // 3 x prows entries (sized above).
            unsafe { l.launch(cfg) }
                .map(|_| ())
                .map_err(dev_err("quant_rows_fp8 launch"))
        };
        // Padded rows and their router weights (an f32 is two bf16-sized halves).
        dev.gather_rows(p.x, pu(&fs.idx_in), pxp, prows, h)?;
        dev.gather_rows(pw, pu(&fs.idx_in), pwp, prows, 2)?;
        quant(pxp, pxq, pxs, pu(&fs.grp_x), h)?;
        let mut jobs1 = Vec::with_capacity(p.fp8.len());
        let mut jobs2 = Vec::with_capacity(p.fp8.len());
        let (mut sx, mut sa, mut off) = (0usize, 0usize, 0usize);
        for (&(w, s, _, _), &c) in p.fp8.iter().zip(&pad.padded) {
            jobs1.push(LtGemm {
                m: (2 * i) as i32,
                n: c as i32,
                k: h as i32,
                a: w,
                a_scale: s,
                b: pxq + (off * h) as u64,
                b_scale: pxs + (sx * 4) as u64,
                d: pyp + (off * 2 * i * 2) as u64,
            });
            jobs2.push(LtGemm {
                m: h as i32,
                n: c as i32,
                k: i as i32,
                a: w + (2 * i * h) as u64,
                a_scale: s + ((2 * i / BLOCK) * (h / BLOCK) * 4) as u64,
                b: paq + (off * i) as u64,
                b_scale: pas + (sa * 4) as u64,
                d: pop + (off * h * 2) as u64,
            });
            sx += (c * (h / BLOCK)).next_multiple_of(16);
            sa += (c * (i / BLOCK)).next_multiple_of(16);
            off += c;
        }
        self.on_all_streams(f, &jobs1)?;
        dev.silu_mul_scale(pyp, pwp, pap, prows, i as i32)?;
        quant(pap, paq, pas, pu(&fs.grp_a), i)?;
        self.on_all_streams(f, &jobs2)?;
        dev.gather_rows(pop, pu(&fs.idx_out), pout, p.total_rows, h)
    }

    /// The GEMMs on the main stream and the side streams (largest first, each to the least
    /// loaded), ordered after the main stream's earlier work and before its later work.
    fn on_all_streams(&self, f: &Fp8State, jobs: &[LtGemm]) -> Result<(), ComputeError> {
        let dev = &self.dev;
        let streams: Vec<&Arc<CudaStream>> = std::iter::once(&dev.stream)
            .chain(dev.side.iter().map(|(s, _)| s))
            .collect();
        let fork = dev
            .stream
            .record_event(None)
            .map_err(dev_err("record event"))?;
        for s in &streams[1..] {
            s.wait(&fork).map_err(dev_err("stream wait"))?;
        }
        let mut order: Vec<&LtGemm> = jobs.iter().collect();
        order.sort_by_key(|g| std::cmp::Reverse(g.n));
        let mut load = vec![0i64; streams.len()];
        for g in order {
            let k = (0..load.len()).min_by_key(|&k| load[k]).expect("streams");
            load[k] += g.n as i64 + 16;
            let ws = f.workspaces[k].device_ptr(streams[k]).0;
            f.gemm(g, streams[k], ws)?;
        }
        for s in &streams[1..] {
            dev.stream.join(s).map_err(dev_err("stream join"))?;
        }
        Ok(())
    }
}

/// Keeps `OnceLock` in the parent's field type in one place.
pub(super) type Fp8Cell = OnceLock<Fp8State>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_experts_scales_start_on_a_16_float_boundary() {
        // Two experts of 3 and 2 rows, K = 256 (2 blocks): 6 scales padded to 16, then 4.
        let (g, len) = row_groups(&[3, 2], 256);
        assert_eq!(g.len(), 5 * 3);
        assert_eq!(&g[..3], &[0, 3, 0]);
        assert_eq!(&g[9..12], &[3, 2, 16]);
        assert_eq!(len, 32);
        // Row 4 (second of expert 1), K-block 1: base 16 + 1 * 2 + 1.
        let r = 4;
        let (off, cnt, base) = (g[3 * r], g[3 * r + 1], g[3 * r + 2]);
        assert_eq!(base + cnt + (r as u32 - off), 19);
        assert_eq!(row_groups(&[], 128).1, 1);
    }

    #[test]
    fn rows_pad_to_multiples_of_eight_by_repeating_the_last() {
        let p = padded_rows(&[1, 8, 10]);
        assert_eq!(p.padded, [8, 8, 16]);
        assert_eq!(&p.idx_in[..8], &[0; 8]);
        assert_eq!(&p.idx_in[8..16], &[1, 2, 3, 4, 5, 6, 7, 8]);
        assert_eq!(&p.idx_in[16..26], &[9, 10, 11, 12, 13, 14, 15, 16, 17, 18]);
        assert_eq!(&p.idx_in[26..], &[18; 6]);
        let mut out = vec![0u32];
        out.extend(8..16);
        out.extend(16..26);
        assert_eq!(p.idx_out, out);
    }
}
