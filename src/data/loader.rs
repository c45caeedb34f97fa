//! Batches for training and evaluation from an [`InMemory`] dataset: images resized once to the
//! model resolution, seeded augmentation ([`Augment`]), normalisation, and a
//! background thread that prepares the next batch while the model trains on the current one.

use std::sync::mpsc::{Receiver, sync_channel};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use image::RgbImage;

use super::InMemory;
use super::augment::{Augment, Crop, Policy};
use crate::preprocess::Interpolation;
use crate::preprocess::resize;

/// A batch: NCHW float pixels and labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub size: usize,
    /// Image side (progressive learning varies it between stages).
    pub side: usize,
}

/// A dataset resized to `side x side` RGB, ready for batching.
#[derive(Debug, Clone)]
pub struct Prepared {
    pixels: Vec<u8>,
    pub labels: Vec<u32>,
    pub side: usize,
    pub num_classes: usize,
    /// `(pixel - mean) / std` per channel, pixels in 0..=255.
    pub mean: [f32; 3],
    pub std: [f32; 3],
}

impl Prepared {
    /// Resizes every image once (bilinear, Pillow-exact) and expands grey to 3 channels.
    pub fn new(data: &InMemory, side: usize) -> Self {
        let mut pixels = Vec::with_capacity(data.len() * side * side * 3);
        for i in 0..data.len() {
            let src = data.image(i);
            let rgb: Vec<u8> = match data.channels {
                1 => src.iter().flat_map(|&v| [v, v, v]).collect(),
                _ => src.to_vec(),
            };
            let img = image::RgbImage::from_raw(data.width as u32, data.height as u32, rgb)
                .expect("in-memory image matches its dimensions");
            pixels.extend_from_slice(resize(&img, side, side, Interpolation::Bilinear).as_raw());
        }
        Prepared {
            pixels,
            labels: data.labels.clone(),
            side,
            num_classes: data.num_classes(),
            mean: [127.5; 3],
            std: [127.5; 3],
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Sample `i` as an RGB image at the stored side.
    pub fn image(&self, i: usize) -> RgbImage {
        let s = self.side;
        let px = self.pixels[i * s * s * 3..(i + 1) * s * s * 3].to_vec();
        RgbImage::from_raw(s as u32, s as u32, px).expect("stored images are side x side RGB")
    }

    /// Writes an RGB image as normalised CHW floats into `out`.
    fn write(&self, img: &RgbImage, out: &mut [f32]) {
        let plane = (img.width() * img.height()) as usize;
        for (p, px) in img.pixels().enumerate() {
            for c in 0..3 {
                out[c * plane + p] = (px[c] as f32 - self.mean[c]) / self.std[c];
            }
        }
    }

    /// The batch of samples `indices`, augmented when `aug` is given (its size is the batch's side).
    pub fn batch(&self, indices: &[usize], aug: Option<(&Augment, &mut StdRng)>) -> Batch {
        let side = aug.as_ref().map_or(self.side, |(a, _)| a.size);
        let len = 3 * side * side;
        let mut images = vec![0.0; indices.len() * len];
        let mut aug = aug;
        for (b, &i) in indices.iter().enumerate() {
            let img = self.image(i);
            let img = match aug.as_mut() {
                Some((a, rng)) => a.apply(&img, rng),
                None => img,
            };
            self.write(&img, &mut images[b * len..(b + 1) * len]);
        }
        Batch {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            size: indices.len(),
            side,
        }
    }

    /// The default training augmentation at the stored side: a random shift of up to side/8 pixels
    /// (zero-filled) and a horizontal flip.
    pub fn default_augment(&self) -> Augment {
        Augment {
            crop: Crop::Padded {
                pad: (self.side / 8).max(1),
            },
            flip: true,
            policy: Policy::None,
            size: self.side,
        }
    }

    /// Shuffled, augmented training batches for one epoch, prepared on a background thread; the
    /// order and augmentation depend only on `seed` and `epoch`.
    pub fn epoch(&self, batch_size: usize, seed: u64, epoch: u64, aug: Augment) -> Receiver<Batch> {
        let (tx, rx) = sync_channel(2);
        let data = self.clone();
        std::thread::spawn(move || {
            let mut rng = StdRng::seed_from_u64(seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15));
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut rng);
            for chunk in order.chunks_exact(batch_size) {
                if tx.send(data.batch(chunk, Some((&aug, &mut rng)))).is_err() {
                    return;
                }
            }
        });
        rx
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> InMemory {
        InMemory {
            pixels: (0..4 * 4 * 4).map(|i| (i * 4) as u8).collect(),
            labels: vec![0, 1, 2, 3],
            height: 4,
            width: 4,
            channels: 1,
            class_names: (0..4).map(|c| c.to_string()).collect(),
        }
    }

    #[test]
    fn batches_are_normalised_chw_and_reproducible() {
        let p = Prepared::new(&tiny(), 4);
        let b = p.batch(&[1], None);
        assert_eq!(b.images.len(), 3 * 16);
        // Grey expanded to three equal channels; (v - 127.5) / 127.5.
        assert_eq!(b.images[0], (64.0 - 127.5) / 127.5);
        assert_eq!(b.images[0], b.images[16]);
        let e1: Vec<Vec<u32>> = p
            .epoch(2, 7, 0, p.default_augment())
            .iter()
            .map(|b| b.labels)
            .collect();
        let e2: Vec<Vec<u32>> = p
            .epoch(2, 7, 0, p.default_augment())
            .iter()
            .map(|b| b.labels)
            .collect();
        assert_eq!(e1, e2);
        assert_eq!(e1.len(), 2);
        let mut all: Vec<u32> = e1.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }
}
