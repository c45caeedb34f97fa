//! The architecture spec: the single source of truth every other module builds from.
//!
//! A [`ModelSpec`] holds the unscaled block strings of a family plus its scaling coefficients and
//! per-variant defaults; [`ModelSpec::layers`] applies the TF rounding rules and yields the concrete
//! network (one [`LayerSpec`] per block) that the analysis, the burn model and the weight mapping share.

mod anatomy;
mod block;
mod variants;

pub use anatomy::{Anatomy, BlockAnatomy, BlockPos, Conv, Role};
pub use block::{BlockArgs, BlockKind};
pub use variants::{Flavor, VARIANTS, resolve, variant};

/// Errors in an architecture description.
#[derive(Debug, thiserror::Error)]
pub enum SpecError {
    #[error("invalid block string `{block}`: {why}")]
    BlockString { block: String, why: String },
    #[error("unknown model `{name}`; known models: {known} (run `effnet models` for the list)")]
    UnknownModel { name: String, known: String },
    #[error("invalid model spec: {0}")]
    Invalid(String),
}

/// Bounds on what a spec may describe: far beyond every published variant, and small enough that
/// sizes, parameter counts and MACs cannot overflow.
pub const MAX_CHANNELS: usize = 1 << 16;
pub const MAX_BLOCKS: usize = 4096;
pub const MAX_RESOLUTION: usize = 16384;
pub const MAX_CLASSES: usize = 1 << 20;

/// Model family: decides the rounding rule and the Lite simplifications.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Family {
    /// EfficientNet B0-B8, L2 (round_filters with the 0.9 rule).
    V1,
    /// EfficientNet-Lite: no SE, ReLU6, unscaled stem/head and first/last stage repeats.
    Lite,
    /// EfficientNetV2 (round_filters without the 0.9 rule).
    V2,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub enum Activation {
    Silu,
    Relu6,
}

/// How convolutions pad: TF "SAME" (asymmetric, depends on the input size) or PyTorch symmetric k/2.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Padding {
    Same,
    Symmetric,
}

impl Padding {
    /// (output size, padding before, padding after) of a conv along an axis of `size` pixels.
    /// TF "SAME" gives ceil(size / stride) outputs and puts an odd padding pixel after (burn's
    /// `PaddingConfig2d::Same` does the same); symmetric pads k/2 on both sides.
    pub fn along(self, size: usize, kernel: usize, stride: usize) -> (usize, usize, usize) {
        match self {
            Padding::Same => {
                let out = size.div_ceil(stride);
                let total = ((out - 1) * stride + kernel).saturating_sub(size);
                (out, total / 2, total - total / 2)
            }
            Padding::Symmetric => {
                let p = kernel / 2;
                ((size + 2 * p - kernel) / stride + 1, p, p)
            }
        }
    }
}

/// A complete, scalable architecture description. It serialises with its stages as block strings,
/// which is how weights files and run directories carry their architecture.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ModelSpec {
    pub name: String,
    pub family: Family,
    /// Unscaled stages, one block string each.
    #[serde(with = "block::as_strings")]
    pub blocks: Vec<BlockArgs>,
    pub width: f64,
    pub depth: f64,
    /// Default (evaluation) input resolution.
    pub resolution: usize,
    /// Training resolution (differs from `resolution` for V2).
    pub train_resolution: usize,
    pub dropout: f64,
    /// Unscaled head width (1280 throughout the published families).
    pub head_channels: usize,
    pub activation: Activation,
    pub bn_eps: f64,
    /// PyTorch convention: weight of the new batch statistic (TF decay 0.99 = momentum 0.01).
    pub bn_momentum: f64,
    pub padding: Padding,
    pub num_classes: usize,
    /// Stochastic depth rate of the last block; block i of N gets rate * i / N.
    pub drop_connect_rate: f64,
    pub divisor: usize,
}

/// One concrete block after scaling and rounding.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct LayerSpec {
    pub stage: usize,
    pub kind: BlockKind,
    pub in_channels: usize,
    /// Expanded width (`in * e`); equal to `in_channels` when there is no expansion.
    pub mid_channels: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub expand_ratio: usize,
    /// SE bottleneck width (from the block INPUT channels); `None` without SE.
    pub se_channels: Option<usize>,
    pub residual: bool,
    pub drop_path_rate: f64,
}

/// A feature map available to a backbone user: the last block output at one reduction level.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
pub struct FeatureTap {
    /// Index into [`ModelSpec::layers`] whose output is tapped; `None` means the stem output.
    pub after_block: Option<usize>,
    pub reduction: usize,
    pub channels: usize,
}

impl ModelSpec {
    /// TF `round_filters`: scale by width, round to the divisor; V1 adds the 0.9 rule.
    pub fn round_filters(&self, channels: usize) -> usize {
        let f = channels as f64 * self.width;
        let d = self.divisor as f64;
        let mut new = (((f + d / 2.0) as usize) / self.divisor * self.divisor).max(self.divisor);
        if self.family != Family::V2 && (new as f64) < 0.9 * f {
            new += self.divisor;
        }
        new
    }

    /// TF `round_repeats`: ceil(depth * repeats); Lite keeps the first and last stage as is.
    pub fn round_repeats(&self, stage: usize, repeats: usize) -> usize {
        if self.family == Family::Lite && (stage == 0 || stage + 1 == self.blocks.len()) {
            return repeats;
        }
        (self.depth * repeats as f64).ceil() as usize
    }

    fn fixed_stem_head(&self) -> bool {
        self.family == Family::Lite
    }

    pub fn stem_channels(&self) -> usize {
        let base = self.blocks[0].in_channels;
        if self.fixed_stem_head() {
            base
        } else {
            self.round_filters(base)
        }
    }

    pub fn head_channels(&self) -> usize {
        if self.fixed_stem_head() {
            self.head_channels
        } else {
            self.round_filters(self.head_channels)
        }
    }

    /// Repeats per stage after depth scaling.
    pub fn stage_repeats(&self) -> Vec<usize> {
        self.blocks
            .iter()
            .enumerate()
            .map(|(i, b)| self.round_repeats(i, b.repeats))
            .collect()
    }

    /// The concrete network: every block with its rounded channels, stride, SE width, residual flag and
    /// stochastic-depth rate.
    pub fn layers(&self) -> Vec<LayerSpec> {
        let total: usize = self.stage_repeats().iter().sum();
        let mut out = Vec::with_capacity(total);
        for (stage, args) in self.blocks.iter().enumerate() {
            let repeats = self.round_repeats(stage, args.repeats);
            let stage_in = if stage == 0 {
                self.stem_channels()
            } else {
                self.round_filters(args.in_channels)
            };
            let stage_out = self.round_filters(args.out_channels);
            for r in 0..repeats {
                let in_channels = if r == 0 { stage_in } else { stage_out };
                let stride = if r == 0 { args.stride } else { 1 };
                let se_channels = args
                    .se_ratio
                    .filter(|_| self.family != Family::Lite)
                    .map(|ratio| ((in_channels as f64 * ratio) as usize).max(1));
                let index = out.len();
                out.push(LayerSpec {
                    stage,
                    kind: args.kind,
                    in_channels,
                    mid_channels: in_channels * args.expand_ratio,
                    out_channels: stage_out,
                    kernel: args.kernel,
                    stride,
                    expand_ratio: args.expand_ratio,
                    se_channels,
                    residual: args.id_skip && stride == 1 && in_channels == stage_out,
                    drop_path_rate: self.drop_connect_rate * index as f64 / total as f64,
                });
            }
        }
        out
    }

    /// Output channels of the last block (input to the head conv).
    pub fn body_channels(&self) -> usize {
        self.round_filters(self.blocks.last().map_or(0, |b| b.out_channels))
    }

    /// Backbone taps at reductions 2, 4, 8, 16, 32 (timm's `features_only` convention: the last
    /// block before each further downsampling; the stem when no block runs at a level).
    pub fn feature_taps(&self) -> Vec<FeatureTap> {
        let layers = self.layers();
        let mut taps: Vec<FeatureTap> = vec![FeatureTap {
            after_block: None,
            reduction: 2,
            channels: self.stem_channels(),
        }];
        let mut reduction = 2;
        for (i, l) in layers.iter().enumerate() {
            reduction *= l.stride;
            let tap = FeatureTap {
                after_block: Some(i),
                reduction,
                channels: l.out_channels,
            };
            match taps.last_mut() {
                Some(last) if last.reduction == reduction => *last = tap,
                _ => taps.push(tap),
            }
        }
        taps
    }

    /// Checks that every size the spec implies is sane (see [`MAX_CHANNELS`] and its siblings) and
    /// every rate is in range, before anything is built from it.
    pub fn validate(&self) -> Result<(), SpecError> {
        let bad = |why: String| Err(SpecError::Invalid(format!("`{}`: {why}", self.name)));
        if self.blocks.is_empty() {
            return bad("it has no stages".into());
        }
        for (what, v) in [("width", self.width), ("depth", self.depth)] {
            if !(v.is_finite() && v > 0.0) {
                return bad(format!(
                    "the {what} coefficient must be a positive number, got {v}"
                ));
            }
        }
        if !(1..=256).contains(&self.divisor) {
            return bad(format!(
                "channel divisor {} is outside 1..=256",
                self.divisor
            ));
        }
        // Sizes in floating point first: the integer rounding below would saturate or overflow.
        let widest = self
            .blocks
            .iter()
            .map(|b| b.in_channels.max(b.out_channels) * b.expand_ratio)
            .chain([self.head_channels])
            .max()
            .unwrap_or(0) as f64
            * self.width.max(1.0)
            + self.divisor as f64;
        if widest > MAX_CHANNELS as f64 {
            return bad(format!(
                "width {} makes layers about {widest:.0} channels wide; at most {MAX_CHANNELS} are supported",
                self.width
            ));
        }
        let blocks: f64 = self
            .blocks
            .iter()
            .map(|b| (self.depth * b.repeats as f64).ceil().max(b.repeats as f64))
            .sum();
        if blocks > MAX_BLOCKS as f64 {
            return bad(format!(
                "depth {} makes about {blocks:.0} blocks; at most {MAX_BLOCKS} are supported",
                self.depth
            ));
        }
        for (what, r) in [
            ("resolution", self.resolution),
            ("training resolution", self.train_resolution),
        ] {
            if !(1..=MAX_RESOLUTION).contains(&r) {
                return bad(format!("{what} {r} is outside 1..={MAX_RESOLUTION}"));
            }
        }
        if !(1..=MAX_CLASSES).contains(&self.num_classes) || self.head_channels == 0 {
            return bad(format!(
                "{} classes and a head of {} channels (need 1..={MAX_CLASSES} classes and a head)",
                self.num_classes, self.head_channels
            ));
        }
        if !(self.bn_eps > 0.0 && self.bn_eps < 1.0) {
            return bad(format!("BN epsilon {} is outside (0, 1)", self.bn_eps));
        }
        if !(self.bn_momentum > 0.0 && self.bn_momentum <= 1.0) {
            return bad(format!(
                "BN momentum {} is outside (0, 1]",
                self.bn_momentum
            ));
        }
        for (what, p) in [
            ("dropout", self.dropout),
            ("drop-connect rate", self.drop_connect_rate),
        ] {
            if !(0.0..1.0).contains(&p) {
                return bad(format!("{what} {p} is outside [0, 1)"));
            }
        }
        Ok(())
    }

    /// Applies explicit multipliers on top of this spec's own coefficients.
    pub fn scaled(&self, depth: f64, width: f64, resolution: f64) -> Result<Self, SpecError> {
        for (name, v) in [
            ("depth", depth),
            ("width", width),
            ("resolution", resolution),
        ] {
            if !(v.is_finite() && v > 0.0) {
                return Err(SpecError::Invalid(format!(
                    "{name} multiplier must be a positive number, got {v}"
                )));
            }
        }
        let scale_resolution = |r: usize| -> Result<usize, SpecError> {
            let scaled = (r as f64 * resolution).round().max(1.0);
            if scaled > MAX_RESOLUTION as f64 {
                return Err(SpecError::Invalid(format!(
                    "resolution multiplier {resolution} makes the input {scaled:.0} pixels wide; at most {MAX_RESOLUTION} are supported"
                )));
            }
            Ok(scaled as usize)
        };
        let mut s = self.clone();
        s.depth *= depth;
        s.width *= width;
        s.resolution = scale_resolution(self.resolution)?;
        s.train_resolution = scale_resolution(self.train_resolution)?;
        s.name = format!("{}(d{depth:.3},w{width:.3},r{resolution:.3})", self.name);
        s.validate()?;
        Ok(s)
    }

    /// Compound scaling (paper eq. 3): depth alpha^phi, width beta^phi, resolution gamma^phi.
    pub fn compound(
        &self,
        phi: f64,
        coefficients: CompoundCoefficients,
    ) -> Result<Self, SpecError> {
        let CompoundCoefficients { alpha, beta, gamma } = coefficients;
        let (d, w, r) = (alpha.powf(phi), beta.powf(phi), gamma.powf(phi));
        if ![d, w, r].iter().all(|m| m.is_finite() && *m > 0.0) {
            return Err(SpecError::Invalid(format!(
                "phi {phi} with alpha {alpha}, beta {beta}, gamma {gamma} gives multipliers depth {d}, width {w}, resolution {r}; each must be a positive number"
            )));
        }
        let mut s = self.scaled(d, w, r).map_err(|e| match e {
            SpecError::Invalid(why) => SpecError::Invalid(format!("phi {phi}: {why}")),
            other => other,
        })?;
        s.name = format!("{}(phi={phi})", self.name);
        Ok(s)
    }
}

/// The compound-scaling grid-search result of the paper (alpha * beta^2 * gamma^2 ~= 2).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct CompoundCoefficients {
    pub alpha: f64,
    pub beta: f64,
    pub gamma: f64,
}

impl Default for CompoundCoefficients {
    fn default() -> Self {
        Self {
            alpha: 1.2,
            beta: 1.1,
            gamma: 1.15,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// TF "SAME" puts the odd padding pixel after; both modes give ceil(size / stride) outputs.
    #[test]
    fn padding_along_an_axis() {
        assert_eq!(Padding::Same.along(8, 3, 2), (4, 0, 1));
        assert_eq!(Padding::Same.along(7, 5, 2), (4, 2, 2));
        assert_eq!(Padding::Same.along(224, 3, 2), (112, 0, 1));
        assert_eq!(Padding::Same.along(1, 5, 1), (1, 2, 2));
        assert_eq!(Padding::Symmetric.along(7, 3, 2), (4, 1, 1));
        assert_eq!(Padding::Symmetric.along(8, 5, 1), (8, 2, 2));
    }

    fn counts(spec: &ModelSpec) -> (Vec<usize>, Vec<usize>) {
        let ch = spec
            .blocks
            .iter()
            .map(|b| spec.round_filters(b.out_channels))
            .collect();
        (spec.stage_repeats(), ch)
    }

    #[test]
    fn v1_rounding_matches_published_tables() {
        let b4 = variant("b4").unwrap();
        assert_eq!(
            counts(&b4),
            (
                vec![2, 4, 4, 6, 6, 8, 2],
                vec![24, 32, 56, 112, 160, 272, 448]
            )
        );
        assert_eq!((b4.stem_channels(), b4.head_channels()), (48, 1792));
        let b7 = variant("efficientnet-b7").unwrap();
        assert_eq!(counts(&b7).0, vec![4, 7, 7, 10, 10, 13, 4]);
        assert_eq!(b7.head_channels(), 2560);
    }

    #[test]
    fn the_0_9_rule_applies_to_v1_only() {
        let mut s = variant("b0").unwrap();
        s.width = 0.5; // 40 * 0.5 = 20 -> int(24) // 8 * 8 = 24
        assert_eq!(s.round_filters(40), 24);
        s.width = 1.0; // 36 -> int(40) // 8 * 8 = 40
        assert_eq!(s.round_filters(36), 40);
        s.width = 0.3; // 90 * 0.3 = 27 -> 24, and 24 < 0.9 * 27 adds 8 in V1
        assert_eq!(s.round_filters(90), 32);
        s.family = Family::V2;
        assert_eq!(s.round_filters(90), 24);
    }

    #[test]
    fn lite_keeps_stem_head_and_end_repeats() {
        let l4 = variant("lite4").unwrap();
        assert_eq!(counts(&l4).0, vec![1, 4, 4, 6, 6, 8, 1]);
        assert_eq!((l4.stem_channels(), l4.head_channels()), (32, 1280));
        assert!(l4.layers().iter().all(|l| l.se_channels.is_none()));
        assert_eq!(l4.activation, Activation::Relu6);
    }

    #[test]
    fn se_width_comes_from_block_input() {
        let b0 = variant("b0").unwrap();
        let layers = b0.layers();
        assert_eq!(layers.len(), 16);
        assert_eq!(layers[0].se_channels, Some(8)); // 32 * 0.25
        assert_eq!(layers[1].mid_channels, 96);
        assert_eq!(layers[1].se_channels, Some(4)); // 16 * 0.25, not 96 * 0.25
        assert!(!layers[1].residual && layers[2].residual);
        assert_eq!(layers[15].drop_path_rate, 0.2 * 15.0 / 16.0);
    }

    #[test]
    fn feature_taps_cover_every_reduction() {
        let taps = variant("b0").unwrap().feature_taps();
        let got: Vec<(usize, usize)> = taps.iter().map(|t| (t.reduction, t.channels)).collect();
        assert_eq!(got, vec![(2, 16), (4, 24), (8, 40), (16, 112), (32, 320)]);
        let v2 = variant("v2-s").unwrap().feature_taps();
        let got: Vec<(usize, usize)> = v2.iter().map(|t| (t.reduction, t.channels)).collect();
        assert_eq!(got, vec![(2, 24), (4, 48), (8, 64), (16, 160), (32, 256)]);
    }

    #[test]
    fn compound_scaling_of_b0() {
        let b0 = variant("b0").unwrap();
        let s = b0.compound(1.0, CompoundCoefficients::default()).unwrap();
        assert!((s.depth - 1.2).abs() < 1e-12 && (s.width - 1.1).abs() < 1e-12);
        assert_eq!(s.resolution, 258); // 224 * 1.15 = 257.6
        let s2 = b0.compound(2.0, CompoundCoefficients::default()).unwrap();
        assert!((s2.depth - 1.44).abs() < 1e-12);
        assert!(b0.scaled(0.0, 1.0, 1.0).is_err());
        assert!(b0.scaled(1.0, f64::NAN, 1.0).is_err());
    }
}
