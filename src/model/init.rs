//! The TF reference initialisation: conv kernels N(0, sqrt(2 / fan_out)) with fan_out = k*k*out
//! (depthwise: k*k, the multiplier being 1), the classifier U(-1/sqrt(classes), 1/sqrt(classes)),
//! biases 0; BN keeps gamma 1, beta 0.

use burn::module::Param;
use burn::tensor::{Distribution, Tensor, TensorData};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use super::{EfficientNet, ParamMapper, map_params};

/// Draws from the device's RNG, or from its own seeded host RNG when one is given.
struct TfInit(Option<StdRng>);

impl TfInit {
    fn draw<const D: usize>(
        &mut self,
        shape: [usize; D],
        dist: Distribution,
        like: &Tensor<D>,
    ) -> Tensor<D> {
        let Some(rng) = self.0.as_mut() else {
            return Tensor::<D>::random(shape, dist, &like.device());
        };
        let n = shape.iter().product::<usize>();
        let values: Vec<f32> = match dist {
            // Box-Muller: the device's RNG is not a host `Rng`, and rand_distr is not a dependency.
            Distribution::Normal(mean, std) => (0..n)
                .map(|_| {
                    let (u, v) = (1.0 - rng.random::<f64>(), rng.random::<f64>());
                    let z = (-2.0 * u.ln()).sqrt() * (std::f64::consts::TAU * v).cos();
                    (mean + std * z) as f32
                })
                .collect(),
            Distribution::Uniform(lo, hi) => {
                (0..n).map(|_| rng.random_range(lo..hi) as f32).collect()
            }
            _ => unreachable!("the TF initialisers are normal or uniform"),
        };
        Tensor::<D>::from_data(TensorData::new(values, shape), &like.device())
    }
}

impl ParamMapper for TfInit {
    fn map<const D: usize>(&mut self, path: &str, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (is_conv_bn, leaf) = (
            path.contains(".bn.") || path.starts_with("bn."),
            path.rsplit('.').next().map(str::to_string),
        );
        if is_conv_bn
            || leaf.as_deref() == Some("running_mean")
            || leaf.as_deref() == Some("running_var")
        {
            return param;
        }
        let shape = param.lazy_shape().dims::<D>();
        let dist = match (leaf.as_deref(), D) {
            (Some("weight"), 4) => {
                let (out, k) = (shape[0], shape[2] * shape[3]);
                let fan_out = if path.contains(".dw.") { k } else { k * out };
                Distribution::Normal(0.0, (2.0 / fan_out as f64).sqrt())
            }
            // burn's Linear stores [in, out]: the range comes from the number of classes.
            (Some("weight"), 2) => {
                let r = 1.0 / (shape[1] as f64).sqrt();
                Distribution::Uniform(-r, r)
            }
            (Some("bias"), _) => {
                return param.map(|old| {
                    let zeros = old.zeros_like();
                    if old.is_require_grad() {
                        zeros.require_grad()
                    } else {
                        zeros
                    }
                });
            }
            _ => return param,
        };
        param.map(|old| {
            let new = self.draw(shape, dist, &old);
            if old.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

impl EfficientNet {
    /// Re-initialises every conv and the classifier as the TF reference does (uses the device's RNG:
    /// seed it for reproducibility).
    pub fn tf_init(self) -> Self {
        map_params(self, TfInit(None)).0
    }

    /// [`Self::tf_init`] from a host RNG seeded with `seed`: the same weights whatever else uses
    /// the device's RNG meanwhile (tests running side by side share and reseed it).
    pub fn tf_init_seeded(self, seed: u64) -> Self {
        map_params(self, TfInit(Some(StdRng::seed_from_u64(seed)))).0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::export_weights;
    use burn::tensor::Device;

    fn std(v: &[f32]) -> f64 {
        let m = v.iter().map(|&x| x as f64).sum::<f64>() / v.len() as f64;
        (v.iter().map(|&x| (x as f64 - m).powi(2)).sum::<f64>() / v.len() as f64).sqrt()
    }

    #[test]
    fn follows_the_tf_initialisers() {
        let device = Device::flex();
        device.seed(1);
        let spec = crate::spec::variant("b0").unwrap();
        let seeded = || export_weights(&EfficientNet::new(&spec, &device).tf_init_seeded(9));
        let host = seeded();
        assert!(host == seeded(), "the host-seeded init repeats");
        for t in [
            export_weights(&EfficientNet::new(&spec, &device).tf_init()),
            host,
        ] {
            follows_them(&t);
        }
    }

    fn follows_them(t: &crate::weights::TensorMap) {
        let close = |name: &str, want: f64| {
            let got = std(&t[name].data);
            assert!(
                (got / want - 1.0).abs() < 0.15,
                "{name}: std {got} vs {want}"
            );
        };
        close("stem.conv.weight", (2.0 / (9.0 * 32.0f64)).sqrt());
        close("blocks.15.expand.conv.weight", (2.0 / 1152.0f64).sqrt());
        close("blocks.15.dw.conv.weight", (2.0 / 9.0f64).sqrt());
        close("blocks.15.se.reduce.weight", (2.0 / 48.0f64).sqrt());
        let fc = &t["classifier.weight"].data;
        let r = 1.0 / 1000f32.sqrt();
        assert!(fc.iter().all(|&x| x.abs() <= r) && std(fc) > 0.5 * r as f64 / 3f64.sqrt());
        assert!(t["classifier.bias"].data.iter().all(|&b| b == 0.0));
        assert!(t["blocks.3.se.expand.bias"].data.iter().all(|&b| b == 0.0));
        assert!(t["stem.bn.weight"].data.iter().all(|&g| g == 1.0));
    }
}
