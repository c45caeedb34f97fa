//! Image features from the engine for retrieval, clustering or a downstream model (timm's
//! `forward_features` / `features_only`): the pooled head features and backbone maps at chosen
//! reductions, computed in batches over many files and written as safetensors, `.npy` or JSON
//! lines.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::engine::Engine;
use crate::preprocess::{Preprocess, eval_transform, load_rgb};

/// One requested output.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tap {
    /// The pooled head features (the classifier's input).
    Pooled,
    /// The backbone map at this reduction.
    Map(usize),
}

impl Tap {
    /// Its name in an output file: `pooled` or `features.<reduction>`.
    pub fn name(self) -> String {
        match self {
            Tap::Pooled => "pooled".into(),
            Tap::Map(r) => format!("features.{r}"),
        }
    }

    /// `pooled,8,16,32` (any order, no repeats).
    pub fn parse_list(text: &str) -> anyhow::Result<Vec<Tap>> {
        let mut taps = Vec::new();
        for part in text.split(',').map(str::trim) {
            let tap = match part {
                "pooled" => Tap::Pooled,
                r => Tap::Map(r.parse().ok().filter(|&r: &usize| r > 0).with_context(|| {
                    format!(
                        "--taps: `{}` is neither `pooled` nor a reduction such as 8, 16 or 32",
                        crate::util::quote_for_message(r)
                    )
                })?),
            };
            if taps.contains(&tap) {
                bail!("--taps names `{}` twice", tap.name());
            }
            taps.push(tap);
        }
        Ok(taps)
    }
}

/// Output file kinds, by extension.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Format {
    /// Every tap as a tensor `[images, ...]`, image paths in the metadata.
    Safetensors,
    /// One tap as a NumPy array `[images, ...]` (little-endian f32).
    Npy,
    /// One line per image: its path and each tap flattened (maps in channel, row, column order).
    Jsonl,
}

impl Format {
    /// Fails for more taps than the format holds (a `.npy` file is one array).
    pub fn check_taps(self, taps: usize) -> anyhow::Result<()> {
        if self == Format::Npy && taps != 1 {
            bail!(
                "a .npy file holds one array; ask for one tap (--taps pooled or --taps 16) or write .safetensors"
            );
        }
        Ok(())
    }

    pub fn from_path(path: &Path) -> anyhow::Result<Self> {
        match path.extension().and_then(|e| e.to_str()) {
            Some("safetensors") => Ok(Format::Safetensors),
            Some("npy") => Ok(Format::Npy),
            Some("jsonl") => Ok(Format::Jsonl),
            _ => bail!(
                "--out `{}`: the file must end in .safetensors, .npy or .jsonl",
                path.display()
            ),
        }
    }
}

/// The features of every image, per tap: the shape of one image's features and all images'
/// values one after another.
pub struct Features {
    pub images: Vec<PathBuf>,
    pub taps: Vec<(Tap, Vec<usize>, Vec<f32>)>,
}

/// Features of `files` through `engine`, `batch` images at a time, each file decoded and
/// transformed as the weights say; `progress` is told each finished image.
pub fn embed_files(
    engine: &mut Engine,
    preprocess: &Preprocess,
    files: &[PathBuf],
    taps: &[Tap],
    batch: usize,
    progress: &dyn Fn(usize),
) -> anyhow::Result<Features> {
    let side = preprocess.crop;
    let maps: Vec<usize> = taps
        .iter()
        .filter_map(|t| match t {
            Tap::Map(r) => Some(*r),
            Tap::Pooled => None,
        })
        .collect();
    // Every level exists and the output fits in memory, before any image is decoded.
    let mut per_image = 0u64;
    let mut shapes = Vec::new();
    for tap in taps {
        let shape = match tap {
            Tap::Pooled => vec![engine.meta.spec.head_channels()],
            Tap::Map(r) => {
                let t = engine.feature_tap(*r)?;
                // Each stride-2 stage rounds up; the maps' own sizes replace this estimate.
                vec![t.channels, side.div_ceil(*r), side.div_ceil(*r)]
            }
        };
        per_image += shape.iter().product::<usize>() as u64;
        shapes.push(shape);
    }
    // The features, then a serialised copy of them.
    crate::util::check_memory(per_image * 4 * 2 * files.len() as u64, "the features")?;
    let mut out: Vec<Vec<f32>> = vec![Vec::new(); taps.len()];
    let mut done = 0;
    for chunk in files.chunks(batch.max(1)) {
        let mut data = Vec::with_capacity(chunk.len() * 3 * side * side);
        for path in chunk {
            let img = load_rgb(path)?;
            data.extend(
                eval_transform(&img, preprocess)
                    .with_context(|| format!("`{}`", path.display()))?,
            );
        }
        let n = chunk.len();
        let e = engine.embed(&data, (n, side, side), taps.contains(&Tap::Pooled), &maps)?;
        let mut maps = e.maps.into_iter();
        for (i, tap) in taps.iter().enumerate() {
            match tap {
                Tap::Pooled => out[i].extend(e.pooled.as_deref().expect("pooled was asked for")),
                Tap::Map(_) => {
                    let m = maps.next().expect("one map per asked reduction");
                    // The map's true size (padding decides the rounding).
                    shapes[i] = vec![m.channels, m.height, m.width];
                    out[i].extend(m.data);
                }
            }
        }
        done += n;
        progress(done);
    }
    Ok(Features {
        images: files.to_vec(),
        taps: taps
            .iter()
            .zip(shapes)
            .zip(out)
            .map(|((t, s), d)| (*t, s, d))
            .collect(),
    })
}

/// Writes `features` to `path` in `format` (atomically); `model` names the network in the
/// metadata.
pub fn write(path: &Path, format: Format, features: &Features, model: &str) -> anyhow::Result<()> {
    let n = features.images.len();
    let bytes = match format {
        Format::Safetensors => {
            let raw: Vec<(String, Vec<usize>, Vec<u8>)> = features
                .taps
                .iter()
                .map(|(tap, shape, data)| {
                    let mut full = vec![n];
                    full.extend(shape);
                    (
                        tap.name(),
                        full,
                        data.iter().flat_map(|v| v.to_le_bytes()).collect(),
                    )
                })
                .collect();
            let views = raw
                .iter()
                .map(|(name, shape, data)| {
                    safetensors::tensor::TensorView::new(
                        safetensors::Dtype::F32,
                        shape.clone(),
                        data,
                    )
                    .map(|v| (name.clone(), v))
                })
                .collect::<Result<Vec<_>, _>>()?;
            let images: Vec<String> = features
                .images
                .iter()
                .map(|p| p.display().to_string())
                .collect();
            let metadata = HashMap::from([
                ("images".to_string(), serde_json::to_string(&images)?),
                ("model".to_string(), model.to_string()),
            ]);
            safetensors::tensor::serialize(views, Some(metadata))?
        }
        Format::Npy => {
            format.check_taps(features.taps.len())?;
            let (_, shape, data) = &features.taps[0];
            let mut full = vec![n];
            full.extend(shape);
            npy(&full, data)
        }
        Format::Jsonl => {
            let mut text = String::new();
            for (i, image) in features.images.iter().enumerate() {
                let mut line = serde_json::Map::new();
                line.insert("image".into(), image.display().to_string().into());
                for (tap, shape, data) in &features.taps {
                    let len: usize = shape.iter().product();
                    line.insert(
                        tap.name(),
                        serde_json::to_value(&data[i * len..(i + 1) * len])?,
                    );
                }
                text.push_str(&serde_json::to_string(&line)?);
                text.push('\n');
            }
            text.into_bytes()
        }
    };
    crate::util::write_atomic(path, &bytes)
        .with_context(|| format!("cannot write `{}`", path.display()))
}

/// A NumPy `.npy` file (format 1.0, or 2.0 for a header over 64 KiB) of little-endian f32.
/// Written here: the format is a 10-byte preamble and a Python dict literal.
fn npy(shape: &[usize], data: &[f32]) -> Vec<u8> {
    let dims: Vec<String> = shape.iter().map(usize::to_string).collect();
    let tuple = if dims.len() == 1 {
        format!("({},)", dims[0])
    } else {
        format!("({})", dims.join(", "))
    };
    let mut header = format!("{{'descr': '<f4', 'fortran_order': False, 'shape': {tuple}, }}");
    // Magic, version, length field, header and its newline end on a 64-byte boundary.
    let fixed = |len_field: usize| 6 + 2 + len_field;
    let v1 = (fixed(2) + header.len() + 1).next_multiple_of(64) - fixed(2) <= u16::MAX as usize;
    let len_field = if v1 { 2 } else { 4 };
    let padded = (fixed(len_field) + header.len() + 1).next_multiple_of(64) - fixed(len_field);
    header.push_str(&" ".repeat(padded - header.len() - 1));
    header.push('\n');
    let mut out = b"\x93NUMPY".to_vec();
    if v1 {
        out.extend([1, 0]);
        out.extend((header.len() as u16).to_le_bytes());
    } else {
        out.extend([2, 0]);
        out.extend((header.len() as u32).to_le_bytes());
    }
    out.extend(header.as_bytes());
    out.extend(data.iter().flat_map(|v| v.to_le_bytes()));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn taps_parse_and_reject_repeats_and_junk() {
        assert_eq!(
            Tap::parse_list("pooled, 8,32").unwrap(),
            [Tap::Pooled, Tap::Map(8), Tap::Map(32)]
        );
        assert!(
            Tap::parse_list("8,8")
                .unwrap_err()
                .to_string()
                .contains("twice")
        );
        assert!(
            Tap::parse_list("pool")
                .unwrap_err()
                .to_string()
                .contains("neither")
        );
        assert!(Tap::parse_list("0").is_err());
    }

    #[test]
    fn npy_headers_are_aligned_and_describe_the_array() {
        let f = npy(&[2, 3], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]);
        assert_eq!(&f[..8], b"\x93NUMPY\x01\x00");
        let len = u16::from_le_bytes([f[8], f[9]]) as usize;
        assert_eq!((10 + len) % 64, 0);
        let header = std::str::from_utf8(&f[10..10 + len]).unwrap();
        assert!(header.starts_with("{'descr': '<f4', 'fortran_order': False, 'shape': (2, 3), }"));
        assert!(header.ends_with('\n'));
        assert_eq!(f.len(), 10 + len + 24);
        assert_eq!(&f[10 + len..10 + len + 4], &1.0f32.to_le_bytes());
        let one = npy(&[5], &[0.0; 5]);
        let len = u16::from_le_bytes([one[8], one[9]]) as usize;
        assert!(
            std::str::from_utf8(&one[10..10 + len])
                .unwrap()
                .contains("'shape': (5,)")
        );
    }
}
