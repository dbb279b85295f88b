//! The run-time kernel switch behind the two numeric modes (docs/KERNELS.md), on real
//! llama.cpp with a tiny generated model: with llamafile's tinyBLAS built in, a batch computed
//! with the fast kernels is *not* bit-identical to one-token decoding (the negative control:
//! the check can see the difference), with the reference kernels it is, up to 16 tokens, also
//! past 512 cells of context with a hole; and a fast-mode context measures a kernel plan.

use std::sync::Arc;

use adaspec::backend::{Batch, Context, ContextParams};
use adaspec::probe::{exact_cap, measure_batch_costs, probe_tokens};
use adaspec::tiny_model::{write_tiny_pair, TinyArch, DEFAULT_DRAFT_NOISE};
use adaspec::{Model, ModelParams};

fn tiny_target(arch: TinyArch) -> Arc<Model> {
    let dir = std::env::temp_dir().join(format!("adaspec-kernels-{arch:?}-{}", std::process::id()));
    let (t, _) = write_tiny_pair(&dir, arch, DEFAULT_DRAFT_NOISE, 5).expect("tiny pair");
    Arc::new(Model::load(&t, &ModelParams { repack: false, ..Default::default() }).expect("load"))
}

fn context(model: &Arc<Model>, reference_kernels: bool) -> (Context, Batch) {
    let cp =
        ContextParams { n_ctx: 1024, n_batch: 64, n_seq_max: 2, n_threads: 2, reference_kernels, ..Default::default() };
    let ctx = Context::new(model.clone(), &cp).expect("context");
    let batch = Batch::new(64, 2);
    (ctx, batch)
}

#[test]
fn reference_kernels_are_batch_invariant_and_fast_ones_are_not() {
    assert!(adaspec::cpu_kernels::has_tinyblas(), "the build must have tinyBLAS on (.cargo/config.toml)");
    for arch in [TinyArch::Llama, TinyArch::Qwen2] {
        let model = tiny_target(arch);
        let (mut fast, mut fb) = context(&model, false);
        assert!(fast.cpu_backend_known(), "{arch:?}: the CPU backend of a new context was not learned");
        assert!(fast.kernels_switchable());
        let fast_cap = exact_cap(&mut fast, &mut fb, &model, 16).unwrap();
        let (mut exact, mut eb) = context(&model, true);
        assert!(exact.cpu_backend_known());
        assert!(!exact.kernels_switchable(), "an exact context never leaves the reference kernels");
        let exact_cap_ = exact_cap(&mut exact, &mut eb, &model, 16).unwrap();
        eprintln!("{arch:?}: bit-identical batches up to {fast_cap} (fast kernels), {exact_cap_} (reference)");
        assert!(fast_cap < 16, "{arch:?}: tinyBLAS batches matched one-token decoding bit for bit: the check is blind");
        assert_eq!(exact_cap_, 16, "{arch:?}: reference kernels are not batch-invariant");
    }
}

#[test]
fn a_fast_context_measures_a_plan_and_an_exact_one_keeps_reference_kernels() {
    let model = tiny_target(TinyArch::Qwen2);
    let probe = probe_tokens(&model, 40);
    let (mut fast, mut fb) = context(&model, false);
    let cost = measure_batch_costs(&mut fast, &mut fb, &probe, &[1, 2, 4, 8]).unwrap();
    assert!(cost.points().len() == 4 && cost.points().iter().all(|&(_, ms)| ms > 0.0));
    assert!(!fast.kernel_plan().reference_for(1), "one-token decodes stay on the fast kernels");
    assert!(!fast.kernel_plan().reference_for(64), "prefill-sized batches stay on the fast kernels");
    // The exact context ignores plans: still bit-identical after one was offered.
    let (mut exact, mut eb) = context(&model, true);
    exact.set_kernel_plan(adaspec::cpu_kernels::KernelPlan::default());
    assert_eq!(exact_cap(&mut exact, &mut eb, &model, 8).unwrap(), 8);
}
