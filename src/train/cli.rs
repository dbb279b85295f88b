//! Command-line front ends of the trainer's model tools (`adaspec draft init`), as clap
//! argument structs plus `run` functions that `src/main.rs` wires in. Prints only results.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::gguf_import::{
    config_from_gguf, is_gguf_file, load_any, load_gguf_blocks, read_gguf_content, save_checkpoint,
};
use super::model::{tie_head, untie_head};
use super::prune::{even_layers, parse_layers, prune};

/// `adaspec draft …`
#[derive(Debug, Args)]
pub struct DraftArgs {
    #[command(subcommand)]
    pub command: DraftCommand,
}

/// Subcommands of `adaspec draft`.
#[derive(Debug, Subcommand)]
pub enum DraftCommand {
    /// Make a layer-pruned draft from a bigger model (keeps embeddings, final norm, LM head).
    Init(DraftInitArgs),
}

/// `adaspec draft init --from MODEL.gguf (--layers 0,1,2,23 | --keep-layers N) -o draft.safetensors`
#[derive(Debug, Args)]
pub struct DraftInitArgs {
    /// Source model: a GGUF (any quantization; dequantized to f32) or a safetensors checkpoint.
    #[arg(long)]
    pub from: PathBuf,
    /// Blocks to keep, comma separated and increasing, e.g. 0,1,2,23.
    #[arg(long, conflicts_with = "keep_layers", required_unless_present = "keep_layers")]
    pub layers: Option<String>,
    /// Keep N blocks evenly spaced, always including the first and the last.
    #[arg(long)]
    pub keep_layers: Option<usize>,
    /// Output checkpoint (safetensors); `config.json` is written next to it.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Tie the LM head to the embeddings (drops the source's separate head, if any).
    #[arg(long, conflicts_with = "untie_head")]
    pub tie_head: bool,
    /// Give the draft its own LM head (a copy of the embeddings when the source is tied).
    #[arg(long)]
    pub untie_head: bool,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adaspec draft …`.
pub fn run(args: &DraftArgs) -> anyhow::Result<()> {
    match &args.command {
        DraftCommand::Init(a) => run_init(a),
    }
}

fn pick_layers(args: &DraftInitArgs, n_layer: usize) -> anyhow::Result<Vec<usize>> {
    Ok(match (&args.layers, args.keep_layers) {
        (Some(s), _) => parse_layers(s)?,
        (None, Some(n)) => even_layers(n_layer, n)?,
        (None, None) => anyhow::bail!("give --layers LIST or --keep-layers N"),
    })
}

/// Runs `adaspec draft init`.
pub fn run_init(args: &DraftInitArgs) -> anyhow::Result<()> {
    let is_gguf = is_gguf_file(&args.from);
    // A GGUF source is read block-selectively: the blocks a draft drops are never loaded.
    let (src_cfg, layers, mut dcfg, mut dw) = if is_gguf {
        let (content, _) = read_gguf_content(&args.from)?;
        let src_cfg = config_from_gguf(&content, &args.from)?;
        drop(content);
        let layers = pick_layers(args, src_cfg.num_hidden_layers)?;
        let (c, w) =
            load_gguf_blocks(&args.from, Some(&layers)).with_context(|| format!("loading {}", args.from.display()))?;
        (src_cfg, layers, c, w)
    } else {
        let (cfg, weights) = load_any(&args.from).with_context(|| format!("loading {}", args.from.display()))?;
        let layers = pick_layers(args, cfg.num_hidden_layers)?;
        let (c, w) = prune(&cfg, &weights, &layers)?;
        (cfg, layers, c, w)
    };
    if args.tie_head {
        tie_head(&mut dcfg, &mut dw);
    } else if args.untie_head {
        untie_head(&mut dcfg, &mut dw)?;
    }
    save_checkpoint(&args.output, &dcfg, &dw).with_context(|| format!("writing {}", args.output.display()))?;
    if args.json {
        let v = serde_json::json!({
            "output": args.output,
            "from": args.from,
            "layers": layers,
            "source_layers": src_cfg.num_hidden_layers,
            "n_params": dcfg.n_params(),
            "config": dcfg,
        });
        println!("{}", serde_json::to_string_pretty(&v)?);
    } else {
        println!(
            "wrote {} ({} arch, blocks {:?} of {}, {:.1}M parameters, head {})",
            args.output.display(),
            dcfg.arch.name(),
            layers,
            src_cfg.num_hidden_layers,
            dcfg.n_params() as f64 / 1e6,
            if dcfg.tie_word_embeddings { "tied" } else { "untied" }
        );
    }
    Ok(())
}
