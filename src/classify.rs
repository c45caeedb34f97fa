//! Image classification with a weight set: decoding, the weights' own preprocessing, the model,
//! softmax and top-k.

use std::path::{Path, PathBuf};

use burn::tensor::activation::softmax;
use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use crate::model::{EfficientNet, apply_weights};
use crate::preprocess::eval_transform;
use crate::weights::{self, WeightMeta};

/// The 1000 ImageNet-1k class names in index order.
pub const IMAGENET_CLASSES: &str = include_str!("../assets/imagenet_classes.txt");

/// A sample photo (scikit-image's `coffee`, public domain) for running without arguments.
pub const SAMPLE_IMAGE: &[u8] = include_bytes!("../assets/coffee.png");

/// File name of the default weights inside [`weights_home`].
pub const DEFAULT_WEIGHTS: &str = "efficientnet-lite0.safetensors";

/// Where installed weights live: `$EFFNET_HOME`, else `$HOME/.cache/effnet`.
pub fn weights_home() -> PathBuf {
    if let Some(dir) = std::env::var_os("EFFNET_HOME") {
        return PathBuf::from(dir);
    }
    let home = std::env::var_os("HOME").map_or_else(|| PathBuf::from("."), PathBuf::from);
    home.join(".cache").join("effnet")
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Prediction {
    pub class: usize,
    pub label: String,
    pub probability: f32,
}

/// A model with its weights, preprocessing and labels.
pub struct Classifier {
    pub model: EfficientNet,
    pub meta: WeightMeta,
    labels: Vec<String>,
    device: Device,
}

impl Classifier {
    /// Loads `path` for `model` (inferred from the file when `None`).
    pub fn from_file(path: &Path, model: Option<&str>, device: &Device) -> anyhow::Result<Self> {
        let set = weights::load(path, model)?;
        let net = apply_weights(EfficientNet::new(&set.spec, device), &set.tensors)?;
        let labels = if set.meta.num_classes == 1000 {
            IMAGENET_CLASSES.lines().map(str::to_string).collect()
        } else {
            (0..set.meta.num_classes)
                .map(|i| format!("class {i}"))
                .collect()
        };
        Ok(Classifier {
            model: net,
            meta: set.meta,
            labels,
            device: device.clone(),
        })
    }

    /// Class probabilities for each image (one batch).
    pub fn probabilities(&self, images: &[RgbImage]) -> Vec<Vec<f32>> {
        let p = &self.meta.preprocess;
        let mut data = Vec::with_capacity(images.len() * 3 * p.crop * p.crop);
        for img in images {
            data.extend(eval_transform(img, p));
        }
        let x = Tensor::<4>::from_data(
            TensorData::new(data, [images.len(), 3, p.crop, p.crop]),
            &self.device,
        );
        let probs = softmax(self.model.forward(x), 1);
        let flat = probs.into_data().try_to_vec::<f32>().expect("float output");
        flat.chunks(self.meta.num_classes)
            .map(<[f32]>::to_vec)
            .collect()
    }

    /// The `k` most probable classes of each image, best first.
    pub fn top_k(&self, images: &[RgbImage], k: usize) -> Vec<Vec<Prediction>> {
        self.probabilities(images)
            .into_iter()
            .map(|probs| {
                let mut idx: Vec<usize> = (0..probs.len()).collect();
                idx.sort_by(|&a, &b| probs[b].total_cmp(&probs[a]));
                idx.into_iter()
                    .take(k)
                    .map(|i| Prediction {
                        class: i,
                        label: self.labels[i].clone(),
                        probability: probs[i],
                    })
                    .collect()
            })
            .collect()
    }
}
