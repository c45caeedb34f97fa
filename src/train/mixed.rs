//! Mixed precision: convolutions and the classifier in f16 or bf16, everything else in f32.
//!
//! burn 0.22 has no autocast, but it casts tensors inside the autodiff graph (`Tensor::cast`, whose
//! backward casts the gradient back). So each step casts the f32 master weights of every conv and
//! the classifier to the half type ([`half_copy`]); a conv whose weights are half casts its input to
//! them and its output back to f32 (`model::fused::conv2d`). Batch norm, activations, the loss, the
//! gradients reaching the master weights, RMSProp's state and the EMA stay f32. f16 has too few
//! exponent bits for small gradients, so with it the loss is scaled before the backward pass and
//! the gradients unscaled after, the scale adapting as PyTorch's `GradScaler` does
//! ([`LossScale`]); bf16 has f32's range and needs none.

use burn::module::Param;
use burn::optim::GradientsParams;
use burn::tensor::{FloatDType, Tensor};

use crate::device::DeviceChoice;
use crate::model::{EfficientNet, ParamMapper, ParamVisitor, map_params, visit_params};

/// The compute type of mixed-precision training.
#[derive(
    Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize, clap::ValueEnum,
)]
#[serde(rename_all = "lowercase")]
pub enum HalfType {
    /// IEEE half: tensor cores on every CUDA GPU and shader-f16 on wgpu; needs loss scaling.
    F16,
    /// bfloat16: f32's range, no loss scaling; CUDA (Ampere and later), not wgpu.
    Bf16,
}

impl HalfType {
    pub fn dtype(self) -> FloatDType {
        match self {
            HalfType::F16 => FloatDType::F16,
            HalfType::Bf16 => FloatDType::BF16,
        }
    }
}

impl std::fmt::Display for HalfType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HalfType::F16 => "f16",
            HalfType::Bf16 => "bf16",
        })
    }
}

/// Refuses mixed precision where it cannot run or cannot pay, in one line: on the CPU (Flex's
/// fused training ops are f32; half-precision convolutions there take burn's generic path, several
/// times slower than the f32 step) and bf16 on wgpu/Vulkan (WGSL has no bf16).
pub fn check_device(half: Option<HalfType>, devices: &[DeviceChoice]) -> anyhow::Result<()> {
    let Some(half) = half else { return Ok(()) };
    for d in devices {
        match (half, d) {
            (_, DeviceChoice::Cpu) => anyhow::bail!(
                "--mixed-precision {half} is for GPU devices (--device cuda or wgpu): on the CPU the f32 step is faster"
            ),
            (HalfType::Bf16, DeviceChoice::Wgpu(_) | DeviceChoice::Vulkan(_)) => anyhow::bail!(
                "--mixed-precision bf16 needs a CUDA device (wgpu and Vulkan shaders have no bf16); use f16 on {d}"
            ),
            _ => {}
        }
    }
    Ok(())
}

/// The parameters that compute in the half type: every conv's and the classifier's weight and bias
/// (BN's are `gamma` and `beta`).
fn computes_in_half(path: &str) -> bool {
    path.ends_with(".weight") || path.ends_with(".bias")
}

/// `model` with every conv and classifier weight and bias cast to `dtype` inside the autodiff
/// graph (same parameter ids; gradients flow back to the f32 originals). BN parameters and
/// statistics are not cast.
pub fn half_copy(model: &EfficientNet, dtype: FloatDType) -> EfficientNet {
    struct Cast(FloatDType);
    impl ParamMapper for Cast {
        fn map<const D: usize>(&mut self, path: &str, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
            if computes_in_half(path) {
                p.map(|t| t.cast(self.0))
            } else {
                p
            }
        }
    }
    map_params(model.clone(), Cast(dtype)).0
}

/// Dynamic loss scaling for f16, with `torch.cuda.amp.GradScaler`'s defaults: start at 2^16,
/// halve and skip the step when a gradient is not finite, double after 2000 finite steps in a row.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LossScale {
    pub scale: f32,
    /// Finite steps since the scale last changed.
    pub good_steps: u32,
}

impl Default for LossScale {
    fn default() -> Self {
        LossScale {
            scale: 65536.0,
            good_steps: 0,
        }
    }
}

impl LossScale {
    const GROWTH_INTERVAL: u32 = 2000;

    /// The scale for the next step, after a step whose gradients were (not) all finite.
    pub fn after(self, finite: bool) -> Self {
        if !finite {
            return LossScale {
                scale: (self.scale / 2.0).max(1.0),
                good_steps: 0,
            };
        }
        match self.good_steps + 1 >= Self::GROWTH_INTERVAL {
            true => LossScale {
                scale: (self.scale * 2.0).min(f32::MAX / 2.0),
                good_steps: 0,
            },
            false => LossScale {
                good_steps: self.good_steps + 1,
                ..self
            },
        }
    }
}

/// Divides every gradient of `model`'s parameters by `scale`; true when all are finite (read back
/// once for the whole model).
pub fn unscale(model: &EfficientNet, grads: &mut GradientsParams, scale: f32) -> bool {
    struct Unscale<'a> {
        grads: &'a mut GradientsParams,
        inverse: f32,
        total: Option<Tensor<1>>,
    }
    impl ParamVisitor for Unscale<'_> {
        fn visit<const D: usize>(&mut self, _path: &str, param: &Param<Tensor<D>>) {
            if let Some(g) = self.grads.remove::<D>(param.id) {
                let g = g.mul_scalar(self.inverse);
                // A sum is NaN or infinite when any term is (finite f32 gradients do not
                // overflow it).
                let s = g.clone().abs().sum();
                self.total = Some(match self.total.take() {
                    Some(t) => t + s,
                    None => s,
                });
                self.grads.register(param.id, g);
            }
        }
    }
    let u = visit_params(
        model,
        Unscale {
            grads,
            inverse: 1.0 / scale,
            total: None,
        },
    );
    u.total.is_none_or(|t| t.into_scalar::<f32>().is_finite())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::loader::Batch;
    use crate::train::{TfRmsProp, TrainConfig, Trainer};
    use burn::optim::ModuleOptimizer;
    use burn::tensor::{DType, Device};

    /// Lite0 with 4 classes, TF-initialised from `seed` on the host.
    fn lite0(device: &Device, seed: u64) -> EfficientNet {
        let mut spec = crate::spec::variant("lite0").unwrap();
        spec.num_classes = 4;
        // No random masks: runs in different precisions must see the same network.
        spec.dropout = 0.0;
        spec.drop_connect_rate = 0.0;
        EfficientNet::new(&spec, device).tf_init_seeded(seed)
    }

    fn batch() -> Batch {
        let (n, side) = (8, 64);
        Batch {
            images: crate::data::fixed_pattern(n * 3 * side * side),
            labels: (0..n).map(|i| (i % 4) as u32).collect(),
            size: n,
            side,
        }
    }

    fn dtypes(model: &EfficientNet) -> Vec<(String, DType)> {
        struct Collect(Vec<(String, DType)>);
        impl ParamVisitor for Collect {
            fn visit<const D: usize>(&mut self, path: &str, p: &Param<Tensor<D>>) {
                self.0.push((path.to_string(), p.dtype()));
            }
        }
        visit_params(model, Collect(Vec::new())).0
    }

    /// Steps of `half` (or f32) from `model` with the recipe's RMSProp: (weights, the first
    /// step's loss, which both precisions take at the same weights).
    fn train(model: EfficientNet, half: Option<HalfType>, steps: u64) -> (EfficientNet, f64) {
        let cfg = TrainConfig {
            batch_size: 8,
            mixed_precision: half,
            ..TrainConfig::default()
        };
        let trainer = Trainer::new(&cfg, 4, Device::flex().autodiff());
        // Low enough that no step overflows (2^16 overflows the first steps in f16, which are
        // then skipped, as with PyTorch's GradScaler).
        trainer.set_loss_scale(LossScale {
            scale: 1024.0,
            good_steps: 0,
        });
        let mut optim = ModuleOptimizer::from(TfRmsProp::recipe(&cfg));
        let (mut model, mut loss) = (model, None);
        let stage = cfg.stage(0, 0.0);
        for step in 0..steps {
            let out = trainer.step(
                model,
                &mut optim,
                &batch(),
                &stage,
                step,
                0.016 * 8.0 / 256.0,
            );
            let out = out.unwrap();
            model = out.model;
            loss.get_or_insert(out.loss);
        }
        (model, loss.unwrap())
    }

    /// Conv and classifier tensors of `a` equal to `init`'s.
    fn unmoved(a: &EfficientNet, init: &EfficientNet) -> Vec<String> {
        let (a, init) = (
            crate::model::export_weights(a),
            crate::model::export_weights(init),
        );
        init.iter()
            .filter(|(n, _)| !n.contains(".bn.")) // frozen here
            .filter(|(n, t)| !t.integer && a[*n].data == t.data)
            .map(|(n, _)| n.clone())
            .collect()
    }

    /// Cosine between the moves `a - init` and `b - init` over every weight.
    fn move_cosine(a: &EfficientNet, b: &EfficientNet, init: &EfficientNet) -> f64 {
        let (a, b, init) = (
            crate::model::export_weights(a),
            crate::model::export_weights(b),
            crate::model::export_weights(init),
        );
        let (mut ab, mut aa, mut bb) = (0.0f64, 0.0f64, 0.0f64);
        for (name, t0) in init.iter().filter(|(n, _)| !n.contains("running")) {
            for ((x, y), z) in a[name].data.iter().zip(&b[name].data).zip(&t0.data) {
                let (u, v) = ((x - z) as f64, (y - z) as f64);
                (ab, aa, bb) = (ab + u * v, aa + u * u, bb + v * v);
            }
        }
        ab / (aa.sqrt() * bb.sqrt())
    }

    fn max_abs_diff(a: &EfficientNet, b: &EfficientNet) -> (f32, f32) {
        let (a, b) = (
            crate::model::export_weights(a),
            crate::model::export_weights(b),
        );
        let (mut diff, mut scale) = (0.0f32, 0.0f32);
        for (name, t) in a.iter() {
            let u = &b[name];
            for (x, y) in t.data.iter().zip(&u.data) {
                diff = diff.max((x - y).abs());
                scale = scale.max(x.abs());
            }
        }
        (diff, scale)
    }

    /// Largest |logit| change of `model` in training mode when `change` is applied to it.
    fn logit_change(model: &EfficientNet, changed: &EfficientNet) -> f32 {
        let x = Tensor::<4>::from_data(
            burn::tensor::TensorData::new(batch().images, [8, 3, 64, 64]),
            &Device::flex().autodiff(),
        );
        let (y, z) = (model.forward(x.clone()), changed.forward(x));
        assert_eq!(z.dtype(), DType::F32);
        (y - z).abs().max().into_scalar::<f32>()
    }

    /// Every conv and classifier weight and bias multiplied by 1 + u, u uniform in +-`rel`.
    fn jittered(model: &EfficientNet, rel: f32) -> EfficientNet {
        struct Jitter(f32);
        impl ParamMapper for Jitter {
            fn map<const D: usize>(&mut self, path: &str, p: Param<Tensor<D>>) -> Param<Tensor<D>> {
                if !computes_in_half(path) {
                    return p;
                }
                let rel = self.0;
                p.map(|t| {
                    let u = t.random_like(burn::tensor::Distribution::Uniform(-1.0, 1.0));
                    t.clone() + t * u.mul_scalar(rel)
                })
            }
        }
        map_params(model.clone(), Jitter(rel)).0
    }

    #[test]
    fn the_half_copy_casts_convs_and_the_classifier_and_leaves_the_master_f32() {
        let device = Device::flex().autodiff();
        device.seed(7);
        let model = lite0(&device, 7);
        let half = half_copy(&model, FloatDType::BF16);
        let (mut cast, mut kept) = (0, 0);
        for (path, dtype) in dtypes(&half) {
            if computes_in_half(&path) {
                assert_eq!(dtype, DType::BF16, "{path}");
                cast += 1;
            } else {
                assert_eq!(dtype, DType::F32, "{path} (batch norm stays f32)");
                kept += 1;
            }
        }
        assert!(cast > 50 && kept > 50, "{cast} cast, {kept} kept");
        assert!(dtypes(&model).iter().all(|(_, d)| *d == DType::F32));
        // The forward pass computes in the half type and hands back f32 logits. A fresh network
        // normalising 8 images by their batch statistics is sensitive: rounding its f32 weights to
        // the type's precision alone (a relative jitter of one unit in the last place) moves its
        // logits by about as much, so that is the yardstick (over seeds 0-11 the ratio was
        // 0.84-1.80 in bf16 and 1.33-2.08 in f16).
        for (dtype, ulp) in [
            (FloatDType::BF16, 2f32.powi(-8)),
            (FloatDType::F16, 2f32.powi(-11)),
        ] {
            let rounding = logit_change(&model, &half_copy(&model, dtype));
            let jitter = logit_change(&model, &jittered(&model, ulp));
            eprintln!(
                "{dtype:?}: logits moved {rounding}, by f32 weights jittered {ulp}: {jitter}"
            );
            assert!(
                rounding > 0.0 && rounding <= 3.0 * jitter,
                "{dtype:?}: {rounding} vs {jitter}"
            );
        }
    }

    /// Three steps in bf16 and in f16 (BN frozen, so that the network is not the sensitive one
    /// above) move the f32 master weights as the f32 steps do, every weight reached through the
    /// casts.
    #[test]
    fn mixed_precision_steps_follow_the_f32_steps() {
        let device = Device::flex().autodiff();
        let init = lite0(&device, 11).freeze_batch_norm();
        let (f32_model, f32_loss) = train(init.clone(), None, 3);
        for half in [HalfType::Bf16, HalfType::F16] {
            let (model, loss) = train(init.clone(), Some(half), 3);
            assert!(
                dtypes(&model).iter().all(|(_, d)| *d == DType::F32),
                "{half}"
            );
            let cos = move_cosine(&model, &f32_model, &init);
            eprintln!(
                "{half}: first loss {loss:.5} (f32 {f32_loss:.5}); cosine of the weights' moves {cos:.5}"
            );
            // The initial weights come from a host RNG: tests share and reseed the device's, and
            // a CI run whose init came partly from another test's stream saw an f16 cosine of
            // 0.89. Over host seeds 0-15 the first losses differed by 0.1-1.8 % (bf16) and
            // 0.08-0.56 % (f16), the cosines were 0.918-0.982 (bf16) and 0.973-0.993 (f16); a
            // gradient lost in the casts would leave weights unmoved or point elsewhere.
            assert!(
                (loss - f32_loss).abs() <= 0.03 * f32_loss,
                "{half}: {loss} vs {f32_loss}"
            );
            let least = if half == HalfType::Bf16 { 0.8 } else { 0.9 };
            assert!(cos >= least, "{half}: cosine {cos}");
            assert!(
                unmoved(&model, &init).is_empty(),
                "{half}: {:?} did not train",
                unmoved(&model, &init)
            );
        }
    }

    /// An f16 step whose scaled gradients overflow changes nothing and halves the scale.
    #[test]
    fn an_overflowing_f16_step_is_skipped() {
        let device = Device::flex().autodiff();
        let init = lite0(&device, 3);
        let cfg = TrainConfig {
            batch_size: 8,
            mixed_precision: Some(HalfType::F16),
            ..TrainConfig::default()
        };
        let trainer = Trainer::new(&cfg, 4, device);
        let huge = LossScale {
            scale: 1e30,
            good_steps: 7,
        };
        trainer.set_loss_scale(huge);
        let mut optim = ModuleOptimizer::from(TfRmsProp::default());
        let (stage, data) = (cfg.stage(0, 0.0), batch());
        let mut step = || {
            trainer
                .step(init.clone(), &mut optim, &data, &stage, 0, 0.01)
                .unwrap()
        };
        let out = step();
        assert!(out.loss.is_finite());
        assert_eq!(max_abs_diff(&out.model, &init).0, 0.0);
        assert_eq!(trainer.loss_scale(), huge.after(false));
        // From the default scale, steps are skipped (each halving it) until the gradients fit f16;
        // then the weights move.
        trainer.set_loss_scale(LossScale::default());
        let mut skipped = 0;
        loop {
            let before = trainer.loss_scale();
            let out = step();
            let moved = max_abs_diff(&out.model, &init).0 > 0.0;
            assert_eq!(trainer.loss_scale(), before.after(moved), "{before:?}");
            if moved {
                break;
            }
            skipped += 1;
            assert!(
                skipped <= 16,
                "still overflowing at {:?}",
                trainer.loss_scale()
            );
        }
        eprintln!(
            "{skipped} steps skipped from 2^16; went through at {:?}",
            trainer.loss_scale()
        );
    }

    #[test]
    fn the_scale_backs_off_on_overflow_and_grows_after_a_run_of_finite_steps() {
        let s = LossScale::default();
        assert_eq!(
            s.after(false),
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
        let mut t = s;
        for _ in 0..1999 {
            t = t.after(true);
        }
        assert_eq!(
            t,
            LossScale {
                scale: 65536.0,
                good_steps: 1999
            }
        );
        assert_eq!(
            t.after(true),
            LossScale {
                scale: 131072.0,
                good_steps: 0
            }
        );
        assert_eq!(
            t.after(false),
            LossScale {
                scale: 32768.0,
                good_steps: 0
            }
        );
        let tiny = LossScale {
            scale: 1.0,
            good_steps: 5,
        };
        assert_eq!(tiny.after(false).scale, 1.0);
    }
}
