//! Fused training ops for burn's Flex backend: SiLU, depthwise convolution and training-mode
//! batch norm, each a few passes forward and backward.
//!
//! Why: burn composes SiLU as `x * sigmoid(x)` (scalar libm `expf`, four tensor passes forward,
//! six backward with a second `expf`), computes a depthwise conv's gradients with a transposed
//! convolution plus one sliced conv per channel, and builds batch norm from swapped-axis copies
//! and generic reductions. Replacing them cut the B0 training step by about a third (`effnet
//! bench b0 --train`; commit-by-commit timings in docs/benchmarks.md).
//!
//! The ops are a burn backend extension implemented for `Flex` and `Autodiff<Flex>` with a
//! hand-written backward. On any other backend or dtype [`silu`], [`depthwise_conv2d`] and
//! [`batch_norm`] fall back to burn's own ops; the tests below check that both paths agree
//! (forward and every gradient).

use burn::backend::autodiff::checkpoint::base::Checkpointer;
use burn::backend::autodiff::checkpoint::strategy::CheckpointStrategy;
use burn::backend::autodiff::grads::Gradients;
use burn::backend::autodiff::ops::{Backward, Ops, OpsKind, unary};
use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{
    Autodiff, AutodiffBackend, Backend, Dispatch, DispatchDevice, Flex, TensorMetadata,
    backend_extension,
};
use burn::nn::BatchNorm;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::tensor::{DType, Tensor, TensorData};
use rayon::prelude::*;

use crate::simd::math::{sigmoid, silu as silu_scalar};
use crate::simd::simd_dispatch;
use crate::spec::Padding;

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// x * sigmoid(x).
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Depthwise conv of `x` `[n, c, h, w]` with `weight` `[c, 1, k, k]`, no bias, no dilation;
    /// `padding` is (top, left, bottom, right).
    fn fused_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
    /// Training-mode batch norm of `x` `[n, c, ...]` over all but the channel axis: (output,
    /// batch mean, biased batch variance), the statistics `[c]` and not differentiated.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// SiLU, fused on Flex f32 tensors and burn's `x * sigmoid(x)` elsewhere.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x) {
        return burn::tensor::activation::silu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_silu(x.into_dispatch()))
}

/// `conv.forward(x)` for a depthwise `conv` (groups = channels, square kernel, no bias, no
/// dilation), fused on Flex f32 tensors; any other conv or backend goes through `conv.forward`.
pub fn depthwise_conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    let [_, channels, h, w] = x.dims();
    let [k, kw] = conv.kernel_size;
    let [stride, stride_w] = conv.stride;
    let depthwise = conv.groups == channels
        && conv.weight.dims() == [channels, 1, k, k]
        && k == kw
        && stride == stride_w
        && conv.dilation == [1, 1]
        && conv.bias.is_none();
    if !depthwise || !runs_fused(&x) {
        return conv.forward(x);
    }
    let padding = match conv.padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Same => {
            let ((_, top, bottom), (_, left, right)) = (
                Padding::Same.along(h, k, stride),
                Padding::Same.along(w, k, stride),
            );
            [top, left, bottom, right]
        }
    };
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_depthwise(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        stride,
        padding,
    ))
}

/// `bn.forward(x)`, with the training-mode normalisation fused on Flex f32 tensors. The running
/// statistics are updated exactly as burn's `BatchNorm` does (biased batch variance).
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>) -> Tensor<4> {
    if !(x.device().is_autodiff() && bn.training.is_enabled() && runs_fused(&x)) {
        return bn.forward(x);
    }
    let (out, mean, var) = <Dispatch as FusedOps>::fused_batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
    );
    let out = Tensor::<4>::from_dispatch(out);
    let device = out.device();
    for (running, batch) in [(&bn.running_mean, mean), (&bn.running_var, var)] {
        let batch = Tensor::<1>::from_dispatch(batch).detach();
        let updated = running
            .value_sync()
            .to_device(&device)
            .mul_scalar(1.0 - bn.momentum)
            .add(batch.mul_scalar(bn.momentum));
        running.update(updated.detach());
    }
    out
}

fn runs_fused<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

impl FusedOps for Flex {
    fn fused_silu(x: FlexTensor) -> FlexTensor {
        let x = contiguous(x);
        let xs = f32s(&x);
        let mut y = vec![0.0; xs.len()];
        par_elementwise(xs, &mut y, silu_forward);
        tensor(y, x.shape().to_vec())
    }

    fn fused_depthwise(
        x: FlexTensor,
        weight: FlexTensor,
        stride: usize,
        padding: [usize; 4],
    ) -> FlexTensor {
        let (x, weight) = (contiguous(x), contiguous(weight));
        let [n, c, h, w] = dims4(&x);
        let geom = DwGeometry::new(h, w, weight.shape()[2], stride, padding);
        let y = depthwise_forward(&geom, c, f32s(&x), f32s(&weight));
        tensor(y, vec![n, c, geom.out_h, geom.out_w])
    }

    fn fused_batch_norm_train(
        x: FlexTensor,
        gamma: FlexTensor,
        beta: FlexTensor,
        epsilon: f64,
    ) -> (FlexTensor, FlexTensor, FlexTensor) {
        let (x, gamma, beta) = (contiguous(x), contiguous(gamma), contiguous(beta));
        let shape = x.shape().to_vec();
        let plane = shape[2..].iter().product();
        let (out, mean, var) = batch_norm_forward(
            f32s(&x),
            shape[1],
            plane,
            f32s(&gamma),
            f32s(&beta),
            epsilon as f32,
        );
        let channels = vec![shape[1]];
        (
            tensor(out, shape),
            tensor(mean, channels.clone()),
            tensor(var, channels),
        )
    }
}

impl<C: CheckpointStrategy> FusedOps for Autodiff<Flex, C> {
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct SiluBackward;

        impl Backward<Flex, 1> for SiluBackward {
            type State = FlexTensor;

            fn backward(
                self,
                ops: Ops<FlexTensor, 1>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let x = ops.state;
                unary::<Flex, _>(ops.parents, ops.node, grads, |grad| {
                    let grad = contiguous(grad);
                    let mut out = vec![0.0; f32s(&x).len()];
                    par_elementwise2(f32s(&x), f32s(&grad), &mut out, silu_backward);
                    tensor(out, x.shape().to_vec())
                });
            }
        }

        let node = x.node();
        let x = contiguous(x.into_primitive());
        match SiluBackward.prepare::<C>([node]).compute_bound().stateful() {
            OpsKind::Tracked(prep) => {
                let y = <Flex as FusedOps>::fused_silu(x.clone());
                prep.finish(x, y)
            }
            OpsKind::UnTracked(prep) => prep.finish(<Flex as FusedOps>::fused_silu(x)),
        }
    }

    fn fused_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self> {
        #[derive(Debug)]
        struct DepthwiseBackward;

        impl Backward<Flex, 2> for DepthwiseBackward {
            type State = (FlexTensor, FlexTensor, DwGeometry);

            fn backward(
                self,
                ops: Ops<Self::State, 2>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_w] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, weight, geom) = ops.state;
                let [n, c, h, w] = dims4(&x);
                let (gx, gw) = depthwise_backward(
                    &geom,
                    c,
                    f32s(&x),
                    f32s(&weight),
                    f32s(&grad),
                    node_x.is_some(),
                );
                if let Some(node) = node_x {
                    grads.register::<Flex>(node.id, tensor(gx, vec![n, c, h, w]));
                }
                if let Some(node) = node_w {
                    grads.register::<Flex>(node.id, tensor(gw, weight.shape().to_vec()));
                }
            }
        }

        let nodes = [x.node(), weight.node()];
        let x = contiguous(x.into_primitive());
        let weight = contiguous(weight.into_primitive());
        let y = <Flex as FusedOps>::fused_depthwise(x.clone(), weight.clone(), stride, padding);
        match DepthwiseBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => {
                let [_, _, h, w] = dims4(&x);
                let geom = DwGeometry::new(h, w, weight.shape()[2], stride, padding);
                prep.finish((x, weight, geom), y)
            }
            OpsKind::UnTracked(prep) => prep.finish(y),
        }
    }

    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>) {
        #[derive(Debug)]
        struct BatchNormBackward;

        impl Backward<Flex, 3> for BatchNormBackward {
            /// x, gamma, batch mean, batch variance, epsilon.
            type State = (FlexTensor, FlexTensor, FlexTensor, FlexTensor, f32);

            fn backward(
                self,
                ops: Ops<Self::State, 3>,
                grads: &mut Gradients,
                _: &mut Checkpointer,
            ) {
                let [node_x, node_gamma, node_beta] = ops.parents;
                let grad = contiguous(grads.consume::<Flex>(&ops.node));
                let (x, gamma, mean, var, epsilon) = ops.state;
                let channels = gamma.shape()[0];
                let (gx, ggamma, gbeta) = batch_norm_backward(
                    f32s(&x),
                    f32s(&grad),
                    x.shape()[2..].iter().product(),
                    f32s(&gamma),
                    f32s(&mean),
                    f32s(&var),
                    epsilon,
                    node_x.is_some(),
                );
                if let Some(node) = node_x {
                    grads.register::<Flex>(node.id, tensor(gx, x.shape().to_vec()));
                }
                if let Some(node) = node_gamma {
                    grads.register::<Flex>(node.id, tensor(ggamma, vec![channels]));
                }
                if let Some(node) = node_beta {
                    grads.register::<Flex>(node.id, tensor(gbeta, vec![channels]));
                }
            }
        }

        let nodes = [x.node(), gamma.node(), beta.node()];
        let x = contiguous(x.into_primitive());
        let gamma = contiguous(gamma.into_primitive());
        let (out, mean, var) = <Flex as FusedOps>::fused_batch_norm_train(
            x.clone(),
            gamma.clone(),
            beta.into_primitive(),
            epsilon,
        );
        // The statistics leave untracked, as from burn's own batch_norm_train.
        let stats = (
            Self::from_inner(mean.clone()),
            Self::from_inner(var.clone()),
        );
        let out = match BatchNormBackward
            .prepare::<C>(nodes)
            .compute_bound()
            .stateful()
        {
            OpsKind::Tracked(prep) => prep.finish((x, gamma, mean, var, epsilon as f32), out),
            OpsKind::UnTracked(prep) => prep.finish(out),
        };
        (out, stats.0, stats.1)
    }
}

fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops run on contiguous f32 tensors (checked by runs_fused)")
}

fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}

/// Elements per parallel chunk of the elementwise ops: big enough to hide rayon's overhead.
const CHUNK: usize = 1 << 14;

fn par_elementwise(x: &[f32], out: &mut [f32], f: impl Fn(&[f32], &mut [f32]) + Sync) {
    out.par_chunks_mut(CHUNK)
        .zip(x.par_chunks(CHUNK))
        .for_each(|(o, x)| f(x, o));
}

fn par_elementwise2(
    a: &[f32],
    b: &[f32],
    out: &mut [f32],
    f: impl Fn(&[f32], &[f32], &mut [f32]) + Sync,
) {
    out.par_chunks_mut(CHUNK)
        .zip(a.par_chunks(CHUNK).zip(b.par_chunks(CHUNK)))
        .for_each(|(o, (a, b))| f(a, b, o));
}

simd_dispatch! {
    fn silu_forward(x: &[f32], y: &mut [f32]) {
        for (y, x) in y.iter_mut().zip(x) {
            *y = silu_scalar(*x);
        }
    }
}

simd_dispatch! {
    /// d/dx [x sigmoid(x)] = s (1 + x (1 - s)) with s = sigmoid(x).
    fn silu_backward(x: &[f32], grad: &[f32], out: &mut [f32]) {
        for ((o, x), g) in out.iter_mut().zip(x).zip(grad) {
            let s = sigmoid(*x);
            *o = g * s * x.mul_add(1.0 - s, 1.0);
        }
    }
}

/// Shapes of one depthwise conv plane.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct DwGeometry {
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    top: usize,
    left: usize,
    out_h: usize,
    out_w: usize,
}

/// Outputs `out..out + len` of a plane that read kernel tap `tap` along one input row, starting at
/// `input` and stepping by the stride.
#[derive(Debug, Clone, Copy)]
struct Run {
    out: usize,
    input: usize,
    len: usize,
    tap: usize,
}

impl DwGeometry {
    fn new(h: usize, w: usize, k: usize, stride: usize, padding: [usize; 4]) -> Self {
        let [top, left, bottom, right] = padding;
        DwGeometry {
            h,
            w,
            k,
            stride,
            top,
            left,
            out_h: (h + top + bottom - k) / stride + 1,
            out_w: (w + left + right - k) / stride + 1,
        }
    }

    /// The conv as [`Run`]s. Taps that fall into the padding are left out, so no plane is padded
    /// and tiny maps (a 5x5 kernel on 2x2 or 1x1) cost only their real taps.
    fn runs(&self) -> Vec<Run> {
        let (s, k, w) = (self.stride, self.k, self.w);
        let mut runs = Vec::new();
        for oy in 0..self.out_h {
            for i in 0..k {
                let Some(iy) = (oy * s + i).checked_sub(self.top).filter(|&iy| iy < self.h) else {
                    continue;
                };
                for j in 0..k {
                    // Outputs whose input column ox * s + j - left lies in [0, w).
                    let lo = self.left.saturating_sub(j).div_ceil(s);
                    let hi = (w + self.left)
                        .checked_sub(j + 1)
                        .map_or(0, |last| (last / s + 1).min(self.out_w));
                    if lo < hi {
                        runs.push(Run {
                            out: oy * self.out_w + lo,
                            input: iy * w + lo * s + j - self.left,
                            len: hi - lo,
                            tap: i * k + j,
                        });
                    }
                }
            }
        }
        runs
    }
}

/// Planes per parallel task: enough work to hide rayon's overhead on the tiny late-stage maps.
fn planes_per_task(plane: usize) -> usize {
    (4096 / plane.max(1)).max(1)
}

/// Output planes `[n, c, out_h, out_w]` of the depthwise conv.
fn depthwise_forward(geom: &DwGeometry, channels: usize, x: &[f32], weight: &[f32]) -> Vec<f32> {
    let (plane, out_plane) = (geom.h * geom.w, geom.out_h * geom.out_w);
    let runs = geom.runs();
    let per_task = planes_per_task(plane);
    let mut out = vec![0.0; x.len() / plane * out_plane];
    out.par_chunks_mut(per_task * out_plane)
        .zip(x.par_chunks(per_task * plane))
        .enumerate()
        .for_each(|(t, (o, x))| {
            depthwise_planes_forward(&runs, geom, t * per_task, channels, x, weight, o)
        });
    out
}

/// (input gradient, weight gradient) of the depthwise conv; the input gradient is empty when
/// `want_input` is false.
fn depthwise_backward(
    geom: &DwGeometry,
    channels: usize,
    x: &[f32],
    weight: &[f32],
    grad: &[f32],
    want_input: bool,
) -> (Vec<f32>, Vec<f32>) {
    let plane = geom.h * geom.w;
    let taps = geom.k * geom.k;
    let runs = geom.runs();
    let mut gx = vec![0.0; if want_input { x.len() } else { 0 }];
    let gx_planes = planes_by_channel(&mut gx, plane, channels);
    let batch = x.len() / plane / channels;
    let mut gw = vec![0.0; weight.len()];
    gw.par_chunks_mut(taps)
        .zip(gx_planes.into_par_iter())
        .enumerate()
        .with_min_len(planes_per_task(batch * plane))
        .for_each(|(c, (gw, mut gx))| {
            depthwise_channel_backward(&runs, geom, c, channels, x, weight, grad, &mut gx, gw)
        });
    (gx, gw)
}

/// Splits `buf` (`[n, c, plane]`) into its planes grouped by channel: entry `c` holds channel
/// `c`'s planes across the batch, disjoint slices that per-channel tasks can own.
fn planes_by_channel(buf: &mut [f32], plane: usize, channels: usize) -> Vec<Vec<&mut [f32]>> {
    let mut planes: Vec<Vec<&mut [f32]>> = (0..channels).map(|_| Vec::new()).collect();
    for (i, p) in buf.chunks_mut(plane.max(1)).enumerate() {
        planes[i % channels].push(p);
    }
    planes
}

/// Per-channel sums of `f(p, c)` over the planes `p` (of channel `c = p % channels`) of an
/// `[n, channels, plane]` tensor. The planes are visited in memory order (a channel-major walk
/// would touch every cache line once per channel on 1x1 maps) by tasks of whole images, and the
/// tasks' partial sums are added in a fixed order, so the result does not depend on the threads.
fn channel_sums(
    planes: usize,
    channels: usize,
    plane: usize,
    f: impl Fn(usize, usize) -> f32 + Sync,
) -> Vec<f32> {
    let per_task = planes_per_task(channels * plane) * channels;
    let partials: Vec<Vec<f32>> = (0..planes.div_ceil(per_task))
        .into_par_iter()
        .map(|t| {
            let mut acc = vec![0.0f32; channels];
            for p in t * per_task..((t + 1) * per_task).min(planes) {
                acc[p % channels] += f(p, p % channels);
            }
            acc
        })
        .collect();
    partials
        .into_iter()
        .fold(vec![0.0; channels], |mut total, part| {
            total.iter_mut().zip(part).for_each(|(t, v)| *t += v);
            total
        })
}

/// Calls `f(p, c, out_plane)` for every plane of `out` (`[n, channels, plane]`), in parallel.
fn for_each_plane(
    out: &mut [f32],
    channels: usize,
    plane: usize,
    f: impl Fn(usize, usize, &mut [f32]) + Sync,
) {
    let per_task = planes_per_task(plane);
    out.par_chunks_mut(per_task * plane)
        .enumerate()
        .for_each(|(t, chunk)| {
            for (i, o) in chunk.chunks_exact_mut(plane).enumerate() {
                let p = t * per_task + i;
                f(p, p % channels, o);
            }
        });
}

/// (output, mean, biased variance) of training-mode batch norm of `x` `[n, channels, plane]`;
/// statistics per channel over the batch and the plane, in two passes (mean, then squared
/// deviations) as burn computes them.
fn batch_norm_forward(
    x: &[f32],
    channels: usize,
    plane: usize,
    gamma: &[f32],
    beta: &[f32],
    epsilon: f32,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let planes = x.len() / plane;
    let count = (planes / channels * plane) as f32;
    let at = |p: usize| &x[p * plane..(p + 1) * plane];
    let mean: Vec<f32> = channel_sums(planes, channels, plane, |p, _| sum(at(p)))
        .into_iter()
        .map(|s| s / count)
        .collect();
    let var: Vec<f32> = channel_sums(planes, channels, plane, |p, c| {
        squared_deviation(at(p), mean[c])
    })
    .into_iter()
    .map(|s| s / count)
    .collect();
    let mut out = vec![0.0; x.len()];
    for_each_plane(&mut out, channels, plane, |p, c, o| {
        let scale = gamma[c] / (var[c] + epsilon).sqrt();
        normalize(at(p), mean[c], scale, beta[c], o);
    });
    (out, mean, var)
}

/// (input gradient, gamma gradient, beta gradient) of training-mode batch norm of `x`
/// `[n, channels, plane]`; the input gradient is empty when `want_input` is false.
///
/// With xhat = (x - mean) / std: d beta = sum g, d gamma = sum g xhat, and
/// dx = gamma / std (g - d beta / m - xhat d gamma / m) over the m values of a channel.
#[allow(clippy::too_many_arguments)]
fn batch_norm_backward(
    x: &[f32],
    grad: &[f32],
    plane: usize,
    gamma: &[f32],
    mean: &[f32],
    var: &[f32],
    epsilon: f32,
    want_input: bool,
) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let channels = gamma.len();
    let planes = x.len() / plane;
    let count = (planes / channels * plane) as f32;
    let g_at = |p: usize| &grad[p * plane..(p + 1) * plane];
    let x_at = |p: usize| &x[p * plane..(p + 1) * plane];
    let gbeta = channel_sums(planes, channels, plane, |p, _| sum(g_at(p)));
    let gxc = channel_sums(planes, channels, plane, |p, c| {
        centered_dot(g_at(p), x_at(p), mean[c])
    });
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + epsilon).sqrt()).collect();
    let ggamma = gxc.iter().zip(&inv_std).map(|(s, i)| s * i).collect();
    let mut gx = vec![0.0; if want_input { x.len() } else { 0 }];
    for_each_plane(&mut gx, channels, plane, |p, c, o| {
        // dx = a g + b (x - mean) + d with per-channel constants.
        let a = gamma[c] * inv_std[c];
        let b = -a * inv_std[c] * inv_std[c] * gxc[c] / count;
        let d = -a * gbeta[c] / count - b * mean[c];
        affine2(g_at(p), x_at(p), a, b, d, o);
    });
    (gx, ggamma, gbeta)
}

simd_dispatch! {
    /// Sum of a slice, eight lanes at a time.
    fn sum(x: &[f32]) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for chunk in &mut chunks {
            for (a, v) in acc.iter_mut().zip(chunk) {
                *a += v;
            }
        }
        acc.iter().sum::<f32>() + chunks.remainder().iter().sum::<f32>()
    }
}

simd_dispatch! {
    /// `sum (x - mean)^2`, eight lanes at a time.
    fn squared_deviation(x: &[f32], mean: f32) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut chunks = x.chunks_exact(8);
        for chunk in &mut chunks {
            for (a, x) in acc.iter_mut().zip(chunk) {
                *a = (x - mean).mul_add(x - mean, *a);
            }
        }
        let rest: f32 = chunks.remainder().iter().map(|x| (x - mean) * (x - mean)).sum();
        acc.iter().sum::<f32>() + rest
    }
}

simd_dispatch! {
    /// `sum g (x - mean)`, eight lanes at a time.
    fn centered_dot(g: &[f32], x: &[f32], mean: f32) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut chunks = g.chunks_exact(8).zip(x.chunks_exact(8));
        for (g, x) in &mut chunks {
            for ((a, g), x) in acc.iter_mut().zip(g).zip(x) {
                *a = g.mul_add(x - mean, *a);
            }
        }
        let tail = g.len() / 8 * 8;
        let rest: f32 = g[tail..].iter().zip(&x[tail..]).map(|(g, x)| g * (x - mean)).sum();
        acc.iter().sum::<f32>() + rest
    }
}

simd_dispatch! {
    /// `out = (x - mean) * scale + shift`.
    fn normalize(x: &[f32], mean: f32, scale: f32, shift: f32, out: &mut [f32]) {
        for (o, x) in out.iter_mut().zip(x) {
            *o = (x - mean).mul_add(scale, shift);
        }
    }
}

simd_dispatch! {
    /// `out = a g + b x + d`.
    fn affine2(g: &[f32], x: &[f32], a: f32, b: f32, d: f32, out: &mut [f32]) {
        for ((o, g), x) in out.iter_mut().zip(g).zip(x) {
            *o = g.mul_add(a, x.mul_add(b, d));
        }
    }
}

// The loops below take the stride `s` as an argument; each entry point passes it as a literal for
// the strides EfficientNets use, so LLVM specialises (and vectorises) the unit-stride case.

/// `o[l] += wv * x[l * s]`.
#[inline(always)]
fn axpy(o: &mut [f32], x: &[f32], s: usize, wv: f32) {
    #[inline(always)]
    fn run(o: &mut [f32], x: &[f32], s: usize, wv: f32) {
        let mut chunks = o.chunks_exact_mut(8);
        let mut xi = 0;
        for chunk in &mut chunks {
            let xs = &x[xi..xi + 7 * s + 1];
            for (q, v) in chunk.iter_mut().enumerate() {
                *v = wv.mul_add(xs[q * s], *v);
            }
            xi += 8 * s;
        }
        for (q, v) in chunks.into_remainder().iter_mut().enumerate() {
            *v = wv.mul_add(x[xi + q * s], *v);
        }
    }
    match s {
        1 => run(o, x, 1, wv),
        2 => run(o, x, 2, wv),
        _ => run(o, x, s, wv),
    }
}

/// `dst[l * s] += wv * g[l]`.
#[inline(always)]
fn axpy_strided(dst: &mut [f32], g: &[f32], s: usize, wv: f32) {
    #[inline(always)]
    fn run(dst: &mut [f32], g: &[f32], s: usize, wv: f32) {
        let mut chunks = g.chunks_exact(8);
        let mut di = 0;
        for chunk in &mut chunks {
            let ds = &mut dst[di..di + 7 * s + 1];
            for (q, &gv) in chunk.iter().enumerate() {
                ds[q * s] = wv.mul_add(gv, ds[q * s]);
            }
            di += 8 * s;
        }
        for (q, &gv) in chunks.remainder().iter().enumerate() {
            dst[di + q * s] = wv.mul_add(gv, dst[di + q * s]);
        }
    }
    match s {
        1 => run(dst, g, 1, wv),
        2 => run(dst, g, 2, wv),
        _ => run(dst, g, s, wv),
    }
}

/// `sum_l g[l] * x[l * s]`.
#[inline(always)]
fn dot(g: &[f32], x: &[f32], s: usize) -> f32 {
    #[inline(always)]
    fn run(g: &[f32], x: &[f32], s: usize) -> f32 {
        let mut acc = [0.0f32; 8];
        let mut chunks = g.chunks_exact(8);
        let mut xi = 0;
        for chunk in &mut chunks {
            let xs = &x[xi..xi + 7 * s + 1];
            for (q, (a, &gv)) in acc.iter_mut().zip(chunk).enumerate() {
                *a = gv.mul_add(xs[q * s], *a);
            }
            xi += 8 * s;
        }
        let mut sum: f32 = acc.iter().sum();
        for (q, &gv) in chunks.remainder().iter().enumerate() {
            sum = gv.mul_add(x[xi + q * s], sum);
        }
        sum
    }
    match s {
        1 => run(g, x, 1),
        2 => run(g, x, 2),
        _ => run(g, x, s),
    }
}

simd_dispatch! {
    /// Forward of consecutive planes, the first being plane number `first_plane` of the tensor.
    fn depthwise_planes_forward(
        runs: &[Run],
        geom: &DwGeometry,
        first_plane: usize,
        channels: usize,
        x: &[f32],
        weight: &[f32],
        out: &mut [f32],
    ) {
        let taps = geom.k * geom.k;
        let out_planes = out.chunks_exact_mut(geom.out_h * geom.out_w);
        for (p, (o, x)) in out_planes.zip(x.chunks_exact(geom.h * geom.w)).enumerate() {
            let c = (first_plane + p) % channels;
            let w = &weight[c * taps..(c + 1) * taps];
            for r in runs {
                axpy(&mut o[r.out..r.out + r.len], &x[r.input..], geom.stride, w[r.tap]);
            }
        }
    }
}

simd_dispatch! {
    /// Backward of channel `c` over the batch: accumulates its weight gradient into `gw` and
    /// writes its input-gradient planes `gx` (none when the input needs no gradient).
    fn depthwise_channel_backward(
        runs: &[Run],
        geom: &DwGeometry,
        c: usize,
        channels: usize,
        x: &[f32],
        weight: &[f32],
        grad: &[f32],
        gx: &mut [&mut [f32]],
        gw: &mut [f32],
    ) {
        let (plane, out_plane, taps) = (geom.h * geom.w, geom.out_h * geom.out_w, geom.k * geom.k);
        let s = geom.stride;
        let w = &weight[c * taps..(c + 1) * taps];
        for b in 0..x.len() / plane / channels {
            let p = b * channels + c;
            let x = &x[p * plane..(p + 1) * plane];
            let g = &grad[p * out_plane..(p + 1) * out_plane];
            for r in runs {
                gw[r.tap] += dot(&g[r.out..r.out + r.len], &x[r.input..], s);
            }
            if let Some(gx) = gx.get_mut(b) {
                for r in runs {
                    axpy_strided(&mut gx[r.input..], &g[r.out..r.out + r.len], s, w[r.tap]);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::module::Param;
    use burn::nn::BatchNormConfig;
    use burn::nn::conv::Conv2dConfig;
    use burn::tensor::{Device, Distribution};

    fn max_diff<const D: usize>(a: Tensor<D>, b: Tensor<D>) -> f32 {
        (a - b).abs().max().into_scalar()
    }

    /// Max difference relative to the largest reference value (sums of hundreds of products
    /// differ in float rounding with the summation order).
    fn rel_diff<const D: usize>(a: Tensor<D>, reference: Tensor<D>) -> f32 {
        let scale: f32 = reference.clone().abs().max().into_scalar();
        max_diff(a, reference) / scale.max(1.0)
    }

    /// The fused SiLU and its gradient match burn's composed `x * sigmoid(x)`.
    #[test]
    fn silu_matches_burn() {
        let device = Device::flex().autodiff();
        let x =
            Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 4.0), &device).require_grad();
        let g = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 1.0), &device);
        let fused = silu(x.clone());
        let reference = burn::tensor::activation::silu(x.clone());
        assert!(max_diff(fused.clone().detach(), reference.clone().detach()) < 1e-5);
        let gf = x.grad(&(fused * g.clone()).sum().backward()).unwrap();
        let gr = x.grad(&(reference * g).sum().backward()).unwrap();
        assert!(max_diff(gf, gr) < 1e-5);
    }

    /// Output and both gradients equal burn's grouped conv for the strides, kernels and padding
    /// modes EfficientNets use (TF "same" pads asymmetrically at stride 2).
    #[test]
    fn depthwise_matches_burn_conv() {
        let device = Device::flex().autodiff();
        for (k, stride, size, padding) in [
            (3, 1, 8, PaddingConfig2d::Explicit(1, 1, 1, 1)),
            (3, 2, 8, PaddingConfig2d::Explicit(1, 1, 1, 1)),
            (5, 2, 9, PaddingConfig2d::Explicit(2, 2, 2, 2)),
            (3, 2, 8, PaddingConfig2d::Same),
            (5, 2, 7, PaddingConfig2d::Same),
            (5, 1, 4, PaddingConfig2d::Same),
            (3, 1, 1, PaddingConfig2d::Same),
            (5, 1, 1, PaddingConfig2d::Same),
            (5, 2, 2, PaddingConfig2d::Same),
            (5, 1, 2, PaddingConfig2d::Explicit(2, 2, 2, 2)),
            (3, 1, 16, PaddingConfig2d::Same),
            (3, 2, 17, PaddingConfig2d::Explicit(1, 1, 1, 1)),
            (5, 2, 20, PaddingConfig2d::Same),
        ] {
            let channels = 6;
            let conv = Conv2dConfig::new([channels, channels], [k, k])
                .with_stride([stride, stride])
                .with_groups(channels)
                .with_padding(padding.clone())
                .with_bias(false)
                .init(&device);
            let x = Tensor::<4>::random([3, channels, size, size], Distribution::Default, &device)
                .require_grad();
            let fused = depthwise_conv2d(&conv, x.clone());
            let reference = conv.forward(x.clone());
            assert_eq!(
                fused.dims(),
                reference.dims(),
                "k {k} s {stride} {padding:?}"
            );
            let g = Tensor::<4>::random(fused.dims(), Distribution::Default, &device);
            assert!(max_diff(fused.clone().detach(), reference.clone().detach()) < 1e-5);
            let gf = (fused * g.clone()).sum().backward();
            let gr = (reference * g).sum().backward();
            let case = format!("k {k} s {stride} size {size} {padding:?}");
            let (gxf, gxr) = (x.grad(&gf).unwrap(), x.grad(&gr).unwrap());
            assert!(rel_diff(gxf, gxr) < 1e-5, "input grad, {case}");
            let w = conv.weight.val();
            let (gwf, gwr) = (w.grad(&gf).unwrap(), w.grad(&gr).unwrap());
            assert!(rel_diff(gwf, gwr) < 1e-5, "weight grad, {case}");
        }
    }

    fn batch_norm_layer(channels: usize, device: &Device) -> BatchNorm {
        let mut bn = BatchNormConfig::new(channels)
            .with_momentum(0.1)
            .init(device);
        let values = |offset: f32| {
            let v: Vec<f32> = (0..channels).map(|c| offset + 0.25 * c as f32).collect();
            Param::from_tensor(Tensor::<1>::from_floats(v.as_slice(), device))
        };
        bn.gamma = values(0.5);
        bn.beta = values(-0.3);
        bn
    }

    /// Output, running statistics and the gradients of input, gamma and beta equal burn's
    /// `BatchNorm` in training mode, for the shapes B0 trains with (down to 1x1 maps).
    #[test]
    fn batch_norm_matches_burn() {
        let device = Device::flex().autodiff();
        for shape in [[4, 6, 5, 5], [64, 3, 1, 1], [2, 5, 9, 1], [3, 4, 16, 16]] {
            let (fused_bn, burn_bn) = (
                batch_norm_layer(shape[1], &device),
                batch_norm_layer(shape[1], &device),
            );
            let x =
                Tensor::<4>::random(shape, Distribution::Normal(3.0, 2.0), &device).require_grad();
            let fused = batch_norm(&fused_bn, x.clone());
            let reference = burn_bn.forward(x.clone());
            let case = format!("{shape:?}");
            assert!(
                rel_diff(fused.clone().detach(), reference.clone().detach()) < 1e-5,
                "{case}"
            );
            for (a, b) in [
                (&fused_bn.running_mean, &burn_bn.running_mean),
                (&fused_bn.running_var, &burn_bn.running_var),
            ] {
                assert!(
                    rel_diff(a.value(), b.value()) < 1e-5,
                    "running stats, {case}"
                );
            }
            let g = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
            let gf = (fused * g.clone()).sum().backward();
            let gr = (reference * g).sum().backward();
            assert!(
                rel_diff(x.grad(&gf).unwrap(), x.grad(&gr).unwrap()) < 1e-4,
                "x, {case}"
            );
            for (pf, pr) in [
                (&fused_bn.gamma, &burn_bn.gamma),
                (&fused_bn.beta, &burn_bn.beta),
            ] {
                let (a, b) = (pf.val().grad(&gf).unwrap(), pr.val().grad(&gr).unwrap());
                assert!(rel_diff(a, b) < 1e-5, "gamma/beta, {case}");
            }
        }
    }

    /// Off Flex-f32 (here: a non-depthwise conv) the wrapper is exactly `conv.forward`.
    #[test]
    fn non_depthwise_conv_falls_back() {
        let device = Device::flex();
        let conv = Conv2dConfig::new([4, 6], [3, 3]).init(&device);
        let x = Tensor::<4>::random([2, 4, 5, 5], Distribution::Default, &device);
        let diff = max_diff(depthwise_conv2d(&conv, x.clone()), conv.forward(x));
        assert_eq!(diff, 0.0);
    }
}
