#!/usr/bin/env python3
"""Strata's Ollama API as the official `ollama` Python client sees it.

Run by `cli/tests/http.rs` (`the_official_ollama_python_client_works`) against a real
cluster; CI installs the client (`pip install ollama`, see .ci/run). By hand, against
`strata demo` (its HTTP port is 7434):
    python3 tests/ollama_client/check.py http://127.0.0.1:7434 strata-demo.gguf

It checks, and exits non-zero with the reason on the first failure:
- list() names the served model, with its format, family and quantization;
- show() gives the architecture and context length in model_info;
- ps() lists the model as loaded;
- a whole chat (greedy) has text, done, a done_reason and the token counts;
- a streamed chat's pieces add up to the same text, the last one done with the counts;
- generate() answers, whole and streamed, and returns the tokens as `context`;
- asking for a model the cluster does not serve raises ollama.ResponseError with 404;
- asking for tools raises ollama.ResponseError with 400, saying so.
"""

import sys

import ollama


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def main() -> None:
    base, model = sys.argv[1], sys.argv[2]
    client = ollama.Client(host=base)

    listed = client.list().models
    names = [m.model for m in listed]
    check(model in names, f"list() names {model}: {names}")
    entry = listed[names.index(model)]
    check(entry.details is not None and entry.details.format in ("gguf", "safetensors")
          and bool(entry.details.family) and bool(entry.details.quantization_level),
          f"list() gives format, family and quantization: {entry.details}")
    check(entry.size is not None and entry.size > 0 and entry.modified_at is not None,
          "list() gives a size and a date")

    shown = client.show(model)
    info = shown.modelinfo or {}
    arch = info.get("general.architecture")
    check(bool(arch) and info.get(f"{arch}.context_length", 0) > 0,
          f"show() gives the architecture and context length: {arch}")

    running = [m.model for m in client.ps().models]
    check(model in running, f"ps() lists {model} as loaded: {running}")

    greedy = {"temperature": 0, "num_predict": 12}
    messages = [{"role": "user", "content": "The LORD is my shepherd; I shall not want."}]
    whole = client.chat(model=model, messages=messages, options=greedy)
    check(whole.done and whole.done_reason in ("stop", "length"), f"a whole chat is done: {whole.done_reason}")
    check(bool(whole.message.content) and whole.message.role == "assistant",
          f"a whole chat has the assistant's text: {whole.message.content!r}")
    check(0 < (whole.eval_count or 0) <= 12 and (whole.prompt_eval_count or 0) > 0
          and (whole.total_duration or 0) > 0, "a whole chat counts its tokens and time")

    parts = list(client.chat(model=model, messages=messages, options=greedy, stream=True))
    text = "".join(p.message.content or "" for p in parts)
    check(text == whole.message.content, f"a streamed chat adds up to the same text ({len(parts)} parts)")
    check(parts[-1].done and not any(p.done for p in parts[:-1]), "only the last part is done")
    check(parts[-1].eval_count == whole.eval_count, "the last part counts the tokens")

    generated = client.generate(model=model, prompt="In the beginning", options=greedy)
    check(generated.done and bool(generated.response), f"generate() answers: {generated.response!r}")
    check(len(generated.context or []) > (generated.eval_count or 0),
          "generate() returns the prompt's and the answer's tokens as context")
    pieces = list(client.generate(model=model, prompt="In the beginning", options=greedy, stream=True))
    check("".join(p.response or "" for p in pieces) == generated.response,
          "a streamed generate adds up to the same text")

    try:
        client.chat(model="no-such-model", messages=messages)
        check(False, "an unknown model is refused")
    except ollama.ResponseError as e:
        check(e.status_code == 404 and "not found" in e.error, f"an unknown model is 404: {e.error}")

    tool = {"type": "function", "function": {"name": "f", "description": "d",
                                               "parameters": {"type": "object", "properties": {}}}}
    try:
        client.chat(model=model, messages=messages, tools=[tool])
        check(False, "tools are refused")
    except ollama.ResponseError as e:
        check(e.status_code == 400 and "tool" in e.error, f"tools are refused with 400: {e.error}")

    print("all checks passed")


if __name__ == "__main__":
    main()
