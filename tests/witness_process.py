"""Witness servers as real processes on loopback (shared by the witness and witnessed-log tests)."""

import http.client
import os
import signal
import subprocess
import sys
import threading
from pathlib import Path
from urllib.parse import urlsplit

from fgtrac_assets.witness import client

REPO = Path(__file__).resolve().parents[1]
ORIGIN = "example.com/log"


def readline(proc: subprocess.Popen, timeout: float = 15.0) -> str:
    out: list[str] = []
    t = threading.Thread(target=lambda: out.append(proc.stdout.readline()), daemon=True)
    t.start()
    t.join(timeout)
    if not out or not out[0]:
        raise AssertionError(f"the witness printed no line within {timeout}s (exit status {proc.poll()})")
    return out[0].rstrip("\n")


class Witness:
    """One witness server process on a free loopback port."""

    def __init__(self, state: Path, log_keys: list[str], name: str | None = None, extra: list[str] = (),
                 listen: str = "127.0.0.1:0"):
        self.state, self.log_keys, self.name, self.extra, self.listen = state, log_keys, name, list(extra), listen
        self.proc: subprocess.Popen | None = None
        self.stderr_path = state.with_name(state.name + f".stderr.{id(self)}")

    def start(self) -> "Witness":
        argv = [sys.executable, "-m", "fgtrac_assets.witness.server", "--state", str(self.state),
                "--listen", self.listen, *self.extra]
        for k in self.log_keys:
            argv += ["--log", k]
        if self.name:
            argv += ["--name", self.name]
        self.stderr = open(self.stderr_path, "a")
        self.proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=self.stderr, text=True)
        first = readline(self.proc)
        assert first.startswith("listening on http://127.0.0.1:"), first
        self.url = first.split()[-1]
        second = readline(self.proc)
        assert second.startswith("witness ")
        self.vkey = second.split()[-1]
        return self

    def kill9(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        self.proc.wait(10)

    def stop(self) -> int:
        if self.proc.poll() is None:
            os.kill(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                os.kill(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.proc.stdout.close()
        self.stderr.close()
        return self.proc.returncode

    def conn(self) -> http.client.HTTPConnection:
        u = urlsplit(self.url)
        return http.client.HTTPConnection(u.hostname, u.port, timeout=10)

    def post(self, body: bytes, path: str = "/add-checkpoint") -> tuple[int, str, str]:
        c = self.conn()
        try:
            c.request("POST", path, body=body, headers={"Content-Type": "text/plain"})
            r = c.getresponse()
            return r.status, r.getheader("Content-Type"), r.read().decode()
        finally:
            c.close()

    def get(self, path: str) -> tuple[int, str]:
        c = self.conn()
        try:
            c.request("GET", path)
            r = c.getresponse()
            return r.status, r.read().decode()
        finally:
            c.close()

    def latest(self, origin: str = ORIGIN) -> str | None:
        return client.latest_checkpoint(self.url, origin, timeout_s=5)

    def submit(self, log, old: int, new: int) -> list[str]:
        return client.add_checkpoint(self.url, old, log.proof(old, new), log.note(new), timeout_s=10)
