//! kiln's files: everything that reads or writes a format, and nothing that trains.
//!
//! - [`checkpoint`]: one checkpoint directory (safetensors weights and optimizer state, the
//!   manifest), written atomically.
//! - [`interop`]: Hugging Face and llama2.c models in and out.
//! - [`packed`], [`compress`]: the compact models' quantized, compressed artifacts.
//! - [`data`]: token shards (llm.c's layout), `data prepare`, the loader.
//! - [`tokenizer`]: trained BPE, `tokenizer.json`, llama2.c's `tokenizer.bin`.
//! - [`tensorboard`]: TensorBoard event files.
//! - [`model_config`]: model configs from presets or JSON files.
//! - [`fsutil`]: crash-safe writes.
//!
//! What it is not: it knows no run directory (which checkpoint is the newest or the best, where
//! a run keeps its tokenizer): that is the application's.

pub mod checkpoint;
pub mod compress;
pub mod data;
pub mod fsutil;
pub mod interop;
pub mod model_config;
pub mod packed;
pub mod tensorboard;
pub mod tokenizer;
