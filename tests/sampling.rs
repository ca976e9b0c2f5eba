//! KV-cache decoding: it must reproduce the full forward, and greedy decoding must match the
//! tokens PyTorch chose for the fixture model (`scripts/make_fixtures.py`).

use std::path::PathBuf;

use kiln_conformance::{assert_close, Fixture};
use kiln_core::backend::Tolerance;
use kiln_core::model::Model;
use kiln_core::sample::{generate, SamplingParams};
use kiln_reference::ReferenceBackend;

fn fixture(name: &str) -> Fixture {
    Fixture::load(
        &PathBuf::from(env!("CARGO_MANIFEST_DIR"))
            .join("tests/fixtures")
            .join(name),
    )
    .unwrap()
}

/// A fixture's model on the reference backend, its tokens, and the full forward's logits
/// `(T, V)` over them: what decoding is held to.
fn full_forward(name: &str) -> (Model<ReferenceBackend>, Vec<u32>, Vec<f32>) {
    let fixture = fixture(name);
    let model = fixture.model(ReferenceBackend).unwrap();
    let tokens = fixture.tokens("tokens").unwrap()[..fixture.seq].to_vec();
    let acts = model.activations(1, tokens.len()).unwrap();
    model.forward(&acts, &tokens, None).unwrap();
    let full = model.download_logits(&acts).unwrap();
    (model, tokens, full)
}

#[test]
fn cached_decoding_gives_the_logits_of_the_full_forward() {
    for name in [
        "model_tiny-mha.safetensors",
        "model_tiny-gqa.safetensors",
        "model_tiny-golf.safetensors",
        "model_tiny-golf-recurrent.safetensors",
        "model_tiny-golf-engram.safetensors",
        "model_tiny-golf-parallel.safetensors",
        "model_tiny-golf-moe.safetensors",
        "model_tiny-golf-capsules.safetensors",
        "model_tiny-golf-koopman.safetensors",
        "model_tiny-golf-koopman-clamp.safetensors",
        "model_tiny-golf-feedback.safetensors",
    ] {
        let (model, tokens, full) = full_forward(name);
        let (tokens, vocab) = (&tokens[..], model.config.vocab_size);
        let mut cache = model.kv_cache(tokens.len()).unwrap();
        for (pos, &token) in tokens.iter().enumerate() {
            let step = model.decode_step(&mut cache, token).unwrap();
            let want: Vec<f64> = full[pos * vocab..(pos + 1) * vocab]
                .iter()
                .map(|&x| x as f64)
                .collect();
            // Same kernels' arithmetic in another order (one row instead of the whole block):
            // within f32 rounding of logits of magnitude ~10.
            let tol = Tolerance {
                atol: 1e-5,
                rtol: 1e-4,
            };
            assert_close(&format!("{name} position {pos}"), &step, &want, tol).unwrap();
        }
        assert!(
            model.decode_step(&mut cache, 0).is_err(),
            "a full cache must refuse another token"
        );
    }
}

/// A batched prefill of the first positions, then decoding the rest one at a time, gives the
/// full forward's logits at every position (and the cache holds what decoding would have
/// stored: the later positions attend over the prefilled keys and values).
#[test]
fn prefill_then_decoding_gives_the_logits_of_the_full_forward() {
    for name in [
        "model_tiny-mha.safetensors",
        "model_tiny-gqa.safetensors",
        "model_tiny-golf.safetensors",
        "model_tiny-golf-recurrent.safetensors",
        "model_tiny-golf-engram.safetensors",
        "model_tiny-golf-parallel.safetensors",
        "model_tiny-golf-moe.safetensors",
        "model_tiny-golf-capsules.safetensors",
        "model_tiny-golf-koopman.safetensors",
        "model_tiny-golf-koopman-clamp.safetensors",
        "model_tiny-golf-feedback.safetensors",
    ] {
        let (model, tokens, full) = full_forward(name);
        let (tokens, vocab) = (&tokens[..], model.config.vocab_size);
        let want = |pos: usize| -> Vec<f64> {
            full[pos * vocab..(pos + 1) * vocab]
                .iter()
                .map(|&x| x as f64)
                .collect()
        };
        // As above: the same kernels in another order, within f32 rounding.
        let tol = Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        };
        let split = tokens.len() / 2;
        let mut cache = model.kv_cache(tokens.len()).unwrap();
        let last = model.prefill(&mut cache, &tokens[..split]).unwrap();
        assert_close(&format!("{name} prefill"), &last, &want(split - 1), tol).unwrap();
        assert_eq!(cache.len, split);
        for (pos, &token) in tokens.iter().enumerate().skip(split) {
            let step = model.decode_step(&mut cache, token).unwrap();
            assert_close(&format!("{name} position {pos}"), &step, &want(pos), tol).unwrap();
        }
        assert!(
            model.prefill(&mut cache, &tokens[..1]).is_err(),
            "prefill must refuse a cache that is not empty"
        );
    }
}

/// Sequences decoded together in one batched cache give, row by row, the logits each gives
/// decoded alone (every golf option on in tiny-golf, the bigram embedding's per-sequence
/// previous token included).
#[test]
fn batched_decoding_gives_each_sequence_its_own_logits() {
    for name in [
        "model_tiny-gqa.safetensors",
        "model_tiny-golf.safetensors",
        "model_tiny-golf-recurrent.safetensors",
        "model_tiny-golf-engram.safetensors",
        "model_tiny-golf-parallel.safetensors",
        "model_tiny-golf-moe.safetensors",
        "model_tiny-golf-capsules.safetensors",
        "model_tiny-golf-koopman.safetensors",
        "model_tiny-golf-koopman-clamp.safetensors",
        "model_tiny-golf-feedback.safetensors",
    ] {
        let fixture = fixture(name);
        let model = fixture.model(ReferenceBackend).unwrap();
        let vocab = model.config.vocab_size;
        let prompt = &fixture.tokens("tokens").unwrap()[..3];
        // Three sequences diverging after the shared prompt.
        let steps: Vec<[u32; 3]> = (0..4u32)
            .map(|i| {
                [
                    i % vocab as u32,
                    (3 * i + 1) % vocab as u32,
                    (5 * i + 2) % vocab as u32,
                ]
            })
            .collect();
        let mut batch = model.kv_cache_batch(3, prompt.len() + steps.len()).unwrap();
        model.prefill(&mut batch, prompt).unwrap();
        let mut rows = Vec::new();
        let mut got = Vec::new();
        for step in &steps {
            model
                .decode_batch_into(&mut batch, step, &mut rows)
                .unwrap();
            got.push(rows.clone());
        }
        let tol = Tolerance {
            atol: 1e-5,
            rtol: 1e-4,
        };
        for seq in 0..3 {
            let mut alone = model.kv_cache(prompt.len() + steps.len()).unwrap();
            model.prefill(&mut alone, prompt).unwrap();
            for (i, step) in steps.iter().enumerate() {
                let want: Vec<f64> = model
                    .decode_step(&mut alone, step[seq])
                    .unwrap()
                    .iter()
                    .map(|&x| x as f64)
                    .collect();
                let row = &got[i][seq * vocab..(seq + 1) * vocab];
                assert_close(&format!("{name} sequence {seq} step {i}"), row, &want, tol).unwrap();
            }
        }
        assert!(model
            .decode_batch_into(&mut batch, &[0, 1], &mut rows)
            .is_err());
    }
}

#[test]
fn greedy_decoding_matches_pytorch() {
    for name in [
        "model_tiny-mha.safetensors",
        "model_tiny-gqa.safetensors",
        "model_tiny-golf.safetensors",
        "model_tiny-golf-recurrent.safetensors",
        "model_tiny-golf-engram.safetensors",
        "model_tiny-golf-parallel.safetensors",
        "model_tiny-golf-moe.safetensors",
        "model_tiny-golf-capsules.safetensors",
        "model_tiny-golf-koopman.safetensors",
        "model_tiny-golf-koopman-clamp.safetensors",
        "model_tiny-golf-feedback.safetensors",
    ] {
        let fixture = fixture(name);
        let model = fixture.model(ReferenceBackend).unwrap();
        let prompt = fixture.tokens("greedy_prompt").unwrap();
        let golden = fixture.tokens("greedy_tokens").unwrap();
        let greedy = SamplingParams {
            temperature: 0.0,
            ..Default::default()
        };
        let mut streamed = Vec::new();
        let out = generate(&model, &prompt, golden.len(), &greedy, None, |t| {
            streamed.push(t)
        })
        .unwrap();
        assert_eq!(out, golden, "{name}");
        assert_eq!(streamed, golden, "{name}: streamed tokens");
    }
}
