//! The fused ops against burn's composed ops: outputs, every gradient, running statistics.

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
    let x = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 4.0), &device).require_grad();
    let g = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 1.0), &device);
    let fused = silu(x.clone());
    let reference = burn::tensor::activation::silu(x.clone());
    assert!(max_diff(fused.clone().detach(), reference.clone().detach()) < 1e-5);
    let gf = x.grad(&(fused * g.clone()).sum().backward()).unwrap();
    let gr = x.grad(&(reference * g).sum().backward()).unwrap();
    assert!(max_diff(gf, gr) < 1e-5);
}

/// The fused sigmoid and its gradient match burn's.
#[test]
fn sigmoid_matches_burn() {
    let device = Device::flex().autodiff();
    let x = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 4.0), &device).require_grad();
    let g = Tensor::<2>::random([37, 1000], Distribution::Normal(0.0, 1.0), &device);
    let fused = sigmoid(x.clone());
    let reference = burn::tensor::activation::sigmoid(x.clone());
    assert!(max_diff(fused.clone().detach(), reference.clone().detach()) < 1e-6);
    let gf = x.grad(&(fused * g.clone()).sum().backward()).unwrap();
    let gr = x.grad(&(reference * g).sum().backward()).unwrap();
    assert!(max_diff(gf, gr) < 1e-6);
}

/// `sum x^2` matches an f64 sum, on a size spanning several parallel chunks, and is the same
/// bits on one and on two threads.
#[test]
fn squared_sum_matches_an_f64_sum() {
    let device = Device::flex();
    let n = 70_001;
    let x = Tensor::<2>::random([7, n], Distribution::Normal(0.0, 1.0), &device);
    let sums: Vec<f32> = [1, 2]
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            pool.unwrap()
                .install(|| squared_sum(x.clone()).into_scalar())
        })
        .to_vec();
    // Against an f64 sum: burn's f32 one is itself 1e-4 off at this size.
    let values = x.into_data().try_to_vec::<f32>().unwrap();
    let reference: f64 = values.iter().map(|&v| v as f64 * v as f64).sum();
    assert_eq!(sums[0].to_bits(), sums[1].to_bits());
    let error = (sums[0] as f64 - reference).abs() / reference;
    assert!(error < 1e-6, "{sums:?} vs {reference}");
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
        // Output widths of 29 and more take the row-run path (smaller ones are interleaved).
        (3, 1, 30, PaddingConfig2d::Same),
        (5, 2, 61, PaddingConfig2d::Same),
    ] {
        for channels in [6, 20] {
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
}

/// The depthwise conv's two kernel paths (row runs, channel-interleaved blocks) agree on every
/// geometry: outputs and input gradients bit for bit (each sums its terms in the same order),
/// weight gradients within rounding; channel counts with and without a partial block.
#[test]
fn depthwise_paths_agree() {
    use kernels::*;
    let values = |n: usize, seed: usize| -> Vec<f32> {
        (0..n)
            .map(|i| (((i * 7919 + seed * 104729) % 2003) as f32 / 1001.0) - 1.0)
            .collect()
    };
    for (k, stride, size, pad) in [
        (3, 1, 4, [1, 1, 1, 1]),
        (3, 2, 8, [0, 0, 1, 1]),
        (5, 2, 7, [2, 2, 2, 2]),
        (5, 1, 2, [2, 2, 2, 2]),
        (5, 2, 2, [1, 1, 2, 2]),
        (3, 1, 1, [1, 1, 1, 1]),
        (3, 1, 12, [1, 1, 1, 1]),
    ] {
        for channels in [5, 16, 40, 150] {
            let geom = ConvGeometry::new(size, size, k, stride, pad);
            let n = 3;
            let x = values(n * channels * size * size, 1);
            let w = values(channels * k * k, 2);
            let g = values(n * channels * geom.out_h * geom.out_w, 3);
            let case = format!("k {k} s {stride} size {size} channels {channels}");
            let rows = depthwise_forward_rows(&geom, channels, &x, &w);
            let inter = depthwise_forward_interleaved(&geom, channels, &x, &w, BlockWidth::Lanes);
            assert_eq!(rows, inter, "forward, {case}");
            let wide = depthwise_forward_interleaved(&geom, channels, &x, &w, BlockWidth::Wide);
            assert_eq!(wide, inter, "forward in 64-channel blocks, {case}");
            let (gx_rows, gw_rows) = depthwise_backward_rows(&geom, channels, &x, &w, &g, true);
            let (gx_inter, gw_inter) = depthwise_backward_interleaved(
                &geom,
                channels,
                &x,
                &w,
                &g,
                true,
                BlockWidth::Lanes,
            );
            assert_eq!(gx_rows, gx_inter, "input grad, {case}");
            let scale = gw_rows.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for (a, b) in gw_rows.iter().zip(&gw_inter) {
                assert!(
                    (a - b).abs() <= 1e-5 * scale,
                    "weight grad {a} vs {b}, {case}"
                );
            }
            for want_input in [true, false] {
                let (gx_wide, gw_wide) = depthwise_backward_interleaved(
                    &geom,
                    channels,
                    &x,
                    &w,
                    &g,
                    want_input,
                    BlockWidth::Wide,
                );
                assert_eq!(gw_wide, gw_inter, "64-channel blocks, {case}");
                match want_input {
                    true => assert_eq!(gx_wide, gx_inter, "64-channel blocks, {case}"),
                    false => assert!(gx_wide.is_empty(), "{case}"),
                }
            }
            let (gx_none, gw_only) = depthwise_backward_interleaved(
                &geom,
                channels,
                &x,
                &w,
                &g,
                false,
                BlockWidth::Lanes,
            );
            assert!(gx_none.is_empty(), "{case}");
            assert_eq!(gw_only, gw_inter, "{case}");
        }
    }
}

/// Global average pooling and the squeeze-excite gate (a factor per plane): outputs and every
/// gradient equal burn's composed `mean_dim` and broadcast multiply, on maps from 1x1 up.
#[test]
fn spatial_mean_and_plane_scale_match_burn() {
    let device = Device::flex().autodiff();
    for (n, c, h, w) in [(3, 5, 7, 7), (2, 40, 1, 1), (4, 16, 16, 16), (1, 3, 2, 5)] {
        let case = format!("{n}x{c}x{h}x{w}");
        let x = Tensor::<4>::random([n, c, h, w], Distribution::Default, &device).require_grad();
        let s = Tensor::<4>::random([n, c, 1, 1], Distribution::Default, &device).require_grad();
        let fused = plane_scale(x.clone(), s.clone()) + spatial_mean(x.clone() * 3.0);
        let reference = x.clone() * s.clone() + (x.clone() * 3.0).mean_dim(3).mean_dim(2);
        assert!(
            rel_diff(fused.clone().detach(), reference.clone().detach()) < 1e-6,
            "{case}"
        );
        let g = Tensor::<4>::random([n, c, h, w], Distribution::Default, &device);
        let gf = (fused * g.clone()).sum().backward();
        let gr = (reference * g).sum().backward();
        let (gxf, gxr) = (x.grad(&gf).unwrap(), x.grad(&gr).unwrap());
        assert!(rel_diff(gxf, gxr) < 1e-5, "input grad, {case}");
        let (gsf, gsr) = (s.grad(&gf).unwrap(), s.grad(&gr).unwrap());
        assert!(rel_diff(gsf, gsr) < 1e-5, "scale grad, {case}");
    }
}

/// A squeeze-excite gate on an intermediate map (the mean's gradient is added in place to the
/// one the scale registered): the input's gradient equals burn's composed ops, on maps from 1x1
/// up and on a leaf input (two gradients burn adds).
#[test]
fn squeeze_excite_input_gradient_matches_burn() {
    let device = Device::flex().autodiff();
    for (n, c, h, w) in [(3, 5, 7, 7), (2, 40, 1, 1), (4, 16, 16, 16), (1, 3, 2, 5)] {
        for leaf in [false, true] {
            let case = format!("{n}x{c}x{h}x{w}, leaf {leaf}");
            let u = Tensor::<4>::random([n, c, h, w], Distribution::Default, &device);
            let u = u.require_grad();
            // Each graph its own intermediate: burn consumes a graph's tape in its backward.
            let input = || match leaf {
                true => u.clone(),
                false => u.clone() * 2.0,
            };
            let x = input();
            let fused = plane_scale(x.clone(), sigmoid(spatial_mean(x) * 3.0));
            let x = input();
            let gate = burn::tensor::activation::sigmoid(x.clone().mean_dim(3).mean_dim(2) * 3.0);
            let reference = x * gate;
            let g = Tensor::<4>::random([n, c, h, w], Distribution::Default, &device);
            let gf = (fused * g.clone()).sum().backward();
            let gr = (reference * g).sum().backward();
            let (guf, gur) = (u.grad(&gf).unwrap(), u.grad(&gr).unwrap());
            assert!(rel_diff(guf, gur) < 1e-5, "{case}");
        }
    }
}

/// The fused TF-RMSProp update gives the same bits as burn's composed ops in the same order,
/// over several steps and a size that spans several parallel chunks, with and without the L2
/// term, on weights and state shared with another tensor (copied, the other left as it was) and
/// not (updated in place), run at once or queued to a deferring `deferred::updates`.
#[test]
fn rmsprop_matches_composed_ops() {
    let device = Device::flex();
    let n = 40_000;
    let random = |scale: f64| Tensor::<1>::random([n], Distribution::Normal(0.0, scale), &device);
    let queue = std::sync::Arc::new(deferred::Queue::default());
    for (weight_decay, deferring) in [(0.0, false), (0.01, false), (0.0, true), (0.01, true)] {
        let c = RmsPropCoefficients {
            lr: 0.004,
            decay_complement: (1.0 - 0.9f64) as f32,
            momentum: 0.9,
            epsilon: 1e-3,
            weight_decay,
        };
        let (mut w, mut ms, mut mom) = (random(1.0), random(1.0).abs(), random(0.01));
        let (mut w_ref, mut ms_ref, mut mom_ref) = (w.clone(), ms.clone(), mom.clone());
        let original = w.clone();
        let before = original.clone().into_data();
        for _ in 0..3 {
            let g = random(0.1);
            // The L2 term as the kernel takes it: fma(w, decay, g), one rounding.
            let values = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap();
            let (gs, ws) = (values(&g), values(&w_ref));
            let g_ref: Vec<f32> = (gs.iter().zip(&ws))
                .map(|(g, w)| w.mul_add(weight_decay, *g))
                .collect();
            let g_ref = Tensor::<1>::from_floats(g_ref.as_slice(), &device);
            (w, ms, mom) = match deferring {
                false => rmsprop_tf(w, g, ms, mom, c),
                true => deferred::updates(Some(&queue), || {
                    let updated = rmsprop_tf(w, g, ms, mom, c);
                    assert_eq!(queue.queued_work(), 1, "the update was not deferred");
                    updated
                }),
            };
            assert_eq!(queue.queued_work(), 0);
            ms_ref = ms_ref.clone()
                + (g_ref.clone().powi_scalar(2) - ms_ref).mul_scalar(c.decay_complement);
            let step = g_ref.mul_scalar(c.lr) / ms_ref.clone().add_scalar(c.epsilon).sqrt();
            mom_ref = mom_ref.mul_scalar(c.momentum) + step;
            w_ref = w_ref - mom_ref.clone();
            for (a, b) in [(&w, &w_ref), (&ms, &ms_ref), (&mom, &mom_ref)] {
                assert_eq!(a.clone().into_data(), b.clone().into_data());
            }
        }
        // The first step's `w` was shared (with `original`): it was copied, not updated in place.
        assert_eq!(original.into_data(), before);
    }
}

/// Running statistics held back by `hold_running_stats` are stale until applied, and then equal
/// (bit for bit, over two steps) those the batch norm updates at once outside it.
#[test]
fn held_running_statistics_equal_the_immediate_ones_once_applied() {
    let device = Device::flex().autodiff();
    let (now, held) = (batch_norm_layer(5, &device), batch_norm_layer(5, &device));
    let stats =
        |bn: &BatchNorm| [&bn.running_mean, &bn.running_var].map(|r| r.value_sync().into_data());
    for step in 0..2 {
        let x = Tensor::<4>::random([3, 5, 4, 4], Distribution::Normal(2.0, 3.0), &device);
        let _ = batch_norm(&now, x.clone(), None);
        let before = stats(&held);
        let (_, pending) = hold_running_stats(|| batch_norm(&held, x, None));
        assert_eq!(stats(&held), before, "step {step}: applied while held");
        pending.apply();
        assert_eq!(stats(&held), stats(&now), "step {step}");
    }
}

/// A tensor of normal draws (Box-Muller) from a host RNG seeded with `seed`: the same values
/// whatever other tests draw from the device's stream meanwhile.
fn host_normal(shape: [usize; 4], mean: f64, std: f64, seed: u64, device: &Device) -> Tensor<4> {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let values: Vec<f32> = (0..shape.iter().product::<usize>())
        .map(|_| {
            let (u, v): (f64, f64) = (1.0 - rng.random::<f64>(), rng.random());
            let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
            (mean + std * z) as f32
        })
        .collect();
    Tensor::from_data(TensorData::new(values, shape), device)
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
/// `BatchNorm` in training mode (followed by burn's SiLU or ReLU6 when fused with one), for the
/// shapes B0 trains with (down to 1x1 maps).
#[test]
fn batch_norm_matches_burn() {
    let device = Device::flex().autodiff();
    // Planes of up to 16 values take the image-wise path: the last three shapes span several of
    // its runs of images (of 16 k values), [300, 5, 5, 5] several runs of planes of the per-plane
    // path, the later runs starting mid-image (on a channel other than 0).
    let shapes = [
        [4, 6, 5, 5],
        [64, 3, 1, 1],
        [2, 5, 9, 1],
        [3, 4, 16, 16],
        [300, 5, 5, 5],
        [3000, 7, 1, 1],
        [300, 5, 2, 2],
        [40, 40, 4, 4],
    ];
    let acts = [None, Some(Activation::Silu), Some(Activation::Relu6)];
    let cases = shapes.into_iter().flat_map(|s| acts.map(|a| (s, a)));
    for (seed, (shape, act)) in (0u64..).zip(cases) {
        let (fused_bn, burn_bn) = (
            batch_norm_layer(shape[1], &device),
            batch_norm_layer(shape[1], &device),
        );
        // Host-seeded draws: with the device's stream, which tests running side by side share, a
        // rare draw put a normalised value within rounding of ReLU6's kink at 0, where the fused
        // and burn's composed ops may round to opposite sides (derivative 1 against 0).
        let x = host_normal(shape, 3.0, 2.0, 2 * seed, &device).require_grad();
        let fused = batch_norm(&fused_bn, x.clone(), act);
        let y = burn_bn.forward(x.clone());
        let reference = match act {
            Some(Activation::Silu) => burn::tensor::activation::silu(y),
            Some(Activation::Relu6) => burn::tensor::activation::relu(y).clamp_max(6.0),
            None => y,
        };
        let case = format!("{shape:?}, {act:?}");
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
        let g = host_normal(shape, 0.0, 1.0, 2 * seed + 1, &device);
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

/// [`conv2d`] on `x` against `conv.forward`: output, and the gradients of the input (when it is
/// tracked), the weight and the bias.
fn assert_conv_matches_burn(conv: &Conv2d, x: Tensor<4>, case: &str) {
    let device = x.device();
    let fused = conv2d(conv, x.clone());
    let reference = conv.forward(x.clone());
    assert_eq!(fused.dims(), reference.dims(), "{case}");
    assert!(
        rel_diff(fused.clone().detach(), reference.clone().detach()) < 1e-6,
        "{case}"
    );
    let g = Tensor::<4>::random(fused.dims(), Distribution::Default, &device);
    let gf = (fused * g.clone()).sum().backward();
    let gr = (reference * g).sum().backward();
    match x.is_require_grad() {
        true => assert!(
            rel_diff(x.grad(&gf).unwrap(), x.grad(&gr).unwrap()) < 1e-5,
            "input grad, {case}"
        ),
        false => assert!(x.grad(&gf).is_none(), "{case}"),
    }
    let w = conv.weight.val();
    let (gwf, gwr) = (w.grad(&gf).unwrap(), w.grad(&gr).unwrap());
    assert!(rel_diff(gwf, gwr) < 1e-5, "weight grad, {case}");
    if let Some(b) = &conv.bias {
        let b = b.val();
        let (gbf, gbr) = (b.grad(&gf).unwrap(), b.grad(&gr).unwrap());
        assert!(rel_diff(gbf, gbr) < 1e-5, "bias grad, {case}");
    }
}

/// The 1x1 convolution as matrix products: output and every gradient equal burn's conv2d, on
/// maps from 1x1 up, odd channel counts, with and without bias (the squeeze-excite convs).
#[test]
fn pointwise_matches_burn_conv() {
    let device = Device::flex().autodiff();
    for ((n, ci, co, size), bias) in [
        (3, 16, 24, 8),
        (1, 7, 33, 5),
        (2, 40, 8, 1),
        (4, 96, 40, 14),
        // Position dot products: columns past a block of 64 and rows past a tile of 4, images
        // past a group of 8.
        (11, 70, 37, 12),
        // Small maps: one product per position over groups of 32 images (the last partial).
        (35, 12, 20, 2),
        (5, 24, 40, 4),
        (40, 17, 33, 1),
    ]
    .into_iter()
    .flat_map(|case| [(case, false), (case, true)])
    {
        let conv = Conv2dConfig::new([ci, co], [1, 1])
            .with_bias(bias)
            .init(&device);
        let x =
            Tensor::<4>::random([n, ci, size, size], Distribution::Default, &device).require_grad();
        let case = format!("{n}x{ci}->{co} {size}x{size} bias {bias}");
        assert_conv_matches_burn(&conv, x, &case);
    }
    // Grouped and dilated convs go through burn's own.
    let x = Tensor::<4>::random([2, 8, 6, 6], Distribution::Default, &device);
    for conv in [
        Conv2dConfig::new([8, 4], [3, 3])
            .with_groups(2)
            .with_bias(false)
            .init(&device),
        Conv2dConfig::new([8, 4], [3, 3])
            .with_dilation([2, 2])
            .with_bias(false)
            .init(&device),
    ] {
        let (a, b) = (conv2d(&conv, x.clone()), conv.forward(x.clone()));
        assert_eq!(max_diff(a, b), 0.0);
    }
}

/// The 1x1 weight gradient as dot products along the positions: within float rounding of a
/// plain sum in f64, on shapes with partial tiles, column blocks, image groups and a last run of
/// positions that is partly padding; and the same bits on every instruction set (each lane sums
/// in one order whatever the register width).
#[test]
fn weight_gradient_dots_match_a_plain_sum_on_every_instruction_set() {
    use crate::simd::{Level, with_level};
    for (n, ci, co, hw) in [
        (11, 70, 37, 144),
        (3, 16, 24, 64),
        (9, 5, 3, 49),
        (1, 1, 1, 16),
    ] {
        let x: Vec<f32> = (0..n * ci * hw)
            .map(|i| ((i * 7919) % 1013) as f32 / 1013.0 - 0.5)
            .collect();
        let dy: Vec<f32> = (0..n * co * hw)
            .map(|i| ((i * 104729) % 997) as f32 / 997.0 - 0.5)
            .collect();
        let dims = (n, ci, co, hw);
        let dots = weight_gradient_by(WeightGradientPath::Dots, &x, &dy, dims);
        for r in 0..co {
            for c in 0..ci {
                let sum: f64 = (0..n)
                    .flat_map(|img| (0..hw).map(move |p| (img, p)))
                    .map(|(img, p)| {
                        dy[(img * co + r) * hw + p] as f64 * x[(img * ci + c) * hw + p] as f64
                    })
                    .sum();
                let got = dots[r * ci + c] as f64;
                assert!(
                    (got - sum).abs() < 1e-5 * (n * hw) as f64,
                    "{dims:?} ({r}, {c})"
                );
            }
        }
        // Levels this CPU lacks run at its own (with_level forces only supported ones).
        for l in [Level::Avx512, Level::Avx2, Level::Portable] {
            let at = with_level(l, || {
                weight_gradient_by(WeightGradientPath::Dots, &x, &dy, dims)
            });
            assert!(at == dots, "{l:?} on {dims:?}");
        }
    }
}

/// Deferred weight gradients (queued by the 1x1 backward, partly run by a second thread as a
/// poller would, the rest finished by `Late::register`) are the same bits as the ones computed
/// in the backward pass, for every parameter, also one used twice; a reshaped weight (the stem's)
/// is not deferred.
#[test]
fn deferred_weight_gradients_equal_the_immediate_ones() {
    use burn::module::Module;
    use burn::optim::GradientsParams;
    use std::sync::Arc;

    #[derive(Module, Debug)]
    struct Net {
        stem: Conv2d,
        convs: Vec<Conv2d>,
    }
    let device = Device::flex().autodiff();
    let net = Net {
        stem: Conv2dConfig::new([3, 12], [3, 3])
            .with_padding(PaddingConfig2d::Explicit(1, 1, 1, 1))
            .init(&device),
        // 4x4 and 1x1 maps: both weight-gradient forms (per image, per position).
        convs: [(12, 40), (40, 8), (8, 48), (48, 48)]
            .map(|(ci, co)| Conv2dConfig::new([ci, co], [1, 1]).init(&device))
            .to_vec(),
    };
    let image = Tensor::<4>::random([37, 3, 4, 4], Distribution::Default, &device);
    let loss = || {
        let x = conv2d(&net.stem, image.clone());
        let x = silu(conv2d(&net.convs[1], silu(conv2d(&net.convs[0], x))));
        let x = conv2d(&net.convs[2], spatial_mean(x));
        conv2d(&net.convs[3], silu(conv2d(&net.convs[3], x)))
            .powi_scalar(2)
            .sum()
    };
    let values = |grads: &GradientsParams| {
        let mut values = Vec::new();
        for conv in net.convs.iter().chain([&net.stem]) {
            let weight = grads.get::<4>(conv.weight.id).expect("a weight gradient");
            let bias = grads
                .get::<1>(conv.bias.as_ref().unwrap().id)
                .expect("a bias one");
            values.push(weight.into_data().try_to_vec::<f32>().unwrap());
            values.push(bias.into_data().try_to_vec::<f32>().unwrap());
        }
        values
    };
    let reference = GradientsParams::from_grads(loss().backward(), &net);

    let queue = Arc::new(deferred::Queue::default());
    let (grads, late) = deferred::backward(Some(&queue), || loss().backward());
    assert_eq!(
        late.len(),
        5,
        "each use of a 1x1 weight, not the stem's reshaped one"
    );
    // Another thread takes some parts, as a poller does between the pass's ops.
    std::thread::scope(|s| {
        s.spawn(|| (0..3).for_each(|_| assert!(queue.run_one())));
    });
    let mut deferred = GradientsParams::from_grads(grads, &net);
    assert!(deferred.get::<4>(net.convs[0].weight.id).is_none());
    late.register(&mut deferred);
    assert_eq!(values(&deferred), values(&reference));
}

/// Full k x k convolutions (the stem, Fused-MBConv) as a 1x1 conv of the input's patches: output
/// and every gradient equal burn's conv2d, for strides 1 and 2, TF-SAME (odd padding after),
/// symmetric and no padding, maps down to 1x1, with and without bias, and with an input that
/// needs no gradient (the stem's images).
#[test]
fn patch_conv_matches_burn_conv() {
    let device = Device::flex().autodiff();
    let (same, sym, valid) = (
        PaddingConfig2d::Same,
        PaddingConfig2d::Explicit(1, 1, 1, 1),
        PaddingConfig2d::Valid,
    );
    for (n, ci, co, size, k, stride, padding, bias, tracked) in [
        (3, 3, 32, 16, 3, 2, &same, false, false),
        (2, 3, 8, 15, 3, 2, &same, false, true),
        (2, 5, 7, 9, 3, 1, &sym, true, true),
        (4, 8, 16, 8, 3, 1, &same, false, true),
        (1, 6, 4, 7, 5, 2, &same, true, true),
        (2, 4, 6, 6, 3, 1, &valid, false, true),
        (3, 16, 24, 1, 3, 1, &same, false, true),
        (2, 4, 4, 2, 3, 2, &sym, false, true),
        // A 1x1 conv with a stride also goes through the patches.
        (2, 8, 4, 6, 1, 2, &valid, false, true),
    ] {
        let conv = Conv2dConfig::new([ci, co], [k, k])
            .with_stride([stride, stride])
            .with_padding(padding.clone())
            .with_bias(bias)
            .init(&device);
        let x = Tensor::<4>::random([n, ci, size, size], Distribution::Default, &device);
        let x = if tracked { x.require_grad() } else { x };
        let case = format!("{n}x{ci}->{co} {size}x{size} k{k} s{stride} {padding:?} bias {bias}");
        assert_conv_matches_burn(&conv, x, &case);
    }
}

/// The dropout mask: only 0 and the scale, kept at the asked rate, a function of the seed and
/// the element's index alone (a prefix of a longer mask, the same on one and two threads), and a
/// different mask for another seed.
#[test]
fn keep_mask_is_a_bernoulli_mask_fixed_by_its_seed() {
    let len = 3 * (1 << 14) + 17;
    let masks: Vec<Vec<f32>> = [1, 2]
        .map(|threads| {
            let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build();
            pool.unwrap()
                .install(|| kernels::keep_mask(len, 0.8, 1.25, 7))
        })
        .to_vec();
    assert_eq!(masks[0], masks[1]);
    let mask = &masks[0];
    assert!(mask.iter().all(|&m| m == 0.0 || m == 1.25));
    let kept = mask.iter().filter(|&&m| m != 0.0).count() as f64 / len as f64;
    // Binomial standard deviation sqrt(0.8 * 0.2 / len) = 0.002.
    assert!((kept - 0.8).abs() < 0.01, "kept {kept}");
    assert_eq!(kernels::keep_mask(1000, 0.8, 1.25, 7), mask[..1000]);
    // No period of the parallel chunk size (each chunk continues the stream).
    assert_ne!(mask[..1 << 14], mask[1 << 14..2 << 14]);
    let other = kernels::keep_mask(len, 0.8, 1.25, 8);
    let same = mask.iter().zip(&other).filter(|(a, b)| a == b).count() as f64 / len as f64;
    // Independent masks agree on 0.8^2 + 0.2^2 = 68 % of the elements.
    assert!((same - 0.68).abs() < 0.02, "agree on {same}");
    assert!(
        kernels::keep_mask(len, 1.0, 1.0, 7)
            .iter()
            .all(|&m| m == 1.0)
    );
}

/// Dropout and stochastic depth in training: each element (dropout) or image (stochastic depth)
/// is zeroed or scaled by exactly the factor burn's layers use, the gradient is the same mask,
/// the mask follows the device's seed, and outside training both are the identity.
#[test]
fn dropout_and_drop_path_scale_or_zero_by_the_device_stream() {
    let device = Device::flex().autodiff();
    let layer = burn::nn::DropoutConfig::new(0.25).init();
    let x = Tensor::<2>::random([64, 300], Distribution::Normal(1.0, 1.0), &device).require_grad();
    let run = |seed: u64| {
        device.seed(seed);
        let y = dropout(&layer, x.clone());
        let g = x.grad(&y.clone().sum().backward()).unwrap();
        (
            y.detach().into_data().try_to_vec::<f32>().unwrap(),
            g.into_data().try_to_vec::<f32>().unwrap(),
        )
    };
    let (y, g) = run(3);
    let xs = x.clone().detach().into_data().try_to_vec::<f32>().unwrap();
    let scale = (1.0 / 0.75f64) as f32;
    for ((&y, &g), &x) in y.iter().zip(&g).zip(&xs) {
        assert!(
            (g == 0.0 && y == 0.0) || (g == scale && y == x * scale),
            "{x} {y} {g}"
        );
    }
    let kept = g.iter().filter(|&&g| g != 0.0).count() as f64 / g.len() as f64;
    assert!((kept - 0.75).abs() < 0.02, "kept {kept}");
    // The stream is the process's: a test on another thread can draw between `seed` and the
    // mask, so the same seed must give the same mask in one of a few tries.
    let repeated = (0..5).any(|_| run(3).0 == run(3).0);
    assert!(repeated, "seed 3 gave a different mask every time");
    assert_ne!(run(4).0, run(3).0);

    let x4 = Tensor::<4>::random([32, 5, 3, 3], Distribution::Normal(1.0, 1.0), &device);
    let x4 = x4.require_grad();
    device.seed(5);
    let y4 = drop_path(x4.clone(), 0.5);
    let g4 = x4.grad(&y4.clone().sum().backward()).unwrap();
    let [y4, g4, x4] = [y4.detach(), g4, x4.detach()].map(|t| t.into_data().try_to_vec::<f32>());
    let (y4, g4, x4) = (y4.unwrap(), g4.unwrap(), x4.unwrap());
    let image = 5 * 9;
    let mut dropped = 0;
    for ((y, g), x) in y4.chunks(image).zip(g4.chunks(image)).zip(x4.chunks(image)) {
        if g.iter().all(|&g| g == 0.0) && y.iter().all(|&y| y == 0.0) {
            dropped += 1;
        } else {
            assert!(g.iter().all(|&g| g == 2.0));
            assert!(y.iter().zip(x).all(|(&y, &x)| y == x * 2.0));
        }
    }
    assert!(
        (4..=28).contains(&dropped),
        "{dropped} of 32 images dropped"
    );

    let eval = Device::flex();
    let x = Tensor::<2>::random([4, 8], Distribution::Default, &eval);
    let y = dropout(&layer, x.clone());
    assert_eq!(y.into_data(), x.into_data());
}
