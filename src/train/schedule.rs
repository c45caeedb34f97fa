//! The learning-rate schedule of the TF reference: `base * batch / 256`, exponential decay x0.97 every
//! 2.4 epochs (staircase, counted from step 0), and a linear warmup over the first 5 epochs whose
//! value replaces the decayed one. For short runs, a cosine decay to zero over the run (timm's
//! `--sched cosine`) can replace the staircase.

/// How the learning rate decays after warmup.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Decay {
    /// x`decay_rate` every `decay_epochs` (staircase), the TF reference.
    #[default]
    Exponential,
    /// Half a cosine from the peak at the end of warmup to 0 at `total_steps`.
    Cosine,
}

#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct LrSchedule {
    /// Learning rate at batch 256 (0.016 in the paper).
    pub base_lr: f64,
    pub batch_size: usize,
    pub steps_per_epoch: usize,
    pub warmup_epochs: f64,
    pub decay_rate: f64,
    pub decay_epochs: f64,
    pub decay: Decay,
    /// Steps of the whole run (the cosine's length).
    pub total_steps: u64,
}

impl LrSchedule {
    /// The paper's schedule for `batch_size` and `steps_per_epoch`.
    pub fn efficientnet(batch_size: usize, steps_per_epoch: usize) -> Self {
        LrSchedule {
            base_lr: 0.016,
            batch_size,
            steps_per_epoch: steps_per_epoch.max(1),
            warmup_epochs: 5.0,
            decay_rate: 0.97,
            decay_epochs: 2.4,
            decay: Decay::Exponential,
            total_steps: 0,
        }
    }

    pub fn peak(&self) -> f64 {
        self.base_lr * self.batch_size as f64 / 256.0
    }

    /// Learning rate at optimizer step `step` (0-based).
    pub fn at(&self, step: u64) -> f64 {
        let spe = self.steps_per_epoch as f64;
        let warmup_steps = self.warmup_epochs * spe;
        if (step as f64) < warmup_steps {
            return self.peak() * step as f64 / warmup_steps;
        }
        match self.decay {
            Decay::Exponential => {
                let decay_steps = (self.decay_epochs * spe).max(1.0);
                self.peak() * self.decay_rate.powf((step as f64 / decay_steps).floor())
            }
            Decay::Cosine => {
                let span = (self.total_steps as f64 - warmup_steps).max(1.0);
                let t = ((step as f64 - warmup_steps) / span).clamp(0.0, 1.0);
                self.peak() * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn warmup_then_staircase_decay() {
        // Batch 512 -> peak 0.032; 100 steps per epoch: warmup 500 steps, decay every 240 steps.
        let s = LrSchedule::efficientnet(512, 100);
        assert!((s.peak() - 0.032).abs() < 1e-12);
        assert_eq!(s.at(0), 0.0);
        assert!((s.at(250) - 0.016).abs() < 1e-12); // half-way through warmup
        // Right after warmup the staircase has already decayed twice (480 >= 2 * 240).
        assert!((s.at(500) - 0.032 * 0.97f64.powi(2)).abs() < 1e-12);
        assert!((s.at(719) - 0.032 * 0.97f64.powi(2)).abs() < 1e-12);
        assert!((s.at(720) - 0.032 * 0.97f64.powi(3)).abs() < 1e-12);
        // Paper: 0.256 at batch 4096.
        assert!((LrSchedule::efficientnet(4096, 1).peak() - 0.256).abs() < 1e-12);
    }

    #[test]
    fn cosine_runs_from_peak_after_warmup_to_zero_at_the_end() {
        let s = LrSchedule {
            decay: Decay::Cosine,
            total_steps: 1100,
            warmup_epochs: 1.0,
            ..LrSchedule::efficientnet(256, 100)
        };
        assert!((s.at(50) - 0.008).abs() < 1e-12); // warmup is unchanged
        assert!((s.at(100) - 0.016).abs() < 1e-12);
        assert!((s.at(600) - 0.008).abs() < 1e-12); // half-way down
        assert!(s.at(1100).abs() < 1e-12);
        assert!(s.at(2000).abs() < 1e-12);
    }
}
