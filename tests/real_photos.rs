//! Real weights on real photos: the Lite0 fixture on scikit-image's coffee and chelsea.

mod common;

use burn::tensor::Device;
use common::*;
use effnet::classify::Classifier;
use effnet::preprocess::{eval_transform, load_rgb};

fn lite0() -> Classifier {
    Classifier::from_file(&fixture(LITE0), None, &Device::flex()).unwrap()
}

#[test]
fn coffee_is_espresso() {
    let c = lite0();
    let img = load_rgb(&fixture("images/coffee.png")).unwrap();
    let top = &c.top_k(&[img], 5)[0];
    assert_eq!(top[0].class, 967);
    assert_eq!(top[0].label, "espresso");
    assert!(
        (top[0].probability - 0.951).abs() <= 0.03,
        "p = {}",
        top[0].probability
    );
    assert_eq!(top[1].class, 968);
}

#[test]
fn chelsea_is_a_cat() {
    let c = lite0();
    let img = load_rgb(&fixture("images/chelsea.png")).unwrap();
    let top = &c.top_k(&[img], 3)[0];
    let classes: Vec<usize> = top.iter().map(|p| p.class).collect();
    assert_eq!(classes, vec![282, 285, 281]);
}

#[test]
fn preprocessing_reproduces_the_pytorch_input() {
    // The oracle inputs were made with PIL bicubic resize to 256, center crop 224, (x - 127) / 128.
    let meta = lite0().meta;
    for (image, oracle_name) in [
        ("coffee", "efficientnet-lite0_coffee"),
        ("chelsea", "efficientnet-lite0_chelsea"),
    ] {
        let ours = eval_transform(
            &load_rgb(&fixture(&format!("images/{image}.png"))).unwrap(),
            &meta.preprocess,
        );
        let (input, _) = oracle(oracle_name);
        let mean: f32 = ours
            .iter()
            .zip(&input.data)
            .map(|(a, b)| (a - b).abs())
            .sum::<f32>()
            / ours.len() as f32;
        let max = max_abs_diff(&ours, &input.data);
        eprintln!(
            "{image}: mean |diff| {mean:e}, max |diff| {max:e} (one 8-bit level is {:e})",
            1.0 / 128.0
        );
        // Bit-exact: same Pillow resampling, same crop, same normalisation.
        assert!(max <= 1e-6, "{image}: max |diff| {max}");
    }
}
