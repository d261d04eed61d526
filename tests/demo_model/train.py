#!/usr/bin/env python3
"""Train Strata's bundled demo model: a small Llama that speaks King James English.

Run once by hand (not by CI); it writes models/demo/ in the repository:
  config.json, generation_config.json, model.safetensors (F16), tokenizer.json,
  tokenizer_config.json (with the chat template), strata-demo-q8_0.gguf (made by llama.cpp's
  own converter) and train-log.json (the loss curve and samples). README.md, the model card,
  is written by hand.

The text
--------
The King James Version of the Bible (1611), whose copyright has expired; Debian ships it in
the `bible-kjv-text` package (read with the `bible` program from `bible-kjv`). The package's
copyright file says: "The copyright for the King James Version text of the Bible is expired
since the translation was done in 1611". We dump it with
  bible -l0 "Gen1:1-Rev22:21"
which prints "Book N" headers and "  V text" verse lines (4.3 MB, 823k words).

The tokenizer
-------------
Our own byte-level BPE (Hugging Face `tokenizers`), 4096 tokens, trained on that text, with
Llama 3's pre-tokenizer split (so GGUF calls it `llama-bpe`) and five special tokens. The chat
template is a plain one of our own:
  <|user|>\n{content}<|end|>\n<|assistant|>\n{answer}<|end|>\n
`<|end|>` ends a turn and is the end-of-sequence token; no BOS is added.

The training data
-----------------
Documents, shuffled with a fixed seed, concatenated into one token stream and cut into
windows of SEQ tokens:
- every chapter as plain text, one verse per line;
- chat turns: for every verse, the user says that verse and the assistant answers with the
  one or two verses that follow it. So a prompt that sounds like scripture gets the next
  verses back, in the chat template the server applies.

The model
---------
Llama architecture (transformers' LlamaForCausalLM): 6 layers, hidden 256, 8 heads of 32,
4 KV heads, MLP 768, tied embeddings, context 512, RoPE theta 10000: about 5.8 M parameters.
AdamW, lr 3e-3 with warmup and cosine decay, batch BATCH x SEQ tokens, STEPS steps, seed 0,
on the CPU with 2 threads (about 30 to 45 minutes on the 2-core build VM).

How to rerun
------------
  apt-get install bible-kjv                      # the text and the `bible` reader
  python3 -m venv /root/golden-venv && /root/golden-venv/bin/pip install torch transformers tokenizers safetensors gguf sentencepiece
  # llama.cpp's converter, vendored by llama-cpp-python's sdist (nothing is compiled):
  pip download --no-deps --no-binary :all: --no-build-isolation llama-cpp-python==0.3.36 -d /tmp/lcp
  tar -xzf /tmp/lcp/llama_cpp_python-0.3.36.tar.gz -C /tmp/lcp
  /root/golden-venv/bin/python tests/demo_model/train.py \
      --convert /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
Options: --steps N (default 900), --out DIR (default models/demo), --minutes M (stop early
after M minutes; the cosine schedule still follows --steps).

The draft model
---------------
With --draft, the same script trains the demo's draft model for speculative decoding on
the same documents, with the demo's own tokenizer (read from --out, not trained again):
2 layers, hidden 128, 4 heads of 32, 2 KV heads, MLP 384, tied embeddings, about 0.9 M
parameters. It learns from the demo model itself (model.safetensors in --out): its loss is
the KL divergence from the demo model's next-token distribution (distillation), not the
text's next token, because a draft is worth what the model it drafts for agrees with.
With --on-policy N, half of each batch comes from N answers the demo model samples itself
(own_answers: chat prompts of random verses, the demo's sampling, 128 tokens each), the
other half from the KJV: a draft guesses at what the model writes, not at scripture.
It writes strata-demo-draft-q8_0.gguf and draft-train-log.json into --out
(the safetensors stay in a temporary directory). The bundled draft took about 31 minutes
on the 2-core VM (6 to make the answers, 25 to train):
  /root/golden-venv/bin/python tests/demo_model/train.py --draft --steps 2400 --on-policy 4096 \
      --convert /tmp/lcp/llama_cpp_python-0.3.36/vendor/llama.cpp/convert_hf_to_gguf.py
Tokens per pass over the demo's prompt with 8 seeds, sampled as the demo samples, 128 tokens
each: the KJV alone, 1,200 steps: 3.53; with 2,048 of its own answers: 3.88; 2,400 steps
with 4,096 answers: 4.15.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
sys.path.insert(0, str(ROOT / "tests" / "golden"))

LLAMA3_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                  r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|end|>", "<|user|>", "<|assistant|>", "<|system|>", "<|pad|>"]
CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n"
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)
VOCAB = 4096
SEQ = 256
BATCH = 16
CONTEXT = 512
# --on-policy: how the demo model's own answers are made (see own_answers).
GENERATE_BATCH = 128
ANSWER_TOKENS = 128
SAMPLES = [
    "In the beginning God created the heaven and the earth.",
    "The LORD is my shepherd; I shall not want.",
    "Blessed are the meek: for they shall inherit the earth.",
]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def read_kjv() -> list[tuple[str, list[str]]]:
    """Chapters as (title, verses)."""
    out = subprocess.run(["bible", "-l0", "Gen1:1-Rev22:21"], capture_output=True, text=True,
                         stdin=subprocess.DEVNULL, check=True).stdout
    chapters: list[tuple[str, list[str]]] = []
    for line in out.splitlines():
        if not line.strip():
            continue
        m = re.match(r"^\s+(\d+) (.*)$", line)
        if m:
            chapters[-1][1].append(m.group(2).strip())
        else:
            chapters.append((line.strip(), []))
    verses = sum(len(v) for _, v in chapters)
    log(f"KJV: {len(chapters)} chapters, {verses} verses")
    if verses < 31000:
        raise SystemExit(f"expected the whole KJV (31102 verses), got {verses}")
    return chapters


def chat(user: str, answer: str) -> str:
    return f"<|user|>\n{user}<|end|>\n<|assistant|>\n{answer}<|end|>\n"


def documents(chapters: list[tuple[str, list[str]]], rng: random.Random) -> list[str]:
    docs = []
    for title, verses in chapters:
        docs.append(title + "\n" + "\n".join(verses) + "\n\n")
        for i in range(len(verses) - 1):
            take = 1 + (rng.random() < 0.5)
            docs.append(chat(verses[i], " ".join(verses[i + 1:i + 1 + take])))
    rng.shuffle(docs)
    return docs


def own_answers(teacher, tok, chapters, count: int, rng: random.Random) -> list[int]:
    """The demo model's own answers to `count` random verses, sampled as `strata demo`
    samples (temperature 0.7, top-p 0.9, repeat penalty 1.1) and ANSWER_TOKENS long (past
    its end of turn, as a campaign with --ignore-eos runs): the text a draft guesses at when
    the demo runs, which the KJV alone is not. One token stream, prompts included."""
    import torch

    verses = [v for _, vs in chapters for v in vs]
    pad = tok.token_to_id("<|pad|>")
    stream: list[int] = []
    for first in range(0, count, GENERATE_BATCH):
        prompts = [tok.encode(f"<|user|>\n{rng.choice(verses)}<|end|>\n<|assistant|>\n",
                              add_special_tokens=False).ids
                   for _ in range(min(GENERATE_BATCH, count - first))]
        width = max(len(p) for p in prompts)
        ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
        mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
        with torch.no_grad():
            out = teacher.generate(input_ids=ids, attention_mask=mask, do_sample=True,
                                   temperature=0.7, top_p=0.9, repetition_penalty=1.1,
                                   max_new_tokens=ANSWER_TOKENS, min_new_tokens=ANSWER_TOKENS,
                                   pad_token_id=pad)
        for prompt, row in zip(prompts, out.tolist()):
            stream.extend(prompt + row[width:])
        log(f"own answers: {first + len(prompts)}/{count}")
    return stream


def train_tokenizer(docs: list[str]):
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(LLAMA3_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(docs, trainer=trainer)
    if tok.get_vocab_size() != VOCAB:
        raise SystemExit(f"tokenizer has {tok.get_vocab_size()} tokens, wanted {VOCAB}")
    return tok


def write_hf_files(out: Path, tok) -> None:
    out.mkdir(parents=True, exist_ok=True)
    tok.save(str(out / "tokenizer.json"))
    (out / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "eos_token": "<|end|>",
        "pad_token": "<|pad|>",
        "add_bos_token": False,
        "chat_template": CHAT_TEMPLATE,
        "model_max_length": CONTEXT,
    }, indent=2) + "\n")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=900)
    ap.add_argument("--minutes", type=float, default=0.0)
    ap.add_argument("--out", default=str(ROOT / "models" / "demo"))
    ap.add_argument("--convert", help="llama.cpp's convert_hf_to_gguf.py (for the GGUF)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--draft", action="store_true",
                    help="train the draft model (with the demo's tokenizer, from --out)")
    ap.add_argument("--on-policy", type=int, default=0, metavar="N",
                    help="with --draft: half of each batch from N answers the demo model "
                         "samples itself (own_answers), half from the KJV")
    args = ap.parse_args()

    import torch
    import transformers
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    torch.set_num_threads(args.threads)
    rng = random.Random(0)
    out = Path(args.out)

    chapters = read_kjv()
    docs = documents(chapters, rng)
    if args.draft:
        import tempfile
        from tokenizers import Tokenizer
        tok = Tokenizer.from_file(str(out / "tokenizer.json"))
        final = out
        out = Path(tempfile.mkdtemp(prefix="strata-demo-draft-"))
    else:
        tok = train_tokenizer(docs)
    write_hf_files(out, tok)
    ids: list[int] = []
    for enc in tok.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
    data = torch.tensor(ids, dtype=torch.long)
    windows = (len(ids) - 1) // SEQ
    log(f"{len(docs)} documents, {len(ids)} tokens, {windows} windows of {SEQ}")

    end_id = tok.token_to_id("<|end|>")
    size = (dict(hidden_size=128, intermediate_size=384, num_hidden_layers=2,
                 num_attention_heads=4, num_key_value_heads=2) if args.draft else
            dict(hidden_size=256, intermediate_size=768, num_hidden_layers=6,
                 num_attention_heads=8, num_key_value_heads=4))
    config = LlamaConfig(
        vocab_size=VOCAB, **size, head_dim=32,
        max_position_embeddings=CONTEXT, rope_theta=10000.0, rms_norm_eps=1e-5,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=end_id,
        pad_token_id=tok.token_to_id("<|pad|>"), attention_bias=False, mlp_bias=False,
    )
    model = LlamaForCausalLM(config)
    teacher = None
    if args.draft:
        teacher = LlamaForCausalLM.from_pretrained(str(final), torch_dtype=torch.float32).eval()
    policy = None
    if teacher is not None and args.on_policy:
        stream = own_answers(teacher, tok, chapters, args.on_policy, rng)
        policy = torch.tensor(stream, dtype=torch.long)
        log(f"{args.on_policy} own answers, {len(stream)} tokens")
    params = sum(p.numel() for p in model.parameters())
    log(f"model: {params / 1e6:.2f} M parameters")

    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, betas=(0.9, 0.95), weight_decay=0.1)
    warmup = max(1, args.steps // 20)

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        frac = (step - warmup) / max(1, args.steps - warmup)
        return 0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * frac))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    order = torch.randperm(windows, generator=torch.Generator().manual_seed(0))
    curve, start, cursor = [], time.time(), 0
    model.train()
    for step in range(args.steps):
        if cursor + BATCH > windows:
            order = torch.randperm(windows, generator=torch.Generator().manual_seed(step))
            cursor = 0
        starts = order[cursor:cursor + BATCH] * SEQ
        cursor += BATCH
        batch = torch.stack([data[s:s + SEQ + 1] for s in starts.tolist()])
        if policy is not None:
            # Half the batch from the model's own answers, at random offsets.
            half = BATCH // 2
            picks = torch.randint(0, len(policy) - SEQ - 1, (half,),
                                  generator=torch.Generator().manual_seed(10_000 + step))
            batch[half:] = torch.stack([policy[s:s + SEQ + 1] for s in picks.tolist()])
        logits = model(input_ids=batch[:, :-1]).logits
        if teacher is None:
            loss = torch.nn.functional.cross_entropy(logits.reshape(-1, VOCAB), batch[:, 1:].reshape(-1))
        else:
            with torch.no_grad():
                target = torch.log_softmax(teacher(input_ids=batch[:, :-1]).logits, dim=-1)
            loss = torch.nn.functional.kl_div(torch.log_softmax(logits, dim=-1).reshape(-1, VOCAB),
                                              target.reshape(-1, VOCAB), log_target=True,
                                              reduction="batchmean")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        elapsed = time.time() - start
        if step % 25 == 0 or step == args.steps - 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(elapsed, 1)})
            log(f"step {step}/{args.steps} loss {float(loss):.3f} lr {sched.get_last_lr()[0]:.2e} "
                f"{elapsed / (step + 1):.2f} s/step, {elapsed / 60:.1f} min")
        if args.minutes and elapsed > args.minutes * 60:
            log(f"stopping after {elapsed / 60:.1f} minutes at step {step}")
            break

    model.eval()
    samples = []
    for prompt in SAMPLES:
        text = f"<|user|>\n{prompt}<|end|>\n<|assistant|>\n"
        prompt_ids = torch.tensor([tok.encode(text, add_special_tokens=False).ids])
        with torch.no_grad():
            gen = model.generate(prompt_ids, max_new_tokens=48, do_sample=False, eos_token_id=end_id)
        answer = tok.decode(gen[0, prompt_ids.shape[1]:].tolist(), skip_special_tokens=True)
        samples.append({"prompt": prompt, "greedy_answer": answer})
        log(f"{prompt!r} -> {answer!r}")

    model = model.to(torch.float16)
    model.save_pretrained(str(out), safe_serialization=True)
    log_name = "draft-train-log.json" if args.draft else "train-log.json"
    ((final if args.draft else out) / log_name).write_text(json.dumps({
        "parameters": params, "tokens": len(ids), "batch": BATCH, "seq": SEQ,
        "steps_planned": args.steps, "on_policy_answers": args.on_policy,
        "curve": curve, "samples": samples,
        "torch": torch.__version__, "transformers": transformers.__version__,
    }, indent=1) + "\n")
    if args.convert:
        from make_golden import CONVERT_WRAPPER
        gguf = final / "strata-demo-draft-q8_0.gguf" if args.draft else out / "strata-demo-q8_0.gguf"
        cmd = [sys.executable, "-c", CONVERT_WRAPPER, args.convert, "llama-bpe", str(out),
               "--outtype", "q8_0", "--outfile", str(gguf)]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            log(res.stdout + res.stderr)
            raise SystemExit("llama.cpp's converter failed")
        log(f"wrote {gguf} ({gguf.stat().st_size} bytes)")


if __name__ == "__main__":
    main()
