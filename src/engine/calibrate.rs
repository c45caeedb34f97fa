//! Calibration for int8: what each GEMM convolution's input holds over a set of images, as its
//! min and max or as a histogram over a known range whose tails a percentile cuts off.

use std::sync::Mutex;

/// Bins of a calibration histogram.
pub const HISTOGRAM_BINS: usize = 2048;

/// What to record at each GEMM convolution's input.
#[derive(Debug, Clone)]
pub enum Observe {
    /// The smallest and largest value.
    MinMax,
    /// Counts over [`HISTOGRAM_BINS`] bins spanning each layer's `(lo, hi)` (by layer name; from
    /// a [`Observe::MinMax`] pass over the same images).
    Histogram(std::collections::HashMap<String, (f32, f32)>),
}

/// One layer's recorded input.
#[derive(Debug, Clone, PartialEq)]
pub struct Observed {
    pub name: String,
    pub lo: f32,
    pub hi: f32,
    /// Counts over `lo..hi` when a histogram was asked for.
    pub histogram: Option<Vec<u64>>,
    /// Mean of each input channel (GEMM row `k`; for im2col, tap-major), from a min-max pass.
    pub mean: Vec<f32>,
}

impl Observed {
    /// The range holding all but `(1 - p) / 2` of the values at each end (`p` in (0, 1]), to bin
    /// edges; min-max without a histogram.
    pub fn percentile_range(&self, p: f64) -> (f32, f32) {
        let Some(h) = &self.histogram else {
            return (self.lo, self.hi);
        };
        let total: u64 = h.iter().sum();
        let cut = ((1.0 - p) / 2.0 * total as f64) as u64;
        let width = (self.hi - self.lo) / h.len() as f32;
        fn first<'a>(mut counts: impl Iterator<Item = &'a u64>, cut: u64) -> usize {
            let mut seen = 0;
            counts
                .position(|c| {
                    seen += c;
                    seen > cut
                })
                .unwrap_or(0)
        }
        let lo_bin = first(h.iter(), cut);
        let hi_bin = h.len() - 1 - first(h.iter().rev(), cut);
        (
            self.lo + lo_bin as f32 * width,
            self.lo + (hi_bin + 1) as f32 * width,
        )
    }
}

impl Observed {
    /// Among the ranges that keep 99.9 % to all of the values ([`Observed::percentile_range`]),
    /// the one whose uint8 grid quantises them with the least squared error by the histogram:
    /// `scale^2 / 12` for each value inside, the squared distance to the range for each outside.
    /// Min-max without a histogram.
    pub fn mse_range(&self) -> (f32, f32) {
        let Some(h) = &self.histogram else {
            return (self.lo, self.hi);
        };
        let width = (self.hi - self.lo) / h.len() as f32;
        let error = |(lo, hi): (f32, f32)| {
            let grid = crate::simd::gemm_i8::ActQuant::covering(lo, hi);
            let inside = (grid.scale as f64).powi(2) / 12.0;
            let (lo, hi) = (lo.min(0.0) as f64, hi.max(0.0) as f64);
            h.iter()
                .enumerate()
                .map(|(b, &c)| {
                    let x = (self.lo + (b as f32 + 0.5) * width) as f64;
                    let outside = (lo - x).max(x - hi).max(0.0);
                    c as f64
                        * if outside > 0.0 {
                            outside * outside
                        } else {
                            inside
                        }
                })
                .sum::<f64>()
        };
        [0.999, 0.9995, 0.9999, 0.99995, 0.99999, 0.999995, 1.0]
            .map(|p| self.percentile_range(p))
            .into_iter()
            .min_by(|a, b| error(*a).total_cmp(&error(*b)))
            .unwrap_or((self.lo, self.hi))
    }
}

/// The recorder at one layer (shared by the threads that run its parts).
#[derive(Debug)]
pub(super) struct Observer {
    name: String,
    state: Mutex<(Observed, Sums)>,
}

/// Per-channel sums of what a min-max pass saw.
#[derive(Debug, Default)]
struct Sums {
    sum: Vec<f64>,
    rows: u64,
}

impl Observer {
    pub fn new(name: &str, how: &Observe) -> Self {
        let (lo, hi, histogram) = match how {
            Observe::MinMax => (f32::INFINITY, f32::NEG_INFINITY, None),
            Observe::Histogram(ranges) => {
                let (lo, hi) = ranges.get(name).copied().unwrap_or((0.0, 0.0));
                (lo, hi, Some(vec![0; HISTOGRAM_BINS]))
            }
        };
        Observer {
            name: name.to_string(),
            state: Mutex::new((
                Observed {
                    name: name.to_string(),
                    lo,
                    hi,
                    histogram,
                    mean: Vec::new(),
                },
                Sums::default(),
            )),
        }
    }

    /// Records `m` rows of `k` values (times `gate[kk]` when given).
    pub fn record(&self, a: &[f32], k: usize, gate: Option<&[f32]>) {
        let mut guard = self.state.lock().unwrap_or_else(|e| e.into_inner());
        let (s, sums) = &mut *guard;
        let values = a
            .chunks_exact(k.max(1))
            .flat_map(|row| row.iter().enumerate())
            .map(|(kk, v)| v * gate.map_or(1.0, |g| g[kk]));
        match s.histogram.take() {
            None => {
                if sums.sum.len() != k {
                    sums.sum = vec![0.0; k];
                }
                let (mut lo, mut hi) = (s.lo, s.hi);
                for (i, v) in values.enumerate() {
                    (lo, hi) = (lo.min(v), hi.max(v));
                    sums.sum[i % k] += v as f64;
                }
                (s.lo, s.hi) = (lo, hi);
                sums.rows += (a.len() / k.max(1)) as u64;
            }
            Some(mut counts) => {
                let (lo, hi) = (s.lo, s.hi);
                let scale = if hi > lo {
                    HISTOGRAM_BINS as f32 / (hi - lo)
                } else {
                    0.0
                };
                for v in values {
                    let bin = ((v - lo) * scale).max(0.0) as usize;
                    counts[bin.min(HISTOGRAM_BINS - 1)] += 1;
                }
                s.histogram = Some(counts);
            }
        }
    }

    pub fn take(self) -> Observed {
        let (mut o, sums) = self.state.into_inner().unwrap_or_else(|e| e.into_inner());
        let rows = sums.rows.max(1) as f64;
        o.mean = sums.sum.iter().map(|s| (s / rows) as f32).collect();
        if o.lo > o.hi {
            // Never ran (no rows): an empty range at zero.
            (o.lo, o.hi) = (0.0, 0.0);
        }
        o.name = self.name;
        o
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_cut_the_tails_of_the_histogram() {
        let o = Observer::new("x", &Observe::MinMax);
        o.record(&[0.5, -1.0, 3.0, 2.0], 2, Some(&[1.0, 2.0]));
        let r = o.take();
        assert_eq!((r.lo, r.hi), (-2.0, 4.0));
        assert_eq!(r.mean, [1.75, 1.0]);
        let ranges = [("x".to_string(), (0.0, 100.0))].into_iter().collect();
        let o = Observer::new("x", &Observe::Histogram(ranges));
        // 10,000 values in 0..10, one outlier at 100.
        let mut v: Vec<f32> = (0..10_000).map(|i| i as f32 / 1000.0).collect();
        v.push(99.99);
        o.record(&v, 1, None);
        let r = o.take();
        assert_eq!(r.histogram.as_ref().unwrap().iter().sum::<u64>(), 10_001);
        assert_eq!(r.percentile_range(1.0), (0.0, 100.0));
        let (lo, hi) = r.percentile_range(0.999);
        assert!(lo == 0.0 && (9.9..10.1).contains(&hi), "{lo} {hi}");
        // One far outlier in 10,001 costs more clipped (90^2) than every value's rounding on the
        // wide grid (10,001 x 0.39^2 / 12): the whole range stays.
        assert_eq!(r.mse_range(), (0.0, 100.0));
        // A near one (20) among a million values in 0..10: clipping it is cheaper.
        let ranges = [("x".to_string(), (0.0, 20.0))].into_iter().collect();
        let o = Observer::new("x", &Observe::Histogram(ranges));
        let mut v: Vec<f32> = (0..1_000_000).map(|i| i as f32 / 100_000.0).collect();
        v.push(19.999);
        o.record(&v, 1, None);
        let (lo, hi) = o.take().mse_range();
        assert!(lo == 0.0 && (9.9..10.1).contains(&hi), "{lo} {hi}");
    }
}
