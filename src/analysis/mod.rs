//! Exact parameter, MAC and activation-memory analysis computed from the spec alone.
//!
//! Conventions follow `ground_truth.csv`: parameters are trainable tensors only (BN running statistics
//! excluded); MACs count Conv2d (incl. depthwise and the SE 1x1 convs) and Linear at batch 1; BN,
//! activations, the SE multiply, residual adds and pooling are not counted.

use crate::spec::{Conv, ModelSpec, Role, SpecError};

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

/// Every count in u64 with overflow checks: a spec within its bounds never overflows, but a
/// resolution asked for on the command line may still be absurd.
fn product(factors: &[usize]) -> Option<u64> {
    factors
        .iter()
        .try_fold(1u64, |acc, &f| acc.checked_mul(f as u64))
}

struct Builder {
    rows: Vec<LayerRow>,
    peak: u64,
    /// Bytes of the block input kept alive for the residual.
    block_input: u64,
}

impl Builder {
    /// Adds `conv` (and its batch norm) applied to `input`; returns the output shape.
    fn conv(&mut self, conv: &Conv, input: [usize; 3]) -> Option<[usize; 3]> {
        let [_, h, w] = input;
        // ceil(size / stride) for TF SAME and for symmetric k/2 padding alike (kernels are odd).
        let spatial = match conv.role {
            Role::SeReduce | Role::SeExpand | Role::Classifier => [1, 1],
            _ => [h.div_ceil(conv.stride), w.div_ceil(conv.stride)],
        };
        let output = [conv.out_channels, spatial[0], spatial[1]];
        let weights = product(&conv.weight_shape())?;
        let kind = match conv.role {
            Role::Depthwise => LayerKind::DepthwiseConv,
            Role::SeReduce | Role::SeExpand => LayerKind::SeConv,
            Role::Classifier => LayerKind::Linear,
            _ => LayerKind::Conv,
        };
        let (name, params) = match kind {
            LayerKind::SeConv | LayerKind::Linear => (conv.path.clone(), conv.params()),
            _ => (conv.weight_module(), weights),
        };
        self.rows.push(LayerRow {
            name,
            kind,
            output,
            params,
            macs: weights.checked_mul(product(&spatial)?)?,
        });
        if let Some(bn) = conv.bn_module() {
            self.rows.push(LayerRow {
                name: bn,
                kind: LayerKind::BatchNorm,
                output,
                params: 2 * conv.out_channels as u64,
                macs: 0,
            });
            let live = (volume(input)?.checked_add(volume(output)?)?).checked_mul(4)?;
            self.peak = self.peak.max(self.block_input.checked_add(live)?);
        }
        Some(output)
    }
}

fn volume(shape: [usize; 3]) -> Option<u64> {
    product(&shape)
}

/// Analyses `spec` at `resolution` (square input).
pub fn analyze(spec: &ModelSpec, resolution: usize) -> Result<Analysis, SpecError> {
    spec.validate()?;
    build(spec, resolution).ok_or_else(|| {
        SpecError::Invalid(format!(
            "`{}` at resolution {resolution}: the counts do not fit in 64 bits",
            spec.name
        ))
    })
}

fn build(spec: &ModelSpec, resolution: usize) -> Option<Analysis> {
    let anatomy = spec.anatomy();
    let mut b = Builder {
        rows: Vec::new(),
        peak: 0,
        block_input: 0,
    };
    let mut x = b.conv(&anatomy.stem, [3, resolution, resolution])?;
    for block in &anatomy.blocks {
        b.block_input = if block.layer.residual {
            4 * volume(x)?
        } else {
            0
        };
        for conv in block.convs() {
            let out = b.conv(conv, x)?;
            // SE convs work on pooled vectors; the running feature map keeps its shape.
            if !matches!(conv.role, Role::SeReduce | Role::SeExpand) {
                x = out;
            }
        }
    }
    b.block_input = 0;
    let x = b.conv(&anatomy.head, x)?;
    b.conv(&anatomy.classifier, x)?;
    let sum = |f: fn(&LayerRow) -> Option<u64>| {
        b.rows
            .iter()
            .try_fold(0u64, |acc, r| acc.checked_add(f(r)?))
    };
    Some(Analysis {
        model: spec.name.clone(),
        resolution,
        params: sum(|r| Some(r.params))?,
        macs: sum(|r| Some(r.macs))?,
        peak_activation_bytes: b.peak,
        total_activation_bytes: sum(|r| volume(r.output)?.checked_mul(4))?,
        layers: b.rows,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::variant;

    #[test]
    fn b0_matches_torchvision() {
        let a = analyze(&variant("b0").unwrap(), 224).unwrap();
        assert_eq!(a.params, 5_288_548);
        assert_eq!(a.macs, 385_814_752);
    }

    #[test]
    fn layer_rows_sum_to_totals_and_are_named_like_the_model() {
        let a = analyze(&variant("v2-s").unwrap(), 384).unwrap();
        assert_eq!(a.layers.first().unwrap().name, "stem.conv");
        assert_eq!(a.layers.last().unwrap().name, "classifier");
        assert!(a.layers.iter().any(|r| r.name == "blocks.0.expand.conv"));
        assert!(a.layers.iter().any(|r| r.name == "blocks.39.se.reduce"));
        assert!(a.peak_activation_bytes > 0 && a.peak_activation_bytes < a.total_activation_bytes);
    }

    #[test]
    fn absurd_sizes_are_errors_not_wrapped_counts() {
        let b0 = variant("b0").unwrap();
        let e = analyze(&b0, 1 << 40).unwrap_err().to_string();
        assert!(e.contains("64 bits"), "{e}");
        let big = analyze(&b0, 8192).unwrap();
        assert!(big.macs > analyze(&b0, 224).unwrap().macs);
        for (d, w, r) in [(1e9, 1.0, 1.0), (1.0, 1e9, 1.0), (1.0, 1.0, 1e6)] {
            let e = b0.scaled(d, w, r).map(|_| ()).unwrap_err().to_string();
            assert!(e.contains("at most") || e.contains("positive"), "{e}");
        }
        let phi = b0
            .compound(1000.0, crate::spec::CompoundCoefficients::default())
            .unwrap_err()
            .to_string();
        assert!(phi.contains("phi 1000"), "{phi}");
    }
}
