//! `effnet train`: the training loop (RMSProp-TF, warmup + staircase schedule, label smoothing, L2 on
//! non-BN weights, EMA of weights and BN statistics, evaluation on the EMA weights with the native
//! engine), per-epoch metrics as JSONL and CSV, and the final weights as safetensors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::{CrossEntropyLoss, CrossEntropyLossConfig};
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

use crate::data::augment::{Augment, Crop, Policy};
use crate::data::loader::{Batch, Prepared};
use crate::data::mix::mix;
use crate::engine::Engine;
use crate::model::{EfficientNet, export_weights};
use crate::spec::ModelSpec;
use crate::weights::{
    self, Interpolation, Layout, Preprocess, TensorMap, WeightSet, layout::default_meta,
};
use burn::tensor::activation::log_softmax;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::{Decay, LrSchedule, TfRmsProp};

/// Every knob of a run; saved with the run as `config.toml`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    pub model: String,
    /// What `--dataset` named (recorded so `--resume` reloads the same data).
    pub dataset: String,
    /// Use only the first N training images (0 = all).
    pub train_limit: usize,
    /// Write a checkpoint every this many steps (and at every epoch end).
    pub checkpoint_every: u64,
    /// Depth and width multipliers on top of `model` (from --phi / --depth / --width).
    pub depth_multiplier: f64,
    pub width_multiplier: f64,
    pub resolution: usize,
    pub epochs: usize,
    /// Stop after this many optimizer steps (0 = run all epochs).
    pub max_steps: u64,
    pub batch_size: usize,
    /// Learning rate per 256 images (scaled linearly with the batch).
    pub base_lr: f64,
    pub warmup_epochs: f64,
    pub decay_rate: f64,
    pub decay_epochs: f64,
    /// `exponential` (the TF staircase) or `cosine` (to zero over the run; suits short runs).
    pub lr_decay: Decay,
    pub rmsprop_decay: f64,
    pub momentum: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    pub label_smoothing: f32,
    /// Learned augmentation: `none`, `v0` (AutoAugment) or `rand-nN-mM` (RandAugment).
    pub augment: Policy,
    /// Inception-style random-resized crop (area 0.08-1) instead of the padded random shift.
    pub random_resized_crop: bool,
    /// Largest random shift of the padded crop, as a fraction of the image side (0 turns it off;
    /// 1/8 is the CIFAR-style 4 pixels at 32).
    pub shift: f64,
    /// Progressive learning (EfficientNetV2): this many stages (0 = off; the paper uses 4), each
    /// ramping image size, RandAugment magnitude, mixup alpha and dropout up to the run's values.
    pub progressive_stages: usize,
    /// First stage's image size (0 = 128, or half the resolution when that is below 256).
    pub progressive_min_resolution: usize,
    /// First stage's RandAugment magnitude and dropout (paper: 5 and 0.1).
    pub progressive_min_magnitude: f32,
    pub progressive_min_dropout: f64,
    /// Mixup Beta(alpha, alpha) (0 = off).
    pub mixup_alpha: f64,
    /// CutMix Beta(alpha, alpha) (0 = off; with mixup on too, each batch picks one at random).
    pub cutmix_alpha: f64,
    pub dropout: Option<f64>,
    pub drop_connect_rate: f64,
    pub bn_momentum: f64,
    pub bn_eps: f64,
    pub ema_decay: f64,
    pub seed: u64,
    /// Initialise as the TF reference (conv N(0, sqrt(2/fan_out)), dense uniform) rather than with
    /// burn's defaults.
    pub tf_init: bool,
    /// Fine-tuning: epochs during which only the head conv and classifier train (0 = none).
    pub freeze_epochs: usize,
    /// Input normalisation `(pixel - mean) / std` (fine-tuning keeps the checkpoint's).
    pub mean: [f32; 3],
    pub std: [f32; 3],
    /// Convolution padding (fine-tuning keeps the checkpoint's).
    pub padding: crate::spec::Padding,
    /// Fine-tuning: learning-rate factor once the whole network trains.
    pub unfrozen_lr_scale: f64,
    /// Keep every BatchNorm in inference mode with fixed statistics and affine parameters (the
    /// Keras fine-tuning recipe); convolutions and the classifier still train.
    pub freeze_bn: bool,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            model: "efficientnet-b0".into(),
            dataset: "fashion-mnist".into(),
            train_limit: 0,
            checkpoint_every: 500,
            depth_multiplier: 1.0,
            width_multiplier: 1.0,
            resolution: 32,
            epochs: 1,
            max_steps: 0,
            batch_size: 64,
            base_lr: 0.016,
            warmup_epochs: 5.0,
            decay_rate: 0.97,
            decay_epochs: 2.4,
            lr_decay: Decay::Exponential,
            rmsprop_decay: 0.9,
            momentum: 0.9,
            epsilon: 1e-3,
            weight_decay: 1e-5,
            label_smoothing: 0.1,
            augment: Policy::None,
            random_resized_crop: false,
            shift: 0.125,
            progressive_stages: 0,
            progressive_min_resolution: 0,
            progressive_min_magnitude: 5.0,
            progressive_min_dropout: 0.1,
            mixup_alpha: 0.0,
            cutmix_alpha: 0.0,
            dropout: None,
            drop_connect_rate: 0.2,
            bn_momentum: 0.01,
            bn_eps: 1e-3,
            ema_decay: 0.9999,
            seed: 0,
            tf_init: true,
            freeze_epochs: 0,
            mean: [127.5; 3],
            std: [127.5; 3],
            padding: crate::spec::Padding::Same,
            unfrozen_lr_scale: 1.0,
            freeze_bn: false,
        }
    }
}

impl TrainConfig {
    pub fn from_toml(path: &Path) -> anyhow::Result<Self> {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("cannot read config `{}`", path.display()))?;
        // toml's own message spans several lines (with a caret diagram): keep the one-line part.
        toml::from_str(&text)
            .map_err(|e| anyhow::anyhow!("invalid config `{}`: {}", path.display(), e.message()))
    }

    /// This config with `key=value` overrides (values in TOML syntax; bare words are strings).
    pub fn with_overrides(&self, overrides: &[String]) -> anyhow::Result<Self> {
        let mut table = toml::Table::try_from(self).context("config does not serialise")?;
        for kv in overrides {
            let (key, value) = kv
                .split_once('=')
                .with_context(|| format!("`--set {kv}`: expected KEY=VALUE"))?;
            let (key, value) = (key.trim(), value.trim());
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            table.insert(key.to_string(), value);
        }
        toml::Value::Table(table)
            .try_into()
            .map_err(|e: toml::de::Error| anyhow::anyhow!("`--set`: {}", e.message()))
    }

    /// Checks the values no run can use (`train` calls it too).
    pub fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.epochs == 0 || self.resolution < 8 {
            bail!("batch size and epochs must be at least 1 and the resolution at least 8");
        }
        if !(0.0..1.0).contains(&self.drop_connect_rate)
            || self.dropout.is_some_and(|d| !(0.0..1.0).contains(&d))
        {
            bail!("dropout and drop_connect_rate must be in [0, 1)");
        }
        if !(0.0..=0.5).contains(&self.shift) {
            bail!("shift must be in [0, 0.5] (a fraction of the image side)");
        }
        if self.progressive_stages > self.epochs {
            bail!(
                "progressive learning needs at least one epoch per stage ({} stages, {} epochs)",
                self.progressive_stages,
                self.epochs
            );
        }
        Ok(())
    }
}

/// What changes between progressive-learning stages.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Stage {
    pub augment: Augment,
    pub mixup_alpha: f64,
    pub cutmix_alpha: f64,
    /// Classifier dropout (None: the model's own).
    pub dropout: Option<f64>,
}

impl TrainConfig {
    /// The augmentation, mixup and dropout of `epoch`: the configured values, or with progressive
    /// learning those of the epoch's stage — stage i of S uses image size
    /// `int(min + (res - min) (i + 1) / S)` and `linspace` ramps of RandAugment magnitude (from
    /// `progressive_min_magnitude`), mixup/CutMix alpha (from 0) and dropout (from
    /// `progressive_min_dropout`), as in EfficientNetV2's Table 6.
    pub fn stage(&self, epoch: usize, model_dropout: f64) -> Stage {
        let crop = if self.random_resized_crop {
            Crop::RandomResized
        } else {
            Crop::Padded {
                pad: self.shift_pad(self.resolution),
            }
        };
        let mut stage = Stage {
            augment: Augment {
                crop,
                flip: true,
                policy: self.augment,
                size: self.resolution,
            },
            mixup_alpha: self.mixup_alpha,
            cutmix_alpha: self.cutmix_alpha,
            dropout: None,
        };
        let stages = self.progressive_stages;
        if stages == 0 {
            return stage;
        }
        let i = (epoch * stages / self.epochs).min(stages - 1);
        let ramp = |lo: f64, hi: f64| match stages {
            1 => hi,
            _ => lo + (hi - lo) * i as f64 / (stages - 1) as f64,
        };
        let res = self.resolution;
        let min = match self.progressive_min_resolution {
            0 if res >= 256 => 128,
            0 => (res / 2).max(8),
            m => m.min(res),
        };
        stage.augment.size = min + (res - min) * (i + 1) / stages;
        if let Policy::RandAugment { n, m } = self.augment {
            let lo = self.progressive_min_magnitude.min(m) as f64;
            stage.augment.policy = Policy::RandAugment {
                n,
                m: ramp(lo, m as f64) as f32,
            };
        }
        stage.augment.crop = match crop {
            Crop::Padded { .. } => Crop::Padded {
                pad: self.shift_pad(stage.augment.size),
            },
            c => c,
        };
        stage.mixup_alpha = ramp(0.0, self.mixup_alpha);
        stage.cutmix_alpha = ramp(0.0, self.cutmix_alpha);
        let p = self.dropout.unwrap_or(model_dropout);
        stage.dropout = Some(ramp(self.progressive_min_dropout.min(p), p));
        stage
    }

    /// The padded crop's largest shift in pixels at image side `side` (at least 1 unless off).
    fn shift_pad(&self, side: usize) -> usize {
        match self.shift {
            0.0 => 0,
            f => ((side as f64 * f).round() as usize).max(1),
        }
    }
}

/// What one training step returns.
pub struct StepOutcome {
    pub model: EfficientNet,
    /// Loss including the L2 term.
    pub loss: f64,
    /// Correct top-1 predictions in the batch (against the dominant label when mixing).
    pub correct: usize,
}

/// One optimizer step as the recipe defines it; shared by `train` and the training benchmark.
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
            let pred = logits.clone().argmax(1).reshape([batch.size]);
            correct = pred.equal(y).int().sum().into_scalar::<i64>() as usize;
            // Cross-entropy against soft targets (label smoothing already folded in).
            (targets * log_softmax(logits, 1)).sum_dim(1).mean().neg()
        } else {
            let (x, y) = tensors(batch, device);
            let logits = model.forward(x);
            let pred = logits.clone().argmax(1).reshape([batch.size]);
            correct = pred.equal(y.clone()).int().sum().into_scalar::<i64>() as usize;
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

/// One epoch's metrics (a JSONL line and a CSV row).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct EpochMetrics {
    pub epoch: usize,
    pub step: u64,
    pub train_loss: f64,
    pub train_top1: f64,
    pub lr: f64,
    pub images_per_s: f64,
    pub eval_top1: f64,
    pub eval_top5: f64,
    pub eval_loss: f64,
    pub seconds: f64,
}

/// Running totals of the current epoch.
#[derive(Debug, Clone, Copy, Default, serde::Serialize, serde::Deserialize)]
pub struct EpochTally {
    /// Batches of the epoch already trained.
    pub batches: usize,
    pub seen: usize,
    pub correct: usize,
    pub loss_sum: f64,
}

/// Where a run stands: enough to continue it exactly.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Progress {
    pub step: u64,
    pub epoch: usize,
    #[serde(flatten)]
    pub tally: EpochTally,
    pub seconds: f64,
    pub metrics: Vec<EpochMetrics>,
}

const CHECKPOINT: &str = "checkpoint";

/// Writes model, optimizer, EMA and progress into `run/checkpoint/` atomically: everything goes to
/// `checkpoint.tmp/` first, and only a complete directory replaces the previous checkpoint (kept as
/// `checkpoint.old/` until the swap is done), so a crash or a full disk never loses the last one.
fn save_checkpoint(
    run: &Path,
    model: &EfficientNet,
    optim: &ModuleOptimizer,
    ema: &WeightSet,
    progress: &Progress,
) -> anyhow::Result<()> {
    let tmp = run.join("checkpoint.tmp");
    let old = run.join("checkpoint.old");
    let cur = run.join(CHECKPOINT);
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp)?;
    }
    std::fs::create_dir_all(&tmp)?;
    let write = || -> anyhow::Result<()> {
        // `valid()` synchronises the BN running statistics, which a record may otherwise capture
        // one update late.
        let _ = model.valid();
        model
            .clone()
            .save_file(tmp.join("model.bpk"))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        optim
            .save(tmp.join("optimizer.bpk"))
            .map_err(|e| anyhow::anyhow!("{e:?}"))?;
        weights::write_safetensors(&tmp.join("ema.safetensors"), ema)?;
        crate::util::write_atomic(&tmp.join("progress.json"), &serde_json::to_vec(progress)?)?;
        Ok(())
    };
    if let Err(e) = write() {
        let _ = std::fs::remove_dir_all(&tmp);
        return Err(e.context(format!(
            "cannot write a checkpoint in `{}` (the previous one is intact)",
            run.display()
        )));
    }
    if cur.exists() {
        if old.exists() {
            std::fs::remove_dir_all(&old)?;
        }
        std::fs::rename(&cur, &old)?;
    }
    std::fs::rename(&tmp, &cur)?;
    if old.exists() {
        std::fs::remove_dir_all(&old)?;
    }
    Ok(())
}

/// The newest complete checkpoint of `run` (`checkpoint/`, or `checkpoint.old/` after a crash mid-swap).
fn checkpoint_dir(run: &Path) -> Option<PathBuf> {
    [CHECKPOINT, "checkpoint.old"]
        .into_iter()
        .map(|d| run.join(d))
        .find(|d| d.join("progress.json").exists())
}

/// Exponential moving average of every weight and BN statistic, decay min(d, (1 + n) / (10 + n)).
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

/// Sum of squares of every conv and classifier weight (not BN, not biases), for the L2 term.
fn l2_of_weights(model: &EfficientNet) -> Option<Tensor<1>> {
    struct Collect {
        path: Vec<String>,
        sum: Option<Tensor<1>>,
    }
    impl ModuleVisitor for Collect {
        fn enter_module(&mut self, name: &str, _: &str) {
            self.path.push(name.to_string());
        }
        fn exit_module(&mut self, _: &str, _: &str) {
            self.path.pop();
        }
        fn visit_float<const D: usize>(&mut self, param: &Param<Tensor<D>>) {
            if D >= 2 && self.path.last().is_some_and(|l| l == "weight") {
                let s = param.val().powi_scalar(2).sum();
                self.sum = Some(match self.sum.take() {
                    Some(acc) => acc + s,
                    None => s,
                });
            }
        }
    }
    let mut c = Collect {
        path: Vec::new(),
        sum: None,
    };
    model.visit(&mut c);
    c.sum
}

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

/// Evaluates canonical weights on `data` with the native engine.
pub fn evaluate(
    set: &WeightSet,
    data: &Prepared,
    batch: usize,
    threads: usize,
) -> anyhow::Result<EvalReport> {
    let mut engine = Engine::new(set)?.with_threads(threads);
    let classes = engine.num_classes();
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
        let b = data.batch(chunk, None);
        let logits = engine.forward(&b.images, b.size, data.side, data.side);
        for (row, &label) in logits.chunks(classes).zip(&b.labels) {
            let label = label as usize;
            let mut order: Vec<usize> = (0..classes).collect();
            order.sort_by(|&x, &y| row[y].total_cmp(&row[x]));
            top1 += (order[0] == label) as usize;
            top5 += order.iter().take(5).any(|&c| c == label) as usize;
            loss -= (crate::classify::softmax(row)[label].max(1e-12) as f64).ln();
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

/// The spec a config trains: the named variant with the run's classes, BN and regularisation.
pub fn train_spec(cfg: &TrainConfig, base: ModelSpec, num_classes: usize) -> ModelSpec {
    let mut spec = base;
    spec.num_classes = num_classes;
    spec.bn_eps = cfg.bn_eps;
    spec.bn_momentum = cfg.bn_momentum;
    spec.drop_connect_rate = cfg.drop_connect_rate;
    if let Some(d) = cfg.dropout {
        spec.dropout = d;
    }
    spec.resolution = cfg.resolution;
    spec.train_resolution = cfg.resolution;
    spec.padding = cfg.padding;
    spec
}

/// How a run starts and reports.
pub struct RunOptions<'a> {
    /// Run directory.
    pub out_dir: &'a Path,
    pub show_progress: bool,
    /// Continue from the run directory's last checkpoint.
    pub resume: bool,
    /// Pretrained canonical tensors to start from (fine-tuning); the classifier is re-initialised.
    pub init: Option<&'a TensorMap>,
}

/// Runs training; writes `config.toml`, `metrics.jsonl`, `metrics.csv`, `curves.png`,
/// `weights.safetensors` (EMA weights, with metadata) and checkpoints under the run directory.
/// Returns the per-epoch metrics. Call it inside [`super::on_thread_pool`] (as `effnet train`
/// does): from outside a rayon pool every parallel op sleeps the caller.
pub fn train(
    cfg: &TrainConfig,
    spec: ModelSpec,
    train_data: &Prepared,
    eval_data: &Prepared,
    opts: RunOptions<'_>,
) -> anyhow::Result<Vec<EpochMetrics>> {
    let RunOptions {
        out_dir,
        show_progress,
        resume,
        init,
    } = opts;
    cfg.validate()?;
    if train_data.len() < cfg.batch_size {
        bail!(
            "the training set has {} images, fewer than one batch of {}",
            train_data.len(),
            cfg.batch_size
        );
    }
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create `{}`", out_dir.display()))?;
    crate::util::write_atomic(
        &out_dir.join("config.toml"),
        toml::to_string(cfg)?.as_bytes(),
    )?;
    let device = Device::flex().autodiff();
    device.seed(cfg.seed);
    let mut model = EfficientNet::new(&spec, &device);
    if cfg.tf_init {
        model = model.tf_init();
    }
    if let Some(pretrained) = init {
        // Fine-tuning: pretrained backbone and head conv, a freshly initialised classifier.
        let mut tensors = crate::model::export_weights(&model);
        for (name, t) in pretrained
            .iter()
            .filter(|(n, _)| !n.starts_with("classifier."))
        {
            tensors.insert(name.clone(), t.clone());
        }
        model = crate::model::apply_weights(model, &tensors)?;
    }
    let mut ema = Ema::new(&model, cfg.ema_decay);
    let mut optim = ModuleOptimizer::from(TfRmsProp {
        decay: cfg.rmsprop_decay,
        momentum: cfg.momentum,
        epsilon: cfg.epsilon,
    });
    let mut progress = Progress::default();
    if resume {
        let dir = checkpoint_dir(out_dir)
            .with_context(|| format!("`{}` has no checkpoint to resume from", out_dir.display()))?;
        let bad = |what: &str, e: String| {
            anyhow::anyhow!("cannot resume from `{}`: {what}: {e}", dir.display())
        };
        model = model
            .try_load_file(dir.join("model.bpk"))
            .map_err(|e| bad("model.bpk does not fit this model", format!("{e:?}")))?;
        optim = optim
            .load(dir.join("optimizer.bpk"))
            .map_err(|e| bad("optimizer.bpk", format!("{e:?}")))?;
        let (tensors, _) = weights::read_tensors(&dir.join("ema.safetensors"))?;
        ema = Ema::from_tensors(tensors, cfg.ema_decay);
        let text = std::fs::read(dir.join("progress.json"))?;
        progress =
            serde_json::from_slice(&text).map_err(|e| bad("progress.json", e.to_string()))?;
    }
    let steps_per_epoch = train_data.len() / cfg.batch_size;
    let total_steps = match cfg.max_steps {
        0 => (steps_per_epoch * cfg.epochs) as u64,
        m => m.min((steps_per_epoch * cfg.epochs) as u64),
    };
    let schedule = LrSchedule {
        base_lr: cfg.base_lr,
        batch_size: cfg.batch_size,
        steps_per_epoch,
        warmup_epochs: cfg.warmup_epochs,
        decay_rate: cfg.decay_rate,
        decay_epochs: cfg.decay_epochs,
        decay: cfg.lr_decay,
        total_steps,
    };
    let trainer = Trainer::new(cfg, spec.num_classes, device.clone());
    let bar = if show_progress {
        indicatif::ProgressBar::new(total_steps)
    } else {
        indicatif::ProgressBar::hidden()
    };
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{bar:30} {pos}/{len} steps {elapsed_precise}<{eta_precise} {msg}",
        )
        .expect("valid template"),
    );
    let mut metrics = progress.metrics.clone();
    let mut step = progress.step;
    let started = Instant::now() - std::time::Duration::from_secs_f64(progress.seconds);
    let mut meta = default_meta(&spec, Layout::Effnet);
    meta.preprocess = Preprocess {
        resize: train_data.side,
        crop: train_data.side,
        interpolation: Interpolation::Bilinear,
        mean: train_data.mean,
        std: train_data.std,
    };
    let ema_set = |ema: &Ema| WeightSet {
        spec: spec.clone(),
        meta: meta.clone(),
        tensors: ema.tensors.clone(),
    };
    let frozen = |epoch: usize| epoch < cfg.freeze_epochs;
    if frozen(progress.epoch) {
        model = model.freeze_backbone();
    }
    if cfg.freeze_bn {
        model = model.freeze_batch_norm();
    }
    for epoch in progress.epoch..cfg.epochs {
        if cfg.freeze_epochs > 0 && epoch == cfg.freeze_epochs {
            model = model.unfreeze();
            if cfg.freeze_bn {
                model = model.freeze_batch_norm();
            }
        }
        let lr_scale = if cfg.freeze_epochs > 0 && !frozen(epoch) {
            cfg.unfrozen_lr_scale
        } else {
            1.0
        };
        let epoch_start = Instant::now();
        let resuming = epoch == progress.epoch;
        let mut t = if resuming {
            progress.tally
        } else {
            EpochTally::default()
        };
        let skip = t.batches;
        let mut stopped_early = false;
        let mut lr = schedule.at(step) * lr_scale;
        let stage = cfg.stage(epoch, spec.dropout);
        if let Some(p) = stage.dropout {
            model.dropout.prob = p;
        }
        for batch in train_data
            .epoch(cfg.batch_size, cfg.seed, epoch as u64, stage.augment)
            .into_iter()
            .skip(skip)
        {
            if step >= total_steps {
                stopped_early = true;
                break;
            }
            lr = schedule.at(step) * lr_scale;
            let out = trainer.step(model, &mut optim, &batch, &stage, step, lr)?;
            model = out.model;
            t.correct += out.correct;
            step += 1;
            ema.update(&model, step);
            t.seen += batch.size;
            t.loss_sum += out.loss;
            t.batches += 1;
            if cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every) {
                let p = Progress {
                    step,
                    epoch,
                    tally: t,
                    seconds: started.elapsed().as_secs_f64(),
                    metrics: metrics.clone(),
                };
                save_checkpoint(out_dir, &model, &optim, &ema_set(&ema), &p)?;
            }
            let rate = t.seen as f64 / epoch_start.elapsed().as_secs_f64();
            bar.set_position(step);
            bar.set_message(format!(
                "epoch {} loss {:.3} acc {:.3} lr {:.4} {:.0} img/s",
                epoch + 1,
                t.loss_sum / t.batches as f64,
                t.correct as f64 / t.seen as f64,
                lr,
                rate
            ));
        }
        if t.batches == 0 {
            break;
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        let set = ema_set(&ema);
        let report = evaluate(&set, eval_data, 256, 2)?;
        let (top1, top5, eval_loss) = (report.top1, report.top5, report.loss);
        let m = EpochMetrics {
            epoch: epoch + 1,
            step,
            train_loss: t.loss_sum / t.batches as f64,
            train_top1: t.correct as f64 / t.seen as f64,
            lr,
            images_per_s: t.seen as f64 / train_seconds,
            eval_top1: top1,
            eval_top5: top5,
            eval_loss,
            seconds: started.elapsed().as_secs_f64(),
        };
        bar.println(format!(
            "epoch {}: train loss {:.4} top-1 {:.4} | EMA eval top-1 {:.4} top-5 {:.4} loss {:.4} | {:.0} img/s",
            m.epoch, m.train_loss, m.train_top1, m.eval_top1, m.eval_top5, m.eval_loss, m.images_per_s
        ));
        metrics.push(m);
        write_metrics(out_dir, &metrics)?;
        super::plot::plot_curves(
            &metrics,
            &format!("{} on {}", spec.name, cfg.dataset),
            &out_dir.join("curves.png"),
        )?;
        weights::write_safetensors(&out_dir.join("weights.safetensors"), &set)?;
        // A run stopped by --max-steps mid-epoch resumes inside that epoch; its partial-epoch metrics
        // row is reported now but not carried into the checkpoint (the resumed epoch replaces it).
        let p = if stopped_early {
            Progress {
                step,
                epoch,
                tally: t,
                seconds: started.elapsed().as_secs_f64(),
                metrics: metrics[..metrics.len() - 1].to_vec(),
            }
        } else {
            Progress {
                step,
                epoch: epoch + 1,
                seconds: started.elapsed().as_secs_f64(),
                metrics: metrics.clone(),
                ..Progress::default()
            }
        };
        save_checkpoint(out_dir, &model, &optim, &set, &p)?;
        if step >= total_steps {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(metrics)
}

fn write_metrics(dir: &Path, metrics: &[EpochMetrics]) -> anyhow::Result<()> {
    let mut jsonl = Vec::new();
    let mut csv = Vec::new();
    writeln!(
        csv,
        "epoch,step,train_loss,train_top1,lr,images_per_s,eval_top1,eval_top5,eval_loss,seconds"
    )?;
    for m in metrics {
        writeln!(jsonl, "{}", serde_json::to_string(m)?)?;
        writeln!(
            csv,
            "{},{},{},{},{},{},{},{},{},{}",
            m.epoch,
            m.step,
            m.train_loss,
            m.train_top1,
            m.lr,
            m.images_per_s,
            m.eval_top1,
            m.eval_top5,
            m.eval_loss,
            m.seconds
        )?;
    }
    crate::util::write_atomic(&dir.join("metrics.jsonl"), &jsonl)?;
    crate::util::write_atomic(&dir.join("metrics.csv"), &csv)?;
    Ok(())
}

/// Default run directory: `runs/<model>-<unix time>`.
pub fn default_run_dir(model: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    PathBuf::from("runs").join(format!("{model}-{t}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progressive_stages_ramp_size_magnitude_mixup_and_dropout() {
        let cfg = TrainConfig {
            resolution: 300,
            epochs: 8,
            progressive_stages: 4,
            augment: Policy::RandAugment { n: 2, m: 15.0 },
            mixup_alpha: 0.2,
            ..TrainConfig::default()
        };
        let stages: Vec<Stage> = (0..8).map(|e| cfg.stage(e, 0.3)).collect();
        // Two epochs per stage; size int(128 + 172 (i + 1) / 4).
        let sizes: Vec<usize> = stages.iter().map(|s| s.augment.size).collect();
        assert_eq!(sizes, [171, 171, 214, 214, 257, 257, 300, 300]);
        let m = |s: &Stage| match s.augment.policy {
            Policy::RandAugment { m, .. } => m,
            _ => unreachable!(),
        };
        assert_eq!(m(&stages[0]), 5.0);
        assert!((m(&stages[2]) - 25.0 / 3.0).abs() < 1e-5);
        assert_eq!(m(&stages[7]), 15.0);
        assert_eq!(stages[0].mixup_alpha, 0.0);
        assert!((stages[7].mixup_alpha - 0.2).abs() < 1e-12);
        assert_eq!(stages[0].dropout, Some(0.1));
        assert!((stages[7].dropout.unwrap() - 0.3).abs() < 1e-12);
        // Padded crops follow the stage's size.
        assert_eq!(stages[0].augment.crop, Crop::Padded { pad: 21 });
        // Off: the configured values every epoch.
        let plain = TrainConfig {
            progressive_stages: 0,
            ..cfg.clone()
        };
        assert_eq!(plain.stage(0, 0.3).augment.size, 300);
        assert_eq!(plain.stage(0, 0.3).dropout, None);
        // Small images start at half the resolution.
        let small = TrainConfig {
            resolution: 32,
            ..cfg
        };
        assert_eq!(small.stage(0, 0.2).augment.size, 20);
        assert_eq!(small.stage(7, 0.2).augment.size, 32);
    }

    #[test]
    fn shift_sets_the_padded_crop_and_zero_turns_it_off() {
        let pad = |shift: f64| {
            let cfg = TrainConfig {
                shift,
                ..TrainConfig::default()
            };
            cfg.validate().map(|_| cfg.stage(0, 0.2).augment.crop)
        };
        assert_eq!(pad(0.125).unwrap(), Crop::Padded { pad: 4 });
        assert_eq!(pad(0.25).unwrap(), Crop::Padded { pad: 8 });
        assert_eq!(pad(0.0).unwrap(), Crop::Padded { pad: 0 });
        assert_eq!(pad(0.001).unwrap(), Crop::Padded { pad: 1 });
        assert!(pad(0.6).unwrap_err().to_string().contains("shift"));
    }

    #[test]
    fn overrides_set_any_field_and_reject_unknown_ones() {
        let cfg = TrainConfig::default()
            .with_overrides(&[
                "lr_decay=cosine".into(),
                "ema_decay = 0.999".into(),
                "augment=rand-n2-m9".into(),
                "dropout=0.3".into(),
                "epochs=7".into(),
            ])
            .unwrap();
        assert_eq!(cfg.lr_decay, Decay::Cosine);
        assert_eq!(cfg.ema_decay, 0.999);
        assert_eq!(cfg.augment, Policy::RandAugment { n: 2, m: 9.0 });
        assert_eq!(cfg.dropout, Some(0.3));
        assert_eq!(cfg.epochs, 7);
        let err = |kv: &str| {
            TrainConfig::default()
                .with_overrides(&[kv.into()])
                .unwrap_err()
                .to_string()
        };
        assert!(err("learning_rate=1").contains("unknown field `learning_rate`"));
        assert!(err("epochs=many").contains("invalid type"));
        assert!(err("augment=v9").contains("unknown augmentation"));
        assert!(err("epochs").contains("expected KEY=VALUE"));
    }
}
