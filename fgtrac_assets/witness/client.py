"""A C2SP tlog-witness client over urllib: submit checkpoints for cosigning, fetch a witness's latest view.

URLs are the witness's prefix (e.g. "http://127.0.0.1:7380"); requests go direct (no proxy from the
environment) and follow no redirects.
"""

import base64
import http.client
import threading
import urllib.error
import urllib.parse
import urllib.request

from ..errors import FgtracError
from .state import origin_hash

DEFAULT_TIMEOUT_S = 5.0
_SIG_PREFIX = "\u2014 "  # EM DASH, space


class WitnessError(FgtracError, ValueError):
    """A witness did not cosign: base class of the client's errors."""


class WitnessConflict(WitnessError):
    """409: the old size is not the witness's latest cosigned size, which is .size."""

    def __init__(self, size: int):
        super().__init__(f"witness conflict: its latest cosigned size is {size}")
        self.size = size


class WitnessRejected(WitnessError):
    """The witness answered with an error status (.status) and a reason (.reason)."""

    def __init__(self, status: int, reason: str):
        super().__init__(f"witness rejected the request: HTTP {status}: {reason}")
        self.status = status
        self.reason = reason


class WitnessUnavailable(WitnessError):
    """The witness could not be reached or did not answer in time."""


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, req, fp, code, msg, headers, newurl):
        return None


_opener = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirect())


def format_add_checkpoint(old_size: int, proof: list[bytes], note: str) -> bytes:
    """Return the add-checkpoint body: "old N\\n", one base64 line per proof hash, an empty line, the note."""
    if isinstance(old_size, bool) or not isinstance(old_size, int) or old_size < 0:
        raise ValueError(f"old size must be a non-negative int, got {old_size!r}")
    lines = [f"old {old_size}\n"] + [base64.b64encode(h).decode() + "\n" for h in proof]
    return ("".join(lines) + "\n" + note).encode("utf-8")


class _KeepAlive:
    """One persistent HTTP/1.1 connection per witness (tlog-witness asks clients to reuse connections)."""

    def __init__(self):
        self.lock = threading.Lock()
        self.connections: dict[tuple[str, int], http.client.HTTPConnection] = {}

    def request(self, req: urllib.request.Request, timeout_s: float) -> tuple[int, str, str] | None:
        """Return (status, content type, body) over a kept-alive connection; None when the URL is not plain http."""
        url = urllib.parse.urlsplit(req.full_url)
        if url.scheme != "http" or not url.hostname:
            return None
        key = (url.hostname, url.port or 80)
        with self.lock:
            con = self.connections.pop(key, None)
        for attempt in (0, 1):  # a kept connection the witness closed meanwhile: one fresh try
            if con is None:
                con = http.client.HTTPConnection(url.hostname, url.port or 80, timeout=timeout_s)
            con.timeout = timeout_s
            if con.sock is not None:
                con.sock.settimeout(timeout_s)
            try:
                path = url.path + (f"?{url.query}" if url.query else "")
                con.request(req.get_method(), path, body=req.data, headers=dict(req.header_items()))
                resp = con.getresponse()
                body = resp.read().decode("utf-8", "replace")
                if not resp.will_close:
                    with self.lock:
                        self.connections[key] = con
                else:
                    con.close()
                return resp.status, resp.headers.get("Content-Type", ""), body
            except (BrokenPipeError, ConnectionResetError) as e:  # RemoteDisconnected included
                con.close()
                con = None
                if attempt:
                    raise WitnessUnavailable(f"witness {req.full_url} unavailable: {e}") from None
            except (OSError, http.client.HTTPException) as e:
                con.close()
                raise WitnessUnavailable(f"witness {req.full_url} unavailable: {e}") from None
        raise WitnessUnavailable(f"witness {req.full_url} unavailable")


_keep_alive = _KeepAlive()


def _request(req: urllib.request.Request, timeout_s: float) -> tuple[int, str, str]:
    """Return (status, content type, body text) of a request; raise WitnessUnavailable if there is no answer."""
    kept = _keep_alive.request(req, timeout_s)
    if kept is not None:
        return kept
    try:
        with _opener.open(req, timeout=timeout_s) as resp:
            return resp.status, resp.headers.get("Content-Type", ""), resp.read().decode("utf-8", "replace")
    except urllib.error.HTTPError as e:
        with e:
            body = e.read().decode("utf-8", "replace")
        return e.code, e.headers.get("Content-Type", "") if e.headers else "", body
    except (urllib.error.URLError, OSError, http.client.HTTPException) as e:
        reason = getattr(e, "reason", None) or e
        raise WitnessUnavailable(f"witness {req.full_url} unavailable: {reason}") from None


def _first_line(body: str) -> str:
    return body.strip().split("\n", 1)[0][:200] or "(no reason given)"


def add_checkpoint(url: str, old_size: int, proof: list[bytes], note: str,
                   timeout_s: float = DEFAULT_TIMEOUT_S) -> list[str]:
    """Submit a signed checkpoint with a consistency proof from old_size; return the witness's cosignature lines.

    Raises WitnessConflict(size) on 409, WitnessRejected(status, reason) on other errors, and
    WitnessUnavailable on connection errors and timeouts.
    """
    req = urllib.request.Request(url.rstrip("/") + "/add-checkpoint", data=format_add_checkpoint(old_size, proof, note),
                                 method="POST", headers={"Content-Type": "text/plain; charset=utf-8"})
    status, content_type, body = _request(req, timeout_s)
    if status == 409:
        size = body[:-1] if body.endswith("\n") else ""
        if content_type.split(";")[0].strip() != "text/x.tlog.size" or not size.isdigit():
            raise WitnessRejected(409, _first_line(body))
        raise WitnessConflict(int(size))
    if status != 200:
        raise WitnessRejected(status, _first_line(body))
    lines = body.splitlines(keepends=True)
    if not lines or any(not (line.startswith(_SIG_PREFIX) and line.endswith("\n")) for line in lines):
        raise WitnessRejected(status, "the witness's 200 response is not a sequence of signature lines")
    return lines


def latest_checkpoint(url: str, origin: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """Return the witness's latest cosigned checkpoint note for origin, or None if it never cosigned one."""
    req = urllib.request.Request(f"{url.rstrip('/')}/{origin_hash(origin)}/checkpoint", method="GET")
    status, _, body = _request(req, timeout_s)
    if status == 404:
        return None
    if status != 200:
        raise WitnessRejected(status, _first_line(body))
    return body
