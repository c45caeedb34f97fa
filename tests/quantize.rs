//! int8: the quantiser's calibration and accuracy guard on real weights and photos, and the int8
//! engine's wiring on every family (what runs in int8, what stays fp32, batches and threads).

mod common;

use common::*;
use effnet::engine::{Engine, Precision};
use effnet::preprocess::{eval_transform, load_rgb};
use effnet::quantize::{Images, Method, Options, agreement, quantize};
use effnet::weights::{self, Quantization, WeightSet};

fn options(method: Method) -> Options {
    Options {
        method,
        threshold: 0.99,
        holdout: 0.25,
        threads: 2,
        bias_correction: true,
    }
}

fn probabilities(engine: &mut Engine, images: &[Vec<f32>], side: usize) -> Vec<Vec<f32>> {
    images
        .iter()
        .map(|x| effnet::classify::softmax(&engine.forward(x, 1, side, side)))
        .collect()
}

/// Real Lite0 weights on the twelve fixture photos: the guard reaches its threshold on the
/// calibration part, the int8 engine keeps fp32's top-1 on every photo (held-out ones included),
/// and coffee stays espresso; with every calibration method.
#[test]
fn int8_keeps_the_fp32_top1_on_every_fixture_photo() {
    let set = weights::load(&fixture(LITE0), None).unwrap();
    let p = set.meta.preprocess.clone();
    let images: Vec<Vec<f32>> = photos()
        .iter()
        .map(|f| eval_transform(&load_rgb(f).unwrap(), &p).unwrap())
        .collect();
    let side = p.crop;
    let mut fp32 = Engine::new(&set).unwrap();
    let reference = probabilities(&mut fp32, &images, side);
    for method in [Method::MinMax, Method::Percentile(99.99), Method::Mse] {
        let data = Images {
            data: &images,
            side,
        };
        let (q, report) = quantize(&set, data, &options(method), &|_| {}).unwrap();
        assert_eq!(report.calibration_images + report.holdout_images, 12);
        assert_eq!(report.holdout_images, 3);
        assert!(report.calibration.top1 >= 0.99, "{report:?}");
        assert_eq!(q.layers.len(), report.layers.len());
        let int8 = q.layers.iter().filter(|l| l.int8).count();
        assert!(int8 * 2 > q.layers.len(), "most layers int8: {int8}");
        let mut e = Engine::new(&set).unwrap();
        e.set_quantization(&q).unwrap();
        let got = probabilities(&mut e, &images, side);
        let a = agreement(&got, &reference);
        eprintln!("{method}: {int8}/{} layers int8, {a:?}", q.layers.len());
        assert_eq!(a.top1, 1.0, "{method}: {a:?}");
        // int8 moves probabilities, but not far (the worst class of the worst photo).
        assert!(a.max_abs_dp < 0.1, "{method}: {a:?}");
        let espresso = got[0]
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .unwrap()
            .0;
        assert_eq!(espresso, 967);
    }
}

/// A table of every GEMM layer with a unit-ish range, all int8 or all fp32.
fn table(e: &Engine, int8: bool) -> Quantization {
    Quantization {
        calibration: "test".into(),
        layers: e
            .gemm_layers()
            .iter()
            .map(|name| effnet::weights::QuantizedLayer {
                name: name.clone(),
                lo: -4.0,
                hi: 8.0,
                int8,
                input_mean: Vec::new(),
            })
            .collect(),
    }
}

fn input(n: usize, side: usize, seed: usize) -> Vec<f32> {
    (0..n * 3 * side * side)
        .map(|i| (((i + seed) * 7919 % 255) as f32 / 128.0 - 1.0) * 0.8)
        .collect()
}

/// On B0 (SiLU, SE: the gate enters the int8 kernel at batch 1 and scales the activations at
/// larger batches), Lite0 and V2-B0 (Fused-MBConv's full 3x3 convs): layers kept out of int8 are
/// bit-for-bit the fallback precision's (fp32, and bf16 where the CPU has it), int8 logits stay
/// close to fp32, and int8 results do not depend on the batch or the thread count.
#[test]
fn int8_engine_is_wired_through_every_gemm_path() {
    for name in ["efficientnet-b0", "efficientnet-lite0", "efficientnetv2-b0"] {
        let spec = effnet::spec::variant(name).unwrap();
        let set = WeightSet::random(&spec, 3);
        let side = 64;
        let (a, b) = (input(1, side, 0), input(1, side, 11));
        let mut fp32 = Engine::new(&set).unwrap();
        let want = fp32.forward(&a, 1, side, side);

        let mut e = Engine::new(&set)
            .unwrap()
            .with_int8_fallback(Precision::Fp32)
            .unwrap();
        e.set_quantization(&table(&e, false)).unwrap();
        assert_eq!(e.forward(&a, 1, side, side), want, "{name}: fp32 layers");
        if Engine::default_int8_fallback() == Precision::Bf16 {
            let mut bf16 = Engine::new(&set)
                .unwrap()
                .with_precision(Precision::Bf16)
                .unwrap();
            let bf16 = bf16.forward(&a, 1, side, side);
            assert_ne!(bf16, want);
            let mut e = Engine::new(&set).unwrap();
            assert_eq!(e.int8_fallback(), Precision::Bf16, "{name}: the default");
            e.set_quantization(&table(&e, false)).unwrap();
            assert_eq!(e.forward(&a, 1, side, side), bf16, "{name}: bf16 layers");
            // Switched after quantising, to fp32 and back.
            let mut e = e.with_int8_fallback(Precision::Fp32).unwrap();
            assert_eq!(e.forward(&a, 1, side, side), want, "{name}: fp32 again");
            let mut e = e.with_int8_fallback(Precision::Bf16).unwrap();
            assert_eq!(e.forward(&a, 1, side, side), bf16, "{name}: bf16 again");
        }
        let e = Engine::new(&set).unwrap();
        assert!(e.with_int8_fallback(Precision::Int8).is_err());

        // Calibrated on these two inputs, all layers int8.
        let images = [a.clone(), b.clone()];
        let opts = Options {
            threshold: 0.0,
            holdout: 0.0,
            ..options(Method::MinMax)
        };
        let data = Images {
            data: &images,
            side,
        };
        let (q, report) = quantize(&set, data, &opts, &|_| {}).unwrap();
        assert!(report.kept.is_empty());
        // Every layer in int8 but those faster in f32: V2-B0's 32->16 Winograd conv, where the
        // CPU runs Winograd (the f32 GEMM kernel), and no layer of B0 or Lite0.
        let float = Engine::new(&set).unwrap().faster_in_f32().to_vec();
        assert_eq!(report.faster_in_f32, float);
        #[cfg(target_arch = "x86_64")]
        let kernel = is_x86_feature_detected!("avx2") && is_x86_feature_detected!("fma");
        #[cfg(not(target_arch = "x86_64"))]
        let kernel = false;
        let winograd = name.starts_with("efficientnetv2") && kernel;
        assert_eq!(
            float,
            if winograd {
                vec!["blocks.0.expand".to_string()]
            } else {
                vec![]
            }
        );
        for l in &q.layers {
            assert_eq!(l.int8, !float.contains(&l.name), "{name}: {}", l.name);
        }
        let mut e = Engine::new(&set).unwrap();
        e.set_quantization(&q).unwrap();
        let got = e.forward(&a, 1, side, side);
        assert_ne!(got, want, "{name}: int8 ran");
        let cos = {
            let dot: f32 = got.iter().zip(&want).map(|(x, y)| x * y).sum();
            let norm = |v: &[f32]| v.iter().map(|x| x * x).sum::<f32>().sqrt();
            dot / (norm(&got) * norm(&want))
        };
        assert!(cos > 0.98, "{name}: cosine of int8 and fp32 logits {cos}");

        let batch = e.forward(&[a.clone(), b.clone()].concat(), 2, side, side);
        let single_b = e.forward(&b, 1, side, side);
        assert!(
            max_abs_diff(&batch, &[got.clone(), single_b].concat()) < 1e-4,
            "{name}"
        );
        let mut two = Engine::new(&set).unwrap().with_threads(2);
        two.set_quantization(&q).unwrap();
        for _ in 0..3 {
            assert_eq!(two.forward(&a, 1, side, side), got, "{name}: 2 threads");
        }
    }
}

/// int8 needs weights quantised for the model: asking without, or with a table for another
/// model, is a one-line error naming the fix.
#[test]
fn int8_without_a_fitting_quantisation_is_a_clear_error() {
    let set = WeightSet::random(&effnet::spec::variant("efficientnet-lite0").unwrap(), 0);
    let e = Engine::new(&set)
        .unwrap()
        .with_precision(Precision::Int8)
        .err()
        .unwrap()
        .to_string();
    assert!(e.contains("effnet quantize") && !e.contains('\n'), "{e}");
    let mut lite = Engine::new(&set).unwrap();
    let mut q = table(&lite, true);
    q.layers.pop();
    let e = lite.set_quantization(&q).unwrap_err().to_string();
    assert!(e.contains("does not fit") && e.contains("head"), "{e}");
    let mut q = table(&lite, true);
    q.layers[0].lo = f32::NAN;
    assert!(
        lite.set_quantization(&q)
            .unwrap_err()
            .to_string()
            .contains("stem")
    );
}

/// Calibration records each projection's gated input whichever way the engine applies the SE gate
/// (to the activations for a batch of two; for one image, the fp32 engine would scale a copy of the
/// weights instead, which the observers must not see): an image alone and the same image twice
/// record the same ranges and channel means.
#[test]
fn calibration_records_the_gated_input_at_any_batch() {
    use effnet::engine::calibrate::Observe;
    let set = WeightSet::random(&effnet::spec::variant("efficientnet-b0").unwrap(), 3);
    let side = 64;
    let a = input(1, side, 0);
    let mut e = Engine::new(&set).unwrap();
    let mut record = |images: &[f32], n: usize| {
        e.observe(&Observe::MinMax);
        e.forward(images, n, side, side);
        e.observations()
    };
    let one = record(&a, 1);
    let two = record(&[a.clone(), a.clone()].concat(), 2);
    assert_eq!(one.len(), two.len());
    for (x, y) in one.iter().zip(&two) {
        let close = |p: f32, q: f32| (p - q).abs() <= 1e-5 * p.abs().max(q.abs()).max(1.0);
        assert!(
            close(x.lo, y.lo) && close(x.hi, y.hi),
            "{}: {x:?} vs {y:?}",
            x.name
        );
        let means = x.mean.iter().zip(&y.mean).all(|(p, q)| close(*p, *q));
        assert!(means, "{}: channel means differ", x.name);
    }
}
