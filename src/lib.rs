//! kiln, the application: the trainer, the one backend switch, the command line's commands,
//! the dashboard, reports and benchmarks. It sits on the layers below it, each a crate:
//!
//! ```text
//!   kiln (this crate)   trainer · backend switch · CLI · dashboard · reports · bench · doctor
//!        │
//!   kiln-formats        checkpoints · Hugging Face · llama2.c · packed · shards · tokenizers
//!        │              · TensorBoard
//!   kiln-conformance    the suite and kernel-case table every backend runs on itself
//!        │
//!   kiln-reference      the reference backend (and, beside it, the fast backends to come)
//!        │
//!   kiln-core           config · layout · backend trait · model · optimizers · quantizers
//!                       · sampling · evaluation   (no file I/O)
//! ```
//!
//! Modules:
//! - [`backends`]: `--backend` resolved in one place; [`doctor`], [`machine`]: what runs here.
//! - [`train`]: the training loop; [`run_config`]: what defines a run; [`rundir`]: what a run
//!   directory holds; [`interrupt`]: Ctrl-C and SIGTERM saving a checkpoint;
//!   [`distributed`]: training across processes under `mpirun` (the `mpi` feature).
//! - [`telemetry`]: the typed events a run writes; [`runlog`]: reading them back, for the
//!   [`dashboard`] and [`report`].
//! - [`commands`]: `sample`, `eval`, `model logits` and `model info`, generic over the backend.
//! - [`bench`]: `kiln bench kernels`.
//! - [`ablate`]: `kiln ablate`, a multi-seed sweep of a base configuration and its variants;
//!   [`calibrate`]: a packed export's per-tensor calibration.

pub mod ablate;
pub mod backends;
pub mod bench;
pub mod calibrate;
pub mod commands;
pub mod dashboard;
pub mod distributed;
pub mod doctor;
pub mod interrupt;
pub mod machine;
pub mod report;
pub mod run_config;
pub mod rundir;
pub mod runlog;
pub mod telemetry;
pub mod train;
