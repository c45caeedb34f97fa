//! Image decoding and the eval preprocessing a weight set asks for: resize the shorter side
//! (Pillow-exact convolution resampling), center crop, normalise.

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

/// Eval preprocessing: resize to `resize`, center-crop `crop`, then `(pixel - mean) / std` with
/// pixels in 0..=255.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Preprocess {
    pub resize: usize,
    pub crop: usize,
    #[serde(default)]
    pub resize_mode: ResizeMode,
    pub interpolation: Interpolation,
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

/// Largest side a transform may resize or crop to.
pub const MAX_SIDE: usize = 8192;

impl Preprocess {
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
}

/// Decodes an image file to 8-bit RGB (grey and alpha images are converted).
pub fn load_rgb(path: &Path) -> Result<RgbImage, ImageError> {
    let p = path.display().to_string();
    let reader = image::ImageReader::open(path)
        .map_err(|e| ImageError::Io {
            path: p.clone(),
            source: e,
        })?
        .with_guessed_format()
        .map_err(|e| ImageError::Io {
            path: p.clone(),
            source: e,
        })?;
    if reader.format().is_none() {
        return Err(ImageError::Unsupported {
            path: p,
            why: "unrecognised file contents".into(),
        });
    }
    let img = reader.decode().map_err(|e| match e {
        image::ImageError::Unsupported(u) => ImageError::Unsupported {
            path: p.clone(),
            why: u.to_string(),
        },
        other => ImageError::Decode {
            path: p.clone(),
            why: other.to_string(),
        },
    })?;
    if img.width() == 0 || img.height() == 0 {
        return Err(ImageError::Empty { path: p });
    }
    Ok(img.to_rgb8())
}

/// Resizes so the shorter side is `size`, the longer side `round(size * long / short)` (the project's
/// PyTorch oracles round; torchvision truncates, which differs by one pixel for some aspect ratios).
pub fn resize_shorter(img: &RgbImage, size: usize, interpolation: Interpolation) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    let long = |l: usize, s: usize| (size as f64 * l as f64 / s as f64).round() as usize;
    let (nw, nh) = if w <= h {
        (size, long(h, w))
    } else {
        (long(w, h), size)
    };
    resize(img, nw.max(1), nh.max(1), interpolation)
}

/// torchvision's CenterCrop (offsets rounded half to even as Python's `round`).
pub fn center_crop(img: &RgbImage, size: usize) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if w < size || h < size {
        // Smaller than the crop: scale up first, as a user would expect rather than an error.
        let up = resize_shorter(img, size, Interpolation::Bicubic);
        return center_crop(&up, size);
    }
    let left = ((w - size) as f64 / 2.0).round_ties_even() as u32;
    let top = ((h - size) as f64 / 2.0).round_ties_even() as u32;
    image::imageops::crop_imm(img, left, top, size as u32, size as u32).to_image()
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

/// The whole eval pipeline: returns CHW floats of side `p.crop`.
pub fn eval_transform(img: &RgbImage, p: &Preprocess) -> Vec<f32> {
    let resized = match p.resize_mode {
        ResizeMode::ShorterSide => resize_shorter(img, p.resize, p.interpolation),
        ResizeMode::Squash => resize(img, p.resize, p.resize, p.interpolation),
    };
    normalize(&center_crop(&resized, p.crop), p.mean, p.std)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shorter_side_and_crop_geometry() {
        let img = RgbImage::from_fn(600, 400, |x, y| {
            image::Rgb([(x % 256) as u8, (y % 256) as u8, 7])
        });
        let r = resize_shorter(&img, 256, Interpolation::Bicubic);
        assert_eq!((r.width(), r.height()), (384, 256));
        let c = center_crop(&r, 224);
        assert_eq!((c.width(), c.height()), (224, 224));
        let x = normalize(&c, [127.0; 3], [128.0; 3]);
        assert_eq!(x.len(), 3 * 224 * 224);
        assert!((x[2 * 224 * 224] - (7.0 - 127.0) / 128.0).abs() < 1e-6);
        // Tiny images are scaled up rather than rejected.
        let tiny = RgbImage::new(10, 5);
        assert_eq!(center_crop(&tiny, 32).dimensions(), (32, 32));
    }
}
