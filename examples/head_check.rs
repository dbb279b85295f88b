//! Diagnoses a trained head on the target's own continuation of a prompt: teacher-forced
//! greedy agreement of the candle head (the trainer's model) and of the exported GGUF run by
//! llama.cpp (the engine's path), on the same entries, and how far their logits differ.
//!
//!     cargo run --release --features train --example head_check -- TARGET.gguf HEAD.safetensors HEAD.gguf "PROMPT"

use std::sync::Arc;

use adaspec::backend::{decode_span, Batch, Context, ContextExtras, ContextParams};
use adaspec::eagle::{head_info, Entry, HeadContext};
use adaspec::features::FeatureTap;
use adaspec::train::head::load_head;
use adaspec::train::head_model::HeadModel;
use adaspec::{ChatMessage, GenerateParams, Model, ModelParams, Prompt, Session, SessionParams, Strategy};
use candle_core::{Device, Tensor};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let a: Vec<String> = std::env::args().skip(1).collect();
    let (t, hs, hg, prompt) = (&a[0], &a[1], &a[2], &a[3]);
    let target = Arc::new(Model::load(t, &ModelParams::default())?);
    let (cfg, w) = load_head(std::path::Path::new(hs))?;
    let model = HeadModel::new(&cfg, &w)?;
    let mut s = Session::new(
        target.clone(),
        None,
        SessionParams { strategy: Strategy::None, n_threads: 2, ..Default::default() },
    )?;
    let g = s.generate(
        &Prompt::Chat(vec![ChatMessage::new("user", prompt.clone())]),
        &GenerateParams { max_tokens: 48, ..Default::default() },
        &mut |_, _| true,
    )?;
    let seq = s.history().to_vec();
    let n_prompt = seq.len() - g.tokens.len();
    let tt = seq.len();
    println!("{} prompt + {} generated tokens", n_prompt, g.tokens.len());
    // Target features of the whole sequence.
    let tap = Arc::new(FeatureTap::new(cfg.target_layers, target.n_layer(), target.n_embd())?);
    let cp = ContextParams { n_ctx: 1024, n_batch: 64, n_threads: 2, ..Default::default() };
    let mut ctx =
        Context::with_extras(target.clone(), &cp, ContextExtras { tap: Some(tap.clone()), ..Default::default() })?;
    let mut batch = Batch::new(64, 1);
    decode_span(&mut ctx, &mut batch, &seq, 0, false)?;
    let mut feats = Vec::new();
    tap.gather(&(0..tt - 1).collect::<Vec<_>>(), &mut feats)?;
    // candle
    let (content, mut reader) = adaspec::train::gguf_import::read_gguf_content(std::path::Path::new(t))?;
    let emb_all = content.tensor(&mut reader, "token_embd.weight", &Device::Cpu)?.dequantize(&Device::Cpu)?;
    let ids = Tensor::from_vec(seq[1..].iter().map(|&x| x as u32).collect::<Vec<_>>(), tt - 1, &Device::Cpu)?;
    let emb = emb_all.index_select(&ids, 0)?;
    let h3 = 3 * target.n_embd();
    let feat = Tensor::from_vec(feats.clone(), (tt - 1, h3), &Device::Cpu)?;
    let out = model.forward_ttt(&emb, &feat, 1)?;
    let ours = out[0].logits.to_vec2::<f32>()?;
    // llama.cpp
    let head = Arc::new(Model::load(hg, &ModelParams::default())?);
    let info = head_info(&head)?;
    let mut hc = HeadContext::new(head, &info, target.clone(), 1024, 64, 2, 2)?;
    let mut gs = Vec::new();
    hc.encode(&feats, &mut gs)?;
    let h = hc.n_embd();
    let (mut agree_c, mut agree_l, mut both, mut n) = (0, 0, 0, 0);
    let mut maxrel = 0.0f32;
    for start in (0..tt - 1).step_by(64) {
        let end = (start + 64).min(tt - 1);
        let entries: Vec<Entry<'_>> = (start..end)
            .map(|p| Entry { token: seq[p + 1], pos: p as i32, seqs: &[0], g: &gs[p * h..(p + 1) * h] })
            .collect();
        hc.decode(&entries)?;
        for p in start..end {
            // Entry P predicts token P+2; score only generated tokens.
            if p + 2 >= tt || p + 2 < n_prompt {
                continue;
            }
            let l = hc.logits(p - start)?;
            let am_l = adaspec::sampling::argmax(l);
            let row = &ours[p];
            let am_c = cfg.draft_vocab[adaspec::sampling::argmax(row)] as usize;
            let want = seq[p + 2] as usize;
            n += 1;
            agree_c += usize::from(am_c == want);
            agree_l += usize::from(am_l == want);
            both += usize::from(am_c == am_l);
            let theirs: Vec<f32> = cfg.draft_vocab.iter().map(|&i| l[i as usize]).collect();
            let d = row.iter().zip(&theirs).map(|(x, y)| (x - y).abs()).fold(0.0f32, f32::max);
            let m = theirs.iter().map(|x| x.abs()).fold(0.0f32, f32::max);
            maxrel = maxrel.max(d / m);
        }
    }
    println!(
        "generated positions {n}: candle agrees with the target {agree_c}, llama.cpp head {agree_l}, candle = llama.cpp argmax {both}; max relative logit difference {maxrel:.4}"
    );
    Ok(())
}
