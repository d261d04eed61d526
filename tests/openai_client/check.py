#!/usr/bin/env python3
"""Strata's OpenAI-compatible API as the official `openai` Python client sees it.

Run by `cli/tests/http.rs` (`the_official_openai_python_client_works`) against a real
cluster; CI installs the client (`pip install openai prometheus_client`, see .ci/run).
By hand:
    python3 tests/openai_client/check.py http://127.0.0.1:7434 KEY MODEL_ID

It checks, and exits non-zero with the reason on the first failure:
- models.list() names the served model;
- a whole chat completion has text, finish_reason and usage;
- a streamed chat completion's deltas add up to the same text (greedy), ending with usage;
- a bad request (temperature -1) raises openai.BadRequestError (400);
- a client without the key, or with a wrong one, raises openai.AuthenticationError (401);
- /metrics parses with prometheus_client's own parser, and its token counters moved.
"""

import sys
import urllib.request

import openai
from prometheus_client.parser import text_string_to_metric_families


def metrics(base: str, key: str) -> dict:
    # With an API key, /metrics needs it too (as a Prometheus scrape config sends it).
    request = urllib.request.Request(base + "/metrics", headers={"Authorization": f"Bearer {key}"})
    text = urllib.request.urlopen(request, timeout=30).read().decode()
    values = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            key = sample.name + "".join(f"|{k}={v}" for k, v in sorted(sample.labels.items()))
            values[key] = sample.value
    return values


def check(cond: bool, what: str) -> None:
    if not cond:
        raise SystemExit(f"FAILED: {what}")
    print(f"ok: {what}", flush=True)


def main() -> None:
    base, key, model = sys.argv[1], sys.argv[2], sys.argv[3]
    before = metrics(base, key)
    check("strata_generated_tokens_total" in before, "/metrics parses as Prometheus text")

    client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=120)
    ids = [m.id for m in client.models.list()]
    check(ids == [model], f"models.list() gives {ids}")

    messages = [{"role": "user", "content": "Hello there"}]
    whole = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                           temperature=0)
    choice = whole.choices[0]
    check(whole.object == "chat.completion", "a whole chat completion")
    check(choice.finish_reason in ("stop", "length"), f"finish_reason {choice.finish_reason}")
    check(whole.usage.completion_tokens > 0 and whole.usage.prompt_tokens > 0,
          f"usage {whole.usage}")

    stream = client.chat.completions.create(model=model, messages=messages, max_tokens=8,
                                            temperature=0, stream=True,
                                            stream_options={"include_usage": True})
    text, usage, finish = "", None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
    check(text == choice.message.content,
          f"streamed text {text!r} equals the whole one {choice.message.content!r}")
    check(finish == choice.finish_reason, "the stream ends with the same finish_reason")
    check(usage is not None and usage.completion_tokens == whole.usage.completion_tokens,
          "the stream's usage chunk")

    try:
        client.chat.completions.create(model=model, messages=messages, temperature=-1)
        check(False, "a bad request is refused")
    except openai.BadRequestError as e:
        check(e.status_code == 400 and "temperature" in str(e), f"a bad request: 400 ({e})")

    # The client insists on a key, so "missing" is the Authorization header left out.
    for label, wrong, headers in (("a missing key", "unused", {"Authorization": openai.Omit()}),
                                  ("a wrong key", "wrong", None)):
        try:
            other = openai.OpenAI(base_url=base + "/v1", api_key=wrong, max_retries=0)
            other.chat.completions.create(model=model, messages=messages, max_tokens=2,
                                          extra_headers=headers)
            check(False, f"{label} is refused")
        except openai.AuthenticationError as e:
            check(e.status_code == 401 and "API key" in str(e), f"{label}: 401 ({e})")

    after = metrics(base, key)
    grew = after["strata_generated_tokens_total"] - before["strata_generated_tokens_total"]
    check(grew >= 2 * whole.usage.completion_tokens,
          f"strata_generated_tokens_total grew by {grew}")
    check(after["strata_prompt_tokens_total"] > before["strata_prompt_tokens_total"],
          "strata_prompt_tokens_total grew")
    print("all checks passed")


if __name__ == "__main__":
    main()
