//! What a weight set needs to be used correctly, carried with the weights.

use crate::spec::Padding;

use super::layout::Layout;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// Eval preprocessing: resize the shorter side to `resize`, center-crop `crop`, then
/// `(pixel - mean) / std` with pixels in 0..=255.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    pub resize: usize,
    pub crop: usize,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Metadata of a weight set: which model, which conventions, which preprocessing.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct WeightMeta {
    /// Canonical variant name (`efficientnet-lite0`).
    pub model: String,
    /// The key layout the weights were imported from.
    pub source: Layout,
    pub padding: Padding,
    pub bn_eps: f64,
    pub num_classes: usize,
    pub preprocess: Preprocess,
}

/// Key under which [`WeightMeta`] is stored as JSON in a safetensors header.
pub const SAFETENSORS_META_KEY: &str = "effnet";
