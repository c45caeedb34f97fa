//! EfficientNet (Tan & Le, ICML 2019) and EfficientNetV2 for Rust.
//!
//! The architecture [`spec`] is the single source of truth, down to which convolutions each block
//! has ([`spec::ModelSpec::anatomy`]); from it come the exact [`analysis`] (parameters, MACs), the
//! trainable burn [`model`], the [`weights`] import from PyTorch checkpoints (files this crate
//! writes carry the whole spec, transform and class names), the native inference [`engine`], the
//! image [`preprocess`]ing each weight set needs, [`classify`] and [`evaluate`], the [`data`]
//! loaders, the training recipe ([`train`]), the scaling [`study`], and the `effnet` CLI. [`simd`] is
//! the one SIMD layer under the engine and the training ops.

#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]

pub mod analysis;
pub mod classify;
pub mod data;
pub mod device;
pub mod embed;
pub mod engine;
pub mod evaluate;
pub mod export;
pub mod model;
pub mod preprocess;
pub mod quantize;
pub mod search;
pub mod simd;
pub mod spec;
pub mod study;
pub mod train;
pub mod util;
pub mod weights;
