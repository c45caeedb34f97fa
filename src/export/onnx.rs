//! An ONNX graph written from the spec's anatomy and the weights (no tracing): batch norm folded
//! into each convolution, TF "SAME" padding computed for the export resolution, SiLU as
//! `x * Sigmoid(x)`, ReLU6 as `Clip(0, 6)`, and the checkpoint's preprocessing and class names in
//! `metadata_props`. Weights from `effnet quantize` export as QDQ: each int8 convolution reads its
//! input through QuantizeLinear/DequantizeLinear on its calibrated uint8 grid and its weights as
//! int8 per output channel through DequantizeLinear, the engine's int8 arithmetic in ONNX's terms.

use prost::Message;

use super::proto::*;
use crate::simd::gemm_i8::{ActQuant, channel_scale, quantize_weight, rounding_error};
use crate::spec::{Activation, Conv, ModelSpec};
use crate::weights::WeightSet;
use crate::weights::fold::{fold_batch_norm, tensor_values};

/// Opsets the exporter writes (Clip takes its bounds as inputs from 11; 13 is the oldest the graph
/// is checked against).
pub const OPSETS: std::ops::RangeInclusive<i64> = 13..=21;

/// How to export.
#[derive(Debug, Clone)]
pub struct OnnxOptions {
    /// Input side in pixels (TF "SAME" padding depends on it).
    pub resolution: usize,
    /// A symbolic batch dimension `N` instead of 1.
    pub dynamic_batch: bool,
    pub opset: i64,
}

#[derive(Debug, thiserror::Error)]
pub enum ExportError {
    #[error("--opset {0} is not supported; choose {min} to {max}", min = OPSETS.start(), max = OPSETS.end())]
    Opset(i64),
    #[error(
        "--resolution {0} is too small for this network (at least 1 pixel must reach the head)"
    )]
    Resolution(usize),
    #[error(transparent)]
    Weights(#[from] crate::weights::WeightError),
}

/// Builds nodes and initializers with unique value names.
struct Graph<'a> {
    spec: &'a ModelSpec,
    set: &'a WeightSet,
    nodes: Vec<NodeProto>,
    inits: Vec<TensorProto>,
    /// Input ranges and means of the convolutions that run in int8, by weight path.
    int8: std::collections::HashMap<String, ((f32, f32), Vec<f32>)>,
}

fn ints(name: &str, v: &[usize]) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: ATTR_INTS,
        ints: v.iter().map(|&x| x as i64).collect(),
        ..Default::default()
    }
}

fn int(name: &str, v: i64) -> AttributeProto {
    AttributeProto {
        name: name.into(),
        r#type: ATTR_INT,
        i: v,
        ..Default::default()
    }
}

fn tensor_type(dims: Vec<Dimension>) -> Option<TypeProto> {
    Some(TypeProto {
        tensor_type: Some(TensorTypeProto {
            elem_type: FLOAT,
            shape: Some(TensorShapeProto { dim: dims }),
        }),
    })
}

fn fixed(v: usize) -> Dimension {
    Dimension {
        dim_value: Some(v as i64),
        dim_param: None,
    }
}

impl Graph<'_> {
    fn init(&mut self, name: String, dims: &[usize], values: &[f32]) -> String {
        let bytes = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        self.init_raw(name, dims, FLOAT, bytes)
    }

    fn init_raw(&mut self, name: String, dims: &[usize], data_type: i32, raw: Vec<u8>) -> String {
        self.inits.push(TensorProto {
            dims: dims.iter().map(|&d| d as i64).collect(),
            data_type,
            name: name.clone(),
            raw_data: raw,
        });
        name
    }

    /// `x` through QuantizeLinear/DequantizeLinear on the uint8 grid covering `lo..hi`.
    fn fake_quantize(&mut self, x: &str, path: &str, (lo, hi): (f32, f32)) -> String {
        let grid = ActQuant::covering(lo, hi);
        let s = self.init(format!("{path}.input_scale"), &[], &[grid.scale]);
        let z = self.init_raw(
            format!("{path}.input_zero"),
            &[],
            UINT8,
            vec![grid.zero as u8],
        );
        let q = self.node(
            "QuantizeLinear",
            &[x, &s, &z],
            &format!("{path}.input_q"),
            vec![],
        );
        self.node(
            "DequantizeLinear",
            &[&q, &s, &z],
            &format!("{path}.input_dq"),
            vec![],
        )
    }

    /// `weight` (`[cout x cin x k x k]`) as int8 per output channel through DequantizeLinear,
    /// with `bias` corrected for the rounding on inputs of mean `mean` (the engine's GEMM row
    /// order, `tap * cin + channel`; empty: none), as the int8 engine does.
    fn int8_weight(
        &mut self,
        weight: &[f32],
        shape: &[usize],
        path: &str,
        (mean, bias): (&[f32], &mut [f32]),
    ) -> String {
        let (cout, cin, taps) = (shape[0], shape[1], shape[2] * shape[3]);
        let per = weight.len() / cout;
        let (mut q, mut scales) = (Vec::with_capacity(weight.len()), Vec::with_capacity(cout));
        for (row, b) in weight.chunks_exact(per).zip(bias.iter_mut()) {
            let s = channel_scale(row.iter().fold(0.0f32, |m, w| m.max(w.abs())));
            q.extend(row.iter().map(|&w| quantize_weight(w, s) as u8));
            scales.push(s);
            if !mean.is_empty() {
                let mut shift = 0.0f64;
                for (at, &w) in row.iter().enumerate() {
                    let (i, tap) = (at / taps, at % taps);
                    shift += rounding_error(w, s) * mean[tap * cin + i] as f64;
                }
                *b -= shift as f32;
            }
        }
        let wq = self.init_raw(format!("{path}.weight_q"), shape, INT8, q);
        let ws = self.init(format!("{path}.weight_scale"), &[cout], &scales);
        let wz = self.init_raw(format!("{path}.weight_zero"), &[cout], INT8, vec![0; cout]);
        self.node(
            "DequantizeLinear",
            &[&wq, &ws, &wz],
            &format!("{path}.weight_dq"),
            vec![int("axis", 0)],
        )
    }

    fn node(
        &mut self,
        op: &str,
        inputs: &[&str],
        name: &str,
        attrs: Vec<AttributeProto>,
    ) -> String {
        self.nodes.push(NodeProto {
            input: inputs.iter().map(|s| s.to_string()).collect(),
            output: vec![name.to_string()],
            name: name.to_string(),
            op_type: op.into(),
            attribute: attrs,
        });
        name.to_string()
    }

    /// The model's activation on `x`.
    fn act(&mut self, x: &str, name: &str) -> String {
        match self.spec.activation {
            Activation::Silu => {
                let s = self.node("Sigmoid", &[x], &format!("{name}.sigmoid"), vec![]);
                self.node("Mul", &[x, &s], &format!("{name}.silu"), vec![])
            }
            Activation::Relu6 => self.node(
                "Clip",
                &[x, "relu6.min", "relu6.max"],
                &format!("{name}.relu6"),
                vec![],
            ),
        }
    }

    /// A convolution with its batch norm folded (or its own bias, for SE), on an `h x w` input;
    /// returns the output name and spatial size.
    fn conv(
        &mut self,
        x: &str,
        c: &Conv,
        (h, w): (usize, usize),
    ) -> Result<(String, (usize, usize)), ExportError> {
        let (weight, bias) = if c.has_bn() {
            let f = fold_batch_norm(&self.set.tensors, c, self.spec.bn_eps)?;
            (f.weight, f.bias)
        } else {
            let shape = c.weight_shape();
            let t = &self.set.tensors;
            (
                tensor_values(t, &format!("{}.weight", c.path), shape.iter().product())?.to_vec(),
                tensor_values(t, &format!("{}.bias", c.path), c.out_channels)?.to_vec(),
            )
        };
        let mut bias = bias;
        let (x, wn) = match self.int8.get(&c.path).cloned() {
            Some((range, mean)) => (
                self.fake_quantize(x, &c.path, range),
                self.int8_weight(&weight, &c.weight_shape(), &c.path, (&mean, &mut bias)),
            ),
            None => (
                x.to_string(),
                self.init(format!("{}.weight", c.path), &c.weight_shape(), &weight),
            ),
        };
        let x = x.as_str();
        let bn = self.init(format!("{}.bias", c.path), &[c.out_channels], &bias);
        let (oh, top, bottom) = self.spec.padding.along(h, c.kernel, c.stride);
        let (ow, left, right) = self.spec.padding.along(w, c.kernel, c.stride);
        let out = self.node(
            "Conv",
            &[x, &wn, &bn],
            &c.path,
            vec![
                ints("kernel_shape", &[c.kernel, c.kernel]),
                ints("strides", &[c.stride, c.stride]),
                ints("pads", &[top, left, bottom, right]),
                ints("dilations", &[1, 1]),
                int("group", c.groups as i64),
            ],
        );
        let out = if c.act { self.act(&out, &c.path) } else { out };
        Ok((out, (oh, ow)))
    }
}

/// The ONNX model (serialised) of `set` at `opts.resolution`.
pub fn to_onnx(set: &WeightSet, opts: &OnnxOptions) -> Result<Vec<u8>, ExportError> {
    if !OPSETS.contains(&opts.opset) {
        return Err(ExportError::Opset(opts.opset));
    }
    let spec = set.spec();
    let r = opts.resolution;
    if r == 0 || r > crate::spec::MAX_RESOLUTION {
        return Err(ExportError::Resolution(r));
    }
    let anatomy = spec.anatomy();
    let int8 = set.meta.quantization.iter().flat_map(|q| &q.layers);
    let mut g = Graph {
        spec,
        set,
        nodes: Vec::new(),
        inits: Vec::new(),
        int8: int8
            .filter(|l| l.int8)
            .map(|l| (l.name.clone(), ((l.lo, l.hi), l.input_mean.clone())))
            .collect(),
    };
    if spec.activation == Activation::Relu6 {
        g.init("relu6.min".into(), &[], &[0.0]);
        g.init("relu6.max".into(), &[], &[6.0]);
    }
    let (mut x, mut hw) = g.conv("input", &anatomy.stem, (r, r))?;
    for b in &anatomy.blocks {
        let input = x.clone();
        let mut y = x.clone();
        for c in b.expand.iter().chain(&b.depthwise) {
            (y, hw) = g.conv(&y, c, hw)?;
        }
        if let Some([reduce, expand]) = &b.se {
            let name = format!("blocks.{}.se", b.pos.index);
            let pooled = g.node("GlobalAveragePool", &[&y], &format!("{name}.pool"), vec![]);
            // The reduce conv carries the model's activation; the gates are a sigmoid.
            let (s, _) = g.conv(&pooled, reduce, (1, 1))?;
            let (s, _) = g.conv(&s, expand, (1, 1))?;
            let gates = g.node("Sigmoid", &[&s], &format!("{name}.gates"), vec![]);
            y = g.node("Mul", &[&y, &gates], &format!("{name}.out"), vec![]);
        }
        if let Some(p) = &b.project {
            (y, hw) = g.conv(&y, p, hw)?;
        }
        if b.layer.residual {
            y = g.node(
                "Add",
                &[&y, &input],
                &format!("blocks.{}.residual", b.pos.index),
                vec![],
            );
        }
        x = y;
    }
    let (x, _) = g.conv(&x, &anatomy.head, hw)?;
    let pooled = g.node("GlobalAveragePool", &[&x], "pool", vec![]);
    let flat = g.node("Flatten", &[&pooled], "features", vec![int("axis", 1)]);
    let fc = &anatomy.classifier;
    let t = &set.tensors;
    let fw = tensor_values(t, "classifier.weight", fc.out_channels * fc.in_channels)?.to_vec();
    let fb = tensor_values(t, "classifier.bias", fc.out_channels)?.to_vec();
    let fw = g.init(
        "classifier.weight".into(),
        &[fc.out_channels, fc.in_channels],
        &fw,
    );
    let fb = g.init("classifier.bias".into(), &[fc.out_channels], &fb);
    g.node("Gemm", &[&flat, &fw, &fb], "logits", vec![int("transB", 1)]);
    let batch = if opts.dynamic_batch {
        Dimension {
            dim_value: None,
            dim_param: Some("N".into()),
        }
    } else {
        fixed(1)
    };
    let meta = &set.meta;
    let p = &meta.preprocess;
    let props = [
        ("effnet.model", spec.name.clone()),
        (
            "effnet.spec",
            serde_json::to_string(spec).unwrap_or_default(),
        ),
        (
            "effnet.preprocess",
            serde_json::to_string(p).unwrap_or_default(),
        ),
        ("mean", format!("{:?}", p.mean)),
        ("std", format!("{:?}", p.std)),
        ("resize", p.resize.to_string()),
        ("crop", p.crop.to_string()),
        (
            "interpolation",
            format!("{:?}", p.interpolation).to_lowercase(),
        ),
        (
            "class_names",
            serde_json::to_string(&meta.labels()).unwrap_or_default(),
        ),
    ];
    let model = ModelProto {
        ir_version: 8,
        opset_import: vec![OperatorSetIdProto {
            domain: String::new(),
            version: opts.opset,
        }],
        producer_name: "effnet".into(),
        producer_version: crate::study::COMMIT.into(),
        doc_string: format!(
            "{} at {r}x{r}, exported from its spec and weights",
            spec.name
        ),
        graph: Some(GraphProto {
            node: g.nodes,
            name: spec.name.clone(),
            initializer: g.inits,
            input: vec![ValueInfoProto {
                name: "input".into(),
                r#type: tensor_type(vec![batch.clone(), fixed(3), fixed(r), fixed(r)]),
            }],
            output: vec![ValueInfoProto {
                name: "logits".into(),
                r#type: tensor_type(vec![batch, fixed(spec.num_classes)]),
            }],
        }),
        metadata_props: props
            .into_iter()
            .map(|(k, v)| StringStringEntryProto {
                key: k.into(),
                value: v,
            })
            .collect(),
    };
    Ok(model.encode_to_vec())
}
