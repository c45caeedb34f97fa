//! The search space, in the project's own block grammar: B0's seven stages (strides, stem and head
//! fixed), each choosing its block kind, kernel, expansion, repeats relative to B0's, SE and output
//! width. An architecture is one option index per decision; every one is a [`ModelSpec`] whose FLOPs
//! come from the analysis.

use rand::Rng;

use crate::analysis::analyze;
use crate::spec::{BlockArgs, BlockKind, ModelSpec, variant};

/// The decisions of one stage, in order, with their options.
pub const KINDS: [BlockKind; 2] = [BlockKind::MbConv, BlockKind::FusedMbConv];
pub const KERNELS: [usize; 2] = [3, 5];
pub const EXPANDS: [usize; 3] = [1, 4, 6];
/// Repeats added to B0's stage (at least one block stays).
pub const REPEAT_DELTAS: [i32; 3] = [-1, 0, 1];
pub const SE_RATIOS: [Option<f64>; 2] = [None, Some(0.25)];
/// Output channels relative to B0's stage, rounded to 8.
pub const WIDTHS: [f64; 3] = [0.75, 1.0, 1.25];

/// Options of each decision of a stage.
pub const OPTIONS: [usize; 6] = [
    KINDS.len(),
    KERNELS.len(),
    EXPANDS.len(),
    REPEAT_DELTAS.len(),
    SE_RATIOS.len(),
    WIDTHS.len(),
];

/// An architecture: one option index per decision, stage by stage.
#[derive(Debug, Clone, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Arch(pub Vec<u8>);

/// The space around a base (B0's stages) at a resolution and class count.
#[derive(Debug, Clone)]
pub struct Space {
    pub base: ModelSpec,
}

impl Space {
    /// B0's stages at `resolution` with `classes` outputs.
    pub fn b0(resolution: usize, classes: usize) -> Self {
        let mut base = variant("efficientnet-b0").expect("B0 is a published variant");
        base.resolution = resolution;
        base.train_resolution = resolution;
        base.num_classes = classes;
        Space { base }
    }

    pub fn stages(&self) -> usize {
        self.base.blocks.len()
    }

    /// Options of every decision, in order.
    pub fn options(&self) -> Vec<usize> {
        (0..self.stages()).flat_map(|_| OPTIONS).collect()
    }

    /// B0 itself as a point of the space.
    pub fn b0_arch(&self) -> Arch {
        let stage = |b: &BlockArgs| {
            let se = b.se_ratio.map_or(0, |_| 1);
            let e = EXPANDS
                .iter()
                .position(|&e| e == b.expand_ratio)
                .unwrap_or(0);
            let k = KERNELS.iter().position(|&k| k == b.kernel).unwrap_or(0);
            [0u8, k as u8, e as u8, 1, se, 1]
        };
        Arch(self.base.blocks.iter().flat_map(stage).collect())
    }

    /// The spec of `arch` (named `search-` and its decisions, so names are stable).
    pub fn spec(&self, arch: &Arch) -> ModelSpec {
        let mut blocks = Vec::new();
        let mut cin = self.base.blocks[0].in_channels;
        for (stage, d) in self.base.blocks.iter().zip(arch.0.chunks_exact(6)) {
            let out = ((stage.out_channels as f64 * WIDTHS[d[5] as usize] / 8.0).round() as usize
                * 8)
            .max(8);
            let repeats = (stage.repeats as i32 + REPEAT_DELTAS[d[3] as usize]).max(1) as usize;
            blocks.push(BlockArgs {
                kind: KINDS[d[0] as usize],
                repeats,
                kernel: KERNELS[d[1] as usize],
                stride: stage.stride,
                expand_ratio: EXPANDS[d[2] as usize],
                in_channels: cin,
                out_channels: out,
                se_ratio: SE_RATIOS[d[4] as usize],
                id_skip: true,
            });
            cin = out;
        }
        let code: String = arch.0.iter().map(|&d| char::from(b'0' + d)).collect();
        ModelSpec {
            name: format!("search-{code}"),
            blocks,
            ..self.base.clone()
        }
    }

    /// FLOPs (2 x MACs) of `arch` at the space's resolution.
    pub fn flops(&self, arch: &Arch) -> u64 {
        let spec = self.spec(arch);
        2 * analyze(&spec, spec.resolution).map_or(u64::MAX / 2, |a| a.macs)
    }

    pub fn random(&self, rng: &mut impl Rng) -> Arch {
        Arch(
            self.options()
                .iter()
                .map(|&n| rng.random_range(0..n) as u8)
                .collect(),
        )
    }

    /// `arch` with one decision changed to another option.
    pub fn mutate(&self, arch: &Arch, rng: &mut impl Rng) -> Arch {
        let options = self.options();
        let mut out = arch.clone();
        let i = rng.random_range(0..options.len());
        let shift = rng.random_range(1..options[i]);
        out.0[i] = ((out.0[i] as usize + shift) % options[i]) as u8;
        out
    }

    /// The smallest and largest FLOPs in the space, estimated from the extreme choices and many
    /// random architectures.
    pub fn flops_range(&self) -> (u64, u64) {
        use rand::SeedableRng;
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        // The first options are the small ones: MBConv, 3x3, e1, one block fewer, no SE, 0.75x.
        let small = Arch(vec![0; self.options().len()]);
        let large = Arch(self.options().iter().map(|&o| (o - 1) as u8).collect());
        let flops: Vec<u64> = [small, large]
            .into_iter()
            .chain((0..2048).map(|_| self.random(&mut rng)))
            .map(|a| self.flops(&a))
            .collect();
        (
            *flops.iter().min().unwrap_or(&0),
            *flops.iter().max().unwrap_or(&0),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;

    #[test]
    fn b0_is_in_the_space() {
        let space = Space::b0(224, 1000);
        let spec = space.spec(&space.b0_arch());
        assert_eq!(spec.blocks, variant("b0").unwrap().blocks);
        assert_eq!(space.flops(&space.b0_arch()), 2 * 385_814_752);
    }

    #[test]
    fn every_sampled_architecture_is_valid_and_within_the_range() {
        let space = Space::b0(32, 10);
        let (lo, hi) = space.flops_range();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        for _ in 0..200 {
            let arch = space.random(&mut rng);
            let spec = space.spec(&arch);
            spec.validate().unwrap();
            let f = space.flops(&arch);
            assert!(f >= lo / 2 && f <= hi * 2, "{f} outside {lo}..{hi}");
            let m = space.mutate(&arch, &mut rng);
            assert_eq!(m.0.iter().zip(&arch.0).filter(|(a, b)| a != b).count(), 1);
        }
    }

    #[test]
    fn sampled_architectures_train_for_a_step() {
        use crate::data::loader::Batch;
        use crate::model::EfficientNet;
        use burn::tensor::Device;
        let space = Space::b0(16, 3);
        let cfg = crate::train::TrainConfig {
            batch_size: 2,
            resolution: 16,
            ..Default::default()
        };
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        for _ in 0..3 {
            let spec = space.spec(&space.random(&mut rng));
            let device = Device::flex().autodiff();
            let model = EfficientNet::new(&spec, &device);
            let mut optim =
                burn::optim::ModuleOptimizer::from(crate::train::TfRmsProp::recipe(&cfg));
            let batch = Batch {
                images: vec![0.1; 2 * 3 * 16 * 16],
                labels: vec![0, 2],
                size: 2,
                side: 16,
            };
            let stage = cfg.stage(0, spec.dropout);
            let trainer = crate::train::Trainer::new(&cfg, 3, device);
            let out = trainer
                .step(model, &mut optim, &batch, &stage, 0, 1e-3)
                .unwrap();
            assert!(out.loss.is_finite(), "{}", spec.name);
        }
    }
}
