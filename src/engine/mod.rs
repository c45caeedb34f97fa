//! A native CPU inference engine compiled from the spec and a weight set.
//!
//! BN is folded into the convolutions, activations are NHWC, 1x1 and im2col convolutions run on a
//! hand-written AVX-512 GEMM with pre-packed weights and bias + activation (+ residual) applied in
//! registers ([`microkernel`]; elsewhere the `gemm` crate plus a cache-hot epilogue), depthwise convolutions
//! fuse bias, activation and the SE pooling, and the SE gate is applied to whichever is smaller: the
//! activations or the projection weights. Buffers live in an arena reused across calls. The burn
//! model stays the reference; `tests/engine.rs` checks the two agree to 1e-4.

pub mod kernels;
pub mod microkernel;
pub mod pool;
pub mod profile;

use crate::spec::{Activation, Conv as SpecConv, Padding};
use crate::weights::{TensorMap, WeightMeta, WeightSet};

use kernels::Geometry;
use pool::{Pool, SharedMut};

#[derive(Debug, thiserror::Error)]
#[error("cannot build the inference engine: {0}")]
pub struct EngineError(String);

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ConvKind {
    /// 1x1, stride 1: one GEMM. Weight `[cin x cout]`.
    Pointwise,
    /// Depthwise kxk. Weight `[k*k x c]`.
    Depthwise,
    /// Dense kxk via im2col + GEMM. Weight `[k*k*cin x cout]`.
    Full,
}

/// A convolution with its BN folded in.
#[derive(Debug, Clone)]
struct Conv {
    /// Weight path (`blocks.3.expand`), for `bench --profile`.
    name: String,
    kind: ConvKind,
    kernel: usize,
    stride: usize,
    cin: usize,
    cout: usize,
    weight: Vec<f32>,
    /// `weight` packed for [`microkernel`] (empty for depthwise or without AVX2/AVX-512; when
    /// present, `weight` is empty).
    packed: Vec<f32>,
    bias: Vec<f32>,
    act: Option<Activation>,
}

impl Conv {
    /// The weights in the layout the GEMM path reads.
    fn gemm_weight(&self) -> &[f32] {
        if self.packed.is_empty() {
            &self.weight
        } else {
            &self.packed
        }
    }
}

#[derive(Debug, Clone)]
struct Se {
    name: String,
    channels: usize,
    reduced: usize,
    w1: Vec<f32>,
    b1: Vec<f32>,
    w2: Vec<f32>,
    b2: Vec<f32>,
    act: Activation,
}

#[derive(Debug, Clone)]
struct BlockPlan {
    expand: Option<Conv>,
    dw: Option<Conv>,
    se: Option<Se>,
    project: Option<Conv>,
    residual: bool,
    cin: usize,
    cout: usize,
}

/// Tensor `name` with `len` values.
fn tensor<'a>(t: &'a TensorMap, name: &str, len: usize) -> Result<&'a [f32], EngineError> {
    let t = t
        .get(name)
        .ok_or_else(|| EngineError(format!("missing tensor `{name}`")))?;
    if t.data.len() != len {
        return Err(EngineError(format!(
            "`{name}` has {} values, the spec needs {len}",
            t.data.len()
        )));
    }
    Ok(&t.data)
}

/// Folds `{path}.bn` into `{path}.conv` and repacks the weight for the kind of convolution.
fn fold(
    t: &TensorMap,
    spec_conv: &SpecConv,
    eps: f64,
    act: Option<Activation>,
) -> Result<Conv, EngineError> {
    let path = &spec_conv.path;
    let kind = if spec_conv.is_depthwise() {
        ConvKind::Depthwise
    } else if spec_conv.kernel == 1 && spec_conv.stride == 1 {
        ConvKind::Pointwise
    } else {
        ConvKind::Full
    };
    let weight_name = format!("{path}.conv.weight");
    let shape = &t
        .get(&weight_name)
        .ok_or_else(|| EngineError(format!("missing tensor `{weight_name}`")))?
        .shape;
    if *shape != spec_conv.weight_shape() {
        return Err(EngineError(format!(
            "`{weight_name}` is {shape:?}, the spec needs {:?}",
            spec_conv.weight_shape()
        )));
    }
    let (cout, cin_g, k) = (shape[0], shape[1], shape[2]);
    let w = tensor(t, &weight_name, cout * cin_g * k * k)?;
    let bn = |name: &str| tensor(t, &format!("{path}.bn.{name}"), cout);
    let (gamma, beta, mean, var) = (
        bn("weight")?,
        bn("bias")?,
        bn("running_mean")?,
        bn("running_var")?,
    );
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(g, v)| (*g as f64 / (*v as f64 + eps).sqrt()) as f32)
        .collect();
    let bias: Vec<f32> = (0..cout).map(|o| beta[o] - mean[o] * scale[o]).collect();
    // One repacking serves all three kinds: `[k*k*cin_g x cout]` rows ordered (tap, input channel).
    // For 1x1 that is `[cin x cout]`; for depthwise (cin_g = 1) it is `[k*k x c]`.
    let kk = k * k;
    let mut weight = vec![0.0; kk * cin_g * cout];
    for o in 0..cout {
        for i in 0..cin_g {
            for tap in 0..kk {
                weight[(tap * cin_g + i) * cout + o] = w[(o * cin_g + i) * kk + tap] * scale[o];
            }
        }
    }
    let cin = spec_conv.in_channels;
    let packed = if kind != ConvKind::Depthwise && microkernel::available() {
        microkernel::pack(&weight, kk * cin_g, cout)
    } else {
        Vec::new()
    };
    // Keep one copy: the packed weights replace the plain ones.
    let weight = if packed.is_empty() {
        weight
    } else {
        Vec::new()
    };
    Ok(Conv {
        name: path.to_string(),
        kind,
        kernel: k,
        stride: spec_conv.stride,
        cin,
        cout,
        weight,
        packed,
        bias,
        act,
    })
}

/// `[out, in, 1, 1]` (or `[out, in]`) to `[in x out]`.
fn transpose_dense(w: &[f32], out: usize) -> Vec<f32> {
    let inp = w.len() / out;
    let mut p = vec![0.0; w.len()];
    for o in 0..out {
        for i in 0..inp {
            p[i * out + o] = w[o * inp + i];
        }
    }
    p
}

/// Spatial geometry of a conv on an `h x w` input.
fn geometry(padding: Padding, h: usize, w: usize, kernel: usize, stride: usize) -> Geometry {
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
const PARTS_PER_THREAD: usize = 8;

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
/// with `cout` columns (`out` and `residual` hold the block's rows at full width): the AVX-512
/// kernel when the weights are packed, else the `gemm` crate and a separate epilogue.
#[allow(clippy::too_many_arguments)]
fn gemm_bias_act(
    conv: &Conv,
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
    if !conv.packed.is_empty() {
        let bias = &conv.bias;
        microkernel::gemm_bias_act(
            a,
            k,
            m,
            (weight, gate),
            (c0, nc),
            bias,
            conv.act,
            residual,
            out,
            cout,
        );
        return;
    }
    assert!(gate.is_none(), "input gates need the microkernel");
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

/// The compiled network plus its reusable buffers.
pub struct Engine {
    pub meta: WeightMeta,
    stem: Conv,
    blocks: Vec<BlockPlan>,
    head: Conv,
    fc_w: Vec<f32>,
    fc_b: Vec<f32>,
    arena: Arena,
    pool: Pool,
    adapt: Adapt,
    single: std::cell::Cell<bool>,
}

/// Keeps multi-threading honest on a loaded machine: the engine uses whichever mode (all threads or
/// one) has the lower recent time per pass (per input shape), and re-times the other on the 4th
/// pass and every [`Adapt::PROBE`]-th. A worker preempted by another process otherwise stalls every
/// parallel region it joined.
#[derive(Default)]
struct Adapt {
    shape: (usize, usize, usize),
    calls: u64,
    multi: Option<f64>,
    single: Option<f64>,
    /// Whether the current pass re-times the mode not in use.
    probing: bool,
}

impl Adapt {
    const PROBE: u64 = 16;

    fn choose_single(&mut self, threads: usize, shape: (usize, usize, usize)) -> bool {
        if threads == 1 {
            return true;
        }
        if shape != self.shape {
            *self = Adapt {
                shape,
                ..Adapt::default()
            };
        }
        self.calls += 1;
        self.probing = false;
        match (self.multi, self.single) {
            // The first pass (buffer allocation, cold caches) is not recorded.
            (None, _) => false,
            (Some(_), None) => true,
            // The 4th pass re-times the mode not in use at once: the first timing of each mode may
            // include a worker's first-touch allocations (which kept B0 on one thread for a whole
            // 50-pass benchmark while two threads were 1.9x faster).
            _ if self.calls == 4 || self.calls.is_multiple_of(Self::PROBE) => {
                self.probing = true;
                !self.prefers_single()
            }
            _ => self.prefers_single(),
        }
    }

    fn prefers_single(&self) -> bool {
        matches!((self.multi, self.single), (Some(m), Some(s)) if s < m)
    }

    fn record(&mut self, single: bool, seconds: f64) {
        if self.calls <= 1 {
            return;
        }
        let probing = self.probing;
        let slot = if single {
            &mut self.single
        } else {
            &mut self.multi
        };
        // A probe's time replaces the old one (which may date from warm-up or another load); the
        // mode in use keeps a running average.
        *slot = Some(match *slot {
            Some(old) if !probing => 0.75 * old + 0.25 * seconds,
            _ => seconds,
        });
    }
}

impl Engine {
    /// Compiles `set` (canonical tensors of any variant) into an engine.
    pub fn new(set: &WeightSet) -> Result<Self, EngineError> {
        let spec = set.spec();
        let t = &set.tensors;
        let anatomy = spec.anatomy();
        let conv = |c: &SpecConv| fold(t, c, spec.bn_eps, c.act.then_some(spec.activation));
        let mut blocks = Vec::new();
        for b in &anatomy.blocks {
            let se = match &b.se {
                Some([reduce, expand]) => {
                    let (c, r) = (expand.out_channels, reduce.out_channels);
                    let w1 = tensor(t, &format!("{}.weight", reduce.path), c * r)?;
                    let w2 = tensor(t, &format!("{}.weight", expand.path), c * r)?;
                    Some(Se {
                        name: format!("blocks.{}.se", b.pos.index),
                        channels: expand.out_channels,
                        reduced: reduce.out_channels,
                        w1: transpose_dense(w1, reduce.out_channels),
                        b1: tensor(t, &format!("{}.bias", reduce.path), r)?.to_vec(),
                        w2: transpose_dense(w2, expand.out_channels),
                        b2: tensor(t, &format!("{}.bias", expand.path), c)?.to_vec(),
                        act: spec.activation,
                    })
                }
                None => None,
            };
            blocks.push(BlockPlan {
                expand: b.expand.as_ref().map(conv).transpose()?,
                dw: b.depthwise.as_ref().map(conv).transpose()?,
                se,
                project: b.project.as_ref().map(conv).transpose()?,
                residual: b.layer.residual,
                cin: b.layer.in_channels,
                cout: b.layer.out_channels,
            });
        }
        let (classes, features) = (
            anatomy.classifier.out_channels,
            anatomy.classifier.in_channels,
        );
        let fc = tensor(t, "classifier.weight", classes * features)?;
        let fc_b = tensor(t, "classifier.bias", classes)?.to_vec();
        Ok(Engine {
            meta: set.meta.clone(),
            stem: conv(&anatomy.stem)?,
            blocks,
            head: conv(&anatomy.head)?,
            fc_w: transpose_dense(fc, fc_b.len()),
            fc_b,
            arena: Arena::default(),
            pool: Pool::new(1),
            adapt: Adapt::default(),
            single: std::cell::Cell::new(true),
        })
    }

    pub fn num_classes(&self) -> usize {
        self.fc_b.len()
    }

    /// Runs on `threads` threads (the caller's plus sleeping workers; see [`pool`]).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.pool = Pool::new(threads);
        self
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Logits `[n x classes]` for `n` NCHW images of `h x w` (any size).
    pub fn forward(&mut self, input: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        assert_eq!(input.len(), n * 3 * h * w, "input must be n x 3 x h x w");
        let mut a = std::mem::take(&mut self.arena);
        let single = self.adapt.choose_single(self.pool.threads(), (n, h, w));
        self.single.set(single);
        let start = std::time::Instant::now();
        let logits = self.forward_images(&mut a, input, n, h, w);
        self.adapt.record(single, start.elapsed().as_secs_f64());
        self.arena = a;
        logits
    }

    /// Threads the current forward pass uses (1 while [`Adapt`] probes or prefers one).
    fn active_threads(&self) -> usize {
        if self.single.get() {
            1
        } else {
            self.pool.threads()
        }
    }

    fn run_parts(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.single.get() {
            (0..parts).for_each(f);
        } else {
            self.pool.run(parts, f);
        }
    }

    fn forward_images(
        &self,
        a: &mut Arena,
        input: &[f32],
        n: usize,
        h: usize,
        w: usize,
    ) -> Vec<f32> {
        // NCHW -> NHWC.
        grow(&mut a.x, n * h * w * 3);
        for img in 0..n {
            for c in 0..3 {
                for p in 0..h * w {
                    a.x[(img * h * w + p) * 3 + c] = input[(img * 3 + c) * h * w + p];
                }
            }
        }
        let mut shape = self.conv(&self.stem, &a.x, &mut a.y, n, (h, w), None);
        std::mem::swap(&mut a.x, &mut a.y);
        for b in &self.blocks {
            shape = self.block(b, a, n, shape);
            std::mem::swap(&mut a.x, &mut a.y);
        }
        let (hh, hw) = self.pointwise(
            self.head.gemm_weight(),
            None,
            &self.head,
            (&a.x, &mut a.y),
            n,
            shape,
            None,
        );
        let c = self.head.cout;
        let classes = self.fc_b.len();
        let _t = profile::layer(
            "pool + classifier",
            || format!("pool + classifier {c}->{classes}"),
            || (n * c * classes) as u64,
        );
        let mut logits = vec![0.0; n * classes];
        let mut pooled = vec![0.0; c];
        for img in 0..n {
            mean_rows(
                &a.y[img * hh * hw * c..(img + 1) * hh * hw * c],
                &mut pooled,
            );
            kernels::gemv(
                &pooled,
                &self.fc_w,
                &self.fc_b,
                &mut logits[img * classes..(img + 1) * classes],
                None,
            );
        }
        logits
    }

    /// One block from `a.x` (its input) into `a.y`; returns the output spatial shape.
    fn block(
        &self,
        b: &BlockPlan,
        a: &mut Arena,
        n: usize,
        shape: (usize, usize),
    ) -> (usize, usize) {
        // The running tensor moves x -> t1 (expand) -> t2 (depthwise) -> y (project).
        let mut at = Buf::X;
        let mut cur = shape;
        // Channel sums for SE, filled by the depthwise conv when there is one.
        let mut pool = match (&b.dw, &b.se) {
            (Some(dw), Some(_)) => vec![0.0; n * dw.cout],
            _ => Vec::new(),
        };
        let split = match (&b.expand, &b.dw) {
            (Some(e), Some(dw)) if e.kind == ConvKind::Pointwise => self.fused_split(dw, n, cur.0),
            _ => None,
        };
        if let (Some(split), Some(e), Some(dw)) = (split, &b.expand, &b.dw) {
            let p = (!pool.is_empty()).then_some(pool.as_mut_slice());
            cur = self.expand_depthwise(e, dw, &a.x, &mut a.t2, n, cur, split, p);
            at = Buf::T2;
        }
        let fused = split.is_some();
        if let Some(e) = b.expand.as_ref().filter(|_| !fused) {
            cur = self.conv(e, &a.x, &mut a.t1, n, cur, None);
            at = Buf::T1;
        }
        if let Some(dw) = b.dw.as_ref().filter(|_| !fused) {
            let src = if at == Buf::X { &a.x } else { &a.t1 };
            let p = (!pool.is_empty()).then_some(pool.as_mut_slice());
            cur = self.conv(dw, src, &mut a.t2, n, cur, p);
            at = Buf::T2;
        }
        let (mh, mw) = cur;
        let mut scaled_weight = false;
        let mut gate = None;
        if let Some(se) = &b.se {
            let c = se.channels;
            let _t = profile::layer(
                "squeeze-excite",
                || format!("{} {c}->{}->{c}", se.name, se.reduced),
                || (n * 2 * c * se.reduced) as u64,
            );
            let mid = if at == Buf::T2 { &mut a.t2 } else { &mut a.t1 };
            let img_len = mh * mw * c;
            if pool.is_empty() {
                pool = vec![0.0; n * c];
                for img in 0..n {
                    mean_rows(
                        &mid[img * img_len..(img + 1) * img_len],
                        &mut pool[img * c..(img + 1) * c],
                    );
                }
            } else {
                pool.iter_mut().for_each(|p| *p /= (mh * mw) as f32);
            }
            let mut hidden = vec![0.0; se.reduced];
            let mut gates = vec![0.0; n * c];
            for img in 0..n {
                kernels::gemv(
                    &pool[img * c..(img + 1) * c],
                    &se.w1,
                    &se.b1,
                    &mut hidden,
                    Some(se.act),
                );
                kernels::gemv(
                    &hidden,
                    &se.w2,
                    &se.b2,
                    &mut gates[img * c..(img + 1) * c],
                    None,
                );
            }
            kernels::sigmoid_inplace(&mut gates);
            match &b.project {
                // One image on the microkernel: it scales the weight rows as it loads them.
                Some(p) if n == 1 && !p.packed.is_empty() => gate = Some(gates),
                // One image with more pixels than output channels: gating the weights is cheaper.
                Some(p) if n == 1 && mh * mw > p.cout => {
                    let len = p.weight.len();
                    grow(&mut a.weight, len);
                    kernels::scale_rows_from(&mut a.weight[..len], &p.weight, &gates);
                    scaled_weight = true;
                }
                _ => {
                    for img in 0..n {
                        kernels::scale_rows(
                            &mut mid[img * img_len..(img + 1) * img_len],
                            &gates[img * c..(img + 1) * c],
                        );
                    }
                }
            }
        }
        let in_len = n * shape.0 * shape.1 * b.cin;
        let mid = match at {
            Buf::X => &a.x,
            Buf::T1 => &a.t1,
            Buf::T2 => &a.t2,
        };
        match &b.project {
            Some(p) => {
                let residual = b.residual.then(|| &a.x[..in_len]);
                let weight = if scaled_weight {
                    &a.weight[..p.gemm_weight().len()]
                } else {
                    p.gemm_weight()
                };
                let io = (&mid[..], &mut a.y);
                self.pointwise(weight, gate.as_deref(), p, io, n, cur, residual)
            }
            None => {
                // Fused-MBConv with e = 1: the expand conv is the whole block.
                let len = n * mh * mw * b.cout;
                grow(&mut a.y, len);
                a.y[..len].copy_from_slice(&mid[..len]);
                if b.residual {
                    for (o, r) in a.y[..len].iter_mut().zip(&a.x[..in_len]) {
                        *o += r;
                    }
                }
                cur
            }
        }
    }

    /// Runs a conv from NHWC `input` into `out`; returns the output spatial shape.
    fn conv(
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
        let _t = profile::layer(
            match conv.kind {
                ConvKind::Depthwise => "depthwise",
                _ => "full conv (im2col+gemm)",
            },
            || {
                let (k, s) = (conv.kernel, conv.stride);
                format!("{} {k}x{k}/{s} {cin}->{cout} {h}x{w}", conv.name)
            },
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
        // Parallel parts: bands of output rows of each image.
        let rows_per_part = match conv.kind {
            ConvKind::Full => (chunk_rows(cout) / g.out_w).max(1),
            _ => g
                .out_h
                .div_ceil(PARTS_PER_THREAD * self.active_threads())
                .max(1),
        };
        let bands = g.out_h.div_ceil(rows_per_part);
        let parts = n * bands;
        let band = |part: usize| {
            let (img, b) = (part / bands, part % bands);
            (
                img,
                b * rows_per_part..((b + 1) * rows_per_part).min(g.out_h),
            )
        };
        let shared_out = SharedMut::new(out);
        if conv.kind == ConvKind::Depthwise {
            // Each part pools into its own row of `partial`, summed per image afterwards.
            let mut partial = vec![0.0f32; if pool.is_some() { parts * cout } else { 0 }];
            let shared_partial = SharedMut::new(&mut partial);
            let with_pool = pool.is_some();
            self.run_parts(parts, &|part| {
                let (img, rows) = band(part);
                let row_len = g.out_w * cout;
                // SAFETY: parts write disjoint row bands of `out` and their own row of `partial`.
                let dst = unsafe {
                    shared_out.slice(img * out_len + rows.start * row_len, rows.len() * row_len)
                };
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
                );
            });
            if let Some(pool) = pool {
                add_partial_pools(pool, &partial, cout, |part| band(part).0);
            }
        } else {
            let row_len = conv.kernel * conv.kernel * cin;
            self.run_parts(parts, &|part| {
                let (img, rows) = band(part);
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
                    gemm_bias_act(conv, conv.gemm_weight(), None, a, m, (0, cout), None, dst);
                });
            });
        }
        (g.out_h, g.out_w)
    }

    /// How [`Engine::expand_depthwise`] splits one image's work across threads, as (bands of output
    /// rows, blocks of channels), or `None` where fusing does not pay. One part per image when the
    /// images keep every thread busy; else row bands while the expanded rows recomputed at band
    /// boundaries add at most 10 % to the expansion; else channel blocks (no overlap, each thread
    /// expands its own channels).
    fn fused_split(&self, dw: &Conv, n: usize, h: usize) -> Option<(usize, usize)> {
        let t = self.active_threads();
        let halo = dw.kernel.saturating_sub(dw.stride);
        if n >= t {
            Some((1, 1))
        } else if (t - 1) * halo * 10 <= h {
            Some((t, 1))
        } else if dw.cout >= microkernel::NR * t {
            Some((1, t))
        } else {
            None
        }
    }

    /// Expand 1x1 conv + depthwise conv without materialising the expanded tensor: each part (a
    /// band of output rows and block of channels of one image, `split` as from
    /// [`Engine::fused_split`]) expands just the input rows its next few output rows read into a
    /// buffer that stays in L2, keeping the rows it shares with the following step, and runs the
    /// depthwise kernel on it. `pool` as in [`Engine::conv`].
    #[allow(clippy::too_many_arguments)]
    fn expand_depthwise(
        &self,
        e: &Conv,
        dw: &Conv,
        input: &[f32],
        out: &mut Vec<f32>,
        n: usize,
        (h, w): (usize, usize),
        (bands, col_parts): (usize, usize),
        pool: Option<&mut [f32]>,
    ) -> (usize, usize) {
        let g = geometry(self.meta.spec.padding, h, w, dw.kernel, dw.stride);
        let (cin, c) = (e.cin, e.cout);
        let (in_len, out_len) = (h * w * cin, g.out_h * g.out_w * c);
        let _t = profile::layer(
            "expand+depthwise",
            || {
                let (k, s) = (dw.kernel, dw.stride);
                format!("{} 1x1 {cin}->{c} + {k}x{k}/{s} {h}x{w}", e.name)
            },
            || (n * (h * w * cin * c + out_len * dw.kernel * dw.kernel)) as u64,
        );
        grow(out, n * out_len);
        let rows_per_part = g.out_h.div_ceil(bands).max(1);
        let bands = g.out_h.div_ceil(rows_per_part);
        let (col_block, col_parts) = panel_blocks(c, col_parts);
        let parts = n * bands * col_parts;
        let band = |part: usize| {
            let (img, b, cp) = (
                part / (bands * col_parts),
                part / col_parts % bands,
                part % col_parts,
            );
            let rows = b * rows_per_part..((b + 1) * rows_per_part).min(g.out_h);
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
        self.run_parts(parts, &|part| {
            let (img, rows, cols) = band(part);
            let x = &input[img * in_len..(img + 1) * in_len];
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
                        let a = &x[hi * w * cin..need_hi * w * cin];
                        let dst = &mut buf[(hi - lo) * row_len..(need_hi - lo) * row_len];
                        let (m, cols) = ((need_hi - hi) * w, (cols.start, cols.len()));
                        gemm_bias_act(e, e.gemm_weight(), None, a, m, cols, None, dst);
                        hi = need_hi;
                    }
                    let out_row = g.out_w * c;
                    // SAFETY: as above; parts that share rows write disjoint channels of them.
                    let dst = unsafe {
                        shared_out.slice(img * out_len + r0 * out_row, (r1 - r0) * out_row)
                    };
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
                    );
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
    fn pointwise(
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
            // Whole 12-row AVX-512 tiles (a multiple of the AVX2 kernel's 3 rows too): a chunk of
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
        self.run_parts(row_parts * col_parts, &|part| {
            let (rp, cp) = (part / col_parts, part % col_parts);
            let (r0, m) = (rp * chunk, chunk.min(rows - rp * chunk));
            let (c0, nc) = (cp * col_block, col_block.min(cout - cp * col_block));
            // SAFETY: each part owns rows r0..r0+m x columns c0..c0+nc of `out`; the slice spans its
            // rows and the other columns of those rows are not touched by this part.
            let dst = unsafe { shared_out.slice(r0 * cout, m * cout) };
            let res = residual.map(|res| &res[r0 * cout..(r0 + m) * cout]);
            let a = &input[r0 * cin..(r0 + m) * cin];
            gemm_bias_act(conv, weight, gate, a, m, (c0, nc), res, dst);
        });
        (h, w)
    }
}

thread_local! {
    /// im2col buffer of each thread (reused across calls).
    static SCRATCH: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
    /// Expanded rows of each thread in [`Engine::expand_depthwise`] (reused across calls).
    static FUSED: std::cell::RefCell<Vec<f32>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Bytes of expanded rows [`Engine::expand_depthwise`] keeps per step (half a typical L2).
const FUSED_BYTES: usize = 512 * 1024;

#[derive(Clone, Copy, PartialEq, Eq)]
enum Buf {
    X,
    T1,
    T2,
}

/// Buffers reused across calls: no allocation per inference once sizes are reached.
#[derive(Default)]
struct Arena {
    x: Vec<f32>,
    y: Vec<f32>,
    t1: Vec<f32>,
    t2: Vec<f32>,
    weight: Vec<f32>,
}

fn grow(v: &mut Vec<f32>, len: usize) {
    if v.len() < len {
        v.resize(len, 0.0);
    }
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
fn add_partial_pools(pool: &mut [f32], partial: &[f32], c: usize, image: impl Fn(usize) -> usize) {
    for (part, sums) in partial.chunks_exact(c).enumerate() {
        let img = image(part);
        for (p, v) in pool[img * c..(img + 1) * c].iter_mut().zip(sums) {
            *p += v;
        }
    }
}

/// Channel means of NHWC rows.
fn mean_rows(x: &[f32], out: &mut [f32]) {
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
    use super::Adapt;

    /// Feeds `Adapt` the time each mode takes (the first multi-threaded pass timed as a warm-up
    /// outlier) and returns the modes it chose, true for one thread.
    fn choices(multi: f64, single: f64, first_multi: f64, passes: usize) -> Vec<bool> {
        let mut adapt = Adapt::default();
        let mut seen_multi = 0;
        (0..passes)
            .map(|_| {
                let one = adapt.choose_single(2, (1, 224, 224));
                let t = if one {
                    single
                } else {
                    seen_multi += 1;
                    if seen_multi == 2 { first_multi } else { multi }
                };
                adapt.record(one, t);
                one
            })
            .collect()
    }

    #[test]
    fn a_slow_first_timing_does_not_keep_the_engine_on_one_thread() {
        // Two threads 1.9x faster, but the first recorded multi-threaded pass took 4x as long.
        let modes = choices(3.2, 6.0, 24.0, 50);
        assert!(
            modes[4..].iter().filter(|&&one| one).count() <= 3,
            "{modes:?}"
        );
    }

    #[test]
    fn a_loaded_machine_settles_on_one_thread() {
        let modes = choices(9.0, 6.0, 9.0, 50);
        assert!(
            modes[4..].iter().filter(|&&one| !one).count() <= 3,
            "{modes:?}"
        );
    }
}
