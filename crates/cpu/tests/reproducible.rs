//! The fast backend's results do not depend on its threads' timing: the same training steps
//! twice, from the same weights, give the same bits.

use kiln_core::config::ModelConfig;
use kiln_core::model::Model;
use kiln_core::optim::{adamw_step, AdamW};
use kiln_cpu::CpuBackend;

/// tiny-golf with a 4096-token vocabulary, so that the fused classifier's backward runs over
/// eight vocabulary chunks (its input gradient is the sum the pool's threads share); four
/// AdamW steps, four times over, at the backend's best tier and its thread count. Every loss
/// and every final gradient must be equal bit for bit.
#[test]
fn the_same_steps_twice_give_the_same_bits() {
    let run = || {
        let mut config = ModelConfig::preset("tiny-golf").unwrap();
        config.vocab_size = 4096;
        let backend = CpuBackend::new().unwrap();
        let mut model = Model::new(backend, config).unwrap();
        model.init_random(5).unwrap();
        let acts = model.loss_activations(4, 16).unwrap();
        let tokens: Vec<u32> = (0..64).map(|i| (i * 611 + 7) % 4096).collect();
        let targets: Vec<u32> = (0..64).map(|i| (i * 389 + 3) % 4096).collect();
        let hp = AdamW {
            learning_rate: 1e-3,
            beta1: 0.9,
            beta2: 0.95,
            eps: 1e-8,
            weight_decay: 0.1,
        };
        let mut losses = Vec::new();
        for _ in 0..4 {
            model.zero_grad();
            let loss = model.forward(&acts, &tokens, Some(&targets)).unwrap();
            model.backward(&acts, &tokens, &targets, 1.0).unwrap();
            losses.push(loss.unwrap().to_bits());
            adamw_step(&mut model, &hp, 1.0).unwrap();
        }
        let grads: Vec<u32> = model
            .download_grads()
            .unwrap()
            .iter()
            .map(|g| g.to_bits())
            .collect();
        (losses, grads)
    };
    let first = run();
    for time in 1..4 {
        assert!(run() == first, "run {time} differs from the first");
    }
}
