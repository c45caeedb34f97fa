//! The exponential moving average of every weight and BN statistic that the recipe evaluates and
//! saves.

use crate::model::{EfficientNet, export_weights};
use crate::weights::TensorMap;

/// Decay min(d, (1 + n) / (10 + n)) at step n, as the TF reference.
pub struct Ema {
    pub tensors: TensorMap,
    decay: f64,
}

impl Ema {
    pub fn from_tensors(tensors: TensorMap, decay: f64) -> Self {
        Ema { tensors, decay }
    }

    pub fn new(model: &EfficientNet, decay: f64) -> Self {
        Ema {
            tensors: export_weights(model),
            decay,
        }
    }

    pub fn update(&mut self, model: &EfficientNet, step: u64) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64)) as f32;
        for (name, cur) in export_weights(model) {
            if let Some(e) = self.tensors.get_mut(&name) {
                for (e, c) in e.data.iter_mut().zip(&cur.data) {
                    *e = d * *e + (1.0 - d) * c;
                }
            }
        }
    }
}
