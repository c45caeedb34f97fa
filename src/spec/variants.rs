//! Every published variant by name, with its per-variant defaults.
//!
//! Canonical names are `efficientnet-b0`..`b8`, `efficientnet-l2`, `efficientnet-lite0`..`lite4`,
//! `efficientnetv2-b0`..`b3`, `efficientnetv2-s/m/l/xl`. Short forms (`b0`, `lite0`, `v2-s`) and the
//! timm / torchvision names (`tf_efficientnet_b0`, `efficientnet_v2_s`, ...) resolve to the same spec;
//! a `tf_` prefix selects TF "SAME" padding and BN eps 1e-3, the PyTorch names symmetric padding.

use super::{Activation, BlockArgs, Family, ModelSpec, Padding, SpecError};

const V1_BLOCKS: [&str; 7] = [
    "r1_k3_s11_e1_i32_o16_se0.25",
    "r2_k3_s22_e6_i16_o24_se0.25",
    "r2_k5_s22_e6_i24_o40_se0.25",
    "r3_k3_s22_e6_i40_o80_se0.25",
    "r3_k5_s11_e6_i80_o112_se0.25",
    "r4_k5_s22_e6_i112_o192_se0.25",
    "r1_k3_s11_e6_i192_o320_se0.25",
];

const V2_BASE_BLOCKS: [&str; 6] = [
    "r1_k3_s1_e1_i32_o16_c1",
    "r2_k3_s2_e4_i16_o32_c1",
    "r2_k3_s2_e4_i32_o48_c1",
    "r3_k3_s2_e4_i48_o96_se0.25",
    "r5_k3_s1_e6_i96_o112_se0.25",
    "r8_k3_s2_e6_i112_o192_se0.25",
];

const V2_S_BLOCKS: [&str; 6] = [
    "r2_k3_s1_e1_i24_o24_c1",
    "r4_k3_s2_e4_i24_o48_c1",
    "r4_k3_s2_e4_i48_o64_c1",
    "r6_k3_s2_e4_i64_o128_se0.25",
    "r9_k3_s1_e6_i128_o160_se0.25",
    "r15_k3_s2_e6_i160_o256_se0.25",
];

const V2_M_BLOCKS: [&str; 7] = [
    "r3_k3_s1_e1_i24_o24_c1",
    "r5_k3_s2_e4_i24_o48_c1",
    "r5_k3_s2_e4_i48_o80_c1",
    "r7_k3_s2_e4_i80_o160_se0.25",
    "r14_k3_s1_e6_i160_o176_se0.25",
    "r18_k3_s2_e6_i176_o304_se0.25",
    "r5_k3_s1_e6_i304_o512_se0.25",
];

const V2_L_BLOCKS: [&str; 7] = [
    "r4_k3_s1_e1_i32_o32_c1",
    "r7_k3_s2_e4_i32_o64_c1",
    "r7_k3_s2_e4_i64_o96_c1",
    "r10_k3_s2_e4_i96_o192_se0.25",
    "r19_k3_s1_e6_i192_o224_se0.25",
    "r25_k3_s2_e6_i224_o384_se0.25",
    "r7_k3_s1_e6_i384_o640_se0.25",
];

const V2_XL_BLOCKS: [&str; 7] = [
    "r4_k3_s1_e1_i32_o32_c1",
    "r8_k3_s2_e4_i32_o64_c1",
    "r8_k3_s2_e4_i64_o96_c1",
    "r16_k3_s2_e4_i96_o192_se0.25",
    "r24_k3_s1_e6_i192_o256_se0.25",
    "r32_k3_s2_e6_i256_o512_se0.25",
    "r8_k3_s1_e6_i512_o640_se0.25",
];

/// One row of the variant table.
pub struct Variant {
    pub name: &'static str,
    pub family: Family,
    blocks: &'static [&'static str],
    pub width: f64,
    pub depth: f64,
    pub resolution: usize,
    pub train_resolution: usize,
    pub dropout: f64,
}

const fn v(
    name: &'static str,
    family: Family,
    blocks: &'static [&'static str],
    (width, depth): (f64, f64),
    (resolution, train_resolution): (usize, usize),
    dropout: f64,
) -> Variant {
    Variant {
        name,
        family,
        blocks,
        width,
        depth,
        resolution,
        train_resolution,
        dropout,
    }
}

use Family::{Lite, V1, V2};

/// The published variants (paper tables; TF reference and automl for V2).
pub const VARIANTS: &[Variant] = &[
    v(
        "efficientnet-b0",
        V1,
        &V1_BLOCKS,
        (1.0, 1.0),
        (224, 224),
        0.2,
    ),
    v(
        "efficientnet-b1",
        V1,
        &V1_BLOCKS,
        (1.0, 1.1),
        (240, 240),
        0.2,
    ),
    v(
        "efficientnet-b2",
        V1,
        &V1_BLOCKS,
        (1.1, 1.2),
        (260, 260),
        0.3,
    ),
    v(
        "efficientnet-b3",
        V1,
        &V1_BLOCKS,
        (1.2, 1.4),
        (300, 300),
        0.3,
    ),
    v(
        "efficientnet-b4",
        V1,
        &V1_BLOCKS,
        (1.4, 1.8),
        (380, 380),
        0.4,
    ),
    v(
        "efficientnet-b5",
        V1,
        &V1_BLOCKS,
        (1.6, 2.2),
        (456, 456),
        0.4,
    ),
    v(
        "efficientnet-b6",
        V1,
        &V1_BLOCKS,
        (1.8, 2.6),
        (528, 528),
        0.5,
    ),
    v(
        "efficientnet-b7",
        V1,
        &V1_BLOCKS,
        (2.0, 3.1),
        (600, 600),
        0.5,
    ),
    v(
        "efficientnet-b8",
        V1,
        &V1_BLOCKS,
        (2.2, 3.6),
        (672, 672),
        0.5,
    ),
    v(
        "efficientnet-l2",
        V1,
        &V1_BLOCKS,
        (4.3, 5.3),
        (800, 800),
        0.5,
    ),
    v(
        "efficientnet-lite0",
        Lite,
        &V1_BLOCKS,
        (1.0, 1.0),
        (224, 224),
        0.2,
    ),
    v(
        "efficientnet-lite1",
        Lite,
        &V1_BLOCKS,
        (1.0, 1.1),
        (240, 240),
        0.2,
    ),
    v(
        "efficientnet-lite2",
        Lite,
        &V1_BLOCKS,
        (1.1, 1.2),
        (260, 260),
        0.3,
    ),
    v(
        "efficientnet-lite3",
        Lite,
        &V1_BLOCKS,
        (1.2, 1.4),
        (280, 280),
        0.3,
    ),
    v(
        "efficientnet-lite4",
        Lite,
        &V1_BLOCKS,
        (1.4, 1.8),
        (300, 300),
        0.3,
    ),
    v(
        "efficientnetv2-b0",
        V2,
        &V2_BASE_BLOCKS,
        (1.0, 1.0),
        (224, 192),
        0.2,
    ),
    v(
        "efficientnetv2-b1",
        V2,
        &V2_BASE_BLOCKS,
        (1.0, 1.1),
        (240, 192),
        0.2,
    ),
    v(
        "efficientnetv2-b2",
        V2,
        &V2_BASE_BLOCKS,
        (1.1, 1.2),
        (260, 208),
        0.3,
    ),
    v(
        "efficientnetv2-b3",
        V2,
        &V2_BASE_BLOCKS,
        (1.2, 1.4),
        (300, 240),
        0.3,
    ),
    v(
        "efficientnetv2-s",
        V2,
        &V2_S_BLOCKS,
        (1.0, 1.0),
        (384, 300),
        0.2,
    ),
    v(
        "efficientnetv2-m",
        V2,
        &V2_M_BLOCKS,
        (1.0, 1.0),
        (480, 384),
        0.3,
    ),
    v(
        "efficientnetv2-l",
        V2,
        &V2_L_BLOCKS,
        (1.0, 1.0),
        (480, 384),
        0.4,
    ),
    v(
        "efficientnetv2-xl",
        V2,
        &V2_XL_BLOCKS,
        (1.0, 1.0),
        (512, 384),
        0.4,
    ),
];

impl Variant {
    /// The variant with TF defaults: SAME padding, BN eps 1e-3, BN decay 0.99.
    pub fn spec(&self) -> ModelSpec {
        ModelSpec {
            name: self.name.to_string(),
            family: self.family,
            blocks: BlockArgs::decode_all(self.blocks).expect("built-in block strings are valid"),
            width: self.width,
            depth: self.depth,
            resolution: self.resolution,
            train_resolution: self.train_resolution,
            dropout: self.dropout,
            head_channels: 1280,
            activation: match self.family {
                Lite => Activation::Relu6,
                _ => Activation::Silu,
            },
            bn_eps: 1e-3,
            bn_momentum: 0.01,
            padding: Padding::Same,
            num_classes: 1000,
            drop_connect_rate: 0.2,
            divisor: 8,
        }
    }
}

/// Which implementation's conventions a name asked for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// TF reference / timm `tf_*` / lukemelas: SAME padding, BN eps 1e-3.
    Tf,
    /// torchvision / timm non-`tf_` names: symmetric padding, BN eps 1e-5.
    PyTorch,
}

/// Normalises any accepted spelling to the canonical variant name and the flavor it implies.
fn canonical(name: &str) -> Option<(&'static Variant, Flavor)> {
    let lower = name.trim().to_ascii_lowercase().replace('_', "-");
    let (rest, tf) = match lower.strip_prefix("tf-") {
        Some(r) => (r, true),
        None => (lower.as_str(), false),
    };
    // PyTorch-style names use underscores (efficientnet_b0); the canonical names use a dash.
    let pytorch_name = name.contains('_') && !tf;
    let short = rest
        .strip_prefix("efficientnet")
        .unwrap_or(rest)
        .trim_start_matches('-');
    let full = match short.strip_prefix("v2") {
        Some(r) => format!("efficientnetv2-{}", r.trim_start_matches('-')),
        None => format!("efficientnet-{short}"),
    };
    let variant = VARIANTS.iter().find(|v| v.name == full)?;
    let flavor = if pytorch_name {
        Flavor::PyTorch
    } else {
        Flavor::Tf
    };
    Some((variant, flavor))
}

/// The spec of a published variant by any accepted name, with the conventions the name implies.
pub fn resolve(name: &str) -> Result<(ModelSpec, Flavor), SpecError> {
    let (variant, flavor) = canonical(name).ok_or_else(|| SpecError::UnknownModel {
        name: name.to_string(),
        known: VARIANTS
            .iter()
            .map(|v| v.name)
            .collect::<Vec<_>>()
            .join(", "),
    })?;
    let mut spec = variant.spec();
    if flavor == Flavor::PyTorch {
        spec.padding = Padding::Symmetric;
        spec.bn_eps = 1e-5;
    }
    Ok((spec, flavor))
}

/// The spec of a published variant (TF defaults unless the name is a PyTorch one).
pub fn variant(name: &str) -> Result<ModelSpec, SpecError> {
    resolve(name).map(|(s, _)| s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_spelling_resolves() {
        for (alias, canon, flavor) in [
            ("b0", "efficientnet-b0", Flavor::Tf),
            ("efficientnet-b3", "efficientnet-b3", Flavor::Tf),
            ("EfficientNet-B3", "efficientnet-b3", Flavor::Tf),
            ("efficientnet_b3", "efficientnet-b3", Flavor::PyTorch),
            ("tf_efficientnet_b3", "efficientnet-b3", Flavor::Tf),
            ("lite0", "efficientnet-lite0", Flavor::Tf),
            ("tf_efficientnet_lite2", "efficientnet-lite2", Flavor::Tf),
            ("l2", "efficientnet-l2", Flavor::Tf),
            ("v2-s", "efficientnetv2-s", Flavor::Tf),
            ("efficientnetv2-xl", "efficientnetv2-xl", Flavor::Tf),
            ("efficientnet_v2_m", "efficientnetv2-m", Flavor::PyTorch),
            ("tf_efficientnetv2_b3", "efficientnetv2-b3", Flavor::Tf),
            ("efficientnetv2_l", "efficientnetv2-l", Flavor::PyTorch),
            ("v2-b0", "efficientnetv2-b0", Flavor::Tf),
        ] {
            let (spec, f) = resolve(alias).unwrap_or_else(|e| panic!("{alias}: {e}"));
            assert_eq!((spec.name.as_str(), f), (canon, flavor), "{alias}");
        }
        assert_eq!(
            variant("efficientnet_b0").unwrap().padding,
            Padding::Symmetric
        );
        assert_eq!(
            variant("tf_efficientnet_b0").unwrap().padding,
            Padding::Same
        );
    }

    #[test]
    fn unknown_names_list_the_known_ones() {
        for bad in ["b9", "resnet50", "", "v2-xxl", "lite5"] {
            let err = variant(bad).unwrap_err().to_string();
            assert!(
                err.contains("unknown model") && err.contains("efficientnet-b0"),
                "{err}"
            );
        }
    }

    #[test]
    fn there_are_23_published_variants() {
        assert_eq!(VARIANTS.len(), 23);
        for v in VARIANTS {
            assert_eq!(variant(v.name).unwrap().name, v.name);
        }
    }
}
