#!/usr/bin/env python3
"""llama.cpp's own speculative decoding on our prompts/models; driven by scripts/bench-llama-cpp.sh.

See the header of scripts/bench-llama-cpp.sh for what is measured. Standard library only.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
import time

CHATML = "<|im_start|>user\n{prompt}<|im_end|>\n<|im_start|>assistant\n"
LINE = re.compile(r"^LLAMA_SPEC_BENCH (.*)$", re.M)


def configs(dmax_list, pmin_list, pmin_dmax):
    out = [("target", [])]
    for p in pmin_list:
        for k in (dmax_list if p is None else pmin_dmax):
            name = f"spec-k{k}" + ("" if p is None else f"-pmin{p}")
            args = ["--spec-type", "draft-simple", "--spec-draft-n-max", str(k)]
            if p is not None:
                args += ["--spec-draft-p-min", str(p)]
            out.append((name, args))
    return out


def run_one(a, prompt_file, extra, use_draft):
    cmd = [a.bin, "-m", a.target, "-f", prompt_file, "--no-escape", "-n", str(a.n_gen),
           "-t", str(a.threads), "-tb", str(a.threads), "-c", str(a.ctx), "-fa", "off",
           "--temp", "0", "--seed", "42", "-ngl", "0"] + a.extra_args.split()
    if use_draft:
        cmd += ["-md", a.draft, "-td", str(a.threads), "-tbd", str(a.threads), "-ngld", "0"] + extra
    t0 = time.time()
    p = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, timeout=a.timeout)
    wall = time.time() - t0
    m = LINE.search(p.stdout)
    if p.returncode != 0 or not m:
        sys.stderr.write(p.stderr[-3000:])
        raise RuntimeError(f"run failed (rc {p.returncode}): {' '.join(cmd)}")
    kv = dict(f.split("=", 1) for f in m.group(1).split())
    r = {k: (float(v) if "." in v else int(v)) for k, v in kv.items() if k not in ("mode", "tokens")}
    r["mode"] = kv["mode"]
    r["tokens"] = [int(x) for x in kv["tokens"].split(",") if x]
    r["tok_s"] = r["n_gen"] / r["t_gen_s"] if r["t_gen_s"] > 0 else 0.0
    r["tok_s_incl_prompt"] = r["n_gen"] / (r["t_gen_s"] + r["t_prompt_s"])
    r["acceptance"] = r["n_accept"] / r["n_drafted"] if r["n_drafted"] else None
    r["tokens_per_pass"] = r["n_gen"] / r["n_passes"] if r["n_passes"] else 0.0
    r["wall_s"] = wall
    return r


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", required=True)
    ap.add_argument("--target", required=True)
    ap.add_argument("--draft", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--prompts", type=int, default=10)
    ap.add_argument("--n-gen", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--ctx", type=int, default=4096)
    ap.add_argument("--dmax", default="2,3,4,8")
    ap.add_argument("--pmin", default="default,0.75", help="'default' = llama.cpp's default p_min")
    ap.add_argument("--pmin-dmax", default="4", help="draft maxima tried with the non-default p_min values")
    ap.add_argument("--extra-args", default="", help="extra llama.cpp flags for every run, e.g. --no-repack")
    ap.add_argument("--timeout", type=int, default=900)
    ap.add_argument("--out", default="llama-cpp-bench.json")
    ap.add_argument("--workdir", default="target/llama-tools/prompts")
    a = ap.parse_args()

    dmax = [int(x) for x in a.dmax.split(",") if x]
    pmin = [None if x == "default" else float(x) for x in a.pmin.split(",") if x]
    cfgs = configs(dmax, pmin, [int(x) for x in a.pmin_dmax.split(",") if x])
    with open(a.data) as f:
        prompts = [json.loads(l)["prompt"] for l in f if l.strip()][: a.prompts]
    os.makedirs(a.workdir, exist_ok=True)

    runs = []
    result = {
        "what": "llama.cpp common/speculative.cpp draft-simple (llama-speculative-simple loop) vs plain target decoding",
        "binary": a.bin, "target": a.target, "draft": a.draft, "n_gen": a.n_gen, "threads": a.threads,
        "ctx": a.ctx, "extra_args": a.extra_args, "prompts": len(prompts), "configs": [c[0] for c in cfgs],
        "tok_s_measures": "generated tokens / generation time (after prompt eval; excludes model load and prompt)",
        "runs": runs, "summary": [],
    }
    t_start = time.time()
    for pi, prompt in enumerate(prompts):
        pf = os.path.join(a.workdir, f"p{pi}.txt")
        with open(pf, "w") as f:
            # llama.cpp's -f drops ONE trailing newline, so add one to keep "assistant\n"
            f.write(CHATML.format(prompt=prompt) + "\n")
        # interleave configs per prompt, rotating the order to spread load drift
        order = cfgs[pi % len(cfgs):] + cfgs[: pi % len(cfgs)]
        got = {}
        for name, extra in order:
            r = run_one(a, pf, extra, name != "target")
            r.update(prompt=pi, config=name)
            got[name] = r
            runs.append(r)
            acc = "-" if r["acceptance"] is None else f"{r['acceptance']:.2f}"
            print(f"prompt {pi} {name:<16} {r['tok_s']:7.2f} tok/s  acc {acc}  tok/pass {r['tokens_per_pass']:.2f}"
                  f"  n_gen {r['n_gen']}  ({r['wall_s']:.0f}s wall)", flush=True)
        for r in got.values():
            r["identical_to_target"] = r["tokens"] == got["target"]["tokens"]
        result["elapsed_s"] = time.time() - t_start
        summarize(result, cfgs)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=1)
    print_table(result)


def summarize(result, cfgs):
    runs = result["runs"]
    base = {r["prompt"]: r["tok_s"] for r in runs if r["config"] == "target"}
    base_med = statistics.median(base.values()) if base else 0.0
    result["summary"] = []
    for name, _ in cfgs:
        rs = [r for r in runs if r["config"] == name]
        if not rs:
            continue
        med = statistics.median(r["tok_s"] for r in rs)
        ratios = [r["tok_s"] / base[r["prompt"]] for r in rs if base.get(r["prompt"])]
        drafted = sum(r["n_drafted"] for r in rs)
        result["summary"].append({
            "config": name,
            "prompts": len(rs),
            "median_tok_s": med,
            "ratio_of_medians": med / base_med if base_med else None,
            "median_per_prompt_ratio": statistics.median(ratios) if ratios else None,
            "acceptance": sum(r["n_accept"] for r in rs) / drafted if drafted else None,
            "tokens_per_pass": sum(r["n_gen"] for r in rs) / sum(r["n_passes"] for r in rs),
            "median_tok_s_incl_prompt": statistics.median(r["tok_s_incl_prompt"] for r in rs),
            "identical_to_target": sum(1 for r in rs if r.get("identical_to_target")),
        })


def print_table(result):
    print()
    print(f"llama.cpp baseline: {result['prompts']} prompts, {result['n_gen']} tokens, {result['threads']} threads "
          f"(tok/s = generation only) extra args: '{result['extra_args']}'")
    print(f"{'config':<18}{'tok/s(med)':>11}{'x target':>10}{'x/prompt':>10}{'accept':>8}{'tok/pass':>10}{'identical':>11}")
    for s in result["summary"]:
        acc = "-" if s["acceptance"] is None else f"{s['acceptance']:.3f}"
        rm = "-" if s["ratio_of_medians"] is None else f"{s['ratio_of_medians']:.2f}"
        rp = "-" if s["median_per_prompt_ratio"] is None else f"{s['median_per_prompt_ratio']:.2f}"
        print(f"{s['config']:<18}{s['median_tok_s']:>11.2f}{rm:>10}{rp:>10}{acc:>8}{s['tokens_per_pass']:>10.2f}"
              f"{str(s['identical_to_target']) + '/' + str(s['prompts']):>11}")


if __name__ == "__main__":
    main()
