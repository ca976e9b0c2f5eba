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
    /// With [`EvalTime::temperature`]: the temperature the scored text had settled on at the
    /// end (the last batch was scored with the one before it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub temperature: Option<f64>,
}

/// Evaluation-time techniques: they change how the validation text is scored, never the
/// weights. Each follows the challenge's rule for adapting at evaluation time: a token is
/// scored before anything learns from it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EvalTime {
    /// `kiln eval --ngram-cache`: an n-gram cache of the tokens already scored.
    #[serde(default)]
    pub ngram_cache: Option<NgramCache>,
    /// `kiln eval --temperature`: [`OnlineTemperature`], fitted on the targets already scored.
    #[serde(default)]
    pub temperature: bool,
    /// `kiln eval --ttt LR:STEPS`: score-first [`TestTimeTraining`] ([`evaluate_adapted`]).
    #[serde(default)]
    pub ttt: Option<TestTimeTraining>,
    /// `kiln eval --capsule-passes N`: a model with Koopman capsule dynamics scored with N
    /// Koopman passes instead of those it trained with (the submission's
    /// `EVAL_FEEDBACK_PASSES`); the same weights, each position still reading only its prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capsule_passes: Option<usize>,
    /// `kiln eval --capsule-halt FRACTION`: adaptive halting of those passes
    /// ([`crate::config::Koopman::halt`]), each position on its own capsules.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capsule_halt: Option<f64>,
    /// `kiln eval --capsule-carry DECAY`: capsule carry ([`crate::config::Koopman::carry`]).
    /// The windows are split into `batch` runs of consecutive windows, one per row, and each
    /// row scores its run in order, its first Koopman pass blending with the capsule state of
    /// the run's earlier windows (each window's last position, averaged with this decay; the
    /// run's first window has none). A window's carry comes from positions before any target
    /// it scores, so every score still reads only the text before its target.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub capsule_carry: Option<f64>,
}

/// Temperature scaling fitted while scoring (`kiln eval --temperature`): each batch of
/// windows is scored with logits `β·z` (β = 1/temperature) and β is then refitted on every
/// target scored so far, so no target's score depends on itself or on what follows it.
///
/// The fit is Newton's on the running sum of each scored target's loss as a quadratic in β
/// around the β it was scored with: the loss `ℓ(β) = logsumexp(β·z) − β·z_y` has gradient
/// `E_p[z] − z_y` and second derivative `Var_p[z]` (p = softmax(β·z)), so the next β is
/// `Σ(h·β_j − g) / Σh`, kept within [1/4, 4]. One softmax pass per target, no stored logits.
#[derive(Clone, Copy, Debug)]
pub struct OnlineTemperature {
    /// The inverse temperature the next batch is scored with.
    pub beta: f64,
    /// Σ over scored targets of `h·β_j − g` and of `h`.
    weighted: f64,
    curvature: f64,
}

impl Default for OnlineTemperature {
    fn default() -> Self {
        OnlineTemperature {
            beta: 1.0,
            weighted: 0.0,
            curvature: 0.0,
        }
    }
}

impl OnlineTemperature {
    /// Scores one target from its logits (`z`, after any soft cap) with the current β: its
    /// loss in nats; its gradient and curvature join the running sums.
    pub fn score(&mut self, logits: &[f32], target: usize) -> f64 {
        let beta = self.beta;
        let max = logits.iter().fold(f32::NEG_INFINITY, |m, &z| m.max(z)) as f64;
        let (mut s0, mut s1, mut s2) = (0f64, 0f64, 0f64);
        for &z in logits {
            let z = z as f64;
            let e = (beta * (z - max)).exp();
            s0 += e;
            s1 += e * z;
            s2 += e * z * z;
        }
        let mean = s1 / s0;
        let variance = (s2 / s0 - mean * mean).max(0.0);
        let zy = logits[target] as f64;
        self.weighted += variance * beta - (mean - zy);
        self.curvature += variance;
        beta * (max - zy) + s0.ln()
    }

    /// Refits β on everything scored so far (between batches).
    pub fn refit(&mut self) {
        if self.curvature > 0.0 {
            self.beta = (self.weighted / self.curvature).clamp(0.25, 4.0);
        }
    }
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
    evaluate_with(
        model,
        acts,
        tokens,
        tokenizer,
        vocab_map,
        stride,
        max_batches,
        EvalTime::default(),
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

/// `A:B` on the command line (`3:0.3`, `1e-4:1`), each side parsed, spaces around either
/// ignored.
pub fn parse_pair<A: std::str::FromStr, B: std::str::FromStr>(s: &str) -> Option<(A, B)> {
    let (a, b) = s.split_once(':')?;
    Some((a.trim().parse().ok()?, b.trim().parse().ok()?))
}

impl std::str::FromStr for NgramCache {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let parsed = parse_pair(s).map(|(order, weight)| NgramCache { order, weight });
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

/// Score-first test-time training (`kiln eval --ttt LR:STEPS`): after each batch of windows
/// is scored, the model takes `steps` AdamW steps (β 0.9, 0.95, no weight decay, gradients
/// clipped to norm 1) on that batch's windows at rate `lr`, and scores the next batch with
/// the weights so trained. Every target is scored before any weight has seen it, the
/// challenge's rule for adapting to the validation text; the artifact is unchanged.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestTimeTraining {
    pub lr: f32,
    pub steps: usize,
    /// Which weights learn (`LR:STEPS:memory`: the hashed n-gram memories only).
    #[serde(default)]
    pub scope: TttScope,
}

/// The weights score-first test-time training adapts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum TttScope {
    /// Every weight.
    #[default]
    All,
    /// The hashed n-gram memories alone (an evaluation-time engram): EngramHash's tables and
    /// matrices and the hashed bigram embedding; every other weight stays as exported.
    Memory,
}

impl std::str::FromStr for TestTimeTraining {
    type Err = String;

    fn from_str(s: &str) -> std::result::Result<Self, String> {
        let (pair, scope) = match s.rsplit_once(':') {
            Some((pair, "memory")) => (pair, TttScope::Memory),
            Some((pair, "all")) => (pair, TttScope::All),
            _ => (s, TttScope::All),
        };
        let parsed = parse_pair(pair).map(|(lr, steps)| TestTimeTraining { lr, steps, scope });
        match parsed {
            Some(t) if t.lr.is_finite() && t.lr >= 0.0 && (1..=100).contains(&t.steps) => Ok(t),
            _ => Err(format!(
                "'{s}' is not LR:STEPS[:memory] with a rate of at least 0 and 1 to 100 steps \
                 (e.g. 1e-4:1)"
            )),
        }
    }
}

/// The regions of `model`'s parameters a test-time training of `scope` leaves alone (none for
/// [`TttScope::All`]), or an error when the scope holds no weight of this model.
fn frozen<B: Backend>(model: &Model<B>, scope: TttScope) -> Result<Vec<crate::layout::Region>> {
    if scope == TttScope::All {
        return Ok(Vec::new());
    }
    let layout = &model.layout;
    let mut memory: Vec<crate::layout::Region> = layout.bigram.into_iter().collect();
    if let Some(e) = layout.engram {
        memory.extend([e.tables, e.key, e.proj]);
    }
    crate::require!(
        !memory.is_empty(),
        Config,
        "test-time training of the memory alone needs a hashed bigram embedding or EngramHash"
    );
    Ok(layout
        .specs
        .iter()
        .map(|s| s.region)
        .filter(|r| !memory.contains(r))
        .collect())
}

/// Windows of a validation stream and the running score: what [`evaluate_with`] and
/// [`evaluate_adapted`]'s test-time training share.
struct Scoring<'t> {
    tokens: &'t [u32],
    tokenizer: &'t dyn TokenText,
    vocab_map: Option<&'t VocabMap>,
    batch: usize,
    seq: usize,
    stride: usize,
    windows: usize,
    batches: usize,
    cache: Option<CacheCounts>,
    temperature: Option<OnlineTemperature>,
    /// With capsule carry: the decay, and each row's carry (none before its run's first
    /// window is scored).
    carry: Option<(f64, Vec<Option<Vec<f32>>>)>,
    /// Each scored target's loss in nats, by its place in the stream, when asked for.
    targets: Option<Vec<f64>>,
    nats: f64,
    bytes: usize,
    scored: usize,
    /// The last batch's windows in the model's ids: inputs and targets.
    x: Vec<u32>,
    y: Vec<u32>,
}

impl<'t> Scoring<'t> {
    #[allow(clippy::too_many_arguments)]
    fn new<B: Backend>(
        acts: &Activations<B>,
        tokens: &'t [u32],
        tokenizer: &'t dyn TokenText,
        vocab_map: Option<&'t VocabMap>,
        stride: usize,
        max_batches: usize,
        adapt: EvalTime,
    ) -> Result<Self> {
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
        ensure!(
            !adapt.temperature || acts.layout.head != crate::model::Head::Loss,
            "evaluation with a temperature needs the logits: these activations keep only losses"
        );
        ensure!(
            adapt.capsule_carry.is_none() || (adapt.ngram_cache.is_none() && adapt.ttt.is_none()),
            "--capsule-carry scores each row's run of windows in order, not the stream's: it \
             cannot go with --ngram-cache or --ttt, which learn from the stream in its order"
        );
        let windows = (tokens.len() - 1 - seq) / stride + 1;
        let batches = windows.div_ceil(batch);
        let batches = if max_batches == 0 {
            batches
        } else {
            batches.min(max_batches)
        };
        Ok(Scoring {
            tokens,
            tokenizer,
            vocab_map,
            batch,
            seq,
            stride,
            windows,
            batches,
            cache: adapt.ngram_cache.map(CacheCounts::new),
            temperature: adapt.temperature.then(OnlineTemperature::default),
            carry: adapt.capsule_carry.map(|decay| (decay, vec![None; batch])),
            targets: None,
            nats: 0.0,
            bytes: 0,
            scored: 0,
            x: Vec::new(),
            y: Vec::new(),
        })
    }

    /// The window row `r` of batch `i` scores, if any: consecutive windows along the stream,
    /// or with capsule carry window `i` of row r's run (the runs split the windows in
    /// `batch` consecutive parts).
    fn window(&self, i: usize, r: usize) -> Option<usize> {
        let run = self.windows.div_ceil(self.batch);
        let w = match self.carry {
            None => i * self.batch + r,
            Some(_) if i < run => r * run + i,
            Some(_) => return None,
        };
        (w < self.windows).then_some(w)
    }

    /// Scores batch `i` of windows (rows without a window of their own repeat one that is
    /// scored, and are not scored), leaving its windows in `x` and `y`.
    fn score<B: Backend>(
        &mut self,
        model: &Model<B>,
        acts: &Activations<B>,
        i: usize,
    ) -> Result<()> {
        let (batch, seq, stride, tokens) = (self.batch, self.seq, self.stride, self.tokens);
        let vocab = model.config.vocab_size;
        let windows: Vec<Option<usize>> = (0..batch).map(|r| self.window(i, r)).collect();
        let pad = windows.iter().flatten().next().copied().unwrap_or(0);
        let (mut x, mut y) = (
            Vec::with_capacity(batch * seq),
            Vec::with_capacity(batch * seq),
        );
        for w in &windows {
            let start = w.unwrap_or(pad) * stride;
            x.extend_from_slice(&tokens[start..start + seq]);
            y.extend_from_slice(&tokens[start + 1..start + seq + 1]);
        }
        let (mx, my) = match self.vocab_map {
            Some(map) => (map.to_model(&x)?, map.to_model(&y)?),
            None => (x.clone(), y.clone()),
        };
        match &mut self.carry {
            None => model.forward(acts, &mx, Some(&my))?,
            Some((decay, carry)) => {
                let loss = model.forward_carrying(acts, &mx, Some(&my), carry)?;
                let decay = *decay as f32;
                for ((state, c), w) in model
                    .capsule_state(acts)?
                    .into_iter()
                    .zip(carry)
                    .zip(&windows)
                {
                    *c = match (w, c.take()) {
                        (None, _) => None,
                        (Some(_), None) => Some(state),
                        (Some(_), Some(old)) => Some(
                            old.iter()
                                .zip(&state)
                                .map(|(&o, &s)| decay * o + (1.0 - decay) * s)
                                .collect(),
                        ),
                    };
                }
                loss
            }
        };
        let mut losses: Vec<f64> = (model.download_losses(acts)?.iter())
            .map(|&l| l as f64)
            .collect();
        let scored = |r: usize| windows[r].map(|w| (w, if w == 0 { 0 } else { seq - stride }));
        if let Some(t) = &mut self.temperature {
            let logits = model.download_logits(acts)?;
            for r in 0..batch {
                let Some((_, from)) = scored(r) else { continue };
                for p in r * seq + from..(r + 1) * seq {
                    let row = &logits[p * vocab..(p + 1) * vocab];
                    losses[p] = t.score(row, my[p] as usize);
                }
            }
            t.refit();
        }
        for r in 0..batch {
            let Some((w, from)) = scored(r) else { continue };
            let row = r * seq;
            let span = row + from..row + seq;
            // Window `w` starts at w·stride: its position p's target is the stream's
            // w·stride + p + 1.
            let at = |p: usize| w * stride + p + 1;
            if let Some(targets) = &mut self.targets {
                for p in from..seq {
                    targets[at(p)] = losses[row + p];
                }
            }
            self.nats += match &mut self.cache {
                Some(cache) => (from..seq)
                    .map(|p| cache.score(tokens, at(p), losses[row + p]))
                    .sum::<f64>(),
                None => losses[span.clone()].iter().sum::<f64>(),
            };
            self.bytes += target_bytes(self.tokenizer, &x[span.clone()], &y[span.clone()])
                .iter()
                .sum::<usize>();
            self.scored += seq - from;
        }
        (self.x, self.y) = (mx, my);
        Ok(())
    }

    fn result(&self) -> EvalResult {
        EvalResult {
            loss: self.nats / self.scored as f64,
            bits_per_byte: self.nats / std::f64::consts::LN_2 / self.bytes.max(1) as f64,
            tokens: self.scored,
            bytes: self.bytes,
            temperature: self.temperature.map(|t| 1.0 / t.beta),
        }
    }
}

/// [`evaluate_sliding`] with evaluation-time techniques: each target scored with the online
/// temperature, then its loss mixed with the n-gram cache, as `adapt` asks. The temperature
/// needs activations that keep the logits ([`Model::activations`]).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_with<B: Backend>(
    model: &Model<B>,
    acts: &Activations<B>,
    tokens: &[u32],
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    stride: usize,
    max_batches: usize,
    adapt: EvalTime,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    evaluate_targets(
        model,
        acts,
        tokens,
        tokenizer,
        vocab_map,
        stride,
        max_batches,
        adapt,
        false,
        progress,
    )
    .map(|(result, _)| result)
}

/// [`evaluate_with`], also returning each target's loss in nats by its place in the stream
/// when `per_target` (index j: the target `tokens[j]`; NaN where none is scored: index 0, and
/// the targets past `max_batches`).
#[allow(clippy::too_many_arguments)]
pub fn evaluate_targets<B: Backend>(
    model: &Model<B>,
    acts: &Activations<B>,
    tokens: &[u32],
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    stride: usize,
    max_batches: usize,
    adapt: EvalTime,
    per_target: bool,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<(EvalResult, Vec<f64>)> {
    ensure!(
        adapt.ttt.is_none(),
        "test-time training changes the weights: it runs through evaluate_adapted"
    );
    let mut scoring = Scoring::new(
        acts,
        tokens,
        tokenizer,
        vocab_map,
        stride,
        max_batches,
        adapt,
    )?;
    if per_target {
        scoring.targets = Some(vec![f64::NAN; tokens.len()]);
    }
    for i in 0..scoring.batches {
        scoring.score(model, acts, i)?;
        progress(i + 1, scoring.batches);
    }
    Ok((scoring.result(), scoring.targets.take().unwrap_or_default()))
}

/// Scores `tokens` in windows of `seq`, `batch` at a time, with the evaluation-time
/// techniques `adapt` asks for: activations that keep the logits for the temperature, and
/// score-first [`TestTimeTraining`] on a trainable copy of `model` (which is left as it
/// was): the copy trains on each batch of windows after scoring it, and keeps the weights so
/// trained.
#[allow(clippy::too_many_arguments)]
pub fn evaluate_adapted<B: Backend + Clone>(
    model: &Model<B>,
    (batch, seq): (usize, usize),
    tokens: &[u32],
    tokenizer: &dyn TokenText,
    vocab_map: Option<&VocabMap>,
    stride: usize,
    max_batches: usize,
    adapt: EvalTime,
    progress: &mut dyn FnMut(usize, usize),
) -> Result<EvalResult> {
    // With --capsule-passes, --capsule-halt or --capsule-carry, the same weights in a model
    // with those settings of its Koopman passes.
    let carry = adapt.capsule_carry;
    let rebuilt = match (adapt.capsule_passes, adapt.capsule_halt, carry) {
        (None, None, None) => None,
        (passes, halt, _) => {
            let mut config = model.config.clone();
            let Some(koopman) = config
                .arch
                .capsules
                .as_mut()
                .and_then(|k| k.koopman.as_mut())
            else {
                crate::fail!(
                    Config,
                    "--capsule-passes, --capsule-halt and --capsule-carry need a model with \
                     Koopman capsule dynamics (arch.capsules.koopman)"
                );
            };
            koopman.passes = passes.unwrap_or(koopman.passes);
            koopman.halt = halt.or(koopman.halt);
            koopman.carry = carry.or(koopman.carry);
            config.validate()?;
            crate::require!(
                halt.is_none() || adapt.ttt.is_none(),
                Config,
                "--capsule-halt has no gradient: it cannot go with --ttt"
            );
            let copy = Model::new(model.backend.clone(), config)?;
            copy.upload_params(&model.download_params()?)?;
            Some(copy)
        }
    };
    let model = rebuilt.as_ref().unwrap_or(model);
    let activations = |m: &Model<B>| {
        if adapt.temperature {
            m.activations(batch, seq)
        } else {
            m.loss_activations(batch, seq)
        }
    };
    let (text, map) = (tokenizer, vocab_map);
    let Some(ttt) = adapt.ttt else {
        let acts = activations(model)?;
        return evaluate_with(
            model,
            &acts,
            tokens,
            text,
            map,
            stride,
            max_batches,
            adapt,
            progress,
        );
    };
    let mut copy = Model::new(model.backend.clone(), model.config.clone())?;
    copy.upload_params(&model.download_params()?)?;
    let acts = activations(&copy)?;
    let train = copy.loss_activations(batch, seq)?;
    let mut scoring = Scoring::new(&acts, tokens, text, map, stride, max_batches, adapt)?;
    let frozen = frozen(&copy, ttt.scope)?;
    let hp = crate::optim::AdamW {
        learning_rate: ttt.lr,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    for i in 0..scoring.batches {
        scoring.score(&copy, &acts, i)?;
        for _ in 0..ttt.steps {
            copy.zero_grad();
            copy.forward(&train, &scoring.x, Some(&scoring.y))?;
            copy.backward(&train, &scoring.x, &scoring.y, 1.0)?;
            // Frozen weights get no gradient: AdamW (no decay, zero moments) leaves them.
            for &r in &frozen {
                copy.backend
                    .zero(crate::backend::View::new(&copy.grads, r.offset, r.len));
            }
            let norm = copy.grad_norm();
            let clip = if norm > 1.0 { (1.0 / norm) as f32 } else { 1.0 };
            crate::optim::adamw_step(&mut copy, &hp, clip)?;
        }
        progress(i + 1, scoring.batches);
    }
    Ok(scoring.result())
}

#[cfg(test)]
mod tests {
    use super::OnlineTemperature;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Targets drawn from softmax(β*·z) for random logits z: the online fit, scoring 50
    /// batches of 100, finds β* = 0.5 (temperature 2). With 5,000 targets of a 16-way choice
    /// whose log-likelihood has curvature Var[z] ≈ 1 each, β's standard error is about
    /// 1/√5000 ≈ 0.014; the tolerance is 0.06, four of those. Scored with β*, the mean
    /// loss is below the loss at β = 1.
    #[test]
    fn the_online_fit_finds_the_temperature_that_generated_the_targets() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let (vocab, truth) = (16, 0.5f64);
        let mut fit = OnlineTemperature::default();
        let (mut fitted, mut plain) = (0.0, 0.0);
        for _ in 0..50 {
            for _ in 0..100 {
                let z: Vec<f32> = (0..vocab).map(|_| rng.random_range(-3.0..3.0)).collect();
                let weights: Vec<f64> = z.iter().map(|&v| (truth * v as f64).exp()).collect();
                let mut pick = rng.random::<f64>() * weights.iter().sum::<f64>();
                let target = weights
                    .iter()
                    .position(|&w| {
                        pick -= w;
                        pick <= 0.0
                    })
                    .unwrap_or(vocab - 1);
                let mut unfitted = OnlineTemperature::default();
                plain += unfitted.score(&z, target);
                fitted += fit.score(&z, target);
            }
            fit.refit();
        }
        assert!((fit.beta - truth).abs() < 0.06, "fitted β {}", fit.beta);
        assert!(fitted < plain, "{fitted} {plain}");
    }
}
