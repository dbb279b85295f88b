//! `adaspec head …`: heads in the EAGLE-3 layout for a user's own GGUF target.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};

use super::data::{read_records, BadLines};
use super::export::ExportType;
use super::head::{head_config_for, init_head, save_head, top_vocab, write_head_gguf};
use crate::backend::{Model, ModelParams};

/// `adaspec head …`
#[derive(Debug, Args)]
pub struct HeadArgs {
    #[command(subcommand)]
    pub command: HeadCommand,
}

/// Subcommands of `adaspec head`.
#[derive(Debug, Subcommand)]
pub enum HeadCommand {
    /// Make an untrained head shaped for a target (EAGLE-3 layout, llama.cpp's `eagle3` GGUF).
    Init(HeadInitArgs),
}

/// `adaspec head init --target T.gguf [--data D.jsonl] [--draft-vocab N] [--ffn N] -o head.gguf`
#[derive(Debug, Args)]
pub struct HeadInitArgs {
    /// The target GGUF the head drafts for (its hidden size, heads, RoPE base, layer count,
    /// tokenizer and LM head are read from it).
    #[arg(long)]
    pub target: PathBuf,
    /// JSONL data whose token frequencies choose the reduced draft vocabulary (the formats
    /// `adaspec train` reads; prompts and responses are both counted).
    #[arg(long, num_args = 1..)]
    pub data: Vec<PathBuf>,
    /// Size of the reduced draft vocabulary (EAGLE-3 uses 32000): the most frequent target
    /// tokens of --data, with the head's own LM head over them initialised from the target's.
    /// 0 = the target's whole vocabulary and its LM head, shared at run time.
    #[arg(long, default_value_t = 32000)]
    pub draft_vocab: usize,
    /// FFN width of the head's decoder layer (default: the target's).
    #[arg(long)]
    pub ffn: Option<usize>,
    /// Weight type of the GGUF: f32, f16, q8_0, q4_0 or q4_k (norms stay f32).
    #[arg(long = "type", default_value = "f16")]
    pub ty: String,
    /// Seed of the initial weights.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output GGUF.
    #[arg(short, long)]
    pub output: PathBuf,
    /// Also save a training checkpoint (safetensors, config in NAME.head.json).
    #[arg(long)]
    pub checkpoint: Option<PathBuf>,
    /// Print a JSON summary instead of text.
    #[arg(long)]
    pub json: bool,
}

/// Runs `adaspec head …`.
pub fn run(args: &HeadArgs) -> anyhow::Result<()> {
    match &args.command {
        HeadCommand::Init(a) => run_init(a),
    }
}

fn run_init(a: &HeadInitArgs) -> anyhow::Result<()> {
    let ty: ExportType = a.ty.parse()?;
    let draft_vocab = if a.draft_vocab == 0 {
        Vec::new()
    } else {
        if a.data.is_empty() {
            anyhow::bail!(
                "--draft-vocab {} needs --data to count token frequencies (or --draft-vocab 0)",
                a.draft_vocab
            );
        }
        let target = Model::load(&a.target, &ModelParams::default())
            .with_context(|| format!("loading the tokenizer of {}", a.target.display()))?;
        let (records, _) = read_records(&a.data, false, BadLines::Stop)?;
        let mut freq = vec![0u64; target.n_vocab()];
        for r in &records {
            for text in std::iter::once(&r.prompt).chain(r.response.iter()) {
                for t in target.tokenize(text, false, false)? {
                    if let Some(f) = freq.get_mut(t as usize) {
                        *f += 1;
                    }
                }
            }
        }
        let seen = freq.iter().filter(|&&f| f > 0).count();
        if a.draft_vocab >= target.n_vocab() {
            anyhow::bail!(
                "--draft-vocab {} is not below the target's vocabulary ({}); use 0 for the whole vocabulary",
                a.draft_vocab,
                target.n_vocab()
            );
        }
        if seen < a.draft_vocab {
            tracing::warn!(
                "the data holds {seen} distinct tokens, fewer than --draft-vocab {}: the rest are the lowest unseen ids",
                a.draft_vocab
            );
        }
        top_vocab(&freq, a.draft_vocab)
    };
    let cfg = head_config_for(&a.target, a.ffn, draft_vocab)?;
    let weights = init_head(&cfg, &a.target, a.seed)?;
    write_head_gguf(&cfg, &weights, &a.output, &a.target, ty)?;
    if let Some(cp) = &a.checkpoint {
        save_head(cp, &cfg, &weights)?;
    }
    if a.json {
        let v = serde_json::json!({
            "output": a.output,
            "checkpoint": a.checkpoint,
            "type": ty.name(),
            "hidden_size": cfg.hidden_size,
            "intermediate_size": cfg.intermediate_size,
            "target_layers": cfg.target_layers,
            "draft_vocab": cfg.draft_vocab.len(),
            "parameters": cfg.n_params(),
        });
        println!("{v}");
    } else {
        println!(
            "wrote {} ({}, hidden {}, FFN {}, target layers {:?}, draft vocabulary {}, {:.1}M parameters)",
            a.output.display(),
            ty.name(),
            cfg.hidden_size,
            cfg.intermediate_size,
            cfg.target_layers,
            if cfg.draft_vocab.is_empty() { "the target's".to_string() } else { cfg.draft_vocab.len().to_string() },
            cfg.n_params() as f64 / 1e6
        );
    }
    Ok(())
}
