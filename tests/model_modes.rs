//! Train vs eval behaviour, freezing, arbitrary resolutions and backbone features of the burn model.

mod common;

use burn::module::Module;
use burn::tensor::{Device, Distribution, Tensor};
use common::*;
use effnet::model::{EfficientNet, apply_weights, export_weights};
use effnet::spec::{Padding, variant};
use effnet::weights;

fn input(b: usize, h: usize, w: usize, device: &Device) -> Tensor<4> {
    Tensor::<4>::random([b, 3, h, w], Distribution::Normal(0.0, 1.0), device)
}

fn vec(t: Tensor<2>) -> Vec<f32> {
    t.into_data().try_to_vec::<f32>().unwrap()
}

#[test]
fn any_resolution_works_with_both_paddings() {
    let device = Device::flex();
    for pad in [Padding::Same, Padding::Symmetric] {
        let mut spec = variant("lite0").unwrap();
        spec.padding = pad;
        let model = EfficientNet::new(&spec, &device);
        for (h, w) in [(32, 32), (97, 131), (225, 224)] {
            let y = model.forward(input(2, h, w, &device));
            assert_eq!(y.dims(), [2, 1000], "{pad:?} {h}x{w}");
        }
    }
}

#[test]
fn backbone_features_at_every_reduction() {
    let device = Device::flex();
    for name in ["b0", "v2-b0"] {
        let model = EfficientNet::new(&variant(name).unwrap(), &device);
        let feats = model.forward_features(input(1, 64, 96, &device));
        let expected = model.feature_channels();
        assert_eq!(feats.len(), 5);
        for (f, (reduction, channels)) in feats.iter().zip(expected) {
            assert_eq!(
                f.dims(),
                [1, channels, 64 / reduction, 96 / reduction],
                "{name}"
            );
        }
    }
}

#[test]
fn eval_mode_is_deterministic_and_training_mode_is_not() {
    let set = weights::load(&fixture(TV_B0), None).unwrap();
    let plain = Device::flex();
    let eval_model = model_for(&set, &plain);
    let x = input(4, 64, 64, &plain);
    let a = vec(eval_model.forward(x.clone()));
    let b = vec(eval_model.forward(x.clone()));
    assert_eq!(a, b, "eval: running stats, no dropout, no stochastic depth");

    // On an autodiff device the model trains: batch statistics, dropout and stochastic depth.
    let ad = plain.clone().autodiff();
    let train_model = model_for(&set, &ad);
    let xa = x.clone().to_device(&ad);
    let t1 = vec(train_model.forward(xa.clone()));
    let t2 = vec(train_model.forward(xa.clone()));
    assert_ne!(t1, t2, "dropout / stochastic depth are random in training");
    assert!(
        max_abs_diff(&t1, &a) > 1e-3,
        "training uses batch statistics"
    );
    // BN running statistics moved during the training forward passes.
    let before = &set.tensors["stem.bn.running_mean"].data;
    let after = export_weights(&train_model)["stem.bn.running_mean"]
        .data
        .clone();
    assert!(max_abs_diff(before, &after) > 0.0);
    // valid() switches the same model back to eval behaviour (with its updated running stats).
    let updated = export_weights(&train_model);
    let reference = apply_weights(EfficientNet::new(set.spec(), &plain), &updated).unwrap();
    let v = vec(train_model.valid().forward(x.clone()));
    assert!(max_abs_diff(&v, &vec(reference.forward(x))) < 1e-5);
}

#[test]
fn freezing_the_backbone_leaves_only_head_and_classifier_trainable() {
    let ad = Device::flex().autodiff();
    let model = EfficientNet::new(&variant("b0").unwrap(), &ad).freeze_backbone();
    let x = input(2, 32, 32, &ad);
    let loss = model.forward(x).sum();
    let grads = loss.backward();
    let stem = model.stem.conv.weight.val().grad(&grads);
    let block = model.blocks[3]
        .dw
        .as_ref()
        .unwrap()
        .conv
        .weight
        .val()
        .grad(&grads);
    let head = model.head.conv.weight.val().grad(&grads);
    let fc = model.classifier.weight.val().grad(&grads);
    assert!(
        stem.is_none() && block.is_none(),
        "frozen backbone gets no gradients"
    );
    assert!(
        head.is_some() && fc.is_some(),
        "head and classifier still train"
    );
}

#[test]
fn loaded_weights_stay_trainable_on_an_autodiff_device() {
    let set = weights::load(&fixture(LITE0), None).unwrap();
    let ad = Device::flex().autodiff();
    let model = model_for(&set, &ad);
    let grads = model.forward(input(2, 32, 32, &ad)).sum().backward();
    assert!(model.stem.conv.weight.val().grad(&grads).is_some());
    assert!(model.classifier.weight.val().grad(&grads).is_some());
}

#[test]
fn frozen_batch_norm_keeps_its_statistics_while_convolutions_train() {
    let ad = Device::flex().autodiff();
    // No dropout or stochastic depth: training-mode outputs are then deterministic.
    let mut spec = variant("b0").unwrap();
    (spec.dropout, spec.drop_connect_rate) = (0.0, 0.0);
    let model = EfficientNet::new(&spec, &ad).freeze_batch_norm();
    let before = export_weights(&model);
    let x = input(2, 32, 32, &ad);
    let grads = model.forward(x.clone()).sum().backward();
    let after = export_weights(&model);
    for name in [
        "stem.bn.running_mean",
        "blocks.3.dw.bn.running_var",
        "head.bn.running_mean",
    ] {
        assert_eq!(before[name], after[name], "{name} changed");
    }
    assert!(
        model.stem.conv.weight.val().grad(&grads).is_some(),
        "convs still train"
    );
    assert!(
        model.stem.bn.gamma.val().grad(&grads).is_none(),
        "BN affine is fixed"
    );
    // Inference-mode BN: the same input gives the same output regardless of the batch around it.
    let one = model.forward(x.clone().narrow(0, 0, 1)).into_data();
    let both = model.forward(x).narrow(0, 0, 1).into_data();
    one.assert_approx_eq::<f32>(&both, burn::tensor::Tolerance::absolute(1e-4));
    // Without freezing, batch statistics move the running averages and the output of one image
    // depends on the batch it is in.
    let model = EfficientNet::new(&spec, &ad);
    let before = export_weights(&model);
    let x = input(2, 32, 32, &ad);
    let both = vec(model.forward(x.clone()).narrow(0, 0, 1));
    assert_ne!(
        before["stem.bn.running_mean"],
        export_weights(&model)["stem.bn.running_mean"]
    );
    let one = vec(model.forward(x.narrow(0, 0, 1)));
    assert!(one.iter().zip(&both).any(|(a, b)| (a - b).abs() > 1e-3));
}
