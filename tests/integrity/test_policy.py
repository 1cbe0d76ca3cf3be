"""C2SP tlog-policy parsing and quorum rules, and the trust store that pins log keys on first use."""

import pytest

from fgtrac_assets.integrity import notes
from fgtrac_assets.integrity.cosignature import generate_cosigner
from fgtrac_assets.integrity.policy import PolicyError, load_policy, parse_policy
from fgtrac_assets.integrity.truststore import TrustStore

LOG = notes.generate_signer("example.com/log").verifier_key
W = {n: generate_cosigner(f"witness.example/{n}").verifier_key for n in ("X1", "X2", "X3", "Y1", "Y2")}


def test_the_spec_example_with_nested_groups():
    policy = parse_policy(f"""
# two organisations
log {LOG}
witness X1 {W['X1']}
witness X2 {W['X2']}
witness X3 {W['X3']}
group X-witnesses 2 X1 X2 X3
\twitness Y1 {W['Y1']} http://127.0.0.1:1/
witness Y2 {W['Y2']}
group Y-witnesses any Y1 Y2
group X-and-Y all X-witnesses Y-witnesses
quorum X-and-Y
""")
    assert policy.log_keys == [LOG] and policy.witnesses["Y1"].url == "http://127.0.0.1:1/"
    assert policy.satisfied({"X1", "X3", "Y2"})
    assert not policy.satisfied({"X1", "Y1", "Y2"})  # one X only
    assert not policy.satisfied({"X1", "X2"})  # no Y


def test_numeric_quorum_means_k_of_all_witnesses_and_none_needs_nothing():
    policy = parse_policy(f"log {LOG}\nwitness a {W['X1']}\nwitness b {W['X2']}\nwitness c {W['X3']}\nquorum 2\n")
    assert policy.satisfied({"a", "c"}) and not policy.satisfied({"b"})
    assert "2 of a, b, c" in policy.needed()
    assert parse_policy("quorum none\n").satisfied(set())


@pytest.mark.parametrize("text,why", [
    ("log {log}\n", "no quorum line"),
    ("quorum none\nquorum none\n", "a second quorum line"),
    ("quorum X1\n", "not defined on an earlier line"),
    ("witness X1 {x1}\nwitness X1 {x2}\nquorum none\n", "already defined"),
    ("witness X1 {x1}\nwitness X2 {x1}\nquorum none\n", "duplicate witness key"),
    ("log {log}\nlog {log}\nquorum none\n", "duplicate log key"),
    ("witness X1 {log}\nquorum none\n", "not a cosignature verifier key"),
    ("log {x1}\nquorum none\n", "not an Ed25519 log verifier key"),
    ("witness X1 {x1}\ngroup G 3 X1\nquorum G\n", "threshold"),
    ("witness X1 {x1}\ngroup G any X1 X1\nquorum G\n", "listed twice"),
    ("witness X1 {x1}\nquorum 2\n", "needs at least 2 witnesses"),
    ("frobnicate\nquorum none\n", "unknown line type"),
    ("quorum none\r\n", "control character"),
])
def test_malformed_policies_name_the_line(text, why):
    with pytest.raises(PolicyError, match=why):
        parse_policy(text.format(log=LOG, x1=W["X1"], x2=W["X2"]))


def test_load_policy_names_the_file(tmp_path):
    path = tmp_path / "policy"
    path.write_text("log nonsense\nquorum none\n")
    with pytest.raises(PolicyError, match=f"{path}: policy line 1"):
        load_policy(path)
    with pytest.raises(PolicyError, match="cannot read"):
        load_policy(tmp_path / "missing")


def test_trust_store_pins_per_origin_and_home(tmp_path):
    store = TrustStore(tmp_path / "cfg" / "known_logs")
    assert store.pinned("o", "/h 1") == []
    assert store.pin("o", "/h 1", ["k1", "k2"]) == ["k1", "k2"]
    assert store.pin("o", "/h 1", ["k1", "k2", "k3"]) == ["k3"]
    assert store.pinned("o", "/h 1") == ["k1", "k2", "k3"]
    assert store.pinned("o", "/h 2") == [] and store.pinned("p", "/h 1") == []
