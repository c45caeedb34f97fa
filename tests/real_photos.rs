//! Real weights on real photos: the Lite0 fixture on scikit-image's coffee and chelsea, through both
//! the native engine and the burn model.

mod common;

use common::*;
use effnet::classify::{Backend, Classifier};
use effnet::preprocess::{eval_transform, load_rgb};

fn lite0(backend: Backend) -> Classifier {
    Classifier::from_file(&fixture(LITE0), None, backend, 2).unwrap()
}

#[test]
fn coffee_is_espresso() {
    for backend in [Backend::Engine, Backend::Burn] {
        let mut c = lite0(backend);
        let img = load_rgb(&fixture("images/coffee.png")).unwrap();
        let top = &c.top_k(&[img], 5).unwrap()[0];
        assert_eq!(top[0].class, 967, "{backend:?}");
        assert_eq!(top[0].label, "espresso");
        let p = top[0].probability;
        assert!((p - 0.951).abs() <= 0.03, "{backend:?}: p = {p}");
        assert_eq!(top[1].class, 968);
    }
}

#[test]
fn chelsea_is_a_cat() {
    for backend in [Backend::Engine, Backend::Burn] {
        let mut c = lite0(backend);
        let img = load_rgb(&fixture("images/chelsea.png")).unwrap();
        let top = &c.top_k(&[img], 3).unwrap()[0];
        let classes: Vec<usize> = top.iter().map(|p| p.class).collect();
        assert_eq!(classes, vec![282, 285, 281], "{backend:?}");
    }
}

#[test]
fn a_batch_gives_the_same_answers_as_single_images() {
    let mut c = lite0(Backend::Engine);
    let imgs = [
        load_rgb(&fixture("images/coffee.png")).unwrap(),
        load_rgb(&fixture("images/chelsea.png")).unwrap(),
    ];
    let batch = c.probabilities(&imgs).unwrap();
    for (i, img) in imgs.iter().enumerate() {
        let single = &c.probabilities(std::slice::from_ref(img)).unwrap()[0];
        assert!(max_abs_diff(single, &batch[i]) < 1e-6);
    }
}

#[test]
fn preprocessing_reproduces_the_pytorch_input() {
    // The oracle inputs were made with PIL bicubic resize to 256, center crop 224, (x - 127) / 128.
    let meta = lite0(Backend::Engine).meta;
    for (image, oracle_name) in [
        ("coffee", "efficientnet-lite0_coffee"),
        ("chelsea", "efficientnet-lite0_chelsea"),
    ] {
        let img = load_rgb(&fixture(&format!("images/{image}.png"))).unwrap();
        let ours = eval_transform(&img, &meta.preprocess).unwrap();
        let (input, _) = oracle(oracle_name);
        let max = max_abs_diff(&ours, &input.data);
        // Bit-exact: same Pillow resampling, same crop, same normalisation.
        assert!(max <= 1e-6, "{image}: max |diff| {max}");
    }
}

/// Real JPEG photos (4:2:0, progressive, 4:2:2, 4:4:4, grey, CMYK, camera files): PyTorch's top-5
/// with the same weights, to 0.002 in probability, as the JPEG pixels are Pillow's exactly.
#[test]
fn jpeg_photos_match_pytorch_top5() {
    let dir = fixture("jpeg");
    let text = std::fs::read_to_string(dir.join("lite0_pytorch_top5.json")).unwrap();
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    let predictions = v["predictions"].as_object().unwrap();
    assert!(predictions.len() >= 10);
    let mut c = lite0(Backend::Engine);
    let mut worst = 0.0f32;
    for (file, want) in predictions {
        let img = load_rgb(&dir.join(file)).unwrap();
        let got = &c.top_k(&[img], 5).unwrap()[0];
        let classes: Vec<u64> = got.iter().map(|p| p.class as u64).collect();
        let want_classes: Vec<u64> = want["top5"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c.as_u64().unwrap())
            .collect();
        assert_eq!(classes[0], want_classes[0], "{file}: top-1");
        for (p, (class, prob)) in want_classes
            .iter()
            .zip(want["prob"].as_array().unwrap())
            .enumerate()
        {
            let ours = c
                .probabilities(&[load_rgb(&dir.join(file)).unwrap()])
                .unwrap()[0][*class as usize];
            let d = (ours - prob.as_f64().unwrap() as f32).abs();
            worst = worst.max(d);
            assert!(
                d <= 0.002,
                "{file}: class {class} (rank {p}) p {ours} vs PyTorch {prob}"
            );
        }
    }
    eprintln!("worst |dp| over the JPEG fixtures: {worst:.2e}");
}

/// The bf16 engine (AVX512-BF16) keeps the f32 engine's top-1 on every real photo of the fixtures
/// (the two PNGs and the ten JPEGs), and coffee stays espresso.
#[test]
fn bf16_keeps_the_fp32_top1_on_every_photo() {
    let mut fp32 = lite0(Backend::Engine);
    let mut bf16 = lite0(Backend::Engine);
    if let Err(e) = bf16.set_precision(effnet::engine::Precision::Bf16) {
        eprintln!("not exercised: {e}");
        return;
    }
    let photos = photos();
    let mut worst = 0f32;
    for photo in &photos {
        let img = load_rgb(photo).unwrap();
        let (a, b) = (
            &fp32.top_k(std::slice::from_ref(&img), 1000).unwrap()[0],
            &bf16.top_k(std::slice::from_ref(&img), 1000).unwrap()[0],
        );
        assert_eq!(a[0].class, b[0].class, "{}", photo.display());
        let mut pa = vec![0f32; 1000];
        let mut pb = vec![0f32; 1000];
        for (x, y) in a.iter().zip(b) {
            pa[x.class] = x.probability;
            pb[y.class] = y.probability;
        }
        worst = worst.max(max_abs_diff(&pa, &pb));
    }
    eprintln!(
        "bf16 vs fp32 on {} photos: same top-1, max |dp| {worst:.4}",
        photos.len()
    );
    let img = load_rgb(&fixture("images/coffee.png")).unwrap();
    assert_eq!(bf16.top_k(&[img], 1).unwrap()[0][0].label, "espresso");
}
