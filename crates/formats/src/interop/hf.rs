//! Hugging Face model directories (`config.json`, `model.safetensors` or sharded
//! `model-0000N-of-0000M.safetensors` with `model.safetensors.index.json`, `tokenizer.json`)
//! for `LlamaForCausalLM` and `Qwen3ForCausalLM`, in and out.
//!
//! kiln's tensor names and RoPE convention (half-split) are Hugging Face's, so weights move
//! across unchanged; only dtypes are converted (bf16 and f16 widen to f32 exactly). Anything
//! kiln's model does not compute — biases, rope scaling, sliding windows, other activations —
//! is refused by name rather than silently ignored.

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use safetensors::{Dtype, SafeTensors};
use serde_json::{json, Value};

use crate::fsutil::write_atomic;
use kiln_core::bytes::{le_floats, FloatWidth};
use kiln_core::config::ModelConfig;
use kiln_core::layout::ParamLayout;

/// The architectures kiln reads and writes.
const LLAMA: &str = "LlamaForCausalLM";
const QWEN3: &str = "Qwen3ForCausalLM";

/// Reads and validates `config.json`.
pub fn read_config(dir: &Path) -> Result<ModelConfig> {
    let path = dir.join("config.json");
    let text =
        fs::read_to_string(&path).with_context(|| format!("cannot read {}", path.display()))?;
    let v: Value =
        serde_json::from_str(&text).with_context(|| format!("{} is not JSON", path.display()))?;
    let p = path.display();
    let arch = v["architectures"][0].as_str().unwrap_or("<none>");
    ensure!(
        arch == LLAMA || arch == QWEN3,
        "{p}: architecture {arch} is not supported (kiln reads {LLAMA} and {QWEN3})"
    );
    let int = |key: &str| -> Result<usize> {
        v[key]
            .as_u64()
            .map(|x| x as usize)
            .with_context(|| format!("{p}: missing or non-integer field '{key}'"))
    };
    // Fields whose non-default values change the computation in ways kiln does not implement.
    let refuse = |key: &str, why: &str| -> Result<()> {
        bail!("{p}: field '{key}' = {} is not supported: {why}", v[key])
    };
    if v["hidden_act"].as_str().is_some_and(|a| a != "silu") {
        refuse("hidden_act", "kiln's MLP is SwiGLU (silu)")?;
    }
    for key in ["attention_bias", "mlp_bias"] {
        if v[key].as_bool() == Some(true) {
            refuse(key, "kiln's projections have no biases")?;
        }
    }
    if !v["rope_scaling"].is_null() {
        refuse("rope_scaling", "kiln implements plain RoPE")?;
    }
    if v["rope_parameters"]["rope_type"]
        .as_str()
        .is_some_and(|t| t != "default")
    {
        refuse("rope_parameters", "kiln implements plain RoPE")?;
    }
    if v["use_sliding_window"].as_bool() == Some(true) {
        refuse("use_sliding_window", "kiln's attention is full causal")?;
    }
    if v["layer_types"]
        .as_array()
        .is_some_and(|t| t.iter().any(|l| l != "full_attention"))
    {
        refuse(
            "layer_types",
            "kiln's attention is full causal in every layer",
        )?;
    }
    if v["attention_dropout"].as_f64().is_some_and(|d| d != 0.0) {
        refuse("attention_dropout", "kiln does not train with dropout")?;
    }
    let heads = int("num_attention_heads")?;
    let dim = int("hidden_size")?;
    let rope_theta = v["rope_theta"]
        .as_f64()
        .or(v["rope_parameters"]["rope_theta"].as_f64())
        .unwrap_or(10000.0);
    let config = ModelConfig {
        dim,
        n_layers: int("num_hidden_layers")?,
        n_heads: heads,
        n_kv_heads: v["num_key_value_heads"]
            .as_u64()
            .map_or(heads, |x| x as usize),
        // (0 heads: validate names the field.)
        head_dim: v["head_dim"]
            .as_u64()
            .map_or(dim.checked_div(heads).unwrap_or(0), |x| x as usize),
        hidden_dim: int("intermediate_size")?,
        vocab_size: int("vocab_size")?,
        max_seq_len: v["max_position_embeddings"]
            .as_u64()
            .map_or(2048, |x| x as usize),
        rope_theta,
        norm_eps: v["rms_norm_eps"].as_f64().unwrap_or(1e-6),
        qk_norm: arch == QWEN3,
        tie_embeddings: v["tie_word_embeddings"].as_bool().unwrap_or(false),
        arch: Default::default(),
    };
    config
        .validate()
        .with_context(|| format!("{p}: the model shape is invalid"))?;
    Ok(config)
}

/// Widens one stored tensor to f32.
fn to_f32(dtype: Dtype, data: &[u8], name: &str, file: &Path) -> Result<Vec<f32>> {
    Ok(match dtype {
        Dtype::F32 => le_floats(data, FloatWidth::F32),
        Dtype::BF16 => le_floats(data, FloatWidth::BF16),
        Dtype::F16 => le_floats(data, FloatWidth::F16),
        other => bail!(
            "{}: tensor '{name}' has dtype {other:?}; kiln reads F32, BF16 and F16",
            file.display()
        ),
    })
}

/// The safetensors files of a model directory: the index's shards, or `model.safetensors`.
fn weight_files(dir: &Path) -> Result<Vec<String>> {
    let index = dir.join("model.safetensors.index.json");
    if index.exists() {
        let v: Value = serde_json::from_str(&fs::read_to_string(&index)?)
            .with_context(|| format!("{} is not JSON", index.display()))?;
        let map = v["weight_map"]
            .as_object()
            .with_context(|| format!("{}: no weight_map", index.display()))?;
        let mut files: Vec<String> = map
            .values()
            .filter_map(|f| f.as_str().map(String::from))
            .collect();
        files.sort();
        files.dedup();
        return Ok(files);
    }
    ensure!(
        dir.join("model.safetensors").exists(),
        "{}: no model.safetensors or model.safetensors.index.json",
        dir.display()
    );
    Ok(vec!["model.safetensors".into()])
}

/// Reads a Hugging Face model directory into kiln's layout.
pub fn read(dir: &Path) -> Result<(ModelConfig, Vec<f32>)> {
    let config = read_config(dir)?;
    let files = weight_files(dir)?;
    // The weights are allocated only once the files could hold them.
    let mut bytes = 0;
    for file in &files {
        let path = dir.join(file);
        let meta =
            fs::metadata(&path).with_context(|| format!("cannot read {}", path.display()))?;
        bytes += meta.len() as usize;
    }
    super::check_fits(&config, bytes, &dir.join("config.json"))?;
    let layout = ParamLayout::new(&config);
    let mut weights = vec![0f32; layout.total_len()];
    let mut seen = vec![false; layout.specs.len()];
    for file in files {
        let path = dir.join(&file);
        let bytes = fs::read(&path).with_context(|| format!("cannot read {}", path.display()))?;
        let tensors = SafeTensors::deserialize(&bytes)
            .with_context(|| format!("{} is not a safetensors file", path.display()))?;
        for (name, t) in tensors.tensors() {
            let Some(i) = layout.specs.iter().position(|s| s.name == name) else {
                // A tied model may still store lm_head; HF ignores it then, and so does kiln.
                if name == "lm_head.weight" && config.tie_embeddings {
                    continue;
                }
                bail!(
                    "{}: tensor '{name}' has no place in a {} model (unsupported feature?)",
                    path.display(),
                    if config.qk_norm { QWEN3 } else { LLAMA }
                );
            };
            let spec = &layout.specs[i];
            ensure!(
                t.shape() == spec.shape.as_slice(),
                "{}: '{name}' has shape {:?}, config.json implies {:?}",
                path.display(),
                t.shape(),
                spec.shape
            );
            let values = to_f32(t.dtype(), t.data(), &name, &path)?;
            weights[spec.region.offset..][..spec.region.len].copy_from_slice(&values);
            seen[i] = true;
        }
    }
    if let Some(i) = seen.iter().position(|s| !s) {
        bail!(
            "{}: the weights have no tensor '{}'",
            dir.display(),
            layout.specs[i].name
        );
    }
    Ok((config, weights))
}

/// Writes `config.json` and `model.safetensors` (f32: lossless) for `transformers`.
pub fn write(dir: &Path, config: &ModelConfig, weights: &[f32], bos: Option<u32>) -> Result<()> {
    fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let (arch, model_type) = if config.qk_norm {
        (QWEN3, "qwen3")
    } else {
        (LLAMA, "llama")
    };
    let mut cfg = json!({
        "architectures": [arch],
        "model_type": model_type,
        "hidden_size": config.dim,
        "intermediate_size": config.hidden_dim,
        "num_hidden_layers": config.n_layers,
        "num_attention_heads": config.n_heads,
        "num_key_value_heads": config.n_kv_heads,
        "head_dim": config.head_dim,
        "vocab_size": config.vocab_size,
        "max_position_embeddings": config.max_seq_len,
        "rope_theta": config.rope_theta,
        "rms_norm_eps": config.norm_eps,
        "tie_word_embeddings": config.tie_embeddings,
        "hidden_act": "silu",
        "attention_bias": false,
        "attention_dropout": 0.0,
        "rope_scaling": null,
        "torch_dtype": "float32",
        "use_cache": true,
    });
    if !config.qk_norm {
        cfg["mlp_bias"] = false.into();
    } else {
        cfg["use_sliding_window"] = false.into();
    }
    if let Some(bos) = bos {
        cfg["bos_token_id"] = bos.into();
    }
    write_atomic(
        &dir.join("config.json"),
        serde_json::to_string_pretty(&cfg)?.as_bytes(),
    )?;

    let layout = ParamLayout::new(config);
    let views: Vec<(String, safetensors::tensor::TensorView)> = layout
        .specs
        .iter()
        .map(|s| {
            let values = &weights[s.region.offset..][..s.region.len];
            // SAFETY: f32 has no padding; kiln runs on little-endian hosts only.
            let bytes = unsafe {
                std::slice::from_raw_parts(values.as_ptr() as *const u8, values.len() * 4)
            };
            Ok((
                s.name.clone(),
                safetensors::tensor::TensorView::new(Dtype::F32, s.shape.clone(), bytes)?,
            ))
        })
        .collect::<Result<_>>()?;
    let metadata: BTreeMap<String, String> = [("format".to_string(), "pt".to_string())].into();
    let bytes = safetensors::serialize(views, Some(metadata.into_iter().collect()))?;
    write_atomic(&dir.join("model.safetensors"), &bytes)
}
