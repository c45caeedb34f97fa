//! The exponential moving average of every weight and BN statistic that the recipe evaluates and
//! saves. It is kept as a model on the training device (without autodiff) and updated there with
//! tensor ops, so a GPU run does not read every weight back to the host after each step; the
//! arithmetic is the host formula's (`d * ema + (1 - d) * w`, two products and a sum in f32), so
//! the values are the same bit for bit.

use anyhow::Context;
use burn::module::{Module, Param};
use burn::tensor::Tensor;

use crate::model::{
    EfficientNet, ParamMapper, ParamVisitor, apply_weights, export_weights, map_params,
    visit_params,
};
use crate::weights::TensorMap;

/// Decay min(d, (1 + n) / (10 + n)) at step n, as the TF reference.
pub struct Ema {
    model: EfficientNet,
    decay: f64,
}

impl Ema {
    /// An EMA that starts from `tensors` (a checkpoint's), on `template`'s device and architecture.
    pub fn from_tensors(
        tensors: &TensorMap,
        decay: f64,
        template: &EfficientNet,
    ) -> anyhow::Result<Self> {
        let model = apply_weights(template.valid(), tensors).context("the checkpoint's EMA")?;
        Ok(Ema { model, decay })
    }

    /// An EMA that starts from `model`'s current weights.
    pub fn new(model: &EfficientNet, decay: f64) -> Self {
        Ema {
            model: model.valid(),
            decay,
        }
    }

    /// Blends `model`'s weights and BN statistics into the average after step `step`.
    pub fn update(&mut self, model: &EfficientNet, step: u64) {
        let d = self.decay.min((1.0 + step as f64) / (10.0 + step as f64)) as f32;
        let current = visit_params(&model.valid(), Flatten(Vec::new())).0;
        let blend = Blend {
            current: current.into_iter(),
            d,
        };
        self.model = map_params(self.model.clone(), blend).0;
    }

    /// The average under canonical names, read back to the host.
    pub fn tensors(&self) -> TensorMap {
        export_weights(&self.model)
    }
}

/// Every float tensor of a model in visiting order, flattened.
struct Flatten(Vec<Tensor<1>>);

impl ParamVisitor for Flatten {
    fn visit<const D: usize>(&mut self, _: &str, param: &Param<Tensor<D>>) {
        self.0.push(param.val().reshape([-1]));
    }
}

/// `d * ema + (1 - d) * current`, tensor by tensor in the order [`Flatten`] collected them.
struct Blend {
    current: std::vec::IntoIter<Tensor<1>>,
    d: f32,
}

impl ParamMapper for Blend {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let current = self
            .current
            .next()
            .unwrap_or_else(|| panic!("the model has no tensor for the EMA's `{path}`"));
        let d = self.d;
        param.map(|ema| {
            let shape = ema.shape();
            ema.mul_scalar(d)
                .add(current.reshape(shape).mul_scalar(1.0 - d))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Device;

    /// The tensor EMA equals the host formula bit for bit, over several steps.
    #[test]
    fn the_tensor_average_is_the_host_formula() {
        let spec = crate::spec::resolve("efficientnet-lite0").unwrap().0;
        let device = Device::flex().autodiff();
        device.seed(1);
        let a = EfficientNet::new(&spec, &device);
        device.seed(2);
        let b = EfficientNet::new(&spec, &device);
        let mut ema = Ema::new(&a, 0.9999);
        let mut host = export_weights(&a);
        for (step, m) in [(0u64, &b), (1, &a), (2, &b)] {
            ema.update(m, step);
            let d = 0.9999f64.min((1.0 + step as f64) / (10.0 + step as f64)) as f32;
            for (name, cur) in export_weights(m) {
                let e = host.get_mut(&name).unwrap();
                for (e, c) in e.data.iter_mut().zip(&cur.data) {
                    *e = d * *e + (1.0 - d) * c;
                }
            }
        }
        let got = ema.tensors();
        assert_eq!(got.len(), host.len());
        for (name, t) in &host {
            assert_eq!(t.shape, got[name].shape, "{name}");
            assert!(
                t.data
                    .iter()
                    .zip(&got[name].data)
                    .all(|(x, y)| x.to_bits() == y.to_bits()),
                "{name} differs"
            );
        }
        // A checkpoint's EMA comes back exactly.
        let again = Ema::from_tensors(&got, 0.9999, &a).unwrap().tensors();
        assert_eq!(again, got);
    }
}
