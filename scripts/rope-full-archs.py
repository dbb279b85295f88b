#!/usr/bin/env python3
"""Prints the llama.cpp architectures whose graph asserts n_embd_head == n_rot (the rope
covers the whole head), for FULL_ROPE_ARCHS in src/model_file.rs. Run it against the vendored
llama.cpp after a llama-cpp-sys-2 update:
    scripts/rope-full-archs.py ~/.cargo/registry/src/*/llama-cpp-sys-2-*/llama.cpp/src
"""
import glob
import os
import re
import sys

src = sys.argv[1]
assert_re = re.compile(r"GGML_ASSERT\(n_embd_head == (hparams\.)?n_rot\)")
classes = set()
for f in glob.glob(os.path.join(src, "models", "*.cpp")):
    text = open(f).read()
    if assert_re.search(text):
        classes.update(re.findall(r"llama_model_([a-z0-9_]+)::", text))
model = open(os.path.join(src, "llama-model.cpp")).read()
archs = set()
for m in re.finditer(r"((?:\s*case LLM_ARCH_[A-Z0-9_]+:)+)\s*return new llama_model_([a-z0-9_]+)(?:<[^>]*>)?\(", model):
    if m.group(2) in classes:
        archs.update(re.findall(r"LLM_ARCH_[A-Z0-9_]+", m.group(1)))
names = open(os.path.join(src, "llama-arch.cpp")).read()
out = []
for a in archs:
    m = re.search(r"\{\s*" + a + r'\s*,\s*"([^"]+)"\s*\}', names)
    if m:
        out.append(m.group(1))
print(", ".join(f'"{n}"' for n in sorted(out)))
