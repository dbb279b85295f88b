#!/usr/bin/env python3
"""The trainer-speed steps of examples/train_speed.rs in PyTorch on the CPU, same shapes and the
same algorithm, for a side-by-side time per optimizer step (scripts/train-speed.sh runs both).

  draft: Qwen2.5-0.5B shapes pruned to 14 blocks, blocks 8..13 and the final norm trained,
         embeddings and the untied LM head frozen; forward KL against a K + 1-bin sparse teacher
         (top-K probabilities plus one bin for the rest); AdamW (0.9, 0.999, wd 0.1 on matrices),
         grad-norm clip 1.0; BATCH sequences of SEQ tokens, every position trained.
  head:  EAGLE-3 layout for Qwen2.5-Coder 1.5B (H 1536, 12 heads / 2 KV of 128, FFN 4096, draft
         vocabulary 8192), 3 training-time-test steps with weights 0.8^i, one sequence per
         forward/backward as the Rust trainer does; AdamW (0.9, 0.95), clip 0.5.

Attention uses the same explicit ops as the candle code (matmul, additive mask, softmax); with
--sdpa the draft uses torch's fused scaled_dot_product_attention instead. Weights are random.

  python3 scripts/train_step_torch.py [--steps 6] [--batch 4] [--seq 256] [--top-k 64]
                                      [--threads 2] [--sdpa] [--vocab 151936]
Prints one JSON object (medians over the steps after the first).
"""
import argparse
import json
import math
import time

import torch
import torch.nn.functional as F


def rms_norm(x, w, eps=1e-6):
    return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps) * w


def rope_tables(s, hd, theta=1e6):
    half = hd // 2
    inv = theta ** (-2.0 * torch.arange(half, dtype=torch.float64) / hd)
    a = torch.arange(s, dtype=torch.float64)[:, None] * inv[None, :]
    return a.cos().float(), a.sin().float()  # (s, half)


def rope_neox(x, cos, sin):  # x (b, n, s, hd): halves rotated
    half = x.shape[-1] // 2
    x0, x1 = x[..., :half], x[..., half:]
    return torch.cat([x0 * cos - x1 * sin, x0 * sin + x1 * cos], -1)


def rope_normal(x, cos, sin):  # adjacent pairs
    b, n, s, hd = x.shape
    xp = x.reshape(b, n, s, hd // 2, 2)
    x0, x1 = xp[..., 0:1], xp[..., 1:2]
    c, si = cos.reshape(s, hd // 2, 1), sin.reshape(s, hd // 2, 1)
    return torch.cat([x0 * c - x1 * si, x0 * si + x1 * c], -1).reshape(b, n, s, hd)


def repeat_kv(x, rep):
    if rep == 1:
        return x
    b, n, s, hd = x.shape
    return x[:, :, None].expand(b, n, rep, s, hd).reshape(b, n * rep, s, hd)


def param(*shape, norm=False, grad=True):
    t = torch.ones(*shape) if norm else torch.randn(*shape) * 0.02
    return t.requires_grad_(grad)


def median(v):
    v = sorted(v)
    return v[len(v) // 2]


def summarize(phases, tokens_per_step):
    step = median([sum(p.values()) for p in phases])
    out = {"steps_counted": len(phases), "step_s": step, "tokens_per_step": tokens_per_step,
           "tokens_per_s": tokens_per_step / step}
    for k in ["teacher_s", "forward_s", "backward_s", "optimizer_s"]:
        out[k] = median([p[k] for p in phases])
    return out


def adamw(params, lr, betas, wd):
    decay = [p for p in params if p.dim() >= 2]
    rest = [p for p in params if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": wd}, {"params": rest, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=1e-8)


def draft_bench(a):
    V, H, I, L, NH, NKV, HD = a.vocab, 896, 4864, 14, 14, 2, 64
    trained = set(range(8, 14))
    emb = param(V, H, grad=False)
    head = param(V, H, grad=False)
    blocks = []
    for i in range(L):
        g = i in trained
        blocks.append({
            "attn_norm": param(H, norm=True, grad=g), "ffn_norm": param(H, norm=True, grad=g),
            "q": param(NH * HD, H, grad=g), "q_b": param(NH * HD, grad=g),
            "k": param(NKV * HD, H, grad=g), "k_b": param(NKV * HD, grad=g),
            "v": param(NKV * HD, H, grad=g), "v_b": param(NKV * HD, grad=g),
            "o": param(H, NH * HD, grad=g),
            "gate": param(I, H, grad=g), "up": param(I, H, grad=g), "down": param(H, I, grad=g),
        })
    norm = param(H, norm=True)
    params = [norm] + [t for b in blocks for t in b.values() if t.requires_grad]
    opt = adamw(params, 3e-4, (0.9, 0.999), 0.1)
    B, S, K = a.batch, a.seq, a.top_k
    cos, sin = rope_tables(S, HD)
    causal = torch.triu(torch.full((S, S), -1e9), 1)
    g = torch.Generator().manual_seed(1)
    phases = []
    for step in range(a.steps):
        # Teacher rows for the step (the Rust trainer reads them from its cache/memory).
        t0 = time.perf_counter()
        ids = torch.randint(0, V, (B, S), generator=g)
        tid = torch.randint(0, V, (B * (S - 1), K), generator=g)
        tp = torch.full((B * (S - 1), K), 0.9 / K)
        rest = torch.full((B * (S - 1),), 0.1)
        t1 = time.perf_counter()
        x = emb[ids]
        for b in blocks:
            r = rms_norm(x, b["attn_norm"])
            q = F.linear(r, b["q"], b["q_b"]).view(B, S, NH, HD).transpose(1, 2)
            k = F.linear(r, b["k"], b["k_b"]).view(B, S, NKV, HD).transpose(1, 2)
            v = F.linear(r, b["v"], b["v_b"]).view(B, S, NKV, HD).transpose(1, 2)
            q, k = rope_neox(q, cos, sin), rope_neox(k, cos, sin)
            k, v = repeat_kv(k, NH // NKV), repeat_kv(v, NH // NKV)
            if a.sdpa:
                o = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            else:
                att = (q @ k.transpose(-1, -2)) / math.sqrt(HD) + causal
                o = att.softmax(-1) @ v
            x = x + F.linear(o.transpose(1, 2).reshape(B, S, NH * HD), b["o"])
            r = rms_norm(x, b["ffn_norm"])
            x = x + F.linear(F.silu(F.linear(r, b["gate"])) * F.linear(r, b["up"]), b["down"])
        hid = rms_norm(x, norm)[:, :-1].reshape(-1, H)  # every position but the last is trained
        logits = hid @ head.t()
        lse = logits.logsumexp(-1)
        lq = logits.gather(1, tid) - lse[:, None]
        lq_other = logits.scatter(1, tid, float("-inf")).logsumexp(-1) - lse
        kl = (tp * (tp.log() - lq)).sum(-1) + rest * (rest.log() - lq_other)
        loss = kl.mean()
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        t4 = time.perf_counter()
        if step > 0:
            phases.append({"teacher_s": t1 - t0, "forward_s": t2 - t1, "backward_s": t3 - t2, "optimizer_s": t4 - t3})
    return summarize(phases, B * (S - 1))


def step_mask(t, i):
    m = torch.full((t, (i + 1) * t), -1e9)
    for p in range(t):
        if p >= i:
            m[p, : p - i + 1] = 0.0
        for j in range(1, i + 1):
            if p + j >= i:
                m[p, j * t + (p + j - i)] = 0.0
    return m


def head_bench(a):
    H, NH, NKV, HD, I, DV, TTT = 1536, 12, 2, 128, 4096, 8192, 3
    w = {
        "fc": param(H, 3 * H), "attn_norm": param(H, norm=True), "attn_norm_2": param(H, norm=True),
        "q": param(NH * HD, 2 * H), "k": param(NKV * HD, 2 * H), "v": param(NKV * HD, 2 * H),
        "o": param(H, NH * HD), "ffn_norm": param(H, norm=True), "gate": param(I, H), "up": param(I, H),
        "down": param(H, I), "output_norm": param(H, norm=True), "output": param(DV, H),
    }
    params = list(w.values())
    opt = torch.optim.AdamW(params, lr=3e-4, betas=(0.9, 0.95), eps=1e-8, weight_decay=0.0)
    B, T, K = a.batch, a.seq - 1, a.top_k
    cos, sin = rope_tables(T, HD)
    masks = [step_mask(T, i) for i in range(TTT)]
    g = torch.Generator().manual_seed(2)
    seqs = [{
        "emb": torch.randn(T, H, generator=g).half(), "feat": torch.randn(T, 3 * H, generator=g).half(),
        "tid": torch.randint(0, DV, (T, K), generator=g), "tp": torch.full((T, K), 0.9 / K),
        "other": torch.full((T,), 0.1), "mask": torch.ones(T),
    } for _ in range(B * a.steps)]
    phases = []
    for step in range(a.steps):
        ph = {"teacher_s": 0.0, "forward_s": 0.0, "backward_s": 0.0, "optimizer_s": 0.0}
        for s in seqs[step * B:(step + 1) * B]:
            t1 = time.perf_counter()
            emb, feat = s["emb"].float(), s["feat"].float()
            e = rms_norm(emb, w["attn_norm"])
            gg = feat @ w["fc"].t()
            ks, vs, total = [], [], 0.0
            for i in range(TTT):
                x = torch.cat([e, rms_norm(gg, w["attn_norm_2"])], 1)
                q = rope_normal((x @ w["q"].t()).view(T, NH, HD).transpose(0, 1)[None], cos, sin)
                k = rope_normal((x @ w["k"].t()).view(T, NKV, HD).transpose(0, 1)[None], cos, sin)
                v = (x @ w["v"].t()).view(T, NKV, HD).transpose(0, 1)[None]
                ks.append(k)
                vs.append(v)
                kk = repeat_kv(torch.cat(ks, 2), NH // NKV)
                vv = repeat_kv(torch.cat(vs, 2), NH // NKV)
                att = ((q @ kk.transpose(-1, -2)) / math.sqrt(HD) + masks[i]).softmax(-1)
                o = (att @ vv)[0].transpose(0, 1).reshape(T, NH * HD)
                r = o @ w["o"].t() + gg
                rn = rms_norm(r, w["ffn_norm"])
                y = (F.silu(rn @ w["gate"].t()) * (rn @ w["up"].t())) @ w["down"].t() + r
                logits = rms_norm(y, w["output_norm"]) @ w["output"].t()
                lq = logits.log_softmax(-1).gather(1, s["tid"])
                q_other = (1.0 - lq.exp().sum(1)).clamp(1e-6, 1.0).log()
                ce = -((s["tp"] * lq).sum(1) + s["other"] * q_other)
                m = s["mask"].clone()
                m[: min(i, T)] = 0.0
                total = total + (ce * m).sum() / s["mask"][min(i, T):].sum() * 0.8 ** i
                gg = torch.cat([torch.zeros(1, H), y[:-1]], 0)
            t2 = time.perf_counter()
            (total / B).backward()
            t3 = time.perf_counter()
            ph["forward_s"] += t2 - t1
            ph["backward_s"] += t3 - t2
        t4 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(params, 0.5)
        opt.step()
        opt.zero_grad(set_to_none=True)
        ph["optimizer_s"] = time.perf_counter() - t4
        if step > 0:
            phases.append(ph)
    return summarize(phases, B * T)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=256)
    p.add_argument("--top-k", type=int, default=64)
    p.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    p.add_argument("--vocab", type=int, default=151936)
    p.add_argument("--sdpa", action="store_true", help="fused attention in the draft")
    p.add_argument("--only", choices=["draft", "head"], help="run one of the two")
    a = p.parse_args()
    if a.steps < 2:
        p.error("--steps must be >= 2 (the first is a warm-up)")
    if a.threads:
        torch.set_num_threads(a.threads)
    out = {"impl": f"pytorch {torch.__version__} (cpu{', sdpa' if a.sdpa else ''})",
           "threads": torch.get_num_threads(), "batch": a.batch, "seq": a.seq, "top_k": a.top_k}
    if a.only in (None, "draft"):
        out["draft"] = draft_bench(a)
    if a.only in (None, "head"):
        out["head"] = head_bench(a)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
