//! Validation loss and bits per byte.
//!
//! Bits per byte = Σ token losses (nats) / ln 2 / Σ bytes of the scored tokens, where each
//! token's bytes come from [`TokenText::token_bytes`] (its own piece, a SentencePiece leading
//! space counted unless it is the dummy prefix after a boundary token, byte-fallback tokens one
//! byte) — never from the length of a decoded string, which gets both traps wrong.

use crate::Result;

macro_rules! ensure {
    ($cond:expr, $($message:tt)*) => { $crate::require!($cond, Shape, $($message)*) };
}
use serde::{Deserialize, Serialize};

use crate::backend::Backend;
use crate::model::{Activations, Model};
use crate::vocab::{TokenText, VocabMap};

#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct EvalResult {
    /// Mean loss per scored token, in nats.
    pub loss: f64,
    pub bits_per_byte: f64,
    pub tokens: usize,
    pub bytes: usize,
}

/// Bytes of text that each target stands for: `targets[i]` follows `inputs[i]`. Both are
/// full-vocabulary ids.
pub fn target_bytes(tokenizer: &dyn TokenText, inputs: &[u32], targets: &[u32]) -> Vec<usize> {
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
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    max_batches: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let seq = acts.layout.seq;
    evaluate_sliding(
        model,
        acts,
        tokens,
        tokenizer,
        vocab_map,
        seq,
        max_batches,
        progress,
    )
}

/// Sliding-window scoring: windows of `seq` tokens start every `stride` tokens; the first
/// window scores all its targets, each later one only its last `stride`, so every target is
/// scored once, with at least `seq − stride` tokens of context (all but the first window's).
/// `stride = seq` is plain consecutive windows. Windows go `batch` at a time (the last batch
/// padded with repeats that are not scored); at most `max_batches` batches (0: all).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_sliding<B: Backend>(
    model: &Model<B>,
    acts: &Activations<B>,
    tokens: &[u32],
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    stride: usize,
    max_batches: usize,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let (batch, seq) = (acts.layout.batch, acts.layout.seq);
    ensure!(
        batch > 0 && seq > 0,
        "evaluation needs windows of at least one token, in batches of at least one: got a \
         batch of {batch} and windows of {seq}"
    );
    ensure!(
        stride > 0 && stride <= seq,
        "the evaluation stride must be between 1 and the window length {seq}, got {stride}"
    );
    ensure!(
        tokens.len() > seq,
        "the validation split has {} tokens, fewer than one evaluation window of {seq} (+1)",
        tokens.len()
    );
    let windows = (tokens.len() - 1 - seq) / stride + 1;
    let batches = windows.div_ceil(batch);
    let batches = if max_batches == 0 {
        batches
    } else {
        batches.min(max_batches)
    };
    let (mut nats, mut bytes, mut scored) = (0f64, 0usize, 0usize);
    let (mut x, mut y) = (
        Vec::with_capacity(batch * seq),
        Vec::with_capacity(batch * seq),
    );
    for i in 0..batches {
        let first = i * batch;
        let count = batch.min(windows - first);
        x.clear();
        y.clear();
        for w in first..first + batch {
            // Padding rows repeat the last real window.
            let start = w.min(first + count - 1) * stride;
            x.extend_from_slice(&tokens[start..start + seq]);
            y.extend_from_slice(&tokens[start + 1..start + seq + 1]);
        }
        let (mx, my) = match vocab_map {
            Some(map) => (map.to_model(&x)?, map.to_model(&y)?),
            None => (x.clone(), y.clone()),
        };
        model.forward(acts, &mx, Some(&my))?;
        let losses = model.download_losses(acts)?;
        for r in 0..count {
            let from = if first + r == 0 { 0 } else { seq - stride };
            let row = r * seq;
            let span = row + from..row + seq;
            nats += losses[span.clone()].iter().map(|&l| l as f64).sum::<f64>();
            bytes += target_bytes(tokenizer, &x[span.clone()], &y[span.clone()])
                .iter()
                .sum::<usize>();
            scored += seq - from;
        }
        progress(i + 1, batches);
    }
    Ok(EvalResult {
        loss: nats / scored as f64,
        bits_per_byte: nats / std::f64::consts::LN_2 / bytes.max(1) as f64,
        tokens: scored,
        bytes,
    })
}
