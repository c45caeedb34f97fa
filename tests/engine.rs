//! The native engine against the PyTorch oracles and the burn model (max |diff| <= 1e-4).

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::*;
use effnet::engine::Engine;
use effnet::model::{EfficientNet, apply_weights};
use effnet::spec::{Padding, variant};
use effnet::weights::{self, WeightSet};

#[test]
fn engine_matches_pytorch_fixtures() {
    for (file, oracle_name) in [
        (TV_B0, "torchvision_efficientnet_b0_seed0"),
        (TIMM_B0, "timm_tf_efficientnet_b0_seed0"),
        (LITE0, "efficientnet-lite0_coffee"),
        (LITE0, "efficientnet-lite0_chelsea"),
    ] {
        let set = weights::load(&fixture(file), None).unwrap();
        let mut engine = Engine::new(&set).unwrap();
        let (input, expected) = oracle(oracle_name);
        let [n, _, h, w] = input.shape[..] else {
            panic!()
        };
        let got = engine.forward(&input.data, n, h, w);
        let diff = max_abs_diff(&got, &expected.data);
        eprintln!("{oracle_name}: engine max |diff| {diff:e}");
        assert!(diff <= 1e-4, "{oracle_name}: {diff}");
        // Second call reuses the arena and gives the same answer.
        assert_eq!(engine.forward(&input.data, n, h, w), got);
    }
}

fn random_set(name: &str, padding: Padding) -> WeightSet {
    let mut spec = variant(name).unwrap();
    spec.padding = padding;
    WeightSet::random(&spec, 7)
}

#[test]
fn engine_matches_the_burn_model_on_every_family() {
    let device = Device::flex();
    for (name, padding, batch, h, w) in [
        ("b0", Padding::Same, 1, 224, 224),
        ("b0", Padding::Symmetric, 2, 67, 90),
        ("b1", Padding::Same, 1, 96, 96),
        ("b2", Padding::Symmetric, 1, 96, 96),
        ("b3", Padding::Same, 1, 96, 96),
        ("b4", Padding::Same, 1, 64, 64),
        ("b5", Padding::Same, 1, 64, 64),
        ("lite0", Padding::Same, 2, 100, 72),
        ("lite1", Padding::Same, 1, 96, 96),
        ("lite2", Padding::Same, 1, 96, 96),
        ("lite3", Padding::Same, 1, 96, 96),
        ("lite4", Padding::Same, 1, 96, 96),
        ("v2-b0", Padding::Same, 1, 96, 96),
        ("v2-b1", Padding::Symmetric, 2, 64, 80),
        ("v2-b2", Padding::Same, 1, 96, 96),
        ("v2-b3", Padding::Same, 1, 96, 96),
        ("v2-s", Padding::Same, 1, 96, 96),
        ("b6", Padding::Same, 1, 64, 64),
        ("b7", Padding::Symmetric, 1, 64, 64),
        ("b8", Padding::Same, 1, 48, 48),
        ("l2", Padding::Same, 1, 32, 32),
        ("v2-m", Padding::Same, 1, 64, 64),
        ("v2-l", Padding::Symmetric, 1, 64, 64),
        ("v2-xl", Padding::Same, 1, 48, 48),
    ] {
        let set = random_set(name, padding);
        let model = apply_weights(EfficientNet::new(&set.spec, &device), &set.tensors).unwrap();
        let x = Tensor::<4>::random([batch, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
        let data = x.clone().into_data().try_to_vec::<f32>().unwrap();
        let want = model.forward(x).into_data().try_to_vec::<f32>().unwrap();
        let got = Engine::new(&set).unwrap().forward(&data, batch, h, w);
        let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        let diff = max_abs_diff(&got, &want);
        eprintln!(
            "{name} {padding:?} {batch}x{h}x{w}: max |diff| {diff:e} (max |logit| {scale:.2})"
        );
        assert!(diff <= 1e-4 * scale.max(1.0), "{name}: {diff}");
    }
}
