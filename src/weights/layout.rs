//! Checkpoint key layouts (torchvision, timm, lukemelas, and this crate's own) mapped explicitly to
//! the canonical names, from the spec's anatomy. Names only: what each source's weights need besides
//! (padding, BN eps, preprocessing) is in [`super::meta`].
//!
//! Canonical names are the burn model's module paths with PyTorch tensor names:
//! `stem.conv.weight`, `stem.bn.{weight,bias,running_mean,running_var}`,
//! `blocks.{i}.{expand,dw,project}.{conv,bn}.*`, `blocks.{i}.se.{reduce,expand}.{weight,bias}`,
//! `head.{conv,bn}.*`, `classifier.{weight,bias}` (PyTorch `[out, in]` orientation).

use std::fmt;

use crate::spec::{BlockAnatomy, BlockPos, Conv, Family, ModelSpec, Role};

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
    let anatomy = spec.anatomy();
    let stages = spec.blocks.len();
    let mut out = Vec::new();
    let mut push = |canonical: String, source: String, shape: Vec<usize>| {
        out.push(KeyMap {
            canonical,
            source,
            shape,
        })
    };
    let mut add = |conv: &Conv, block: Option<&BlockAnatomy>| {
        let (weight, bn) = source_names(layout, conv, block, stages);
        let shape = conv.weight_shape();
        let channels = vec![conv.out_channels];
        let canonical = conv.weight_module();
        push(
            format!("{canonical}.weight"),
            format!("{weight}.weight"),
            shape,
        );
        if !conv.has_bn() {
            push(
                format!("{canonical}.bias"),
                format!("{weight}.bias"),
                channels.clone(),
            );
        }
        if let (Some(canon_bn), Some(bn)) = (conv.bn_module(), bn) {
            for t in ["weight", "bias", "running_mean", "running_var"] {
                push(
                    format!("{canon_bn}.{t}"),
                    format!("{bn}.{t}"),
                    channels.clone(),
                );
            }
        }
    };
    add(&anatomy.stem, None);
    for block in &anatomy.blocks {
        for conv in block.convs() {
            add(conv, Some(block));
        }
    }
    add(&anatomy.head, None);
    add(&anatomy.classifier, None);
    Ok(out)
}

/// (weight module name, BN module name) of `conv` in `layout`.
fn source_names(
    layout: Layout,
    conv: &Conv,
    block: Option<&BlockAnatomy>,
    stages: usize,
) -> (String, Option<String>) {
    use Role::*;
    let pair = |c: String, b: String| (c, Some(b));
    let se = |prefix: &str, reduce: &str, expand: &str| {
        let name = if conv.role == SeReduce {
            reduce
        } else {
            expand
        };
        (format!("{prefix}{name}"), None)
    };
    let block = match (layout, block) {
        (Layout::Effnet, _) => return (conv.weight_module(), conv.bn_module()),
        (_, Some(b)) => b,
        (Layout::Torchvision, None) => {
            return match conv.role {
                Stem => pair("features.0.0".into(), "features.0.1".into()),
                Head => pair(
                    format!("features.{}.0", stages + 1),
                    format!("features.{}.1", stages + 1),
                ),
                _ => ("classifier.1".into(), None),
            };
        }
        (Layout::Timm, None) => {
            return match conv.role {
                Stem => pair("conv_stem".into(), "bn1".into()),
                Head => pair("conv_head".into(), "bn2".into()),
                _ => ("classifier".into(), None),
            };
        }
        (Layout::Lukemelas, None) => {
            return match conv.role {
                Stem => pair("_conv_stem".into(), "_bn0".into()),
                Head => pair("_conv_head".into(), "_bn1".into()),
                _ => ("_fc".into(), None),
            };
        }
    };
    let BlockPos {
        index,
        stage,
        in_stage,
    } = block.pos;
    match layout {
        Layout::Effnet => unreachable!("handled above"),
        Layout::Torchvision => {
            // torchvision numbers a block's sub-layers in forward order (the SE pair is one).
            let slot = block
                .convs()
                .filter(|c| c.role != SeExpand)
                .position(|c| c.role == conv.role || (conv.role == SeExpand && c.role == SeReduce))
                .unwrap_or(0);
            let base = format!("features.{}.{in_stage}.block.{slot}", stage + 1);
            match conv.role {
                SeReduce | SeExpand => se(&format!("{base}."), "fc1", "fc2"),
                _ => pair(format!("{base}.0"), format!("{base}.1")),
            }
        }
        Layout::Timm => {
            let b = format!("blocks.{stage}.{in_stage}");
            // timm's block classes: ConvBnAct (a lone conv), EdgeResidual (fused),
            // DepthwiseSeparableConv (no expansion), InvertedResidual.
            let lone = block.depthwise.is_none() && block.project.is_none();
            let fused = block.depthwise.is_none();
            let separable = block.depthwise.is_some() && block.expand.is_none();
            match conv.role {
                SeReduce | SeExpand => se(&format!("{b}.se."), "conv_reduce", "conv_expand"),
                Expand if lone => pair(format!("{b}.conv"), format!("{b}.bn1")),
                Expand if fused => pair(format!("{b}.conv_exp"), format!("{b}.bn1")),
                Expand => pair(format!("{b}.conv_pw"), format!("{b}.bn1")),
                Depthwise => pair(
                    format!("{b}.conv_dw"),
                    format!("{b}.bn{}", if separable { 1 } else { 2 }),
                ),
                Project if separable => pair(format!("{b}.conv_pw"), format!("{b}.bn2")),
                Project if fused => pair(format!("{b}.conv_pwl"), format!("{b}.bn2")),
                _ => pair(format!("{b}.conv_pwl"), format!("{b}.bn3")),
            }
        }
        Layout::Lukemelas => {
            let b = format!("_blocks.{index}.");
            match conv.role {
                Expand => pair(format!("{b}_expand_conv"), format!("{b}_bn0")),
                Depthwise => pair(format!("{b}_depthwise_conv"), format!("{b}_bn1")),
                SeReduce | SeExpand => se(&b, "_se_reduce", "_se_expand"),
                _ => pair(format!("{b}_project_conv"), format!("{b}_bn2")),
            }
        }
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
            assert_eq!(
                mapped as u64,
                analyze(&spec, 224).unwrap().params,
                "{}",
                v.name
            );
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
