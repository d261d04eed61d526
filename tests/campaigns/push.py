#!/usr/bin/env python3
"""Weight push: how fast the coordinator streams a slice to a worker on loopback, and what
a restarted worker is sent again (its cache keeps slices by content digest: nothing).
A figure for the closing note of the speed issue, never a CI test. Standard library only.

    cargo build --release -p strata
    python3 tests/campaigns/push.py            # a ~600 MB Q8_0 model, one worker
    python3 tests/campaigns/push.py --layers 16 --trials 3

It reads the worker's "slice loaded" line: received_bytes over receive_ms (the transfer
alone; loading into memory is after it). Before the trials it measures the same file over a
bare TLS stream with the cluster's certificates and a file write at the far end
(net/tests/tls_ceiling.rs): what a push cannot beat on this machine, the same-run baseline
its figures are a ratio of (--no-ceiling skips it). Then a plain write of the same size into
the page cache on memory the VM has handed back to its host: on such a VM (free page
reporting) whichever of the two writes into memory freed seconds before runs several times
faster, so the best trial is set against the bare stream and the worst against this floor.
"""

import argparse
import os
import re
import subprocess
import tempfile
import time

import heal
from heal import Cluster, log


def synth(path, layers):
    subprocess.run([heal.STRATA, "model", "synth", "--arch", "llama", "--layers", str(layers),
                    "--hidden", "2048", "--heads", "32", "--kv-heads", "8", "--intermediate", "8192",
                    "--vocab", "32000", "--seed", "7", "--format", "gguf", "--quant", "q8_0",
                    "--out", path], check=True, capture_output=True)


def loaded(proc, after=0):
    """(received bytes, receive ms) of the first "slice loaded" line past `after` lines."""
    end = time.time() + 300
    while time.time() < end:
        for line in proc.lines[after:]:
            if "slice loaded" in line:
                got = dict(re.findall(r"(\w+)=(\d+)", line))
                return int(got["received_bytes"]), int(got.get("receive_ms", got["ms"]))
        time.sleep(0.05)
    raise RuntimeError("no slice loaded:\n" + "".join(proc.lines[-20:]))


def tls_ceiling(model):
    """MB/s of the bare TLS stream of `model` (see the module doc)."""
    root = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..")
    out = subprocess.run(["cargo", "test", "--release", "-p", "strata-net", "--test", "tls_ceiling",
                          "--", "--ignored", "--nocapture"], cwd=root, capture_output=True, text=True,
                         env=dict(os.environ, STRATA_TLS_CEILING_FILE=model), check=True)
    rate = float(re.search(r"tls ceiling: .* ([0-9.]+) MB/s", out.stdout).group(1))
    log(f"bare TLS stream of the same file: {rate:.0f} MB/s")
    return rate


def cold_write(directory, size):
    """MB/s of writing `size` bytes into a new file's page cache on memory the guest has
    given back: on a VM with free page reporting (Firecracker's `page_reporting`), memory
    freed a few seconds ago is returned to the host, and touching it again costs a fault
    in the hypervisor per page. A worker's cache write pays that too; this is its floor."""
    os.sync()
    time.sleep(5)  # let the guest report what the last step freed
    path = os.path.join(directory, "cold-write")
    chunk = b"\x5a" * (1 << 20)
    started = time.perf_counter()
    with open(path, "wb") as f:
        for _ in range(size >> 20):
            f.write(chunk)
    rate = size / (time.perf_counter() - started) / 1e6
    os.remove(path)
    log(f"page-cache write of the same size on returned memory: {rate:.0f} MB/s")
    return rate


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--strata", default=heal.STRATA)
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--trials", type=int, default=2)
    p.add_argument("--no-ceiling", action="store_true")
    a = p.parse_args()
    heal.STRATA = a.strata
    d = tempfile.mkdtemp(prefix="strata-push-")
    model = os.path.join(d, "push.gguf")
    synth(model, a.layers)
    log(f"model: {os.path.getsize(model) / 1e6:.0f} MB, {a.layers} layers")
    # Each step starts once the disk has caught up with what the last one wrote (the model,
    # a worker's cache): on a VM whose disk writes a few hundred MB/s, a trial would
    # otherwise measure the previous one's writeback, not the stream.
    os.sync()
    ceiling = None if a.no_ceiling else tls_ceiling(model)
    floor = None if a.no_ceiling else cold_write(d, os.path.getsize(model))
    best, worst = 0, float("inf")
    for trial in range(a.trials):
        os.sync()
        c = Cluster(model, 1, worker_args=["--speed", "1e9"])
        try:
            c.wait_serving(1, timeout=600)
            received, ms = loaded(c.workers["w1"])
            rate = received / max(ms, 1) / 1e3
            best, worst = max(best, rate), min(worst, rate)
            log(f"trial {trial + 1}: pushed {received / 1e6:.0f} MB in {ms} ms: {rate:.0f} MB/s")
            # Restarted with the same cache: sent nothing.
            c.workers["w1"].kill()
            c.add_worker("w1")
            c.wait_serving(1, timeout=600)
            again, _ = loaded(c.workers["w1"])
            log(f"trial {trial + 1}: the restarted worker was sent {again} bytes")
        finally:
            c.close()
    if ceiling:
        log(f"best push {best:.0f} MB/s = {best / ceiling:.2f}x the bare TLS stream ({ceiling:.0f} MB/s);"
            f" worst {worst:.0f} MB/s = {worst / floor:.2f}x a page-cache write on returned memory"
            f" ({floor:.0f} MB/s)")


if __name__ == "__main__":
    main()
