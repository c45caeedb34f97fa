//! What a weight set needs to be used correctly, carried with the weights: its whole architecture
//! (so scaled, custom and fine-tuned models load with `--weights` alone), the key layout it came
//! from, its eval transform and its class names; and what a checkpoint without such metadata is
//! assumed to need, by the conventions of the library that published it.

use crate::preprocess::presets::{self, Library};
use crate::preprocess::{Interpolation, LongSide, Preprocess, ResizeMode};
use crate::spec::{Family, ModelSpec, Padding, resolve};

use super::layout::Layout;

/// Metadata of a weight set.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightMeta {
    /// The architecture, including its padding mode, BN epsilon and number of classes.
    pub spec: ModelSpec,
    /// The key layout the weights were imported from.
    pub source: Layout,
    pub preprocess: Preprocess,
    /// Class names in label order; `None` for ImageNet-1k (1000 classes) or unnamed classes.
    #[serde(default)]
    pub class_names: Option<Vec<String>>,
    /// The pretrained-config tag whose transform `preprocess` is, when one was chosen or assumed.
    #[serde(default)]
    pub preset: Option<String>,
    /// The int8 quantisation `effnet quantize` calibrated for these weights, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quantization: Option<Quantization>,
}

/// Post-training static int8 quantisation of the engine's GEMM convolutions: each layer's input
/// range (from calibration images) and whether it runs in int8. Weights are quantised from the
/// stored f32 tensors when the engine loads them (symmetric, per output channel), so the file still
/// loads everywhere an f32 file does.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Quantization {
    /// How the ranges were found, e.g. `percentile 99.99 of 48 images`.
    pub calibration: String,
    /// Every GEMM convolution (stem, 1x1, full kxk, head) in network order.
    pub layers: Vec<QuantizedLayer>,
}

/// One GEMM convolution's input range.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct QuantizedLayer {
    /// Weight path, e.g. `blocks.3.expand`.
    pub name: String,
    pub lo: f32,
    pub hi: f32,
    /// `false`: kept out of int8, in bf16 or fp32 (the accuracy guard found it too sensitive).
    pub int8: bool,
    /// Mean of each input channel over the calibration images (GEMM row order: for kxk
    /// convolutions tap-major, `tap * cin + channel`), from which the bias is corrected for the
    /// weights' rounding; empty: no correction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub input_mean: Vec<f32>,
}

/// Metadata as the first releases wrote it: a variant name and its conventions.
#[derive(serde::Deserialize)]
struct LegacyMeta {
    model: String,
    source: Layout,
    padding: Padding,
    bn_eps: f64,
    num_classes: usize,
    preprocess: Preprocess,
}

/// The 1000 ImageNet-1k class names in index order.
pub const IMAGENET_CLASSES: &str = include_str!("../../assets/imagenet_classes.txt");

/// Key under which [`WeightMeta`] is stored as JSON in a safetensors header.
pub const SAFETENSORS_META_KEY: &str = "effnet";

impl WeightMeta {
    /// Parses and validates the JSON of a safetensors header (either format).
    pub fn from_json(json: &str) -> Result<Self, String> {
        let meta = match serde_json::from_str::<WeightMeta>(json) {
            Ok(meta) => meta,
            Err(new) => {
                let legacy: LegacyMeta = serde_json::from_str(json).map_err(|_| new.to_string())?;
                let mut spec = resolve(&legacy.model).map_err(|e| e.to_string())?.0;
                spec.padding = legacy.padding;
                spec.bn_eps = legacy.bn_eps;
                spec.num_classes = legacy.num_classes;
                WeightMeta {
                    spec,
                    source: legacy.source,
                    preprocess: legacy.preprocess,
                    class_names: None,
                    preset: None,
                    quantization: None,
                }
            }
        };
        meta.validate()?;
        Ok(meta)
    }

    /// Checks what a file could get wrong: the spec's sizes and rates, the transform, the names.
    pub fn validate(&self) -> Result<(), String> {
        self.spec.validate().map_err(|e| e.to_string())?;
        self.preprocess.validate()?;
        if let Some(names) = &self.class_names
            && names.len() != self.spec.num_classes
        {
            return Err(format!(
                "{} class names for {} classes",
                names.len(),
                self.spec.num_classes
            ));
        }
        Ok(())
    }

    /// The label of class `i`: its name, an ImageNet-1k name, or `class i`.
    pub fn labels(&self) -> Vec<String> {
        match &self.class_names {
            Some(names) => names.clone(),
            None if self.spec.num_classes == 1000 => {
                IMAGENET_CLASSES.lines().map(str::to_string).collect()
            }
            None => (0..self.spec.num_classes)
                .map(|i| format!("class {i}"))
                .collect(),
        }
    }
}

/// The architecture name `library` gives `spec`'s base variant (`tf_efficientnet_b0`,
/// `efficientnet_v2_s`), TF ports named with `tf_` where the library has both.
fn arch_name(spec: &ModelSpec, library: Library) -> String {
    let base = spec.name.split('(').next().unwrap_or(&spec.name);
    let short = base
        .trim_start_matches("efficientnetv2-")
        .trim_start_matches("efficientnet-");
    let v2 = spec.family == Family::V2;
    let tf = spec.padding == Padding::Same;
    match library {
        Library::Torchvision if v2 => format!("efficientnet_v2_{short}"),
        Library::Torchvision | Library::Lukemelas => format!("efficientnet_{short}"),
        Library::Timm => {
            let prefix = if tf { "tf_" } else { "" };
            let family = if v2 { "efficientnetv2" } else { "efficientnet" };
            format!("{prefix}{family}_{short}")
        }
    }
}

/// A transform for a spec no table row covers: TF's crop at 87.5 %, bicubic, ImageNet statistics
/// (the TF Lite models: 127.5).
fn generic_preprocess(spec: &ModelSpec) -> Preprocess {
    let crop = spec.resolution;
    let imagenet = (
        [0.485 * 255.0, 0.456 * 255.0, 0.406 * 255.0],
        [0.229 * 255.0, 0.224 * 255.0, 0.225 * 255.0],
    );
    let (mean, std) = if spec.family == Family::Lite {
        ([127.5; 3], [127.5; 3])
    } else {
        imagenet
    };
    Preprocess {
        resize: (crop as f64 / 0.875).floor() as usize,
        crop,
        resize_mode: ResizeMode::ShorterSide,
        long_side: LongSide::Truncate,
        interpolation: Interpolation::Bicubic,
        mean,
        std,
    }
}

/// The padding and BN epsilon of `library`'s checkpoints of `arch`: timm's `tf_*` ports keep TF's
/// SAME padding and 1e-3, its own models are PyTorch-style; torchvision builds B5-B7 and V2 with
/// eps 1e-3, the rest with PyTorch's 1e-5; lukemelas ports the TF checkpoints.
fn conventions(library: Library, arch: &str) -> (Padding, f64) {
    match library {
        Library::Timm if arch.starts_with("tf_") => (Padding::Same, 1e-3),
        Library::Timm => (Padding::Symmetric, 1e-5),
        Library::Torchvision => {
            let big = matches!(
                arch,
                "efficientnet_b5" | "efficientnet_b6" | "efficientnet_b7"
            ) || arch.starts_with("efficientnet_v2");
            (Padding::Symmetric, if big { 1e-3 } else { 1e-5 })
        }
        Library::Lukemelas => (Padding::Same, 1e-3),
    }
}

/// The library a key layout comes from.
fn library(layout: Layout) -> Option<Library> {
    match layout {
        Layout::Torchvision => Some(Library::Torchvision),
        Layout::Timm => Some(Library::Timm),
        Layout::Lukemelas => Some(Library::Lukemelas),
        Layout::Effnet => None,
    }
}

/// Whether `spec` is a published variant at its own resolution (what the preset table describes).
fn is_published(spec: &ModelSpec) -> bool {
    resolve(spec.name.as_str()).is_ok_and(|(v, _)| {
        (v.blocks == spec.blocks && v.width == spec.width && v.depth == spec.depth)
            && v.resolution == spec.resolution
    })
}

/// What weights in `layout` for `spec` need when the file carries no metadata: the publishing
/// library's padding and BN epsilon, and the eval transform of its original ImageNet weights.
pub fn checkpoint_defaults(spec: &ModelSpec, layout: Layout) -> WeightMeta {
    let mut spec = spec.clone();
    let preset = library(layout).and_then(|l| {
        let arch = arch_name(&spec, l);
        (spec.padding, spec.bn_eps) = conventions(l, &arch);
        presets::default_for(l, &arch)
            // lukemelas' V1 ports are the TF checkpoints timm also ports.
            .or_else(|| presets::default_for(Library::Timm, &arch_name(&spec, Library::Timm)))
            .filter(|_| is_published(&spec))
    });
    WeightMeta {
        preprocess: preset.map_or_else(|| generic_preprocess(&spec), |p| p.preprocess.clone()),
        preset: preset.map(|p| p.tag.clone()),
        quantization: None,
        spec,
        source: layout,
        class_names: None,
    }
}

impl WeightMeta {
    /// Uses `tag`'s transform and the padding and BN epsilon of the library that published it.
    /// The preset must be for this architecture.
    pub fn apply_preset(&mut self, tag: &str) -> Result<(), String> {
        let preset = presets::find(tag).map_err(|e| e.to_string())?;
        let arch = preset.arch();
        let base = |name: &str| name.split('(').next().unwrap_or(name).to_string();
        let fits = resolve(arch).is_ok_and(|(v, _)| v.name == base(&self.spec.name));
        if !fits {
            return Err(format!(
                "preset `{tag}` is for {arch}; these weights are {}",
                self.spec.name
            ));
        }
        (self.spec.padding, self.spec.bn_eps) = conventions(preset.library, arch);
        self.preprocess = preset.preprocess.clone();
        self.preset = Some(preset.tag.clone());
        Ok(())
    }

    /// The presets these weights might have been published with, each with the conventions it
    /// implies: what the keys alone cannot tell apart (timm's `tf_` ports and its own models share
    /// key names; AdvProp and noisy-student tags share shapes with the plain ones).
    pub fn candidate_presets(&self) -> Vec<&'static presets::Preset> {
        let Some(library) = library(self.source) else {
            return Vec::new();
        };
        let base = self.spec.name.split('(').next().unwrap_or(&self.spec.name);
        let classes = self.spec.num_classes;
        presets::all()
            .iter()
            .filter(|p| {
                let same_library = p.library == library
                    || (library == Library::Lukemelas && p.arch().starts_with("tf_"));
                same_library
                    && p.num_classes == classes
                    && resolve(p.arch()).is_ok_and(|(v, _)| v.name == base)
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::spec::variant;

    #[test]
    fn each_library_gets_its_conventions_and_transform() {
        let check = |name: &str, layout, preset: Option<&str>, padding, eps| {
            let m = checkpoint_defaults(&variant(name).unwrap(), layout);
            assert_eq!(m.preset.as_deref(), preset, "{name} {layout}");
            assert_eq!(
                (m.spec.padding, m.spec.bn_eps),
                (padding, eps),
                "{name} {layout}"
            );
            m.preprocess
        };
        use Padding::*;
        let tv = check(
            "b0",
            Layout::Torchvision,
            Some("efficientnet_b0.IMAGENET1K_V1"),
            Symmetric,
            1e-5,
        );
        assert_eq!((tv.resize, tv.crop), (256, 224));
        check(
            "v2-l",
            Layout::Torchvision,
            Some("efficientnet_v2_l.IMAGENET1K_V1"),
            Symmetric,
            1e-3,
        );
        let v2 = check(
            "v2-s",
            Layout::Timm,
            Some("tf_efficientnetv2_s.in1k"),
            Same,
            1e-3,
        );
        assert_eq!((v2.mean, v2.crop), ([127.5; 3], 384));
        check(
            "efficientnet_b0",
            Layout::Timm,
            Some("efficientnet_b0.ra_in1k"),
            Symmetric,
            1e-5,
        );
        let lite = check(
            "lite0",
            Layout::Lukemelas,
            Some("efficientnet_lite0.lukemelas"),
            Same,
            1e-3,
        );
        assert_eq!((lite.mean, lite.std), ([127.0; 3], [128.0; 3]));
        check(
            "b3",
            Layout::Lukemelas,
            Some("tf_efficientnet_b3.in1k"),
            Same,
            1e-3,
        );
        let own = check("b0", Layout::Effnet, None, Same, 1e-3);
        assert_eq!((own.resize, own.crop), (256, 224));
    }

    #[test]
    fn legacy_and_current_metadata_parse_and_bad_values_are_refused() {
        let legacy = r#"{"model":"efficientnet-lite0","source":"lukemelas","padding":"same","bn_eps":0.001,"num_classes":1000,"preprocess":{"resize":256,"crop":224,"interpolation":"bicubic","mean":[127.0,127.0,127.0],"std":[128.0,128.0,128.0]}}"#;
        let m = WeightMeta::from_json(legacy).unwrap();
        assert_eq!(m.spec.name, "efficientnet-lite0");
        let json = serde_json::to_string(&m).unwrap();
        assert_eq!(WeightMeta::from_json(&json).unwrap(), m);
        for (from, to) in [
            (r#""crop":224"#, r#""crop":0"#),
            (r#""resize":256"#, r#""resize":1000000000"#),
            (r#""std":[128.0,128.0,128.0]"#, r#""std":[0.0,1.0,1.0]"#),
            (r#""bn_eps":0.001"#, r#""bn_eps":-1.0"#),
        ] {
            let bad = legacy.replace(from, to);
            assert_ne!(bad, legacy);
            assert!(WeightMeta::from_json(&bad).is_err(), "{bad}");
        }
    }
}
