#!/usr/bin/env python3
"""Fault campaigns for a healing Strata cluster: long or repeated runs whose figures go in
the closing notes of issues, never in CI (CI runs the short tests in cli/tests/resilience.rs
and cli/tests/lan.rs, and the simulated pipeline in coordinator/tests).

Each campaign starts real `strata serve` and `strata worker` processes (a release build),
streams answers over the OpenAI-compatible HTTP API, does harm, and checks that every
answer completes with exactly the text of its undisturbed twin (run on the same cluster
before the harm). Standard library only.

    cargo build --release -p strata
    python3 tests/campaigns/heal.py kill      # 6 workers, 12 layers: kill -9 the middle stage after 10 tokens, 3 trials
    python3 tests/campaigns/heal.py stop      # the same with SIGSTOP for 20 s
    python3 tests/campaigns/heal.py restart   # kill -9 and restart the coordinator: time to serve, bytes re-sent
    python3 tests/campaigns/heal.py change    # a worker joins, then one drains, while 8 clients stream
    python3 tests/campaigns/heal.py lan       # as root: 5 hosts on a bridge (a spare), 8 seeded clients,
                                              # a random worker killed or its link downed at a random token, 20 trials
    python3 tests/campaigns/heal.py soak      # 10 min, 16 clients, a worker killed and restarted every minute

Options: --strata PATH (default target/release/strata), --trials N, --minutes M, --seed S.
"""

import argparse
import http.client
import json
import os
import random
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time

STRATA = "target/release/strata"


def log(*a):
    print(*a, flush=True)


class Proc:
    """A process whose output is collected in the background."""

    def __init__(self, name, args, prefix=()):
        self.name = name
        self.lines = []
        self.p = subprocess.Popen(list(prefix) + list(args), stdout=subprocess.PIPE,
                                  stderr=subprocess.STDOUT, text=True,
                                  env={**os.environ, "NO_COLOR": "1", "NO_PROGRESS": "1"})
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self):
        for line in self.p.stdout:
            self.lines.append(line)

    def wait_for(self, needle, timeout=60):
        end = time.time() + timeout
        while time.time() < end:
            for l in list(self.lines):
                if needle in l:
                    return l
            time.sleep(0.02)
        raise RuntimeError(f"{self.name} never printed {needle!r}:\n{''.join(self.lines[-40:])}")

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()

    def vm_hwm(self):
        try:
            for l in open(f"/proc/{self.p.pid}/status"):
                if l.startswith("VmHWM:"):
                    return int(l.split()[1]) * 1024
        except OSError:
            pass
        return 0


class Cluster:
    def __init__(self, model, workers, *, serve_args=(), worker_args=(), prefixes=None,
                 listen="127.0.0.1:0", reach=None, min_workers=None):
        self.dir = tempfile.mkdtemp(prefix="strata-campaign-")
        self.model, self.serve_args, self.worker_args = model, list(serve_args), list(worker_args)
        self.prefixes = prefixes or {}
        self.state = os.path.join(self.dir, "state")
        out = subprocess.run([STRATA, "token", "create", "--state-dir", self.state],
                             capture_output=True, text=True, check=True)
        self.token = out.stdout.strip()
        self.min_workers = min_workers or workers
        self.coordinator = None
        self.api = self.http = None
        self.start_coordinator(listen, listen.replace(":7433", ":7434"))
        if reach:  # from here, through a bridge
            self.api, self.http = f"{reach}:7433", f"{reach}:7434"
        self.workers = {}
        for i in range(workers):
            self.add_worker(f"w{i + 1}")

    def start_coordinator(self, listen, http):
        # --objective throughput: a stage on every worker, the pipeline being what is tested.
        args = [STRATA, "serve", "--model", self.model, "--listen", listen, "--http", http,
                "--state-dir", self.state, "--min-workers", str(self.min_workers),
                "--objective", "throughput", *self.serve_args]
        if "direct" in self.prefixes.get("mode", "direct"):
            args.append("--no-mdns")
        self.coordinator = Proc("coordinator", args, self.prefixes.get(0, ()))
        line = self.coordinator.wait_for("http on ")
        api = next(l for l in self.coordinator.lines if l.startswith("listening on ")).split()[2]
        self.api, self.http = self.api or api, self.http or line.split()[2]

    def add_worker(self, wid, host=None):
        args = [STRATA, "worker", "--token", self.token, "--id", wid,
                "--cache-dir", os.path.join(self.dir, f"cache-{wid}"), *self.worker_args]
        if "direct" in self.prefixes.get("mode", "direct"):
            args += ["--coordinator", self.api, "--no-mdns", "--bind", "127.0.0.1"]
        prefix = self.prefixes.get(host if host is not None else len(self.workers) + 1, ())
        self.workers[wid] = Proc(wid, args, prefix)

    def status(self):
        out = subprocess.run([STRATA, "cluster", "status", "--json", "--coordinator", self.api],
                             capture_output=True, text=True)
        return json.loads(out.stdout) if out.returncode == 0 else {}

    def wait(self, what, pred, timeout=90):
        end = time.time() + timeout
        while time.time() < end:
            s = self.status()
            if s and pred(s):
                return s
            time.sleep(0.1)
        raise RuntimeError(f"cluster never reached: {what}\n{''.join(self.coordinator.lines[-30:])}")

    def wait_serving(self, stages=None, timeout=90):
        return self.wait(f"serving on {stages} stages", lambda s: s.get("serving") and (
            stages is None or len(s["plan"]["stages"]) == stages), timeout)

    def stage_worker(self, i):
        return self.status()["plan"]["stages"][i]["worker"]

    def bytes_received(self):
        return {w["id"]: w.get("bytes_received", 0) for w in self.status()["workers"]}

    def close(self):
        for w in self.workers.values():
            w.kill()
        if self.coordinator:
            self.coordinator.kill()


class Stream:
    """A streamed completion read on a thread: (arrival time, text) per token."""

    def __init__(self, http_addr, body):
        self.events, self.finish, self.error = [], None, None
        host, port = http_addr.rsplit(":", 1)
        self.t = threading.Thread(target=self._run, args=(host, int(port), body), daemon=True)
        self.t.start()

    def _run(self, host, port, body):
        try:
            c = http.client.HTTPConnection(host, port, timeout=300)
            c.request("POST", "/v1/completions", json.dumps(body),
                      {"Content-Type": "application/json"})
            r = c.getresponse()
            if r.status != 200:
                self.error = f"HTTP {r.status}: {r.read()[:300]!r}"
                return
            while True:
                line = r.readline()
                if not line:
                    break
                line = line.decode().strip()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    break
                e = json.loads(data)
                if "error" in e:
                    self.error = e["error"]["message"]
                    break
                ch = e["choices"][0]
                self.events.append((time.time(), ch.get("text", "")))
                if ch.get("finish_reason"):
                    self.finish = ch["finish_reason"]
        except Exception as ex:  # the campaign reports it as a failed answer
            self.error = repr(ex)

    def wait_tokens(self, n, timeout=120):
        end = time.time() + timeout
        while len(self.events) < n:
            if time.time() > end or not self.t.is_alive():
                raise RuntimeError(f"only {len(self.events)} tokens of {n}: {self.error}")
            time.sleep(0.005)

    def join(self, timeout=300):
        self.t.join(timeout)
        return [t for _, t in self.events], self.finish, self.error

    def longest_gap(self):
        times = [t for t, _ in self.events]
        return max((b - a for a, b in zip(times, times[1:])), default=0.0)


def body(i, n, seeded):
    b = {"prompt": f"Client {i} asks about the harbour", "max_tokens": n, "stream": True,
         "ignore_eos": True}
    b.update({"temperature": 0.8, "top_p": 0.95, "seed": 1000 + i} if seeded else {"temperature": 0})
    return b


def twins(cluster, bodies):
    streams = [Stream(cluster.http, b) for b in bodies]
    out = []
    for s in streams:
        text, finish, err = s.join()
        if err or finish != "length":
            raise RuntimeError(f"a twin failed: {err} {finish}")
        out.append(text)
    return out


def check(streams, twins_, label):
    failed = changed = 0
    for i, (s, twin) in enumerate(zip(streams, twins_)):
        text, finish, err = s.join()
        if err:
            failed += 1
            log(f"  {label}: answer {i} FAILED: {err}")
        elif text != twin:
            changed += 1
            log(f"  {label}: answer {i} CHANGED (finish {finish}, {len(text)} tokens)")
    return failed, changed


def synth(path, layers):
    subprocess.run([STRATA, "model", "synth", "--arch", "llama", "--layers", str(layers),
                    "--hidden", "256", "--heads", "8", "--kv-heads", "2", "--intermediate", "768",
                    "--vocab", "4096", "--seed", "5", "--format", "gguf", "--quant", "q8_0",
                    "--out", path], check=True, capture_output=True)


def fault_middle(args, sig, hold):
    """Six workers, a 12-layer model: harm the middle stage after 10 tokens of a streamed
    greedy 64-token answer; the answer must equal its twin."""
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth(model, 12)
    results = []
    for trial in range(args.trials):
        c = Cluster(model, 6)
        try:
            c.wait_serving(6)
            b = body(0, 64, seeded=False)
            [twin] = twins(c, [b])
            victim = c.workers[c.stage_worker(3)]
            s = Stream(c.http, b)
            s.wait_tokens(10)
            t0 = time.time()
            os.kill(victim.p.pid, sig)
            text, finish, err = s.join()
            last = s.events[-1][0] if s.events else t0
            if sig == signal.SIGSTOP:
                time.sleep(max(0, hold - (time.time() - t0)))
                os.kill(victim.p.pid, signal.SIGCONT)
            ok = err is None and text == twin
            results.append((ok, last - t0, s.longest_gap()))
            log(f"trial {trial + 1}: {'identical' if ok else 'DIFFERENT ' + str(err)}, "
                f"fault to last token {last - t0:.2f}s, longest pause {s.longest_gap():.2f}s")
        finally:
            c.close()
    ok = sum(r[0] for r in results)
    log(f"{ok} of {len(results)} identical; fault to last token: "
        f"{', '.join(f'{r[1]:.2f}s' for r in results)}")


def restart(args):
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth(model, 12)
    c = Cluster(model, 3)
    try:
        c.wait_serving(3)
        c.wait("bytes reported", lambda s: all(w.get("bytes_received", 0) > 0 for w in s["workers"]))
        before = c.bytes_received()
        for trial in range(args.trials):
            t0 = time.time()
            c.coordinator.kill()
            c.start_coordinator(c.api, c.http)
            c.wait_serving(3, timeout=120)
            took = time.time() - t0
            after = c.bytes_received()
            sent = sum(after.get(k, 0) - v for k, v in before.items())
            log(f"restart {trial + 1}: serving again after {took:.2f}s; weights re-sent: {sent} bytes")
    finally:
        c.close()


def change(args):
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth(model, 12)
    c = Cluster(model, 2)
    try:
        c.wait_serving(2)
        bodies = [body(i, 400, seeded=True) for i in range(8)]
        base = [Stream(c.http, b) for b in bodies]
        tw = []
        for s in base:
            text, _, err = s.join()
            tw.append(text)
        steady = max(s.longest_gap() for s in base)
        log(f"undisturbed: longest pause between two tokens {steady * 1e3:.0f} ms")
        for what in ("join", "drain"):
            streams = [Stream(c.http, b) for b in bodies]
            streams[0].wait_tokens(20)
            if what == "join":
                c.add_worker("w3")
                c.wait_serving(3)
            else:
                subprocess.run([STRATA, "cluster", "drain", "w1", "--coordinator", c.api,
                                "--state-dir", c.state], check=True,
                               capture_output=True)
                c.wait("w1 released", lambda s: all(x["worker"] != "w1" for x in s["plan"]["stages"]))
            failed, changed = check(streams, tw, what)
            gap = max(s.longest_gap() for s in streams)
            log(f"{what} while 8 clients stream: {failed} failed, {changed} changed; "
                f"longest pause {gap * 1e3:.0f} ms (undisturbed {steady * 1e3:.0f} ms)")
    finally:
        c.close()


def sh(*a):
    subprocess.run(list(a), check=True, capture_output=True)


class Lan:
    def __init__(self, hosts, trial=0):
        n = (os.getpid() + trial) % 200 + 20
        self.tag, self.subnet = f"sc{n}", f"10.78.{n}"
        self.hosts = [f"{self.tag}h{i + 1}" for i in range(hosts)]
        br = f"{self.tag}br"
        sh("ip", "link", "add", br, "type", "bridge")
        sh("ip", "addr", "add", f"{self.subnet}.254/24", "dev", br)
        sh("ip", "link", "set", br, "up")
        try:
            open(f"/sys/class/net/{br}/bridge/multicast_snooping", "w").write("0")
        except OSError:
            pass
        for i, ns in enumerate(self.hosts):
            out = f"{self.tag}v{i + 1}"
            sh("ip", "netns", "add", ns)
            sh("ip", "link", "add", out, "type", "veth", "peer", "name", "eth0", "netns", ns)
            sh("ip", "link", "set", out, "master", br)
            sh("ip", "link", "set", out, "up")
            sh("ip", "-n", ns, "addr", "add", f"{self.subnet}.{i + 1}/24", "dev", "eth0")
            sh("ip", "-n", ns, "link", "set", "eth0", "up")
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("ip", "-n", ns, "route", "add", "224.0.0.0/4", "dev", "eth0")

    def prefix(self, i):
        return ("ip", "netns", "exec", self.hosts[i])

    def link(self, i, up):
        sh("ip", "link", "set", f"{self.tag}v{i + 1}", "up" if up else "down")

    def close(self):
        for i, ns in enumerate(self.hosts):
            subprocess.run(["ip", "link", "del", f"{self.tag}v{i + 1}"], capture_output=True)
            subprocess.run(["ip", "netns", "del", ns], capture_output=True)
        subprocess.run(["ip", "link", "del", f"{self.tag}br"], capture_output=True)


def lan(args):
    if os.geteuid() != 0:
        sys.exit("the LAN campaign needs root (network namespaces)")
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth(model, 12)
    rng = random.Random(args.seed)
    recoveries, bad = [], 0
    for trial in range(args.trials):
        net = Lan(6, trial)
        prefixes = {i: net.prefix(i) for i in range(6)}
        prefixes["mode"] = "mdns"
        # Three workers hold the model; a fourth is the spare (the plan gives every eligible
        # worker a share, so it serves too until one is lost).
        c = Cluster(model, 4, prefixes=prefixes, listen="0.0.0.0:7433", reach=f"{net.subnet}.1")
        try:
            c.wait_serving(4)
            bodies = [body(i, 64, seeded=True) for i in range(8)]
            tw = twins(c, bodies)
            streams = [Stream(c.http, b) for b in bodies]
            at = rng.randrange(5, 50)
            streams[0].wait_tokens(at)
            victim = rng.choice(list(c.workers))
            host = list(c.workers).index(victim) + 1
            kind = rng.choice(["kill", "link down"])
            t0 = time.time()
            if kind == "kill":
                c.workers[victim].kill()
            else:
                net.link(host, False)
            failed, changed = check(streams, tw, f"trial {trial + 1}")
            pause = max(s.longest_gap() for s in streams)
            recoveries.append(pause)
            bad += failed + changed
            log(f"trial {trial + 1}: {kind} {victim} at token {at}: {8 - failed - changed} of 8 "
                f"identical; longest pause {pause:.2f}s")
        finally:
            c.close()
            net.close()
    q = statistics.quantiles(recoveries, n=20) if len(recoveries) > 1 else recoveries * 19
    log(f"{args.trials} trials, {bad} answers failed or changed; recovery (longest pause) "
        f"p50 {statistics.median(recoveries):.2f}s, p95 {q[18]:.2f}s")


def soak(args):
    d = tempfile.mkdtemp()
    model = os.path.join(d, "m.gguf")
    synth(model, 12)
    c = Cluster(model, 4, min_workers=4)
    rng = random.Random(args.seed)
    stop = time.time() + args.minutes * 60
    done = failed = 0
    hwm = {}
    lock = threading.Lock()

    def client(i):
        nonlocal done, failed
        k = 0
        while time.time() < stop:
            s = Stream(c.http, body(i * 1000 + k, rng.randrange(16, 128), seeded=True))
            _, finish, err = s.join()
            with lock:
                done += 1
                if err or finish is None:
                    failed += 1
                    log(f"  client {i}: FAILED: {err}")
            k += 1

    try:
        c.wait_serving(4)
        threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(16)]
        for t in threads:
            t.start()
        minute = 0
        while time.time() < stop:
            time.sleep(min(60, max(0, stop - time.time())))
            if time.time() >= stop:
                break
            minute += 1
            for wid, w in c.workers.items():
                hwm.setdefault(wid, []).append(w.vm_hwm())
            victim = rng.choice(list(c.workers))
            c.workers[victim].kill()
            c.add_worker(victim)
            log(f"minute {minute}: {done} answers, {failed} failed; killed and restarted {victim}; "
                f"VmHWM MiB: {', '.join(f'{k} {v[-1] / 2**20:.0f}' for k, v in sorted(hwm.items()))}")
        for t in threads:
            t.join(300)
        log(f"soak over {args.minutes} min: {done} answers, {failed} failed")
    finally:
        c.close()


def main():
    global STRATA
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("campaign", choices=["kill", "stop", "restart", "change", "lan", "soak"])
    p.add_argument("--strata", default=STRATA)
    p.add_argument("--trials", type=int)
    p.add_argument("--minutes", type=float, default=10)
    p.add_argument("--seed", type=int, default=1)
    args = p.parse_args()
    STRATA = os.path.abspath(args.strata)
    trials = {"kill": 3, "stop": 3, "restart": 3, "lan": 20}
    args.trials = args.trials or trials.get(args.campaign, 1)
    {"kill": lambda a: fault_middle(a, signal.SIGKILL, 0),
     "stop": lambda a: fault_middle(a, signal.SIGSTOP, 20),
     "restart": restart, "change": change, "lan": lan, "soak": soak}[args.campaign](args)


if __name__ == "__main__":
    main()
