//! Batches for training and evaluation: from an [`InMemory`] dataset (images resized once to the
//! model resolution) or streamed from image files (decoded per batch from the originals on worker
//! threads, so memory is bounded by the prefetch depth, not by the dataset); seeded augmentation
//! ([`Augment`]), normalisation, and a background thread that prepares the next batches while the
//! model trains on the current one.

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::mpsc::{Receiver, sync_channel};

use rand::SeedableRng;
use rand::rngs::StdRng;
use rand::seq::SliceRandom;

use image::RgbImage;

use super::augment::{Augment, Crop, Policy};
use super::{DataError, ImageFolder, InMemory, Split};
use crate::preprocess::{Interpolation, Preprocess, eval_crop, load_rgb, resize};

/// A batch: NCHW float pixels and labels.
#[derive(Debug, Clone)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<u32>,
    pub size: usize,
    /// Image side (progressive learning varies it between stages).
    pub side: usize,
}

/// Batches prepared ahead of the one the model is on: the streaming loader's memory bound.
pub const PREFETCH_BATCHES: usize = 2;

/// Where a dataset's pixels come from.
#[derive(Debug, Clone)]
enum Source {
    /// `side x side` RGB images in RAM.
    Pixels(Arc<Vec<u8>>),
    /// Image files decoded when a batch needs them; images not cropped by the augmentation go
    /// through `transform`'s resize and crop.
    Files {
        paths: Arc<Vec<PathBuf>>,
        transform: Preprocess,
        workers: usize,
    },
}

/// A dataset ready for batching at `side x side`.
#[derive(Debug, Clone)]
pub struct Prepared {
    source: Source,
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
            source: Source::Pixels(Arc::new(pixels)),
            labels: data.labels.clone(),
            side,
            num_classes: data.num_classes(),
            mean: [127.5; 3],
            std: [127.5; 3],
        }
    }

    /// Streams an image folder at `transform`'s crop and normalisation: nothing is decoded until a
    /// batch asks. Random-resized crops come from the full-size originals, every other image goes
    /// through `transform`'s resize and crop. `workers` threads decode each batch.
    pub fn stream(folder: &ImageFolder, transform: &Preprocess, workers: usize) -> Self {
        let (paths, labels) = folder.samples.iter().cloned().unzip();
        Prepared {
            source: Source::Files {
                paths: Arc::new(paths),
                transform: transform.clone(),
                workers: workers.max(1),
            },
            labels,
            side: transform.crop,
            num_classes: folder.class_names.len(),
            mean: transform.mean,
            std: transform.std,
        }
    }

    /// A split as training or evaluation reads it, at `transform`'s crop and normalisation: in
    /// memory (resized once), or streamed from its files.
    pub fn from_split(split: &Split, transform: &Preprocess) -> Self {
        match split {
            Split::Memory(m) => Prepared {
                mean: transform.mean,
                std: transform.std,
                ..Self::new(m, transform.crop)
            },
            Split::Folder(f) => Self::stream(f, transform, default_workers()),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Sample `i` as an RGB image: at the stored side, or for a streamed dataset the decoded
    /// original when `full` (a random-resized crop samples from it) and its transform otherwise.
    pub fn image(&self, i: usize, full: bool) -> Result<RgbImage, DataError> {
        match &self.source {
            Source::Pixels(pixels) => {
                let s = self.side;
                let px = pixels[i * s * s * 3..(i + 1) * s * s * 3].to_vec();
                Ok(RgbImage::from_raw(s as u32, s as u32, px)
                    .expect("stored images are side x side RGB"))
            }
            Source::Files {
                paths, transform, ..
            } => {
                let path = &paths[i];
                let fail = |e: crate::preprocess::ImageError| DataError::Invalid {
                    path: path.display().to_string(),
                    why: e.to_string(),
                };
                let img = load_rgb(path).map_err(fail)?;
                if full {
                    return Ok(img);
                }
                eval_crop(&img, transform).map_err(fail)
            }
        }
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

    /// Sample `i`, augmented with its own `rng` when `aug` is given, written into `out`.
    fn sample(
        &self,
        i: usize,
        aug: Option<(&Augment, &mut StdRng)>,
        out: &mut [f32],
    ) -> Result<(), DataError> {
        let full = aug
            .as_ref()
            .is_some_and(|(a, _)| a.crop == Crop::RandomResized);
        let img = self.image(i, full)?;
        let img = match aug {
            Some((a, rng)) => a.apply(&img, rng),
            None => img,
        };
        self.write(&img, out);
        Ok(())
    }

    /// The unaugmented batch of samples `indices`.
    pub fn batch(&self, indices: &[usize]) -> Result<Batch, DataError> {
        self.assemble(indices, self.side, |_, i, out| self.sample(i, None, out))
    }

    /// The batch of samples `indices` augmented by `aug` (its size is the batch's side), sample
    /// `b` with the generator `sample_rng(b)`: the result does not depend on how many threads
    /// decode it.
    fn augmented_batch(
        &self,
        indices: &[usize],
        aug: &Augment,
        sample_rng: impl Fn(usize) -> StdRng + Sync,
    ) -> Result<Batch, DataError> {
        self.assemble(indices, aug.size, |b, i, out| {
            let mut rng = sample_rng(b);
            self.sample(i, Some((aug, &mut rng)), out)
        })
    }

    /// Runs `one(position, sample index, output slice)` for each sample of a batch, on the
    /// dataset's decode workers when it streams.
    fn assemble(
        &self,
        indices: &[usize],
        side: usize,
        one: impl Fn(usize, usize, &mut [f32]) -> Result<(), DataError> + Sync,
    ) -> Result<Batch, DataError> {
        let len = 3 * side * side;
        let mut images = vec![0.0; indices.len() * len];
        let workers = match &self.source {
            Source::Files { workers, .. } => (*workers).min(indices.len()).max(1),
            Source::Pixels(_) => 1,
        };
        let per = indices.len().div_ceil(workers).max(1);
        let run = |(w, out): (usize, &mut [f32])| -> Result<(), DataError> {
            for (k, o) in out.chunks_mut(len).enumerate() {
                let b = w * per + k;
                one(b, indices[b], o)?;
            }
            Ok(())
        };
        if workers == 1 {
            run((0, &mut images))?;
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = images
                    .chunks_mut(per * len)
                    .enumerate()
                    .map(|job| s.spawn(move || run(job)))
                    .collect();
                handles
                    .into_iter()
                    .try_for_each(|h| h.join().expect("a decode worker panicked"))
            })?;
        }
        Ok(Batch {
            images,
            labels: indices.iter().map(|&i| self.labels[i]).collect(),
            size: indices.len(),
            side,
        })
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

    /// Shuffled, augmented training batches for one epoch, prepared on a background thread at most
    /// [`PREFETCH_BATCHES`] ahead; the order and every sample's augmentation depend only on
    /// `seed`, `epoch` and the sample's position in the epoch, so the first `skip` batches (done
    /// before a resume) are left out without being made. A file that fails to decode ends the
    /// epoch with its error.
    pub fn epoch(
        &self,
        batch_size: usize,
        (seed, epoch): (u64, u64),
        aug: Augment,
        skip: usize,
    ) -> Receiver<Result<Batch, DataError>> {
        let (tx, rx) = sync_channel(PREFETCH_BATCHES);
        let data = self.clone();
        std::thread::spawn(move || {
            let epoch_seed = seed ^ epoch.wrapping_mul(0x9e37_79b9_7f4a_7c15);
            let mut order: Vec<usize> = (0..data.len()).collect();
            order.shuffle(&mut StdRng::seed_from_u64(epoch_seed));
            for (k, chunk) in order.chunks_exact(batch_size).enumerate().skip(skip) {
                let first = (k * batch_size) as u64;
                let rng = |b: usize| {
                    let position = first + b as u64 + 1;
                    StdRng::seed_from_u64(epoch_seed ^ position.wrapping_mul(0xbf58_476d_1ce4_e5b9))
                };
                let batch = data.augmented_batch(chunk, &aug, rng);
                let failed = batch.is_err();
                if tx.send(batch).is_err() || failed {
                    return;
                }
            }
        });
        rx
    }
}

/// Threads that decode a streamed batch: the cores, at most 8.
pub fn default_workers() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get().min(8))
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
        let b = p.batch(&[1]).unwrap();
        assert_eq!(b.images.len(), 3 * 16);
        // Grey expanded to three equal channels; (v - 127.5) / 127.5.
        assert_eq!(b.images[0], (64.0 - 127.5) / 127.5);
        assert_eq!(b.images[0], b.images[16]);
        let e1: Vec<Vec<u32>> = p
            .epoch(2, (7, 0), p.default_augment(), 0)
            .iter()
            .map(|b| b.unwrap().labels)
            .collect();
        let e2: Vec<Vec<u32>> = p
            .epoch(2, (7, 0), p.default_augment(), 0)
            .iter()
            .map(|b| b.unwrap().labels)
            .collect();
        assert_eq!(e1, e2);
        assert_eq!(e1.len(), 2);
        let mut all: Vec<u32> = e1.concat();
        all.sort();
        assert_eq!(all, vec![0, 1, 2, 3]);
    }
}
