"""The witness server as real processes over loopback HTTP: C2SP tlog-witness status codes, bodies and state."""

import os
import socket
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.cosignature import cosigned_by, verify_cosignature
from fgtrac_assets.witness import client
from fgtrac_assets.witness.server import MAX_BODY
from fgtrac_assets.witness.state import origin_hash

from tests.witness_process import ORIGIN, REPO, Witness


class Log:
    """A real RFC 6962 log over fixed leaves, signing checkpoints with a notes Signer."""

    def __init__(self, origin: str = ORIGIN, leaves: int = 300):
        self.origin = origin
        self.signer = notes.generate_signer(origin)
        self.leaves = [f"{origin} leaf {i}".encode() for i in range(leaves)]

    def body(self, size: int) -> str:
        return notes.format_checkpoint(self.origin, size, merkle.merkle_root(self.leaves[:size]))

    def note(self, size: int) -> str:
        return self.signer.sign(self.body(size))

    def proof(self, old: int, new: int) -> list[bytes]:
        return merkle.consistency_proof(self.leaves[:new], old) if old else []


@pytest.fixture
def witnesses(tmp_path):
    """Start witnesses with start(...); every process started is stopped by its pid at teardown."""
    started: list[Witness] = []

    def start(log_keys, state: Path | None = None, name: str | None = None, extra=()) -> Witness:
        w = Witness(state or tmp_path / f"state{len(started)}", log_keys, name, extra)
        started.append(w)
        return w.start()

    start.started = started
    yield start
    for w in started:
        if w.proc is not None:
            w.stop()


@pytest.fixture
def log():
    return Log()


def body_for(old: int, proof: list[bytes], note: str) -> bytes:
    return client.format_add_checkpoint(old, proof, note)


def size_of(note: str | None) -> int | None:
    return None if note is None else notes.parse_checkpoint(notes.split_note(note)[0]).size


# --- the happy path ---------------------------------------------------------------


def test_chain_of_growing_checkpoints_is_cosigned(witnesses, log):
    w = witnesses([log.signer.verifier_key], name="witness.example/w1")
    old = 0
    for size in (1, 2, 3, 5, 8, 13, 64, 65, 200, 300):
        lines = w.submit(log, old, size)
        assert len(lines) == 1 and lines[0].startswith("— witness.example/w1 ")
        ts = verify_cosignature(lines[0], log.body(size), w.vkey)
        assert abs(ts - time.time()) < 60
        latest = w.latest()
        assert notes.open_note(latest, [log.signer.verifier]) == log.body(size)
        assert list(cosigned_by(latest, [w.vkey])) == [w.vkey]
        assert latest.endswith(lines[0])  # the served checkpoint carries the cosignature add-checkpoint returned
        old = size
    assert (w.state / "witness.vkey").read_text().strip() == w.vkey


def test_response_formats_and_keep_alive(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    c = w.conn()
    try:
        c.request("POST", "/add-checkpoint", body=body_for(0, [], log.note(4)))
        r = c.getresponse()
        body = r.read().decode()
        assert r.status == 200 and r.getheader("Content-Type").startswith("text/plain")
        assert body.startswith("— ") and body.endswith("\n") and body.count("\n") == 1
        c.request("POST", "/add-checkpoint", body=body_for(0, [], log.note(6)))  # same connection
        r = c.getresponse()
        assert (r.status, r.getheader("Content-Type"), r.read()) == (409, "text/x.tlog.size", b"4\n")
        c.request("GET", f"/{origin_hash(ORIGIN)}/checkpoint")
        r = c.getresponse()
        served = r.read().decode()
        assert r.status == 200 and served == log.note(4) + body  # the log's note plus the cosignature
    finally:
        c.close()


def test_same_size_same_root_is_cosigned_again(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    first = w.submit(log, 0, 7)
    second = w.submit(log, 7, 7)
    assert verify_cosignature(second[0], log.body(7), w.vkey) >= verify_cosignature(first[0], log.body(7), w.vkey)
    assert size_of(w.latest()) == 7


def test_first_submission_with_old_zero_needs_no_proof_and_size_zero_is_accepted(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    assert w.latest() is None
    w.submit(log, 0, 0)
    assert size_of(w.latest()) == 0
    w.submit(log, 0, 9)
    assert size_of(w.latest()) == 9


# --- every status code --------------------------------------------------------------


def test_409_carries_the_latest_size(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    assert w.post(body_for(5, log.proof(5, 8), log.note(8))) == (409, "text/x.tlog.size", "0\n")
    w.submit(log, 0, 5)
    assert w.post(body_for(3, log.proof(3, 8), log.note(8))) == (409, "text/x.tlog.size", "5\n")
    with pytest.raises(client.WitnessConflict) as e:
        w.submit(log, 0, 8)
    assert e.value.size == 5


def test_400_malformed_bodies(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    w.submit(log, 0, 4)
    before = w.latest()
    good_proof = log.proof(4, 8)
    proof_lines = "".join(client.format_add_checkpoint(4, good_proof, "").decode().split("\n", 1)[1])
    note = log.note(8)
    bad = {
        "no blank line": b"old 4\n" + note.split("\n\n")[0].encode(),
        "no old line": ("\n" + note).encode(),
        "leading zero": ("old 04\n" + proof_lines + note).encode(),
        "negative": ("old -4\n" + proof_lines + note).encode(),
        "word": ("new 4\n" + proof_lines + note).encode(),
        "two spaces": ("old  4\n" + proof_lines + note).encode(),
        "bad base64": ("old 4\n" + "!!notbase64!!\n" + proof_lines + note).encode(),
        "short hash": ("old 4\n" + "AAAA\n" + proof_lines + note).encode(),
        "64 proof lines": ("old 4\n" + "AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=\n" * 64 + "\n" + note).encode(),
        "not utf-8": b"old 4\n\n\xff\xfe" + note.encode(),
        "unsigned checkpoint": ("old 4\n" + proof_lines + log.body(8)).encode(),
        "not a checkpoint": ("old 4\n" + proof_lines + log.signer.sign("hello\n")).encode(),
        "old above size": body_for(9, [], note),
        "empty": b"",
    }
    for what, body in bad.items():
        status, ctype, reason = w.post(body)
        assert status == 400, (what, status, reason)
        assert reason.endswith("\n") and reason.count("\n") == 1 and ctype.startswith("text/plain"), what
    assert w.latest() == before


def test_403_when_the_log_signature_does_not_verify(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    impostor = notes.generate_signer(ORIGIN)  # same name, other key: an unknown key, ignored
    status, _, reason = w.post(body_for(0, [], impostor.sign(log.body(5))))
    assert status == 403 and "no verifiable signatures" in reason
    note = log.note(5)
    text, sig_line = note.rsplit("\n\n", 1)
    blob = sig_line.split(" ")[2]
    forged = text + "\n\n" + sig_line.replace(blob, blob[:10] + ("A" if blob[10] != "A" else "B") + blob[11:])
    status, _, reason = w.post(body_for(0, [], forged))
    assert status == 403 and "invalid signature" in reason
    status, _, _ = w.post(body_for(0, [], note.replace("\n5\n", "\n6\n")))  # body changed after signing
    assert status == 403
    assert w.latest() is None


def test_404_unknown_origin_and_paths(witnesses, log):
    other = Log("example.com/other-log")
    w = witnesses([log.signer.verifier_key])
    status, _, reason = w.post(body_for(0, [], other.note(3)))
    assert status == 404 and "example.com/other-log" in reason
    assert w.get(f"/{origin_hash(ORIGIN)}/checkpoint")[0] == 404  # never cosigned
    assert w.get(f"/{origin_hash(other.origin)}/checkpoint")[0] == 404
    assert w.get("/checkpoint")[0] == 404
    assert w.get(f"/{origin_hash(ORIGIN).upper()}/checkpoint")[0] == 404
    assert w.post(body_for(0, [], log.note(3)), path="/add-checkpoint/")[0] == 404
    assert w.get("/add-checkpoint")[0] == 405
    assert w.latest(other.origin) is None


def test_411_and_413(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    u = urlsplit(w.url)
    with socket.create_connection((u.hostname, u.port), timeout=10) as s:
        s.sendall(b"POST /add-checkpoint HTTP/1.1\r\nHost: x\r\n\r\n")
        assert s.recv(4096).split(b"\r\n", 1)[0] == b"HTTP/1.1 411 Length Required"
    c = w.conn()
    try:
        c.putrequest("POST", "/add-checkpoint")
        c.putheader("Content-Length", str(MAX_BODY + 1))
        c.endheaders()  # the body is never sent: the witness answers from the header alone
        r = c.getresponse()
        assert r.status == 413 and b"over" in r.read()
    finally:
        c.close()
    huge = body_for(0, [], log.note(3)) + b"x" * MAX_BODY
    assert w.post(huge)[0] == 413
    assert w.submit(log, 0, 3)  # still serving


def test_422_bad_proofs_and_forks(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    w.submit(log, 0, 13)
    before = w.latest()
    proof = log.proof(13, 40)
    fork = Log()
    fork.signer = log.signer
    fork.leaves = log.leaves[:10] + [b"rewritten"] + log.leaves[11:]
    cases = {
        "proof too short": body_for(13, proof[:-1], log.note(40)),
        "proof too long": body_for(13, proof + [proof[0]], log.note(40)),
        "proof for other sizes": body_for(13, log.proof(12, 40), log.note(40)),
        "tampered hash": body_for(13, [bytes(32)] + proof[1:], log.note(40)),
        "empty proof": body_for(13, [], log.note(40)),
        "history rewritten": body_for(13, fork.proof(13, 40), fork.note(40)),
        "same size other root": body_for(13, [], fork.note(13)),
        "same size with a proof": body_for(13, proof[:1], log.note(13)),
    }
    for what, body in cases.items():
        status, _, reason = w.post(body)
        assert status == 422, (what, status, reason)
    assert w.latest() == before
    assert "rejected a log-signed checkpoint" in w.stderr_path.read_text()  # logged as evidence


def test_422_first_submission_rules(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    assert w.post(body_for(0, log.proof(3, 8)[:1], log.note(8)))[0] == 422  # proof must be empty from 0
    bad_empty = log.signer.sign(notes.format_checkpoint(ORIGIN, 0, bytes(32)))
    assert w.post(body_for(0, [], bad_empty))[0] == 422  # size 0 needs the empty tree's root
    assert w.latest() is None


def test_replays_of_old_checkpoints_are_rejected(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    for old, new in ((0, 5), (5, 8), (8, 20)):
        w.submit(log, old, new)
    latest = w.latest()
    assert w.post(body_for(0, [], log.note(5)))[:2] == (409, "text/x.tlog.size")
    assert w.post(body_for(5, log.proof(5, 8), log.note(8)))[2] == "20\n"
    assert w.post(body_for(20, [], log.note(8)))[0] == 400  # old size above the checkpoint size
    assert w.post(body_for(8, log.proof(8, 20), log.note(20)))[0] == 409
    assert w.latest() == latest


# --- durability ------------------------------------------------------------------------


def test_state_survives_sigkill_and_restart(witnesses, log, tmp_path):
    state = tmp_path / "w"
    w = witnesses([log.signer.verifier_key], state=state)
    vkey = w.vkey
    w.submit(log, 0, 5)
    w.kill9()
    w = witnesses([log.signer.verifier_key], state=state)
    assert w.vkey == vkey  # same key after restart
    assert size_of(w.latest()) == 5
    with pytest.raises(client.WitnessConflict) as e:
        w.submit(log, 0, 8)
    assert e.value.size == 5
    w.submit(log, 5, 8)
    w.kill9()
    w = witnesses([log.signer.verifier_key], state=state)
    with pytest.raises(client.WitnessConflict) as e:
        w.submit(log, 5, 9)
    assert e.value.size == 8
    assert w.post(body_for(8, [], log.note(5)))[0] == 400  # never backwards
    assert verify_cosignature(w.latest(), log.body(8), vkey)
    assert stat.S_IMODE(os.stat(state / "witness.key").st_mode) == 0o600


def test_sigkill_under_load_never_loses_an_acknowledged_cosignature(witnesses, log, tmp_path):
    state = tmp_path / "w"
    w = witnesses([log.signer.verifier_key], state=state)
    acked: list[int] = []
    lock = threading.Lock()
    stop = threading.Event()

    def worker(step: int) -> None:
        old = 0
        while not stop.is_set():
            new = min(old + step, len(log.leaves))
            try:
                w.submit(log, old, new)
                with lock:
                    acked.append(new)
                old = new
            except client.WitnessConflict as e:
                old = e.size
            except client.WitnessUnavailable:
                return
            if old == len(log.leaves):
                return

    threads = [threading.Thread(target=worker, args=(s,)) for s in (1, 2, 3)]
    for t in threads:
        t.start()
    time.sleep(0.6)
    w.kill9()
    stop.set()
    for t in threads:
        t.join(30)
    assert acked, "no submission succeeded before the kill"
    w = witnesses([log.signer.verifier_key], state=state)
    size = size_of(w.latest())
    assert size >= max(acked)
    assert notes.open_note(w.latest(), [log.signer.verifier]) == log.body(size)
    w.submit(log, size, min(size + 1, len(log.leaves)))


# --- concurrency -----------------------------------------------------------------------


def _race(urls: list[str], log: Log, old: int, sizes: list[int]) -> dict[int, object]:
    barrier = threading.Barrier(len(sizes))
    results: dict[int, object] = {}

    def go(i: int, size: int) -> None:
        body = (old, log.proof(old, size), log.note(size))
        barrier.wait()
        try:
            results[size] = client.add_checkpoint(urls[i % len(urls)], *body, timeout_s=20)
        except client.WitnessError as e:
            results[size] = e

    threads = [threading.Thread(target=go, args=(i, s)) for i, s in enumerate(sizes)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    return results


def test_concurrent_submissions_from_one_old_size_have_one_winner(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    old = 0
    for _ in range(3):
        sizes = [old + k for k in range(1, 9)]
        results = _race([w.url], log, old, sizes)
        winners = [s for s, r in results.items() if isinstance(r, list)]
        assert len(winners) == 1, results
        losers = [r for s, r in results.items() if s not in winners]
        assert all(isinstance(r, client.WitnessConflict) and r.size == winners[0] for r in losers), results
        latest = w.latest()
        assert size_of(latest) == winners[0]
        assert latest.endswith(results[winners[0]][0])
        old = winners[0]


def test_two_processes_on_one_state_directory_are_linearised(witnesses, log, tmp_path):
    state = tmp_path / "shared"
    a = witnesses([log.signer.verifier_key], state=state)
    b = witnesses([log.signer.verifier_key], state=state)
    assert a.vkey == b.vkey
    old = 0
    for _ in range(3):
        sizes = [old + k for k in range(1, 9)]
        results = _race([a.url, b.url], log, old, sizes)
        winners = [s for s, r in results.items() if isinstance(r, list)]
        assert len(winners) == 1, results
        assert all(isinstance(r, client.WitnessConflict) and r.size == winners[0]
                   for s, r in results.items() if s != winners[0]), results
        assert size_of(a.latest()) == size_of(b.latest()) == winners[0]
        old = winners[0]


# --- several witnesses, commands, errors -----------------------------------------------------


def test_two_witnesses_side_by_side(witnesses, log):
    w1 = witnesses([log.signer.verifier_key], name="w1.example")
    w2 = witnesses([log.signer.verifier_key], name="w2.example")
    assert w1.vkey != w2.vkey and w1.state != w2.state
    note = log.note(10)
    lines = w1.submit(log, 0, 10) + w2.submit(log, 0, 10)
    both = note + "".join(lines)
    assert set(cosigned_by(both, [w1.vkey, w2.vkey])) == {w1.vkey, w2.vkey}
    with pytest.raises(Exception, match="no cosignature"):
        verify_cosignature(lines[0], log.body(10), w2.vkey)
    w1.submit(log, 10, 20)  # the witnesses' states are independent
    assert (size_of(w1.latest()), size_of(w2.latest())) == (20, 10)


def test_logs_file_and_several_logs(witnesses, log, tmp_path):
    other = Log("example.org/second")
    rotated = notes.generate_signer(ORIGIN)
    state = tmp_path / "w"
    state.mkdir()
    keys = f"{log.signer.verifier_key}\n\n{other.signer.verifier_key}\n"
    (state / "logs").write_text("# logs this witness follows\n" + keys)
    w = witnesses([rotated.verifier_key], state=state)
    w.submit(log, 0, 3)
    w.submit(other, 0, 4)
    client.add_checkpoint(w.url, 3, log.proof(3, 6), rotated.sign(log.body(6)))  # either key of the origin
    assert (size_of(w.latest()), size_of(w.latest(other.origin))) == (6, 4)


def test_damaged_state_answers_500_and_keeps_serving(witnesses, log):
    other = Log("example.org/second")
    w = witnesses([log.signer.verifier_key, other.signer.verifier_key])
    w.submit(log, 0, 3)
    (w.state / "checkpoints" / origin_hash(ORIGIN)).write_text("garbage")
    status, _, reason = w.post(body_for(3, log.proof(3, 5), log.note(5)))
    assert status == 500 and "damaged witness state" in reason and reason.count("\n") == 1
    assert w.get(f"/{origin_hash(ORIGIN)}/checkpoint")[0] == 500
    w.submit(other, 0, 2)
    assert w.proc.poll() is None


def test_sigterm_stops_cleanly(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    w.submit(log, 0, 1)
    assert w.stop() == 0
    assert "witness: stopped" in w.stderr_path.read_text()
    with pytest.raises(client.WitnessUnavailable):
        client.add_checkpoint(w.url, 1, [], log.note(1), timeout_s=2)


def test_witness_key_command(tmp_path, log):
    state = tmp_path / "w"
    cmd = [sys.executable, "-m", "fgtrac_assets.witness.command", "witness", "key", "--state", str(state),
           "--name", "witness.example/key"]
    first = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=30)
    second = subprocess.run(cmd[:-2], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert first.returncode == second.returncode == 0, first.stderr + second.stderr
    vkey = first.stdout.strip()
    assert vkey.startswith("witness.example/key+") and second.stdout.strip() == vkey
    secret = (state / "witness.key").read_text().strip()
    assert secret.startswith("PRIVATE+KEY+witness.example/key+")
    assert secret.split("+", 4)[4] not in first.stdout + first.stderr
    assert stat.S_IMODE(os.stat(state / "witness.key").st_mode) == 0o600
    renamed = subprocess.run(cmd[:-1] + ["other.name"], cwd=REPO, capture_output=True, text=True, timeout=30)
    assert renamed.returncode == 2 and "not 'other.name'" in renamed.stderr


def test_serve_refuses_to_start_without_logs_or_with_a_bad_key(tmp_path):
    base = [sys.executable, "-m", "fgtrac_assets.witness.server", "--state", str(tmp_path / "w"),
            "--listen", "127.0.0.1:0"]
    for extra, reason in (([], "no logs to witness"), (["--log", "nonsense"], "not a log verifier key"),
                          (["--log", "a+b+c", "--listen", "nohost"], "HOST:PORT")):
        r = subprocess.run(base + extra, cwd=REPO, capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and reason in r.stderr and r.stdout == "", (extra, r.stderr)


def test_client_unavailable_on_refused_and_stalled_connections(log):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(client.WitnessUnavailable):
        client.add_checkpoint(f"http://127.0.0.1:{port}", 0, [], log.note(1), timeout_s=2)
    with socket.socket() as stalled:  # accepts connections, never answers
        stalled.bind(("127.0.0.1", 0))
        stalled.listen()
        url = f"http://127.0.0.1:{stalled.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(client.WitnessUnavailable):
            client.add_checkpoint(url, 0, [], log.note(1), timeout_s=0.5)
        with pytest.raises(client.WitnessUnavailable):
            client.latest_checkpoint(url, ORIGIN, timeout_s=0.5)
        assert time.monotonic() - t0 < 5


def test_client_rejections_carry_status_and_reason(witnesses, log):
    w = witnesses([log.signer.verifier_key])
    with pytest.raises(client.WitnessRejected) as e:
        client.add_checkpoint(w.url, 0, [], Log("nowhere.example/log").note(1))
    assert e.value.status == 404 and "nowhere.example/log" in e.value.reason
    with pytest.raises(client.WitnessRejected) as e:
        client.add_checkpoint(w.url, 0, [], notes.generate_signer(ORIGIN).sign(log.body(1)))
    assert e.value.status == 403
    assert isinstance(e.value, ValueError) and str(e.value).count("\n") == 0
