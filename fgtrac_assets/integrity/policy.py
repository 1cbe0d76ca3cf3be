"""C2SP tlog-policy files: the logs and witnesses a verifier trusts, and the witness quorum.

Syntax as in C2SP tlog-policy: `log <vkey> [<url>]`, `witness <name> <vkey> [<url>]`,
`group <name> all|any|<k> <member>...`, `quorum <name>` (or `quorum none`); `#` comments and
blank lines are ignored, names refer only to earlier lines. One extension: `quorum <k>` with a
number no line defines means "at least k of all the witnesses" (a group fgtrac defines for you).
"""

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import FgtracError

_WS = re.compile(r"[ \t]+")
_DECIMAL = re.compile(r"[1-9][0-9]*")


class PolicyError(FgtracError, ValueError):
    """A policy file that does not follow C2SP tlog-policy."""


@dataclass(frozen=True)
class Witness:
    """A witness the policy names: its cosignature verifier key and, optionally, its tlog-witness URL."""

    name: str
    vkey: str
    url: str | None = None


@dataclass(frozen=True)
class Group:
    """k of the members (witnesses or groups) must have witnessed a checkpoint."""

    name: str
    k: int
    members: tuple[str, ...]


@dataclass
class Policy:
    """A parsed policy: trusted log keys, witnesses, groups and the quorum rule."""

    logs: list[tuple[str, str | None]] = field(default_factory=list)
    witnesses: dict[str, Witness] = field(default_factory=dict)
    groups: dict[str, Group] = field(default_factory=dict)
    quorum: str = "none"

    @property
    def log_keys(self) -> list[str]:
        """Return the verifier keys of the trusted logs."""
        return [vkey for vkey, _ in self.logs]

    def satisfied(self, cosigned: set[str]) -> bool:
        """Return whether the witnesses named in cosigned meet the quorum."""
        return self.quorum == "none" or self._witnessed(self.quorum, cosigned)

    def _witnessed(self, name: str, cosigned: set[str]) -> bool:
        group = self.groups.get(name)
        if group is None:
            return name in cosigned
        return sum(self._witnessed(m, cosigned) for m in group.members) >= group.k

    def cosigners(self, note: str) -> set[str]:
        """Return the names of this policy's witnesses whose cosignature on the signed note verifies."""
        from . import cosignature, notes

        body = notes.split_note(note)[0]
        names = set()
        for w in self.witnesses.values():
            try:
                cosignature.verify_cosignature(note, body, w.vkey)
                names.add(w.name)
            except cosignature.CosignatureError:
                pass
        return names

    def needed(self) -> str:
        """Return the quorum rule in words, for messages."""
        if self.quorum == "none":
            return "no cosignature"
        group = self.groups.get(self.quorum)
        if group is None:
            return f"a cosignature from {self.quorum}"
        return f"{group.k} of {', '.join(group.members)}"


def parse_policy(text: str) -> Policy:
    """Return the Policy in a tlog-policy text; raise PolicyError naming the line that is wrong."""
    from . import cosignature, notes  # local: cosignature imports notes

    policy = Policy()
    quorum_line = None
    for no, raw in enumerate(text.split("\n"), 1):
        if any(c in raw for c in "\r\x00") or any(ord(c) < 0x20 and c != "\t" for c in raw):
            raise PolicyError(f"policy line {no}: a control character")
        words = _WS.split(raw.strip())
        if not words[0] or words[0].startswith("#"):
            continue
        kind, args = words[0], words[1:]

        def fail(why: str):
            raise PolicyError(f"policy line {no} ({kind}): {why}")

        if kind == "log":
            if len(args) not in (1, 2):
                fail("expected `log <vkey> [<url>]`")
            try:
                notes.parse_verifier_key(args[0])
            except ValueError as exc:
                fail(f"not an Ed25519 log verifier key ({exc})")
            if any(_same_key(args[0], k) for k, _ in policy.logs):
                fail("a duplicate log key")
            policy.logs.append((args[0], args[1] if len(args) == 2 else None))
        elif kind == "witness":
            if len(args) not in (2, 3):
                fail("expected `witness <name> <vkey> [<url>]`")
            name, vkey = args[0], args[1]
            if name in policy.witnesses or name in policy.groups or name == "none":
                fail(f"the name {name} is already defined")
            try:
                cosignature.parse_cosignature_vkey(vkey)
            except ValueError as exc:
                fail(f"not a cosignature verifier key ({exc})")
            if any(_same_key(vkey, w.vkey) for w in policy.witnesses.values()):
                fail("a duplicate witness key")
            policy.witnesses[name] = Witness(name, vkey, args[2] if len(args) == 3 else None)
        elif kind == "group":
            if len(args) < 3:
                fail("expected `group <name> all|any|<k> <member>...`")
            name, threshold, members = args[0], args[1], tuple(args[2:])
            if name in policy.witnesses or name in policy.groups or name == "none":
                fail(f"the name {name} is already defined")
            unknown = [m for m in members if m not in policy.witnesses and m not in policy.groups]
            if unknown:
                fail(f"members not defined on an earlier line: {', '.join(unknown)}")
            if len(set(members)) != len(members):
                fail("a member listed twice")
            k = {"all": len(members), "any": 1}.get(threshold)
            if k is None:
                if not _DECIMAL.fullmatch(threshold) or not 1 <= int(threshold) <= len(members):
                    fail(f"threshold {threshold!r} is not all, any or 1..{len(members)}")
                k = int(threshold)
            policy.groups[name] = Group(name, k, members)
        elif kind == "quorum":
            if len(args) != 1:
                fail("expected `quorum <name>`")
            if quorum_line is not None:
                fail(f"a second quorum line (the first is line {quorum_line})")
            quorum_line, name = no, args[0]
            if name != "none" and name not in policy.witnesses and name not in policy.groups:
                if not _DECIMAL.fullmatch(name):
                    fail(f"{name} is not defined on an earlier line")
                k, everyone = int(name), tuple(policy.witnesses)
                if not 1 <= k <= len(everyone):
                    fail(f"quorum {k} needs at least {k} witnesses defined before it")
                policy.groups[f"{k}-of-all"] = Group(f"{k}-of-all", k, everyone)
                name = f"{k}-of-all"
            policy.quorum = name
        else:
            fail("unknown line type (expected log, witness, group or quorum)")
    if quorum_line is None:
        raise PolicyError("policy: no quorum line (write `quorum none` to require no witness)")
    return policy


def load_policy(path: str | Path) -> Policy:
    """Return the policy in a file; raise PolicyError naming the file and the problem."""
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except OSError as exc:
        raise PolicyError(f"{path}: cannot read the policy ({exc.strerror or exc})") from None
    except UnicodeDecodeError:
        raise PolicyError(f"{path}: the policy is not UTF-8 text") from None
    try:
        return parse_policy(text)
    except PolicyError as exc:
        raise PolicyError(f"{path}: {exc}") from None


def _same_key(a: str, b: str) -> bool:
    """Return whether two vkeys wrap the same public key (name and key id aside)."""
    return a.split("+", 2)[-1] == b.split("+", 2)[-1]
