//! The recipe of a run ([`TrainConfig`], every knob with its range), the architecture it trains, and
//! how both are read from a TOML file, `--set` overrides and a run directory.

use std::path::Path;

use anyhow::{Context, bail};

use crate::data::augment::{Augment, Crop, Policy};
use crate::spec::{ModelSpec, resolve};

use super::Decay;

/// Every knob of the training recipe. The architecture is a [`ModelSpec`]; the recipe only
/// overrides its training-time regularisation (dropout, stochastic depth, BN momentum).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TrainConfig {
    /// What `--dataset` named (recorded so `--resume` reloads the same data).
    pub dataset: String,
    /// Use only the first N training images (0 = all).
    pub train_limit: usize,
    /// Write a checkpoint every this many steps (and at every epoch end; 0 = epoch ends only).
    pub checkpoint_every: u64,
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
    /// Classifier dropout (default: the model's own).
    pub dropout: Option<f64>,
    /// Stochastic depth rate of the last block (default: the model's own).
    pub drop_connect_rate: Option<f64>,
    /// BN momentum, PyTorch convention (default: the model's own, TF's 0.01).
    pub bn_momentum: Option<f64>,
    pub ema_decay: f64,
    /// Evaluate (and write metrics and weights) every this many epochs and after the last one;
    /// epochs in between leave no metrics row.
    pub eval_every: usize,
    /// Before each evaluation, re-estimate the EMA weights' BN statistics over this many training
    /// batches (0 = use the running statistics as trained).
    pub precise_bn_batches: usize,
    pub seed: u64,
    /// Initialise as the TF reference (conv N(0, sqrt(2/fan_out)), dense uniform) rather than with
    /// burn's defaults.
    pub tf_init: bool,
    /// Fine-tuning: epochs during which only the head conv and classifier train (0 = none).
    pub freeze_epochs: usize,
    /// Input normalisation `(pixel - mean) / std` (default: 127.5 and 127.5; fine-tuning keeps the
    /// checkpoint's).
    pub mean: Option<[f32; 3]>,
    pub std: Option<[f32; 3]>,
    /// Fine-tuning: learning-rate factor once the whole network trains.
    pub unfrozen_lr_scale: f64,
    /// Keep every BatchNorm in inference mode with fixed statistics and affine parameters (the
    /// Keras fine-tuning recipe); convolutions and the classifier still train.
    pub freeze_bn: bool,
    /// Mixed precision: convolutions and the classifier in `f16` or `bf16` on f32 master weights
    /// (GPU devices; see `train::mixed`).
    pub mixed_precision: Option<super::mixed::HalfType>,
}

impl Default for TrainConfig {
    fn default() -> Self {
        TrainConfig {
            dataset: "fashion-mnist".into(),
            train_limit: 0,
            checkpoint_every: 500,
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
            drop_connect_rate: None,
            bn_momentum: None,
            ema_decay: 0.9999,
            eval_every: 1,
            precise_bn_batches: 0,
            seed: 0,
            tf_init: true,
            freeze_epochs: 0,
            mean: None,
            std: None,
            unfrozen_lr_scale: 1.0,
            freeze_bn: false,
            mixed_precision: None,
        }
    }
}

/// Largest training resolution, batch, and pixels per batch a run may ask for (memory).
const MAX_TRAIN_RESOLUTION: usize = 2048;
const MAX_BATCH: usize = 1 << 16;
const MAX_BATCH_PIXELS: usize = 1 << 27;

/// The fields `--resume` lets a run change: how long it runs and how often it checkpoints.
pub const RESUMABLE_CHANGES: [&str; 3] = ["epochs", "max_steps", "checkpoint_every"];

/// How a run names its architecture in a config file: a published variant, or the whole spec (as
/// a run directory records it).
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(untagged)]
pub enum ModelChoice {
    Name(String),
    Spec(Box<ModelSpec>),
}

impl ModelChoice {
    pub fn spec(&self) -> anyhow::Result<ModelSpec> {
        let spec = match self {
            ModelChoice::Name(name) => resolve(name)?.0,
            ModelChoice::Spec(spec) => (**spec).clone(),
        };
        spec.validate()?;
        Ok(spec)
    }
}

/// A config file: an optional `model` (name or `[model]` table) and the recipe.
#[derive(Debug, Clone, PartialEq)]
pub struct RunFile {
    pub model: Option<ModelChoice>,
    pub recipe: TrainConfig,
}

impl RunFile {
    pub fn read(path: &Path) -> anyhow::Result<Self> {
        let bytes = crate::util::read_regular(path)
            .with_context(|| format!("cannot read config `{}`", path.display()))?;
        let text = String::from_utf8(bytes)
            .map_err(|_| anyhow::anyhow!("config `{}` is not UTF-8 text", path.display()))?;
        Self::parse(&text, &[])
            .map_err(|e| anyhow::anyhow!("invalid config `{}`: {e}", path.display()))
    }

    /// Parses TOML text, then applies `key=value` overrides (values in TOML syntax; bare words are
    /// strings; `model.key=value` sets a field of a `[model]` table).
    pub fn parse(text: &str, overrides: &[String]) -> anyhow::Result<Self> {
        // toml's own messages span several lines (with a caret diagram): keep the one-line part.
        let one_line = |e: toml::de::Error| anyhow::anyhow!("{}", e.message().trim());
        let mut table: toml::Table = toml::from_str(text).map_err(one_line)?;
        for kv in overrides {
            let (key, value) = kv
                .split_once('=')
                .with_context(|| format!("`--set {kv}`: expected KEY=VALUE"))?;
            let (key, value) = (key.trim(), value.trim());
            let value = toml::from_str::<toml::Table>(&format!("v = {value}"))
                .ok()
                .and_then(|mut t| t.remove("v"))
                .unwrap_or_else(|| toml::Value::String(value.to_string()));
            match key.split_once('.') {
                Some(("model", field)) => match table.get_mut("model") {
                    Some(toml::Value::Table(model)) => {
                        model.insert(field.to_string(), value);
                    }
                    _ => bail!(
                        "`--set {key}`: the config has no `[model]` table (name a model instead)"
                    ),
                },
                _ => {
                    table.insert(key.to_string(), value);
                }
            }
        }
        let model = table
            .remove("model")
            .map(|m| m.try_into::<ModelChoice>().map_err(one_line))
            .transpose()
            .context("`model` must be a model name or a [model] table")?;
        let recipe: TrainConfig = toml::Value::Table(table).try_into().map_err(one_line)?;
        Ok(RunFile { model, recipe })
    }

    /// The TOML a run directory records: the recipe, then the whole architecture as `[model]`.
    pub fn to_toml(recipe: &TrainConfig, spec: &ModelSpec) -> anyhow::Result<String> {
        let mut table = toml::Table::try_from(recipe).context("config does not serialise")?;
        table.insert(
            "model".into(),
            toml::Value::try_from(spec).context("spec does not serialise")?,
        );
        Ok(toml::to_string(&table)?)
    }
}

impl TrainConfig {
    /// This config with `key=value` overrides (see [`RunFile::parse`]); a `model` among them is
    /// refused here, since the architecture is not part of the recipe.
    pub fn with_overrides(&self, overrides: &[String]) -> anyhow::Result<Self> {
        let text = toml::to_string(self).context("config does not serialise")?;
        let file = RunFile::parse(&text, overrides).map_err(|e| anyhow::anyhow!("`--set`: {e}"))?;
        if file.model.is_some() {
            bail!("`--set model=...`: name the model as the first argument instead");
        }
        Ok(file.recipe)
    }

    /// The TF recipe shortened for budgets of a few epochs (`effnet study`, `effnet search`). Short
    /// runs are judged by lagging BN statistics and slowed by regularisation meant for 350 epochs,
    /// so: cosine decay, half an epoch of warmup, burn's initialisation, no dropout, stochastic
    /// depth or shift, an EMA of 0.999, and BN statistics re-estimated before each evaluation.
    pub fn short_run() -> Self {
        TrainConfig {
            lr_decay: Decay::Cosine,
            warmup_epochs: 0.5,
            ema_decay: 0.999,
            precise_bn_batches: 25,
            eval_every: 1 << 20,
            tf_init: false,
            dropout: Some(0.0),
            drop_connect_rate: Some(0.0),
            shift: 0.0,
            checkpoint_every: 100,
            ..TrainConfig::default()
        }
    }

    /// Checks every field against its range, before any work (flags, `--set`, config files and a
    /// resumed run's config alike).
    pub fn validate(&self) -> anyhow::Result<()> {
        let in_range = |name: &str, v: f64, lo: f64, hi: f64, closed_hi: bool| {
            let ok = v.is_finite() && v >= lo && (v < hi || (closed_hi && v <= hi));
            if ok {
                Ok(())
            } else {
                let bracket = if closed_hi { "]" } else { ")" };
                Err(anyhow::anyhow!(
                    "{name} = {v} is outside [{lo}, {hi}{bracket}"
                ))
            }
        };
        let positive = |name: &str, v: f64| {
            if v.is_finite() && v > 0.0 {
                Ok(())
            } else {
                Err(anyhow::anyhow!("{name} = {v} must be a positive number"))
            }
        };
        if self.batch_size == 0 || self.batch_size > MAX_BATCH {
            bail!(
                "batch_size = {} is outside 1..={MAX_BATCH}",
                self.batch_size
            );
        }
        if !(8..=MAX_TRAIN_RESOLUTION).contains(&self.resolution) {
            bail!(
                "resolution = {} is outside 8..={MAX_TRAIN_RESOLUTION}",
                self.resolution
            );
        }
        let pixels = self.batch_size * self.resolution * self.resolution;
        if pixels > MAX_BATCH_PIXELS {
            bail!(
                "a batch of {} images at {r}x{r} is {pixels} pixels; at most {MAX_BATCH_PIXELS} fit a training step",
                self.batch_size,
                r = self.resolution
            );
        }
        if self.eval_every == 0 {
            bail!("eval_every must be at least 1");
        }
        if self.epochs == 0 || self.epochs > 1_000_000 {
            bail!("epochs = {} is outside 1..=1000000", self.epochs);
        }
        positive("base_lr", self.base_lr)?;
        in_range("warmup_epochs", self.warmup_epochs, 0.0, 1e6, true)?;
        in_range("decay_rate", self.decay_rate, 0.0, 1.0, true)?;
        positive("decay_epochs", self.decay_epochs)?;
        in_range("rmsprop_decay", self.rmsprop_decay, 0.0, 1.0, false)?;
        in_range("momentum", self.momentum, 0.0, 1.0, false)?;
        positive("epsilon", self.epsilon)?;
        in_range("weight_decay", self.weight_decay, 0.0, 1.0, false)?;
        in_range(
            "label_smoothing",
            self.label_smoothing as f64,
            0.0,
            1.0,
            false,
        )?;
        in_range("shift", self.shift, 0.0, 0.5, true)?;
        in_range("ema_decay", self.ema_decay, 0.0, 1.0, false)?;
        positive("unfrozen_lr_scale", self.unfrozen_lr_scale)?;
        for (name, alpha) in [
            ("mixup_alpha", self.mixup_alpha),
            ("cutmix_alpha", self.cutmix_alpha),
        ] {
            // Beta(alpha, alpha) sampling is slow or degenerate outside this range.
            if alpha != 0.0 {
                in_range(name, alpha, 0.01, 10.0, true)
                    .context(format!("{name} is 0 (off) or in [0.01, 10]"))?;
            }
        }
        for (name, p) in [
            ("dropout", self.dropout),
            ("drop_connect_rate", self.drop_connect_rate),
        ] {
            if let Some(p) = p {
                in_range(name, p, 0.0, 1.0, false)?;
            }
        }
        if let Some(m) = self.bn_momentum {
            in_range("bn_momentum", m, 0.0, 1.0, true)?;
            positive("bn_momentum", m)?;
        }
        in_range(
            "progressive_min_dropout",
            self.progressive_min_dropout,
            0.0,
            1.0,
            false,
        )?;
        in_range(
            "progressive_min_magnitude",
            self.progressive_min_magnitude as f64,
            0.0,
            30.0,
            true,
        )?;
        if let Policy::RandAugment { n, m } = self.augment {
            if !(1..=16).contains(&n) {
                bail!("augment: RandAugment takes 1..=16 operations, not {n}");
            }
            in_range("augment magnitude", m as f64, 0.0, 30.0, true)?;
        }
        if self.progressive_stages > self.epochs {
            bail!(
                "progressive learning needs at least one epoch per stage ({} stages, {} epochs)",
                self.progressive_stages,
                self.epochs
            );
        }
        if self.progressive_min_resolution != 0
            && !(8..=self.resolution).contains(&self.progressive_min_resolution)
        {
            bail!(
                "progressive_min_resolution = {} is outside 8..={} (the resolution)",
                self.progressive_min_resolution,
                self.resolution
            );
        }
        if self.freeze_epochs > 0 && self.freeze_epochs >= self.epochs {
            bail!(
                "freeze_epochs ({}) must be smaller than epochs ({})",
                self.freeze_epochs,
                self.epochs
            );
        }
        for (name, v) in [("mean", self.mean), ("std", self.std)] {
            if let Some(v) = v
                && !v
                    .iter()
                    .all(|x| x.is_finite() && (name == "mean" || *x > 0.0))
            {
                bail!("{name} = {v:?}: every value must be finite (and std positive)");
            }
        }
        Ok(())
    }

    /// The normalisation the run applies: `(mean, std)`, 127.5 each unless set.
    pub fn normalisation(&self) -> ([f32; 3], [f32; 3]) {
        (
            self.mean.unwrap_or([127.5; 3]),
            self.std.unwrap_or([127.5; 3]),
        )
    }

    /// The spec this recipe trains: `base` with `classes` outputs, evaluated at the training
    /// resolution, with the recipe's regularisation overrides.
    pub fn model_spec(&self, base: &ModelSpec, classes: usize) -> anyhow::Result<ModelSpec> {
        let mut spec = base.clone();
        spec.num_classes = classes;
        spec.resolution = self.resolution;
        spec.train_resolution = self.resolution;
        if let Some(d) = self.dropout {
            spec.dropout = d;
        }
        if let Some(r) = self.drop_connect_rate {
            spec.drop_connect_rate = r;
        }
        if let Some(m) = self.bn_momentum {
            spec.bn_momentum = m;
        }
        spec.validate()?;
        Ok(spec)
    }

    /// The fields whose values differ from `other`'s, by name.
    pub fn changed_fields(&self, other: &TrainConfig) -> Vec<String> {
        let (a, b) = (
            toml::Table::try_from(self).unwrap_or_default(),
            toml::Table::try_from(other).unwrap_or_default(),
        );
        let mut keys: Vec<&String> = a.keys().chain(b.keys()).collect();
        keys.sort();
        keys.dedup();
        keys.into_iter()
            .filter(|k| a.get(*k) != b.get(*k))
            .cloned()
            .collect()
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
        assert!(err("model=lite0").contains("first argument"));
    }

    #[test]
    fn every_field_is_checked_against_its_range() {
        for kv in [
            "batch_size=0",
            "label_smoothing=5",
            "label_smoothing=-1",
            "bn_momentum=5",
            "bn_momentum=0",
            "mixup_alpha=30",
            "mixup_alpha=inf",
            "mixup_alpha=-1",
            "cutmix_alpha=1e-320",
            "resolution=4",
            "resolution=100000",
            "batch_size=100000",
            "base_lr=0",
            "ema_decay=1",
            "dropout=1",
            "epochs=0",
            "momentum=nan",
            "std=[0.0, 1.0, 1.0]",
            "augment=rand-n99-m9",
        ] {
            let cfg = TrainConfig::default().with_overrides(&[kv.into()]);
            let result = cfg.and_then(|c| c.validate());
            assert!(result.is_err(), "{kv} was accepted");
        }
        TrainConfig::default().validate().unwrap();
    }

    #[test]
    fn the_recorded_run_configs_still_parse() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/runs");
        let mut seen = 0;
        for entry in std::fs::read_dir(dir).unwrap() {
            let path = entry.unwrap().path();
            if path.extension().is_some_and(|e| e == "toml") {
                let file = RunFile::read(&path).unwrap();
                file.recipe.validate().unwrap();
                file.model.map(|m| m.spec().unwrap());
                seen += 1;
            }
        }
        assert!(seen >= 4);
    }

    #[test]
    fn run_files_name_a_model_or_carry_the_whole_spec() {
        let file = RunFile::parse("model = \"lite0\"\nepochs = 3\n", &[]).unwrap();
        assert_eq!(file.model, Some(ModelChoice::Name("lite0".into())));
        assert_eq!(file.recipe.epochs, 3);
        let spec = resolve("b0").unwrap().0.scaled(1.2, 1.1, 1.0).unwrap();
        let text = RunFile::to_toml(&file.recipe, &spec).unwrap();
        let back = RunFile::parse(&text, &[]).unwrap();
        assert_eq!(back.recipe, file.recipe);
        assert_eq!(back.model.unwrap().spec().unwrap(), spec);
        let edited = RunFile::parse(&text, &["model.width=1.3".into()]).unwrap();
        assert_eq!(edited.model.unwrap().spec().unwrap().width, 1.3);
        let bad = RunFile::parse(&text, &["model.width=-1".into()]).unwrap();
        assert!(bad.model.unwrap().spec().is_err());
        let old = TrainConfig::default();
        let new = TrainConfig {
            epochs: 9,
            seed: 4,
            ..old.clone()
        };
        assert_eq!(new.changed_fields(&old), ["epochs", "seed"]);
    }
}
