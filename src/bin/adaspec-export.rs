//! `adaspec-export --gguf -i CHECKPOINT -o draft.gguf --tokenizer-from TARGET.gguf [--type T]`:
//! turns a trained draft into a GGUF that llama.cpp runs as a draft for TARGET.

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
    /// Checkpoint to export: NAME.safetensors with config.json next to it, or a GGUF.
    #[arg(short, long)]
    input: PathBuf,
    /// Destination GGUF; written through a temp file, never left half-written.
    #[arg(short, long)]
    output: PathBuf,
    /// Target model whose tokenizer.* metadata is copied verbatim into the draft.
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
    adaspec::train::export_gguf(&cli.input, &cli.output, &cli.tokenizer_from, ty)
        .with_context(|| format!("exporting {} to {}", cli.input.display(), cli.output.display()))?;
    println!("wrote {} ({})", cli.output.display(), ty.name());
    Ok(())
}
