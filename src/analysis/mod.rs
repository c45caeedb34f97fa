//! Exact parameter, MAC and activation-memory analysis computed from the spec alone.
//!
//! Conventions follow `ground_truth.csv`: parameters are trainable tensors only (BN running statistics
//! excluded); MACs count Conv2d (incl. depthwise and the SE 1x1 convs) and Linear at batch 1; BN,
//! activations, the SE multiply, residual adds and pooling are not counted.

use crate::spec::{BlockKind, ModelSpec};

/// What a row of the analysis is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum LayerKind {
    Conv,
    DepthwiseConv,
    SeConv,
    BatchNorm,
    Linear,
}

/// One parameterised layer, named by its path in the burn model.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerRow {
    pub name: String,
    pub kind: LayerKind,
    /// Output shape `[channels, height, width]` at batch 1.
    pub output: [usize; 3],
    pub params: u64,
    pub macs: u64,
}

#[derive(Debug, Clone, serde::Serialize)]
pub struct Analysis {
    pub model: String,
    pub resolution: usize,
    pub params: u64,
    pub macs: u64,
    /// Largest set of float32 activations alive at once in an inference forward pass (block input kept
    /// for the residual, plus one layer's input and output), batch 1.
    pub peak_activation_bytes: u64,
    /// Sum of every layer output (roughly what a training step keeps for the backward pass), batch 1.
    pub total_activation_bytes: u64,
    pub layers: Vec<LayerRow>,
}

impl Analysis {
    pub fn gmacs(&self) -> f64 {
        self.macs as f64 / 1e9
    }
}

/// Spatial output size of a convolution: ceil(in / stride) for both TF SAME and symmetric k/2 padding
/// (kernels are odd).
fn conv_out(size: usize, stride: usize) -> usize {
    size.div_ceil(stride)
}

struct Builder {
    rows: Vec<LayerRow>,
    peak: u64,
    block_input: u64,
}

impl Builder {
    #[allow(clippy::too_many_arguments)]
    fn conv(
        &mut self,
        name: String,
        input: [usize; 3],
        out_channels: usize,
        kernel: usize,
        stride: usize,
        groups: usize,
        with_bn: bool,
    ) -> [usize; 3] {
        let [c, h, w] = input;
        let (oh, ow) = (conv_out(h, stride), conv_out(w, stride));
        let weights = (out_channels * (c / groups) * kernel * kernel) as u64;
        let kind = if groups > 1 {
            LayerKind::DepthwiseConv
        } else {
            LayerKind::Conv
        };
        let output = [out_channels, oh, ow];
        self.rows.push(LayerRow {
            name: format!("{name}.conv"),
            kind,
            output,
            params: weights,
            macs: weights * (oh * ow) as u64,
        });
        if with_bn {
            self.rows.push(LayerRow {
                name: format!("{name}.bn"),
                kind: LayerKind::BatchNorm,
                output,
                params: 2 * out_channels as u64,
                macs: 0,
            });
        }
        let live = self.block_input + 4 * (volume(input) + volume(output));
        self.peak = self.peak.max(live);
        output
    }

    fn squeeze_excite(&mut self, name: &str, channels: usize, reduced: usize) {
        for (part, cin, cout) in [("reduce", channels, reduced), ("expand", reduced, channels)] {
            let weights = (cin * cout) as u64;
            self.rows.push(LayerRow {
                name: format!("{name}.se.{part}"),
                kind: LayerKind::SeConv,
                output: [cout, 1, 1],
                params: weights + cout as u64,
                macs: weights,
            });
        }
    }
}

fn volume(shape: [usize; 3]) -> u64 {
    shape.iter().product::<usize>() as u64
}

/// Analyses `spec` at `resolution` (square input).
pub fn analyze(spec: &ModelSpec, resolution: usize) -> Analysis {
    let mut b = Builder {
        rows: Vec::new(),
        peak: 0,
        block_input: 0,
    };
    let mut x = b.conv(
        "stem".into(),
        [3, resolution, resolution],
        spec.stem_channels(),
        3,
        2,
        1,
        true,
    );
    for (i, l) in spec.layers().iter().enumerate() {
        let name = format!("blocks.{i}");
        b.block_input = if l.residual { 4 * volume(x) } else { 0 };
        match l.kind {
            BlockKind::MbConv => {
                if l.expand_ratio != 1 {
                    x = b.conv(format!("{name}.expand"), x, l.mid_channels, 1, 1, 1, true);
                }
                x = b.conv(
                    format!("{name}.dw"),
                    x,
                    l.mid_channels,
                    l.kernel,
                    l.stride,
                    l.mid_channels,
                    true,
                );
                if let Some(se) = l.se_channels {
                    b.squeeze_excite(&name, l.mid_channels, se);
                }
                x = b.conv(format!("{name}.project"), x, l.out_channels, 1, 1, 1, true);
            }
            BlockKind::FusedMbConv => {
                let expanded = if l.expand_ratio == 1 {
                    l.out_channels
                } else {
                    l.mid_channels
                };
                x = b.conv(
                    format!("{name}.expand"),
                    x,
                    expanded,
                    l.kernel,
                    l.stride,
                    1,
                    true,
                );
                if let Some(se) = l.se_channels {
                    b.squeeze_excite(&name, expanded, se);
                }
                if l.expand_ratio != 1 {
                    x = b.conv(format!("{name}.project"), x, l.out_channels, 1, 1, 1, true);
                }
            }
        }
    }
    b.block_input = 0;
    let x = b.conv("head".into(), x, spec.head_channels(), 1, 1, 1, true);
    let features = x[0];
    b.rows.push(LayerRow {
        name: "classifier".into(),
        kind: LayerKind::Linear,
        output: [spec.num_classes, 1, 1],
        params: (features * spec.num_classes + spec.num_classes) as u64,
        macs: (features * spec.num_classes) as u64,
    });
    Analysis {
        model: spec.name.clone(),
        resolution,
        params: b.rows.iter().map(|r| r.params).sum(),
        macs: b.rows.iter().map(|r| r.macs).sum(),
        peak_activation_bytes: b.peak,
        total_activation_bytes: b.rows.iter().map(|r| 4 * volume(r.output)).sum(),
        layers: b.rows,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::variant;

    #[test]
    fn b0_matches_torchvision() {
        let a = analyze(&variant("b0").unwrap(), 224);
        assert_eq!(a.params, 5_288_548);
        assert_eq!(a.macs, 385_814_752);
    }

    #[test]
    fn layer_rows_sum_to_totals_and_are_named_like_the_model() {
        let a = analyze(&variant("v2-s").unwrap(), 384);
        assert_eq!(a.layers.first().unwrap().name, "stem.conv");
        assert_eq!(a.layers.last().unwrap().name, "classifier");
        assert!(a.layers.iter().any(|r| r.name == "blocks.0.expand.conv"));
        assert!(a.layers.iter().any(|r| r.name == "blocks.39.se.reduce"));
        assert!(a.peak_activation_bytes > 0 && a.peak_activation_bytes < a.total_activation_bytes);
    }
}
