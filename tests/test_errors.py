"""Errors (issue 17, item 8): only a FgtracError is a one-line failure; a bug keeps its traceback; proofs say why."""

import ast
import importlib
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow as pa
import pytest

from fgtrac_assets import cli
from fgtrac_assets.errors import FgtracError, InputError, MissingInput, StorageError
from fgtrac_assets.integrity import merkle, notes
from fgtrac_assets.integrity.receipts import ReceiptError, verify_receipt

REPO = Path(__file__).resolve().parents[1]
PACKAGE = REPO / "fgtrac_assets"

# Exception classes that are not a user's to fix: internal signals caught where they are raised, or bugs.
NOT_USER_ERRORS = {
    ("attribution/ghost.py", "GhostNotApplicable"): "the Linear-factor shortcut does not apply: callers take the exact path",
    ("attribution/per_sample.py", "_NotPerSample"): "internal: the vmap path falls back to a loop",
    ("attribution/ihvp.py", "_Diverged"): "internal: a solver's divergence, reported by its caller",
    ("attribution/step_exact.py", "_NotFactored"): "internal: the factored batch path falls back to forward mode",
    ("witness/server.py", "Reject"): "an HTTP answer of the witness, never raised to a user",
    ("integrity/fast_canonical.py", "CanonicalEncodingError"): "a value the writer should have refused first: a bug",
}
# User errors in files whose owner derives them from FgtracError in the same redesign (remove when done).
_BUILTIN_ERRORS = {"Exception", "ValueError", "RuntimeError", "OSError", "FileNotFoundError", "KeyError", "TypeError",
                   "LookupError", "PermissionError", "FileExistsError"}

USER_ERRORS = [  # (module, class, the builtin base its callers and tests still catch)
    ("fgtrac_assets.integrity.receipts", "ReceiptError", ValueError),
    ("fgtrac_assets.integrity.cosignature", "CosignatureError", ValueError),
    ("fgtrac_assets.integrity.tlog_proof", "TlogProofError", ValueError),
    ("fgtrac_assets.integrity.policy", "PolicyError", ValueError),
    ("fgtrac_assets.integrity.notes", "NoteError", ValueError),
    ("fgtrac_assets.integrity.tiles", "TileError", ValueError),
    ("fgtrac_assets.integrity.tiles", "EntryTooLarge", ValueError),
    ("fgtrac_assets.ledger.lock", "LedgerBusy", RuntimeError),
    ("fgtrac_assets.attribution.trace", "ReplayMismatch", ValueError),
    ("fgtrac_assets.ledger.nodes", "TreeDamaged", ValueError),
    ("fgtrac_assets.ledger.export", "ExportError", ValueError),
    ("fgtrac_assets.ledger.proofs", "ProofError", ValueError),
    ("fgtrac_assets.ledger.audit", "AuditError", ValueError),
    ("fgtrac_assets.ledger.store", "LedgerMissing", FileNotFoundError),
    ("fgtrac_assets.ledger.store", "LedgerDamaged", RuntimeError),
    ("fgtrac_assets.ledger.keys", "KeyHistoryError", ValueError),
    ("fgtrac_assets.witness.client", "WitnessError", ValueError),
    ("fgtrac_assets.witness.client", "WitnessConflict", ValueError),
    ("fgtrac_assets.witness.client", "WitnessRejected", ValueError),
    ("fgtrac_assets.witness.client", "WitnessUnavailable", ValueError),
    ("fgtrac_assets.witness.state", "StateError", ValueError),
    ("fgtrac_assets.pipelines.tables", "TableUnreadable", ValueError),
    ("fgtrac_assets.pipelines.stages.commit", "NothingToTrain", ValueError),
    ("fgtrac_assets.session.ids", "SampleIdError", ValueError),
    ("fgtrac_assets.session.run", "SessionError", ValueError),
    ("fgtrac_assets.session.scoring", "InfluenceError", ValueError),
    ("fgtrac_assets.session.recorded_trace", "TraceNotRecorded", ValueError),
    ("fgtrac_assets.errors", "InputError", ValueError),
    ("fgtrac_assets.errors", "MissingInput", FileNotFoundError),
    ("fgtrac_assets.errors", "StorageError", OSError),
]


def fgtrac(*argv, env=None, timeout=60) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "fgtrac_assets.cli", *map(str, argv)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout)


def one_line(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    return lines[0]


# --- (a) what the CLI shows as one line is a FgtracError --------------------------------------------------


@pytest.mark.parametrize("module,name,builtin", USER_ERRORS, ids=[u[1] for u in USER_ERRORS])
def test_user_errors_derive_from_fgtrac_error_and_keep_their_builtin_base(module, name, builtin):
    cls = getattr(importlib.import_module(module), name)
    assert issubclass(cls, FgtracError) and issubclass(cls, builtin)


def test_every_exception_class_of_the_package_is_a_user_error_or_named_as_not_one():
    classes = []
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ClassDef) and any(
                    (isinstance(b, ast.Name) and (b.id.endswith(("Error", "Exception")) or b.id in _BUILTIN_ERRORS))
                    or (isinstance(b, ast.Attribute) and b.attr.endswith(("Error", "Exception"))) for b in node.bases):
                classes.append((path.relative_to(PACKAGE).as_posix(), node.name))
    assert len(classes) >= len(USER_ERRORS)
    listed = {(m.removeprefix("fgtrac_assets.").replace(".", "/") + ".py", n) for m, n, _ in USER_ERRORS}
    unlisted = set(classes) - listed - set(NOT_USER_ERRORS) - {("errors.py", "FgtracError")}
    assert not unlisted, f"new exception classes: derive them from FgtracError, or say why not in NOT_USER_ERRORS: {unlisted}"


# --- (b) a bug is not shown as a user's mistake --------------------------------------------------------


@pytest.mark.parametrize("bug", [json.JSONDecodeError("Expecting value", "{not json", 1), pa.ArrowInvalid("bad"),
                                 ValueError("a bug"), OSError("a bug")], ids=lambda e: type(e).__name__)
def test_the_cli_lets_a_bug_propagate(monkeypatch, tmp_path, bug):
    def boom(args):
        raise bug

    monkeypatch.setattr(cli, "cmd_report", boom)
    with pytest.raises(type(bug)):
        cli.main(["--home", str(tmp_path), "report"])


def test_the_cli_shows_a_user_error_as_one_line_with_status_2(monkeypatch, tmp_path, capsys):
    def refuse(args):
        raise InputError("the thing you gave\nis wrong")

    monkeypatch.setattr(cli, "cmd_report", refuse)
    assert cli.main(["--home", str(tmp_path), "report"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err == "fgtrac: the thing you gave\\nis wrong\n"


def test_a_bug_in_the_fgtrac_command_prints_its_traceback(tmp_path):
    script = ("import json, sys\nimport fgtrac_assets.cli as cli\n"
              "def boom(args):\n    return json.loads('{not json')\n"
              f"cli.cmd_report = boom\nsys.exit(cli.main(['--home', {str(tmp_path)!r}, 'report']))\n")
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" in proc.stderr and "json.decoder.JSONDecodeError" in proc.stderr
    assert "fgtrac: " not in proc.stderr


def test_the_witness_command_lets_a_bug_propagate(monkeypatch, tmp_path):
    from fgtrac_assets.witness import command

    def boom(args):
        raise ValueError("a bug")

    monkeypatch.setattr(command, "cmd_key", boom)
    with pytest.raises(ValueError, match="a bug"):
        command.main(["witness", "key", "--state", str(tmp_path / "w")])


# --- (c) a library error from the user's input is caught where it happens and names what is wrong ---------


@pytest.fixture
def busy_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s.getsockname()[1]


def test_log_serve_on_a_port_in_use_is_one_line_naming_the_address(tmp_path, busy_port):
    (tmp_path / "checkpoint").write_text("x\n")
    proc = fgtrac("log", "serve", tmp_path, "--listen", f"127.0.0.1:{busy_port}")
    assert proc.returncode == 2 and proc.stdout == ""
    line = one_line(proc.stderr)
    assert line.startswith(f"fgtrac: --listen 127.0.0.1:{busy_port}: cannot listen there") and "in use" in line


def test_witness_serve_on_a_port_in_use_is_one_line_naming_the_address(tmp_path, busy_port):
    log_key = notes.generate_signer("example.com/log").verifier_key
    proc = subprocess.run([sys.executable, "-m", "fgtrac_assets.witness.server", "--state", str(tmp_path / "w"),
                           "--listen", f"127.0.0.1:{busy_port}", "--log", log_key],
                          cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and proc.stdout == ""
    assert one_line(proc.stderr).startswith(f"fgtrac witness: --listen 127.0.0.1:{busy_port}: cannot listen there")


def test_a_malformed_policy_is_one_line_naming_the_file_and_line(tmp_path):
    policy = tmp_path / "auditor.policy"
    policy.write_text("log not-a-key\nquorum none\n")
    receipt = tmp_path / "r.json"
    receipt.write_text("{}")
    proc = fgtrac("verify-receipt", receipt, "--policy", policy)
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"fgtrac: {policy}: policy line 1"), line


def test_an_unreadable_trust_store_is_one_line_naming_it(tmp_path):
    store = tmp_path / "known_logs"
    store.mkdir()  # a folder where the trust store file should be
    proc = fgtrac("--home", tmp_path / "home", "key", "forget", env={**os.environ, "FGTRAC_TRUST_STORE": str(store)})
    assert proc.returncode == 2
    line = one_line(proc.stderr)
    assert line.startswith(f"fgtrac: {store}: cannot read the trust store") and "FGTRAC_TRUST_STORE" in line


def test_an_unwritable_receipt_path_is_a_storage_error_naming_it(tmp_path):
    out = tmp_path / "no" / "such" / "folder" / "r.json"
    with pytest.raises(StorageError, match=f"{out}: cannot write .No such file or directory."):
        cli._write_json({"a": 1}, str(out))


def test_a_graph_source_pyarrow_cannot_read_is_a_user_error_naming_the_file(tmp_path):
    from fgtrac_assets.pipelines.movielens import MovieLensPipeline

    (tmp_path / "nodes.csv").write_text("node_id,type,node_id\n1,user,2\n")  # a header pyarrow reads, twice a name
    (tmp_path / "edges.csv").write_bytes(b"")  # no header at all
    with pytest.raises(InputError, match="nodes.csv: malformed CSV header: duplicate column names"):
        MovieLensPipeline().ingest(str(tmp_path), 0)
    with pytest.raises(MissingInput, match="no such file or directory"):
        MovieLensPipeline().ingest(str(tmp_path / "nope"), 0)


def test_out_of_range_training_settings_are_user_errors():
    from fgtrac_assets.pipelines.base import TrainSettings

    with pytest.raises(InputError, match="epochs=0 is out of range"):
        TrainSettings(epochs=0).validate()


def test_a_bad_signing_key_setting_is_a_user_error(tmp_path):
    key = tmp_path / "log.key"
    key.write_text("PRIVATE+KEY+nonsense\n")
    key.chmod(0o600)
    with pytest.raises(InputError, match=f"malformed signer key file {key}"):
        notes.KeyStore(tmp_path, key).load_or_create("fgtrac.local/ledger")


# --- (d) a proof that fails says which check failed ---------------------------------------------------------

LEAVES = [f"leaf {i}".encode() for i in range(12)]
ROOT = merkle.merkle_root(LEAVES)


def test_a_valid_inclusion_proof_holds_and_has_no_reason():
    verdict = merkle.verify_inclusion(LEAVES[7], 7, 12, merkle.inclusion_proof(LEAVES, 7), ROOT)
    assert verdict and verdict.reason is None


def test_a_tampered_inclusion_proof_says_the_root_it_gives():
    proof = merkle.inclusion_proof(LEAVES, 7)
    proof[1] = bytes(32)
    verdict = merkle.verify_inclusion(LEAVES[7], 7, 12, proof, ROOT)
    assert not verdict
    assert verdict.reason.startswith("the proof gives the root ") and f"not the expected {ROOT.hex()[:16]}…" in verdict.reason


@pytest.mark.parametrize("index,size,cut,reason", [
    (7, 12, 1, "the proof has 3 hashes, expected 4 for index 7 in a tree of 12"),
    (7, 12, -1, "the proof has 5 hashes, expected 4 for index 7 in a tree of 12"),
    (12, 12, 0, "leaf index 12 is not below the tree size 12"),
    (-1, 12, 0, "the leaf index must be a non-negative int, got -1"),
])
def test_a_malformed_inclusion_proof_says_why(index, size, cut, reason):
    proof = merkle.inclusion_proof(LEAVES, 7)
    proof = proof[:-cut] if cut > 0 else proof + [bytes(32)] * -cut
    assert merkle.verify_inclusion(LEAVES[7], index, size, proof, ROOT).reason == reason


def test_a_short_hash_in_a_proof_is_named():
    proof = merkle.inclusion_proof(LEAVES, 3)
    proof[2] = proof[2][:31]
    assert merkle.verify_inclusion(LEAVES[3], 3, 12, proof, ROOT).reason == "proof hash 2 is 31 bytes, not 32"


def test_a_consistency_proof_against_the_wrong_old_root_says_so():
    old = merkle.merkle_root(LEAVES[:5])
    proof = merkle.consistency_proof(LEAVES, 5)
    assert merkle.verify_consistency(5, 12, old, ROOT, proof)
    wrong = merkle.verify_consistency(5, 12, merkle.merkle_root(LEAVES[:4]), ROOT, proof)
    assert not wrong and wrong.reason.startswith("the proof gives the old root ")
    short = merkle.verify_consistency(5, 12, old, ROOT, proof[:-1])
    assert short.reason == f"the proof has {len(proof) - 1} hashes, expected {len(proof)} from size 5 to 12"
    assert merkle.verify_consistency(6, 5, old, ROOT, []).reason == "the old size 6 is larger than the new size 5"


def test_a_receipt_with_a_tampered_proof_says_which_check_failed():
    import base64

    signer = notes.generate_signer("example.com/log")
    checkpoint = signer.sign(notes.format_checkpoint("example.com/log", 12, ROOT))
    b64 = lambda b: base64.b64encode(b).decode()  # noqa: E731
    receipt = {"leaf": b64(LEAVES[7]), "leaf_index": 7, "tree_size": 12, "checkpoint": checkpoint,
               "verifier_key": signer.verifier_key,
               "inclusion_proof": [b64(h) for h in merkle.inclusion_proof(LEAVES, 7)[:-1]]}
    with pytest.raises(ReceiptError) as info:
        verify_receipt(receipt, [signer.verifier_key])
    assert str(info.value) == ("inclusion proof for leaf 7 does not match the signed root of tree size 12 "
                               "(the proof has 3 hashes, expected 4 for index 7 in a tree of 12)")
