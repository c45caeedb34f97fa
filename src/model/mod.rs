//! The trainable EfficientNet on burn, built from a [`ModelSpec`].
//!
//! Module paths equal the canonical weight names (`blocks.3.dw.conv.weight`, ...), so weights load by
//! path. Training behaviour (BN batch statistics, dropout, stochastic depth) is active when the model
//! runs on an autodiff device and has not been switched to [`Module::valid`] or frozen, as for burn's
//! own layers.

pub(crate) mod fused;
mod init;
mod load;

use burn::module::{Flag, Module, Param};
use burn::nn::conv::{Conv2d, Conv2dConfig};
use burn::nn::{
    BatchNorm, BatchNormConfig, Dropout, DropoutConfig, Linear, LinearConfig, PaddingConfig2d,
};
use burn::tensor::{Device, Tensor};

use crate::spec::{Activation, BlockAnatomy, Conv as SpecConv, FeatureTap, ModelSpec, Padding};

pub use fused::FusedOps;
/// The training kernels' alternatives, for side-by-side timing (`examples/weight_gradient_ab`).
#[doc(hidden)]
pub mod kernel_paths {
    pub use super::fused::{WeightGradientPath, weight_gradient_by};
}
pub use load::{
    LoadError, ParamMapper, ParamVisitor, apply_weights, export_weights, map_params, visit_params,
};

/// Activation as a skipped (non-parameter) module field.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Act(pub Activation);

impl Act {
    fn forward<const D: usize>(&self, x: Tensor<D>) -> Tensor<D> {
        fused::activation(x, self.0)
    }
}

/// Conv -> BN -> optional activation.
#[derive(Module, Debug)]
pub struct ConvBn {
    pub conv: Conv2d,
    pub bn: BatchNorm,
    #[module(skip)]
    pub act: Option<Act>,
}

impl ConvBn {
    fn new(spec: &ModelSpec, conv: &SpecConv, device: &Device) -> Self {
        let k = conv.kernel;
        let padding = match spec.padding {
            Padding::Same => PaddingConfig2d::Same,
            Padding::Symmetric => PaddingConfig2d::Explicit(k / 2, k / 2, k / 2, k / 2),
        };
        ConvBn {
            conv: Conv2dConfig::new([conv.in_channels, conv.out_channels], [k, k])
                .with_stride([conv.stride, conv.stride])
                .with_groups(conv.groups)
                .with_padding(padding)
                .with_bias(false)
                .init(device),
            bn: BatchNormConfig::new(conv.out_channels)
                .with_epsilon(spec.bn_eps)
                .with_momentum(spec.bn_momentum)
                .init(device),
            act: conv.act.then_some(Act(spec.activation)),
        }
    }

    /// BN in inference mode with its statistics and affine parameters fixed; the conv still trains.
    fn freeze_bn(self) -> Self {
        ConvBn {
            bn: self.bn.freeze(),
            ..self
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let x = match self.conv.groups {
            1 => fused::conv2d(&self.conv, x),
            _ => fused::depthwise_conv2d(&self.conv, x),
        };
        fused::batch_norm(&self.bn, x, self.act.map(|a| a.0))
    }
}

/// Squeeze-excite: global pool -> 1x1 reduce (+bias) -> act -> 1x1 expand (+bias) -> sigmoid -> scale.
#[derive(Module, Debug)]
pub struct SqueezeExcite {
    pub reduce: Conv2d,
    pub expand: Conv2d,
    #[module(skip)]
    pub act: Act,
}

impl SqueezeExcite {
    fn new([reduce, expand]: &[SpecConv; 2], act: Activation, device: &Device) -> Self {
        let linear =
            |c: &SpecConv| Conv2dConfig::new([c.in_channels, c.out_channels], [1, 1]).init(device);
        SqueezeExcite {
            reduce: linear(reduce),
            expand: linear(expand),
            act: Act(act),
        }
    }

    fn forward(&self, x: Tensor<4>) -> Tensor<4> {
        let s = fused::spatial_mean(x.clone());
        let s = self.act.forward(fused::conv2d(&self.reduce, s));
        let s = fused::sigmoid(fused::conv2d(&self.expand, s));
        fused::plane_scale(x, s)
    }
}

/// One MBConv or Fused-MBConv block; which sub-layers exist follows the spec's anatomy.
#[derive(Module, Debug)]
pub struct Block {
    /// MBConv: 1x1 expansion (absent when e = 1). Fused: the kxk conv (the only conv when e = 1).
    pub expand: Option<ConvBn>,
    /// MBConv only: depthwise kxk conv.
    pub dw: Option<ConvBn>,
    pub se: Option<SqueezeExcite>,
    /// 1x1 projection without activation (absent for Fused with e = 1).
    pub project: Option<ConvBn>,
    pub residual: bool,
    pub drop_path: f64,
    pub training: Param<Flag>,
}

impl Block {
    fn new(spec: &ModelSpec, b: &BlockAnatomy, device: &Device) -> Self {
        let conv_bn = |c: &Option<SpecConv>| c.as_ref().map(|c| ConvBn::new(spec, c, device));
        Block {
            expand: conv_bn(&b.expand),
            dw: conv_bn(&b.depthwise),
            se: b
                .se
                .as_ref()
                .map(|se| SqueezeExcite::new(se, spec.activation, device)),
            project: conv_bn(&b.project),
            residual: b.layer.residual,
            drop_path: b.layer.drop_path_rate,
            training: Param::from_bool(true),
        }
    }

    fn forward(&self, input: Tensor<4>) -> Tensor<4> {
        let mut x = input.clone();
        for conv in [&self.expand, &self.dw].into_iter().flatten() {
            x = conv.forward(x);
        }
        if let Some(se) = &self.se {
            x = se.forward(x);
        }
        if let Some(p) = &self.project {
            x = p.forward(x);
        }
        if !self.residual {
            return x;
        }
        if self.drop_path > 0.0 && self.training.is_enabled() && x.device().is_autodiff() {
            // Stochastic depth: drop the whole residual branch per sample, rescale the survivors.
            x = fused::drop_path(x, self.drop_path);
        }
        x + input
    }
}

/// EfficientNet (V1, Lite or V2) as specified by a [`ModelSpec`].
#[derive(Module, Debug)]
pub struct EfficientNet {
    pub stem: ConvBn,
    pub blocks: Vec<Block>,
    pub head: ConvBn,
    pub dropout: Dropout,
    pub classifier: Linear,
    #[module(skip)]
    pub taps: Vec<FeatureTap>,
}

impl EfficientNet {
    /// A freshly initialised model (burn's default initialisers).
    pub fn new(spec: &ModelSpec, device: &Device) -> Self {
        let anatomy = spec.anatomy();
        let fc = &anatomy.classifier;
        EfficientNet {
            stem: ConvBn::new(spec, &anatomy.stem, device),
            blocks: anatomy
                .blocks
                .iter()
                .map(|b| Block::new(spec, b, device))
                .collect(),
            head: ConvBn::new(spec, &anatomy.head, device),
            dropout: DropoutConfig::new(spec.dropout).init(),
            classifier: LinearConfig::new(fc.in_channels, fc.out_channels).init(device),
            taps: spec.feature_taps(),
        }
    }

    /// Logits `[batch, classes]` for images `[batch, 3, h, w]` of any size.
    pub fn forward(&self, x: Tensor<4>) -> Tensor<2> {
        let x = self.forward_head_features(x);
        self.classify(x)
    }

    /// The pooled `[batch, head_channels]` features (before dropout and the classifier).
    pub fn forward_head_features(&self, x: Tensor<4>) -> Tensor<2> {
        let mut x = self.stem.forward(x);
        for b in &self.blocks {
            x = b.forward(x);
        }
        let x = self.head.forward(x);
        let [b, c, _, _] = x.dims();
        fused::spatial_mean(x).reshape([b, c])
    }

    /// Dropout + classifier on pooled features.
    pub fn classify(&self, features: Tensor<2>) -> Tensor<2> {
        let x = fused::dropout(&self.dropout, features);
        match fused::half_compute(&self.classifier.weight, &x) {
            Some((compute, back)) => self.classifier.forward(x.cast(compute)).cast(back),
            None => self.classifier.forward(x),
        }
    }

    /// Backbone features at reductions 2, 4, 8, 16 and 32 (see [`EfficientNet::feature_channels`]).
    pub fn forward_features(&self, x: Tensor<4>) -> Vec<Tensor<4>> {
        let mut x = self.stem.forward(x);
        let mut out = Vec::with_capacity(self.taps.len());
        if self.taps.first().is_some_and(|t| t.after_block.is_none()) {
            out.push(x.clone());
        }
        for (i, b) in self.blocks.iter().enumerate() {
            x = b.forward(x);
            if self.taps.iter().any(|t| t.after_block == Some(i)) {
                out.push(x.clone());
            }
        }
        out
    }

    /// `(reduction, channels)` of each tensor [`EfficientNet::forward_features`] returns.
    pub fn feature_channels(&self) -> Vec<(usize, usize)> {
        self.taps
            .iter()
            .map(|t| (t.reduction, t.channels))
            .collect()
    }

    /// Puts every BatchNorm in inference mode with fixed statistics and affine parameters while the
    /// convolutions keep training: Keras' recipe for fine-tuning, so that small or differently
    /// distributed data does not overwrite the pretrained statistics.
    pub fn freeze_batch_norm(self) -> Self {
        let blocks = self
            .blocks
            .into_iter()
            .map(|b| Block {
                expand: b.expand.map(ConvBn::freeze_bn),
                dw: b.dw.map(ConvBn::freeze_bn),
                project: b.project.map(ConvBn::freeze_bn),
                ..b
            })
            .collect();
        EfficientNet {
            stem: self.stem.freeze_bn(),
            blocks,
            head: self.head.freeze_bn(),
            ..self
        }
    }

    /// Sets the momentum of every batch norm (the weight of the next batch's statistics).
    pub fn set_bn_momentum(&mut self, momentum: f64) {
        let blocks = self
            .blocks
            .iter_mut()
            .flat_map(|b| [&mut b.expand, &mut b.dw, &mut b.project])
            .flatten();
        for cb in [&mut self.stem, &mut self.head].into_iter().chain(blocks) {
            cb.bn.momentum = momentum;
        }
    }

    /// Freezes the stem and every block (fine-tuning the head and classifier only).
    pub fn freeze_backbone(self) -> Self {
        EfficientNet {
            stem: self.stem.freeze(),
            blocks: self.blocks.into_iter().map(|b| b.freeze()).collect(),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::weights::layout::{Layout, key_map};

    #[test]
    fn module_paths_are_the_canonical_weight_names() {
        let device = Device::flex();
        for name in ["b0", "lite0", "v2-b0"] {
            let spec = crate::spec::variant(name).unwrap();
            let model = EfficientNet::new(&spec, &device);
            let exported = export_weights(&model);
            let expected: Vec<(String, Vec<usize>)> = key_map(&spec, Layout::Effnet)
                .unwrap()
                .into_iter()
                .map(|k| (k.canonical, k.shape))
                .collect();
            let mut got: Vec<(String, Vec<usize>)> = exported
                .iter()
                .map(|(k, t)| (k.clone(), t.shape.clone()))
                .collect();
            let mut want = expected.clone();
            got.sort();
            want.sort();
            assert_eq!(got, want, "{name}");
            // Round trip: loading the exported tensors reproduces them.
            let reloaded = apply_weights(EfficientNet::new(&spec, &device), &exported).unwrap();
            assert_eq!(export_weights(&reloaded), exported, "{name}");
        }
    }
}
