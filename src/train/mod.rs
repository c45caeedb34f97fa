//! The TF training recipe, piece by piece (each unit-tested against hand-computed values):
//! RMSProp with TF semantics and the warmup + staircase-exponential learning-rate schedule.

mod rmsprop;
mod schedule;

pub use rmsprop::{TfRmsProp, TfRmsPropState};
pub use schedule::LrSchedule;
