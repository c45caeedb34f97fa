//! Shared test helpers: fixture paths and the PyTorch oracle files.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

use burn::tensor::{Device, Tensor, TensorData};
use effnet::model::{EfficientNet, apply_weights};
use effnet::weights::{self, WeightSet};

pub fn shared() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared")
}

pub fn fixture(rel: &str) -> PathBuf {
    shared().join("fixtures").join(rel)
}

pub const LITE0: &str = "weights/efficientnet-lite0-57934424.pth";
pub const TV_B0: &str = "weights/torchvision_efficientnet_b0_seed0.pth";
pub const TIMM_B0: &str = "weights/timm_tf_efficientnet_b0_seed0.pth";

/// (input [1,3,H,W], logits [1,1000]) of an `io/*_io.safetensors` oracle.
pub fn oracle(name: &str) -> (weights::RawTensor, weights::RawTensor) {
    let (mut t, _) = weights::read_tensors(&fixture(&format!("io/{name}_io.safetensors"))).unwrap();
    (t.remove("input").unwrap(), t.remove("logits").unwrap())
}

pub fn model_for(set: &WeightSet, device: &Device) -> EfficientNet {
    apply_weights(EfficientNet::new(set.spec(), device), &set.tensors).unwrap()
}

pub fn logits(model: &EfficientNet, input: &weights::RawTensor, device: &Device) -> Vec<f32> {
    let x = Tensor::<4>::from_data(
        TensorData::new(input.data.clone(), input.shape.clone()),
        device,
    );
    model.forward(x).into_data().try_to_vec::<f32>().unwrap()
}

pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y).abs())
        .fold(0.0, f32::max)
}

/// Writes MNIST-style IDX files of `n` training and `n / 2` test images (8x8, 3 classes, each
/// class one grey level) into `dir`.
pub fn tiny_idx(dir: &Path, n: usize) {
    for (prefix, count) in [("train", n), ("t10k", n / 2)] {
        let mut img = vec![0, 0, 8, 3];
        for d in [count as u32, 8, 8] {
            img.extend(d.to_be_bytes());
        }
        let mut lab = vec![0, 0, 8, 1];
        lab.extend((count as u32).to_be_bytes());
        for i in 0..count {
            let class = (i % 3) as u8;
            img.extend(std::iter::repeat_n(40 + class * 80, 64));
            lab.push(class);
        }
        std::fs::write(dir.join(format!("{prefix}-images-idx3-ubyte")), img).unwrap();
        std::fs::write(dir.join(format!("{prefix}-labels-idx1-ubyte")), lab).unwrap();
    }
}

/// The fixture photos: the two PNGs, then the ten JPEGs in name order.
pub fn photos() -> Vec<PathBuf> {
    let mut p: Vec<_> = ["images/coffee.png", "images/chelsea.png"]
        .iter()
        .map(|p| fixture(p))
        .collect();
    let mut jpegs: Vec<_> = std::fs::read_dir(fixture("jpeg"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "jpg"))
        .collect();
    jpegs.sort();
    assert_eq!(jpegs.len(), 10);
    p.extend(jpegs);
    p
}

/// The `effnet` binary run with `args` and `EFFNET_HOME` set to `home`.
pub fn effnet(args: &[&str], home: &Path) -> Output {
    Command::new(env!("CARGO_BIN_EXE_effnet"))
        .args(args)
        .env("EFFNET_HOME", home)
        .output()
        .unwrap()
}

pub fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

/// Fails with one clear `error:` line, non-zero exit, and no panic.
pub fn assert_clean_error(o: &Output, needle: &str) {
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success(),
        "expected failure, got success: {}",
        stdout(o)
    );
    assert!(!err.contains("panicked"), "panic: {err}");
    assert_eq!(err.trim().lines().count(), 1, "one line expected: {err}");
    assert!(err.starts_with("error: "), "{err}");
    assert!(err.contains(needle), "`{needle}` not in: {err}");
}
