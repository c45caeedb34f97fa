//! The controllers that propose architectures: REINFORCE with a recurrent policy (MnasNet's method:
//! an LSTM emits one decision after another, trained on the reward with a moving-average baseline)
//! and regularized evolution (AmoebaNet's: mutate the best of a random sample of the population,
//! retire the oldest). Both are deterministic given their seed and the rewards observed, so a
//! resumed search replays the history and continues exactly.

use std::collections::VecDeque;

use burn::module::Module;
use burn::nn::{Embedding, EmbeddingConfig, Linear, LinearConfig, Lstm, LstmConfig, LstmState};
use burn::optim::{AdamConfig, GradientsParams, ModuleOptimizer};
use burn::tensor::activation::log_softmax;
use burn::tensor::{Device, Int, Tensor, TensorData};
use rand::Rng;
use rand::SeedableRng;
use rand::rngs::StdRng;

use super::space::Arch;

/// Proposes architectures and learns from their rewards.
pub trait Controller {
    /// The architecture for candidate `index` (its randomness is fixed by the seed and `index`).
    fn propose(&mut self, index: u64) -> Arch;
    /// Learns from one evaluated candidate.
    fn observe(&mut self, arch: &Arch, reward: f64);
}

fn rng(seed: u64, index: u64) -> StdRng {
    StdRng::seed_from_u64(seed ^ (index + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15))
}

fn random_arch(options: &[usize], rng: &mut StdRng) -> Arch {
    Arch(
        options
            .iter()
            .map(|&n| rng.random_range(0..n) as u8)
            .collect(),
    )
}

/// Regularized (aging) evolution.
pub struct Evolution {
    options: Vec<usize>,
    seed: u64,
    population: VecDeque<(Arch, f64)>,
    size: usize,
    sample: usize,
}

impl Evolution {
    pub fn new(options: Vec<usize>, seed: u64, size: usize, sample: usize) -> Self {
        Evolution {
            options,
            seed,
            population: VecDeque::new(),
            size: size.max(2),
            sample: sample.clamp(1, size.max(2)),
        }
    }
}

impl Controller for Evolution {
    fn propose(&mut self, index: u64) -> Arch {
        let mut rng = rng(self.seed, index);
        if self.population.len() < self.size {
            return random_arch(&self.options, &mut rng);
        }
        let parent = (0..self.sample)
            .map(|_| &self.population[rng.random_range(0..self.population.len())])
            .max_by(|a, b| a.1.total_cmp(&b.1))
            .expect("a non-empty sample")
            .0
            .clone();
        let mut child = parent;
        let i = rng.random_range(0..self.options.len());
        let shift = rng.random_range(1..self.options[i].max(2));
        child.0[i] = ((child.0[i] as usize + shift) % self.options[i].max(1)) as u8;
        child
    }

    fn observe(&mut self, arch: &Arch, reward: f64) {
        self.population.push_back((arch.clone(), reward));
        if self.population.len() > self.size {
            self.population.pop_front();
        }
    }
}

/// The recurrent policy: the previous decision's embedding into an LSTM, one softmax head per
/// decision.
#[derive(Module, Debug)]
struct Policy {
    embed: Embedding,
    lstm: Lstm,
    heads: Vec<Linear>,
}

/// Initialises every parameter uniformly in +-1/sqrt(fan in) from a private seeded stream, so a
/// policy does not depend on what else draws from the device's generator.
struct SeededInit(StdRng);

impl crate::model::ParamMapper for SeededInit {
    fn map<const D: usize>(
        &mut self,
        _path: &str,
        param: burn::module::Param<Tensor<D>>,
    ) -> burn::module::Param<Tensor<D>> {
        let shape = param.lazy_shape();
        let dims = shape.dims::<D>();
        let fan_in = if D >= 2 { dims[D - 1] } else { dims[0] }.max(1);
        let bound = 1.0 / (fan_in as f32).sqrt();
        let n: usize = dims.iter().product();
        let values: Vec<f32> = (0..n)
            .map(|_| (self.0.random::<f32>() * 2.0 - 1.0) * bound)
            .collect();
        let device = param.lazy_device();
        param.map(|old| {
            let new = Tensor::from_data(TensorData::new(values, dims.to_vec()), &device);
            if old.is_require_grad() {
                new.require_grad()
            } else {
                new
            }
        })
    }
}

/// REINFORCE with an LSTM controller on burn (Adam, rewards standardised by a moving mean and
/// variance as the baseline, an entropy bonus).
pub struct Reinforce {
    options: Vec<usize>,
    /// Token of decision i's option o: 1 + offsets[i] + o (0 starts the sequence).
    offsets: Vec<usize>,
    seed: u64,
    policy: Option<Policy>,
    optim: ModuleOptimizer,
    device: Device,
    /// Moving mean and variance of the rewards.
    baseline: Option<(f64, f64)>,
    lr: f64,
}

const EMBED: usize = 32;
const HIDDEN: usize = 64;
const ENTROPY: f64 = 1e-3;

impl Reinforce {
    pub fn new(options: Vec<usize>, seed: u64, lr: f64) -> Self {
        let device = Device::flex().autodiff();
        let offsets: Vec<usize> = options
            .iter()
            .scan(0, |acc, &n| {
                let o = *acc;
                *acc += n;
                Some(o)
            })
            .collect();
        let vocab = 1 + options.iter().sum::<usize>();
        let policy = Policy {
            embed: EmbeddingConfig::new(vocab, EMBED).init(&device),
            lstm: LstmConfig::new(EMBED, HIDDEN, true).init(&device),
            heads: options
                .iter()
                .map(|&n| LinearConfig::new(HIDDEN, n).init(&device))
                .collect(),
        };
        let init = SeededInit(StdRng::seed_from_u64(seed ^ 0x706f_6c69_6379));
        let (policy, _) = crate::model::map_params(policy, init);
        Reinforce {
            options,
            offsets,
            seed,
            policy: Some(policy),
            optim: AdamConfig::new().init(),
            device,
            baseline: None,
            lr,
        }
    }

    fn token(&self, decision: usize, option: u8) -> i64 {
        (1 + self.offsets[decision] + option as usize) as i64
    }

    fn policy(&self) -> &Policy {
        self.policy.as_ref().expect("the policy is always put back")
    }

    /// Sum of log-probabilities of `arch` and the policy's mean entropy, teacher-forced.
    fn log_prob(&self, arch: &Arch) -> (Tensor<1>, Tensor<1>) {
        let n = self.options.len();
        let inputs: Vec<i64> = std::iter::once(0)
            .chain((0..n - 1).map(|i| self.token(i, arch.0[i])))
            .collect();
        let x = Tensor::<2, Int>::from_data(TensorData::new(inputs, [1, n]), &self.device);
        let (out, _) = self
            .policy()
            .lstm
            .forward(self.policy().embed.forward(x), None);
        let mut logp = Tensor::<1>::zeros([1], &self.device);
        let mut entropy = Tensor::<1>::zeros([1], &self.device);
        for (i, head) in self.policy().heads.iter().enumerate() {
            let h = out.clone().slice([0..1, i..i + 1]).reshape([1, HIDDEN]);
            let lp = log_softmax(head.forward(h), 1);
            let chosen = arch.0[i] as usize;
            logp = logp + lp.clone().slice([0..1, chosen..chosen + 1]).reshape([1]);
            entropy = entropy - (lp.clone().exp() * lp).sum_dim(1).reshape([1]);
        }
        (logp, entropy.div_scalar(n as f64))
    }
}

impl Controller for Reinforce {
    fn propose(&mut self, index: u64) -> Arch {
        let mut rng = rng(self.seed, index);
        let mut state: Option<LstmState<2>> = None;
        let mut prev = 0i64;
        let mut arch = Vec::with_capacity(self.options.len());
        for (i, head) in self.policy().heads.iter().enumerate() {
            let x = Tensor::<2, Int>::from_data(TensorData::new(vec![prev], [1, 1]), &self.device);
            let (out, s) = self
                .policy()
                .lstm
                .forward(self.policy().embed.forward(x), state);
            state = Some(s);
            let probs = log_softmax(head.forward(out.reshape([1, HIDDEN])), 1)
                .exp()
                .into_data()
                .try_to_vec::<f32>()
                .expect("float probabilities");
            let u: f32 = rng.random();
            let mut acc = 0.0;
            let choice = probs
                .iter()
                .position(|p| {
                    acc += p;
                    u < acc
                })
                .unwrap_or(probs.len() - 1);
            arch.push(choice as u8);
            prev = self.token(i, choice as u8);
        }
        Arch(arch)
    }

    fn observe(&mut self, arch: &Arch, reward: f64) {
        let (mean, var) = *self.baseline.get_or_insert((reward, 0.0));
        let advantage = (reward - mean) / (var.sqrt() + 1e-3);
        let d = reward - mean;
        self.baseline = Some((mean + 0.1 * d, 0.9 * (var + 0.1 * d * d)));
        let (logp, entropy) = self.log_prob(arch);
        let loss = logp.mul_scalar(-advantage) - entropy.mul_scalar(ENTROPY);
        let policy = self.policy.take().expect("the policy is always put back");
        let grads = GradientsParams::from_grads(loss.backward(), &policy);
        self.policy = Some(self.optim.step(self.lr, policy, grads));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A synthetic reward: the fraction of decisions equal to a fixed target.
    fn closeness(arch: &Arch, target: &Arch) -> f64 {
        let same = arch.0.iter().zip(&target.0).filter(|(a, b)| a == b).count();
        same as f64 / target.0.len() as f64
    }

    /// Samples until the target is proposed; the number of samples it took.
    fn samples_to_optimum(c: &mut dyn Controller, target: &Arch, limit: u64) -> Option<u64> {
        for i in 0..limit {
            let a = c.propose(i);
            if a == *target {
                return Some(i + 1);
            }
            c.observe(&a, closeness(&a, target));
        }
        None
    }

    fn problem() -> (Vec<usize>, Arch) {
        let options = vec![2, 2, 3, 3, 2, 3, 2, 2, 3, 3, 2, 3];
        let target = Arch(vec![1, 0, 2, 1, 1, 0, 0, 1, 1, 2, 0, 2]);
        (options, target)
    }

    #[test]
    fn evolution_finds_the_optimum_of_a_synthetic_reward() {
        let (options, target) = problem();
        let mut c = Evolution::new(options, 3, 20, 5);
        let n = samples_to_optimum(&mut c, &target, 600);
        assert!(n.is_some(), "not found in 600 samples");
    }

    #[test]
    fn reinforce_finds_the_optimum_of_a_synthetic_reward() {
        let (options, target) = problem();
        let mut c = Reinforce::new(options, 3, 0.01);
        let n = samples_to_optimum(&mut c, &target, 800);
        assert!(n.is_some(), "not found in 800 samples");
    }

    #[test]
    fn proposals_replay_exactly() {
        let (options, target) = problem();
        let run = |k: u64| {
            let mut c = Reinforce::new(options.clone(), 9, 0.02);
            let mut out = Vec::new();
            for i in 0..k {
                let a = c.propose(i);
                c.observe(&a, closeness(&a, &target));
                out.push(a);
            }
            out
        };
        assert_eq!(run(12), run(12));
    }
}
