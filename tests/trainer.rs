//! The trainer end to end on a tiny model and a small generated corpus: determinism, exact
//! resume, non-finite steps, checkpoint safety and refusal, compaction, bits per byte.

use std::fs;
use std::path::{Path, PathBuf};

use kiln::train::{TrainConfig, Trainer};
use kiln_core::config::ModelConfig;
use kiln_core::model::Model;
use kiln_formats::checkpoint;
use kiln_formats::data::{prepare, Dataset, Split, TokenizerSpec};
use kiln_reference::ReferenceBackend;

fn temp_dir(name: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("kiln-trainer-{name}-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    fs::create_dir_all(&dir).unwrap();
    dir
}

/// A few kilobytes of varied text in two documents, prepared with a 320-token BPE.
fn corpus(dir: &Path) -> PathBuf {
    let words = [
        "the", "king", "queen", "speaks", "to", "a", "fool", "in", "winter", "night", "and",
        "sings", "of", "gold", "rain",
    ];
    let mut state = 17u64;
    let mut doc = |lines: usize| {
        let mut text = String::new();
        for _ in 0..lines {
            for w in 0..8 {
                state = state
                    .wrapping_mul(6364136223846793005)
                    .wrapping_add(1442695040888963407);
                text.push_str(words[(state >> 33) as usize % words.len()]);
                text.push(if w == 7 { '\n' } else { ' ' });
            }
        }
        text
    };
    let input = dir.join("text");
    fs::create_dir_all(&input).unwrap();
    fs::write(input.join("one.txt"), doc(300)).unwrap();
    fs::write(input.join("two.txt"), doc(300)).unwrap();
    let out = dir.join("data");
    prepare(&[input], &out, TokenizerSpec::TrainBpe(320), 0.1).unwrap();
    out
}

fn config(data: PathBuf, steps: u64) -> TrainConfig {
    let mut config = TrainConfig::new(ModelConfig::preset("tiny-gqa").unwrap(), data);
    config.batch = 2;
    config.seq = 16;
    config.max_steps = Some(steps);
    config.learning_rate = 3e-3;
    config.warmup_steps = 2;
    config.eval_every = 4;
    config.eval_batches = 2;
    config.checkpoint_every = 4;
    config.keep_last = 3;
    config
}

fn train(config: TrainConfig, run: &Path) -> kiln::train::RunReport {
    let mut trainer = Trainer::create(ReferenceBackend, config, run).unwrap();
    trainer.print_every = 0;
    trainer.run().unwrap()
}

#[test]
fn same_seed_and_data_give_the_same_losses_and_the_loss_falls() {
    let dir = temp_dir("determinism");
    let data = corpus(&dir);
    let a = train(config(data.clone(), 12), &dir.join("a"));
    let b = train(config(data, 12), &dir.join("b"));
    assert_eq!(a.losses, b.losses);
    assert!(
        a.losses[11] < a.losses[0] - 0.5,
        "loss must fall: {:?}",
        a.losses
    );
    assert!(a.val.unwrap().bits_per_byte.is_finite());
    // Telemetry has a line per step and an end report.
    let telemetry = fs::read_to_string(dir.join("a/telemetry.jsonl")).unwrap();
    let lines: Vec<serde_json::Value> = telemetry
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(lines.iter().filter(|l| l["type"] == "step").count(), 12);
    let step = lines.iter().find(|l| l["type"] == "step").unwrap();
    for key in [
        "loss",
        "lr",
        "grad_norm",
        "tokens_per_s",
        "tflops",
        "mfu",
        "rss_mib",
    ] {
        assert!(step[key].is_number(), "step telemetry lacks {key}: {step}");
    }
    for stage in ["data", "forward", "backward", "optimizer"] {
        assert!(
            step["ms"][stage].is_number(),
            "step telemetry lacks ms.{stage}"
        );
    }
    assert!(lines
        .iter()
        .any(|l| l["type"] == "eval" && l["val_bpb"].is_number()));
    assert!(lines.last().unwrap()["type"] == "report");
    fs::remove_dir_all(dir).unwrap();
}

/// The losses of a run trained in `run` until step `at` (as if stopped there), then resumed
/// from its checkpoint to the end.
fn stopped_and_resumed(config: TrainConfig, run: &Path, at: u64) -> Vec<f32> {
    let mut first = Trainer::create(ReferenceBackend, config, run).unwrap();
    first.print_every = 0;
    let before = first.run_until(Some(at)).unwrap();
    drop(first);
    let mut resumed = Trainer::resume(ReferenceBackend, run, None).unwrap();
    resumed.print_every = 0;
    let after = resumed.run().unwrap();
    before.losses.iter().chain(&after.losses).copied().collect()
}

#[test]
fn resume_continues_bit_exactly() {
    let dir = temp_dir("resume");
    let data = corpus(&dir);
    let straight = train(config(data.clone(), 12), &dir.join("straight"));
    // The same 12-step run, stopped after step 8 (its last checkpoint), then resumed.
    let joined = stopped_and_resumed(config(data, 12), &dir.join("split"), 8);
    assert_eq!(
        joined, straight.losses,
        "8 steps + resume + 4 steps must equal 12 straight"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// `checkpoint_seconds`: a checkpoint once that much of the run's clock has passed since the
/// last one. An interval shorter than any step checkpoints after every step; one longer than
/// the run, only at the end (deterministic either way: each step takes more than a nanosecond,
/// and the run less than a day). The step cadence is off in both.
#[test]
fn checkpoints_follow_the_clock_when_asked() {
    let dir = temp_dir("checkpoint_seconds");
    let data = corpus(&dir);
    let checkpoints = |seconds: f64, name: &str| {
        let mut c = config(data.clone(), 5);
        (c.checkpoint_every, c.checkpoint_seconds, c.keep_last) = (0, seconds, 10);
        train(c, &dir.join(name));
        let telemetry = fs::read_to_string(dir.join(name).join("telemetry.jsonl")).unwrap();
        telemetry
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["type"] == "checkpoint")
            .map(|l| l["step"].as_u64().unwrap())
            .collect::<Vec<u64>>()
    };
    assert_eq!(checkpoints(1e-9, "every_step"), [1, 2, 3, 4, 5]);
    assert_eq!(checkpoints(86_400.0, "at_the_end"), [5]);
    fs::remove_dir_all(dir).unwrap();
}

/// Stochastic depth on tiny-golf (5 layers, U-Net skips, value residual): layer l is drawn
/// dropped at the rate P·l/4 (over 4,000 draws, within four standard deviations: the draws
/// are Bernoulli), the trainer's first step is the forward with the layers drawn for the run's
/// first micro-batch, and a resume continues exactly.
#[test]
fn stochastic_depth_drops_deeper_layers_more_often_and_resumes_exactly() {
    let dir = temp_dir("stochastic-depth");
    let data = corpus(&dir);
    let deep = |steps| {
        let mut c = config(data.clone(), steps);
        c.model = ModelConfig::preset("tiny-golf").unwrap();
        c.stochastic_depth = Some(0.5);
        c
    };
    let draws = 4000;
    let mut counts = [0usize; 5];
    for index in 0..draws {
        for (l, dropped) in deep(12).dropped_layers(index).iter().enumerate() {
            counts[l] += *dropped as usize;
        }
    }
    for (l, &count) in counts.iter().enumerate() {
        let p = 0.5 * l as f64 / 4.0;
        let sd = (p * (1.0 - p) / draws as f64).sqrt();
        let rate = count as f64 / draws as f64;
        assert!(
            (rate - p).abs() <= 4.0 * sd,
            "layer {l}: dropped {rate}, expected {p}"
        );
    }
    assert_eq!(counts[0], 0, "the first layer is never dropped");

    let straight = train(deep(12), &dir.join("straight"));
    let plain = {
        let mut c = deep(12);
        c.stochastic_depth = None;
        train(c, &dir.join("plain"))
    };
    assert_ne!(straight.losses, plain.losses);
    // Step 1, independently: the initial weights on the first batch, with the layers drawn
    // for micro-batch 0.
    let (model, stream) = untrained_and_stream(&dir, &data, deep(12).seed);
    let acts = model.loss_activations(2, 16).unwrap();
    let dropped = deep(12).dropped_layers(0);
    let (x, y) = (&stream[..32], &stream[1..33]);
    let loss = model.forward_dropping(&acts, x, Some(y), &dropped).unwrap();
    assert_eq!(loss, Some(straight.losses[0]), "dropped {dropped:?}");

    let joined = stopped_and_resumed(deep(12), &dir.join("split"), 8);
    assert_eq!(
        joined, straight.losses,
        "8 steps + resume + 4 must equal 12"
    );
    let mut bad = deep(4);
    bad.stochastic_depth = Some(1.0);
    assert!(bad.validate().is_err());
    fs::remove_dir_all(dir).unwrap();
}

/// `--seq-warmup 4:9` on a run of 2 × 16 tokens: steps 1–3 read 8 sequences of 4, steps
/// 4–6 4 of 8, then 2 of 16, always the same 32 tokens of the stream per step. The first
/// step's loss is the untrained model's on the stream's first 32 tokens cut into 8 rows of 4,
/// computed here on its own arena; a resume in the middle of the warmup continues exactly.
#[test]
fn a_sequence_length_warmup_reads_the_same_tokens_in_shorter_rows_and_resumes_exactly() {
    use kiln::run_config::SeqWarmup;
    let dir = temp_dir("seq-warmup");
    let data = corpus(&dir);
    let warm = |steps| {
        let mut c = config(data.clone(), steps);
        c.seq_warmup = Some(SeqWarmup { start: 4, steps: 9 });
        c
    };
    let shapes: Vec<_> = (0..12).map(|s| warm(12).batch_shape_at(s)).collect();
    assert_eq!(
        shapes,
        [[(8, 4); 3], [(4, 8); 3], [(2, 16); 3], [(2, 16); 3]].concat()
    );
    let straight = train(warm(12), &dir.join("straight"));
    let lines: Vec<serde_json::Value> = fs::read_to_string(dir.join("straight/telemetry.jsonl"))
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .filter(|l: &serde_json::Value| l["type"] == "step")
        .collect();
    let seqs: Vec<_> = lines.iter().map(|l| l["seq"].as_u64()).collect();
    assert_eq!(
        seqs[..7],
        [Some(4), Some(4), Some(4), Some(8), Some(8), Some(8), None]
    );
    for (i, l) in lines.iter().enumerate() {
        assert_eq!(l["tokens"], 32 * (i as u64 + 1));
    }
    // Step 1's loss, independently: the same initial weights on the first 32 tokens as 8×4.
    let (model, stream) = untrained_and_stream(&dir, &data, warm(12).seed);
    let acts = model.loss_activations(8, 4).unwrap();
    let loss = model
        .forward(&acts, &stream[..32], Some(&stream[1..33]))
        .unwrap()
        .unwrap();
    assert_eq!(loss, straight.losses[0]);

    let joined = stopped_and_resumed(warm(12), &dir.join("split"), 4);
    assert_eq!(
        joined, straight.losses,
        "4 steps + resume + 8 must equal 12 straight"
    );

    // A start that is not the length halved is refused.
    let mut bad = config(data, 4);
    bad.seq_warmup = Some(SeqWarmup { start: 5, steps: 9 });
    let error = Trainer::create(ReferenceBackend, bad, &dir.join("bad"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("--seq-warmup 5:9"), "{error}");
    fs::remove_dir_all(dir).unwrap();
}

/// The model config a run in `dir/straight` trained (its vocabulary is the data's).
/// The `straight` run's model as it started (its config, initialised from `seed`) and the
/// training stream's first shard: what its first step read.
fn untrained_and_stream(dir: &Path, data: &Path, seed: u64) -> (Model<ReferenceBackend>, Vec<u32>) {
    let dataset = Dataset::open(data).unwrap();
    let text = fs::read_to_string(dir.join("straight/train.json")).unwrap();
    let train: serde_json::Value = serde_json::from_str(&text).unwrap();
    let config = serde_json::from_value(train["model"].clone()).unwrap();
    let mut model = Model::new(ReferenceBackend, config).unwrap();
    model.init_random(seed).unwrap();
    let shard = &dataset.shard_paths(Split::Train)[0];
    let stream = kiln_formats::data::read_shard(shard, dataset.manifest.vocab_size).unwrap();
    (model, stream)
}

#[test]
fn non_finite_steps_are_skipped_then_stop_the_run() {
    let dir = temp_dir("nonfinite");
    let data = corpus(&dir);
    // One poisoned step: skipped, counted, and the run goes on.
    let mut cfg = config(data.clone(), 8);
    cfg.poison_steps = vec![5];
    let report = train(cfg, &dir.join("one"));
    assert_eq!(report.skipped_steps, 1);
    assert_eq!(report.steps, 8);
    // Three poisoned steps in a row stop the run; none of them touched the weights.
    let mut cfg = config(data.clone(), 8);
    cfg.poison_steps = vec![4, 5, 6];
    cfg.max_bad_steps = 3;
    let mut trainer = Trainer::create(ReferenceBackend, cfg, &dir.join("many")).unwrap();
    trainer.print_every = 0;
    let error = trainer.run().unwrap_err().to_string();
    assert!(
        error.contains("non-finite") && error.contains("intact"),
        "{error}"
    );
    // Three skipped steps after the step-4 checkpoint: the weights equal the checkpoint's.
    let latest = kiln::rundir::resolve(&dir.join("many")).unwrap();
    assert!(latest.ends_with("step_00000004"), "{}", latest.display());
    let mut saved = Model::new(ReferenceBackend, trainer.model.config.clone()).unwrap();
    checkpoint::load_into(&mut saved, &latest, None, true).unwrap();
    assert_eq!(
        saved.download_params().unwrap(),
        trainer.model.download_params().unwrap()
    );
    assert!(trainer
        .model
        .download_params()
        .unwrap()
        .iter()
        .all(|x| x.is_finite()));
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn checkpoints_survive_a_crash_mid_save_and_refuse_other_models() {
    let dir = temp_dir("crash");
    let data = corpus(&dir);
    train(config(data.clone(), 8), &dir.join("run"));
    let checkpoints = dir.join("run/checkpoints");
    // What a crash during the step-12 save leaves: a temporary directory with a torn file.
    let torn = checkpoints.join(".step_00000012.tmp-999999");
    fs::create_dir_all(&torn).unwrap();
    fs::write(torn.join("model.safetensors"), b"torn").unwrap();
    let latest = kiln::rundir::resolve(&dir.join("run")).unwrap();
    assert!(latest.ends_with("step_00000008"));
    let mut resumed = Trainer::resume(ReferenceBackend, &dir.join("run"), Some(12)).unwrap();
    resumed.print_every = 0;
    resumed.run().unwrap();
    assert!(
        !torn.exists(),
        "the crashed save's leftovers are swept by the next save"
    );
    // The last K are kept, plus the best by validation loss.
    let kept: Vec<u64> = checkpoint::list(&checkpoints)
        .unwrap()
        .iter()
        .map(|c| c.0)
        .collect();
    assert_eq!(kept, [4, 8, 12]);
    assert!(kiln::rundir::best(&dir.join("run")).unwrap().exists());

    // Another shape is refused, naming the field.
    let mut other = ModelConfig::preset("tiny-gqa").unwrap();
    other.vocab_size = 320;
    other.hidden_dim = 40;
    let mut model = Model::new(ReferenceBackend, other).unwrap();
    let error = checkpoint::load_into(&mut model, &latest, None, false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("hidden_dim: 48 vs 40"), "{error}");
    // Another tokenizer is refused.
    let mut same = Model::new(
        ReferenceBackend,
        checkpoint::read_manifest(&latest).unwrap().model,
    )
    .unwrap();
    let error = checkpoint::load_into(&mut same, &latest, Some("0000"), false)
        .unwrap_err()
        .to_string();
    assert!(error.contains("another tokenizer"), "{error}");
    // A new run refuses to overwrite an existing one.
    let error = Trainer::create(ReferenceBackend, config(data, 8), &dir.join("run"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("already holds a run"), "{error}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn vocabulary_compaction_trains_and_samples_in_full_ids() {
    let dir = temp_dir("compact");
    let data = corpus(&dir);
    let mut cfg = config(data, 8);
    cfg.compact_vocab = true;
    cfg.sample_every = 4;
    cfg.sample_tokens = 12;
    let mut trainer = Trainer::create(ReferenceBackend, cfg, &dir.join("run")).unwrap();
    trainer.print_every = 0;
    let report = trainer.run().unwrap();
    let vocab = trainer.model.config.vocab_size;
    assert!(
        vocab < 320,
        "compacted vocabulary should be smaller than 320, is {vocab}"
    );
    assert!(report.val.unwrap().bits_per_byte.is_finite());
    let text = trainer.sample_text(1).unwrap();
    assert!(!text.is_empty());
    let telemetry = fs::read_to_string(dir.join("run/telemetry.jsonl")).unwrap();
    assert!(telemetry.contains("\"type\":\"sample\""));
    fs::remove_dir_all(dir).unwrap();
}

/// Σ token_bytes over the validation split equals the UTF-8 length of its decoded text.
fn assert_byte_counts_sum_to_text_length(data: &Path) {
    let dataset = Dataset::open(data).unwrap();
    let tokens = dataset.read_all(Split::Val).unwrap();
    let tok = &dataset.tokenizer;
    let counted: usize = tokens
        .iter()
        .enumerate()
        .map(|(i, &t)| tok.token_bytes(t, i.checked_sub(1).map(|j| tokens[j])))
        .sum();
    let text = tok.decode(&tokens);
    assert_eq!(counted, text.len(), "{}", data.display());
    assert_eq!(counted, dataset.manifest.val_bytes, "{}", data.display());
}

#[test]
fn token_byte_counts_sum_to_the_validation_text() {
    let dir = temp_dir("bpb");
    // Byte-level BPE.
    assert_byte_counts_sum_to_text_length(&corpus(&dir));
    // Llama 2's SentencePiece vocabulary: leading spaces, byte fallback for newlines, tabs,
    // and characters outside the vocabulary, and a dummy prefix after each document's BOS.
    let start = Path::new(env!("CARGO_MANIFEST_DIR"));
    let Some(llama2) = kiln_conformance::shared_file(start, "tokenizers/llama2/tokenizer.bin")
    else {
        return;
    };
    let input = dir.join("llama-text");
    fs::create_dir_all(&input).unwrap();
    let text = "Once upon a time,\n\tthere was a ünïcödé 🦙 named Ǆ.\n  Two  spaces.\n".repeat(40);
    fs::write(input.join("a.txt"), &text).unwrap();
    fs::write(input.join("b.txt"), text.replace("Once", "Twice")).unwrap();
    let out = dir.join("llama-data");
    prepare(&[input], &out, TokenizerSpec::File(llama2), 0.3).unwrap();
    assert_byte_counts_sum_to_text_length(&out);
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn fine_tuning_starts_from_the_imported_weights() {
    let dir = temp_dir("init-from");
    let data = corpus(&dir);
    train(config(data.clone(), 4), &dir.join("base"));
    let export = dir.join("base-hf");
    let base_model = kiln::rundir::import(&dir.join("base"), None).unwrap();
    kiln_formats::interop::export(
        &base_model,
        kiln_formats::interop::ExportFormat::Hf,
        &export,
    )
    .unwrap();
    let mut cfg = config(data, 4);
    cfg.init_from = Some(export.clone());
    let tuned = Trainer::create(ReferenceBackend, cfg, &dir.join("tuned")).unwrap();
    let base = kiln::rundir::import(&export, None).unwrap();
    assert_eq!(tuned.model.download_params().unwrap(), base.weights);
    // A model of another shape is refused, saying what differs.
    let mut cfg = config(dir.join("data"), 4);
    cfg.model.hidden_dim = 40;
    cfg.init_from = Some(export);
    let error = Trainer::create(ReferenceBackend, cfg, &dir.join("bad"))
        .err()
        .unwrap()
        .to_string();
    assert!(error.contains("hidden_dim: 48 vs 40"), "{error}");
    fs::remove_dir_all(dir).unwrap();
}

#[test]
fn report_writes_legible_plots_and_a_summary() {
    let dir = temp_dir("report");
    let data = corpus(&dir);
    let mut cfg = config(data, 8);
    cfg.tensorboard = true;
    train(cfg, &dir.join("run"));
    let written = kiln::report::write(&[dir.join("run")], &dir.join("out")).unwrap();
    for name in [
        "loss_vs_steps.png",
        "loss_vs_tokens.svg",
        "loss_vs_time.png",
        "throughput.png",
        "learning_rate.svg",
        "report.md",
    ] {
        let path = dir.join("out").join(name);
        assert!(written.contains(&path), "{name} not reported as written");
        // Images are checked for size here; report.md by its content below.
        assert!(
            name.ends_with(".md") || fs::metadata(&path).unwrap().len() > 1000,
            "{name} is nearly empty"
        );
    }
    let png = fs::read(dir.join("out/loss_vs_steps.png")).unwrap();
    assert_eq!(&png[..8], b"\x89PNG\r\n\x1a\n");
    let svg = fs::read_to_string(dir.join("out/loss_vs_steps.svg")).unwrap();
    // Axis titles with units and a legend are part of the plot.
    for text in [
        "optimizer step",
        "cross-entropy (nats/token)",
        "train loss",
        "validation loss",
    ] {
        assert!(svg.contains(text), "the SVG lacks '{text}'");
    }
    let md = fs::read_to_string(dir.join("out/report.md")).unwrap();
    assert!(
        md.contains("validation bits per byte") && md.contains("| forward |"),
        "{md}"
    );
    // TensorBoard events were written beside the telemetry.
    let events: Vec<_> = fs::read_dir(dir.join("run/tensorboard"))
        .unwrap()
        .flatten()
        .collect();
    assert_eq!(events.len(), 1);
    fs::remove_dir_all(dir).unwrap();
}

/// The export options (clip search, Hadamard rotation, both) against the quantizers they
/// name: reloaded alone, each tensor is the original rotated (where rotated), quantized with
/// or without the search, dequantized and rotated back, value for value; rotated matrices are
/// not offered as codes, the others are. (What each option is worth is `kiln ablate`'s
/// question: README, Compact models.)
#[test]
fn export_options_reload_as_their_quantizers_make_them() {
    use kiln_core::quant::{hadamard_block, hadamard_rows, quantize_with, Scheme};
    use kiln_formats::packed::{self, PackOptions, PackRule};
    let dir = temp_dir("export-options");
    let data = corpus(&dir);
    train(config(data, 4), &dir.join("run"));
    let original = kiln::rundir::import(&dir.join("run"), None).unwrap();
    let layout = kiln_core::model::ParamLayout::new(&original.config);
    for scheme in [kiln_core::quant::SchemeName::Int6.scheme(), Scheme::Ternary] {
        let rule = PackRule {
            matrices: scheme,
            embedding: scheme,
            small_max: 64,
            hadamard: false,
        };
        for (clip_search, hadamard) in [(true, false), (false, true), (true, true)] {
            let options = PackOptions {
                clip_search,
                hadamard,
                calibrate: false,
            };
            let path = dir.join("model.kiln");
            packed::write(
                &path,
                &original.config,
                &original.weights,
                (rule, options),
                None,
                None,
            )
            .unwrap();
            let back = packed::read(&path).unwrap();
            let mut coded = 0;
            for spec in &layout.specs {
                let w = &original.weights[spec.region.offset..][..spec.region.len];
                let (rows, cols) = if spec.shape.len() == 2 {
                    (spec.shape[0], spec.shape[1])
                } else {
                    (1, spec.region.len)
                };
                let scheme = rule.scheme_for(spec.kind, spec.region.len);
                let is_coded =
                    matches!(scheme, Scheme::Ternary | Scheme::Int { .. }) && spec.shape.len() == 2;
                let rotation = hadamard_block(cols).filter(|_| hadamard && is_coded);
                let mut values = w.to_vec();
                if let Some(b) = rotation {
                    hadamard_rows(&mut values, cols, b);
                }
                let mut want = quantize_with(scheme, &values, rows, cols, clip_search)
                    .unwrap()
                    .dequantize();
                if let Some(b) = rotation {
                    hadamard_rows(&mut want, cols, b);
                }
                assert_eq!(
                    &back.weights[spec.region.offset..][..spec.region.len],
                    &want[..],
                    "{} {options:?}",
                    spec.name
                );
                let offered = back
                    .codes
                    .iter()
                    .any(|(r, _)| r.offset == spec.region.offset);
                assert_eq!(
                    offered,
                    is_coded && rotation.is_none(),
                    "{} {options:?}",
                    spec.name
                );
                coded += usize::from(is_coded);
            }
            assert!(coded > 0, "the test model has quantized matrices");
        }
    }
}

#[test]
fn packed_artifacts_reload_alone_with_exact_sizes() {
    use kiln_core::quant::{quantize, Scheme};
    use kiln_formats::packed::{self, PackRule};
    let dir = temp_dir("packed");
    let data = corpus(&dir);
    train(config(data.clone(), 8), &dir.join("run"));
    let original = kiln::rundir::import(&dir.join("run"), None).unwrap();
    let int8 = Scheme::Int {
        bits: 8,
        percentile: 99.99984,
    };
    for (scheme, max_gap) in [(int8, 0.01), (Scheme::Ternary, f64::INFINITY)] {
        let rule = PackRule {
            matrices: scheme,
            embedding: int8,
            small_max: 64,
            hadamard: false,
        };
        let path = dir.join("model.kiln");
        let report = packed::write(
            &path,
            &original.config,
            &original.weights,
            (rule, Default::default()),
            None,
            None,
        )
        .unwrap();
        // The size table accounts for every byte of the file.
        assert_eq!(report.file_bytes as u64, fs::metadata(&path).unwrap().len());
        assert_eq!(
            report.file_bytes,
            report.header_bytes + report.payload_compressed_bytes
        );
        assert_eq!(
            report.groups.iter().map(|g| g.packed_bytes).sum::<usize>(),
            report.payload_packed_bytes
        );
        // Reloaded alone, each tensor is exactly what its quantizer makes of the original.
        let back = packed::read(&path).unwrap();
        assert_eq!(back.config, original.config);
        let layout = kiln_core::model::ParamLayout::new(&original.config);
        for spec in &layout.specs {
            let w = &original.weights[spec.region.offset..][..spec.region.len];
            let (rows, cols) = if spec.shape.len() == 2 {
                (spec.shape[0], spec.shape[1])
            } else {
                (1, spec.region.len)
            };
            let want = quantize(rule.scheme_for(spec.kind, spec.region.len), w, rows, cols)
                .unwrap()
                .dequantize();
            assert_eq!(
                &back.weights[spec.region.offset..][..spec.region.len],
                &want[..],
                "{}",
                spec.name
            );
        }
        // Scored on validation data, int8 costs less than 0.01 bits per byte.
        let dataset = Dataset::open(&data).unwrap();
        let tokens = dataset.read_all(Split::Val).unwrap();
        let score = |weights: &[f32]| {
            let model = Model::new(ReferenceBackend, original.config.clone()).unwrap();
            model.upload_params(weights).unwrap();
            let acts = model.activations(2, 16).unwrap();
            kiln_core::eval::evaluate(
                &model,
                &acts,
                &tokens,
                &dataset.tokenizer,
                None,
                0,
                &mut |_, _| {},
            )
            .unwrap()
            .bits_per_byte
        };
        let gap = score(&back.weights) - score(&original.weights);
        assert!(
            gap.abs() < max_gap,
            "{scheme:?}: round-trip gap {gap} bits/byte"
        );
    }
    // A corrupted artifact is refused by name.
    let mut bytes = fs::read(dir.join("model.kiln")).unwrap();
    bytes[0] = b'X';
    fs::write(dir.join("bad.kiln"), bytes).unwrap();
    let error = packed::read(&dir.join("bad.kiln"))
        .err()
        .unwrap()
        .to_string();
    assert!(
        error.contains("bad.kiln") && error.contains("magic"),
        "{error}"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// Loss scaling (fp16's companion, checked here in f32 on the reference backend). A
/// power-of-two scale changes no bit of the training: the scaled gradients, their norm and the
/// optimizer's unscaling are all exact, so a fixed scale of 1024 gives the very losses of an
/// unscaled run. At 2¹²⁷ (f32's largest power of two) the backward overflows now and then
/// (measured: once in 24 steps, at step 10): that step is skipped, the scale halves, it does
/// not count against `max_bad_steps`, and the run trains on. Injected non-finite gradients with a finite loss count
/// as overflows too; growth doubles the scale after `growth_interval` clean steps; and a
/// resumed run continues with the checkpoint's scale, exactly.
#[test]
fn loss_scaling_is_exact_backs_off_on_overflow_and_resumes() {
    use kiln_core::optim::LossScaler;
    let dir = temp_dir("loss-scale");
    let data = corpus(&dir);
    let plain = train(config(data.clone(), 8), &dir.join("plain"));
    let mut fixed = config(data.clone(), 8);
    fixed.loss_scale = Some(LossScaler::fixed(1024.0));
    let scaled = train(fixed, &dir.join("fixed"));
    assert_eq!(
        scaled.losses, plain.losses,
        "a power-of-two scale must be exact"
    );
    assert_eq!(scaled.skipped_steps, 0);

    let scales = |run: &str| -> Vec<(f64, bool)> {
        fs::read_to_string(dir.join(run).join("telemetry.jsonl"))
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
            .filter(|l| l["type"] == "step")
            .map(|l| {
                (
                    l["loss_scale"].as_f64().unwrap(),
                    l["skipped"].as_bool().unwrap(),
                )
            })
            .collect()
    };
    let mut huge = config(data.clone(), 24);
    huge.loss_scale = Some(LossScaler {
        scale: 2f32.powi(127),
        growth_interval: 2000,
        clean_steps: 0,
    });
    // One bad step would stop a run; overflows do not count.
    huge.max_bad_steps = 1;
    let report = train(huge, &dir.join("huge"));
    let seen = scales("huge");
    let overflows = seen.iter().filter(|(_, skipped)| *skipped).count();
    assert!(overflows >= 1, "2^127 must overflow the backward: {seen:?}");
    assert_eq!(report.skipped_steps as usize, overflows);
    assert_eq!(report.steps, 24);
    let mut expected = 2f64.powi(127);
    for (scale, skipped) in &seen {
        // Telemetry writes the f32 scale's shortest decimal: compare in f32.
        assert_eq!(
            *scale as f32, expected as f32,
            "halved after each overflow only: {seen:?}"
        );
        if *skipped {
            expected /= 2.0;
        }
    }
    assert!(
        report.losses[23] < report.losses[0] - 0.3,
        "the run trains through its overflows: {:?}",
        report.losses
    );

    let mut growing = config(data.clone(), 10);
    growing.loss_scale = Some(LossScaler {
        scale: 256.0,
        growth_interval: 3,
        clean_steps: 0,
    });
    growing.poison_steps = vec![1];
    let report = train(growing.clone(), &dir.join("growing"));
    let seen: Vec<f64> = scales("growing").iter().map(|s| s.0).collect();
    // Step 2 (index 1) overflows at 256 → 128; three clean steps later 256, then 512.
    assert_eq!(
        seen,
        [256.0, 256.0, 128.0, 128.0, 128.0, 256.0, 256.0, 256.0, 512.0, 512.0]
    );
    assert_eq!(report.skipped_steps, 1);
    let joined = stopped_and_resumed(growing, &dir.join("resumed"), 4);
    assert_eq!(
        joined, report.losses,
        "a resume continues at the checkpoint's scale"
    );
    fs::remove_dir_all(dir).unwrap();
}

/// Ternary noise. On a model: `refresh_weights_noisy` quantizes every ternary tensor from the
/// weights plus Gaussian noise drawn from the seed (recomputed here from its stated rule: one
/// ChaCha8 stream per tensor, `Normal(0, σ)`), each through the export's own quantizer
/// (`quant::round_trip`), leaves the other tensors as they were, and `refresh_weights` takes
/// the noise away again. In training: the losses change, evaluation's weights are noise-free
/// after the run, and a resume continues exactly (the noise comes from the seed and the step).
#[test]
fn ternary_noise_perturbs_training_only_and_resumes() {
    use kiln_core::quant::{self, PackRule, Scheme};
    use rand::SeedableRng;
    use rand_distr::Distribution;
    let rule = PackRule {
        matrices: Scheme::Ternary,
        embedding: Scheme::Int {
            bits: 8,
            percentile: 100.0,
        },
        small_max: 0,
        hadamard: false,
    };
    let mut model = Model::new(ReferenceBackend, ModelConfig::preset("tiny-gqa").unwrap()).unwrap();
    model.init_random(5).unwrap();
    model.enable_qat(rule).unwrap();
    let download = |m: &Model<ReferenceBackend>| {
        let mut host = vec![0.0; m.param_count()];
        kiln_core::backend::Backend::download(
            &m.backend,
            kiln_core::backend::View::whole(m.weights()),
            &mut host,
        )
        .unwrap();
        host
    };
    let clean = download(&model);
    let params = model.download_params().unwrap();
    let sigma = 0.05;
    let perturbed = model.refresh_weights_noisy(sigma, 99).unwrap();
    let noisy = download(&model);
    let normal = rand_distr::Normal::new(0.0f32, sigma).unwrap();
    let mut ternary = 0;
    for (index, spec) in model.layout.specs.iter().enumerate() {
        let r = spec.region.offset..spec.region.offset + spec.region.len;
        let scheme = rule.scheme_for(spec.kind, spec.region.len);
        if scheme != Scheme::Ternary {
            assert_eq!(
                noisy[r.clone()],
                clean[r],
                "{}: not ternary, untouched",
                spec.name
            );
            continue;
        }
        ternary += spec.region.len;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(
            99 ^ (index as u64 + 1).wrapping_mul(0x9E37_79B9_7F4A_7C15),
        );
        let shifted: Vec<f32> = params[r.clone()]
            .iter()
            .map(|&w| w + normal.sample(&mut rng))
            .collect();
        let mut want = vec![0.0; shifted.len()];
        let q = scheme.fake(quant::quant_shape(spec).1).unwrap();
        quant::round_trip(q, None, &shifted, &mut want);
        assert_eq!(noisy[r.clone()], want[..], "{}", spec.name);
        assert_ne!(
            noisy[r.clone()],
            clean[r],
            "{}: the noise changed nothing",
            spec.name
        );
    }
    assert_eq!(perturbed, ternary);
    assert!(ternary > 0);
    model.refresh_weights().unwrap();
    assert_eq!(
        download(&model),
        clean,
        "refresh_weights takes the noise away"
    );

    let dir = temp_dir("ternary-noise");
    let data = corpus(&dir);
    let qat = |noise: Option<f32>| {
        let mut c = config(data.clone(), 12);
        c.qat = Some(rule);
        c.ternary_noise = noise;
        c
    };
    let plain = train(qat(None), &dir.join("plain"));
    let mut trainer =
        Trainer::create(ReferenceBackend, qat(Some(0.05)), &dir.join("noisy")).unwrap();
    trainer.print_every = 0;
    let noisy = trainer.run().unwrap();
    assert_ne!(
        noisy.losses, plain.losses,
        "the noise must reach the forward"
    );
    assert!(noisy.val.unwrap().bits_per_byte.is_finite());
    let after = download(&trainer.model);
    trainer.model.refresh_weights().unwrap();
    assert_eq!(
        after,
        download(&trainer.model),
        "evaluation's weights are noise-free"
    );
    let joined = stopped_and_resumed(qat(Some(0.05)), &dir.join("resumed"), 8);
    assert_eq!(joined, noisy.losses, "a resume draws the same noise");
    let mut bad = qat(Some(0.05));
    bad.qat = None;
    let err = Trainer::create(ReferenceBackend, bad, &dir.join("bad"))
        .err()
        .unwrap();
    assert!(err.to_string().contains("needs --qat ternary"), "{err}");
    fs::remove_dir_all(dir).unwrap();
}
