//! Winograd F(4x4, 3x3) for the stride-1 3x3 convolutions (Fused-MBConv's, V2's early stages;
//! Lavin & Gray, 2016): each 4x4 block of outputs comes from a 6x6 input tile with 36
//! multiplications per (input, output) channel pair instead of 144, as 36 GEMMs of
//! `tiles x cin` by `cin x cout` on the engine's micro-kernel. The im2col GEMM already ran at the
//! micro-kernel's rate (docs/benchmarks.md), so fewer multiplications were what was left to gain.
//! (F(2x2, 3x3), 16 per 36, was measured too: the larger tile also halves the transformed data per
//! output; both stay within 1e-6 of im2col on every V2 variant in tests/engine.rs.)
//!
//! With `d` a 6x6 input tile, `g` a 3x3 kernel, the 4x4 output is `A^T [(G g G^T) . (B^T d B)] A`:
//! the weights are transformed once at load ([`transform_weights`]), the tiles and the sums per
//! band of rows ([`input_tiles`], [`output_tiles`], the latter with bias and activation fused).

use std::ops::Range;

use super::kernels::Geometry;
use super::ops::{BandProjection, RowBands, conv_label, geometry, grow};
use super::plan::{Conv, ConvKind};
use super::pool::SharedMut;
use super::{Engine, profile};
use crate::simd::gemm::{self as microkernel, packed_len};
use crate::simd::math::activate_v;
use crate::simd::{Vector, on_widest_vectors};
use crate::spec::Activation;

/// Input tile side (the output tile's [`OUT`] plus the kernel's 2).
const SIDE: usize = 6;
/// Output tile side.
const OUT: usize = 4;
/// Transformed values per tile (6 x 6).
const TILE: usize = SIDE * SIDE;

/// Bytes of transformed tiles and their sums a part keeps per step (within a typical L2).
const STEP_BYTES: usize = 384 * 1024;

/// Whether a dense convolution of this shape runs as Winograd on this CPU.
pub(super) fn applies(kind: ConvKind, kernel: usize, stride: usize) -> bool {
    kind == ConvKind::Full && kernel == 3 && stride == 1 && microkernel::available()
}

/// The 36 matrices `U[xi] = (G g G^T)[xi]` of `weight` (`[9 * cin x cout]`, rows ordered
/// (tap, input channel)), each `[cin x cout]` packed for the micro-kernel, one after another.
/// Computed in f64 so the only rounding is the final one.
pub(super) fn transform_weights(weight: &[f32], cin: usize, cout: usize) -> Vec<f32> {
    const G: [[f64; 3]; SIDE] = [
        [1.0 / 4.0, 0.0, 0.0],
        [-1.0 / 6.0, -1.0 / 6.0, -1.0 / 6.0],
        [-1.0 / 6.0, 1.0 / 6.0, -1.0 / 6.0],
        [1.0 / 24.0, 1.0 / 12.0, 1.0 / 6.0],
        [1.0 / 24.0, -1.0 / 12.0, 1.0 / 6.0],
        [0.0, 0.0, 1.0],
    ];
    assert_eq!(weight.len(), 9 * cin * cout, "3x3 weight layout");
    let mut u = vec![0.0f32; TILE * cin * cout];
    for i in 0..cin {
        for o in 0..cout {
            let g = |ky: usize, kx: usize| f64::from(weight[((ky * 3 + kx) * cin + i) * cout + o]);
            let mut gg = [[0.0f64; 3]; SIDE];
            for (a, row) in gg.iter_mut().enumerate() {
                for (kx, v) in row.iter_mut().enumerate() {
                    *v = (0..3).map(|ky| G[a][ky] * g(ky, kx)).sum();
                }
            }
            for (a, row) in gg.iter().enumerate() {
                for (b, gb) in G.iter().enumerate() {
                    let v: f64 = (0..3).map(|kx| row[kx] * gb[kx]).sum();
                    u[((a * SIDE + b) * cin + i) * cout + o] = v as f32;
                }
            }
        }
    }
    u.chunks_exact(cin * cout)
        .flat_map(|m| microkernel::pack(m, cin, cout))
        .collect()
}

/// `B^T x` for one line of 6 input values.
#[inline(always)]
unsafe fn rows_in<V: Vector>([d0, d1, d2, d3, d4, d5]: [V; SIDE]) -> [V; SIDE] {
    // SAFETY: the caller's contract (V's instruction set).
    unsafe {
        let (four, five, two) = (V::splat(4.0), V::splat(5.0), V::splat(2.0));
        // 4 d0 - 5 d2 + d4; -4 (d1 + d2) + d3 + d4; 4 (d1 - d2) - d3 + d4;
        // -2 (d1 - d3) - d2 + d4; 2 (d1 - d3) - d2 + d4; 4 d1 - 5 d3 + d5.
        let d4_d2 = d4.sub(d2);
        let d1_d3 = d1.sub(d3);
        [
            four.mul_add(d0, five.neg_mul_add(d2, d4)),
            four.neg_mul_add(d1.add(d2), d3.add(d4)),
            four.mul_add(d1.sub(d2), d4.sub(d3)),
            two.neg_mul_add(d1_d3, d4_d2),
            two.mul_add(d1_d3, d4_d2),
            four.mul_add(d1, five.neg_mul_add(d3, d5)),
        ]
    }
}

/// `A^T m` for one line of 6 sums.
#[inline(always)]
unsafe fn rows_out<V: Vector>([m0, m1, m2, m3, m4, m5]: [V; SIDE]) -> [V; OUT] {
    // SAFETY: the caller's contract (V's instruction set).
    unsafe {
        let (p12, d12) = (m1.add(m2), m1.sub(m2));
        let (p34, d34) = (m3.add(m4), m3.sub(m4));
        [
            m0.add(p12).add(p34),
            V::splat(2.0).mul_add(d34, d12),
            V::splat(4.0).mul_add(p34, p12),
            V::splat(8.0).mul_add(d34, d12).add(m5),
        ]
    }
}

/// `B^T d B` for channels `at..at + V::LANES` (those below `c`) of the 6x6 tile whose pixel
/// `(r, col)` starts at `d[r * row_stride + col * c]`, into `out[xi]` at `at`.
///
/// # Safety
/// The CPU has `V`'s instruction set; the tile's pixels and `out[xi] + at` hold `c - at` values.
#[inline(always)]
unsafe fn transform_in<V: Vector>(
    d: *const f32,
    (row_stride, c): (usize, usize),
    at: usize,
    out: &[*mut f32; TILE],
) {
    let live = c - at;
    // SAFETY: the caller's contract; loads and stores touch lanes below `live` only.
    unsafe {
        // Plain loops, no closures or `array::from_fn`: code LLVM leaves out of line there is
        // compiled without the caller's target features, and each intrinsic becomes a call (a
        // change elsewhere in the crate once made V2-B0's Winograd layers 4x slower that way).
        let zero = [V::splat(0.0); SIDE];
        // Columns first, t = B^T d kept by column: t[col][r].
        let mut t = [zero; SIDE];
        for (col, tc) in t.iter_mut().enumerate() {
            let mut line = zero;
            for (r, v) in line.iter_mut().enumerate() {
                *v = V::load_first(d.add(r * row_stride + col * c + at), live);
            }
            *tc = rows_in(line);
        }
        // Then each row of t: (B^T d) B.
        for r in 0..SIDE {
            let mut line = zero;
            for (v, tc) in line.iter_mut().zip(&t) {
                *v = tc[r];
            }
            let v = rows_in(line);
            for (b, v) in v.into_iter().enumerate() {
                v.store_first(out[r * SIDE + b].add(at), live);
            }
        }
    }
}

/// [`input_tiles`] on `V`'s registers.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[inline(always)]
unsafe fn input_tiles_v<V: Vector>(
    input: &[f32],
    c: usize,
    g: Geometry,
    tiles_w: usize,
    tiles: Range<usize>,
    patch: &mut [f32],
    out: &mut [f32],
) {
    let count = tiles.len();
    assert!(
        input.len() >= g.in_h * g.in_w * c
            && patch.len() >= TILE * c
            && out.len() >= TILE * count * c
            && (tiles.end <= tiles_w * g.out_h.div_ceil(OUT))
    );
    for (j, t) in tiles.enumerate() {
        let (ty, tx) = (t / tiles_w, t % tiles_w);
        let iy0 = (OUT * ty) as isize - g.pad_top as isize;
        let ix0 = (OUT * tx) as isize - g.pad_left as isize;
        let inside =
            iy0 >= 0 && ix0 >= 0 && iy0 as usize + SIDE <= g.in_h && ix0 as usize + SIDE <= g.in_w;
        let (src, row_stride) = if inside {
            let at = (iy0 as usize * g.in_w + ix0 as usize) * c;
            (input[at..].as_ptr(), g.in_w * c)
        } else {
            for r in 0..SIDE {
                for col in 0..SIDE {
                    let dst = &mut patch[(r * SIDE + col) * c..][..c];
                    let (y, x) = (iy0 + r as isize, ix0 + col as isize);
                    if (0..g.in_h as isize).contains(&y) && (0..g.in_w as isize).contains(&x) {
                        dst.copy_from_slice(&input[(y as usize * g.in_w + x as usize) * c..][..c]);
                    } else {
                        dst.fill(0.0);
                    }
                }
            }
            (patch.as_ptr(), SIDE * c)
        };
        let base = out.as_mut_ptr();
        // SAFETY: the assert bounds every row written: (xi * count + j + 1) * c <= out.len().
        let o: [*mut f32; TILE] =
            std::array::from_fn(|xi| unsafe { base.add((xi * count + j) * c) });
        for at in (0..c).step_by(V::LANES) {
            // SAFETY: the CPU has V's features (caller); an inside tile's last pixel ends at
            // ((iy0 + 5) * in_w + ix0 + 6) * c <= input.len(), a padded one is `patch`.
            unsafe { transform_in::<V>(src, (row_stride, c), at, &o) };
        }
    }
}

/// The tile's (up to) 16 outputs `act(A^T m A + bias)` for channels `at..at + V::LANES`
/// (those below `c`), `m[xi]` the 36 sums, each output pixel written where `pixels` has it.
///
/// # Safety
/// The CPU has `V`'s instruction set; `m[xi] + at`, `bias + at` and each pixel hold `c - at` values.
#[inline(always)]
unsafe fn transform_out<V: Vector>(
    m: &[*const f32; TILE],
    (bias, act): (*const f32, Option<Activation>),
    c: usize,
    at: usize,
    pixels: &[Option<*mut f32>; OUT * OUT],
) {
    let live = c - at;
    // SAFETY: the caller's contract; loads and stores touch lanes below `live` only.
    unsafe {
        // Plain loops, as in `transform_in`.
        let zero = [V::splat(0.0); SIDE];
        // Columns first, s = A^T m kept by column: s[b][i].
        let mut s = [[V::splat(0.0); OUT]; SIDE];
        for (b, sb) in s.iter_mut().enumerate() {
            let mut line = zero;
            for (a, v) in line.iter_mut().enumerate() {
                *v = V::load_first(m[a * SIDE + b].add(at), live);
            }
            *sb = rows_out(line);
        }
        let bias = V::load_first(bias.add(at), live);
        for i in 0..OUT {
            let mut line = zero;
            for (v, sb) in line.iter_mut().zip(&s) {
                *v = sb[i];
            }
            let y = rows_out(line);
            for (jj, y) in y.into_iter().enumerate() {
                if let Some(p) = pixels[i * OUT + jj] {
                    activate_v(y.add(bias), act).store_first(p.add(at), live);
                }
            }
        }
    }
}

/// [`output_tiles`] on `V`'s registers.
///
/// # Safety
/// The CPU has `V`'s instruction set.
#[allow(clippy::too_many_arguments)]
#[inline(always)]
unsafe fn output_tiles_v<V: Vector>(
    m: &[f32],
    bias: &[f32],
    act: Option<Activation>,
    g: Geometry,
    tiles_w: usize,
    tiles: Range<usize>,
    row0: usize,
    dst: &mut [f32],
) {
    let c = bias.len();
    let count = tiles.len();
    let last_row = (OUT * tiles.end.div_ceil(tiles_w)).min(g.out_h);
    assert!(
        m.len() >= TILE * count * c
            && tiles.start >= row0 / OUT * tiles_w
            && dst.len() >= last_row.saturating_sub(row0) * g.out_w * c
    );
    for (j, t) in tiles.enumerate() {
        let (ty, tx) = (t / tiles_w, t % tiles_w);
        // SAFETY: the assert bounds each tile's sums: (xi * count + j + 1) * c <= m.len().
        let sums: [*const f32; TILE] =
            std::array::from_fn(|xi| unsafe { m.as_ptr().add((xi * count + j) * c) });
        let (oy, ox) = (OUT * ty, OUT * tx);
        let base = dst.as_mut_ptr();
        // SAFETY: output pixels (oy + i, ox + jj) inside the map lie in rows row0..last_row of
        // `dst` (asserted); those outside are not written.
        let pixels: [Option<*mut f32>; OUT * OUT] = std::array::from_fn(|p| {
            let (y, x) = (oy + p / OUT, ox + p % OUT);
            // SAFETY: as above.
            (y < g.out_h && x < g.out_w)
                .then(|| unsafe { base.add(((y - row0) * g.out_w + x) * c) })
        });
        for at in (0..c).step_by(V::LANES) {
            // SAFETY: the CPU has V's features (caller); bounds as above.
            unsafe { transform_out::<V>(&sums, (bias.as_ptr(), act), c, at, &pixels) };
        }
    }
}

on_widest_vectors! {
    /// Tiles `tiles` (raster order, `tiles_w` to a row) of one NHWC image with `c` channels,
    /// transformed: value `xi` of the `j`-th tile goes to `out[(xi * tiles.len() + j) * c..][..c]`.
    /// Tiles that reach into the padding are gathered into `patch` (`36 * c` values) first.
    pub fn input_tiles(
        input: &[f32],
        c: usize,
        g: Geometry,
        tiles_w: usize,
        tiles: Range<usize>,
        patch: &mut [f32],
        out: &mut [f32],
    ) => input_tiles_v
}

on_widest_vectors! {
    /// The outputs of `tiles` (as in [`input_tiles`]) from their 36 sums `m`
    /// (`m[(xi * tiles.len() + j) * c..][..c]`), `act(y + bias)`, into NHWC `dst`, whose first row
    /// is output row `row0`; outputs past the map's edge are dropped.
    pub fn output_tiles(
        m: &[f32],
        bias: &[f32],
        act: Option<Activation>,
        g: Geometry,
        tiles_w: usize,
        tiles: Range<usize>,
        row0: usize,
        dst: &mut [f32],
    ) => output_tiles_v
}

impl Engine {
    /// Whether `conv` runs as Winograd in this call: an f32 stride-1 3x3 conv (int8 uses its own
    /// GEMM on the im2col rows, and calibration records those rows; bf16 leaves these convs in
    /// f32 unless Winograd is off).
    pub(super) fn runs_winograd(&self, conv: &Conv) -> bool {
        self.winograd
            && !conv.winograd.is_empty()
            && conv.int8.is_none()
            && conv.bf16.is_none()
            && self.observed(conv).1.is_none()
    }

    /// A stride-1 3x3 conv from NHWC `input` into `out` by Winograd F(4x4, 3x3): parts are bands
    /// of tile rows of one image; each transforms a step of tiles, runs the 36 GEMMs and writes
    /// their outputs while the step is in cache. Returns the output spatial shape.
    ///
    /// With `project` (the block's 1x1 projection, its output and whether it adds `input`), the
    /// outputs go to a buffer of the part's thread instead of `out` (no step runs past a tile
    /// row's end unless it holds whole rows), and the part projects each tile row from there once
    /// its last tile is done: Fused-MBConv's expanded map (7 MB per block on V2-S's 96x96 stage)
    /// is never written nor read back.
    pub(super) fn winograd_conv(
        &self,
        conv: &Conv,
        input: &[f32],
        out: &mut Vec<f32>,
        n: usize,
        (h, w): (usize, usize),
        project: Option<(&Conv, &mut Vec<f32>, bool)>,
    ) -> (usize, usize) {
        let g = geometry(self.meta.spec.padding, h, w, 3, 1);
        let (cin, cout) = (conv.cin, conv.cout);
        let (in_len, out_len) = (h * w * cin, g.out_h * g.out_w * cout);
        let out_pixels = g.out_h * g.out_w;
        let projected = project.as_ref().map_or(0, |(pc, _, _)| pc.cout);
        let _t = profile::layer(
            "full conv (winograd)",
            || match projected {
                0 => conv_label(conv, (h, w)),
                co => format!("{} + 1x1 ->{co}", conv_label(conv, (h, w))),
            },
            // The direct convolution's multiply-adds, so GMAC/s compares with the im2col path.
            || (n * out_len * 9 * cin + n * out_pixels * cout * projected) as u64,
        );
        let (tiles_h, tiles_w) = (g.out_h.div_ceil(OUT), g.out_w.div_ceil(OUT));
        let bands = RowBands::per_thread(tiles_h, self.active_threads());
        // Tiles per step: whole register tiles of the micro-kernel (12 rows on AVX-512, 6 on AVX2).
        let step = (STEP_BYTES / (4 * TILE * (cin + cout)))
            .max(12)
            .next_multiple_of(12);
        // With a projection, the tile rows a step may hold: as many whole rows as fit, else one.
        let step_rows = (step / tiles_w).max(1);
        let band_len = OUT * step_rows * g.out_w * cout;
        let plen = packed_len(cin, cout);
        let zero_bias = vec![0.0f32; cout];
        let project = project.map(|p| BandProjection::new(self, p, n * out_pixels));
        if project.is_none() {
            grow(out, n * out_len);
        }
        let shared_out = SharedMut::new(out);
        self.run_parts(n * bands.per_image(), &|part| {
            let (img, tile_rows) = bands.band(part);
            let row0 = OUT * tile_rows.start;
            let out_rows = (OUT * tile_rows.end).min(g.out_h) - row0;
            let row_len = g.out_w * cout;
            let x = &input[img * in_len..(img + 1) * in_len];
            BUFFERS.with_borrow_mut(|buf| {
                let (v_len, m_len) = (TILE * step * cin, TILE * step * cout);
                let band = if project.is_some() { band_len } else { 0 };
                grow(buf, v_len + m_len + TILE * cin + band);
                let (v, rest) = buf.split_at_mut(v_len);
                let (m, rest) = rest.split_at_mut(m_len);
                let (patch, band_rows) = rest.split_at_mut(TILE * cin);
                let tiles = tile_rows.start * tiles_w..tile_rows.end * tiles_w;
                let mut t0 = tiles.start;
                while t0 < tiles.end {
                    let t1 = match &project {
                        None => t0 + step,
                        // Whole tile rows from a row's start, else up to the row's end.
                        Some(_) if t0 % tiles_w == 0 && step >= tiles_w => t0 + step_rows * tiles_w,
                        Some(_) => (t0 + step).min((t0 / tiles_w + 1) * tiles_w),
                    }
                    .min(tiles.end);
                    let count = t1 - t0;
                    input_tiles(
                        x,
                        cin,
                        g,
                        tiles_w,
                        t0..t1,
                        patch,
                        &mut v[..TILE * count * cin],
                    );
                    for xi in 0..TILE {
                        let a = &v[xi * count * cin..][..count * cin];
                        let u = &conv.winograd[xi * plen..][..plen];
                        let sums = &mut m[xi * count * cout..][..count * cout];
                        microkernel::gemm_bias_act(
                            a,
                            cin,
                            count,
                            u,
                            (0, cout),
                            &zero_bias,
                            None,
                            None,
                            sums,
                            cout,
                        );
                    }
                    let sums = &m[..TILE * count * cout];
                    let (act, bias) = (conv.act, &conv.bias);
                    match &project {
                        None => {
                            // SAFETY: parts write disjoint bands of output rows.
                            let dst = unsafe {
                                shared_out.slice(img * out_len + row0 * row_len, out_rows * row_len)
                            };
                            output_tiles(sums, bias, act, g, tiles_w, t0..t1, row0, dst);
                        }
                        Some(project) => {
                            // The buffer holds the output rows of the tile rows from the step's
                            // first; a tile row is projected once its last tile is done.
                            let first = OUT * (t0 / tiles_w);
                            output_tiles(sums, bias, act, g, tiles_w, t0..t1, first, band_rows);
                            if t1 % tiles_w == 0 || t1 == tiles.end {
                                let end = (OUT * t1.div_ceil(tiles_w)).min(g.out_h);
                                let (px, len) = (img * out_pixels + first * g.out_w, end - first);
                                let rows = &band_rows[..len * g.out_w * cout];
                                // SAFETY: parts project disjoint row bands.
                                unsafe { project.run(rows, px, len * g.out_w, input) };
                            }
                        }
                    }
                    t0 = t1;
                }
            });
        });
        (g.out_h, g.out_w)
    }
}

thread_local! {
    /// Transformed tiles, their sums and a padding patch, per thread (reused across calls).
    static BUFFERS: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::kernels;
    use crate::simd::Level;
    use crate::simd::math::silu;

    fn val(i: usize) -> f32 {
        ((i * 7919 + 13) % 1009) as f32 / 1009.0 - 0.5
    }

    /// Direct 3x3 conv (im2col, f64 sums) + bias + activation.
    fn direct(x: &[f32], weight: &[f32], bias: &[f32], g: Geometry, cin: usize) -> Vec<f32> {
        let cout = bias.len();
        let mut cols = vec![0.0; g.out_h * g.out_w * 9 * cin];
        kernels::im2col(x, cin, g, 0..g.out_h, &mut cols);
        cols.chunks_exact(9 * cin)
            .flat_map(|row| {
                (0..cout).map(move |o| {
                    let s: f64 = row
                        .iter()
                        .enumerate()
                        .map(|(k, a)| f64::from(*a) * f64::from(weight[k * cout + o]))
                        .sum();
                    silu(s as f32 + bias[o])
                })
            })
            .collect()
    }

    #[test]
    fn winograd_tiles_match_a_direct_convolution() {
        // The transforms on every instruction set this CPU has (the GEMM needs AVX2 or AVX-512).
        for level in [Level::Avx512, Level::Avx2] {
            crate::simd::with_level(level, check_against_direct);
        }
    }

    fn check_against_direct() {
        if !microkernel::available() {
            return;
        }
        // Odd and even maps, padding on either side, channel counts off the 8-lane step.
        for (h, w, cin, cout, pad) in [
            (6, 6, 8, 32, 1),
            (7, 5, 3, 40, 1),
            (9, 12, 19, 7, 1),
            (5, 8, 16, 33, 0),
            (1, 1, 4, 4, 1),
        ] {
            let (out_h, out_w) = (h + 2 * pad - 2, w + 2 * pad - 2);
            let g = Geometry {
                in_h: h,
                in_w: w,
                out_h,
                out_w,
                kernel: 3,
                stride: 1,
                pad_top: pad,
                pad_left: pad,
            };
            let x: Vec<f32> = (0..h * w * cin).map(val).collect();
            let weight: Vec<f32> = (0..9 * cin * cout).map(|i| val(i + 5)).collect();
            let bias: Vec<f32> = (0..cout).map(|i| val(i + 11)).collect();
            let want = direct(&x, &weight, &bias, g, cin);
            let u = transform_weights(&weight, cin, cout);
            let plen = packed_len(cin, cout);
            let (tiles_h, tiles_w) = (out_h.div_ceil(OUT), out_w.div_ceil(OUT));
            // Two steps of tiles over the map, the second starting mid-row.
            let all = tiles_h * tiles_w;
            let mut got = vec![f32::NAN; out_h * out_w * cout];
            let mut patch = vec![0.0; TILE * cin];
            for tiles in [0..all / 2, all / 2..all] {
                let count = tiles.len();
                let mut v = vec![0.0; TILE * count * cin];
                input_tiles(&x, cin, g, tiles_w, tiles.clone(), &mut patch, &mut v);
                let mut m = vec![0.0; TILE * count * cout];
                for xi in 0..TILE {
                    microkernel::gemm_bias_act(
                        &v[xi * count * cin..][..count * cin],
                        cin,
                        count,
                        &u[xi * plen..][..plen],
                        (0, cout),
                        &vec![0.0; cout],
                        None,
                        None,
                        &mut m[xi * count * cout..][..count * cout],
                        cout,
                    );
                }
                let act = Some(Activation::Silu);
                output_tiles(&m, &bias, act, g, tiles_w, tiles, 0, &mut got);
            }
            let diff = got
                .iter()
                .zip(&want)
                .map(|(a, b)| (a - b).abs())
                .fold(0.0f32, f32::max);
            assert!(diff <= 1e-5, "{h}x{w} {cin}->{cout} pad {pad}: {diff}");
        }
    }
}
