//! The TF training recipe: RMSProp with TF semantics and the warmup + staircase-exponential
//! learning-rate schedule (each unit-tested against hand-computed values), and the training loop.

pub mod plot;
mod rmsprop;
pub mod run;
mod schedule;

pub use rmsprop::{TfRmsProp, TfRmsPropState};
pub use schedule::{Decay, LrSchedule};
