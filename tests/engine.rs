//! The native engine against the PyTorch oracles and the burn model (max |diff| <= 1e-4).

mod common;

use burn::tensor::{Device, Distribution, Tensor};
use common::*;
use effnet::engine::{Engine, Precision};
use effnet::model::{EfficientNet, apply_weights};
use effnet::quantize::{Images, Method, Options, quantize};
use effnet::spec::{BlockArgs, Padding, variant};
use effnet::weights::{self, WeightSet};

#[test]
fn engine_matches_pytorch_fixtures() {
    for (file, oracle_name) in [
        (TV_B0, "torchvision_efficientnet_b0_seed0"),
        (TIMM_B0, "timm_tf_efficientnet_b0_seed0"),
        (LITE0, "efficientnet-lite0_coffee"),
        (LITE0, "efficientnet-lite0_chelsea"),
    ] {
        let set = weights::load(&fixture(file), None).unwrap();
        let mut engine = Engine::new(&set).unwrap();
        let (input, expected) = oracle(oracle_name);
        let [n, _, h, w] = input.shape[..] else {
            panic!()
        };
        let got = engine.forward(&input.data, n, h, w);
        let diff = max_abs_diff(&got, &expected.data);
        eprintln!("{oracle_name}: engine max |diff| {diff:e}");
        assert!(diff <= 1e-4, "{oracle_name}: {diff}");
        // Second call reuses the arena and gives the same answer.
        assert_eq!(engine.forward(&input.data, n, h, w), got);
    }
}

fn random_set(name: &str, padding: Padding) -> WeightSet {
    let mut spec = variant(name).unwrap();
    spec.padding = padding;
    WeightSet::random(&spec, 7)
}

/// The burn model's logits for `set` on a random normal input of `shape` (NCHW), with that input
/// as the engine takes it and the largest |logit| (the tests' tolerance scales with it).
fn burn_reference(set: &WeightSet, shape: [usize; 4]) -> (Vec<f32>, Vec<f32>, f32) {
    let device = Device::flex();
    let model = apply_weights(EfficientNet::new(set.spec(), &device), &set.tensors).unwrap();
    let x = Tensor::<4>::random(shape, Distribution::Normal(0.0, 1.0), &device);
    let data = x.clone().into_data().try_to_vec::<f32>().unwrap();
    let want = model.forward(x).into_data().try_to_vec::<f32>().unwrap();
    let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
    (data, want, scale)
}

#[test]
fn engine_matches_the_burn_model_on_every_family() {
    for (name, padding, batch, h, w) in [
        ("b0", Padding::Same, 1, 224, 224),
        ("b0", Padding::Symmetric, 2, 67, 90),
        ("b1", Padding::Same, 1, 96, 96),
        ("b2", Padding::Symmetric, 1, 96, 96),
        ("b3", Padding::Same, 1, 96, 96),
        ("b4", Padding::Same, 1, 64, 64),
        ("b5", Padding::Same, 1, 64, 64),
        ("lite0", Padding::Same, 2, 100, 72),
        ("lite1", Padding::Same, 1, 96, 96),
        ("lite2", Padding::Same, 1, 96, 96),
        ("lite3", Padding::Same, 1, 96, 96),
        ("lite4", Padding::Same, 1, 96, 96),
        ("v2-b0", Padding::Same, 1, 96, 96),
        ("v2-b1", Padding::Symmetric, 2, 64, 80),
        ("v2-b2", Padding::Same, 1, 96, 96),
        ("v2-b3", Padding::Same, 1, 96, 96),
        ("v2-s", Padding::Same, 1, 96, 96),
        ("b6", Padding::Same, 1, 64, 64),
        ("b7", Padding::Symmetric, 1, 64, 64),
        ("b8", Padding::Same, 1, 48, 48),
        ("l2", Padding::Same, 1, 32, 32),
        ("v2-m", Padding::Same, 1, 64, 64),
        ("v2-l", Padding::Symmetric, 1, 64, 64),
        ("v2-xl", Padding::Same, 1, 48, 48),
    ] {
        let set = random_set(name, padding);
        let (data, want, scale) = burn_reference(&set, [batch, 3, h, w]);
        let got = Engine::new(&set).unwrap().forward(&data, batch, h, w);
        let diff = max_abs_diff(&got, &want);
        eprintln!(
            "{name} {padding:?} {batch}x{h}x{w}: max |diff| {diff:e} (max |logit| {scale:.2})"
        );
        assert!(diff <= 1e-4 * scale.max(1.0), "{name}: {diff}");
    }
}

#[test]
fn classifiers_of_any_width_match_the_burn_model() {
    // The classifier runs on the packed GEMM kernel in 32-column panels, split by columns at two
    // threads once it is 256 wide: widths under a panel, not a multiple of one, and split in two.
    for classes in [1, 10, 37, 300] {
        let mut spec = variant("b0").unwrap();
        spec.blocks = BlockArgs::decode_all(&["r1_k3_s11_e1_i32_o16_se0.25"]).unwrap();
        spec.num_classes = classes;
        let set = WeightSet::random(&spec, 7);
        let (data, want, scale) = burn_reference(&set, [3, 3, 40, 36]);
        for threads in [1, 2] {
            let mut engine = Engine::new(&set).unwrap().with_threads(threads);
            for batch in [1, 3] {
                let got = engine.forward(&data[..batch * 3 * 40 * 36], batch, 40, 36);
                let diff = max_abs_diff(&got, &want[..batch * classes]);
                assert!(
                    diff <= 1e-4 * scale.max(1.0),
                    "{classes} classes, {threads} threads, batch {batch}: {diff}"
                );
            }
        }
    }
}

#[test]
fn wide_layers_cut_into_channel_blocks_match_the_burn_model() {
    // B7's last stage (19x19 maps of 3840 expanded channels) and a 5x5 layer of 1344 channels at
    // 38x38: too wide for one window of expanded rows in L2, so the fused expand + depthwise runs
    // them in channel blocks (row bands too at two threads on the larger map).
    for (res, blocks) in [
        (
            38,
            [
                "r1_k3_s11_e1_i32_o640_se0.25",
                "r1_k3_s11_e6_i640_o640_se0.25",
            ],
        ),
        (
            76,
            [
                "r1_k3_s11_e1_i32_o224_se0.25",
                "r1_k5_s11_e6_i224_o224_se0.25",
            ],
        ),
    ] {
        let mut spec = variant("b0").unwrap();
        spec.blocks = BlockArgs::decode_all(&blocks).unwrap();
        spec.resolution = res;
        let set = WeightSet::random(&spec, 7);
        let (data, want, scale) = burn_reference(&set, [1, 3, res, res]);
        for threads in [1, 2] {
            let mut engine = Engine::new(&set).unwrap().with_threads(threads);
            let diff = max_abs_diff(&engine.forward(&data, 1, res, res), &want);
            eprintln!("{blocks:?} at {res}, {threads} threads: max |diff| {diff:e}");
            assert!(
                diff <= 1e-4 * scale.max(1.0),
                "{blocks:?} {threads}: {diff}"
            );
        }
    }
}

/// Logits of the default engine at 1 and 2 threads against one with a path switched `off`,
/// within 1e-5, on each `(variant, padding, batch, h, w)`.
fn default_path_matches(
    cases: &[(&str, Padding, usize, usize, usize)],
    off: impl Fn(Engine) -> Engine,
) {
    for &(name, padding, batch, h, w) in cases {
        let set = random_set(name, padding);
        let data = effnet::data::fixed_pattern(batch * 3 * h * w);
        let want = off(Engine::new(&set).unwrap()).forward(&data, batch, h, w);
        for threads in [1, 2] {
            let got = Engine::new(&set)
                .unwrap()
                .with_threads(threads)
                .forward(&data, batch, h, w);
            let scale = want.iter().fold(0.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&got, &want);
            eprintln!(
                "{name} {padding:?} {threads} threads: max |diff| {diff:e} (max |logit| {scale:.2})"
            );
            assert!(diff <= 1e-5, "{name} {threads} threads: {diff}");
        }
    }
}

#[test]
fn winograd_matches_im2col_on_every_variant_with_3x3_convolutions() {
    // The V2 family's Fused-MBConv blocks are the stride-1 3x3 convs Winograd runs; B0 has none
    // (both paths must then be the same code). Odd sizes leave half tiles at the edges.
    let cases = [
        ("b0", Padding::Same, 1, 64, 64),
        ("v2-b0", Padding::Same, 2, 67, 90),
        ("v2-b1", Padding::Symmetric, 1, 64, 80),
        ("v2-b2", Padding::Same, 1, 96, 96),
        ("v2-b3", Padding::Symmetric, 1, 72, 72),
        ("v2-s", Padding::Same, 1, 96, 96),
        ("v2-m", Padding::Symmetric, 1, 64, 64),
        ("v2-l", Padding::Same, 1, 64, 64),
        ("v2-xl", Padding::Same, 1, 48, 48),
    ];
    default_path_matches(&cases, |e| e.with_winograd(false));
}

#[test]
fn planar_stem_matches_im2col_on_every_variant() {
    // Stems of 24 to 64 channels (blocks of 32, 16 and 8), TF-SAME and symmetric padding, odd
    // sizes that leave border columns and rows: straight from the planes against an NHWC copy,
    // im2col and GEMM.
    let cases = [
        ("b0", Padding::Same, 2, 67, 90),
        ("b3", Padding::Symmetric, 1, 64, 72),
        ("b4", Padding::Same, 1, 49, 51),
        ("b6", Padding::Same, 1, 48, 48),
        ("b7", Padding::Symmetric, 1, 40, 40),
        ("lite0", Padding::Symmetric, 1, 64, 48),
        ("v2-s", Padding::Same, 1, 65, 64),
        ("v2-b3", Padding::Symmetric, 1, 48, 56),
    ];
    default_path_matches(&cases, |e| e.with_planar_stem(false));
}

/// An int8 quantisation of `set` with every layer in int8, calibrated on one `side x side` image.
fn every_layer_in_int8(set: &WeightSet, side: usize) -> effnet::weights::Quantization {
    let image = effnet::data::fixed_pattern(3 * side * side);
    let calibration = Images {
        data: std::slice::from_ref(&image),
        side,
    };
    let all_int8 = Options {
        method: Method::MinMax,
        threshold: 0.0,
        holdout: 0.0,
        threads: 1,
        bias_correction: false,
    };
    quantize(set, calibration, &all_int8, &|_| {}).unwrap().0
}

#[test]
fn int8_planar_stem_matches_im2col_to_the_bit() {
    // With every layer in int8, the stem straight from uint8 planes (on CPUs with AVX512-VNNI;
    // stems of 16 to 64 channels in blocks of 16) against the NHWC copy, im2col and int8 GEMM:
    // the same integers and epilogue, so the same logits. V2-S's 24 channels keep im2col either
    // way. Batches of two, odd sizes, both paddings, 1 and 2 threads.
    for (name, padding, h, w) in [
        ("b0", Padding::Same, 67, 90),
        ("lite0", Padding::Symmetric, 64, 48),
        ("b7", Padding::Symmetric, 40, 40),
        ("v2-s", Padding::Same, 65, 64),
    ] {
        let set = random_set(name, padding);
        let q = every_layer_in_int8(&set, 48);
        let data = effnet::data::fixed_pattern(2 * 3 * h * w);
        for threads in [1, 2] {
            let run = |planar: bool| {
                let mut e = Engine::new(&set)
                    .unwrap()
                    .with_threads(threads)
                    .with_planar_stem(planar);
                e.set_quantization(&q).unwrap();
                e.forward(&data, 2, h, w)
            };
            assert_eq!(run(true), run(false), "{name}, {threads} threads");
        }
    }
}

#[test]
fn fused_projections_match_the_separate_pass_on_the_lite_family() {
    // Lite blocks have no SE, so each projection runs on the rows its part of the fused expand +
    // depthwise just wrote: stride 1 and 2, residual or not, batches, 1 and 2 threads (bands),
    // odd sizes that leave short last bands. In fp32, bf16 and int8 the kernel sees the same rows.
    let cases = [
        ("lite0", Padding::Same, 2, 67, 90),
        ("lite0", Padding::Symmetric, 1, 64, 48),
        ("lite2", Padding::Same, 1, 96, 96),
        ("lite4", Padding::Symmetric, 1, 75, 61),
    ];
    default_path_matches(&cases, |e| e.with_fused_projection(false));

    // bf16 (where the CPU has it) and int8 (every layer) give the same bits either way.
    let set = random_set("lite0", Padding::Same);
    let side = 64;
    let image = effnet::data::fixed_pattern(3 * side * side);
    let q = every_layer_in_int8(&set, side);
    let bf16 = Engine::new(&set)
        .unwrap()
        .with_precision(Precision::Bf16)
        .is_ok();
    for threads in [1, 2] {
        let run = |fused: bool, int8: bool| {
            let mut e = Engine::new(&set)
                .unwrap()
                .with_threads(threads)
                .with_fused_projection(fused);
            match int8 {
                true => e.set_quantization(&q).unwrap(),
                false => e = e.with_precision(Precision::Bf16).unwrap(),
            }
            e.forward(&image, 1, side, side)
        };
        assert_eq!(run(true, true), run(false, true), "int8, {threads} threads");
        if bf16 {
            assert_eq!(
                run(true, false),
                run(false, false),
                "bf16, {threads} threads"
            );
        }
    }
}

#[test]
fn winograd_convs_project_their_own_rows_with_the_same_bits() {
    // V2's stride-1 Fused-MBConv convs (Winograd) run their block's projection on each band's
    // whole tile rows instead of writing the expanded map: the same kernels on the same rows, so
    // the same logits as the projection's own pass. Residual or not, batches, odd sizes (half
    // tiles, steps that end inside a tile row), both paddings, 1 and 2 threads, in fp32 and in
    // bf16 where the CPU has it (Winograd stays f32 there, the projection is bf16).
    let cases = [
        ("v2-b0", Padding::Same, 2, 67, 90),
        ("v2-s", Padding::Symmetric, 1, 40, 216),
        ("v2-b3", Padding::Same, 1, 75, 61),
    ];
    for (name, padding, batch, h, w) in cases {
        let set = random_set(name, padding);
        let data = effnet::data::fixed_pattern(batch * 3 * h * w);
        for (precision, threads) in [Precision::Fp32, Precision::Bf16]
            .into_iter()
            .flat_map(|p| [(p, 1), (p, 2)])
        {
            let run = |fused: bool| {
                let e = Engine::new(&set)
                    .unwrap()
                    .with_threads(threads)
                    .with_fused_projection(fused);
                e.with_precision(precision)
                    .ok()
                    .map(|mut e| e.forward(&data, batch, h, w))
            };
            let case = format!("{name}, {precision:?}, {threads} threads");
            assert_eq!(run(true), run(false), "{case}");
        }
    }
}

#[test]
fn the_stem_made_inside_the_first_block_gives_the_same_bits() {
    // Lite's first block (no expansion, no SE) reads the stem's rows as each band makes them,
    // with its projection fused after: the same kernels on the same rows, so the same logits as
    // the stem's whole output first, in fp32, bf16 (where the CPU has it) and int8 (every
    // layer), at 1 and 2 threads (bands recompute their halo rows), batches, odd sizes, both
    // paddings. B0's first block has an SE and keeps the stem's own pass: the same either way.
    let cases = [
        ("lite0", Padding::Same, 2, 67, 90),
        ("lite0", Padding::Symmetric, 1, 64, 48),
        ("lite2", Padding::Same, 1, 96, 96),
        ("lite4", Padding::Symmetric, 2, 75, 61),
        ("b0", Padding::Same, 1, 64, 64),
    ];
    for (name, padding, batch, h, w) in cases {
        let set = random_set(name, padding);
        let q = every_layer_in_int8(&set, 48);
        let data = effnet::data::fixed_pattern(batch * 3 * h * w);
        for precision in [Precision::Fp32, Precision::Bf16, Precision::Int8] {
            for threads in [1, 2] {
                let run = |fused: bool| {
                    let mut e = Engine::new(&set)
                        .unwrap()
                        .with_threads(threads)
                        .with_stem_fusion(fused);
                    match precision {
                        Precision::Int8 => e.set_quantization(&q).unwrap(),
                        p => e = e.with_precision(p).ok()?,
                    }
                    Some(e.forward(&data, batch, h, w))
                };
                let on = run(true);
                assert_eq!(on, run(false), "{name} {precision:?}, {threads} threads");
                assert!(on.is_some() || precision == Precision::Bf16);
            }
        }
    }
}

#[test]
fn feature_maps_after_a_fused_stem_are_the_unfused_engines() {
    // Lite0's reduction-2 map is its first block's output (that block keeps stride 1), made
    // with the stem inside it: the same maps and pooled features as the unfused engine, with
    // and without it among the taps.
    let set = random_set("lite0", Padding::Same);
    let (n, h, w) = (2, 64, 48);
    let data = effnet::data::fixed_pattern(n * 3 * h * w);
    for reductions in [&[2, 4][..], &[4, 32][..]] {
        for threads in [1, 2] {
            let run = |fused: bool| {
                let mut e = Engine::new(&set)
                    .unwrap()
                    .with_threads(threads)
                    .with_stem_fusion(fused);
                let emb = e.embed(&data, (n, h, w), true, reductions).unwrap();
                let maps: Vec<Vec<f32>> = emb.maps.into_iter().map(|m| m.data).collect();
                (emb.pooled, maps)
            };
            assert_eq!(run(true), run(false), "{reductions:?}, {threads} threads");
        }
    }
}

#[test]
fn threads_and_batches_split_the_work_without_changing_the_answer() {
    // Several threads cut the fused expand + depthwise into row bands that recompute their halo
    // rows, and batches change how parts are cut: all must match one thread, one image at a time.
    for (name, padding, h, w) in [
        ("b0", Padding::Same, 67, 90),
        ("lite0", Padding::Symmetric, 64, 48),
        ("v2-b0", Padding::Same, 96, 64),
    ] {
        let set = random_set(name, padding);
        let per_image = 3 * h * w;
        let data = effnet::data::fixed_pattern(3 * per_image);
        let mut one = Engine::new(&set).unwrap();
        let want: Vec<f32> = (0..3)
            .flat_map(|i| one.forward(&data[i * per_image..(i + 1) * per_image], 1, h, w))
            .collect();
        let classes = want.len() / 3;
        for threads in [2, 3] {
            for batch in [1, 2, 3] {
                let mut engine = Engine::new(&set).unwrap().with_threads(threads);
                let got = engine.forward(&data[..batch * per_image], batch, h, w);
                let diff = max_abs_diff(&got, &want[..batch * classes]);
                assert!(
                    diff <= 1e-5,
                    "{name} {threads} threads batch {batch}: {diff}"
                );
            }
        }
    }
}

#[test]
fn embeddings_match_the_burn_models_features() {
    let device = Device::flex();
    for (name, padding, batch, h, w) in [
        ("b0", Padding::Same, 2, 67, 90),
        ("lite0", Padding::Symmetric, 1, 64, 64),
        ("v2-b0", Padding::Same, 2, 64, 48),
    ] {
        let set = random_set(name, padding);
        let model = apply_weights(EfficientNet::new(set.spec(), &device), &set.tensors).unwrap();
        let x = Tensor::<4>::random([batch, 3, h, w], Distribution::Normal(0.0, 1.0), &device);
        let data = x.clone().into_data().try_to_vec::<f32>().unwrap();
        let want_maps = model.forward_features(x.clone());
        let want_pooled = model
            .forward_head_features(x)
            .into_data()
            .try_to_vec::<f32>()
            .unwrap();
        let mut engine = Engine::new(&set).unwrap().with_threads(2);
        let reductions: Vec<usize> = engine.feature_taps().iter().map(|t| t.reduction).collect();
        assert_eq!(reductions, [2, 4, 8, 16, 32]);
        // Asked out of order: returned in the order asked.
        let asked = [32, 2, 8, 4, 16];
        let got = engine.embed(&data, (batch, h, w), true, &asked).unwrap();
        let pooled = got.pooled.unwrap();
        let scale = want_pooled.iter().fold(1.0f32, |m, v| m.max(v.abs()));
        assert!(
            max_abs_diff(&pooled, &want_pooled) <= 1e-4 * scale,
            "{name} pooled"
        );
        assert_eq!(got.maps.len(), asked.len());
        for (map, r) in got.maps.iter().zip(asked) {
            let want = &want_maps[reductions.iter().position(|&x| x == r).unwrap()];
            assert_eq!(map.reduction, r);
            assert_eq!(
                [batch, map.channels, map.height, map.width],
                want.dims(),
                "{name} tap {r}"
            );
            let want = want.clone().into_data().try_to_vec::<f32>().unwrap();
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            let diff = max_abs_diff(&map.data, &want);
            assert!(diff <= 1e-4 * scale, "{name} tap {r}: {diff}");
        }
        // The logits path is unchanged by embedding, and unknown levels are named.
        let logits = engine.forward(&data, batch, h, w);
        assert_eq!(logits.len(), batch * set.spec().num_classes);
        let err = engine
            .embed(&data, (batch, h, w), false, &[64])
            .unwrap_err();
        assert_eq!(
            err.to_string(),
            "no feature map at reduction 64; this model has reductions 2, 4, 8, 16, 32"
        );
    }
}

/// bf16 (AVX512-BF16 CPUs), in both forms (`vdpbf16ps` pairs and widened to f32): every GEMM
/// path (stem, 1x1, Fused-MBConv's full 3x3, head, classifier, the SE gate folded into the
/// projection, batches, two threads) stays close to f32: logits at a cosine similarity above
/// 0.999 and the same top-1 for each image.
#[test]
fn bf16_stays_close_to_fp32_on_each_family() {
    use effnet::engine::Precision;
    use effnet::simd::Bf16Form;
    let names = ["efficientnet-b0", "efficientnet-lite0", "efficientnetv2-b0"];
    let forms = [Bf16Form::Pairs, Bf16Form::Widened];
    for (name, form) in names.into_iter().flat_map(|n| forms.map(|f| (n, f))) {
        let set = random_set(name, Padding::Same);
        let engine = Engine::new(&set).unwrap().with_bf16_form(form);
        let Ok(mut bf16) = engine.with_precision(Precision::Bf16) else {
            eprintln!("no AVX512-BF16 here: not exercised");
            return;
        };
        let mut fp32 = Engine::new(&set).unwrap();
        let (n, side) = (3, 96);
        let input = effnet::data::fixed_pattern(n * 3 * side * side);
        let a = fp32.forward(&input, n, side, side);
        let mut one_thread = Vec::new();
        for threads in [1, 2] {
            bf16 = bf16.with_threads(threads);
            let b = bf16.forward(&input, n, side, side);
            // Two threads split the layers (the classifier by columns) without changing a sum.
            if threads == 1 {
                one_thread = b.clone();
            } else {
                let diff = max_abs_diff(&b, &one_thread);
                assert!(diff <= 1e-5, "{name} {form:?}: two threads {diff} from one");
            }
            let classes = a.len() / n;
            for (x, y) in a.chunks(classes).zip(b.chunks(classes)) {
                let dot: f64 = x.iter().zip(y).map(|(p, q)| (p * q) as f64).sum();
                let norm = |v: &[f32]| v.iter().map(|p| (p * p) as f64).sum::<f64>().sqrt();
                let cos = dot / (norm(x) * norm(y));
                assert!(
                    cos > 0.999,
                    "{name} {form:?}, {threads} thread(s): cosine {cos}"
                );
                let top = |v: &[f32]| (0..classes).max_by(|&i, &j| v[i].total_cmp(&v[j]));
                assert_eq!(top(x), top(y), "{name} {form:?}, {threads} thread(s)");
            }
        }
    }
}

#[test]
fn bf16_runs_the_classifier_in_bf16() {
    // The logits are the product of the bf16-rounded pooled features and classifier weights
    // (f32 sums): within float noise of that, and clearly away from the f32 product. (The bf16
    // classifier was wired but never packed for two days; the closeness tests above passed.)
    use effnet::engine::Precision;
    let set = random_set("lite0", Padding::Same);
    let Ok(mut e) = Engine::new(&set).unwrap().with_precision(Precision::Bf16) else {
        eprintln!("no AVX512-BF16 here: not exercised");
        return;
    };
    let side = 64;
    let input = effnet::data::fixed_pattern(3 * side * side);
    let logits = e.forward(&input, 1, side, side);
    let embedding = e.embed(&input, (1, side, side), true, &[]).unwrap();
    let pooled = embedding.pooled.unwrap();
    let (w, b) = (
        &set.tensors["classifier.weight"],
        &set.tensors["classifier.bias"],
    );
    let (classes, c) = (w.shape[0], w.shape[1]);
    assert_eq!((logits.len(), pooled.len()), (classes, c));
    let round = |v: f32| half::bf16::from_f32(v).to_f32() as f64;
    let (mut off_bf16, mut off_f32) = (0f64, 0f64);
    let rows = w.data.chunks_exact(c).zip(&b.data);
    for ((row, &bias), &got) in rows.zip(&logits) {
        let dot = |f: &dyn Fn(f32) -> f64| -> f64 {
            pooled
                .iter()
                .zip(row)
                .map(|(&x, &y)| f(x) * f(y))
                .sum::<f64>()
                + bias as f64
        };
        off_bf16 = off_bf16.max((got as f64 - dot(&round)).abs());
        off_f32 = off_f32.max((got as f64 - dot(&|v| v as f64)).abs());
    }
    eprintln!("max |logit - bf16 product| {off_bf16:e}, - f32 product {off_f32:e}");
    assert!(off_bf16 <= 1e-4, "{off_bf16}");
    assert!(
        off_f32 >= 10.0 * off_bf16.max(1e-6),
        "{off_f32} vs {off_bf16}"
    );
}
