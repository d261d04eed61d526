#!/usr/bin/env python3
r"""Open WebUI, the chat front end, driven in headless Chromium against Strata's OpenAI API.

Run by `cli/tests/http.rs` (`open_webui_lists_the_model_and_streams_a_chat`) when
STRATA_TEST_OPENWEBUI=1. It:
- starts `strata demo` on free ports (with --strata), or uses a running Strata (--base-url);
- puts a pass-through tap between Open WebUI and Strata that counts the SSE events Strata sends;
- starts `open-webui serve` on a free port, with its data in a fresh temp dir, offline, without
  login, Ollama, the Arena model or the extra LLM calls (titles, tags, follow-ups), and waits
  for GET /health;
- signs in through the API (with auth off the fixed admin@localhost user) and checks that
  GET /api/models lists Strata's model;
- in headless Chromium (Playwright, the system's browser): opens the UI, picks the model,
  types the prompt, sends it and waits for the answer to finish; checks that the answer's
  text grew through at least two distinct non-empty lengths on the page (a MutationObserver
  records its length at every DOM change), that Strata streamed it in at least two SSE events
  for a request with "stream": true, and that the page shows the words Strata sent;
- saves a full-page screenshot, prints "all checks passed" and exits 0. On any failure it
  prints "FAILED: ..." (with the tail of a server's log where that helps) and exits 1.
It always stops what it started and removes its temp dir.

Install (Python 3.11 or 3.12; Open WebUI needs about 2.3 GB besides torch). Open WebUI pulls in
torch through sentence-transformers and accelerate; on PyPI that is the CUDA build with several
GB of nvidia-* wheels. To reuse a torch that is installed already (here /root/golden-venv with
torch 2.15.0), make it visible to the new venv before installing and pin it, so pip keeps it:
    python3 -m venv /tmp/owui/venv
    mkdir /tmp/owui/torch-from-golden && cd /root/golden-venv/lib/python3.11/site-packages && \
      for f in torch torchgen functorch triton nvidia cuda torch-2.15.0.dist-info \
               triton-3.9.0.dist-info nvidia_*.dist-info cuda_*.dist-info; do
        ln -s "$PWD/$f" /tmp/owui/torch-from-golden/; done
    echo /tmp/owui/torch-from-golden > /tmp/owui/venv/lib/python3.11/site-packages/torch-from-golden.pth
    echo torch==2.15.0 > /tmp/owui/constraints.txt
    /tmp/owui/venv/bin/pip install --no-cache-dir -c /tmp/owui/constraints.txt \
      open-webui==0.12.4 playwright==1.65.2
(Without a torch to reuse: `pip install --no-cache-dir open-webui==0.12.4 playwright==1.65.2`,
reportedly 7-9 GB.) Never run `playwright install`: the script launches the system's Chromium
(--chromium, default $STRATA_TEST_CHROMIUM or chromium on PATH).

Run (the `open-webui` command is taken from next to this Python, else from PATH):
    /tmp/owui/venv/bin/python tests/openwebui/check.py --strata target/release/strata \
        --screenshot /tmp/openwebui.png
    /tmp/owui/venv/bin/python tests/openwebui/check.py --base-url http://127.0.0.1:7434/v1 \
        --screenshot /tmp/openwebui.png
Open WebUI takes half a minute or more to start (--startup-timeout, default 300 s).
"""

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import traceback
import urllib.parse
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class Failure(Exception):
    """A check that did not hold, or a server that did not come up."""


def check(cond: bool, what: str) -> None:
    if not cond:
        raise Failure(what)
    print(f"ok: {what}", flush=True)


def note(what: str) -> None:
    print(f"-- {what}", flush=True)


def log_tail(path: Path, lines: int = 40) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as e:
        return f"(no log: {e})"
    tail = text.splitlines()[-lines:]
    return f"--- last {len(tail)} lines of {path.name} ---\n" + "\n".join(tail)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def get_json(url: str, token: str | None = None, body: dict | None = None, timeout: float = 10):
    """GET (or POST, with a body) a JSON document; raises on a non-2xx status."""
    headers = {"Accept": "application/json"}
    data = None
    if token:
        headers["Authorization"] = f"Bearer {token}"
    if body is not None:
        headers["Content-Type"] = "application/json"
        data = json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers=headers)
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


# --- processes ---------------------------------------------------------------------------

try:  # looked up here: the child, forked beside the tap's thread, should only call it
    import ctypes

    _prctl = ctypes.CDLL(None).prctl
except (ImportError, OSError, AttributeError):
    _prctl = None


def _die_with_parent() -> None:
    """In the child: get SIGTERM if this script dies without its cleanup (Linux only)."""
    if _prctl is not None:
        _prctl(1, int(signal.SIGTERM))  # PR_SET_PDEATHSIG


class Server:
    """A child process in its own process group, its output in a log file."""

    def __init__(self, name: str, cmd: list[str], log: Path, env=None, cwd=None):
        self.name, self.log = name, log
        note(f"starting {name}: {' '.join(cmd)}")
        with open(log, "wb") as out:
            self.proc = subprocess.Popen(
                cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                env=env, cwd=cwd, start_new_session=True, preexec_fn=_die_with_parent)

    def wait_for(self, what: str, probe, timeout: float):
        """Polls `probe` until it returns something other than None, with a deadline."""
        deadline = time.monotonic() + timeout
        last_error = None
        while True:
            if self.proc.poll() is not None:
                raise Failure(f"{self.name} exited with {self.proc.returncode} before {what}\n"
                              + log_tail(self.log))
            try:
                got = probe()
                if got is not None:
                    return got
            except (OSError, ValueError, http.client.HTTPException) as e:
                last_error = e
            if time.monotonic() > deadline:
                raise Failure(f"{self.name}: no {what} after {timeout:.0f} s "
                              f"(last error: {last_error})\n" + log_tail(self.log))
            time.sleep(0.25)

    def stop(self) -> None:
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=15)
            except ProcessLookupError:
                pass
        # Anything the server forked and left behind in its group.
        try:
            os.killpg(self.proc.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


# --- the tap between Open WebUI and Strata --------------------------------------------------

class Tap:
    """An HTTP pass-through to Strata that records, for each chat completion, the request and
    the content-carrying SSE events of its answer (when they arrived and what they said)."""

    def __init__(self, upstream: str):
        u = urllib.parse.urlsplit(upstream)
        if u.scheme != "http":
            raise Failure(f"the tap forwards plain http only, not {upstream}")
        self.host, self.port, self.prefix = u.hostname, u.port or 80, u.path.rstrip("/")
        self.chats: list[dict] = []
        self.lock = threading.Lock()
        tap = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_GET(self):
                tap.forward(self, None)

            def do_POST(self):
                n = int(self.headers.get("Content-Length") or 0)
                tap.forward(self, self.rfile.read(n))

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}{self.prefix}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def forward(self, h: BaseHTTPRequestHandler, body: bytes | None) -> None:
        skip = {"host", "connection", "content-length", "accept-encoding", "keep-alive"}
        headers = {k: v for k, v in h.headers.items() if k.lower() not in skip}
        conn = http.client.HTTPConnection(self.host, self.port, timeout=300)
        record = None
        if body is not None and h.path.rstrip("/").endswith("/chat/completions"):
            try:
                request = json.loads(body)
            except ValueError:
                request = {}
            record = {"request": request, "status": None, "events": [], "done": False}
            with self.lock:
                self.chats.append(record)
        try:
            conn.request(h.command, h.path, body=body, headers=headers)
            resp = conn.getresponse()
            if record is not None:
                record["status"] = resp.status
            h.send_response(resp.status)
            for k, v in resp.getheaders():
                if k.lower() not in ("transfer-encoding", "connection", "content-length"):
                    h.send_header(k, v)
            h.send_header("Connection", "close")
            h.end_headers()
            pending = b""
            while True:
                chunk = resp.read1(65536)
                if not chunk:
                    break
                h.wfile.write(chunk)
                h.wfile.flush()
                if record is not None:
                    pending += chunk
                    *lines, pending = pending.split(b"\n")
                    for line in lines:
                        self.sse_line(record, line)
        except (OSError, http.client.HTTPException) as e:
            if record is not None:
                record["error"] = repr(e)
        finally:
            conn.close()

    @staticmethod
    def sse_line(record: dict, line: bytes) -> None:
        line = line.strip()
        if not line.startswith(b"data:"):
            return
        data = line[5:].strip()
        if data == b"[DONE]":
            record["done"] = True
            return
        try:
            event = json.loads(data)
            content = event["choices"][0]["delta"].get("content") or ""
        except (ValueError, KeyError, IndexError, TypeError, AttributeError):
            return
        if content:
            record["events"].append((time.monotonic(), content))

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# --- the browser ------------------------------------------------------------------------

# Records the length of the newest assistant message's text at every DOM change.
OBSERVER_JS = """() => {
  window.__answerLengths = [];
  const t0 = performance.now();
  const sample = () => {
    const all = document.querySelectorAll('.chat-assistant');
    const last = all[all.length - 1];
    const n = last ? last.innerText.trim().length : -1;
    const log = window.__answerLengths;
    if (!log.length || log[log.length - 1][1] !== n) log.push([performance.now() - t0, n]);
  };
  new MutationObserver(sample).observe(document.body,
    {subtree: true, childList: true, characterData: true});
}"""


def words(text: str) -> list[str]:
    # Letters and digits only: markdown's emphasis (`*`, `_`) may reshape the text on the page.
    return re.findall(r"[^\W_]+", text)


def drive_browser(args, webui: str, model: str, tap: Tap) -> None:
    try:
        from playwright.sync_api import TimeoutError as PlaywrightTimeout
        from playwright.sync_api import sync_playwright
    except ImportError as e:
        raise Failure(f"Playwright is not installed for {sys.executable} ({e}); "
                      "see this script's docstring") from e

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, headless=True,
                                    args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 800})
            page.set_default_timeout(30_000)
            page.goto(f"{webui}/?model={urllib.parse.quote(model)}", wait_until="domcontentloaded")
            chat_input = page.locator("#chat-input")
            try:
                chat_input.wait_for(state="visible", timeout=60_000)
            except PlaywrightTimeout as e:
                raise Failure(f"no chat input on the page: {page.url}\n"
                              + page.inner_text("body")[:2000]) from e
            note(f"the UI is up at {page.url}")

            # The "What's New" changelog opens over the chat on a fresh install.
            okay = page.get_by_role("button", name="Okay, Let's Go!")
            try:
                okay.wait_for(state="visible", timeout=5_000)
                okay.click()
                okay.wait_for(state="hidden")
                note("closed the What's New dialog")
            except PlaywrightTimeout:
                pass

            picker = page.locator('button[aria-label^="Selected model"]').first
            label = picker.get_attribute("aria-label") or ""
            if model not in label:
                note(f"selecting {model} (the picker said {label!r})")
                picker.click()
                page.locator(f'button[aria-label="Select {model} model"]').click()
                label = picker.get_attribute("aria-label") or ""
            check(label == f"Selected model: {model}", f"the UI has {model} selected ({label!r})")

            page.evaluate(OBSERVER_JS)
            chat_input.click()
            page.keyboard.type(args.prompt)
            page.keyboard.press("Enter")
            page.locator(".chat-user").filter(has_text=args.prompt).first.wait_for()
            note(f"sent {args.prompt!r}")

            # The answer is finished when its action buttons (Regenerate among them) show.
            message = page.locator('[id^="message-"]').filter(
                has=page.locator(".chat-assistant")).last
            try:
                message.locator('button[aria-label="Regenerate"]').wait_for(
                    state="visible", timeout=args.answer_timeout * 1000)
            except PlaywrightTimeout as e:
                raise Failure(f"no finished answer after {args.answer_timeout} s; the page says:\n"
                              + page.inner_text("body")[:2000]) from e
            answer = message.locator(".chat-assistant").inner_text().strip()
            lengths = page.evaluate("window.__answerLengths")
            note(f"the answer on the page: {answer!r}")
            note("its length at each change (ms, chars): "
                 + ", ".join(f"({t:.0f}, {n})" for t, n in lengths))

            check(bool(answer), "the assistant's answer has text")
            shown = message.inner_text()
            check(model in shown, f"the answer is labelled with the model {model}")
            grew = sorted({n for _, n in lengths if n > 0})
            check(len(grew) >= 2 and grew[0] < len(answer),
                  f"the answer grew on the page through {len(grew)} distinct non-empty lengths "
                  f"{grew[:12]}{' ...' if len(grew) > 12 else ''} before it finished (streamed)")

            # What Strata sent through the tap for this prompt.
            with tap.lock:
                ours = [c for c in tap.chats if args.prompt in json.dumps(c["request"])]
            check(len(ours) >= 1, f"Open WebUI sent the chat to Strata ({len(tap.chats)} chat "
                  "requests went through the tap)")
            chat = ours[-1]
            check(chat["request"].get("stream") is True and chat["status"] == 200,
                  f"Open WebUI asked Strata for a stream (stream={chat['request'].get('stream')}, "
                  f"model={chat['request'].get('model')!r}, status {chat['status']})")
            events = chat["events"]
            streamed = "".join(c for _, c in events)
            span = (events[-1][0] - events[0][0]) * 1000 if events else 0.0
            check(len(events) >= 2 and span > 0 and chat["done"] and "error" not in chat,
                  f"Strata streamed the answer in {len(events)} SSE events over {span:.0f} ms, "
                  f"ending with [DONE] ({chat.get('error', 'no error')})")
            check(words(answer) == words(streamed),
                  f"the page shows the words Strata streamed ({len(words(streamed))} words): "
                  f"{streamed!r}")

            for close in page.locator('button[aria-label="Close toast"]').all():
                try:
                    close.click(timeout=2_000)
                except PlaywrightTimeout:
                    pass
            page.mouse.move(0, 0)
            shot = Path(args.screenshot)
            shot.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(shot), full_page=True)
            check(shot.stat().st_size > 0, f"a full-page screenshot is in {shot}")
        finally:
            browser.close()


# --- the run --------------------------------------------------------------------------

def open_webui_command(arg: str | None) -> str:
    if arg:
        return arg
    beside = Path(sys.executable).parent / "open-webui"
    if beside.exists():
        return str(beside)
    found = shutil.which("open-webui")
    if not found:
        raise Failure("no `open-webui` command next to this Python or on PATH (--open-webui); "
                      "see this script's docstring")
    return found


def default_chromium() -> str | None:
    env = os.environ.get("STRATA_TEST_CHROMIUM")
    if env:
        return env
    for name in ("chromium", "chromium-browser", "google-chrome"):
        found = shutil.which(name)
        if found:
            return found
    return None


def start_strata(args, tmp: Path, servers: list) -> str:
    strata = Server("strata demo", [
        args.strata, "demo", "--no-mdns", "--listen", "127.0.0.1:0", "--http", "127.0.0.1:0",
        "--log-format", "text"], tmp / "strata.log")
    servers.append(strata)

    def address():
        m = re.search(r"^\s*HTTP\s+(http://\S+/v1)\b", strata.log.read_text(errors="replace"),
                      re.MULTILINE)
        return m.group(1) if m else None

    base = strata.wait_for("HTTP address in its output", address, args.strata_timeout)
    note(f"strata demo serves {base}")
    return base


def run(args, tmp: Path, servers: list, taps: list) -> None:
    if not args.chromium or not Path(args.chromium).exists():
        raise Failure(f"no Chromium ({args.chromium!r}); pass --chromium or set STRATA_TEST_CHROMIUM")
    webui_cmd = open_webui_command(args.open_webui)
    base = args.base_url.rstrip("/") if args.base_url else start_strata(args, tmp, servers)

    # Strata answers and serves a model.
    def models():
        ids = [m["id"] for m in get_json(f"{base}/models", timeout=5).get("data", [])]
        return ids or None

    if servers:
        ids = servers[0].wait_for(f"model list at {base}/models", models, args.strata_timeout)
    else:
        deadline = time.monotonic() + args.strata_timeout
        while True:
            try:
                ids = models()
                if ids:
                    break
            except (OSError, ValueError) as e:
                if time.monotonic() > deadline:
                    raise Failure(f"Strata at {base} does not answer: {e}") from e
            if time.monotonic() > deadline:
                raise Failure(f"Strata at {base} lists no model")
            time.sleep(0.25)
    model = args.model or ids[0]
    check(model in ids, f"Strata at {base} serves {model} ({ids})")

    tap = Tap(base)
    taps.append(tap)

    port = free_port()
    data = tmp / "data"
    data.mkdir()
    env = dict(os.environ)
    env.update({
        "DATA_DIR": str(data),
        "WEBUI_SECRET_KEY": "test",
        "WEBUI_AUTH": "False",
        "OFFLINE_MODE": "true",
        "HF_HUB_OFFLINE": "1",
        "RAG_EMBEDDING_ENGINE": "openai",
        "ENABLE_OLLAMA_API": "False",
        "ENABLE_OPENAI_API": "True",
        "OPENAI_API_BASE_URL": tap.url,
        "OPENAI_API_KEY": "x",
        "ENABLE_TITLE_GENERATION": "False",
        "ENABLE_FOLLOW_UP_GENERATION": "False",
        "ENABLE_TAGS_GENERATION": "False",
        "ENABLE_AUTOCOMPLETE_GENERATION": "False",
        "ENABLE_EVALUATION_ARENA_MODELS": "False",
        "PYTHONUNBUFFERED": "1",
    })
    for var in ("OPENAI_API_BASE_URLS", "OPENAI_API_KEYS", "PORT", "HOST"):
        env.pop(var, None)
    webui = f"http://127.0.0.1:{port}"
    owui = Server("open-webui", [webui_cmd, "serve", "--host", "127.0.0.1", "--port", str(port)],
                  tmp / "open-webui.log", env=env, cwd=tmp)
    servers.append(owui)
    started = time.monotonic()

    def healthy():
        return True if get_json(f"{webui}/health", timeout=5).get("status") is True else None

    owui.wait_for(f"healthy {webui}/health", healthy, args.startup_timeout)
    note(f"Open WebUI is up at {webui} after {time.monotonic() - started:.0f} s "
         f"(version {get_json(f'{webui}/api/config').get('version')})")

    try:
        token = get_json(f"{webui}/api/v1/auths/signin",
                         body={"email": "admin@localhost", "password": "admin"})["token"]
    except (OSError, ValueError, KeyError) as e:
        raise Failure(f"cannot sign in to Open WebUI: {e}\n" + log_tail(owui.log)) from e
    check(bool(token), "signed in to Open WebUI (auth off: the admin@localhost user)")
    listed = get_json(f"{webui}/api/models", token=token, timeout=30).get("data", [])
    names = [m.get("id") for m in listed]
    check(model in names, f"Open WebUI's /api/models lists {model} ({names})")
    entry = next(m for m in listed if m.get("id") == model)
    check((entry.get("openai") or {}).get("owned_by") == "strata",
          f"and it came from Strata's /v1/models (owned_by {entry.get('openai', {}).get('owned_by')!r})")

    drive_browser(args, webui, model, tap)
    if owui.proc.poll() is not None:
        raise Failure("Open WebUI exited during the chat\n" + log_tail(owui.log))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    where = ap.add_mutually_exclusive_group(required=True)
    where.add_argument("--strata", help="the strata binary: the script starts `strata demo`")
    where.add_argument("--base-url", help="a running Strata's OpenAI API, e.g. http://127.0.0.1:7434/v1")
    ap.add_argument("--screenshot", required=True, help="where to save the full-page PNG")
    ap.add_argument("--model", help="the model to chat with (default: the first Strata lists)")
    ap.add_argument("--prompt", default="Once upon a time")
    ap.add_argument("--open-webui", help="the open-webui command (default: beside this Python)")
    ap.add_argument("--chromium", default=default_chromium(), help="the browser to drive")
    ap.add_argument("--startup-timeout", type=float, default=300, help="seconds for Open WebUI")
    ap.add_argument("--strata-timeout", type=float, default=120, help="seconds for Strata")
    ap.add_argument("--answer-timeout", type=float, default=120, help="seconds for the answer")
    ap.add_argument("--keep-temp", action="store_true", help="keep the temp dir (logs, data)")
    args = ap.parse_args()

    # `kill` goes through the same cleanup as Ctrl-C.
    def terminated(*_):
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, terminated)
    tmp = Path(tempfile.mkdtemp(prefix="strata-openwebui-"))
    servers: list[Server] = []
    taps: list[Tap] = []
    status = 1
    try:
        run(args, tmp, servers, taps)
        print("all checks passed", flush=True)
        status = 0
    except Failure as e:
        print(f"FAILED: {e}", flush=True)
    except KeyboardInterrupt:
        print("FAILED: interrupted", flush=True)
    except Exception:  # a bug here or an API that changed: say where
        traceback.print_exc()
        print(f"FAILED: unexpected {sys.exc_info()[1]!r}", flush=True)
    finally:
        for server in reversed(servers):
            try:
                server.stop()
            except Exception as e:  # keep stopping the others
                print(f"warning: could not stop {server.name}: {e}", flush=True)
        for tap in taps:
            tap.close()
        if args.keep_temp:
            note(f"kept {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)
    return status


if __name__ == "__main__":
    sys.exit(main())
