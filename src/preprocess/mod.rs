//! Image decoding and the eval preprocessing a weight set asks for: resize the shorter side
//! (Pillow-exact convolution resampling), center crop, normalise.

mod jpeg;
pub mod presets;
mod resample;

pub use resample::resize;

use std::path::Path;

use image::RgbImage;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Interpolation {
    Bilinear,
    Bicubic,
}

/// How the image reaches `resize` pixels before the center crop.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ResizeMode {
    /// The shorter side becomes `resize`, keeping the aspect ratio (torchvision, most of timm).
    #[default]
    ShorterSide,
    /// Both sides become `resize` (timm's `squash` crop mode).
    Squash,
}

/// How the longer side's length is rounded when the shorter side is resized.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LongSide {
    /// Python's `round` (half to even), as this project's PyTorch oracles compute it.
    #[default]
    Round,
    /// `int()`, as torchvision's `Resize` (and so timm) computes it.
    Truncate,
}

/// Eval preprocessing: resize to `resize`, center-crop `crop`, then `(pixel - mean) / std` with
/// pixels in 0..=255.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    pub resize: usize,
    pub crop: usize,
    #[serde(default)]
    pub resize_mode: ResizeMode,
    #[serde(default)]
    pub long_side: LongSide,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Largest side a transform may resize or crop to.
pub const MAX_SIDE: usize = 8192;

impl Preprocess {
    /// The transform `effnet train` fits images with and records in its weights: shorter side to
    /// `side` (bilinear, rounded), center crop `side`, then `mean` / `std`.
    pub fn fit(side: usize, (mean, std): ([f32; 3], [f32; 3])) -> Self {
        Preprocess {
            resize: side,
            crop: side,
            resize_mode: ResizeMode::ShorterSide,
            long_side: LongSide::Round,
            interpolation: Interpolation::Bilinear,
            mean,
            std,
        }
    }

    /// Checks the values no transform can use (weights files carry them, so they are untrusted).
    pub fn validate(&self) -> Result<(), String> {
        if !(1..=MAX_SIDE).contains(&self.crop) || !(1..=MAX_SIDE).contains(&self.resize) {
            return Err(format!(
                "resize {} and crop {} must be in 1..={MAX_SIDE}",
                self.resize, self.crop
            ));
        }
        if self.crop > self.resize {
            return Err(format!(
                "the crop ({}) is larger than the resized image ({})",
                self.crop, self.resize
            ));
        }
        if !self.mean.iter().all(|m| m.is_finite())
            || !self.std.iter().all(|s| s.is_finite() && *s > 0.0)
        {
            return Err(format!(
                "mean {:?} must be finite and std {:?} positive",
                self.mean, self.std
            ));
        }
        Ok(())
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("cannot read image `{path}`: {source}")]
    Io {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("`{path}` is not a supported image (PNG, JPEG, BMP, GIF, WebP, TIFF): {why}")]
    Unsupported { path: String, why: String },
    #[error("cannot decode image `{path}`: {why}")]
    Decode { path: String, why: String },
    #[error("image `{path}` is empty")]
    Empty { path: String },
    #[error("image `{path}` is truncated: its JPEG data ends before the end-of-image marker")]
    Truncated { path: String },
    #[error(
        "a {w}x{h} image cannot be resized to {size} pixels on its shorter side: the longer side would be {long} pixels (at most {MAX_SIDE}); crop it first"
    )]
    TooLong {
        w: usize,
        h: usize,
        size: usize,
        long: usize,
    },
}

/// Largest width or height of an image accepted for decoding.
pub const MAX_DECODE_SIDE: u32 = 1 << 15;
/// Most bytes a decoded image may take.
const MAX_DECODE_BYTES: u64 = 1 << 30;

/// Whether JPEG `data` ends its entropy-coded scan with an end-of-image marker: the `image`
/// crate's decoder fills a scan cut short with grey where libjpeg (and so Pillow) reports the file
/// as truncated.
fn jpeg_is_complete(data: &[u8]) -> bool {
    let Some(sos) = data.windows(2).position(|w| w == [0xFF, 0xDA]) else {
        return false;
    };
    data[sos..].windows(2).any(|w| w == [0xFF, 0xD9])
}

/// Decodes an image file to 8-bit RGB (grey and alpha images are converted; JPEGs exactly as
/// Pillow decodes them, see [`jpeg`]). Only regular files are read; images larger than [`MAX_DECODE_SIDE`] on a side or a gigabyte decoded are refused,
/// and so is a JPEG whose scan is cut short.
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let p = path.display().to_string();
    let bytes = crate::util::read_regular(path).map_err(|e| ImageError::Io {
        path: p.clone(),
        source: e,
    })?;
    let mut reader = image::ImageReader::new(std::io::Cursor::new(&bytes[..]))
        .with_guessed_format()
        .map_err(|e| ImageError::Io {
            path: p.clone(),
            source: e,
        })?;
    match reader.format() {
        None => {
            return Err(ImageError::Unsupported {
                path: p,
                why: "unrecognised file contents".into(),
            });
        }
        Some(image::ImageFormat::Jpeg) if !jpeg_is_complete(&bytes) => {
            return Err(ImageError::Truncated { path: p });
        }
        Some(image::ImageFormat::Jpeg) => {
            return jpeg::decode(&bytes).map_err(|why| ImageError::Decode { path: p, why });
        }
        _ => {}
    }
    let mut limits = image::Limits::default();
    limits.max_image_width = Some(MAX_DECODE_SIDE);
    limits.max_image_height = Some(MAX_DECODE_SIDE);
    limits.max_alloc = Some(MAX_DECODE_BYTES);
    reader.limits(limits);
    let img = reader.decode().map_err(|e| decode_error(&p, e))?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::Empty { path: p });
    }
    Ok(img.to_rgb8())
}

fn decode_error(path: &str, e: image::ImageError) -> ImageError {
    match e {
        image::ImageError::Unsupported(u) => ImageError::Unsupported {
            path: path.to_string(),
            why: u.to_string(),
        },
        other => ImageError::Decode {
            path: path.to_string(),
            why: other.to_string(),
        },
    }
}

/// Width and height from an image file's header alone (a regular file only).
pub fn image_dimensions(path: &Path) -> Result<(usize, usize), ImageError> {
    let p = path.display().to_string();
    let io = |e: std::io::Error| ImageError::Io {
        path: p.clone(),
        source: e,
    };
    if !std::fs::metadata(path).map_err(io)?.is_file() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not a regular file",
        )));
    }
    let reader = image::ImageReader::open(path)
        .map_err(io)?
        .with_guessed_format()
        .map_err(io)?;
    if reader.format().is_none() {
        return Err(ImageError::Unsupported {
            path: p,
            why: "unrecognised file contents".into(),
        });
    }
    let (w, h) = reader.into_dimensions().map_err(|e| decode_error(&p, e))?;
    Ok((w as usize, h as usize))
}

/// Whether a `w x h` image can go through `p`'s resize (see [`resize_shorter`]).
pub fn check_resizable(w: usize, h: usize, p: &Preprocess) -> Result<(), ImageError> {
    if p.resize_mode == ResizeMode::Squash {
        return Ok(());
    }
    let long = (p.resize as f64 * w.max(h) as f64 / w.min(h).max(1) as f64).round();
    if long > MAX_SIDE as f64 {
        return Err(ImageError::TooLong {
            w,
            h,
            size: p.resize,
            long: long as usize,
        });
    }
    Ok(())
}

/// Resizes so the shorter side is `size`, the longer side `size * long / short` rounded as
/// `long_side` says. The longer side may not exceed [`MAX_SIDE`] (a 1x65535 strip would need
/// gigabytes).
pub fn resize_shorter(
    img: &RgbImage,
    size: usize,
    interpolation: Interpolation,
    long_side: LongSide,
) -> Result<RgbImage, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let long = |l: usize, s: usize| {
        let exact = size as f64 * l as f64 / s.max(1) as f64;
        match long_side {
            LongSide::Round => exact.round_ties_even(),
            LongSide::Truncate => exact.floor(),
        }
    };
    let (nw, nh) = if w <= h {
        (size as f64, long(h, w))
    } else {
        (long(w, h), size as f64)
    };
    if nw.max(nh) > MAX_SIDE as f64 {
        return Err(ImageError::TooLong {
            w,
            h,
            size,
            long: nw.max(nh) as usize,
        });
    }
    Ok(resize(
        img,
        (nw as usize).max(1),
        (nh as usize).max(1),
        interpolation,
    ))
}

/// torchvision's CenterCrop (offsets rounded half to even as Python's `round`).
pub fn center_crop(img: &RgbImage, size: usize) -> Result<RgbImage, ImageError> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < size || h < size {
        // Smaller than the crop: scale up first, as a user would expect rather than an error.
        let up = resize_shorter(img, size, Interpolation::Bicubic, LongSide::Round)?;
        return center_crop(&up, size);
    }
    let left = ((w - size) as f64 / 2.0).round_ties_even() as u32;
    let top = ((h - size) as f64 / 2.0).round_ties_even() as u32;
    Ok(image::imageops::crop_imm(img, left, top, size as u32, size as u32).to_image())
}

/// Normalises to a CHW float buffer: `(pixel - mean) / std` per channel.
pub fn normalize(img: &RgbImage, mean: [f32; 3], std: [f32; 3]) -> Vec<f32> {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let mut out = vec![0.0f32; 3 * w * h];
    for (i, p) in img.pixels().enumerate() {
        for c in 0..3 {
            out[c * w * h + i] = (p.0[c] as f32 - mean[c]) / std[c];
        }
    }
    out
}

/// The eval transform's geometry: resized and center-cropped to `p.crop` x `p.crop`.
pub fn eval_crop(img: &RgbImage, p: &Preprocess) -> Result<RgbImage, ImageError> {
    let resized = match p.resize_mode {
        ResizeMode::ShorterSide => resize_shorter(img, p.resize, p.interpolation, p.long_side)?,
        ResizeMode::Squash => resize(img, p.resize, p.resize, p.interpolation),
    };
    center_crop(&resized, p.crop)
}

/// The whole eval pipeline: returns CHW floats of side `p.crop`.
pub fn eval_transform(img: &RgbImage, p: &Preprocess) -> Result<Vec<f32>, ImageError> {
    Ok(normalize(&eval_crop(img, p)?, p.mean, p.std))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_and_crop_geometry() {
        let img = RgbImage::from_fn(600, 400, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        });
        let r = resize_shorter(&img, 256, Interpolation::Bicubic, LongSide::Round).unwrap();
        assert_eq!((r.width(), r.height()), (384, 256));
        // 773x512 to 256: 386.5 rounds half to even (386); torchvision truncates (386); 451x300:
        // 384.85 rounds to 385, truncates to 384.
        let odd = RgbImage::new(451, 300);
        let width = |l| {
            resize_shorter(&odd, 256, Interpolation::Bilinear, l)
                .unwrap()
                .width()
        };
        assert_eq!(
            (width(LongSide::Round), width(LongSide::Truncate)),
            (385, 384)
        );
        let half = RgbImage::new(773, 512);
        let w = resize_shorter(&half, 256, Interpolation::Bilinear, LongSide::Round).unwrap();
        assert_eq!(w.width(), 386);
        let c = center_crop(&r, 224).unwrap();
        assert_eq!((c.width(), c.height()), (224, 224));
        let x = normalize(&c, [127.0; 3], [128.0; 3]);
        assert_eq!(x.len(), 3 * 224 * 224);
        assert!((x[2 * 224 * 224] - (7.0 - 127.0) / 128.0).abs() < 1e-6);
        // Tiny images are scaled up rather than rejected.
        let tiny = RgbImage::new(10, 5);
        assert_eq!(center_crop(&tiny, 32).unwrap().dimensions(), (32, 32));
        // A 1x65535 strip would need a 12 GB resize buffer.
        let strip = RgbImage::new(1, 65535);
        let e = resize_shorter(&strip, 256, Interpolation::Bicubic, LongSide::Round).unwrap_err();
        assert!(e.to_string().contains("longer side would be"), "{e}");
    }

    #[test]
    fn jpegs_cut_inside_the_scan_are_truncated() {
        let mut buf = Vec::new();
        image::RgbImage::from_fn(64, 64, |x, y| image::Rgb([(x * 4) as u8, (y * 4) as u8, 9]))
            .write_to(
                &mut std::io::Cursor::new(&mut buf),
                image::ImageFormat::Jpeg,
            )
            .unwrap();
        assert!(jpeg_is_complete(&buf));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.jpg");
        std::fs::write(&path, &buf[..buf.len() * 3 / 4]).unwrap();
        let e = load_rgb(&path).unwrap_err().to_string();
        assert!(e.contains("truncated"), "{e}");
        std::fs::write(&path, &buf).unwrap();
        assert_eq!(load_rgb(&path).unwrap().dimensions(), (64, 64));
    }
}
