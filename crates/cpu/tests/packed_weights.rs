//! The packed bf16 weight copies (`weights.rs`) must follow every write to the weight: each
//! product read through a copy (a linear layer's forward and input gradient, the fused
//! classifier's losses and input gradient) must equal, bit for bit, the same product on a fresh buffer
//! holding the same values (which has no copy yet, so it packs from the values), after an
//! upload, a copy, a zeroing of the whole memory, a write to part of the window, and AdamW
//! (which repacks the copies itself). Runs on the AVX512-BF16 tier (the only one that keeps
//! copies) and says so when the machine lacks it.

use kiln_conformance::test_values as values;
use kiln_core::backend::{
    Accumulate, AdamWStep, Backend, ClassifierShape, DType, DeviceMemory, MatmulShape, View,
};
use kiln_core::cpu::{self, Isa};
use kiln_cpu::{CpuBackend, HostMemory, Precision};

const S: MatmulShape = MatmulShape {
    rows: 13,
    in_dim: 40,
    out_dim: 70,
};

/// The forward product, the input gradient, and the fused classifier's losses and input
/// gradient through `weight`, as host values.
fn products(be: &CpuBackend, weight: View<CpuBackend>) -> Vec<Vec<f32>> {
    let x = be.alloc(S.rows * S.in_dim, DType::F32).unwrap();
    let dy = be.alloc(S.rows * S.out_dim, DType::F32).unwrap();
    be.upload(View::whole(&x), &values(S.rows * S.in_dim, 1))
        .unwrap();
    be.upload(View::whole(&dy), &values(S.rows * S.out_dim, 2))
        .unwrap();
    let out = be.alloc(S.rows * S.out_dim, DType::F32).unwrap();
    let dx = be.alloc(S.rows * S.in_dim, DType::F32).unwrap();
    let dw = be.alloc(S.out_dim * S.in_dim, DType::F32).unwrap();
    be.matmul_forward(View::whole(&out), View::whole(&x), weight, S);
    let (dx_v, dw_v, dy_v, x_v) = (
        View::whole(&dx),
        View::whole(&dw),
        View::whole(&dy),
        View::whole(&x),
    );
    be.matmul_backward(dx_v, dw_v, dy_v, x_v, weight, S, Accumulate::Overwrite);
    let matmul_dx = {
        let mut host = vec![0.0; dx.len()];
        be.download(View::whole(&dx), &mut host).unwrap();
        host
    };
    let download = |m: &HostMemory| {
        let mut host = vec![0.0; m.len()];
        be.download(View::whole(m), &mut host).unwrap();
        host
    };
    let c = ClassifierShape {
        rows: S.rows,
        dim: S.in_dim,
        vocab: S.out_dim,
        softcap: None,
    };
    let targets: Vec<u32> = (0..S.rows as u32)
        .map(|r| r * 5 % S.out_dim as u32)
        .collect();
    let losses = be.alloc(S.rows, DType::F32).unwrap();
    let lse = be.alloc(S.rows, DType::F32).unwrap();
    let (l_v, lse_v) = (View::whole(&losses), View::whole(&lse));
    let saved = be.alloc(be.classifier_saved_len(c), DType::F32).unwrap();
    let saved_v = View::whole(&saved);
    be.classifier_loss_forward(l_v, lse_v, saved_v, x_v, weight, &targets, c);
    let mode = Accumulate::Overwrite;
    let state = (lse_v, saved_v);
    be.classifier_loss_backward(dx_v, dw_v, x_v, weight, state, &targets, c, 0.1, mode);
    vec![download(&out), matmul_dx, download(&losses), download(&dx)]
}

/// The products through `weight` equal those through a fresh buffer holding its values.
fn check(be: &CpuBackend, weight: View<CpuBackend>, when: &str) {
    let mut host = vec![0.0; weight.len()];
    be.download(weight, &mut host).unwrap();
    let fresh = be.alloc(host.len(), DType::F32).unwrap();
    be.upload(View::whole(&fresh), &host).unwrap();
    let want = products(be, View::whole(&fresh));
    let got = products(be, weight);
    let names = [
        "forward product",
        "input gradient",
        "classifier losses",
        "classifier dinp",
    ];
    for ((what, got), want) in names.iter().zip(&got).zip(&want) {
        let differs = got
            .iter()
            .zip(want)
            .position(|(g, w)| g.to_bits() != w.to_bits());
        if let Some(i) = differs {
            panic!(
                "{when}: {what}[{i}] is {} but {} on a fresh buffer",
                got[i], want[i]
            );
        }
    }
}

#[test]
fn packed_copies_follow_every_write() {
    if let Some(why) = cpu::features().missing(Isa::Avx512bf16) {
        println!("skipped: bf16 weight copies need the AVX512-BF16 tier ({why})");
        return;
    }
    let be = CpuBackend::with(Isa::Avx512bf16, Precision::Bf16, 2).unwrap();
    let n = S.out_dim * S.in_dim;
    // The weight sits at an offset inside a larger arena, as in a model.
    let arena = be.alloc(n + 50, DType::F32).unwrap();
    let weight = View::new(&arena, 25, n);
    be.upload(weight, &values(n, 3)).unwrap();
    check(&be, weight, "first use");
    // The copies are now made; each write below must reach the products.
    be.upload(weight, &values(n, 4)).unwrap();
    check(&be, weight, "after an upload");
    let other = be.alloc(n, DType::F32).unwrap();
    be.upload(View::whole(&other), &values(n, 5)).unwrap();
    be.copy(weight, View::whole(&other));
    check(&be, weight, "after a copy");
    be.upload(View::new(&arena, 30, 7), &[9.0; 7]).unwrap();
    check(&be, weight, "after a write to part of the window");
    be.zero(View::whole(&arena));
    be.upload(weight, &values(n, 6)).unwrap();
    check(&be, weight, "after zeroing the memory");
    let grads = be.alloc(n, DType::F32).unwrap();
    let moments = be.alloc(2 * n, DType::F32).unwrap();
    be.upload(View::whole(&grads), &values(n, 7)).unwrap();
    let hp = AdamWStep {
        learning_rate: 0.1,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 1,
        grad_scale: 1.0,
    };
    // AdamW packs the copy as it updates (fused): the weights it writes must still be the
    // reference's AdamW, bit for bit, and the copy must match them.
    let host = |view: View<CpuBackend>| {
        let mut values = vec![0.0; view.len()];
        be.download(view, &mut values).unwrap();
        values
    };
    let (mut want_p, mut want_m, mut want_v) = (host(weight), vec![0.0; n], vec![0.0; n]);
    let g = host(View::whole(&grads));
    for step in 1..=2 {
        let (m, v) = (View::new(&moments, 0, n), View::new(&moments, n, n));
        let hp = AdamWStep { step, ..hp };
        be.adamw_step(weight, View::whole(&grads), m, v, &hp);
        kiln_reference::adamw::adamw_step(&mut want_p, &g, &mut want_m, &mut want_v, &hp);
        let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
        assert_eq!(
            bits(&host(weight)),
            bits(&want_p),
            "AdamW step {step}: params"
        );
        check(&be, weight, &format!("after AdamW step {step}"));
    }
}
