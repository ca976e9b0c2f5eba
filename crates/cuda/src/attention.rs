//! Causal attention's launches (kernels/attention.cu): the forward, the flash-style backward
//! (dq with each row's delta, then dk and dv), and KV-cache decoding.

use kiln_core::backend::{AttentionShape, Backend, DecodeShape, Qkv};

use super::{Arg::*, CudaBackend, MAX_HEAD_DIM, V};

/// Rows per block of the attention kernels (`ROWS_PER_BLOCK` in kernels/attention.cu) and
/// their tile of keys (`TILE`).
const ATTENTION_ROWS: usize = 4;
const ATTENTION_TILE: usize = 32;

impl CudaBackend {
    pub(crate) fn attention_forward_on_device(
        &self,
        out: V,
        saved: V,
        inputs: Qkv<CudaBackend>,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        self.check_attention(s, q, k, v);
        assert_eq!(saved.len(), self.attention_saved_len(s));
        if s.seq == 0 || s.batch == 0 {
            return;
        }
        let grid = (
            s.seq.div_ceil(ATTENTION_ROWS) as u32,
            (s.batch * s.heads) as u32,
            1,
        );
        self.launch(
            "attention_forward",
            grid,
            (32 * ATTENTION_ROWS) as u32,
            attention_shared(s.head_dim),
            &[
                self.f(out),
                self.f(saved),
                self.f(q),
                self.f(k),
                self.f(v),
                Int(s.seq as i64),
                Int(s.heads as i64),
                Int(s.kv_heads as i64),
                Int(s.head_dim as i64),
            ],
        );
    }

    #[allow(clippy::too_many_arguments)]
    pub(crate) fn attention_backward_on_device(
        &self,
        grads: Qkv<CudaBackend>,
        dout: V,
        inputs: Qkv<CudaBackend>,
        saved: V,
        s: AttentionShape,
    ) {
        let Qkv { q, k, v } = inputs;
        self.check_attention(s, q, k, v);
        if s.seq == 0 || s.batch == 0 {
            return;
        }
        let rows = s.batch * s.heads * s.seq;
        let delta = self.scratch("attention_delta", rows * 4);
        let dims = [
            Int(s.seq as i64),
            Int(s.heads as i64),
            Int(s.kv_heads as i64),
            Int(s.head_dim as i64),
        ];
        let shared = attention_shared(s.head_dim);
        let block = (32 * ATTENTION_ROWS) as u32;
        let blocks = s.seq.div_ceil(ATTENTION_ROWS) as u32;
        let mut args = vec![
            self.f(grads.q),
            Ptr(delta),
            self.f(dout),
            self.f(q),
            self.f(k),
            self.f(v),
            self.f(saved),
        ];
        args.extend(dims);
        self.launch(
            "attention_backward_dq",
            (blocks, (s.batch * s.heads) as u32, 1),
            block,
            shared,
            &args,
        );
        let mut args = vec![
            self.f(grads.k),
            self.f(grads.v),
            self.f(dout),
            self.f(q),
            self.f(k),
            self.f(v),
            self.f(saved),
            Ptr(delta),
        ];
        args.extend(dims);
        self.launch(
            "attention_backward_dkdv",
            (blocks, (s.batch * s.kv_heads) as u32, 1),
            block,
            shared,
            &args,
        );
    }

    pub(crate) fn attention_decode_on_device(
        &self,
        out: V,
        q: V,
        k_cache: V,
        v_cache: V,
        s: DecodeShape,
    ) {
        assert!(
            s.head_dim <= MAX_HEAD_DIM,
            "attention_decode: head_dim {}",
            s.head_dim
        );
        assert_eq!(q.len(), s.batch * s.heads * s.head_dim);
        assert_eq!(
            k_cache.len(),
            s.batch * s.capacity * s.kv_heads * s.head_dim
        );
        let count = s.batch * s.heads;
        self.warps(
            "attention_decode",
            count,
            &[
                self.f(out),
                self.f(q),
                self.f(k_cache),
                self.f(v_cache),
                Int(s.len as i64),
                Int(s.capacity as i64),
                Int(s.heads as i64),
                Int(s.kv_heads as i64),
                Int(s.head_dim as i64),
                Int(count as i64),
            ],
        );
    }

    fn check_attention(&self, s: AttentionShape, q: V, k: V, v: V) {
        assert!(
            s.head_dim <= MAX_HEAD_DIM,
            "attention: head_dim {} over {MAX_HEAD_DIM}",
            s.head_dim
        );
        assert!(
            s.kv_heads > 0 && s.heads.is_multiple_of(s.kv_heads),
            "attention: heads {} over {}",
            s.heads,
            s.kv_heads
        );
        let rows = s.batch * s.seq;
        assert_eq!(
            (q.len(), k.len(), v.len()),
            (
                rows * s.heads * s.head_dim,
                rows * s.kv_heads * s.head_dim,
                rows * s.kv_heads * s.head_dim
            )
        );
    }
}

/// Dynamic shared memory of the attention kernels: two tiles of TILE × (D + 1) floats.
fn attention_shared(head_dim: usize) -> u32 {
    (2 * ATTENTION_TILE * (head_dim + 1) * 4) as u32
}
