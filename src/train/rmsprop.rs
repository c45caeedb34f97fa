//! RMSProp with the TF semantics the EfficientNet recipe was tuned with (burn's `RmsProp` follows
//! PyTorch, which differs on all three points below):
//! - the mean-square accumulator starts at 1.0, not 0;
//! - epsilon is added inside the square root;
//! - the learning rate multiplies the step inside the momentum buffer:
//!   `ms += (1 - decay)(g^2 - ms); mom = momentum * mom + lr * g / sqrt(ms + eps); w -= mom`.
//!
//! It also adds the recipe's L2 term to the gradient of each weight it covers, `g + weight_decay
//! w` (TF adds `weight_decay / 2 * sum w^2` to the loss): inside the update's one pass over the
//! weights, rather than as a pass of its own before it (docs/benchmarks.md).

use burn::optim::{LearningRate, Optimizer, RecordState, StateSink, StateSource};
use burn::tensor::{Device, Tensor};

use super::TrainConfig;
use crate::model::fused::{RmsPropCoefficients, rmsprop_tf};

#[derive(Debug, Clone, Copy)]
pub struct TfRmsProp {
    pub decay: f64,
    pub momentum: f64,
    pub epsilon: f64,
    /// The L2 factor for the parameters [`TfRmsProp::decays`] covers.
    pub weight_decay: f64,
}

impl Default for TfRmsProp {
    /// The EfficientNet values: decay 0.9, momentum 0.9, epsilon 1e-3, weight decay 1e-5.
    fn default() -> Self {
        TfRmsProp::recipe(&TrainConfig::default())
    }
}

impl TfRmsProp {
    /// The optimizer of a training recipe.
    pub fn recipe(cfg: &TrainConfig) -> Self {
        TfRmsProp {
            decay: cfg.rmsprop_decay,
            momentum: cfg.momentum,
            epsilon: cfg.epsilon,
            weight_decay: cfg.weight_decay,
        }
    }

    /// Whether a `D`-dimensional parameter takes the L2 term: the convolution and classifier
    /// weights (every parameter of two or more dimensions), not batch norm's or the biases.
    pub fn decays<const D: usize>() -> bool {
        D >= 2
    }
}

/// Per-parameter state: mean square and momentum buffers.
#[derive(Clone)]
pub struct TfRmsPropState<const D: usize> {
    pub mean_square: Tensor<D>,
    pub momentum: Tensor<D>,
}

// burn's `#[derive(RecordState)]` names paths inside burn-optim, so the two leaves are written out.
impl<const D: usize> RecordState for TfRmsPropState<D> {
    fn state_flatten(&self, prefix: &str, out: &mut StateSink) {
        out.push_tensor(prefix, "mean_square", self.mean_square.to_data());
        out.push_tensor(prefix, "momentum", self.momentum.to_data());
    }

    fn state_unflatten(prefix: &str, src: &mut StateSource, device: &Device) -> Option<Self> {
        Some(TfRmsPropState {
            mean_square: Tensor::from_data(src.take_tensor(prefix, "mean_square")?, device),
            momentum: Tensor::from_data(src.take_tensor(prefix, "momentum")?, device),
        })
    }
}

impl Optimizer for TfRmsProp {
    type State<const D: usize> = TfRmsPropState<D>;

    fn step<const D: usize>(
        &self,
        lr: LearningRate,
        tensor: Tensor<D>,
        grad: Tensor<D>,
        state: Option<Self::State<D>>,
    ) -> (Tensor<D>, Option<Self::State<D>>) {
        let (ms, mom) = match state {
            Some(s) => (s.mean_square, s.momentum),
            None => (grad.ones_like(), grad.zeros_like()),
        };
        let coefficients = RmsPropCoefficients {
            lr: lr as f32,
            decay_complement: (1.0 - self.decay) as f32,
            momentum: self.momentum as f32,
            epsilon: self.epsilon as f32,
            weight_decay: match Self::decays::<D>() {
                true => self.weight_decay as f32,
                false => 0.0,
            },
        };
        let (tensor, ms, mom) = rmsprop_tf(tensor, grad, ms, mom, coefficients);
        (
            tensor,
            Some(TfRmsPropState {
                mean_square: ms,
                momentum: mom,
            }),
        )
    }

    fn to_device<const D: usize>(state: Self::State<D>, device: &Device) -> Self::State<D> {
        TfRmsPropState {
            mean_square: state.mean_square.to_device(device),
            momentum: state.momentum.to_device(device),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::TensorData;

    #[test]
    fn matches_a_hand_computed_sequence() {
        // w0 = 1, lr 0.1, grads 0.5, -0.3, 0.8; values computed by hand (Python, float64):
        //   ms  = 1 + 0.1 (g^2 - 1) ...; mom = 0.9 mom + 0.1 g / sqrt(ms + 1e-3); w -= mom
        let expected = [
            (0.948_040_554_109_203_4, 0.925, 0.051_959_445_890_796_58),
            (0.933_961_135_449_657_1, 0.8415, 0.014_079_418_659_546_33),
            (0.833_070_758_585_474, 0.82135, 0.100_890_376_864_183_06),
        ];
        let device = Device::flex();
        let opt = TfRmsProp::default();
        let mut w = Tensor::<1>::from_data(TensorData::new(vec![1.0f32], [1]), &device);
        let mut state = None;
        for (g, (want_w, want_ms, want_mom)) in [0.5f32, -0.3, 0.8].into_iter().zip(expected) {
            let grad = Tensor::<1>::from_data(TensorData::new(vec![g], [1]), &device);
            let (nw, s) = opt.step(0.1, w, grad, state);
            let s = s.unwrap();
            let val = |t: &Tensor<1>| t.clone().into_data().try_to_vec::<f32>().unwrap()[0] as f64;
            assert!(
                (val(&nw) - want_w).abs() < 1e-6,
                "w {} vs {want_w}",
                val(&nw)
            );
            assert!((val(&s.mean_square) - want_ms).abs() < 1e-6);
            assert!((val(&s.momentum) - want_mom).abs() < 1e-6);
            w = nw;
            state = Some(s);
        }
    }
}

#[cfg(test)]
mod model_tests {
    use super::*;
    use crate::model::EfficientNet;
    use burn::optim::{GradientsParams, ModuleOptimizer};
    use burn::tensor::{Int, TensorData};

    #[test]
    fn trains_the_model_on_a_fixed_batch() {
        // A few TF-RMSProp steps on one batch must drive its loss down: the optimizer is wired to
        // every parameter of the burn model.
        let device = Device::flex().autodiff();
        let mut spec = crate::spec::variant("lite0").unwrap();
        spec.num_classes = 4;
        spec.dropout = 0.0;
        spec.drop_connect_rate = 0.0;
        // The TF init drawn on the host: tests running side by side share and reseed the
        // device's RNG, so a "fixed" device draw was not. From host seeds 0-11 at this rate the
        // loss fell to 0.45x (seed 3) to 5e-8x its start in 8 steps; seed 1 falls to 0.10x.
        let mut model = EfficientNet::new(&spec, &device).tf_init_seeded(1);
        let pixels = crate::data::fixed_pattern(8 * 3 * 32 * 32);
        let x = Tensor::<4>::from_data(TensorData::new(pixels, [8, 3, 32, 32]), &device);
        let y = Tensor::<1, Int>::from_data(
            TensorData::new(vec![0i64, 1, 2, 3, 0, 1, 2, 3], [8]),
            &device,
        );
        let mut optim = ModuleOptimizer::from(TfRmsProp::default());
        let loss_of = |m: &EfficientNet| {
            burn::nn::loss::CrossEntropyLossConfig::new()
                .init(&device)
                .forward(m.forward(x.clone()), y.clone())
        };
        let first = loss_of(&model).into_scalar::<f32>();
        for _ in 0..8 {
            let loss = loss_of(&model);
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(0.002, model, grads);
        }
        let last = loss_of(&model).into_scalar::<f32>();
        assert!(last < 0.5 * first, "loss {first} -> {last}");
    }
}
