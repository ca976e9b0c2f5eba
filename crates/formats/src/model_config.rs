//! Model configs from files: a preset name, or a JSON file (the core parses and validates;
//! this module reads the file and names it in every error).

use std::path::Path;

use anyhow::{bail, Context, Result};
use kiln_core::config::{ModelConfig, PRESETS};

/// Reads a JSON config file and validates it.
pub fn from_file(path: &Path) -> Result<ModelConfig> {
    let text = std::fs::read_to_string(path)
        .with_context(|| format!("cannot read model config {}", path.display()))?;
    ModelConfig::from_json(&text)
        .with_context(|| format!("invalid model config in {}", path.display()))
}

/// A preset name, or else a path to a JSON config file.
pub fn from_preset_or_file(spec: &str) -> Result<ModelConfig> {
    if PRESETS.contains(&spec) {
        return Ok(ModelConfig::preset(spec)?);
    }
    let path = Path::new(spec);
    if path.exists() {
        return from_file(path);
    }
    bail!(
        "'{spec}' is neither a model preset ({}) nor an existing config file",
        PRESETS.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_config_file_with_an_unknown_field_names_the_file_and_field() {
        let dir = std::env::temp_dir().join(format!("kiln-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("bad.json");
        let mut value = serde_json::to_value(ModelConfig::preset("tiny-mha").unwrap()).unwrap();
        value["n_experts"] = 8.into();
        std::fs::write(&path, value.to_string()).unwrap();
        let message = format!("{:#}", from_file(&path).unwrap_err());
        assert!(
            message.contains("bad.json") && message.contains("n_experts"),
            "{message}"
        );
        std::fs::remove_dir_all(dir).unwrap();
    }
}
