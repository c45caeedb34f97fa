//! Checkpoint key layouts (torchvision, timm, lukemelas, and this crate's own) mapped explicitly to
//! the canonical names, plus the metadata each source's weights need (padding, BN eps, preprocessing).
//!
//! Canonical names are the burn model's module paths with PyTorch tensor names:
//! `stem.conv.weight`, `stem.bn.{weight,bias,running_mean,running_var}`,
//! `blocks.{i}.{expand,dw,project}.{conv,bn}.*`, `blocks.{i}.se.{reduce,expand}.{weight,bias}`,
//! `head.{conv,bn}.*`, `classifier.{weight,bias}` (PyTorch `[out, in]` orientation).

use std::fmt;

use crate::spec::{BlockKind, Family, LayerSpec, ModelSpec, Padding};

use super::meta::{Interpolation, Preprocess, WeightMeta};

/// Where a state dict's key names come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Layout {
    Torchvision,
    Timm,
    Lukemelas,
    /// This crate's canonical names (its own safetensors files).
    Effnet,
}

impl fmt::Display for Layout {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Layout::Torchvision => "torchvision",
            Layout::Timm => "timm",
            Layout::Lukemelas => "lukemelas",
            Layout::Effnet => "effnet",
        })
    }
}

impl Layout {
    /// Guesses the layout from the stem's key name.
    pub fn detect<'a>(mut keys: impl Iterator<Item = &'a str>) -> Option<Self> {
        keys.find_map(|k| match k {
            "features.0.0.weight" => Some(Layout::Torchvision),
            "conv_stem.weight" => Some(Layout::Timm),
            "_conv_stem.weight" => Some(Layout::Lukemelas),
            "stem.conv.weight" => Some(Layout::Effnet),
            _ => None,
        })
    }
}

/// What a parameterised unit does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UnitKind {
    Stem,
    Expand,
    Depthwise,
    SeReduce,
    SeExpand,
    Project,
    Head,
    Classifier,
}

/// A conv (or linear) with its optional BN, in canonical naming, with its PyTorch weight shape.
#[derive(Debug, Clone)]
pub struct Unit {
    pub kind: UnitKind,
    /// Block index, stage and index within the stage.
    pub block: Option<(usize, usize, usize)>,
    pub conv: String,
    pub bn: Option<String>,
    pub weight_shape: Vec<usize>,
    pub bias: bool,
}

/// Every parameterised unit of `spec`, in forward order.
pub fn units(spec: &ModelSpec) -> Vec<Unit> {
    let conv_bn = |kind, block, path: String, shape: Vec<usize>| Unit {
        kind,
        block,
        conv: format!("{path}.conv"),
        bn: Some(format!("{path}.bn")),
        weight_shape: shape,
        bias: false,
    };
    let mut out = vec![conv_bn(
        UnitKind::Stem,
        None,
        "stem".into(),
        vec![spec.stem_channels(), 3, 3, 3],
    )];
    let mut position = (usize::MAX, 0);
    for (i, l) in spec.layers().iter().enumerate() {
        position = if position.0 == l.stage {
            (l.stage, position.1 + 1)
        } else {
            (l.stage, 0)
        };
        let b = Some((i, position.0, position.1));
        let p = format!("blocks.{i}");
        let (k, cin, mid, cout) = (l.kernel, l.in_channels, l.mid_channels, l.out_channels);
        let se = |out: &mut Vec<Unit>, channels: usize, l: &LayerSpec| {
            if let Some(r) = l.se_channels {
                for (kind, name, shape) in [
                    (UnitKind::SeReduce, "reduce", vec![r, channels, 1, 1]),
                    (UnitKind::SeExpand, "expand", vec![channels, r, 1, 1]),
                ] {
                    out.push(Unit {
                        kind,
                        block: b,
                        conv: format!("{p}.se.{name}"),
                        bn: None,
                        weight_shape: shape,
                        bias: true,
                    });
                }
            }
        };
        match (l.kind, l.expand_ratio) {
            (BlockKind::MbConv, e) => {
                if e != 1 {
                    out.push(conv_bn(
                        UnitKind::Expand,
                        b,
                        format!("{p}.expand"),
                        vec![mid, cin, 1, 1],
                    ));
                }
                out.push(conv_bn(
                    UnitKind::Depthwise,
                    b,
                    format!("{p}.dw"),
                    vec![mid, 1, k, k],
                ));
                se(&mut out, mid, l);
                out.push(conv_bn(
                    UnitKind::Project,
                    b,
                    format!("{p}.project"),
                    vec![cout, mid, 1, 1],
                ));
            }
            (BlockKind::FusedMbConv, 1) => {
                out.push(conv_bn(
                    UnitKind::Expand,
                    b,
                    format!("{p}.expand"),
                    vec![cout, cin, k, k],
                ));
                se(&mut out, cout, l);
            }
            (BlockKind::FusedMbConv, _) => {
                out.push(conv_bn(
                    UnitKind::Expand,
                    b,
                    format!("{p}.expand"),
                    vec![mid, cin, k, k],
                ));
                se(&mut out, mid, l);
                out.push(conv_bn(
                    UnitKind::Project,
                    b,
                    format!("{p}.project"),
                    vec![cout, mid, 1, 1],
                ));
            }
        }
    }
    out.push(conv_bn(
        UnitKind::Head,
        None,
        "head".into(),
        vec![spec.head_channels(), spec.body_channels(), 1, 1],
    ));
    out.push(Unit {
        kind: UnitKind::Classifier,
        block: None,
        conv: "classifier".into(),
        bn: None,
        weight_shape: vec![spec.num_classes, spec.head_channels()],
        bias: true,
    });
    out
}

/// One tensor: canonical name, name in the checkpoint, expected shape.
#[derive(Debug, Clone)]
pub struct KeyMap {
    pub canonical: String,
    pub source: String,
    pub shape: Vec<usize>,
}

/// The explicit key mapping of `layout` for `spec`.
pub fn key_map(spec: &ModelSpec, layout: Layout) -> Result<Vec<KeyMap>, String> {
    if layout == Layout::Lukemelas && spec.family == Family::V2 {
        return Err(
            "the lukemelas EfficientNet-PyTorch layout has no EfficientNetV2 models".into(),
        );
    }
    let layers = spec.layers();
    let stages = spec.blocks.len();
    let mut out = Vec::new();
    for unit in units(spec) {
        let (conv, bn) = source_names(layout, &unit, &layers, stages);
        let mut push = |canonical: String, source: String, shape: Vec<usize>| {
            out.push(KeyMap {
                canonical,
                source,
                shape,
            })
        };
        push(
            format!("{}.weight", unit.conv),
            format!("{conv}.weight"),
            unit.weight_shape.clone(),
        );
        if unit.bias {
            push(
                format!("{}.bias", unit.conv),
                format!("{conv}.bias"),
                vec![unit.weight_shape[0]],
            );
        }
        if let (Some(canon_bn), Some(bn)) = (&unit.bn, bn) {
            for t in ["weight", "bias", "running_mean", "running_var"] {
                push(
                    format!("{canon_bn}.{t}"),
                    format!("{bn}.{t}"),
                    vec![unit.weight_shape[0]],
                );
            }
        }
    }
    Ok(out)
}

/// (conv/linear module name, BN module name) of `unit` in `layout`.
fn source_names(
    layout: Layout,
    unit: &Unit,
    layers: &[LayerSpec],
    stages: usize,
) -> (String, Option<String>) {
    use UnitKind::*;
    let pair = |c: String, b: String| (c, Some(b));
    let se = |prefix: &str, reduce: &str, expand: &str| {
        let name = if unit.kind == SeReduce {
            reduce
        } else {
            expand
        };
        (format!("{prefix}{name}"), None)
    };
    match layout {
        Layout::Effnet => (unit.conv.clone(), unit.bn.clone()),
        Layout::Torchvision => match (unit.kind, unit.block) {
            (Stem, _) => pair("features.0.0".into(), "features.0.1".into()),
            (Head, _) => pair(
                format!("features.{}.0", stages + 1),
                format!("features.{}.1", stages + 1),
            ),
            (Classifier, _) => ("classifier.1".into(), None),
            (kind, Some((i, s, j))) => {
                // torchvision numbers a block's sub-layers in forward order: block.{k}.
                let l = &layers[i];
                let mut slots = Vec::new();
                if l.kind == BlockKind::FusedMbConv || l.expand_ratio != 1 {
                    slots.push(Expand);
                }
                if l.kind == BlockKind::MbConv {
                    slots.push(Depthwise);
                }
                if l.se_channels.is_some() {
                    slots.push(SeReduce);
                }
                if l.kind == BlockKind::MbConv || l.expand_ratio != 1 {
                    slots.push(Project);
                }
                let slot_of = |k| if k == SeExpand { SeReduce } else { k };
                let k = slots.iter().position(|&x| x == slot_of(kind)).unwrap_or(0);
                let base = format!("features.{}.{j}.block.{k}", s + 1);
                match kind {
                    SeReduce | SeExpand => se(&format!("{base}."), "fc1", "fc2"),
                    _ => pair(format!("{base}.0"), format!("{base}.1")),
                }
            }
            (_, None) => unreachable!("block units carry their position"),
        },
        Layout::Timm => match (unit.kind, unit.block) {
            (Stem, _) => pair("conv_stem".into(), "bn1".into()),
            (Head, _) => pair("conv_head".into(), "bn2".into()),
            (Classifier, _) => ("classifier".into(), None),
            (kind, Some((i, s, j))) => {
                let l = &layers[i];
                let b = format!("blocks.{s}.{j}");
                let fused = l.kind == BlockKind::FusedMbConv;
                let e1 = l.expand_ratio == 1;
                match kind {
                    SeReduce | SeExpand => se(&format!("{b}.se."), "conv_reduce", "conv_expand"),
                    // ConvBnAct (fused, e = 1), EdgeResidual (fused), InvertedResidual.
                    Expand if fused && e1 => pair(format!("{b}.conv"), format!("{b}.bn1")),
                    Expand if fused => pair(format!("{b}.conv_exp"), format!("{b}.bn1")),
                    Expand => pair(format!("{b}.conv_pw"), format!("{b}.bn1")),
                    Depthwise => pair(
                        format!("{b}.conv_dw"),
                        format!("{b}.bn{}", if e1 { 1 } else { 2 }),
                    ),
                    // DepthwiseSeparableConv (e = 1) calls its projection conv_pw / bn2.
                    Project if e1 => pair(format!("{b}.conv_pw"), format!("{b}.bn2")),
                    Project if fused => pair(format!("{b}.conv_pwl"), format!("{b}.bn2")),
                    _ => pair(format!("{b}.conv_pwl"), format!("{b}.bn3")),
                }
            }
            (_, None) => unreachable!("block units carry their position"),
        },
        Layout::Lukemelas => match (unit.kind, unit.block) {
            (Stem, _) => pair("_conv_stem".into(), "_bn0".into()),
            (Head, _) => pair("_conv_head".into(), "_bn1".into()),
            (Classifier, _) => ("_fc".into(), None),
            (kind, Some((i, _, _))) => {
                let b = format!("_blocks.{i}.");
                match kind {
                    Expand => pair(format!("{b}_expand_conv"), format!("{b}_bn0")),
                    Depthwise => pair(format!("{b}_depthwise_conv"), format!("{b}_bn1")),
                    SeReduce | SeExpand => se(&b, "_se_reduce", "_se_expand"),
                    _ => pair(format!("{b}_project_conv"), format!("{b}_bn2")),
                }
            }
            (_, None) => unreachable!("block units carry their position"),
        },
    }
}

const IMAGENET_MEAN: [f32; 3] = [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0];
const IMAGENET_STD: [f32; 3] = [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0];

/// The metadata weights from `layout` need when the file carries none of its own.
pub fn default_meta(spec: &ModelSpec, layout: Layout) -> WeightMeta {
    let crop = spec.resolution;
    let tf_crop = |crop: usize| (crop as f64 / 0.875).round() as usize;
    let lite = spec.family == Family::Lite;
    let (padding, bn_eps, resize, interpolation, mean, std) = match layout {
        Layout::Torchvision => {
            // torchvision's published transforms (resize, crop, interpolation) per weight enum.
            let (resize, crop_tv, interp) = match spec.name.as_str() {
                "efficientnet-b0" => (256, 224, Interpolation::Bicubic),
                "efficientnet-b1" => (255, 240, Interpolation::Bilinear),
                "efficientnet-b2" => (288, 288, Interpolation::Bicubic),
                "efficientnet-b3" => (320, 300, Interpolation::Bicubic),
                "efficientnet-b4" => (384, 380, Interpolation::Bicubic),
                "efficientnet-b5" => (456, 456, Interpolation::Bicubic),
                "efficientnet-b6" => (528, 528, Interpolation::Bicubic),
                "efficientnet-b7" => (600, 600, Interpolation::Bicubic),
                "efficientnetv2-s" => (384, 384, Interpolation::Bilinear),
                "efficientnetv2-m" => (480, 480, Interpolation::Bilinear),
                "efficientnetv2-l" => (480, 480, Interpolation::Bicubic),
                _ => (tf_crop(crop), crop, Interpolation::Bicubic),
            };
            let big = matches!(
                spec.name.as_str(),
                "efficientnet-b5" | "efficientnet-b6" | "efficientnet-b7"
            ) || spec.family == Family::V2;
            let eps = if big { 1e-3 } else { 1e-5 };
            return WeightMeta {
                model: spec.name.clone(),
                source: layout,
                padding: Padding::Symmetric,
                bn_eps: eps,
                num_classes: spec.num_classes,
                preprocess: Preprocess {
                    resize,
                    crop: crop_tv,
                    interpolation: interp,
                    mean: IMAGENET_MEAN,
                    std: IMAGENET_STD,
                },
            };
        }
        // timm's checkpoints: `tf_*` ports keep TF padding/eps; Lite ports use Inception mean/std.
        Layout::Timm if spec.padding == Padding::Same => (
            Padding::Same,
            1e-3,
            tf_crop(crop),
            Interpolation::Bicubic,
            if lite { [127.5; 3] } else { IMAGENET_MEAN },
            if lite { [127.5; 3] } else { IMAGENET_STD },
        ),
        Layout::Timm => (
            Padding::Symmetric,
            1e-5,
            tf_crop(crop),
            Interpolation::Bicubic,
            IMAGENET_MEAN,
            IMAGENET_STD,
        ),
        // lukemelas ports of the TF checkpoints; the Lite ports normalise as (x - 127) / 128.
        Layout::Lukemelas => (
            Padding::Same,
            1e-3,
            tf_crop(crop),
            Interpolation::Bicubic,
            if lite { [127.0; 3] } else { IMAGENET_MEAN },
            if lite { [128.0; 3] } else { IMAGENET_STD },
        ),
        Layout::Effnet => (
            spec.padding,
            spec.bn_eps,
            tf_crop(crop),
            Interpolation::Bicubic,
            if lite { [127.0; 3] } else { IMAGENET_MEAN },
            if lite { [128.0; 3] } else { IMAGENET_STD },
        ),
    };
    WeightMeta {
        model: spec.name.clone(),
        source: layout,
        padding,
        bn_eps,
        num_classes: spec.num_classes,
        preprocess: Preprocess {
            resize,
            crop,
            interpolation,
            mean,
            std,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::analysis::analyze;
    use crate::spec::{VARIANTS, variant};

    #[test]
    fn unit_shapes_add_up_to_the_analysis_params() {
        for v in VARIANTS {
            let spec = v.spec();
            let mapped: usize = key_map(&spec, Layout::Effnet)
                .unwrap()
                .iter()
                .filter(|k| {
                    !k.canonical.ends_with("running_mean") && !k.canonical.ends_with("running_var")
                })
                .map(|k| k.shape.iter().product::<usize>())
                .sum();
            assert_eq!(mapped as u64, analyze(&spec, 224).params, "{}", v.name);
        }
    }

    #[test]
    fn layouts_name_b0_and_v2_blocks_as_their_libraries_do() {
        let b0 = variant("b0").unwrap();
        let find = |layout, canonical: &str| {
            key_map(&b0, layout)
                .unwrap()
                .into_iter()
                .find(|k| k.canonical == canonical)
                .unwrap()
                .source
        };
        assert_eq!(
            find(Layout::Torchvision, "blocks.0.project.conv.weight"),
            "features.1.0.block.2.0.weight"
        );
        assert_eq!(
            find(Layout::Torchvision, "blocks.3.se.expand.bias"),
            "features.3.0.block.2.fc2.bias"
        );
        assert_eq!(
            find(Layout::Torchvision, "head.bn.running_var"),
            "features.8.1.running_var"
        );
        assert_eq!(
            find(Layout::Timm, "blocks.0.project.bn.weight"),
            "blocks.0.0.bn2.weight"
        );
        assert_eq!(
            find(Layout::Timm, "blocks.2.dw.bn.bias"),
            "blocks.1.1.bn2.bias"
        );
        assert_eq!(
            find(Layout::Timm, "blocks.2.project.conv.weight"),
            "blocks.1.1.conv_pwl.weight"
        );
        assert_eq!(
            find(Layout::Lukemelas, "blocks.15.expand.bn.weight"),
            "_blocks.15._bn0.weight"
        );
        assert_eq!(find(Layout::Lukemelas, "classifier.weight"), "_fc.weight");

        let v2 = variant("v2-s").unwrap();
        let tv = key_map(&v2, Layout::Torchvision).unwrap();
        let timm = key_map(&v2, Layout::Timm).unwrap();
        let src =
            |m: &[KeyMap], c: &str| m.iter().find(|k| k.canonical == c).unwrap().source.clone();
        assert_eq!(
            src(&tv, "blocks.0.expand.conv.weight"),
            "features.1.0.block.0.0.weight"
        );
        assert_eq!(
            src(&tv, "blocks.2.project.bn.weight"),
            "features.2.0.block.1.1.weight"
        );
        assert_eq!(
            src(&timm, "blocks.0.expand.conv.weight"),
            "blocks.0.0.conv.weight"
        );
        assert_eq!(
            src(&timm, "blocks.2.expand.conv.weight"),
            "blocks.1.0.conv_exp.weight"
        );
        assert_eq!(src(&tv, "head.conv.weight"), "features.7.0.weight");
        assert!(key_map(&v2, Layout::Lukemelas).is_err());
    }
}
