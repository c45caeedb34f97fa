//! Training augmentation on 8-bit RGB images, following the TF EfficientNet reference
//! (`autoaugment.py` and `preprocessing.py`): random-resized crop, horizontal flip, AutoAugment
//! policy v0 and RandAugment(N, M), all driven by a caller-seeded RNG so that runs reproduce.
//!
//! Two deliberate departures from the TF code, both because its constants assume 224-pixel images:
//! translation and cutout sizes are scaled to the image side (TF: 250 / 100 pixels for AutoAugment
//! and 100 / 40 for RandAugment, at 224), and Contrast blends towards the mean grey level (TF's
//! version divides the pixel count by 256 instead, a known bug that makes it depend on image size).

use image::RgbImage;
use rand::Rng;
use rand::rngs::StdRng;

use crate::preprocess::Interpolation;
use crate::preprocess::resize;

/// TF's `_MAX_LEVEL`: magnitudes run from 0 to 10.
const MAX_LEVEL: f32 = 10.0;
/// Fill value for pixels that geometric ops uncover (TF: `replace = [128, 128, 128]`).
const REPLACE: u8 = 128;

/// The augmentation operations of AutoAugment and RandAugment.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Op {
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    SolarizeAdd,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Cutout,
}

use Op::*;

/// RandAugment's pool, in the TF order.
const RAND_OPS: [Op; 16] = [
    AutoContrast,
    Equalize,
    Invert,
    Rotate,
    Posterize,
    Solarize,
    Color,
    Contrast,
    Brightness,
    Sharpness,
    ShearX,
    ShearY,
    TranslateX,
    TranslateY,
    Cutout,
    SolarizeAdd,
];

/// AutoAugment policy "v0" of the TF EfficientNet code: 25 sub-policies of two
/// (operation, probability, level) steps; one sub-policy is picked per image.
const POLICY_V0: [[(Op, f32, u8); 2]; 25] = [
    [(Equalize, 0.8, 1), (ShearY, 0.8, 4)],
    [(Color, 0.4, 9), (Equalize, 0.6, 3)],
    [(Color, 0.4, 1), (Rotate, 0.6, 8)],
    [(Solarize, 0.8, 3), (Equalize, 0.4, 7)],
    [(Solarize, 0.4, 2), (Solarize, 0.6, 2)],
    [(Color, 0.2, 0), (Equalize, 0.8, 8)],
    [(Equalize, 0.4, 8), (SolarizeAdd, 0.8, 3)],
    [(ShearX, 0.2, 9), (Rotate, 0.6, 8)],
    [(Color, 0.6, 1), (Equalize, 1.0, 2)],
    [(Invert, 0.4, 9), (Rotate, 0.6, 0)],
    [(Equalize, 1.0, 9), (ShearY, 0.6, 3)],
    [(Color, 0.4, 7), (Equalize, 0.6, 0)],
    [(Posterize, 0.4, 6), (AutoContrast, 0.4, 7)],
    [(Solarize, 0.6, 8), (Color, 0.6, 9)],
    [(Solarize, 0.2, 4), (Rotate, 0.8, 9)],
    [(Rotate, 1.0, 7), (TranslateY, 0.8, 9)],
    [(ShearX, 0.0, 0), (Solarize, 0.8, 4)],
    [(ShearY, 0.8, 0), (Color, 0.6, 4)],
    [(Color, 1.0, 0), (Rotate, 0.6, 2)],
    [(Equalize, 0.8, 4), (Equalize, 0.0, 8)],
    [(Equalize, 1.0, 4), (AutoContrast, 0.6, 2)],
    [(ShearY, 0.4, 7), (SolarizeAdd, 0.6, 7)],
    [(Posterize, 0.8, 2), (Solarize, 0.6, 10)],
    [(Solarize, 0.6, 8), (Equalize, 0.6, 1)],
    [(Color, 0.8, 6), (Rotate, 0.4, 5)],
];

/// Which learned augmentation runs after cropping and flipping.
#[derive(Debug, Clone, Copy, PartialEq, Default)]
pub enum Policy {
    #[default]
    None,
    /// AutoAugment, policy v0.
    AutoAugment,
    /// RandAugment: `n` random operations at magnitude `m` (0-10; larger is stronger).
    RandAugment { n: usize, m: f32 },
}

impl std::str::FromStr for Policy {
    type Err = String;

    /// `none`, `v0` (or `autoaugment`), or `rand-nN-mM` (timm's spelling; `rand` alone is N=2, M=10).
    fn from_str(s: &str) -> Result<Self, String> {
        let bad = || format!("unknown augmentation `{s}`: expected `none`, `v0` or `rand-n2-m10`");
        match s {
            "none" | "" => return Ok(Policy::None),
            "v0" | "autoaugment" => return Ok(Policy::AutoAugment),
            _ => {}
        }
        let mut parts = s.split('-');
        if parts.next() != Some("rand") {
            return Err(bad());
        }
        let (mut n, mut m) = (2, 10.0);
        for part in parts {
            if let Some(v) = part.strip_prefix('n') {
                n = v.parse().map_err(|_| bad())?;
            } else if let Some(v) = part.strip_prefix('m') {
                m = v.parse().map_err(|_| bad())?;
            } else {
                return Err(bad());
            }
        }
        if !(0.0..=30.0).contains(&m) {
            return Err(format!("RandAugment magnitude {m} is outside 0..=30"));
        }
        Ok(Policy::RandAugment { n, m })
    }
}

impl std::fmt::Display for Policy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Policy::None => write!(f, "none"),
            Policy::AutoAugment => write!(f, "v0"),
            Policy::RandAugment { n, m } => write!(f, "rand-n{n}-m{m}"),
        }
    }
}

impl serde::Serialize for Policy {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> serde::Deserialize<'de> for Policy {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = String::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// How a training image becomes a `size x size` crop.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Crop {
    /// Shift by up to `pad` pixels in each direction, zero-filled (the CIFAR-style crop).
    Padded { pad: usize },
    /// Inception-style random-resized crop: area 0.08-1, aspect 3/4-4/3, bicubic resize.
    RandomResized,
}

/// The full training augmentation for one epoch (or one progressive-learning stage).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Augment {
    pub crop: Crop,
    pub flip: bool,
    pub policy: Policy,
    /// Output side (progressive learning changes it per stage).
    pub size: usize,
}

impl Augment {
    /// Applies crop, flip and policy to `img`.
    pub fn apply(&self, img: &RgbImage, rng: &mut StdRng) -> RgbImage {
        let mut out = match self.crop {
            Crop::Padded { pad } => {
                // Progressive learning trains below the stored size; otherwise no copy.
                let resized;
                let img = if img.dimensions() != (self.size as u32, self.size as u32) {
                    resized = resize(img, self.size, self.size, Interpolation::Bilinear);
                    &resized
                } else {
                    img
                };
                let p = pad as i64;
                let (dy, dx) = (rng.random_range(-p..=p), rng.random_range(-p..=p));
                let mut out = shift(img, -dx, -dy, 0);
                if self.flip && rng.random_bool(0.5) {
                    image::imageops::flip_horizontal_in_place(&mut out);
                }
                out
            }
            Crop::RandomResized => {
                let mut img = random_resized_crop(img, self.size, rng);
                if self.flip && rng.random_bool(0.5) {
                    image::imageops::flip_horizontal_in_place(&mut img);
                }
                img
            }
        };
        match self.policy {
            Policy::None => {}
            Policy::AutoAugment => {
                let sub = POLICY_V0[rng.random_range(0..POLICY_V0.len())];
                for (op, prob, level) in sub {
                    // TF: floor(uniform + prob) — applied with probability `prob`.
                    if rng.random::<f32>() < prob {
                        out = apply_op(op, &out, level as f32, Consts::AUTO, rng);
                    }
                }
            }
            Policy::RandAugment { n, m } => {
                // TF draws a probability per layer but never uses it: each chosen op always applies.
                for _ in 0..n {
                    let op = RAND_OPS[rng.random_range(0..RAND_OPS.len())];
                    out = apply_op(op, &out, m, Consts::RAND, rng);
                }
            }
        }
        out
    }
}

/// TF's translate/cutout constants (pixels at 224), scaled to the image side when applied.
#[derive(Clone, Copy)]
struct Consts {
    translate: f32,
    cutout: f32,
}

impl Consts {
    const AUTO: Consts = Consts {
        translate: 250.0,
        cutout: 100.0,
    };
    const RAND: Consts = Consts {
        translate: 100.0,
        cutout: 40.0,
    };
}

/// Random-resized crop as TF's `distorted_bounding_box_crop` (10 attempts, then the central crop
/// of the whole image), resized to `size x size` with bicubic interpolation.
pub fn random_resized_crop(img: &RgbImage, size: usize, rng: &mut StdRng) -> RgbImage {
    let (w, h) = (img.width() as f64, img.height() as f64);
    let mut window = (0, 0, img.width(), img.height());
    for _ in 0..10 {
        let area = w * h * rng.random_range(0.08..=1.0);
        let log_ratio = rng.random_range((3.0f64 / 4.0).ln()..=(4.0f64 / 3.0).ln());
        let ratio = log_ratio.exp();
        let cw = (area * ratio).sqrt().round();
        let ch = (area / ratio).sqrt().round();
        if cw >= 1.0 && ch >= 1.0 && cw <= w && ch <= h {
            let x = rng.random_range(0..=(w - cw) as u32);
            let y = rng.random_range(0..=(h - ch) as u32);
            window = (x, y, cw as u32, ch as u32);
            break;
        }
    }
    let (x, y, cw, ch) = window;
    let crop = image::imageops::crop_imm(img, x, y, cw, ch).to_image();
    resize(&crop, size, size, Interpolation::Bicubic)
}

fn apply_op(op: Op, img: &RgbImage, level: f32, consts: Consts, rng: &mut StdRng) -> RgbImage {
    let frac = level / MAX_LEVEL;
    let mut negate = |v: f32| if rng.random_bool(0.5) { -v } else { v };
    let side = img.width().max(img.height()) as f32;
    match op {
        AutoContrast => autocontrast(img),
        Equalize => equalize(img),
        Invert => map(img, |v| 255 - v),
        Rotate => rotate(img, negate(frac * 30.0)),
        Posterize => {
            let bits = (frac * 4.0) as u32;
            let shift = 8 - bits.min(8);
            map(img, |v| ((v as u32 >> shift) << shift).min(255) as u8)
        }
        Solarize => {
            let threshold = (frac * 256.0) as u32;
            map(img, |v| if (v as u32) < threshold { v } else { 255 - v })
        }
        SolarizeAdd => {
            let add = (frac * 110.0) as i32;
            map(img, |v| {
                if v < 128 {
                    (v as i32 + add).clamp(0, 255) as u8
                } else {
                    v
                }
            })
        }
        Color => blend(&grey(img), img, enhance(frac)),
        Contrast => {
            let g = grey(img);
            let mean = g.pixels().map(|p| p[0] as f64).sum::<f64>() / g.pixels().len() as f64;
            let flat = RgbImage::from_pixel(img.width(), img.height(), image::Rgb([mean as u8; 3]));
            blend(&flat, img, enhance(frac))
        }
        Brightness => {
            let black = RgbImage::new(img.width(), img.height());
            blend(&black, img, enhance(frac))
        }
        Sharpness => blend(&smooth(img), img, enhance(frac)),
        ShearX => {
            let s = negate(frac * 0.3);
            affine(img, [1.0, s, 0.0, 0.0, 1.0, 0.0])
        }
        ShearY => {
            let s = negate(frac * 0.3);
            affine(img, [1.0, 0.0, 0.0, s, 1.0, 0.0])
        }
        TranslateX => {
            let t = negate(frac * consts.translate * side / 224.0);
            shift(img, t.round() as i64, 0, REPLACE)
        }
        TranslateY => {
            let t = negate(frac * consts.translate * side / 224.0);
            shift(img, 0, t.round() as i64, REPLACE)
        }
        Cutout => {
            let pad = (frac * consts.cutout * side / 224.0) as i64;
            cutout(img, pad, rng)
        }
    }
}

/// TF's `_enhance_level_to_arg`: factor 0.1 at level 0 to 1.9 at level 10.
fn enhance(frac: f32) -> f32 {
    frac * 1.8 + 0.1
}

fn map(img: &RgbImage, f: impl Fn(u8) -> u8) -> RgbImage {
    let mut out = img.clone();
    out.iter_mut().for_each(|v| *v = f(*v));
    out
}

/// TF's `blend`: `a + factor * (b - a)`, truncated when interpolating, clamped when extrapolating.
fn blend(a: &RgbImage, b: &RgbImage, factor: f32) -> RgbImage {
    let mut out = b.clone();
    for (o, (&x, &y)) in out.iter_mut().zip(a.iter().zip(b.iter())) {
        let v = x as f32 + factor * (y as f32 - x as f32);
        *o = v.clamp(0.0, 255.0) as u8;
    }
    out
}

/// `tf.image.rgb_to_grayscale` on uint8, back to three channels.
fn grey(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for p in out.pixels_mut() {
        let [r, g, b] = p.0;
        let y = (0.2989 * r as f32 + 0.587 * g as f32 + 0.114 * b as f32) / 255.0;
        p.0 = [(y * 255.5).min(255.0) as u8; 3];
    }
    out
}

/// PIL's SMOOTH kernel ([[1,1,1],[1,5,1],[1,1,1]] / 13) inside, the original on the border.
fn smooth(img: &RgbImage) -> RgbImage {
    let (w, h) = (img.width(), img.height());
    let mut out = img.clone();
    for y in 1..h.saturating_sub(1) {
        for x in 1..w.saturating_sub(1) {
            for c in 0..3 {
                let mut sum = 0.0;
                for dy in 0..3 {
                    for dx in 0..3 {
                        let weight = if dy == 1 && dx == 1 { 5.0 } else { 1.0 };
                        sum += weight * img.get_pixel(x + dx - 1, y + dy - 1)[c] as f32;
                    }
                }
                out.get_pixel_mut(x, y)[c] = (sum / 13.0).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// Per-channel stretch of [min, max] to [0, 255].
fn autocontrast(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for c in 0..3 {
        let (lo, hi) = img
            .pixels()
            .fold((255u8, 0u8), |(lo, hi), p| (lo.min(p[c]), hi.max(p[c])));
        if hi > lo {
            let scale = 255.0 / (hi - lo) as f32;
            let offset = -(lo as f32) * scale;
            for p in out.pixels_mut() {
                p[c] = (p[c] as f32 * scale + offset).clamp(0.0, 255.0) as u8;
            }
        }
    }
    out
}

/// PIL's (and TF's) per-channel histogram equalisation.
fn equalize(img: &RgbImage) -> RgbImage {
    let mut out = img.clone();
    for c in 0..3 {
        let mut hist = [0u32; 256];
        img.pixels().for_each(|p| hist[p[c] as usize] += 1);
        let last = hist.iter().rev().find(|&&n| n > 0).copied().unwrap_or(0);
        let step = (hist.iter().sum::<u32>() - last) / 255;
        if step == 0 {
            continue;
        }
        let mut lut = [0u8; 256];
        let mut cum = 0;
        for (v, &n) in hist.iter().enumerate() {
            lut[v] = ((cum + step / 2) / step).min(255) as u8;
            cum += n;
        }
        for p in out.pixels_mut() {
            p[c] = lut[p[c] as usize];
        }
    }
    out
}

/// Output pixel (x, y) takes input (x - dx, y - dy); uncovered pixels get `fill`.
fn shift(img: &RgbImage, dx: i64, dy: i64, fill: u8) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (sx, sy) = (x as i64 - dx, y as i64 - dy);
        if sx < 0 || sy < 0 || sx >= w || sy >= h {
            image::Rgb([fill; 3])
        } else {
            *img.get_pixel(sx as u32, sy as u32)
        }
    })
}

/// Projective transform as `tfa.image.transform` with nearest-neighbour sampling: output (x, y)
/// reads input (a0 x + a1 y + a2, b0 x + b1 y + b2); outside pixels get the fill grey.
fn affine(img: &RgbImage, m: [f32; 6]) -> RgbImage {
    let (w, h) = (img.width() as f32, img.height() as f32);
    RgbImage::from_fn(img.width(), img.height(), |x, y| {
        let (x, y) = (x as f32, y as f32);
        let sx = (m[0] * x + m[1] * y + m[2]).round();
        let sy = (m[3] * x + m[4] * y + m[5]).round();
        if sx < 0.0 || sy < 0.0 || sx >= w || sy >= h {
            image::Rgb([REPLACE; 3])
        } else {
            *img.get_pixel(sx as u32, sy as u32)
        }
    })
}

/// Rotation by `degrees` about the image centre (positive = counter-clockwise, as TF's).
fn rotate(img: &RgbImage, degrees: f32) -> RgbImage {
    let (sin, cos) = degrees.to_radians().sin_cos();
    let (cx, cy) = (
        (img.width() as f32 - 1.0) / 2.0,
        (img.height() as f32 - 1.0) / 2.0,
    );
    // Inverse map: input = R(-angle) (output - centre) + centre.
    affine(
        img,
        [
            cos,
            -sin,
            cx - cos * cx + sin * cy,
            sin,
            cos,
            cy - sin * cx - cos * cy,
        ],
    )
}

/// Fills a `2 pad x 2 pad` square at a random centre with the fill grey (TF's `cutout`).
fn cutout(img: &RgbImage, pad: i64, rng: &mut StdRng) -> RgbImage {
    let (w, h) = (img.width() as i64, img.height() as i64);
    let (cy, cx) = (rng.random_range(0..h), rng.random_range(0..w));
    let mut out = img.clone();
    for y in (cy - pad).max(0)..(cy + pad).min(h) {
        for x in (cx - pad).max(0)..(cx + pad).min(w) {
            out.put_pixel(x as u32, y as u32, image::Rgb([REPLACE; 3]));
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    fn ramp(side: u32) -> RgbImage {
        RgbImage::from_fn(side, side, |x, y| {
            image::Rgb([(x * 8) as u8, (y * 8) as u8, ((x + y) * 4) as u8])
        })
    }

    #[test]
    fn policy_strings_round_trip() {
        for s in ["none", "v0", "rand-n2-m10", "rand-n3-m7.5"] {
            let p: Policy = s.parse().unwrap();
            assert_eq!(p.to_string(), s);
        }
        assert_eq!(
            "rand".parse::<Policy>().unwrap(),
            Policy::RandAugment { n: 2, m: 10.0 }
        );
        assert!("rand-x1".parse::<Policy>().is_err());
        assert!("v1".parse::<Policy>().is_err());
        assert!("rand-m99".parse::<Policy>().is_err());
    }

    #[test]
    fn pixel_ops_match_their_definitions() {
        let img = ramp(32);
        // Solarize at level 5: threshold 128; values >= 128 invert.
        let s = apply_op(
            Solarize,
            &img,
            5.0,
            Consts::AUTO,
            &mut StdRng::seed_from_u64(0),
        );
        assert_eq!(s.get_pixel(31, 0)[0], 255 - 248);
        assert_eq!(s.get_pixel(16, 16)[2], 255 - 128);
        assert_eq!(s.get_pixel(15, 0)[0], 120);
        // Posterize at level 6: int(2.4) = 2 bits kept.
        let p = apply_op(
            Posterize,
            &img,
            6.0,
            Consts::AUTO,
            &mut StdRng::seed_from_u64(0),
        );
        assert!(p.iter().all(|&v| v & 0x3f == 0));
        // Brightness level 10 (factor 1.9) doubles-ish and clamps; level 0 (0.1) darkens.
        let b = apply_op(
            Brightness,
            &img,
            0.0,
            Consts::AUTO,
            &mut StdRng::seed_from_u64(0),
        );
        assert_eq!(b.get_pixel(15, 0)[0], 12); // 120 * 0.1, truncated
        // Equalize spreads a two-level image (512 pixels each) to 0 and 255: step = 512 / 255 = 2,
        // lut[20] = (512 + 1) / 2 clipped. With too few pixels (step 0) it changes nothing.
        let two = RgbImage::from_fn(32, 32, |x, _| image::Rgb([if x < 16 { 10 } else { 20 }; 3]));
        let e = equalize(&two);
        assert_eq!((e.get_pixel(0, 0)[0], e.get_pixel(31, 0)[0]), (0, 255));
        let tiny = RgbImage::from_fn(4, 4, |x, _| image::Rgb([if x < 2 { 10 } else { 20 }; 3]));
        assert_eq!(equalize(&tiny), tiny);
        // Autocontrast stretches [10, 20] to [0, 255].
        let a = autocontrast(&tiny);
        assert_eq!((a.get_pixel(0, 0)[0], a.get_pixel(3, 0)[0]), (0, 255));
    }

    #[test]
    fn geometric_ops_move_pixels_and_fill_grey() {
        let img = ramp(16);
        let t = shift(&img, 3, 0, REPLACE);
        assert_eq!(t.get_pixel(3, 5), img.get_pixel(0, 5));
        assert_eq!(t.get_pixel(0, 5).0, [REPLACE; 3]);
        // A 90-degree rotation maps the top-left corner elsewhere and keeps the centre row/column set.
        let r = rotate(&img, 90.0);
        assert_eq!(r.get_pixel(0, 0), img.get_pixel(15, 0));
        assert_eq!(rotate(&img, 0.0), img);
        let s = affine(&img, [1.0, 0.5, 0.0, 0.0, 1.0, 0.0]);
        assert_eq!(s.get_pixel(0, 4), img.get_pixel(2, 4));
        assert_eq!(s.get_pixel(15, 15).0, [REPLACE; 3]);
    }

    #[test]
    fn augmentation_is_seeded_and_sized() {
        let img = ramp(28);
        for policy in [
            Policy::None,
            Policy::AutoAugment,
            Policy::RandAugment { n: 2, m: 9.0 },
        ] {
            let aug = Augment {
                crop: Crop::RandomResized,
                flip: true,
                policy,
                size: 24,
            };
            let a = aug.apply(&img, &mut StdRng::seed_from_u64(3));
            let b = aug.apply(&img, &mut StdRng::seed_from_u64(3));
            assert_eq!(a, b, "{policy}");
            assert_eq!(a.dimensions(), (24, 24));
            let others: Vec<RgbImage> = (4..12)
                .map(|s| aug.apply(&img, &mut StdRng::seed_from_u64(s)))
                .collect();
            assert!(others.iter().any(|o| *o != a), "{policy} ignores its seed");
        }
    }

    #[test]
    fn random_resized_crop_covers_8_to_100_percent() {
        let img = ramp(32);
        let mut rng = StdRng::seed_from_u64(1);
        // The crop of a constant-gradient image keeps its x range proportional to the window; a
        // crop of the full image keeps the full range, small crops a narrow one.
        let spans: Vec<u8> = (0..50)
            .map(|_| {
                let c = random_resized_crop(&img, 32, &mut rng);
                let row: Vec<u8> = (0..32).map(|x| c.get_pixel(x, 16)[0]).collect();
                row.iter().max().unwrap() - row.iter().min().unwrap()
            })
            .collect();
        assert!(spans.iter().any(|&s| s > 180), "{spans:?}");
        assert!(spans.iter().any(|&s| s < 120), "{spans:?}");
    }
}
