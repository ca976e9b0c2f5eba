//! kiln: train small Llama-family language models from scratch on the CPU's matrix engine
//! and on GPUs.
//!
//! - [`config`]: model shapes and presets.
//! - [`backend`]: the kernel trait and the reference CPU backend.
//! - [`model`]: the transformer's forward and backward over a backend, and its arenas.
//! - [`conformance`]: the test suite every backend must pass.

pub mod backend;
pub mod bench;
pub mod checkpoint;
pub mod config;
pub mod conformance;
pub mod dashboard;
pub mod data;
pub mod eval;
pub mod fsutil;
pub mod interop;
pub mod model;
pub mod packed;
pub mod quant;
pub mod report;
pub mod runlog;
pub mod sample;
pub mod telemetry;
pub mod tensorboard;
pub mod tokenizer;
pub mod train;
pub mod vocab;
