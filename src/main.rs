//! The `kiln` command line.

use anyhow::Result;
use clap::{Parser, Subcommand};

use kiln::config::ModelConfig;
use kiln::model::ParamLayout;

#[derive(Parser)]
#[command(
    name = "kiln",
    version,
    about = "Train small language models from scratch, fast, on the CPU"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Inspect model configurations.
    Model {
        #[command(subcommand)]
        command: ModelCommand,
    },
}

#[derive(Subcommand)]
enum ModelCommand {
    /// Parameter count with a per-tensor breakdown.
    Info {
        /// A preset name (stories15m, stories42m, stories110m, qwen3-0.6b, tiny-mha, tiny-gqa)
        /// or a JSON config file.
        model: String,
        /// Print the configuration as JSON as well.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> Result<()> {
    match Cli::parse().command {
        Command::Model {
            command: ModelCommand::Info { model, json },
        } => model_info(&model, json),
    }
}

/// Groups a number's digits in threes: 15191712 → "15,191,712".
fn grouped(n: usize) -> String {
    let digits = n.to_string();
    let mut out = String::new();
    for (i, ch) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i) % 3 == 0 {
            out.push(',');
        }
        out.push(ch);
    }
    out
}

fn model_info(spec: &str, json: bool) -> Result<()> {
    let config = ModelConfig::from_preset_or_file(spec)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&config)?);
    }
    let layout = ParamLayout::new(&config);
    println!("{:<48} {:>16} {:>14}", "tensor", "shape", "parameters");
    // One line per tensor of block 0, then the remaining blocks summarised: 28 copies of the same
    // nine lines help nobody.
    for spec in &layout.specs {
        let in_later_block =
            spec.name.starts_with("model.layers.") && !spec.name.starts_with("model.layers.0.");
        if in_later_block {
            continue;
        }
        let shape = format!("{:?}", spec.shape);
        println!(
            "{:<48} {:>16} {:>14}",
            spec.name,
            shape,
            grouped(spec.region.len)
        );
    }
    let per_block: usize = layout
        .specs
        .iter()
        .filter(|s| s.name.starts_with("model.layers.0."))
        .map(|s| s.region.len)
        .sum();
    let blocks = config.n_layers;
    println!(
        "{:<48} {:>16} {:>14}",
        format!("model.layers.1..{} (same as layer 0)", blocks - 1),
        format!("{} × block", blocks.saturating_sub(1)),
        grouped(per_block * blocks.saturating_sub(1))
    );
    let total = layout.total_len();
    let embedding = layout.embedding.len;
    println!();
    println!("parameters:                  {:>14}", grouped(total));
    println!(
        "  without the embedding:     {:>14}",
        grouped(total - embedding)
    );
    println!(
        "  classifier:                {}",
        if config.tie_embeddings {
            "tied to the embedding (counted once)"
        } else {
            "separate lm_head"
        }
    );
    Ok(())
}
