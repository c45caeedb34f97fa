//! A native CPU inference engine compiled from the spec and a weight set.
//!
//! [`plan`] compiles once: BN folded into the convolutions, weights packed for the GEMM
//! micro-kernel, each block a fixed list of steps naming the buffers they read and write. The
//! engine then executes the plan: NHWC activations, 1x1 and im2col convolutions on the
//! micro-kernel with bias + activation (+ residual) applied in registers ([`ops`]), depthwise
//! convolutions with bias, activation and the SE pooling fused ([`kernels`]), the SE gate applied
//! to whichever is smaller (the activations or the projection weights), buffers reused across
//! calls, and a thread pool ([`pool`]) whose use [`adapt`] checks against one thread. The burn
//! model stays the reference; `tests/engine.rs` checks the two agree to 1e-4.

mod adapt;
pub mod calibrate;
pub(crate) mod kernels;
mod ops;
mod plan;
pub(crate) mod pool;
#[doc(hidden)]
pub use pool::set_spin_us;
pub mod profile;
mod winograd;

use crate::simd::Bf16Form;
use crate::simd::ahead::{self, WeightOrder};
use crate::simd::gemm_bf16::Weights as Bf16Weights;
use crate::simd::gemm_i8::{ActQuant, Int8Weights};
use crate::spec::FeatureTap;
use crate::weights::{Quantization, WeightMeta, WeightSet};
use std::sync::Arc;

use adapt::Adapt;
use calibrate::{Observe, Observed, Observer};
use ops::{grow, mean_rows};
use plan::{BlockPlan, Buf, Conv, ConvKind, Plan, Se, Step};
use pool::{Pool, SharedMut};

use crate::simd::gemm::NR;

#[derive(Debug, thiserror::Error)]
#[error("cannot build the inference engine: {0}")]
pub struct EngineError(String);

/// A feature level the model does not have.
#[derive(Debug, thiserror::Error)]
#[error("no feature map at reduction {asked}; this model has reductions {available}")]
pub struct UnknownTap {
    pub asked: usize,
    pub available: String,
}

/// A backbone feature map of a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct FeatureMap {
    /// Input pixels per map pixel along each side.
    pub reduction: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    /// `[n x channels x height x width]`.
    pub data: Vec<f32>,
}

impl FeatureMap {
    fn from_nhwc(tap: &FeatureTap, x: &[f32], n: usize, (h, w): (usize, usize)) -> Self {
        let c = tap.channels;
        let mut data = vec![0.0; n * c * h * w];
        for img in 0..n {
            let (src, dst) = (
                &x[img * h * w * c..(img + 1) * h * w * c],
                &mut data[img * c * h * w..(img + 1) * c * h * w],
            );
            for (px, row) in src.chunks_exact(c).enumerate() {
                for (ch, v) in row.iter().enumerate() {
                    dst[ch * h * w + px] = *v;
                }
            }
        }
        FeatureMap {
            reduction: tap.reduction,
            channels: c,
            height: h,
            width: w,
            data,
        }
    }
}

/// What [`Engine::embed`] returns for a batch.
#[derive(Debug, Clone, PartialEq)]
pub struct Embedding {
    /// `[n x head channels]` when asked for.
    pub pooled: Option<Vec<f32>>,
    /// One map per asked reduction, in the order asked.
    pub maps: Vec<FeatureMap>,
}

/// The arithmetic of the engine's GEMM convolutions.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize)]
pub enum Precision {
    /// f32 throughout (bit-for-bit the reference path).
    #[default]
    Fp32,
    /// bf16 weights and activations with f32 sums (AVX512-BF16) in the GEMM convolutions and the
    /// classifier, f32 everywhere else (the planar stem and the Winograd convolutions too: faster
    /// in f32, `examples/engine_ab ... --precision bf16`). Where `vdpbf16ps` is slower than f32
    /// FMA, the same bf16 values are multiplied in f32 ([`Engine::bf16_form`]).
    Bf16,
    /// int8 weights (per output channel) and uint8 activations (calibrated per layer) with int32
    /// sums (AVX512-VNNI, AVX2 int16 pairs, or a portable loop), in the layers the weights'
    /// quantisation names; f32 everywhere else.
    Int8,
}

impl Precision {
    /// What runs when none is asked for: int8 for weights `effnet quantize` wrote on CPUs with
    /// AVX512-VNNI, or with AVX2 and no AVX-512; else fp32 (there the int8 kernels are exact but
    /// no faster than the f32 ones; `--precision int8` still runs them).
    pub fn default_for(meta: &WeightMeta) -> Self {
        if meta.quantization.is_some() && crate::simd::gemm_i8::fast() {
            Precision::Int8
        } else {
            Precision::Fp32
        }
    }
}

impl std::str::FromStr for Precision {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s.to_ascii_lowercase().as_str() {
            "fp32" | "f32" => Ok(Precision::Fp32),
            "bf16" => Ok(Precision::Bf16),
            "int8" => Ok(Precision::Int8),
            _ => Err(format!("unknown precision `{s}`: use fp32, bf16 or int8")),
        }
    }
}

impl std::fmt::Display for Precision {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Precision::Fp32 => "fp32",
            Precision::Bf16 => "bf16",
            Precision::Int8 => "int8",
        })
    }
}

/// The compiled network plus its reusable buffers.
pub struct Engine {
    pub meta: WeightMeta,
    plan: Plan,
    arena: Arena,
    pool: Pool,
    adapt: Adapt,
    single: std::cell::Cell<bool>,
    /// The GEMMs' weights in the order a pass runs them, Winograd's left out (see
    /// [`crate::simd::ahead`]).
    weight_order: Arc<WeightOrder>,
    /// Every GEMM convolution's name, in network order.
    layers: Vec<String>,
    /// Those with Winograd weights and at most two kernel panels of output channels (see
    /// [`Engine::faster_in_f32`]).
    narrow_winograd: Vec<String>,
    /// Recorders at the GEMM convolutions' inputs while calibrating.
    observers: Option<std::collections::HashMap<String, Observer>>,
    /// Stride-1 3x3 convs by Winograd F(4x4, 3x3) (on by default; off: im2col + GEMM).
    winograd: bool,
    /// The stem straight from the planar input (on by default; off: NHWC copy, im2col + GEMM).
    planar_stem: bool,
    /// Stride-1 depthwise convs in strips of pixels sharing their loads, on AVX-512 (on by
    /// default; off: per-pixel kernels).
    dw_strips: bool,
    /// A block's projection with no SE before it run inside the fused expand + depthwise, per
    /// band of rows (on by default; off: its own pass over the whole map).
    fused_projection: bool,
    /// Percent of a map's rows that row bands may make twice, set for comparisons (`None`: the
    /// default, by precision and projection; see [`Engine::with_band_overlap`]).
    band_overlap: Option<usize>,
    /// The planar stem's rows made per band inside a first block with no expansion, for its
    /// depthwise conv (on by default; off: the stem's whole output first).
    stem_fusion: bool,
    /// What runs the layers an int8 quantisation keeps out of int8, and the classifier.
    int8_fallback: Precision,
    /// Whether an int8 quantisation is set (by [`Engine::set_quantization`]).
    quantised: bool,
    /// Whether the layers out of int8 run in bf16 (bf16, or int8 with a bf16 fallback).
    bf16: bool,
    /// How bf16 runs (`None`: [`crate::simd::fastest_bf16_form`], measured when first needed).
    bf16_form: Option<Bf16Form>,
}

/// Buffers reused across calls: no allocation per inference once sizes are reached.
#[derive(Default)]
struct Arena {
    /// Indexed by [`Buf`].
    bufs: [Vec<f32>; 4],
    /// A copy of projection weights scaled by the SE gates.
    weight: Vec<f32>,
}

impl Arena {
    /// Buffer `from` to read and a different buffer `to` to write.
    fn io(&mut self, from: Buf, to: Buf) -> (&[f32], &mut Vec<f32>) {
        let [src, dst] = self
            .bufs
            .get_disjoint_mut([from as usize, to as usize])
            .expect("a plan step reads and writes different buffers");
        (src, dst)
    }
}

impl Engine {
    /// Compiles `set` (canonical tensors of any variant) into an engine.
    pub fn new(set: &WeightSet) -> Result<Self, EngineError> {
        let mut plan = Plan::compile(set)?;
        let layers = plan.gemm_convs_mut().map(|c| c.name.clone()).collect();
        let narrow_winograd = plan
            .gemm_convs_mut()
            .filter(|c| !c.winograd.is_empty() && c.cout <= 2 * NR)
            .map(|c| c.name.clone())
            .collect();
        Ok(Engine {
            meta: set.meta.clone(),
            plan,
            arena: Arena::default(),
            pool: Pool::new(1),
            adapt: Adapt::default(),
            single: std::cell::Cell::new(true),
            weight_order: Arc::default(),
            layers,
            narrow_winograd,
            observers: None,
            winograd: true,
            planar_stem: true,
            dw_strips: true,
            fused_projection: true,
            band_overlap: None,
            stem_fusion: true,
            int8_fallback: Self::default_int8_fallback(),
            quantised: false,
            bf16: false,
            bf16_form: None,
        })
    }

    /// The GEMM convolutions (what int8 quantises), in network order.
    pub fn gemm_layers(&self) -> &[String] {
        &self.layers
    }

    /// The GEMM convolutions that run faster in f32 than in int8 on this CPU, which `effnet
    /// quantize` leaves out of int8: those that run by Winograd with at most 64 output channels,
    /// two panels of the int8 kernel (V2's first blocks: V2-B0's 112x112 32->16 took 1.04 ms in
    /// int8 and 0.58 by f32 Winograd, V2-S's 192x192 24->24 3.1 against 2.3-2.4 ms, 32->64 at
    /// 112x112 2.0 against 1.8; 32->96 was even, and 128 or more output channels 12-15 % faster in
    /// int8; `bench --profile`, docs/benchmarks.md).
    pub fn faster_in_f32(&self) -> &[String] {
        match self.winograd {
            true => &self.narrow_winograd,
            false => &[],
        }
    }

    /// Starts recording every GEMM convolution's input (replacing what was recorded).
    pub fn observe(&mut self, how: &Observe) {
        let observers = self
            .layers
            .iter()
            .map(|n| (n.clone(), Observer::new(n, how)));
        self.observers = Some(observers.collect());
    }

    /// What was recorded since [`Engine::observe`], in network order; recording stops.
    pub fn observations(&mut self) -> Vec<Observed> {
        let mut observers = self.observers.take().unwrap_or_default();
        self.layers
            .iter()
            .filter_map(|n| observers.remove(n))
            .map(Observer::take)
            .collect()
    }

    /// A conv with its recorder, if recording.
    fn observed<'a>(&'a self, conv: &'a plan::Conv) -> (&'a plan::Conv, Option<&'a Observer>) {
        (
            conv,
            self.observers.as_ref().and_then(|o| o.get(&conv.name)),
        )
    }

    /// Runs the layers `q` marks int8 in int8 on their calibrated input grids, the rest and the
    /// classifier in the precision of [`Engine::with_int8_fallback`] (what [`Precision::Int8`]
    /// does with the weights' own quantisation; `effnet quantize` tries others). `q` must name
    /// every GEMM convolution of this model.
    pub fn set_quantization(&mut self, q: &Quantization) -> Result<(), EngineError> {
        let by_name: std::collections::HashMap<&str, _> =
            q.layers.iter().map(|l| (l.name.as_str(), l)).collect();
        if let Some(missing) = self
            .layers
            .iter()
            .find(|n| !by_name.contains_key(n.as_str()))
        {
            return Err(EngineError(format!(
                "the int8 quantisation does not fit this model: it has no range for `{missing}` (quantise these weights again)"
            )));
        }
        // The bf16 weights stay: the fallback reuses those of layers still out of int8 (the
        // accuracy guard sets one quantisation after another).
        self.quantised = false;
        for conv in self.plan.gemm_convs_mut() {
            conv.int8 = None;
        }
        let quantised = self.quantise_layers(&by_name);
        self.plan.refresh_stem_quads();
        if let Err(e) = quantised {
            // As fp32 with the layers quantised so far, as before.
            self.drop_bf16();
            return Err(e);
        }
        self.apply_int8_fallback();
        self.quantised = true;
        Ok(())
    }

    /// Sets the int8 weights of the layers `by_name` marks int8.
    fn quantise_layers(
        &mut self,
        by_name: &std::collections::HashMap<&str, &crate::weights::QuantizedLayer>,
    ) -> Result<(), EngineError> {
        for conv in self.plan.gemm_convs_mut() {
            let layer = by_name[conv.name.as_str()];
            if !layer.int8 {
                continue;
            }
            if !(layer.lo.is_finite() && layer.hi.is_finite() && layer.lo <= layer.hi) {
                return Err(EngineError(format!(
                    "the int8 range of `{}` is not a range: {}..{}",
                    conv.name, layer.lo, layer.hi
                )));
            }
            let (k, n) = (conv.gemm_rows(), conv.cout);
            let packed;
            let panels = match conv.packed.is_empty() {
                true => {
                    packed = crate::simd::gemm::pack(&conv.weight, k, n);
                    &packed
                }
                false => &conv.packed,
            };
            let grid = ActQuant::covering(layer.lo, layer.hi);
            let mean = match layer.input_mean.len() {
                0 => &[][..],
                len if len == k => &layer.input_mean[..],
                len => {
                    return Err(EngineError(format!(
                        "the int8 quantisation does not fit this model: `{}` has {len} input means for {k} inputs",
                        conv.name
                    )));
                }
            };
            let w = Int8Weights::quantize(panels, (k, n), &conv.bias, grid, mean);
            conv.int8 = Some(w);
        }
        Ok(())
    }

    /// Runs the layers an int8 quantisation keeps out of int8, and the classifier, in `precision`
    /// (fp32, or bf16 where the CPU has it; the default is [`Engine::default_int8_fallback`]).
    /// fp32 gives what the QDQ graph of `effnet export onnx` computes.
    pub fn with_int8_fallback(mut self, precision: Precision) -> Result<Self, EngineError> {
        match precision {
            Precision::Int8 => {
                return Err(EngineError(
                    "the layers kept out of int8 run in fp32 or bf16, not int8".into(),
                ));
            }
            Precision::Bf16 => require_bf16("a bf16 fallback")?,
            Precision::Fp32 => {}
        }
        self.int8_fallback = precision;
        if self.quantised {
            self.apply_int8_fallback();
        }
        Ok(self)
    }

    /// Packs (or drops) the bf16 weights of the layers out of int8 for [`Engine::int8_fallback`].
    fn apply_int8_fallback(&mut self) {
        match self.int8_fallback {
            Precision::Bf16 => self.pack_bf16(),
            _ => self.drop_bf16(),
        }
    }

    pub fn num_classes(&self) -> usize {
        self.plan.classifier.cout
    }

    /// Runs the GEMM convolutions (stem, 1x1 and full 3x3 convs, head: most of the arithmetic)
    /// and the classifier in `precision`; depthwise convs, SE and pooling stay f32.
    pub fn with_precision(mut self, precision: Precision) -> Result<Self, EngineError> {
        self.set_precision(precision)?;
        Ok(self)
    }

    /// [`Engine::with_precision`] in place.
    pub fn set_precision(&mut self, precision: Precision) -> Result<(), EngineError> {
        match precision {
            Precision::Fp32 => {
                self.quantised = false;
                self.drop_bf16();
                for conv in self.plan.gemm_convs_mut() {
                    conv.int8 = None;
                }
                self.plan.refresh_stem_quads();
            }
            Precision::Int8 => {
                let q = self.meta.quantization.clone().ok_or_else(|| {
                    EngineError(
                        "--precision int8 needs weights quantised for it: run `effnet quantize --weights W --calib IMAGES --out W8` and use W8".into(),
                    )
                })?;
                self.set_quantization(&q)?;
            }
            Precision::Bf16 => {
                require_bf16("--precision bf16")?;
                self.set_precision(Precision::Fp32)?;
                self.pack_bf16();
            }
        }
        Ok(())
    }

    /// Packs the classifier and every GEMM convolution not in int8 for the bf16 kernel where
    /// that is faster (keeping packs already made in this form; dropping those of layers now in
    /// int8).
    fn pack_bf16(&mut self) {
        self.bf16 = true;
        let (winograd, form) = (self.winograd, self.bf16_form());
        // The classifier has one row per image: at batch 1 its time is its weights' bytes, which
        // pairs halve (Lite0: 0.28 ms in pairs, 0.40 widened, `bench --profile`).
        let classifier = self.plan.classifier.name.clone();
        // bf16 runs only where the f32 GEMM kernel does, so every GEMM weight is packed.
        for conv in self.plan.bf16_gemms_mut() {
            let form = if conv.name == classifier {
                Bf16Form::Pairs
            } else {
                form
            };
            if conv.int8.is_some() || !faster_in_bf16(conv, winograd) {
                conv.bf16 = None;
            } else if conv.bf16.as_ref().is_none_or(|w| w.form() != form) {
                let k = conv.gemm_rows();
                conv.bf16 = Some(Bf16Weights::pack(&conv.packed, k, form));
            }
        }
    }

    /// Drops every bf16 weight: the GEMMs run their f32 (or int8) weights.
    fn drop_bf16(&mut self) {
        self.bf16 = false;
        for conv in self.plan.bf16_gemms_mut() {
            conv.bf16 = None;
        }
    }

    /// How the bf16 layers run: by `vdpbf16ps` on bf16 pairs, or widened to f32 (the default is
    /// whichever does more multiply-adds per second on this CPU: [`Engine::bf16_form`]).
    pub fn with_bf16_form(mut self, form: Bf16Form) -> Self {
        self.bf16_form = Some(form);
        if self.bf16 {
            self.pack_bf16();
        }
        self
    }

    /// How the bf16 layers run (set, or the faster form on this CPU, measured once per process
    /// in about a millisecond: [`crate::simd::fastest_bf16_form`]).
    pub fn bf16_form(&self) -> Bf16Form {
        self.bf16_form
            .unwrap_or_else(crate::simd::fastest_bf16_form)
    }

    /// The precision of the layers an int8 quantisation keeps out of int8, and of the classifier,
    /// unless set otherwise: bf16 where the CPU has it (as OpenVINO does: on Lite0 that made int8
    /// 10-15 % faster than with fp32 there, docs/benchmarks.md), else fp32.
    pub fn default_int8_fallback() -> Precision {
        match crate::simd::gemm_bf16::available() {
            true => Precision::Bf16,
            false => Precision::Fp32,
        }
    }

    /// Runs on `threads` threads (the caller's plus sleeping workers; see [`pool`]).
    pub fn with_threads(mut self, threads: usize) -> Self {
        self.pool = Pool::new(threads);
        self
    }

    /// Runs the stride-1 3x3 convolutions by Winograd F(4x4, 3x3) (the default) or, with
    /// `false`, by im2col + GEMM like the other dense convolutions (for comparisons).
    pub fn with_winograd(mut self, on: bool) -> Self {
        self.winograd = on;
        if self.bf16 {
            // Winograd convolutions run in f32, the others may take bf16.
            self.pack_bf16();
        }
        self
    }

    /// Runs the stem straight from the planar (NCHW) input (the default, where its output channels
    /// are a multiple of 8 and it is not int8) or, with `false`, by an NHWC copy, im2col and GEMM
    /// like the other dense convolutions (for comparisons).
    pub fn with_planar_stem(mut self, on: bool) -> Self {
        self.planar_stem = on;
        self
    }

    /// Runs a block's projection with no SE before it inside the fused expand + depthwise or the
    /// Winograd conv of a Fused-MBConv block, on the rows each part just wrote (the default, where
    /// one part has every channel of its rows) or, with `false`, as its own pass over the whole
    /// map (for comparisons).
    pub fn with_fused_projection(mut self, on: bool) -> Self {
        self.fused_projection = on;
        self
    }

    /// Lets the threads split every fused expand + depthwise into bands of rows where the bands
    /// make at most `percent` of the map's rows twice (the rows their borders share); beyond it,
    /// blocks of channels. The default is 34 % where the rows come from an int8 expansion and the
    /// projection then runs per band, else 10 %. (For comparisons:
    /// `examples/engine_ab MODEL band-overlap`.)
    #[doc(hidden)]
    pub fn with_band_overlap(mut self, percent: usize) -> Self {
        self.band_overlap = Some(percent);
        self
    }

    /// Makes the planar stem's output rows per band inside the first block's depthwise conv and
    /// projection, where that block has no expansion and no SE (Lite's) and every channel of a
    /// band is in one part (the default) or, with `false`, the stem's whole output first (for
    /// comparisons). The stem's and the depthwise conv's outputs, 1.6 MB each at 224x224, then
    /// never leave the L2 cache.
    pub fn with_stem_fusion(mut self, on: bool) -> Self {
        self.stem_fusion = on;
        self
    }

    /// Runs stride-1 3x3 and 5x5 depthwise convs on maps 7 or more wide in strips of pixels that
    /// share their input loads, on AVX-512 (the default) or, with `false`, pixel by pixel like
    /// the others (for comparisons).
    pub fn with_dw_strips(mut self, on: bool) -> Self {
        self.dw_strips = on;
        self
    }

    /// Forward passes run so far, and how many of them ran on one thread although several were
    /// set (the thread policy's calibration and re-checks, or one thread chosen on a loaded
    /// machine; module `adapt`).
    pub fn thread_policy(&self) -> (u64, u64) {
        self.adapt.single_share()
    }

    /// What runs the layers kept out of int8 (see [`Engine::with_int8_fallback`]).
    pub fn int8_fallback(&self) -> Precision {
        self.int8_fallback
    }

    pub fn threads(&self) -> usize {
        self.pool.threads()
    }

    /// Logits `[n x classes]` for `n` NCHW images of `h x w` (any size).
    pub fn forward(&mut self, input: &[f32], n: usize, h: usize, w: usize) -> Vec<f32> {
        let pooled = self.timed_pass(input, (n, h, w), &[], &mut Vec::new());
        let fc = &self.plan.classifier;
        let (c, classes) = (fc.cin, fc.cout);
        let _t = profile::layer(
            "classifier",
            || format!("classifier {c}->{classes}"),
            || (n * c * classes) as u64,
        );
        let mut logits = vec![0.0; n * classes];
        // The classifier's weights (5 MB for 1000 classes) stream from memory for every batch:
        // each thread takes a block of the columns, so two threads read half each.
        let threads = self.active_threads();
        let parts = if classes >= 128 * threads { threads } else { 1 };
        // Whole 32-column panels, so each block starts where the kernels' packing does.
        let block = classes.div_ceil(parts).next_multiple_of(NR);
        let parts = classes.div_ceil(block);
        let shared = SharedMut::new(&mut logits);
        self.run_parts(parts, &|part| {
            let (c0, nc) = (part * block, block.min(classes - part * block));
            // The GEMM writes the part's columns at their place in full rows, so into scratch
            // rows first.
            let mut scratch = vec![0.0; n * classes];
            let fc_in = (fc, None);
            ops::gemm_bias_act(
                fc_in,
                fc.gemm_weight(),
                None,
                &pooled,
                n,
                (c0, nc),
                None,
                &mut scratch,
            );
            for (img, got) in scratch.chunks_exact(classes).enumerate() {
                // SAFETY: part p writes columns c0..c0 + nc of each image's row, disjoint from
                // every other part's.
                let out = unsafe { shared.slice(img * classes + c0, nc) };
                out.copy_from_slice(&got[c0..c0 + nc]);
            }
        });
        logits
    }

    /// The backbone's feature taps (reductions 2 to 32, timm's `features_only` levels).
    pub fn feature_taps(&self) -> Vec<FeatureTap> {
        self.meta.spec.feature_taps()
    }

    /// The tap at `reduction`, or an error naming the reductions there are.
    pub fn feature_tap(&self, reduction: usize) -> Result<FeatureTap, UnknownTap> {
        let taps = self.feature_taps();
        taps.iter()
            .copied()
            .find(|t| t.reduction == reduction)
            .ok_or_else(|| UnknownTap {
                asked: reduction,
                available: taps
                    .iter()
                    .map(|t| t.reduction.to_string())
                    .collect::<Vec<_>>()
                    .join(", "),
            })
    }

    /// Features of `n` NCHW images of `h x w`: the pooled head features `[n x head channels]`
    /// (the classifier's input) when `pooled`, and the backbone maps at each of `reductions`
    /// (NCHW, as the burn model's `forward_features` returns them).
    pub fn embed(
        &mut self,
        input: &[f32],
        (n, h, w): (usize, usize, usize),
        pooled: bool,
        reductions: &[usize],
    ) -> Result<Embedding, UnknownTap> {
        let chosen = reductions
            .iter()
            .map(|&r| self.feature_tap(r))
            .collect::<Result<Vec<_>, _>>()?;
        let mut maps = Vec::new();
        let head = self.timed_pass(input, (n, h, w), &chosen, &mut maps);
        // Captured in network order, each with its place in the request.
        maps.sort_by_key(|(asked, _)| *asked);
        let maps = maps.into_iter().map(|(_, m)| m).collect();
        Ok(Embedding {
            pooled: pooled.then_some(head),
            maps,
        })
    }

    /// One pass through stem, blocks and head with the thread policy deciding the mode; returns
    /// the pooled head features and appends the map at each of `taps`, with its index in `taps`,
    /// to `maps`.
    fn timed_pass(
        &mut self,
        input: &[f32],
        (n, h, w): (usize, usize, usize),
        taps: &[FeatureTap],
        maps: &mut Vec<(usize, FeatureMap)>,
    ) -> Vec<f32> {
        assert_eq!(input.len(), n * 3 * h * w, "input must be n x 3 x h x w");
        let mut a = std::mem::take(&mut self.arena);
        let threads = self.pool.threads();
        let single = self.adapt.choose_single(threads, (n, h, w));
        self.single.set(single);
        self.follow_weight_order();
        let start = std::time::Instant::now();
        let pooled = self.pooled_features(&mut a, input, (n, h, w), taps, maps);
        self.adapt
            .record(threads, single, start.elapsed().as_secs_f64());
        self.arena = a;
        pooled
    }

    /// Threads the current forward pass uses (1 while [`Adapt`] probes or prefers one).
    fn active_threads(&self) -> usize {
        if self.single.get() {
            1
        } else {
            self.pool.threads()
        }
    }

    fn run_parts(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        if self.single.get() {
            (0..parts).for_each(f);
        } else {
            let order = &self.weight_order;
            self.pool.run(parts, &|part| {
                ahead::follow(order);
                f(part)
            });
        }
    }

    /// Has this thread's GEMM kernels fetch each next layer's weights ahead, by the order the
    /// plan's GEMMs run in now (the weights move when the precision changes, so it is
    /// checked every pass: a few dozen addresses).
    fn follow_weight_order(&mut self) {
        let planar_stem = self.planar_stem_path().is_some();
        // As `ops::gemm_bias_act` picks the kernel: int8, bf16, then f32.
        let fetched = |(i, c): (usize, &plan::Conv)| match (&c.int8, &c.bf16) {
            _ if i == 0 && planar_stem => None,
            (Some(w), _) => Some(w.kernel_span()),
            (None, Some(w)) => Some(w.kernel_span()),
            (None, None) if c.packed.is_empty() || self.runs_winograd(c) => None,
            (None, None) => Some(ahead::span(&c.packed)),
        };
        let order = WeightOrder::new(self.plan.convs().enumerate().filter_map(fetched));
        if *self.weight_order != order {
            self.weight_order = Arc::new(order);
        }
        ahead::follow(&self.weight_order);
    }

    fn pooled_features(
        &self,
        a: &mut Arena,
        input: &[f32],
        (n, h, w): (usize, usize, usize),
        taps: &[FeatureTap],
        maps: &mut Vec<(usize, FeatureMap)>,
    ) -> Vec<f32> {
        let p = &self.plan;
        let stem_taps = taps.iter().any(|t| t.after_block.is_none());
        let planar = self.planar_stem_path();
        let fused = match (planar, p.blocks.first()) {
            (Some(int8), Some(first)) if !stem_taps => self
                .stem_fusion_split(first, n, (h, w))
                .map(|split| (int8, first, split)),
            _ => None,
        };
        let mut first_block = 0;
        let mut shape = if let Some((int8, first, split)) = fused {
            // The stem's output is made inside the first block; its shape is that block's input.
            let shape = self.stem_rows(input, n, (h, w), int8, |stem| {
                let stem_out = stem.output_shape();
                self.block(first, a, n, stem_out, Some((stem, split)))
            });
            a.bufs.swap(Buf::X as usize, Buf::Y as usize);
            first_block = 1;
            shape
        } else if let Some(int8) = planar {
            self.planar_stem(input, &mut a.bufs[Buf::Y as usize], n, (h, w), int8)
        } else {
            // NCHW -> NHWC.
            let x = &mut a.bufs[Buf::X as usize];
            grow(x, n * h * w * 3);
            for img in 0..n {
                for c in 0..3 {
                    for px in 0..h * w {
                        x[(img * h * w + px) * 3 + c] = input[(img * 3 + c) * h * w + px];
                    }
                }
            }
            let (x, y) = a.io(Buf::X, Buf::Y);
            self.conv(&p.stem, x, y, n, (h, w), None)
        };
        let mut capture = |after_block: Option<usize>, x: &[f32], (h, w): (usize, usize)| {
            for (i, t) in taps.iter().enumerate() {
                if t.after_block == after_block {
                    maps.push((i, FeatureMap::from_nhwc(t, x, n, (h, w))));
                }
            }
        };
        if first_block == 0 {
            a.bufs.swap(Buf::X as usize, Buf::Y as usize);
            capture(None, &a.bufs[Buf::X as usize], shape);
        } else {
            capture(Some(0), &a.bufs[Buf::X as usize], shape);
        }
        for (i, b) in p.blocks.iter().enumerate().skip(first_block) {
            shape = self.block(b, a, n, shape, None);
            a.bufs.swap(Buf::X as usize, Buf::Y as usize);
            capture(Some(i), &a.bufs[Buf::X as usize], shape);
        }
        let (x, y) = a.io(Buf::X, Buf::Y);
        let (hh, hw) = self.pointwise(p.head.gemm_weight(), None, &p.head, (x, y), n, shape, None);
        let c = p.head.cout;
        let _t = profile::layer("pool", || format!("pool {c}"), || 0);
        let y = &a.bufs[Buf::Y as usize];
        let mut pooled = vec![0.0; n * c];
        for (img, out) in pooled.chunks_exact_mut(c).enumerate() {
            mean_rows(&y[img * hh * hw * c..(img + 1) * hh * hw * c], out);
        }
        pooled
    }

    /// Whether the stem runs straight from the planar input, and if so whether in int8 (`None`:
    /// by an NHWC copy, im2col and GEMM; always so while calibrating, as the observers read the
    /// im2col rows).
    fn planar_stem_path(&self) -> Option<bool> {
        let p = &self.plan;
        match (&p.stem.int8, self.planar_stem && self.observers.is_none()) {
            (_, false) => None,
            (Some(_), true) => (!p.stem_quads.is_empty()).then_some(true),
            (None, true) => (!p.stem_planar.is_empty()).then_some(false),
        }
    }

    /// The projection `next` when it can read the rows a step writes into `made` while they are
    /// still in cache: one with no SE between (and not while calibrating: the observers see whole
    /// maps).
    fn fusable_projection<'a>(
        &self,
        next: Option<&'a Step>,
        made: Buf,
    ) -> Option<(&'a Conv, bool)> {
        match next {
            Some(Step::Project {
                conv,
                from,
                se: None,
                residual,
            }) if *from == made && self.fused_projection && self.observers.is_none() => {
                Some((conv, *residual))
            }
            _ => None,
        }
    }

    /// How the first block `first` splits across threads when the stem's rows are made inside
    /// it (see [`Engine::with_stem_fusion`]), or `None` where they are not: its first step a
    /// depthwise conv of the block's input (no expansion) and its projection fused after it (no
    /// SE between), no residual, the planar stem, and every channel of a band in one part. (With
    /// an SE, B0's first block, the depthwise conv's whole output is written anyway; fusing the
    /// stem alone there measured no gain, 1.00-1.02x the time, within this VM's noise.)
    fn stem_fusion_split(
        &self,
        first: &BlockPlan,
        n: usize,
        (h, w): (usize, usize),
    ) -> Option<(usize, usize)> {
        let residual = first
            .steps
            .iter()
            .any(|s| matches!(s, Step::AddInput | Step::Project { residual: true, .. }));
        let stem = &self.plan.stem;
        match first.steps.first() {
            Some(Step::Conv {
                conv: dw,
                from: Buf::X,
                to: Buf::T2,
                ..
            }) if dw.kind == ConvKind::Depthwise
                && self.stem_fusion
                && !residual
                && self
                    .fusable_projection(first.steps.get(1), Buf::T2)
                    .is_some() =>
            {
                let g = ops::geometry(self.meta.spec.padding, h, w, stem.kernel, stem.stride);
                self.fused_split(dw, n, (g.out_h, g.out_w), (stem, first.steps.get(1)))
                    .filter(|&(_, col_parts)| col_parts == 1)
            }
            _ => None,
        }
    }

    /// `source` and the depthwise conv `dw` fused per band of rows (see
    /// [`Engine::expand_depthwise`]; `split` as from [`Engine::fused_split`]) from X into T2, or
    /// into Y through the block's `next` step when that is a projection that can read the rows in
    /// cache and every channel of a band is in one part. Returns the output shape, the channel
    /// sums (with `pool`) and whether the projection ran here.
    #[allow(clippy::too_many_arguments)]
    fn fused_depthwise(
        &self,
        source: ops::Source,
        dw: &Conv,
        pool: bool,
        next: Option<&Step>,
        a: &mut Arena,
        n: usize,
        shape: (usize, usize),
        split: (usize, usize),
    ) -> ((usize, usize), Option<Vec<f32>>, bool) {
        let mut sums = pool.then(|| vec![0.0; n * dw.cout]);
        let [x, t2, y] = a
            .bufs
            .get_disjoint_mut([Buf::X, Buf::T2, Buf::Y].map(|b| b as usize))
            .expect("distinct buffers");
        let project = self
            .fusable_projection(next, Buf::T2)
            .filter(|_| split.1 == 1);
        let projected = project.is_some();
        let project = project.map(|(conv, res)| (conv, &mut *y, res));
        let s = sums.as_deref_mut();
        let shape = self.expand_depthwise(source, dw, x, t2, n, shape, split, s, project);
        (shape, sums, projected)
    }

    /// One block's steps, from X (its input) into Y; returns the output spatial shape. With
    /// `stem` (the first block, as [`Engine::stem_fusion_split`] allows), X was not made: the
    /// depthwise conv reads the stem's rows as they are made, split across the threads as given.
    fn block(
        &self,
        b: &BlockPlan,
        a: &mut Arena,
        n: usize,
        shape: (usize, usize),
        stem: Option<(&ops::StemRows, (usize, usize))>,
    ) -> (usize, usize) {
        let mut cur = shape;
        // Channel sums of the tensor the SE reads, when the depthwise conv that made it pooled.
        let mut sums: Option<Vec<f32>> = None;
        let mut projected = false;
        for (i, step) in b.steps.iter().enumerate() {
            let next = b.steps.get(i + 1);
            match step {
                Step::ExpandDepthwise { expand, dw, pool } => {
                    match self.fused_split(dw, n, cur, (expand, next)) {
                        Some(split) => {
                            let source = ops::Source::Expand(expand);
                            (cur, sums, projected) =
                                self.fused_depthwise(source, dw, *pool, next, a, n, cur, split);
                        }
                        None => {
                            let mut s = pool.then(|| vec![0.0; n * dw.cout]);
                            let [x, t1, t2] = a
                                .bufs
                                .get_disjoint_mut([Buf::X, Buf::T1, Buf::T2].map(|b| b as usize))
                                .expect("distinct buffers");
                            let mid = self.conv(expand, x, t1, n, cur, None);
                            cur = self.conv(dw, t1, t2, n, mid, s.as_deref_mut());
                            sums = s;
                        }
                    }
                }
                Step::Project { .. } if std::mem::take(&mut projected) => {}
                // The first block's depthwise conv, with the stem's rows made per band.
                Step::Conv {
                    conv: dw,
                    from: Buf::X,
                    to: Buf::T2,
                    pool,
                } if let Some((stem, split)) = stem => {
                    let source = ops::Source::Stem(stem);
                    (cur, sums, projected) =
                        self.fused_depthwise(source, dw, *pool, next, a, n, cur, split);
                }
                // Fused-MBConv's 3x3 conv by Winograd, with the projection on each band's rows.
                Step::Conv {
                    conv,
                    from: Buf::X,
                    to,
                    pool: false,
                } if let Some((pc, residual)) = self.fusable_projection(next, *to)
                    && self.runs_winograd(conv) =>
                {
                    let [x, t, y] = a
                        .bufs
                        .get_disjoint_mut([Buf::X, *to, Buf::Y].map(|b| b as usize))
                        .expect("distinct buffers");
                    cur = self.winograd_conv(conv, x, t, n, cur, Some((pc, y, residual)));
                    projected = true;
                }
                Step::Conv {
                    conv,
                    from,
                    to,
                    pool,
                } => {
                    let mut s = pool.then(|| vec![0.0; n * conv.cout]);
                    let (src, dst) = a.io(*from, *to);
                    cur = self.conv(conv, src, dst, n, cur, s.as_deref_mut());
                    sums = s;
                }
                Step::Se { se, on } => {
                    let buf = &mut a.bufs[*on as usize];
                    let gates = self.se_gates(se, buf, n, cur, sums.take());
                    scale_images(buf, &gates, n, cur, se.channels);
                }
                Step::Project {
                    conv,
                    from,
                    se,
                    residual,
                } => {
                    let in_len = n * shape.0 * shape.1 * b.cin;
                    let [x, mid, y] = a
                        .bufs
                        .get_disjoint_mut([Buf::X as usize, *from as usize, Buf::Y as usize])
                        .expect("a projection reads a scratch buffer");
                    // The SE gate goes where it costs least: into the bf16 / int8 input
                    // conversion, a gated copy of the weights (one image, more pixels than
                    // output channels), or the activations (always while calibrating: the
                    // observers record the projection's gated input).
                    let mut gate = None;
                    let mut weight = conv.gemm_weight();
                    if let Some(se) = se {
                        let gates = self.se_gates(se, mid, n, cur, sums.take());
                        match () {
                            _ if n == 1 && conv.takes_gate() => gate = Some(gates),
                            _ if n == 1
                                && cur.0 * cur.1 > conv.cout
                                && self.observers.is_none() =>
                            {
                                let len = weight.len();
                                grow(&mut a.weight, len);
                                conv.gated_weight(&gates, &mut a.weight[..len]);
                                weight = &a.weight[..len];
                            }
                            _ => scale_images(mid, &gates, n, cur, se.channels),
                        }
                    }
                    let res = residual.then(|| &x[..in_len]);
                    cur = self.pointwise(weight, gate.as_deref(), conv, (mid, y), n, cur, res);
                }
                Step::AddInput => {
                    let len = n * cur.0 * cur.1 * b.cout;
                    let (x, y) = a.io(Buf::X, Buf::Y);
                    for (o, r) in y[..len].iter_mut().zip(&x[..len]) {
                        *o += r;
                    }
                }
            }
        }
        cur
    }

    /// The SE gates of each image (`n x channels`) of `mid` (`n` maps of `h x w`), from the
    /// depthwise conv's channel `sums` when it pooled.
    fn se_gates(
        &self,
        se: &Se,
        mid: &[f32],
        n: usize,
        (h, w): (usize, usize),
        sums: Option<Vec<f32>>,
    ) -> Vec<f32> {
        let c = se.channels;
        let _t = profile::layer(
            "squeeze-excite",
            || format!("{} {c}->{}->{c}", se.name, se.reduced),
            || (n * 2 * c * se.reduced) as u64,
        );
        let pool = match sums {
            Some(mut s) => {
                s.iter_mut().for_each(|p| *p /= (h * w) as f32);
                s
            }
            None => {
                let mut s = vec![0.0; n * c];
                for (img, out) in s.chunks_exact_mut(c).enumerate() {
                    mean_rows(&mid[img * h * w * c..(img + 1) * h * w * c], out);
                }
                s
            }
        };
        let mut hidden = vec![0.0; se.reduced];
        let mut gates = vec![0.0; n * c];
        for (p, g) in pool.chunks_exact(c).zip(gates.chunks_exact_mut(c)) {
            kernels::gemv(p, &se.w1, se.reduced, &se.b1, &mut hidden, Some(se.act));
            kernels::gemv(&hidden, &se.w2, c, &se.b2, g, None);
        }
        kernels::sigmoid_inplace(&mut gates);
        gates
    }
}

/// Latency of the engine's thread pool: (median, p90) microseconds of one parallel region of
/// `threads` trivial parts, over `iterations` regions (`effnet bench --pool`).
pub fn pool_latency(threads: usize, iterations: usize) -> (f64, f64) {
    let pool = Pool::new(threads);
    let mut us: Vec<f64> = (0..iterations.max(1))
        .map(|_| {
            let t = std::time::Instant::now();
            pool.run(threads, &|_| {
                std::hint::black_box(0);
            });
            t.elapsed().as_secs_f64() * 1e6
        })
        .collect();
    us.sort_by(f64::total_cmp);
    (us[us.len() / 2], us[us.len() * 9 / 10])
}

/// Multiplies each image's `h x w` rows of `c` channels by its gates.
fn scale_images(x: &mut [f32], gates: &[f32], n: usize, (h, w): (usize, usize), c: usize) {
    let len = h * w * c;
    for img in 0..n {
        kernels::scale_rows(
            &mut x[img * len..(img + 1) * len],
            &gates[img * c..(img + 1) * c],
        );
    }
}

/// Whether bf16 makes `conv` faster than f32: not where it runs Winograd, which in f32 takes a
/// quarter of the multiplies of im2col + GEMM (V2-B0's 112x112 block 0 took 1.37 ms by bf16
/// im2col, 0.59 by f32 Winograd: alternating `bench --profile` runs, docs/benchmarks.md).
fn faster_in_bf16(conv: &plan::Conv, winograd: bool) -> bool {
    !winograd || conv.winograd.is_empty()
}

/// `Ok` where this CPU runs the bf16 kernel, else the one-line error for `asked`.
fn require_bf16(asked: &str) -> Result<(), EngineError> {
    match crate::simd::gemm_bf16::available() {
        true => Ok(()),
        false => Err(EngineError(format!(
            "{asked} needs a CPU with AVX512-BF16 (vdpbf16ps), which this one lacks; use fp32"
        ))),
    }
}

#[cfg(test)]
mod tests {
    use super::{Bf16Form, Engine};
    use crate::simd::{Level, with_level};
    use crate::spec::variant;
    use crate::weights::WeightSet;

    /// bf16 leaves in f32 the convs that run Winograd (unless Winograd is off) and takes every
    /// other GEMM and the classifier, in the form set (the classifier always in pairs).
    #[test]
    fn bf16_takes_the_gemms_it_makes_faster() {
        if !crate::simd::gemm_bf16::available() {
            eprintln!("no AVX512-BF16 here: not exercised");
            return;
        }
        let set = WeightSet::random(&variant("v2-b0").unwrap(), 3);
        let engine = Engine::new(&set).unwrap();
        let mut e = engine.with_precision(super::Precision::Bf16).unwrap();
        // (Winograd convs, those in bf16, those in f32), checking each against the rule.
        let kinds = |e: &mut Engine| {
            let (mut winograd, mut bf16, mut f32) = (0, 0, 0);
            for conv in e.plan.bf16_gemms_mut() {
                let packed = conv.bf16.is_some();
                if !conv.winograd.is_empty() {
                    winograd += 1;
                    assert_eq!(packed, !e.winograd, "{}", conv.name);
                } else {
                    assert!(packed, "{}", conv.name);
                }
                match packed {
                    true => bf16 += 1,
                    false => f32 += 1,
                }
            }
            (winograd, bf16, f32)
        };
        let on = kinds(&mut e);
        assert!(on.0 > 0 && on.1 > 0 && on.2 == on.0, "{on:?}");
        e = e.with_winograd(false);
        assert_eq!(kinds(&mut e), (on.0, on.1 + on.0, 0));
        e = e.with_winograd(true);
        assert_eq!(kinds(&mut e), on);
        // Widened, every layer but the classifier (one row per image) is repacked.
        let forms = |e: &mut Engine| -> Vec<(String, Bf16Form)> {
            let packs = e.plan.bf16_gemms_mut();
            packs
                .filter_map(|c| Some((c.name.clone(), c.bf16.as_ref()?.form())))
                .collect()
        };
        for form in [Bf16Form::Widened, Bf16Form::Pairs] {
            e = e.with_bf16_form(form);
            let packs = forms(&mut e);
            assert_eq!(packs.len(), on.1);
            for (name, got) in packs {
                let want = if name == "classifier" {
                    Bf16Form::Pairs
                } else {
                    form
                };
                assert_eq!(got, want, "{name}");
            }
        }
        // Back to f32: no bf16 weight left.
        e.set_precision(super::Precision::Fp32).unwrap();
        assert!(e.plan.bf16_gemms_mut().all(|c| c.bf16.is_none()));
    }

    /// `quantize` leaves in f32 the Winograd convs with at most two int8 panels of outputs
    /// (64): V2-B0's first conv at 16, 64 but not 96 outputs, never its 32->128 conv.
    #[test]
    fn winograd_convs_of_up_to_64_outputs_are_faster_in_f32() {
        if !crate::simd::gemm::available() {
            eprintln!("no f32 GEMM kernel here: no Winograd, not exercised");
            return;
        }
        for (outputs, f32_faster) in [(16, true), (64, true), (96, false)] {
            let mut spec = variant("v2-b0").unwrap();
            spec.blocks[0].out_channels = outputs;
            spec.blocks[1].in_channels = outputs;
            let e = Engine::new(&WeightSet::random(&spec, 3)).unwrap();
            let listed = |name: &str| e.faster_in_f32().iter().any(|n| n == name);
            assert_eq!(listed("blocks.0.expand"), f32_faster, "{outputs} outputs");
            assert!(!listed("blocks.2.expand"), "{outputs} outputs");
            assert!(e.with_winograd(false).faster_in_f32().is_empty());
        }
    }

    /// A quantisation of `set` with every layer in int8, calibrated on one `side` x `side` image
    /// (returned beside it).
    fn every_layer_int8(set: &WeightSet, side: usize) -> (Vec<f32>, crate::weights::Quantization) {
        let image = crate::data::fixed_pattern(3 * side * side);
        let images = crate::quantize::Images {
            data: std::slice::from_ref(&image),
            side,
        };
        let opts = crate::quantize::Options {
            method: crate::quantize::Method::MinMax,
            threshold: 0.0,
            holdout: 0.0,
            threads: 1,
            bias_correction: false,
        };
        let (q, _) = crate::quantize::quantize(set, images, &opts, &|_| {}).unwrap();
        (image, q)
    }

    /// A pass has its threads fetch each GEMM's weights during the GEMM before, in network
    /// order: Lite0's 1x1 convs, head and classifier, not its stem (read from the planes) nor
    /// its depthwise convs; in int8 by the weights each kernel reads.
    #[test]
    fn a_pass_orders_its_gemms_for_fetching_ahead() {
        if !crate::simd::gemm::available() {
            eprintln!("no f32 GEMM kernel here: not exercised");
            return;
        }
        let set = WeightSet::random(&variant("lite0").unwrap(), 3);
        let mut e = Engine::new(&set).unwrap();
        assert!(e.weight_order.starts().is_empty());
        let side = 32;
        e.forward(&crate::data::fixed_pattern(3 * side * side), 1, side, side);
        let pointwise = e
            .plan
            .convs()
            .filter(|c| c.kind == super::ConvKind::Pointwise);
        let starts: Vec<usize> = pointwise.map(|c| c.packed.as_ptr() as usize).collect();
        // 15 expansions (not block 0), 16 projections, the head and the classifier.
        assert_eq!(starts.len(), 15 + 16 + 2);
        assert_eq!(e.weight_order.starts(), starts);
        // In int8 the same GEMMs, by the weights the int8 kernel reads (and the bf16 kernel's:
        // the classifier, on CPUs with AVX512-BF16).
        let (image, q) = every_layer_int8(&set, side);
        e.set_quantization(&q).unwrap();
        e.forward(&image, 1, side, side);
        let pointwise = e
            .plan
            .convs()
            .filter(|c| c.kind == super::ConvKind::Pointwise);
        let starts: Vec<usize> = pointwise
            .map(|c| match (&c.int8, &c.bf16) {
                (Some(w), _) => w.kernel_span().0,
                (None, Some(w)) => w.kernel_span().0,
                (None, None) => c.packed.as_ptr() as usize,
            })
            .collect();
        assert_eq!(e.weight_order.starts(), starts);
        assert!(e.plan.blocks[1].steps.iter().all(|s| match s {
            super::Step::ExpandDepthwise { expand: c, .. }
            | super::Step::Project { conv: c, .. } =>
                c.int8.is_some() || !crate::simd::gemm_i8::fast(),
            _ => true,
        }));
    }

    #[test]
    fn the_stem_runs_from_the_planes_in_every_precision_where_its_kernel_does() {
        let set = WeightSet::random(&variant("lite0").unwrap(), 3);
        let side = 32;
        let (_, q) = every_layer_int8(&set, side);
        let mut e = Engine::new(&set).unwrap();
        assert_eq!(e.planar_stem_path(), Some(false));
        e.set_quantization(&q).unwrap();
        let int8 = crate::simd::gemm_i8::vnni();
        assert_eq!(e.planar_stem_path(), int8.then_some(true));
        e.set_precision(super::Precision::Fp32).unwrap();
        assert_eq!(e.planar_stem_path(), Some(false));
        e = e.with_planar_stem(false);
        e.set_quantization(&q).unwrap();
        assert_eq!(e.planar_stem_path(), None);
    }

    #[test]
    fn the_stem_runs_inside_the_first_block_where_that_block_has_no_expansion_nor_se() {
        let split = |name: &str, threads: usize, fused: bool| {
            let set = WeightSet::random(&variant(name).unwrap(), 3);
            let e = Engine::new(&set)
                .unwrap()
                .with_threads(threads)
                .with_stem_fusion(fused);
            e.single.set(threads == 1);
            e.stem_fusion_split(&e.plan.blocks[0], 1, (224, 224))
        };
        assert_eq!(split("lite0", 1, true), Some((1, 1)));
        assert_eq!(split("lite4", 1, true), Some((1, 1)));
        assert_eq!(split("lite0", 2, true), Some((2, 1)));
        assert_eq!(split("lite0", 1, false), None);
        // An SE in the first block (B0), or no depthwise first step (V2's Fused-MBConv).
        assert_eq!(split("b0", 1, true), None);
        assert_eq!(split("v2-s", 1, true), None);
    }

    /// The plan and the kernels of each instruction set (packed or plain weights, the micro-kernel
    /// or the gemm crate, the classifier among them) give the same logits. One thread: a forced
    /// level holds on the calling thread only.
    #[test]
    fn every_instruction_set_gives_the_same_logits() {
        for (name, classes) in [("lite0", 37), ("b0", 300), ("v2-b0", 5)] {
            let mut spec = variant(name).unwrap();
            spec.num_classes = classes;
            let set = WeightSet::random(&spec, 3);
            let (n, h, w) = (2, 48, 40);
            let input: Vec<f32> = (0..n * 3 * h * w)
                .map(|i| ((i * 37 % 101) as f32 - 50.0) / 25.0)
                .collect();
            let logits = |level| {
                with_level(level, || {
                    Engine::new(&set).unwrap().forward(&input, n, h, w)
                })
            };
            let want = logits(Level::Avx512);
            let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
            for level in [Level::Avx2, Level::Portable] {
                let got = logits(level);
                assert_eq!(got.len(), n * classes);
                let diff = got
                    .iter()
                    .zip(&want)
                    .fold(0.0f32, |m, (a, b)| m.max((a - b).abs()));
                assert!(
                    diff <= 1e-4 * scale,
                    "{name}, {level:?}: {diff} (scale {scale})"
                );
            }
        }
    }
}
