//! Writes a tiny random-weight target GGUF (for trying the head tools without the real models).
//!
//!     cargo run --release --example tiny_target -- OUT.gguf [llama|qwen2] [N_LAYER]
use adaspec::tiny_model::{write_tiny_model, TinyArch, TinyModelConfig};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let out = std::env::args().nth(1).ok_or("usage: tiny_target OUT.gguf [llama|qwen2] [N_LAYER]")?;
    let arch = match std::env::args().nth(2).as_deref() {
        Some("qwen2") => TinyArch::Qwen2,
        _ => TinyArch::Llama,
    };
    let n_layer: usize = std::env::args().nth(3).map_or(Ok(6), |s| s.parse())?;
    write_tiny_model(std::path::Path::new(&out), &TinyModelConfig { arch, n_layer, seed: 3, ..Default::default() })?;
    Ok(())
}
