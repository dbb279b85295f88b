//! `adaspec-export --gguf -i CHECKPOINT -o draft.gguf --tokenizer-from TARGET.gguf [--type T]`:
//! turns a trained draft into a GGUF that llama.cpp runs as a draft for TARGET.
//! `adaspec-export --gguf --head -i HEAD.safetensors -o head.gguf --tokenizer-from TARGET.gguf`:
//! the same for a feature-level head (`adaspec head train`), as llama.cpp's `eagle3` GGUF.

use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;

use adaspec::train::ExportType;

/// Export a draft checkpoint for llama.cpp.
#[derive(Debug, Parser)]
#[command(name = "adaspec-export", version, about)]
struct Cli {
    /// Write a GGUF (the only format so far; required).
    #[arg(long, required = true)]
    gguf: bool,
    /// The checkpoint is an EAGLE-3-layout head (`adaspec head init --checkpoint` or `head
    /// train`: NAME.safetensors with NAME.head.json): write llama.cpp's `eagle3` GGUF, which
    /// stock llama.cpp drafts with (`--spec-type draft-eagle3`) and `adaspec --head` loads.
    #[arg(long)]
    head: bool,
    /// Checkpoint to export: NAME.safetensors with config.json next to it, or a GGUF (with
    /// --head: a head checkpoint).
    #[arg(short, long)]
    input: PathBuf,
    /// Destination GGUF; written through a temp file, never left half-written.
    #[arg(short, long)]
    output: PathBuf,
    /// Target model whose tokenizer.* metadata is copied verbatim into the draft (with --head:
    /// the target the head drafts for; its vocabulary must be the head's target vocabulary).
    #[arg(long)]
    tokenizer_from: PathBuf,
    /// Weight type (norms and biases stay f32).
    #[arg(long = "type", value_enum, default_value_t = ExportType::F16)]
    ty: ExportType,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match export(&cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn export(cli: &Cli) -> anyhow::Result<()> {
    let _ = cli.gguf;
    let ty = cli.ty;
    let head_json = adaspec::train::head::head_config_path(&cli.input);
    if cli.head {
        let (cfg, weights) = adaspec::train::head::load_head(&cli.input)
            .with_context(|| format!("loading the head checkpoint {}", cli.input.display()))?;
        adaspec::train::head::write_head_gguf(&cfg, &weights, &cli.output, &cli.tokenizer_from, ty)
            .with_context(|| format!("exporting the head {} to {}", cli.input.display(), cli.output.display()))?;
        println!("wrote {} (eagle3 head, {})", cli.output.display(), ty.name());
        return Ok(());
    }
    if head_json.is_file() {
        anyhow::bail!(
            "{} is a head checkpoint ({} is next to it): export it with --head",
            cli.input.display(),
            head_json.display()
        );
    }
    adaspec::train::export_gguf(&cli.input, &cli.output, &cli.tokenizer_from, ty)
        .with_context(|| format!("exporting {} to {}", cli.input.display(), cli.output.display()))?;
    println!("wrote {} ({})", cli.output.display(), ty.name());
    Ok(())
}
