//! Ctrl-C (SIGINT) and SIGTERM while training: the first sets a flag the trainer reads at
//! each step boundary, where it saves a checkpoint and stops cleanly; a second, while that
//! flag is set, exits the process at once (signal-hook's conditional shutdown, the pattern its
//! documentation gives for exactly this).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use anyhow::{Context, Result};
use signal_hook::consts::{SIGINT, SIGTERM};
use signal_hook::flag;

/// The exit status of a second signal: 128 + SIGINT, as a shell reports an interrupt.
pub const EXIT_AT_ONCE: i32 = 130;

/// Installs the handlers; returns the flag the first signal sets.
pub fn install() -> Result<Arc<AtomicBool>> {
    let requested = Arc::new(AtomicBool::new(false));
    for signal in [SIGINT, SIGTERM] {
        // Registered first, so it sees the flag as it was before this signal's own handler
        // sets it: only a second signal exits.
        flag::register_conditional_shutdown(signal, EXIT_AT_ONCE, Arc::clone(&requested))
            .context("cannot install the signal handlers")?;
        flag::register(signal, Arc::clone(&requested))
            .context("cannot install the signal handlers")?;
    }
    Ok(requested)
}
