//! Fused training ops for burn's Flex backend: SiLU, depthwise, 1x1 and full (as 1x1 of their
//! patches) convolutions and training-mode batch norm, each a few passes forward and backward.
//!
//! Why: burn composes SiLU as `x * sigmoid(x)` (scalar libm `expf`, four tensor passes forward,
//! six backward with a second `expf`), computes a conv's gradients with a transposed convolution
//! (plus one sliced conv per channel for a depthwise one) on one thread, and builds batch norm
//! from swapped-axis copies and generic reductions; doing each in a few parallel passes is what
//! makes the Flex training step fast (`effnet bench b0 --train`; figures in docs/benchmarks.md).
//!
//! The ops are a burn backend extension, split by role as burn's custom-kernel example is: this
//! module declares the extension trait and the public ops (which fall back to burn's composed ops
//! elsewhere), [`forward`] implements it for `Flex`, [`backward`] for `Autodiff<Flex>` with a
//! hand-written backward, and [`kernels`] holds the numeric loops both use; [`deferred`] lets the
//! 1x1 backward leave its weight's gradient to idle threads. On any other backend
//! or dtype [`silu`], [`conv2d`], [`depthwise_conv2d`] and [`batch_norm`] fall back to burn's own
//! ops; the tests check that both paths agree (forward and every gradient).

mod backward;
pub mod deferred;
mod forward;
mod kernels;

pub use kernels::{WeightGradientPath, weight_gradient_by};
#[cfg(test)]
mod tests;

use burn::backend::flex::FlexTensor;
use burn::backend::tensor::FloatTensor;
use burn::backend::{Backend, Dispatch, DispatchDevice, TensorMetadata, backend_extension};
use burn::module::RunningState;
use burn::nn::PaddingConfig2d;
use burn::nn::conv::Conv2d;
use burn::nn::{BatchNorm, Dropout};
use burn::tensor::{DType, Device, Distribution, FloatDType, Tensor, TensorData};

use crate::spec::{Activation, Padding};

#[backend_extension(Flex, Autodiff)]
pub trait FusedOps: Backend {
    /// x * sigmoid(x).
    fn fused_silu(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// 1 / (1 + exp(-x)).
    fn fused_sigmoid(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// The sum of the squares of `x`, as a one-element tensor. Not differentiated.
    fn fused_squared_sum(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// Depthwise conv of `x` `[n, c, h, w]` with `weight` `[c, 1, k, k]`, no bias, no dilation;
    /// `padding` is (top, left, bottom, right).
    fn fused_depthwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
    /// The patches of a `k x k` convolution of `x` `[n, c, h, w]` (no dilation; `padding` is
    /// (top, left, bottom, right)): `[n, c k k, out_h, out_w]`, channel `(ch, ky, kx)` holding the
    /// input under that tap at every output position, 0 in the padding.
    fn fused_im2col(
        x: FloatTensor<Self>,
        k: usize,
        stride: usize,
        padding: [usize; 4],
    ) -> FloatTensor<Self>;
    /// 1x1 stride-1 convolution of `x` `[n, ci, h, w]` with `weight` `[co, ci, 1, 1]`, no bias.
    /// `param` is the weight's parameter id when `weight` is that parameter itself, for
    /// [`deferred`] weight gradients.
    fn fused_pointwise(
        x: FloatTensor<Self>,
        weight: FloatTensor<Self>,
        param: Option<u64>,
    ) -> FloatTensor<Self>;
    /// Mean of `x` `[n, c, h, w]` over each plane: `[n, c, 1, 1]`.
    fn fused_spatial_mean(x: FloatTensor<Self>) -> FloatTensor<Self>;
    /// `x` `[n, c, h, w]` times `scale` `[n, c, 1, 1]`, one factor per plane (the squeeze-excite
    /// gate).
    fn fused_plane_scale(x: FloatTensor<Self>, scale: FloatTensor<Self>) -> FloatTensor<Self>;
    /// One TF-RMSProp update of a parameter `w` with gradient `g` and state `ms`, `mom` (see
    /// [`rmsprop_tf`]): (new weights, new mean square, new momentum). Not differentiated.
    fn fused_rmsprop_tf(
        w: FloatTensor<Self>,
        g: FloatTensor<Self>,
        ms: FloatTensor<Self>,
        mom: FloatTensor<Self>,
        coefficients: RmsPropCoefficients,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
    /// Training-mode batch norm of `x` `[n, c, ...]` over all but the channel axis, followed by
    /// `act`: (output, batch mean, biased batch variance), the statistics `[c]` and not
    /// differentiated.
    fn fused_batch_norm_train(
        x: FloatTensor<Self>,
        gamma: FloatTensor<Self>,
        beta: FloatTensor<Self>,
        epsilon: f64,
        act: Option<Activation>,
    ) -> (FloatTensor<Self>, FloatTensor<Self>, FloatTensor<Self>);
}

/// The f32 constants of one TF-RMSProp update.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct RmsPropCoefficients {
    pub lr: f32,
    /// 1 - decay.
    pub decay_complement: f32,
    pub momentum: f32,
    pub epsilon: f32,
    /// The L2 term's factor: the gradient taken is `g + weight_decay w` (0: `g`).
    pub weight_decay: f32,
}

/// TF-RMSProp: `ms += (1 - decay)(g^2 - ms); mom = momentum mom + lr g / sqrt(ms + eps);
/// w -= mom`, with `g + weight_decay w` for `g` when `weight_decay` is not 0; returns (w, ms,
/// mom). One parallel pass on Flex f32 tensors, in place where `w`, `ms` and `mom` are not shared
/// (burn's composed ops take eleven, each allocating, per parameter and step); burn's ops
/// elsewhere, in the same order of f32 operations, so both give the same bits (except the L2
/// term, one rounding fused and two in burn's ops).
pub fn rmsprop_tf<const D: usize>(
    w: Tensor<D>,
    g: Tensor<D>,
    ms: Tensor<D>,
    mom: Tensor<D>,
    c: RmsPropCoefficients,
) -> (Tensor<D>, Tensor<D>, Tensor<D>) {
    if !runs_fused(&w) || [&g, &ms, &mom].iter().any(|t| t.dims() != w.dims()) {
        let g = match c.weight_decay {
            0.0 => g,
            decay => g + w.clone().mul_scalar(decay),
        };
        let ms = ms.clone() + (g.clone().powi_scalar(2) - ms).mul_scalar(c.decay_complement);
        let step = g.mul_scalar(c.lr) / ms.clone().add_scalar(c.epsilon).sqrt();
        let mom = mom.mul_scalar(c.momentum) + step;
        return (w - mom.clone(), ms, mom);
    }
    let (w, ms, mom) = <Dispatch as FusedOps>::fused_rmsprop_tf(
        w.into_dispatch(),
        g.into_dispatch(),
        ms.into_dispatch(),
        mom.into_dispatch(),
        c,
    );
    (
        Tensor::from_dispatch(w),
        Tensor::from_dispatch(ms),
        Tensor::from_dispatch(mom),
    )
}

/// `act` of `x`: [`silu`], or ReLU6 as burn's `relu(x).clamp_max(6.0)`.
pub fn activation<const D: usize>(x: Tensor<D>, act: Activation) -> Tensor<D> {
    match act {
        Activation::Silu => silu(x),
        Activation::Relu6 => burn::tensor::activation::relu(x).clamp_max(6.0),
    }
}

/// SiLU, fused on Flex f32 tensors and burn's `x * sigmoid(x)` elsewhere.
pub fn silu<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x) {
        return burn::tensor::activation::silu(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_silu(x.into_dispatch()))
}

/// Sigmoid (the squeeze-excite gate), fused on Flex f32 tensors: one parallel pass forward and
/// one backward from the saved output (burn's runs serially through libm `expf`).
pub fn sigmoid<const D: usize>(x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x) {
        return burn::tensor::activation::sigmoid(x);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_sigmoid(x.into_dispatch()))
}

/// `sum(x^2)` as a one-element tensor: in parallel on Flex f32 tensors (fixed chunks summed in
/// order, so the value does not depend on the thread count), burn's ops elsewhere. Not
/// differentiated: autodiff tensors take burn's ops.
pub fn squared_sum<const D: usize>(x: Tensor<D>) -> Tensor<1> {
    if !runs_fused(&x) || x.device().is_autodiff() {
        return x.powi_scalar(2).sum();
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_squared_sum(x.into_dispatch()))
}

/// `layer.forward(x)` (inverted dropout: `x * mask * (1 / keep)`, the same bits for the same
/// mask). On Flex f32 tensors the mask is [`kernels::keep_mask`]'s, drawn in parallel from one
/// seed taken from the device's random stream (so a run stays fixed by its seed and step on any
/// number of threads): burn draws its Bernoulli mask one element at a time through a generic
/// sampler, 1.6 % of a B0 training step at 32x32 (docs/benchmarks.md).
pub fn dropout<const D: usize>(layer: &Dropout, x: Tensor<D>) -> Tensor<D> {
    if !runs_fused(&x) {
        return layer.forward(x);
    }
    if !layer.training.is_enabled() || !x.device().is_autodiff() || layer.prob == 0.0 {
        return x;
    }
    let (keep, shape, device) = (1.0 - layer.prob, x.dims(), x.device());
    let mask = keep_mask(shape.iter().product(), keep, (1.0 / keep) as f32, &device);
    x * Tensor::<D>::from_data(TensorData::new(mask, shape), &device)
}

/// Stochastic depth of a residual branch `x` `[n, c, h, w]` in training: each image's branch
/// kept with probability `1 - prob` and scaled by `1 / (1 - prob)`, else zeroed. On Flex f32
/// tensors the per-image mask is [`kernels::keep_mask`]'s and the product [`plane_scale`]'s (in
/// parallel, forward and backward); burn's Bernoulli draw and broadcast product elsewhere.
pub fn drop_path(x: Tensor<4>, prob: f64) -> Tensor<4> {
    let keep = 1.0 - prob;
    let [n, c, _, _] = x.dims();
    let device = x.device();
    if !runs_fused(&x) {
        let mask = Tensor::<4>::random([n, 1, 1, 1], Distribution::Bernoulli(keep), &device);
        return x * mask.div_scalar(keep);
    }
    let per_image = keep_mask(n, keep, 1.0 / keep as f32, &device);
    let per_plane = per_image
        .iter()
        .flat_map(|&m| std::iter::repeat_n(m, c))
        .collect();
    let scale = Tensor::<4>::from_data(TensorData::new(per_plane, [n, c, 1, 1]), &device);
    plane_scale(x, scale)
}

/// `len` floats of [`kernels::keep_mask`] from a seed drawn from `device`'s random stream.
fn keep_mask(len: usize, keep: f64, scale: f32, device: &Device) -> Vec<f32> {
    let draw = Tensor::<1>::random([2], Distribution::Default, device).into_data();
    let seed = draw
        .iter::<f32>()
        .fold(0u64, |seed, v| (seed << 32) | u64::from(v.to_bits()));
    kernels::keep_mask(len, keep, scale, seed)
}

/// `x.mean_dim(3).mean_dim(2)` (global average pooling, kept 4-D), fused on Flex f32 tensors:
/// one sum per plane, and a broadcast backward (burn reduces twice and reduces again backward).
pub fn spatial_mean(x: Tensor<4>) -> Tensor<4> {
    if !runs_fused(&x) {
        return x.mean_dim(3).mean_dim(2);
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_spatial_mean(
        x.into_dispatch(),
    ))
}

/// `x * scale` for `scale` `[n, c, 1, 1]` broadcast over `x` `[n, c, h, w]`, fused on Flex f32
/// tensors (the scale's gradient is one dot product per plane).
pub fn plane_scale(x: Tensor<4>, scale: Tensor<4>) -> Tensor<4> {
    let [n, c, _, _] = x.dims();
    if !runs_fused(&x) || scale.dims() != [n, c, 1, 1] {
        return x * scale;
    }
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_plane_scale(
        x.into_dispatch(),
        scale.into_dispatch(),
    ))
}

/// `conv.forward(x)` for a depthwise `conv` (groups = channels, square kernel, no bias, no
/// dilation), fused on Flex f32 tensors; any other conv or backend goes through `conv.forward`.
pub fn depthwise_conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if let Some((compute, back)) = half_compute(&conv.weight, &x) {
        return depthwise_conv2d(conv, x.cast(compute)).cast(back);
    }
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
    let padding = explicit_padding(&conv.padding, [h, w], k, stride);
    Tensor::from_dispatch(<Dispatch as FusedOps>::fused_depthwise(
        x.into_dispatch(),
        conv.weight.val().into_dispatch(),
        stride,
        padding,
    ))
}

/// (top, left, bottom, right) padding of a `k x k`, `stride` convolution of an `[h, w]` map.
fn explicit_padding(
    padding: &PaddingConfig2d,
    [h, w]: [usize; 2],
    k: usize,
    stride: usize,
) -> [usize; 4] {
    match *padding {
        PaddingConfig2d::Valid => [0; 4],
        PaddingConfig2d::Explicit(top, left, bottom, right) => [top, left, bottom, right],
        PaddingConfig2d::Same => {
            let ((_, top, bottom), (_, left, right)) = (
                Padding::Same.along(h, k, stride),
                Padding::Same.along(w, k, stride),
            );
            [top, left, bottom, right]
        }
    }
}

/// Largest patch matrix (floats, whole batch) [`conv2d`] builds: it is kept for the backward, so
/// bigger convolutions (V2's first Fused-MBConv stages at full resolution) stay on burn's conv.
const MAX_PATCH_FLOATS: usize = 1 << 25;

/// `conv.forward(x)` for a `conv` without groups or dilation, as matrix products on Flex f32
/// tensors: a 1x1 stride-1 unpadded conv directly, any other (the stem) as a 1x1 conv of the
/// input's patches ([`FusedOps::fused_im2col`]) with the weight `[co, ci k k, 1, 1]`. Forward and
/// backward run in parallel by images and output-channel blocks (burn's conv2d backward goes
/// through a transposed convolution and layout copies, one thread). A bias (the squeeze-excite
/// convs) is added by burn's broadcast add. Other convs and backends go through `conv.forward`.
pub fn conv2d(conv: &Conv2d, x: Tensor<4>) -> Tensor<4> {
    if let Some((compute, back)) = half_compute(&conv.weight, &x) {
        return conv2d(conv, x.cast(compute)).cast(back);
    }
    let [n, ci, h, w] = x.dims();
    let [co, weight_ci, k, kw] = conv.weight.dims();
    let [stride, stride_w] = conv.stride;
    let plain = conv.groups == 1
        && conv.dilation == [1, 1]
        && weight_ci == ci
        && k == kw
        && stride == stride_w;
    if !plain || !runs_fused(&x) {
        return conv.forward(x);
    }
    let padding = explicit_padding(&conv.padding, [h, w], k, stride);
    let [top, left, bottom, right] = padding;
    let (x, weight, param) = if k == 1 && stride == 1 && padding == [0; 4] {
        (x, conv.weight.val(), Some(conv.weight.id.val()))
    } else {
        if h + top + bottom < k || w + left + right < k {
            return conv.forward(x);
        }
        let out = kernels::ConvGeometry::new(h, w, k, stride, padding);
        if n * ci * k * k * out.out_h * out.out_w > MAX_PATCH_FLOATS {
            return conv.forward(x);
        }
        let cols = Tensor::<4>::from_dispatch(<Dispatch as FusedOps>::fused_im2col(
            x.into_dispatch(),
            k,
            stride,
            padding,
        ));
        (
            cols,
            conv.weight.val().reshape([co, ci * k * k, 1, 1]),
            None,
        )
    };
    let y = Tensor::<4>::from_dispatch(<Dispatch as FusedOps>::fused_pointwise(
        x.into_dispatch(),
        weight.into_dispatch(),
        param,
    ));
    match &conv.bias {
        Some(bias) => y + bias.val().reshape([1, co, 1, 1]),
        None => y,
    }
}

/// `bn.forward(x)`, then `act` (as [`activation`]), with the training-mode normalisation fused on
/// Flex f32 tensors. The running statistics are updated exactly as burn's `BatchNorm` does (biased
/// batch variance): at once, or when [`hold_running_stats`] holds them, once they are applied.
///
/// The activation is applied as each run of the output is normalised, and its backward recomputes
/// the normalised values from the input the batch norm keeps anyway: the map between the two is
/// neither written, read back nor kept for the backward pass (two passes over it and its memory;
/// burn's ReLU6 is four serial ops).
pub fn batch_norm(bn: &BatchNorm, x: Tensor<4>, act: Option<Activation>) -> Tensor<4> {
    if !(x.device().is_autodiff() && bn.training.is_enabled() && runs_fused(&x)) {
        let y = bn.forward(x);
        return match act {
            Some(act) => activation(y, act),
            None => y,
        };
    }
    let (out, mean, var) = <Dispatch as FusedOps>::fused_batch_norm_train(
        x.into_dispatch(),
        bn.gamma.val().into_dispatch(),
        bn.beta.val().into_dispatch(),
        bn.epsilon,
        act,
    );
    let momentum = bn.momentum as f32;
    for (running, batch) in [(&bn.running_mean, mean), (&bn.running_var, var)] {
        let update = RunningUpdate {
            running: running.clone(),
            batch: Tensor::from_dispatch(batch),
            momentum,
        };
        PENDING.with_borrow_mut(|pending| match pending {
            Some(held) => held.push(update),
            None => update.apply(),
        });
    }
    Tensor::<4>::from_dispatch(out)
}

/// One batch statistic to fold into a batch norm's running statistic.
struct RunningUpdate {
    running: RunningState<Tensor<1>>,
    batch: Tensor<1>,
    momentum: f32,
}

impl RunningUpdate {
    fn apply(self) {
        // On the host: these are a few hundred floats, and burn's four ops per statistic (each
        // allocating, dispatched, wrapped for autodiff) were 1.3-1.6 ms of serial time per B0
        // step. Same f32 operations in the same order as
        // `r.mul_scalar(1 - m).add(b.mul_scalar(m))`.
        let (keep, take) = (1.0 - self.momentum, self.momentum);
        let device = self.batch.device();
        let batch = self.batch.into_data();
        let old = self.running.value_sync().into_data();
        let updated: Vec<f32> = (old.iter::<f32>().zip(batch.iter::<f32>()))
            .map(|(r, b)| r * keep + b * take)
            .collect();
        let len = updated.len();
        let updated = Tensor::from_data(TensorData::new(updated, [len]), &device);
        self.running.update(updated);
    }
}

thread_local! {
    /// The running-statistics updates [`batch_norm`] leaves while [`hold_running_stats`] runs on
    /// this thread.
    static PENDING: std::cell::RefCell<Option<Vec<RunningUpdate>>> =
        const { std::cell::RefCell::new(None) };
}

/// Runs `pass` (a training forward pass) with the fused batch norms' running-statistics updates
/// held back for [`RunningStats::apply`]. Nothing reads a running statistic in training mode, so
/// applying them later gives the same values. They are about 0.5 ms of burn's serial bookkeeping
/// per B0 step: the training step applies them while the other threads update the weights, rather
/// than between the forward pass's parallel ops, where those threads wait.
pub fn hold_running_stats<R>(pass: impl FnOnce() -> R) -> (R, RunningStats) {
    struct Restore(Option<Vec<RunningUpdate>>);
    impl Drop for Restore {
        fn drop(&mut self) {
            PENDING.set(self.0.take());
        }
    }
    let restore = Restore(PENDING.replace(Some(Vec::new())));
    let out = pass();
    let held = PENDING.take().unwrap_or_default();
    drop(restore);
    (out, RunningStats(held))
}

/// Running-statistics updates [`hold_running_stats`] held back, in the order they were made.
#[must_use = "the batch norms' running statistics are stale until applied"]
pub struct RunningStats(Vec<RunningUpdate>);

impl RunningStats {
    pub fn apply(self) {
        self.0.into_iter().for_each(RunningUpdate::apply);
    }
}

/// Mixed precision (`train::mixed`): weights cast to a half type make their layer compute in that
/// type, on an input cast to it, and cast the output back. (the weights' type, the input's) when
/// they differ.
pub(crate) fn half_compute<const D: usize, const E: usize>(
    weight: &Tensor<D>,
    x: &Tensor<E>,
) -> Option<(FloatDType, FloatDType)> {
    let (w, x) = (weight.dtype(), x.dtype());
    (w != x).then(|| (w.into(), x.into()))
}

fn runs_fused<const D: usize>(x: &Tensor<D>) -> bool {
    x.dtype() == DType::F32 && matches!(x.device().inner().as_dispatch(), DispatchDevice::Flex(_))
}

pub(super) fn contiguous(t: FlexTensor) -> FlexTensor {
    if t.as_slice::<f32>().is_some() {
        t
    } else {
        t.to_contiguous()
    }
}

/// `t` as a contiguous f32 tensor alone in its whole buffer, to be updated in place: `t` itself
/// when nothing else holds its buffer, else a copy.
pub(super) fn exclusive(t: FlexTensor) -> FlexTensor {
    let numel = t.shape().num_elements();
    if t.is_unique()
        && t.as_slice::<f32>().is_some_and(|s| s.len() == numel)
        && t.storage::<f32>().len() == numel
    {
        return t;
    }
    let shape = t.shape().to_vec();
    tensor(f32s(&contiguous(t)).to_vec(), shape)
}

pub(super) fn f32s(t: &FlexTensor) -> &[f32] {
    t.as_slice::<f32>()
        .expect("fused ops run on contiguous f32 tensors (checked by runs_fused)")
}

pub(super) fn dims4(t: &FlexTensor) -> [usize; 4] {
    let s = t.shape();
    [s[0], s[1], s[2], s[3]]
}

pub(super) fn tensor(values: Vec<f32>, shape: Vec<usize>) -> FlexTensor {
    FlexTensor::from_data(TensorData::new(values, shape))
}
