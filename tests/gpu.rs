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

/// The software adapter the README's set-up installs; `EFFNET_TEST_WGPU` may name another
/// (`vulkan`, `wgpu:0` on a machine with a GPU: scripts/gpu_check.sh).
fn gpu_choice() -> DeviceChoice {
    std::env::var("EFFNET_TEST_WGPU")
        .unwrap_or_else(|_| DeviceChoice::Wgpu(AdapterKind::Cpu).to_string())
        .parse()
        .unwrap()
}

fn gpu() -> Device {
    gpu_choice()
        .open()
        .unwrap_or_else(|e| panic!("{e} (install mesa-vulkan-drivers for lavapipe)"))
}

/// Burn's Flex random generator is one per process, and `Trainer::step` re-seeds it: the tests
/// here that seed it and train in-process hold this lock so that their initial weights are the
/// same on every run, whatever runs beside them.
fn flex_rng() -> std::sync::MutexGuard<'static, ()> {
    static RNG: std::sync::Mutex<()> = std::sync::Mutex::new(());
    RNG.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
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
        images: effnet::data::fixed_pattern(n * 3 * side * side),
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
    let _rng = flex_rng();
    let cpu = Device::flex().autodiff();
    let gpu = gpu().autodiff();
    let start = export_weights(&EfficientNet::new(&spec, &cpu).tf_init_seeded(0));
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
    let optim = || ModuleOptimizer::from(TfRmsProp::recipe(&cfg));
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
        let o = common::effnet(args, home.path());
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(o.status.success(), "{args:?}: {err}");
        (common::stdout(&o), err)
    };
    let dataset = format!("idx:{}", data.display());
    let out = home.path().join("run");
    let device = gpu_choice().to_string();
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
    assert!(!log.contains("on the CPU ("), "{log}");
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

/// Cosine between the moves `a - init` and `b - init` over every conv and classifier tensor.
fn move_cosine(a: &TensorMap, b: &TensorMap, init: &TensorMap) -> f64 {
    let (mut ab, mut aa, mut bb) = (0f64, 0f64, 0f64);
    for (name, t0) in init.iter().filter(|(n, _)| !n.contains(".bn.")) {
        for ((x, y), z) in a[name].data.iter().zip(&b[name].data).zip(&t0.data) {
            let (u, v) = ((x - z) as f64, (y - z) as f64);
            (ab, aa, bb) = (ab + u * v, aa + u * u, bb + v * v);
        }
    }
    ab / (aa.sqrt() * bb.sqrt())
}

/// Mixed precision on the GPU path: three f16 steps on wgpu (convolutions and classifier in
/// f16, dynamic loss scaling) move the f32 master weights as three f32 steps on Flex do. BN is
/// frozen so that the comparison is not dominated by a fresh network's sensitivity to rounding
/// in its batch statistics (`train::mixed` tests).
#[test]
fn lite0_trains_in_f16_on_wgpu_as_in_f32_on_flex() {
    use effnet::train::mixed::{HalfType, LossScale};
    let (side, n, classes) = (64, 8, 4);
    let cfg = |half| TrainConfig {
        batch_size: n,
        resolution: side,
        dropout: Some(0.0),
        drop_connect_rate: Some(0.0),
        mixed_precision: half,
        ..TrainConfig::default()
    };
    let (f32_cfg, f16_cfg) = (cfg(None), cfg(Some(HalfType::F16)));
    let spec = f32_cfg
        .model_spec(&resolve("lite0").unwrap().0, classes)
        .unwrap();
    let _rng = flex_rng();
    let cpu = Device::flex().autodiff();
    let gpu = gpu().autodiff();
    let start = export_weights(&EfficientNet::new(&spec, &cpu).tf_init_seeded(0));
    let on = |device: &Device| {
        apply_weights(EfficientNet::new(&spec, device), &start)
            .unwrap()
            .freeze_batch_norm()
    };
    let data = batch(n, side, classes);
    let stage = f32_cfg.stage(0, spec.dropout);
    let lr = 0.016 * n as f64 / 256.0;
    let run = |cfg: &TrainConfig, device: &Device| {
        let trainer = Trainer::new(cfg, classes, device.clone());
        trainer.set_loss_scale(LossScale {
            scale: 128.0,
            good_steps: 0,
        });
        let mut optim = ModuleOptimizer::from(TfRmsProp::default());
        let mut model = on(device);
        // The loss of the first step (the same weights in both runs).
        let mut loss = None;
        for step in 0..3 {
            let out = trainer
                .step(model, &mut optim, &data, &stage, step, lr)
                .unwrap();
            model = out.model;
            loss.get_or_insert(out.loss);
        }
        let loss = loss.unwrap();
        if cfg.mixed_precision.is_some() {
            assert_eq!(trainer.loss_scale().good_steps, 3, "a step overflowed");
        }
        (export_weights(&model), loss)
    };
    let (f32_weights, f32_loss) = run(&f32_cfg, &cpu);
    let (f16_weights, f16_loss) = run(&f16_cfg, &gpu);
    let cos = move_cosine(&f16_weights, &f32_weights, &start);
    eprintln!(
        "wgpu f16 vs flex f32: first loss {f16_loss:.5} vs {f32_loss:.5}, after 3 steps the cosine of the weights' moves {cos:.5}"
    );
    // Over seeds 0-7 the first losses differed by 0.16-1.2 % (seed 0: 0.16 %), the cosines were
    // 0.956-0.988; a lost cast or gradient moves either far more.
    assert!(
        (f16_loss - f32_loss).abs() <= 0.03 * f32_loss,
        "{f16_loss} vs {f32_loss}"
    );
    assert!(cos >= 0.9, "cosine {cos}");
}

/// `effnet train --mixed-precision f16` on wgpu: the checkpoint keeps the loss scale, and a
/// resumed run continues from it; bf16 there and any mixed precision on the CPU are refused.
#[test]
fn the_cli_trains_in_f16_on_wgpu_and_resumes() {
    let home = tempfile::tempdir().unwrap();
    let data = home.path().join("data");
    std::fs::create_dir(&data).unwrap();
    common::tiny_idx(&data, 48);
    let effnet = |args: &[&str]| common::effnet(args, home.path());
    let dataset = format!("idx:{}", data.display());
    let out = home.path().join("run");
    let device = gpu_choice().to_string();
    let train = |more: &[&str]| {
        let mut args = vec![
            "train",
            "lite0",
            "--dataset",
            &dataset,
            "--resolution",
            "16",
            "--batch-size",
            "8",
            "--device",
            &device,
        ];
        args.extend_from_slice(more);
        effnet(&args)
    };
    let o = train(&[
        "--max-steps",
        "2",
        "--mixed-precision",
        "f16",
        "--out",
        out.to_str().unwrap(),
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let progress = || -> serde_json::Value {
        let text = std::fs::read(out.join("checkpoint").join("progress.json")).unwrap();
        serde_json::from_slice(&text).unwrap()
    };
    let scale = progress()["loss_scale"].clone();
    assert!(scale["scale"].as_f64().unwrap() >= 1.0, "{scale}");
    let config = std::fs::read_to_string(out.join("config.toml")).unwrap();
    assert!(config.contains("mixed_precision = \"f16\""), "{config}");
    let o = effnet(&[
        "train",
        "--resume",
        out.to_str().unwrap(),
        "--max-steps",
        "4",
        "--device",
        &device,
    ]);
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(progress()["step"], 4);
    assert!(progress()["loss_scale"]["scale"].as_f64().is_some());

    for (flags, says) in [
        (vec!["--mixed-precision", "bf16"], "needs a CUDA device"),
        (
            vec!["--mixed-precision", "f16", "--device", "cpu"],
            "is for GPU devices",
        ),
    ] {
        let mut args = vec!["train", "lite0", "--dataset", &dataset, "--max-steps", "1"];
        if !flags.contains(&"--device") {
            args.extend(["--device", &device]);
        }
        args.extend(flags.iter().copied());
        common::assert_clean_error(&effnet(&args), says);
    }
}

/// `effnet bench --device` times the burn model's inference on the device over a batch sweep
/// (f32 and f16), with one timing per batch size and a rate computed from the forward MACs.
#[test]
fn bench_times_inference_on_the_device() {
    let home = tempfile::tempdir().unwrap();
    let device = gpu_choice().to_string();
    for half in [None, Some("f16")] {
        let mut args = vec!["bench", "lite0", "--device", &device, "--resolution", "32"];
        args.extend(["--batch", "1,3", "--iters", "2", "--json"]);
        args.extend(half.iter().flat_map(|h| ["--mixed-precision", *h]));
        let o = common::effnet(&args, home.path());
        assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
        let sweep: serde_json::Value = serde_json::from_str(&common::stdout(&o)).unwrap();
        let sweep = sweep.as_array().unwrap();
        assert_eq!(sweep.len(), 2, "{sweep:?}");
        for (entry, n) in sweep.iter().zip([1.0, 3.0]) {
            assert_eq!(entry["batch"].as_f64(), Some(n));
            let t = &entry["results"][0];
            let (ms, rate) = (
                t["median_ms"].as_f64().unwrap(),
                t["images_per_s"].as_f64().unwrap(),
            );
            assert!(
                ms > 0.0 && (rate - n * 1000.0 / ms).abs() < 1e-6 * rate,
                "{t}"
            );
            assert!(t["gflops"].as_f64().unwrap() > 0.0, "{t}");
            let name = t["runtime"].as_str().unwrap();
            assert!(name.starts_with(&format!("burn {device}")), "{name}");
            assert_eq!(name.ends_with("f16"), half.is_some(), "{name}");
        }
    }
    let o = common::effnet(
        &["bench", "lite0", "--device", &device, "--burn"],
        home.path(),
    );
    common::assert_clean_error(&o, "time the CPU engine");
    // A batch beyond the host's memory is refused before anything is allocated. (Mesa may print
    // its own line about XDG_RUNTIME_DIR when the device opens, so the whole of stderr is not one
    // line here.)
    let args = [
        "bench",
        "lite0",
        "--device",
        &device,
        "--batch",
        "100000000",
    ];
    let o = common::effnet(&args, home.path());
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success() && !err.contains("panicked"), "{err}");
    assert!(
        err.contains("error: inference at 224x224 with batch 100000000 needs about"),
        "{err}"
    );
}
