//! The commands that compute with a trained model (`sample`, `eval`, `model logits`) and
//! `model info`, written once over any backend; `main.rs` only parses arguments and resolves
//! the backend (`crate::backends`).

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use kiln_core::backend::{Backend, IntCodes, View};
use kiln_core::config::ModelConfig;
use kiln_core::eval::evaluate_adapted;
use kiln_core::layout::{ParamKind, ParamLayout, Region};
use kiln_core::model::Model;
use kiln_core::quant::{Quantized, Scheme, TERNARY_GROUP};
use kiln_core::sample::SamplingParams;
use kiln_core::vocab::VocabMap;
use kiln_formats::checkpoint::{self, Manifest};
use kiln_formats::data::{Dataset, Split};
use kiln_formats::interop;
use kiln_formats::tokenizer::{ByteRule, Tokenizer};

use crate::run_config::TrainConfig;

/// Where a trained model comes from.
#[derive(Clone, Debug, Default)]
pub struct Source {
    /// A run directory (its newest checkpoint) or a checkpoint directory.
    pub run: Option<PathBuf>,
    /// The run's best checkpoint by validation loss instead of its newest.
    pub best: bool,
    /// An imported model: a Hugging Face directory or a llama2.c `.bin`.
    pub model: Option<PathBuf>,
    /// The tokenizer, when it is not beside the model.
    pub tokenizer: Option<PathBuf>,
    /// Round the matrices through int8 groups at load (`--weights int8`; see
    /// `kiln_core::quant::round_trip_groups`).
    pub int8: bool,
    /// A packed artifact (`kiln export --format packed`), reloaded alone.
    pub artifact: Option<PathBuf>,
    /// Run the artifact's own codes (`--weights packed`).
    pub packed: bool,
}

/// A trained model with what it needs to read and write text.
pub struct Loaded<B: Backend> {
    pub model: Model<B>,
    pub tokenizer: Tokenizer,
    pub vocab_map: Option<VocabMap>,
    /// Present when loaded from a kiln checkpoint.
    pub manifest: Option<Manifest>,
    /// The matrices whose products run on a packed artifact's own codes (`--weights packed`).
    pub coded_matrices: usize,
}

/// Loads a model from a run, checkpoint or imported model onto `backend`.
pub fn load<B: Backend>(backend: B, source: &Source) -> Result<Loaded<B>> {
    if let Some(artifact) = &source.artifact {
        return load_artifact(backend, artifact, source);
    }
    ensure!(
        !source.packed,
        "--weights packed runs a packed artifact's codes: give --artifact"
    );
    let path = match (&source.run, &source.model) {
        (Some(run), _) if source.best => crate::rundir::best(run)?,
        (Some(run), _) => crate::rundir::resolve(run)?,
        (None, Some(model)) => model.clone(),
        (None, None) => bail!("give --run or --model"),
    };
    let mut imported = crate::rundir::import(&path, source.tokenizer.as_deref())?;
    // A QAT run trained, validated and sampled with its weights as its rule quantizes them.
    if let Some(rule) = crate::rundir::qat_rule(&path) {
        let layout = ParamLayout::new(&imported.config);
        kiln_core::quant::fake_quantize(&layout, &rule, &mut imported.weights)?;
        eprintln!(
            "a QAT run: its weights as its rule quantizes them ({} matrices{}), as training \
             computed with them",
            rule.matrices,
            if rule.hadamard {
                ", Hadamard-rotated"
            } else {
                ""
            }
        );
    }
    if source.int8 {
        round_to_int8(&imported.config, &mut imported.weights);
    }
    let tokenizer = imported.tokenizer.with_context(|| {
        format!(
            "no tokenizer found for {}; pass --tokenizer",
            imported.source
        )
    })?;
    let model = Model::for_inference(backend, imported.config)?;
    model.upload_params(&imported.weights)?;
    let manifest = checkpoint::read_manifest(&path).ok();
    eprintln!("loaded {} on {}", imported.source, model.backend.name());
    Ok(Loaded {
        model,
        tokenizer,
        vocab_map: imported.vocab_map,
        manifest,
        coded_matrices: 0,
    })
}

/// `--weights int8`: the matrices rounded through the int8 groups decoding will hold.
pub fn round_to_int8(config: &ModelConfig, weights: &mut [f32]) {
    let rounded = kiln_core::quant::round_trip_groups(&ParamLayout::new(config), weights);
    eprintln!(
        "int8 weights: {rounded} of {} values in groups of 64 (32 where rows need it)",
        weights.len()
    );
}

/// A packed artifact, reloaded alone with the tokenizer saved beside it; with `--weights
/// packed` (`source.packed`) its matrices' codes are offered to the backend for its products
/// (`Backend::take_int_codes`), with `--weights int8` its values rounded as any model's.
pub fn load_artifact<B: Backend>(backend: B, path: &Path, source: &Source) -> Result<Loaded<B>> {
    let mut unpacked = kiln_formats::packed::read(path)?;
    if source.int8 {
        round_to_int8(&unpacked.config, &mut unpacked.weights);
    }
    let dir = path.parent().unwrap_or(Path::new("."));
    let tokenizer = interop::find_tokenizer(&[dir])?.with_context(|| {
        format!(
            "no tokenizer.json or tokenizer.bin beside {}",
            path.display()
        )
    })?;
    if unpacked
        .tokenizer_sha256
        .as_deref()
        .is_some_and(|h| h != tokenizer.hash())
    {
        bail!(
            "the tokenizer beside {} is not the one it was made with",
            path.display()
        );
    }
    let model = Model::for_inference(backend, unpacked.config)?;
    model.upload_params(&unpacked.weights)?;
    let coded_matrices = if source.packed {
        offer_codes(&model, &unpacked.codes)
    } else {
        0
    };
    let vocab_map = unpacked
        .vocab_map
        .map(|full| VocabMap::from_full_ids(tokenizer.vocab_size(), full));
    eprintln!("loaded artifact {}", path.display());
    Ok(Loaded {
        model,
        tokenizer,
        vocab_map,
        manifest: None,
        coded_matrices,
    })
}

/// Offers the codes of each matrix the forward multiplies by (the blocks' matrices and the
/// classifier, the embedding where tied) to the backend (after the upload: a write would drop
/// them), and says (and returns) how many it took.
fn offer_codes<B: Backend>(model: &Model<B>, codes: &[(Region, Quantized)]) -> usize {
    let layout = &model.layout;
    let multiplied = |region: &Region| {
        *region == layout.classifier
            || layout
                .specs
                .iter()
                .any(|s| s.region == *region && matches!(s.kind, ParamKind::BlockMatrix { .. }))
    };
    let (mut offered, mut taken) = (0, 0);
    for (region, q) in codes.iter().filter(|(region, _)| multiplied(region)) {
        offered += 1;
        let Some((group, scales)) = row_groups(q) else {
            continue;
        };
        let offer = IntCodes {
            rows: q.rows,
            cols: q.cols,
            group,
            codes: &q.codes,
            scales: &scales,
        };
        let weight = View::new(&model.params, region.offset, region.len);
        taken += model.backend.take_int_codes(weight, &offer) as usize;
    }
    eprintln!(
        "packed weights: {taken} of the {offered} quantized matrices the forward multiplies \
         by run on their codes"
    );
    taken
}

/// A matrix's scales as groups within each row, as the backend's kernels take them: `(group,
/// scales (rows, cols / group))`. Int scales cover a row. Ternary scales cover 128 values in
/// flat order, which may straddle rows (stories15M's rows of 288), so rows are cut into
/// groups of the largest size dividing both, each inside one of the artifact's (32 for rows
/// of 288), its scale repeated. `None` if the scales do not cover the codes.
pub fn row_groups(q: &Quantized) -> Option<(usize, Vec<f32>)> {
    let flat: Vec<f32> = q.scales.iter().map(|s| s.to_f32()).collect();
    match q.scheme {
        Scheme::Ternary => {
            let group = gcd(q.cols, TERNARY_GROUP);
            let groups = q.rows * q.cols / group;
            let scales = (0..groups).map(|g| flat.get(g * group / TERNARY_GROUP).copied());
            Some((group, scales.collect::<Option<_>>()?))
        }
        _ => (flat.len() == q.rows).then_some((q.cols, flat)),
    }
}

fn gcd(a: usize, b: usize) -> usize {
    if b == 0 {
        a
    } else {
        gcd(b, a % b)
    }
}

/// What `kiln sample` generates.
#[derive(Clone, Debug)]
pub struct SampleOptions {
    pub prompt: String,
    pub max_tokens: usize,
    /// Sequences decoded together (1: streamed as it is generated).
    pub num_samples: usize,
    pub params: SamplingParams,
}

/// `kiln sample --num-samples N`: N continuations decoded together, printed when done.
fn sample_many<B: Backend>(
    model: &Model<B>,
    tokenizer: &Tokenizer,
    vocab_map: Option<&VocabMap>,
    prompt: &[u32],
    options: &SampleOptions,
) -> Result<()> {
    let to_model = |ids: &[u32]| vocab_map.map_or(Ok(ids.to_vec()), |m| m.to_model(ids));
    let model_prompt = to_model(prompt)?;
    let stop = match tokenizer.bos() {
        Some(bos) => Some(to_model(&[bos])?[0]),
        None => None,
    };
    let room = model.config.max_seq_len.saturating_sub(model_prompt.len());
    let started = std::time::Instant::now();
    let samples = kiln_core::sample::generate_batch(
        model,
        &model_prompt,
        options.num_samples,
        options.max_tokens.min(room),
        &options.params,
        stop,
    )?;
    let seconds = started.elapsed().as_secs_f64();
    let mut tokens = 0;
    for (i, sample) in samples.iter().enumerate() {
        tokens += sample.len();
        let mut full = prompt.to_vec();
        full.extend(
            sample
                .iter()
                .map(|&t| vocab_map.map_or(t, |m| m.to_full(t))),
        );
        let text = tokenizer.decode(&full);
        let prompt_text = tokenizer.decode(prompt);
        println!("--- sample {} ---", i + 1);
        println!(
            "{}{}",
            options.prompt,
            text.get(prompt_text.len()..).unwrap_or("")
        );
    }
    eprintln!(
        "{} samples, {tokens} tokens in {seconds:.2} s ({:.1} tokens/s)",
        samples.len(),
        tokens as f64 / seconds
    );
    if options.max_tokens > room {
        let context = model.config.max_seq_len;
        eprintln!(
            "{}",
            context_note(context, model_prompt.len(), options.max_tokens)
        );
    }
    Ok(())
}

/// `kiln sample`: streams a continuation of the prompt to standard output.
pub fn sample<B: Backend>(backend: B, source: &Source, options: &SampleOptions) -> Result<()> {
    let Loaded {
        model,
        tokenizer,
        vocab_map,
        ..
    } = load(backend, source)?;
    let mut prompt: Vec<u32> = tokenizer.bos().into_iter().collect();
    prompt.extend(tokenizer.encode(&options.prompt)?);
    if prompt.is_empty() {
        bail!("give a --prompt: this tokenizer has no BOS token to start from");
    }
    if options.num_samples > 1 {
        return sample_many(&model, &tokenizer, vocab_map.as_ref(), &prompt, options);
    }
    let mut stdout = std::io::stdout();
    print!("{}", options.prompt);
    let started = std::time::Instant::now();
    let (_, tokens) = kiln_core::sample::complete(
        &model,
        &tokenizer,
        vocab_map.as_ref(),
        &prompt,
        options.max_tokens,
        &options.params,
        true,
        |text| {
            print!("{text}");
            let _ = stdout.flush();
        },
    )?;
    println!();
    let seconds = started.elapsed().as_secs_f64();
    eprintln!(
        "{tokens} tokens in {seconds:.2} s ({:.1} tokens/s)",
        tokens as f64 / seconds
    );
    let context = model.config.max_seq_len;
    if tokens < options.max_tokens && prompt.len() + tokens >= context {
        eprintln!(
            "{}",
            context_note(context, prompt.len(), options.max_tokens)
        );
    }
    Ok(())
}

/// What `kiln sample` says when the model's context ends the text before `--max-tokens`.
fn context_note(context: usize, prompt: usize, asked: usize) -> String {
    format!(
        "stopped at the model's context length: {context} positions, {prompt} of them the \
         prompt, so {} of the {asked} tokens asked for",
        context.saturating_sub(prompt)
    )
}

/// What `kiln eval` scores.
#[derive(Clone, Debug)]
pub struct EvalOptions {
    pub artifact: Option<PathBuf>,
    pub source: Source,
    pub data: Option<PathBuf>,
    pub batch: usize,
    pub seq: usize,
    pub batches: usize,
    pub stride: Option<usize>,
    /// How the text's bytes are counted (the true UTF-8 count, or the challenge's rule).
    pub bytes: kiln_formats::tokenizer::ByteRule,
    /// Evaluation-time techniques (an n-gram cache, an online temperature, test-time
    /// training): each target is scored before anything learns from it.
    pub adapt: kiln_core::eval::EvalTime,
}

/// `kiln eval`: validation loss and bits per byte of a model and/or a packed artifact, and
/// the round-trip gap between them.
pub fn eval<B: Backend + Clone>(backend: B, options: &EvalOptions) -> Result<()> {
    let source = &options.source;
    let mut scored: Vec<(&str, Loaded<B>)> = Vec::new();
    if let Some(path) = &options.artifact {
        scored.push((
            "artifact, reloaded alone",
            load_artifact(backend.clone(), path, source)?,
        ));
    }
    if source.run.is_some() || source.model.is_some() {
        // The unquantized model beside an artifact: its own weights (`--weights packed` is
        // the artifact's).
        let model = Source {
            packed: false,
            ..source.clone()
        };
        scored.push(("model", load(backend, &model)?));
    }
    ensure!(!scored.is_empty(), "give --run, --model or --artifact");
    let data_dir = match &options.data {
        Some(d) => d.clone(),
        None => scored
            .iter()
            .find_map(|(_, l)| {
                let train = l.manifest.as_ref()?.train.clone();
                serde_json::from_value::<TrainConfig>(train)
                    .ok()
                    .map(|t| t.data)
            })
            .context("the model does not name its data directory; pass --data")?,
    };
    let dataset = Dataset::open(&data_dir)?;
    let tokens = dataset.read_all(Split::Val)?;
    let mut results = Vec::new();
    for (what, loaded) in &scored {
        if dataset.manifest.tokenizer_sha256 != loaded.tokenizer.hash() {
            bail!(
                "{} was tokenized with another tokenizer than the {what}'s",
                data_dir.display()
            );
        }
        let seq = options.seq.min(loaded.model.config.max_seq_len);
        let started = std::time::Instant::now();
        let bar = indicatif::ProgressBar::new(0);
        bar.set_style(
            indicatif::ProgressStyle::with_template(
                "scoring {bar:40} {pos}/{len} batches, eta {eta}",
            )
            .expect("valid template"),
        );
        let challenge;
        let (text, unit): (&dyn kiln_core::vocab::TokenText, &str) = match options.bytes {
            ByteRule::Utf8 => (&loaded.tokenizer, "bits/byte"),
            ByteRule::Challenge => {
                challenge = loaded.tokenizer.challenge_bytes()?;
                (&challenge, "bits/byte (the challenge's byte rule)")
            }
        };
        let result = evaluate_adapted(
            &loaded.model,
            (options.batch, seq),
            &tokens,
            text,
            loaded.vocab_map.as_ref(),
            options.stride.unwrap_or(seq),
            options.batches,
            options.adapt,
            &mut |done, total| {
                bar.set_length(total as u64);
                bar.set_position(done as u64);
            },
        )?;
        bar.finish_and_clear();
        if let Some(c) = options.adapt.ngram_cache {
            println!(
                "(with an evaluation-time {}-gram cache of weight {}: each token scored before \
                 it joins the cache)",
                c.order, c.weight
            );
        }
        if let Some(t) = options.adapt.ttt {
            println!(
                "(with score-first test-time training{}: {} AdamW step(s) at rate {} on each \
                 batch of windows after it is scored)",
                match t.scope {
                    kiln_core::eval::TttScope::All => "",
                    kiln_core::eval::TttScope::Memory => " of the n-gram memories alone",
                },
                t.steps,
                t.lr
            );
        }
        if let Some(t) = result.temperature {
            println!(
                "(with a temperature fitted while scoring, each batch with the fit to the \
                 batches before it: {t:.4} at the end)"
            );
        }
        println!(
            "{what}: val loss {:.4} | {unit} {:.4} | {} tokens, {} bytes | {:.1} s",
            result.loss,
            result.bits_per_byte,
            result.tokens,
            result.bytes,
            started.elapsed().as_secs_f64()
        );
        println!("{}", serde_json::json!({"what": what, "result": result}));
        results.push(result);
    }
    if let [artifact, model] = results.as_slice() {
        println!(
            "round-trip gap: {:+.4} bits/byte ({:+.4} nats/token) from quantization and packing",
            artifact.bits_per_byte - model.bits_per_byte,
            artifact.loss - model.loss
        );
    }
    Ok(())
}

/// `kiln model logits`: the logits `(T, V)` of a model for token ids.
pub fn logits<B: Backend>(backend: B, model: &Path, tokens: &[u32]) -> Result<Vec<f32>> {
    ensure!(
        !tokens.is_empty(),
        "no tokens to score: give --tokens, the ids in order (e.g. --tokens 1,2,3)"
    );
    let imported = crate::rundir::import(model, None)?;
    let m = Model::for_inference(backend, imported.config)?;
    m.upload_params(&imported.weights)?;
    let acts = m.activations(1, tokens.len())?;
    m.forward(&acts, tokens, None)?;
    Ok(m.download_logits(&acts)?)
}

/// Groups a number's digits in threes: 15191712 → "15,191,712".
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

/// `kiln model info`: parameter count with a per-tensor breakdown.
pub fn model_info(config: &ModelConfig, json: bool) -> Result<()> {
    if json {
        println!("{}", serde_json::to_string_pretty(config)?);
    }
    let layout = ParamLayout::new(config);
    println!("{:<48} {:>16} {:>14}", "tensor", "shape", "parameters");
    // Block 0 tensor by tensor, the other blocks summarised: 28 copies of the same lines help
    // nobody.
    for spec in layout
        .specs
        .iter()
        .filter(|s| s.layer.is_none_or(|l| l == 0))
    {
        println!(
            "{:<48} {:>16} {:>14}",
            spec.name,
            format!("{:?}", spec.shape),
            grouped(spec.region.len)
        );
    }
    let per_block: usize = layout
        .specs
        .iter()
        .filter(|s| s.layer == Some(0))
        .map(|s| s.region.len)
        .sum();
    let others = config.n_layers - 1;
    if others > 0 {
        println!(
            "{:<48} {:>16} {:>14}",
            format!("model.layers.1..{} (as layer 0)", config.n_layers - 1),
            format!("{others} × block"),
            grouped(per_block * others)
        );
    }
    let total = layout.total_len();
    println!();
    println!("parameters:                  {:>14}", grouped(total));
    println!(
        "  without the embedding:     {:>14}",
        grouped(total - layout.embedding.len)
    );
    println!(
        "  classifier:                {}",
        if config.tie_embeddings {
            "tied to the embedding (counted once)"
        } else {
            "separate lm_head"
        }
    );
    if !config.arch.is_llama() {
        println!(
            "  architecture options:      {}",
            serde_json::to_string(&config.arch)?
        );
    }
    if config.arch.recurrence.is_some() {
        let order: Vec<String> = layout.order.iter().map(|b| b.to_string()).collect();
        println!(
            "  depth recurrence:          {} layers run blocks {}",
            config.depth(),
            order.join(", ")
        );
    }
    println!(
        "training FLOPs per token at seq {}: {:.3e}",
        config.max_seq_len.min(256),
        config.train_flops_per_token(config.max_seq_len.min(256))
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The groups offered to the kernels stand for the artifact's own values
    /// (`Quantized::dequantize`): ternary rows of 288 (scales straddling rows, groups of 32),
    /// of 384 (three whole scales a row) and of 64 (two rows a scale), and int8 rows.
    #[test]
    fn row_groups_stand_for_the_artifacts_values() {
        let values = |n: usize| -> Vec<f32> {
            (0..n)
                .map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0 + (i / 128) as f32 * 0.3)
                .collect()
        };
        let int8 = Scheme::Int {
            bits: 8,
            percentile: 100.0,
        };
        let cases = [
            (Scheme::Ternary, 5, 288, 32),
            (Scheme::Ternary, 3, 384, 128),
            (Scheme::Ternary, 6, 64, 64),
            (int8, 4, 96, 96),
        ];
        for (scheme, rows, cols, want_group) in cases {
            let q = kiln_core::quant::quantize(scheme, &values(rows * cols), rows, cols).unwrap();
            let (group, scales) = row_groups(&q).unwrap();
            assert_eq!(group, want_group, "{scheme:?} rows of {cols}");
            let values = q.dequantize();
            for (i, (&code, &value)) in q.codes.iter().zip(&values).enumerate() {
                let (j, c) = (i / cols, i % cols);
                let scale = scales[j * (cols / group) + c / group];
                assert_eq!(
                    code as f32 * scale,
                    value,
                    "{scheme:?} rows of {cols}, [{j}, {c}]"
                );
            }
        }
    }
}
