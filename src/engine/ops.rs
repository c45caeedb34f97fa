//! The operations a plan's steps run: convolutions (im2col + GEMM, depthwise, 1x1 on the GEMM
//! micro-kernel), the fused expand + depthwise per band of rows, each split into parallel parts.

use super::calibrate::Observer;
use super::kernels::{self, Geometry};
use super::plan::{Buf, Conv, ConvKind, Step};
use super::pool::SharedMut;
use super::{Engine, profile};
use crate::simd::gemm as microkernel;
use crate::simd::gemm_bf16 as bf16;
use crate::simd::gemm_i8 as int8;
use crate::spec::Padding;

/// Spatial geometry of a conv on an `h x w` input.
pub(super) fn geometry(
    padding: Padding,
    h: usize,
    w: usize,
    kernel: usize,
    stride: usize,
) -> Geometry {
    let (out_h, pad_top, _) = padding.along(h, kernel, stride);
    let (out_w, pad_left, _) = padding.along(w, kernel, stride);
    Geometry {
        in_h: h,
        in_w: w,
        out_h,
        out_w,
        kernel,
        stride,
        pad_top,
        pad_left,
    }
}

/// Parallel parts per thread for each operation.
pub(super) const PARTS_PER_THREAD: usize = 8;

/// `n` images' `total` output rows (or rows of tiles) in bands of `rows`, one parallel part per
/// band of each image: part `p` is band `p % per_image` of image `p / per_image`.
#[derive(Clone, Copy)]
pub(super) struct RowBands {
    total: usize,
    rows: usize,
    per_image: usize,
}

impl RowBands {
    /// Bands of `rows` rows (at least one).
    pub(super) fn of(total: usize, rows: usize) -> Self {
        let rows = rows.max(1);
        let per_image = total.div_ceil(rows);
        Self {
            total,
            rows,
            per_image,
        }
    }

    /// [`PARTS_PER_THREAD`] bands of an image per thread: a preempted worker holds back little.
    pub(super) fn per_thread(total: usize, threads: usize) -> Self {
        Self::of(total, total.div_ceil(PARTS_PER_THREAD * threads))
    }

    /// Bands per image.
    pub(super) fn per_image(self) -> usize {
        self.per_image
    }

    /// The image and rows of part `part`.
    pub(super) fn band(self, part: usize) -> (usize, std::ops::Range<usize>) {
        let b = part % self.per_image;
        (
            part / self.per_image,
            b * self.rows..((b + 1) * self.rows).min(self.total),
        )
    }
}

/// A conv's label in profiles: name, kernel/stride, channels and input map.
pub(super) fn conv_label(conv: &Conv, (h, w): (usize, usize)) -> String {
    let (k, s) = (conv.kernel, conv.stride);
    format!(
        "{} {k}x{k}/{s} {}->{} {h}x{w}",
        conv.name, conv.cin, conv.cout
    )
}

/// Rows per GEMM chunk: the output chunk stays in L2 for the fused epilogue.
fn chunk_rows(cout: usize) -> usize {
    (32768 / cout.max(1)).clamp(16, 1024)
}

/// `out[m x n] = a[m x k] · b[k x n]`, row-major; `b` and `out` rows are `ld` apart (column blocks).
fn matmul(a: &[f32], b: &[f32], out: &mut [f32], m: usize, k: usize, n: usize, ld: usize) {
    assert!(
        m == 0
            || (a.len() >= m * k && b.len() >= (k - 1) * ld + n && out.len() >= (m - 1) * ld + n)
    );
    // SAFETY: the asserts above bound every element the m x k, k x n and m x n matrices touch.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            out.as_mut_ptr(),
            1,
            ld as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            ld as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            gemm::Parallelism::None,
        )
    }
}

/// `out = act(a · weight + bias)` (+ `residual`) for `m` rows and columns `c0..c0 + nc` of a conv
/// with `cout` columns (`out` and `residual` hold the block's rows at full width): the int8 or bf16
/// kernel when the engine runs in that precision, the AVX-512 kernel when the weights are packed,
/// else the `gemm` crate and a separate epilogue. `observer` records the input (calibration).
#[allow(clippy::too_many_arguments)]
pub(super) fn gemm_bias_act(
    (conv, observer): (&Conv, Option<&Observer>),
    weight: &[f32],
    gate: Option<&[f32]>,
    a: &[f32],
    m: usize,
    (c0, nc): (usize, usize),
    residual: Option<&[f32]>,
    out: &mut [f32],
) {
    let (k, cout) = (a.len() / m.max(1), conv.cout);
    // `weight` is the conv's own GEMM weight or a gated copy in the same layout.
    assert_eq!(weight.len(), conv.gemm_weight().len(), "weight layout");
    if let Some(obs) = observer {
        obs.record(&a[..m * k], k, gate);
    }
    if let Some(w) = &conv.int8 {
        let (act, wq) = (conv.act, (w, gate));
        int8::gemm_bias_act(a, k, m, wq, (c0, nc), act, residual, out, cout);
        return;
    }
    if let Some(w) = &conv.bf16 {
        // bf16: the activations are rounded (and gated) once per call, the weights were at load.
        let packed = (w, gate);
        let (bias, act) = (&conv.bias, conv.act);
        bf16::gemm_bias_act(a, k, m, packed, (c0, nc), bias, act, residual, out, cout);
        return;
    }
    assert!(gate.is_none(), "input gates need the bf16 or int8 kernel");
    if !conv.packed.is_empty() {
        let bias = &conv.bias;
        microkernel::gemm_bias_act(
            a,
            k,
            m,
            weight,
            (c0, nc),
            bias,
            conv.act,
            residual,
            out,
            cout,
        );
        return;
    }
    matmul(a, &weight[c0..], &mut out[c0..], m, k, nc, cout);
    if nc == cout {
        kernels::bias_act(&mut out[..m * cout], &conv.bias, conv.act, residual);
    } else {
        for r in 0..m {
            let o = &mut out[r * cout + c0..r * cout + c0 + nc];
            let res = residual.map(|res| &res[r * cout + c0..r * cout + c0 + nc]);
            kernels::bias_act(o, &conv.bias[c0..c0 + nc], conv.act, res);
        }
    }
}

/// A block's 1x1 projection run inside the step that makes its input (the fused expand +
/// depthwise, Fused-MBConv's Winograd conv), on the rows each part just made while they are in
/// cache, so the step's whole map is never written.
pub(super) struct BandProjection<'a> {
    conv: &'a Conv,
    observer: Option<&'a Observer>,
    out: SharedMut,
    /// Whether it adds the block's input.
    residual: bool,
}

impl<'a> BandProjection<'a> {
    /// `conv`, its output `y` (grown to `pixels` positions) and whether it adds the block's input.
    pub(super) fn new(
        engine: &'a Engine,
        (conv, y, residual): (&'a Conv, &mut Vec<f32>, bool),
        pixels: usize,
    ) -> Self {
        grow(y, pixels * conv.cout);
        let observer = engine.observed(conv).1;
        let out = SharedMut::new(y);
        BandProjection {
            conv,
            observer,
            out,
            residual,
        }
    }

    /// Projects `rows` (`m` positions, from position `px` of the batch) into the output, adding
    /// the same positions of the block's `input` where residual.
    ///
    /// # Safety
    /// Parts running at once project disjoint ranges of positions.
    pub(super) unsafe fn run(&self, rows: &[f32], px: usize, m: usize, input: &[f32]) {
        let co = self.conv.cout;
        // SAFETY: the caller's ranges are disjoint.
        let y = unsafe { self.out.slice(px * co, m * co) };
        // A residual block keeps the map's shape and channels: position `px` of the input is
        // position `px` of the output.
        let res = self.residual.then(|| &input[px * co..(px + m) * co]);
        let weight = self.conv.gemm_weight();
        gemm_bias_act(
            (self.conv, self.observer),
            weight,
            None,
            rows,
            m,
            (0, co),
            res,
            y,
        );
    }
}

impl Engine {
    /// Runs a conv from NHWC `input` into `out`; returns the output spatial shape.
    pub(super) fn conv(
        &self,
        conv: &Conv,
        input: &[f32],
        out: &mut Vec<f32>,
        n: usize,
        (h, w): (usize, usize),
        pool: Option<&mut [f32]>,
    ) -> (usize, usize) {
        let g = geometry(self.meta.spec.padding, h, w, conv.kernel, conv.stride);
        let (cin, cout) = (conv.cin, conv.cout);
        let (in_len, out_len) = (h * w * cin, g.out_h * g.out_w * cout);
        if conv.kind == ConvKind::Pointwise {
            let io = (input, out);
            return self.pointwise(conv.gemm_weight(), None, conv, io, n, (h, w), None);
        }
        if self.runs_winograd(conv) {
            return self.winograd_conv(conv, input, out, n, (h, w), None);
        }
        let _t = profile::layer(
            match conv.kind {
                ConvKind::Depthwise => "depthwise",
                _ => "full conv (im2col+gemm)",
            },
            || conv_label(conv, (h, w)),
            || {
                let per_out = conv.kernel
                    * conv.kernel
                    * if conv.kind == ConvKind::Depthwise {
                        1
                    } else {
                        cin
                    };
                (n * out_len * per_out) as u64
            },
        );
        grow(out, n * out_len);
        let bands = match conv.kind {
            ConvKind::Full => RowBands::of(g.out_h, chunk_rows(cout) / g.out_w),
            _ => RowBands::per_thread(g.out_h, self.active_threads()),
        };
        let parts = n * bands.per_image();
        let shared_out = SharedMut::new(out);
        if conv.kind == ConvKind::Depthwise {
            // Each part pools into its own row of `partial`, summed per image afterwards.
            let mut partial = vec![0.0f32; if pool.is_some() { parts * cout } else { 0 }];
            let shared_partial = SharedMut::new(&mut partial);
            let with_pool = pool.is_some();
            let strips = self.dw_strips;
            self.run_parts(parts, &|part| {
                let (img, rows) = bands.band(part);
                let row_len = g.out_w * cout;
                // SAFETY: parts write disjoint row bands of `out` and their own row of `partial`.
                let dst = unsafe {
                    shared_out.slice(img * out_len + rows.start * row_len, rows.len() * row_len)
                };
                // SAFETY: each part owns its row of `partial`.
                let p = with_pool.then(|| unsafe { shared_partial.slice(part * cout, cout) });
                kernels::depthwise(
                    &input[img * in_len..(img + 1) * in_len],
                    &conv.weight,
                    &conv.bias,
                    dst,
                    g,
                    rows,
                    0,
                    0..cout,
                    conv.act,
                    p,
                    strips,
                );
            });
            if let Some(pool) = pool {
                add_partial_pools(pool, &partial, cout, |part| bands.band(part).0);
            }
        } else {
            let row_len = conv.kernel * conv.kernel * cin;
            let observed = self.observed(conv);
            self.run_parts(parts, &|part| {
                let (img, rows) = bands.band(part);
                let m = rows.len() * g.out_w;
                SCRATCH.with_borrow_mut(|scratch| {
                    grow(scratch, m * row_len);
                    let im2col = profile::scope("  im2col");
                    kernels::im2col(
                        &input[img * in_len..(img + 1) * in_len],
                        cin,
                        g,
                        rows.clone(),
                        scratch,
                    );
                    // SAFETY: parts write disjoint row bands of `out`.
                    let dst = unsafe {
                        shared_out.slice(img * out_len + rows.start * g.out_w * cout, m * cout)
                    };
                    drop(im2col);
                    let a = &scratch[..m * row_len];
                    gemm_bias_act(
                        observed,
                        conv.gemm_weight(),
                        None,
                        a,
                        m,
                        (0, cout),
                        None,
                        dst,
                    );
                });
            });
        }
        (g.out_h, g.out_w)
    }

    /// The stem straight from the NCHW `input` into NHWC `out`, in bands of output rows (see
    /// [`Engine::stem_rows`]). Returns the output spatial shape.
    pub(super) fn planar_stem(
        &self,
        input: &[f32],
        out: &mut Vec<f32>,
        n: usize,
        (h, w): (usize, usize),
        in_int8: bool,
    ) -> (usize, usize) {
        self.stem_rows(input, n, (h, w), in_int8, |stem| {
            let (conv, g) = (stem.conv, stem.g);
            let (k, cin, cout) = (conv.kernel, conv.cin, conv.cout);
            let out_len = g.out_h * g.out_w * cout;
            let _t = profile::layer(
                if in_int8 {
                    "full conv (planar int8)"
                } else {
                    "full conv (planar)"
                },
                || conv_label(conv, (h, w)),
                || (n * out_len * k * k * cin) as u64,
            );
            grow(out, n * out_len);
            let bands = RowBands::per_thread(g.out_h, self.active_threads());
            let row_len = g.out_w * cout;
            let shared_out = SharedMut::new(out);
            self.run_parts(n * bands.per_image(), &|part| {
                let (img, rows) = bands.band(part);
                // SAFETY: parts write disjoint row bands of `out`.
                let dst = unsafe {
                    shared_out.slice(img * out_len + rows.start * row_len, rows.len() * row_len)
                };
                stem.fill(img, rows, dst);
            });
            stem.output_shape()
        })
    }

    /// Calls `f` with the stem's maker of output rows straight from the NCHW `input`: by
    /// [`kernels::planar_conv`], or with `in_int8` by [`int8::planar_conv`] from each image's
    /// planes on the stem's input grid (made here, once per image).
    pub(super) fn stem_rows<R>(
        &self,
        input: &[f32],
        n: usize,
        (h, w): (usize, usize),
        in_int8: bool,
        f: impl FnOnce(&StemRows) -> R,
    ) -> R {
        let conv = &self.plan.stem;
        let g = geometry(self.meta.spec.padding, h, w, conv.kernel, conv.stride);
        let quantised = conv.int8.as_ref().filter(|_| in_int8);
        PLANES.with_borrow_mut(|planes| {
            let plane = conv.cin * h * w;
            if let Some(q) = quantised {
                planes.resize_with(n, Default::default);
                let pads = (g.pad_top, g.pad_left, conv.stride, (g.out_h, g.out_w));
                for (p, image) in planes.iter_mut().zip(input.chunks_exact(plane)) {
                    p.fill(image, conv.cin, q.input, (h, w), pads);
                }
            }
            f(&StemRows {
                conv,
                g,
                input,
                int8: quantised.map(|q| (&planes[..n], q, &self.plan.stem_quads[..])),
                weight: &self.plan.stem_planar,
            })
        })
    }

    /// How [`Engine::expand_depthwise`] splits `n` images of `h x w` across threads, as (bands
    /// of output rows, blocks of channels), or `None` where fusing does not pay.
    /// `maker` makes the depthwise conv's input rows (the expansion or the stem) and `next` is
    /// the block's step after it: where that is a projection that can run per band and `maker`
    /// runs in int8, bands may make more rows twice ([`INT8_BAND_OVERLAP`]).
    pub(super) fn fused_split(
        &self,
        dw: &Conv,
        n: usize,
        hw: (usize, usize),
        (maker, next): (&Conv, Option<&Step>),
    ) -> Option<(usize, usize)> {
        let projects = self.fusable_projection(next, Buf::T2).is_some();
        let overlap = match (projects, self.band_overlap) {
            (_, Some(percent)) => percent,
            (true, None) if maker.int8.is_some() => INT8_BAND_OVERLAP,
            _ => PLAIN_BAND_OVERLAP,
        };
        fused_parts(
            self.active_threads(),
            n,
            hw,
            (dw.kernel, dw.stride),
            dw.cout,
            overlap,
        )
    }

    /// Expand 1x1 conv + depthwise conv without materialising the expanded tensor: each part (a
    /// band of output rows and block of channels of one image, `split` as from
    /// [`Engine::fused_split`]) expands just the input rows its next few output rows read into a
    /// buffer that stays in L2, keeping the rows it shares with the following step, and runs the
    /// depthwise kernel on it. With [`Source::Stem`] the buffer's rows are the stem's output,
    /// made from the network's input (every channel in one part, `input` unused); the stem's
    /// whole output is then never written. `pool` as in [`Engine::conv`].
    ///
    /// With `project` (the block's 1x1 projection, its output and whether it adds `input`; every
    /// channel in one part), the depthwise rows go to a buffer of the part's thread instead of
    /// `out`, and the part projects them from there into the projection's output: the whole map
    /// is never written nor read back, and at two threads each thread reads rows it wrote itself
    /// (docs/benchmarks.md).
    #[allow(clippy::too_many_arguments)]
    pub(super) fn expand_depthwise(
        &self,
        source: Source,
        dw: &Conv,
        input: &[f32],
        out: &mut Vec<f32>,
        n: usize,
        (h, w): (usize, usize),
        (bands, col_parts): (usize, usize),
        pool: Option<&mut [f32]>,
        project: Option<(&Conv, &mut Vec<f32>, bool)>,
    ) -> (usize, usize) {
        let g = geometry(self.meta.spec.padding, h, w, dw.kernel, dw.stride);
        let c = dw.cout;
        let (maker, cin) = match source {
            Source::Expand(e) => (e, e.cin),
            Source::Stem(stem) => (stem.conv, stem.conv.cin),
        };
        let out_len = g.out_h * g.out_w * c;
        // The output channels of the projection when it runs here (its layer is then this one).
        let projected = project.as_ref().map_or(0, |(pc, _, _)| pc.cout);
        let source_macs = match source {
            Source::Expand(_) => h * w * cin * c,
            Source::Stem(stem) => h * w * cin * c * stem.conv.kernel * stem.conv.kernel,
        };
        let _t = profile::layer(
            match source {
                Source::Expand(_) => "expand+depthwise",
                Source::Stem(_) => "stem+depthwise",
            },
            || {
                let (k, s) = (dw.kernel, dw.stride);
                let project = if projected > 0 {
                    format!(" + 1x1 ->{projected}")
                } else {
                    String::new()
                };
                let rest = format!("{cin}->{c} + {k}x{k}/{s}{project}");
                match source {
                    Source::Expand(e) => format!("{} 1x1 {rest} {h}x{w}", e.name),
                    // The stem's kernel and input size, as on its own.
                    Source::Stem(stem) => {
                        let (mk, ms, g) = (stem.conv.kernel, stem.conv.stride, stem.g);
                        let name = &stem.conv.name;
                        format!("{name} {mk}x{mk}/{ms} {rest} {}x{}", g.in_h, g.in_w)
                    }
                }
            },
            || (n * (source_macs + out_len * (dw.kernel * dw.kernel + projected))) as u64,
        );
        grow(out, n * out_len);
        let bands = RowBands::of(g.out_h, g.out_h.div_ceil(bands));
        let (col_block, col_parts) = panel_blocks(c, col_parts);
        let parts = n * bands.per_image() * col_parts;
        let band = |part: usize| {
            let (img, rows) = bands.band(part / col_parts);
            let cp = part % col_parts;
            let cols = cp * col_block..((cp + 1) * col_block).min(c);
            (img, rows, cols)
        };
        // Output rows per step: their expanded input rows fill about FUSED_BYTES. The buffer's rows
        // are full width; a part touches only its channels.
        let row_len = w * c;
        let in_rows = (FUSED_BYTES / (4 * w * col_block)).max(dw.kernel + dw.stride);
        let step = ((in_rows - dw.kernel) / dw.stride + 1).max(1);
        let first_row = |oy: usize| (oy * dw.stride).saturating_sub(g.pad_top).min(h);
        let end_row = |oy: usize| {
            (oy * dw.stride + dw.kernel)
                .saturating_sub(g.pad_top)
                .min(h)
        };
        let mut partial = vec![0.0f32; if pool.is_some() { parts * c } else { 0 }];
        let shared_partial = SharedMut::new(&mut partial);
        let with_pool = pool.is_some();
        let shared_out = SharedMut::new(out);
        let observed = self.observed(maker);
        let strips = self.dw_strips;
        assert!(
            (project.is_none() && matches!(source, Source::Expand(_))) || col_parts == 1,
            "a projection and the stem make every channel"
        );
        assert!(
            matches!(source, Source::Expand(_)) || !project.as_ref().is_some_and(|p| p.2),
            "the stem's output is not kept for a residual"
        );
        let out_pixels = g.out_h * g.out_w;
        let project = project.map(|p| BandProjection::new(self, p, n * out_pixels));
        self.run_parts(parts, &|part| {
            let (img, rows, cols) = band(part);
            // SAFETY: parts write disjoint row bands of `out` and their own row of `partial`.
            let mut p = with_pool.then(|| unsafe { shared_partial.slice(part * c, c) });
            FUSED.with_borrow_mut(|buf| {
                // `buf` holds the expanded input rows lo..hi.
                let (mut lo, mut hi) = (0, 0);
                for r0 in rows.clone().step_by(step) {
                    let r1 = (r0 + step).min(rows.end);
                    let (need_lo, need_hi) = (first_row(r0), end_row(r1 - 1));
                    if (lo..hi).contains(&need_lo) {
                        buf.copy_within((need_lo - lo) * row_len..(hi - lo) * row_len, 0);
                    } else {
                        hi = need_lo;
                    }
                    lo = need_lo;
                    grow(buf, (need_hi - lo) * row_len);
                    if need_hi > hi {
                        let dst = &mut buf[(hi - lo) * row_len..(need_hi - lo) * row_len];
                        match source {
                            Source::Expand(e) => {
                                let a =
                                    &input[(img * h + hi) * w * cin..(img * h + need_hi) * w * cin];
                                let (m, cols) = ((need_hi - hi) * w, (cols.start, cols.len()));
                                let weight = e.gemm_weight();
                                gemm_bias_act(observed, weight, None, a, m, cols, None, dst);
                            }
                            Source::Stem(stem) => stem.fill(img, hi..need_hi, dst),
                        }
                        hi = need_hi;
                    }
                    let out_row = g.out_w * c;
                    let band_len = (r1 - r0) * out_row;
                    // Rows the projection reads next go to a buffer of this thread's, in cache;
                    // `out` is not written then.
                    let mut band_rows = project.is_some().then(|| BAND.take());
                    let dst = match &mut band_rows {
                        Some(b) => {
                            grow(b, band_len);
                            &mut b[..band_len]
                        }
                        // SAFETY: as above; parts that share rows write disjoint channels of them.
                        None => unsafe { shared_out.slice(img * out_len + r0 * out_row, band_len) },
                    };
                    let dw_scope = profile::scope("  depthwise (fused)");
                    kernels::depthwise(
                        &buf[..(hi - lo) * row_len],
                        &dw.weight,
                        &dw.bias,
                        dst,
                        g,
                        r0..r1,
                        lo,
                        cols.clone(),
                        dw.act,
                        p.as_deref_mut(),
                        strips,
                    );
                    drop(dw_scope);
                    if let Some(project) = &project {
                        let _pw = profile::scope("  pointwise (fused)");
                        let px = img * out_pixels + r0 * g.out_w;
                        // SAFETY: parts project disjoint row bands.
                        unsafe { project.run(&dst[..band_len], px, (r1 - r0) * g.out_w, input) };
                    }
                    if let Some(b) = band_rows {
                        BAND.set(b);
                    }
                }
            });
        });
        if let Some(pool) = pool {
            add_partial_pools(pool, &partial, c, |part| band(part).0);
        }
        (g.out_h, g.out_w)
    }

    /// 1x1 conv over all `n * h * w` rows, split into row chunks (and column blocks when there are
    /// few rows) across the pool, bias + activation (+ residual) fused on each cache-hot block.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn pointwise(
        &self,
        weight: &[f32],
        gate: Option<&[f32]>,
        conv: &Conv,
        (input, out): (&[f32], &mut Vec<f32>),
        n: usize,
        (h, w): (usize, usize),
        residual: Option<&[f32]>,
    ) -> (usize, usize) {
        let rows = n * h * w;
        let (cin, cout) = (conv.cin, conv.cout);
        let _t = profile::layer(
            "pointwise (gemm+epilogue)",
            || format!("{} 1x1 {cin}->{cout} {h}x{w}", conv.name),
            || (rows * cin * cout) as u64,
        );
        grow(out, rows * cout);
        let threads = self.pool.threads();
        // Several parts per thread: a worker preempted mid-part (loaded machine) holds back little.
        let chunk = chunk_rows(cout)
            .min(rows.div_ceil(PARTS_PER_THREAD * threads))
            .max(16)
            // Whole 12-row AVX-512 tiles (a multiple of the AVX2 kernel's 6 rows too): a chunk of
            // 25 rows ran two full tiles and a 1-row one that costs far more per row.
            .next_multiple_of(12);
        let row_parts = rows.div_ceil(chunk);
        // Few rows (late, small feature maps): split the output channels instead.
        let col_parts = if row_parts < threads && cout >= 32 * threads {
            threads
        } else {
            1
        };
        let (col_block, col_parts) = panel_blocks(cout, col_parts);
        let shared_out = SharedMut::new(out);
        let observed = self.observed(conv);
        self.run_parts(row_parts * col_parts, &|part| {
            let (rp, cp) = (part / col_parts, part % col_parts);
            let (r0, m) = (rp * chunk, chunk.min(rows - rp * chunk));
            let (c0, nc) = (cp * col_block, col_block.min(cout - cp * col_block));
            // SAFETY: each part owns rows r0..r0+m x columns c0..c0+nc of `out`; the slice spans its
            // rows and the other columns of those rows are not touched by this part.
            let dst = unsafe { shared_out.slice(r0 * cout, m * cout) };
            let res = residual.map(|res| &res[r0 * cout..(r0 + m) * cout]);
            let a = &input[r0 * cin..(r0 + m) * cin];
            gemm_bias_act(observed, weight, gate, a, m, (c0, nc), res, dst);
        });
        (h, w)
    }
}

/// The stem's output rows straight from the planar input (from [`Engine::stem_rows`]).
pub(super) struct StemRows<'a> {
    conv: &'a Conv,
    /// The stem's geometry (its output is the first block's input).
    g: Geometry,
    /// The NCHW images.
    input: &'a [f32],
    /// In int8: each image's planes, the weights and [`int8::planar_quads`].
    int8: Option<(&'a [int8::Planes], &'a int8::Int8Weights, &'a [u32])>,
    /// The f32 kernel's weights.
    weight: &'a [f32],
}

impl StemRows<'_> {
    /// The stem's output rows and columns.
    pub(super) fn output_shape(&self) -> (usize, usize) {
        (self.g.out_h, self.g.out_w)
    }

    /// Output rows `rows` of image `img`, every column and channel, into `dst`.
    fn fill(&self, img: usize, rows: std::ops::Range<usize>, dst: &mut [f32]) {
        let (conv, g) = (self.conv, self.g);
        let (cin, cout, act) = (conv.cin, conv.cout, conv.act);
        match self.int8 {
            Some((planes, q, quads)) => {
                let geometry = (conv.stride, g.out_w);
                let p = &planes[img];
                int8::planar_conv(p, (quads, q), (cin, cout), geometry, rows, act, dst);
            }
            None => {
                let plane = cin * g.in_h * g.in_w;
                let image = &self.input[img * plane..(img + 1) * plane];
                kernels::planar_conv(image, cin, self.weight, &conv.bias, dst, g, rows, act);
            }
        }
    }
}

/// What [`Engine::expand_depthwise`] makes the depthwise conv's input rows from.
pub(super) enum Source<'a> {
    /// A 1x1 expansion of the block's input.
    Expand(&'a Conv),
    /// The stem, from the network's input (the first block, with no expansion).
    Stem(&'a StemRows<'a>),
}

thread_local! {
    /// im2col buffer of each thread (reused across calls).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Expanded rows of each thread in [`Engine::expand_depthwise`] (reused across calls).
    static FUSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Depthwise rows of each thread that a fused projection reads (reused across calls).
    static BAND: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Each image's uint8 planes for [`Engine::planar_stem`] in int8 (reused across calls).
    static PLANES: std::cell::RefCell<Vec<int8::Planes>> =
        const { std::cell::RefCell::new(Vec::new()) };
}

/// Percent of a map's rows that row bands may make twice (the rows their borders share), where
/// the projection does not run per band or the rows are made in fp32 or bf16.
const PLAIN_BAND_OVERLAP: usize = 10;

/// [`PLAIN_BAND_OVERLAP`] where bands let the projection run per band and the rows come from an
/// int8 expansion (a quarter of the f32 one's time): two threads then cut Lite0's 14x14 blocks
/// (5x5: 29 % of the rows twice) into bands rather than channel blocks followed by the
/// projection's own pass; Lite0 int8 at two threads took 0.94-0.95x the time. In fp32 the same
/// bands gained nothing on Lite0, B0 or V2-S (docs/benchmarks.md, thirty-first session).
const INT8_BAND_OVERLAP: usize = 34;

/// Bytes of expanded rows [`Engine::expand_depthwise`] keeps per step (half a typical L2).
const FUSED_BYTES: usize = 512 * 1024;

pub(super) fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
}

/// [`Engine::fused_split`] for `threads` threads and a `kernel, stride` depthwise conv of `c`
/// channels. One part per image when the images keep every thread busy; else row bands while the
/// expanded rows recomputed at band boundaries are at most `overlap` percent of the map's; else
/// channel blocks (no overlap, each thread expands its own channels). And wide layers in channel
/// blocks besides: the fewest expanded rows a part keeps (`kernel + stride` rows of its channels)
/// must not outgrow L2 (B7's last stage, 19x19 maps of 3840 channels, needs 1.2 MB; cut in three, a
/// model of one such block ran in 0.77x the time).
fn fused_parts(
    threads: usize,
    n: usize,
    (h, w): (usize, usize),
    (kernel, stride): (usize, usize),
    c: usize,
    overlap: usize,
) -> Option<(usize, usize)> {
    let halo = kernel.saturating_sub(stride);
    let (bands, col_parts) = if n >= threads {
        (1, 1)
    } else if (threads - 1) * halo * 100 <= overlap * h {
        (threads, 1)
    } else if c >= microkernel::NR * threads {
        (1, threads)
    } else {
        return None;
    };
    let window = 4 * w * (kernel + stride) * c.div_ceil(col_parts);
    let blocks = match window > 2 * FUSED_BYTES {
        true => window.div_ceil(FUSED_BYTES),
        false => 1,
    };
    Some((bands, col_parts * blocks))
}

/// `cols` output columns cut into about `parts` blocks that start on packed-panel boundaries:
/// (block width, number of blocks).
fn panel_blocks(cols: usize, parts: usize) -> (usize, usize) {
    let block = cols
        .div_ceil(parts)
        .next_multiple_of(microkernel::NR)
        .min(cols);
    (block, cols.div_ceil(block))
}

/// Adds each part's row of `c` channel sums in `partial` to the pooled sums of its image.
pub(super) fn add_partial_pools(
    pool: &mut [f32],
    partial: &[f32],
    c: usize,
    image: impl Fn(usize) -> usize,
) {
    for (part, sums) in partial.chunks_exact(c).enumerate() {
        let img = image(part);
        for (p, v) in pool[img * c..(img + 1) * c].iter_mut().zip(sums) {
            *p += v;
        }
    }
}

/// Channel means of NHWC rows.
pub(super) fn mean_rows(x: &[f32], out: &mut [f32]) {
    let c = out.len();
    out.fill(0.0);
    for row in x.chunks_exact(c) {
        for (o, v) in out.iter_mut().zip(row) {
            *o += v;
        }
    }
    let count = (x.len() / c) as f32;
    out.iter_mut().for_each(|o| *o /= count);
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every row of every image lies in exactly one part's band, in order, and no band is empty.
    #[test]
    fn row_bands_cover_each_row_once() {
        for total in [1, 2, 7, 14, 15, 56, 112, 113] {
            for bands in [
                RowBands::per_thread(total, 1),
                RowBands::per_thread(total, 2),
            ]
            .into_iter()
            .chain([1, 3, 8, 200].map(|rows| RowBands::of(total, rows)))
            {
                let n = 3;
                let mut next = vec![0; n];
                for part in 0..n * bands.per_image() {
                    let (img, rows) = bands.band(part);
                    assert!(
                        !rows.is_empty() && rows.start == next[img],
                        "{total} {part}"
                    );
                    next[img] = rows.end;
                }
                assert_eq!(next, vec![total; n]);
            }
        }
        assert_eq!(RowBands::of(10, 0).per_image(), 10);
        assert_eq!(RowBands::per_thread(112, 2).per_image(), 16);
    }

    #[test]
    fn fused_parts_cut_wide_layers_into_channel_blocks_that_fit() {
        let window = |w: usize, (k, s): (usize, usize), c: usize, blocks: usize| {
            4 * w * (k + s) * c.div_ceil(blocks)
        };
        // B7's last stage at one thread: three blocks of 1280 channels, each within the budget.
        let (k, c) = ((3, 1), 3840);
        assert_eq!(fused_parts(1, 1, (19, 19), k, c, 10), Some((1, 3)));
        assert!(window(19, k, c, 3) <= FUSED_BYTES);
        // Two threads already cut it in two channel blocks (19 rows are too few for bands),
        // each of which fits.
        assert_eq!(fused_parts(2, 1, (19, 19), k, c, 10), Some((1, 2)));
        // Two threads on a map with rows to spare: bands, and each band's window split to fit.
        let (bands, blocks) = fused_parts(2, 1, (150, 600), (3, 1), 288, 10).unwrap();
        assert!(bands == 2 && blocks > 1 && window(600, (3, 1), 288, blocks) <= FUSED_BYTES);
        // Layers whose window fits keep their split: B0's widest at 224 and B7's early stages.
        assert_eq!(fused_parts(1, 1, (7, 7), (5, 1), 1152, 10), Some((1, 1)));
        assert_eq!(fused_parts(1, 1, (150, 150), (3, 1), 288, 10), Some((1, 1)));
        assert_eq!(fused_parts(2, 1, (150, 150), (3, 1), 288, 10), Some((2, 1)));
        assert_eq!(fused_parts(2, 2, (19, 19), (3, 1), 3840, 10), Some((1, 3)));
        // Too few channels to split and too few rows for bands: no fusion.
        assert_eq!(fused_parts(2, 1, (7, 7), (5, 1), 48, 10), None);
    }

    /// Lite0's 14x14 blocks at two threads: channel blocks when their rows are made in fp32,
    /// bands (4 of the 14 rows made twice, the projection per band) from an int8 expansion.
    #[test]
    fn int8_expansions_take_bands_with_more_rows_made_twice() {
        let (hw, c) = ((14, 14), 672);
        // (threads, images, kernel, channels, overlap, split)
        for (threads, n, k, c, overlap, want) in [
            (2, 1, (5, 1), c, PLAIN_BAND_OVERLAP, (1, 2)),
            (2, 1, (5, 1), c, INT8_BAND_OVERLAP, (2, 1)),
            (2, 1, (3, 1), 480, INT8_BAND_OVERLAP, (2, 1)),
            // One thread, or as many images as threads: whole maps either way.
            (1, 1, (5, 1), c, INT8_BAND_OVERLAP, (1, 1)),
            (2, 2, (5, 1), c, INT8_BAND_OVERLAP, (1, 1)),
        ] {
            let case = format!("{threads} threads, {n} images, {k:?}, {c}, {overlap} %");
            assert_eq!(
                fused_parts(threads, n, hw, k, c, overlap),
                Some(want),
                "{case}"
            );
        }
    }
}
