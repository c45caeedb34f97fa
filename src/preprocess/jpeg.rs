//! JPEG decoding with Pillow's pixels. Pretrained weights were evaluated on what Pillow decodes,
//! and JPEG decoders differ in their inverse DCT and chroma upsampling by a few levels per pixel,
//! enough to move probabilities by a few hundredths. Pillow uses libjpeg-turbo with its defaults:
//! the ISLOW integer IDCT and fancy (triangle-filter) chroma upsampling; this module runs the same
//! decoder (MozJPEG, libjpeg-turbo's fork, built from the crate's bundled C sources) with the same
//! settings, then converts to RGB as `Image.convert("RGB")` does (grey replicated; Adobe CMYK,
//! stored inverted, through Pillow's `cmyk2rgb`). EXIF orientation is ignored, as the torchvision
//! and timm pipelines ignore it.

use image::RgbImage;
use mozjpeg::{ColorSpace, DctMethod, Decompress};

/// Decodes JPEG `data` to RGB; a libjpeg error message on failure.
pub fn decode(data: &[u8]) -> Result<RgbImage, String> {
    // libjpeg reports fatal errors by unwinding through the C code (mozjpeg's error manager).
    std::panic::catch_unwind(|| decode_inner(data)).unwrap_or_else(|e| {
        Err(e
            .downcast_ref::<String>()
            .cloned()
            .unwrap_or_else(|| "libjpeg failed".into()))
    })
}

fn decode_inner(data: &[u8]) -> Result<RgbImage, String> {
    let mut d = Decompress::with_markers(&[mozjpeg::Marker::APP(14)])
        .from_mem(data)
        .map_err(|e| e.to_string())?;
    d.dct_method(DctMethod::IntegerSlow);
    d.do_fancy_upsampling(true);
    let (w, h) = d.size();
    let side = super::MAX_DECODE_SIDE as usize;
    if w > side || h > side || (w * h * 4) as u64 > super::MAX_DECODE_BYTES {
        return Err(format!("{w}x{h} pixels is larger than the decoder accepts"));
    }
    let adobe = d.markers().any(|m| m.data.starts_with(b"Adobe"));
    let cmyk = matches!(d.color_space(), ColorSpace::JCS_CMYK | ColorSpace::JCS_YCCK);
    let rgb: Vec<u8> = if cmyk {
        let mut started = d
            .to_colorspace(ColorSpace::JCS_CMYK)
            .map_err(|e| e.to_string())?;
        let px = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        px.chunks_exact(4)
            .flat_map(|p| {
                // Adobe writes CMYK inverted; Pillow reads it as "CMYK;I".
                let v = |i: usize| if adobe { 255 - p[i] } else { p[i] };
                cmyk_to_rgb([v(0), v(1), v(2), v(3)])
            })
            .collect()
    } else {
        let mut started = d.rgb().map_err(|e| e.to_string())?;
        let px = started.read_scanlines::<u8>().map_err(|e| e.to_string())?;
        started.finish().map_err(|e| e.to_string())?;
        px
    };
    RgbImage::from_raw(w as u32, h as u32, rgb).ok_or_else(|| "short scanlines".into())
}

/// Pillow's `cmyk2rgb`: `255 - k - c * (255 - k) / 255` per channel, with its rounding.
fn cmyk_to_rgb([c, m, y, k]: [u8; 4]) -> [u8; 3] {
    let nk = 255 - k as i32;
    let muldiv255 = |a: i32, b: i32| {
        let t = a * b + 128;
        ((t >> 8) + t) >> 8
    };
    [c, m, y].map(|v| (nk - muldiv255(v as i32, nk)).clamp(0, 255) as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every fixture decodes to exactly the pixels Pillow gives (4:2:0, progressive, 4:2:2, 4:4:4,
    /// grey, CMYK and real camera files).
    #[test]
    fn pillow_pixels_exactly() {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../shared/fixtures/jpeg");
        if !dir.exists() {
            eprintln!("skipping: shared/fixtures/jpeg not found");
            return;
        }
        let (oracle, _) =
            crate::weights::read_tensors(&dir.join("pillow_rgb.safetensors")).unwrap();
        assert!(oracle.len() >= 10);
        for (stem, want) in &oracle {
            let data = std::fs::read(dir.join(format!("{stem}.jpg"))).unwrap();
            let got = decode(&data).unwrap();
            let (h, w) = (want.shape[0], want.shape[1]);
            assert_eq!(
                (got.width() as usize, got.height() as usize),
                (w, h),
                "{stem}"
            );
            let diff = got
                .as_raw()
                .iter()
                .zip(&want.data)
                .map(|(a, b)| (*a as f32 - b).abs())
                .fold(0.0, f32::max);
            assert_eq!(diff, 0.0, "{stem}: max |diff| {diff}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_crash() {
        assert!(decode(b"\xff\xd8\xff\xe0 not really").is_err());
        assert!(decode(b"").is_err());
    }
}
