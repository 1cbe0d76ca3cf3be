"""Stdlib-only helpers for the browser test: `dagster dev` in its own process group, GraphQL, headless Chromium.

Chromium is used two ways: one-shot `--dump-dom --screenshot` snapshots (with `--virtual-time-budget`, without
which the React app has not rendered yet), and a small DevTools-protocol client over `--remote-debugging-pipe`
(NUL-separated JSON on fds 3 and 4, no websocket library needed) for the one thing a snapshot cannot do: click.
"""

import base64
import fcntl
import html.parser
import json
import os
import select
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--no-first-run", "--no-default-browser-check", "--hide-scrollbars", "--mute-audio"]
WIDTH, HEIGHT = 1400, 900


def find_chromium() -> str | None:
    """Return the path of Debian's `chromium` binary, or None."""
    return shutil.which("chromium")


def free_port() -> int:
    """Return a TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(fn, timeout: float, what: str, interval: float = 0.5):
    """Call fn until it returns something truthy and return that; raise TimeoutError after timeout seconds."""
    deadline, last = time.monotonic() + timeout, None
    while time.monotonic() < deadline:
        try:
            value = fn()
        except Exception as exc:  # noqa: BLE001 - the server or page is still coming up
            value, last = None, exc
        if value:
            return value
        time.sleep(interval)
    detail = f" (last error: {last!r})" if last else ""
    raise TimeoutError(f"timed out after {timeout:.0f}s waiting for {what}{detail}")


def graphql(base_url: str, query: str, variables: dict | None = None, timeout: float = 15) -> dict:
    """POST a GraphQL query to the Dagster webserver and return its `data` (raise on GraphQL errors)."""
    body = json.dumps({"query": query, "variables": variables or {}}).encode()
    req = urllib.request.Request(f"{base_url}/graphql", data=body, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        out = json.load(resp)
    if out.get("errors"):
        raise RuntimeError(f"GraphQL errors: {out['errors']}")
    return out["data"]


def http_ok(url: str, timeout: float = 3) -> bool:
    """Return whether GET url answers 200."""
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            return resp.status == 200
    except (urllib.error.URLError, OSError):
        return False


def _group_pids(pgid: int) -> list[int]:
    """Return the ids of the live processes in process group pgid (from /proc)."""
    pids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            stat = Path(f"/proc/{entry}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()  # after "pid (comm) ": state ppid pgrp ...
        if fields[0] != "Z" and int(fields[2]) == pgid:
            pids.append(int(entry))
    return pids


def stop_process_group(proc: subprocess.Popen, grace: float = 8.0) -> None:
    """SIGTERM the group led by proc (started with start_new_session=True), SIGKILL it after grace seconds."""
    pgid = proc.pid  # a session leader's process group id is its own pid
    if proc.poll() is None or _group_pids(pgid):
        try:
            os.killpg(pgid, signal.SIGTERM)
        except ProcessLookupError:
            pass
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline and (proc.poll() is None or _group_pids(pgid)):
            time.sleep(0.2)
        if proc.poll() is None or _group_pids(pgid):
            try:
                os.killpg(pgid, signal.SIGKILL)
            except ProcessLookupError:
                pass
    try:
        proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class DagsterDev:
    """`dagster dev -w workspace.yaml -h 127.0.0.1 -p PORT` from the repo root, in its own process group."""

    def __init__(self, dagster_bin: Path, repo: Path, env: dict, port: int, log_path: Path):
        self.cmd = [str(dagster_bin), "dev", "-w", "workspace.yaml", "-h", "127.0.0.1", "-p", str(port)]
        self.repo, self.env, self.log_path = repo, env, log_path
        self.base_url = f"http://127.0.0.1:{port}"
        self.proc: subprocess.Popen | None = None

    def start(self) -> None:
        log = open(self.log_path, "wb")  # noqa: SIM115 - kept open for the server's lifetime
        try:
            self.proc = subprocess.Popen(self.cmd, cwd=self.repo, env=self.env, stdin=subprocess.DEVNULL,
                                         stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        finally:
            log.close()  # the child holds its own copy

    def wait_up(self, timeout: float = 90) -> None:
        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"dagster dev exited with {self.proc.returncode}:\n{self.log_tail()}")
            return http_ok(f"{self.base_url}/server_info")
        try:
            wait_until(up, timeout, "dagster dev to answer /server_info")
        except TimeoutError as exc:
            raise TimeoutError(f"{exc}\n{self.log_tail()}") from None

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def stop(self) -> None:
        if self.proc is not None:
            stop_process_group(self.proc)


class _TextOnly(html.parser.HTMLParser):
    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.lines, self._skip = [], 0

    def handle_starttag(self, tag, attrs):
        if tag in ("script", "style", "noscript"):
            self._skip += 1

    def handle_endtag(self, tag):
        if tag in ("script", "style", "noscript") and self._skip:
            self._skip -= 1

    def handle_data(self, data):
        if not self._skip and data.strip():
            self.lines.append(data.strip())


def dom_lines(html_text: str) -> list[str]:
    """Return the rendered DOM's visible text nodes, stripped, in document order."""
    parser = _TextOnly()
    parser.feed(html_text)
    return parser.lines


def _kill_tree(proc: subprocess.Popen) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait(timeout=10)


def chromium_snapshot(chromium: str, url: str, png: Path | None = None, budget_ms: int = 15000,
                      size: tuple[int, int] = (WIDTH, HEIGHT), timeout: float = 90) -> str:
    """Load url in headless Chromium; return `--dump-dom` and, if png is given, write `--screenshot` there."""
    with tempfile.TemporaryDirectory(prefix="chromium-") as profile:
        cmd = [chromium, *CHROMIUM_FLAGS, f"--user-data-dir={profile}", f"--window-size={size[0]},{size[1]}",
               f"--virtual-time-budget={budget_ms}", "--dump-dom"]
        if png is not None:
            cmd.append(f"--screenshot={png}")
        proc = subprocess.Popen([*cmd, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=profile)
        try:
            out, err = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_tree(proc)
            raise
        finally:
            if proc.poll() is None:
                _kill_tree(proc)
    if proc.returncode != 0 or not out.strip():
        raise RuntimeError(f"chromium failed on {url} (rc {proc.returncode}): {err.decode(errors='replace')[-2000:]}")
    if png is not None and not Path(png).is_file():
        raise RuntimeError(f"chromium wrote no screenshot for {url}: {err.decode(errors='replace')[-2000:]}")
    return out.decode("utf-8", errors="replace")


class CdpBrowser:
    """Headless Chromium driven over the DevTools protocol on a pipe (`--remote-debugging-pipe`)."""

    def __init__(self, chromium: str, log_path: Path, size: tuple[int, int] = (WIDTH, HEIGHT)):
        self.size = size
        self.profile = tempfile.mkdtemp(prefix="chromium-cdp-")

        def high(fd: int) -> int:  # keep the pipe ends clear of 3 and 4, where Chromium expects them
            moved = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 10)
            os.close(fd)
            return moved

        to_read, to_write = map(high, os.pipe())    # we write commands; Chromium reads them on fd 3
        from_read, from_write = map(high, os.pipe())  # Chromium writes answers on fd 4; we read them
        script = (f'exec "$0" "$@" 3<&{to_read} 4>&{from_write} {to_read}<&- {from_write}>&-')
        args = [*CHROMIUM_FLAGS, f"--user-data-dir={self.profile}", f"--window-size={size[0]},{size[1]}",
                "--remote-debugging-pipe", "about:blank"]
        with open(log_path, "wb") as log:
            self.proc = subprocess.Popen(["/bin/bash", "-c", script, chromium, *args], pass_fds=(to_read, from_write),
                                         stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                                         start_new_session=True)
        os.close(to_read)
        os.close(from_write)
        self._w, self._r, self._buf, self._id = to_write, from_read, b"", 0

    def _read_message(self, deadline: float) -> dict:
        while b"\0" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError("no answer from chromium over the DevTools pipe")
            ready, _, _ = select.select([self._r], [], [], left)
            if ready:
                chunk = os.read(self._r, 1 << 20)
                if not chunk:
                    raise EOFError("chromium closed the DevTools pipe")
                self._buf += chunk
        raw, self._buf = self._buf.split(b"\0", 1)
        return json.loads(raw)

    def send(self, method: str, params: dict | None = None, session: str | None = None, timeout: float = 30) -> dict:
        """Send one command and return its result (events that arrive meanwhile are dropped)."""
        self._id += 1
        msg = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._w, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout
        while True:
            answer = self._read_message(deadline)
            if answer.get("id") == self._id:
                if "error" in answer:
                    raise RuntimeError(f"{method}: {answer['error']}")
                return answer.get("result", {})

    def new_page(self) -> str:
        """Open a tab with a fixed viewport and return its session id."""
        target = self.send("Target.createTarget", {"url": "about:blank"})["targetId"]
        session = self.send("Target.attachToTarget", {"targetId": target, "flatten": True})["sessionId"]
        self.send("Page.enable", session=session)
        self.send("Emulation.setDeviceMetricsOverride", {"width": self.size[0], "height": self.size[1],
                                                         "deviceScaleFactor": 1, "mobile": False}, session=session)
        return session

    def navigate(self, session: str, url: str) -> None:
        self.send("Page.navigate", {"url": url}, session=session)

    def evaluate(self, session: str, expression: str):
        """Evaluate a JavaScript expression in the page and return its JSON value."""
        result = self.send("Runtime.evaluate", {"expression": expression, "returnByValue": True,
                                                "awaitPromise": True}, session=session)
        if "exceptionDetails" in result:
            raise RuntimeError(f"JavaScript error: {result['exceptionDetails']}")
        return result["result"].get("value")

    def wait_for(self, session: str, expression: str, timeout: float, what: str):
        """Evaluate expression until it returns something truthy; return that."""
        return wait_until(lambda: self.evaluate(session, expression), timeout, what, interval=0.25)

    def inner_text_lines(self, session: str) -> list[str]:
        text = self.evaluate(session, "document.body ? document.body.innerText : ''") or ""
        return [line.strip() for line in text.splitlines() if line.strip()]

    def screenshot(self, session: str, path: Path) -> None:
        data = self.send("Page.captureScreenshot", {"format": "png"}, session=session)["data"]
        Path(path).write_bytes(base64.b64decode(data))

    def close(self) -> None:
        try:
            if self.proc.poll() is None:
                self.send("Browser.close", timeout=5)
                self.proc.wait(timeout=5)
        except Exception:  # noqa: BLE001 - fall through to killing the group
            pass
        finally:
            stop_process_group(self.proc, grace=3)
            for fd in (self._w, self._r):
                try:
                    os.close(fd)
                except OSError:
                    pass
            shutil.rmtree(self.profile, ignore_errors=True)
