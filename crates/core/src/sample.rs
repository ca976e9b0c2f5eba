//! Text generation with the KV cache: temperature, top-k and top-p (nucleus) sampling, greedy
//! at temperature 0, seeded so a sample can be reproduced. The dashboard and the trainer's
//! periodic samples use this same sampler.

use crate::Result;

macro_rules! ensure {
    ($cond:expr, $($message:tt)*) => { $crate::require!($cond, Shape, $($message)*) };
}
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::backend::Backend;
use crate::model::Model;
use crate::vocab::{TokenText, VocabMap};

#[derive(Clone, Copy, Debug)]
pub struct SamplingParams {
    /// 0 picks the most likely token (greedy).
    pub temperature: f32,
    /// Keep only the k most likely tokens (0: all).
    pub top_k: usize,
    /// Keep the smallest set of tokens whose probability reaches p (1: all).
    pub top_p: f32,
    pub seed: u64,
}

impl Default for SamplingParams {
    fn default() -> Self {
        SamplingParams {
            temperature: 0.8,
            top_k: 0,
            top_p: 0.95,
            seed: 0,
        }
    }
}

/// Picks the next token from `logits`.
pub fn sample_token(logits: &[f32], params: &SamplingParams, rng: &mut ChaCha8Rng) -> u32 {
    let argmax = || {
        logits
            .iter()
            .enumerate()
            .fold((0, f32::NEG_INFINITY), |best, (i, &z)| {
                if z > best.1 {
                    (i, z)
                } else {
                    best
                }
            })
            .0 as u32
    };
    if params.temperature <= 0.0 {
        return argmax();
    }
    let max = logits.iter().copied().fold(f32::NEG_INFINITY, f32::max);
    let mut probs: Vec<(u32, f32)> = logits
        .iter()
        .enumerate()
        .map(|(i, &z)| (i as u32, ((z - max) / params.temperature).exp()))
        .collect();
    probs.sort_by(|a, b| b.1.total_cmp(&a.1));
    if params.top_k > 0 {
        probs.truncate(params.top_k);
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    if params.top_p < 1.0 {
        let mut cumulative = 0.0;
        let keep = probs
            .iter()
            .position(|p| {
                cumulative += p.1 / total;
                cumulative >= params.top_p
            })
            .map_or(probs.len(), |i| i + 1);
        probs.truncate(keep);
    }
    let total: f32 = probs.iter().map(|p| p.1).sum();
    let mut r = rng.random::<f32>() * total;
    for &(id, p) in &probs {
        r -= p;
        if r <= 0.0 {
            return id;
        }
    }
    probs.last().map_or_else(argmax, |p| p.0)
}

/// Feeds `prompt` through the KV cache, then samples up to `max_new` tokens, calling `on_token`
/// with each as it is produced (streaming). Stops early at `stop` or when the context is full.
/// Token ids are the model's own (compacted ones, for a compacted model).
pub fn generate<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    max_new: usize,
    params: &SamplingParams,
    stop: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Vec<u32>> {
    ensure!(
        !prompt.is_empty(),
        "the prompt must hold at least one token (a BOS token will do)"
    );
    let vocab = model.config.vocab_size as u32;
    if let Some(&bad) = prompt.iter().find(|&&t| t >= vocab) {
        crate::fail!(
            Shape,
            "prompt token {bad} is outside the model's vocabulary of {vocab}"
        );
    }
    let mut rng = ChaCha8Rng::seed_from_u64(params.seed);
    let mut cache = model.kv_cache(prompt.len() + max_new)?;
    // The prompt in one batched pass, then one token at a time.
    let mut logits = model.prefill(&mut cache, prompt)?;
    let mut out = Vec::new();
    for _ in 0..max_new {
        let next = sample_token(&logits, params, &mut rng);
        out.push(next);
        on_token(next);
        if Some(next) == stop || cache.len >= model.config.max_seq_len {
            break;
        }
        model.decode_step_into(&mut cache, next, &mut logits)?;
    }
    Ok(out)
}

/// [`generate`] for `n` sequences decoded together from one prompt (each weight read then
/// serves every sequence): sequence `i` samples with seed `params.seed + i`; a sequence that
/// reaches `stop` ends there while the others go on. Returns each sequence's new tokens.
pub fn generate_batch<B: Backend>(
    model: &Model<B>,
    prompt: &[u32],
    n: usize,
    max_new: usize,
    params: &SamplingParams,
    stop: Option<u32>,
) -> Result<Vec<Vec<u32>>> {
    ensure!(
        !prompt.is_empty() && n >= 1,
        "a batch needs a prompt of at least one token and at least one sequence"
    );
    let vocab = model.config.vocab_size;
    let mut rngs: Vec<ChaCha8Rng> = (0..n as u64)
        .map(|i| ChaCha8Rng::seed_from_u64(params.seed.wrapping_add(i)))
        .collect();
    let mut cache = model.kv_cache_batch(n, prompt.len() + max_new)?;
    let first = model.prefill(&mut cache, prompt)?;
    let mut logits: Vec<f32> = first.iter().copied().cycle().take(n * vocab).collect();
    let (mut out, mut done) = (vec![Vec::new(); n], vec![false; n]);
    let mut next = vec![0u32; n];
    for _ in 0..max_new {
        for i in 0..n {
            next[i] = match done[i] {
                // A finished sequence keeps its last token flowing; nothing is recorded.
                true => next[i],
                false => {
                    let t = sample_token(&logits[i * vocab..(i + 1) * vocab], params, &mut rngs[i]);
                    out[i].push(t);
                    done[i] = Some(t) == stop;
                    t
                }
            };
        }
        if done.iter().all(|&d| d) || cache.len >= model.config.max_seq_len {
            break;
        }
        model.decode_batch_into(&mut cache, &next, &mut logits)?;
    }
    Ok(out)
}

/// Continues `prompt` (full-vocabulary ids) as text: the ids are mapped into a compacted
/// model's ids when `vocab_map` is given, up to `max_new` tokens are generated (as many as fit
/// the context), and the output is decoded back in full ids. With `stop_at_bos` generation
/// ends at the BOS token, which begins the next document. `on_text` receives new text as soon
/// as it is complete UTF-8 (streaming). Returns the generated text and its token count.
#[allow(clippy::too_many_arguments)]
pub fn complete<B: Backend>(
    model: &Model<B>,
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    prompt: &[u32],
    max_new: usize,
    params: &SamplingParams,
    stop_at_bos: bool,
    mut on_text: impl FnMut(&str),
) -> Result<(String, usize)> {
    let to_model = |ids: &[u32]| vocab_map.map_or(Ok(ids.to_vec()), |m| m.to_model(ids));
    let model_prompt = to_model(prompt)?;
    let stop = match tokenizer.bos() {
        Some(bos) if stop_at_bos => Some(to_model(&[bos])?[0]),
        _ => None,
    };
    let room = model.config.max_seq_len.saturating_sub(model_prompt.len());
    // Decode everything so far and pass on what is new, holding back an incomplete UTF-8
    // sequence until its last byte arrives.
    let mut full = prompt.to_vec();
    let prompt_len = tokenizer.decode(&full).len();
    let mut emitted = prompt_len;
    let out = generate(model, &model_prompt, max_new.min(room), params, stop, |t| {
        full.push(vocab_map.map_or(t, |m| m.to_full(t)));
        let text = tokenizer.decode(&full);
        if !text.ends_with('\u{FFFD}') && text.len() > emitted {
            on_text(&text[emitted..]);
            emitted = text.len();
        }
    })?;
    let text = tokenizer.decode(&full);
    Ok((text.get(prompt_len..).unwrap_or("").to_string(), out.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn greedy_top_k_and_top_p_pick_from_the_right_sets() {
        let logits = [1.0, 3.0, 2.0, -1.0];
        let mut rng = ChaCha8Rng::seed_from_u64(0);
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        assert_eq!(sample_token(&logits, &greedy, &mut rng), 1);
        let top1 = SamplingParams {
            temperature: 1.0,
            top_k: 1,
            top_p: 1.0,
            seed: 0,
        };
        assert!((0..50).all(|_| sample_token(&logits, &top1, &mut rng) == 1));
        // Probabilities ≈ [0.09, 0.66, 0.24, 0.01]: top-p 0.8 keeps tokens 1 and 2 only.
        let nucleus = SamplingParams {
            temperature: 1.0,
            top_k: 0,
            top_p: 0.8,
            seed: 0,
        };
        let picks: Vec<u32> = (0..300)
            .map(|_| sample_token(&logits, &nucleus, &mut rng))
            .collect();
        assert!(picks.iter().all(|&t| t == 1 || t == 2));
        assert!(picks.contains(&1) && picks.contains(&2));
    }
}
