//! Exporting a network for other runtimes, written from the spec and the weights.

pub mod onnx;
pub mod proto;
