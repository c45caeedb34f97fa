//! The ONNX export runs in another runtime (tract) and gives the engine's logits.

mod common;

use common::*;
use effnet::engine::Engine;
use effnet::export::onnx::{OnnxOptions, to_onnx};
use effnet::spec::{Padding, variant};
use effnet::weights::{self, WeightSet};
use tract_onnx::prelude::*;

fn run_onnx(bytes: &[u8], input: &[f32], n: usize, side: usize) -> Vec<f32> {
    let model = tract_onnx::onnx()
        .model_for_read(&mut std::io::Cursor::new(bytes))
        .unwrap()
        .with_input_fact(0, f32::fact([n, 3, side, side]).into())
        .unwrap()
        .into_optimized()
        .unwrap()
        .into_runnable()
        .unwrap();
    let x = tract_ndarray::Array4::from_shape_vec((n, 3, side, side), input.to_vec()).unwrap();
    let out = model.run(tvec!(Tensor::from(x).into())).unwrap();
    out[0]
        .to_plain_array_view::<f32>()
        .unwrap()
        .iter()
        .copied()
        .collect()
}

fn input(n: usize, side: usize) -> Vec<f32> {
    (0..n * 3 * side * side)
        .map(|i| ((i * 7919 % 1000) as f32 / 500.0 - 1.0) * 1.5)
        .collect()
}

fn check(set: &WeightSet, side: usize, n: usize, dynamic_batch: bool) {
    let opts = OnnxOptions {
        resolution: side,
        dynamic_batch,
        opset: 17,
    };
    let bytes = to_onnx(set, &opts).unwrap();
    let x = input(n, side);
    let got = run_onnx(&bytes, &x, n, side);
    let want = Engine::new(set).unwrap().forward(&x, n, side, side);
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let diff = max_abs_diff(&got, &want);
    eprintln!(
        "{}: {side}px batch {n}: max |diff| {diff:e}",
        set.spec().name
    );
    assert_eq!(got.len(), want.len());
    assert!(diff <= 1e-4 * scale, "{}: {diff}", set.spec().name);
}

#[test]
fn real_lite0_weights_export_to_the_same_logits() {
    let set = weights::load(&fixture(LITE0), None).unwrap();
    check(&set, 224, 1, false);
}

#[test]
fn every_block_kind_and_padding_exports_to_the_same_logits() {
    for (name, padding, side, n, dynamic) in [
        ("b0", Padding::Same, 96, 1, false),
        ("b0", Padding::Symmetric, 67, 2, true),
        ("v2-b0", Padding::Same, 64, 2, true),
        ("lite1", Padding::Same, 72, 1, false),
    ] {
        let mut spec = variant(name).unwrap();
        spec.padding = padding;
        check(&WeightSet::random(&spec, 3), side, n, dynamic);
    }
}

#[test]
fn bad_export_options_are_errors() {
    let set = WeightSet::random(&variant("b0").unwrap(), 1);
    let opts = |opset, resolution| OnnxOptions {
        resolution,
        dynamic_batch: false,
        opset,
    };
    let e = to_onnx(&set, &opts(9, 224)).unwrap_err().to_string();
    assert!(e.contains("--opset 9 is not supported"), "{e}");
    assert!(to_onnx(&set, &opts(17, 0)).is_err());
}

/// Weights from `effnet quantize` export as QDQ (QuantizeLinear/DequantizeLinear around each int8
/// convolution's input, int8 weights per output channel), which another runtime (tract) runs to
/// the int8 engine's logits; layers the guard kept out of int8 stay plain fp32 convolutions.
#[test]
fn int8_weights_export_as_qdq_with_the_int8_engine_logits() {
    use effnet::engine::Precision;
    use effnet::quantize::{Images, Method, Options, quantize};
    for (name, side, n) in [("lite0", 96, 1), ("b0", 64, 2), ("v2-b0", 64, 1)] {
        let mut set = WeightSet::random(&variant(name).unwrap(), 5);
        let images: Vec<Vec<f32>> = (0..3)
            .map(|i| {
                input(1, side)
                    .iter()
                    .map(|v| v * (0.5 + i as f32 * 0.3))
                    .collect()
            })
            .collect();
        let opts = Options {
            method: Method::MinMax,
            threshold: 0.0,
            holdout: 0.0,
            threads: 1,
            bias_correction: true,
        };
        let data = Images {
            data: &images,
            side,
        };
        let (mut q, _) = quantize(&set, data, &opts, &|_| {}).unwrap();
        // Every fifth layer kept in fp32, as the guard would; the others in int8, V2-B0's 32->16
        // conv too (`quantize` leaves it in f32, faster there: an f32 layer whose output feeds an
        // int8 one passes on its last-bit differences from ONNX Runtime's conv, which can move
        // that layer's int8 roundings by a step).
        for (i, l) in q.layers.iter_mut().enumerate() {
            l.int8 = i % 5 != 0;
        }
        set.meta.quantization = Some(q);
        let opts = OnnxOptions {
            resolution: side,
            dynamic_batch: n > 1,
            opset: 17,
        };
        let bytes = to_onnx(&set, &opts).unwrap();
        let x = input(n, side);
        let got = run_onnx(&bytes, &x, n, side);
        // The graph's float layers are fp32: so are the engine's here (its default is bf16 where
        // the CPU has it).
        let mut engine = Engine::new(&set)
            .unwrap()
            .with_int8_fallback(Precision::Fp32)
            .unwrap()
            .with_precision(Precision::Int8)
            .unwrap();
        let want = engine.forward(&x, n, side, side);
        let fp32 = Engine::new(&set).unwrap().forward(&x, n, side, side);
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        let (diff, moved) = (max_abs_diff(&got, &want), max_abs_diff(&fp32, &want));
        eprintln!("{name}: QDQ vs int8 engine max |diff| {diff:e}; int8 vs fp32 {moved:e}");
        assert!(
            diff <= 1e-3 * scale && diff * 20.0 < moved,
            "{name}: {diff} ({moved})"
        );
    }
}

/// One file exported with a dynamic batch runs at batch 1 and at batch 3, each to the engine's
/// logits.
#[test]
fn a_dynamic_batch_export_runs_at_batch_1_and_3() {
    let set = WeightSet::random(&variant("lite0").unwrap(), 7);
    let side = 64;
    let opts = OnnxOptions {
        resolution: side,
        dynamic_batch: true,
        opset: 17,
    };
    let bytes = to_onnx(&set, &opts).unwrap();
    let mut engine = Engine::new(&set).unwrap();
    for n in [1, 3] {
        let x = input(n, side);
        let (got, want) = (
            run_onnx(&bytes, &x, n, side),
            engine.forward(&x, n, side, side),
        );
        assert_eq!(got.len(), n * 1000);
        let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(max_abs_diff(&got, &want) <= 1e-4 * scale, "batch {n}");
    }
}
