//! kiln's core: everything about a model that is arithmetic, not files.
//!
//! Modules, each importing only those above it in this list (`tests/layering.rs` checks):
//! - [`error`], [`bytes`]: the error type; little-endian decoding, written once.
//! - [`backend`]: the kernel trait every backend implements, its shapes and buffers.
//! - [`config`]: model shapes and presets.
//! - [`layout`]: where each tensor lives in the arenas, and what role it plays.
//! - [`quant`]: quantizers (ternary, int8, int6) and the packing rule QAT and export share.
//! - [`vocab`]: vocabulary compaction's id map.
//! - [`model`]: the transformer's forward and backward over a backend.
//! - [`optim`]: AdamW and Muon steps over a model's arenas.
//! - [`sample`], [`eval`]: KV-cache generation; validation loss and bits per byte.
//! - [`cpu`]: what this CPU can run (CPUID, the OS's permission, the `KILN_ISA` cap).
//!
//! What it is not: it reads and writes no files (the formats crate does), and it holds no
//! backend (the reference and fast backends are crates of their own).

pub mod backend;
pub mod bytes;
pub mod config;
pub mod cpu;
pub mod error;
pub mod eval;
pub mod layout;
pub mod model;
pub mod optim;
pub mod quant;
pub mod sample;
pub mod vocab;

pub use error::{Error, Result};
