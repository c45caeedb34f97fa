//! One optimizer step as the recipe defines it, shared by `train` and the training benchmark.

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
use crate::model::{EfficientNet, ParamVisitor, visit_params};

use super::config::{Stage, TrainConfig};

/// What one training step returns.
pub struct StepOutcome {
    pub model: EfficientNet,
    /// Loss including the L2 term.
    pub loss: f64,
    /// Correct top-1 predictions in the batch (against the dominant label when mixing).
    pub correct: usize,
}

/// Runs steps of one recipe.
pub struct Trainer<'a> {
    cfg: &'a TrainConfig,
    classes: usize,
    device: Device,
    loss_fn: CrossEntropyLoss,
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
        }
    }

    /// Forward (mixing the batch when the stage asks), smoothed cross-entropy + L2 on non-BN
    /// weights, backward, and an RMSProp-TF update at `lr`.
    pub fn step(
        &self,
        model: EfficientNet,
        optim: &mut ModuleOptimizer,
        batch: &Batch,
        stage: &Stage,
        step: u64,
        lr: f64,
    ) -> anyhow::Result<StepOutcome> {
        let (cfg, device) = (self.cfg, &self.device);
        // Dropout and stochastic depth draw from a stream fixed by (seed, step): a resumed run
        // continues exactly as an uninterrupted one.
        device.seed(cfg.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let correct;
        let mut loss = if stage.mixup_alpha > 0.0 || stage.cutmix_alpha > 0.0 {
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
            let logits = model.forward(x);
            correct = count_correct(&logits, y);
            // Cross-entropy against soft targets (label smoothing already folded in).
            (targets * log_softmax(logits, 1)).sum_dim(1).mean().neg()
        } else {
            let (x, y) = tensors(batch, device);
            let logits = model.forward(x);
            correct = count_correct(&logits, y.clone());
            self.loss_fn.forward(logits, y)
        };
        if cfg.weight_decay > 0.0
            && let Some(l2) = l2_of_weights(&model)
        {
            // TF's l2_loss is sum(w^2) / 2.
            loss = loss + l2.mul_scalar(cfg.weight_decay / 2.0);
        }
        let loss_value = loss.clone().into_scalar::<f32>() as f64;
        if !loss_value.is_finite() {
            bail!("training diverged at step {step} (loss {loss_value}); lower the learning rate");
        }
        let grads = GradientsParams::from_grads(loss.backward(), &model);
        Ok(StepOutcome {
            model: optim.step(lr, model, grads),
            loss: loss_value,
            correct,
        })
    }
}

fn count_correct(logits: &Tensor<2>, labels: Tensor<1, Int>) -> usize {
    let [n, _] = logits.dims();
    let pred = logits.clone().argmax(1).reshape([n]);
    pred.equal(labels).int().sum().into_scalar::<i64>() as usize
}

/// Sum of squares of every conv and classifier weight (not BN, not biases), for the L2 term.
fn l2_of_weights(model: &EfficientNet) -> Option<Tensor<1>> {
    struct SumOfSquares(Option<Tensor<1>>);
    impl ParamVisitor for SumOfSquares {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
            if D >= 2 && path.ends_with(".weight") {
                let s = param.val().powi_scalar(2).sum();
                self.0 = Some(match self.0.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    visit_params(model, SumOfSquares(None)).0
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
