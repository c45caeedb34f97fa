//! `effnet train`'s loop: epochs of recipe steps, an EMA evaluated with the native engine after each
//! epoch, metrics, curves, checkpoints, and the final weights (which carry their architecture).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use crate::data::loader::Prepared;
use crate::engine::Precision;
use crate::evaluate::{evaluate, evaluate_on_device};
use crate::model::{EfficientNet, apply_weights, export_weights};
use crate::weights::{self, TensorMap, WeightMeta, WeightSet};

use super::checkpoint::{self, Checkpoint, EpochTally, Progress, RunLock};
use super::config::{RunFile, TrainConfig};
use super::ema::Ema;
use super::metrics::{EpochMetrics, write_metrics};
use super::mixed::{HalfType, LossScale};
use super::parallel::Replicas;
use super::precise_bn;
use super::step::Trainer;
use super::{LrSchedule, TfRmsProp};

/// With this environment variable set, a run reports each step as a `progress STEP TOTAL` line on
/// stderr (for a supervising process such as `effnet study`) instead of drawing a progress bar.
pub const PROGRESS_LINES_ENV: &str = "EFFNET_PROGRESS_LINES";

/// How a run starts and reports.
pub struct RunOptions<'a> {
    /// Run directory.
    pub out_dir: &'a Path,
    pub show_progress: bool,
    /// Continue from the run directory's last checkpoint.
    pub resume: bool,
    /// Pretrained canonical tensors to start from (fine-tuning); the classifier is re-initialised.
    pub init: Option<&'a TensorMap>,
    /// Where the steps run (`Device::flex()` on the CPU, or GPU devices): one device, or several
    /// for data parallelism ([`super::parallel`]), the first of which evaluates and saves. The
    /// model is always initialised on the CPU, so a seed gives the same start on every device.
    pub devices: Vec<Device>,
}

/// Where the loop stands inside one run, besides the model.
struct State {
    optim: ModuleOptimizer,
    ema: Ema,
    progress: Progress,
}

/// A fresh model for `meta`'s spec (TF init if the recipe asks, pretrained tensors but the
/// classifier when fine-tuning), its optimizer and EMA; or the run's last checkpoint.
fn start(
    cfg: &TrainConfig,
    meta: &WeightMeta,
    device: &Device,
    opts: &RunOptions<'_>,
) -> anyhow::Result<(EfficientNet, State)> {
    let cpu = Device::flex().autodiff();
    cpu.seed(cfg.seed);
    let mut model = EfficientNet::new(&meta.spec, &cpu);
    if cfg.tf_init {
        model = model.tf_init();
    }
    if let Some(pretrained) = opts.init {
        let mut tensors = export_weights(&model);
        for (name, t) in pretrained
            .iter()
            .filter(|(n, _)| !n.starts_with("classifier."))
        {
            tensors.insert(name.clone(), t.clone());
        }
        model = apply_weights(model, &tensors)?;
    }
    if *device != cpu {
        model = apply_weights(
            EfficientNet::new(&meta.spec, device),
            &export_weights(&model),
        )?;
    }
    let optim = ModuleOptimizer::from(TfRmsProp::recipe(cfg));
    if opts.resume {
        let r = checkpoint::load(opts.out_dir, model, optim, cfg.ema_decay)?;
        let st = State {
            optim: r.optim,
            ema: r.ema,
            progress: r.progress,
        };
        return Ok((r.model, st));
    }
    let st = State {
        ema: Ema::new(&model, cfg.ema_decay),
        optim,
        progress: Progress::default(),
    };
    Ok((model, st))
}

fn progress_bar(show: bool, total_steps: u64) -> indicatif::ProgressBar {
    let bar = if show {
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
    bar
}

/// What stays fixed while a run trains: its recipe, data, schedule and outputs.
struct Run<'a> {
    cfg: &'a TrainConfig,
    meta: &'a WeightMeta,
    train_data: &'a Prepared,
    eval_data: &'a Prepared,
    out_dir: &'a Path,
    config_text: String,
    schedule: LrSchedule,
    trainer: Trainer<'a>,
    /// The device that evaluates each epoch when it is not the CPU (the engine does on the CPU).
    gpu: Option<Device>,
    started: Instant,
    bar: indicatif::ProgressBar,
    progress_lines: bool,
}

/// How one epoch's training ended.
struct EpochEnd {
    tally: EpochTally,
    lr: f64,
    seconds: f64,
    /// `--max-steps` stopped it before the end of the data.
    stopped_early: bool,
}

impl Run<'_> {
    fn total_steps(&self) -> u64 {
        self.schedule.total_steps
    }

    fn ema_set(&self, ema: &Ema) -> WeightSet {
        WeightSet {
            meta: self.meta.clone(),
            tensors: ema.tensors(),
        }
    }

    /// What a checkpoint records of the f16 loss scale (nothing without f16).
    fn loss_scale(&self) -> Option<LossScale> {
        (self.cfg.mixed_precision == Some(HalfType::F16)).then(|| self.trainer.loss_scale())
    }

    /// Checkpoints keep the EMA as trained (not recalibrated), so a resumed run continues exactly.
    fn save(&self, model: &EfficientNet, st: &State, progress: &Progress) -> anyhow::Result<()> {
        let c = Checkpoint {
            model,
            optim: &st.optim,
            ema: &self.ema_set(&st.ema),
            progress,
            config: &self.config_text,
        };
        checkpoint::save(self.out_dir, c)
    }

    /// The model as epoch `epoch` trains it: backbone frozen for the first `freeze_epochs`, BN
    /// frozen throughout with `freeze_bn`, the stage's dropout.
    fn prepare(&self, mut model: EfficientNet, epoch: usize, first: bool) -> EfficientNet {
        let cfg = self.cfg;
        if first && epoch < cfg.freeze_epochs {
            model = model.freeze_backbone();
        }
        if cfg.freeze_epochs > 0 && epoch == cfg.freeze_epochs {
            model = model.unfreeze();
        }
        if cfg.freeze_bn && (first || epoch == cfg.freeze_epochs) {
            model = model.freeze_batch_norm();
        }
        if let Some(p) = cfg.stage(epoch, self.meta.spec.dropout).dropout {
            model.dropout.prob = p;
        }
        model
    }

    /// Trains epoch `epoch` from batch `tally.batches` on, checkpointing every `checkpoint_every`.
    fn train_epoch(
        &self,
        (mut model, mut replicas): (EfficientNet, Option<&mut Replicas<'_>>),
        st: &mut State,
        epoch: usize,
        mut tally: EpochTally,
        metrics: &[EpochMetrics],
    ) -> anyhow::Result<(EfficientNet, EpochEnd)> {
        let cfg = self.cfg;
        let lr_scale = if cfg.freeze_epochs > 0 && epoch >= cfg.freeze_epochs {
            cfg.unfrozen_lr_scale
        } else {
            1.0
        };
        let start = Instant::now();
        let stage = cfg.stage(epoch, self.meta.spec.dropout);
        let mut lr = self.schedule.at(st.progress.step) * lr_scale;
        let batches = self.train_data.epoch(
            cfg.batch_size,
            (cfg.seed, epoch as u64),
            stage.augment,
            tally.batches,
        );
        for batch in batches {
            let batch = batch?;
            let step = st.progress.step;
            if step >= self.total_steps() {
                let end = EpochEnd {
                    tally,
                    lr,
                    seconds: start.elapsed().as_secs_f64(),
                    stopped_early: true,
                };
                return Ok((model, end));
            }
            lr = self.schedule.at(step) * lr_scale;
            let out = match replicas.as_deref_mut() {
                Some(r) => r.step(
                    (model, &mut st.optim, &self.trainer),
                    &batch,
                    &stage,
                    step,
                    lr,
                )?,
                None => self
                    .trainer
                    .step(model, &mut st.optim, &batch, &stage, step, lr)?,
            };
            model = out.model;
            let step = step + 1;
            st.progress.step = step;
            st.ema.update(&model, step);
            tally.correct += out.correct;
            tally.seen += batch.size;
            tally.loss_sum += out.loss;
            tally.batches += 1;
            if cfg.checkpoint_every > 0 && step.is_multiple_of(cfg.checkpoint_every) {
                let p = Progress {
                    step,
                    epoch,
                    tally,
                    seconds: self.started.elapsed().as_secs_f64(),
                    metrics: metrics.to_vec(),
                    loss_scale: self.loss_scale(),
                };
                self.save(&model, st, &p)?;
            }
            if self.progress_lines {
                eprintln!("progress {step} {}", self.total_steps());
            }
            self.bar.set_position(step);
            self.bar.set_message(format!(
                "epoch {} loss {:.3} acc {:.3} lr {:.4} {:.0} img/s",
                epoch + 1,
                tally.loss_sum / tally.batches as f64,
                tally.correct as f64 / tally.seen as f64,
                lr,
                tally.seen as f64 / start.elapsed().as_secs_f64()
            ));
        }
        let end = EpochEnd {
            tally,
            lr,
            seconds: start.elapsed().as_secs_f64(),
            stopped_early: false,
        };
        Ok((model, end))
    }

    /// Evaluates the EMA weights (BN statistics re-estimated when the recipe asks), and writes the
    /// metrics, curves and weights.
    fn evaluate_epoch(
        &self,
        st: &State,
        epoch: usize,
        end: &EpochEnd,
        metrics: &mut Vec<EpochMetrics>,
    ) -> anyhow::Result<()> {
        let (cfg, t) = (self.cfg, &end.tally);
        let mut set = self.ema_set(&st.ema);
        if cfg.precise_bn_batches > 0 {
            let batches = (cfg.precise_bn_batches, cfg.batch_size);
            set.tensors = precise_bn::recalibrate(
                &self.meta.spec,
                &set.tensors,
                self.train_data,
                batches,
                (cfg.seed, self.gpu.as_ref().unwrap_or(&Device::flex())),
            )?;
        }
        let report = match &self.gpu {
            Some(device) => evaluate_on_device(&set, self.eval_data, 256, device)?,
            None => {
                let threads = rayon::current_num_threads();
                evaluate(&set, self.eval_data, 256, (threads, Precision::Fp32))?
            }
        };
        let m = EpochMetrics {
            epoch: epoch + 1,
            step: st.progress.step,
            train_loss: t.loss_sum / t.batches as f64,
            train_top1: t.correct as f64 / t.seen as f64,
            lr: end.lr,
            images_per_s: t.seen as f64 / end.seconds,
            eval_top1: report.top1,
            eval_top5: report.top5,
            eval_loss: report.loss,
            seconds: self.started.elapsed().as_secs_f64(),
        };
        self.bar.println(format!(
            "epoch {}: train loss {:.4} top-1 {:.4} | EMA eval top-1 {:.4} top-5 {:.4} loss {:.4} | {:.0} img/s",
            m.epoch, m.train_loss, m.train_top1, m.eval_top1, m.eval_top5, m.eval_loss, m.images_per_s
        ));
        metrics.push(m);
        write_metrics(self.out_dir, metrics)?;
        super::plot::plot_curves(
            metrics,
            &format!("{} on {}", self.meta.spec.name, cfg.dataset),
            &self.out_dir.join("curves.png"),
        )?;
        weights::write_safetensors(&self.out_dir.join("weights.safetensors"), &set)?;
        Ok(())
    }
}

fn device_name(device: &Device) -> String {
    if *device == Device::flex() {
        "the CPU".into()
    } else {
        format!("{device:?}")
    }
}

/// Runs training on `meta`'s architecture; writes `config.toml` (the recipe and the whole
/// architecture), `metrics.jsonl`, `metrics.csv`, `curves.png`, `weights.safetensors` (EMA
/// weights, with `meta`) and checkpoints under the run directory, which it locks while it runs.
/// Returns the per-epoch metrics. Call it inside [`super::on_thread_pool`] (as `effnet train`
/// does): from outside a rayon pool every parallel op sleeps the caller.
pub fn train(
    cfg: &TrainConfig,
    meta: &WeightMeta,
    train_data: &Prepared,
    eval_data: &Prepared,
    opts: RunOptions<'_>,
) -> anyhow::Result<Vec<EpochMetrics>> {
    cfg.validate()?;
    meta.validate().map_err(|e| anyhow::anyhow!("{e}"))?;
    if train_data.len() < cfg.batch_size {
        bail!(
            "the training set has {} images, fewer than one batch of {}",
            train_data.len(),
            cfg.batch_size
        );
    }
    check_training_memory(&meta.spec, cfg.resolution, cfg.batch_size)?;
    let out_dir = opts.out_dir;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create `{}`", out_dir.display()))?;
    let _lock = RunLock::acquire(out_dir)?;
    let config_text = RunFile::to_toml(cfg, &meta.spec)?;
    crate::util::write_atomic(&out_dir.join("config.toml"), config_text.as_bytes())?;
    let Some(first_device) = opts.devices.first() else {
        bail!("no device to train on");
    };
    let device = first_device.clone().autodiff();
    let (mut model, mut st) = start(cfg, meta, &device, &opts)?;
    // Several devices: replicas forked from the first, gradients averaged by burn each step.
    let mut replicas = None;
    if opts.devices.len() > 1 {
        let (first, r) = Replicas::new(model, &st.optim, &opts.devices, cfg, meta.spec.num_classes);
        model = first;
        replicas = Some(r);
    }
    eprintln!(
        "{} {} on {} on {} ({} train / {} eval images, {} classes) at {r}x{r}, batch {}, {} epoch(s){}; run dir {}",
        if opts.resume { "resuming" } else { "training" },
        meta.spec.name,
        cfg.dataset,
        device_name(first_device),
        train_data.len(),
        eval_data.len(),
        meta.spec.num_classes,
        cfg.batch_size,
        cfg.epochs,
        if cfg.max_steps > 0 {
            format!(", at most {} steps", cfg.max_steps)
        } else {
            String::new()
        },
        out_dir.display(),
        r = cfg.resolution
    );
    let steps_per_epoch = train_data.len() / cfg.batch_size;
    let all_steps = (steps_per_epoch * cfg.epochs) as u64;
    let schedule = LrSchedule {
        base_lr: cfg.base_lr,
        batch_size: cfg.batch_size,
        steps_per_epoch,
        warmup_epochs: cfg.warmup_epochs,
        decay_rate: cfg.decay_rate,
        decay_epochs: cfg.decay_epochs,
        decay: cfg.lr_decay,
        total_steps: match cfg.max_steps {
            0 => all_steps,
            m => m.min(all_steps),
        },
    };
    let progress_lines = std::env::var_os(PROGRESS_LINES_ENV).is_some();
    let run = Run {
        cfg,
        meta,
        train_data,
        eval_data,
        out_dir,
        config_text,
        bar: progress_bar(opts.show_progress && !progress_lines, schedule.total_steps),
        schedule,
        trainer: Trainer::new(cfg, meta.spec.num_classes, device.clone()),
        gpu: (*first_device != Device::flex()).then(|| first_device.clone()),
        started: Instant::now() - std::time::Duration::from_secs_f64(st.progress.seconds),
        progress_lines,
    };
    if let Some(scale) = st.progress.loss_scale {
        run.trainer.set_loss_scale(scale);
    }
    let (first_epoch, first_tally) = (st.progress.epoch, st.progress.tally);
    let mut metrics = std::mem::take(&mut st.progress.metrics);
    for epoch in first_epoch..cfg.epochs {
        model = run.prepare(model, epoch, epoch == first_epoch);
        let tally = if epoch == first_epoch {
            first_tally
        } else {
            EpochTally::default()
        };
        let end;
        (model, end) =
            run.train_epoch((model, replicas.as_mut()), &mut st, epoch, tally, &metrics)?;
        if end.tally.batches == 0 {
            break;
        }
        let step = st.progress.step;
        let last = end.stopped_early || step >= run.total_steps() || epoch + 1 == cfg.epochs;
        if last || (epoch + 1).is_multiple_of(cfg.eval_every) {
            run.evaluate_epoch(&st, epoch, &end, &mut metrics)?;
        }
        // A run stopped by --max-steps mid-epoch resumes inside that epoch; its partial-epoch
        // metrics row is reported now but not carried into the checkpoint (the resumed epoch
        // replaces it).
        let seconds = run.started.elapsed().as_secs_f64();
        let p = if end.stopped_early {
            Progress {
                step,
                epoch,
                tally: end.tally,
                seconds,
                metrics: metrics[..metrics.len().saturating_sub(1)].to_vec(),
                loss_scale: run.loss_scale(),
            }
        } else {
            Progress {
                step,
                epoch: epoch + 1,
                seconds,
                metrics: metrics.clone(),
                loss_scale: run.loss_scale(),
                ..Progress::default()
            }
        };
        run.save(&model, &st, &p)?;
        if step >= run.total_steps() {
            break;
        }
    }
    run.bar.finish_and_clear();
    Ok(metrics)
}

/// Refuses a batch whose activations cannot fit in memory: a training step keeps every layer's
/// output and its gradient, about twice the analysis's activation total per image.
pub fn check_training_memory(
    spec: &crate::spec::ModelSpec,
    resolution: usize,
    batch: usize,
) -> anyhow::Result<()> {
    let per_image = crate::analysis::analyze(spec, resolution)?.total_activation_bytes;
    let needed = per_image.saturating_mul(2).saturating_mul(batch as u64);
    crate::util::check_memory(
        needed,
        &format!(
            "a training step of {} at {resolution}x{resolution} with batch {batch}",
            spec.name
        ),
    )
}

/// Default run directory: `runs/<model>-<unix time>`.
pub fn default_run_dir(model: &str) -> PathBuf {
    let t = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let name: String = model
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '.' {
                c
            } else {
                '_'
            }
        })
        .collect();
    PathBuf::from("runs").join(format!("{name}-{t}"))
}
