//! Shared test helpers: fixture paths and the PyTorch oracle files.
#![allow(dead_code)]

use std::path::PathBuf;

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
