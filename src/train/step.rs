//! One optimizer step as the recipe defines it, shared by `train` and the training benchmark.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::bail;
use burn::module::Param;
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::SeedableRng;
use rand::rngs::StdRng;

use crate::data::loader::Batch;
use crate::data::mix::mix;
use crate::model::{EfficientNet, ParamVisitor, fused, visit_params};

use super::config::{Stage, TrainConfig};
use super::mixed::{self, HalfType, LossScale};
use super::{Pollers, TfRmsProp};

/// What one training step returns.
pub struct StepOutcome {
    pub model: EfficientNet,
    /// Loss including the L2 term.
    pub loss: f64,
    /// Correct top-1 predictions in the batch (against the dominant label when mixing).
    pub correct: usize,
    /// Where the step's time went.
    pub phases: StepPhases,
}

/// Wall time of a step's parts on the calling thread (on a GPU, kernels queued by one part may
/// still run during the next).
#[derive(Debug, Clone, Copy, Default)]
pub struct StepPhases {
    /// The forward pass and the loss, read back (with the L2 term's value).
    pub forward: Duration,
    /// The backward pass (and f16's unscaling of the gradients).
    pub backward: Duration,
    /// The optimizer's update of every parameter (the L2 term's gradient included).
    pub update: Duration,
}

/// Runs steps of one recipe.
pub struct Trainer<'a> {
    cfg: &'a TrainConfig,
    classes: usize,
    device: Device,
    loss_fn: CrossEntropyLoss,
    /// f16's loss scale, carried from step to step (and through checkpoints).
    loss_scale: Mutex<LossScale>,
}

impl<'a> Trainer<'a> {
    /// `device` must be an autodiff device.
    pub fn new(cfg: &'a TrainConfig, classes: usize, device: Device) -> Self {
        let loss_fn = CrossEntropyLossConfig::new()
            .with_smoothing((cfg.label_smoothing > 0.0).then_some(cfg.label_smoothing))
            .init(&device);
        Trainer {
            cfg,
            classes,
            device,
            loss_fn,
            loss_scale: Mutex::new(LossScale::default()),
        }
    }

    /// The f16 loss scale the next step uses (checkpoints keep it so a resumed run continues
    /// exactly).
    pub fn loss_scale(&self) -> LossScale {
        *self.loss_scale.lock().unwrap()
    }

    pub fn set_loss_scale(&self, scale: LossScale) {
        *self.loss_scale.lock().unwrap() = scale;
    }

    /// Forward (mixing the batch when the stage asks), smoothed cross-entropy + L2 on non-BN
    /// weights, backward, and an RMSProp-TF update at `lr`. The L2 term's gradient is the
    /// optimizer's to add: `optim` is [`TfRmsProp::recipe`] of this trainer's recipe.
    pub fn step(
        &self,
        model: EfficientNet,
        optim: &mut ModuleOptimizer,
        batch: &Batch,
        stage: &Stage,
        step: u64,
        lr: f64,
    ) -> anyhow::Result<StepOutcome> {
        let pollers = Pollers::start();
        let deferred = pollers.as_ref().map(Pollers::deferred);
        let start = Instant::now();
        let cfg = self.cfg;
        let half = cfg
            .mixed_precision
            .map(|h| mixed::half_copy(&model, h.dtype()));
        let net = half.as_ref().unwrap_or(&model);
        let forward = || fused::hold_running_stats(|| self.forward(net, batch, stage, step));
        // TF's l2_loss is sum(w^2) / 2; its gradient, weight_decay * w, is added by the optimizer
        // as it updates each weight rather than backpropagated through the graph (same value, a
        // third of the passes). Its value only reads the weights: with pollers it is a task one
        // of them takes while the forward pass leaves it idle.
        let l2 = || match cfg.weight_decay > 0.0 {
            true => cfg.weight_decay / 2.0 * sum_of_squared_weights(&model),
            false => 0.0,
        };
        let (((loss, correct), running_stats), l2) = match pollers {
            Some(_) => rayon::join(forward, l2),
            None => (forward(), l2()),
        };
        let loss_value = loss.clone().into_scalar::<f32>() as f64 + l2;
        if !loss_value.is_finite() {
            running_stats.apply();
            bail!("training diverged at step {step} (loss {loss_value}); lower the learning rate");
        }
        drop(half);
        let forward = start.elapsed();
        let grads = if cfg.mixed_precision == Some(HalfType::F16) {
            let scale = self.loss_scale();
            let scaled = loss.mul_scalar(scale.scale);
            let mut grads = gradients(scaled, &model, deferred);
            let finite = mixed::unscale(&model, &mut grads, scale.scale);
            self.set_loss_scale(scale.after(finite));
            if !finite {
                // Skipped, as GradScaler does: the weights and the optimizer state stay (the
                // batch norms' running statistics move, as in the forward pass of PyTorch's).
                running_stats.apply();
                return Ok(StepOutcome {
                    model,
                    loss: loss_value,
                    correct,
                    phases: StepPhases {
                        forward,
                        backward: start.elapsed() - forward,
                        update: Duration::ZERO,
                    },
                });
            }
            grads
        } else {
            gradients(loss, &model, deferred)
        };
        let backward = start.elapsed() - forward;
        // The pollers update the large weights while burn's optimizer walks the parameters, and
        // then the batch norms' running statistics.
        let model = fused::deferred::updates(deferred, || {
            let model = optim.step(lr, model, grads);
            running_stats.apply();
            model
        });
        Ok(StepOutcome {
            model,
            loss: loss_value,
            correct,
            phases: StepPhases {
                forward,
                backward,
                update: start.elapsed() - forward - backward,
            },
        })
    }

    /// The loss of `net` on `batch` (mixed when the stage asks) and its correct top-1 count.
    fn forward(
        &self,
        net: &EfficientNet,
        batch: &Batch,
        stage: &Stage,
        step: u64,
    ) -> (Tensor<1>, usize) {
        let (cfg, device) = (self.cfg, &self.device);
        // Dropout and stochastic depth draw from a stream fixed by (seed, step): a resumed run
        // continues exactly as an uninterrupted one.
        device.seed(cfg.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        if stage.mixup_alpha > 0.0 || stage.cutmix_alpha > 0.0 {
            // Mixup / CutMix draw from a stream fixed by (seed, step), like everything else.
            let mut rng = StdRng::seed_from_u64(
                cfg.seed ^ 0x6d69_7875 ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d),
            );
            let alphas = (stage.mixup_alpha, stage.cutmix_alpha);
            let m = mix(
                batch,
                self.classes,
                cfg.label_smoothing as f64,
                alphas,
                &mut rng,
            );
            let mixed = Batch {
                images: m.images,
                labels: m.dominant,
                ..*batch
            };
            let (x, y) = tensors(&mixed, device);
            let targets = Tensor::<2>::from_data(
                TensorData::new(m.targets, [batch.size, self.classes]),
                device,
            );
            let logits = net.forward(x);
            let correct = count_correct(&logits, y);
            // Cross-entropy against soft targets (label smoothing already folded in).
            let loss = (targets * log_softmax(logits, 1)).sum_dim(1).mean().neg();
            (loss, correct)
        } else {
            let (x, y) = tensors(batch, device);
            let logits = net.forward(x);
            let correct = count_correct(&logits, y.clone());
            (self.loss_fn.forward(logits, y), correct)
        }
    }
}

/// `loss.backward()` as the parameters' gradients, the 1x1 weight gradients left to the step's
/// pollers when it has them (`fused::deferred`).
fn gradients(
    loss: Tensor<1>,
    model: &EfficientNet,
    deferred: Option<&Arc<fused::deferred::Queue>>,
) -> GradientsParams {
    let (grads, late) = fused::deferred::backward(deferred, || loss.backward());
    let mut grads = GradientsParams::from_grads(grads, model);
    late.register(&mut grads);
    grads
}

fn count_correct(logits: &Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let [n, _] = logits.dims();
    let pred = logits.clone().argmax(1).reshape([n]);
    pred.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Sum of squares of every conv and classifier weight (not BN, not biases), for the L2 term:
/// through the autodiff graph when `tracked`, on the weights' values alone otherwise.
fn squared_weights(model: &EfficientNet, tracked: bool) -> Option<Tensor<1>> {
    struct SumOfSquares(Option<Tensor<1>>, bool);
    impl ParamVisitor for SumOfSquares {
        fn visit<const D: usize>(&mut self, _path: &str, param: &Param<Tensor<D>>) {
            if TfRmsProp::decays::<D>() {
                let w = match self.1 {
                    true => param.val(),
                    false => param.val().inner(),
                };
                let s = match self.1 {
                    true => w.powi_scalar(2).sum(),
                    false => fused::squared_sum(w),
                };
                self.0 = Some(match self.0.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    visit_params(model, SumOfSquares(None, tracked)).0
}

/// [`squared_weights`]' value, read back once (a GPU would otherwise sync once per weight).
fn sum_of_squared_weights(model: &EfficientNet) -> f64 {
    squared_weights(model, false).map_or(0.0, |s| s.into_scalar::<f32>() as f64)
}

fn tensors(batch: &Batch, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
    let side = batch.side;
    let x = Tensor::<4>::from_data(
        TensorData::new(batch.images.clone(), [batch.size, 3, side, side]),
        device,
    );
    let labels: Vec<i64> = batch.labels.iter().map(|&l| l as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [batch.size]), device);
    (x, y)
}

#[cfg(test)]
mod tests {
    use super::*;
    use burn::tensor::Distribution;

    /// The optimizer's L2 term, `g + decay w` on every weight it covers, takes the same step as
    /// backpropagating `decay / 2 * sum w^2` through the graph, and the reported loss includes
    /// it.
    #[test]
    fn weight_decay_in_the_optimizer_equals_the_backpropagated_l2_term() {
        let device = Device::flex().autodiff();
        let mut spec = crate::spec::variant("lite0").unwrap();
        spec.num_classes = 3;
        // No random masks: the two backward passes below must see the same forward.
        spec.dropout = 0.0;
        spec.drop_connect_rate = 0.0;
        let model = EfficientNet::new(&spec, &device);
        let x = Tensor::<4>::random([2, 3, 32, 32], Distribution::Normal(0.0, 1.0), &device);
        let decay = 0.05;
        let head = |m: &EfficientNet| m.forward(x.clone()).sum();
        let squares = sum_of_squared_weights(&model);

        let l2 = squared_weights(&model, true).unwrap();
        let l2_value = l2.clone().into_scalar::<f32>() as f64;
        // The value read back sums each weight in parallel chunks (f64 across chunks), the graph's
        // with burn's serial f32 sums: 2e-5 apart on Lite0, the graph's the less exact.
        assert!(
            (l2_value - squares).abs() <= 1e-4 * squares,
            "{l2_value} vs {squares}"
        );
        let loss = head(&model) + l2.mul_scalar(decay / 2.0);
        let through_graph = GradientsParams::from_grads(loss.backward(), &model);
        let plain = GradientsParams::from_grads(head(&model).backward(), &model);

        // A learning rate of 1 makes the L2 term's share of the step about decay * |w|.
        let optimizer = |weight_decay| {
            ModuleOptimizer::from(TfRmsProp {
                weight_decay,
                ..TfRmsProp::default()
            })
        };
        let by_optimizer = optimizer(decay).step(1.0, model.clone(), plain);
        let by_graph = optimizer(0.0).step(1.0, model.clone(), through_graph);

        struct Weights(Vec<(String, Tensor<1>, bool)>);
        impl ParamVisitor for Weights {
            fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
                let w = param.val().inner().flatten(0, D - 1);
                self.0.push((path.into(), w, TfRmsProp::decays::<D>()));
            }
        }
        let [a, b, before] =
            [&by_optimizer, &by_graph, &model].map(|m| visit_params(m, Weights(Vec::new())).0);
        let mut decayed = 0;
        for (((path, a, decays), (_, b, _)), (_, w, _)) in a.into_iter().zip(b).zip(before) {
            let moved = (b.clone() - w).abs().max().into_scalar::<f32>();
            let diff = (a - b).abs().max().into_scalar::<f32>();
            assert!(
                diff <= 1e-5 * moved.max(1e-3),
                "{path}: {diff} (step {moved})"
            );
            decayed += decays as usize;
        }
        assert!(decayed >= 40, "{decayed} decayed weights compared");
    }
}
