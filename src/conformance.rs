//! The conformance suite: one set of checks, written against [`Backend`], that every backend
//! must pass (the reference backend's own tests run it; the AMX and CUDA backends run the very
//! same functions with their own tolerances).
//!
//! - [`check_kernels`]: each kernel, forward and backward, against the reference kernels
//!   evaluated in f64 on the same inputs;
//! - [`check_fixture`]: the whole model against PyTorch (`scripts/make_fixtures.py`): logits,
//!   loss, every parameter gradient, and the losses of ten AdamW steps;
//! - [`check_training_smoke`]: twenty training steps on a tiny model make the loss fall.
//!
//! Each check returns `Err` with a message naming the quantity, the worst element and the
//! tolerance, so a failing backend says exactly where it strays.

use std::path::Path;

use anyhow::{anyhow, bail, ensure, Context, Result};
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use safetensors::{Dtype, SafeTensors};

use crate::backend::reference::{
    activation, adamw, attention, embed, matmul, rmsnorm, rope, scale, swiglu, xent,
};
use crate::backend::{Accumulate, AdamWStep, Backend, Tolerance, View};
use crate::config::ModelConfig;
use crate::model::{AdamW, Model};

/// `|got - want| <= atol + rtol * |want|` for every element, else an error naming the worst.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: Tolerance) -> Result<()> {
    ensure!(
        got.len() == want.len(),
        "{what}: {} values, expected {}",
        got.len(),
        want.len()
    );
    let mut worst: Option<(usize, f64)> = None;
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let excess = (g as f64 - w).abs() - (tol.atol + tol.rtol * w.abs());
        if !(excess <= 0.0) && worst.is_none_or(|(_, e)| excess > e || excess.is_nan()) {
            worst = Some((i, excess));
        }
    }
    if let Some((i, _)) = worst {
        bail!(
            "{what}: element {i} is {} but the reference is {} (|diff| {:.3e} > {:.1e} + {:.1e}·|ref|)",
            got[i],
            want[i],
            (got[i] as f64 - want[i]).abs(),
            tol.atol,
            tol.rtol
        );
    }
    Ok(())
}

fn random(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
    (0..n)
        .map(|_| rng.random_range(-1.0..1.0) * scale)
        .collect()
}

fn to_f32(x: &[f64]) -> Vec<f32> {
    x.iter().map(|&v| v as f32).collect()
}

/// Values rounded to f32 and back, so the f64 reference sees exactly the backend's inputs.
fn rounded(x: Vec<f64>) -> Vec<f64> {
    x.into_iter().map(|v| v as f32 as f64).collect()
}

/// Device buffers for one kernel call, uploaded from f64 host values, with their lengths.
struct Device<'b, B: Backend> {
    backend: &'b B,
    buffers: Vec<(B::Memory, usize)>,
}

impl<'b, B: Backend> Device<'b, B> {
    fn new(backend: &'b B) -> Self {
        Device {
            backend,
            buffers: Vec::new(),
        }
    }
    fn put(&mut self, values: &[f64]) -> usize {
        let memory = self.backend.alloc(values.len());
        self.backend
            .upload(View::whole(&memory, values.len()), &to_f32(values));
        self.buffers.push((memory, values.len()));
        self.buffers.len() - 1
    }
    fn view(&self, index: usize) -> View<'_, B> {
        let (memory, len) = &self.buffers[index];
        View::whole(memory, *len)
    }
    fn get(&self, index: usize) -> Vec<f32> {
        let mut host = vec![0.0; self.buffers[index].1];
        self.backend.download(self.view(index), &mut host);
        host
    }
}

/// Every kernel, forward and backward, on small awkward shapes (odd sizes, GQA, accumulation)
/// against the reference kernels in f64.
pub fn check_kernels<B: Backend>(backend: &B) -> Result<()> {
    let tol = backend.tolerance();
    let mut rng = ChaCha8Rng::seed_from_u64(7);

    // matmul: forward, then backward both overwriting and accumulating dinp.
    let (rows, in_dim, out_dim) = (7, 13, 5);
    let inp = rounded(random(&mut rng, rows * in_dim, 1.0));
    let weight = rounded(random(&mut rng, out_dim * in_dim, 1.0));
    let dout = rounded(random(&mut rng, rows * out_dim, 1.0));
    let dinp0 = rounded(random(&mut rng, rows * in_dim, 1.0));
    let dweight0 = rounded(random(&mut rng, out_dim * in_dim, 1.0));
    let mut want = vec![0.0; rows * out_dim];
    matmul::matmul_forward(&mut want, &inp, &weight, rows, in_dim, out_dim);
    let mut dev = Device::new(backend);
    let (i, w, o, dy) = (
        dev.put(&inp),
        dev.put(&weight),
        dev.put(&want),
        dev.put(&dout),
    );
    backend.matmul_forward(dev.view(o), dev.view(i), dev.view(w), rows, in_dim, out_dim);
    assert_close("matmul_forward", &dev.get(o), &want, tol)?;
    for mode in [Accumulate::Overwrite, Accumulate::Add] {
        let (mut want_di, mut want_dw) = (dinp0.clone(), dweight0.clone());
        matmul::matmul_backward(
            &mut want_di,
            &mut want_dw,
            &dout,
            &inp,
            &weight,
            rows,
            in_dim,
            out_dim,
            mode,
        );
        let (di, dw) = (dev.put(&dinp0), dev.put(&dweight0));
        backend.matmul_backward(
            dev.view(di),
            dev.view(dw),
            dev.view(dy),
            dev.view(i),
            dev.view(w),
            rows,
            in_dim,
            out_dim,
            mode,
        );
        assert_close(
            &format!("matmul_backward dinp ({mode:?})"),
            &dev.get(di),
            &want_di,
            tol,
        )?;
        assert_close(
            "matmul_backward dweight (accumulated)",
            &dev.get(dw),
            &want_dw,
            tol,
        )?;
    }

    // embedding, with a repeated token so the backward's accumulation is exercised.
    let (vocab, dim) = (11, 6);
    let tokens = [3u32, 0, 10, 3, 7];
    let table = rounded(random(&mut rng, vocab * dim, 1.0));
    let dout = rounded(random(&mut rng, tokens.len() * dim, 1.0));
    let dtable0 = rounded(random(&mut rng, vocab * dim, 1.0));
    let mut want = vec![0.0; tokens.len() * dim];
    embed::embedding_forward(&mut want, &table, &tokens, dim);
    let mut want_dtable = dtable0.clone();
    embed::embedding_backward(&mut want_dtable, &dout, &tokens, dim);
    let mut dev = Device::new(backend);
    let (t, o, dy, dt) = (
        dev.put(&table),
        dev.put(&want),
        dev.put(&dout),
        dev.put(&dtable0),
    );
    backend.embedding_forward(dev.view(o), dev.view(t), &tokens, dim);
    assert_close("embedding_forward", &dev.get(o), &want, tol)?;
    backend.embedding_backward(dev.view(dt), dev.view(dy), &tokens, dim);
    assert_close("embedding_backward", &dev.get(dt), &want_dtable, tol)?;

    // rmsnorm
    let (rows, dim, eps) = (5, 12, 1e-5f32);
    let inp = rounded(random(&mut rng, rows * dim, 2.0));
    let weight = rounded(random(&mut rng, dim, 1.0));
    let dout = rounded(random(&mut rng, rows * dim, 1.0));
    let dinp0 = rounded(random(&mut rng, rows * dim, 1.0));
    let dweight0 = rounded(random(&mut rng, dim, 1.0));
    let (mut want, mut want_rstd) = (vec![0.0; rows * dim], vec![0.0; rows]);
    rmsnorm::rmsnorm_forward(&mut want, &mut want_rstd, &inp, &weight, dim, eps as f64);
    let mut dev = Device::new(backend);
    let (x, w, o, r, dy) = (
        dev.put(&inp),
        dev.put(&weight),
        dev.put(&want),
        dev.put(&want_rstd),
        dev.put(&dout),
    );
    backend.rmsnorm_forward(
        dev.view(o),
        dev.view(r),
        dev.view(x),
        dev.view(w),
        rows,
        dim,
        eps,
    );
    assert_close("rmsnorm_forward", &dev.get(o), &want, tol)?;
    assert_close("rmsnorm_forward rstd", &dev.get(r), &want_rstd, tol)?;
    for mode in [Accumulate::Overwrite, Accumulate::Add] {
        let (mut want_di, mut want_dw) = (dinp0.clone(), dweight0.clone());
        rmsnorm::rmsnorm_backward(
            &mut want_di,
            &mut want_dw,
            &dout,
            &inp,
            &weight,
            &want_rstd,
            dim,
            mode,
        );
        let (di, dw) = (dev.put(&dinp0), dev.put(&dweight0));
        backend.rmsnorm_backward(
            dev.view(di),
            dev.view(dw),
            dev.view(dy),
            dev.view(x),
            dev.view(w),
            dev.view(r),
            rows,
            dim,
            mode,
        );
        assert_close(
            &format!("rmsnorm_backward dinp ({mode:?})"),
            &dev.get(di),
            &want_di,
            tol,
        )?;
        assert_close("rmsnorm_backward dweight", &dev.get(dw), &want_dw, tol)?;
    }

    // rope: forward and backward, at a large base as Qwen3 uses; whole heads and partial.
    let (batch, seq, heads, head_dim, theta) = (2, 9, 3, 8, 1e6f32);
    for rot in [head_dim, 4] {
        let inp = rounded(random(&mut rng, batch * seq * heads * head_dim, 1.0));
        let mut want = vec![0.0; inp.len()];
        // Rows start at position 3, as when decoding after a 3-token prompt.
        rope::rope_forward(&mut want, &inp, 3, seq, heads, head_dim, rot, theta as f64);
        let mut want_back = vec![0.0; inp.len()];
        rope::rope_backward(
            &mut want_back,
            &inp,
            seq,
            heads,
            head_dim,
            rot,
            theta as f64,
        );
        let mut dev = Device::new(backend);
        let (x, o) = (dev.put(&inp), dev.put(&want));
        let (xv, ov) = (dev.view(x), dev.view(o));
        backend.rope_forward(ov, xv, batch, seq, heads, head_dim, rot, theta, 3);
        assert_close(&format!("rope_forward rot {rot}"), &dev.get(o), &want, tol)?;
        backend.rope_backward(ov, xv, batch, seq, heads, head_dim, rot, theta);
        assert_close(
            &format!("rope_backward rot {rot}"),
            &dev.get(o),
            &want_back,
            tol,
        )?;
    }

    // attention with grouped-query heads (4 query heads over 2 kv heads).
    let shape = attention::AttentionShape {
        batch: 2,
        seq: 6,
        heads: 4,
        kv_heads: 2,
        head_dim: 5,
    };
    let n = shape.batch * shape.seq;
    let q = rounded(random(&mut rng, n * shape.heads * shape.head_dim, 1.5));
    let k = rounded(random(&mut rng, n * shape.kv_heads * shape.head_dim, 1.5));
    let v = rounded(random(&mut rng, n * shape.kv_heads * shape.head_dim, 1.0));
    let dout = rounded(random(&mut rng, q.len(), 1.0));
    let mut want = vec![0.0; q.len()];
    let mut probs = vec![0.0; shape.batch * shape.heads * shape.seq * shape.seq];
    attention::attention_forward(&mut want, &mut probs, &q, &k, &v, shape);
    let (mut want_dq, mut want_dk, mut want_dv) =
        (vec![0.0; q.len()], vec![0.0; k.len()], vec![0.0; v.len()]);
    attention::attention_backward(
        &mut want_dq,
        &mut want_dk,
        &mut want_dv,
        &dout,
        &q,
        &k,
        &v,
        &probs,
        shape,
    );
    let mut dev = Device::new(backend);
    let saved = vec![0.0; backend.attention_saved_len(shape.batch, shape.seq, shape.heads)];
    let (qi, ki, vi, oi, si, dyi) = (
        dev.put(&q),
        dev.put(&k),
        dev.put(&v),
        dev.put(&want),
        dev.put(&saved),
        dev.put(&dout),
    );
    let (dqi, dki, dvi) = (dev.put(&want_dq), dev.put(&want_dk), dev.put(&want_dv));
    let s = shape;
    backend.attention_forward(
        dev.view(oi),
        dev.view(si),
        dev.view(qi),
        dev.view(ki),
        dev.view(vi),
        s.batch,
        s.seq,
        s.heads,
        s.kv_heads,
        s.head_dim,
    );
    assert_close("attention_forward", &dev.get(oi), &want, tol)?;
    backend.attention_backward(
        dev.view(dqi),
        dev.view(dki),
        dev.view(dvi),
        dev.view(dyi),
        dev.view(qi),
        dev.view(ki),
        dev.view(vi),
        dev.view(si),
        s.batch,
        s.seq,
        s.heads,
        s.kv_heads,
        s.head_dim,
    );
    assert_close("attention_backward dq", &dev.get(dqi), &want_dq, tol)?;
    assert_close("attention_backward dk", &dev.get(dki), &want_dk, tol)?;
    assert_close("attention_backward dv", &dev.get(dvi), &want_dv, tol)?;

    // attention_decode: the last row of the forward, from a cache with spare capacity.
    let capacity = shape.seq + 3;
    let kv_row = shape.kv_heads * shape.head_dim;
    let q_row = shape.heads * shape.head_dim;
    let mut k_cache = vec![0.0; shape.batch * capacity * kv_row];
    let mut v_cache = k_cache.clone();
    let mut q_last = Vec::new();
    let mut want_last = Vec::new();
    for b in 0..shape.batch {
        let rows = b * shape.seq..(b + 1) * shape.seq;
        k_cache[b * capacity * kv_row..][..shape.seq * kv_row]
            .copy_from_slice(&k[rows.start * kv_row..rows.end * kv_row]);
        v_cache[b * capacity * kv_row..][..shape.seq * kv_row]
            .copy_from_slice(&v[rows.start * kv_row..rows.end * kv_row]);
        q_last.extend_from_slice(&q[(rows.end - 1) * q_row..rows.end * q_row]);
        want_last.extend_from_slice(&want[(rows.end - 1) * q_row..rows.end * q_row]);
    }
    let (qd, kc, vc, od) = (
        dev.put(&q_last),
        dev.put(&k_cache),
        dev.put(&v_cache),
        dev.put(&want_last),
    );
    backend.attention_decode(
        dev.view(od),
        dev.view(qd),
        dev.view(kc),
        dev.view(vc),
        s.batch,
        s.seq,
        capacity,
        s.heads,
        s.kv_heads,
        s.head_dim,
    );
    assert_close("attention_decode", &dev.get(od), &want_last, tol)?;

    // swiglu and the residual add
    let n = 37;
    let gate = rounded(random(&mut rng, n, 4.0));
    let up = rounded(random(&mut rng, n, 2.0));
    let dout = rounded(random(&mut rng, n, 1.0));
    let mut want = vec![0.0; n];
    swiglu::swiglu_forward(&mut want, &gate, &up);
    let (mut want_dg, mut want_du) = (vec![0.0; n], vec![0.0; n]);
    swiglu::swiglu_backward(&mut want_dg, &mut want_du, &dout, &gate, &up);
    let mut want_sum = vec![0.0; n];
    swiglu::residual_forward(&mut want_sum, &gate, &up);
    let mut dev = Device::new(backend);
    let (g, u, o, dy, dg, du) = (
        dev.put(&gate),
        dev.put(&up),
        dev.put(&want),
        dev.put(&dout),
        dev.put(&want),
        dev.put(&want),
    );
    backend.swiglu_forward(dev.view(o), dev.view(g), dev.view(u), n);
    assert_close("swiglu_forward", &dev.get(o), &want, tol)?;
    backend.swiglu_backward(
        dev.view(dg),
        dev.view(du),
        dev.view(dy),
        dev.view(g),
        dev.view(u),
        n,
    );
    assert_close("swiglu_backward dgate", &dev.get(dg), &want_dg, tol)?;
    assert_close("swiglu_backward dup", &dev.get(du), &want_du, tol)?;
    backend.residual_forward(dev.view(o), dev.view(g), dev.view(u), n);
    assert_close("residual_forward", &dev.get(o), &want_sum, tol)?;
    let mut want_acc = want_sum.clone();
    swiglu::accumulate(&mut want_acc, &up);
    backend.accumulate(dev.view(o), dev.view(u));
    assert_close("accumulate", &dev.get(o), &want_acc, tol)?;

    // (leaky) ReLU² and the logit soft cap, on both sides of zero and into tanh's saturation.
    for slope in [0.0, 0.5] {
        let mut want = vec![0.0; n];
        activation::relu2_forward(&mut want, &gate, slope);
        let mut want_d = vec![0.0; n];
        activation::relu2_backward(&mut want_d, &dout, &gate, slope);
        let mut dev = Device::new(backend);
        let (x, dy, o, dx) = (
            dev.put(&gate),
            dev.put(&dout),
            dev.put(&want),
            dev.put(&want),
        );
        backend.relu2_forward(dev.view(o), dev.view(x), n, slope as f32);
        assert_close(
            &format!("relu2_forward slope {slope}"),
            &dev.get(o),
            &want,
            tol,
        )?;
        backend.relu2_backward(dev.view(dx), dev.view(dy), dev.view(x), n, slope as f32);
        assert_close(
            &format!("relu2_backward slope {slope}"),
            &dev.get(dx),
            &want_d,
            tol,
        )?;
    }
    let (cap, z) = (3.0, rounded(random(&mut rng, n, 12.0)));
    let mut want = vec![0.0; n];
    activation::softcap_forward(&mut want, &z, cap);
    let mut dev = Device::new(backend);
    let (x, dy, o, dx) = (dev.put(&z), dev.put(&dout), dev.put(&want), dev.put(&want));
    backend.softcap_forward(dev.view(o), dev.view(x), n, cap as f32);
    assert_close("softcap_forward", &dev.get(o), &want, tol)?;
    // The backward reads the capped output the backend itself produced.
    let capped: Vec<f64> = dev.get(o).iter().map(|&v| v as f64).collect();
    let mut want_d = vec![0.0; n];
    activation::softcap_backward(&mut want_d, &dout, &capped, cap);
    backend.softcap_backward(dev.view(dx), dev.view(dy), dev.view(o), n, cap as f32);
    assert_close("softcap_backward", &dev.get(dx), &want_d, tol)?;

    // broadcast scale: per channel (inner 1) and per head (inner D), overwrite and add.
    for (rows, groups, inner, mode) in [
        (5, 7, 1, Accumulate::Overwrite),
        (3, 4, 6, Accumulate::Add),
        (9, 1, 5, Accumulate::Overwrite),
    ] {
        let len = rows * groups * inner;
        let inp = rounded(random(&mut rng, len, 2.0));
        let sv = rounded(random(&mut rng, groups, 1.5));
        let dy = rounded(random(&mut rng, len, 1.0));
        let start = rounded(random(&mut rng, len, 1.0));
        let ds0 = rounded(random(&mut rng, groups, 1.0));
        let mut want = start.clone();
        scale::scale_forward(&mut want, &inp, &sv, inner, mode);
        let (mut want_dx, mut want_ds) = (start.clone(), ds0.clone());
        scale::scale_backward(&mut want_dx, &mut want_ds, &dy, &inp, &sv, inner, mode);
        let mut dev = Device::new(backend);
        let (x, sc, o, d, dx, ds) = (
            dev.put(&inp),
            dev.put(&sv),
            dev.put(&start),
            dev.put(&dy),
            dev.put(&start),
            dev.put(&ds0),
        );
        let what = format!("scale {rows}×{groups}×{inner} {mode:?}");
        backend.scale_forward(
            dev.view(o),
            dev.view(x),
            dev.view(sc),
            rows,
            groups,
            inner,
            mode,
        );
        assert_close(&format!("{what} forward"), &dev.get(o), &want, tol)?;
        let (dxv, dsv) = (dev.view(dx), dev.view(ds));
        let (dv, xv, sv) = (dev.view(d), dev.view(x), dev.view(sc));
        backend.scale_backward(dxv, dsv, dv, xv, sv, rows, groups, inner, mode);
        assert_close(&format!("{what} dinp"), &dev.get(dx), &want_dx, tol)?;
        assert_close(&format!("{what} dscale"), &dev.get(ds), &want_ds, tol)?;
    }

    // cross-entropy, with large logits so an unstabilised softmax would overflow.
    let (rows, vocab) = (4, 19);
    let targets = [0u32, 18, 5, 5];
    let logits = rounded(random(&mut rng, rows * vocab, 60.0));
    let (mut want_loss, mut want_lse) = (vec![0.0; rows], vec![0.0; rows]);
    xent::cross_entropy_forward(&mut want_loss, &mut want_lse, &logits, &targets, vocab);
    let mut want_dlogits = vec![0.0; logits.len()];
    xent::cross_entropy_backward(&mut want_dlogits, &logits, &want_lse, &targets, vocab, 0.25);
    let mut dev = Device::new(backend);
    let (z, l, s, dz) = (
        dev.put(&logits),
        dev.put(&want_loss),
        dev.put(&want_lse),
        dev.put(&logits),
    );
    backend.cross_entropy_forward(dev.view(l), dev.view(s), dev.view(z), &targets, vocab);
    assert_close("cross_entropy_forward", &dev.get(l), &want_loss, tol)?;
    backend.cross_entropy_backward(
        dev.view(dz),
        dev.view(z),
        dev.view(s),
        &targets,
        vocab,
        0.25,
    );
    assert_close("cross_entropy_backward", &dev.get(dz), &want_dlogits, tol)?;

    // AdamW (third step, so bias correction is not trivial) and the sum of squares.
    let n = 29;
    let params = rounded(random(&mut rng, n, 1.0));
    let grads = rounded(random(&mut rng, n, 1.0));
    let m0 = rounded(random(&mut rng, n, 0.1));
    let v0: Vec<f64> = rounded(random(&mut rng, n, 0.1).iter().map(|x| x.abs()).collect());
    let hp = AdamWStep {
        learning_rate: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.1,
        step: 3,
        grad_scale: 0.5,
    };
    let (mut want_p, mut want_m, mut want_v) = (params.clone(), m0.clone(), v0.clone());
    adamw::adamw_step(&mut want_p, &grads, &mut want_m, &mut want_v, &hp);
    let mut dev = Device::new(backend);
    let (p, g, m, v) = (
        dev.put(&params),
        dev.put(&grads),
        dev.put(&m0),
        dev.put(&v0),
    );
    backend.adamw_step(dev.view(p), dev.view(g), dev.view(m), dev.view(v), &hp);
    assert_close("adamw_step params", &dev.get(p), &want_p, tol)?;
    assert_close("adamw_step m", &dev.get(m), &want_m, tol)?;
    assert_close("adamw_step v", &dev.get(v), &want_v, tol)?;
    let want_ss = adamw::sum_squares(&grads);
    assert_close(
        "sum_squares",
        &[backend.sum_squares(dev.view(g)) as f32],
        &[want_ss],
        tol,
    )?;
    Ok(())
}

/// A PyTorch fixture written by `scripts/make_fixtures.py`.
pub struct Fixture {
    pub config: ModelConfig,
    pub adamw: AdamW,
    pub batch: usize,
    pub seq: usize,
    bytes: Vec<u8>,
    path: String,
}

impl Fixture {
    pub const VERSION: &'static str = "1";

    pub fn load(path: &Path) -> Result<Self> {
        let bytes = std::fs::read(path)
            .with_context(|| format!("cannot read fixture {}", path.display()))?;
        let (_, meta) = SafeTensors::read_metadata(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        let meta = meta
            .metadata()
            .clone()
            .ok_or_else(|| anyhow!("{}: no metadata", path.display()))?;
        let get = |key: &str| {
            meta.get(key)
                .ok_or_else(|| anyhow!("{}: metadata has no '{key}'", path.display()))
        };
        ensure!(
            get("fixture_version")? == Self::VERSION,
            "{}: fixture version {} (kiln reads {}); rerun scripts/make_fixtures.py",
            path.display(),
            get("fixture_version")?,
            Self::VERSION
        );
        let config: ModelConfig = serde_json::from_str(get("config")?)?;
        let adamw: serde_json::Value = serde_json::from_str(get("adamw")?)?;
        let f = |k: &str| {
            adamw[k]
                .as_f64()
                .map(|x| x as f32)
                .ok_or_else(|| anyhow!("adamw.{k} missing"))
        };
        let adamw = AdamW {
            learning_rate: f("learning_rate")?,
            beta1: f("beta1")?,
            beta2: f("beta2")?,
            eps: f("eps")?,
            weight_decay: f("weight_decay")?,
        };
        let mut fixture = Fixture {
            config,
            adamw,
            batch: 0,
            seq: 0,
            bytes,
            path: path.display().to_string(),
        };
        let shape = fixture.tensors()?.tensor("tokens")?.shape().to_vec();
        (fixture.batch, fixture.seq) = (shape[0], shape[1]);
        Ok(fixture)
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        Ok(SafeTensors::deserialize(&self.bytes)?)
    }

    /// A tensor as f64, whatever its stored float or integer type.
    pub fn tensor(&self, name: &str) -> Result<Vec<f64>> {
        let tensors = self.tensors()?;
        let t = tensors
            .tensor(name)
            .with_context(|| format!("{}: no tensor '{name}'", self.path))?;
        let data = t.data();
        Ok(match t.dtype() {
            Dtype::F32 => data
                .chunks_exact(4)
                .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            Dtype::F64 => data
                .chunks_exact(8)
                .map(|b| f64::from_le_bytes(b.try_into().unwrap()))
                .collect(),
            Dtype::I64 => data
                .chunks_exact(8)
                .map(|b| i64::from_le_bytes(b.try_into().unwrap()) as f64)
                .collect(),
            other => bail!(
                "{}: tensor '{name}' has unsupported dtype {other:?}",
                self.path
            ),
        })
    }

    pub fn tokens(&self, name: &str) -> Result<Vec<u32>> {
        Ok(self.tensor(name)?.into_iter().map(|x| x as u32).collect())
    }

    /// Loads the fixture's weights into a new model on `backend`.
    pub fn model<B: Backend>(&self, backend: B) -> Result<Model<B>> {
        let model = Model::new(backend, self.config.clone())?;
        for spec in &model.layout.specs {
            model.set_param(&spec.name, &to_f32(&self.tensor(&spec.name)?))?;
        }
        Ok(model)
    }
}

/// The whole model against a PyTorch fixture: logits, loss, every gradient, ten AdamW steps.
///
/// `tol` is the backend's kernel tolerance; the gradients and the AdamW trajectory compound
/// many kernels, so they get the looser tolerances given in the body.
pub fn check_fixture<B: Backend>(backend: B, path: &Path, tol: Tolerance) -> Result<()> {
    let fixture = Fixture::load(path)?;
    let name = path.file_name().unwrap().to_string_lossy().to_string();
    let preset_name = name
        .trim_start_matches("model_")
        .trim_end_matches(".safetensors");
    ensure!(
        ModelConfig::preset(preset_name)? == fixture.config,
        "{name}: the fixture's config differs from kiln's preset '{preset_name}'"
    );
    let tokens = fixture.tokens("tokens")?;
    let targets = fixture.tokens("targets")?;
    let mut model = fixture.model(backend)?;
    let acts = model.activations(fixture.batch, fixture.seq)?;

    let loss = model.forward(&acts, &tokens, Some(&targets)).unwrap();
    assert_close(
        &format!("{name} logits"),
        &model.download_logits(&acts),
        &fixture.tensor("logits")?,
        tol,
    )?;
    assert_close(
        &format!("{name} loss"),
        &[loss],
        &fixture.tensor("loss")?,
        tol,
    )?;

    model.zero_grad();
    model.backward(&acts, &tokens, &targets, 1.0);
    let grads = model.download_grads();
    // Gradients are sums over all 32 positions of products of several kernels' outputs; their
    // rounding error scales with the largest gradient, not each element, hence the atol.
    let grad_tol = Tolerance {
        atol: tol.atol * 10.0,
        rtol: tol.rtol * 10.0,
    };
    for spec in &model.layout.specs {
        let got = &grads[spec.region.offset..][..spec.region.len];
        assert_close(
            &format!("{name} grad.{}", spec.name),
            got,
            &fixture.tensor(&format!("grad.{}", spec.name))?,
            grad_tol,
        )?;
    }

    // Ten AdamW steps on the same batch. Adam divides by sqrt(v), so a gradient near zero
    // turns f32 noise into a full-size step: the trajectory drifts further than one forward.
    let want = fixture.tensor("adamw_losses")?;
    let mut got = Vec::new();
    for _ in 0..want.len() {
        model.zero_grad();
        got.push(model.forward(&acts, &tokens, Some(&targets)).unwrap());
        model.backward(&acts, &tokens, &targets, 1.0);
        model.adamw_step(&fixture.adamw, 1.0);
    }
    let trajectory_tol = Tolerance {
        atol: tol.atol * 100.0,
        rtol: tol.rtol * 10.0,
    };
    assert_close(&format!("{name} adamw losses"), &got, &want, trajectory_tol)?;
    Ok(())
}

/// Twenty AdamW steps of a tiny model on a repeating token pattern: the loss must fall well
/// below its starting value (ln V for a fresh model). Returns the losses.
pub fn check_training_smoke<B: Backend>(backend: B, preset: &str) -> Result<Vec<f32>> {
    let config = ModelConfig::preset(preset)?;
    let vocab = config.vocab_size as u32;
    let mut model = Model::new(backend, config)?;
    model.init_random(42);
    let (batch, seq) = (4, 16);
    let acts = model.activations(batch, seq)?;
    // Each sequence counts up from a random start: next token = previous + 1 (mod V), a rule
    // the model can learn in a few steps, unlike noise.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let hp = AdamW {
        learning_rate: 1e-2,
        beta1: 0.9,
        beta2: 0.95,
        eps: 1e-8,
        weight_decay: 0.0,
    };
    let mut losses = Vec::new();
    for _ in 0..20 {
        let mut tokens = Vec::new();
        let mut targets = Vec::new();
        for _ in 0..batch {
            let start: u32 = rng.random_range(0..vocab);
            tokens.extend((0..seq as u32).map(|i| (start + i) % vocab));
            targets.extend((0..seq as u32).map(|i| (start + i + 1) % vocab));
        }
        model.zero_grad();
        let loss = model.forward(&acts, &tokens, Some(&targets)).unwrap();
        ensure!(loss.is_finite(), "{preset}: loss became {loss}");
        model.backward(&acts, &tokens, &targets, 1.0);
        model.adamw_step(&hp, 1.0);
        losses.push(loss);
    }
    let first = losses[0];
    let last_mean = losses[15..].iter().sum::<f32>() / 5.0;
    ensure!(
        last_mean < 0.7 * first,
        "{preset}: loss did not fall enough in 20 steps: {first:.3} -> {last_mean:.3} (losses {losses:?})"
    );
    Ok(losses)
}
