//! Batch norm folded into the convolution before it, for inference: per output channel
//! `w' = w * gamma / sqrt(var + eps)` and `b' = beta - mean * gamma / sqrt(var + eps)`. The engine
//! and the ONNX export both start from this.

use super::{TensorMap, WeightError};
use crate::spec::Conv;

/// `name`'s values, checked to hold exactly `len` of them.
pub fn tensor_values<'a>(
    t: &'a TensorMap,
    name: &str,
    len: usize,
) -> Result<&'a [f32], WeightError> {
    let t = t
        .get(name)
        .ok_or_else(|| WeightError::Invalid(format!("missing tensor `{name}`")))?;
    if t.data.len() != len {
        return Err(WeightError::Invalid(format!(
            "`{name}` has {} values, the spec needs {len}",
            t.data.len()
        )));
    }
    Ok(&t.data)
}

/// A convolution with its batch norm folded in.
#[derive(Debug, Clone, PartialEq)]
pub struct Folded {
    /// PyTorch layout `[out, in / groups, k, k]`.
    pub weight: Vec<f32>,
    pub bias: Vec<f32>,
}

/// Folds `{path}.bn` into `{path}.conv.weight` (the weight's shape checked against the spec).
pub fn fold_batch_norm(t: &TensorMap, conv: &Conv, eps: f64) -> Result<Folded, WeightError> {
    let path = &conv.path;
    let weight_name = format!("{path}.conv.weight");
    let shape = &t
        .get(&weight_name)
        .ok_or_else(|| WeightError::Invalid(format!("missing tensor `{weight_name}`")))?
        .shape;
    if *shape != conv.weight_shape() {
        return Err(WeightError::Invalid(format!(
            "`{weight_name}` is {shape:?}, the spec needs {:?}",
            conv.weight_shape()
        )));
    }
    let cout = conv.out_channels;
    let per_out = shape[1..].iter().product::<usize>();
    let w = tensor_values(t, &weight_name, cout * per_out)?;
    let bn = |name: &str| tensor_values(t, &format!("{path}.bn.{name}"), cout);
    let (gamma, beta, mean, var) = (
        bn("weight")?,
        bn("bias")?,
        bn("running_mean")?,
        bn("running_var")?,
    );
    let scale: Vec<f32> = gamma
        .iter()
        .zip(var)
        .map(|(g, v)| (*g as f64 / (*v as f64 + eps).sqrt()) as f32)
        .collect();
    Ok(Folded {
        weight: w
            .chunks_exact(per_out)
            .zip(&scale)
            .flat_map(|(row, s)| row.iter().map(move |v| v * s))
            .collect(),
        bias: (0..cout).map(|o| beta[o] - mean[o] * scale[o]).collect(),
    })
}
