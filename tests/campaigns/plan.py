#!/usr/bin/env python3
"""Planning campaigns: does the plan's estimate match what the cluster measures, and does
the plan keep a slow link off the path? Figures for the closing notes of issues, never CI
(CI runs the short tests: coordinator/src/planner.rs, cli/tests/cluster.rs, cli/tests/lan.rs).

Both use the 1B shape (Llama 3.2 1B's sizes, synthetic weights, Q4_0 GGUF) on three
workers, a release build, and the cluster helpers of heal.py. Standard library only.

    cargo build --release -p strata
    python3 tests/campaigns/plan.py calibrate   # loopback, workers measure their speed:
                                                # the estimate before and after calibration
                                                # against the ms/token a client measures
    python3 tests/campaigns/plan.py links       # as root: 4 hosts on a bridge, w1<->w2 capped
                                                # at 100 Mbit/s with tc tbf; the plan with
                                                # links measured against --no-link-probe
                                                # (the 1B shape cut to --layers 3)

Options: --strata PATH (default target/release/strata), --runs N (default 3).
"""

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heal  # noqa: E402  (the cluster helpers)
from heal import Cluster, Lan, Stream, log, sh  # noqa: E402


def synth_1b(path, layers=None):
    extra = ["--layers", str(layers)] if layers else []
    subprocess.run([heal.STRATA, "model", "synth", "--preset", "llama-3.2-1b", "--seed", "3",
                    "--format", "gguf", "--quant", "q4_0", *extra, "--out", path],
                   check=True, capture_output=True)


def decode_ms(cluster, tokens=64):
    """A greedy single stream: milliseconds between its tokens after the first."""
    s = Stream(cluster.http, {"prompt": "The plan for tonight", "max_tokens": tokens,
                              "temperature": 0, "stream": True, "ignore_eos": True})
    _, finish, err = s.join()
    if err or finish != "length":
        raise RuntimeError(f"the answer failed: {err} {finish}")
    times = [t for t, _ in s.events]
    return (times[-1] - times[0]) / (len(times) - 1) * 1e3


def first_token_s(cluster, words):
    """Seconds from sending a long prompt to its first token."""
    prompt = " ".join(f"harbour{i % 50}" for i in range(words))
    start = time.time()
    s = Stream(cluster.http, {"prompt": prompt, "max_tokens": 1, "temperature": 0,
                              "stream": True})
    _, finish, err = s.join()
    if err:
        raise RuntimeError(f"the long prompt failed: {err}")
    return s.events[0][0] - start


def plan_of(status):
    p = status["plan"]
    return (" → ".join(f"{s['worker']}[{s['layers'][0]}..{s['layers'][1]}]" for s in p["stages"]),
            p["est_ms_per_token"])


def calibrate(args):
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth_1b(model)
    c = Cluster(model, 3)
    try:
        before = c.wait_serving(3)
        order, est = plan_of(before)
        log(f"plan {order}: estimated {est:.1f} ms/token before calibration "
            f"(speeds from each worker's copy benchmark)")
        measured = [decode_ms(c) for _ in range(args.runs)]
        after = c.wait("every stage measured", lambda s: s["plan"]["calibrated_ms_per_token"] > 0)
        stages = after["plan"]["stages"]
        for s in stages:
            log(f"  {s['worker']}: estimated {s['est_ms_per_token']:.2f} ms, "
                f"measured {s['measured_ms_per_token']:.2f} ms")
        cal = after["plan"]["calibrated_ms_per_token"]
        m = statistics.median(measured)
        log(f"client measured {', '.join(f'{x:.1f}' for x in measured)} ms/token (median {m:.1f})")
        log(f"estimate before calibration {est:.1f} ms/token ({est / m:.2f}x the measurement); "
            f"after {cal:.1f} ms/token ({cal / m:.2f}x)")
    finally:
        c.close()


def links(args):
    if os.geteuid() != 0:
        sys.exit("the links campaign needs root (network namespaces, tc)")
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    # The 1B shape with one layer per worker: a hop (8 KiB of f32 activations a token)
    # weighs against little compute, so what the link costs shows through the noise of
    # this machine.
    synth_1b(model, args.layers)
    results = {}
    for label, serve_args in [("links measured", []), ("--no-link-probe", ["--no-link-probe"])]:
        net = Lan(4)
        try:
            for a, b in [(1, 2), (2, 1)]:
                cap(net, a, b, "100mbit")
            prefixes = {i: net.prefix(i) for i in range(4)}
            prefixes["mode"] = "mdns"
            c = Cluster(model, 3, prefixes=prefixes, listen="0.0.0.0:7433",
                        reach=f"{net.subnet}.1", serve_args=serve_args,
                        worker_args=["--speed", "5e9"])
            try:
                status = c.wait_serving(3, timeout=180)
                order, est = plan_of(status)
                for l in status.get("links", []):
                    log(f"  link {l['a']}–{l['b']}: {l['bandwidth_bytes_per_second'] * 8e-6:.0f} "
                        f"Mbit/s, {l['latency_ms']:.2f} ms")
                decode = statistics.median(decode_ms(c) for _ in range(args.runs))
                ttft = statistics.median(first_token_s(c, 150) for _ in range(args.runs))
                results[label] = (decode, ttft)
                log(f"{label}: plan {order} (estimated {est:.1f} ms/token); measured "
                    f"{decode:.1f} ms/token, first token of a 150-word prompt in {ttft:.2f} s")
            finally:
                c.close()
        finally:
            net.close()
    (d1, t1), (d2, t2) = results["links measured"], results["--no-link-probe"]
    log(f"avoiding the capped link: decode {d2 / d1:.2f}x faster, "
        f"long-prompt first token {t2 / t1:.2f}x faster than the plan that crosses it")


def cap(net, src, dst, rate):
    """Caps what host `src` sends to host `dst` (htb, with a tbf under the capped class)."""
    ns = net.hosts[src]
    tc = ["ip", "netns", "exec", ns, "tc"]
    sh(*tc, "qdisc", "add", "dev", "eth0", "root", "handle", "1:", "htb", "default", "10")
    for cls in ["1:10", "1:20"]:
        sh(*tc, "class", "add", "dev", "eth0", "parent", "1:", "classid", cls, "htb",
           "rate", "20gbit", "quantum", "60000")
    sh(*tc, "qdisc", "add", "dev", "eth0", "parent", "1:20", "handle", "20:", "tbf",
       "rate", rate, "burst", "32kb", "latency", "100ms")
    sh(*tc, "filter", "add", "dev", "eth0", "parent", "1:", "protocol", "ip", "prio", "1",
       "u32", "match", "ip", "dst", f"{net.subnet}.{dst + 1}/32", "flowid", "1:20")


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", choices=["calibrate", "links"])
    p.add_argument("--strata", default=heal.STRATA)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--layers", type=int, default=3, help="layers of the links campaign's model")
    args = p.parse_args()
    heal.STRATA = os.path.abspath(args.strata)
    {"calibrate": calibrate, "links": links}[args.campaign](args)


if __name__ == "__main__":
    main()
