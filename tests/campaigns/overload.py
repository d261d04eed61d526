#!/usr/bin/env python3
"""Overload campaigns: a cluster under more than it can hold answers or refuses every
request cleanly, within the memory its plan counted. Figures for the closing note of the
overload issue, never CI (CI runs cli/tests/http.rs's burst test and the unit tests).

Each starts real `strata serve` and two `strata worker` processes (a release build, the
cluster helpers of heal.py) on loopback. Standard library only.

    cargo build --release -p strata
    python3 tests/campaigns/overload.py burst  # 100 concurrent completions (256-token prompts,
                                               # 64 new tokens), --kv-tokens 1024: statuses,
                                               # Retry-After, each worker's VmHWM against its plan
    python3 tests/campaigns/overload.py long   # a 70,000-token prompt on a 131,072-context
                                               # 4-layer model (the tiny shape): time to answer
    python3 tests/campaigns/overload.py soak   # 1,000 requests: normal, over-long, malformed,
                                               # abandoned streams and clients that never read;
                                               # the normal ones' latency against the normal
                                               # clients alone (same arrivals), memory

Options: --strata PATH (default target/release/strata), --requests N, --seed S.
"""

import argparse
import http.client
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import heal  # noqa: E402  (the cluster helpers)
from heal import Cluster, log  # noqa: E402


def synth(path, *, layers=4, hidden=256, heads=4, kv_heads=2, intermediate=768, vocab=4096,
          context=4096, quant="q8_0"):
    subprocess.run([heal.STRATA, "model", "synth", "--arch", "llama", "--layers", str(layers),
                    "--hidden", str(hidden), "--heads", str(heads), "--kv-heads", str(kv_heads),
                    "--intermediate", str(intermediate), "--vocab", str(vocab),
                    "--context", str(context), "--seed", "5", "--format", "gguf",
                    "--quant", quant, "--out", path], check=True, capture_output=True)


def post(addr, path, body, timeout=300, raw=None):
    """One request: (status, headers, body bytes, seconds)."""
    host, port = addr.rsplit(":", 1)
    start = time.time()
    c = http.client.HTTPConnection(host, int(port), timeout=timeout)
    data = raw if raw is not None else json.dumps(body)
    c.request("POST", path, data, {"Content-Type": "application/json"})
    r = c.getresponse()
    out = r.read()
    return r.status, dict(r.getheaders()), out, time.time() - start


def get(addr, path):
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=30)
    c.request("GET", path)
    r = c.getresponse()
    return r.status, r.read().decode()


def planned_bytes(cluster):
    """Each worker's planned memory (weights, KV, overhead, load transient)."""
    return {s["worker"]: s["memory_bytes"] for s in cluster.status()["plan"]["stages"]}


def memory_report(cluster):
    planned = planned_bytes(cluster)
    worst = 0.0
    for wid, proc in cluster.workers.items():
        hwm = proc.vm_hwm()
        ratio = hwm / planned[wid] if planned.get(wid) else float("nan")
        worst = max(worst, ratio)
        log(f"  {wid}: VmHWM {hwm / 2**20:.1f} MiB, planned {planned.get(wid, 0) / 2**20:.1f} MiB"
            f" ({ratio:.2f}x)")
    return worst


def burst(args):
    model = os.path.join(heal.tempfile.mkdtemp(), "m.gguf")
    synth(model)
    cluster = Cluster(model, 2, serve_args=["--kv-tokens", "1024"])
    try:
        cluster.wait_serving(2)
        # One request first, so the baseline has run a forward (thread pools, buffers).
        post(cluster.http, "/v1/completions", {"prompt": "warm", "max_tokens": 2})
        log("  loaded and warm, before the burst:")
        memory_report(cluster)
        rng = random.Random(args.seed)
        results = [None] * args.requests

        def one(i):
            prompt = [rng.randrange(3, 4000) for _ in range(256)]
            results[i] = post(cluster.http, "/v1/completions",
                              {"prompt": prompt, "max_tokens": 64, "ignore_eos": True,
                               "temperature": 0})
        start = time.time()
        threads = [threading.Thread(target=one, args=(i,)) for i in range(args.requests)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(600)
        took = time.time() - start
        statuses = {}
        for status, headers, body, _ in results:
            statuses[status] = statuses.get(status, 0) + 1
            if status in (429, 503) and "retry-after" not in {k.lower() for k in headers}:
                log(f"  a {status} without Retry-After: {body[:200]!r}")
        hung = sum(1 for r in results if r is None)
        log(f"burst: {args.requests} requests in {took:.1f} s: {statuses}, {hung} hung")
        worst = memory_report(cluster)
        health, _ = get(cluster.http, "/health")
        log(f"  worst VmHWM / planned: {worst:.2f}x; /health {health}")
    finally:
        cluster.close()


def long(args):
    model = os.path.join(heal.tempfile.mkdtemp(), "m.gguf")
    synth(model, hidden=64, heads=4, kv_heads=2, intermediate=128, vocab=512, context=131072,
          quant="q8_0")
    cluster = Cluster(model, 2, serve_args=["--kv-tokens", "72000"])
    try:
        cluster.wait_serving(2)
        rng = random.Random(args.seed)
        prompt = [rng.randrange(3, 500) for _ in range(70_000)]
        status, _, body, took = post(cluster.http, "/v1/completions",
                                     {"prompt": prompt, "max_tokens": 8, "temperature": 0},
                                     timeout=600)
        detail = json.loads(body)
        if status == 200:
            log(f"long: 70,000-token prompt answered in {took:.1f} s: "
                f"{detail['usage']['completion_tokens']} tokens")
        else:
            log(f"long: HTTP {status} after {took:.1f} s: {detail['error']['message']}")
        memory_report(cluster)
        # Past the context: refused at once.
        status, _, body, took = post(cluster.http, "/v1/completions",
                                     {"prompt": prompt * 2, "max_tokens": 8})
        log(f"  140,000 tokens: HTTP {status} in {took:.2f} s: "
            f"{json.loads(body)['error']['message'][:160]}")
    finally:
        cluster.close()


def normal_latency(addr, n=5):
    took = []
    for i in range(n):
        status, _, _, t = post(addr, "/v1/completions",
                               {"prompt": f"The harbour at dawn {i}", "max_tokens": 16,
                                "ignore_eos": True, "temperature": 0})
        if status == 200:
            took.append(t)
    return statistics.median(took) if took else float("nan")


def never_reads(addr, body):
    """Sends a streamed request and never reads the answer; holds the socket a while."""
    host, port = addr.rsplit(":", 1)
    s = socket.create_connection((host, int(port)))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    data = json.dumps(body).encode()
    s.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
              + f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    return s


def abandons(addr, body):
    """Reads the first few events of a stream, then hangs up."""
    host, port = addr.rsplit(":", 1)
    c = http.client.HTTPConnection(host, int(port), timeout=60)
    c.request("POST", "/v1/completions", json.dumps(body), {"Content-Type": "application/json"})
    r = c.getresponse()
    if r.status == 200:
        for _ in range(3):
            r.readline()
    c.close()
    return r.status


def load(cluster, args, kinds, seed):
    """`args.requests` requests of the given kinds, at most 24 at once, arriving 0-20 ms
    apart. Returns the outcomes by kind and status, the normal requests' latencies, and
    the sockets of the clients that never read (to close once the run is over)."""
    rng = random.Random(seed)
    outcomes, lat, held = {}, [], []
    lock = threading.Lock()

    def one(i, kind):
        body = {"prompt": f"Request {i} about the harbour", "max_tokens": 24,
                "ignore_eos": True, "temperature": 0.7, "stream": kind != "normal"}
        try:
            if kind == "normal":
                status, _, _, t = post(cluster.http, "/v1/completions", body)
                if status == 200:
                    with lock:
                        lat.append(t)
            elif kind == "overlong":
                body["prompt"] = [5] * 3000
                status = post(cluster.http, "/v1/completions", body)[0]
            elif kind == "malformed":
                status = post(cluster.http, "/v1/completions", None,
                              raw=rng.choice(['{"prompt": [1,2', '{"prompt": "x", "max_tokens": -3}',
                                              '{"prompt": [999999999]}', 'null']))[0]
            elif kind == "abandon":
                status = abandons(cluster.http, body)
            else:
                body["max_tokens"] = 400
                with lock:
                    held.append(never_reads(cluster.http, body))
                status = "sent"
        except Exception as e:  # counted, the soak goes on
            status = f"error {type(e).__name__}"
        with lock:
            key = f"{kind}:{status}"
            outcomes[key] = outcomes.get(key, 0) + 1

    threads = []
    for i in range(args.requests):
        t = threading.Thread(target=one, args=(i, rng.choice(kinds)))
        t.start()
        threads.append(t)
        time.sleep(rng.uniform(0, 0.02))
        if len(threads) >= 24:
            threads.pop(0).join(600)
    for t in threads:
        t.join(600)
    return outcomes, lat, held


class Sampler:
    """Polls /metrics every half second: the queue's depth, KV positions reserved, answers
    running and preempted, so the run says where the time went."""

    def __init__(self, addr):
        self.addr, self.samples, self.stop = addr, [], threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        names = {"strata_queue_depth": "queue", 'strata_kv_positions{kind="reserved"}': "reserved",
                 "strata_active_sequences": "active", "strata_preemptions_total": "preempted"}
        while not self.stop.wait(0.5):
            try:
                _, text = get(self.addr, "/metrics")
            except OSError:
                continue
            row = {}
            for line in text.splitlines():
                series, _, value = line.rpartition(" ")
                if series in names:
                    row[names[series]] = float(value)
            self.samples.append(row)

    def report(self):
        self.stop.set()
        self.thread.join(5)
        for k in ["queue", "reserved", "active"]:
            vals = [r.get(k, 0) for r in self.samples]
            if vals:
                log(f"  {k}: mean {statistics.mean(vals):.1f}, max {max(vals):.0f}")
        if self.samples:
            log(f"  preempted: {self.samples[-1].get('preempted', 0):.0f}")


def soak(args):
    model = os.path.join(heal.tempfile.mkdtemp(), "m.gguf")
    synth(model, context=2048)
    cluster = Cluster(model, 2, serve_args=["--kv-tokens", "2048", "--max-queue", "32",
                                            "--client-timeout", "5s"])
    try:
        cluster.wait_serving(2)
        idle = normal_latency(cluster.http)
        log(f"soak: one normal request alone {idle * 1e3:.0f} ms (median of 5)")
        hwm_start = {w: p.vm_hwm() for w, p in cluster.workers.items()}
        # The normal clients alone, arriving as they will in the mixed run: the baseline.
        normal_share = 5 / 9
        base_args = argparse.Namespace(requests=int(args.requests * normal_share))
        _, base, _ = load(cluster, base_args, ["normal"], args.seed)
        log(f"  normal clients alone: median {statistics.median(base) * 1e3:.0f} ms")
        kinds = ["normal"] * 5 + ["overlong", "malformed", "abandon", "never_reads"]
        sampler = Sampler(cluster.http)
        outcomes, lat, held = load(cluster, args, kinds, args.seed + 1)
        sampler.report()
        log(f"  outcomes: {dict(sorted(outcomes.items()))}")
        log(f"  normal among the others: median {statistics.median(lat) * 1e3:.0f} ms, "
            f"p95 {sorted(lat)[int(len(lat) * 0.95)] * 1e3:.0f} ms "
            f"({statistics.median(lat) / statistics.median(base):.2f}x the normal clients alone, "
            f"{statistics.median(lat) / idle:.2f}x one alone on an idle cluster)")
        # The clients that never read are cancelled after --client-timeout.
        deadline = time.time() + 60
        while time.time() < deadline:
            _, text = get(cluster.http, "/metrics")
            active = [l for l in text.splitlines() if l.startswith("strata_active_sequences ")]
            if active and float(active[0].split()[1]) == 0:
                break
            time.sleep(0.5)
        log(f"  after: {active[0] if active else '?'}; never-reading sockets held: {len(held)}")
        for s in held:
            s.close()
        for w, p in cluster.workers.items():
            log(f"  {w}: VmHWM {hwm_start[w] / 2**20:.1f} -> {p.vm_hwm() / 2**20:.1f} MiB")
        memory_report(cluster)
    finally:
        cluster.close()


def main():
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", choices=["burst", "long", "soak"])
    p.add_argument("--strata", default=heal.STRATA)
    p.add_argument("--requests", type=int, default=None)
    p.add_argument("--seed", type=int, default=7)
    args = p.parse_args()
    heal.STRATA = args.strata
    if args.requests is None:
        args.requests = {"burst": 100, "soak": 1000}.get(args.campaign, 1)
    {"burst": burst, "long": long, "soak": soak}[args.campaign](args)


if __name__ == "__main__":
    main()
