//! The stage: a sans-IO [`StageCore`] (frames in, one batched forward, frames out) and the
//! compute thread that is its shell ([`StageHandle`]).

mod core;
mod thread;

pub use self::core::{StageCore, Wiring};
pub use thread::{
    Command, Holding, StageHandle, StageState, StageStats, MAX_BATCH_ROWS, QUEUE_DEPTH,
};
