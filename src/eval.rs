//! Validation loss and bits per byte.
//!
//! Bits per byte = Σ token losses (nats) / ln 2 / Σ bytes of the scored tokens, where each
//! token's bytes come from [`Tokenizer::token_bytes`] (its own piece, a SentencePiece leading
//! space counted unless it is the dummy prefix after a boundary token, byte-fallback tokens one
//! byte) — never from the length of a decoded string, which gets both traps wrong.

use anyhow::{ensure, Result};
use serde::Serialize;

use crate::backend::Backend;
use crate::model::{Activations, Model};
use crate::tokenizer::Tokenizer;
use crate::vocab::VocabMap;

#[derive(Clone, Copy, Debug, Serialize)]
pub struct EvalResult {
    /// Mean loss per scored token, in nats.
    pub loss: f64,
    pub bits_per_byte: f64,
    pub tokens: usize,
    pub bytes: usize,
}

/// Bytes of text that each target stands for: `targets[i]` follows `inputs[i]`. Both are
/// full-vocabulary ids.
pub fn target_bytes(tokenizer: &Tokenizer, inputs: &[u32], targets: &[u32]) -> Vec<usize> {
    inputs
        .iter()
        .zip(targets)
        .map(|(&prev, &t)| tokenizer.token_bytes(t, Some(prev)))
        .collect()
}

/// Scores `tokens` (full-vocabulary ids) in consecutive windows of the activations' (batch,
/// seq), at most `max_batches` of them (0: all that fit). `progress(done, total)` is called
/// after each batch.
pub fn evaluate<B: Backend>(
    model: &Model<B>,
    acts: &Activations<B>,
    tokens: &[u32],
    tokenizer: &Tokenizer,
    vocab_map: Option<&VocabMap>,
    max_batches: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let span = acts.layout.batch * acts.layout.seq;
    ensure!(
        tokens.len() > span,
        "the validation split has {} tokens, fewer than one evaluation batch of {span} (+1)",
        tokens.len()
    );
    let available = (tokens.len() - 1) / span;
    let batches = if max_batches == 0 {
        available
    } else {
        available.min(max_batches)
    };
    let (mut nats, mut bytes, mut scored) = (0f64, 0usize, 0usize);
    for i in 0..batches {
        let window = &tokens[i * span..i * span + span + 1];
        let (inputs, targets) = (&window[..span], &window[1..]);
        let (x, y) = match vocab_map {
            Some(map) => (map.to_model(inputs)?, map.to_model(targets)?),
            None => (inputs.to_vec(), targets.to_vec()),
        };
        model.forward(acts, &x, Some(&y));
        let losses = model.download_losses(acts);
        nats += losses.iter().map(|&l| l as f64).sum::<f64>();
        bytes += target_bytes(tokenizer, inputs, targets)
            .iter()
            .sum::<usize>();
        scored += span;
        progress(i + 1, batches);
    }
    Ok(EvalResult {
        loss: nats / scored as f64,
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: scored,
        bytes,
    })
}
