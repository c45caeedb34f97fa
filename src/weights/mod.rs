//! Weight import and export: PyTorch checkpoints (zip and legacy) and safetensors, in torchvision,
//! timm, lukemelas or this crate's layout, mapped to canonical names with their metadata.

pub mod fold;
pub mod layout;
pub mod meta;
mod pickle;
mod torch;

use std::collections::{BTreeMap, HashMap};
use std::path::Path;

use crate::spec::{ModelSpec, VARIANTS, resolve};

pub use layout::Layout;
pub use meta::{IMAGENET_CLASSES, Quantization, QuantizedLayer, WeightMeta, checkpoint_defaults};

/// A float32 tensor in row-major order.
#[derive(Debug, Clone, PartialEq)]
pub struct RawTensor {
    pub shape: Vec<usize>,
    pub data: Vec<f32>,
    /// Stored as an integer type in the file (e.g. `num_batches_tracked`).
    pub integer: bool,
}

pub type TensorMap = BTreeMap<String, RawTensor>;

#[derive(Debug, thiserror::Error)]
pub enum WeightError {
    #[error("cannot read weights `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("cannot write weights `{path}`: {source}")]
    Write {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a weights file: {why}")]
    NotACheckpoint { path: String, why: String },
    #[error("weights `{path}` are corrupt or truncated: {why}")]
    Corrupt { path: String, why: String },
    #[error(
        "weights `{path}` use an unknown key layout (first keys: {keys}); expected torchvision, timm, lukemelas or effnet names"
    )]
    UnknownLayout { path: String, keys: String },
    #[error("weights `{path}` ({layout} layout) do not fit {model}: {details}{hint}")]
    Mismatch {
        path: String,
        layout: Layout,
        model: String,
        details: String,
        hint: String,
    },
    #[error("{0}")]
    Invalid(String),
}

impl WeightError {
    pub(crate) fn io(path: &Path, source: std::io::Error) -> Self {
        WeightError::Io {
            path: path.display().to_string(),
            source,
        }
    }
}

/// Entry points for fuzz and property tests of the readers (not a stable API).
#[doc(hidden)]
pub mod fuzz {
    /// Runs the pickle machine over `data`; the error message on failure.
    pub fn pickle(data: &[u8]) -> Result<(), String> {
        super::pickle::load(data)
            .map(|_| ())
            .map_err(|e| e.to_string())
    }
}

/// A weights file's bytes (a regular file only).
fn read_file(path: &Path) -> Result<Vec<u8>, WeightError> {
    crate::util::read_regular(path).map_err(|e| WeightError::io(path, e))
}

/// Weights mapped to canonical names, with their metadata (which holds the spec they fit).
#[derive(Debug, Clone)]
pub struct WeightSet {
    pub meta: WeightMeta,
    pub tensors: TensorMap,
}

impl WeightSet {
    /// The architecture the tensors fit.
    pub fn spec(&self) -> &ModelSpec {
        &self.meta.spec
    }

    /// Deterministic random weights for `spec` (benchmarks and tests): He-style conv weights,
    /// non-trivial BN statistics so folding is exercised, a uniform classifier.
    pub fn random(spec: &ModelSpec, seed: u64) -> Self {
        let mut state = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut uniform = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            (state >> 40) as f32 / (1u64 << 24) as f32
        };
        let mut tensors = TensorMap::new();
        for k in layout::key_map(spec, Layout::Effnet).expect("own layout maps every spec") {
            let n: usize = k.shape.iter().product();
            let fan_in: usize = k.shape.iter().skip(1).product::<usize>().max(1);
            let bound = (3.0 / fan_in as f32).sqrt();
            let value = |u: f32| -> f32 {
                match k.canonical.rsplit('.').next().unwrap_or("") {
                    "running_var" => 0.5 + u,
                    "running_mean" | "bias" => u - 0.5,
                    "weight" if k.shape.len() == 1 => 0.25 + 0.5 * u,
                    _ => (2.0 * u - 1.0) * bound,
                }
            };
            let data = (0..n).map(|_| value(uniform())).collect();
            tensors.insert(
                k.canonical,
                RawTensor {
                    shape: k.shape,
                    data,
                    integer: false,
                },
            );
        }
        WeightSet {
            meta: checkpoint_defaults(spec, Layout::Effnet),
            tensors,
        }
    }
}

/// Reads every tensor of a `.pth`/`.pt`/`.bin` or `.safetensors` file, plus the metadata a
/// safetensors file written by this crate carries.
pub fn read_tensors(path: &Path) -> Result<(TensorMap, Option<WeightMeta>), WeightError> {
    let bytes = read_file(path)?;
    if bytes.len() < 9 {
        return Err(WeightError::NotACheckpoint {
            path: path.display().to_string(),
            why: format!("only {} bytes long", bytes.len()),
        });
    }
    // safetensors: an 8-byte little-endian header length, then a JSON object.
    if bytes[8] == b'{' {
        read_safetensors(path, &bytes)
    } else {
        drop(bytes);
        Ok((torch::read(path)?, None))
    }
}

fn read_safetensors(
    path: &Path,
    bytes: &[u8],
) -> Result<(TensorMap, Option<WeightMeta>), WeightError> {
    let corrupt = |why: String| WeightError::Corrupt {
        path: path.display().to_string(),
        why,
    };
    let (_, header) =
        safetensors::SafeTensors::read_metadata(bytes).map_err(|e| corrupt(e.to_string()))?;
    let meta = match header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(meta::SAFETENSORS_META_KEY))
    {
        Some(json) => Some(
            WeightMeta::from_json(json)
                .map_err(|e| corrupt(format!("bad effnet metadata: {e}")))?,
        ),
        None => None,
    };
    let st = safetensors::SafeTensors::deserialize(bytes).map_err(|e| corrupt(e.to_string()))?;
    let mut out = TensorMap::new();
    for (name, view) in st.tensors() {
        use safetensors::Dtype;
        let raw = view.data();
        let (data, integer): (Vec<f32>, bool) = match view.dtype() {
            Dtype::F32 => (
                raw.chunks_exact(4)
                    .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
                    .collect(),
                false,
            ),
            Dtype::F64 => (
                raw.chunks_exact(8)
                    .map(|c| f64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                false,
            ),
            Dtype::F16 => (
                raw.chunks_exact(2)
                    .map(|c| half::f16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                false,
            ),
            Dtype::BF16 => (
                raw.chunks_exact(2)
                    .map(|c| half::bf16::from_le_bytes([c[0], c[1]]).to_f32())
                    .collect(),
                false,
            ),
            Dtype::I64 => (
                raw.chunks_exact(8)
                    .map(|c| i64::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                true,
            ),
            Dtype::I32 => (
                raw.chunks_exact(4)
                    .map(|c| i32::from_le_bytes(c.try_into().unwrap()) as f32)
                    .collect(),
                true,
            ),
            Dtype::U8 | Dtype::BOOL => (raw.iter().map(|&v| v as f32).collect(), true),
            Dtype::I8 => (raw.iter().map(|&v| v as i8 as f32).collect(), true),
            other => {
                return Err(corrupt(format!(
                    "tensor `{}` has unsupported dtype {other:?}",
                    crate::util::quote_for_message(&name)
                )));
            }
        };
        out.insert(
            name,
            RawTensor {
                shape: view.shape().to_vec(),
                data,
                integer,
            },
        );
    }
    Ok((out, meta))
}

/// Writes canonical tensors and their metadata as safetensors, atomically (temp file + rename).
pub fn write_safetensors(path: &Path, set: &WeightSet) -> Result<(), WeightError> {
    let bytes: Vec<(&String, Vec<u8>, &Vec<usize>)> = set
        .tensors
        .iter()
        .map(|(k, t)| {
            (
                k,
                t.data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                &t.shape,
            )
        })
        .collect();
    let mut views = Vec::with_capacity(bytes.len());
    for (name, data, shape) in &bytes {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.to_vec(), data)
                .map_err(|e| WeightError::Invalid(format!("tensor `{name}`: {e}")))?;
        views.push((name.to_string(), view));
    }
    let json = serde_json::to_string(&set.meta).expect("metadata serialises");
    let metadata = HashMap::from([(meta::SAFETENSORS_META_KEY.to_string(), json)]);
    let file = safetensors::tensor::serialize(views, Some(metadata))
        .map_err(|e| WeightError::Invalid(e.to_string()))?;
    crate::util::write_atomic(path, &file).map_err(|e| WeightError::Write {
        path: path.display().to_string(),
        source: e,
    })
}

/// Loads a weights file. Without `model`, the architecture is the one the file carries (files this
/// crate writes) or the published variant its keys and shapes fit; with `model`, that variant, keeping
/// the file's own conventions and transform where it has them.
pub fn load(path: &Path, model: Option<&str>) -> Result<WeightSet, WeightError> {
    let (tensors, file_meta) = read_tensors(path)?;
    let layout = Layout::detect(tensors.keys().map(String::as_str)).ok_or_else(|| {
        WeightError::UnknownLayout {
            path: path.display().to_string(),
            keys: tensors
                .keys()
                .take(3)
                .map(|k| format!("`{}`", crate::util::quote_for_message(k)))
                .collect::<Vec<_>>()
                .join(", "),
        }
    })?;
    let meta = match (model, file_meta) {
        (None, Some(meta)) => meta,
        (Some(name), file_meta) => {
            let spec = resolve(name)
                .map_err(|e| WeightError::Invalid(e.to_string()))?
                .0;
            let spec = with_checkpoint_classes(spec, &tensors, layout);
            let defaults = checkpoint_defaults(&spec, layout);
            match file_meta {
                // The file's conventions and transform still hold for the architecture named.
                Some(file) => WeightMeta {
                    spec: ModelSpec {
                        padding: file.spec.padding,
                        bn_eps: file.spec.bn_eps,
                        ..defaults.spec
                    },
                    class_names: file.class_names.filter(|n| n.len() == spec.num_classes),
                    ..file
                },
                None => defaults,
            }
        }
        (None, None) => {
            let spec = infer_model(&tensors, layout).ok_or_else(|| WeightError::Mismatch {
                path: path.display().to_string(),
                layout,
                model: "any published variant".into(),
                details: "pass --model to name the architecture".into(),
                hint: String::new(),
            })?;
            checkpoint_defaults(&spec, layout)
        }
    };
    let mapped = map_tensors(&meta.spec, layout, &tensors).map_err(|details| {
        let hint = infer_model(&tensors, layout)
            .map(|s| format!("; the file fits {} (try --model {})", s.name, s.name))
            .unwrap_or_default();
        WeightError::Mismatch {
            path: path.display().to_string(),
            layout,
            model: meta.spec.name.clone(),
            details,
            hint,
        }
    })?;
    check_finite(path, &mapped)?;
    Ok(WeightSet {
        meta,
        tensors: mapped,
    })
}

/// NaN or infinite weights give NaN predictions that look like answers: refuse them by name.
fn check_finite(path: &Path, tensors: &TensorMap) -> Result<(), WeightError> {
    match tensors
        .iter()
        .find(|(_, t)| !t.data.iter().all(|v| v.is_finite()))
    {
        Some((name, _)) => Err(WeightError::Corrupt {
            path: path.display().to_string(),
            why: format!(
                "tensor `{}` holds NaN or infinite values",
                crate::util::quote_for_message(name)
            ),
        }),
        None => Ok(()),
    }
}

/// A fine-tuned checkpoint may have any number of classes: take it from the classifier.
fn with_checkpoint_classes(mut spec: ModelSpec, tensors: &TensorMap, layout: Layout) -> ModelSpec {
    if let Ok(keys) = layout::key_map(&spec, layout)
        && let Some(k) = keys.iter().find(|k| k.canonical == "classifier.weight")
        && let Some(t) = tensors.get(&k.source)
        && t.shape.len() == 2
        && (1..=crate::spec::MAX_CLASSES).contains(&t.shape[0])
    {
        spec.num_classes = t.shape[0];
    }
    spec
}

/// The published variant whose every key and shape the checkpoint matches.
fn infer_model(tensors: &TensorMap, layout: Layout) -> Option<ModelSpec> {
    VARIANTS.iter().find_map(|v| {
        let spec = with_checkpoint_classes(v.spec(), tensors, layout);
        map_tensors(&spec, layout, tensors).ok().map(|_| spec)
    })
}

/// Renames `tensors` to canonical names; reports unexpected, missing and mis-shaped keys by name.
fn map_tensors(spec: &ModelSpec, layout: Layout, tensors: &TensorMap) -> Result<TensorMap, String> {
    let keys = layout::key_map(spec, layout)?;
    let mut out = TensorMap::new();
    let mut missing = Vec::new();
    let mut shapes = Vec::new();
    for k in &keys {
        match tensors.get(&k.source) {
            None => missing.push(k.source.clone()),
            Some(t) if t.shape != k.shape => shapes.push(format!(
                "`{}` is {:?}, expected {:?}",
                k.source,
                &t.shape[..t.shape.len().min(8)],
                k.shape
            )),
            Some(t) => {
                out.insert(k.canonical.clone(), t.clone());
            }
        }
    }
    let used: std::collections::HashSet<&str> = keys.iter().map(|k| k.source.as_str()).collect();
    let unexpected: Vec<&String> = tensors
        .keys()
        .filter(|k| !used.contains(k.as_str()) && !k.ends_with("num_batches_tracked"))
        .collect();
    if missing.is_empty() && shapes.is_empty() && unexpected.is_empty() {
        return Ok(out);
    }
    let list = |v: &[String]| {
        let shown: Vec<String> = v.iter().take(3).cloned().collect();
        let more = if v.len() > 3 {
            format!(", ... ({} in all)", v.len())
        } else {
            String::new()
        };
        format!("{}{more}", shown.join(", "))
    };
    let mut parts = Vec::new();
    if !shapes.is_empty() {
        parts.push(format!("shape mismatch: {}", list(&shapes)));
    }
    if !missing.is_empty() {
        let m: Vec<String> = missing.iter().map(|k| format!("`{k}`")).collect();
        parts.push(format!("missing keys: {}", list(&m)));
    }
    if !unexpected.is_empty() {
        let u: Vec<String> = unexpected
            .iter()
            .map(|k| format!("`{}`", crate::util::quote_for_message(k)))
            .collect();
        parts.push(format!("unexpected keys: {}", list(&u)));
    }
    Err(parts.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_reports_problems_by_name() {
        let spec = crate::spec::variant("b0").unwrap();
        let mut tensors = TensorMap::new();
        for k in layout::key_map(&spec, Layout::Timm).unwrap() {
            let n = k.shape.iter().product();
            tensors.insert(
                k.source,
                RawTensor {
                    shape: k.shape,
                    data: vec![0.0; n],
                    integer: false,
                },
            );
        }
        assert!(map_tensors(&spec, Layout::Timm, &tensors).is_ok());
        assert_eq!(
            infer_model(&tensors, Layout::Timm).unwrap().name,
            "efficientnet-b0"
        );
        tensors.remove("blocks.0.0.conv_dw.weight");
        tensors.insert(
            "extra.weight".into(),
            RawTensor {
                shape: vec![1],
                data: vec![0.0],
                integer: false,
            },
        );
        tensors.get_mut("conv_head.weight").unwrap().shape = vec![1280, 320, 3, 3];
        let err = map_tensors(&spec, Layout::Timm, &tensors).unwrap_err();
        assert!(err.contains("`blocks.0.0.conv_dw.weight`"), "{err}");
        assert!(err.contains("`extra.weight`"), "{err}");
        assert!(
            err.contains("`conv_head.weight` is [1280, 320, 3, 3], expected [1280, 320, 1, 1]"),
            "{err}"
        );
    }
}
