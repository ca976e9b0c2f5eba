//! Validation loss and bits per byte.
//!
//! Bits per byte = Σ token losses (nats) / ln 2 / Σ bytes of the scored tokens, where each
//! token's bytes come from [`TokenText::token_bytes`] (its own piece, a SentencePiece leading
//! space counted unless it is the dummy prefix after a boundary token, byte-fallback tokens one
//! byte) — never from the length of a decoded string, which gets both traps wrong.

use std::collections::HashMap;

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
    evaluate_with_cache(
        model,
        acts,
        tokens,
        tokenizer,
        vocab_map,
        stride,
        max_batches,
        None,
        progress,
    )
}

/// An evaluation-time n-gram cache (`kiln eval --ngram-cache ORDER:WEIGHT`): each target's
/// probability is mixed with what the validation tokens already scored say follows its last
/// `order − 1` tokens (the longest such context seen before; none seen: the model alone),
/// `(1 − weight)·p_model + weight·p_cache`. A token joins the cache only after it is scored,
/// so nothing is scored with knowledge of itself: the challenge's rule for evaluation-time
/// adaptation (score a chunk before training on it).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct NgramCache {
    pub order: usize,
    pub weight: f64,
}

impl std::str::FromStr for NgramCache {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = s.split_once(':').and_then(|(order, weight)| {
            Some(NgramCache {
                order: order.trim().parse().ok()?,
                weight: weight.trim().parse().ok()?,
            })
        });
        match parsed {
            Some(c) if (2..=8).contains(&c.order) && c.weight > 0.0 && c.weight < 1.0 => Ok(c),
            _ => Err(format!(
                "'{s}' is not ORDER:WEIGHT with ORDER in 2..=8 and WEIGHT in (0, 1) (e.g. 3:0.1)"
            )),
        }
    }
}

/// What followed one context in the scored stream: in all, and per next token.
type Continuations = (u32, HashMap<u32, u32>);

/// The counts of an [`NgramCache`]: for each context length `k` in `1..order`, how often each
/// token followed each context of `k` tokens in the scored stream.
struct CacheCounts {
    config: NgramCache,
    /// `by_length[k − 1]`: context → its continuations.
    by_length: Vec<HashMap<Vec<u32>, Continuations>>,
}

impl CacheCounts {
    fn new(config: NgramCache) -> Self {
        CacheCounts {
            config,
            by_length: (1..config.order).map(|_| Default::default()).collect(),
        }
    }

    /// The target at `stream[at]` scored with the model's loss `nats`: the mixed loss, then
    /// the target joins the counts.
    fn score(&mut self, stream: &[u32], at: usize, nats: f64) -> f64 {
        let target = stream[at];
        let mut mixed = nats;
        for k in (1..self.config.order).rev().filter(|&k| k <= at) {
            if let Some((total, next)) = self.by_length[k - 1].get(&stream[at - k..at]) {
                let cache = *next.get(&target).unwrap_or(&0) as f64 / *total as f64;
                let w = self.config.weight;
                mixed = -((1.0 - w) * (-nats).exp() + w * cache).ln();
                break;
            }
        }
        for k in (1..self.config.order).filter(|&k| k <= at) {
            let entry = self.by_length[k - 1]
                .entry(stream[at - k..at].to_vec())
                .or_default();
            entry.0 += 1;
            *entry.1.entry(target).or_default() += 1;
        }
        mixed
    }
}

/// [`evaluate_sliding`], each target's loss mixed with an evaluation-time [`NgramCache`]
/// when one is given.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with_cache<B: Backend>(
    model: &Model<B>,
    acts: &Activations<B>,
    tokens: &[u32],
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    stride: usize,
    max_batches: usize,
    cache: Option<NgramCache>,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    let mut cache = cache.map(CacheCounts::new);
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
            nats += match &mut cache {
                // Targets in stream order: window `first + r` starts at (first + r)·stride.
                Some(cache) => (from..seq)
                    .map(|p| {
                        let at = (first + r) * stride + p + 1;
                        cache.score(tokens, at, losses[row + p] as f64)
                    })
                    .sum::<f64>(),
                None => losses[span.clone()].iter().map(|&l| l as f64).sum::<f64>(),
            };
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
