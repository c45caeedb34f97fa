//! "Precise BN": re-estimates every batch norm's running statistics for a fixed set of weights as
//! the plain average of batch statistics over some training batches. The running averages that
//! training keeps (momentum 0.01, and EMA-averaged across steps) lag the weights they are used
//! with; a short run judged by them measures the lag, not the model.

use burn::tensor::{Device, Tensor, TensorData};

use crate::data::loader::Prepared;
use crate::model::{EfficientNet, apply_weights, export_weights};
use crate::spec::ModelSpec;
use crate::weights::TensorMap;

/// `tensors` (canonical, for `spec`) with BN running statistics recomputed over `batches` batches
/// of `batch_size` un-augmented training images in an order fixed by `seed`, on `device` (the
/// training device).
pub fn recalibrate(
    spec: &ModelSpec,
    tensors: &TensorMap,
    data: &Prepared,
    (batches, batch_size): (usize, usize),
    (seed, device): (u64, &Device),
) -> anyhow::Result<TensorMap> {
    use rand::SeedableRng;
    use rand::seq::SliceRandom;
    // Batch statistics need BN's training mode (an autodiff device); no dropout or dropped blocks.
    let device = device.clone().autodiff();
    let mut plain = spec.clone();
    plain.dropout = 0.0;
    plain.drop_connect_rate = 0.0;
    let mut model = apply_weights(EfficientNet::new(&plain, &device), tensors)?;
    let mut order: Vec<usize> = (0..data.len()).collect();
    order.shuffle(&mut rand::rngs::StdRng::seed_from_u64(seed ^ 0x7072_6563));
    for (k, chunk) in order.chunks_exact(batch_size).take(batches).enumerate() {
        // Momentum 1/(k+1): after k+1 batches each running statistic is their plain mean.
        model.set_bn_momentum(1.0 / (k + 1) as f64);
        let b = data.batch(chunk)?;
        let x = Tensor::<4>::from_data(
            TensorData::new(b.images, [b.size, 3, b.side, b.side]),
            &device,
        );
        let _ = model.forward(x);
    }
    Ok(export_weights(&model))
}
