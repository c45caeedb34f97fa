//! Compiling a weight set into an inference plan, once: batch norm folded into each convolution,
//! weights repacked for the kernel that runs them, and each block turned into a fixed list of
//! steps that names the buffer every step reads and writes.

use crate::simd::gemm as microkernel;
use crate::simd::gemm_bf16::Weights as Bf16Weights;
use crate::simd::gemm_i8::Int8Weights;
use crate::spec::{Activation, BlockAnatomy, Conv as SpecConv};
use crate::weights::fold::{Folded, fold_batch_norm, tensor_values};
use crate::weights::{TensorMap, WeightSet};

use super::{EngineError, kernels, winograd};

/// How a convolution is computed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum ConvKind {
    /// 1x1, stride 1: one GEMM. Weight `[cin x cout]`.
    Pointwise,
    /// Depthwise kxk. Weight `[k*k x c]`.
    Depthwise,
    /// Dense kxk via im2col + GEMM. Weight `[k*k*cin x cout]`.
    Full,
}

/// A convolution with its BN folded in.
#[derive(Debug, Clone)]
pub(super) struct Conv {
    /// Weight path (`blocks.3.expand`), for `bench --profile`.
    pub name: String,
    pub kind: ConvKind,
    pub kernel: usize,
    pub stride: usize,
    pub cin: usize,
    pub cout: usize,
    pub weight: Vec<f32>,
    /// `weight` packed for the GEMM micro-kernel (empty for depthwise or without AVX2/AVX-512;
    /// when present, `weight` is empty).
    pub packed: Vec<f32>,
    /// `packed` in bf16 when the engine runs in bf16 (or in int8 on a CPU with bf16, for a layer
    /// kept out of int8; then the GEMM uses these), else none.
    pub bf16: Option<Bf16Weights>,
    /// The weights in int8 for the calibrated input grid (when the engine runs in int8 and this
    /// layer was not kept out of it; then the GEMM uses these).
    pub int8: Option<Int8Weights>,
    /// The 36 Winograd-transformed weight matrices, packed (stride-1 3x3 convs with the
    /// micro-kernel; empty otherwise). See [`super::winograd`].
    pub winograd: Vec<f32>,
    pub bias: Vec<f32>,
    pub act: Option<Activation>,
}

impl Conv {
    /// The weights in the layout the GEMM path reads.
    pub fn gemm_weight(&self) -> &[f32] {
        if self.packed.is_empty() {
            &self.weight
        } else {
            &self.packed
        }
    }

    /// Rows of the GEMM weight (`k * k * cin`; GEMM convolutions are not grouped).
    pub fn gemm_rows(&self) -> usize {
        self.kernel * self.kernel * self.cin
    }

    /// Whether the GEMM scales its input by an SE gate as it converts it (bf16, int8: no gated copy
    /// needed).
    pub fn takes_gate(&self) -> bool {
        self.bf16.is_some() || self.int8.is_some()
    }

    /// Writes [`Conv::gemm_weight`] with row `kk` scaled by `gates[kk]` into `dst` (same layout).
    pub fn gated_weight(&self, gates: &[f32], dst: &mut [f32]) {
        let chunk = if self.packed.is_empty() {
            self.cout
        } else {
            microkernel::group_width()
        };
        kernels::scale_chunks_from(dst, self.gemm_weight(), gates, chunk);
    }
}

/// Squeeze-excite: channel means -> reduce (+ activation) -> expand -> sigmoid gates.
#[derive(Debug, Clone)]
pub(super) struct Se {
    pub name: String,
    pub channels: usize,
    pub reduced: usize,
    pub w1: Vec<f32>,
    pub b1: Vec<f32>,
    pub w2: Vec<f32>,
    pub b2: Vec<f32>,
    pub act: Activation,
}

/// The activation buffers of a block: its input `X`, two scratch tensors, its output `Y`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Buf {
    X = 0,
    T1 = 1,
    T2 = 2,
    Y = 3,
}

/// One step of a block, with the buffers it reads and writes.
#[derive(Debug, Clone)]
pub(super) enum Step {
    /// 1x1 expansion then depthwise conv, X -> T2: per band of rows with the expanded rows kept
    /// in cache where that pays (decided per call from batch, map height and threads), else as
    /// two convolutions through T1. With `pool`, the depthwise conv also sums each channel for
    /// the SE that follows.
    ExpandDepthwise { expand: Conv, dw: Conv, pool: bool },
    /// One convolution `from` -> `to` (`pool` as above, depthwise only).
    Conv {
        conv: Conv,
        from: Buf,
        to: Buf,
        pool: bool,
    },
    /// SE gates applied in place to `on` (a block with no projection after its SE).
    Se { se: Se, on: Buf },
    /// 1x1 projection `from` -> Y, gated by the SE first when there is one, plus X when the block
    /// is residual.
    Project {
        conv: Conv,
        from: Buf,
        se: Option<Se>,
        residual: bool,
    },
    /// Y += X (a residual block whose last convolution wrote Y).
    AddInput,
}

/// A compiled block.
#[derive(Debug, Clone)]
pub(super) struct BlockPlan {
    pub steps: Vec<Step>,
    pub cin: usize,
    pub cout: usize,
}

/// A compiled network.
#[derive(Debug, Clone)]
pub(super) struct Plan {
    pub stem: Conv,
    /// The stem's weights as `[(ci, ky, kx) x cout]` for [`kernels::planar_conv`] (empty where
    /// its output channels are not a multiple of 8: those stems run by im2col + GEMM).
    pub stem_planar: Vec<f32>,
    /// The stem's int8 weights as [`crate::simd::gemm_i8::planar_quads`] for its int8 planar
    /// kernel (empty unless the stem is in int8 and that kernel runs here).
    pub stem_quads: Vec<u32>,
    pub blocks: Vec<BlockPlan>,
    pub head: Conv,
    /// The classifier as a 1x1 convolution of the pooled features: a GEMM like the others (its
    /// packed weights stream from memory in one contiguous run per panel), never int8.
    pub classifier: Conv,
}

/// The GEMM convolutions among `stem`, `blocks` and `head`, in network order.
fn gemm_convs<'a>(
    stem: &'a mut Conv,
    blocks: &'a mut [BlockPlan],
    head: &'a mut Conv,
) -> impl Iterator<Item = &'a mut Conv> {
    let blocks = blocks.iter_mut().flat_map(|b| {
        b.steps.iter_mut().flat_map(|s| match s {
            Step::ExpandDepthwise { expand, dw, .. } => vec![expand, dw],
            Step::Conv { conv, .. } | Step::Project { conv, .. } => vec![conv],
            _ => vec![],
        })
    });
    std::iter::once(stem)
        .chain(blocks)
        .chain(std::iter::once(head))
        .filter(|c| c.kind != ConvKind::Depthwise)
}

impl Plan {
    /// Sets [`Plan::stem_quads`] from the stem's int8 weights, if any.
    pub fn refresh_stem_quads(&mut self) {
        let stem = &self.stem;
        self.stem_quads = match &stem.int8 {
            Some(w) if stem.kind == ConvKind::Full && stem.kernel == 3 => {
                crate::simd::gemm_i8::planar_quads(w, stem.cin, stem.cout)
            }
            _ => Vec::new(),
        };
    }

    /// Every GEMM convolution (stem, 1x1 and full 3x3 convs, head): what int8 quantises.
    pub fn gemm_convs_mut(&mut self) -> impl Iterator<Item = &mut Conv> {
        gemm_convs(&mut self.stem, &mut self.blocks, &mut self.head)
    }

    /// Every convolution in the order a pass runs them, the classifier last.
    pub fn convs(&self) -> impl Iterator<Item = &Conv> {
        let blocks = self.blocks.iter().flat_map(|b| {
            b.steps.iter().flat_map(|s| match s {
                Step::ExpandDepthwise { expand, dw, .. } => vec![expand, dw],
                Step::Conv { conv, .. } | Step::Project { conv, .. } => vec![conv],
                _ => vec![],
            })
        });
        std::iter::once(&self.stem)
            .chain(blocks)
            .chain([&self.head, &self.classifier])
    }

    /// Every GEMM convolution and the classifier: what bf16 runs.
    pub fn bf16_gemms_mut(&mut self) -> impl Iterator<Item = &mut Conv> {
        let Plan {
            stem,
            blocks,
            head,
            classifier,
            ..
        } = self;
        gemm_convs(stem, blocks, head).chain(std::iter::once(classifier))
    }
}

/// Tensor `name` with `len` values.
fn tensor<'a>(t: &'a TensorMap, name: &str, len: usize) -> Result<&'a [f32], EngineError> {
    tensor_values(t, name, len).map_err(|e| EngineError(e.to_string()))
}

/// Folds `{path}.bn` into `{path}.conv` and repacks the weight for the kind of convolution.
fn fold(
    t: &TensorMap,
    spec_conv: &SpecConv,
    eps: f64,
    act: Option<Activation>,
) -> Result<Conv, EngineError> {
    Ok(pack(spec_conv, folded(t, spec_conv, eps)?, act))
}

/// `{path}.bn` folded into `{path}.conv`: OIHW weights and a bias.
fn folded(t: &TensorMap, spec_conv: &SpecConv, eps: f64) -> Result<Folded, EngineError> {
    fold_batch_norm(t, spec_conv, eps).map_err(|e| EngineError(e.to_string()))
}

/// How the engine runs `spec_conv`.
fn kind(spec_conv: &SpecConv) -> ConvKind {
    if spec_conv.is_depthwise() {
        ConvKind::Depthwise
    } else if spec_conv.kernel == 1 && spec_conv.stride == 1 {
        ConvKind::Pointwise
    } else {
        ConvKind::Full
    }
}

/// Repacks folded weights for the kind of convolution.
fn pack(spec_conv: &SpecConv, folded: Folded, act: Option<Activation>) -> Conv {
    let path = &spec_conv.path;
    let kind = kind(spec_conv);
    let Folded { weight: w, bias } = folded;
    let (cout, k) = (spec_conv.out_channels, spec_conv.kernel);
    let cin_g = spec_conv.in_channels / spec_conv.groups;
    // One repacking serves all three kinds: `[k*k*cin_g x cout]` rows ordered (tap, input channel).
    // For 1x1 that is `[cin x cout]`; for depthwise (cin_g = 1) it is `[k*k x c]`.
    let kk = k * k;
    let mut weight = vec![0.0; kk * cin_g * cout];
    for o in 0..cout {
        for i in 0..cin_g {
            for tap in 0..kk {
                weight[(tap * cin_g + i) * cout + o] = w[(o * cin_g + i) * kk + tap];
            }
        }
    }
    let cin = spec_conv.in_channels;
    let packed = if kind != ConvKind::Depthwise && microkernel::available() {
        microkernel::pack(&weight, kk * cin_g, cout)
    } else {
        Vec::new()
    };
    let winograd = if winograd::applies(kind, k, spec_conv.stride) {
        winograd::transform_weights(&weight, cin, cout)
    } else {
        Vec::new()
    };
    // Keep one copy: the packed weights replace the plain ones.
    let weight = if packed.is_empty() {
        weight
    } else {
        Vec::new()
    };
    Conv {
        name: path.to_string(),
        kind,
        kernel: k,
        stride: spec_conv.stride,
        cin,
        cout,
        weight,
        packed,
        bf16: None,
        int8: None,
        winograd,
        bias,
        act,
    }
}

/// A dense conv's folded OIHW weights as `[(ci, ky, kx) x cout]`, the planes of
/// [`kernels::planar_conv`]; empty where that kernel does not apply.
fn planar_weights(spec_conv: &SpecConv, w: &[f32]) -> Vec<f32> {
    let cout = spec_conv.out_channels;
    if kind(spec_conv) != ConvKind::Full || !cout.is_multiple_of(8) {
        return Vec::new();
    }
    // OIHW is `[cout x (ci, ky, kx)]`.
    transpose_dense(w, cout)
}

/// `[out, in, 1, 1]` (or `[out, in]`, or any `[out x rest]`) to `[in x out]`.
fn transpose_dense(w: &[f32], out: usize) -> Vec<f32> {
    let inp = w.len() / out;
    let mut p = vec![0.0; w.len()];
    for o in 0..out {
        for i in 0..inp {
            p[i * out + o] = w[o * inp + i];
        }
    }
    p
}

/// The steps of one block, each reading and writing named buffers.
fn block_steps(
    t: &TensorMap,
    b: &BlockAnatomy,
    conv: &dyn Fn(&SpecConv) -> Result<Conv, EngineError>,
    act: Activation,
) -> Result<BlockPlan, EngineError> {
    let se = match &b.se {
        Some([reduce, expand]) => {
            let (c, r) = (expand.out_channels, reduce.out_channels);
            let w1 = tensor(t, &format!("{}.weight", reduce.path), c * r)?;
            let w2 = tensor(t, &format!("{}.weight", expand.path), c * r)?;
            Some(Se {
                name: format!("blocks.{}.se", b.pos.index),
                channels: c,
                reduced: r,
                w1: transpose_dense(w1, r),
                b1: tensor(t, &format!("{}.bias", reduce.path), r)?.to_vec(),
                w2: transpose_dense(w2, c),
                b2: tensor(t, &format!("{}.bias", expand.path), c)?.to_vec(),
                act,
            })
        }
        None => None,
    };
    let pool = se.is_some();
    let project = b.project.as_ref().map(conv).transpose()?;
    let mut steps = Vec::new();
    // Where the tensor the SE and the projection read ends up.
    let mid = match (
        b.expand.as_ref().map(conv).transpose()?,
        b.depthwise.as_ref(),
    ) {
        (Some(expand), Some(dw)) if expand.kind == ConvKind::Pointwise => {
            let dw = conv(dw)?;
            steps.push(Step::ExpandDepthwise { expand, dw, pool });
            Buf::T2
        }
        (expand, Some(dw)) => {
            let from = match expand {
                Some(expand) => {
                    steps.push(Step::Conv {
                        conv: expand,
                        from: Buf::X,
                        to: Buf::T1,
                        pool: false,
                    });
                    Buf::T1
                }
                None => Buf::X,
            };
            let dw = conv(dw)?;
            steps.push(Step::Conv {
                conv: dw,
                from,
                to: Buf::T2,
                pool,
            });
            Buf::T2
        }
        // Fused-MBConv: the kxk conv writes the block output directly when it is the whole block.
        (Some(expand), None) => {
            let to = if project.is_some() { Buf::T1 } else { Buf::Y };
            steps.push(Step::Conv {
                conv: expand,
                from: Buf::X,
                to,
                pool: false,
            });
            to
        }
        (None, None) => {
            return Err(EngineError(format!(
                "block {} has no convolution",
                b.pos.index
            )));
        }
    };
    let residual = b.layer.residual;
    match project {
        Some(conv) => steps.push(Step::Project {
            conv,
            from: mid,
            se,
            residual,
        }),
        None => {
            if let Some(se) = se {
                steps.push(Step::Se { se, on: mid });
            }
            if residual {
                steps.push(Step::AddInput);
            }
        }
    }
    Ok(BlockPlan {
        steps,
        cin: b.layer.in_channels,
        cout: b.layer.out_channels,
    })
}

impl Plan {
    /// Compiles `set`'s canonical tensors for its spec.
    pub fn compile(set: &WeightSet) -> Result<Self, EngineError> {
        let spec = set.spec();
        let t = &set.tensors;
        let anatomy = spec.anatomy();
        let act = |c: &SpecConv| c.act.then_some(spec.activation);
        let conv = |c: &SpecConv| fold(t, c, spec.bn_eps, act(c));
        let blocks = anatomy
            .blocks
            .iter()
            .map(|b| block_steps(t, b, &conv, spec.activation))
            .collect::<Result<Vec<_>, _>>()?;
        let fc = &anatomy.classifier;
        let (classes, features) = (fc.out_channels, fc.in_channels);
        let fc_folded = Folded {
            weight: tensor(t, "classifier.weight", classes * features)?.to_vec(),
            bias: tensor(t, "classifier.bias", classes)?.to_vec(),
        };
        let stem_folded = folded(t, &anatomy.stem, spec.bn_eps)?;
        let stem_planar = planar_weights(&anatomy.stem, &stem_folded.weight);
        Ok(Plan {
            stem: pack(&anatomy.stem, stem_folded, act(&anatomy.stem)),
            stem_planar,
            stem_quads: Vec::new(),
            blocks,
            head: conv(&anatomy.head)?,
            classifier: pack(fc, fc_folded, None),
        })
    }
}
