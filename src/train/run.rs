//! `effnet train`'s loop: epochs of recipe steps, an EMA evaluated with the native engine after each
//! epoch, metrics, curves, checkpoints, and the final weights (which carry their architecture).

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::{Context, bail};
use burn::module::Module;
use burn::optim::ModuleOptimizer;
use burn::tensor::Device;

use crate::data::loader::Prepared;
use crate::evaluate::evaluate;
use crate::model::{EfficientNet, apply_weights, export_weights};
use crate::weights::{self, TensorMap, WeightMeta, WeightSet};

use super::checkpoint::{self, Checkpoint, EpochTally, Progress, RunLock};
use super::config::{RunFile, TrainConfig};
use super::ema::Ema;
use super::metrics::{EpochMetrics, write_metrics};
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
}

/// Where the loop stands inside one run.
struct State {
    model: EfficientNet,
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
) -> anyhow::Result<State> {
    device.seed(cfg.seed);
    let mut model = EfficientNet::new(&meta.spec, device);
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
    let optim = ModuleOptimizer::from(TfRmsProp {
        decay: cfg.rmsprop_decay,
        momentum: cfg.momentum,
        epsilon: cfg.epsilon,
    });
    if opts.resume {
        let r = checkpoint::load(opts.out_dir, model, optim, cfg.ema_decay)?;
        return Ok(State {
            model: r.model,
            optim: r.optim,
            ema: r.ema,
            progress: r.progress,
        });
    }
    Ok(State {
        ema: Ema::new(&model, cfg.ema_decay),
        model,
        optim,
        progress: Progress::default(),
    })
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
    let out_dir = opts.out_dir;
    std::fs::create_dir_all(out_dir)
        .with_context(|| format!("cannot create `{}`", out_dir.display()))?;
    let _lock = RunLock::acquire(out_dir)?;
    let config_text = RunFile::to_toml(cfg, &meta.spec)?;
    crate::util::write_atomic(&out_dir.join("config.toml"), config_text.as_bytes())?;
    let device = Device::flex().autodiff();
    let State {
        mut model,
        mut optim,
        mut ema,
        progress,
    } = start(cfg, meta, &device, &opts)?;
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
    let trainer = Trainer::new(cfg, meta.spec.num_classes, device.clone());
    let progress_lines = std::env::var_os(PROGRESS_LINES_ENV).is_some();
    let bar = progress_bar(opts.show_progress && !progress_lines, total_steps);
    let mut metrics = progress.metrics.clone();
    let mut step = progress.step;
    let started = Instant::now() - std::time::Duration::from_secs_f64(progress.seconds);
    let ema_set = |ema: &Ema| WeightSet {
        meta: meta.clone(),
        tensors: ema.tensors.clone(),
    };
    // Checkpoints keep the EMA as trained (not recalibrated), so a resumed run continues exactly.
    let save = |model: &EfficientNet, optim: &ModuleOptimizer, ema: &Ema, progress: &Progress| {
        let c = Checkpoint {
            model,
            optim,
            ema: &ema_set(ema),
            progress,
            config: &config_text,
        };
        checkpoint::save(out_dir, c)
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
        let mut t = if epoch == progress.epoch {
            progress.tally
        } else {
            EpochTally::default()
        };
        let skip = t.batches;
        let mut stopped_early = false;
        let mut lr = schedule.at(step) * lr_scale;
        let stage = cfg.stage(epoch, meta.spec.dropout);
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
                save(&model, &optim, &ema, &p)?;
            }
            if progress_lines {
                eprintln!("progress {step} {total_steps}");
            }
            bar.set_position(step);
            bar.set_message(format!(
                "epoch {} loss {:.3} acc {:.3} lr {:.4} {:.0} img/s",
                epoch + 1,
                t.loss_sum / t.batches as f64,
                t.correct as f64 / t.seen as f64,
                lr,
                t.seen as f64 / epoch_start.elapsed().as_secs_f64()
            ));
        }
        if t.batches == 0 {
            break;
        }
        let train_seconds = epoch_start.elapsed().as_secs_f64();
        let last_epoch = stopped_early || step >= total_steps || epoch + 1 == cfg.epochs;
        if last_epoch || (epoch + 1).is_multiple_of(cfg.eval_every) {
            let mut set = ema_set(&ema);
            if cfg.precise_bn_batches > 0 {
                let batches = (cfg.precise_bn_batches, cfg.batch_size);
                set.tensors = precise_bn::recalibrate(
                    &meta.spec,
                    &set.tensors,
                    train_data,
                    batches,
                    cfg.seed,
                )?;
            }
            let report = evaluate(&set, eval_data, 256, rayon::current_num_threads())?;
            let m = EpochMetrics {
                epoch: epoch + 1,
                step,
                train_loss: t.loss_sum / t.batches as f64,
                train_top1: t.correct as f64 / t.seen as f64,
                lr,
                images_per_s: t.seen as f64 / train_seconds,
                eval_top1: report.top1,
                eval_top5: report.top5,
                eval_loss: report.loss,
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
                &format!("{} on {}", meta.spec.name, cfg.dataset),
                &out_dir.join("curves.png"),
            )?;
            weights::write_safetensors(&out_dir.join("weights.safetensors"), &set)?;
        }
        // A run stopped by --max-steps mid-epoch resumes inside that epoch; its partial-epoch metrics
        // row is reported now but not carried into the checkpoint (the resumed epoch replaces it).
        let p = if stopped_early {
            Progress {
                step,
                epoch,
                tally: t,
                seconds: started.elapsed().as_secs_f64(),
                metrics: metrics[..metrics.len().saturating_sub(1)].to_vec(),
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
        save(&model, &optim, &ema, &p)?;
        if step >= total_steps {
            break;
        }
    }
    bar.finish_and_clear();
    Ok(metrics)
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
