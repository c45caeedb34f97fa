//! Image classification with a weight set: decoding, the weights' own preprocessing, the model,
//! softmax and top-k.

use std::path::{Path, PathBuf};

use burn::tensor::{Device, Tensor, TensorData};
use image::RgbImage;

use crate::engine::{Engine, Precision};
use crate::model::{EfficientNet, apply_weights};
use crate::preprocess::{ImageError, eval_transform};
use crate::weights::{self, WeightMeta};

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

/// The burn model of `set` on `device`.
pub fn burn_model(set: &weights::WeightSet, device: &Device) -> anyhow::Result<EfficientNet> {
    Ok(apply_weights(
        EfficientNet::new(set.spec(), device),
        &set.tensors,
    )?)
}

/// The burn model's logits for `n` normalised CHW images of side `side`, read back to the host.
pub fn burn_logits(
    net: &EfficientNet,
    device: &Device,
    images: Vec<f32>,
    n: usize,
    side: usize,
) -> Vec<f32> {
    let x = Tensor::<4>::from_data(TensorData::new(images, [n, 3, side, side]), device);
    net.forward(x)
        .into_data()
        .try_to_vec::<f32>()
        .expect("the model's output is f32")
}

/// Which implementation runs the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Backend {
    /// The native CPU inference engine (default; fastest).
    Engine,
    /// The burn model on the Flex CPU backend (the reference implementation).
    Burn,
}

enum Runner {
    Engine(Box<Engine>),
    Burn(Box<EfficientNet>, Device),
}

/// A model with its weights, preprocessing and labels.
pub struct Classifier {
    runner: Runner,
    pub meta: WeightMeta,
    labels: Vec<String>,
}

impl Classifier {
    /// Loads `path` for `model` (inferred from the file when `None`) on `backend`, using `threads`
    /// threads for the engine.
    pub fn from_file(
        path: &Path,
        model: Option<&str>,
        backend: Backend,
        threads: usize,
    ) -> anyhow::Result<Self> {
        Self::new(weights::load(path, model)?, backend, threads)
    }

    /// A classifier for a loaded weight set (its metadata decides the transform and labels).
    pub fn new(set: weights::WeightSet, backend: Backend, threads: usize) -> anyhow::Result<Self> {
        let runner = match backend {
            Backend::Engine => Runner::Engine(Box::new(Engine::new(&set)?.with_threads(threads))),
            Backend::Burn => return Self::on_device(set, Device::flex()),
        };
        Ok(Self::with_runner(set, runner))
    }

    /// A classifier that runs the burn model on `device` (any device [`crate::device`] opens).
    pub fn on_device(set: weights::WeightSet, device: Device) -> anyhow::Result<Self> {
        let net = burn_model(&set, &device)?;
        Ok(Self::with_runner(set, Runner::Burn(Box::new(net), device)))
    }

    fn with_runner(set: weights::WeightSet, runner: Runner) -> Self {
        let labels = set.meta.labels();
        Classifier {
            runner,
            meta: set.meta,
            labels,
        }
    }

    /// The engine's arithmetic ([`Precision`]); the burn model computes in f32 only.
    pub fn set_precision(&mut self, precision: Precision) -> anyhow::Result<()> {
        match &mut self.runner {
            Runner::Engine(e) => Ok(e.set_precision(precision)?),
            Runner::Burn(..) if precision == Precision::Fp32 => Ok(()),
            Runner::Burn(..) => {
                anyhow::bail!("--precision {precision} runs on the engine, not --backend burn")
            }
        }
    }

    /// Class probabilities for each image (one batch).
    pub fn probabilities(&mut self, images: &[RgbImage]) -> Result<Vec<Vec<f32>>, ImageError> {
        let p = &self.meta.preprocess;
        let (n, side) = (images.len(), p.crop);
        let mut data = Vec::with_capacity(n * 3 * side * side);
        for img in images {
            data.extend(eval_transform(img, p)?);
        }
        let logits = match &mut self.runner {
            Runner::Engine(e) => e.forward(&data, n, side, side),
            Runner::Burn(net, device) => burn_logits(net, device, data, n, side),
        };
        Ok(logits
            .chunks(self.meta.spec.num_classes)
            .map(softmax)
            .collect())
    }

    /// The `k` most probable classes of each image, best first.
    pub fn top_k(
        &mut self,
        images: &[RgbImage],
        k: usize,
    ) -> Result<Vec<Vec<Prediction>>, ImageError> {
        Ok(self
            .probabilities(images)?
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
            .collect())
    }
}

/// Index of the largest value (the last of equals, as `max_by` gives; 0 for none).
pub fn argmax(v: &[f32]) -> usize {
    (0..v.len())
        .max_by(|&a, &b| v[a].total_cmp(&v[b]))
        .unwrap_or(0)
}

/// Numerically stable softmax.
pub fn softmax(logits: &[f32]) -> Vec<f32> {
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let exp: Vec<f32> = logits.iter().map(|l| (l - max).exp()).collect();
    let sum: f32 = exp.iter().sum();
    exp.into_iter().map(|e| e / sum).collect()
}
