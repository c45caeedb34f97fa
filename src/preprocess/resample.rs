//! Pillow's convolution resampling (`Image.resize` with BICUBIC / BILINEAR), reproduced exactly.
//!
//! Hand-written because pretrained weights were evaluated on Pillow's output, which
//! `fast_image_resize` and `image` do not reproduce; this matches it to the 8-bit level
//! (`preprocessing_reproduces_the_pytorch_input`). Same algorithm as
//! Pillow's `Resample.c`: separable, horizontal pass first, 8-bit intermediate, fixed-point weights
//! with 22 fractional bits, support widened by the scale factor when downsampling (antialiasing).

use image::RgbImage;

use crate::preprocess::Interpolation;

const PRECISION_BITS: u32 = 32 - 8 - 2;

fn bicubic(x: f64) -> f64 {
    const A: f64 = -0.5;
    let x = x.abs();
    if x < 1.0 {
        ((A + 2.0) * x - (A + 3.0)) * x * x + 1.0
    } else if x < 2.0 {
        (((x - 5.0) * x + 8.0) * x - 4.0) * A
    } else {
        0.0
    }
}

fn bilinear(x: f64) -> f64 {
    let x = x.abs();
    if x < 1.0 { 1.0 - x } else { 0.0 }
}

/// Per output pixel: first input index and fixed-point weights.
struct Coefficients {
    bounds: Vec<(usize, usize)>,
    ksize: usize,
    weights: Vec<i32>,
}

fn coefficients(in_size: usize, out_size: usize, interpolation: Interpolation) -> Coefficients {
    let (filter, support): (fn(f64) -> f64, f64) = match interpolation {
        Interpolation::Bicubic => (bicubic, 2.0),
        Interpolation::Bilinear => (bilinear, 1.0),
    };
    let scale = in_size as f64 / out_size as f64;
    let filterscale = scale.max(1.0);
    let support = support * filterscale;
    let ksize = support.ceil() as usize * 2 + 1;
    let mut bounds = Vec::with_capacity(out_size);
    let mut weights = vec![0i32; out_size * ksize];
    let mut k = vec![0f64; ksize];
    for xx in 0..out_size {
        let center = (xx as f64 + 0.5) * scale;
        let ss = 1.0 / filterscale;
        // Pillow truncates toward zero with (int) casts here.
        let xmin = ((center - support + 0.5) as i64).max(0) as usize;
        let xmax =
            (((center + support + 0.5) as i64).min(in_size as i64) as usize).saturating_sub(xmin);
        let mut total = 0.0;
        for (x, w) in k.iter_mut().enumerate().take(xmax) {
            *w = filter((x as f64 + xmin as f64 - center + 0.5) * ss);
            total += *w;
        }
        for x in 0..xmax {
            let w = if total != 0.0 { k[x] / total } else { k[x] };
            let fixed = w * (1u64 << PRECISION_BITS) as f64;
            weights[xx * ksize + x] = if fixed < 0.0 {
                (fixed - 0.5) as i32
            } else {
                (fixed + 0.5) as i32
            };
        }
        bounds.push((xmin, xmax));
    }
    Coefficients {
        bounds,
        ksize,
        weights,
    }
}

fn clip8(acc: i64) -> u8 {
    (acc >> PRECISION_BITS).clamp(0, 255) as u8
}

/// Resizes RGB `img` to `width` x `height` exactly as Pillow does.
pub fn resize(
    img: &RgbImage,
    width: usize,
    height: usize,
    interpolation: Interpolation,
) -> RgbImage {
    let (w, h) = (img.width() as usize, img.height() as usize);
    if (w, h) == (width, height) {
        return img.clone();
    }
    let src = img.as_raw();
    let rounding = 1i64 << (PRECISION_BITS - 1);
    // Horizontal pass: h rows of `width` pixels.
    let horizontal = if width != w {
        let c = coefficients(w, width, interpolation);
        let mut out = vec![0u8; h * width * 3];
        for y in 0..h {
            for (xx, &(xmin, xmax)) in c.bounds.iter().enumerate() {
                let k = &c.weights[xx * c.ksize..xx * c.ksize + xmax];
                for ch in 0..3 {
                    let mut acc = rounding;
                    for (x, &wgt) in k.iter().enumerate() {
                        acc += src[(y * w + xmin + x) * 3 + ch] as i64 * wgt as i64;
                    }
                    out[(y * width + xx) * 3 + ch] = clip8(acc);
                }
            }
        }
        out
    } else {
        src.clone()
    };
    // Vertical pass.
    let out = if height != h {
        let c = coefficients(h, height, interpolation);
        let mut out = vec![0u8; height * width * 3];
        for (yy, &(ymin, ymax)) in c.bounds.iter().enumerate() {
            let k = &c.weights[yy * c.ksize..yy * c.ksize + ymax];
            for x in 0..width {
                for ch in 0..3 {
                    let mut acc = rounding;
                    for (y, &wgt) in k.iter().enumerate() {
                        acc += horizontal[((ymin + y) * width + x) * 3 + ch] as i64 * wgt as i64;
                    }
                    out[(yy * width + x) * 3 + ch] = clip8(acc);
                }
            }
        }
        out
    } else {
        horizontal
    };
    RgbImage::from_raw(width as u32, height as u32, out).expect("buffer matches dimensions")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn constant_images_stay_constant_and_weights_sum_to_one() {
        let img = RgbImage::from_pixel(37, 23, image::Rgb([200, 10, 99]));
        for interp in [Interpolation::Bicubic, Interpolation::Bilinear] {
            let r = resize(&img, 11, 50, interp);
            assert!(r.pixels().all(|p| p.0 == [200, 10, 99]));
            let c = coefficients(37, 11, interp);
            for (i, &(_, n)) in c.bounds.iter().enumerate() {
                let s: i64 = c.weights[i * c.ksize..i * c.ksize + n]
                    .iter()
                    .map(|&w| w as i64)
                    .sum();
                assert!((s - (1 << PRECISION_BITS)).abs() <= n as i64, "{s}");
            }
        }
    }
}
