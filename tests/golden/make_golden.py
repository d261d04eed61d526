#!/usr/bin/env python3
"""Produce the golden reference data that the Rust tests compare Strata against.

What it does
------------
For every entry of tests/golden/models.json ({"name", "synth": [...], "prompts": [...],
optional "llamacpp": ["f16", "q8_0"], optional "llamacpp_pre": "llama-bpe"}):

1. runs `strata model synth <synth...> --format safetensors --dtype f32 --out <tmp>/<name>`,
   which writes a Hugging Face style model dir (config.json, model.safetensors,
   tokenizer.json, tokenizer_config.json);
   entries with "transformers_init" ({"model_type", config keys}, optional "seed") are
   instead made by transformers itself: its class, initialised at random under the seed,
   saved with save_pretrained in F16 to tests/golden/hf/<name> beside the synthetic
   tokenizer (committed; the golden JSON's "model" names it), so the tests read what
   transformers writes (Mixtral's and Qwen3-MoE's per-expert tensors, its config keys);
2. loads it with transformers (`AutoModelForCausalLM.from_pretrained(dir, dtype=float32,
   attn_implementation="eager")`, eval mode, no KV cache). Loading fails hard if any tensor
   is missing, unexpected or of the wrong shape (transformers would otherwise silently
   initialise it at random);
3. for each prompt:
   - prompt_ids: `tokenizers.Tokenizer.from_file(dir/tokenizer.json).encode(text,
     add_special_tokens=True).ids`, i.e. exactly what tokenizer.json's post-processor does
     (a BOS is added only if that post-processor adds one; "bos_added" records it).
     AutoTokenizer is deliberately not used for the ids (transformers 5 may rebuild the
     tokenizer from tokenizer_config.json); it is only cross-checked, with a warning;
   - last_logits: logits at the last prompt position, full vocab, float32, rounded to 6
     significant digits;
   - greedy_ids: 12 new token ids from a manual argmax loop, one full forward over the
     whole sequence per step (no generate(), no sampling, no KV cache, does NOT stop at EOS);
     ties go to the lowest id (torch.argmax). greedy_margins[i] = top1 - top2 logit at step
     i, so a consumer can tell a near-tie from a real mismatch;
4. writes tests/golden/<name>.json:
   {"name", "synth", "transformers_version", "torch_version", "tokenizers_version",
    "tokenizer", "greedy_new_tokens", "cases": [{"prompt", "prompt_ids", "bos_added",
    "last_logits", "greedy_ids", "greedy_margins"}]}
5. with --convert PATH/convert_hf_to_gguf.py, for entries with "llamacpp": runs llama.cpp's
   converter on the same synthetic dir with --outtype f16 / q8_0 and writes
   tests/golden/llamacpp/<name>-<outtype>.gguf (must stay < 1 MB; they are committed).
   The converter identifies the BPE pre-tokenizer by hashing the ids of a fixed test string
   (TextModel.get_vocab_base_pre) and refuses unknown hashes, which a synthetic tokenizer
   always is. So the converter is run through a small wrapper (CONVERT_WRAPPER below) that
   replaces that method with one returning a fixed name, "llama-bpe" unless the entry sets
   "llamacpp_pre". That only sets the `tokenizer.ggml.pre` string; tensors and all other
   metadata come from the unmodified converter. Its vendored gguf-py is used (as the
   converter itself does unless NO_LOCAL_GGUF is set).

What it needs
-------------
Python 3.11 with (versions used to produce the committed files):
  torch 2.15.0, transformers 5.24.0, tokenizers 0.23.3, safetensors 0.8.0, numpy 2.4.6,
  sentencepiece 0.2.3, gguf 0.19.0 (the converter imports sentencepiece; gguf is used to
  summarise the written files).
  The plain PyPI torch wheel pulls CUDA libraries (~5.6 GB venv); CPU is enough.
llama.cpp's converter, for --convert: the sdist of llama-cpp-python 0.3.36 vendors it:
  pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcp
  (needs `pip install scikit-build-core cmake` first for the metadata step; nothing is compiled)
  tar xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
  -> /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py

How to rerun
------------
  cargo build --release
  python3 tests/golden/make_golden.py --strata target/release/strata \
      [--only NAME] [--convert /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py]
  then review `git diff --stat tests/golden`. Everything is deterministic given the strata
  binary (its synth --seed) and the package versions above.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent
GREEDY_NEW_TOKENS = 12
MAX_GGUF_BYTES = 1_000_000
DEFAULT_PRE = "llama-bpe"

# Run as `python -c CONVERT_WRAPPER <convert_hf_to_gguf.py> <pre> <converter args...>`.
# Imports the converter as a module (so its main() does not run yet), forces
# TextModel.get_vocab_base_pre to return <pre>, then calls main().
CONVERT_WRAPPER = r"""
import importlib.util, os, sys
convert, pre = os.path.abspath(sys.argv[1]), sys.argv[2]
root = os.path.dirname(convert)
sys.path.insert(0, root)
if "NO_LOCAL_GGUF" not in os.environ:
    sys.path.insert(1, os.path.join(root, "gguf-py"))
spec = importlib.util.spec_from_file_location("convert_hf_to_gguf", convert)
mod = importlib.util.module_from_spec(spec)
sys.modules["convert_hf_to_gguf"] = mod
spec.loader.exec_module(mod)
TextModel = getattr(mod, "TextModel", None)
if TextModel is None:  # newer llama.cpp: model classes live in the conversion/ package
    TextModel = sys.modules["conversion.base"].TextModel
def get_vocab_base_pre(self, tokenizer):
    return pre
TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv = [convert] + sys.argv[3:]
mod.main()
"""


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def round6(x: float) -> float:
    if not math.isfinite(x):
        raise ValueError(f"non-finite logit {x}")
    return float(f"{x:.6g}")


def synth(strata: str, entry: dict, workdir: Path) -> Path:
    for flag in ("--format", "--dtype", "--out"):
        if flag in entry["synth"]:
            raise SystemExit(f"{entry['name']}: synth must not contain {flag} (added by make_golden.py)")
    out = workdir / entry["name"]
    cmd = [strata, "model", "synth", *entry["synth"], "--format", "safetensors", "--dtype", "f32", "--out", str(out)]
    log("+ " + " ".join(cmd))
    subprocess.run(cmd, check=True)
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        if not (out / f).is_file():
            raise SystemExit(f"{entry['name']}: strata synth did not write {f}")
    return out


def transformers_init(entry: dict, synth_dir: Path, out: Path) -> Path:
    """A model transformers makes itself: its class, initialised at random (seeded) from
    entry["transformers_init"] (config keys; vocabulary, BOS and EOS from the synthetic
    model's config so its tokenizer fits), saved by save_pretrained in F16 (small enough to
    commit) beside that tokenizer. What transformers writes, Strata must read."""
    import shutil

    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    synth_cfg = json.loads((synth_dir / "config.json").read_text())
    keys = dict(entry["transformers_init"])
    for k in ("vocab_size", "bos_token_id", "eos_token_id", "max_position_embeddings"):
        keys.setdefault(k, synth_cfg[k])
    model_type = keys.pop("model_type")
    config = AutoConfig.for_model(model_type, **keys)
    torch.manual_seed(entry.get("seed", 0))
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    if out.exists():
        shutil.rmtree(out)
    model.to(torch.float16).save_pretrained(out)
    for f in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(synth_dir / f, out / f)
    (out / "generation_config.json").unlink(missing_ok=True)
    log(f"wrote {out} ({sum(f.stat().st_size for f in out.iterdir())} bytes)")
    return out


def load_model(model_dir: Path):
    import torch
    from transformers import AutoModelForCausalLM

    model, info = AutoModelForCausalLM.from_pretrained(
        model_dir, dtype=torch.float32, attn_implementation="eager", output_loading_info=True)
    problems = {k: v for k, v in info.items() if v and k != "error_msgs"}
    if info.get("error_msgs"):
        problems["error_msgs"] = info["error_msgs"]
    if problems:
        raise SystemExit(f"{model_dir}: transformers loading problems: {problems}")
    model.eval()
    return model


def check_auto_tokenizer(model_dir: Path, prompts: list[str], ids: list[list[int]]) -> None:
    try:
        from transformers import AutoTokenizer
        tok = AutoTokenizer.from_pretrained(model_dir)
        for p, expect in zip(prompts, ids):
            got = tok(p)["input_ids"]
            if got != expect:
                log(f"WARNING: AutoTokenizer gives {got} for {p!r}, tokenizer.json gives {expect}")
    except Exception as e:  # informational only
        log(f"WARNING: AutoTokenizer could not load {model_dir}: {e!r}")


def golden_for(entry: dict, model_dir: Path) -> dict:
    import tokenizers
    import torch
    import transformers

    tok = tokenizers.Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    cfg = json.loads((model_dir / "config.json").read_text())
    bos = cfg.get("bos_token_id")
    model = load_model(model_dir)

    def last_logits(ids: list[int]) -> torch.Tensor:
        with torch.no_grad():
            out = model(input_ids=torch.tensor([ids], dtype=torch.long), use_cache=False)
        return out.logits[0, -1].to(torch.float32)

    def margin(logits: torch.Tensor) -> float:
        top = torch.topk(logits, 2).values
        return round6(float(top[0] - top[1]))

    cases, all_ids = [], []
    for prompt in entry["prompts"]:
        ids = tok.encode(prompt, add_special_tokens=True).ids
        plain = tok.encode(prompt, add_special_tokens=False).ids
        if not ids:
            raise SystemExit(f"{entry['name']}: prompt {prompt!r} encodes to no tokens")
        all_ids.append(ids)
        logits = last_logits(ids)
        first = [round6(v) for v in logits.tolist()]
        seq, greedy, margins = list(ids), [], []
        for step in range(GREEDY_NEW_TOKENS):
            if step > 0:
                logits = last_logits(seq)
            nxt = int(torch.argmax(logits))
            margins.append(margin(logits))
            greedy.append(nxt)
            seq.append(nxt)
        cases.append({
            "prompt": prompt,
            "prompt_ids": ids,
            "bos_added": bos is not None and ids[:1] == [bos] and plain[:1] != [bos],
            "last_logits": first,
            "greedy_ids": greedy,
            "greedy_margins": margins,
        })
        log(f"  {prompt!r}: {len(ids)} prompt ids -> greedy {greedy} (min margin {min(margins)})")
        if len(set(greedy)) == 1:
            log(f"WARNING: {entry['name']}: greedy output is one repeated token; a weak test "
                "(the synthetic weights may be badly scaled)")
        if min(margins) < 1e-3:
            log(f"WARNING: {entry['name']}: a greedy step is a near-tie (margin {min(margins)}); "
                "another implementation may legitimately pick the other token")
    check_auto_tokenizer(model_dir, entry["prompts"], all_ids)
    return {
        "name": entry["name"],
        "synth": entry["synth"],
        "model": f"hf/{entry['name']}" if entry.get("transformers_init") else None,
        "transformers_version": transformers.__version__,
        "torch_version": torch.__version__,
        "tokenizers_version": tokenizers.__version__,
        "tokenizer": "tokenizers.Tokenizer.from_file(tokenizer.json).encode(prompt, add_special_tokens=True)",
        "greedy_new_tokens": GREEDY_NEW_TOKENS,
        "cases": cases,
    }


def write_golden(doc: dict, path: Path) -> None:
    # Header keys one per line, one case per line: small files, readable diffs.
    lines = ["{"]
    for k, v in doc.items():
        if k != "cases":
            lines.append(f"  {json.dumps(k)}: {json.dumps(v, ensure_ascii=False)},")
    cases = [f"    {json.dumps(c, ensure_ascii=False)}" for c in doc["cases"]]
    lines.append('  "cases": [\n' + ",\n".join(cases) + "\n  ]")
    lines.append("}")
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")
    json.loads(path.read_text(encoding="utf-8"))  # sanity
    log(f"wrote {path} ({path.stat().st_size} bytes)")


def convert(entry: dict, model_dir: Path, converter: str, outdir: Path) -> None:
    pre = entry.get("llamacpp_pre", DEFAULT_PRE)
    outdir.mkdir(parents=True, exist_ok=True)
    for outtype in entry["llamacpp"]:
        out = outdir / f"{entry['name']}-{outtype}.gguf"
        cmd = [sys.executable, "-c", CONVERT_WRAPPER, converter, pre, str(model_dir),
               "--outtype", outtype, "--outfile", str(out)]
        log(f"+ convert_hf_to_gguf.py {model_dir} --outtype {outtype} --outfile {out} (pre={pre})")
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log(res.stdout + res.stderr)
            raise SystemExit(f"{entry['name']}: converter failed for {outtype}")
        size = out.stat().st_size
        if size >= MAX_GGUF_BYTES:
            raise SystemExit(f"{out} is {size} bytes (>= 1 MB); shrink the model in models.json")
        summarize_gguf(out)


def summarize_gguf(path: Path) -> None:
    try:
        import gguf
    except ImportError:
        log(f"wrote {path} ({path.stat().st_size} bytes)")
        return
    r = gguf.GGUFReader(str(path))
    types: dict[str, list[str]] = {}
    for t in r.tensors:
        types.setdefault(t.tensor_type.name, []).append(t.name)
    pre = r.fields.get("tokenizer.ggml.pre")
    pre_s = bytes(pre.parts[pre.data[0]]).decode() if pre else None
    log(f"wrote {path} ({path.stat().st_size} bytes, {len(r.tensors)} tensors, pre={pre_s}): "
        + "; ".join(f"{k}: {len(v)}" for k, v in sorted(types.items())))
    # Q8_0 needs rows that are a multiple of 32; the converter silently falls back to F16.
    if path.stem.endswith("q8_0") and "F16" in types:
        log(f"WARNING: {path.name}: tensors fell back to F16 (row length not a multiple of 32): {types['F16']}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--strata", required=True, help="path to the strata binary (target/release/strata)")
    ap.add_argument("--only", help="only this models.json entry")
    ap.add_argument("--convert", help="path to llama.cpp's convert_hf_to_gguf.py")
    ap.add_argument("--models", default=str(HERE / "models.json"))
    ap.add_argument("--out", default=str(HERE), help="where <name>.json and llamacpp/ go")
    ap.add_argument("--keep", help="keep the synthetic model dirs in this directory")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1)")
    args = ap.parse_args()

    import torch
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)

    entries = json.loads(Path(args.models).read_text(encoding="utf-8"))
    if args.only:
        entries = [e for e in entries if e["name"] == args.only]
        if not entries:
            raise SystemExit(f"no entry named {args.only!r} in {args.models}")
    names = [e["name"] for e in entries]
    if len(set(names)) != len(names):
        raise SystemExit("duplicate names in models.json")

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    strata = os.path.abspath(args.strata) if os.path.sep in args.strata else args.strata
    with tempfile.TemporaryDirectory(prefix="strata-golden-") as tmp:
        workdir = Path(args.keep) if args.keep else Path(tmp)
        workdir.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            log(f"== {entry['name']}")
            model_dir = synth(strata, entry, workdir)
            if entry.get("transformers_init"):
                model_dir = transformers_init(entry, model_dir, out / "hf" / entry["name"])
            write_golden(golden_for(entry, model_dir), out / f"{entry['name']}.json")
            if args.convert and entry.get("llamacpp"):
                convert(entry, model_dir, args.convert, out / "llamacpp")


if __name__ == "__main__":
    main()
