//! The verification curve of a GGUF target on this machine: ms per decode of B tokens, for
//! both numeric modes (fast kernels, exact = reference kernels without weight repacking) and,
//! with and without weight repacking. The numbers behind docs/KERNELS.md.
//!
//!     cargo run --release --example curve -- MODEL.gguf [THREADS]

use std::sync::Arc;

use adaspec::bench::matrix::{measure_curve, CURVE_SIZES};
use adaspec::{Model, ModelParams, NumericMode};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let path = std::env::args().nth(1).ok_or("usage: curve MODEL.gguf [THREADS]")?;
    let threads: i32 = std::env::args().nth(2).map_or(Ok(2), |t| t.parse())?;
    println!("tinyBLAS built in: {}", adaspec::cpu_kernels::has_tinyblas());
    print!("{:<22}", "setting");
    for b in CURVE_SIZES {
        print!(" {:>7}", format!("B{b}"));
    }
    println!("  (ms for B1, then x of B1)  ceiling");
    for (label, repack, mode) in [
        ("fast, repack", true, NumericMode::Fast),
        ("fast, no repack", false, NumericMode::Fast),
        ("ref kernels, repack", true, NumericMode::Exact),
        ("exact (ref kernels)", false, NumericMode::Exact),
    ] {
        let model = Arc::new(Model::load(&path, &ModelParams { repack, ..Default::default() })?);
        let info = measure_curve(&model, mode, threads)?;
        let t1 = info.ms[0].1;
        print!("{label:<22} {t1:>7.1}");
        for &(_, ms) in &info.ms[1..] {
            print!(" {:>7.2}", ms / t1);
        }
        println!("  {:.2}x (B{})", info.ceiling, info.ceiling_batch);
    }
    Ok(())
}
