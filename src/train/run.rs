//! `effnet train`: the training loop (RMSProp-TF, warmup + staircase schedule, label smoothing, L2 on
//! non-BN weights, EMA of weights and BN statistics, evaluation on the EMA weights with the native
//! engine), per-epoch metrics as JSONL and CSV, and the final weights as safetensors.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::{Module, ModuleVisitor, Param};
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::{GradientsParams, ModuleOptimizer};
use burn::tensor::{Device, Int, Tensor, TensorData};

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

use super::{LrSchedule, TfRmsProp};

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
    pub rmsprop_decay: f64,
    pub momentum: f64,
    pub epsilon: f64,
    pub weight_decay: f64,
    pub label_smoothing: f32,
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
            rmsprop_decay: 0.9,
            momentum: 0.9,
            epsilon: 1e-3,
            weight_decay: 1e-5,
            label_smoothing: 0.1,
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

    fn validate(&self) -> anyhow::Result<()> {
        if self.batch_size == 0 || self.epochs == 0 || self.resolution < 8 {
            bail!("batch size and epochs must be at least 1 and the resolution at least 8");
        }
        if !(0.0..1.0).contains(&self.drop_connect_rate)
            || self.dropout.is_some_and(|d| !(0.0..1.0).contains(&d))
        {
            bail!("dropout and drop_connect_rate must be in [0, 1)");
        }
        Ok(())
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
        let b = data.batch(chunk, None, 0);
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

fn tensors(batch: &Batch, side: usize, device: &Device) -> (Tensor<4>, Tensor<1, Int>) {
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
/// Returns the per-epoch metrics.
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
    let schedule = LrSchedule {
        base_lr: cfg.base_lr,
        batch_size: cfg.batch_size,
        steps_per_epoch,
        warmup_epochs: cfg.warmup_epochs,
        decay_rate: cfg.decay_rate,
        decay_epochs: cfg.decay_epochs,
    };
    let loss_fn = CrossEntropyLossConfig::new()
        .with_smoothing((cfg.label_smoothing > 0.0).then_some(cfg.label_smoothing))
        .init(&device);
    let total_steps = match cfg.max_steps {
        0 => (steps_per_epoch * cfg.epochs) as u64,
        m => m.min((steps_per_epoch * cfg.epochs) as u64),
    };
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
    for epoch in progress.epoch..cfg.epochs {
        if cfg.freeze_epochs > 0 && epoch == cfg.freeze_epochs {
            model = model.unfreeze();
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
        for batch in train_data
            .epoch(cfg.batch_size, cfg.seed, epoch as u64)
            .into_iter()
            .skip(skip)
        {
            if step >= total_steps {
                stopped_early = true;
                break;
            }
            // Dropout and stochastic depth draw from a stream fixed by (seed, step): a resumed run
            // continues exactly as an uninterrupted one.
            device.seed(cfg.seed ^ (step + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
            lr = schedule.at(step) * lr_scale;
            let mut loss = if cfg.mixup_alpha > 0.0 || cfg.cutmix_alpha > 0.0 {
                // Mixup / CutMix draw from a stream fixed by (seed, step), like everything else.
                let mut rng = StdRng::seed_from_u64(
                    cfg.seed ^ 0x6d69_7875 ^ step.wrapping_mul(0x2545_f491_4f6c_dd1d),
                );
                let classes = spec.num_classes;
                let alphas = (cfg.mixup_alpha, cfg.cutmix_alpha);
                let m = mix(
                    &batch,
                    train_data.side,
                    classes,
                    cfg.label_smoothing as f64,
                    alphas,
                    &mut rng,
                );
                let mixed = Batch {
                    images: m.images,
                    labels: m.dominant,
                    size: batch.size,
                };
                let (x, y) = tensors(&mixed, train_data.side, &device);
                let targets = Tensor::<2>::from_data(
                    TensorData::new(m.targets, [batch.size, classes]),
                    &device,
                );
                let logits = model.forward(x);
                let pred = logits.clone().argmax(1).reshape([batch.size]);
                t.correct += pred.equal(y).int().sum().into_scalar::<i64>() as usize;
                // Cross-entropy against soft targets (label smoothing already folded in).
                (targets * log_softmax(logits, 1)).sum_dim(1).mean().neg()
            } else {
                let (x, y) = tensors(&batch, train_data.side, &device);
                let logits = model.forward(x);
                let pred = logits.clone().argmax(1).reshape([batch.size]);
                t.correct += pred.equal(y.clone()).int().sum().into_scalar::<i64>() as usize;
                loss_fn.forward(logits, y)
            };
            if cfg.weight_decay > 0.0
                && let Some(l2) = l2_of_weights(&model)
            {
                // TF's l2_loss is sum(w^2) / 2.
                loss = loss + l2.mul_scalar(cfg.weight_decay / 2.0);
            }
            let loss_value = loss.clone().into_scalar::<f32>() as f64;
            if !loss_value.is_finite() {
                bail!(
                    "training diverged at step {step} (loss {loss_value}); lower the learning rate"
                );
            }
            let grads = GradientsParams::from_grads(loss.backward(), &model);
            model = optim.step(lr, model, grads);
            step += 1;
            ema.update(&model, step);
            t.seen += batch.size;
            t.loss_sum += loss_value;
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
