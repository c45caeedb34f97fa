//! The GPU code path, run for real on a wgpu device: B0 trained for a few steps there must match
//! the same steps on the Flex CPU backend (forward, every gradient, the updated weights and BN
//! statistics). On a machine without a GPU, Mesa's software Vulkan driver (lavapipe, Debian's
//! `mesa-vulkan-drivers`) provides the adapter: `cargo test --release --features wgpu --test gpu`.
#![cfg(feature = "wgpu")]

mod common;

use burn::module::Param;
use burn::nn::loss::CrossEntropyLossConfig;
use burn::optim::ModuleOptimizer;
use burn::tensor::{Device, Int, Tensor, TensorData};

use effnet::data::loader::Batch;
use effnet::device::{AdapterKind, DeviceChoice};
use effnet::model::{EfficientNet, ParamVisitor, apply_weights, export_weights, visit_params};
use effnet::spec::resolve;
use effnet::train::{TfRmsProp, TrainConfig, Trainer};
use effnet::weights::TensorMap;

const TOL: f32 = 1e-4;

/// The software adapter the README's set-up installs; `EFFNET_TEST_WGPU` may name another.
fn gpu() -> Device {
    let choice: DeviceChoice = std::env::var("EFFNET_TEST_WGPU")
        .unwrap_or_else(|_| DeviceChoice::Wgpu(AdapterKind::Cpu).to_string())
        .parse()
        .unwrap();
    choice
        .open()
        .unwrap_or_else(|e| panic!("{e} (install mesa-vulkan-drivers for lavapipe)"))
}

/// Max |a - b| over the larger of 1 and the reference's largest magnitude; returns max |a - b|.
fn assert_close(what: &str, a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = a.iter().fold(1f32, |m, v| m.max(v.abs()));
    let diff = a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(
        diff <= TOL * scale,
        "{what}: max |diff| {diff} (scale {scale})"
    );
    diff
}

fn assert_maps_close(what: &str, a: &TensorMap, b: &TensorMap) -> f32 {
    assert_eq!(a.len(), b.len());
    a.iter()
        .map(|(name, t)| assert_close(&format!("{what} {name}"), &t.data, &b[name].data))
        .fold(0f32, f32::max)
}

fn batch(n: usize, side: usize, classes: usize) -> Batch {
    Batch {
        images: (0..n * 3 * side * side)
            .map(|i| ((i * 7919) % 255) as f32 / 128.0 - 1.0)
            .collect(),
        labels: (0..n).map(|i| (i % classes) as u32).collect(),
        size: n,
        side,
    }
}

/// Every parameter's gradient of the cross-entropy, read back to the host by name.
fn gradients(model: &EfficientNet, b: &Batch, device: &Device) -> Vec<(String, Vec<f32>)> {
    let x = Tensor::<4>::from_data(
        TensorData::new(b.images.clone(), [b.size, 3, b.side, b.side]),
        device,
    );
    let labels: Vec<i64> = b.labels.iter().map(|&l| l as i64).collect();
    let y = Tensor::<1, Int>::from_data(TensorData::new(labels, [b.size]), device);
    let loss = CrossEntropyLossConfig::new()
        .init(device)
        .forward(model.forward(x), y);
    let grads = loss.backward();
    struct Collect<'a>(&'a burn::tensor::Gradients, Vec<(String, Vec<f32>)>);
    impl ParamVisitor for Collect<'_> {
        fn visit<const D: usize>(&mut self, path: &str, param: &Param<Tensor<D>>) {
            if let Some(g) = param.val().grad(self.0) {
                self.1
                    .push((path.to_string(), g.into_data().try_to_vec::<f32>().unwrap()));
            }
        }
    }
    visit_params(model, Collect(&grads, Vec::new())).1
}

#[test]
fn b0_trains_on_wgpu_as_on_flex() {
    // 64 px and 8 images: the last BN layers then normalise over 32 values per channel (at 32 px
    // and 4 images over 4, where float rounding alone moves the logits by 1e-4).
    let (side, n, classes) = (64, 8, 10);
    let cfg = TrainConfig {
        batch_size: n,
        resolution: side,
        // Dropout and stochastic depth draw from each backend's own generator: off here.
        dropout: Some(0.0),
        drop_connect_rate: Some(0.0),
        ..TrainConfig::default()
    };
    let spec = cfg
        .model_spec(&resolve("efficientnet-b0").unwrap().0, classes)
        .unwrap();
    let cpu = Device::flex().autodiff();
    let gpu = gpu().autodiff();
    cpu.seed(0);
    let start = export_weights(&EfficientNet::new(&spec, &cpu).tf_init());
    let on = |device: &Device| apply_weights(EfficientNet::new(&spec, device), &start).unwrap();
    let (mut a, mut b) = (on(&cpu), on(&gpu));
    let data = batch(n, side, classes);

    let logits = |m: &EfficientNet, device: &Device| {
        let x = Tensor::<4>::from_data(
            TensorData::new(data.images.clone(), [n, 3, side, side]),
            device,
        );
        m.forward(x).into_data().try_to_vec::<f32>().unwrap()
    };
    let logit_diff = assert_close("logits", &logits(&a, &cpu), &logits(&b, &gpu));

    let (ga, gb) = (gradients(&a, &data, &cpu), gradients(&b, &data, &gpu));
    assert_eq!(ga.len(), gb.len());
    assert!(ga.len() > 200, "B0 has {} parameter tensors", ga.len());
    let mut grad_diff = 0f32;
    for ((name, x), (name_b, y)) in ga.iter().zip(&gb) {
        assert_eq!(name, name_b);
        grad_diff = grad_diff.max(assert_close(&format!("gradient of {name}"), x, y));
    }

    let stage = cfg.stage(0, spec.dropout);
    let optim = || {
        ModuleOptimizer::from(TfRmsProp {
            decay: cfg.rmsprop_decay,
            momentum: cfg.momentum,
            epsilon: cfg.epsilon,
        })
    };
    let (mut oa, mut ob) = (optim(), optim());
    let (ta, tb) = (
        Trainer::new(&cfg, classes, cpu.clone()),
        Trainer::new(&cfg, classes, gpu.clone()),
    );
    // The recipe's rate for this batch (0.016 per 256 images).
    let lr = 0.016 * n as f64 / 256.0;
    for step in 0..3 {
        let ra = ta.step(a, &mut oa, &data, &stage, step, lr).unwrap();
        let rb = tb.step(b, &mut ob, &data, &stage, step, lr).unwrap();
        assert!(
            (ra.loss - rb.loss).abs() <= 1e-4 * ra.loss.abs().max(1.0),
            "step {step} loss {} vs {}",
            ra.loss,
            rb.loss
        );
        (a, b) = (ra.model, rb.model);
    }
    // Weights and BN running statistics after three RMSProp-TF steps.
    let weight_diff = assert_maps_close("after 3 steps", &export_weights(&a), &export_weights(&b));
    eprintln!(
        "wgpu vs flex, max |diff|: logits {logit_diff:.2e}, gradients {grad_diff:.2e} ({} tensors), weights and BN statistics after 3 steps {weight_diff:.2e}",
        ga.len()
    );
}

/// `effnet train --device wgpu:cpu` end to end: steps, the per-epoch evaluation on the device,
/// weights that `eval --device` and the CPU engine score the same.
#[test]
fn the_cli_trains_and_evaluates_on_wgpu() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    std::fs::create_dir(&data).unwrap();
    common::tiny_idx(&data, 48);
    let effnet = |args: &[&str]| {
        let o = std::process::Command::new(env!("CARGO_BIN_EXE_effnet"))
            .args(args)
            .env("EFFNET_HOME", home.path())
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        (String::from_utf8_lossy(&o.stdout).into_owned(), err)
    };
    let dataset = format!("idx:{}", data.display());
    let out = home.path().join("run");
    let device = DeviceChoice::Wgpu(AdapterKind::Cpu).to_string();
    let (_, log) = effnet(&[
        "train",
        "lite0",
        "--dataset",
        &dataset,
        "--resolution",
        "16",
        "--batch-size",
        "8",
        "--max-steps",
        "4",
        "--device",
        &device,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(log.contains("Wgpu"), "{log}");
    let weights = out.join("weights.safetensors");
    let w = weights.to_str().unwrap();
    let top1 = |stdout: &str| -> f64 {
        let v: serde_json::Value = serde_json::from_str(stdout).unwrap();
        v["top1"].as_f64().unwrap()
    };
    let (gpu, _) = effnet(&[
        "eval",
        "--weights",
        w,
        "--dataset",
        &dataset,
        "--device",
        &device,
        "--json",
    ]);
    let (cpu, _) = effnet(&["eval", "--weights", w, "--dataset", &dataset, "--json"]);
    assert_eq!(top1(&gpu), top1(&cpu));
}
