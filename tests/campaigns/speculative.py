#!/usr/bin/env python3
"""Speculative decoding through a real cluster: the same requests with and without drafts,
on the same model and workers' machine, in one run. Figures go in the closing notes of
issues, never in CI (CI checks the tokens in coordinator/tests/simulated_pipeline.rs and
cli/tests/cluster.rs).

For each draft setting it starts `strata serve` (with the setting's flags) and three
`strata worker`s on loopback, waits for a three-stage plan, sends each prompt through
`strata generate --coordinator --json` (greedy), and reports per setting: the decode rate
(tokens/s after the first token, best of --trials), the acceptance rate, the tokens per
pass, and whether the tokens equal those of the run without drafts. The settings
alternate trial by trial, so a noisy neighbour slows both alike.

    cargo build --release -p strata
    python3 tests/campaigns/speculative.py --model SmolLM2-135M-Instruct.Q4_1.gguf --draft ngram
    python3 tests/campaigns/speculative.py --draft-model tests/demo_model/draft.gguf

With --clients N (N > 1) it sends N requests at once per trial instead, and compares the
total throughput (all generated tokens over the wall time from the first request to the
last answer); the tokens must still match request by request.

With --sampling (the demo's, say) the answers are sampled, and not compared. With --seeds N
as well, each trial sends the prompt once per seed 1..N to each setting (back to back) and
compares the total decode rates: one seed's answer is one draw, and how many drafts a draw
keeps varies a lot from draw to draw (on the demo from 47% to 73% of them).

With --demo it measures `strata demo` itself, with and without its draft (--no-draft): the
demo's three workers are tasks of one process sharing its compute threads, where three
`strata worker` processes on one machine each start a thread per core.

With --draft-on worker the draft model runs on the last stage's worker; with
--against-coordinator as well, the baseline ("plain") is the same drafts made on the
coordinator instead of no drafts, so the ratio compares the two placements.

The default prompt asks a chat model to repeat a paragraph (prompt lookup's best case);
--prompt gives another. Standard library only; shares heal.py's cluster harness.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heal  # noqa: E402  (the cluster harness)

PARAGRAPH = (
    "The river rises in the hills above the town, runs past the old mill and the school, "
    "and reaches the sea at a harbour where the fishing boats come in each evening. In "
    "spring the water is high and brown; by late summer it is clear and slow, and children "
    "wade across it below the bridge."
)
REPEAT = f"Repeat this paragraph exactly, word for word:\n\n{PARAGRAPH}"


IGNORE_EOS = False
SAMPLING: list[str] = []


def generate(cluster, prompt, max_tokens, chat):
    cmd = [heal.STRATA, "generate", "--coordinator", cluster.api, "--prompt", prompt,
           "--max-tokens", str(max_tokens), "--json", *SAMPLING]
    if IGNORE_EOS:
        cmd.append("--ignore-eos")
    if chat:
        cmd.append("--chat")
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if out.returncode != 0:
        raise RuntimeError(f"generate failed: {out.stderr[-2000:]}")
    return json.loads(out.stdout)


class Demo:
    """`strata demo` itself, serving until closed: its coordinator and workers share one
    process and one pool of compute threads, as a user running the demo has them."""

    def __init__(self, port, extra):
        self.api = f"127.0.0.1:{port}"
        self.proc = heal.Proc("demo", [heal.STRATA, "demo", "--no-mdns", "--max-tokens", "8",
                                       "--listen", self.api, "--http", f"127.0.0.1:{port + 1}",
                                       *extra])

    def wait_serving(self, stages=None):
        self.proc.wait_for("Serving until Ctrl-C", timeout=300)

    def close(self):
        self.proc.kill()


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--model", default="tests/demo_model/model.gguf")
    p.add_argument("--draft", help="ngram")
    p.add_argument("--draft-model")
    p.add_argument("--prompt", default=REPEAT)
    p.add_argument("--no-chat", action="store_true", help="send the prompt as it is")
    p.add_argument("--max-tokens", type=int, default=96)
    p.add_argument("--trials", type=int, default=3)
    p.add_argument("--workers", type=int, default=3)
    p.add_argument("--clients", type=int, default=1)
    p.add_argument("--ignore-eos", action="store_true", help="always generate --max-tokens")
    p.add_argument("--sampling", default="",
                   help="sampling flags for `strata generate` (greedy without), e.g. the demo's: "
                        "'--temperature 0.7 --top-p 0.9 --repeat-penalty 1.1 --seed 1'; sampled "
                        "answers with and without drafts are different draws, so not compared")
    p.add_argument("--draft-max", type=int, help="most drafts per step (serve's default without)")
    p.add_argument("--seeds", type=int, default=0,
                   help="with --sampling: each trial sends the prompt with seeds 1..N and "
                        "compares the settings' total decode rates")
    p.add_argument("--demo", action="store_true",
                   help="measure `strata demo` (bundled model, its draft; --no-draft for the plain "
                        "setting) instead of `strata serve` with three worker processes")
    p.add_argument("--draft-on", choices=["coordinator", "worker"],
                   help="where the draft model runs (serve's default without)")
    p.add_argument("--against-coordinator", action="store_true",
                   help="the baseline drafts on the coordinator (and the measured setting on the "
                        "last stage's worker) instead of drafting nothing")
    p.add_argument("--strata", default=heal.STRATA)
    a = p.parse_args()
    heal.STRATA = a.strata
    global IGNORE_EOS, SAMPLING
    IGNORE_EOS = a.ignore_eos
    SAMPLING = a.sampling.split()
    flags = ["--draft", a.draft] if a.draft else ["--draft-model", a.draft_model]
    if a.draft_max:
        flags += ["--draft-max", str(a.draft_max)]
    if a.demo:
        flags = ["--draft-max", str(a.draft_max)] if a.draft_max else []
    base = list(flags)
    if a.draft_on:
        flags += ["--draft-on", a.draft_on]
    if a.against_coordinator:
        settings = [("plain", [*base, "--draft-on", "coordinator"]),
                    ("drafted", [*base, "--draft-on", "worker"])]
    elif a.demo:
        settings = [("plain", ["--no-draft"]), ("drafted", flags)]
    else:
        settings = [("plain", []), ("drafted", flags)]
    clusters = {}
    try:
        for i, (name, extra) in enumerate(settings):
            if a.demo:
                c = Demo(17433 + 2 * i, extra)
            else:
                c = heal.Cluster(a.model, a.workers, serve_args=["--kv-tokens", "2048", *extra])
            clusters[name] = c  # closed below even if it never serves
            c.wait_serving(stages=a.workers)
        if a.clients > 1:
            return concurrent(a, clusters, settings)
        if a.seeds > 0:
            return over_seeds(a, clusters, settings, flags)
        best = {name: None for name, _ in settings}
        ratios = []
        for trial in range(a.trials):
            rates = {}
            for name, _ in settings:
                r = generate(clusters[name], a.prompt, a.max_tokens, not a.no_chat)
                t = r["timings"]
                rates[name] = t["decode_tokens_per_s"]
                heal.log(f"trial {trial + 1} {name}: {t['generated_tokens']} tokens at "
                         f"{t['decode_tokens_per_s']:.1f}/s, drafts {t['accepted_draft_tokens']}"
                         f"/{t['draft_tokens']}, {t['tokens_per_pass']:.2f} per pass")
                if best[name] is None or t["decode_tokens_per_s"] > best[name]["timings"]["decode_tokens_per_s"]:
                    best[name] = r
            # Each trial's pair ran back to back: their ratio shares the host's load of
            # the moment, and the median of them is steadier than a ratio of bests.
            ratios.append(rates["drafted"] / rates["plain"])
        plain, drafted = best["plain"], best["drafted"]
        same = plain["tokens"] == drafted["tokens"] or bool(SAMPLING)
        ratio = drafted["timings"]["decode_tokens_per_s"] / plain["timings"]["decode_tokens_per_s"]
        t = drafted["timings"]
        heal.log(json.dumps({
            "model": os.path.basename(a.model), "drafts": " ".join(flags), "workers": a.workers,
            "tokens": len(plain["tokens"]),
            "same_tokens": None if SAMPLING else same,
            "plain_decode_tokens_per_s": round(plain["timings"]["decode_tokens_per_s"], 2),
            "drafted_decode_tokens_per_s": round(t["decode_tokens_per_s"], 2),
            "speedup": round(ratio, 3),
            "median_trial_speedup": round(sorted(ratios)[len(ratios) // 2], 3),
            "acceptance_rate": round(t["acceptance_rate"], 3),
            "tokens_per_pass": round(t["tokens_per_pass"], 3),
        }))
        if not same:
            heal.log("plain:  ", plain["text"])
            heal.log("drafted:", drafted["text"])
            sys.exit(1)
    finally:
        for c in clusters.values():
            c.close()


def over_seeds(a, clusters, settings, flags):
    global SAMPLING
    base = SAMPLING
    ratios, totals = [], {name: [0, 0.0, 0, 0, 0] for name, _ in settings}
    for trial in range(a.trials):
        trial_totals = {name: [0, 0.0] for name, _ in settings}
        for seed in range(1, a.seeds + 1):
            SAMPLING = [*base, "--seed", str(seed)]
            for name, _ in settings:
                t = generate(clusters[name], a.prompt, a.max_tokens, not a.no_chat)["timings"]
                seconds = t["generated_tokens"] / t["decode_tokens_per_s"]
                for acc in (trial_totals[name], totals[name]):
                    acc[0] += t["generated_tokens"]
                    acc[1] += seconds
                totals[name][2] += t["draft_tokens"]
                totals[name][3] += t["accepted_draft_tokens"]
                totals[name][4] += t.get("passes", 0)
        rates = {name: n / secs for name, (n, secs) in trial_totals.items()}
        heal.log(f"trial {trial + 1}: " + ", ".join(f"{k} {v:.1f} tok/s" for k, v in rates.items())
                 + f", ratio {rates['drafted'] / rates['plain']:.3f}")
        ratios.append(rates["drafted"] / rates["plain"])
    SAMPLING = base
    tokens, secs, drafts, kept, passes = totals["drafted"]
    plain_rate = totals["plain"][0] / totals["plain"][1]
    heal.log(json.dumps({
        "model": os.path.basename(a.model), "drafts": " ".join(flags), "workers": a.workers,
        "seeds": a.seeds, "trials": a.trials, "tokens_per_answer": a.max_tokens,
        "plain_decode_tokens_per_s": round(plain_rate, 2),
        "drafted_decode_tokens_per_s": round(tokens / secs, 2),
        "speedup": round(tokens / secs / plain_rate, 3),
        "median_trial_speedup": round(sorted(ratios)[len(ratios) // 2], 3),
        "trial_speedups": [round(r, 3) for r in ratios],
        "acceptance_rate": round(kept / drafts, 3) if drafts else None,
        "tokens_per_pass": round(tokens / passes, 3) if passes else None,
    }))


def concurrent(a, clusters, settings):
    # Each client a slightly different prompt, so that no two answers are one.
    prompts = [f"{a.prompt} ({i + 1})" for i in range(a.clients)]
    best, answers = {}, {}
    for trial in range(a.trials):
        for name, _ in settings:
            start = time.time()
            with ThreadPoolExecutor(a.clients) as pool:
                results = list(pool.map(
                    lambda q: generate(clusters[name], q, a.max_tokens, not a.no_chat), prompts))
            wall = time.time() - start
            tokens = sum(len(r["tokens"]) for r in results)
            rate = tokens / wall
            drafted = sum(r["timings"]["draft_tokens"] for r in results)
            accepted = sum(r["timings"]["accepted_draft_tokens"] for r in results)
            heal.log(f"trial {trial + 1} {name}: {a.clients} clients, {tokens} tokens in {wall:.2f} s "
                     f"= {rate:.1f}/s, drafts {accepted}/{drafted}")
            best[name] = max(best.get(name, 0.0), rate)
            answers[name] = [r["tokens"] for r in results]
    same = answers["plain"] == answers["drafted"] or bool(SAMPLING)
    heal.log(json.dumps({
        "model": os.path.basename(a.model), "clients": a.clients, "same_tokens": same,
        "plain_tokens_per_s": round(best["plain"], 2),
        "drafted_tokens_per_s": round(best["drafted"], 2),
        "ratio": round(best["drafted"] / best["plain"], 3),
    }))
    if not same:
        sys.exit(1)


if __name__ == "__main__":
    main()
