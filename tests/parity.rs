//! The burn model against PyTorch: logits for the fixture inputs match to 1e-4.

mod common;

use burn::tensor::Device;
use common::*;
use effnet::spec::Padding;
use effnet::weights;

fn check(weights_file: &str, oracle_name: &str, model: &str, padding: Padding, eps: f64) {
    let set = weights::load(&fixture(weights_file), None).unwrap();
    assert_eq!(set.spec().name, model);
    assert_eq!((set.spec().padding, set.spec().bn_eps), (padding, eps));
    let device = Device::flex();
    let net = model_for(&set, &device);
    let (input, expected) = oracle(oracle_name);
    let got = logits(&net, &input, &device);
    let diff = max_abs_diff(&got, &expected.data);
    eprintln!("{oracle_name}: max |diff| = {diff:e}");
    assert!(diff <= 1e-4, "{oracle_name}: max |diff| = {diff}");
}

#[test]
fn torchvision_b0_matches_pytorch() {
    check(
        TV_B0,
        "torchvision_efficientnet_b0_seed0",
        "efficientnet-b0",
        Padding::Symmetric,
        1e-5,
    );
}

#[test]
fn timm_tf_b0_matches_pytorch() {
    check(
        TIMM_B0,
        "timm_tf_efficientnet_b0_seed0",
        "efficientnet-b0",
        Padding::Same,
        1e-3,
    );
}

#[test]
fn lite0_coffee_matches_pytorch() {
    check(
        LITE0,
        "efficientnet-lite0_coffee",
        "efficientnet-lite0",
        Padding::Same,
        1e-3,
    );
}

#[test]
fn lite0_chelsea_matches_pytorch() {
    check(
        LITE0,
        "efficientnet-lite0_chelsea",
        "efficientnet-lite0",
        Padding::Same,
        1e-3,
    );
}
