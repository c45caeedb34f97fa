//! Data parallelism over several devices of one machine, through burn 0.22's own distributed
//! support: [`DistributedContext`] starts burn's gradient-sync server, each device holds a replica
//! of the model (forked from one, so every parameter keeps its id) with its parameters marked
//! distributed, and during each backward pass burn all-reduces (averages) every gradient across
//! the replicas. Each replica then takes the same RMSProp-TF step with its own optimizer, so the
//! replicas stay equal. Every device trains on its slice of the global batch (`--batch-size` is
//! global; the learning rate follows it, 0.016 x batch / 256). BN statistics are per device (each
//! replica normalises its slice, as PyTorch's DDP without SyncBatchNorm); the first device's
//! running statistics, weights and EMA are the ones evaluated and saved.
//!
//! burn 0.22 implements the all-reduce only on CUDA (NCCL through CubeCL); its CPU backend and
//! wgpu have no collective operations, so [`check_devices`] accepts CUDA devices only
//! (docs/gpu.md). No multi-GPU machine has run this path yet.

use anyhow::bail;
use burn::module::{Module, ModuleMapper, Param};
use burn::optim::ModuleOptimizer;
use burn::tensor::Tensor;
use burn::tensor::distributed::{DistributedConfig, DistributedContext, ReduceOperation};

use crate::data::loader::Batch;
use crate::device::DeviceChoice;
use crate::model::EfficientNet;

use super::config::{Stage, TrainConfig};
use super::step::{StepOutcome, Trainer};

/// Refuses device lists burn 0.22 cannot all-reduce across, in one line.
pub fn check_devices(devices: &[DeviceChoice], batch_size: usize) -> anyhow::Result<()> {
    if devices.len() < 2 {
        return Ok(());
    }
    if let Some(d) = devices.iter().find(|d| !matches!(d, DeviceChoice::Cuda(_))) {
        bail!(
            "--devices {d}: training on several devices needs CUDA devices; burn 0.22 all-reduces gradients only through NCCL (its CPU and wgpu backends have no collective operations, docs/gpu.md)"
        );
    }
    if !batch_size.is_multiple_of(devices.len()) {
        bail!(
            "--batch-size {batch_size} does not split evenly over {} devices",
            devices.len()
        );
    }
    Ok(())
}

/// Marks every parameter distributed under its own id (burn-train's `ModuleSharder`).
struct Shard;

impl ModuleMapper for Shard {
    fn map_float<const D: usize>(&mut self, param: Param<Tensor<D>>) -> Param<Tensor<D>> {
        let (id, tensor, mapper) = param.consume();
        Param::from_mapped_value(id, tensor.set_distributed(id), mapper)
    }
}

/// The replicas beyond the first device's model (which the training loop keeps), their optimizers
/// and step runners, and burn's sync server (alive as long as this is).
pub struct Replicas<'a> {
    others: Vec<(EfficientNet, ModuleOptimizer, Trainer<'a>)>,
    _context: DistributedContext,
}

impl<'a> Replicas<'a> {
    /// Forks `model` (on `devices[0]`) onto the other devices, each with a copy of `optim`'s
    /// state; returns the first device's model, marked distributed like the rest.
    pub fn new(
        model: EfficientNet,
        optim: &ModuleOptimizer,
        devices: &[burn::tensor::Device],
        cfg: &'a TrainConfig,
        classes: usize,
    ) -> (EfficientNet, Self) {
        let devices: Vec<_> = devices.iter().map(|d| d.clone().autodiff()).collect();
        let context = DistributedContext::init(
            devices.clone(),
            DistributedConfig {
                all_reduce_op: ReduceOperation::Mean,
            },
        );
        let others = devices[1..]
            .iter()
            .map(|d| {
                let replica = model.clone().fork(d).map(&mut Shard);
                (
                    replica,
                    optim.clone(),
                    Trainer::new(cfg, classes, d.clone()),
                )
            })
            .collect();
        let model = model.map(&mut Shard);
        (
            model,
            Replicas {
                others,
                _context: context,
            },
        )
    }

    /// One step on every device, each on its slice of `batch`; the first device's replica is
    /// `model` with `optim` and `trainer`. Returns the first model and the whole batch's loss
    /// (mean over devices) and correct count.
    #[allow(clippy::too_many_arguments)]
    pub fn step(
        &mut self,
        (model, optim, trainer): (EfficientNet, &mut ModuleOptimizer, &Trainer<'_>),
        batch: &Batch,
        stage: &Stage,
        step: u64,
        lr: f64,
    ) -> anyhow::Result<StepOutcome> {
        let shards = split(batch, self.others.len() + 1);
        let others = std::mem::take(&mut self.others);
        let (first, rest) = std::thread::scope(|s| {
            let handles: Vec<_> = others
                .into_iter()
                .zip(&shards[1..])
                .map(|((m, mut o, t), shard)| {
                    // Gradients are averaged across devices, so every replica takes the same f16
                    // loss-scale decisions; the first one's is the one checkpoints keep.
                    t.set_loss_scale(trainer.loss_scale());
                    s.spawn(move || {
                        let out = t.step(m, &mut o, shard, stage, step, lr);
                        (out, o, t)
                    })
                })
                .collect();
            let first = trainer.step(model, optim, &shards[0], stage, step, lr);
            let rest: Vec<_> = handles
                .into_iter()
                .map(|h| h.join().expect("a replica's step panicked"))
                .collect();
            (first, rest)
        });
        let first = first?;
        let (mut loss, mut correct) = (first.loss, first.correct);
        for (out, o, t) in rest {
            let out = out?;
            loss += out.loss;
            correct += out.correct;
            self.others.push((out.model, o, t));
        }
        Ok(StepOutcome {
            model: first.model,
            loss: loss / shards.len() as f64,
            correct,
            // The first device's (the others run alongside it).
            phases: first.phases,
        })
    }
}

/// `batch` cut into `parts` equal consecutive slices (the caller checked that it divides).
fn split(batch: &Batch, parts: usize) -> Vec<Batch> {
    let n = batch.size / parts;
    let len = 3 * batch.side * batch.side;
    (0..parts)
        .map(|p| Batch {
            images: batch.images[p * n * len..(p + 1) * n * len].to_vec(),
            labels: batch.labels[p * n..(p + 1) * n].to_vec(),
            size: n,
            side: batch.side,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn batches_split_into_equal_consecutive_slices() {
        let b = Batch {
            images: (0..4 * 3 * 2 * 2).map(|v| v as f32).collect(),
            labels: vec![0, 1, 2, 3],
            size: 4,
            side: 2,
        };
        let parts = split(&b, 2);
        assert_eq!(parts[0].labels, [0, 1]);
        assert_eq!(parts[1].labels, [2, 3]);
        assert_eq!(parts[1].images[0], 24.0);
        assert_eq!(parts.iter().map(|p| p.images.len()).sum::<usize>(), 48);
    }

    #[test]
    fn only_cuda_device_lists_that_split_the_batch() {
        use DeviceChoice::*;
        assert!(check_devices(&[Cpu], 64).is_ok());
        assert!(check_devices(&[Cuda(0), Cuda(1)], 64).is_ok());
        let e = check_devices(&[Cpu, Cuda(1)], 64).unwrap_err().to_string();
        assert!(e.contains("NCCL") && !e.contains('\n'), "{e}");
        let e = check_devices(&[Cuda(0), Cuda(1), Cuda(2)], 64)
            .unwrap_err()
            .to_string();
        assert!(e.contains("does not split"), "{e}");
    }
}
