//! Mixup and CutMix on a batch (the sample paired with each image is the batch reversed, as timm
//! does), producing soft targets with label smoothing.

use rand::Rng;
use rand::rngs::StdRng;

use super::loader::Batch;

/// Beta(a, a) by Jöhnk's method in log space (uniform draws only; exact for any a > 0).
pub fn beta(rng: &mut StdRng, a: f64) -> f64 {
    loop {
        let lx = rng.random::<f64>().max(f64::MIN_POSITIVE).ln() / a;
        let ly = rng.random::<f64>().max(f64::MIN_POSITIVE).ln() / a;
        let m = lx.max(ly);
        // Accept when X + Y <= 1, i.e. logsumexp(lx, ly) <= 0.
        if m + ((lx - m).exp() + (ly - m).exp()).ln() <= 0.0 {
            return 1.0 / (1.0 + (ly - lx).exp());
        }
    }
}

/// A mixed batch: images, soft targets `[n x classes]` and each sample's dominant label.
#[derive(Debug, Clone)]
pub struct Mixed {
    pub images: Vec<f32>,
    pub targets: Vec<f32>,
    pub dominant: Vec<u32>,
    pub lambda: f64,
}

/// Mixes `batch` with its reverse: CutMix with probability 0.5 when both
/// alphas are positive, otherwise whichever is enabled. Targets are
/// `lambda * onehot(y) + (1 - lambda) * onehot(y_paired)`, then label-smoothed.
pub fn mix(
    batch: &Batch,
    classes: usize,
    smoothing: f64,
    (mixup, cutmix): (f64, f64),
    rng: &mut StdRng,
) -> Mixed {
    let (n, side) = (batch.size, batch.side);
    let plane = side * side;
    let use_cutmix = cutmix > 0.0 && (mixup <= 0.0 || rng.random_bool(0.5));
    let mut images = batch.images.clone();
    let mut lambda = beta(rng, if use_cutmix { cutmix } else { mixup });
    if use_cutmix {
        // A box covering 1 - lambda of the image, centred uniformly, clipped to the image.
        let cut = ((1.0 - lambda).sqrt() * side as f64) as usize;
        let (cy, cx) = (rng.random_range(0..side), rng.random_range(0..side));
        let (y0, y1) = (cy.saturating_sub(cut / 2), (cy + cut / 2).min(side));
        let (x0, x1) = (cx.saturating_sub(cut / 2), (cx + cut / 2).min(side));
        for i in 0..n {
            let j = n - 1 - i;
            for c in 0..3 {
                for y in y0..y1 {
                    let row = c * plane + y * side;
                    let (dst, src) = ((i * 3 * plane) + row, (j * 3 * plane) + row);
                    images[dst + x0..dst + x1].copy_from_slice(&batch.images[src + x0..src + x1]);
                }
            }
        }
        lambda = 1.0 - ((y1 - y0) * (x1 - x0)) as f64 / plane as f64;
    } else {
        let l = lambda as f32;
        for i in 0..n {
            let j = n - 1 - i;
            let len = 3 * plane;
            for k in 0..len {
                images[i * len + k] =
                    l * batch.images[i * len + k] + (1.0 - l) * batch.images[j * len + k];
            }
        }
    }
    let off = (smoothing / classes as f64) as f32;
    let mut targets = vec![off; n * classes];
    let keep = (1.0 - smoothing) as f32;
    for i in 0..n {
        let (a, b) = (batch.labels[i] as usize, batch.labels[n - 1 - i] as usize);
        targets[i * classes + a] += keep * lambda as f32;
        targets[i * classes + b] += keep * (1.0 - lambda) as f32;
    }
    let dominant = (0..n)
        .map(|i| {
            if lambda >= 0.5 {
                batch.labels[i]
            } else {
                batch.labels[n - 1 - i]
            }
        })
        .collect();
    Mixed {
        images,
        targets,
        dominant,
        lambda,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn beta_has_the_right_mean_and_spread() {
        let mut rng = StdRng::seed_from_u64(3);
        for a in [0.2, 1.0, 2.0] {
            let xs: Vec<f64> = (0..20000).map(|_| beta(&mut rng, a)).collect();
            let mean = xs.iter().sum::<f64>() / xs.len() as f64;
            let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / xs.len() as f64;
            // Beta(a, a): mean 1/2, variance 1 / (4 (2a + 1)).
            assert!((mean - 0.5).abs() < 0.01, "a {a}: mean {mean}");
            let want = 1.0 / (4.0 * (2.0 * a + 1.0));
            assert!(
                (var / want - 1.0).abs() < 0.05,
                "a {a}: var {var} vs {want}"
            );
        }
    }

    fn batch() -> Batch {
        let side = 4;
        let mut images = vec![0.0; 2 * 3 * side * side];
        images[3 * side * side..].fill(1.0);
        Batch {
            images,
            labels: vec![0, 2],
            size: 2,
            side,
        }
    }

    #[test]
    fn mixup_blends_images_and_targets_alike() {
        let mut rng = StdRng::seed_from_u64(0);
        let m = mix(&batch(), 3, 0.0, (0.4, 0.0), &mut rng);
        let l = m.lambda as f32;
        // Image 0 (zeros) mixed with image 1 (ones): every pixel is 1 - lambda.
        assert!(m.images[..48].iter().all(|&v| (v - (1.0 - l)).abs() < 1e-6));
        assert!((m.targets[0] - l).abs() < 1e-6 && (m.targets[2] - (1.0 - l)).abs() < 1e-6);
        let sum: f32 = m.targets[..3].iter().sum();
        assert!((sum - 1.0).abs() < 1e-6);
    }

    #[test]
    fn cutmix_target_weight_equals_the_pasted_area() {
        let mut rng = StdRng::seed_from_u64(5);
        for _ in 0..20 {
            let m = mix(&batch(), 3, 0.1, (0.0, 1.0), &mut rng);
            let pasted = m.images[..16].iter().filter(|&&v| v == 1.0).count() as f64 / 16.0;
            assert!((1.0 - m.lambda - pasted).abs() < 1e-9);
            let sum: f32 = m.targets[3..].iter().sum();
            assert!((sum - 1.0).abs() < 1e-6, "smoothed targets sum to one");
        }
    }
}
