//! EfficientNet (Tan & Le, ICML 2019) and EfficientNetV2 for Rust.
//!
//! The architecture [`spec`] is the single source of truth; from it come the exact [`analysis`]
//! (parameters, MACs), the trainable burn [`model`], the [`weights`] import from PyTorch checkpoints,
//! the image [`preprocess`]ing each weight set needs, and the `effnet` CLI.

pub mod analysis;
pub mod classify;
pub mod data;
pub mod engine;
pub mod evaluate;
pub mod model;
pub mod preprocess;
pub mod simd;
pub mod spec;
pub mod study;
pub mod train;
pub mod util;
pub mod weights;
