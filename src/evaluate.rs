//! Accuracy of a weight set on a labelled dataset with the native engine: top-1/top-5, loss and the
//! confusion matrix. `effnet eval` and the training loop's per-epoch evaluation both use it.

use std::time::Instant;

use anyhow::bail;

use burn::tensor::Device;

use crate::classify::{burn_logits, burn_model, softmax};
use crate::data::loader::Prepared;
use crate::engine::{Engine, Precision};
use crate::weights::WeightSet;

/// What [`evaluate`] measures.
#[derive(Debug, Clone, serde::Serialize)]
pub struct EvalReport {
    pub images: usize,
    pub top1: f64,
    pub top5: f64,
    /// Mean cross-entropy.
    pub loss: f64,
    pub images_per_s: f64,
    /// `confusion[true class][predicted class]`.
    pub confusion: Vec<Vec<usize>>,
}

/// Evaluates canonical weights on `data` in batches of `batch` with the engine on `threads`
/// threads in `precision`.
pub fn evaluate(
    set: &WeightSet,
    data: &Prepared,
    batch: usize,
    (threads, precision): (usize, Precision),
) -> anyhow::Result<EvalReport> {
    let mut engine = Engine::new(set)?
        .with_threads(threads)
        .with_precision(precision)?;
    let classes = engine.num_classes();
    score(data, batch, classes, |images, n, side| {
        engine.forward(&images, n, side, side)
    })
}

/// Evaluates canonical weights on `data` with the burn model on `device` (a GPU, say).
pub fn evaluate_on_device(
    set: &WeightSet,
    data: &Prepared,
    batch: usize,
    device: &Device,
) -> anyhow::Result<EvalReport> {
    let net = burn_model(set, device)?;
    score(data, batch, set.spec().num_classes, |images, n, side| {
        burn_logits(&net, device, images, n, side)
    })
}

/// Top-1/top-5, loss and confusion of the logits `forward` gives for each batch of `data`.
fn score(
    data: &Prepared,
    batch: usize,
    classes: usize,
    mut forward: impl FnMut(Vec<f32>, usize, usize) -> Vec<f32>,
) -> anyhow::Result<EvalReport> {
    if data.num_classes > classes {
        bail!(
            "the dataset has {} classes but the model predicts {classes}: labels >= {classes} cannot be scored",
            data.num_classes
        );
    }
    let mut confusion = vec![vec![0usize; classes]; classes];
    let (mut top1, mut top5, mut loss) = (0usize, 0usize, 0f64);
    let indices: Vec<usize> = (0..data.len()).collect();
    let start = Instant::now();
    for chunk in indices.chunks(batch.max(1)) {
        let b = data.batch(chunk)?;
        let logits = forward(b.images, b.size, data.side);
        for (row, &label) in logits.chunks(classes).zip(&b.labels) {
            let label = label as usize;
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            top1 += (order[0] == label) as usize;
            top5 += order.iter().take(5).any(|&c| c == label) as usize;
            loss -= (softmax(row)[label].max(1e-12) as f64).ln();
            confusion[label][order[0]] += 1;
        }
    }
    let n = data.len().max(1) as f64;
    Ok(EvalReport {
        images: data.len(),
        top1: top1 as f64 / n,
        top5: top5 as f64 / n,
        loss: loss / n,
        images_per_s: n / start.elapsed().as_secs_f64(),
        confusion,
    })
}
